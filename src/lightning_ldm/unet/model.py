"""The denoising UNet eps_theta(z_t, t, c) of LDM stage 2 (ADM / LDM "openaimodel" architecture).

Layout (Dhariwal & Nichol 2021, Rombach et al. 2022): conv_in; per level `num_res_blocks` ResBlocks,
each followed by attention when the level's downsampling factor ds is in `attention_resolutions`,
then a downsampler; middle ResBlock, attention, ResBlock; per level `num_res_blocks + 1` ResBlocks
on [h, skip] concatenations, then an upsampler; GN, SiLU, zero-initialised conv_out.
"""

from collections.abc import Sequence
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, DataError
from .attention import SelfAttention, SpatialTransformer
from .blocks import Downsample, ResBlock, Upsample, group_norm, zero_init
from .embeddings import TimestepEmbedding


class Stage(nn.ModuleList):
    """Layers run in order: ResBlocks get the embedding, SpatialTransformers the context."""

    def forward(self, x: Tensor, emb: Tensor, context: Optional[Tensor], skip: Optional[Tensor] = None) -> Tensor:
        if skip is not None:  # the decoder's skip connection
            x = torch.cat([x, skip], dim=1)
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """Noise predictor; the constructor arguments are its config schema (see PRESETS).

    attention_resolutions are downsampling factors ds (1 = input resolution), as in LDM's configs.
    Heads: num_head_channels > 0 fixes the head width, else num_heads fixes the count (one of the
    two; neither means one head). Conditions come from the conditioner (``lightning_ldm.conditioning``),
    never from the UNet itself: ``context_dim`` set replaces attention with SpatialTransformers attending to
    ``context`` (B, L, context_dim) (LDM's "crossattn"); a ``vector`` (B, 4 * model_channels) is added to the
    time embedding (ADM's class embedding, LDM's "adm"); concat_channels adds input channels for ``concat``
    (LDM's "concat": low-resolution images, masks).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: Optional[int] = None,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2),
        num_heads: int = -1,
        num_head_channels: int = -1,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        conv_resample: bool = True,
        context_dim: Optional[int] = None,
        transformer_depth: int = 1,
        concat_channels: int = 0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        channel_mult = [int(m) for m in channel_mult]
        attention_resolutions = [int(d) for d in attention_resolutions]
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
            channel_mult=channel_mult, num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions,
            num_heads=num_heads, num_head_channels=num_head_channels, dropout=dropout,
            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
            conv_resample=conv_resample, context_dim=context_dim, transformer_depth=transformer_depth, concat_channels=concat_channels,
            use_checkpoint=use_checkpoint,
        )  # fmt: skip
        _validate(self.config)
        self.in_channels, self.concat_channels = in_channels, concat_channels
        self.context_dim, self.use_checkpoint = context_dim, use_checkpoint
        self.downsampling = 2 ** (len(channel_mult) - 1)
        self.embedding_dim = emb_dim = 4 * model_channels

        self.time_embed = TimestepEmbedding(model_channels, emb_dim)

        def res_block(cin: int, cout: int, resample: Literal["none", "up", "down"] = "none") -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, use_scale_shift_norm, resample)

        def attention(ch: int) -> nn.Module:
            heads = ch // num_head_channels if num_head_channels > 0 else max(num_heads, 1)
            if context_dim is not None:
                return SpatialTransformer(ch, heads, context_dim, transformer_depth)
            return SelfAttention(ch, heads)

        self.conv_in = nn.Conv2d(in_channels + concat_channels, model_channels, 3, padding=1)
        self.input_blocks = nn.ModuleList()
        skip_channels, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(Stage(layers))
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                down = res_block(ch, ch, "down") if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(Stage([down]))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = Stage([res_block(ch, ch), attention(ch), res_block(ch, ch)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level > 0 and i == num_res_blocks:
                    layers.append(res_block(ch, ch, "up") if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(Stage(layers))

        self.out = nn.Sequential(
            group_norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, out_channels or in_channels, 3, padding=1))
        )

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        vector: Optional[Tensor] = None,
        context: Optional[Tensor] = None,
        concat: Optional[Tensor] = None,
    ) -> Tensor:
        """eps (or x0 / v) prediction for noisy latents x (B, C, H, W) at timesteps t (B,), given the
        conditioner's outputs (all optional, as the conditioner produces them)."""
        self._check_inputs(x, vector, context, concat)
        emb = self.time_embed(t.reshape(-1).expand(x.shape[0]))
        if vector is not None:
            emb = emb + vector.to(emb.dtype)
        emb = F.silu(emb)  # every ResBlock's embedding path starts with SiLU: apply it once here

        h = self.conv_in(x if concat is None else torch.cat([x, concat.to(x.dtype)], dim=1))
        skips = [h]
        for stage in self.input_blocks:
            h = self._run(stage, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for stage in self.output_blocks:
            h = self._run(stage, h, emb, context, skips.pop())
        return self.out(h).to(x.dtype)  # autocast leaves bf16 here; the loss wants the input's precision

    def _run(self, stage: Stage, h: Tensor, emb: Tensor, context: Optional[Tensor],
             skip: Optional[Tensor] = None) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            # Non-reentrant checkpointing replays under the same autocast state, so bf16 stays bf16.
            return checkpoint(stage, h, emb, context, skip, use_reentrant=False)
        return stage(h, emb, context, skip)

    def _check_inputs(
        self, x: Tensor, vector: Optional[Tensor], context: Optional[Tensor], concat: Optional[Tensor]
    ) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise DataError(f"UNet input has shape {tuple(x.shape)}, expected (B, {self.in_channels}, H, W): "
                            "set unet.in_channels to the latent channels")
        if x.shape[-2] % self.downsampling or x.shape[-1] % self.downsampling:
            raise DataError(f"UNet input is {x.shape[-2]}x{x.shape[-1]}, not divisible by {self.downsampling} = "
                            "2^(len(channel_mult) - 1): change the image size or unet.channel_mult")
        if vector is not None and tuple(vector.shape) != (x.shape[0], self.embedding_dim):
            raise ConfigError(f"the conditioner's vector has shape {tuple(vector.shape)}, the UNet adds "
                              f"(B, {self.embedding_dim}) = (B, 4 x unet.model_channels) to its time embedding")
        if (context is not None) != (self.context_dim is not None):
            raise ConfigError("unet.context_dim is set but no context was given" if context is None else
                              "a context was given but the UNet has no cross-attention (unet.context_dim is null)")
        if context is not None and context.shape[-1] != self.context_dim:
            raise ConfigError(f"the context's width is {context.shape[-1]}, unet.context_dim is {self.context_dim}")
        got = 0 if concat is None else concat.shape[1]
        if got != self.concat_channels:
            raise ConfigError(f"unet.concat_channels is {self.concat_channels} but the concat input has {got} "
                              "channels: make them match")


def _validate(c: dict[str, Any]) -> None:
    """One-line ConfigErrors for settings the architecture cannot build or would silently ignore."""
    mult, levels = c["channel_mult"], len(c["channel_mult"])
    factors = [2**i for i in range(levels)]
    if levels == 0 or min(mult) < 1 or c["num_res_blocks"] < 1:
        raise ConfigError("unet.channel_mult must be a non-empty list of positive ints and unet.num_res_blocks >= 1")
    if c["model_channels"] % 32:
        raise ConfigError(f"unet.model_channels = {c['model_channels']} must be a multiple of 32 "
                          "(GroupNorm uses 32 groups)")
    unreachable = [d for d in c["attention_resolutions"] if d not in factors]
    if unreachable:
        raise ConfigError(f"unet.attention_resolutions {unreachable} are not downsampling factors of this UNet "
                          f"({factors}); they are factors ds, not pixel sizes")
    if c["num_heads"] > 0 and c["num_head_channels"] > 0:
        raise ConfigError("set only one of unet.num_heads and unet.num_head_channels (the other to -1)")
    attn_channels = {c["model_channels"] * mult[factors.index(d)] for d in c["attention_resolutions"]}
    attn_channels.add(c["model_channels"] * mult[-1])  # the middle block always attends
    divisor = c["num_head_channels"] if c["num_head_channels"] > 0 else max(c["num_heads"], 1)
    if any(ch % divisor for ch in attn_channels):
        raise ConfigError(f"attention widths {sorted(attn_channels)} are not all divisible by "
                          f"unet.num_heads / num_head_channels = {divisor}")
    if c["context_dim"] is not None and c["context_dim"] < 1:
        raise ConfigError(f"unet.context_dim must be a positive width or null, got {c['context_dim']}")
    if c["concat_channels"] < 0 or c["transformer_depth"] < 1 or not 0.0 <= c["dropout"] < 1.0:
        raise ConfigError("unet.concat_channels must be >= 0, unet.transformer_depth >= 1 and "
                          "0 <= unet.dropout < 1")


# Paper configurations (Rombach et al. 2022, Tab. 12-15 / the released LDM configs) and small ones.
# Parameter counts as the paper rounds them; for "cin-ldm-vq-f8" the 395.0M is the UNet alone: LDM's
# ClassEmbedder (1000 x 512 = 0.5M) is a separate cond-stage model there, as it is ours (conditioning/).
_LDM4_FACES = dict(
    in_channels=3, model_channels=224, channel_mult=[1, 2, 3, 4], num_res_blocks=2,
    attention_resolutions=[8, 4, 2], num_head_channels=32,
)  # fmt: skip  # 274.1M
PRESETS: dict[str, dict[str, Any]] = {
    "celebahq-ldm-vq-4": _LDM4_FACES,
    "ffhq-ldm-vq-4": _LDM4_FACES,
    "lsun_bedrooms-ldm-vq-4": _LDM4_FACES,
    "lsun_churches-ldm-kl-8": dict(
        in_channels=4, model_channels=192, channel_mult=[1, 2, 2, 4, 4], num_res_blocks=2,
        attention_resolutions=[1, 2, 4, 8], num_heads=8, use_scale_shift_norm=True, resblock_updown=True,
    ),  # fmt: skip  # 295.0M
    "cin-ldm-vq-f8": dict(
        in_channels=4, model_channels=256, channel_mult=[1, 2, 4], num_res_blocks=2,
        attention_resolutions=[4, 2, 1], num_head_channels=32, context_dim=512,
        transformer_depth=1,
    ),  # fmt: skip  # 395.0M (+0.5M class embedding)
    "cin256-v2-ldm-vq-4": dict(
        in_channels=3, model_channels=192, channel_mult=[1, 2, 3, 5], num_res_blocks=2,
        attention_resolutions=[8, 4, 2], num_heads=1, context_dim=512,
        transformer_depth=1,
    ),  # fmt: skip  # 400.9M (+0.5M class embedding, label 1000 = null for guidance)
    # The released text-to-image LDM-KL-8-G (LD configs/latent-diffusion/txt2img-1p4B-eval.yaml): 32x32x4 latents,
    # cross-attention to the 77 x 1280 outputs of its 32-layer text transformer (conditioning=text_paper).
    "txt2img-ldm-kl-8": dict(
        in_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2,
        attention_resolutions=[4, 2, 1], num_heads=8, context_dim=1280, transformer_depth=1,
    ),  # fmt: skip
    # 32x32 inputs (16x16 and 8x8 inside): learns in minutes on one GPU. 25.8M.
    "small": dict(
        in_channels=3, model_channels=128, channel_mult=[1, 2, 2], num_res_blocks=2,
        attention_resolutions=[2], num_head_channels=64,
    ),  # fmt: skip
    # CPU tests and the quickstart (e.g. 4x16x16 latents). 0.70M.
    "tiny": dict(
        in_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
        attention_resolutions=[2], num_head_channels=32,
    ),  # fmt: skip
}
