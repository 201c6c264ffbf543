"""Every file a user keeps (checkpoints, exports, samples, grids, reports, caches, run records) is written here:
to a temporary file beside the target, flushed to disk, then renamed over it. ``os.replace`` is atomic on POSIX
file systems, so a reader (or a rerun after a crash) sees the old file or the new one, never half of one; on any
failure, a full disk included, the temporary file is removed and the target is left as it was.

Temporary names start with a dot and end in ``.tmp<pid>`` without the target's suffix, so that globs for
``*.png`` or ``*.safetensors`` never pick one up; writers that infer a format from the name must be told it.
"""

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # the data reaches the disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: Union[str, Path], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Union[str, Path], text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))
