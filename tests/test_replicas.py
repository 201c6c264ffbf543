"""The DDP replica check: a float64 checksum of each network's parameters, compared over ranks (two gloo processes)."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_ldm.training.replicas import differing_across_ranks, parameter_checksum


def networks() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"UNet": nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8)), "EMA": nn.Linear(4, 4)}


def _worker(rank: int, init_file: str, out_dir: str, drift: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        modules = networks()
        modules["UNet"][1].register_buffer("running", torch.full((8,), float(rank)))  # buffers may differ
        if rank == 1 and drift:
            with torch.no_grad():
                modules["EMA"].weight[0, 0] += drift
        torch.save(differing_across_ranks(modules, torch.device("cpu")), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path, drift: float) -> list[list[str]]:
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), drift), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_identical_replicas_agree(tmp_path):
    assert run_two_ranks(tmp_path, drift=0.0) == [[], []]


def test_one_weight_drifting_on_one_rank_is_named_on_every_rank(tmp_path):
    # 2**-20 on a weight of order 0.1: a change in the last bits of float32, still seen exactly in float64
    assert run_two_ranks(tmp_path, drift=2.0 ** -20) == [["EMA"], ["EMA"]]


def test_checksum_is_the_sum_and_the_sum_of_squares_of_the_parameters():
    linear = nn.Linear(3, 2)
    flat = torch.cat([p.detach().double().flatten() for p in linear.parameters()])
    # Close, not equal: the checksum adds per-parameter sums, a different float64 summation order.
    torch.testing.assert_close(parameter_checksum(linear), torch.stack([flat.sum(), flat.square().sum()]),
                               rtol=1e-14, atol=1e-15)


def test_without_a_process_group_nothing_differs():
    assert differing_across_ranks(networks(), torch.device("cpu")) == []
