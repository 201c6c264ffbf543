"""Stage-1 autoencoder network: regularisers against closed forms, block geometry, presets, validation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_ldm.autoencoder.blocks import AttnBlock, Downsample, ResnetBlock
from lightning_ldm.autoencoder.model import PAPER_PRESETS, SMALL_PRESETS, Autoencoder
from lightning_ldm.autoencoder import blocks, regularizers
from lightning_ldm.autoencoder.regularizers import DiagonalGaussian, VectorQuantizer
from lightning_ldm.errors import ConfigError, DataError

TINY = dict(ch=32, num_res_blocks=1, resolution=32, z_channels=4, embed_dim=4)


def tiny(**overrides) -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(**dict(TINY, **overrides))


# ---------------------------------------------------------------- DiagonalGaussian


def test_kl_matches_closed_form_and_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    kl = DiagonalGaussian(torch.cat([mean, logvar], dim=1)).kl()
    assert kl.shape == (3,)
    by_hand = torch.stack([0.5 * (m**2 + lv.exp() - 1 - lv).sum() for m, lv in zip(mean, logvar)])
    torch.testing.assert_close(kl, by_hand)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)))


def test_kl_of_standard_normal_posterior_is_zero():
    assert DiagonalGaussian(torch.zeros(2, 8, 3, 3)).kl().abs().max() == 0


def test_logvar_is_clamped_to_minus_30_and_20():
    mean = torch.zeros(1, 1, 1, 3)
    logvar = torch.tensor([-100.0, 0.0, 100.0]).reshape(1, 1, 1, 3)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    torch.testing.assert_close(posterior.logvar.flatten(), torch.tensor([-30.0, 0.0, 20.0]))
    torch.testing.assert_close(posterior.std.flatten(), torch.exp(torch.tensor([-15.0, 0.0, 10.0])))
    assert torch.isfinite(posterior.kl()).all()


def test_sample_has_the_posterior_mean_and_std_and_follows_the_generator():
    mean, std = 0.5, 2.0
    params = torch.cat([torch.full((1, 1, 200, 200), mean), torch.full((1, 1, 200, 200), math.log(std**2))], dim=1)
    posterior = DiagonalGaussian(params)
    sample = posterior.sample(generator=torch.Generator().manual_seed(1))
    # 40k draws: standard errors are 0.01 for the mean and 0.007 for the std
    assert abs(sample.mean().item() - mean) < 0.05
    assert abs(sample.std().item() - std) < 0.05
    assert torch.equal(sample, posterior.sample(generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(sample, posterior.sample(generator=torch.Generator().manual_seed(2)))
    assert torch.equal(posterior.mode(), params[:, :1])


# ---------------------------------------------------------------- VectorQuantizer


def make_quantizer(num_codes: int = 16, dim: int = 3, beta: float = 0.25) -> VectorQuantizer:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_codes=num_codes, code_dim=dim, beta=beta)
    with torch.no_grad():
        quantizer.embedding.weight.normal_()
    return quantizer


@pytest.mark.parametrize("chunked", [False, True])
def test_quantizer_picks_the_nearest_code(chunked, monkeypatch):
    if chunked:  # 16 codes -> distance rows computed 3 positions at a time
        monkeypatch.setattr(regularizers, "_DISTANCE_BUDGET", 3 * 16)
    quantizer = make_quantizer()
    z = torch.randn(2, 3, 5, 7)
    out = quantizer(z)
    assert torch.equal(quantizer.straight_through(z), out.quantized)
    codes = quantizer.embedding.weight
    for b in range(2):
        for i in range(5):
            for j in range(7):
                distances = [torch.sum((z[b, :, i, j] - code) ** 2).item() for code in codes]
                assert out.indices[b, i, j].item() == min(range(len(codes)), key=distances.__getitem__)
                torch.testing.assert_close(out.quantized[b, :, i, j], codes[out.indices[b, i, j]])


def test_nearest_code_search_stays_float32_under_autocast():
    quantizer = VectorQuantizer(num_codes=8, code_dim=4)
    with torch.no_grad():  # codes 1 + k/256 apart: bf16 (8-bit mantissa) cannot tell most of them apart
        quantizer.embedding.weight.copy_(1.0 + torch.arange(8.0)[:, None].expand(8, 4) / 256)
    z = (1.0 + torch.arange(8.0) / 256 + 1e-4)[:, None, None, None].expand(8, 4, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        indices = quantizer.nearest_code(z)
    assert indices.flatten().tolist() == list(range(8))


def test_quantizer_passes_gradients_straight_through():
    quantizer = make_quantizer()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    upstream = torch.randn(2, 3, 4, 4)
    (quantizer(z).quantized * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)
    (grad,) = torch.autograd.grad((quantizer.straight_through(z) * upstream).sum(), z)
    torch.testing.assert_close(grad, upstream)


def test_quantizer_loss_value_and_which_term_trains_what():
    beta = 0.25
    quantizer = make_quantizer(beta=beta)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = quantizer(z)
    z_q = quantizer.embedding.weight.detach()[out.indices].permute(0, 3, 1, 2)
    mse = torch.mean((z.detach() - z_q) ** 2)
    torch.testing.assert_close(out.loss, beta * mse + mse)
    out.loss.backward()
    n = z.numel()
    # encoder: only the commitment term beta * ||sg(z_q) - z||^2 (beta on this side: the non-legacy form)
    torch.testing.assert_close(z.grad, beta * 2.0 / n * (z.detach() - z_q))
    # codebook: only ||z_q - sg(z)||^2, accumulated over the positions assigned to each code
    flat_z = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    expected = torch.zeros_like(quantizer.embedding.weight)
    for position, code in enumerate(out.indices.flatten().tolist()):
        expected[code] += 2.0 / n * (quantizer.embedding.weight[code].detach() - flat_z[position])
    torch.testing.assert_close(quantizer.embedding.weight.grad, expected)


def test_perplexity_and_codebook_usage():
    quantizer = make_quantizer(num_codes=16)
    uniform = torch.arange(5).repeat(6)  # 5 codes, each used 6 times
    perplexity, usage = quantizer.code_statistics(uniform)
    torch.testing.assert_close(perplexity, torch.tensor(5.0))
    torch.testing.assert_close(usage, torch.tensor(5 / 16))
    # p = (1/2, 1/4, 1/4): entropy 1.5 bits, perplexity 2^1.5
    perplexity, usage = quantizer.code_statistics(torch.tensor([3, 3, 7, 9]))
    torch.testing.assert_close(perplexity, torch.tensor(2**1.5))
    torch.testing.assert_close(usage, torch.tensor(3 / 16))


# ---------------------------------------------------------------- blocks


def test_downsample_pads_only_right_and_bottom():
    block = Downsample(1)
    with torch.no_grad():
        block.conv.weight.fill_(1.0)
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    y = block(x)
    assert y.shape == (1, 1, 4, 4)
    (first,) = torch.autograd.grad(y[0, 0, 0, 0], x, retain_graph=True)
    expected = torch.zeros(8, 8)
    expected[0:3, 0:3] = 1.0  # output (0, 0) sees input rows/cols 0..2: no padding on top/left
    assert torch.equal(first[0, 0] != 0, expected != 0)
    (last,) = torch.autograd.grad(y[0, 0, 3, 3], x)
    expected = torch.zeros(8, 8)
    expected[6:8, 6:8] = 1.0  # rows/cols 6, 7 and the zero pad
    assert torch.equal(last[0, 0] != 0, expected != 0)


def test_attention_equals_naive_softmax_reference():
    torch.manual_seed(0)
    block = AttnBlock(32)
    for conv in (block.q, block.k, block.v, block.proj_out):
        torch.nn.init.normal_(conv.weight, std=0.3)
        torch.nn.init.normal_(conv.bias, std=0.3)
    x = torch.randn(2, 32, 5, 3)
    h = block.norm(x)
    q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # (B, C, N)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=-1)
    attended = torch.einsum("bij,bcj->bci", weights, v).reshape(2, 32, 5, 3)
    torch.testing.assert_close(block(x), x + block.proj_out(attended), atol=1e-5, rtol=1e-5)


def qkv(batch: int, length: int, dim: int, requires_grad: bool = True) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 1, length, dim, generator=generator) * 2).requires_grad_(requires_grad)
            for _ in range(3)]


def test_wide_head_attention_written_out_equals_sdpa_in_value_and_gradients():
    q, k, v = qkv(2, 48, 512)  # head dim 512: the kl-f4 / kl-f8 mid blocks, past the fused kernels
    out = blocks.single_head_attention(q, k, v)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    reference = [t.detach().double().requires_grad_() for t in (q, k, v)]  # SDPA in float64: the exact values
    expected = F.scaled_dot_product_attention(*reference)
    expected_grads = torch.autograd.grad(expected, reference, grad_out.double())
    torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=1e-4)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad.float(), atol=1e-5, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under bf16-mixed: float32 inside, bf16 out like SDPA
        assert blocks.single_head_attention(*(t.bfloat16() for t in (q, k, v))).dtype == torch.bfloat16


def test_written_out_attention_scores_are_exact_on_tf32_tensor_cores(monkeypatch):
    """On GPUs float32 matmuls run in TF32 (float32_matmul_precision=high): operands keep 10 mantissa bits. bf16 q
    and k have 7, so q k^T loses nothing as long as nothing rounds them before the product (such as a scale)."""
    def tf32(t: torch.Tensor) -> torch.Tensor:
        return (t.float().view(torch.int32) & ~0x1FFF).view(torch.float32)  # drop the low 13 of 23 mantissa bits

    products = []

    def tf32_matmul(a, b):
        products.append((tf32(a).double() @ tf32(b).double()).float())
        return products[-1]

    q, k, v = (t.bfloat16().requires_grad_() for t in qkv(2, 24, 512))
    monkeypatch.setattr(torch, "matmul", tf32_matmul)
    blocks.single_head_attention(q, k, v)
    monkeypatch.undo()
    exact = (q.detach().double() @ k.detach().double().transpose(-1, -2)).float()
    assert torch.equal(products[0], exact)


def test_sdpa_stays_where_its_kernels_are_fast_or_memory_matters(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(blocks.F, "scaled_dot_product_attention", lambda *a: calls.append(1) or sdpa(*a))
    blocks.single_head_attention(*qkv(2, 16, 512))
    assert calls == []  # training, wide head: written out
    blocks.single_head_attention(*qkv(2, 16, 256))  # a head the fused kernels take
    with torch.no_grad():  # inference: the kernel's forward is as fast and needs no (B, L, L) buffer
        blocks.single_head_attention(*qkv(2, 16, 512))
    blocks.single_head_attention(*qkv(2, 16, 512, requires_grad=False))
    monkeypatch.setattr(blocks, "WRITTEN_OUT_ATTENTION_MAX_SCORES", 2 * 16 * 16 - 1)  # scores past the budget
    blocks.single_head_attention(*qkv(2, 16, 512))
    assert len(calls) == 4


def test_inductor_does_not_turn_the_written_out_attention_back_into_sdpa():
    from torch._dynamo.utils import counters

    def with_softmax(q, k, v):  # the textbook form, which the pattern matcher rewrites into SDPA
        return torch.matmul((torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1), v)

    torch._dynamo.reset()
    counters.clear()
    # Compiled for real: a graph from the on-disk caches would skip the pattern pass (and the count).
    no_caches = {"fx_graph_cache": False, "fx_graph_remote_cache": False}
    with torch._inductor.config.patch(no_caches), torch._functorch.config.patch(enable_autograd_cache=False):
        for function in (blocks.single_head_attention, with_softmax):
            torch.compile(function)(*qkv(2, 32, 512)).sum().backward()
            if function is blocks.single_head_attention:
                assert counters["inductor"]["fuse_attention"] == 0
    assert counters["inductor"]["fuse_attention"] > 0  # so the pattern matcher was active, and the check means it
    torch._dynamo.reset()


def test_resnet_block_uses_a_shortcut_conv_only_when_channels_change():
    assert not hasattr(ResnetBlock(32, 32), "nin_shortcut")
    block = ResnetBlock(32, 64)
    assert block.nin_shortcut.kernel_size == (1, 1)
    assert block(torch.randn(1, 32, 4, 4)).shape == (1, 64, 4, 4)


# ---------------------------------------------------------------- Autoencoder


@pytest.mark.parametrize("ch_mult, f", [([1], 1), ([1, 2], 2), ([1, 2, 2], 4), ([1, 1, 2, 2], 8)])
def test_downsampling_factor_follows_ch_mult(ch_mult, f):
    assert Autoencoder(**dict(TINY, ch_mult=ch_mult)).downsampling_factor == f


@pytest.mark.parametrize("regularizer", ["kl", "vq"])
@pytest.mark.parametrize("ch_mult, f", [([1, 2], 2), ([1, 2, 2], 4), ([1, 1, 2, 2], 8)])
def test_encode_decode_shapes(regularizer, ch_mult, f):
    model = tiny(ch_mult=ch_mult, regularizer=regularizer, codebook_size=32)
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    latent = model.encode(x)
    assert latent.mean.shape == latent.std.shape == (2, model.latent_channels, 16 // f, 24 // f)
    z = latent.sample(generator=torch.Generator().manual_seed(0))
    assert model.decode(z).shape == x.shape
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.regularization_loss.ndim == 0 and out.regularization_loss.requires_grad
    assert all(v.ndim == 0 and not v.requires_grad for v in out.log.values())


def test_kl_forward_reports_the_batch_mean_of_the_summed_kl():
    model = tiny(ch_mult=[1, 2])
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out = model(x, sample_posterior=False)
    posterior = model.encode(x)
    torch.testing.assert_close(out.regularization_loss, posterior.kl().mean())
    torch.testing.assert_close(out.reconstruction, model.decode(posterior.mode()))
    assert set(out.log) == {"kl", "posterior_mean_abs", "posterior_std"}


def test_vq_latent_is_deterministic_and_decode_quantises_it():
    model = tiny(ch_mult=[1, 2], regularizer="vq", codebook_size=32)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    latent = model.encode(x)
    assert torch.equal(latent.sample(), latent.mean) and latent.std.abs().max() == 0
    codes = model.quantize(latent.mean).quantized
    assert not torch.allclose(codes, latent.mean)  # the encoder output is continuous, not already a code
    torch.testing.assert_close(model.decode(latent.mean), model.decode(codes))
    out = model(x)
    torch.testing.assert_close(out.reconstruction, model.decode(latent.mean))
    assert set(out.log) == {"vq_loss", "perplexity", "codebook_usage"}
    assert 1.0 <= out.log["perplexity"] <= 32 and 0 < out.log["codebook_usage"] <= 1


def test_attention_placement_follows_pixel_resolution():
    model = tiny(ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[16])  # levels at 32, 16, 8 px
    encoder_levels = [len(level.attn) for level in model.encoder.down]
    decoder_levels = [len(level.attn) for level in model.decoder.up]  # up[i] is level i, like the encoder
    assert encoder_levels == [0, 2, 0]  # one per res block
    assert decoder_levels == [0, 3, 0]  # num_res_blocks + 1 in the decoder
    assert [len(level.block) for level in model.decoder.up] == [3, 3, 3]
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) == 2 + 3 + 2  # + one per mid block
    plain = tiny(ch_mult=[1, 2, 2])
    assert sum(isinstance(m, AttnBlock) for m in plain.modules()) == 2


def test_config_rebuilds_the_same_architecture():
    for model in (tiny(ch_mult=(1, 2), attn_resolutions=(16,)), tiny(regularizer="vq", codebook_size=64)):
        config = json.loads(json.dumps(model.config))
        rebuilt = Autoencoder(**config)
        assert config == model.config and rebuilt.config == model.config
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert Autoencoder(**TINY).config["out_channels"] == 3


def test_state_dict_keys_follow_the_released_ld_layout():
    keys = set(tiny(ch_mult=[1, 2], regularizer="vq", codebook_size=32).state_dict())
    for key in (
        "encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.attn_1.q.weight", "encoder.mid.block_2.conv2.bias",
        "decoder.up.1.upsample.conv.weight", "decoder.up.0.block.1.conv1.weight", "decoder.conv_out.weight",
        "quant_conv.weight", "post_quant_conv.weight", "quantize.embedding.weight",
    ):  # fmt: skip
        assert key in keys, key
    assert "decoder.up.0.upsample.conv.weight" not in keys and "encoder.down.1.downsample.conv.weight" not in keys


def test_last_layer_is_the_decoder_output_conv_and_output_is_unbounded():
    model = tiny(ch_mult=[1, 2])
    assert model.last_layer() is model.decoder.conv_out.weight
    with torch.no_grad():
        model.decoder.conv_out.bias.fill_(5.0)
    assert model(torch.zeros(1, 3, 16, 16)).reconstruction.min() > 1.0  # no tanh


def count(preset: dict) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return sum(p.numel() for p in Autoencoder(**preset).parameters())


# Exact counts at 256^2: kl-f4 55,312,063; kl-f8 83,653,863; kl-f16 69,610,963; kl-f32 103,880,131;
# vq-f4 55,322,782 (incl. 8192x3 codebook); vq-f8 67,717,295 (incl. 16384x4 codebook).
EXACT_COUNTS = {
    "kl-f4": 55_312_063, "kl-f8": 83_653_863, "kl-f16": 69_610_963, "kl-f32": 103_880_131,
    "vq-f4": 55_322_782, "vq-f8": 67_717_295,
}  # fmt: skip


def test_parameter_counts_match_the_released_ld_first_stages():
    assert round(count(PAPER_PRESETS["kl-f4"]) / 1e6, 1) == 55.3
    assert round(count(PAPER_PRESETS["kl-f8"]) / 1e6, 2) == 83.65
    assert {name: count(preset) for name, preset in PAPER_PRESETS.items()} == EXACT_COUNTS


def test_small_presets_build_and_round_trip_32px():
    for name, preset in SMALL_PRESETS.items():
        model = Autoencoder(**preset)
        with torch.no_grad():
            assert model(torch.zeros(1, 3, 32, 32)).reconstruction.shape == (1, 3, 32, 32), name


def test_indivisible_image_size_raises_data_error():
    model = tiny(ch_mult=[1, 2, 2])
    with pytest.raises(DataError, match=r"30x32.*f=4"):
        model.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(DataError, match="in_channels"):
        model.encode(torch.zeros(1, 1, 32, 32))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ch=48), "multiple of 32"),
        (dict(attn_resolutions=[24]), "never occur"),
        (dict(regularizer="ae"), "regularizer"),
        (dict(ch_mult=[]), "ch_mult"),
    ],
)
def test_invalid_config_raises_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Autoencoder(**dict(TINY, **overrides))
