"""LPIPS loads its VGG16 trunk from local files only, strictly, and fails with one actionable line otherwise."""

from pathlib import Path

import pytest
import torch
import torchvision

from lightning_ldm.errors import CheckpointError, MissingWeightsError, UserError
from lightning_ldm.losses.lpips import (
    VGG16_FILENAME,
    FrozenLPIPS,
    _copy_vgg16_features,
    _read_state_dict,
    find_vgg16_weights,
    load_lpips,
)


@pytest.fixture(scope="module")
def vgg_features() -> dict[str, torch.Tensor]:
    """The features.* tensors of a randomly initialised torchvision vgg16 (the classifier is not needed)."""
    torch.manual_seed(0)
    state = torchvision.models.vgg16(weights=None).state_dict()
    return {k: v for k, v in state.items() if k.startswith("features.")}


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory, vgg_features: dict[str, torch.Tensor]) -> Path:
    path = tmp_path_factory.mktemp("weights") / VGG16_FILENAME
    torch.save(vgg_features, path)
    return path


@pytest.fixture(scope="module")
def loaded(vgg_file: Path) -> FrozenLPIPS:
    """Built once: constructing LPIPS-VGG takes seconds on CPU."""
    return load_lpips(str(vgg_file))


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def _trunk_params(lpips_module: FrozenLPIPS) -> dict[int, dict[str, torch.Tensor]]:
    """Trunk tensors keyed by torchvision's features index, read back from the lpips slices."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for vgg_slice in lpips_module.model.net.children():
        for index, layer in vgg_slice.named_children():
            params = dict(layer.named_parameters(recurse=False))
            if params:
                out[int(index)] = params
    return out


def _assert_trunk_equals(lpips_module: FrozenLPIPS, features: dict[str, torch.Tensor]) -> None:
    trunk = _trunk_params(lpips_module)
    assert len(trunk) == 13  # VGG16's 13 convolutions
    for index, params in trunk.items():
        for name, value in params.items():
            torch.testing.assert_close(value, features[f"features.{index}.{name}"], rtol=0, atol=0)


def test_load_from_explicit_path(loaded: FrozenLPIPS, vgg_features: dict[str, torch.Tensor]) -> None:
    lpips_module = loaded
    _assert_trunk_equals(lpips_module, vgg_features)

    # Frozen: eval mode that a parent's .train() cannot undo, and no trainable weights.
    parent = torch.nn.Sequential(lpips_module)
    parent.train()
    assert not lpips_module.training and not any(m.training for m in lpips_module.modules())
    assert not any(p.requires_grad for p in lpips_module.parameters())

    # The calibrated linear heads ship with torchmetrics: non-negative, not a fresh random init.
    heads = [p for n, p in lpips_module.named_parameters() if n.startswith("model.lin")]
    assert len(heads) == 5 and all((h >= 0).all() and h.abs().sum() > 0 for h in heads)

    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    same = lpips_module(x, x)
    different = lpips_module(x, y)
    assert same.shape == (2, 1, 1, 1)
    torch.testing.assert_close(same, torch.zeros_like(same))
    assert (different > 0).all()

    # Gradients reach the reconstruction, not the frozen weights.
    y.requires_grad_(True)
    lpips_module(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips_module.parameters())


def test_load_from_torch_home_cache(empty_torch_home: Path, vgg_features: dict[str, torch.Tensor]) -> None:
    checkpoints = empty_torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    # A whole-model file as torchvision downloads it: the classifier keys are ignored.
    torch.save({**vgg_features, "classifier.6.weight": torch.zeros(10, 4096)}, checkpoints / VGG16_FILENAME)
    assert find_vgg16_weights(None) == checkpoints / VGG16_FILENAME
    _assert_trunk_equals(load_lpips(), vgg_features)


def test_missing_default_file_names_the_searched_path(empty_torch_home: Path) -> None:
    expected = empty_torch_home / "hub" / "checkpoints" / VGG16_FILENAME
    with pytest.raises(MissingWeightsError) as info:
        load_lpips()
    message = str(info.value)
    assert str(expected) in message and "loss.lpips_weights" in message and "\n" not in message
    assert isinstance(info.value, UserError)


def test_missing_explicit_file_is_not_replaced_by_the_cache(tmp_path: Path, empty_torch_home: Path,
                                                           vgg_features: dict[str, torch.Tensor]) -> None:
    checkpoints = empty_torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(vgg_features, checkpoints / VGG16_FILENAME)
    wrong = tmp_path / "nowhere" / VGG16_FILENAME
    with pytest.raises(MissingWeightsError, match=str(wrong)):
        find_vgg16_weights(str(wrong))


def test_file_with_a_missing_key_raises_checkpoint_error(tmp_path: Path,
                                                         vgg_features: dict[str, torch.Tensor]) -> None:
    state = dict(vgg_features)
    del state["features.10.weight"]
    path = tmp_path / VGG16_FILENAME
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_lpips(str(path))
    assert str(path) in str(info.value) and "features.10.weight" in str(info.value)


@pytest.mark.parametrize("corruption", ["missing_key", "wrong_shape", "unexpected_key"])
def test_mismatched_tensors_are_rejected_before_any_copy(tmp_path: Path, vgg_features: dict[str, torch.Tensor],
                                                         loaded: FrozenLPIPS, corruption: str) -> None:
    state = dict(vgg_features)
    if corruption == "missing_key":
        del state["features.10.weight"]
        bad_key = "features.10.weight"
    elif corruption == "wrong_shape":
        state["features.2.bias"] = torch.zeros(65)
        bad_key = "features.2.bias"
    else:  # e.g. a vgg16_bn file would carry norm tensors at indices that are ReLUs in vgg16
        state["features.1.weight"] = torch.zeros(64)
        bad_key = "features.1.weight"
    path = tmp_path / VGG16_FILENAME
    torch.save(state, path)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        _copy_vgg16_features(loaded.model, _read_state_dict(path), path)
    assert str(path) in str(info.value) and bad_key in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in loaded.state_dict().items())


def test_unreadable_file_raises_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / VGG16_FILENAME
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(CheckpointError, match=str(path)):
        load_lpips(str(path))


def test_distance_is_the_lpips_formula(loaded: FrozenLPIPS) -> None:
    """Zhang et al. 2018, Eq. 1: d(x, y) = sum_l mean_hw || w_l * (f_l(x) - f_l(y)) ||^2, where f_l are the
    channel-normalised VGG16 activations after relu1_2 ... relu5_3 of inputs shifted and scaled per channel,
    recomputed here from the trunk's convolutions and the heads' weights alone."""
    torch.manual_seed(2)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = (x + 0.4 * torch.randn_like(x)).clamp(-1, 1)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    convs = [m for m in loaded.model.net.modules() if isinstance(m, torch.nn.Conv2d)]
    heads = [[m for m in head.modules() if isinstance(m, torch.nn.Conv2d)][0].weight.flatten()
             for head in loaded.model.lins]
    pool_after = {1, 3, 6, 9}  # VGG16's max-pools follow conv 2, 4, 7 and 10 (0-based 1, 3, 6, 9)
    tap_after = {1, 3, 6, 9, 12}  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def activations(image: torch.Tensor) -> list[torch.Tensor]:
        h, taps = (image - shift) / scale, []
        for index, conv in enumerate(convs):
            h = torch.relu(torch.nn.functional.conv2d(h, conv.weight, conv.bias, padding=1))
            if index in tap_after:
                taps.append(h / h.pow(2).sum(1, keepdim=True).add(1e-8).sqrt())
            if index in pool_after:
                h = torch.nn.functional.max_pool2d(h, 2)
        return taps

    expected = sum((w.view(1, -1, 1, 1) * (a - b) ** 2).sum(1).mean((1, 2))
                   for w, a, b in zip(heads, activations(x), activations(y)))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, y).flatten(), expected, rtol=1e-4, atol=1e-7)
