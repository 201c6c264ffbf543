"""How many graphs torch.compile makes of a network under DDP, per ``compiled_ddp`` mode and bucket size.

    python experiments/scaling/count_ddp_graphs.py ddp_optimizer 25          # mode, bucket_cap_mb (DDP's default 25)
    python experiments/scaling/count_ddp_graphs.py ddp_optimizer 25 kl-f8    # the kl-f8 autoencoder (default ldm-4)

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

CONF = Path(__file__).resolve().parents[2] / "conf"


class Holder(torch.nn.Module):  # the LightningModule's place: DDP wraps it, the networks inside are compiled
    def __init__(self, model: str, backend) -> None:
        super().__init__()
        self.model = model
        if model == "ldm-4":
            self.net = instantiate(OmegaConf.load(CONF / "unet/ldm-4.yaml"))(in_channels=3)
            self.net.compile(backend=backend)
        else:  # compiled as stage 1 compiles it: the encoder, and the decoder without its last conv
            config = OmegaConf.create({"data": {"channels": 3, "image_size": 256},
                                       "net": OmegaConf.load(CONF / f"autoencoder/{model}.yaml")})
            self.net = instantiate(config.net)
            self.net.encoder.compile(backend=backend)
            self.net.decoder.features = torch.compile(self.net.decoder.features, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.model == "ldm-4":
            return self.net(x, torch.tensor([10]))
        return self.net(x, sample_posterior=False).reconstruction


def main(mode: str, bucket_cap_mb: float, model: str) -> None:
    settings = DDPOnCurrentStreamStrategy(compiled_ddp=mode).dynamo_settings()  # torch._dynamo's, as a run sets them
    graphs: list[int] = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(sum(1 for node in graph_module.graph.nodes if node.op in ("call_function", "call_module")))
        return graph_module.forward

    with settings, tempfile.TemporaryDirectory() as rendezvous:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}/file", rank=0, world_size=1)
        try:
            holder = Holder(model, counting_backend)
            ddp = DistributedDataParallel(holder, bucket_cap_mb=bucket_cap_mb)
            ddp(torch.randn(1, 3, 64, 64)).float().sum().backward()
        finally:
            dist.destroy_process_group()
    megabytes = sum(p.numel() * p.element_size() for p in holder.parameters()) / 1e6
    print(f"{model}, compiled_ddp={mode} bucket_cap_mb={bucket_cap_mb:g}: {len(graphs)} graph(s) of {graphs} operations "
          f"({megabytes:.0f} MB of parameters)")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "ldm-4")
