"""Image grids that a person can look at: always written as PNG in the run directory, and sent to every
attached logger (W&B image panel, TensorBoard image tab; the CSV logger has the PNG files)."""

from pathlib import Path

import numpy as np
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


def captioned_grid(images: torch.Tensor, captions: list[str], nrow: int, tile: int = 128) -> torch.Tensor:
    """uint8 NCHW images, each scaled up to ``tile`` pixels (nearest: the pixels stay visible) above its caption
    wrapped in PIL's built-in font, as one uint8 CHW grid: a grid of prompts shows what each image was asked."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    chars = max(8, tile // 6)  # the built-in bitmap font is 6 px wide
    wrapped = [[caption[i:i + chars] for i in range(0, len(caption), chars)][:4] or [""] for caption in captions]
    text_height = 11 * max(len(lines) for lines in wrapped) + 4
    tiles = []
    for image, lines in zip(images, wrapped):
        array = image.expand(3, -1, -1) if image.shape[0] == 1 else image
        picture = Image.fromarray(array.permute(1, 2, 0).numpy()).resize((tile, tile), Image.NEAREST)
        canvas = Image.new("RGB", (tile, tile + text_height), "white")
        canvas.paste(picture, (0, 0))
        draw = ImageDraw.Draw(canvas)
        for row, line in enumerate(lines):
            draw.text((2, tile + 2 + 11 * row), line, fill="black", font=font)
        tiles.append(torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1))
    return make_grid(torch.stack(tiles), nrow)


def log_prompt_table(trainer, key: str, images: torch.Tensor, prompts: list[str], step: int) -> Path:
    """The images ([-1, 1]) with their prompts: a captioned grid PNG in the run directory, and a W&B table of
    (prompt, image) rows where W&B is attached."""
    pixels = to_uint8(images)
    grid = captioned_grid(pixels, prompts, nrow=min(8, len(prompts)))
    path = save_png(grid, Path(trainer.default_root_dir) / "images" / f"{key.replace('/', '_')}_{step:07d}.png")
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            rows = [[prompt, wandb.Image(image.permute(1, 2, 0).numpy())] for prompt, image in zip(prompts, pixels)]
            logger.log_table(key=key, columns=["prompt", "image"], data=rows, step=step)
    return path
