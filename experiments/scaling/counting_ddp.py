"""A DDP strategy that counts what DDP all-reduces: bucket all-reduces and bytes over the run, printed at exit.

    PYTHONPATH=experiments/scaling python -m lightning_ldm stage=autoencoder trainer=ddp trainer.accelerator=cpu \\
        trainer.devices=2 trainer.precision=32-true trainer.sync_batchnorm=false data.batch_size=4 max_steps=4 \\
        loss.disc_start=0 trainer.limit_val_batches=0 module.image_log_every=0 logger=csv \\
        trainer.strategy._target_=counting_ddp.CountingDDP

Gloo on the CPU: the traffic depends on the parameters and the training step, not on the device.
"""

import atexit
import os

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from lightning_ldm.training.ddp import DDPOnCurrentStreamStrategy

TRAFFIC = {"all_reduces": 0, "bytes": 0}


def counting_all_reduce(state, bucket):
    TRAFFIC["all_reduces"] += 1
    TRAFFIC["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(state, bucket)  # DDP's own all-reduce, averaged over ranks


class CountingDDP(DDPOnCurrentStreamStrategy):
    def _setup_model(self, model):
        ddp = super()._setup_model(model)
        ddp.register_comm_hook(None, counting_all_reduce)
        trainable = sum(p.numel() * p.element_size() for p in ddp.parameters() if p.requires_grad)
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            atexit.register(lambda: print(f"DDP traffic: {TRAFFIC['all_reduces']} bucket all-reduces, "
                                          f"{TRAFFIC['bytes'] / 1e6:.2f} MB; trainable parameters "
                                          f"{trainable / 1e6:.2f} MB", flush=True))
        return ddp
