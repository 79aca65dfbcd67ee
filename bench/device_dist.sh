#!/usr/bin/env bash
# The 2-GPU run of issue 6: packtrain trained on 1 and 2 GPUs (NCCL gradient all-reduce) via
# launch/local.sh and via mpirun (launch/mpirun.sh), PyTorch DDP + transformers on 1 and 2 GPUs
# on the same kind of packed batches, NCCL all-reduce bus bandwidth on 1 GiB, a fault test (a
# rank killed mid-run), then a table.
#
#   bench/device_dist.sh [BIN [MPI_BIN]]
#
# BIN: packtrain (default target/release/packtrain); MPI_BIN: one built with --features mpi
# (default target/release/packtrain-mpi; when missing or not loadable, mpirun starts BIN, whose
# ranks read OMPI_COMM_WORLD_* and meet over TCP). Writes into $OUT (default ./bench-out):
# results.jsonl (one line per measurement), summary.txt and one log per run. Every command has
# a time limit inside BUDGET_S (default 540 s). Needs python3 with torch and transformers,
# nvidia-smi, mpirun for the mpirun row. Knobs: CONFIG (bench/tinyllama-dist.toml), DDP_ATTN
# (flex), SKIP ("" or words of: mpirun ddp bw fault).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BIN=$(realpath "${1:-$ROOT/target/release/packtrain}")
MPI_BIN=${2:-$ROOT/target/release/packtrain-mpi}
OUT=${OUT:-bench-out}
CONFIG=${CONFIG:-$HERE/tinyllama-dist.toml}
DDP_ATTN=${DDP_ATTN:-flex}
SKIP=${SKIP:-}
# Both ranks bound to one core each would slow their host work; mpirun binds by core by default.
export MPIRUN_ARGS=${MPIRUN_ARGS:---bind-to none}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
RES=$OUT/results.jsonl
: >"$RES"
TMP=$(mktemp -d)
RUNS=/dev/shm/packtrain-dist-runs
trap 'rm -rf "$TMP" "$RUNS"' EXIT
start=$(date +%s)
elapsed() { echo "$(($(date +%s) - start))s"; }
limit_for() {
  local left=$((start + BUDGET_S - $(date +%s) - 5))
  ((left >= 20)) || return 1
  echo $(($1 < left ? $1 : left))
}
skip() { [[ " $SKIP " == *" $1 "* ]]; }
# shellcheck source=../launch/nccl-env.sh
source "$ROOT/launch/nccl-env.sh"
# The launchers start $PACKTRAIN_BIN.
export PACKTRAIN_BIN=$BIN

echo "== machine  [$(elapsed)]"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv || true
nvidia-smi topo -m 2>/dev/null | head -4 || true
python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(), "| transformers", transformers.__version__)' || true
mpirun --version 2>/dev/null | head -1 || echo "no mpirun"
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
date -u +"date %Y-%m-%dT%H:%MZ"

# One packtrain training run: name, GPUs, time limit, then the command (config included; `--out
# DIR --quiet` are added; its stdout+stderr go to $OUT/ours-NAME.log).
ours() {
  local name=$1 gpus=$2 limit=$3
  shift 3
  local t rc=0 log=$OUT/ours-$name.log dir=$RUNS/$name
  if ! t=$(limit_for "$limit"); then
    echo "device_dist: out of time, skipping $name"
    echo "{\"impl\": \"packtrain\", \"run\": \"$name\", \"error\": \"skipped: out of time\"}" >>"$RES"
    return
  fi
  echo
  echo "== packtrain $name ($gpus GPU)  [$(elapsed)]"
  rm -rf "$dir"
  timeout -k 10 "$t" "$@" --out "$dir" --quiet >"$log" 2>&1 || rc=$?
  tail -n 25 "$log"
  python3 - "$dir/metrics.jsonl" "$name" "$gpus" "$rc" >>"$RES" <<'EOF'
import json, statistics, sys
path, name, gpus, rc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = {"impl": "packtrain", "run": name, "gpus": gpus, "exit": rc}
try:
    ms = [json.loads(l) for l in open(path) if l.strip()]
except OSError as e:
    ms = []
    r["error"] = f"no metrics ({e})"
if len(ms) >= 3:
    timed = ms[1:]  # the first step of a run pays for warm-up
    med = statistics.median(m["ms"] for m in timed) / 1e3
    tok = statistics.mean(m["tokens"] for m in timed)
    r.update(steps=len(ms), tokens_per_step=tok, step_ms_median=med * 1e3,
             step_ms_mean=statistics.mean(m["ms"] for m in timed),
             tokens_per_s=tok / med,
             tokens_per_s_all_steps=sum(m["tokens"] for m in timed) / sum(m["ms"] for m in timed) * 1e3,
             loss_first=ms[0]["loss"], loss_last=ms[-1]["loss"],
             losses=[round(m["loss"], 5) for m in ms])
elif "error" not in r:
    r["error"] = f"only {len(ms)} steps"
if rc != 0:
    r["error"] = r.get("error", "") + f" exit {rc}"
print(json.dumps(r))
EOF
  rm -rf "$dir"
}

# The packed batches of the DDP runs (written before packtrain opens a GPU; none is visible).
BATCHES=$TMP/batches.json
CUDA_VISIBLE_DEVICES='' timeout 60 "$BIN" bench --model tinyllama-1.1b --tokens 16384 \
  --warmup 4 --steps 20 --batches "$BATCHES" >/dev/null 2>&1 || true

ours 2gpu-local 2 150 "$ROOT/launch/local.sh" 2 "$CONFIG"
ours 1gpu 1 150 env CUDA_VISIBLE_DEVICES=0 "$BIN" train --config "$CONFIG"

if ! skip mpirun; then
  mbin=$BIN
  if [[ -x $MPI_BIN ]] && ldd "$MPI_BIN" | grep -q 'libmpi' && ! ldd "$MPI_BIN" | grep -q 'not found'; then
    mbin=$(realpath "$MPI_BIN")
    echo "device_dist: mpirun runs $mbin (MPI communicator, NCCL id by MPI_Bcast)"
  else
    echo "device_dist: mpirun runs $BIN (no usable mpi build: ranks from OMPI_COMM_WORLD_*, TCP)"
  fi
  if command -v mpirun >/dev/null; then
    PACKTRAIN_BIN=$mbin
    ours 2gpu-mpirun 2 150 "$ROOT/launch/mpirun.sh" 2 "$CONFIG"
    PACKTRAIN_BIN=$BIN
  else
    echo '{"impl": "packtrain", "run": "2gpu-mpirun", "error": "no mpirun"}' >>"$RES"
  fi
fi

ddp() {
  local n=$1 t rc=0
  if [[ ! -s $BATCHES ]]; then
    echo "{\"impl\": \"torch-ddp\", \"world\": $n, \"error\": \"no batches file\"}" >>"$RES"
    return
  fi
  if ! t=$(limit_for "${DDP_LIMIT_S:-200}"); then
    echo "{\"impl\": \"torch-ddp\", \"world\": $n, \"error\": \"skipped: out of time\"}" >>"$RES"
    return
  fi
  echo
  echo "== torch DDP, $n GPU, $DDP_ATTN  [$(elapsed)]"
  timeout -k 10 "$t" torchrun --standalone --nproc_per_node "$n" "$HERE/ddp_baseline.py" \
    --batches "$BATCHES" --attn "$DDP_ATTN" --json "$TMP/ddp.json" >"$TMP/ddp-$n.log" 2>&1 || rc=$?
  grep -v '^\s*$' "$TMP/ddp-$n.log" | tail -n 8
  cat "$TMP/ddp-$n.log" >>"$OUT/ddp.log"
  if [[ -s $TMP/ddp.json ]]; then cat "$TMP/ddp.json" >>"$RES"; else
    echo "{\"impl\": \"torch-ddp\", \"world\": $n, \"error\": \"exit $rc\"}" >>"$RES"
  fi
  rm -f "$TMP/ddp.json"
}
if ! skip ddp; then
  ddp 2
  ddp 1
fi

if ! skip bw && t=$(limit_for 60); then
  echo
  echo "== NCCL all-reduce, 1 GiB, torch  [$(elapsed)]"
  timeout -k 5 "$t" torchrun --standalone --nproc_per_node 2 "$HERE/nccl_allreduce_bw.py" \
    --mib 1024 --json "$TMP/bw.json" 2>&1 | tail -n 3
  [[ -s $TMP/bw.json ]] && sed 's/^{/{"impl": "nccl-bw", /' "$TMP/bw.json" >>"$RES"
fi

# A rank killed mid-run: the other must exit non-zero with a message naming it, and local.sh
# with the killed rank's code. llama-160m (fast start), dist.timeout_s 30.
if ! skip fault && t=$(limit_for 90); then
  echo
  echo "== fault: rank 1 killed (SIGKILL) after step 3  [$(elapsed)]"
  sed -e 's/^max_steps = .*/max_steps = 400/' -e 's/^num_docs = .*/num_docs = 40000/' \
    "$ROOT/configs/llama-160m.toml" >"$TMP/fault.toml"
  printf '\n[dist]\ntimeout_s = 30\n' >>"$TMP/fault.toml"
  flog=$OUT/fault.log
  t0=$(date +%s)
  RUST_LOG=info timeout -k 5 "$t" "$ROOT/launch/local.sh" 2 "$TMP/fault.toml" \
    --out "$RUNS/fault" --quiet >"$flog" 2>&1 &
  lpid=$!
  killed=0
  for _ in $(seq 600); do
    sleep 0.1
    kill -0 "$lpid" 2>/dev/null || break
    if sed 's/\x1b\[[0-9;]*m//g' "$flog" | grep -q 'step=4 '; then
      r1=$(sed -n 's/.*rank 1: pid \([0-9]*\).*/\1/p' "$flog" | head -1)
      [[ -n $r1 ]] && kill -9 "$r1" && killed=$(date +%s) && break
    fi
  done
  wait "$lpid"
  frc=$?
  tail -n 12 "$flog"
  python3 - "$flog" "$frc" "$killed" "$(date +%s)" >>"$RES" <<'EOF'
import json, re, sys
log, rc, killed, end = open(sys.argv[1]).read(), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
log = re.sub(r"\x1b\[[0-9;]*m", "", log)
named = [l.strip() for l in log.splitlines() if "rank 0/2" in l and "rank 1" in l]
print(json.dumps({"impl": "fault", "killed_rank": 1, "killed": killed > 0,
                  "launcher_exit": rc, "seconds_to_exit": end - killed if killed else None,
                  "rank0_message": named[-1][:300] if named else None}))
EOF
fi

echo
echo "== summary  [$(elapsed)]"
python3 - "$RES" >"$OUT/summary.txt" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def get(impl, **kw):
    for r in rows:
        if r.get("impl") == impl and all(r.get(k) == v for k, v in kw.items()):
            return r
ok = lambda r: r is not None and "tokens_per_s" in r
o1, o2, om = get("packtrain", run="1gpu"), get("packtrain", run="2gpu-local"), get("packtrain", run="2gpu-mpirun")
d1, d2 = get("torch-ddp", world=1), get("torch-ddp", world=2)
def cell(r):
    if r is None: return "not run"
    if not ok(r): return "failed: " + str(r.get("error", "?"))[:60]
    return f"{r['tokens_per_s']:,.0f}"
def ms(r):
    return f"{r['step_ms_median']:.0f}" if ok(r) else "-"
def scale(a, b):
    return f"{b['tokens_per_s'] / (2 * a['tokens_per_s']) * 100:.1f} %" if ok(a) and ok(b) else "-"
print("| system | 1 GPU tokens/s | 2 GPUs tokens/s | scaling 1 -> 2 | step ms (1 / 2 GPUs) |")
print("| --- | --- | --- | --- | --- |")
print(f"| packtrain, launch/local.sh (NCCL) | {cell(o1)} | {cell(o2)} | {scale(o1, o2)} | {ms(o1)} / {ms(o2)} |")
print(f"| packtrain, mpirun -np 2 (NCCL) | | {cell(om)} | {scale(o1, om)} | / {ms(om)} |")
print(f"| torch DDP + transformers ({(d2 or d1 or {}).get('attn', '?')}) | {cell(d1)} | {cell(d2)} | {scale(d1, d2)} | {ms(d1)} / {ms(d2)} |")
if ok(o2) and ok(d2):
    print(f"\npacktrain / DDP on 2 GPUs: {o2['tokens_per_s'] / d2['tokens_per_s']:.2f}x")
bw = get("nccl-bw")
if bw:
    print(f"NCCL all-reduce 1 GiB (torch, NCCL {bw.get('nccl')}): busbw {bw['busbw_gbs']:.0f} GB/s, {bw['ms']:.2f} ms")
f = get("fault")
if f:
    print(f"fault: rank 1 killed={f['killed']}, local.sh exit {f['launcher_exit']}, "
          f"{f['seconds_to_exit']} s to exit; rank 0 said: {f['rank0_message']}")
for r in (o1, o2, om):
    if ok(r):
        print(f"{r['run']}: {r['steps']} steps, {r['tokens_per_step']:.0f} tokens/step, "
              f"loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}, all-steps {r['tokens_per_s_all_steps']:,.0f} tokens/s")
if ok(o2) and ok(om):
    same = o2["losses"] == om["losses"]
    print(f"local.sh and mpirun loss curves identical: {same}")
for r in (d1, d2):
    if ok(r):
        print(f"ddp world {r['world']}: torch {r['torch']}, transformers {r['transformers']}, nccl {r['nccl']}, "
              f"step {r['step_ms_median']:.0f} ms, {r['tokens_per_step']:.0f} tokens/step, "
              f"MFU/GPU {r['mfu_per_gpu'] * 100:.1f} %, peak {r['peak_mem_gib_rank0']:.1f} GiB, "
              f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")
print("tokens/s = mean tokens of a timed step (all ranks) / median step time; packtrain: steps 2..14 "
      "of `packtrain train` (metrics.jsonl), torch: 8 steps after 3 warm-up")
EOF
echo "total $(elapsed)" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
