#!/usr/bin/env bash
# A kernel timeline of one command, then its per-step summary.
#
#   bench/kernel_trace.sh OUT.csv CMD [ARGS...]
#   e.g. bench/kernel_trace.sh /tmp/kt.csv target/release/packtrain bench \
#            --model tinyllama-1.1b --no-recompute --steps 8
#
# Builds bench/kernel_trace.c (a CUPTI injection library) with cc against the CUPTI headers of
# $CUDA_HOME (default /usr/local/cuda; CUPTI_INCLUDE and CUPTI_LIB override), runs CMD with
# CUDA_INJECTION64_PATH set, so every kernel, memcpy and memset lands in OUT.csv, then prints
# `bench/kernel_trace.py OUT.csv`: per step (a step ends with AdamW), the time per kernel family,
# the gaps between kernels, and the longest of them.
set -euo pipefail
if (( $# < 2 )); then
    sed -n '2,12p' "$0" >&2
    exit 2
fi
OUTCSV=$1
shift
HERE=$(cd "$(dirname "$0")" && pwd)
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
INC=${CUPTI_INCLUDE:-}
LIB=${CUPTI_LIB:-}
for d in "$CUDA_HOME/include" "$CUDA_HOME/extras/CUPTI/include"; do
    [[ -z $INC && -f $d/cupti.h ]] && INC=$d
done
for d in "$CUDA_HOME/lib64" "$CUDA_HOME/extras/CUPTI/lib64" "$CUDA_HOME/targets/x86_64-linux/lib"; do
    [[ -z $LIB && -e $d/libcupti.so ]] && LIB=$d
done
if [[ -z $INC || -z $LIB ]]; then
    echo "kernel_trace.sh: no CUPTI under $CUDA_HOME (set CUPTI_INCLUDE and CUPTI_LIB)" >&2
    exit 1
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
${CC:-cc} -O2 -shared -fPIC -o "$TMP/libktrace.so" "$HERE/kernel_trace.c" \
    -I"$INC" -I"$CUDA_HOME/include" -L"$LIB" -lcupti -Wl,-rpath,"$LIB"
CUDA_INJECTION64_PATH="$TMP/libktrace.so" KTRACE_OUT="$OUTCSV" "$@"
python3 "$HERE/kernel_trace.py" "$OUTCSV"
