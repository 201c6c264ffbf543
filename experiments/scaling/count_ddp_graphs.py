"""How many graphs torch.compile makes of the LDM-4 UNet under DDP, per ``compiled_ddp`` mode and bucket size.

    python experiments/scaling/count_ddp_graphs.py ddp_optimizer 25    # mode, DDP bucket_cap_mb (DDP's default 25)

On the CPU, with one gloo process and a backend that only counts the graphs it is handed (no code generation): the
splitting depends on the parameters and the bucket size, not on the device. One forward and backward of batch 1.
"""

import sys
import tempfile
from pathlib import Path

import torch
import torch._dynamo
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from lightning_ldm.training.ddp import DDPOnCurrentStreamStrategy

UNET_CONFIG = Path(__file__).resolve().parents[2] / "conf/unet/ldm-4.yaml"


class Holder(torch.nn.Module):  # the LightningModule's place: DDP wraps it, the network inside is compiled
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t)


def main(mode: str, bucket_cap_mb: float) -> None:
    DDPOnCurrentStreamStrategy(compiled_ddp=mode)  # sets torch._dynamo.config.optimize_ddp as a run would
    graphs: list[int] = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(sum(1 for node in graph_module.graph.nodes if node.op in ("call_function", "call_module")))
        return graph_module.forward

    with tempfile.TemporaryDirectory() as rendezvous:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}/file", rank=0, world_size=1)
        try:
            holder = Holder(instantiate(OmegaConf.load(UNET_CONFIG))(in_channels=3))
            holder.unet.compile(backend=counting_backend)
            ddp = DistributedDataParallel(holder, bucket_cap_mb=bucket_cap_mb)
            ddp(torch.randn(1, 3, 64, 64), torch.tensor([10])).float().sum().backward()
        finally:
            dist.destroy_process_group()
    megabytes = sum(p.numel() * p.element_size() for p in holder.parameters()) / 1e6
    print(f"compiled_ddp={mode} bucket_cap_mb={bucket_cap_mb:g}: {len(graphs)} graph(s) of {graphs} operations "
          f"({megabytes:.0f} MB of parameters)")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
