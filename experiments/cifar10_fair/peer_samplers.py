"""The diffusers peer's samplers on the same trained weights: which one avoids the blank and clipped frames.

    python experiments/cifar10_fair/peer_samplers.py --weights outputs/fair/peer/ema.safetensors \\
        --out outputs/fair/samplers --n 5000 --samplers dpmpp2m dpmpp2m-thresh dpmpp3m ddim-clip ...
    python experiments/cifar10_fair/peer_samplers.py --dry-run --out /tmp/samplers    # CPU check, tiny UNet

The EMA weights come from ``experiments/peer_ddpm/train_diffusers_ddpm.py --save-ema``; the samplers are that
script's ``SAMPLERS`` (diffusers schedulers configured from the training schedule, trailing spacing). Every
sampler starts from the same noise (sample i from the framework's ``initial_noise`` of seed i, as the peer's
FD evaluations) and runs the same bf16 UNet. Per sampler: ``<name>.npz`` (uint8 ``images``, for
``ladder.py``, which scores them), ``<name>.png`` (the first 64), and in ``samplers.json`` the share of values
outside [-1, 1] before the final clamp, the share of blank frames (8-bit std below 4 levels), of saturated frames
(half or more of the values at 0 or 255), of clipped 8-bit values, and the sampling time. Samplers that would end
past ``--deadline-s`` (estimated from the UNet evaluations already timed) are skipped and listed.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
for extra in (REPO / "src", REPO / "experiments" / "peer_ddpm", REPO / "experiments" / "cifar10_fair"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from ladder import frame_stats  # noqa: E402
from train_diffusers_ddpm import HO_UNET, SAMPLERS, TINY_UNET, make_sampler  # noqa: E402

# Steps per sampler: the 20 of every FD evaluation so far, except where the sampler is usually run longer.
DEFAULT_STEPS = {"ddpm-clip": 100}


@torch.no_grad()
def run(unet, scheduler, noise: torch.Tensor, steps: int, seed: int, batch: int, device) -> tuple[torch.Tensor, float]:
    """Images before the final clamp (float32, CPU) and seconds of sampling."""
    import inspect

    outs, seconds = [], 0.0
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters  # UniPC's step has none
    for first in range(0, len(noise), batch):
        x = noise[first:first + batch].to(device)
        generator = torch.Generator(device=device).manual_seed(seed + first)  # ancestral samplers' noise
        extra = {"generator": generator} if takes_generator else {}
        scheduler.set_timesteps(steps, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for t in scheduler.timesteps:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                eps = unet(x.contiguous(memory_format=torch.channels_last), t.expand(len(x)), return_dict=False)[0]
            x = scheduler.step(eps.float(), t, x, return_dict=False, **extra)[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        outs.append(x.float().cpu())
    return torch.cat(outs), seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="EMA weights (safetensors) from train_diffusers_ddpm.py --save-ema")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=sorted(SAMPLERS))
    parser.add_argument("--steps", type=int, default=20, help="steps of every sampler not in DEFAULT_STEPS")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="sample i starts from the noise of seed + i")
    parser.add_argument("--deadline-s", type=float, default=0, help="skip samplers that would end after this")
    parser.add_argument("--dry-run", action="store_true", help="tiny random UNet on the CPU, 8 samples, 3 steps")
    args = parser.parse_args(argv)
    from diffusers import DDPMScheduler, UNet2DModel

    from lightning_ldm.tasks.sample import initial_noise

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    unet = UNet2DModel(**(TINY_UNET if args.dry_run else HO_UNET))
    if args.weights:
        from safetensors.torch import load_file

        unet.load_state_dict(load_file(args.weights))
    unet = unet.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    if args.dry_run:
        args.n, args.batch, args.steps = 8, 8, 3
    train_config = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                 prediction_type="epsilon").config  # the peer's training schedule
    noise = initial_noise(list(range(args.seed, args.seed + args.n)), (3, 32, 32))
    results, per_eval = {}, None
    for name in args.samplers:
        steps = 3 if args.dry_run else DEFAULT_STEPS.get(name, args.steps)
        scheduler = make_sampler(name, train_config)
        if args.deadline_s and per_eval is not None:
            expected = per_eval * steps * args.n * 1.15 + 5
            if time.perf_counter() - started + expected > args.deadline_s:
                print(f"{name}: skipped (about {expected:.0f} s, past the deadline)", flush=True)
                results[name] = {"skipped": f"about {expected:.0f} s would pass --deadline-s {args.deadline_s:.0f}"}
                continue
        raw, seconds = run(unet, scheduler, noise, steps, args.seed, args.batch, device)
        per_eval = seconds / (steps * args.n)
        images = ((raw.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        np.savez_compressed(out / f"{name}.npz", images=images.numpy())
        from torchvision.utils import save_image

        save_image((images[:64].float() / 255), out / f"{name}.png", nrow=8)
        results[name] = {"scheduler": type(scheduler).__name__, "options": SAMPLERS[name][1], "steps": steps,
                         "timestep_spacing": scheduler.config.timestep_spacing, "n": args.n,
                         "outside_unit_range_share": (raw.abs() > 1).float().mean().item(),
                         "max_abs_before_clamp": raw.abs().max().item(),
                         **frame_stats(images, 4.0), "sampling_seconds": seconds,
                         "images_per_s": args.n / seconds}
        r = results[name]
        print(f"{name:16s} {steps:4d} steps  outside [-1,1] {r['outside_unit_range_share']:7.2%}  blank "
              f"{r['blank_count']:5d} ({r['blank_share']:.2%})  saturated {r['saturated_count']:5d} "
              f"({r['saturated_share']:.2%})  clipped {r['clipped_share']:.2%}  {seconds:6.1f} s", flush=True)
        (out / "samplers.json").write_text(json.dumps({"weights": args.weights, "device": str(device),
                                                       "samplers": results}, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
