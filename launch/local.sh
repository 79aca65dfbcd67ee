#!/usr/bin/env bash
# N ranks of `packtrain train` on this machine, meeting over TCP at 127.0.0.1:
#
#   launch/local.sh N CONFIG [packtrain train arguments...]
#   launch/local.sh 2 configs/tiny-cpu.toml --out runs/tiny-2 --quiet
#
# Each rank gets RANK, WORLD_SIZE, LOCAL_RANK (= RANK), MASTER_ADDR=127.0.0.1, MASTER_PORT (a
# free port unless set) and NCCL_NVLS_ENABLE=0 (launch/nccl-env.sh, which also makes NCCL
# loadable for GPU ranks). The binary is $PACKTRAIN_BIN, else
# target/release/packtrain. Ctrl-C (SIGINT) or SIGTERM stops every rank. When a rank fails,
# the others get $PACKTRAIN_GRACE_S seconds (default 30) to notice and exit with their own
# message (they do within dist.timeout_s), then are stopped; the script exits with the code of
# the first rank that failed.
set -uo pipefail

if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "local.sh: needs bash >= 5.1 (wait -p)" >&2
  exit 2
fi
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh N CONFIG [packtrain train arguments...]" >&2
  exit 2
fi
n=$1 config=$2
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${PACKTRAIN_BIN:-$here/../target/release/packtrain}
grace=${PACKTRAIN_GRACE_S:-30}
if [[ ! -x $bin ]]; then
  echo "local.sh: no packtrain binary at $bin (cargo build --release, or set PACKTRAIN_BIN)" >&2
  exit 2
fi
if [[ ! -f $config ]]; then
  echo "local.sh: no config file $config" >&2
  exit 2
fi

# shellcheck source=launch/common.sh
source "$here/common.sh"

export MASTER_ADDR=127.0.0.1
export MASTER_PORT=${MASTER_PORT:-$(free_port)}
export WORLD_SIZE=$n
# NCCL_NVLS_ENABLE=0, and libnccl.so on LD_LIBRARY_PATH when only libnccl.so.2 is installed.
# shellcheck source=launch/nccl-env.sh
source "$here/nccl-env.sh"
# The variables of an enclosing MPI job would make an mpi build start MPI instead.
unset OMPI_COMM_WORLD_SIZE PMI_SIZE PMIX_RANK

declare -A alive=() rank_of=()
for ((r = 0; r < n; r++)); do
  RANK=$r LOCAL_RANK=$r "$bin" train --config "$config" "$@" &
  alive[$!]=1
  rank_of[$!]=$r
  echo "local.sh: rank $r: pid $! (MASTER_PORT $MASTER_PORT)" >&2
done

signal_all() {
  local p
  for p in "${!alive[@]}"; do
    kill -s "$1" "$p" 2>/dev/null
  done
}

# phase 0: running; 1: a rank failed, the others have the grace period; 2: told to stop, SIGKILL
# at the deadline.
phase=0 deadline='' first_code=0 interrupted=0
stop_ranks() {
  signal_all TERM
  signal_all CONT # a stopped rank only sees SIGTERM once it runs
  phase=2
  deadline=$((SECONDS + 5))
}
on_signal() {
  interrupted=$1
  echo "local.sh: got SIG$2; stopping every rank" >&2
  stop_ranks
}
trap 'on_signal 130 INT' INT
trap 'on_signal 143 TERM' TERM

# Poll rather than `wait -n`: bash forgets a job that ends while the script is busy (in a trap),
# and `wait -n` then never returns it; `wait PID` of an ended process always has its status.
while ((${#alive[@]} > 0)); do
  ended=()
  for p in "${!alive[@]}"; do
    kill -0 "$p" 2>/dev/null && continue
    wait "$p"
    code=$?
    unset "alive[$p]"
    # Of the ranks that ended since the last look, one killed by a signal is the likelier cause.
    if ((code > 128)); then ended=("$p:$code" "${ended[@]}"); else ended+=("$p:$code"); fi
  done
  for e in "${ended[@]}"; do
    p=${e%:*} code=${e#*:}
    ((code == 0 || interrupted)) && continue
    echo "local.sh: rank ${rank_of[$p]} (pid $p) exited with code $code" >&2
    if ((first_code == 0)); then
      first_code=$code
      if ((${#alive[@]} > 0 && phase == 0)); then
        phase=1
        deadline=$((SECONDS + grace))
      fi
    fi
  done
  if ((${#alive[@]} > 0)) && [[ -n $deadline ]] && ((SECONDS >= deadline)); then
    if ((phase == 1)); then
      left=()
      for p in "${!alive[@]}"; do left+=("${rank_of[$p]}"); done
      echo "local.sh: rank(s) ${left[*]} still running ${grace} s after the failure; stopping them" >&2
      stop_ranks
    else
      echo "local.sh: killing the ranks that did not stop" >&2
      signal_all KILL
      deadline=''
    fi
  fi
  sleep 0.2
done
if ((interrupted)); then
  exit "$interrupted"
fi
exit "$first_code"
