"""LPIPS (Zhang et al. 2018) with a VGG16 trunk, loaded from local files only.

torchmetrics provides the network (the same slices, scaling layer and v0.1 linear heads as the authors' `lpips`
package, whose calibrated heads it ships as lpips_models/vgg.pth). The ImageNet VGG16 trunk it would normally
fetch through torchvision is loaded here from torchvision's own cache file instead, so a machine without
internet fails at start-up with a message saying which file to copy where, rather than hanging on a download or
training with a random trunk.
"""

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lightning_ldm.errors import CheckpointError, MissingWeightsError

VGG16_FILENAME = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 file name (hash-suffixed)

_HOW_TO_PROVIDE = (
    "copy vgg16-397923af.pth from a machine with internet (torchvision.models.vgg16(weights='IMAGENET1K_V1') "
    "downloads it to ~/.cache/torch/hub/checkpoints/) or set loss.lpips_weights=/path/to/vgg16-397923af.pth"
)


def default_vgg16_path() -> Path:
    """torchvision's download cache location; honours $TORCH_HOME like torch.hub does."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def find_vgg16_weights(weights_path: Optional[str] = None) -> Path:
    """The VGG16 file to load: `weights_path` if given (never silently replaced), else the torch hub cache."""
    if weights_path is not None:
        path = Path(os.path.expanduser(weights_path))
        if not path.is_file():
            raise MissingWeightsError(f"LPIPS needs VGG16 weights but loss.lpips_weights={weights_path} "
                                      f"is not a file: {_HOW_TO_PROVIDE}")
        return path
    path = default_vgg16_path()
    if not path.is_file():
        raise MissingWeightsError(f"LPIPS needs VGG16 weights but {path} does not exist: {_HOW_TO_PROVIDE}")
    return path


def _lpips_linear_weights_path() -> Path:
    from torchmetrics.functional.image import lpips

    return Path(lpips.__file__).parent / "lpips_models" / "vgg.pth"


def _read_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated download, an HTML error page, an unrelated pickle...
        raise CheckpointError(f"cannot read VGG16 weights {path} ({type(error).__name__}): "
                              f"replace it with torchvision's {VGG16_FILENAME}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"VGG16 weights {path} hold a {type(state).__name__}, not a state dict: "
                              f"replace it with torchvision's {VGG16_FILENAME}")
    return state


def _copy_vgg16_features(model: nn.Module, state: dict, path: Path) -> None:
    """Copy torchvision's `features.<i>.*` tensors into the LPIPS slices, which keep torchvision's indices as names.

    Strict: every trunk tensor must be present with its shape, and no other `features.*` key may exist.
    """
    trunk = model.net
    mapped: dict[str, torch.Tensor] = {}
    expected_keys: set[str] = set()
    for slice_name, vgg_slice in trunk.named_children():
        for index, layer in vgg_slice.named_children():
            for param_name, param in layer.named_parameters(recurse=False):
                source_key = f"features.{index}.{param_name}"
                expected_keys.add(source_key)
                tensor = state.get(source_key)
                if not isinstance(tensor, torch.Tensor) or tensor.shape != param.shape:
                    if tensor is None:
                        found = "missing"
                    elif isinstance(tensor, torch.Tensor):
                        found = f"of shape {tuple(tensor.shape)}"
                    else:
                        found = f"a {type(tensor).__name__}"
                    raise CheckpointError(f"VGG16 weights {path} do not match torchvision's vgg16: key {source_key} "
                                          f"is {found}, expected shape {tuple(param.shape)}")
                mapped[f"{slice_name}.{index}.{param_name}"] = tensor
    unexpected = sorted(k for k in state if k.startswith("features.") and k not in expected_keys)
    if unexpected:
        raise CheckpointError(f"VGG16 weights {path} do not match torchvision's vgg16 (e.g. vgg16_bn?): "
                              f"unexpected key {unexpected[0]}")
    trunk.load_state_dict(mapped, strict=True)


class FrozenLPIPS(nn.Module):
    """LPIPS distance with every weight frozen; stays in eval mode whatever its parent does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenLPIPS":
        # A parent's .train() must not re-enable the dropout in the linear heads.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance, shape (N, 1, 1, 1), for images in [-1, 1]; gradients flow to the inputs."""
        return self.model(x, y)


def load_lpips(weights_path: Optional[str] = None) -> FrozenLPIPS:
    """Build LPIPS-VGG with the calibrated heads that torchmetrics ships and the VGG16 trunk from a local file."""
    vgg_path = find_vgg16_weights(weights_path)
    linear_path = _lpips_linear_weights_path()
    if not linear_path.is_file():
        raise MissingWeightsError(f"torchmetrics lacks the LPIPS linear weights {linear_path}: "
                                  f"reinstall it (pip install --force-reinstall torchmetrics)")

    state = _read_state_dict(vgg_path)  # before the (slow) network construction: fail fast

    # A private class (hence torchmetrics' upper bound in pyproject.toml): the public metric always builds an
    # ImageNet trunk through torchvision, which downloads it. pnet_rand=True builds a random trunk instead.
    from torchmetrics.functional.image.lpips import _LPIPS

    model = _LPIPS(pretrained=True, net="vgg", pnet_rand=True, model_path=str(linear_path))
    _copy_vgg16_features(model, state, vgg_path)
    return FrozenLPIPS(model)
