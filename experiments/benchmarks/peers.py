"""Our networks against the strongest peer configuration (diffusers, bf16 + channels_last, eager and
torch.compile), timed in one process on one GPU.

Groups (each: ours and diffusers, eager and compiled):
  unet_train  LDM-4 UNet (274.1M) training step: fwd + eps-MSE + bwd + fused AdamW, batch 48, 3x64x64 latents
  unet_fwd    the same UNet, forward only (sampling), batch 256, no_grad
  ae_train    kl-f4 autoencoder (55.3M) at 256^2, batch 8: encode -> posterior sample -> decode -> L1 -> bwd -> AdamW
  ae_decode   its decoder alone (3x64x64 -> 256x256), batch 32, no_grad

Method: bf16 autocast, channels_last model and inputs, fused AdamW, cudnn.benchmark; random inputs; warm-up
steps, then --steps steps each timed with CUDA events, median. FLOPs per step from FlopCounterMode on one eager
step (fwd + bwd, no recomputation); MFU against a bf16 8192^3 matmul measured in the same process. Each variant
runs in try/except (a failure prints one line); variants are skipped once --budget-s is (about to be) spent.

    PYTHONPATH=/tmp/site:$PWD/src python3 experiments/benchmarks/peers.py --out peers.json
    python3 experiments/benchmarks/peers.py --only unet_train compiled      # groups, nets, modes or group/variant
    python3 experiments/benchmarks/peers.py --dry-run --device cpu          # every code path, tiny, no compile
    # A/B of compiler and kernel settings, e.g. one process per setting on the GPUs of one machine:
    python3 experiments/benchmarks/peers.py --only unet_train/ours-compiled --inductor coordinate_descent_tuning=True
    python3 experiments/benchmarks/peers.py --only unet_train/ours-compiled --sdpa-off cudnn   # flash attention
    python3 experiments/benchmarks/peers.py --only ae_train/ours-compiled --ae-group-norm torch   # nn.GroupNorm
    python3 experiments/benchmarks/peers.py --only ae_train compiled --profile 3   # + the profiler's op table
    python3 experiments/benchmarks/peers.py --only ae_train/ours-compiled --ae-attention sdpa   # SDPA at head dim 512

diffusers is a benchmark-only dependency (the wheel is not in the project's requirements).
"""

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "src") not in sys.path:
    sys.path.insert(1, str(REPO / "src"))

GROUPS = ("unet_train", "unet_fwd", "ae_train", "ae_decode")
NETS = ("ours", "diffusers")
MODES = ("eager", "compiled")
PEER = "diffusers-compiled"
# Seconds a variant is guessed to take on an H100 host (build, FLOP count, warm-up with compile, timed steps) until
# one of the same group and mode has run; only used to skip variants that would overrun --budget-s.
GUESS_S = {("unet_train", "eager"): 15, ("unet_train", "compiled"): 70, ("unet_fwd", "eager"): 15,
           ("unet_fwd", "compiled"): 35, ("ae_train", "eager"): 10, ("ae_train", "compiled"): 35,
           ("ae_decode", "eager"): 8, ("ae_decode", "compiled"): 20}

UNET_PRESET = "celebahq-ldm-vq-4"
UNET_PARAMS, UNET_TOLERANCE = 274.1e6, 0.2e6
AE_PRESET = "kl-f4"
AE_PARAMS = 55.3e6  # reference kl-f4 encoder + decoder incl. quant convs

# diffusers UNet2DModel in the LDM-4 (CelebA-HQ / FFHQ / Bedrooms) configuration: model_channels 224,
# channel_mult (1, 2, 3, 4), 2 res blocks, attention at ds 2, 4, 8 with 32-channel heads, no class conditioning.
DIFFUSERS_UNET = dict(
    sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(224, 448, 672, 896),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=32, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)  # fmt: skip
# diffusers AutoencoderKL as the reference kl-f4: ch 128, ch_mult (1, 2, 4), 2 res blocks, z 3 (double_z),
# embed_dim 3, no attention except the mid blocks' (mid_block_add_attention, on by default as in the reference).
DIFFUSERS_KL_F4 = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(128, 256, 512), layers_per_block=2,
    latent_channels=3, norm_num_groups=32, sample_size=256, mid_block_add_attention=True,
)  # fmt: skip


@dataclass
class Shape:
    batch: int
    size: int  # latent side for the UNet and the decoder, image side for ae_train


FULL = {"unet_train": Shape(48, 64), "unet_fwd": Shape(256, 64), "ae_train": Shape(8, 256), "ae_decode": Shape(32, 64)}
DRY = {"unet_train": Shape(2, 8), "unet_fwd": Shape(2, 8), "ae_train": Shape(2, 16), "ae_decode": Shape(2, 4)}


@dataclass
class Case:
    """One network set up for one group: what to optimise, what to call, on what, and against what target."""

    model: nn.Module
    forward: Callable[..., torch.Tensor]
    inputs: tuple
    target: Optional[torch.Tensor]  # None: forward only
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    params: int  # parameters that take part in the step
    note: str = ""


@dataclass
class Result:
    group: str
    variant: str
    batch: int
    status: str = "ok"
    error: str = ""
    img_per_s: Optional[float] = None
    ms_per_step: Optional[float] = None
    step_ms_all: list = field(default_factory=list)
    gflop_per_step: Optional[float] = None
    gflop_per_img: Optional[float] = None
    tflop_per_s: Optional[float] = None
    mfu: Optional[float] = None
    peak_gib: Optional[float] = None
    params_m: Optional[float] = None
    warmup_s: Optional[float] = None
    first_step_s: Optional[float] = None
    vs_peer_compiled: Optional[float] = None
    # the same throughput counted with the peer's FLOPs per image (the reference formulation of the same function:
    # ours' sub-pixel upsampler does fewer multiply-adds for the same result), for MFU on equal terms
    tflop_per_s_peer_flops: Optional[float] = None
    mfu_peer_flops: Optional[float] = None
    note: str = ""
    traceback: str = ""


# ---------------------------------------------------------------------------------------------- the networks
def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def n_params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def build_unet(net: str) -> nn.Module:
    if net == "ours":
        from lightning_ldm.unet import PRESETS, UNet

        return UNet(**PRESETS[UNET_PRESET])
    from diffusers import UNet2DModel

    return UNet2DModel(**DIFFUSERS_UNET)


DIFFUSERS_AE_ATTENTION = {"classic": False}


def build_autoencoder(net: str) -> nn.Module:
    if net == "ours":
        from lightning_ldm.autoencoder import PAPER_PRESETS, Autoencoder

        return Autoencoder(**PAPER_PRESETS[AE_PRESET])
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**DIFFUSERS_KL_F4)
    if DIFFUSERS_AE_ATTENTION["classic"]:  # --diffusers-attention classic: baddbmm + softmax instead of SDPA
        from diffusers.models.attention_processor import AttnProcessor

        vae.set_attn_processor(AttnProcessor())
    return vae


def setup(group: str, net: str, shape: Shape, device: torch.device) -> Case:
    b, s = shape.batch, shape.size
    mse = lambda out, target: F.mse_loss(out.float(), target)  # noqa: E731
    l1 = lambda out, target: F.l1_loss(out.float(), target)  # noqa: E731
    if group in ("unet_train", "unet_fwd"):
        with device:  # initialised where it runs: seconds less per variant than on the host
            model = build_unet(net)
        params = n_params(model)
        if abs(params - UNET_PARAMS) > UNET_TOLERANCE:
            raise AssertionError(f"{net} UNet has {params / 1e6:.2f}M parameters, expected 274.1M +- 0.2M")
        model = model.to(device, memory_format=torch.channels_last)
        x = channels_last(torch.randn(b, 3, s, s, device=device))
        t = torch.randint(1, 1000, (b,), device=device)
        if net == "ours":
            def forward(x, t):
                return model(x, t)
        else:
            def forward(x, t):
                return model(x, t).sample
        train = group == "unet_train"
        target = channels_last(torch.randn_like(x)) if train else None
        return Case(model.train(train), forward, (x, t), target, mse, params)

    with device:
        model = build_autoencoder(net)
    if group == "ae_train":
        params = n_params(model)
        model = model.to(device, memory_format=torch.channels_last).train()
        x = channels_last(torch.rand(b, 3, s, s, device=device) * 2 - 1)
        if net == "ours":
            def forward(x):
                return model.decode(model.encode(x).sample())
        else:
            def forward(x):
                return model.decode(model.encode(x).latent_dist.sample()).sample
        note = "" if abs(params - AE_PARAMS) < 0.1e6 else f"expected ~{AE_PARAMS / 1e6:.1f}M"
        return Case(model, forward, (x,), x, l1, params, note)

    # ae_decode: post_quant_conv + decoder; the encoder is dropped
    del model.encoder
    params = n_params(model.decoder, model.post_quant_conv)
    model = model.to(device, memory_format=torch.channels_last).eval()
    z = channels_last(torch.randn(b, 3, s, s, device=device))
    if net == "ours":
        def forward(z):
            return model.decode(z)
    else:
        def forward(z):
            return model.decode(z).sample
    return Case(model, forward, (z,), None, l1, params)


# ---------------------------------------------------------------------------------------------- measuring
AUTOCAST = {"enabled": True}  # off only for a CPU dry run: bf16 convolutions there take minutes per step


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=AUTOCAST["enabled"])


def make_step(case: Case, forward: Callable, device: torch.device, optimizer: Optional[torch.optim.Optimizer]):
    if case.target is None:
        def step():
            with torch.no_grad(), autocast(device):
                return forward(*case.inputs)
        return step

    def step():
        with autocast(device):
            out = forward(*case.inputs)
        loss = case.loss(out, case.target)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def count_flops(case: Case, device: torch.device) -> float:
    """FLOPs of one eager step (fwd, and bwd when training; 2 per multiply-add); the optimizer is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    step = make_step(case, case.forward, device, optimizer=None)
    with FlopCounterMode(display=False) as counter:
        step()
    case.model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable, steps: int, device: torch.device) -> list[float]:
    """Seconds per step. CUDA: an event pair per step, all recorded without host syncs in between."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def profile_table(step: Callable, steps: int, device: torch.device, rows: int = 45) -> str:
    """torch.profiler's operator table over ``steps`` steps, by the GPU (or, on a CPU, the CPU) time of each op."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=80)


def matmul_tflops(device: torch.device, n: int, reps: int) -> float:
    """bf16 n^3 matmul throughput on random data: median over reps."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    times = time_steps(lambda: a @ b, reps, device)
    return 2 * n**3 / statistics.median(times) / 1e12


def run_variant(group: str, net: str, mode: str, shape: Shape, args, device: torch.device,
                flops_cache: dict, peak_tflops: Optional[float]) -> Result:
    res = Result(group, f"{net}-{mode}", shape.batch)
    torch.manual_seed(0)
    case = setup(group, net, shape, device)
    res.params_m, res.note = case.params / 1e6, case.note
    key = (group, net)
    if key not in flops_cache:
        try:
            flops_cache[key] = count_flops(case, device)
        except Exception as e:  # timing still means something without a FLOP count
            flops_cache[key] = None
            res.note = (res.note + f" flop count failed: {type(e).__name__}").strip()
    flops = flops_cache[key]

    if mode == "compiled":
        forward = torch.compile(case.forward, backend=args.compile_backend, mode=args.compile_mode)
    else:
        forward = case.forward
    optimizer = None
    if case.target is not None:
        fused = device.type in ("cuda", "cpu")
        optimizer = torch.optim.AdamW(case.model.parameters(), lr=1e-4, fused=fused)
    step = make_step(case, forward, device, optimizer)

    synchronize(device)
    t0 = time.perf_counter()
    for i in range(max(args.warmup, 1)):
        step()
        if i == 0:
            synchronize(device)
            res.first_step_s = time.perf_counter() - t0
    synchronize(device)
    res.warmup_s = time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(step, args.steps, device)
    if device.type == "cuda":
        res.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    if args.profile:
        print(f"{group}/{net}-{mode}: profiler, {args.profile} steps\n{profile_table(step, args.profile, device)}",
              flush=True)
    median = statistics.median(times)
    res.step_ms_all = [round(t * 1e3, 3) for t in times]
    res.ms_per_step = median * 1e3
    res.img_per_s = shape.batch / median
    if flops:
        res.gflop_per_step = flops / 1e9
        res.gflop_per_img = flops / shape.batch / 1e9
        res.tflop_per_s = flops / median / 1e12
        if peak_tflops:
            res.mfu = res.tflop_per_s / peak_tflops
    return res


def cleanup(device: torch.device) -> None:
    gc.collect()
    try:
        torch._dynamo.reset()
    except Exception:
        pass
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- reporting
def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[Result]) -> str:
    head = ("group", "variant", "batch", "img/s", "ms/step", "GFLOP/img", "TFLOP/s", "MFU", "peak GiB", "params M",
            "vs peer-c", "warm-up s")
    rows = [head]
    for r in results:
        if r.status != "ok":
            rows.append((r.group, r.variant, str(r.batch), r.status.upper(), *["-"] * 8))
            continue
        rows.append((
            r.group, r.variant, str(r.batch), fmt(r.img_per_s, ".1f"), fmt(r.ms_per_step, ".2f"),
            fmt(r.gflop_per_img, ".1f"), fmt(r.tflop_per_s, ".1f"),
            "-" if r.mfu is None else f"{100 * r.mfu:.1f}%", fmt(r.peak_gib, ".2f"), fmt(r.params_m, ".2f"),
            "-" if r.vs_peer_compiled is None else f"{r.vs_peer_compiled:.2f}x", fmt(r.warmup_s, ".1f"),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def set_ratios(results: list[Result], peak_tflops: Optional[float]) -> None:
    for r in results:
        if r.status != "ok":
            continue
        peer = next((p for p in results if p.group == r.group and p.variant == PEER and p.status == "ok"), None)
        if peer is not None and peer.img_per_s:
            r.vs_peer_compiled = r.img_per_s / peer.img_per_s
        counted = next((p.gflop_per_img for p in results
                        if p.group == r.group and p.variant.startswith("diffusers") and p.gflop_per_img), None)
        if counted:
            r.tflop_per_s_peer_flops = counted * r.img_per_s / 1e3
            r.mfu_peer_flops = r.tflop_per_s_peer_flops / peak_tflops if peak_tflops else None


def versions(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except Exception as e:
        info["diffusers"] = f"unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return info


SDPA_BACKENDS = ("cudnn", "flash", "mem_efficient", "math")


def apply_settings(inductor: list[str], sdpa_off: list[str], ae_group_norm: str = "layout-preserving",
                   ae_attention: str = "as-built") -> None:
    """--inductor KEY=VALUE (values parsed as Python literals; unknown keys are an error), --sdpa-off,
    --ae-group-norm (torch: nn.GroupNorm, same parameters and state dict, in our autoencoder instead of its
    layout-keeping GroupNorm) and --ae-attention (sdpa: F.scaled_dot_product_attention for every head width)."""
    import ast

    import torch._inductor.config as inductor_config

    for item in inductor:
        key, sep, text = item.partition("=")
        if not sep:
            sys.exit(f"--inductor {item!r}: expected KEY=VALUE")
        owner, _, name = key.rpartition(".")
        target = inductor_config if not owner else getattr(inductor_config, owner, None)
        if target is None or not hasattr(target, name):
            sys.exit(f"--inductor: torch._inductor.config has no setting {key!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        setattr(target, name, value)
    for backend in sdpa_off:
        getattr(torch.backends.cuda, f"enable_{backend}_sdp")(False)
    if sdpa_off:
        # The SDPA backend is chosen while compiling, and the compile caches do not key on these flags: a graph
        # cached by an earlier run would keep the old kernel.
        import torch._functorch.config as functorch_config

        inductor_config.fx_graph_cache = False
        functorch_config.enable_autograd_cache = False
    if ae_attention == "sdpa":
        import lightning_ldm.autoencoder.blocks as blocks

        blocks.single_head_attention = F.scaled_dot_product_attention
    if ae_group_norm == "torch":
        import lightning_ldm.autoencoder.blocks as blocks
        import lightning_ldm.autoencoder.encoder_decoder as encoder_decoder

        def normalize(channels: int) -> nn.GroupNorm:
            return nn.GroupNorm(32, channels, eps=1e-6)

        blocks.Normalize = encoder_decoder.Normalize = normalize


def select(args) -> list[tuple[str, str, str]]:
    """Variants in run order. --only tokens: groups, nets and modes (same kind OR'd, kinds AND'd) or group/net-mode."""
    everything = [(g, n, m) for g in GROUPS for m in MODES for n in NETS]
    tokens = [t for chunk in (args.only or []) for t in chunk.replace(",", " ").split()]
    ids = {f"{g}/{n}-{m}" for g, n, m in everything}
    unknown = [t for t in tokens if t not in (*GROUPS, *NETS, *MODES, *ids)]
    if unknown:
        sys.exit(f"--only: unknown {unknown}; choose from {GROUPS}, {NETS}, {MODES} or group/net-mode, e.g. "
                 "unet_train/ours-compiled")
    if not args.dry_run or args.dry_run_compile:
        modes_allowed = MODES
    else:
        modes_allowed = ("eager",)
    picked_ids = {t for t in tokens if "/" in t}
    kinds = [set(t for t in tokens if t in kind) for kind in (GROUPS, NETS, MODES)]
    has_filters = any(kinds)

    def chosen(g, n, m):
        if f"{g}/{n}-{m}" in picked_ids:
            return True
        if tokens and not has_filters:
            return False
        return all(not k or v in k for k, v in zip(kinds, (g, n, m)))

    return [(g, n, m) for g, n, m in everything if chosen(g, n, m) and m in modes_allowed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--only", nargs="+", help=f"groups {GROUPS}, nets {NETS}, modes {MODES} or group/net-mode")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 20; dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; dry run 1)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="peers.json", help="results as JSON (rewritten after every variant)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip variants that would end past this many seconds (default 285; dry run: no limit)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny batches and sizes, 2 steps, no compile: exercises every code path (CPU is fine)")
    parser.add_argument("--dry-run-compile", action="store_true", help="compile in the dry run too (slow on CPU)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: trace only)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: inductor's default)")
    parser.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings, e.g. coordinate_descent_tuning=True")
    parser.add_argument("--sdpa-off", nargs="+", default=[], choices=SDPA_BACKENDS,
                        help="scaled_dot_product_attention backends to disable (cudnn: flash attention takes over)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, print torch.profiler's operator table over this many steps")
    parser.add_argument("--ae-group-norm", choices=("layout-preserving", "torch"), default="layout-preserving",
                        help="our autoencoder's GroupNorm: as built (layout-preserving when compiled) or nn.GroupNorm")
    parser.add_argument("--ae-attention", choices=("as-built", "sdpa"), default="as-built",
                        help="our autoencoder's attention: as built (512-channel heads written out when training) "
                             "or scaled_dot_product_attention throughout")
    parser.add_argument("--diffusers-attention", choices=("sdpa", "classic"), default="sdpa",
                        help="AutoencoderKL's attention processor: diffusers' default (AttnProcessor2_0, SDPA) or "
                             "its classic AttnProcessor (baddbmm + softmax): what a diffusers user could switch to")
    args = parser.parse_args()
    DIFFUSERS_AE_ATTENTION["classic"] = args.diffusers_attention == "classic"
    apply_settings(args.inductor, args.sdpa_off, args.ae_group_norm, args.ae_attention)
    if args.steps is None:
        args.steps = 2 if args.dry_run else 20
    if args.warmup is None:
        args.warmup = 1 if args.dry_run else 3
    if args.budget_s is None:
        args.budget_s = 0.0 if args.dry_run else 285.0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but CUDA is not available; use --dry-run --device cpu to check the code paths")
    shapes = DRY if args.dry_run else FULL
    AUTOCAST["enabled"] = not (args.dry_run and device.type == "cpu")
    variants = select(args)
    start = time.perf_counter()

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    meta = versions(device)
    meta["bf16_autocast"] = AUTOCAST["enabled"]
    print("  ".join(f"{k} {v}" for k, v in meta.items()), flush=True)
    peak = None
    try:
        n, reps = (512, 3) if args.dry_run else (8192, 20)
        peak = matmul_tflops(device, n, reps)
        meta["bf16_matmul_tflops"], meta["bf16_matmul_n"] = peak, n
        print(f"bf16 matmul {n}^3: {peak:.1f} TFLOP/s (median of {reps})", flush=True)
    except Exception as e:
        print(f"bf16 matmul: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
    cleanup(device)
    meta["args"] = vars(args)
    meta["shapes"] = {g: asdict(s) for g, s in shapes.items()}

    results: list[Result] = []
    flops_cache: dict = {}
    took: dict[tuple[str, str], float] = {}  # seconds the last variant of (group, mode) took: the next one's guess
    if not variants:
        print("nothing selected (compiled variants need --dry-run-compile in a dry run)", flush=True)

    def save():
        set_ratios(results, peak)
        meta["wall_s"] = time.perf_counter() - start
        Path(args.out).write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))

    for group, net, mode in variants:
        label = f"{group}/{net}-{mode}"
        elapsed = time.perf_counter() - start
        guess = took.get((group, mode), 0.0 if args.dry_run else GUESS_S[(group, mode)])
        if args.budget_s > 0 and elapsed + guess > args.budget_s:
            results.append(Result(group, f"{net}-{mode}", shapes[group].batch, status="skipped",
                                  error=f"budget: {elapsed:.0f} s spent of {args.budget_s:.0f} s"))
            print(f"{label:28s} skipped (budget: {elapsed:.0f} s of {args.budget_s:.0f} s spent)", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            r = run_variant(group, net, mode, shapes[group], args, device, flops_cache, peak)
            print(f"{label:28s} {r.img_per_s:9.1f} img/s  {r.ms_per_step:8.2f} ms  "
                  f"{fmt(r.tflop_per_s, '6.1f')} TFLOP/s  peak {fmt(r.peak_gib, '.2f')} GiB  "
                  f"params {r.params_m:.2f}M  warm-up {r.warmup_s:.1f} s {r.note}".rstrip(), flush=True)
        except Exception as e:
            message = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            r = Result(group, f"{net}-{mode}", shapes[group].batch, status="failed",
                       error=f"{type(e).__name__}: {message}", traceback=traceback.format_exc(limit=-4))
            print(f"{label:28s} FAILED {type(e).__name__}: {message}", flush=True)
        finally:
            cleanup(device)
        took[(group, mode)] = time.perf_counter() - t0
        results.append(r)
        save()

    set_ratios(results, peak)
    print()
    print(table(results))
    print(f"\nvs peer-c: img/s over {PEER} in the same group. GFLOP/img: FlopCounterMode on each implementation's "
          "own eager step (ours' sub-pixel upsampler does fewer multiply-adds for the same function; the JSON's "
          "mfu_peer_flops counts ours with the peer's FLOPs). MFU against the bf16 matmul above. "
          f"{args.steps} timed steps (median) after {args.warmup} warm-up; wall {time.perf_counter() - start:.0f} s")
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
