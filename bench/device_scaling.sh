#!/usr/bin/env bash
# Scaling runs of issues 6 and 8 on one multi-GPU machine: packtrain's TinyLlama training on
# 1, 2, 4 ... GPUs (launch/local.sh, NCCL), the same with ZeRO-1, optionally one mpirun run,
# and PyTorch DDP + transformers on the same GPU counts; per run tokens/s, scaling against
# N x one GPU, the ranks' load balance and the peak memory per GPU; then a table.
#
#   bench/device_scaling.sh [BIN [MPI_BIN]]
#
# BIN: packtrain (default target/release/packtrain); MPI_BIN: a --features mpi build for the
# mpirun row (default target/release/packtrain-mpi; without a usable one mpirun starts BIN,
# whose ranks read OMPI_COMM_WORLD_* and meet over TCP).
# Knobs (environment): GPUS ("1 2 4": the GPU counts), PARTS ("ours zero mpirun ddp": what to
# run), MPIRUN_NP (2), CONFIG (bench/tinyllama-dist.toml), DDP_ATTN (flex), DDP_LIMIT_S (320 s
# per DDP run), BUDGET_S (560: every
# command is limited to what is left of it), OUT (bench-out). Writes $OUT/results.jsonl (one
# line per run; appended to, so two calls with different PARTS share one table) and
# $OUT/summary.txt.
#
# Measured per run:
# - tokens/s: mean tokens of a timed step (all ranks) / median step time; packtrain's timed
#   steps are 2..N of `packtrain train` (metrics.jsonl), DDP's 8 after 3 warm-up;
# - scaling = tokens/s on N GPUs / (N x tokens/s on one GPU) of the same system;
# - balance (packtrain): mean over timed steps of max / mean of the ranks' forward + backward
#   time (metrics' compute_ms_max / compute_ms_mean): 1.00 is perfect, the others wait for the
#   slowest rank at the gradient sum;
# - peak memory per GPU: the largest `nvidia-smi` memory.used of any of the run's GPUs,
#   sampled every 200 ms (all of the process's memory: context, cuBLAS and NCCL buffers
#   included); DDP also reports torch.cuda.max_memory_allocated of rank 0.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BIN=$(realpath "${1:-$ROOT/target/release/packtrain}")
MPI_BIN=${2:-$ROOT/target/release/packtrain-mpi}
OUT=${OUT:-bench-out}
CONFIG=${CONFIG:-$HERE/tinyllama-dist.toml}
GPUS=${GPUS:-"1 2 4"}
PARTS=${PARTS:-"ours zero mpirun ddp"}
MPIRUN_NP=${MPIRUN_NP:-2}
DDP_ATTN=${DDP_ATTN:-flex}
BUDGET_S=${BUDGET_S:-560}
export MPIRUN_ARGS=${MPIRUN_ARGS:---bind-to none}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
RES=$OUT/results.jsonl
touch "$RES"
TMP=$(mktemp -d)
RUNS=/dev/shm/packtrain-scaling-runs
trap 'rm -rf "$TMP" "$RUNS"; [[ -n ${MEMPID:-} ]] && kill "$MEMPID" 2>/dev/null' EXIT
start=$(date +%s)
elapsed() { echo "$(($(date +%s) - start))s"; }
limit_for() {
  local left=$((start + BUDGET_S - $(date +%s) - 5))
  ((left >= 20)) || return 1
  echo $(($1 < left ? $1 : left))
}
part() { [[ " $PARTS " == *" $1 "* ]]; }
# shellcheck source=../launch/nccl-env.sh
source "$ROOT/launch/nccl-env.sh"
export PACKTRAIN_BIN=$BIN
max_gpus=0
for n in $GPUS; do ((n > max_gpus)) && max_gpus=$n; done

echo "== machine  [$(elapsed)]"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv || true
python3 -c 'import torch, transformers; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version(), "| transformers", transformers.__version__)' || true
date -u +"date %Y-%m-%dT%H:%MZ"

# Sample memory.used of every GPU into $1 until mem_stop; mem_peak N prints the largest value
# (MiB) over GPUs 0..N-1.
mem_start() {
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 >"$1" 2>/dev/null &
  MEMPID=$!
}
mem_stop() { kill "$MEMPID" 2>/dev/null; wait "$MEMPID" 2>/dev/null; MEMPID=; }
mem_peak() {
  awk -F', *' -v n="$2" '$1 < n && $2 > m { m = $2 } END { print m + 0 }' "$1"
}

# One packtrain run: name, GPUs, time limit, then the command (`--out DIR --quiet` added).
ours() {
  local name=$1 gpus=$2 limit=$3
  shift 3
  local t rc=0 log=$OUT/ours-$name.log dir=$RUNS/$name
  if ! t=$(limit_for "$limit"); then
    echo "{\"impl\": \"packtrain\", \"run\": \"$name\", \"gpus\": $gpus, \"error\": \"skipped: out of time\"}" >>"$RES"
    return
  fi
  echo
  echo "== packtrain $name ($gpus GPU)  [$(elapsed)]"
  rm -rf "$dir"
  mem_start "$TMP/mem.csv"
  timeout -k 10 "$t" "$@" --out "$dir" --quiet >"$log" 2>&1 || rc=$?
  mem_stop
  tail -n 6 "$log"
  python3 - "$dir/metrics.jsonl" "$name" "$gpus" "$rc" "$(mem_peak "$TMP/mem.csv" "$gpus")" >>"$RES" <<'EOF'
import json, statistics, sys
path, name, gpus, rc, mem = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
r = {"impl": "packtrain", "run": name, "gpus": gpus, "exit": rc, "peak_mem_gib_per_gpu": mem / 1024}
try:
    ms = [json.loads(l) for l in open(path) if l.strip()]
except OSError as e:
    ms = []
    r["error"] = f"no metrics ({e})"
if len(ms) >= 3:
    timed = ms[1:]  # the first step pays for warm-up
    med = statistics.median(m["ms"] for m in timed) / 1e3
    tok = statistics.mean(m["tokens"] for m in timed)
    bal = [m["compute_ms_max"] / m["compute_ms_mean"] for m in timed if m.get("compute_ms_mean")]
    r.update(steps=len(ms), tokens_per_step=tok, step_ms_median=med * 1e3,
             tokens_per_s=tok / med,
             balance=statistics.mean(bal) if bal else None,
             balance_worst=max(bal) if bal else None,
             compute_ms_mean=statistics.mean(m.get("compute_ms_mean", 0) for m in timed),
             loss_first=ms[0]["loss"], loss_last=ms[-1]["loss"])
elif "error" not in r:
    r["error"] = f"only {len(ms)} steps"
if rc != 0:
    r["error"] = r.get("error", "") + f" exit {rc}"
print(json.dumps(r))
EOF
  rm -rf "$dir"
}

ZCONFIG=$TMP/zero1.toml
cp "$CONFIG" "$ZCONFIG"
if grep -q '^\[dist\]' "$ZCONFIG"; then
  sed -i 's/^\[dist\]/[dist]\nzero1 = true/' "$ZCONFIG"
else
  printf '\n[dist]\nzero1 = true\n' >>"$ZCONFIG"
fi

for n in $GPUS; do
  if part ours; then
    if ((n == 1)); then
      ours 1gpu 1 150 env CUDA_VISIBLE_DEVICES=0 "$BIN" train --config "$CONFIG"
    else
      ours "${n}gpu" "$n" 150 "$ROOT/launch/local.sh" "$n" "$CONFIG"
    fi
  fi
  if part zero && ((n > 1)); then
    # Longer than the others: the final checkpoint gathers the AdamW moments on rank 0 through
    # the host rendezvous (~40 s for TinyLlama on 2 H100s, 2026-11-26).
    ours "${n}gpu-zero1" "$n" 210 "$ROOT/launch/local.sh" "$n" "$ZCONFIG"
  fi
done

if part mpirun; then
  mbin=$BIN
  if [[ -x $MPI_BIN ]] && ldd "$MPI_BIN" | grep -q 'libmpi' && ! ldd "$MPI_BIN" | grep -q 'not found'; then
    mbin=$(realpath "$MPI_BIN")
  fi
  if command -v mpirun >/dev/null; then
    echo "device_scaling: mpirun -np $MPIRUN_NP runs $mbin"
    PACKTRAIN_BIN=$mbin ours "${MPIRUN_NP}gpu-mpirun" "$MPIRUN_NP" 150 \
      "$ROOT/launch/mpirun.sh" "$MPIRUN_NP" "$CONFIG"
  else
    echo "{\"impl\": \"packtrain\", \"run\": \"${MPIRUN_NP}gpu-mpirun\", \"error\": \"no mpirun\"}" >>"$RES"
  fi
fi

if part ddp; then
  # Enough packed batches for 11 steps on the largest world (step i of rank r trains on
  # batch i * world + r); written before packtrain opens a GPU (none is visible).
  BATCHES=$TMP/batches.json
  CUDA_VISIBLE_DEVICES='' timeout 120 "$BIN" bench --model tinyllama-1.1b --tokens 16384 \
    --warmup 4 --steps $((11 * max_gpus)) --batches "$BATCHES" >/dev/null 2>&1 || true
  for n in $GPUS; do
    if [[ ! -s $BATCHES ]]; then
      echo "{\"impl\": \"torch-ddp\", \"world\": $n, \"error\": \"no batches file\"}" >>"$RES"
      continue
    fi
    # A DDP run spends ~160 s compiling flex_attention in its first step (H200, 2026-11-26).
    if ! t=$(limit_for "${DDP_LIMIT_S:-320}"); then
      echo "{\"impl\": \"torch-ddp\", \"world\": $n, \"error\": \"skipped: out of time\"}" >>"$RES"
      continue
    fi
    echo
    echo "== torch DDP, $n GPU, $DDP_ATTN  [$(elapsed)]"
    rc=0
    mem_start "$TMP/mem.csv"
    timeout -k 10 "$t" torchrun --standalone --nproc_per_node "$n" "$HERE/ddp_baseline.py" \
      --batches "$BATCHES" --attn "$DDP_ATTN" --json "$TMP/ddp.json" >"$TMP/ddp.log" 2>&1 || rc=$?
    mem_stop
    grep -v '^\s*$' "$TMP/ddp.log" | tail -n 4
    cat "$TMP/ddp.log" >>"$OUT/ddp.log"
    peak=$(mem_peak "$TMP/mem.csv" "$n")
    if [[ -s $TMP/ddp.json ]]; then
      python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["peak_mem_gib_per_gpu"]=float(sys.argv[2])/1024; print(json.dumps(r))' \
        "$TMP/ddp.json" "$peak" >>"$RES"
    else
      echo "{\"impl\": \"torch-ddp\", \"world\": $n, \"error\": \"exit $rc\"}" >>"$RES"
    fi
    rm -f "$TMP/ddp.json"
  done
fi

echo
echo "== summary  [$(elapsed)]"
python3 - "$RES" "$GPUS" >"$OUT/summary.txt" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
gpus = [int(n) for n in sys.argv[2].split()]
ok = lambda r: r is not None and "tokens_per_s" in r
def last(pred):
    found = [r for r in rows if pred(r)]
    return found[-1] if found else None
ours = lambda run: last(lambda r: r.get("impl") == "packtrain" and r.get("run") == run)
ddp = lambda n: last(lambda r: r.get("impl") == "torch-ddp" and r.get("world") == n)
base = {"packtrain": ours("1gpu"), "packtrain ZeRO-1": ours("1gpu"), "torch DDP": ddp(1)}
print("| system | GPUs | tokens/s | scaling | step ms | balance max/mean (worst) | peak GiB per GPU |")
print("| --- | --- | --- | --- | --- | --- | --- |")
def line(system, n, r):
    if r is None:
        return
    if not ok(r):
        print(f"| {system} | {n} | failed: {str(r.get('error', '?'))[:50]} | | | | |")
        return
    b = base[system]
    sc = f"{r['tokens_per_s'] / (n * b['tokens_per_s']) * 100:.1f} %" if ok(b) else "-"
    bal = (f"{r['balance']:.3f} ({r['balance_worst']:.3f})" if r.get("balance") else "n/a")
    mem = f"{r['peak_mem_gib_per_gpu']:.1f}" if r.get("peak_mem_gib_per_gpu") else "-"
    if system == "torch DDP" and r.get("peak_mem_gib_rank0"):
        mem += f" (allocated {r['peak_mem_gib_rank0']:.1f})"
    print(f"| {system} | {n} | {r['tokens_per_s']:,.0f} | {sc} | {r['step_ms_median']:.0f} | {bal} | {mem} |")
for n in gpus:
    line("packtrain", n, ours("1gpu" if n == 1 else f"{n}gpu"))
for n in gpus:
    if n > 1:
        line("packtrain ZeRO-1", n, ours(f"{n}gpu-zero1"))
for r in rows:
    if r.get("impl") == "packtrain" and str(r.get("run", "")).endswith("mpirun"):
        line("packtrain", r["gpus"], r)
        print(f"  (the row above: mpirun -np {r['gpus']})")
for n in gpus:
    line("torch DDP", n, ddp(n))
print()
for n in gpus:
    o, d = ours("1gpu" if n == 1 else f"{n}gpu"), ddp(n)
    if ok(o) and ok(d):
        print(f"{n} GPU: packtrain / DDP = {o['tokens_per_s'] / d['tokens_per_s']:.2f}x")
    z = ours(f"{n}gpu-zero1")
    if n > 1 and ok(z) and ok(d):
        print(f"{n} GPU: packtrain ZeRO-1 / DDP = {z['tokens_per_s'] / d['tokens_per_s']:.2f}x")
for r in rows:
    if r.get("impl") == "packtrain" and ok(r):
        print(f"{r['run']}: {r['steps']} steps, {r['tokens_per_step']:.0f} tokens/step, loss "
              f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}, forward+backward {r['compute_ms_mean']:.0f} ms per rank")
d = [r for r in rows if r.get("impl") == "torch-ddp" and ok(r)]
if d:
    r = d[-1]
    print(f"torch {r.get('torch')}, transformers {r.get('transformers')}, nccl {r.get('nccl')}, attention {r.get('attn')}")
EOF
echo "total $(elapsed)" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
