"""What FID costs on one GPU: a 10k-sample evaluation of the gpu_smoke preset (CIFAR-sized 32x32x3 images,
autoencoder kl-f4-small with ch=64 -> 8x8x4 latents, unet=small 25.8M, DPM-Solver++(2M) 20 steps, bf16), split
into sampler, decoder, Inception and Frechet math, and the FID callback's share of training time at its default
interval (every 5000 batches, 10k samples) for the same UNet trained at batch 128 on cached latents.

    python experiments/benchmarks/fid_cost.py [--num-samples 10000] [--batch-size 250] [--weights PATH]
                                              [--out experiments/benchmarks/fid_cost.json]

Weights are random (timing does not depend on them). Without the Inception file (the GPU machines are offline)
a random-weights file of the same architecture is written to a temporary folder: the timings hold, the FID
value printed is meaningless. A CPU dry run: --device cpu --num-samples 16 --batch-size 8 --train-steps 3.
"""

import argparse
import functools
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]


def timed(device: torch.device):
    """A stopwatch that waits for the GPU before reading the clock."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class Watch:
        def __enter__(self):
            sync()
            self.start = time.perf_counter()
            return self

        def __exit__(self, *exc):
            sync()
            self.seconds = time.perf_counter() - self.start

    return Watch()


def random_inception_file(folder: Path) -> Path:
    """torch-fidelity's Inception-v3 architecture with random weights, in the format its loader reads."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):
            return None

    empty = folder / "empty.pth"
    torch.save({}, empty)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    path = folder / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def build_model(device: torch.device, sampler: str, steps: int):
    from hydra.utils import instantiate

    from lightning_ldm.autoencoder.model import SMALL_PRESETS, Autoencoder
    from lightning_ldm.diffusion.module import DiffusionModule
    from lightning_ldm.diffusion.schedules import NoiseSchedule
    from lightning_ldm.latent.first_stage import FrozenFirstStage

    config = {**SMALL_PRESETS["kl-f4-small"], "in_channels": 3, "ch": 64}
    autoencoder = Autoencoder(**config)
    first_stage = FrozenFirstStage(autoencoder, {"config": config}, latent_channels=autoencoder.latent_channels,
                                   downsampling_factor=autoencoder.downsampling_factor, image_channels=3,
                                   regularizer=config["regularizer"], scale_factor=1.0)
    unet = instantiate(OmegaConf.load(REPO / "conf" / "unet" / "small.yaml"))
    module = DiffusionModule(first_stage=first_stage, unet=unet, schedule=NoiseSchedule(), image_size=32,
                             sampling={"sampler": sampler, "steps": steps}, num_log_images=0)
    return module.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every-n-steps", type=int, default=5000, help="the callback's interval (its default)")
    parser.add_argument("--train-batch-size", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--weights", default=None, help="Inception weights file (default: hub cache, else random)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(REPO / "experiments" / "benchmarks" / "fid_cost.json"))
    args = parser.parse_args()

    from lightning_ldm.metrics.features import FeatureExtractorSpec, build_feature_extractor
    from lightning_ldm.metrics.frechet import GaussianStatistics, distance_to_reference
    from lightning_ldm.metrics.sampling import SamplingSettings, generated_features
    from lightning_ldm.metrics.weights import INCEPTION, locate_weights
    from lightning_ldm.errors import MissingWeightsError

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    autocast = (functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext)
    scratch = Path(tempfile.mkdtemp())
    try:
        weights, real_weights = locate_weights(INCEPTION, args.weights, "--weights"), True
    except MissingWeightsError:
        weights, real_weights = random_inception_file(scratch), False
    extractor = build_feature_extractor(FeatureExtractorSpec(weights_path=str(weights)), device=device)
    module = build_model(device, args.sampler, args.steps)
    settings = SamplingSettings()
    n, batch = args.num_samples, args.batch_size
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "num_samples": n, "batch_size": batch, "sampler": args.sampler,
              "steps": args.steps, "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
              "inception_weights": "standard" if real_weights else "random (timing only)",
              "unet_parameters_M": round(sum(p.numel() for p in module.unet.parameters()) / 1e6, 2)}

    # Warm-up: cuDNN autotuning and lazy initialisation are not part of an evaluation.
    generated_features(module, extractor, num_samples=batch, seed_start=0, settings=settings, batch_size=batch,
                       autocast=autocast)

    with timed(device) as total:  # exactly what FIDCallback.evaluate runs, the Frechet math aside
        generated = generated_features(module, extractor, num_samples=n, seed_start=0, settings=settings,
                                       batch_size=batch, autocast=autocast)
    latents = torch.randn(batch, 4, 8, 8, device=device)
    images = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    with timed(device) as decode, torch.no_grad():
        for _ in range(0, n, batch):
            with autocast():
                module.first_stage.decode(latents)
    with timed(device) as inception, torch.no_grad():
        for _ in range(0, n, batch):
            extractor(images)
    reference = GaussianStatistics.from_features(torch.randn(50000, 2048, device=device).abs())
    reference.root()  # cached with the reference statistics, never recomputed per evaluation
    with timed(device) as frechet:
        value = distance_to_reference(reference, generated.features)
    evaluation = total.seconds + frechet.seconds
    result.update({
        "seconds": {"evaluation": round(evaluation, 2), "sampler+decode+inception": round(total.seconds, 2),
                    "decode": round(decode.seconds, 2), "inception": round(inception.seconds, 2),
                    "sampler (by difference)": round(total.seconds - decode.seconds - inception.seconds, 2),
                    "frechet (float64, on the device)": round(frechet.seconds, 2)},
        "inception_images_per_s": round(n / inception.seconds, 1),
        "reference_50k_inception_s (estimate, data loading aside)": round(50000 / (n / inception.seconds), 1),
        "fid_value (meaningless with random weights)": value,
    })

    # Training step of the same UNet on cached latents: AdamW (fused on CUDA), bf16, EMA update.
    module.train()
    optimizer = torch.optim.AdamW(module.unet.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    z0 = torch.randn(args.train_batch_size, 4, 8, 8, device=device)

    def train_step():
        with autocast():
            loss = module.diffusion_loss(module.unet, z0, None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.ema.update(module.unet)

    for _ in range(min(20, args.train_steps)):
        train_step()
    with timed(device) as training:
        for _ in range(args.train_steps):
            train_step()
    step = training.seconds / args.train_steps
    interval = args.every_n_steps * step
    result.update({
        "train_step_s": round(step, 5), "train_images_per_s": round(args.train_batch_size / step, 1),
        "callback": {"every_n_steps": args.every_n_steps, "training_s_between_evaluations": round(interval, 1),
                     "evaluation_s": round(evaluation, 1),
                     "share_of_training_time": round(evaluation / (interval + evaluation), 4)},
    })
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
