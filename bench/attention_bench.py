#!/usr/bin/env python3
"""PyTorch's FlashAttention-2 varlen (torch.ops.aten._flash_attention_forward/_backward), causal,
on packed log-normal documents: the peer of packtrain's flash attention.

    python3 bench/attention_bench.py [--tokens 16384] [--lens-out FILE]

Documents: log-normal lengths, median 400, sigma 0.9, clipped to [1, 4096], drawn with seed 0
until they sum to --tokens (the last one cut short). --lens-out writes them (space-separated)
for `PACKTRAIN_BENCH_LENS=FILE cargo test --release --lib flash_attention_bench -- --ignored`,
so both sides time the same documents. Shapes: H=16, Hkv=4, D=128 and H=32, Hkv=8, D=64, bf16.
TFLOP/s count only the causal work: sum over documents of 2 L^2 D H forward, 2.5x backward.
"""

import argparse

import numpy as np
import torch


def lengths(tokens: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    out, left = [], tokens
    while left > 0:
        n = int(np.clip(round(float(np.exp(np.log(400.0) + 0.9 * rng.standard_normal()))), 1, 4096))
        n = min(n, left)
        out.append(n)
        left -= n
    return out


def median_ms(fn, warmup: int = 3, reps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--lens-out")
    args = ap.parse_args()
    lens = lengths(args.tokens)
    if args.lens_out:
        with open(args.lens_out, "w") as f:
            f.write(" ".join(map(str, lens)) + "\n")
    t = sum(lens)
    l2 = float(sum(n * n for n in lens))
    cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32, device="cuda")
    max_l = max(lens)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; T = {t}, {len(lens)} documents, longest {max_l}")
    for h, hkv, d in [(16, 4, 128), (32, 8, 64)]:
        g = torch.Generator(device="cuda").manual_seed(1)
        q = torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
        do = torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        flops = 2.0 * l2 * d * h

        def fwd():
            return torch.ops.aten._flash_attention_forward(
                q, k, v, cu, cu, max_l, max_l, 0.0, True, False
            )

        try:
            o, lse, rng_state, unused, _ = fwd()
            tf = median_ms(fwd)

            def bwd():
                return torch.ops.aten._flash_attention_backward(
                    do, q, k, v, o, lse, cu, cu, max_l, max_l, 0.0, True, rng_state, unused
                )

            tb = median_ms(bwd)
            print(
                f"BENCH aten-flash-varlen H={h} Hkv={hkv} D={d} T={t}: fwd {tf:.3f} ms {flops / tf / 1e9:.1f} TFLOP/s"
                f" | bwd {tb:.3f} ms {2.5 * flops / tb / 1e9:.1f} TFLOP/s | fwd+bwd {3.5 * flops / (tf + tb) / 1e9:.1f} TFLOP/s"
            )
        except Exception as e:  # report and go on to the next shape
            print(f"BENCH aten-flash-varlen H={h} Hkv={hkv} D={d}: failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
