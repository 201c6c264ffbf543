"""Captioned digit scenes: deterministic, captions that state the facts, held-out combinations that never appear."""

import pytest
import torch

from lightning_ldm.data import CaptionedDigitsDataModule
from lightning_ldm.data.captioned_digits import (HELD_OUT_PAIRS, PALETTE, RELATIONS, SIZES, CaptionedDigitScenes,
                                                 DigitFacts, SceneFacts, dataset_scene, describe_scene,
                                                 evaluation_prompts, parse_caption, scene_captions)
from lightning_ldm.errors import ConfigError, DataError


def scenes(count: int, image_size: int = 64, seed: int = 0) -> CaptionedDigitScenes:
    return CaptionedDigitScenes(count, image_size, seed)


def test_same_seed_same_pixels_and_captions_other_seed_differs():
    a, b, c = scenes(40), scenes(40), scenes(40, seed=1)
    for i in range(40):
        assert torch.equal(a.load(i)[0], b.load(i)[0])
        assert a.captions(i) == b.captions(i)
    assert sum(a.captions(i) != c.captions(i) for i in range(40)) > 30
    pixels = [torch.stack([source.load(i)[0] for i in range(40)]) for source in (a, c)]
    assert not torch.equal(*pixels)


def test_a_scene_does_not_depend_on_the_number_of_scenes():
    assert [scenes(10).captions(i) for i in range(10)] == [scenes(500).captions(i) for i in range(10)]


@pytest.mark.parametrize("image_size", [32, 64])
def test_rgb_canvas_of_the_asked_size_with_coloured_digits(image_size):
    source = scenes(30, image_size)
    for i in range(30):
        pixels, label = source.load(i)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, image_size, image_size)
        assert label == source.scene(i).facts.digits[0].digit
        assert pixels[:, 0, 0].tolist() == [0, 0, 0]  # black background
        brightest = pixels.flatten(1)[:, pixels.amax(0).flatten().argmax()].float()
        assert brightest.max() > 200
        # a digit's core is its colour times its ink: the palette colour's direction in RGB
        hue = brightest / brightest.max()
        assert any(torch.dist(hue, torch.tensor(PALETTE[d.colour]) / 255) < 0.02 for d in source.scene(i).facts.digits)


def test_scene_mix_covers_every_fact():
    facts = [dataset_scene(0, i).facts for i in range(600)]
    assert {f.relation for f in facts} == {None, *RELATIONS}
    digits = [d for f in facts for d in f.digits]
    assert {d.digit for d in digits} == set(range(10))
    assert {d.colour for d in digits} == set(PALETTE)
    assert {d.size for d in digits} == set(SIZES)


def test_max_digits_1_draws_single_digit_scenes_and_2_keeps_the_mix():
    single = [dataset_scene(0, i, max_digits=1).facts for i in range(600)]
    assert all(len(f.digits) == 1 and f.relation is None for f in single)
    digits = [f.digits[0] for f in single]
    assert {d.digit for d in digits} == set(range(10)) and {d.colour for d in digits} == set(PALETTE)
    assert {d.size for d in digits} == set(SIZES)
    two = sum(len(dataset_scene(0, i).facts.digits) == 2 for i in range(600))
    assert 0.6 < two / 600 < 0.73  # the default mix: two digits in two scenes of three
    for kind in ("seen", "held_out"):
        assert all(parse_caption(p).relation is None for p in evaluation_prompts(kind, 100, max_digits=1))
    held = set(HELD_OUT_PAIRS)
    assert all((parse_caption(p).digits[0].digit, parse_caption(p).digits[0].colour) in held
               for p in evaluation_prompts("held_out", 100, max_digits=1))
    module = CaptionedDigitsDataModule(max_digits=1, num_scenes=50)
    assert module._source_identity()["max_digits"] == 1
    assert "max_digits" not in CaptionedDigitsDataModule(num_scenes=50)._source_identity()  # earlier caches' key
    assert all(len(module._load_source().scene(i).facts.digits) == 1 for i in range(50))


def test_digit_scale_draws_the_same_scenes_larger():
    plain = CaptionedDigitScenes(40, 32, seed=0, max_digits=1)
    large = CaptionedDigitScenes(40, 32, seed=0, max_digits=1, digit_scale=2.0)
    for i in range(40):
        assert plain.captions(i) == large.captions(i)
        extents = []
        for source in (plain, large):
            rows, cols = torch.nonzero(source.load(i)[0].amax(0) > 0, as_tuple=True)
            extents.append(max(rows.max() - rows.min(), cols.max() - cols.min()) + 1)
        size = plain.scene(i).facts.digits[0].size
        assert extents[0] == round(SIZES[size] * 32) and extents[1] == round(2 * SIZES[size] * 32), (i, extents)
    module = CaptionedDigitsDataModule(max_digits=1, digit_scale=2.0, num_scenes=50)
    assert module._source_identity()["digit_scale"] == 2.0


def test_held_out_pairs_never_appear_in_any_scene():
    held = set(HELD_OUT_PAIRS)
    for i in range(20000):  # the default num_scenes, train and val alike
        assert not {(d.digit, d.colour) for d in dataset_scene(0, i).facts.digits} & held, i


def test_evaluation_prompts_are_deterministic_and_split_by_combination():
    held = set(HELD_OUT_PAIRS)
    seen, held_out = evaluation_prompts("seen", 200), evaluation_prompts("held_out", 200)
    assert seen == evaluation_prompts("seen", 200) and held_out == evaluation_prompts("held_out", 200)
    assert all(not {(d.digit, d.colour) for d in parse_caption(p).digits} & held for p in seen)
    assert all((parse_caption(p).digits[0].digit, parse_caption(p).digits[0].colour) in held for p in held_out)
    with pytest.raises(ConfigError):
        evaluation_prompts("unseen", 3)


def test_caption_and_facts_round_trip():
    for i in range(300):
        scene = dataset_scene(0, i)
        assert parse_caption(describe_scene(scene)) == scene.facts
        # every phrasing states the same facts (converse relations compare equal once canonical)
        assert {parse_caption(c).canonical() for c in scene_captions(scene.facts)} == {scene.facts.canonical()}


def test_parse_caption_accepts_prompts_in_the_same_words():
    assert parse_caption("A large blue 7 to the left of a small green one.") == SceneFacts(
        (DigitFacts(7, "blue", "large"), DigitFacts(1, "green", "small")), "left of")
    assert parse_caption("a red 3 above a blue 7") == SceneFacts(
        (DigitFacts(3, "red", None), DigitFacts(7, "blue", None)), "above")
    assert parse_caption("digit 4") == SceneFacts((DigitFacts(4, None, None),))


@pytest.mark.parametrize("prompt", ["a dog", "a big red 3", "a red 3 near a blue 7", "a red 12", ""])
def test_unknown_phrasing_is_a_one_line_error_naming_the_prompt(prompt):
    with pytest.raises(DataError) as error:
        parse_caption(prompt)
    assert "\n" not in str(error.value) and repr(prompt) in str(error.value)


def test_flip_and_other_bad_settings_are_refused_in_one_line():
    for kwargs, key in [({"flip": True}, "data.flip"), ({"channels": 1}, "data.channels"),
                        ({"num_scenes": 1}, "data.num_scenes"), ({"image_size": 16}, "data.image_size"),
                        ({"max_digits": 3}, "data.max_digits"), ({"max_digits": 0}, "data.max_digits"),
                        ({"digit_scale": 1.5}, "data.digit_scale"), ({"digit_scale": 0.3}, "data.digit_scale"),
                        ({"digit_scale": 2.5, "max_digits": 1}, "data.digit_scale")]:
        with pytest.raises(ConfigError) as error:
            CaptionedDigitsDataModule(**kwargs)
        assert str(error.value).startswith(key) and "\n" not in str(error.value)


@pytest.mark.parametrize("image_size", [32, 64])
def test_datamodule_batches_images_and_captions(image_size):
    data = CaptionedDigitsDataModule(num_scenes=200, image_size=image_size, batch_size=8, val_fraction=0.1)
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (8, 3, image_size, image_size) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["image"].min() == -1
    assert len(batch["caption"]) == 8 and all(isinstance(c, str) for c in batch["caption"])
    for caption in batch["caption"]:
        parse_caption(caption)
    val = next(iter(data.val_dataloader()))
    source = data.val_dataset.source
    assert val["caption"] == [source.captions(i)[0] for i in data.val_dataset.indices[:len(val["caption"])]]
    assert data.num_classes == 10 and data.channels == 3 and data.captioned


def test_training_captions_are_every_caption_of_the_training_scenes():
    data = CaptionedDigitsDataModule(num_scenes=100, val_fraction=0.1)
    captions = list(data.training_captions())
    source = data.train_dataset.source
    assert captions == [c for i in data.train_dataset.indices for c in source.captions(i)]
    assert len(data.train_dataset) == 90 and len(captions) > 200


def test_identity_names_what_the_scenes_depend_on():
    identity = CaptionedDigitsDataModule(num_scenes=100).identity()
    assert identity["name"] == "captioned_digits" and identity["num_scenes"] == 100
    assert identity["held_out_pairs"] == [list(p) for p in HELD_OUT_PAIRS] and identity["palette"]["red"] == [255, 0, 0]
    assert identity != CaptionedDigitsDataModule(num_scenes=101).identity()


def test_config_composes_and_instantiates(compose):
    from hydra.utils import instantiate

    from lightning_ldm.config.validate import validate_config

    cfg = compose("stage=autoencoder", "data=captioned_digits", "data.num_scenes=50", "data.image_size=32")
    validate_config(cfg)
    data = instantiate(cfg.data)
    assert isinstance(data, CaptionedDigitsDataModule) and data.image_size == 32 and data.num_scenes == 50
