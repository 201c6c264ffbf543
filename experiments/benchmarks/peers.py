"""Our networks against the strongest peer configuration (diffusers, bf16 + channels_last, eager and
torch.compile), timed in one process on one GPU.

Groups (each: ours and diffusers, eager and compiled):
  unet_train  LDM-4 UNet (274.1M) training step: fwd + eps-MSE + bwd + fused AdamW, batch 48, 3x64x64 latents
  unet_fwd    the same UNet, forward only (sampling), batch 256, no_grad
  ae_train    kl-f4 autoencoder (55.3M) at 256^2, batch 8: encode -> posterior sample -> decode -> L1 -> bwd -> AdamW
  ae_decode   its decoder alone (3x64x64 -> 256x256), batch 32, no_grad
  xattn_train cross-attention UNet of the released LDM text-to-image model (txt2img-1p4B-eval, 872.3M) against
              diffusers' UNet2DConditionModel in the same configuration: fwd + eps-MSE + bwd + fused AdamW, batch 64,
              4x32x32 latents, context (B, 77, 1280)

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

GROUPS = ("unet_train", "unet_fwd", "ae_train", "ae_decode", "xattn_train")
NETS = ("ours", "diffusers")
MODES = ("eager", "compiled")
PEER = "diffusers-compiled"
# Seconds a variant is guessed to take on an H100 host (build, FLOP count, warm-up with compile, timed steps) until
# one of the same group and mode has run; only used to skip variants that would overrun --budget-s.
GUESS_S = {("unet_train", "eager"): 15, ("unet_train", "compiled"): 70, ("unet_fwd", "eager"): 15,
           ("unet_fwd", "compiled"): 35, ("ae_train", "eager"): 10, ("ae_train", "compiled"): 35,
           ("ae_decode", "eager"): 8, ("ae_decode", "compiled"): 20, ("xattn_train", "eager"): 20,
           ("xattn_train", "compiled"): 150}

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

# xattn_train: the UNet of the released LDM text-to-image model (CompVis latent-diffusion
# configs/latent-diffusion/txt2img-1p4B-eval.yaml, = PRESETS["txt2img-ldm-kl-8"]): 32x32x4 kl-f8 latents, 8 heads of
# 40 / 80 / 160 channels, one SpatialTransformer (conv-1x1-equivalent proj_in/out, self-attn, cross-attn, GEGLU FF)
# after every ResBlock at ds 1, 2, 4 and in the middle, cross-attending to 77 x 1280 text-encoder tokens.
# diffusers' UNet2DConditionModel is built from our model.config by diffusers_crossattn_config(): 872,300,484
# parameters each (asserted in every process: the other implementation is built on the meta device and counted).
XATTN_FULL = dict(
    unet=dict(in_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2,
              attention_resolutions=[4, 2, 1], num_heads=8, context_dim=1280, transformer_depth=1),
    context_len=77, params=872_300_484,
)  # fmt: skip
# The CPU dry run: the same structure (attention at every level but the last, fixed head count) at toy widths.
XATTN_TINY = dict(
    unet=dict(in_channels=4, model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1,
              attention_resolutions=[2, 1], num_heads=2, context_dim=16, transformer_depth=1),
    context_len=5, params=None,
)  # fmt: skip
XATTN = dict(XATTN_FULL)  # main() picks XATTN_TINY for --dry-run


@dataclass
class Shape:
    batch: int
    size: int  # latent side for the UNet and the decoder, image side for ae_train


# xattn_train batch 64: about 13 GiB of fp32 weights, grads and AdamW moments (872M parameters) plus bf16
# activations of roughly 0.3-0.4 GiB per image (saved tensors of one eager step, measured on a CPU in fp32 at
# batch 1: 0.66 GiB ours, 0.46 GiB diffusers'; about half in bf16): ~40 GiB, room on an 80 GB H100 for either
# implementation, also for the eager FLOP-count step; 128 would come close to the limit.
FULL = {"unet_train": Shape(48, 64), "unet_fwd": Shape(256, 64), "ae_train": Shape(8, 256), "ae_decode": Shape(32, 64),
        "xattn_train": Shape(64, 32)}
DRY = {"unet_train": Shape(2, 8), "unet_fwd": Shape(2, 8), "ae_train": Shape(2, 16), "ae_decode": Shape(2, 4),
       "xattn_train": Shape(2, 8)}


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


def diffusers_crossattn_config(cfg: dict[str, Any], sample_size: int) -> dict[str, Any]:
    """UNet2DConditionModel arguments for our cross-attention UNet's ``model.config`` (the SD-1 layout, which is
    LDM's openaimodel UNet): one down/up block per level, CrossAttn*Block2D where the level's ds is in
    attention_resolutions, the cross-attention mid block, conv 1x1 proj_in/out (use_linear_projection=False: ours
    are Linear layers on the tokens, the same weights), GEGLU feed-forward, 32 norm groups, cos-first timestep
    features. diffusers' naming quirk: with num_attention_heads unset (it refuses it), attention_head_dim is the
    number of heads per level, and each head is out_channels // heads wide, as ours."""
    unsupported = {k: cfg[k] for k, ok in (("resblock_updown", False), ("conv_resample", True), ("concat_channels", 0),
                                           ("dropout", 0.0)) if cfg[k] != ok}
    if cfg["context_dim"] is None or unsupported:
        raise ValueError(f"no UNet2DConditionModel equivalent: context_dim {cfg['context_dim']}, {unsupported}")
    widths = [cfg["model_channels"] * m for m in cfg["channel_mult"]]
    heads = [w // cfg["num_head_channels"] if cfg["num_head_channels"] > 0 else max(cfg["num_heads"], 1)
             for w in widths]
    attends = [2**level in cfg["attention_resolutions"] for level in range(len(widths))]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends))
    return dict(
        sample_size=sample_size, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"] or cfg["in_channels"],
        block_out_channels=tuple(widths), layers_per_block=cfg["num_res_blocks"], down_block_types=down,
        mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=up,
        attention_head_dim=heads[0] if len(set(heads)) == 1 else tuple(heads),
        cross_attention_dim=cfg["context_dim"], transformer_layers_per_block=cfg["transformer_depth"],
        use_linear_projection=False, norm_num_groups=32, norm_eps=1e-5, act_fn="silu", downsample_padding=1,
        flip_sin_to_cos=True, freq_shift=0, upcast_attention=False, dropout=0.0,
        resnet_time_scale_shift="scale_shift" if cfg["use_scale_shift_norm"] else "default",
    )  # fmt: skip


def build_crossattn_unet(net: str, sample_size: int) -> nn.Module:
    """Our UNet with XATTN's config, or diffusers' mapped from it; the other one is built on the meta device (no
    memory, a tenth of a second) and its parameter count compared to this one's."""
    from lightning_ldm.unet import UNet

    def peer(config: dict[str, Any]) -> nn.Module:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**diffusers_crossattn_config(config, sample_size))

    model = UNet(**XATTN["unet"]) if net == "ours" else None
    with torch.device("meta"):
        ours_meta = UNet(**XATTN["unet"])
        other = peer(ours_meta.config) if net == "ours" else ours_meta
    if model is None:
        model = peer(ours_meta.config)
    mine, theirs = n_params(model), n_params(other)
    if mine != theirs:
        raise AssertionError(f"cross-attention UNet: {net} has {mine:,} parameters, the other {theirs:,}")
    if XATTN["params"] is not None and mine != XATTN["params"]:
        raise AssertionError(f"cross-attention UNet has {mine:,} parameters, expected {XATTN['params']:,}")
    return model


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
    if group == "xattn_train":
        with device:
            model = build_crossattn_unet(net, s)
        params = n_params(model)
        model = model.to(device, memory_format=torch.channels_last).train()
        cfg = XATTN["unet"]
        x = channels_last(torch.randn(b, cfg["in_channels"], s, s, device=device))
        t = torch.randint(1, 1000, (b,), device=device)
        context = torch.randn(b, XATTN["context_len"], cfg["context_dim"], device=device)
        note = f"{params:,} parameters, = the other's"
        if net == "ours":
            def forward(x, t, context):
                return model(x, t, context=context)
        else:
            def forward(x, t, context):
                return model(x, t, encoder_hidden_states=context).sample
            note += "; attention " + "/".join(sorted({type(p).__name__ for p in model.attn_processors.values()}))
        return Case(model, forward, (x, t, context), channels_last(torch.randn_like(x)), mse, params, note)
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
    XATTN.clear()
    XATTN.update(XATTN_TINY if args.dry_run else XATTN_FULL)
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
    if any(g == "xattn_train" for g, _, _ in variants):
        meta["xattn"] = {"context_len": XATTN["context_len"], "ours": XATTN["unet"]}
        from lightning_ldm.unet import UNet

        with torch.device("meta"):
            config = UNet(**XATTN["unet"]).config
        meta["xattn"]["diffusers"] = diffusers_crossattn_config(config, shapes["xattn_train"].size)

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
