"""Write a folder, zip or ``metadata.jsonl`` dataset (anything ``data=folder`` reads) as tar shards in
WebDataset's layout, for ``data=shards``:

    python -m lightning_ldm.data.write_shards SOURCE OUT [--shard-size 1000] [--workers 4]

Each sample is ``<key>.<ext>`` (the image file's own bytes, not re-encoded), ``<key>.cls`` (the class folder's
label, when the source has class folders) and ``<key>.txt`` (its captions, one per line, when it has captions);
keys number the images in the source's sorted order. Shards are written by ``--workers`` processes, each whole
shard atomically (a crash leaves complete shards and no partial one; rerunning rewrites only missing shards),
with a progress bar, and ``index.json`` lists them with their sample counts, the classes and the source.
"""

import argparse
import io
import json
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from lightning_ldm.atomic import atomic_path, write_text
from lightning_ldm.errors import ConfigError, UserError

INDEX = "index.json"


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: the same source gives the same bytes
    archive.addfile(info, io.BytesIO(data))


def _write_shard(path: str, store, rows: list[tuple[int, str, Optional[int], Optional[list[str]]]]) -> int:
    """One shard of (number, member, label, captions) rows, written atomically; returns its sample count."""
    with atomic_path(Path(path)) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as archive:
            for number, member, label, captions in rows:
                key = f"{number:09d}"
                with store.open(member) as file:
                    _add(archive, f"{key}.{member.rsplit('.', 1)[-1].lower()}", file.read())
                if label is not None:
                    _add(archive, f"{key}.cls", f"{label}\n".encode())
                if captions is not None:
                    _add(archive, f"{key}.txt", ("\n".join(captions) + "\n").encode("utf-8"))
    return len(rows)


def write_shards(source: str, out: str, *, shard_size: int = 1000, workers: int = 4, use_labels: bool = True,
                 progress: bool = True) -> dict:
    """Shards of ``source`` in ``out`` and their ``index.json`` (returned)."""
    from lightning_ldm.data.folder import ImageFolderDataModule

    if shard_size < 1 or workers < 1:
        raise ConfigError(f"--shard-size and --workers must be at least 1, got {shard_size} and {workers}")
    data = ImageFolderDataModule(root=source, use_labels=use_labels)
    files = data._scan()
    captions = getattr(files, "all_captions", None)
    labelled = data.classes is not None
    rows = [(i, member, files.labels[i] if labelled else None, None if captions is None else captions[i])
            for i, member in enumerate(files.members)]
    chunks = [rows[start:start + shard_size] for start in range(0, len(rows), shard_size)]
    width = max(6, len(str(len(chunks) - 1)))
    names = [f"shard-{i:0{width}d}.tar" for i in range(len(chunks))]
    Path(out).mkdir(parents=True, exist_ok=True)
    todo = [i for i, name in enumerate(names) if not (Path(out) / name).is_file()]
    bar = tqdm(total=len(rows), desc=f"writing {len(chunks)} shards", unit=" images", disable=not progress)
    bar.update(len(rows) - sum(len(chunks[i]) for i in todo))
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_write_shard, str(Path(out) / names[i]), files.store, chunks[i]) for i in todo]
        for future in futures:
            bar.update(future.result())
    bar.close()
    index = {"shards": [{"name": name, "count": len(chunk)} for name, chunk in zip(names, chunks)],
             "num_samples": len(rows), "classes": data.classes, "captioned": captions is not None,
             "source": data.identity()}
    write_text(Path(out) / INDEX, json.dumps(index, indent=1) + "\n")
    return index


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a folder or .zip of images (class folders, captions: as data=folder reads)")
    parser.add_argument("out", help="the folder the shards and index.json are written to")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--no-labels", action="store_true", help="ignore class folders")
    args = parser.parse_args(argv)
    try:
        index = write_shards(args.source, args.out, shard_size=args.shard_size, workers=args.workers,
                             use_labels=not args.no_labels)
    except UserError as error:  # one line and exit status 2, as the main command does
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"Wrote {index['num_samples']} images in {len(index['shards'])} shards to {args.out} "
          f"(index: {Path(args.out) / INDEX}); train with data=shards data.urls={args.out}")


if __name__ == "__main__":
    main()
