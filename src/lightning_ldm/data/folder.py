"""Any folder or zip of images (the ImageFolder / StyleGAN-EDM zip layout), first-level subfolders as classes.

Layout rules:
- images are found recursively; extensions .png .jpg .jpeg .webp .bmp in any case; names starting with "."
  and ``__MACOSX`` folders are ignored;
- leading folders that wrap *every* image (``cifar10-train/airplane/...`` inside a zip) are stripped first;
- then each first-level subfolder is a class, labels are indices of the sorted folder names (code-point order,
  as torchvision's ImageFolder: CIFAR-10's folders give its standard label order);
- images directly at the top with no subfolders: an unlabelled set, label 0, ``num_classes`` None; images both
  at the top and in subfolders are ambiguous and rejected; ``use_labels=False`` ignores folders altogether
  (e.g. FFHQ's 00000/, 01000/ chunks).

Captions (for text-to-image), in either of the two layouts users already have:
- ``metadata.jsonl`` (Hugging Face's imagefolder, diffusers' text-to-image examples): one JSON object per line
  with ``file_name`` (relative to the metadata file's folder) and ``text`` or ``caption``, a string or a list of
  alternatives;
- a ``.txt`` beside each image with the same stem (``cat.png`` + ``cat.txt``), one caption per non-empty line.
Either every image has a caption or none does; a set with some missing stops with one line naming the first.
"""

import hashlib
import io
import json
import os
import posixpath
import zipfile
from typing import Any, Literal, Optional, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from lightning_ldm.data.base import ImageDataModule
from lightning_ldm.data.folder_index import list_files
from lightning_ldm.data.transforms import PIL_MODES, center_crop_resize, pil_to_uint8
from lightning_ldm.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
_WHOLE_READ_BYTES = 1 << 20


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _hidden(path: str) -> bool:
    """A name starting with "." or a ``__MACOSX`` folder anywhere in the path."""
    path = "/" + path.replace("\\", "/")
    return "/." in path or "/__MACOSX/" in path + "/"


# The suffix first: a million files are listed, and most are images (or most are not captions).
def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(path)


class DirectoryStore:
    """Image files under a directory, read by path relative to it (symlinked folders are followed). The files are
    listed once per store, from the folder's index when it is still valid (``folder_index.py``)."""

    def __init__(self, root: str):
        self.root = root
        self._listing: Optional[list[tuple[str, int, float]]] = None

    def __getstate__(self) -> dict:  # DataLoader workers open files by name; they need no listing
        return {**self.__dict__, "_listing": None}

    def entries(self, accept=None) -> list[tuple[str, int, float]]:
        """(member, size in bytes, mtime) of every image file (or of every file ``accept`` takes)."""
        if self._listing is None:
            self._listing = list_files(self.root)
        accept = accept or _is_image
        return [entry for entry in self._listing if accept(entry[0])]

    def open(self, member: str):
        return open(os.path.join(self.root, member), "rb")

    def describe(self, member: str) -> str:
        return os.path.join(self.root, member)


class ZipStore:
    """Members of a zip archive. Each process opens its own ZipFile on first use: a handle inherited across
    fork shares the file offset with the parent, so DataLoader workers must never use the parent's."""

    def __init__(self, path: str):
        self.path = path
        self._handle: Optional[zipfile.ZipFile] = None
        self._pid: Optional[int] = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_pid": None}

    def _zip(self) -> zipfile.ZipFile:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._handle

    def entries(self, accept=None) -> list[tuple[str, int, float]]:
        """(member, uncompressed size, archive mtime) of every image file (or of every file ``accept`` takes)."""
        accept = accept or _is_image
        mtime = os.stat(self.path).st_mtime
        return [
            (info.filename, info.file_size, mtime)
            for info in self._zip().infolist()
            if not info.is_dir() and accept(info.filename)
        ]

    def open(self, member: str):
        archive = self._zip()
        if archive.getinfo(member).file_size <= _WHOLE_READ_BYTES:
            return io.BytesIO(archive.read(member))  # one read beats PIL's many small reads of a zip stream
        return archive.open(member)

    def describe(self, member: str) -> str:
        return f"{self.path}:{member}"


def open_store(path: str, what: str):
    """A folder or a zip of images named by the config key ``what`` (for its error line)."""
    root = Path(path).expanduser()
    if root.is_dir():
        return DirectoryStore(str(root))
    try:
        store = ZipStore(str(root))
        store._zip()
        return store
    except (zipfile.BadZipFile, OSError):
        raise ConfigError(f"{what}={path} is neither a folder nor a .zip of images") from None


def read_pixels(store, member: str, mode: str) -> np.ndarray:
    """One image of a store in PIL ``mode``, as an array; one line naming it when it cannot be decoded."""
    try:
        with store.open(member) as file, Image.open(file) as image:
            return np.asarray(to_mode(image, mode))
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError and more
        raise DataError(f"cannot decode {store.describe(member)} ({type(error).__name__})") from None


def _is_caption_file(path: str) -> bool:
    return (path.endswith("metadata.jsonl") and posixpath.basename(path.replace("\\", "/")) == "metadata.jsonl"
            or path.lower().endswith(".txt")) and not _hidden(path)


def _read_text(store, member: str) -> str:
    with store.open(member) as file:
        try:
            return file.read().decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"caption file {store.describe(member)} is not UTF-8 text ({error.reason} at byte "
                            f"{error.start})") from None


def read_captions(store, members: list[str]) -> Optional[list[list[str]]]:
    """Each image's captions from metadata.jsonl files or .txt sidecars (module docstring); None if there are none."""
    files = [member for member, _, _ in store.entries(_is_caption_file)]
    found: dict[str, list[str]] = {}
    for metadata in (f for f in files if f.split("/")[-1] == "metadata.jsonl"):
        folder = posixpath.dirname(metadata)
        for number, line in enumerate(_read_text(store, metadata).splitlines(), 1):
            if not line.strip():
                continue
            where = f"{store.describe(metadata)} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where} is not JSON ({error.msg})") from None
            text = row.get("text", row.get("caption")) if isinstance(row, dict) else None
            if not isinstance(row, dict) or "file_name" not in row or text is None:
                raise DataError(f"{where} needs \"file_name\" and \"text\" (or \"caption\"), got {line[:80]!r}")
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise DataError(f"{where}: the caption must be a non-empty string or list of strings")
            found[posixpath.normpath(posixpath.join(folder, row["file_name"]))] = [t.strip() for t in texts]
    sidecars = {posixpath.splitext(f)[0]: f for f in files if f.lower().endswith(".txt")}
    for member in members:
        sidecar = sidecars.get(posixpath.splitext(member)[0])
        if member not in found and sidecar is not None:
            lines = [line.strip() for line in _read_text(store, sidecar).splitlines() if line.strip()]
            if lines:
                found[member] = lines
    if not found:
        return None
    missing = [member for member in members if member not in found]
    if missing:
        raise DataError(f"{len(missing)} of {len(members)} images have no caption (first: "
                        f"{store.describe(missing[0])}); give every image one (metadata.jsonl or a .txt beside it) "
                        "or remove the captions")
    return [found[member] for member in members]


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode.startswith("I;16"):  # 16-bit greyscale: keep the top 8 bits instead of clipping at 255
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    elif image.mode == "P":  # palette with transparency must pass through RGBA (PIL warns otherwise)
        image = image.convert("RGBA")
    return image if image.mode == mode else image.convert(mode)


class ImageFiles:
    """Image-file source: decodes, converts to ``mode``, centre-crops and resizes on every ``load``."""

    def __init__(self, store, members: list[str], keys: list[str], labels: list[int], mode: str, image_size: int):
        self.store, self.members, self.keys, self.labels = store, members, keys, labels
        self.mode, self.image_size = mode, image_size

    def __len__(self) -> int:
        return len(self.members)

    def split_keys(self) -> list[str]:
        return self.keys

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        member = self.members[index]
        try:
            with self.store.open(member) as file, Image.open(file) as image:
                pixels = pil_to_uint8(center_crop_resize(to_mode(image, self.mode), self.image_size))
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, zlib and struct errors
            raise DataError(
                f"cannot decode image {self.store.describe(member)} ({_reason(error)}); "
                "replace or delete it, or set data.on_corrupt=skip"
            ) from None
        return pixels, self.labels[index]

    def inspect(self, processes: int = 0) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        """From the headers alone (Image.open + verify; no decoding), in ``processes`` worker processes (0: one per
        core; parsing a header is Python work, so threads would wait on each other): (index, description) of the
        files PIL cannot parse, and (smaller side, description) of those smaller than ``image_size``, which are
        upscaled."""
        from concurrent.futures import ProcessPoolExecutor

        processes = processes or os.cpu_count() or 1
        chunks = [range(start, min(start + _CHECK_CHUNK, len(self.members)))
                  for start in range(0, len(self.members), _CHECK_CHUNK)]
        corrupt, small = [], []
        progress = tqdm(total=len(self.members), desc="checking images", unit=" files", leave=False, mininterval=1.0)
        with ProcessPoolExecutor(processes) as pool:
            for found_corrupt, found_small, done in pool.map(_check_headers, [self.store] * len(chunks),
                                                              [[self.members[i] for i in c] for c in chunks],
                                                              [c.start for c in chunks],
                                                              [self.image_size] * len(chunks)):
                corrupt += found_corrupt
                small += found_small
                progress.update(done)
        progress.close()
        return corrupt, small


_CHECK_CHUNK = 4096  # files per task of the header check: few tasks to schedule, a steady progress bar


def _check_headers(store, members: list[str], first_index: int, image_size: int):
    """One chunk of ``ImageFiles.inspect``, in a worker process."""
    corrupt, small = [], []
    for offset, member in enumerate(members):
        try:
            with store.open(member) as file, Image.open(file) as image:
                side = min(image.size)
                image.verify()
        except Exception as error:
            corrupt.append((first_index + offset, f"{store.describe(member)} ({_reason(error)})"))
            continue
        if side < image_size:
            small.append((side, store.describe(member)))
    return corrupt, small, len(members)


class CaptionedImageFiles(ImageFiles):
    """Image files with captions (a list of alternatives per image)."""

    def __init__(self, *args, captions: list[list[str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.all_captions = captions

    def captions(self, index: int) -> list[str]:
        return self.all_captions[index]


def _image_files(store, members, keys, labels, mode, image_size, captions) -> ImageFiles:
    if captions is None:
        return ImageFiles(store, members, keys, labels, mode, image_size)
    return CaptionedImageFiles(store, members, keys, labels, mode, image_size, captions=captions)


class ImageFolderDataModule(ImageDataModule):
    """Images from a folder or a .zip (see the module docstring for the layout rules).

    Preprocessing: convert to ``channels`` (1 -> "L", 3 -> "RGB"), largest centred square, LANCZOS resize to
    ``image_size`` (skipped when already that size), and a random horizontal flip for training only.
    ``verify`` runs a header check of every file at setup (in parallel, off by default: at a million files it costs
    minutes, and a bad file is met anyway); ``on_corrupt`` decides whether a bad file stops the run naming it or is
    dropped (by the check) or replaced by the next image, with a warning naming it (when decoding fails later).
    """

    def __init__(
        self,
        *,
        root: str,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 32,
        num_workers: int = 4,
        val_fraction: float = 0.1,
        flip: bool = True,
        seed: int = 0,
        on_corrupt: Literal["error", "skip"] = "error",
        verify: bool = False,
        use_labels: bool = True,
        caption_templates: Optional[Sequence[str]] = None,
    ):
        if channels not in PIL_MODES:
            raise ConfigError(f"data.channels must be 1 (greyscale) or 3 (RGB), got {channels}")
        if on_corrupt not in ("error", "skip"):
            raise ConfigError(f"data.on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        super().__init__(
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            val_fraction=val_fraction,
            flip=flip,
            seed=seed,
            skip_corrupt=on_corrupt == "skip",
        )
        self.root = str(root)
        self.channels = channels
        self.on_corrupt = on_corrupt
        self.verify = verify
        self.use_labels = use_labels
        self.caption_templates = list(caption_templates) if caption_templates else None
        if self.caption_templates and not all(isinstance(t, str) and "{}" in t for t in self.caption_templates):
            raise ConfigError(f"data.caption_templates must be strings with {{}} where the class name goes, e.g. "
                              f"'a photo of a {{}}'; got {self.caption_templates}")
        base = os.path.basename(os.path.normpath(os.path.abspath(os.path.expanduser(self.root))))
        self.name = base[:-4] if base.lower().endswith(".zip") else base
        self._files: Optional[ImageFiles] = None
        self._classes: Optional[list[str]] = None
        self._fingerprint = ""
        self._captions_sha1: Optional[str] = None
        self._total_bytes = 0
        self._newest = 0.0

    @property
    def num_classes(self) -> Optional[int]:
        self._scan()
        return None if self._classes is None else len(self._classes)

    @property
    def classes(self) -> Optional[list[str]]:
        """Class folder names in label order, or None for an unlabelled set."""
        self._scan()
        return self._classes

    def _store(self):
        path = os.path.expanduser(self.root)
        if not os.path.exists(path):
            raise DataError(f"data root {self.root} does not exist; set data.root to a folder or .zip of images")
        if os.path.isdir(path):
            return DirectoryStore(path)
        try:
            store = ZipStore(path)
            store._zip()
            return store
        except (zipfile.BadZipFile, OSError) as error:
            reason = _reason(error)
            raise DataError(f"data root {self.root} is neither a folder nor a readable zip ({reason})") from None

    def _scan(self) -> ImageFiles:
        """List the files once (no decoding): members, split keys, labels and the listing fingerprint."""
        if self._files is not None:
            return self._files
        store = self._store()
        entries = sorted(store.entries())
        if not entries:
            raise DataError(
                f"no images found under {self.root} (accepted extensions: {' '.join(IMAGE_EXTENSIONS)}, any case)"
            )
        members = [member for member, _, _ in entries]
        parts = [member.replace("\\", "/").split("/") for member in members]
        while all(len(p) > 1 for p in parts) and len({p[0] for p in parts}) == 1:
            parts = [p[1:] for p in parts]  # a folder that wraps everything is not a class
        keys = ["/".join(p) for p in parts]
        nested = sum(len(p) > 1 for p in parts)
        if not self.use_labels or nested == 0:
            classes, labels = None, [0] * len(parts)
        elif nested < len(parts):
            top = next(key for key in keys if "/" not in key)
            raise DataError(
                f"{len(parts) - nested} images (e.g. {top}) lie next to the class folders of {self.root}; move them "
                "into a class folder, or set data.use_labels=false to ignore folders"
            )
        else:
            classes = sorted({p[0] for p in parts})
            index = {name: label for label, name in enumerate(classes)}
            labels = [index[p[0]] for p in parts]
        # Names (wrappers stripped) and sizes: equal for a folder and its zip, and on every machine.
        listing = "\n".join(f"{key}\t{size}" for key, (_, size, _) in zip(keys, entries))
        self._fingerprint = hashlib.sha1(listing.encode()).hexdigest()
        self._total_bytes = sum(size for _, size, _ in entries)
        self._newest = max(mtime for _, _, mtime in entries)
        self._classes = classes
        captions = read_captions(store, members)
        if self.caption_templates:
            captions = self._captions_from_templates(captions, classes, labels)
        self._captions_sha1 = None if captions is None else hashlib.sha1(json.dumps(captions).encode()).hexdigest()
        self._files = _image_files(store, members, keys, labels, PIL_MODES[self.channels], self.image_size, captions)
        return self._files

    def _captions_from_templates(self, found, classes, labels) -> list[list[str]]:
        """Every template filled with each image's class name (underscores as spaces): captions for a labelled set
        without any, such as CIFAR-10 ("a photo of a {}"), so the text path can be checked against class labels."""
        if found is not None:
            raise DataError(f"{self.root} has captions of its own and data.caption_templates is set: use one or the "
                            "other")
        if classes is None:
            raise DataError(f"data.caption_templates needs class folders to name, and {self.root} has none")
        return [[template.format(classes[label].replace("_", " ")) for template in self.caption_templates]
                for label in labels]

    def _load_source(self) -> ImageFiles:
        files = self._scan()
        if not self.verify:
            return files
        corrupt, small = files.inspect()
        if small:
            side, example = min(small)
            print(f"warning: {len(small)} of {len(files)} images are smaller than data.image_size={self.image_size} and "
                  f"are upscaled to it (smallest side {side} px: {example}); a smaller data.image_size avoids this")
        if corrupt and self.on_corrupt == "error":
            raise DataError(
                f"corrupt image {corrupt[0][1]}"
                + (f" and {len(corrupt) - 1} more" if len(corrupt) > 1 else "")
                + "; replace or delete it, or set data.on_corrupt=skip"
            )
        if corrupt:
            print(f"skipped {len(corrupt)} corrupt images (first: {corrupt[0][1]})")
            bad = {index for index, _ in corrupt}
            keep = [i for i in range(len(files)) if i not in bad]
            if not keep:
                raise DataError(f"every image under {self.root} is corrupt (first: {corrupt[0][1]})")
            captions = getattr(files, "all_captions", None)
            files = _image_files(
                files.store,
                [files.members[i] for i in keep],
                [files.keys[i] for i in keep],
                [files.labels[i] for i in keep],
                files.mode,
                files.image_size,
                None if captions is None else [captions[i] for i in keep],
            )
        return files

    def _source_identity(self) -> dict[str, Any]:
        files = self._scan()
        path = os.path.realpath(os.path.expanduser(self.root))
        is_zip = isinstance(files.store, ZipStore)
        return {
            "source": path,
            "source_kind": "zip" if is_zip else "folder",
            # The archive's own size, or the images' total bytes and newest mtime for a folder (a folder's own
            # mtime does not change when files below it do).
            "source_size": os.stat(path).st_size if is_zip else self._total_bytes,
            "source_mtime": self._newest,
            "listing_sha1": self._fingerprint,
            "num_images": len(files),
            "classes": self._classes,
            "captions_sha1": self._captions_sha1,
            "crop": "center-square",
            "on_corrupt": self.on_corrupt,
        }
