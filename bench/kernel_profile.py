#!/usr/bin/env python3
"""Where a packtrain training step spends its GPU time, per kernel, from Nsight Compute.

    python3 bench/kernel_profile.py BIN [--model tinyllama-1.1b] [--no-recompute] [--top 25]

Runs `BIN bench --model M --warmup 0 --steps 1` under `ncu --metrics gpu__time_duration.sum`
(clocks left alone: --clock-control none), so every kernel of the first training step is timed
on its own (ncu serialises kernels: launch gaps and overlap are not in these numbers, and
the first step also pays one-off costs such as cuBLAS heuristics, which are host-side).
Prints kernels grouped by name: total ms, share, count, mean us, sorted by total.

The profiled step is the first, so packtrain's GEMM algorithm tuning (which times up to 17
candidates per shape bucket on first use) would be profiled with it: the script sets
PACKTRAIN_GEMM_TUNE=0 (cuBLASLt's heuristic choice per shape; the tuned GEMMs of a real run are
a few percent faster) unless --tune is given.
"""

import argparse
import collections
import csv
import io
import os
import subprocess
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--model", default="tinyllama-1.1b")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--no-recompute", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--ncu", default="ncu")
    ap.add_argument("--tune", action="store_true",
                    help="keep GEMM tuning on (its timing runs are then part of the profile)")
    args = ap.parse_args()
    cmd = [args.ncu, "--clock-control", "none", "--metrics", "gpu__time_duration.sum",
           "--csv", "--print-units", "base", args.binary, "bench", "--model", args.model,
           "--tokens", str(args.tokens), "--warmup", "0", "--steps", "1"]
    if args.no_recompute:
        cmd.append("--no-recompute")
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ)
    if not args.tune:
        env["PACKTRAIN_GEMM_TUNE"] = "0"
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-3000:], sep="\n")
        return p.returncode
    # ncu prints its own log lines before the CSV; the CSV starts at the header row.
    text = p.stdout[p.stdout.find('"ID"'):]
    total = collections.defaultdict(float)
    count = collections.Counter()
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row["Kernel Name"].split("(")[0]
        ns = float(row["Metric Value"].replace(",", ""))
        total[name] += ns
        count[name] += 1
    all_ns = sum(total.values())
    print(f"\n{args.model}, {args.tokens} tokens, recompute {'off' if args.no_recompute else 'config'}: "
          f"{sum(count.values())} kernels, {all_ns / 1e6:.1f} ms of kernel time in the step\n")
    print(f"{'kernel':60} {'ms':>8} {'share':>6} {'count':>6} {'mean us':>9}")
    for name, ns in sorted(total.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{name[:60]:60} {ns / 1e6:8.2f} {100 * ns / all_ns:5.1f}% {count[name]:6d} "
              f"{ns / count[name] / 1e3:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
