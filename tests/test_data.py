"""Data layer: embedded digits, image folders and zips, torchvision sets, the shared split and loaders."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import SequentialSampler
from torchdata.stateful_dataloader.sampler import RandomSampler  # the stateful loader shuffles with its own

from lightning_ldm.data import (
    DigitsDataModule,
    ImageFolderDataModule,
    TorchvisionDataModule,
    original_error,
    split_indices,
)
from lightning_ldm.errors import ConfigError, DataError


def items(view):
    return [view[i] for i in range(len(view))]


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule()
    dm.setup()
    return dm


def test_the_embedded_digits_file_is_the_one_recorded_beside_it():
    import hashlib

    from lightning_ldm.data.digits import MNIST_5K

    digest = hashlib.sha256(MNIST_5K.read_bytes()).hexdigest()
    assert digest in (MNIST_5K.parent / "README.md").read_text()
    assert DigitsDataModule(batch_size=4).identity()["sha256"] == digest  # cache keys follow the file


def test_digits_are_5000_real_padded_mnist_digits(digits):
    assert (digits.name, digits.channels, digits.image_size, digits.num_classes) == ("digits", 1, 32, 10)
    assert len(digits.train_dataset) + len(digits.val_dataset) == 5000
    images = torch.stack([item["image"] for item in items(digits.train_dataset) + items(digits.val_dataset)])
    labels = torch.tensor([item["label"] for item in items(digits.train_dataset) + items(digits.val_dataset)])
    assert images.shape == (5000, 1, 32, 32) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() == 1
    assert torch.bincount(labels).tolist() == [500] * 10
    # 2 px of background around every digit, and a stroke of real ink inside each.
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (images[:, 0, border] == -1).all()
    ink = (images > 0).flatten(1).sum(1)
    assert ink.min() >= 20 and 0.08 < (images > 0).float().mean() < 0.3
    # Labels belong to the pixels: a nearest-class-mean classifier fitted on train reads val digits well
    # (a shifted label column or noise would give ~10%).
    train = torch.stack([item["image"] for item in items(digits.train_dataset)]).flatten(1)
    train_labels = torch.tensor([item["label"] for item in items(digits.train_dataset)])
    means = torch.stack([train[train_labels == c].mean(0) for c in range(10)])
    val = torch.stack([item["image"] for item in items(digits.val_dataset)]).flatten(1)
    val_labels = torch.tensor([item["label"] for item in items(digits.val_dataset)])
    accuracy = (torch.cdist(val, means).argmin(1) == val_labels).float().mean()
    assert accuracy > 0.7


def test_digits_batch_and_resize():
    dm = DigitsDataModule(image_size=16, batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 1, 16, 16) and batch["label"].dtype == torch.long
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    # The padding stays background after resizing (up to the LANCZOS kernel's reach of the first strokes).
    assert batch["image"][:, :, 0, :].mean() < -0.95


def test_split_is_deterministic_disjoint_and_sized(digits):
    other = DigitsDataModule(num_workers=3)
    other.setup()
    assert other.val_dataset.indices == digits.val_dataset.indices
    assert not set(digits.train_dataset.indices) & set(digits.val_dataset.indices)
    assert (len(digits.train_dataset), len(digits.val_dataset)) == (4500, 500)
    reseeded = DigitsDataModule(seed=1)
    reseeded.setup()
    assert reseeded.val_dataset.indices != digits.val_dataset.indices


def test_split_ignores_listing_order_and_is_stable_when_files_are_added():
    keys = [f"class{i % 3}/{i:04d}.png" for i in range(1000)]
    _, val = split_indices(keys, 0.1, seed=0)
    val_keys = {keys[i] for i in val}
    assert len(val_keys) == 100
    shuffled = list(reversed(keys))
    assert {shuffled[i] for i in split_indices(shuffled, 0.1, seed=0)[1]} == val_keys
    grown = keys + [f"new/{i}.png" for i in range(20)]
    grown_val = {grown[i] for i in split_indices(grown, 0.1, seed=0)[1]}
    assert len(val_keys - grown_val) <= 4  # only items at the boundary move, not a reshuffle
    assert split_indices(["a", "b", "c"], 0.01, seed=0)[1] != []  # a requested val set is never empty


def test_setup_is_idempotent_and_loaders_follow_the_rules(digits):
    train_view = digits.train_dataset
    digits.setup("fit")
    assert digits.train_dataset is train_view
    train, val = digits.train_dataloader(), digits.val_dataloader()
    assert isinstance(train.sampler, RandomSampler) and train.drop_last
    assert isinstance(val.sampler, SequentialSampler) and not val.drop_last
    assert train.pin_memory == torch.cuda.is_available()
    assert DigitsDataModule(num_workers=2).train_dataloader().persistent_workers
    with pytest.raises(DataError, match="data.batch_size=5000"):
        DigitsDataModule(batch_size=5000).train_dataloader()


def test_identity_is_json_and_tracks_preprocessing(digits):
    identity = digits.identity()
    json.dumps(identity)
    assert identity["image_size"] == 32 and identity["flip"] is False
    assert DigitsDataModule(image_size=64).identity() != identity
    assert DigitsDataModule(seed=3).identity() != identity


# ---------------------------------------------------------------- folders and zips


def _save(path, image, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, **kwargs)


def _random(mode, size, seed):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.fixture
def tree(tmp_path):
    """Two classes; greyscale and RGB; png, jpg, webp, bmp in mixed case; nested folder; files to ignore."""
    root = tmp_path / "pets"
    _save(root / "cats/a.png", _random("RGB", (48, 32), 0))
    _save(root / "cats/b.jpg", _random("L", (40, 40), 1))
    _save(root / "cats/nested/c.webp", _random("RGB", (20, 24), 2))
    _save(root / "cats/D.PNG", _random("L", (16, 16), 3))
    _save(root / "dogs/e.JPEG", _random("RGB", (64, 48), 4))
    _save(root / "dogs/f.bmp", _random("RGB", (16, 16), 5))
    _save(root / "dogs/g.png", _random("RGB", (17, 30), 6).convert("P"))
    _save(root / "dogs/h.webp", _random("L", (33, 33), 7), lossless=True)
    (root / "dogs/notes.txt").write_text("not an image")
    _save(root / "dogs/.hidden.png", _random("RGB", (8, 8), 8))
    return root


def _zip(folder, archive, wrapper="wrap/"):
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(wrapper, b"")  # an explicit directory entry, as zip tools write them
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, wrapper + path.relative_to(folder).as_posix())
    return archive


def test_folder_labels_shapes_and_conversion(tree):
    dm = ImageFolderDataModule(root=str(tree), image_size=16, val_fraction=0.25, flip=False, num_workers=0)
    assert (dm.name, dm.num_classes, dm.classes) == ("pets", 2, ["cats", "dogs"])
    dm.setup()
    all_items = items(dm.train_dataset) + items(dm.val_dataset)
    assert len(all_items) == 8 and len(dm.val_dataset) == 2
    for item in all_items:
        assert item["image"].shape == (3, 16, 16) and -1 <= item["image"].min() and item["image"].max() <= 1
    files = dm.train_dataset.source
    assert dict(zip(files.keys, files.labels)) == {
        "cats/D.PNG": 0, "cats/a.png": 0, "cats/b.jpg": 0, "cats/nested/c.webp": 0,
        "dogs/e.JPEG": 1, "dogs/f.bmp": 1, "dogs/g.png": 1, "dogs/h.webp": 1,
    }  # fmt: skip
    # An image already at image_size is untouched (lossless formats): exactly the saved pixels.
    bmp = files.load(files.keys.index("dogs/f.bmp"))[0]
    assert torch.equal(bmp, torch.from_numpy(np.array(_random("RGB", (16, 16), 5))).permute(2, 0, 1))
    # Greyscale input to 3 channels replicates the grey value.
    grey = files.load(files.keys.index("cats/D.PNG"))[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], torch.from_numpy(np.array(_random("L", (16, 16), 3))))
    grey_dm = ImageFolderDataModule(root=str(tree), image_size=16, channels=1)
    grey_dm.setup()
    assert grey_dm.train_dataset[0]["image"].shape == (1, 16, 16)


def test_centre_crop_then_resize(tmp_path):
    # 48x32 image: 8 red columns, 32 green, 8 blue. The centred square is exactly the green part.
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:, :8, 0] = 255
    pixels[:, 8:40, 1] = 255
    pixels[:, 40:, 2] = 255
    _save(tmp_path / "img/x.png", Image.fromarray(pixels))
    same = ImageFolderDataModule(root=str(tmp_path / "img"), image_size=32, val_fraction=0.0, flip=False)
    same.setup()
    assert same.num_classes is None and same.train_dataset[0]["label"] == 0
    expected = torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 32, 32)
    assert torch.equal(same.train_dataset[0]["image"], expected)
    smaller = ImageFolderDataModule(root=str(tmp_path / "img"), image_size=8, val_fraction=0.0, flip=False)
    smaller.setup()
    assert torch.allclose(smaller.train_dataset[0]["image"], expected[:, :8, :8])


def test_zip_with_wrapper_folder_gives_identical_tensors(tree, tmp_path):
    archive = _zip(tree, tmp_path / "pets.zip")
    folder = ImageFolderDataModule(root=str(tree), image_size=16, val_fraction=0.25, flip=False)
    zipped = ImageFolderDataModule(root=str(archive), image_size=16, val_fraction=0.25, flip=False)
    folder.setup()
    zipped.setup()
    assert zipped.name == "pets" and zipped.classes == ["cats", "dogs"]
    for a, b in [(folder.train_dataset, zipped.train_dataset), (folder.val_dataset, zipped.val_dataset)]:
        assert len(a) == len(b)
        for x, y in zip(items(a), items(b)):
            assert x["label"] == y["label"] and torch.equal(x["image"], y["image"])
    assert folder.identity()["listing_sha1"] == zipped.identity()["listing_sha1"]
    assert zipped.identity()["source_kind"] == "zip"
    json.dumps(zipped.identity())


def test_flip_only_in_train(tmp_path):
    _save(tmp_path / "img/a/x.png", _random("RGB", (8, 8), 0))
    dm = ImageFolderDataModule(root=str(tmp_path / "img"), image_size=8, val_fraction=0.0, flip=True)
    dm.setup()
    original = dm.train_dataset.source.load(0)[0].float() / 127.5 - 1
    torch.manual_seed(0)
    draws = [dm.train_dataset[0]["image"] for _ in range(40)]
    assert all(torch.equal(d, original) or torch.equal(d, original.flip(-1)) for d in draws)
    assert 5 < sum(torch.equal(d, original.flip(-1)) for d in draws) < 35
    # The val view of the same source never flips.
    from lightning_ldm.data.base import SplitView

    val = SplitView(dm.train_dataset.source, [0], flip=False)
    assert all(torch.equal(val[0]["image"], original) for _ in range(20))
    assert dm.identity()["flip"] is True


def test_zip_loads_in_two_workers(tree, tmp_path):
    archive = _zip(tree, tmp_path / "pets.zip")
    dm = ImageFolderDataModule(
        root=str(archive), image_size=16, val_fraction=0.5, flip=False, batch_size=2, num_workers=2
    )
    dm.setup()
    dm.train_dataset.source.load(0)  # the parent holds an open handle before the workers fork
    batches = list(dm.val_dataloader())
    assert dm.val_dataloader().persistent_workers
    loaded = torch.cat([b["image"] for b in batches])
    assert torch.equal(loaded, torch.stack([item["image"] for item in items(dm.val_dataset)]))
    assert torch.cat([b["label"] for b in batches]).dtype == torch.long


def test_missing_and_empty_roots(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        ImageFolderDataModule(root=str(missing)).setup()
    (tmp_path / "empty/sub").mkdir(parents=True)
    (tmp_path / "empty/sub/readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images found under .*empty.*\.png.*\.webp"):
        ImageFolderDataModule(root=str(tmp_path / "empty")).setup()


def test_images_next_to_class_folders_are_rejected(tree):
    _save(tree / "stray.png", _random("RGB", (8, 8), 0))
    with pytest.raises(DataError, match="stray.png.*use_labels=false"):
        ImageFolderDataModule(root=str(tree)).setup()
    unlabelled = ImageFolderDataModule(root=str(tree), use_labels=False)
    assert unlabelled.num_classes is None


def test_corrupt_image_is_named_or_skipped(tree, tmp_path, capsys):
    (tree / "cats/x.png").write_bytes(b"this is not a png at all")
    with pytest.raises(DataError, match=r"corrupt image .*cats/x\.png.*on_corrupt=skip") as caught:
        ImageFolderDataModule(root=str(tree), verify=True).setup()
    assert "\n" not in str(caught.value)
    archive = _zip(tree, tmp_path / "archive.zip")
    with pytest.raises(DataError, match=r"archive\.zip:wrap/cats/x\.png"):
        ImageFolderDataModule(root=str(archive), verify=True).setup()
    dm = ImageFolderDataModule(root=str(archive), on_corrupt="skip", val_fraction=0.25, verify=True)
    dm.setup()
    assert "skipped 1 corrupt images (first: " in capsys.readouterr().out
    assert len(dm.train_dataset) + len(dm.val_dataset) == 8


def test_without_verification_a_corrupt_image_is_met_when_read(tree):
    (tree / "cats/x.png").write_bytes(b"this is not a png at all")
    dm = ImageFolderDataModule(root=str(tree), val_fraction=0.0, flip=False)  # verify is off by default
    dm.setup()
    broken = dm.train_dataset.source.keys.index("cats/x.png")
    with pytest.raises(DataError, match=r"cannot decode image .*cats/x\.png"):
        dm.train_dataset[broken]


def test_a_folder_is_listed_once_and_listed_again_when_it_changes(tree, monkeypatch):
    from lightning_ldm.data import folder_index

    first = ImageFolderDataModule(root=str(tree))
    first.setup()
    assert folder_index.index_path(str(tree)).is_file()
    walks = []
    walk = folder_index._walk
    monkeypatch.setattr(folder_index, "_walk", lambda root: walks.append(root) or walk(root))
    again = ImageFolderDataModule(root=str(tree))
    again.setup()
    assert walks == [] and again.identity() == first.identity()  # from the index: no walk, the same fingerprint
    _save(tree / "dogs/new.png", _random("RGB", (8, 8), 5))
    changed = ImageFolderDataModule(root=str(tree))
    changed.setup()
    assert walks == [str(tree)] and changed.identity()["num_images"] == first.identity()["num_images"] + 1
    assert changed.identity()["listing_sha1"] != first.identity()["listing_sha1"]


def _truncated_jpeg(path):
    buffer = io.BytesIO()
    _random("RGB", (64, 64), 9).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # header intact: passes the check


def test_lazy_decode_failure_is_named_in_workers_and_skipped(tree, tmp_path):
    _truncated_jpeg(tree / "cats/broken.jpg")
    archive = _zip(tree, tmp_path / "archive.zip")
    dm = ImageFolderDataModule(root=str(archive), image_size=16, val_fraction=0.0, batch_size=9, num_workers=2)
    dm.setup()  # the header check passes; decoding fails later, inside a worker
    with pytest.raises(DataError) as caught:
        next(iter(dm.train_dataloader()))
    message = str(caught.value)
    assert message.startswith("cannot decode image ") and "archive.zip:wrap/cats/broken.jpg" in message
    assert "\n" not in message and "Traceback" not in message
    skip = ImageFolderDataModule(root=str(archive), image_size=16, val_fraction=0.0, on_corrupt="skip", flip=False)
    skip.setup()
    broken = skip.train_dataset.source.keys.index("cats/broken.jpg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        replacement = skip.train_dataset[broken]
    assert torch.equal(replacement["image"], skip.train_dataset[broken + 1]["image"])


def test_original_error_unwraps_torch_worker_messages():
    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nlightning_ldm.errors.DataError: cannot decode image a.zip:b.png (boom)\n'
    )
    assert str(original_error(wrapped)) == "cannot decode image a.zip:b.png (boom)"
    plain = DataError("plain")
    assert original_error(plain) is plain


# ---------------------------------------------------------------- torchvision sets


def test_torchvision_missing_root_asks_for_download(tmp_path):
    for root in (tmp_path / "absent", tmp_path):
        with pytest.raises(DataError, match=rf"{tmp_path}.*set data\.download=true to fetch it"):
            TorchvisionDataModule(name="cifar10", root=str(root)).setup()


def _idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_from_local_files(tmp_path):
    raw = tmp_path / "MNIST/raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = np.arange(20) % 10
    for split in ("train", "t10k"):
        _idx(raw / f"{split}-images-idx3-ubyte", images)
        _idx(raw / f"{split}-labels-idx1-ubyte", labels)
    dm = TorchvisionDataModule(name="mnist", root=str(tmp_path), val_fraction=0.25)
    dm.setup()
    assert (dm.channels, dm.num_classes, dm.flip) == (1, 10, False)
    view = dm.train_dataset
    item = view[0]
    index = view.indices[0]
    assert item["image"].shape == (1, 32, 32) and item["label"] == labels[index]
    expected = torch.from_numpy(images[index]).float() / 127.5 - 1
    assert torch.equal(item["image"][0, 2:30, 2:30], expected) and (item["image"][0, :2] == -1).all()
    assert len(dm.val_dataset) == 5


@pytest.mark.parametrize("cls", [DigitsDataModule, ImageFolderDataModule, TorchvisionDataModule])
def test_constructors_are_a_config_schema(cls):
    import inspect

    for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, parameter
        assert parameter.annotation is not inspect.Parameter.empty, parameter
        assert parameter.default is not inspect.Parameter.empty or parameter.name in ("root", "name"), parameter


# ---------------------------------------------------------------- captions (folder / zip)


def _captioned(root):
    for name, seed in (("a", 0), ("b", 1), ("c", 2), ("d", 3)):
        _save(root / f"{name}.png", _random("RGB", (8, 8), seed))
    return root


def test_folder_captions_from_metadata_jsonl_and_sidecars_and_the_same_from_a_zip(tmp_path):
    root = _captioned(tmp_path / "shapes")
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a red square left of a circle"}) + "\n\n"
        + json.dumps({"file_name": "./b.png", "caption": ["two dots", "a pair of dots"]}) + "\n")
    (root / "c.txt").write_text("a cat on the right\n\nsecond phrasing\n")
    (root / "d.txt").write_text("  a dog  ")
    (root / "a.txt").write_text("ignored: metadata.jsonl names a.png")
    dm = ImageFolderDataModule(root=str(root), image_size=8, val_fraction=0.0, flip=False, num_workers=0)
    dm.setup()
    source = dm.train_dataset.source
    assert [source.captions(i) for i in range(4)] == [
        ["a red square left of a circle"], ["two dots", "a pair of dots"], ["a cat on the right", "second phrasing"],
        ["a dog"]]
    assert dm.captioned and sorted(dm.training_captions())[0] == "a cat on the right"
    assert dm.train_dataset[0]["caption"] == "a red square left of a circle"  # flip off: never mirrored
    torch.manual_seed(0)  # several captions are drawn in training whether or not images flip; val takes the first
    assert {dm.train_dataset[2]["caption"] for _ in range(40)} == {"a cat on the right", "second phrasing"}
    zipped = ImageFolderDataModule(root=str(_zip(root, tmp_path / "shapes.zip")), image_size=8, val_fraction=0.0,
                                   flip=False, num_workers=0)
    zipped.setup()
    assert [zipped.train_dataset.source.captions(i) for i in range(4)] == [source.captions(i) for i in range(4)]
    assert zipped.identity()["captions_sha1"] == dm.identity()["captions_sha1"] is not None

    # A flipped image gets its caption mirrored; the other phrasing is drawn too.
    flipping = ImageFolderDataModule(root=str(root), image_size=8, val_fraction=0.0, flip=True, num_workers=0)
    flipping.setup()
    torch.manual_seed(0)
    drawn = {flipping.train_dataset[2]["caption"] for _ in range(60)}
    assert drawn == {"a cat on the right", "a cat on the left", "second phrasing"}


def test_uncaptioned_folders_have_no_captions_and_partial_or_broken_captions_stop_in_one_line(tmp_path):
    root = _captioned(tmp_path / "plain")
    dm = ImageFolderDataModule(root=str(root), image_size=8, val_fraction=0.0, num_workers=0)
    dm.setup()
    assert not dm.captioned and "caption" not in dm.train_dataset[0] and dm.identity()["captions_sha1"] is None
    with pytest.raises(DataError, match="has no captions, but text conditioning needs them"):
        next(dm.training_captions())

    (root / "a.txt").write_text("only one")
    with pytest.raises(DataError, match=r"3 of 4 images have no caption \(first: .*b\.png\)"):
        ImageFolderDataModule(root=str(root), image_size=8, num_workers=0).setup()
    (root / "a.txt").unlink()
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{not json\n')
    with pytest.raises(DataError, match=r"metadata.jsonl line 2 is not JSON"):
        ImageFolderDataModule(root=str(root), image_size=8, num_workers=0).setup()
    (root / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(DataError, match=r'line 1 needs "file_name" and "text"'):
        ImageFolderDataModule(root=str(root), image_size=8, num_workers=0).setup()


def test_caption_templates_name_each_images_class_and_refuse_what_they_cannot_name(tmp_path):
    root = tmp_path / "classes"
    for name, seed in (("fire_truck/a.png", 0), ("fire_truck/b.png", 1), ("cat/c.png", 2)):
        _save(root / name, _random("RGB", (8, 8), seed))
    templates = ["a photo of a {}", "a {}, small"]
    dm = ImageFolderDataModule(root=str(root), image_size=8, val_fraction=0.0, flip=False, num_workers=0,
                               caption_templates=templates)
    dm.setup()
    source = dm.train_dataset.source
    by_class = {dm.classes[source.labels[i]]: source.captions(i) for i in range(3)}
    assert by_class == {"cat": ["a photo of a cat", "a cat, small"],
                        "fire_truck": ["a photo of a fire truck", "a fire truck, small"]}
    plain = ImageFolderDataModule(root=str(root), image_size=8, val_fraction=0.0, flip=False, num_workers=0)
    assert dm.captioned and not plain.captioned
    assert dm.identity()["captions_sha1"] != plain.identity()["captions_sha1"]  # caches never mix the two

    with pytest.raises(ConfigError, match=r"strings with \{\} where the class name goes"):
        ImageFolderDataModule(root=str(root), caption_templates=["a photo"])
    for name in ("fire_truck/a", "fire_truck/b", "cat/c"):
        (root / f"{name}.txt").write_text("a caption of its own\n")
    with pytest.raises(DataError, match="has captions of its own and data.caption_templates is set"):
        ImageFolderDataModule(root=str(root), image_size=8, caption_templates=templates).setup()
    flat = _captioned(tmp_path / "flat")
    with pytest.raises(DataError, match="needs class folders to name"):
        ImageFolderDataModule(root=str(flat), image_size=8, caption_templates=templates).setup()
