"""Both stages under DDP with two CPU processes (gloo), through the real entry point."""

import pytest
import torch

from conftest import run_cli

# sync_batchnorm stays on: GlobalBatchNorm (the discriminator's) runs on gloo as on NCCL.
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "logger=csv", "data.batch_size=8", "trainer.limit_val_batches=2",
       "trainer.val_check_interval=2", "max_steps=4"]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ddp")
    stage1 = run_cli("stage=autoencoder", "run_name=ae", "loss.disc_start=2", "module.image_log_every=0", *DDP, cwd=cwd)
    assert stage1.returncode == 0, stage1.stderr[-3000:]
    stage2 = run_cli("stage=diffusion", "run_name=ldm", "module.scale_estimation_batches=2",
                     "module.num_log_images=2", "module.sampling.steps=2", *DDP, cwd=cwd)
    assert stage2.returncode == 0, stage2.stderr[-3000:]
    return cwd, stage1, stage2


def test_text_to_image_trains_on_two_processes_with_identical_encoders_and_tokenizers(tmp_path):
    run = run_cli("stage=diffusion", "run_name=txt", "data=captioned_digits", "data.num_scenes=64", "data.image_size=32",
                  "autoencoder=identity", "unet=tiny", "conditioning=text", "module.conditioning.caption.dim=32",
                  "module.conditioning.caption.depth=1", "module.conditioning.caption.heads=2",
                  "module.conditioning.caption.dim_head=16", "module.conditioning.caption.length=12",
                  "module.num_log_images=0", *DDP, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    # Each rank learns the tokenizer from the same captions and checks it agrees; the encoder's gradients are
    # all-reduced with the UNet's, so all three are the same on both ranks after training.
    assert "Weights identical on all 2 ranks after 4 batches: UNet, conditioner, EMA" in run.stdout


def test_stage1_trains_on_two_processes_with_the_discriminator(ddp_runs):
    cwd, stage1, _ = ddp_runs
    assert "global batch 8 x 2 device(s)" in stage1.stdout
    assert stage1.stdout.count("Run directory:") == 2  # printed once at start and once at the end, rank 0 only
    checkpoint = torch.load(cwd / "outputs/autoencoder/ae/checkpoints/last.ckpt", map_location="cpu",
                            weights_only=False)
    assert checkpoint["batch_step"] == 4 and len(checkpoint["rng_states"]) == 2  # one RNG state per rank
    assert (cwd / "outputs/autoencoder/ae/export/autoencoder.safetensors").is_file()
    assert "Weights identical on all 2 ranks after 4 batches: autoencoder, discriminator" in stage1.stdout


def test_stage2_trains_on_two_processes_with_one_scale_factor(ddp_runs):
    cwd, _, stage2 = ddp_runs
    checkpoint = torch.load(cwd / "outputs/diffusion/ldm/checkpoints/last.ckpt", map_location="cpu",
                            weights_only=False)
    scale = float(checkpoint["state_dict"]["first_stage.scale_factor"])
    assert f"scale_factor {scale:.5f} (identical on all 2 ranks)" in stage2.stdout
    assert checkpoint["batch_step"] == 4 and len(checkpoint["rng_states"]) == 2
    assert "Weights identical on all 2 ranks after 4 batches: UNet, EMA" in stage2.stdout
    assert torch.isfinite(torch.stack([v.float().sum() for k, v in checkpoint["state_dict"].items()
                                       if k.startswith("ema.model.")])).all()


def test_ddp_wraps_the_model_on_the_current_stream(monkeypatch):
    """Lightning 2.6 wraps in a side stream, which makes every backward warn and synchronise on GPUs."""
    import lightning_ldm.training.ddp as ddp

    def no_side_stream(*args, **kwargs):
        raise AssertionError("DDP must be built on the current stream")

    built = {}
    monkeypatch.setattr(torch.cuda, "Stream", no_side_stream)
    monkeypatch.setattr(torch.cuda, "stream", no_side_stream)
    monkeypatch.setattr(ddp, "DistributedDataParallel", lambda module, device_ids, **kw: built.update(
        module=module, device_ids=device_ids, **kw) or "wrapped")
    strategy = ddp.DDPOnCurrentStreamStrategy(gradient_as_bucket_view=True)
    monkeypatch.setattr(strategy, "determine_ddp_device_ids", lambda: [0])
    model = torch.nn.Linear(2, 2)
    assert strategy._setup_model(model) == "wrapped"
    assert built == {"module": model, "device_ids": [0], "gradient_as_bucket_view": True}


def test_the_ddp_preset_uses_that_strategy(compose):
    from hydra.utils import instantiate

    from lightning_ldm.training.ddp import DDPOnCurrentStreamStrategy
    for trainer in ("ddp", "slurm"):
        cfg = compose("stage=diffusion", f"trainer={trainer}")
        strategy = instantiate(cfg.trainer.strategy)
        assert isinstance(strategy, DDPOnCurrentStreamStrategy), trainer
        # what DistributedDataParallel is built with (measured choices: experiments/scaling/README.md)
        assert strategy._ddp_kwargs == {"find_unused_parameters": False, "gradient_as_bucket_view": True,
                                        "bucket_cap_mb": 200}, trainer
        assert strategy.compiled_ddp == "no_optimization"


def test_compiled_ddp_sets_how_dynamo_splits_graphs_for_ddp_for_the_run_only():
    import torch._dynamo

    from lightning_ldm.training.ddp import DDPOnCurrentStreamStrategy
    before = torch._dynamo.config.optimize_ddp
    with DDPOnCurrentStreamStrategy(compiled_ddp="ddp_optimizer").dynamo_settings():
        assert torch._dynamo.config.optimize_ddp == "ddp_optimizer"
    assert torch._dynamo.config.optimize_ddp == before
    strategy = DDPOnCurrentStreamStrategy()  # the default, the faster one measured (experiments/scaling/README.md)
    assert torch._dynamo.config.optimize_ddp == before  # building the strategy changes nothing
    strategy._run_settings.enter_context(strategy.dynamo_settings())  # what setup_environment does at fit start
    assert torch._dynamo.config.optimize_ddp == "no_optimization"
    strategy._run_settings.close()  # what teardown does
    assert torch._dynamo.config.optimize_ddp == before
    with pytest.raises(ValueError, match="compiled_ddp must be"):
        DDPOnCurrentStreamStrategy(compiled_ddp="python_reducer")


def test_a_wrong_compiled_ddp_value_is_one_clear_config_error(tmp_path):
    result = run_cli("stage=diffusion", "trainer=ddp", "trainer.strategy.compiled_ddp=sideways", cwd=tmp_path)
    assert result.returncode != 0
    assert "compiled_ddp" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("mode, split", [("ddp_optimizer", True), ("no_optimization", False)])
def test_compiled_ddp_decides_whether_a_compiled_network_is_split_at_gradient_buckets(tmp_path, mode, split):
    """The knob's effect, with DDP's real integration in torch.compile: one process of gloo, a network compiled
    inside the DDP-wrapped module as the stages do, a bucket per layer, and a backend that counts graphs."""
    import torch._dynamo
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from lightning_ldm.training.ddp import DDPOnCurrentStreamStrategy
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    class Wrapped(nn.Module):  # the LightningModule's place: it holds the compiled network
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])

        def forward(self, x):
            return self.net(x)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with DDPOnCurrentStreamStrategy(compiled_ddp=mode).dynamo_settings():
            torch._dynamo.reset()
            model = Wrapped()
            model.net.compile(backend=counting_backend)
            ddp = DistributedDataParallel(model, bucket_cap_mb=1)  # 1 MB per layer's weight: a bucket each
            ddp(torch.randn(4, 512)).sum().backward()
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
    assert (len(graphs) > 1) == split, len(graphs)
    assert all(p.grad is not None for p in model.parameters())
