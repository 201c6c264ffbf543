"""What image i of a sampling run gets: its starting noise from seed i, and its condition from a list of
conditions (class labels or prompts) taken in turn, i mod n. Sampling, evaluation and the FID callback share
this mapping, so the same seed gives the same image wherever it is drawn."""

from pathlib import Path
from typing import Optional, Sequence

import torch

from lightning_ldm.errors import ConfigError


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def labels_for(seeds: list[int], classes, num_classes) -> Optional[torch.Tensor]:
    if not num_classes:
        if classes:
            raise ConfigError("sample.classes is set but the model is not class-conditional")
        return None
    pool = list(classes) if classes else list(range(num_classes))
    bad = [c for c in pool if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"sample.classes {bad} outside [0, {num_classes})")
    return torch.tensor([pool[s % len(pool)] for s in seeds], dtype=torch.long)


def prompts_for(seeds: list[int], prompts: Optional[Sequence[str]], reads_text: bool) -> Optional[list[str]]:
    """Prompt i mod n for seed i; None for a model that reads no text (which refuses prompts)."""
    if not reads_text:
        if prompts:
            raise ConfigError("prompts were given but the model is not text-conditioned")
        return None
    if not prompts:
        raise ConfigError("the model is text-conditioned: give prompts (sample.prompts=[...] or sample.prompt_file=<file>; "
                          "evaluate.prompts / evaluate.prompt_file for stage=evaluate)")
    return [prompts[s % len(prompts)] for s in seeds]


def read_prompts(prompts: Optional[Sequence[str]], prompt_file: Optional[str]) -> Optional[list[str]]:
    """The prompts of ``sample.prompts`` or of ``sample.prompt_file`` (one per non-empty line), or None."""
    if prompts and prompt_file:
        raise ConfigError("give sample.prompts or sample.prompt_file, not both")
    if prompt_file:
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"sample.prompt_file {prompt_file} does not exist (one prompt per line)")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ConfigError(f"sample.prompt_file {prompt_file} holds no prompt (one per line)")
        return lines
    if isinstance(prompts, str):
        return [prompts]
    return list(prompts) if prompts else None
