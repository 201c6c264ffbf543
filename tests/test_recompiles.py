"""The compiled networks of both stages compile once per run: no graph break, and no recompilation once training
is under way (varying timesteps, learning-rate warm-up, EMA warm-up, the discriminator switching on, the
generator's toggled optimizer must not trigger one). Compiled with fullgraph=True (a break raises) through a
counting backend that runs the traced graphs eagerly, so the test takes seconds, not inductor's minutes.
"""

import contextlib

import lightning as L
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from lightning_ldm.tasks import train as train_task

QUIET = ["trainer=cpu", "logger=none", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
         "callbacks.progress=null", "+trainer.enable_progress_bar=false", "data.batch_size=4", "module.compile=true"]
WARM = 2  # batches after which every graph must exist


@pytest.fixture
def compiled_once(monkeypatch, with_callback):
    counter = CompileCounter()
    original = torch.compile

    def counting_compile(model=None, **kwargs):  # nn.Module.compile calls torch.compile too
        kwargs.update(backend=counter, fullgraph=True)
        return original(model, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    frames = {}
    settings = contextlib.ExitStack()  # torch's config is changed only through its own patch(), undone at the end

    class FreezeAfterWarmUp(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == WARM:
                frames["warm"] = counter.frame_count
                forbid_recompiles()

    def forbid_recompiles() -> None:  # any later recompilation raises
        settings.enter_context(torch._dynamo.config.patch(error_on_recompile=True))

    with_callback(FreezeAfterWarmUp())
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=False), settings:  # settings undone first
        yield counter, frames, forbid_recompiles
    torch._dynamo.reset()


TEXT = ["data=captioned_digits", "data.num_scenes=64", "data.image_size=32", "conditioning=text",
        "module.conditioning.caption.dim=32", "module.conditioning.caption.depth=1",
        "module.conditioning.caption.heads=2", "module.conditioning.caption.dim_head=16",
        "module.conditioning.caption.length=12", "module.conditioning.caption.drop_rate=0.5"]


# Text: the caption embedding has a fixed length whatever the caption, and dropped captions are swapped on the
# device, so the cross-attention UNet sees one shape and one graph.
@pytest.mark.parametrize("conditioning", [["conditioning=class", "module.conditioning.class.num_classes=10"], TEXT],
                         ids=["class", "text"])
def test_stage2_compiles_the_unet_once(compose, tmp_path, compiled_once, conditioning):
    counter, frames, _ = compiled_once
    cfg = compose(*QUIET, "stage=diffusion", "autoencoder=identity", "unet=tiny", "max_steps=8",
                  "module.warmup_steps=5", "module.num_log_images=0", *conditioning, f"paths.run_dir={tmp_path / 'run'}")
    train_task.fit(cfg)
    assert frames["warm"] >= 1 and counter.frame_count == frames["warm"]


def test_stage1_compiles_encoder_and_decoder_once(compose, tmp_path, compiled_once):
    counter, frames, _ = compiled_once
    cfg = compose(*QUIET, "stage=autoencoder", "autoencoder=kl-f4-small", "max_steps=6", "loss.disc_start=4",
                  "module.image_log_every=0", f"paths.run_dir={tmp_path / 'run'}")
    train_task.fit(cfg)
    assert frames["warm"] >= 2 and counter.frame_count == frames["warm"]


def test_sampling_compiles_the_network_once_for_every_solver_step(compose, compiled_once):
    """The sample stage compiles the EMA network (and decoder): one graph serves every solver step and batch."""
    from hydra.utils import instantiate

    counter, _, forbid_recompiles = compiled_once
    module = instantiate(compose("stage=diffusion", "autoencoder=identity", "unet=tiny", "conditioning=class",
                                 "module.conditioning.class.num_classes=10", "module.sampling.guidance_scale=2.0").module)
    module.prepare_for_sampling(compile=True)
    module.generate(3, steps=4, generator=torch.Generator().manual_seed(0))
    after_first = counter.frame_count
    forbid_recompiles()
    module.generate(3, steps=4, generator=torch.Generator().manual_seed(1))
    assert after_first >= 1 and counter.frame_count == after_first
