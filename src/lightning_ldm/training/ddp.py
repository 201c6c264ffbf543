"""The DDP strategy of ``trainer=ddp``: Lightning's, with the model wrapped on the stream that trains it.

Lightning 2.6 builds ``DistributedDataParallel`` inside a fresh side stream (meant for capturing whole
iterations in CUDA graphs, which we do not do). DDP keeps references to the parameters' AccumulateGrad nodes
it creates there, so every backward pass then accumulates gradients produced on the default stream into nodes
bound to the side stream: PyTorch warns "The AccumulateGrad node's stream does not match ..." on each rank and
synchronises the two streams for every parameter. Wrapping on the current stream, as plain PyTorch DDP does,
removes both (the fix Lightning merged upstream later, pytorch-lightning#21746).
"""

from lightning.pytorch.strategies import DDPStrategy
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel


class DDPOnCurrentStreamStrategy(DDPStrategy):
    def _setup_model(self, model: Module) -> DistributedDataParallel:
        return DistributedDataParallel(module=model, device_ids=self.determine_ddp_device_ids(), **self._ddp_kwargs)
