#!/usr/bin/env python3
"""NCCL all-reduce bus bandwidth through PyTorch, as nccl-tests reports it:
busbw = bytes * 2 (n - 1) / n / time. One process per GPU:

    torchrun --nproc_per_node 2 bench/nccl_allreduce_bw.py [--mib 1024] [--json out.json]
"""
import argparse
import datetime
import json
import os
import time

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json")
    a = p.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=dev, timeout=datetime.timedelta(seconds=120))
    x = torch.ones(a.mib * 2 ** 20 // 4, dtype=torch.float32, device=dev)
    for _ in range(5):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    t = (time.perf_counter() - t0) / a.iters
    nbytes = x.numel() * 4
    busbw = nbytes * 2 * (world - 1) / world / t / 1e9
    if rank == 0:
        r = {"world": world, "bytes": nbytes, "ms": t * 1e3, "algbw_gbs": nbytes / t / 1e9,
             "busbw_gbs": busbw, "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
        print(json.dumps(r))
        if a.json:
            with open(a.json, "w") as f:
                f.write(json.dumps(r) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
