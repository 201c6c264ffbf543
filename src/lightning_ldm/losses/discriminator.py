"""PatchGAN discriminator and its two losses (the adversarial part of the stage-1 loss).

The architecture is the pix2pix / taming "NLayerDiscriminator": every output logit judges one overlapping
patch of the input (a 70x70 receptive field for 3 layers), which pushes the decoder towards locally
realistic texture instead of the blur an L1/LPIPS objective alone settles for (Esser et al. 2021, Sec. 3.1).
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ldm.errors import ConfigError

NormKind = Literal["batch", "group", "none"]

_KERNEL = 4
_PADDING = 1
_GROUPS = 32


def _norm(kind: NormKind, channels: int) -> nn.Module:
    # "batch" is the reference (LD/taming). Under DDP its statistics are per-GPU, so the trainer must run with
    # sync_batchnorm=true, which converts these layers to SyncBatchNorm (reference trap 7).
    # "group" is the batch-independent alternative: no cross-GPU statistics, no train/eval discrepancy.
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(_GROUPS, channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """Fully convolutional discriminator returning a map of real/fake logits, shape (N, 1, H', W').

    Layout: conv(in -> ndf, stride 2) + LeakyReLU, then n_layers - 1 stride-2 convs and one stride-1 conv,
    each doubling the width (capped at 8 * ndf) followed by norm + LeakyReLU, then a stride-1 conv to 1 channel.
    With 3 layers, ndf 64, 3 input channels and BatchNorm this is 2,765,633 parameters.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        norm: NormKind = "batch",
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ConfigError(f"loss.disc_layers must be >= 1, got {n_layers}")
        if norm not in ("batch", "group", "none"):
            raise ConfigError(f"loss.disc_norm must be one of batch, group, none; got {norm!r}")
        widths = [ndf * min(2**i, 8) for i in range(n_layers + 1)]
        if norm == "group" and any(w % _GROUPS for w in widths[1:]):
            raise ConfigError(f"loss.disc_norm=group needs channel counts divisible by {_GROUPS}; "
                              f"loss.disc_ndf={ndf} gives {widths[1:]}: use a multiple of 32 or disc_norm=batch")

        # A conv followed by a norm with an affine shift needs no bias of its own.
        conv_bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], _KERNEL, stride=2, padding=_PADDING),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for i in range(1, n_layers + 1):
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(widths[i - 1], widths[i], _KERNEL, stride=stride, padding=_PADDING, bias=conv_bias),
                _norm(norm, widths[i]),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, _KERNEL, stride=1, padding=_PADDING))
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # DCGAN initialisation (Radford et al. 2016), as pix2pix/taming: N(0, 0.02) convs, N(1, 0.02) norm scales.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]) (Lim & Ye 2017; taming's default)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[softplus(-D(x))] + E[softplus(D(x_hat))]): the non-saturating GAN loss on logits."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
