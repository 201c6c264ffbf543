"""Image grids that a person can look at: always written as PNG in the run directory, and sent to every
attached logger (W&B image panel, TensorBoard image tab; the CSV logger has the PNG files)."""

from pathlib import Path

import torch
from PIL import Image

from lightning_ldm.atomic import atomic_path


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW -> uint8 NCHW (clamped: decoders are unbounded)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def make_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """uint8 NCHW -> uint8 CHW grid with a 2-pixel border, greyscale expanded to RGB."""
    n, c, h, w = images.shape
    if c == 1:
        images = images.expand(n, 3, h, w)
    ncol = (n + nrow - 1) // nrow
    pad = 2
    grid = torch.full((3, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for index in range(n):
        row, col = divmod(index, nrow)
        top, left = pad + row * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = images[index]
    return grid


def save_png(image: torch.Tensor, path: Path) -> Path:
    """uint8 CHW (C = 1 or 3) as a PNG file, written atomically."""
    array = image.permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(tmp, format="PNG")
    return path


def is_readable_image(path: Path) -> bool:
    """Whether ``path`` is a whole image file: a file cut short (a crash of an older version, a copy, a disk
    problem) fails PIL's check of its chunks and checksums."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:
        return False


def log_image_grid(trainer, key: str, images: torch.Tensor, nrow: int, step: int, caption: str = "") -> Path:
    """Write ``images`` ([-1, 1]) as one grid to ``<run>/images/<key>_<step>.png`` and to the loggers."""
    grid = make_grid(to_uint8(images), nrow)
    path = save_png(grid, Path(trainer.default_root_dir) / "images" / f"{key.replace('/', '_')}_{step:07d}.png")
    for logger in trainer.loggers:
        kind = type(logger).__name__
        if kind == "WandbLogger":
            logger.log_image(key=key, images=[str(path)], step=step, caption=[caption] if caption else None)
        elif kind == "TensorBoardLogger":
            logger.experiment.add_image(key, grid, global_step=step)
    return path
