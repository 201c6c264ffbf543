"""Prompt accuracy: do generated images show what their prompts ask for? Offline, for captioned-digit scenes.

Each prompt is parsed into facts (``lightning_ldm.data.captioned_digits.parse_caption``) and the image is read
back from its pixels:

- digits are the 8-connected bright regions of the image (brightness = max over RGB, so every colour counts
  alike); specks below a minimum area are noise, not digits;
- a region's digit class comes from a small CNN, the *digit reader*, trained on the dataset's training digits
  cut and scaled exactly as the scorer cuts regions, in grey, so colour cannot matter;
- its colour is the palette colour nearest to the direction of its bright pixels' mean RGB (robust to dimming);
- its size is its longer side against the midpoint of the two sizes; the relation comes from the two centres.

The prompt's digits are matched to the regions by the assignment that makes the most facts true (the image
obeys "a red 3 left of a blue 7" if it has a red 3 left of a blue 7, whichever region is found first). Scores are
the share of right facts of each kind and the share of images with *every* fact right, the count of digits
included. Score seen and held-out combinations (``evaluation_prompts``) with separate calls.
"""

import itertools
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_ldm.data.captioned_digits import (PALETTE, SIZES, DigitFacts, SceneFacts, digit_ink,
                                                 parse_caption, reader_held_out_digits, scale_ink)
from lightning_ldm.data.digits import load_mnist_5k
from lightning_ldm.errors import CheckpointError, DataError

READER_KIND = "lightning_ldm.digit_reader"
READER_VERSION = "1"
_INPUT = 20  # the reader sees a 20x20 grey crop, the ink's longer side scaled to 16 and centred, as MNIST does
_INK = 16
_THRESHOLD = 0.35  # brightness in [0, 1] above which a pixel is ink; between the background and a dimmed stroke
_MIN_AREA_FRACTION = 0.002  # regions smaller than this share of the canvas are specks, not digits
_MAX_REGIONS = 4  # more regions than this are scored as their largest ones (the count fact is still wrong)
_SIZE_SPLIT = math.sqrt(SIZES["small"] * SIZES["large"])  # geometric midpoint: equal ratio to either size
_FACTS = ("digit", "colour", "size", "relation", "count")


# ---------------------------------------------------------------- the digit reader


class DigitReader(nn.Module):
    """Grey crops (N, 1, 20, 20) in [0, 1] -> logits (N, 10). Three conv blocks: small enough to train on two CPU
    cores in seconds, which is all that MNIST-like crops need."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width

        def block(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
                                 nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(1, width, 5), nn.MaxPool2d(2), block(width, 2 * width, 3), nn.MaxPool2d(2),
                                  block(2 * width, 4 * width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, 10)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(crops))

    @torch.no_grad()
    def read(self, crops: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """The digit class (N,) of each crop."""
        self.eval()
        device = next(self.parameters()).device
        if len(crops) == 0:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([self(chunk.to(device)).argmax(1).cpu() for chunk in crops.split(batch_size)])


def reader_crop(grey: torch.Tensor) -> torch.Tensor:
    """(1, 20, 20) reader input from a grey patch (h, w) in [0, 1] holding one digit (other pixels zero): cut to
    the ink above the threshold, longer side scaled to 16, centred, brightest pixel scaled to 1 (so a dim digit
    reads like a bright one)."""
    rows, cols = torch.nonzero(grey >= _THRESHOLD, as_tuple=True)
    if len(rows) == 0:
        return torch.zeros(1, _INPUT, _INPUT)
    ink = scale_ink(grey[rows.min():rows.max() + 1, cols.min():cols.max() + 1], _INK).clamp(0, 1)
    ink = ink / ink.max().clamp_min(1e-6)
    height, width = ink.shape
    top, left = (_INPUT - height) // 2, (_INPUT - width) // 2
    crop = torch.zeros(1, _INPUT, _INPUT)
    crop[0, top:top + height, left:left + width] = ink
    return crop


def reader_training_digits() -> np.ndarray:
    """The MNIST indices the reader learns from: all but ``reader_held_out_digits()``."""
    return np.setdiff1d(np.arange(len(digit_ink())), reader_held_out_digits())


def _blur(patch: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of an (h, w) patch, separable, zero outside (the patch comes padded with background)."""
    radius = max(1, math.ceil(2 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    padded = F.pad(patch[None, None], (radius, radius, radius, radius))
    out = F.conv2d(F.conv2d(padded, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1))
    return out[0, 0]


def _augmented_crop(ink: torch.Tensor, generator: torch.Generator, extents: tuple[int, int]) -> torch.Tensor:
    """The crop the scorer would cut from this digit drawn at a random size (both sizes on 32 to 64 px canvases)
    and stored as 8 bits; half of them softened, as generated images are."""
    extent = int(torch.randint(extents[0], extents[1] + 1, (), generator=generator))
    patch = scale_ink(ink, extent).clamp(0, 1)
    if torch.rand((), generator=generator) < 0.5:
        sigma = 0.3 + 0.5 * float(torch.rand((), generator=generator))
        patch = _blur(F.pad(patch, (2, 2, 2, 2)), sigma)
    patch = patch * (0.6 + 0.4 * float(torch.rand((), generator=generator)))  # dimmer colours of generated images
    return reader_crop((patch * 255).round() / 255)


def reader_dataset(indices: Sequence[int], variants: int, seed: int,
                   extents: tuple[int, int] = (7, 26)) -> tuple[torch.Tensor, torch.Tensor]:
    """(crops (N * variants, 1, 20, 20), labels) of the given MNIST digits, each drawn ``variants`` times."""
    generator = torch.Generator().manual_seed(seed)
    inks, (_, labels) = digit_ink(), load_mnist_5k()
    crops = [_augmented_crop(inks[i], generator, extents) for _ in range(variants) for i in indices]
    return torch.stack(crops), labels[torch.as_tensor(np.tile(np.asarray(indices), variants))]


def train_digit_reader(seed: int = 0, *, steps: int = 1500, batch_size: int = 128, variants: int = 4,
                       lr: float = 3e-3, width: int = 16, indices: Optional[Sequence[int]] = None) -> DigitReader:
    """A ``DigitReader`` trained on CPU from ``indices`` (default ``reader_training_digits()``); the same seed
    gives the same weights. The global RNG is left as it was."""
    indices = reader_training_digits() if indices is None else indices
    crops, labels = reader_dataset(indices, variants, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reader = DigitReader(width)
        optimizer = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        reader.train()
        for _ in range(steps):
            batch = torch.randint(len(crops), (batch_size,))
            loss = F.cross_entropy(reader(_jitter(crops[batch])), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return reader.eval()


def _jitter(crops: torch.Tensor) -> torch.Tensor:
    """The batch shifted by up to one pixel each way: the scorer centres a crop by its ink's box, which a stray
    pixel of a generated image moves."""
    shift = torch.randint(-1, 2, (2,))
    return torch.roll(crops, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))


def save_digit_reader(reader: DigitReader, path: Union[str, Path]) -> None:
    """Weights as safetensors, marked with kind and version so that ``load_digit_reader`` refuses other files."""
    save_file({k: v.contiguous() for k, v in reader.state_dict().items()}, str(path),
              metadata={"kind": READER_KIND, "version": READER_VERSION, "width": str(reader.width)})


def load_digit_reader(path: Union[str, Path]) -> DigitReader:
    """A reader saved by ``save_digit_reader``; any other file raises a one-line ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"digit reader {path} does not exist: train one with train_digit_reader and save it")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a safetensors file ({str(error).splitlines()[0]})") from None
    if metadata.get("kind") != READER_KIND or metadata.get("version") != READER_VERSION:
        raise CheckpointError(f"{path} is not a digit reader of version {READER_VERSION} "
                              f"(kind {metadata.get('kind')!r}, version {metadata.get('version')!r})")
    reader = DigitReader(int(metadata["width"]))
    reader.load_state_dict(state)
    return reader.eval()


# ---------------------------------------------------------------- reading images


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """float (N, 3, H, W) in [0, 1] from uint8 or from float in [-1, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"prompt accuracy needs RGB images (N, 3, H, W), got shape {tuple(images.shape)}")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images.float() / 255
    return ((images.float() + 1) / 2).clamp(0, 1)


def label_regions(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> int64 (N, H, W): 0 off the mask, one id per 8-connected region. Each pixel takes the
    largest id of its neighbours until nothing changes: plain tensor ops, no scipy."""
    n, h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(n, h, w) * mask
    while True:
        grown = F.max_pool2d(ids[:, None], 3, stride=1, padding=1)[:, 0] * mask
        if torch.equal(grown, ids):
            return ids.long()
        ids = grown


_PALETTE_NAMES = list(PALETTE)
_PALETTE_DIRECTIONS = torch.tensor([PALETTE[name] for name in _PALETTE_NAMES], dtype=torch.float32) / 255


def _colour_name(rgb: torch.Tensor) -> str:
    direction = rgb / rgb.max().clamp_min(1e-6)
    return _PALETTE_NAMES[int(torch.cdist(direction[None], _PALETTE_DIRECTIONS).argmin())]


def _read_region(image: torch.Tensor, grey: torch.Tensor, region: torch.Tensor, digit_scale: float) -> dict[str, Any]:
    """Colour, size, centre and reader crop of one region (bool (H, W)) of ``image`` (3, H, W)."""
    ink = region & (grey >= _THRESHOLD)
    rows, cols = torch.nonzero(ink, as_tuple=True)
    extent = int(max(rows.max() - rows.min(), cols.max() - cols.min())) + 1
    weights = grey[rows, cols]
    bright = weights >= 0.5 * weights.max()
    rgb = image[:, rows[bright], cols[bright]].mean(1)
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    patch = (grey * region)[top:bottom, left:right]
    return {
        "colour": _colour_name(rgb),
        "size": "large" if extent / grey.shape[-1] >= _SIZE_SPLIT * digit_scale else "small",
        "centre": (float((cols * weights).sum() / weights.sum()), float((rows * weights).sum() / weights.sum())),
        "crop": reader_crop(patch),
        "area": len(rows),
    }


def find_digits(images: torch.Tensor, reader: DigitReader, digit_scale: float = 1.0) -> list[list[dict[str, Any]]]:
    """For each image, its digits (largest first): ``{"digit", "colour", "size", "centre" (x, y) px, "area"}``;
    sizes are read relative to the data's ``digit_scale``."""
    images = _to_unit(images)
    grey = images.amax(1)
    mask = grey >= _THRESHOLD
    # Joining ink across gaps of up to 2 px per 32 px of canvas keeps a digit with a broken stroke (a 5's detached
    # bar) whole; the scene layout leaves wider gaps than that between two digits.
    radius = max(1, images.shape[-1] // 32)
    joined = F.max_pool2d(mask[:, None].float(), 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0
    labels = label_regions(joined)
    min_area = max(3, round(_MIN_AREA_FRACTION * grey.shape[-1] * grey.shape[-2]))
    found = []
    for image, image_grey, image_labels in zip(images, grey, labels):
        ids = torch.unique(image_labels[image_labels > 0]).tolist()
        regions = [_read_region(image, image_grey, image_labels == i, digit_scale) for i in ids]
        regions = sorted((r for r in regions if r["area"] >= min_area), key=lambda r: -r["area"])
        found.append(regions)
    crops = [r["crop"] for regions in found for r in regions]
    digits = reader.read(torch.stack(crops)) if crops else torch.zeros(0, dtype=torch.long)
    flat = iter(digits.tolist())
    for regions in found:
        for region in regions:
            region["digit"] = next(flat)
            del region["crop"]
    return found


# ---------------------------------------------------------------- scoring


def _relation(first: tuple[float, float], second: tuple[float, float]) -> str:
    dx, dy = second[0] - first[0], second[1] - first[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _slot_checks(wanted: DigitFacts, region: Optional[dict[str, Any]]) -> dict[str, Optional[bool]]:
    """Whether ``region`` shows the wanted digit, colour and size; None for a fact the prompt leaves open."""
    return {
        "digit": region is not None and region["digit"] == wanted.digit,
        "colour": None if wanted.colour is None else region is not None and region["colour"] == wanted.colour,
        "size": None if wanted.size is None else region is not None and region["size"] == wanted.size,
    }


def _score_assignment(facts: SceneFacts, regions: list[Optional[dict[str, Any]]]) -> dict[str, Any]:
    slots = [_slot_checks(wanted, region) for wanted, region in zip(facts.digits, regions)]
    checks: dict[str, Any] = {fact: [slot[fact] for slot in slots] for fact in ("digit", "colour", "size")}
    if facts.relation is not None:
        placed = all(region is not None for region in regions)
        checks["relation"] = placed and _relation(regions[0]["centre"], regions[1]["centre"]) == facts.relation
    return checks


def _right_count(checks: dict[str, Any]) -> int:
    values = [v for fact in ("digit", "colour", "size") for v in checks[fact]] + [checks.get("relation")]
    return sum(1 for v in values if v)


def score_image(facts: SceneFacts, regions: list[dict[str, Any]]) -> dict[str, Any]:
    """The checks of one image: per prompt digit ``digit`` / ``colour`` / ``size`` (lists of bool or None),
    ``relation`` (two digits only), ``count`` and ``all``, under the region assignment with the most right facts."""
    regions = regions[:_MAX_REGIONS]
    wanted = len(facts.digits)
    candidates = [list(p) + [None] * (wanted - len(p))
                  for p in itertools.permutations(regions, min(wanted, len(regions)))] or [[None] * wanted]
    best = max((_score_assignment(facts, c) for c in candidates), key=_right_count)  # first of equals: stable
    best["count"] = len(regions) == wanted
    values = [v for fact in ("digit", "colour", "size") for v in best[fact]] + [best.get("relation"), best["count"]]
    best["all"] = all(v is not False for v in values)
    return best


def _share(values: list[Optional[bool]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def score_prompts(images: torch.Tensor, prompts: Sequence[str], reader: DigitReader,
                  digit_scale: float = 1.0) -> dict[str, Any]:
    """Prompt accuracy of ``images`` (uint8 or float in [-1, 1], (N, 3, H, W)) against their ``prompts``, for a
    model trained on captioned digits with ``data.digit_scale`` = ``digit_scale``.

    Returns ``n``, the share of right ``digit`` / ``colour`` / ``size`` facts (over the prompts' digits),
    ``relation`` (over two-digit prompts; None without any), ``count`` (right number of digits), ``all`` (every
    fact of the image right) and ``per_image`` (each image's checks, see ``score_image``).
    """
    if len(images) != len(prompts):
        raise DataError(f"prompt accuracy needs one prompt per image, got {len(images)} images and "
                        f"{len(prompts)} prompts")
    facts = [parse_caption(prompt) for prompt in prompts]  # bad prompts fail before any image is read
    per_image = [score_image(f, regions) for f, regions in zip(facts, find_digits(images, reader, digit_scale))]
    result: dict[str, Any] = {"n": len(per_image)}
    for fact in _FACTS + ("all",):
        values = [check.get(fact) for check in per_image]
        flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
        result[fact] = _share(flat)
    result["per_image"] = per_image
    return result
