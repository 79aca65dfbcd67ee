#!/usr/bin/env python3
"""Parity of packtrain's varlen attention with PyTorch's FlashAttention-2 varlen and with an
fp64 reference, on the inputs and outputs that `packtrain attention-dump` wrote.

    cargo build --release
    target/release/packtrain attention-dump --device cuda --out /tmp/attn-dump
    python3 bench/attention_parity.py /tmp/attn-dump [--json parity.json]

(`--device cpu` dumps the f32 CPU reference instead: a check of this script itself.)

DUMP_DIR holds one `case_<i>/` per case: `meta.json` {"t", "h", "hkv", "d", "n_docs",
"max_seqlen", ...} and raw little-endian row-major files: `qkv.f32` [T, (H + 2 Hkv) D] (each
row q heads | k heads | v heads, bf16-representable values), `dout.f32` [T, H D],
`cu_seqlens.i32` [N + 1], and packtrain's outputs `out.f32` [T, H D], `lse.f32` [H, T]
(natural log of the sum of exp of the scaled scores), `dqkv.f32` [T, (H + 2 Hkv) D] (dq | dk | dv).

For every case, on the same bf16 q, k, v and dout (causal within each document, scale
1/sqrt(D), query head h reads kv head h // (H / Hkv)):
- aten: `torch.ops.aten._flash_attention_forward/_backward` varlen, GQA native; if aten
  refuses H != Hkv, k and v are expanded with repeat_interleave and dk, dv summed over each
  group of H / Hkv query heads;
- ref: naive per-document causal softmax attention in float64 (on the GPU when there is one),
  gradients by autograd.

Each of out, lse, dq, dk, dv is compared three ways: packtrain against aten, packtrain against
ref, and aten against ref (a check of the harness). Printed per case and tensor: relative
error ||a - b|| / ||b|| (absolute when ||b|| = 0) and max |a - b|. The exit code is non-zero
if any relative error exceeds 2e-2 (bf16 operands carry 2^-9 relative rounding, so a correct
kernel sits at a few 1e-3; a wrong mask, index or scale gives order 1) or any value is NaN
or infinite. Without CUDA, aten is skipped and only the reference comparison runs.
"""

import argparse
import json
import math
import os
import re
import sys

import numpy as np
import torch

TOL = 2e-2
TENSORS = ("out", "lse", "dq", "dk", "dv")


class DumpError(Exception):
    pass


def read_raw(path: str, dtype: str, shape: tuple) -> torch.Tensor:
    if not os.path.isfile(path):
        raise DumpError(f"{path}: missing")
    a = np.fromfile(path, dtype=dtype)
    want = math.prod(shape)
    if a.size != want:
        raise DumpError(f"{path}: {a.size} values, {want} expected for shape {list(shape)}")
    return torch.from_numpy(a.reshape(shape).copy())


def load_case(case_dir: str) -> dict:
    with open(os.path.join(case_dir, "meta.json")) as f:
        meta = json.load(f)
    for key in ("t", "h", "hkv", "d", "n_docs", "max_seqlen"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            raise DumpError(f"{case_dir}/meta.json: {key} = {meta.get(key)!r}, want an integer >= 0")
    t, h, hkv, d, n = meta["t"], meta["h"], meta["hkv"], meta["d"], meta["n_docs"]
    if hkv == 0 or h % hkv != 0:
        raise DumpError(f"{case_dir}/meta.json: Hkv = {hkv} does not divide H = {h}")
    w = (h + 2 * hkv) * d
    p = lambda name: os.path.join(case_dir, name)  # noqa: E731
    c = {
        "meta": meta,
        "qkv": read_raw(p("qkv.f32"), "<f4", (t, w)),
        "dout": read_raw(p("dout.f32"), "<f4", (t, h * d)),
        "cu": read_raw(p("cu_seqlens.i32"), "<i4", (n + 1,)),
        "out": read_raw(p("out.f32"), "<f4", (t, h * d)),
        "lse": read_raw(p("lse.f32"), "<f4", (h, t)),
        "dqkv": read_raw(p("dqkv.f32"), "<f4", (t, w)),
    }
    cu = c["cu"].tolist()
    lens = [b - a for a, b in zip(cu, cu[1:])]
    if cu[0] != 0 or cu[-1] != t or min(lens, default=0) < 0:
        raise DumpError(f"{case_dir}/cu_seqlens.i32: {cu[:4]}... must run from 0 up to T = {t}")
    if max(lens, default=0) > meta["max_seqlen"]:
        raise DumpError(f"{case_dir}: a document of {max(lens)} tokens > max_seqlen {meta['max_seqlen']}")
    c["lens"] = lens
    return c


def split_heads(x: torch.Tensor, h: int, hkv: int, d: int):
    """[T, (H + 2 Hkv) D] -> q [T, H, D], k [T, Hkv, D], v [T, Hkv, D]."""
    t = x.shape[0]
    q = x[:, : h * d].reshape(t, h, d)
    k = x[:, h * d : (h + hkv) * d].reshape(t, hkv, d)
    v = x[:, (h + hkv) * d :].reshape(t, hkv, d)
    return q, k, v


def aten_flash(q, k, v, do, cu, max_l, scale):
    """bf16 [T, *, D] on the GPU -> (out [T, H, D], lse [H, T], dq, dk, dv, how), all f32."""
    t, h, d = q.shape
    hkv = k.shape[1]

    def run(k_, v_):
        o, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k_, v_, cu, cu, max_l, max_l, 0.0, True, False, scale=scale
        )
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            do, q, k_, v_, o, lse, cu, cu, max_l, max_l, 0.0, True, rng_state, unused, scale=scale
        )
        return o, lse, dq, dk, dv

    how = "native GQA" if h != hkv else "MHA"
    try:
        o, lse, dq, dk, dv = run(k, v)
    except RuntimeError:
        if h == hkv:
            raise
        g = h // hkv
        o, lse, dq, dk, dv = run(k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1))
        dk = dk.float().reshape(t, hkv, g, d).sum(dim=2)
        dv = dv.float().reshape(t, hkv, g, d).sum(dim=2)
        how = "k/v expanded"
    lse = lse.float()
    if lse.shape == (1, h, t):
        lse = lse[0]
    if lse.shape != (h, t):
        # The padded layout of older FlashAttention builds: [N, H, max_seqlen].
        cu_l = cu.tolist()
        if lse.dim() == 3 and lse.shape[0] == len(cu_l) - 1 and lse.shape[1] == h:
            lse = torch.cat([lse[i, :, : cu_l[i + 1] - cu_l[i]] for i in range(lse.shape[0])], dim=1)
        else:
            raise DumpError(f"aten lse has shape {list(lse.shape)}, expected [{h}, {t}]")
    return o.float(), lse, dq.float(), dk.float(), dv.float(), how


def reference(q, k, v, do, lens, scale):
    """float64 per-document causal attention with autograd: q [T, H, D], k, v [T, Hkv, D],
    do [T, H, D] -> out [T, H, D], lse [H, T], dq, dk, dv. One (document, kv head) at a time,
    so the [G, L, L] scores of a 4096-token document stay small."""
    t, h, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    out = torch.zeros_like(q)
    lse = torch.zeros(h, t, dtype=q.dtype, device=q.device)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    s = 0
    for n in lens:
        if n == 0:
            continue
        rows = slice(s, s + n)
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        for j in range(hkv):
            heads = slice(j * g, (j + 1) * g)
            qd = q[rows, heads].transpose(0, 1).clone().requires_grad_(True)  # [G, L, D]
            kd = k[rows, j].clone().requires_grad_(True)  # [L, D]
            vd = v[rows, j].clone().requires_grad_(True)
            scores = (qd @ kd.transpose(0, 1)) * scale  # [G, L, L]
            scores = scores.masked_fill(~causal, float("-inf"))
            lse_d = torch.logsumexp(scores, dim=-1)  # [G, L]
            o = torch.exp(scores - lse_d[..., None]) @ vd  # [G, L, D]
            gq, gk, gv = torch.autograd.grad(o, (qd, kd, vd), do[rows, heads].transpose(0, 1))
            out[rows, heads] = o.detach().transpose(0, 1)
            lse[heads, rows] = lse_d.detach()
            dq[rows, heads] = gq.transpose(0, 1)
            dk[rows, j] = gk
            dv[rows, j] = gv
        s += n
    return out, lse, dq, dk, dv


def compare(a: torch.Tensor, b: torch.Tensor):
    """(relative error ||a - b|| / ||b|| (absolute when ||b|| = 0), max |a - b|, finite(a))."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    finite = bool(torch.isfinite(a64).all())
    diff = a64 - b64
    nb = float(torch.linalg.vector_norm(b64))
    nd = float(torch.linalg.vector_norm(diff))
    rel = nd / nb if nb > 0 else nd
    mx = float(diff.abs().max()) if diff.numel() else 0.0
    if not finite or math.isnan(rel):
        rel = float("nan")
    return rel, mx, finite


def bad(rel: float) -> bool:
    return not (rel <= TOL)  # NaN counts as bad


def case_dirs(root: str):
    if not os.path.isdir(root):
        raise DumpError(f"{root}: not a directory")
    found = []
    for name in os.listdir(root):
        m = re.fullmatch(r"case_(\d+)", name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    if not found:
        raise DumpError(f"{root}: no case_<i> directories (write them with `packtrain attention-dump`)")
    return [p for _, p in sorted(found)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dump_dir")
    ap.add_argument("--json", metavar="FILE", help="write every comparison as JSON")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    use_aten = dev.type == "cuda"
    print(
        f"torch {torch.__version__}, "
        + (torch.cuda.get_device_name(dev) if use_aten else "no CUDA: aten skipped, reference only")
    )

    results, failures = [], []
    for case_dir in case_dirs(args.dump_dir):
        name = os.path.basename(case_dir)
        c = load_case(case_dir)
        m = c["meta"]
        t, h, hkv, d = m["t"], m["h"], m["hkv"], m["d"]
        scale = 1.0 / math.sqrt(d)
        print(
            f"\n{name}: T={t}, {m['n_docs']} documents (longest {max(c['lens'], default=0)}),"
            f" H={h} Hkv={hkv} D={d}, packtrain backend: {m.get('backend', '?')}"
        )
        # packtrain's tensors, [T, *, D] / [H, T], f32 on the host.
        pq, pk_, pv = split_heads(c["dqkv"], h, hkv, d)
        ours = {"out": c["out"].view(t, h, d), "lse": c["lse"], "dq": pq, "dk": pk_, "dv": pv}
        q, k, v = split_heads(c["qkv"], h, hkv, d)
        do = c["dout"].view(t, h, d)
        for x, what in ((c["qkv"], "qkv"), (c["dout"], "dout")):
            if not torch.equal(x.bfloat16().float(), x):
                print(f"  note: {what}.f32 holds values that are not bf16-representable; aten sees them rounded")

        ref = reference(*(x.to(dev, torch.float64) for x in (q, k, v, do)), c["lens"], scale)
        ref = dict(zip(TENSORS, (x.cpu() for x in ref)))
        aten, how = None, None
        if use_aten:
            cu = c["cu"].to(dev)
            bf = [x.to(dev, torch.bfloat16).contiguous() for x in (q, k, v, do)]
            *a, how = aten_flash(*bf, cu, m["max_seqlen"], scale)
            aten = dict(zip(TENSORS, (x.cpu() for x in a)))
            print(f"  aten: {how}")

        print(
            f"  {'tensor':6} | {'ours vs aten':>12} {'max abs':>9} | {'ours vs ref':>12} {'max abs':>9}"
            f" | {'aten vs ref':>12} {'max abs':>9}"
        )
        for tensor in TENSORS:
            row = {"case": name, "tensor": tensor}
            pairs = [("ours_vs_ref", ours[tensor], ref[tensor])]
            if aten is not None:
                pairs += [("ours_vs_aten", ours[tensor], aten[tensor]), ("aten_vs_ref", aten[tensor], ref[tensor])]
            for key, a, b in pairs:
                if a.shape != b.shape:
                    raise DumpError(f"{name} {tensor}: shapes {list(a.shape)} vs {list(b.shape)}")
                rel, mx, finite = compare(a, b)
                row[key] = {"rel": rel, "max_abs": mx}
                if bad(rel) or not finite:
                    who = "packtrain" if key.startswith("ours") else "aten"
                    failures.append(f"{name} {tensor} {key.replace('_', ' ')}: rel {rel:.2e}"
                                    + ("" if finite else f" ({who} has NaN/inf)"))

            def cell(key):
                if key not in row:
                    return f"{'-':>12} {'-':>9}"
                r = row[key]
                flag = "!" if bad(r["rel"]) else " "
                return f"{r['rel']:>11.2e}{flag} {r['max_abs']:>9.2e}"

            print(f"  {tensor:6} | {cell('ours_vs_aten')} | {cell('ours_vs_ref')} | {cell('aten_vs_ref')}")
            results.append(row)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tol": TOL, "torch": torch.__version__, "results": results, "failures": failures}, f, indent=1)
        print(f"\nwrote {args.json}")
    if failures:
        print(f"\nFAILED ({len(failures)}), tolerance {TOL:g}:")
        for f_ in failures:
            print(f"  {f_}")
        return 1
    print(f"\nall {len(results)} tensors within {TOL:g} (relative), no NaN")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DumpError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
