"""Known degradations of real images: the rungs that make a Frechet distance of a custom feature extractor
readable (real images of the same kind at the same n, then JPEG, blur, noise, pure noise, blank frames)."""

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def degrade(images: torch.Tensor, rung: str, generator: torch.Generator) -> torch.Tensor:
    """uint8 (N, C, H, W), C 1 or 3, on the CPU -> the rung's uint8 images. Rungs: ``real ...`` or ``training
    images`` (unchanged), ``jpeg qNN`` (PIL JPEG at quality NN), ``blur 3x3`` (box), ``noise S`` (Gaussian noise
    of standard deviation S on the [-1, 1] scale), ``pure noise`` (uniform), ``1 in 8 blank`` (an eighth of the
    frames set to white or black)."""
    if rung.startswith("real") or rung == "training images":
        return images
    if rung.startswith("jpeg q"):
        mode = "L" if images.shape[1] == 1 else "RGB"
        out = []
        for image in images.permute(0, 2, 3, 1).numpy():
            buffer = io.BytesIO()
            Image.fromarray(image[..., 0] if mode == "L" else image, mode).save(
                buffer, format="JPEG", quality=int(rung[len("jpeg q"):]))
            decoded = np.array(Image.open(buffer).convert(mode))
            out.append(decoded[..., None] if mode == "L" else decoded)
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
    x = images.float() / 127.5 - 1
    if rung == "blur 3x3":
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    elif rung.startswith("noise "):
        x = x + float(rung.split()[1]) * torch.randn(x.shape, generator=generator)
    elif rung == "pure noise":
        x = torch.rand(x.shape, generator=generator) * 2 - 1
    elif rung == "1 in 8 blank":
        pick = torch.randperm(len(x), generator=generator)[: len(x) // 8]
        x[pick] = torch.where(torch.arange(len(pick))[:, None, None, None] % 2 == 0, 1.0, -1.0).expand(-1, *x.shape[1:])
    else:
        raise ValueError(f"unknown degradation {rung!r}")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
