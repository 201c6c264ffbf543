"""The ResNet-9 domain classifier and its training script (experiments/feature_extractors/train_classifier.py):
shapes, that it learns, and that the bundle it writes loads as a ``kind: checkpoint`` feature extractor."""

import importlib.util
import json

import pytest
import torch

from conftest import REPO
from lightning_ldm.metrics.classifier import ResNet9
from lightning_ldm.metrics.features import FeatureExtractorSpec, build_feature_extractor


def _load_script():
    path = REPO / "experiments" / "feature_extractors" / "train_classifier.py"
    spec = importlib.util.spec_from_file_location("train_classifier", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.mark.parametrize("channels, size", [(1, 28), (1, 32), (3, 32)])
def test_forward_shapes_and_pool_features(channels, size):
    net = ResNet9(in_channels=channels, num_classes=7, width=8).eval()
    captured = []
    net.pool.register_forward_hook(lambda module, inputs, output: captured.append(output))
    x = torch.rand(2, channels, size, size) * 2 - 1
    logits = net(x)
    assert logits.shape == (2, 7)
    assert captured[0].shape == (2, 64)  # 8 * width
    torch.testing.assert_close(net.features(x), captured[0])


def _stripes(n: int, generator: torch.Generator, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 3, size, size): horizontal (label 0) or vertical (label 1) stripes of period 4, random phase
    and noise; separable, and still separable after crops and flips."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    phase = torch.randint(0, 4, (n, 1, 1), generator=generator)
    line = (torch.arange(size) + phase) % 4 < 2  # (n, 1, size)
    horizontal = line.transpose(1, 2).expand(n, size, size)
    vertical = line.expand(n, size, size)
    pattern = torch.where(labels[:, None, None] == 0, horizontal, vertical).float()
    noise = torch.rand(n, 3, size, size, generator=generator) * 95
    images = pattern[:, None].expand(n, 3, size, size) * 160 + noise
    return images.to(torch.uint8), labels


def test_classifier_learns_a_separable_task(script):
    generator = torch.Generator().manual_seed(0)
    train_pixels, train_labels = _stripes(128, generator)
    test_pixels, test_labels = _stripes(64, generator)
    torch.manual_seed(0)
    net = ResNet9(in_channels=3, num_classes=2, width=8)
    before = script.accuracy(net, test_pixels, test_labels)
    history = script.fit(net, train_pixels, train_labels, epochs=4, batch_size=32, lr=0.05, pad_mode="reflect",
                         flip=True, heldout=(test_pixels, test_labels), log=lambda line: None)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"], history
    assert history[-1]["heldout_accuracy"] >= 0.95, (before, history)


def test_augment_keeps_shape_and_pixels(script):
    pixels = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    out = script.augment(pixels, "constant", False, torch.Generator().manual_seed(0))
    assert out.shape == (5, 1, 32, 32) and out.dtype == torch.float32
    # Every output pixel is an input pixel or the padding's background (-1): crops never resample.
    values = set(script.to_signed(pixels).unique().tolist()) | {-1.0}
    assert set(out.unique().tolist()) <= values


def test_dry_run_on_digits_writes_a_loadable_extractor(script, tmp_path):
    out = tmp_path / "digits"
    result = script.main(["--data", "digits", "--dry-run", "--max-train-images", "64", "--max-heldout-images", "32",
                          "--out", str(out)])
    saved = json.loads((out / "result.json").read_text())
    assert saved["train_images"] == 64 and saved["heldout_images"] == 32
    assert saved["data_identity"]["val_fraction"] == 0.1 and saved["data_identity"]["seed"] == 0
    assert saved["extractor_spec"] == {"kind": "checkpoint", "name": "digits-resnet9",
                                       "path": str(out / "digits-resnet9.pt"), "feature_layer": "pool"}
    assert saved["metric_label"] == "fd-digits-resnet9" and result["heldout_accuracy"] == saved["heldout_accuracy"]

    extractor = build_feature_extractor(FeatureExtractorSpec(**saved["extractor_spec"]))
    # The bundle holds float16 weights (half the file) and float32 BatchNorm statistics; the extractor runs in fp32.
    bundle = torch.load(out / "digits-resnet9.pt", weights_only=True)
    parameters = {name for name, _ in ResNet9(**bundle["kwargs"]).named_parameters()}
    assert saved["bundle_dtype"] == "float16" and saved["bundle_bytes"] == (out / "digits-resnet9.pt").stat().st_size
    assert {v.dtype for k, v in bundle["state_dict"].items() if k in parameters} == {torch.float16}
    assert {v.dtype for k, v in bundle["state_dict"].items() if "running" in k} == {torch.float32}
    assert {p.dtype for p in extractor.net.parameters()} == {torch.float32}
    assert 0 <= saved["rounding_feature_change"] < 1e-2 and 0 <= saved["heldout_accuracy_unrounded_weights"] <= 1
    # The same network rebuilt by hand from the bundle: the extractor's features are its pooled features.
    net = ResNet9(**bundle["kwargs"]).eval()
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in bundle["state_dict"].items()})
    images = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    features = extractor(images)["features"]
    assert features.shape == (6, 8 * 16)
    with torch.no_grad():
        torch.testing.assert_close(features, net.features(script.to_signed(images)), rtol=1e-5, atol=1e-5)


def test_float16_bundles_load_into_a_float32_network_with_the_rounded_weights(script, tmp_path):
    from lightning_ldm.metrics.features import save_extractor_checkpoint

    torch.manual_seed(0)
    net = ResNet9(in_channels=1, num_classes=10, width=8).eval()
    with torch.no_grad():  # BatchNorm statistics away from their initial 0 / 1, as after training
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(1e-3, 2.0)
    kwargs = {"in_channels": 1, "num_classes": 10, "width": 8}
    paths = {dtype: save_extractor_checkpoint(net, tmp_path / f"{dtype}.pt", target=script.TARGET, kwargs=kwargs,
                                              feature_layer="pool", dtype=getattr(torch, dtype))
             for dtype in ("float16", "float32")}
    assert paths["float16"].stat().st_size < 0.6 * paths["float32"].stat().st_size
    images = torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8)
    spec = FeatureExtractorSpec(kind="checkpoint", name="half", path=str(paths["float16"]), feature_layer="pool")
    extractor, change = script.check_bundle(net, spec, images, torch.float16)  # the script's own reload check
    assert {p.dtype for p in extractor.net.parameters()} == {torch.float32}
    with torch.no_grad():
        expected = script.rounded_copy(net, torch.float16).features(script.to_signed(images))
        unrounded = net.features(script.to_signed(images))
    features = extractor(images)["features"]
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(features, unrounded) and 0 < change < 1e-2  # rounding shows, and stays small
    with pytest.raises(ValueError, match="does not fit"):
        with torch.no_grad():
            net.head.weight[0, 0] = 1e6
        save_extractor_checkpoint(net, tmp_path / "big.pt", target=script.TARGET, kwargs=kwargs, dtype=torch.float16)
