#!/usr/bin/env python3
"""PyTorch DDP baseline of packtrain's distributed training: transformers' LlamaForCausalLM
under DistributedDataParallel, one process per GPU, on the packed batches written by
`packtrain bench --batches FILE` (the model's shapes and every packed batch).

    torchrun --nproc_per_node 2 bench/ddp_baseline.py --batches batches.json --json ddp.json

The model and step are those of bench/torch_baseline.py (fp32 weights, bf16 autocast, fused
AdamW, clip 1.0, gradient checkpointing when the file says `recompute`, packing through
position_ids, `--attn flex` by default: flex_attention with a document BlockMask). Step i of
rank r trains on batch i * world + r, so every rank has its own 16384-token batch and the global
batch grows with the world, as packtrain's plan does. Loss: sum of the token cross-entropies /
the step's global target count, times world (DDP averages the gradients over ranks), so the
update is packtrain's (one global normalisation).

DDP: bucket_cap_mb 32 (packtrain's dist.bucket_mb), gradient_as_bucket_view, NCCL; the
all-reduce of each bucket overlaps the backward. Reported by rank 0 as one JSON line: median and
mean step time, tokens/s of all ranks together (mean global tokens of a timed step / median step
time, and timed tokens / timed seconds), peak memory of rank 0.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_baseline import hf_config, step_flops, to_device_batch  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", required=True)
    p.add_argument("--json")
    p.add_argument("--attn", choices=["sdpa", "flex"], default="flex")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--bucket-mb", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    args = p.parse_args()

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(seconds=300))

    with open(args.batches) as f:
        spec = json.load(f)
    m = spec["config"]
    n_steps = args.warmup + args.steps
    records = spec["batches"]
    if len(records) < n_steps * world:
        sys.exit(f"{args.batches} holds {len(records)} batches, {n_steps * world} needed")
    torch.backends.cuda.matmul.allow_tf32 = False

    torch.manual_seed(spec.get("seed", 0))
    with device:
        model = LlamaForCausalLM(hf_config(m, args.attn))
    model.float().train()
    if spec["recompute"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in model.parameters())
    ddp = DDP(model, device_ids=[local], bucket_cap_mb=args.bucket_mb,
              gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1, fused=True)

    steps = []  # per step: (this rank's batch, global tokens, global targets, all cu_seqlens)
    for i in range(n_steps):
        recs = records[i * world:(i + 1) * world]
        mine = to_device_batch(recs[rank], device)
        all_b = [to_device_batch(r, "cpu") for r in recs]
        steps.append((mine, sum(b[4][-1] for b in all_b), sum(b[3] for b in all_b),
                      [b[4] for b in all_b]))

    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i, ((ids, pos, targets, _, _), _, g_targets, _) in enumerate(steps):
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = ddp(input_ids=ids, position_ids=pos, use_cache=False).logits
        loss_sum = F.cross_entropy(logits[0].float(), targets, ignore_index=-100,
                                   reduction="sum")
        (loss_sum * (world / max(g_targets, 1))).backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0, foreach=True)
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        ls = loss_sum.detach().clone()
        dist.all_reduce(ls)
        losses.append(ls.item() / max(g_targets, 1))
        if rank == 0:
            print(f"step {i + 1}/{n_steps}{' (warm-up)' if i < args.warmup else ''}: "
                  f"{times[-1] * 1e3:.1f} ms, loss {losses[-1]:.4f}", file=sys.stderr)

    timed = times[args.warmup:]
    timed_steps = steps[args.warmup:]
    tokens = sum(s[1] for s in timed_steps)
    flops = 0.0
    for s in timed_steps:
        for cu in s[3]:
            d, a = step_flops(m, n_params, cu)
            flops += d + a
    n = len(timed)
    med = statistics.median(timed)
    peak = torch.cuda.max_memory_allocated()
    if rank == 0:
        result = {
            "impl": "torch-ddp",
            "model": spec["model"],
            "world": world,
            "device": torch.cuda.get_device_name(local),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "attn": args.attn,
            "recompute": spec["recompute"],
            "bucket_mb": args.bucket_mb,
            "params": n_params,
            "tokens_per_rank_step": tokens / n / world,
            "tokens_per_step": tokens / n,
            "step_ms_median": med * 1e3,
            "step_ms_mean": statistics.mean(timed) * 1e3,
            "tokens_per_s": tokens / n / med,
            "tokens_per_s_all_steps": tokens / sum(timed),
            "mfu_per_gpu": flops / n / med / world / spec["peak_flops"],
            "peak_mem_gib_rank0": peak / 2 ** 30,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "warmup": args.warmup,
            "steps": n,
        }
        line = json.dumps(result)
        print(line)
        if args.json:
            with open(args.json, "w") as f:
                f.write(line + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
