"""Peer baseline: diffusers' pixel-space DDPM (Ho et al. 2020's CIFAR-10 UNet) trained for a fixed GPU time.

The model, noise schedule, loss, EMA and sampler all come from diffusers, configured as a skilled diffusers user
would run them on one GPU (bf16 autocast, torch.compile, channels_last, fused AdamW, data resident on the GPU).
Two things come from lightning_ldm so that the comparison is fair:

- the data: ``ImageFolderDataModule`` with the framework's defaults (image_size 32, 3 channels, val_fraction 0.1,
  seed 0), so training sees exactly the framework's 45,000 training images and never the 5,000 held-out ones;
- the score: the Frechet distance of the framework's own feature extractor (``kind=checkpoint``), reference
  statistics of the held-out split built by ``load_or_compute_reference`` exactly as the framework builds them,
  samples fed to the extractor as [-1, 1] NCHW floats, as the framework's FID callback feeds them.

The clock (``--train-minutes``) counts training time only, compile warm-up included (a real user pays it; it is
also reported on its own). At each ``--eval-at-minutes`` mark the clock stops, ``--num-eval-samples`` images are
drawn with ``--sampler`` (DPM-Solver++(2M) by default, 20 steps) from the EMA weights and fixed seeds (sample i
from the noise of seed i, the framework's ``initial_noise``), and their FD to the held-out images is recorded.

    python experiments/peer_ddpm/train_diffusers_ddpm.py --out /tmp/peer --extractor-path X.pt --extractor-name N
    python experiments/peer_ddpm/train_diffusers_ddpm.py --dry-run --out /tmp/peer_dry     # CPU smoke test

See README.md beside this file.
"""

import argparse
import copy
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[2]
if (REPO / "src" / "lightning_ldm").is_dir() and str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))  # the checkout's package wins, also without PYTHONPATH=src

# What a real run uses (one H100) and what --dry-run uses (CPU, seconds); an explicit flag overrides both.
GPU_DEFAULTS = dict(train_minutes=6.0, eval_at_minutes="1,2,3,4,5,6", num_eval_samples=5000, eval_batch_size=1000,
                    sample_steps=20, grid_samples=64, batch_size=128, train_subset=0, compile=True, tiny=False)
DRY_DEFAULTS = dict(train_minutes=0.25, eval_at_minutes="0.1,0.25", num_eval_samples=16, eval_batch_size=16,
                    sample_steps=4, grid_samples=16, batch_size=8, train_subset=1024, compile=False, tiny=True)

# Ho et al. (2020), Appendix B, CIFAR-10: ch 128, ch_mult (1, 2, 2, 2), 2 res blocks per level, self-attention
# at 16x16 only, dropout 0.1; single-head attention, GroupNorm eps 1e-6, sinusoidal embedding without the
# sin/cos flip and with frequency shift 1: the values of diffusers' own conversion of Ho's CIFAR-10 checkpoint
# (google/ddpm-cifar10-32). 35.7M parameters.
HO_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3,
    block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    dropout=0.1, attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,
    flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
)
TINY_UNET = {**HO_UNET, "block_out_channels": (16, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 4}

# Samplers a diffusers user can pick for an eps model on the linear DDPM schedule: scheduler class and the options
# set on top of the training scheduler's config. Under the linear schedule sqrt(alpha_bar) at t = 999 is 0.0064,
# so a data-prediction solver divides the first eps error by it (x0 = (x - sqrt(1 - a) eps) / sqrt(a)): what the
# x0 is allowed to be (clipped, thresholded or not at all) decides whether an imperfect eps ends as a saturated frame.
SAMPLERS = {
    "dpmpp2m": ("DPMSolverMultistepScheduler", dict(solver_order=2)),  # diffusers' usual fast default, as shipped
    "dpmpp2m-thresh": ("DPMSolverMultistepScheduler", dict(solver_order=2, thresholding=True,
                                                            dynamic_thresholding_ratio=0.995, sample_max_value=1.0)),
    "dpmpp3m": ("DPMSolverMultistepScheduler", dict(solver_order=3)),
    "dpmpp3m-thresh": ("DPMSolverMultistepScheduler", dict(solver_order=3, thresholding=True,
                                                            dynamic_thresholding_ratio=0.995, sample_max_value=1.0)),
    "unipc3": ("UniPCMultistepScheduler", dict(solver_order=3)),
    "ddim": ("DDIMScheduler", dict(clip_sample=False)),
    "ddim-clip": ("DDIMScheduler", dict(clip_sample=True, clip_sample_range=1.0)),
    "ddpm-clip": ("DDPMScheduler", dict(clip_sample=True, clip_sample_range=1.0)),  # ancestral, Ho et al.'s
}


def make_sampler(name: str, train_config, spacing: str = "trailing"):
    """The scheduler ``name`` of SAMPLERS on the training schedule ``train_config``, with ``spacing``."""
    import diffusers

    cls_name, options = SAMPLERS[name]
    return getattr(diffusers, cls_name).from_config(train_config, timestep_spacing=spacing, **options)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (curve.csv, result.json, samples.png, ...)")
    p.add_argument("--data", default=None, help="CIFAR-10 zip/folder; default .data/cifar10-train.zip of the "
                   "checkout, else ../shared/data/cifar10-train.zip")
    p.add_argument("--dry-run", action="store_true", help="CPU smoke test: tiny UNet, seconds of training, a "
                   "random throwaway extractor when none is given")
    p.add_argument("--train-minutes", type=float, default=None, help="training-time budget (default 6; dry 0.25)")
    p.add_argument("--eval-at-minutes", default=None, help="comma-separated training-time marks for FD")
    p.add_argument("--num-eval-samples", type=int, default=None, help="samples per FD evaluation (default 5000)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="sampling batch (default 1000)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampler steps (default 20; dry 4)")
    p.add_argument("--grid-samples", type=int, default=None, help="EMA samples in the final grid (default 64)")
    p.add_argument("--sample-spacing", default="trailing", choices=["trailing", "linspace", "leading"],
                   help="sampler timestep spacing (trailing: diffusers' recommendation and the framework's)")
    p.add_argument("--sampler", default="dpmpp2m", choices=sorted(SAMPLERS),
                   help="sampler of every FD evaluation and the grid (see SAMPLERS; experiments/cifar10_fair "
                   "compares them on the same weights)")
    p.add_argument("--save-ema", default=None, help="also save the final EMA weights (safetensors) to this file, "
                   "for sampling them again with other samplers (experiments/cifar10_fair/peer_samplers.py)")
    p.add_argument("--eval-seed", type=int, default=0, help="sample i starts from the noise of seed eval_seed + i")
    p.add_argument("--extractor-path", default=None, help="feature-extractor file for FD (kind=checkpoint)")
    p.add_argument("--extractor-name", default=None, help="its label (metrics are fd-<name>)")
    p.add_argument("--feature-layer", default=None, help="submodule whose output are the features")
    p.add_argument("--reference-cache", default=None, help="folder for the held-out reference statistics "
                   "(default <out>/fd_reference)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 128)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=500, help="linear learning-rate warm-up")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (Ho et al.); 0 = off")
    p.add_argument("--ema-max-decay", type=float, default=0.9999)
    p.add_argument("--ema-inv-gamma", type=float, default=1.0)
    p.add_argument("--ema-power", type=float, default=0.75)
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="torch.compile the UNet")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images (0 = all)")
    p.add_argument("--max-steps", type=int, default=0, help="also stop after this many steps (0 = time only)")
    p.add_argument("--sync-every", type=int, default=10, help="read the (synchronised) clock every N steps")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="decode workers")
    p.add_argument("--seed", type=int, default=0, help="training seed (noise, timesteps, batches, flips)")
    args = p.parse_args(argv)
    for key, value in (DRY_DEFAULTS if args.dry_run else GPU_DEFAULTS).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.eval_marks = sorted({float(m) for m in str(args.eval_at_minutes).split(",") if m.strip()})
    dropped = [m for m in args.eval_marks if m > args.train_minutes + 1e-9]
    if dropped:
        print(f"note: eval marks {dropped} min lie beyond --train-minutes {args.train_minutes}; dropped")
    args.eval_marks = [m for m in args.eval_marks if m <= args.train_minutes + 1e-9]
    if (args.extractor_path is None) != (args.extractor_name is None) and not args.dry_run:
        p.error("--extractor-path and --extractor-name go together")
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def default_data_root() -> str:
    for candidate in (REPO / ".data" / "cifar10-train.zip", REPO.parent / "shared" / "data" / "cifar10-train.zip"):
        if candidate.exists():
            return str(candidate)
    raise SystemExit("no CIFAR-10 zip found in .data/ or ../shared/data/; pass --data")


# ----------------------------------------------------------------------------------------------------- data
class _Pixels(torch.utils.data.Dataset):
    """uint8 (C, H, W) of the source items ``indices`` (decoded, cropped and resized by the framework's code)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source.load(self.indices[i])[0]


def load_data(args):
    """The framework's data module with its defaults (conf/data/folder.yaml; seed 0 is the constructor default)."""
    from lightning_ldm.data.folder import ImageFolderDataModule

    datamodule = ImageFolderDataModule(root=args.data, image_size=32, channels=3, batch_size=args.batch_size,
                                       num_workers=args.num_workers, val_fraction=0.1, flip=True, seed=0,
                                       on_corrupt="error")
    datamodule.setup("fit")
    train_view = datamodule.train_dataset
    indices = train_view.indices[: args.train_subset] if args.train_subset else train_view.indices
    loader = torch.utils.data.DataLoader(_Pixels(train_view.source, indices), batch_size=500,
                                         num_workers=args.num_workers, shuffle=False)
    pixels = torch.cat(list(loader))  # uint8 (N, 3, 32, 32); the random flip is done per batch on the GPU
    return datamodule, pixels


class GPUBatches:
    """Shuffled epochs over a uint8 tensor on the device; [-1, 1] floats, random horizontal flip, channels_last."""

    def __init__(self, pixels: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.pixels, self.batch_size, self.generator = pixels, batch_size, generator
        self.order, self.position, self.epoch = None, len(pixels), 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > len(self.pixels):  # drop the ragged tail, as drop_last does
            self.order = torch.randperm(len(self.pixels), device=self.pixels.device, generator=self.generator)
            self.position, self.epoch = 0, self.epoch + 1
        index = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        x = self.pixels[index].float().div_(127.5).sub_(1.0)
        flip = torch.rand(len(x), device=x.device, generator=self.generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------------- FD
class _DryRunExtractor(nn.Module):
    """A random little CNN, only for --dry-run's plumbing check (its FDs mean nothing)."""

    def __init__(self, channels: int = 3, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, 2, 1), nn.SiLU(),
                                  nn.Conv2d(width, 2 * width, 3, 2, 1), nn.SiLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.head(self.pool(self.body(x)).flatten(1))


def build_extractor(args, device):
    from lightning_ldm.metrics.features import FeatureExtractorSpec, build_feature_extractor, save_extractor_checkpoint

    if args.extractor_path is None and args.dry_run:
        torch.manual_seed(1234)
        path = save_extractor_checkpoint(_DryRunExtractor(), Path(args.out) / "dry_run_extractor.pt",
                                         target=f"{__name__}.{_DryRunExtractor.__qualname__}",
                                         kwargs={"channels": 3, "width": 16}, feature_layer="pool")
        args.extractor_path, args.extractor_name = str(path), "dry-run-random"
        log(f"dry run: a random throwaway extractor at {path} (its FDs only check the plumbing)")
    if args.extractor_path is None:
        log("FD SKIPPED: no --extractor-path/--extractor-name given; training, sampling and timings still run, "
            "curve.csv's fd column stays empty")
        return None
    spec = FeatureExtractorSpec(kind="checkpoint", name=args.extractor_name, path=args.extractor_path,
                                feature_layer=args.feature_layer)
    return build_feature_extractor(spec, "--extractor-path", device)


def held_out_reference(datamodule, extractor, args):
    """Statistics of all 5,000 held-out images, exactly as the framework computes a val-split reference."""
    from lightning_ldm.metrics.reference import load_or_compute_reference, unflipped

    cache = Path(args.reference_cache) if args.reference_cache else Path(args.out) / "fd_reference"
    return load_or_compute_reference(unflipped(datamodule.val_dataset), identity=datamodule.identity(),
                                     extractor=extractor, cache_dir=cache, split="val", count=None,
                                     batch_size=min(args.eval_batch_size, 500), num_workers=args.num_workers,
                                     log=log)


# ----------------------------------------------------------------------------------------------------- sampling
def autocast(device):
    # bf16 on the GPU; the CPU smoke test stays in fp32 (CPU bf16 convolutions are slower than fp32 there)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def sample(unet, scheduler, noise: torch.Tensor, steps: int, device) -> torch.Tensor:
    """``scheduler`` (DPM-Solver++(2M) unless --sampler says otherwise) from ``noise`` (float32 on the device) ->
    images in [-1, 1], float32."""
    scheduler.set_timesteps(steps, device=device)  # also resets the multistep state
    x = noise
    for t in scheduler.timesteps:
        with autocast(device):
            eps = unet(x.contiguous(memory_format=torch.channels_last), t.expand(len(x)), return_dict=False)[0]
        x = scheduler.step(eps.float(), t, x, return_dict=False)[0]
    return x.float().clamp(-1, 1)


class Evaluator:
    def __init__(self, args, ema_unet, sampler, extractor, reference, device):
        from lightning_ldm.tasks.sample import initial_noise  # the framework's seeds -> x_T, so both see one noise

        self.args, self.ema_unet, self.sampler = args, ema_unet, sampler
        self.extractor, self.reference, self.device = extractor, reference, device
        seeds = list(range(args.eval_seed, args.eval_seed + max(args.num_eval_samples, args.grid_samples)))
        self.noise = initial_noise(seeds, (3, 32, 32)).to(device)

    def __call__(self, ema, n: int, keep: int = 0) -> dict:
        from lightning_ldm.metrics.frechet import distance_to_reference

        ema.copy_to(self.ema_unet.parameters())
        self.ema_unet.eval()
        features, kept, sampling_seconds = [], [], 0.0
        start = time.perf_counter()
        for first in range(0, n, self.args.eval_batch_size):
            noise = self.noise[first:min(n, first + self.args.eval_batch_size)]
            sync(self.device)
            t0 = time.perf_counter()
            images = sample(self.ema_unet, self.sampler, noise, self.args.sample_steps, self.device)
            sync(self.device)
            sampling_seconds += time.perf_counter() - t0
            if self.extractor is not None:
                features.append(self.extractor(images)["features"])
            if sum(len(k) for k in kept) < keep:
                kept.append(images[: keep - sum(len(k) for k in kept)].cpu())
        fd = None
        if self.extractor is not None and self.reference is not None:
            fd = distance_to_reference(self.reference.statistics, torch.cat(features))
        return {"fd": fd, "num_samples": n, "sampling_seconds": sampling_seconds,
                "sampling_images_per_s": n / sampling_seconds if sampling_seconds else None,
                "eval_seconds": time.perf_counter() - start,
                "images": torch.cat(kept) if kept else None}


# ----------------------------------------------------------------------------------------------------- outputs
def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def plot(out: Path, losses: list[list], curve: list[list], label: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not available: no loss-curve PNG")
        return None
    with_fd = [row for row in curve if row[3] is not None]
    fig, axes = plt.subplots(1, 2 if with_fd else 1, figsize=(11 if with_fd else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r[1] for r in losses], [r[2] for r in losses], lw=0.8)
    ax.set(xlabel="training seconds", ylabel="MSE (eps)", title="diffusers DDPM: training loss", yscale="log")
    ax.grid(alpha=0.3)
    if with_fd:
        ax = axes[0][1]
        ax.plot([r[0] for r in with_fd], [r[3] for r in with_fd], "o-")
        ax.set(xlabel="training seconds", ylabel=label, title=f"{label} vs held-out images")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "loss_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    import diffusers
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.data = args.data or default_data_root()
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.dry_run:
        device = torch.device("cpu")
    else:
        raise SystemExit("this benchmark needs a CUDA GPU; use --dry-run for a CPU smoke test")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside autocast
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    log(f"device {device_name}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    torch.manual_seed(args.seed)

    # ---- data (before the clock: the framework's loader setup is not on its training clock either)
    setup_start = time.perf_counter()
    datamodule, pixels = load_data(args)
    log(f"data {args.data}: {len(datamodule.train_dataset)} train / {len(datamodule.val_dataset)} held-out images "
        f"(val_fraction 0.1, seed 0); training on {len(pixels)}, decoded in {time.perf_counter() - setup_start:.1f} s")
    pixels = pixels.to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    batches = GPUBatches(pixels, args.batch_size, generator)

    # ---- FD extractor and held-out reference
    extractor = build_extractor(args, device)
    reference = held_out_reference(datamodule, extractor, args) if extractor is not None else None
    label = extractor.label if extractor is not None else "fd"
    setup_seconds = time.perf_counter() - setup_start

    # ---- model, schedule, optimiser, EMA
    unet_kwargs = TINY_UNET if args.tiny else HO_UNET
    unet = UNet2DModel(**unet_kwargs).to(device, memory_format=torch.channels_last).train()
    num_params = sum(p.numel() for p in unet.parameters())
    log(f"UNet2DModel: {num_params / 1e6:.2f}M parameters"
        + (" (tiny dry-run widths)" if args.tiny else " (Ho et al. CIFAR-10: 35.7M)"))
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)  # sampling copy; EMA weights are copied in
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                    prediction_type="epsilon")
    sampler = make_sampler(args.sampler, noise_scheduler.config, args.sample_spacing)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                   power=args.ema_power, foreach=True)
    model = torch.compile(unet) if args.compile else unet
    evaluator = Evaluator(args, ema_unet, sampler, extractor, reference, device)

    def train_step(step: int) -> torch.Tensor:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
        x0 = batches.next()
        noise = torch.randn(x0.shape, device=device, generator=generator).contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), device=device,
                          generator=generator)
        xt = noise_scheduler.add_noise(x0, noise, t)
        with autocast(device):
            pred = model(xt, t, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), args.grad_clip)
        optimizer.step()
        ema.step(unet.parameters())
        return loss.detach()

    # ---- training on the clock
    budget = args.train_minutes * 60.0
    marks = [m * 60.0 for m in args.eval_marks]
    curve, losses, evaluations, first_steps = [], [], [], []
    step, train_seconds, loss_sum, loss_count = 0, 0.0, torch.zeros((), device=device), 0
    last_print, last_print_step, last_print_seconds = time.perf_counter(), 0, 0.0
    log(f"training for {args.train_minutes} min of training time (batch {args.batch_size}, lr {args.lr}, warm-up "
        f"{args.warmup_steps} steps, {'compiled' if args.compile else 'eager'}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}); FD at "
        f"{args.eval_marks} min with {args.num_eval_samples} samples, sampler {args.sampler} "
        f"{args.sample_steps} steps")

    def run_eval(mark_seconds: float | None, final: bool) -> dict:
        keep = args.grid_samples if final else 0
        n = args.num_eval_samples if (extractor is not None or final) else 0
        if n == 0:
            result = {"fd": None, "num_samples": 0, "sampling_seconds": 0.0, "sampling_images_per_s": None,
                      "eval_seconds": 0.0, "images": None}
        else:
            result = evaluator(ema, n, keep=keep if n >= keep else 0)
            if final and keep and result["images"] is None:  # fewer eval samples than the grid: sample the grid apart
                result["images"] = evaluator(ema, keep, keep=keep)["images"]
        record = {"mark_minutes": None if mark_seconds is None else mark_seconds / 60, "train_seconds": train_seconds,
                  "step": step, "images_seen": step * args.batch_size,
                  **{k: v for k, v in result.items() if k != "images"}}
        evaluations.append(record)
        curve.append([round(train_seconds, 3), step, step * args.batch_size, result["fd"]])
        write_csv(out / "curve.csv", ["train_seconds", "step", "images_seen", "fd"], curve)
        fd_text = f"{label}@{n} = {result['fd']:.3f}" if result["fd"] is not None else "FD skipped (no extractor)"
        if n:
            fd_text += (f"; sampled {n} in {result['sampling_seconds']:.1f} s "
                        f"({result['sampling_images_per_s']:.0f} img/s), eval {result['eval_seconds']:.1f} s")
        log(f"EVAL at {train_seconds:.1f} s training time, step {step}: {fd_text}")
        return result

    final_result = None
    sync(device)
    segment_start = time.perf_counter()
    while True:
        t_step = time.perf_counter()
        loss_sum += train_step(step)
        step += 1
        loss_count += 1
        early = step <= 3
        if early or step % args.sync_every == 0:
            sync(device)
            now = time.perf_counter()
            if early:
                first_steps.append(now - t_step)
            train_seconds_now = train_seconds + (now - segment_start)
            losses.append([step, round(train_seconds_now, 3), float(loss_sum) / loss_count])  # mean since last
            loss_sum.zero_()
            loss_count = 0
            stop = train_seconds_now >= budget or (args.max_steps and step >= args.max_steps)
            due = [m for m in marks if train_seconds_now >= m]
            if now - last_print >= 30 or stop:
                rate = (step - last_print_step) * args.batch_size / max(1e-9, train_seconds_now - last_print_seconds)
                log(f"step {step:6d}  train {train_seconds_now:7.1f} s  {rate:7.0f} img/s  "
                    f"loss {f'{losses[-1][2]:.4f}' if losses else 'n/a'}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                    f"ema decay {ema.cur_decay_value:.5f}  epoch {batches.epoch}")
                last_print, last_print_step, last_print_seconds = now, step, train_seconds_now
            if due or stop:
                train_seconds = train_seconds_now  # the clock stops here
                for mark in due:
                    marks.remove(mark)
                if stop:  # the last evaluation also gives the grid and the sampling speed
                    final_result = run_eval(due[-1] if due else None, final=True)
                    break
                run_eval(due[-1], final=False)
                sync(device)
                segment_start = time.perf_counter()  # and runs again
                continue
    if marks:
        log(f"note: marks {[m / 60 for m in marks]} min not reached (stopped by --max-steps)")

    # ---- results
    steady = None
    if len(first_steps) == 3 and step > 3:
        steady = (step - 1) * args.batch_size / max(1e-9, train_seconds - first_steps[0])
    median_late = statistics.median(first_steps[1:]) if len(first_steps) >= 2 else 0.0
    compile_seconds = max(0.0, first_steps[0] - median_late) if args.compile and first_steps else 0.0
    grid_path = None
    if final_result is not None and final_result["images"] is not None:
        from torchvision.utils import save_image

        grid_path = out / "samples.png"
        grid = final_result["images"][: args.grid_samples]
        save_image((grid + 1) / 2, grid_path, nrow=min(8, math.ceil(math.sqrt(len(grid)))))
    if args.save_ema:
        from safetensors.torch import save_file

        ema.copy_to(ema_unet.parameters())
        save_file({k: v.detach().float().contiguous().cpu() for k, v in ema_unet.state_dict().items()}, args.save_ema)
        log(f"EMA weights -> {args.save_ema}")
    write_csv(out / "loss.csv", ["step", "train_seconds", "loss"], losses)
    plot_path = plot(out, losses, curve, label)
    final_fd = next((e["fd"] for e in reversed(evaluations) if e["fd"] is not None), None)
    result = {
        "peer": "diffusers DDPM (Ho et al. 2020 CIFAR-10 UNet), pixel space",
        "parameters": num_params,
        "parameters_millions": round(num_params / 1e6, 3),
        "train_seconds": train_seconds,
        "steps": step,
        "images_seen": step * args.batch_size,
        "epochs_started": batches.epoch,
        "train_images_per_s": step * args.batch_size / train_seconds if train_seconds else None,
        "train_images_per_s_after_first_step": steady,
        "first_step_seconds": first_steps[0] if first_steps else None,
        "compile_seconds": compile_seconds,
        "sampling_images_per_s": final_result["sampling_images_per_s"] if final_result else None,
        "final_fd": final_fd,
        "fd_label": label,
        "evaluations": evaluations,
        "setup_seconds": setup_seconds,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "device": device_name,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
                     "lightning_ldm_git": git_revision()},
        "data": {"root": args.data, "train_images": len(datamodule.train_dataset),
                 "held_out_images": len(datamodule.val_dataset), "trained_on": len(pixels),
                 "identity": datamodule.identity()},
        "extractor": extractor.describe() if extractor is not None else None,
        "reference": None if reference is None else {"path": str(reference.path), "sha256_of_key": reference.digest,
                                                     "n": reference.statistics.n, "reused": reference.reused},
        "outputs": {"curve": str(out / "curve.csv"), "loss": str(out / "loss.csv"),
                    "samples": str(grid_path) if grid_path else None, "loss_curve": plot_path},
        "config": {
            "args": {k: v for k, v in vars(args).items()},
            "unet": dict(unet.config),
            "noise_scheduler": dict(noise_scheduler.config),
            "sampler": dict(sampler.config),
            "optimizer": {"class": "AdamW", "lr": args.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                          "weight_decay": args.weight_decay, "fused": device.type == "cuda",
                          "warmup": f"linear over {args.warmup_steps} steps, then constant",
                          "grad_clip_norm": args.grad_clip},
            "ema": {"class": "diffusers.training_utils.EMAModel", "max_decay": args.ema_max_decay,
                    "use_ema_warmup": True, "inv_gamma": args.ema_inv_gamma, "power": args.ema_power,
                    "final_decay": ema.cur_decay_value},
            "precision": "bf16 autocast, fp32 master weights", "channels_last": True, "compile": args.compile,
            "loss": "MSE on eps, t ~ U{0..999}",
        },
    }
    with open(out / "result.json", "w") as f:
        json.dump(result, f, indent=2, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
    fd_text = f"{label} {final_fd:.3f}" if final_fd is not None else "no FD"
    log(f"done: {step} steps in {train_seconds:.0f} s of training ({result['train_images_per_s']:.0f} img/s, "
        f"compile ~{compile_seconds:.0f} s), {fd_text}; wrote {out}/result.json, curve.csv, samples.png")
    if not math.isfinite(losses[-1][2] if losses else 0.0):
        log("WARNING: the training loss is not finite")
    return result


if __name__ == "__main__":
    main()
