"""Load weights strictly, with one line naming the file and the first mismatch (never strict=False)."""

from pathlib import Path

import torch

from lightning_ldm.errors import CheckpointError


def load_state_strictly(module: torch.nn.Module, state: dict, path: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the architecture "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, value in state.items():
        if hasattr(value, "shape") and hasattr(expected[key], "shape") and value.shape != expected[key].shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, "
                                  f"the architecture expects {tuple(expected[key].shape)}")
    module.load_state_dict(state, strict=True)
