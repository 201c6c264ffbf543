"""Captions in the latent cache: token ids keyed by the tokenizer, a frozen encoder's outputs keyed by its files;
training reads them instead of text, with the same conditions and the same caption drop."""

import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ldm.data.captioned_digits import CaptionedDigitsDataModule
from lightning_ldm.data.folder import ImageFolderDataModule
from lightning_ldm.data.transforms import mirror_caption
from lightning_ldm.latent.cache import CachedLatents, LatentDataset

from test_stage2 import assert_one_line, make_trainer
from test_text_encoders import clip_folders  # noqa: F401  (the fixture)
from test_text_to_image import text_module


class BatchSpy(L.Callback):
    def __init__(self) -> None:
        self.captions = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.captions.append(batch["caption"])


def data(**kwargs) -> CaptionedDigitsDataModule:
    return CaptionedDigitsDataModule(**{"num_scenes": 24, "image_size": 32, "batch_size": 4, "num_workers": 0,
                                        "val_fraction": 0.1, **kwargs})


def flipping_captioned_folder(root) -> ImageFolderDataModule:
    """Twelve RGB images with two captions each, naming a side, in a folder that flips."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        side = "left" if i % 2 else "right"
        rows.append(json.dumps({"file_name": f"{i}.png", "text": [f"a dot on the {side}", f"{i} dots, {side}"]}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return ImageFolderDataModule(root=str(root), image_size=32, batch_size=4, num_workers=0, val_fraction=0.0,
                                 flip=True)


def test_token_ids_are_cached_per_tokenizer_and_train_as_the_text_would(tmp_path):
    images = flipping_captioned_folder(tmp_path / "images")
    module, spy = text_module(cache_latents=True), BatchSpy()
    cached = CachedLatents(images, str(tmp_path / "cache"))
    make_trainer(tmp_path / "run", 2, callbacks=[spy]).fit(module, datamodule=cached)
    assert len(list((tmp_path / "cache").glob("captions-*.pt"))) == 1
    batch = spy.captions[0]
    assert set(batch) == {"ids", "mask"} and batch["ids"].shape == (4, 12) and batch["mask"].dtype == torch.bool

    # Every row of the cache is the tokenizer's encoding of one of the item's captions, or of its mirror.
    text = module.conditioner.embedders["caption"]
    dataset: LatentDataset = cached.latents()
    view = images.train_dataset
    ids, mask = dataset.captions["rows"]["ids"], dataset.captions["rows"]["mask"]
    for i in range(3):
        for table, mirrored in (("plain", False), ("mirrored", True)):
            captions = [mirror_caption(c) if mirrored else c for c in view.source.captions(view.indices[i])]
            expected_ids, expected_mask = text.tokenizer.encode(captions)
            rows = dataset.captions[table][i]
            assert torch.equal(ids[rows].long(), expected_ids) and torch.equal(mask[rows], expected_mask)

    # The embedding of cached ids is the embedding of the text, with and without the caption drop.
    captions = view.source.captions(view.indices[0])[:1] * 4
    stored = text.encode_for_cache(captions, torch.device("cpu"))
    dropped = torch.tensor([True, False, True, False])
    with torch.no_grad():
        torch.testing.assert_close(text(stored, torch.device("cpu"), dropped),
                                   text(captions, torch.device("cpu"), dropped), rtol=0, atol=0)
        torch.testing.assert_close(text(stored, torch.device("cpu"), dropped)[0],
                                   text([""], torch.device("cpu"))[0], rtol=0, atol=0)

    # Another tokenizer is another key: its ids are never read for this one's.
    assert text.cache_identity() == {"kind": "token_ids", "tokenizer": text.tokenizer.fingerprint}


def test_a_frozen_encoders_outputs_are_cached_and_read_in_its_place(tmp_path, clip_folders):  # noqa: F811
    _, flat, _ = clip_folders
    images = data()
    clip = {"caption": {"kind": "clip_text", "path": str(flat), "length": 8, "drop_rate": 0.5}}
    module, spy = text_module(conditioning=clip, cache_latents=True), BatchSpy()
    cached = CachedLatents(images, str(tmp_path / "cache"))
    before = [p.clone() for p in module.unet.parameters()]
    make_trainer(tmp_path / "run", 2, callbacks=[spy]).fit(module, datamodule=cached)
    assert set(spy.captions[0]) == {"context"} and spy.captions[0]["context"].shape == (4, 8, 32)
    assert spy.captions[0]["context"].dtype == torch.float16
    assert any(not torch.equal(a, b) for a, b in zip(before, module.unet.parameters()))

    embedder = module.conditioner.embedders["caption"]
    tower = embedder._tower.model
    dataset = cached.latents()
    view = images.train_dataset
    rows = dataset.captions["plain"][0]
    expected = tower.encode(view.source.captions(view.indices[0]), "cpu")
    torch.testing.assert_close(dataset.captions["rows"]["context"][rows].float(), expected, rtol=0, atol=2e-3)
    stored = {"context": dataset.captions["rows"]["context"][rows[:1]].expand(2, -1, -1)}
    out = embedder(stored, torch.device("cpu"), torch.tensor([True, False]))
    torch.testing.assert_close(out[0], tower.encode([""], "cpu")[0])  # the drop gives the empty caption's output
    torch.testing.assert_close(out[1], expected[0], rtol=0, atol=2e-3)
    assert not any(key.startswith("conditioner") for key in module.state_dict())  # the tower stays at its path


def test_the_cached_module_refuses_data_that_is_not_wrapped(tmp_path):
    module = text_module(cache_latents=True)
    with pytest.raises(Exception) as error:
        make_trainer(tmp_path / "run", 1).fit(module, datamodule=data())
    assert_one_line(error, "module.cache_latents=true", "module.wrap_data(data)")
