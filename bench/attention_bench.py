#!/usr/bin/env python3
"""Varlen causal attention in PyTorch on packed log-normal documents: the peers of packtrain's
flash attention, timed on the same inputs in one run.

    python3 bench/attention_bench.py [--tokens 16384,65536] [--impls aten,flex]
                                     [--lens-out PREFIX] [--json FILE]

Implementations (bf16 in and out, causal within each document, scale 1/sqrt(D), GQA):
- aten: FlashAttention-2 varlen, `torch.ops.aten._flash_attention_forward/_backward` on
  q [T, H, D], k, v [T, Hkv, D] and `cu_seqlens` (GQA native). fwd and bwd are timed apart;
  fwd+bwd is their sum.
- flex: `torch.nn.attention.flex_attention` under `torch.compile(dynamic=False, fullgraph=True)`
  on [1, H, T, D] / [1, Hkv, T, D] contiguous copies of the same tensors (the transposes are
  not timed), `enable_gqa=True`, a document-causal `BlockMask` (128 x 128 blocks). fwd is the
  training forward (inputs require grad, so it also writes the logsumexp, as aten's does);
  fwd+bwd is one forward plus `torch.autograd.grad`; bwd is reported as (fwd+bwd) - fwd.
  The BlockMask is built from the document lengths directly, 128-row chunks at a time, never
  the [T, T] mask that `create_block_mask` would materialise (4.3e9 pairs at T = 65536);
  at start it is checked against `create_block_mask` on a small batch, and each row reports
  flex's output against aten's (relative error, flagged above 2e-2).

Compile cost: one compile (forward and backward kernels together) per (T, shape) pair, so 4
with the defaults; each row's note gives its seconds. A cold compile can take 90 s or more;
inductor's on-disk cache (/tmp/torchinductor_$USER) makes later runs much faster.

Documents: log-normal lengths, median 400, sigma 0.9, clipped to [1, 4096], drawn with seed 0
until they sum to T (the last one cut short); the same for every shape. Shapes: H=16, Hkv=4,
D=128 and H=32, Hkv=8, D=64. Inputs: standard normal, bf16, seed 1.
Timing: CUDA events, median of --reps calls (default 20) after --warmup calls (default 3).
TFLOP/s count only the causal work: sum over documents of 2 L^2 D H forward, 2.5x that
backward, 3.5x fwd+bwd.

--lens-out PREFIX writes PREFIX.<T>.txt per token count (space-separated lengths; a trailing
.txt on PREFIX is dropped), so packtrain times the same documents:
`packtrain attention-bench --lens PREFIX.16384.txt,PREFIX.65536.txt`. --json FILE writes every row (and the lengths) as one JSON object.
A shape or implementation that fails prints its error in its row (the traceback on stderr)
and the run goes on.
"""

import argparse
import json
import sys
import time
import traceback

import numpy as np
import torch

SHAPES = [(16, 4, 128), (32, 8, 64)]
FLEX_BLOCK = 128
# Flex's output against aten's: bf16 rounding of two different summation orders gives a few
# 1e-3; a wrong mask gives order 1.
FLEX_ERR_FLAG = 2e-2


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


def lens_path(prefix: str, tokens: int) -> str:
    if prefix.endswith(".txt"):
        prefix = prefix[: -len(".txt")]
    return f"{prefix}.{tokens}.txt"


def one_line(e: BaseException, limit: int = 300) -> str:
    """A table cell for an exception: the first line of it and of each cause. The whole
    traceback goes to stderr."""
    traceback.print_exception(e, file=sys.stderr)
    parts, seen = [], set()
    while e is not None and id(e) not in seen and len(parts) < 4:
        seen.add(id(e))
        first = (str(e).strip().splitlines() or [""])[0]
        parts.append(f"{type(e).__name__}: {first}")
        e = e.__cause__ or e.__context__
    s = " <- ".join(parts).replace("|", "/")
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ---------------------------------------------------------------- flex block mask

def document_ids(lens: list[int], padded: int, device) -> torch.Tensor:
    """[padded] int32: the document of each position, -1 past the last token."""
    t = sum(lens)
    doc = torch.full((padded,), -1, dtype=torch.int32, device=device)
    doc[:t] = torch.repeat_interleave(
        torch.arange(len(lens), dtype=torch.int32, device=device),
        torch.tensor(lens, dtype=torch.int64, device=device),
    )
    return doc


def dense_to_ordered(dense: torch.Tensor):
    """[nq, nk] bool -> (num [1, 1, nq], indices [1, 1, nq, nk]) int32, the BlockMask format:
    row i's first num[i] indices are its blocks."""
    dense = dense.to(torch.int32)
    num = dense.sum(dim=-1).to(torch.int32)
    idx = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def ordered_to_dense(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The inverse of dense_to_ordered for one [1, 1, ...] mask: [nq, nk] bool."""
    num, idx = num[0, 0].long(), idx[0, 0].long()
    valid = torch.arange(idx.shape[-1], device=idx.device)[None, :] < num[:, None]
    return torch.zeros_like(valid).scatter_(1, idx, valid)


def document_block_mask(lens: list[int], device, block: int = FLEX_BLOCK):
    """A document-causal BlockMask for flex_attention: query i sees key j iff both lie in the
    same document and j <= i. A block is full when all block x block pairs are allowed (no
    mask_mod call), partial when some are, absent when none."""
    from torch.nn.attention.flex_attention import BlockMask

    t = sum(lens)
    nb = (t + block - 1) // block
    tp = nb * block
    doc = document_ids(lens, tp, device)
    pos = torch.arange(tp, device=device)
    partial = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    full = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    rows = max(1, (1 << 26) // (tp * block))  # query blocks per chunk: ~64M pairs at a time
    for i0 in range(0, nb, rows):
        i1 = min(nb, i0 + rows)
        q = pos[i0 * block : i1 * block]
        allowed = (
            (doc[q][:, None] == doc[None, :])
            & (pos[None, :] <= q[:, None])
            & (q[:, None] < t)
            & (pos[None, :] < t)
        )
        count = allowed.view(i1 - i0, block, nb, block).sum(dim=(1, 3))
        partial[i0:i1] = (count > 0) & (count < block * block)
        full[i0:i1] = count == block * block

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    kv_num, kv_idx = dense_to_ordered(partial)
    full_num, full_idx = dense_to_ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block,
        mask_mod=document_causal,
        seq_lengths=(t, t),
    )


def check_block_mask(device) -> None:
    """Our BlockMask against create_block_mask's on a small ragged batch (T = 1000, not a
    multiple of 128): same partial and full blocks. Raises on a difference."""
    from torch.nn.attention.flex_attention import create_block_mask

    lens = lengths(1000, seed=3)
    ours = document_block_mask(lens, device)
    doc = document_ids(lens, sum(lens), device)

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    ref = create_block_mask(document_causal, None, None, sum(lens), sum(lens), device=device)
    for what in ("kv", "full_kv"):
        a = ordered_to_dense(getattr(ours, f"{what}_num_blocks"), getattr(ours, f"{what}_indices"))
        b = ordered_to_dense(getattr(ref, f"{what}_num_blocks"), getattr(ref, f"{what}_indices"))
        if a.shape != b.shape or not torch.equal(a, b):
            raise RuntimeError(f"block mask self-check: {what} blocks differ from create_block_mask")


# ---------------------------------------------------------------- timing

def time_aten(q, k, v, do, cu, max_l, warmup, reps):
    def fwd():
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_l, max_l, 0.0, True, False)

    o, lse, rng_state, unused, _ = fwd()
    tf = median_ms(fwd, warmup, reps)

    def bwd():
        return torch.ops.aten._flash_attention_backward(
            do, q, k, v, o, lse, cu, cu, max_l, max_l, 0.0, True, rng_state, unused
        )

    tb = median_ms(bwd, warmup, reps)
    return {"fwd_ms": tf, "bwd_ms": tb, "fwd_bwd_ms": tf + tb, "bwd_derived": False}, o


def time_flex(flex, block_mask, q, k, v, do, o_aten, warmup, reps):
    # [T, H, D] -> [1, H, T, D], contiguous (the layout flex's kernels read best); untimed.
    def bhtd(x, grad):
        return x.transpose(0, 1).contiguous().unsqueeze(0).requires_grad_(grad)

    qf, kf, vf, dof = bhtd(q, True), bhtd(k, True), bhtd(v, True), bhtd(do, False)

    def fwd():
        return flex(qf, kf, vf, block_mask=block_mask, enable_gqa=True)

    def fwd_bwd():
        o = fwd()
        return torch.autograd.grad(o, (qf, kf, vf), dof)

    t0 = time.perf_counter()
    fwd_bwd()  # compiles forward and backward
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    # The grad-mode forward, detached: a no_grad call would compile a second graph.
    o = fwd().detach()[0].transpose(0, 1).float()
    err = None
    if o_aten is not None:
        ref = o_aten.float()
        err = float(torch.linalg.vector_norm(o - ref) / torch.linalg.vector_norm(ref))
    tf = median_ms(fwd, warmup, reps)
    tfb = median_ms(fwd_bwd, warmup, reps)
    row = {"fwd_ms": tf, "bwd_ms": tfb - tf, "fwd_bwd_ms": tfb, "bwd_derived": True}
    row["compile_s"] = compile_s
    row["out_rel_err_vs_aten"] = err
    return row


# ---------------------------------------------------------------- table

def fmt(x, spec):
    return "" if x is None else format(x, spec)


def render(rows) -> str:
    head = (
        "| T | docs | shape | impl | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | fwd+bwd ms"
        " | fwd+bwd TFLOP/s | out vs aten | note |"
    )
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for r in rows:
        shape = f"H={r['h']} Hkv={r['hkv']} D={r['d']}"
        cells = [str(r["tokens"]), str(r["docs"]), shape, r["impl"]]
        if r.get("error"):
            cells += [""] * 7 + [f"failed: {r['error']}"]
        else:
            f = r["flops_fwd"]
            bwd_ms = fmt(r["bwd_ms"], ".3f") + (" ~" if r["bwd_derived"] else "")
            cells += [
                fmt(r["fwd_ms"], ".3f"),
                fmt(f / r["fwd_ms"] / 1e9, ".1f"),
                bwd_ms,
                fmt(2.5 * f / r["bwd_ms"] / 1e9, ".1f") if r["bwd_ms"] > 0 else "",
                fmt(r["fwd_bwd_ms"], ".3f"),
                fmt(3.5 * f / r["fwd_bwd_ms"] / 1e9, ".1f"),
                fmt(r.get("out_rel_err_vs_aten"), ".1e"),
                r.get("note", ""),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="16384,65536", help="comma-separated token counts T")
    ap.add_argument("--impls", default="aten,flex", help="comma-separated: aten, flex")
    ap.add_argument("--lens-out", metavar="PREFIX", help="write PREFIX.<T>.txt per token count")
    ap.add_argument("--json", metavar="FILE", help="write every row as JSON")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    token_counts = [int(x) for x in args.tokens.split(",") if x.strip()]
    impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    for i in impls:
        if i not in ("aten", "flex"):
            sys.exit(f"--impls: unknown implementation {i!r} (aten, flex)")
    device = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")

    flex, flex_setup_error = None, None
    if "flex" in impls:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
            check_block_mask(device)
            flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
        except Exception as e:  # every flex row reports it
            flex_setup_error = one_line(e)

    rows, all_lens = [], {}
    print(render([]))  # the header; each row follows as it is measured
    for tokens in token_counts:
        lens = lengths(tokens)
        all_lens[tokens] = lens
        if args.lens_out:
            path = lens_path(args.lens_out, tokens)
            with open(path, "w") as f:
                f.write(" ".join(map(str, lens)) + "\n")
            print(f"wrote {path}")
        t = sum(lens)
        l2 = float(sum(n * n for n in lens))
        cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32, device=device)
        max_l = max(lens)
        print(f"T = {t}: {len(lens)} documents, longest {max_l}, sum L^2 = {l2:.4g}")
        block_mask, mask_error = None, flex_setup_error
        if flex is not None:
            try:
                t0 = time.perf_counter()
                block_mask = document_block_mask(lens, device)
                torch.cuda.synchronize()
                print(f"  flex BlockMask built in {time.perf_counter() - t0:.2f} s")
            except Exception as e:
                mask_error = one_line(e)
        for h, hkv, d in SHAPES:
            g = torch.Generator(device="cuda").manual_seed(1)
            q = torch.randn(t, h, d, device=device, dtype=torch.bfloat16, generator=g)
            k = torch.randn(t, hkv, d, device=device, dtype=torch.bfloat16, generator=g)
            v = torch.randn(t, hkv, d, device=device, dtype=torch.bfloat16, generator=g)
            do = torch.randn(t, h, d, device=device, dtype=torch.bfloat16, generator=g)
            base = {"tokens": t, "docs": len(lens), "h": h, "hkv": hkv, "d": d}
            base["flops_fwd"] = 2.0 * l2 * d * h
            o_aten = None
            if "aten" in impls:
                row = dict(base, impl="aten")
                try:
                    r, o_aten = time_aten(q, k, v, do, cu, max_l, args.warmup, args.reps)
                    row.update(r)
                except Exception as e:  # report and go on
                    row["error"] = one_line(e)
                rows.append(row)
                print(render(rows[-1:]).splitlines()[-1], flush=True)
            if "flex" in impls:
                row = dict(base, impl="flex")
                if mask_error is not None:
                    row["error"] = mask_error
                else:
                    try:
                        r = time_flex(flex, block_mask, q, k, v, do, o_aten, args.warmup, args.reps)
                        row.update(r)
                        note = f"compile {r['compile_s']:.1f} s"
                        err = r["out_rel_err_vs_aten"]
                        if err is not None and not (err <= FLEX_ERR_FLAG):
                            note += f"; OUTPUT DIFFERS FROM ATEN (> {FLEX_ERR_FLAG:g})"
                        row["note"] = note
                    except Exception as e:
                        row["error"] = one_line(e)
                rows.append(row)
                print(render(rows[-1:]).splitlines()[-1], flush=True)
            del q, k, v, do, o_aten
            torch.cuda.empty_cache()

    print()
    print(
        "Causal TFLOP/s (sum over documents of 2 L^2 D H forward, 2.5x backward, 3.5x fwd+bwd);"
        f" median of {args.reps} CUDA-event-timed calls; bwd ~: (fwd+bwd) - fwd."
    )
    print(render(rows))
    if args.json:
        out = {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(),
            "reps": args.reps,
            "warmup": args.warmup,
            "rows": rows,
            "lens": {str(k): v for k, v in all_lens.items()},
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
