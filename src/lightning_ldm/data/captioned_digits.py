"""Captioned scenes of real handwritten digits, built offline from the embedded MNIST digits.

Text-to-image models need images whose captions can be checked. No captioned photo set can be downloaded here,
so each image is a scene composed from the 5,000 embedded MNIST digits (``lightning_ldm.data.digits``) on a
black RGB canvas, and its captions are written from the scene's facts:

- one or two digits (``max_digits`` 1: always one); each has a digit class, a colour of ``PALETTE`` (colours
  far apart in RGB, so that they can be read back from pixels) and a size of ``SIZES`` (two clearly different
  scales; ``digit_scale`` scales both, up to 2 when every scene has one digit, as small canvases need);
- two digits stand in a relation of ``RELATIONS`` (left of / right of / above / below) that fixes where they are,
  with a little jitter;
- every caption states every fact ("a large blue 7 left of a small green 1"); a scene has several phrasings
  (the converse relation, digits as words), one drawn per training step.

A digit is the real MNIST image, cut to its ink, scaled so that its longer side is the size's fraction of the
canvas, and tinted (colour * intensity). Scene ``i`` is drawn from a generator seeded by ``(seed, i)``, so the
scene list is a pure function of the seed and ``num_scenes`` (growing ``num_scenes`` keeps the earlier scenes),
and pixels are rendered per item at ``image_size``: nothing is stored.

The (digit, colour) pairs of ``HELD_OUT_PAIRS`` appear in no scene, train or val, so that a model can be asked
for combinations it never saw (``evaluation_prompts``). The 5,000 digits themselves are shared by train and val
scenes (a val scene reuses training digits in new colours, sizes and places): the split measures the fit to
scenes, not to unseen handwriting. ``lightning_ldm.metrics.prompt_accuracy`` reads scenes back from pixels to
score whether generated images obey their prompts; its digit reader leaves out ``reader_held_out_digits()`` so
that it can be checked on handwriting it was not trained on.
"""

import functools
import re
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from lightning_ldm.data.base import ImageDataModule
from lightning_ldm.data.digits import _MNIST_5K_SHA256, load_mnist_5k
from lightning_ldm.errors import ConfigError, DataError

# Pure hues and white: as directions in RGB (colour / its largest channel) every two are at least 1 apart, so the
# colour survives dimming and blur and is read back as the nearest direction.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
# A digit's longer side as a fraction of the canvas side; 1.6x apart, so that size is read without doubt.
SIZES: dict[str, float] = {"small": 0.24, "large": 0.38}
RELATIONS = ("left of", "right of", "above", "below")
# (digit, colour) pairs that no scene contains: each digit loses at most one colour and each colour at most two
# digits, so every digit and every colour is still seen often.
HELD_OUT_PAIRS: tuple[tuple[int, str], ...] = (
    (0, "red"), (1, "blue"), (2, "green"), (3, "white"), (4, "yellow"), (5, "magenta"), (7, "green"), (9, "red"),
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MIN_IMAGE_SIZE = 32
GENERATOR_VERSION = "captioned-digits-v1"

# The digit counts a scene may be limited to (max_digits), each with its largest digit_scale: two digits keep their
# gap at 1; one digit of the large size fills 76% of the canvas at 2 (and stays inside it: positions are clamped).
MAX_DIGIT_SCALE = {1: 2.0, 2: 1.0}
MIN_DIGIT_SCALE = 0.5
_TWO_DIGIT_SHARE = 2 / 3  # relations are what text conditioning finds hardest, so most scenes have two digits
_NEAR, _FAR = 0.24, 0.76  # centres of the two digits along the relation's axis: large digits keep a clear gap
_AXIS_JITTER, _CROSS_JITTER, _SINGLE_JITTER = 0.01, 0.10, 0.12  # fractions of the canvas side
_CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class DigitFacts:
    """One digit of a scene or prompt; ``colour`` or ``size`` None where a prompt does not say it."""

    digit: int
    colour: Optional[str]
    size: Optional[str]


@dataclass(frozen=True)
class SceneFacts:
    """What a caption states: one or two digits and, for two, ``digits[0]`` ``relation`` ``digits[1]``."""

    digits: tuple[DigitFacts, ...]
    relation: Optional[str] = None

    def canonical(self) -> "SceneFacts":
        """The same facts with the relation turned to "left of" or "above", so that converse captions compare
        equal ("a 1 right of a 7" is "a 7 left of a 1")."""
        if self.relation in ("right of", "below"):
            return SceneFacts(self.digits[::-1], _CONVERSE[self.relation])
        return self


@dataclass(frozen=True)
class Scene:
    """A scene to render: its facts, the MNIST index of each digit and each digit's centre (x, y) as fractions of
    the canvas side (independent of the image size)."""

    facts: SceneFacts
    sources: tuple[int, ...]
    centres: tuple[tuple[float, float], ...]


# ---------------------------------------------------------------- captions


def _digit_phrase(digit: DigitFacts, words: bool = False) -> str:
    parts = ["a", digit.size, digit.colour, NUMBER_WORDS[digit.digit] if words else str(digit.digit)]
    return " ".join(part for part in parts if part)


def describe_scene(scene: Union[Scene, SceneFacts], words: bool = False) -> str:
    """The canonical caption of a scene: "a small red 3", "a large blue 7 left of a small green 1"; ``words``
    writes the digits as words ("seven")."""
    facts = scene.facts if isinstance(scene, Scene) else scene
    phrases = [_digit_phrase(digit, words) for digit in facts.digits]
    return phrases[0] if facts.relation is None else f"{phrases[0]} {facts.relation} {phrases[1]}"


def scene_captions(facts: SceneFacts) -> list[str]:
    """Every phrasing of a scene, the canonical one first: digits as numerals and as words, and for two digits
    the converse relation as well. Each states every fact."""
    converse = SceneFacts(facts.digits[::-1], _CONVERSE[facts.relation]) if facts.relation else None
    captions = [describe_scene(facts), describe_scene(facts, words=True)]
    if converse is not None:
        captions.append(describe_scene(converse))
    return captions


_DIGIT_PATTERN = (
    r"(?:an? )?(?:(?P<size{n}>{sizes}) )?(?:(?P<colour{n}>{colours}) )?(?:digit )?(?P<digit{n}>[0-9]|{words})"
)


def _digit_regex(n: int) -> str:
    return _DIGIT_PATTERN.format(n=n, sizes="|".join(SIZES), colours="|".join(PALETTE), words="|".join(NUMBER_WORDS))


_CAPTION = re.compile(
    rf"{_digit_regex(0)}(?: (?:to the )?(?P<relation>left of|right of|above|below) {_digit_regex(1)})?"
)


def _normalise_text(text: str) -> str:
    return " ".join(text.lower().replace(",", " ").split()).rstrip(".").strip()


def parse_caption(text: str) -> SceneFacts:
    """The facts a caption or prompt states. Accepts every caption of this dataset and prompts in the same
    words: "[a] [small|large] [colour] [digit] <0-9 or zero..nine>", optionally followed by "[to the] left of /
    right of / above / below" and a second digit; size and colour may be left out (then they are not checked).
    Anything else raises a one-line ``DataError`` naming the prompt."""
    match = _CAPTION.fullmatch(_normalise_text(text))
    if match is None:
        raise DataError(
            f"cannot read the prompt {text!r}: write e.g. 'a small red 3' or 'a large blue 7 left of a small green "
            f"1' (sizes: {', '.join(SIZES)}; colours: {', '.join(PALETTE)}; relations: {', '.join(RELATIONS)})"
        )
    count = 2 if match.group("relation") else 1
    digits = tuple(
        DigitFacts(_digit_value(match.group(f"digit{n}")), match.group(f"colour{n}"), match.group(f"size{n}"))
        for n in range(count)
    )
    return SceneFacts(digits, match.group("relation"))


def _digit_value(token: str) -> int:
    return int(token) if token.isdigit() else NUMBER_WORDS.index(token)


# ---------------------------------------------------------------- scenes


def reader_held_out_digits() -> np.ndarray:
    """Indices of the MNIST digits that the prompt-accuracy digit reader is never trained on: every tenth digit
    (50 of each class), to check the reader on handwriting it has not seen."""
    return np.arange(0, 5000, 10)


@functools.lru_cache(maxsize=1)
def _digits_by_class() -> tuple[np.ndarray, ...]:
    _, labels = load_mnist_5k()
    labels = labels.numpy()
    return tuple(np.flatnonzero(labels == digit) for digit in range(10))


@functools.lru_cache(maxsize=None)
def _allowed_colours(pairs: str) -> dict[int, list[str]]:
    """Colours each digit may take: ``"seen"`` (all but the held-out pairs), ``"held_out"`` or ``"any"``."""
    held = set(HELD_OUT_PAIRS)
    keep = {"seen": lambda pair: pair not in held, "held_out": lambda pair: pair in held, "any": lambda pair: True}
    return {d: [c for c in PALETTE if keep[pairs]((d, c))] for d in range(10)}


def _draw_digit(rng: np.random.Generator, allowed: dict[int, list[str]],
                pool: Sequence[np.ndarray]) -> tuple[DigitFacts, int]:
    digit = int(rng.choice([d for d in range(10) if allowed[d]]))
    colour = str(rng.choice(allowed[digit]))
    size = str(rng.choice(list(SIZES)))
    return DigitFacts(digit, colour, size), int(rng.choice(pool[digit]))


def _centres(rng: np.random.Generator, relation: Optional[str]) -> tuple[tuple[float, float], ...]:
    if relation is None:
        x, y = 0.5 + rng.uniform(-_SINGLE_JITTER, _SINGLE_JITTER, size=2)
        return ((float(x), float(y)),)
    along = np.array([_NEAR, _FAR]) + rng.uniform(-_AXIS_JITTER, _AXIS_JITTER, size=2)
    across = 0.5 + rng.uniform(-_CROSS_JITTER, _CROSS_JITTER, size=2)
    if relation in ("right of", "below"):  # the first digit stands on the far side
        along = along[::-1]
    if relation in ("left of", "right of"):
        return tuple((float(a), float(b)) for a, b in zip(along, across))
    return tuple((float(b), float(a)) for a, b in zip(along, across))


def draw_scene(rng: np.random.Generator, *, first: str = "seen", second: str = "seen",
               pool: Optional[Sequence[np.ndarray]] = None, max_digits: int = 2) -> Scene:
    """One random scene. ``first`` / ``second`` name the (digit, colour) pairs each digit may use (``"seen"``,
    ``"held_out"``, ``"any"``); ``pool`` is the MNIST indices of each class to take digits from (all by default);
    ``max_digits`` 1 makes every scene a single digit (the draws are otherwise those of 2)."""
    pool = pool if pool is not None else _digits_by_class()
    two = rng.random() < _TWO_DIGIT_SHARE and max_digits == 2
    relation = str(rng.choice(RELATIONS)) if two else None
    drawn = [_draw_digit(rng, _allowed_colours(first), pool)]
    if two:
        drawn.append(_draw_digit(rng, _allowed_colours(second), pool))
    facts = SceneFacts(tuple(d for d, _ in drawn), relation)
    return Scene(facts, tuple(s for _, s in drawn), _centres(rng, relation))


def dataset_scene(seed: int, index: int, max_digits: int = 2) -> Scene:
    """Scene ``index`` of the dataset with ``seed``: its own generator, so it does not depend on the others."""
    return draw_scene(np.random.default_rng([seed, index]), max_digits=max_digits)


def evaluation_scenes(kind: Literal["seen", "held_out"], count: int, seed: int = 0,
                      max_digits: int = 2) -> list[Scene]:
    """``count`` deterministic scenes for scoring a model: ``"seen"`` uses only (digit, colour) pairs found in the
    dataset; ``"held_out"`` gives its first digit a pair of ``HELD_OUT_PAIRS`` (the second, if any, may be either).
    Drawn from their own generator stream, so they are new scenes in the dataset's proportions; rendered, they are
    the real images that obey their prompts (the scorer's ceiling and the Frechet distance's reference)."""
    if kind not in ("seen", "held_out"):
        raise ConfigError(f"evaluation prompts are 'seen' or 'held_out', got {kind!r}")
    stream = {"seen": 1, "held_out": 2}[kind]
    second = "seen" if kind == "seen" else "any"
    return [draw_scene(np.random.default_rng([seed, index, stream]), first=kind, second=second, max_digits=max_digits)
            for index in range(count)]


def evaluation_prompts(kind: Literal["seen", "held_out"], count: int, seed: int = 0, max_digits: int = 2) -> list[str]:
    """The captions of ``evaluation_scenes(kind, count, seed, max_digits)``."""
    return [describe_scene(scene) for scene in evaluation_scenes(kind, count, seed, max_digits)]


# ---------------------------------------------------------------- pixels


@functools.lru_cache(maxsize=1)
def digit_ink() -> tuple[torch.Tensor, ...]:
    """Each MNIST digit as float (h, w) in [0, 1], cut to the box of its non-zero pixels: its scale is then set
    by its ink, not by MNIST's padding."""
    pixels, _ = load_mnist_5k()
    crops = []
    for image in pixels[:, 0]:
        rows, cols = torch.nonzero(image, as_tuple=True)
        crops.append(image[rows.min():rows.max() + 1, cols.min():cols.max() + 1].float() / 255)
    return tuple(crops)


def scale_ink(ink: torch.Tensor, extent: int) -> torch.Tensor:
    """``ink`` (h, w) resized (antialiased) so that its longer side is ``extent`` pixels, aspect kept."""
    height, width = ink.shape
    scale = extent / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(ink[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]


def digit_extent(size: str, image_size: int, digit_scale: float = 1.0) -> int:
    """The longer side, in pixels, of a digit of ``size`` on a canvas of ``image_size``."""
    return max(1, round(SIZES[size] * digit_scale * image_size))


def render_scene(scene: Scene, image_size: int, digit_scale: float = 1.0) -> torch.Tensor:
    """uint8 (3, image_size, image_size): each digit tinted by its colour on black, ``digit_scale`` times its
    size's extent; where two would overlap the brighter wins (they do not add up to a colour of neither)."""
    canvas = torch.zeros(3, image_size, image_size)
    inks = digit_ink()
    for facts, source, (x, y) in zip(scene.facts.digits, scene.sources, scene.centres):
        patch = scale_ink(inks[source], digit_extent(facts.size, image_size, digit_scale))
        height, width = patch.shape
        top = min(max(round(y * image_size - height / 2), 0), image_size - height)
        left = min(max(round(x * image_size - width / 2), 0), image_size - width)
        tint = torch.tensor(PALETTE[facts.colour], dtype=torch.float32).view(3, 1, 1) / 255
        region = canvas[:, top:top + height, left:left + width]
        torch.maximum(region, tint * patch.clamp(0, 1), out=region)
    return (canvas * 255).round().to(torch.uint8)


class CaptionedDigitScenes:
    """The data source: ``num_scenes`` scenes of ``dataset_scene(seed, i)``, rendered at ``image_size`` per item;
    label = the first digit's class."""

    def __init__(self, num_scenes: int, image_size: int, seed: int, max_digits: int = 2, digit_scale: float = 1.0):
        self.num_scenes, self.image_size, self.seed = num_scenes, image_size, seed
        self.max_digits, self.digit_scale = max_digits, digit_scale

    def __len__(self) -> int:
        return self.num_scenes

    def split_keys(self) -> list[str]:
        return [str(i) for i in range(self.num_scenes)]

    @functools.lru_cache(maxsize=None)  # a scene is a few small objects; drawing it again costs more
    def scene(self, index: int) -> Scene:
        return dataset_scene(self.seed, index, self.max_digits)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        scene = self.scene(index)
        return render_scene(scene, self.image_size, self.digit_scale), scene.facts.digits[0].digit

    def captions(self, index: int) -> list[str]:
        return scene_captions(self.scene(index).facts)


class CaptionedDigitsDataModule(ImageDataModule):
    """``data=captioned_digits``: RGB scenes of one or two coloured MNIST digits with captions (see the module
    docstring); 10 classes (the first digit), so class-conditional baselines run on the same images. ``channels``
    is always 3; it is a key so that configs can read ``data.channels`` as for every dataset."""

    channels = 3
    num_classes = 10

    def __init__(
        self,
        *,
        num_scenes: int = 20000,
        image_size: int = 64,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        flip: bool = False,
        seed: int = 0,
        channels: int = 3,
        max_digits: int = 2,
        digit_scale: float = 1.0,
    ):
        if channels != 3:
            raise ConfigError(f"data.channels must be 3 for captioned_digits (colours are in the captions), "
                              f"got {channels}")
        if flip:
            raise ConfigError("data.flip must be false for captioned_digits: a mirrored digit is not a digit")
        if max_digits not in MAX_DIGIT_SCALE:
            raise ConfigError(f"data.max_digits must be 1 or 2 for captioned_digits, got {max_digits}")
        if not MIN_DIGIT_SCALE <= digit_scale <= MAX_DIGIT_SCALE[max_digits]:
            raise ConfigError(f"data.digit_scale must be between {MIN_DIGIT_SCALE} and {MAX_DIGIT_SCALE[max_digits]} "
                              f"with data.max_digits={max_digits} (two digits must keep their gap), got {digit_scale}")
        if num_scenes < 2:
            raise ConfigError(f"data.num_scenes must be at least 2, got {num_scenes}")
        if image_size < MIN_IMAGE_SIZE:
            raise ConfigError(f"data.image_size must be at least {MIN_IMAGE_SIZE} for captioned_digits (smaller "
                              f"digits cannot be read), got {image_size}")
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                         val_fraction=val_fraction, flip=flip, seed=seed)
        self.name = "captioned_digits"
        self.num_scenes, self.max_digits, self.digit_scale = num_scenes, max_digits, float(digit_scale)

    def _load_source(self) -> CaptionedDigitScenes:
        return CaptionedDigitScenes(self.num_scenes, self.image_size, self.seed, self.max_digits, self.digit_scale)

    def _source_identity(self) -> dict[str, Any]:
        return {
            "source": "embedded/mnist_5k.csv.gz",
            "sha256": _MNIST_5K_SHA256,
            "num_scenes": self.num_scenes,
            "scene_seed": self.seed,
            "palette": {name: list(rgb) for name, rgb in PALETTE.items()},
            "sizes": dict(SIZES),
            "held_out_pairs": [list(pair) for pair in HELD_OUT_PAIRS],
            "generator": GENERATOR_VERSION,
            # only when not the defaults: caches written before these options keep their keys
            **({"max_digits": self.max_digits} if self.max_digits != 2 else {}),
            **({"digit_scale": self.digit_scale} if self.digit_scale != 1.0 else {}),
        }
