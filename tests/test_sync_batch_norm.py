"""GlobalBatchNorm on two gloo ranks, each holding part of a batch (equal, unequal, or one slice empty), against
nn.BatchNorm2d on the whole batch in one process: outputs, input gradients, parameter gradients (summed over
ranks, as DDP's all-reduce before averaging) and running statistics must agree. This runs the CPU form of its
formulas; experiments/scaling/check_global_batch_norm.py checks the fused CUDA kernels on two GPUs. Also the
trainer=ddp wiring."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_ldm.training.sync_batch_norm import GlobalBatchNorm, GlobalBatchNormSync, to_global_batch_norm

CHANNELS = 3


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, CHANNELS, 4, 5, generator=generator) * 3 + 1
    weights = torch.randn(6, CHANNELS, 4, 5, generator=generator)  # loss = sum(weights * y): a non-trivial dL/dy
    return x, weights


def _norm(cls) -> nn.Module:
    torch.manual_seed(1)
    norm = cls(CHANNELS, momentum=0.3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


def _worker(rank: int, init_file: str, out_dir: str, sizes: tuple[int, int]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x, weights = _batch()
        start = 0 if rank == 0 else sizes[0]
        part = slice(start, start + sizes[rank])
        norm = to_global_batch_norm(nn.Sequential(_norm(nn.BatchNorm2d)))[0]
        assert isinstance(norm, GlobalBatchNorm)
        x_part = x[part].clone().requires_grad_(True)
        for _ in range(2):  # twice: running statistics after two updates
            y = norm(x_part)
        (weights[part] * y).sum().backward()
        torch.save({"y": y.detach(), "dx": x_part.grad, "dw": norm.weight.grad, "db": norm.bias.grad,
                    "running_mean": norm.running_mean, "running_var": norm.running_var,
                    "tracked": norm.num_batches_tracked}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [(3, 3), (5, 1), (6, 0)])
def test_two_ranks_normalise_like_one_batchnorm_over_their_union(tmp_path, sizes):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), sizes), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    x, weights = _batch()
    reference = _norm(nn.BatchNorm2d)
    x = x.clone().requires_grad_(True)
    for _ in range(2):
        y = reference(x)
    (weights * y).sum().backward()

    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), **close)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), x.grad, **close)
    torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], reference.weight.grad, **close)
    torch.testing.assert_close(ranks[0]["db"] + ranks[1]["db"], reference.bias.grad, **close)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], reference.running_mean, **close)
        torch.testing.assert_close(r["running_var"], reference.running_var, **close)
        assert int(r["tracked"]) == 2


def test_without_a_process_group_it_is_batchnorm_and_keeps_the_state_dict():
    plain = _norm(nn.BatchNorm2d)
    converted = to_global_batch_norm(nn.Sequential(_norm(nn.BatchNorm2d)))
    assert converted[0].weight is not None and set(converted.state_dict()) == {f"0.{k}" for k in plain.state_dict()}
    x, _ = _batch()
    torch.testing.assert_close(converted(x), plain(x))
    torch.testing.assert_close(converted[0].running_var, plain.running_var)


@pytest.mark.parametrize("sync", [True, False])
def test_trainer_ddp_converts_the_discriminator_when_sync_batchnorm_is_on(compose, sync):
    from hydra.utils import instantiate

    from lightning_ldm.training.ddp import DDPOnCurrentStreamStrategy

    cfg = compose("stage=autoencoder", "trainer=ddp", f"trainer.sync_batchnorm={str(sync).lower()}")
    trainer = instantiate(cfg.trainer, accelerator="cpu", devices=1, precision="32-true", logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, DDPOnCurrentStreamStrategy)
    assert isinstance(strategy._layer_sync, GlobalBatchNormSync) if sync else strategy._layer_sync is None
    if sync:
        discriminator = instantiate(cfg.module).loss.discriminator
        strategy._layer_sync.apply(discriminator)
        norms = [m for m in discriminator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, GlobalBatchNorm) for m in norms)
