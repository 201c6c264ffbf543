"""The DDP strategy of ``trainer=ddp``: Lightning's, with the model wrapped on the stream that trains it, and a
choice of how torch.compile meets DDP's gradient all-reduce.

Lightning 2.6 builds ``DistributedDataParallel`` inside a fresh side stream (meant for capturing whole
iterations in CUDA graphs, which we do not do). DDP keeps references to the parameters' AccumulateGrad nodes
it creates there, so every backward pass then accumulates gradients produced on the default stream into nodes
bound to the side stream: PyTorch warns "The AccumulateGrad node's stream does not match ..." on each rank and
synchronises the two streams for every parameter. Wrapping on the current stream, as plain PyTorch DDP does,
removes both (the fix Lightning merged upstream later, pytorch-lightning#21746).

``compiled_ddp`` is torch._dynamo's ``optimize_ddp`` for the networks compiled inside the DDP-wrapped module:
"ddp_optimizer" (PyTorch's default) splits each compiled graph at DDP's bucket boundaries, so a bucket's
all-reduce can start while the rest of the backward pass runs, at the price of smaller graphs that fuse less;
"no_optimization" keeps one graph per network and all-reduces after its backward pass. The default is
no_optimization: the overlap does not pay for the smaller graphs, which fuse less and compile longer
(experiments/scaling/README.md has the A/B).

``sync_batchnorm=true`` converts BatchNorm layers (the discriminator's) to ``GlobalBatchNorm``
(sync_batch_norm.py) rather than torch's SyncBatchNorm.
"""

import contextlib
from typing import Literal, Optional

import torch._dynamo
from lightning.pytorch.plugins.layer_sync import LayerSync, TorchSyncBatchNorm
from lightning.pytorch.strategies import DDPStrategy
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel

from lightning_ldm.training.sync_batch_norm import GlobalBatchNormSync

CompiledDDP = Literal["ddp_optimizer", "no_optimization"]


class DDPOnCurrentStreamStrategy(DDPStrategy):
    def __init__(self, *args, compiled_ddp: CompiledDDP = "no_optimization", **kwargs) -> None:
        if compiled_ddp not in ("ddp_optimizer", "no_optimization"):
            raise ValueError(f"compiled_ddp must be 'ddp_optimizer' or 'no_optimization', got {compiled_ddp!r}")
        super().__init__(*args, **kwargs)
        self.compiled_ddp = compiled_ddp
        self._run_settings = contextlib.ExitStack()

    def dynamo_settings(self) -> contextlib.AbstractContextManager:
        """torch._dynamo's optimize_ddp for the graphs traced inside this context, restored on exit."""
        return torch._dynamo.config.patch(optimize_ddp=self.compiled_ddp)

    def setup_environment(self) -> None:
        # Before anything is compiled (graphs are traced at the first forward pass), until teardown: a later run in
        # the same process (a sweep's next trial) starts from torch's own setting again.
        self._run_settings.enter_context(self.dynamo_settings())
        super().setup_environment()

    def teardown(self) -> None:
        super().teardown()
        self._run_settings.close()

    @property
    def _layer_sync(self) -> Optional[LayerSync]:
        return self._batch_norm_sync

    @_layer_sync.setter
    def _layer_sync(self, plugin: Optional[LayerSync]) -> None:
        # trainer.sync_batchnorm=true hands over Lightning's TorchSyncBatchNorm (torch's SyncBatchNorm, a GPU sync
        # in every layer's forward pass); GlobalBatchNorm computes the same statistics without one.
        self._batch_norm_sync = GlobalBatchNormSync() if type(plugin) is TorchSyncBatchNorm else plugin

    def _setup_model(self, model: Module) -> DistributedDataParallel:
        return DistributedDataParallel(module=model, device_ids=self.determine_ddp_device_ids(), **self._ddp_kwargs)
