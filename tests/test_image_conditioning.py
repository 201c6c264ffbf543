"""Super-resolution and inpainting models: the pairs they train on, the maps their embedders make, the presets of
the released models, training, sampling and evaluation from a checkpoint alone, and bad input in one line."""

import json
import types

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from lightning_ldm.conditioning.conditioner import Conditioner
from lightning_ldm.data.digits import DigitsDataModule
from lightning_ldm.data.pairs import ImagePairs, InpaintingPairs, PairedView, SuperResolutionPairs
from lightning_ldm.diffusion.module import DiffusionModule
from lightning_ldm.diffusion.schedules import NoiseSchedule
from lightning_ldm.errors import ConfigError, DataError
from lightning_ldm.latent.first_stage import identity_first_stage
from lightning_ldm.tasks.evaluate_image_tasks import blur_fill
from lightning_ldm.tasks.sample import sample

from test_presets import preset
from test_stage2 import REPO, make_trainer
from test_text_to_image import TINY_UNET

SR = {"low_res": {"kind": "low_res", "factor": 2, "channels": 1, "downsampling": "area"}}
INPAINTING = {"inpainting": {"kind": "inpainting", "masks": "mixed"}}


class PoolingFirstStage(torch.nn.Module):
    """A stand-in first stage with factor f: the latent of an image is its f x f block mean (scale 1)."""

    def __init__(self, factor: int = 2, channels: int = 1) -> None:
        super().__init__()
        self.downsampling_factor, self.latent_channels, self.image_channels = factor, channels, channels

    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, self.downsampling_factor)


def _digits(batch_size: int = 4) -> DigitsDataModule:
    return DigitsDataModule(image_size=28, batch_size=batch_size, num_workers=0, val_fraction=0.1)


def _module(conditioning: dict, **kwargs) -> DiffusionModule:
    options = dict(first_stage=identity_first_stage(image_channels=1), unet=TINY_UNET, schedule=NoiseSchedule(),
                   image_size=28, conditioning=conditioning, num_log_images=4, lr=2e-3, ema_decay=0.9,
                   sampling={"steps": 2}, cache_latents=None, scale_estimation_batches=1)
    return DiffusionModule(**{**options, **kwargs})


# --------------------------------------------------------------------------------------------- pairs
def test_super_resolution_pairs_downsample_to_the_input_and_validation_pairs_are_fixed():
    data = _digits()
    data.setup()
    image = data.val_dataset[0]["image"]
    low = SuperResolutionPairs(2, "area")(image, None)["low_res"]
    assert low.shape == (1, 14, 14)
    torch.testing.assert_close(low, F.avg_pool2d(image[None], 2)[0])  # area: the exact block means
    degraded = SuperResolutionPairs(2, "bicubic", blur_sigma=(0.5, 1.5), noise_std=(0.05, 0.1), jpeg_quality=(40, 60))
    val = PairedView(data.val_dataset, [degraded, InpaintingPairs("mixed")], fixed_seed=0)
    first, again = val[3], val[3]
    assert torch.equal(first["low_res"], again["low_res"]) and torch.equal(first["mask"], again["mask"])
    assert not torch.equal(val[4]["mask"], first["mask"])  # each item its own draw
    train = PairedView(data.val_dataset, [degraded])
    assert not torch.equal(train[3]["low_res"], train[3]["low_res"])  # training draws afresh
    mask = first["mask"]
    assert mask.shape == (1, 28, 28) and 0 < mask.sum() < mask.numel() and set(mask.unique().tolist()) <= {0.0, 1.0}


def test_image_pairs_wraps_the_data_and_its_loaders_serve_the_pairs():
    paired = ImagePairs(_digits(), [SuperResolutionPairs(2), InpaintingPairs("box")])
    paired.setup("fit")
    batch = next(iter(paired.val_dataloader()))
    assert batch["low_res"].shape == (4, 1, 14, 14) and batch["mask"].shape == (4, 1, 28, 28)
    assert paired.name == "digits" and paired.identity() == paired.images.identity()


# --------------------------------------------------------------------------------------------- embedders
def test_low_resolution_map_is_the_input_at_latent_size_and_zeros_when_dropped():
    conditioner = Conditioner.from_spec(SR, vector_dim=64, first_stage=PoolingFirstStage(2))
    embedder = conditioner.embedder("low_res")
    low = torch.rand(3, 1, 14, 14) * 2 - 1
    assert embedder.dim == 1 and conditioner.concat_channels == 1
    torch.testing.assert_close(embedder(low, torch.device("cpu")), low)  # 14 x 2 / f=2: already latent-sized
    dropped = embedder(low, torch.device("cpu"), torch.tensor([True, False, True]))
    assert dropped[0].abs().sum() == 0 and torch.equal(dropped[1], low[1])
    wider = Conditioner.from_spec(SR, vector_dim=64, first_stage=PoolingFirstStage(1)).embedder("low_res")
    torch.testing.assert_close(wider(low, torch.device("cpu")),
                               F.interpolate(low, size=(28, 28), mode="bicubic", align_corners=False))
    odd = Conditioner.from_spec({"sr": {**SR["low_res"], "factor": 2}}, vector_dim=64,
                                first_stage=PoolingFirstStage(4)).embedder("low_res")
    with pytest.raises(DataError, match="15px input super-resolved by 2 gives 30px, not divisible by the first "
                                        "stage's factor 4"):
        odd.latent_size(15)


def test_masked_image_map_encodes_the_masked_image_and_marks_every_latent_touching_the_hole():
    first_stage = PoolingFirstStage(2)
    embedder = Conditioner.from_spec(INPAINTING, vector_dim=64, first_stage=first_stage).embedder("inpainting")
    assert embedder.dim == 2  # the latent's channel(s) and the mask
    image = torch.rand(1, 1, 4, 4) * 2 - 1
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 0, 1] = 1  # one generated pixel, in the top-left latent
    out = embedder({"image": image, "mask": mask}, torch.device("cpu"))
    masked = image.clone()
    masked[0, 0, 0, 1] = -1  # black before encoding, as LD's inpainting script
    torch.testing.assert_close(out[:, :1], F.avg_pool2d(masked, 2))
    assert out[0, 1].tolist() == [[1.0, -1.0], [-1.0, -1.0]]  # generated 1, kept -1


def test_guidance_keeps_the_map_and_nulls_the_class():
    spec = {"class": {"kind": "class", "num_classes": 10, "output": "vector"}, **SR}
    conditioner = Conditioner.from_spec(spec, vector_dim=16, first_stage=PoolingFirstStage(2))
    low = torch.rand(2, 1, 14, 14)
    cond, uncond = conditioner.guidance_inputs({"class": torch.tensor([1, 2]), "low_res": low}, torch.device("cpu"))
    assert torch.equal(cond["concat"], uncond["concat"])
    null = conditioner.embedders["class"].table.weight[10]
    assert torch.equal(uncond["vector"], null.expand(2, -1)) and not torch.equal(cond["vector"], uncond["vector"])


@pytest.mark.parametrize("conditioning,channels", [(SR, 1 + 1), (INPAINTING, 1 + 2)])
def test_the_unet_takes_the_maps_channels(conditioning, channels):
    module = _module(conditioning)
    assert module.unet.conv_in.in_channels == channels if hasattr(module.unet, "conv_in") else True
    assert module.unet.config["in_channels"] + module.unet.config["concat_channels"] == channels


# --------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name,concat,unet_millions", [("sr-ldm-vq-4", 3, 113.6), ("inpainting-ldm-vq-4", 4, 387.2)])
def test_released_presets_counts(compose, name, concat, unet_millions):
    cfg = preset(compose, name)
    with torch.device("meta"):
        first_stage = PoolingFirstStage(4, 3)
        conditioner = Conditioner.from_spec(OmegaConf.to_container(cfg.module.conditioning, resolve=True),
                                            vector_dim=4 * cfg.unet.model_channels, first_stage=first_stage)
        unet = instantiate(cfg.unet)(in_channels=3, out_channels=3, context_dim=None,
                                     concat_channels=conditioner.concat_channels)
        autoencoder = instantiate(preset(compose, "vq-f4").autoencoder)
    assert conditioner.concat_channels == concat  # LD: in_channels 6 (bsr_sr) and 7 (inpainting_big)
    unet_count = sum(p.numel() for p in unet.parameters())
    assert round(unet_count / 1e6, 1) == unet_millions
    if name.startswith("sr"):  # the paper's 169M (Tab. 5) counts the VQ-f4 first stage with the UNet
        assert round((unet_count + sum(p.numel() for p in autoencoder.parameters())) / 1e6) == 169
    assert cfg.data.image_size == 256 and cfg.autoencoder.regularizer == "vq"


# --------------------------------------------------------------------------------------------- train and sample
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A super-resolution and an inpainting model on 28x28 digits, a few steps each, with checkpoints."""
    root = tmp_path_factory.mktemp("image_tasks")
    runs = {}
    for name, conditioning in (("sr", SR), ("inpainting", INPAINTING)):
        torch.manual_seed(0)
        module = _module(conditioning)
        data = module.wrap_data(_digits())
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / name / "checkpoints", save_last=True)
        trainer = make_trainer(root / name, 3, callbacks=[checkpoints], enable_checkpointing=True,
                               limit_val_batches=1, val_check_interval=3)
        trainer.fit(module, datamodule=data)
        runs[name] = types.SimpleNamespace(module=module.eval(), last=root / name / "checkpoints" / "last.ckpt",
                                           root=root / name)
    return runs


def test_training_logs_input_output_target_grids_and_refuses_a_latent_cache(trained):
    grids = sorted((trained["sr"].root / "images").glob("val_samples_*.png"))
    assert grids
    width, height = Image.open(grids[-1]).size
    assert width == 3 * 28 + 4 * 2 and height == 4 * 28 + 5 * 2  # 4 pairs: input | output | target per row
    assert trained["sr"].module.cache_latents is False  # null: no cache for conditions drawn from pixels
    with pytest.raises(ConfigError, match="cannot train super-resolution") as error:
        _module(SR, cache_latents=True).wrap_data(_digits())
    assert "\n" not in str(error.value)


def _write_images(folder, arrays, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in zip(names, arrays):
        Image.fromarray(array).save(folder / name)


def _sample_cfg(tmp_path, ckpt, **options):
    defaults = OmegaConf.load(REPO / "conf/stage/sample.yaml").sample
    return OmegaConf.create({"paths": {"run_dir": str(tmp_path / "run"), "output_root": str(tmp_path)},
                             "sample": OmegaConf.merge(defaults, {"ckpt": str(ckpt), "accelerator": "cpu", "steps": 2,
                                                                  **options})})


def test_a_checkpoint_alone_super_resolves_a_folder(trained, tmp_path):
    rng = np.random.default_rng(0)
    _write_images(tmp_path / "low", rng.integers(0, 256, (2, 14, 14), dtype=np.uint8), ["a.png", "b.png"])
    sample(_sample_cfg(tmp_path, trained["sr"].last, images=str(tmp_path / "low")))
    outputs = sorted((tmp_path / "run/images").glob("*.png"))
    assert [p.name for p in outputs] == ["a.png", "b.png"]
    assert Image.open(outputs[0]).size == (28, 28)  # x2
    for options, message in [({"masks": str(tmp_path / "low")}, "super-resolves its input images: sample.masks"),
                             ({"strength": 0.5}, "super-resolves its input images")]:
        with pytest.raises(ConfigError, match=message) as error:
            sample(_sample_cfg(tmp_path, trained["sr"].last, images=str(tmp_path / "low"), **options))
        assert "\n" not in str(error.value)


def test_a_checkpoint_alone_inpaints_and_keeps_the_known_pixels(trained, tmp_path):
    rng = np.random.default_rng(1)
    _write_images(tmp_path / "in", rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), ["a.png", "b.png"])
    mask = np.zeros((28, 28), np.uint8)
    mask[6:20, 8:18] = 255
    _write_images(tmp_path / "masks", [mask, mask], ["a.png", "b.png"])
    with pytest.raises(ConfigError, match="this model inpaints: give a mask per image"):
        sample(_sample_cfg(tmp_path, trained["inpainting"].last, images=str(tmp_path / "in")))
    sample(_sample_cfg(tmp_path, trained["inpainting"].last, images=str(tmp_path / "in"), masks=str(tmp_path / "masks")))
    source, result = np.array(Image.open(tmp_path / "in/a.png")), np.array(Image.open(tmp_path / "run/images/a.png"))
    kept = mask == 0
    assert np.array_equal(result[kept], source[kept]) and not np.array_equal(result[~kept], source[~kept])


def test_an_unconditional_model_asked_to_super_resolve_says_what_it_can_do(tmp_path):
    from lightning_ldm.diffusion.checkpoint import save_ema_export

    export = save_ema_export(_module({}), tmp_path / "ldm-ema.safetensors")
    _write_images(tmp_path / "low", [np.zeros((14, 14), np.uint8)], ["a.png"])
    with pytest.raises(ConfigError, match="this model is unconditional: with sample.images it can do image-to-image") as error:
        sample(_sample_cfg(tmp_path, export, images=str(tmp_path / "low")))
    assert "not super-resolution" in str(error.value) and "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------- evaluation
def test_blur_fill_keeps_the_known_pixels_and_fills_a_flat_image_exactly():
    image = torch.full((1, 3, 16, 16), 0.25)
    generated = torch.zeros(1, 1, 16, 16)
    generated[..., 4:12, 2:9] = 1
    torch.testing.assert_close(blur_fill(image, generated), image)  # only 0.25 around the hole: 0.25 inside it
    noisy = torch.rand(1, 3, 16, 16) * 2 - 1
    filled = blur_fill(noisy, generated)
    assert torch.equal(filled * (1 - generated), noisy * (1 - generated))


def test_evaluate_reports_ours_beside_the_bicubic_baseline(trained, compose, tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from fid_helpers import write_torchscript_extractor
    from lightning_ldm.tasks.evaluate import evaluate

    extractor = write_torchscript_extractor(tmp_path / "pixels.pt")
    report = tmp_path / "report.json"
    cfg = compose("stage=evaluate", f"evaluate.ckpt={trained['sr'].last}", "evaluate.accelerator=cpu",
                  "evaluate.batch_size=8", "evaluate.num_samples=16", "evaluate.feature_extractor.kind=checkpoint",
                  "evaluate.feature_extractor.name=pixels", f"evaluate.feature_extractor.path={extractor}",
                  "data.image_size=28", f"evaluate.report={report}")
    evaluate(cfg)
    metrics = json.loads(report.read_text())["metrics"]
    # The baseline's PSNR, computed here independently on the same fixed validation pairs.
    data = _digits()
    data.setup()
    from lightning_ldm.metrics.reference import reference_indices

    view = PairedView(data.val_dataset, [SuperResolutionPairs(2, "area")], fixed_seed=data.seed)
    items = [view[i] for i in reference_indices(len(view), 16)]
    target = torch.stack([item["image"] for item in items])
    bicubic = F.interpolate(torch.stack([item["low_res"] for item in items]), size=(28, 28), mode="bicubic",
                            align_corners=False).clamp(-1, 1)
    mse = (((bicubic - target) / 2) ** 2).mean(dim=(1, 2, 3))
    assert metrics["psnr@16/bicubic"] == pytest.approx(float((-10 * torch.log10(mse)).mean()), rel=1e-4)
    assert {"psnr@16/ours", "ssim@16/ours", "consistency_psnr@16/ours", "fd-pixels@16/ours", "fd-pixels@16/bicubic",
            "fd-pixels@16/jpeg q50"} <= set(metrics)
    wrong = compose("stage=evaluate", f"evaluate.ckpt={trained['sr'].last}", "evaluate.accelerator=cpu",
                    "evaluate.task=inpainting", "evaluate.feature_extractor.kind=checkpoint",
                    "evaluate.feature_extractor.name=pixels", f"evaluate.feature_extractor.path={extractor}",
                    "data.image_size=28")
    with pytest.raises(ConfigError, match="evaluate.task=inpainting, but this checkpoint is conditioned on low_res"):
        evaluate(wrong)


def test_masks_can_be_read_from_files_beside_the_images(tmp_path):
    from lightning_ldm.data.folder import ImageFolderDataModule

    rng = np.random.default_rng(0)
    names = [f"{c}/{i}.png" for c in ("a", "b") for i in range(4)]
    for name in names:
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
        mask = np.zeros((40, 40), np.uint8)
        column = 4 * (ord(name[0]) - ord("a")) + int(name[2])
        mask[:, 4 * column:4 * column + 4] = 255  # a different stripe per image, so the pairing is checked
        (tmp_path / "masks" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(tmp_path / "masks" / name.replace(".png", ".jpg"), quality=100)
    data = ImageFolderDataModule(root=str(tmp_path / "images"), image_size=40, batch_size=2, num_workers=0,
                                 val_fraction=0.25, flip=False, seed=0)
    paired = ImagePairs(data, [InpaintingPairs("files", str(tmp_path / "masks"))])
    paired.setup("fit")
    view = paired.paired("train")
    for i in range(len(view)):
        key = view.source.split_keys()[view.indices[i]]
        column = 4 * (ord(key[0]) - ord("a")) + int(key[2])
        expected = torch.zeros(1, 40, 40)
        expected[..., 4 * column:4 * column + 4] = 1
        assert torch.equal(view[i]["mask"], expected), key
    with pytest.raises(ConfigError, match="is neither a folder nor a .zip"):
        ImagePairs(data, [InpaintingPairs("files", str(tmp_path / "nowhere"))])
    (tmp_path / "masks/a/0.jpg").unlink()
    from lightning_ldm.data import pairs

    pairs._mask_index.cache_clear()  # listed once per process: a new listing sees the file gone
    with pytest.raises(DataError, match="has no mask for a/0.png"):
        [paired.paired(split)[i] for split in ("train", "val") for i in range(len(paired.paired(split)))]
