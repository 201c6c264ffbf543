"""Experiment and debug presets: each composes and passes the schema; each experiment trains one batch on CPU
(debug=fast_dev_run, shrunk to a toy size) through the real task; the paper presets carry the reference's
numbers (absolute lr = LD base lr x batch x accumulation on one GPU) and, at full size, the paper's parameter
counts (built on the meta device)."""

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open

from lightning_ldm.autoencoder.export import read_export_metadata
from lightning_ldm.cli import CONFIG_DIR
from lightning_ldm.conditioning.conditioner import Conditioner
from lightning_ldm.conditioning.text_encoder import PAPER_TXT2IMG_PARAMETERS
from lightning_ldm.config.validate import validate_config
from lightning_ldm.errors import ConfigError
from lightning_ldm.tasks.train import fit

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
DEBUG_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "debug").glob("*.yaml"))
PAPER_STAGE1 = ["kl-f4", "kl-f8", "vq-f4", "vq-f8"]
PAPER_STAGE2 = ["celebahq-ldm-vq-4", "ffhq-ldm-vq-4", "lsun_bedrooms-ldm-vq-4", "lsun_churches-ldm-kl-8",
                "cin-ldm-vq-f8"]
# The stage-1 preset whose export each stage-2 preset is meant to run on (None: pixel space).
FIRST_STAGE_OF = {"celebahq-ldm-vq-4": "vq-f4", "ffhq-ldm-vq-4": "vq-f4", "lsun_bedrooms-ldm-vq-4": "vq-f4",
                  "lsun_churches-ldm-kl-8": "kl-f8", "cin-ldm-vq-f8": "vq-f8", "txt2img-ldm-kl-8": "kl-f8",
                  "txt2img-digits": "txt2img-digits-autoencoder",
                  "txt2img-digits-cpu": "txt2img-digits-cpu-autoencoder",
                  "cifar10-ldm": "cifar10-autoencoder-kl-f2", "digits-ldm": "digits-autoencoder", "cifar10-pixel": None,
                  "sr-ldm-vq-4": "vq-f4", "inpainting-ldm-vq-4": "vq-f4"}
STAGE1 = [name for name in EXPERIMENTS if name not in FIRST_STAGE_OF]


def test_the_preset_lists_are_complete():
    assert set(PAPER_STAGE1 + PAPER_STAGE2) <= set(EXPERIMENTS)
    assert set(FIRST_STAGE_OF) <= set(EXPERIMENTS)
    assert {v for v in FIRST_STAGE_OF.values() if v} <= set(STAGE1)
    assert {"cifar10-autoencoder-kl-f2", "cifar10-autoencoder-kl-f4", "digits-autoencoder"} <= set(STAGE1)
    assert DEBUG_PRESETS == ["fast_dev_run", "limit", "overfit", "profiler", "trace"]


ROOT_REQUIRED = set(PAPER_STAGE1 + PAPER_STAGE2) | {"txt2img-ldm-kl-8", "sr-ldm-vq-4", "inpainting-ldm-vq-4"}  # data.root: ??? (the others name theirs)


def compose_preset(compose, name: str, *overrides: str):
    """The preset as a user gets it; presets that require data.root get a placeholder unless one is given."""
    root = ["data.root=/path/to/images"] if name in ROOT_REQUIRED else []
    return compose(f"experiment={name}", *root, *overrides)


_PRESETS: dict = {}


def preset(compose, name: str):
    """The composed preset, read-only: composing costs ~0.4 s, and the number checks only read it."""
    if name not in _PRESETS:
        _PRESETS[name] = compose_preset(compose, name)
    return _PRESETS[name]


# --------------------------------------------------------------------------------------------- composition
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(compose, name):
    cfg = preset(compose, name)
    validate_config(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.experiment_name == name and len(cfg.tags) > 0
    assert cfg.task.name == ("diffusion" if name in FIRST_STAGE_OF else "autoencoder")
    assert cfg.module.max_steps == cfg.max_steps
    assert cfg.trainer.accelerator == ("cpu" if "-cpu" in name else "gpu")  # the laptop presets say so in their name


@pytest.mark.parametrize("name", PAPER_STAGE1 + PAPER_STAGE2)
def test_paper_presets_require_the_data_root(compose, name):
    with pytest.raises(ConfigError, match=r"^data\.root: required value is not set"):
        validate_config(compose(f"experiment={name}"))


def test_cifar10_presets_read_the_zip_named_by_the_environment(compose, monkeypatch):
    monkeypatch.delenv("CIFAR10_ZIP", raising=False)
    cfg = compose("experiment=cifar10-ldm")
    assert cfg.data.root == "../shared/data/cifar10-train.zip"
    monkeypatch.setenv("CIFAR10_ZIP", "/data/c10.zip")  # resolved when read, so the same config follows it
    assert cfg.data.root == "/data/c10.zip"
    roots = {OmegaConf.to_container(preset(compose, name).data)["root"] for name in EXPERIMENTS
             if name.startswith("cifar10-")}
    assert roots == {"${oc.env:CIFAR10_ZIP,../shared/data/cifar10-train.zip}"}


@pytest.mark.parametrize("debug", DEBUG_PRESETS)
def test_debug_preset_composes_and_validates(compose, debug):
    cfg = compose("stage=diffusion", f"debug={debug}")  # stage 1 with each: the runs at the end of this file
    validate_config(cfg)
    OmegaConf.to_container(cfg, resolve=True)


def test_debug_presets_override_an_experiment(compose):
    cfg = compose_preset(compose, "kl-f8", "debug=fast_dev_run")
    assert cfg.trainer.fast_dev_run == 1 and cfg.max_steps == 1 and cfg.module.max_steps == 1
    assert not cfg.logger
    assert compose_preset(compose, "celebahq-ldm-vq-4", "debug=limit").max_steps == 40


# --------------------------------------------------------------------------------------------- paper numbers
# (preset, LD base_learning_rate, batch, accumulation): the absolute lr is their product on ONE GPU.
LD_LR_RULE = [("kl-f4", 4.5e-6, 12, 2), ("kl-f8", 4.5e-6, 12, 2), ("vq-f4", 4.5e-6, 8, 1), ("vq-f8", 4.5e-6, 10, 1),
              ("celebahq-ldm-vq-4", 2.0e-6, 48, 1), ("ffhq-ldm-vq-4", 2.0e-6, 42, 1),
              ("lsun_bedrooms-ldm-vq-4", 2.0e-6, 48, 1), ("cin-ldm-vq-f8", 1.0e-6, 64, 1)]


@pytest.mark.parametrize("name,base_lr,batch,accumulation", LD_LR_RULE)
def test_absolute_lr_is_the_reference_effective_lr(compose, name, base_lr, batch, accumulation):
    cfg = preset(compose, name)
    assert cfg.data.batch_size == batch
    assert cfg.module.get("accumulate_grad_batches", 1) == accumulation
    assert cfg.module.lr == pytest.approx(base_lr * batch * accumulation, rel=1e-9)


def test_churches_lr_is_not_scaled(compose):
    # LD runs this config with --scale_lr False: 5e-5 is the optimizer's lr at batch 96 (paper Tab. 12).
    cfg = compose_preset(compose, "lsun_churches-ldm-kl-8")
    assert (cfg.module.lr, cfg.data.batch_size, cfg.module.warmup_steps) == (5.0e-5, 96, 10000)


@pytest.mark.parametrize("name,regularizer,disc_start_ld,disc_weight,reduction,disc_layers", [
    ("kl-f4", "kl", 50001, 0.5, "sum", 3), ("kl-f8", "kl", 50001, 0.5, "sum", 3),
    ("vq-f4", "vq", 0, 0.75, "mean", 3), ("vq-f8", "vq", 1, 0.6, "mean", 2)])
def test_paper_stage1_loss(compose, name, regularizer, disc_start_ld, disc_weight, reduction, disc_layers):
    cfg = preset(compose, name)
    assert cfg.autoencoder.regularizer == regularizer and cfg.data.image_size == 256 and cfg.data.channels == 3
    loss = cfg.loss
    assert loss.perceptual_weight == 1.0 and loss.disc_loss == "hinge" and loss.disc_weight == disc_weight
    assert loss.nll_reduction == reduction and loss.get("disc_layers", 3) == disc_layers
    if regularizer == "kl":
        assert loss.kl_weight == 1e-6
    else:
        assert loss.codebook_weight == 1.0
    # LD's disc_start counts Lightning 1.x global_step = optimizer steps; ours counts batches.
    assert loss.disc_start == disc_start_ld * cfg.module.accumulate_grad_batches


@pytest.mark.parametrize("name,unet,beta_end,loss_type,batch,max_steps", [
    ("celebahq-ldm-vq-4", "ldm-4", 0.0195, "l2", 48, 410_000),
    ("ffhq-ldm-vq-4", "ldm-4", 0.0195, "l2", 42, 635_000),
    ("lsun_bedrooms-ldm-vq-4", "ldm-4", 0.0195, "l2", 48, 1_900_000),
    ("lsun_churches-ldm-kl-8", "ldm-8-churches", 0.0155, "l1", 96, 500_000),
    ("cin-ldm-vq-f8", "ldm-8-cin", 0.0195, "l2", 64, 500_000)])
def test_paper_stage2_settings(compose, name, unet, beta_end, loss_type, batch, max_steps):
    cfg = preset(compose, name)
    unet_yaml = OmegaConf.load(CONFIG_DIR / "unet" / f"{unet}.yaml")
    assert {k: cfg.unet[k] for k in unet_yaml} == OmegaConf.to_container(unet_yaml)
    assert cfg.schedule.kind == "scaled_linear" and cfg.schedule.num_timesteps == 1000
    assert (cfg.schedule.beta_start, cfg.schedule.beta_end) == (0.0015, beta_end)
    assert cfg.module.prediction == "eps" and cfg.module.loss_type == loss_type
    assert (cfg.data.batch_size, cfg.max_steps, cfg.data.image_size) == (batch, max_steps, 256)
    assert cfg.autoencoder.path is None and cfg.autoencoder._target_.endswith("load_first_stage")
    if name == "cin-ldm-vq-f8":  # LD's ClassEmbedder: one 512-wide token the SpatialTransformers attend to
        spec = cfg.module.conditioning["class"]
        assert (spec.output, spec.num_classes, spec.dim) == ("context", 1000, 512)
        assert cfg.unet.get("context_dim") is None  # the width comes from the embedder
        assert 0.1 <= spec.drop_rate <= 0.2  # null-label training for classifier-free guidance
    else:
        assert OmegaConf.to_container(cfg.module.conditioning) == {}


# --------------------------------------------------------------------------------------------- paper sizes
@pytest.mark.parametrize("name,params,f", [("kl-f4", 55_312_063, 4), ("kl-f8", 83_653_863, 8),
                                           ("vq-f4", 55_322_782, 4), ("vq-f8", 67_717_295, 8)])
def test_paper_autoencoder_size(compose, name, params, f):
    cfg = preset(compose, name)
    with torch.device("meta"):
        model = instantiate(cfg.autoencoder)
    assert sum(p.numel() for p in model.parameters()) == params  # kl-f4 55.3M, kl-f8 83.65M
    assert model.downsampling_factor == f


@pytest.mark.parametrize("name,latent_channels,millions", [
    ("celebahq-ldm-vq-4", 3, 274.1), ("ffhq-ldm-vq-4", 3, 274.1), ("lsun_bedrooms-ldm-vq-4", 3, 274.1),
    ("lsun_churches-ldm-kl-8", 4, 295.0), ("cin-ldm-vq-f8", 4, 395.0), ("txt2img-ldm-kl-8", 4, 872.3)])
def test_paper_unet_size(compose, name, latent_channels, millions):
    cfg = preset(compose, name)
    with torch.device("meta"):  # built as DiffusionModule builds it
        conditioner = Conditioner.from_spec(OmegaConf.to_container(cfg.module.conditioning),
                                            vector_dim=4 * cfg.unet.model_channels)
        unet = instantiate(cfg.unet)(in_channels=latent_channels, out_channels=latent_channels,
                                     context_dim=conditioner.context_dim, concat_channels=conditioner.concat_channels)
    # LD's cond-stage models are the conditioner's, outside the paper's UNet count: the ClassEmbedder's 1001 x 512
    # (with the null class) and the released 32-layer text transformer (1.45B in all with the UNet).
    expected = {"cin-ldm-vq-f8": 1001 * 512, "txt2img-ldm-kl-8": PAPER_TXT2IMG_PARAMETERS}.get(name, 0)
    assert sum(p.numel() for p in conditioner.parameters()) == expected
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == millions


# --------------------------------------------------------------------------------------------- runs on CPU
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny two-class image folder, a VGG16-shaped LPIPS trunk of random weights, and a record of runs."""
    root = tmp_path_factory.mktemp("presets")
    generator = torch.Generator().manual_seed(0)
    for label in ("cats", "dogs"):
        (root / "images" / label).mkdir(parents=True)
        for i in range(10):
            pixels = torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "images" / label / f"{i}.png")
            (root / "images" / label / f"{i}.txt").write_text(f"a noisy {label[:-1]} number {i}\n")
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    trunk = make_layers(cfgs["D"])  # torchvision vgg16's `features`, without the 120M-parameter classifier
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, root / "vgg16-397923af.pth")
    return {"root": root, "runs": {}}


def _tiny_overrides(cfg, name: str, workspace) -> list[str]:
    root = workspace["root"]
    overrides = ["debug=fast_dev_run", "trainer=cpu", "data.batch_size=2", "data.num_workers=0",
                 "data.image_size=32", "module.num_log_images=2", f"paths.output_root={root / 'outputs'}",
                 f"paths.run_dir={root / 'outputs' / name}"]
    if cfg.data._target_.endswith("ImageFolderDataModule"):
        overrides.append(f"data.root={root / 'images'}")
    if name in FIRST_STAGE_OF:
        overrides += ["unet.model_channels=32", "unet.num_res_blocks=1", "module.sampling.steps=2",
                      "module.scale_estimation_batches=2"]
    else:
        overrides += ["autoencoder.ch=32", "autoencoder.num_res_blocks=1"]
        if cfg.loss.perceptual_weight > 0:
            overrides.append(f"loss.lpips_weights={root / 'vgg16-397923af.pth'}")
    if name == "txt2img-ldm-kl-8":  # the paper's 1280-wide, 32-layer text encoder at a toy size
        overrides += ["module.conditioning.caption.dim=32", "module.conditioning.caption.depth=1",
                      "module.conditioning.caption.length=8", "module.conditioning.caption.heads=2",
                      "module.conditioning.caption.dim_head=16", "unet.num_heads=2"]
    if name in ("lsun_churches-ldm-kl-8", "txt2img-ldm-kl-8"):  # 4x4 latents at 32 px: three UNet levels
        overrides += ["unet.channel_mult=[1,2,2]", "unet.attention_resolutions=[1,2,4]"]
    if name == "cin-ldm-vq-f8":  # the tiny folder has two classes
        overrides.append("module.conditioning.class.num_classes=2")
    if name == "txt2img-digits":  # 64-channel attention heads at 32 and 64 channels
        overrides.append("unet.num_head_channels=32")
    if name in ("digits-ldm", "txt2img-digits", "txt2img-digits-cpu"):  # encoding every image first takes 15 s+
        overrides.append("module.cache_latents=false")
    return overrides


def run_preset(compose, name: str, workspace) -> Path:
    """fast_dev_run of the preset at a toy size, through the real task; once per preset and test module."""
    if name in workspace["runs"]:
        return workspace["runs"][name]
    first_stage = FIRST_STAGE_OF.get(name)
    extra = [f"autoencoder.path={run_preset(compose, first_stage, workspace) / 'export/autoencoder.safetensors'}"] \
        if first_stage else []
    cfg = preset(compose, name)
    cfg = compose_preset(compose, name, *_tiny_overrides(cfg, name, workspace), *extra)
    validate_config(cfg)
    fit(cfg)
    workspace["runs"][name] = run_dir = Path(cfg.paths.run_dir)
    assert (run_dir / "config.yaml").is_file()
    return run_dir


@pytest.mark.parametrize("name", STAGE1)
def test_stage1_preset_trains_one_batch(compose, workspace, name):
    run_dir = run_preset(compose, name, workspace)
    architecture = preset(compose, name).autoencoder
    metadata = read_export_metadata(run_dir / "export" / "autoencoder.safetensors")
    assert metadata["info"]["batch_step"] == 1
    trained = metadata["config"]
    for key in ("ch_mult", "attn_resolutions", "z_channels", "embed_dim", "regularizer"):
        assert trained[key] == architecture[key], key  # the preset's architecture, narrower and at 32 px
    if architecture.regularizer == "vq":
        assert trained["codebook_size"] == architecture.codebook_size


@pytest.mark.parametrize("name", list(FIRST_STAGE_OF))
def test_stage2_preset_trains_one_batch(compose, workspace, name):
    run_dir = run_preset(compose, name, workspace)
    settings = preset(compose, name)
    with safe_open(str(run_dir / "export" / "ldm-ema.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        scale = float(handle.get_tensor("first_stage.scale_factor"))
    config = json.loads(metadata["config"])
    assert metadata["batch_step"] == "1"
    assert config["schedule"]["beta_end"] == settings.schedule.beta_end
    assert config["prediction"] == settings.module.prediction
    assert config["conditioning"].keys() == settings.module.conditioning.keys()
    assert config["unet"]["attention_resolutions"] == (
        [1, 2, 4] if name in ("lsun_churches-ldm-kl-8", "txt2img-ldm-kl-8") else list(settings.unet.attention_resolutions))
    first_stage = FIRST_STAGE_OF[name]
    if first_stage is None:
        assert config["first_stage"].get("identity") and scale == 1.0
    else:
        assert config["first_stage"]["export"] == str(workspace["runs"][first_stage] / "export/autoencoder.safetensors")
        assert config["first_stage"]["config"]["regularizer"] == preset(compose, first_stage).autoencoder.regularizer
        if first_stage.startswith("vq"):
            assert scale == 1.0  # VQ latents are not rescaled
        else:
            assert torch.isfinite(torch.tensor(scale)) and scale > 0 and scale != 1.0  # 1/std, estimated


# --------------------------------------------------------------------------------------------- debug runs
def test_profiler_preset_writes_its_report(compose, tmp_path):
    cfg = compose("debug=profiler", "logger=none", "trainer=cpu", "data.batch_size=2", "max_steps=3",
                  "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "module.num_log_images=2")
    validate_config(cfg)
    fit(cfg)
    report = (Path(cfg.paths.run_dir) / "fit-profile.txt").read_text()
    assert "run_training_batch" in report


def test_limit_preset_runs_two_short_epochs(compose):
    cfg = compose("debug=limit", "logger=none", "trainer=cpu", "data.batch_size=2", "module.num_log_images=2")
    validate_config(cfg)
    fit(cfg)
    checkpoint = torch.load(Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=False)
    assert checkpoint["batch_step"] == 40 and checkpoint["epoch"] == 1  # 20 batches an epoch


def test_overfit_preset_trains_on_its_few_batches(compose):
    cfg = compose("debug=overfit", "logger=none", "trainer=cpu", "data.batch_size=2", "module.num_log_images=2",
                  "max_steps=6", "trainer.val_check_interval=3")  # the preset's 500 batches are too many here
    validate_config(cfg)
    fit(cfg)
    checkpoint = torch.load(Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=False)
    assert checkpoint["batch_step"] == 6 and checkpoint["epoch"] == 1  # 4 batches an epoch


def test_trace_preset_writes_a_chrome_trace_of_training_steps(compose, tmp_path):
    cfg = compose("debug=trace", "logger=none", "trainer=cpu", "data.batch_size=2", "module.num_log_images=2")
    validate_config(cfg)
    fit(cfg)
    traces = list(Path(cfg.paths.run_dir).glob("*.pt.trace.json"))
    assert traces and "ProfilerStep" in traces[0].read_text()  # the active steps were recorded
    assert "aten::" in (Path(cfg.paths.run_dir) / "fit-trace.txt").read_text()
