"""Read back what an offline W&B run recorded, straight from its ``run-*.wandb`` transaction log.

The file is W&B's 7-byte header followed by LevelDB-style log records (32 KiB blocks, each record a
7-byte header: crc32, length, type) holding ``wandb.proto`` ``Record`` messages.
"""

import json
import struct
from pathlib import Path

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def read_history(run_dir: Path) -> list[dict]:
    """Every ``run.log`` row of the offline runs under ``run_dir`` (``wandb/offline-run-*``), oldest first."""
    from wandb.proto import wandb_internal_pb2

    logs = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert logs, f"no offline W&B run under {run_dir}"
    rows = []
    for raw in (record for log in logs for record in _records(log)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def read_run(run_dir: Path) -> dict:
    """Tags, group and logged config keys of the offline runs under ``run_dir``, and their metric definitions."""
    from wandb.proto import wandb_internal_pb2

    info = {"tags": set(), "group": None, "config": set(), "metric_summaries": {}}
    for log in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for raw in _records(log):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                info["tags"].update(record.run.tags)
                info["group"] = record.run.run_group or info["group"]
            elif kind == "config":
                info["config"].update(item.key for item in record.config.update)
            elif kind == "metric":
                summary = record.metric.summary
                info["metric_summaries"][record.metric.glob_name or record.metric.name] = summary
    return info
