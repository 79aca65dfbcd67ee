# Sourced by launch/local.sh and launch/mpirun.sh (and bench/device_dist.sh): make NCCL loadable
# by packtrain and keep NVLink multicast off.
#
# packtrain loads NCCL at run time as `libnccl.so` (cudarc's name). Systems with libnccl-dev have
# it; pip's nvidia-nccl-cu12/cu13 wheels (what PyTorch uses) ship only `libnccl.so.2`. When
# `libnccl.so` is not on the loader's path, this looks for a libnccl.so.2 ($PACKTRAIN_NCCL_LIB,
# then ldconfig, then python3's nvidia.nccl package), links it as libnccl.so in a private
# directory and prepends that to LD_LIBRARY_PATH. It never fails: without NCCL, packtrain says
# so itself (and CPU runs do not need it).
export NCCL_NVLS_ENABLE=0

packtrain_nccl_env() {
  local d lib=${PACKTRAIN_NCCL_LIB:-}
  # Already loadable as libnccl.so?
  if [[ -z $lib ]]; then
    if ldconfig -p 2>/dev/null | grep -q 'libnccl\.so '; then return 0; fi
    local IFS=:
    for d in ${LD_LIBRARY_PATH:-}; do
      [[ -n $d && -e $d/libnccl.so ]] && return 0
    done
    unset IFS
    lib=$(ldconfig -p 2>/dev/null | awk '/libnccl\.so\.2 /{print $NF; exit}' || true)
  fi
  if [[ -z $lib ]] && command -v python3 >/dev/null; then
    lib=$(python3 - 2>/dev/null <<'PY'
import glob, os
try:
    import nvidia.nccl as n
    roots = list(getattr(n, "__path__", [])) or [os.path.dirname(n.__file__)]
except Exception:
    roots = []
for r in roots:
    for f in sorted(glob.glob(os.path.join(r, "lib", "libnccl.so*"))):
        print(f)
        raise SystemExit
PY
    ) || lib=''
  fi
  [[ -n $lib && -e $lib ]] || return 0
  d=${TMPDIR:-/tmp}/packtrain-nccl-$(id -u)
  mkdir -p "$d" && ln -sf "$lib" "$d/libnccl.so" || return 0
  export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  echo "nccl-env: libnccl.so -> $lib" >&2
}
packtrain_nccl_env
