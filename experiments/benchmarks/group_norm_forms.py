"""The two compiled forms of the UNet's GroupNorm on this machine's CPU (a hint; the GPU A/B is peers.py
--group-norm): per-channel statistics (``GroupNorm.layout_preserving_forward``, the default) against statistics over
a (B, G, C/G, H, W) view (``GroupNorm.grouped_forward``, the former default), both channels_last, torch.compile'd.

    python experiments/benchmarks/group_norm_forms.py [--unet]   # GN + SiLU at LDM-4's 224 x 64 x 64, batch 8;
                                                                 # --unet: also a unet=small step, batch 8, 32x32
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_ldm.unet.blocks import GroupNorm
from lightning_ldm.unet.model import UNet

FORMS = {"channel statistics": GroupNorm.layout_preserving_forward, "grouped": GroupNorm.grouped_forward}


def median_ms(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    norm = GroupNorm(32, 224)
    x = torch.randn(8, 224, 64, 64).to(memory_format=torch.channels_last).requires_grad_()
    for name, form in FORMS.items():
        GroupNorm.layout_preserving_forward = form
        torch._dynamo.reset()
        layer = torch.compile(lambda t: F.silu(norm(t)))
        for _ in range(2):
            layer(x).sum().backward()
        print(f"GN + SiLU fwd + bwd, {name}: {median_ms(lambda: layer(x).sum().backward(), 5):.1f} ms", flush=True)
    if args.unet:
        net = UNet(in_channels=3, model_channels=128, channel_mult=[1, 2, 2], num_res_blocks=2,
                   attention_resolutions=[2], num_head_channels=64).to(memory_format=torch.channels_last)
        z = torch.randn(8, 3, 32, 32).to(memory_format=torch.channels_last)
        t = torch.randint(0, 1000, (8,))
        for name, form in FORMS.items():
            GroupNorm.layout_preserving_forward = form
            torch._dynamo.reset()
            compiled = torch.compile(net)
            for _ in range(2):
                compiled(z, t).square().mean().backward()
            ms = median_ms(lambda: compiled(z, t).square().mean().backward(), 6)
            print(f"unet=small step (fwd + bwd), {name}: {ms:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
