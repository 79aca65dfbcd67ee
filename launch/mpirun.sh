#!/usr/bin/env bash
# NP ranks of `packtrain train` under Open MPI's mpirun:
#
#   launch/mpirun.sh NP CONFIG [packtrain train arguments...]
#   MPIRUN_ARGS="--hostfile hosts" MASTER_ADDR=node0 launch/mpirun.sh 16 my.toml --out runs/my
#
# A packtrain built with `--features mpi` talks through MPI. One built without it reads its rank
# from OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK and meets rank 0 over TCP at MASTER_ADDR:MASTER_PORT:
# MASTER_ADDR defaults to 127.0.0.1 (one node); on several nodes set it to the host of rank 0
# (the first slot of the hostfile). MASTER_PORT defaults to a free port. The binary is
# $PACKTRAIN_BIN, else target/release/packtrain; $MPIRUN_ARGS go to mpirun (hostfile, mapping,
# --oversubscribe, ...); as root, --allow-run-as-root is added.
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/mpirun.sh NP CONFIG [packtrain train arguments...]" >&2
  exit 2
fi
np=$1 config=$2
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${PACKTRAIN_BIN:-$here/../target/release/packtrain}
if [[ ! -x $bin ]]; then
  echo "mpirun.sh: no packtrain binary at $bin (cargo build --release [--features mpi], or set PACKTRAIN_BIN)" >&2
  exit 2
fi
command -v mpirun >/dev/null || {
  echo "mpirun.sh: no mpirun on PATH (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev)" >&2
  exit 2
}

# shellcheck source=launch/common.sh
source "$here/common.sh"

export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export MASTER_PORT=${MASTER_PORT:-$(free_port)}
# NCCL_NVLS_ENABLE=0, and libnccl.so on LD_LIBRARY_PATH when only libnccl.so.2 is installed.
# shellcheck source=launch/nccl-env.sh
source "$here/nccl-env.sh"
args=(-np "$np" -x MASTER_ADDR -x MASTER_PORT -x NCCL_NVLS_ENABLE)
[[ -n ${LD_LIBRARY_PATH:-} ]] && args+=(-x LD_LIBRARY_PATH)
[[ -n ${PACKTRAIN_GRAD_SYNC:-} ]] && args+=(-x PACKTRAIN_GRAD_SYNC)
[[ -n ${RUST_LOG:-} ]] && args+=(-x RUST_LOG)
[[ $(id -u) == 0 ]] && args+=(--allow-run-as-root)
# shellcheck disable=SC2206 # split on purpose: several mpirun arguments
[[ -n ${MPIRUN_ARGS:-} ]] && args+=($MPIRUN_ARGS)
exec mpirun "${args[@]}" "$bin" train --config "$config" "$@"
