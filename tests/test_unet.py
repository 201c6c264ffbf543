"""The stage-2 denoising UNet: paper parameter counts, conditioning, zero init, attention, checkpointing."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_ldm.errors import ConfigError, DataError
from lightning_ldm.unet import PRESETS, UNet, timestep_embedding
from lightning_ldm.unet.attention import Attention, SelfAttention, SpatialTransformer
from lightning_ldm.unet.blocks import ResBlock, Upsample

TINY = dict(PRESETS["tiny"])  # 4 channels in, 32 model channels, mult (1, 2), attention at ds 2
MODES = {
    "none": dict(TINY),
    "adm": dict(TINY),  # a vector of width 4 x 32 added to the time embedding
    "crossattn": dict(TINY, context_dim=24),
    "concat": dict(TINY, concat_channels=2),
    "film-updown": dict(TINY, use_scale_shift_norm=True, resblock_updown=True, num_heads=2, num_head_channels=-1),
}


def inputs(config: dict, batch: int = 2, size: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], size, size, generator=g)
    kwargs = dict(x=x, t=torch.tensor([3, 917])[:batch])
    if config is MODES["adm"]:
        kwargs["vector"] = torch.randn(batch, 4 * config["model_channels"], generator=g)
    if config.get("context_dim"):
        kwargs["context"] = torch.randn(batch, 3, config["context_dim"], generator=g)
    if config.get("concat_channels"):
        kwargs["concat"] = torch.randn(batch, config["concat_channels"], size, size, generator=g)
    return kwargs


def perturb(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its (zero) init so each path of the network affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def build(config: dict, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(**config)


# Paper Tab. 12-15; for the cross-attention presets LDM counts the UNet alone (its ClassEmbedder is a
# separate cond-stage model, as ours is). The text-to-image UNet: 872.3M of the released 1.45B (its 32-layer
# text transformer holds the rest; tests/test_text_encoders.py counts it).
@pytest.mark.parametrize(
    "preset, millions",
    [
        ("celebahq-ldm-vq-4", 274.1),
        ("ffhq-ldm-vq-4", 274.1),
        ("lsun_bedrooms-ldm-vq-4", 274.1),
        ("lsun_churches-ldm-kl-8", 295.0),
        ("cin-ldm-vq-f8", 395.0),
        ("cin256-v2-ldm-vq-4", 400.9),
        ("txt2img-ldm-kl-8", 872.3),
    ],
)
def test_paper_parameter_counts(preset, millions):
    with torch.device("meta"):
        model = UNet(**PRESETS[preset])
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


def test_small_presets_sizes():
    with torch.device("meta"):
        small, tiny = UNet(**PRESETS["small"]), UNet(**PRESETS["tiny"])
    assert 10e6 < sum(p.numel() for p in small.parameters()) < 35e6
    assert sum(p.numel() for p in tiny.parameters()) < 1e6


@pytest.mark.parametrize("mode", list(MODES))
def test_output_shape_and_zero_init(mode):
    config = MODES[mode]
    model = build(config)
    kwargs = inputs(config)
    out = model(**kwargs)
    assert out.shape == kwargs["x"].shape and out.dtype == kwargs["x"].dtype
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised conv_out (ADM)
    assert perturb(model)(**kwargs).abs().sum() > 0


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 17, 999])
    dim, half = 10, 5
    emb = timestep_embedding(t, dim)
    for b, step in enumerate(t.tolist()):
        for i in range(half):
            phase = step * math.exp(-math.log(10000) * i / half)
            assert emb[b, i].item() == pytest.approx(math.cos(phase), abs=1e-4)
            assert emb[b, half + i].item() == pytest.approx(math.sin(phase), abs=1e-4)
    odd = timestep_embedding(t, dim + 1)
    assert torch.equal(odd[:, :dim], emb) and torch.equal(odd[:, dim], torch.zeros(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # phases of t ~ 1000 need float32
        assert timestep_embedding(t.float(), dim).dtype == torch.float32


def naive_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v per head, q (B, heads, L, d)."""
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


def test_self_attention_matches_naive():
    torch.manual_seed(0)
    block = perturb(SelfAttention(64, heads=4))
    x = torch.randn(2, 64, 4, 6)
    tokens = block.norm(x).flatten(2).transpose(1, 2)  # (B, L, C)
    q, k, v = block.qkv(tokens).split(64, dim=-1)
    heads = lambda z: z.reshape(2, 24, 4, 16).transpose(1, 2)  # noqa: E731
    out = naive_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(2, 24, 64)
    expected = x + block.proj_out(out).transpose(1, 2).reshape(2, 64, 4, 6)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_matches_naive():
    torch.manual_seed(0)
    attn = Attention(32, heads=2, context_dim=12)
    x, context = torch.randn(3, 10, 32), torch.randn(3, 5, 12)
    q = attn.to_q(x).reshape(3, 10, 2, 16).transpose(1, 2)
    k, v = (z.reshape(3, 5, 2, 16).transpose(1, 2) for z in attn.to_kv(context).split(32, dim=-1))
    expected = attn.to_out(naive_attention(q, k, v).transpose(1, 2).reshape(3, 10, 32))
    torch.testing.assert_close(attn(x, context), expected, atol=1e-5, rtol=1e-5)


def test_film_resblock_matches_formula():
    torch.manual_seed(0)
    block = perturb(ResBlock(32, 64, emb_dim=16, scale_shift=True))
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    scale, shift = block.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
    h = block.norm2(block.conv1(F.silu(block.norm1(x)))) * (1 + scale) + shift
    expected = block.skip(x) + block.conv2(F.silu(h))
    torch.testing.assert_close(block(x, emb), expected)


@pytest.mark.parametrize("channels_last", [False, True])
def test_subpixel_upsample_equals_nearest_then_conv(channels_last):
    torch.manual_seed(0)
    up = perturb(Upsample(8))
    x = torch.randn(2, 8, 5, 7, requires_grad=True)
    naive = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    fast = up(x.to(memory_format=torch.channels_last) if channels_last else x)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(naive)
    expected = torch.autograd.grad((naive * g).sum(), (x, up.conv.weight, up.conv.bias))
    # The weight gradient sums ~280 products of order 1 in another order than the naive form: float32 rounding of
    # ~1e-5 is expected; a wrong tap or phase would be off by order 1.
    torch.testing.assert_close(torch.autograd.grad((fast * g).sum(), (x, up.conv.weight, up.conv.bias)), expected,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode, key", [("adm", "vector"), ("crossattn", "context")])
def test_conditions_change_the_output(mode, key):
    config = MODES[mode]
    model = perturb(build(config))
    kwargs = inputs(config)
    a = model(**kwargs)
    b = model(**dict(kwargs, **{key: kwargs[key].roll(1, dims=0)}))
    torch.testing.assert_close(model(**kwargs), a, rtol=0, atol=0)
    assert not torch.allclose(a[0], b[0], atol=1e-4) and not torch.allclose(a[1], b[1], atol=1e-4)


def test_crossattn_takes_contexts_of_any_length():
    config = MODES["crossattn"]
    model = perturb(build(config))
    kwargs = inputs(config)
    longer = torch.randn(2, 7, config["context_dim"])  # e.g. text tokens
    assert model(kwargs["x"], kwargs["t"], context=longer).shape == kwargs["x"].shape


def test_vector_adds_to_the_time_embedding():
    """A zero vector is the unconditional network, exactly."""
    config = MODES["adm"]
    model = perturb(build(config))
    kwargs = inputs(config)
    torch.testing.assert_close(model(kwargs["x"], kwargs["t"], vector=torch.zeros_like(kwargs["vector"])),
                               model(kwargs["x"], kwargs["t"]), rtol=0, atol=0)


@pytest.mark.parametrize("mode", list(MODES))
def test_config_rebuilds_the_same_model(mode):
    model = build(MODES[mode])
    rebuilt = UNet(**json.loads(json.dumps(model.config)))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in rebuilt.state_dict().items()}


@pytest.mark.parametrize("mode", ["adm", "crossattn"])
def test_checkpointing_gives_identical_outputs_and_gradients(mode):
    config = MODES[mode]
    plain = perturb(build(config))
    ckpt = UNet(**dict(config, use_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    kwargs = inputs(config)
    results = []
    for model in (plain, ckpt):
        out = model(**kwargs)
        out.square().mean().backward()
        results.append((out, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for g_plain, g_ckpt in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g_plain, g_ckpt, rtol=1e-6, atol=1e-7)


def test_checkpointing_keeps_autocast():
    config = MODES["crossattn"]
    plain = perturb(build(config))
    ckpt = UNet(**dict(config, use_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    kwargs = inputs(config)
    grads = []
    for model in (plain, ckpt):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**kwargs)
        out.square().mean().backward()
        grads.append(model.conv_in.weight.grad)
    # the recomputed forward must run in bf16 too, or the saved and replayed graphs would disagree
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def attention_sizes(model: UNet, size: int) -> list[int]:
    """Spatial size seen by each attention layer, in execution order."""
    seen = []
    for module in model.modules():
        if isinstance(module, (SelfAttention, SpatialTransformer)):
            module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-1]))
    model(torch.randn(1, model.in_channels, size, size), torch.tensor([1]))
    return seen


@pytest.mark.parametrize(
    "ds, expected", [((), [4]), ((1,), [16, 16, 4, 16, 16, 16]), ((2, 4), [8, 8, 4, 4, 4, 4, 4, 4, 8, 8, 8])]
)
def test_attention_placement(ds, expected):
    # mult (1, 1, 2) at 16x16: levels at 16, 8 and 4 pixels = ds 1, 2, 4; the middle (ds 4) always attends
    model = UNet(in_channels=3, model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=2, attention_resolutions=ds)
    assert attention_sizes(model, 16) == expected


def test_concat_conditioning_adds_input_channels():
    config = MODES["concat"]
    model = perturb(build(config))
    assert model.conv_in.in_channels == config["in_channels"] + config["concat_channels"]
    kwargs = inputs(config)
    other = model(**dict(kwargs, concat=kwargs["concat"] + 1))
    assert not torch.allclose(model(**kwargs), other)
    with pytest.raises(ConfigError):
        model(kwargs["x"], kwargs["t"])


@pytest.mark.parametrize("mode", ["adm", "crossattn", "film-updown"])
def test_gradients_reach_every_parameter(mode):
    config = MODES[mode]
    model = build(config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    kwargs = inputs(config)
    target = torch.randn_like(kwargs["x"])
    # Zero-initialised layers block the gradient of what precedes them at step 0; after a few steps
    # every parameter must get one (a parameter without is unused, which also breaks DDP).
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(**kwargs), target).backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
    dead = [name for name, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert dead == []


def test_channels_last_and_scalar_timestep():
    config = MODES["crossattn"]
    model = perturb(build(config))
    kwargs = inputs(config, batch=2)
    kwargs["t"] = torch.tensor([5, 5])
    expected = model(**kwargs)
    fast = model.to(memory_format=torch.channels_last)
    x = kwargs["x"].to(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(**dict(kwargs, x=x, t=torch.tensor(5))), expected, atol=1e-5, rtol=1e-5)


def test_runs_in_bfloat16_without_autocast():
    config = MODES["adm"]
    model = perturb(build(config)).to(torch.bfloat16)
    kwargs = inputs(config)
    out = model(**dict(kwargs, x=kwargs["x"].to(torch.bfloat16)))
    assert out.dtype == torch.bfloat16 and out.isfinite().all()


def test_input_errors_are_one_line():
    model = build(TINY)  # downsamples by 2
    with pytest.raises(DataError, match="divisible by 2") as err:
        model(torch.randn(1, 4, 9, 8), torch.tensor([1]))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="in_channels"):
        model(torch.randn(1, 3, 8, 8), torch.tensor([1]))
    with pytest.raises(ConfigError, match="context"):
        build(MODES["crossattn"])(torch.randn(1, 4, 8, 8), torch.tensor([1]))
    with pytest.raises(ConfigError, match="time embedding"):
        build(TINY)(torch.randn(1, 4, 8, 8), torch.tensor([1]), vector=torch.randn(1, 7))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(attention_resolutions=[16]), "attention_resolutions"),  # pixel size instead of ds
        (dict(num_heads=2, num_head_channels=32), "only one"),
        (dict(context_dim=0), "context_dim"),
        (dict(model_channels=48), "multiple of 32"),
        (dict(num_head_channels=48), "divisible"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        UNet(**dict(TINY, **overrides))
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["crossattn", "film-updown"])
def test_compiles_without_graph_breaks(mode):
    config = dict(MODES[mode], use_checkpoint=True)
    model = perturb(build(config)).to(memory_format=torch.channels_last)
    kwargs = inputs(config)
    expected = model(**kwargs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    out = compiled(**kwargs)
    out.square().mean().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
