"""Feature extractors for FID-like metrics: images -> (N, D) features.

Two kinds, chosen by ``FeatureExtractorSpec`` (the ``feature_extractor:`` node of the FID configs):

- ``kind: torch_fidelity`` (default): a torch-fidelity extractor by ``name``. ``inception-v3-compat`` (the TF
  Inception of the FID paper, pool3 2048-d features) is the standard one; ``vgg16`` and ``clip-*`` work too.
  Weights come from ``weights_path`` or torch hub's cache (see ``weights.py``) and are loaded by torch-fidelity's
  own code. Input as torch-fidelity's image folders give it: uint8 RGB (greyscale repeated), any size (it
  resizes to 299 itself, TF-1.x bilinear).
- ``kind: checkpoint``: your own network at ``path``, for domains where ImageNet features mean little. The file
  is either a TorchScript module (``torch.jit.script(net).save(path)``) or a ``torch.save``d dict
  ``{"_target_": "package.module.Class", "kwargs": {...}, "state_dict": ..., "feature_layer": "pool"}``
  (see ``save_extractor_checkpoint``; its parameters may be stored in float16 to halve the file: they are
  widened into the float32 network the bundle's class builds, which then runs in float32). It receives float images in [-1, 1], NCHW, with the data's channels
  and size, exactly as the training loader gives them; the features are the output of the submodule named
  ``feature_layer`` (a forward hook) or, when there is none, the network's output, flattened to (N, D).

Every input is first quantised to 8 bits, as a saved PNG would be, so generated and real images meet the
network in the same form. Metrics from anything but the standard Inception pool3 features are labelled
``fd-<name>`` instead of ``fid``: they are Frechet distances, not FID, and not comparable with published FIDs.
"""

import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import nn

from lightning_ldm.atomic import atomic_path
from lightning_ldm.errors import CheckpointError, ConfigError, MissingWeightsError
from lightning_ldm.metrics.weights import INCEPTION, STANDARD_INCEPTION_SHA256, file_sha256, locate_weights

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class FeatureExtractorSpec:
    """Which network turns images into features (see the module docstring)."""

    kind: Literal["torch_fidelity", "checkpoint"] = "torch_fidelity"
    name: str = INCEPTION  # torch-fidelity extractor name, or the label of your own network
    weights_path: Optional[str] = None  # torch_fidelity: local weights file; null = torch hub's cache
    path: Optional[str] = None  # checkpoint: TorchScript file or state-dict bundle
    feature_layer: Optional[str] = None  # torch_fidelity: feature name ("2048"); checkpoint: submodule name


def metric_label(spec: FeatureExtractorSpec) -> str:
    """``fid`` for the standard Inception pool3 features, ``fd-<name>[-<layer>]`` for anything else."""
    if spec.kind == "torch_fidelity" and spec.name == INCEPTION and spec.feature_layer in (None, "2048"):
        return "fid"
    layer = f"-{spec.feature_layer}" if spec.kind == "torch_fidelity" and spec.feature_layer else ""
    return f"fd-{spec.name}{layer}"


def check_spec(spec: FeatureExtractorSpec, config_key: str) -> Path:
    """Validate the spec and find its file, before anything expensive runs; returns the weights/network file."""
    if spec.kind == "torch_fidelity":
        if spec.path:
            raise ConfigError(f"{config_key}.path is for kind=checkpoint; torch-fidelity weights go in "
                              f"{config_key}.weights_path")
        from lightning_ldm.metrics.weights import torch_fidelity_names

        if spec.name not in torch_fidelity_names():
            raise ConfigError(f"{config_key}.name={spec.name}: not a torch-fidelity extractor; use one of "
                              f"{', '.join(torch_fidelity_names())} or kind=checkpoint for your own network")
        return locate_weights(spec.name, spec.weights_path, config_key)
    if spec.kind != "checkpoint":
        raise ConfigError(f"{config_key}.kind={spec.kind!r}: use torch_fidelity or checkpoint")
    if not spec.path:
        raise ConfigError(f"{config_key}.path is required for kind=checkpoint (a TorchScript file or a state-dict "
                          "bundle, see lightning_ldm.metrics.features)")
    if spec.name == INCEPTION or not _NAME.match(spec.name):
        raise ConfigError(f"{config_key}.name={spec.name!r}: give your network its own label (letters, digits, "
                          "'.', '_', '-'); its metrics are logged as fd-<name>")
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(f"{config_key}.path={spec.path}: no such feature-extractor file")
    return path.resolve()


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (or uint8) -> uint8, rounding as a PNG writer does; on the input's device."""
    if images.dtype == torch.uint8:
        return images
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FeatureExtractor(nn.Module):
    """images (N, C, H, W), uint8 or [-1, 1] -> {"features": (N, D) float32[, "logits": (N, K)]}."""

    def __init__(self, spec: FeatureExtractorSpec, file: Path) -> None:
        super().__init__()
        self.name = spec.name
        self.kind = spec.kind
        self.label = metric_label(spec)
        self.file = file
        self.sha256 = file_sha256(file)
        self.layer = spec.feature_layer
        self.register_buffer("_probe", torch.empty(0), persistent=False)  # follows .to(); nets may have no weights

    @property
    def provides_logits(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return self._probe.device

    def describe(self) -> dict[str, Any]:
        """Everything that identifies the features: part of every cache key and report."""
        return {"kind": self.kind, "name": self.name, "feature_layer": self.layer, "label": self.label,
                "file": str(self.file), "sha256": self.sha256}


class TorchFidelityExtractor(FeatureExtractor):
    def __init__(self, spec: FeatureExtractorSpec, file: Path) -> None:
        super().__init__(spec, file)
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        cls = FEATURE_EXTRACTORS_REGISTRY[spec.name]
        self.layer = spec.feature_layer or cls.get_default_feature_layer_for_metric("fid")
        if self.layer not in cls.get_provided_features_list():
            raise ConfigError(f"feature_layer={self.layer!r}: {spec.name} provides "
                              f"{', '.join(cls.get_provided_features_list())}")
        # Inception's unbiased logits give the Inception Score from the same forward pass.
        self._logits = "logits_unbiased" if spec.name == INCEPTION and self.layer != "logits_unbiased" else None
        wanted = [self.layer] + ([self._logits] if self._logits else [])
        try:
            self.net = cls(spec.name, wanted, feature_extractor_weights_path=str(file), verbose=False)
        except (RuntimeError, KeyError, ValueError, OSError, EOFError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{file} cannot be loaded as {spec.name} weights ({first})") from None
        if spec.name == INCEPTION and self.sha256 != STANDARD_INCEPTION_SHA256:
            warnings.warn(f"{file} is not the standard Inception file (sha256 {self.sha256[:12]}..., expected "
                          f"{STANDARD_INCEPTION_SHA256[:12]}...): FIDs are not comparable with published ones",
                          stacklevel=2)

    @property
    def provides_logits(self) -> bool:
        return self._logits is not None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = quantize(images)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        if pixels.shape[1] != 3:
            raise ConfigError(f"{self.name} takes 1- or 3-channel images, got {pixels.shape[1]} channels")
        with torch.autocast(pixels.device.type, enabled=False):
            outputs = self.net(pixels.contiguous())
        result = {"features": outputs[0].float()}
        if self._logits:
            result["logits"] = outputs[1].float()
        return result


class CheckpointExtractor(FeatureExtractor):
    def __init__(self, spec: FeatureExtractorSpec, file: Path) -> None:
        super().__init__(spec, file)
        self.net, stored_layer = _load_network(file)
        self.layer = spec.feature_layer or stored_layer
        self._captured: Optional[torch.Tensor] = None
        if self.layer:
            modules = dict(self.net.named_modules())
            if self.layer not in modules:
                raise ConfigError(f"feature_layer={self.layer!r} is not a submodule of {file}; it has "
                                  f"{', '.join(list(modules)[1:12])}, ...")
            modules[self.layer].register_forward_hook(self._capture)
        self.net.eval()
        for parameter in self.net.parameters():  # (a ScriptModule has no requires_grad_)
            parameter.requires_grad_(False)

    def _capture(self, module, inputs, output) -> None:
        self._captured = output

    def train(self, mode: bool = True) -> "CheckpointExtractor":
        return super().train(False)  # a measuring instrument: never in training mode

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = quantize(images).float() / 127.5 - 1.0
        self._captured = None
        with torch.autocast(x.device.type, enabled=False):
            output = self.net(x)
        features = self._captured if self.layer else output
        self._captured = None
        if not isinstance(features, torch.Tensor):
            raise CheckpointError(f"{self.file}: the network returned {type(features).__name__}, not a tensor; set "
                                  "feature_layer to the submodule whose output are the features")
        return {"features": features.flatten(1).float()}


def _load_network(file: Path) -> tuple[nn.Module, Optional[str]]:
    if _is_torchscript(file):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 deprecates TorchScript; it still loads
                return torch.jit.load(str(file), map_location="cpu"), None
        except Exception as error:
            raise CheckpointError(f"{file} cannot be loaded as TorchScript ({type(error).__name__})") from None
    try:
        bundle = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{file} is neither TorchScript nor a feature-extractor bundle "
                              f"({type(error).__name__})") from None
    if not isinstance(bundle, dict) or not {"_target_", "state_dict"} <= set(bundle):
        raise CheckpointError(f"{file}: a feature-extractor bundle needs the keys _target_ and state_dict "
                              "(see lightning_ldm.metrics.features.save_extractor_checkpoint)")
    from hydra.utils import get_class

    try:
        net = get_class(bundle["_target_"])(**bundle.get("kwargs", {}))
    except Exception as error:
        raise CheckpointError(f"{file}: cannot build {bundle['_target_']} ({type(error).__name__}: {error})") from None
    try:
        # load_state_dict copies into the parameters the constructor made (float32), so a float16 bundle is widened
        # here and the network runs in float32 with the fp16-rounded weights.
        net.load_state_dict(bundle["state_dict"], strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{file}: weights do not fit {bundle['_target_']} "
                              f"({str(error).strip().splitlines()[0]})") from None
    return net, bundle.get("feature_layer")


def _is_torchscript(file: Path) -> bool:
    if not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def save_extractor_checkpoint(net: nn.Module, path: str | Path, *, target: str, kwargs: Optional[dict] = None,
                              feature_layer: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> Path:
    """Bundle your network for ``kind: checkpoint``: ``target`` is its class path, ``kwargs`` its constructor.

    ``dtype`` (e.g. ``torch.float16``, half the file) stores the floating-point *parameters* in that dtype; buffers
    (BatchNorm running statistics: few values, and a variance near 0 would lose its relative precision) keep
    theirs. The loader widens them back into the network's own float32 parameters."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parameters = {name for name, _ in net.named_parameters()}
    state = {}
    for name, value in net.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and name in parameters and value.is_floating_point():
            largest = value.abs().max().item() if value.numel() else 0.0
            if largest > torch.finfo(dtype).max:
                raise ValueError(f"{name}: |value| up to {largest:g} does not fit {dtype}; save it in float32")
            value = value.to(dtype)
        state[name] = value
    with atomic_path(path) as tmp:
        torch.save({"_target_": target, "kwargs": dict(kwargs or {}), "feature_layer": feature_layer,
                    "state_dict": state}, tmp)
    return path


def build_feature_extractor(spec: Optional[FeatureExtractorSpec] = None, config_key: str = "feature_extractor",
                            device: Optional[torch.device] = None) -> FeatureExtractor:
    spec = spec or FeatureExtractorSpec()
    file = check_spec(spec, config_key)
    extractor = TorchFidelityExtractor(spec, file) if spec.kind == "torch_fidelity" else CheckpointExtractor(spec, file)
    extractor.eval().requires_grad_(False)
    return extractor.to(device) if device is not None else extractor
