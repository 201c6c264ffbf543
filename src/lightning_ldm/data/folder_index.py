"""The listing of a folder of images, written once and reused: every file's path, size and modification time,
walked (and stat-ed) the first time a folder is used and kept in ``$LIGHTNING_LDM_CACHE/folder_index`` (by
default ``~/.cache/lightning_ldm/folder_index``), one file per folder.

Reuse is checked against the modification time of every folder of the listing: adding, removing or renaming a
file changes its folder's, so a listing is walked again when the files changed and otherwise costs one stat
per folder instead of one per file. A file rewritten in place under the same name does not change its folder's
modification time and is not seen; delete the index file (its path is printed when it is written) after such an
edit.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from lightning_ldm.atomic import write_text

INDEX_VERSION = 1

Entry = tuple[str, int, float]  # (path relative to the root with "/", size in bytes, mtime)


def index_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_LDM_CACHE", Path.home() / ".cache" / "lightning_ldm")) / "folder_index"


def index_path(root: str) -> Path:
    real = os.path.realpath(root)
    return index_dir() / f"{hashlib.sha1(real.encode()).hexdigest()[:20]}.json"


def _walk(root: str) -> tuple[list[Entry], dict[str, int]]:
    """Every file below ``root`` (symlinked folders followed) and every folder's mtime, with a progress bar."""
    entries, folders = [], {}
    progress = tqdm(desc=f"listing {root}", unit=" files", leave=False, mininterval=1.0)
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        relative = os.path.relpath(folder, root).replace(os.sep, "/")
        folders[relative] = os.stat(folder).st_mtime_ns
        for name in files:
            stat = os.stat(os.path.join(folder, name))
            entries.append((name if relative == "." else f"{relative}/{name}", stat.st_size, stat.st_mtime))
        progress.update(len(files))
    progress.close()
    return entries, folders


def _still_valid(root: str, folders: dict[str, int]) -> bool:
    for relative, mtime in folders.items():
        try:
            if os.stat(os.path.join(root, relative)).st_mtime_ns != mtime:
                return False
        except OSError:
            return False
    return True


def _read(path: Path, root: str) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("version") != INDEX_VERSION or data.get("root") != os.path.realpath(root):
        return None
    return data


def list_files(root: str) -> list[Entry]:
    """Every file below ``root``: from its index when no folder changed since it was written, else walked (and
    the index rewritten). An index that cannot be written (a read-only home) only costs the walk next time."""
    path = index_path(root)
    data = _read(path, root)
    if data is not None and _still_valid(root, data["folders"]):
        return [(m, s, t) for m, s, t in zip(data["members"], data["sizes"], data["mtimes"])]
    entries, folders = _walk(root)
    record = {"version": INDEX_VERSION, "root": os.path.realpath(root), "folders": folders,
              "members": [m for m, _, _ in entries], "sizes": [s for _, s, _ in entries],
              "mtimes": [t for _, _, t in entries]}
    try:
        write_text(path, json.dumps(record, separators=(",", ":")))
    except OSError:
        pass
    return entries
