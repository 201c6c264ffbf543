"""What an all-reduce of the LDM-4 UNet's gradient costs on this machine, without any model: the floor under
DDP's communication, to compare with what a training step loses per GPU.

    python experiments/scaling/allreduce_bench.py --world 2 --out allreduce-2gpu.json   # one process per GPU
    python experiments/scaling/allreduce_bench.py --world 2 --device cpu --total-mb 8    # CPU check (gloo)

For each bucket size it all-reduces ``--total-mb`` of fp32 (the UNet's 274.1M gradients are 1,096 MB) as DDP
does with no_optimization: every bucket issued back to back once the backward pass is done, then one wait. Prints
the median time over ``--iters`` rounds, the algorithm bandwidth (bytes / time) and NCCL's bus bandwidth
(algbw x 2(N-1)/N, the per-link rate a ring achieves), so a slow interconnect is told apart from DDP's own cost.
NCCL_DEBUG=INFO shows the transport NCCL picked (P2P/IPC over NVLink, SHM, ...).
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def bus_bandwidth(algbw: float, world: int) -> float:
    """NCCL's bus bandwidth of a ring all-reduce: each rank sends and receives 2(N-1)/N of the buffer."""
    return algbw * 2 * (world - 1) / world


def time_buckets(total_bytes: int, bucket_bytes: int, device: torch.device, iters: int) -> float:
    """Median seconds to all-reduce total_bytes of fp32 in buckets of bucket_bytes, issued back to back."""
    numel = total_bytes // 4
    flat = torch.ones(numel, dtype=torch.float32, device=device)
    step = max(1, bucket_bytes // 4)
    buckets = [flat[i:i + step] for i in range(0, numel, step)]

    def round_trip() -> None:
        works = [dist.all_reduce(b, async_op=True) for b in buckets]
        for work in works:
            work.wait()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):  # NCCL builds its rings and channels on first use
        round_trip()
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        round_trip()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank: int, args: argparse.Namespace, results: dict) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=args.world,
                            device_id=device if device.type == "cuda" else None)
    total = int(args.total_mb * 2**20)
    rows = []
    for bucket_mb in args.bucket_mb:
        seconds = time_buckets(total, int(bucket_mb * 2**20), device, args.iters)
        algbw = total / seconds / 1e9
        rows.append({"total_mb": args.total_mb, "bucket_mb": bucket_mb, "ms": round(seconds * 1e3, 3),
                     "algbw_gb_s": round(algbw, 1), "busbw_gb_s": round(bus_bandwidth(algbw, args.world), 1)})
        if rank == 0:
            print(f"{args.world} ranks, {args.total_mb:g} MB in {bucket_mb:g} MB buckets: {seconds * 1e3:8.2f} ms, "
                  f"algbw {algbw:6.1f} GB/s, busbw {bus_bandwidth(algbw, args.world):6.1f} GB/s", flush=True)
    if rank == 0:
        results["rows"] = rows
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--total-mb", type=float, default=1096.0, help="the LDM-4 UNet's fp32 gradient")
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[25.0, 200.0, 1096.0],
                        help="25 is DDP's default bucket_cap_mb")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--port", type=int, default=29561)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(args, results), nprocs=args.world)
        record = {"world": args.world, "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                  "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version()))
                  if args.device == "cuda" else None, "rows": list(results.get("rows", []))}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
