"""GlobalBatchNorm's CUDA path (PyTorch's fused SyncBatchNorm kernels) on 2 GPUs over NCCL, against nn.BatchNorm2d
on the union of both ranks' slices in one process: outputs, input gradients, parameter gradients summed over ranks
and running statistics, for float32 and bfloat16, contiguous and channels-last, equal and unequal slices (one of
them empty). The CPU path is tested in tests/test_sync_batch_norm.py; this covers what a CPU cannot run.

    python experiments/scaling/check_global_batch_norm.py     # needs 2 GPUs; exits 1 on a mismatch
"""

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_ldm.training.sync_batch_norm import to_global_batch_norm

CHANNELS = 16
CASES = [(dtype, layout, sizes) for dtype in (torch.float32, torch.bfloat16)
         for layout in (torch.contiguous_format, torch.channels_last) for sizes in ((6, 6), (9, 3), (12, 0))]


def _inputs(dtype, layout, device):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(12, CHANNELS, 10, 9, generator=generator) * 3 + 1).to(device, dtype)
    weights = torch.randn(12, CHANNELS, 10, 9, generator=generator).to(device, dtype)
    return x.contiguous(memory_format=layout), weights


def _norm(device):
    torch.manual_seed(1)
    norm = nn.BatchNorm2d(CHANNELS, momentum=0.3).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


def _run(norm, x, weights):
    x = x.detach().clone().requires_grad_(True)
    for _ in range(2):
        y = norm(x)
    (weights.float() * y.float()).sum().backward()
    return [y.detach().float(), x.grad.float(), norm.weight.grad, norm.bias.grad, norm.running_mean, norm.running_var]


def _worker(rank, init_file, out_dir):
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2, device_id=device)
    results = []
    for dtype, layout, sizes in CASES:
        x, weights = _inputs(dtype, layout, device)
        part = slice(0, sizes[0]) if rank == 0 else slice(sizes[0], 12)
        norm = to_global_batch_norm(nn.Sequential(_norm(device)))[0]
        results.append([t.cpu() for t in _run(norm, x[part], weights[part])])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "rendezvous"), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    failures = 0
    for index, (dtype, layout, sizes) in enumerate(CASES):
        x, weights = _inputs(dtype, layout, torch.device("cuda", 0))
        y, dx, dw, db, running_mean, running_var = [t.cpu() for t in _run(_norm(x.device), x, weights)]
        r0, r1 = ranks[0][index], ranks[1][index]
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
        checks = {"y": (torch.cat([r0[0], r1[0]]), y), "dx": (torch.cat([r0[1], r1[1]]), dx),
                  "dweight": (r0[2] + r1[2], dw), "dbias": (r0[3] + r1[3], db),
                  "running_mean": (r0[4], running_mean), "running_var": (r0[5], running_var),
                  "ranks agree": (r1[5], r0[5])}
        bad = []
        for name, (ours, reference) in checks.items():
            try:
                torch.testing.assert_close(ours, reference, **tol)
            except AssertionError:
                bad.append(f"{name} (max |diff| {(ours - reference).abs().max().item():.3g})")
        failures += bool(bad)
        label = f"{str(dtype).split('.')[-1]:8s} {str(layout).split('.')[-1]:17s} slices {sizes}"
        print(f"{label}: {'ok' if not bad else 'MISMATCH ' + ', '.join(bad)}")
    print("GlobalBatchNorm on 2 GPUs matches BatchNorm2d over the union" if not failures
          else f"{failures} of {len(CASES)} cases differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
