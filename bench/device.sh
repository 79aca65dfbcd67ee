#!/usr/bin/env bash
# The GPU run: the op/model check, then packtrain's training-step benchmark against the
# PyTorch baseline on the same packed batches, ending with a side-by-side table.
#
#   bench/device.sh [BIN]        BIN: the packtrain binary (default target/release/packtrain)
#
# Writes into $OUT (default ./bench-out): check.txt, batches-<model>.json, ours-<model>.json,
# torch-<model>.json (one JSON line per torch attention implementation), summary.txt. Needs
# no Rust: only the binary, python3 with torch and transformers, and nvidia-smi. About 4
# minutes on an H100 (flex_attention's first compile is most of it); every command has a time
# limit and the run a budget, so it ends within 9 minutes. Exit code: non-zero if the check or any benchmark
# failed (the table is printed anyway, last).
#
# Knobs (environment): MODELS ("llama-160m tinyllama-1.1b"), TOKENS (16384), WARMUP (3),
# STEPS (10), TORCH_ATTN ("sdpa flex": the torch attention implementations to run, each
# its own baseline: sdpa with a dense block-diagonal mask, flex_attention with a document
# BlockMask), PYTHON (python3).
set -euo pipefail
export NCCL_NVLS_ENABLE=0
export PYTHONUNBUFFERED=1

BIN=${1:-target/release/packtrain}
OUT=${OUT:-bench-out}
MODELS=${MODELS:-"llama-160m tinyllama-1.1b"}
TOKENS=${TOKENS:-16384}
WARMUP=${WARMUP:-3}
STEPS=${STEPS:-10}
TORCH_ATTN=${TORCH_ATTN:-"sdpa flex"}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
start=$(date +%s)
# Every command gets at most its own limit and what is left of BUDGET_S (default 510 s), so
# the whole run ends within 9 minutes whatever hangs; a command with < 20 s left is skipped.
BUDGET_S=${BUDGET_S:-510}
elapsed() { echo "$(( $(date +%s) - start ))s"; }
# limit_for SECONDS: prints min(SECONDS, time left - 5), or nothing when < 20 s are left.
limit_for() {
    local left=$(( start + BUDGET_S - $(date +%s) - 5 ))
    if (( left < 20 )); then return 1; fi
    echo $(( $1 < left ? $1 : left ))
}

if [[ ! -x "$BIN" ]]; then
    echo "device.sh: $BIN is not an executable packtrain binary" >&2
    exit 2
fi

echo "== GPU"
nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,clocks.max.sm,power.limit \
    --format=csv || echo "(nvidia-smi failed)"
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__)' \
    || echo "(torch/transformers not importable)"

status=0

echo
echo "== packtrain check --device cuda  [$(elapsed)]"
check_rc=0
timeout "$(limit_for 120)" "$BIN" check --device cuda 2>&1 | tee "$OUT/check.txt" || check_rc=$?
if (( check_rc != 0 )); then
    echo "device.sh: check exited with $check_rc"
    status=1
fi

for m in $MODELS; do
    rm -f "$OUT/ours-$m.json" "$OUT/torch-$m.json" "$OUT/batches-$m.json"
    limit=90
    [[ $m == tinyllama-1.1b ]] && limit=130
    echo
    echo "== packtrain bench --model $m  [$(elapsed)]"
    rc=0
    if ! t=$(limit_for "$limit"); then
        echo "device.sh: out of time, skipping the rest"
        status=1
        break
    fi
    timeout "$t" "$BIN" bench --model "$m" --tokens "$TOKENS" --warmup "$WARMUP" --steps "$STEPS" \
        --json "$OUT/ours-$m.json" --batches "$OUT/batches-$m.json" 2>&1 || rc=$?
    if (( rc != 0 )); then
        echo "device.sh: packtrain bench $m exited with $rc"
        status=1
    fi

    for attn in $TORCH_ATTN; do
        echo
        echo "== torch baseline $m ($attn)  [$(elapsed)]"
        if [[ ! -f "$OUT/batches-$m.json" ]]; then
            echo "device.sh: no batches file for $m (packtrain bench failed before writing it)"
            status=1
            continue
        fi
        rc=0
        # flex_attention compiles its kernels on the first step: ~1-2 minutes on a fresh machine.
        tlimit=$limit
        [[ $attn == flex ]] && tlimit=200
        if ! t=$(limit_for "$tlimit"); then
            echo "device.sh: out of time, skipping torch $m ($attn)"
            status=1
            continue
        fi
        timeout "$t" "$PY" "$HERE/torch_baseline.py" --batches "$OUT/batches-$m.json" \
            --json "$TMP/torch.json" --attn "$attn" 2>&1 || rc=$?
        if (( rc != 0 )); then
            echo "device.sh: torch baseline $m ($attn) exited with $rc"
            status=1
        fi
        if [[ -f "$TMP/torch.json" ]]; then
            cat "$TMP/torch.json" >>"$OUT/torch-$m.json"
            rm -f "$TMP/torch.json"
        fi
    done
done

echo
echo "== summary  [$(elapsed)]"
"$PY" - "$OUT" "$MODELS" "$TORCH_ATTN" >"$OUT/summary.txt" <<'EOF' || echo "(summary failed)" >>"$OUT/summary.txt"
import json, os, sys

out, models, attns = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()

def lines(path):
    try:
        with open(path) as f:
            return [json.loads(l) for l in f if l.strip()]
    except (OSError, ValueError):
        return []

def ok(r):
    return r is not None and "error" not in r

def cell(r, key, fmt, scale=1.0, suffix=""):
    if r is None:
        return "missing"
    if "error" in r:
        return "error"
    return format(r[key] * scale, fmt) + suffix

rows = [("model", "torch attn", "ours tok/s", "torch tok/s", "ours/torch", "MFU ours",
         "MFU torch", "peak GiB ours", "peak GiB torch")]
notes = []
for m in models:
    ours = lines(os.path.join(out, f"ours-{m}.json"))
    o = ours[0] if ours else None
    torch_runs = {r.get("attn"): r for r in lines(os.path.join(out, f"torch-{m}.json"))}
    for a in attns:
        t = torch_runs.get(a)
        ratio = (f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x"
                 if ok(o) and ok(t) and t["tokens_per_s"] > 0 else "-")
        rows.append((m, a, cell(o, "tokens_per_s", ",.0f"), cell(t, "tokens_per_s", ",.0f"),
                     ratio, cell(o, "mfu", ".1f", 100, "%"), cell(t, "mfu", ".1f", 100, "%"),
                     cell(o, "peak_mem_gib", ".2f"), cell(t, "peak_mem_gib", ".2f")))
        if ok(t):
            notes.append(f"{m}: torch {t['torch']} transformers {t['transformers']}, "
                         f"{t['attention']}, recompute {t['recompute']}, step "
                         f"{t['step_ms_median']:.1f} ms median, {t['step_ms_mean']:.1f} mean, "
                         f"all-steps {t['tokens_per_s_all_steps']:,.0f} tokens/s, packing check "
                         f"{'ok' if t['packing_ok'] else 'FAILED'} "
                         f"({t['packing_check_max_abs_diff']:.1e}), loss {t['loss_first']:.3f} "
                         f"-> {t['loss_last']:.3f}")
    if o is not None and "error" in o:
        notes.append(f"{m}: packtrain failed: {o['error'].splitlines()[0][:300]}")
    if ok(o):
        notes.append(f"{m}: packtrain {o['device']}, recompute {o['recompute']}, gemm "
                     f"{o['gemm']}, weight gradients {o.get('weight_grads', 'not recorded')}, "
                     f"step {o['step_ms_median']:.1f} ms median, "
                     f"{o['step_ms_mean']:.1f} mean (fwd+bwd {o['fwd_bwd_ms_median']:.1f}, "
                     f"grad norm {o['grad_norm_ms_median']:.1f}, adamw "
                     f"{o['adamw_ms_median']:.1f}), all-steps {o['tokens_per_s_all_steps']:,.0f} "
                     f"tokens/s, {o['tokens_per_step']:.0f} tokens / {o['docs_per_step']:.1f} "
                     f"docs per step, loss {o['loss_first']:.3f} -> {o['loss_last']:.3f}")
widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
for r in rows:
    print("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(r, widths))))
print()
for n in notes:
    print(n)
print("tokens/s and MFU from the median timed step (mean tokens per step / median step time); "
      "all-steps = timed tokens / timed seconds")
print("MFU = (6 N T + 7 L^2 D H per document and layer) / step time / 989e12 (H100 SXM dense "
      "bf16); peak memory: ours = device memory used minus the pre-allocation reading, torch = "
      "max_memory_allocated")
EOF
if [[ -f "$OUT/check.txt" ]]; then
    echo "check: $(grep -E '^[0-9]+ passed, [0-9]+ failed' "$OUT/check.txt" | tail -1 || echo "no summary line (exit $check_rc)")" >>"$OUT/summary.txt"
fi
echo "total $(elapsed)" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
exit $status
