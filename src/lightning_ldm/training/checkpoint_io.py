"""Checkpoints written atomically (``atomic.py``): a crash, pre-emption or full disk while saving never corrupts
``last.ckpt`` and leaves no temporary file behind. Lightning itself writes in place."""

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_ldm.atomic import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        with atomic_path(Path(path)) as tmp:
            torch.save(checkpoint, tmp)
