"""A small ResNet-9 classifier whose pooled features serve Frechet distances on small-image domains.

Why it exists: FID's Inception-v3 was trained on ImageNet photographs at 299 px. On 28-32 px digits or CIFAR-10
its features say little about what makes an image a good sample of that domain, and its weights cannot be
downloaded offline anyway. A classifier trained on the domain's own *training* split (never the validation
split) gives features that do; registered as ``feature_extractor.kind=checkpoint`` with
``feature_layer=pool`` its metrics are logged as ``fd-<name>`` (see ``lightning_ldm.metrics.features``).
``experiments/feature_extractors/train_classifier.py`` trains and saves it.

The architecture is the ResNet-9 of the DAWNBench CIFAR-10 recipes (Page, "How to train your ResNet", 2018):
prep conv 64, layer1 128 + residual, layer2 256, layer3 512 + residual, global pool, linear head, about 6.6M
parameters at the default width; it reaches ~94% on CIFAR-10 in a couple of dozen epochs.
"""

from typing import Literal

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """x + two conv-BN-ReLU blocks of the same width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """Float images (N, C, H, W) in [-1, 1], C = ``in_channels`` (1 or 3), any size >= 8 (28 and 32 px alike)
    -> logits (N, ``num_classes``). ``self.pool`` outputs the (N, 8 * ``width``) feature vector.

    The three 2x max-pools floor odd sizes (28 -> 14 -> 7 -> 3), and the global pool makes the head independent
    of the input size.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64,
                 pooling: Literal["max", "avg"] = "max") -> None:
        super().__init__()
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        w = width
        self.prep = conv_bn(in_channels, w)
        self.layer1 = nn.Sequential(conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w))
        self.layer2 = nn.Sequential(conv_bn(2 * w, 4 * w), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w))
        global_pool = nn.AdaptiveMaxPool2d(1) if pooling == "max" else nn.AdaptiveAvgPool2d(1)
        self.pool = nn.Sequential(global_pool, nn.Flatten())
        self.head = nn.Linear(8 * w, num_classes, bias=False)
        # The recipe scales the logits by 1/8: max-pooled ReLU features are large, and unscaled logits start the
        # softmax saturated, which slows the first epochs.
        self.logit_scale = 0.125

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled (N, 8 * width) features, the same tensor ``self.pool`` outputs inside ``forward``."""
        return self.pool(self.layer3(self.layer2(self.layer1(self.prep(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)) * self.logit_scale
