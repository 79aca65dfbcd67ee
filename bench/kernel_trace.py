#!/usr/bin/env python3
"""Summarise kernel timelines written by bench/kernel_trace.c (via bench/kernel_trace.sh).

    kernel_trace.py TRACE.csv [TRACE.csv ...]

A step ends with the AdamW kernel. For one file: per step, the span from its first record to
AdamW's end, the time the GPU was busy (union of the records), the gaps, the time and count per
kernel family, and the longest gaps with their neighbours. For several files (the same command
with a feature on and off): per family, the sum over the steps after the first three, side by
side, so one change's kernels can be compared on the same batches.
"""
import collections
import sys

FAMILIES = [
    ("memset", "memset"), ("memcpy", "memcpy"), ("nvjet", "gemm"), ("gemm", "gemm"),
    ("cutlass", "gemm"), ("flash_fwd", "flash fwd"), ("dkdv_reduce", "flash dkdv reduce"),
    ("dkdv", "flash dkdv"), ("bwd_dq", "flash dq"), ("bwd_pre", "flash pre"),
    ("rope", "rope"), ("adamw", "adamw"), ("sum_squares", "grad norm"), ("rmsnorm", "rmsnorm"),
    ("swiglu", "swiglu"), ("classifier", "classifier"), ("embedding", "embedding"),
    ("nccl", "nccl"),
]


def family(name):
    for key, fam in FAMILIES:
        if key in name:
            return fam
    return "other"


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split(",", 4)
            if len(parts) == 5:
                rows.append((int(parts[1]), int(parts[2]), parts[4]))
    rows.sort()
    steps, start = [], 0
    for i, r in enumerate(rows):
        last_of_run = i + 1 == len(rows) or "adamw" not in rows[i + 1][2]
        if "adamw" in r[2] and last_of_run:
            steps.append(rows[start:i + 1])
            start = i + 1
    return steps


def step_stats(seg):
    by = collections.defaultdict(lambda: [0.0, 0])
    busy, gaps = 0, []
    cur_s, cur_e = seg[0][0], seg[0][1]
    for j, r in enumerate(seg):
        fam = by[family(r[2])]
        fam[0] += (r[1] - r[0]) / 1e6
        fam[1] += 1
        if j == 0:
            continue
        if r[0] > cur_e:
            busy += cur_e - cur_s
            gaps.append((r[0] - cur_e, seg[j - 1][2][:48], r[2][:48]))
            cur_s, cur_e = r[0], r[1]
        else:
            cur_e = max(cur_e, r[1])
    busy += cur_e - cur_s
    span = seg[-1][1] - seg[0][0]
    return span / 1e6, busy / 1e6, gaps, by


def one(path):
    for i, seg in enumerate(load(path)):
        span, busy, gaps, by = step_stats(seg)
        print(f"\nstep {i}: span {span:.2f} ms, busy {busy:.2f} ms, "
              f"{len(gaps)} gaps {span - busy:.3f} ms")
        for fam, (ms, n) in sorted(by.items(), key=lambda x: -x[1][0]):
            print(f"  {fam:20s} {ms:9.3f} ms {n:5d}")
        for g, before, after in sorted(gaps, reverse=True)[:5]:
            print(f"  gap {g / 1e3:7.1f} us after {before} before {after}")


def compare(paths):
    sums = []
    for p in paths:
        tot = collections.defaultdict(float)
        for seg in load(p)[3:]:
            span, busy, _, by = step_stats(seg)
            tot["span"] += span
            tot["busy"] += busy
            for fam, (ms, _) in by.items():
                tot[fam] += ms
        sums.append(tot)
    fams = ["span", "busy"] + sorted({f for s in sums for f in s} - {"span", "busy"})
    print("ms over the steps after the first three")
    print(f"{'family':20s}" + "".join(f"{p.split('/')[-1][:14]:>15s}" for p in paths))
    for f in fams:
        print(f"{f:20s}" + "".join(f"{s.get(f, 0.0):15.3f}" for s in sums))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if len(sys.argv) == 2:
        one(sys.argv[1])
    else:
        compare(sys.argv[1:])
