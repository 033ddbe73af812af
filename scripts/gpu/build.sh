#!/usr/bin/env bash
# Builds .gpu/gpu_bench.xz (the engine's GPU benchmark for CUDA 13, sm_90) on a machine without a
# CUDA installation, from PyPI's NVIDIA wheels; see scripts/gpu/README.md. Idempotent.
#
#   bash scripts/gpu/build.sh     # CUDA_VENV, CUDA_ROOT, CARGO_TARGET_DIR, JOBS may be set
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${CUDA_VENV:-/work/cuda-venv}
R=${CUDA_ROOT:-/work/cuda-root}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-cuda}
JOBS=${JOBS:-1}

if [ ! -x "$VENV/bin/pip" ]; then python3 -m venv "$VENV"; fi
if [ ! -x "$R/bin/nvcc" ]; then
  "$VENV/bin/pip" install -q 'nvidia-cuda-nvcc==13.0.88' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-crt==13.0.*' \
    'nvidia-cuda-cccl==13.0.*' 'nvidia-cuda-runtime==13.0.96' 'nvidia-cublas==13.0.*' 'nvidia-curand' \
    'nvidia-cuda-nvrtc==13.0.*'
  C=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13
  mkdir -p "$R/lib/stubs"
  ln -sfn "$C/bin" "$R/bin"
  ln -sfn "$C/include" "$R/include"
  ln -sfn "$C/nvvm" "$R/nvvm"
  for f in "$C"/lib/*; do ln -sfn "$f" "$R/lib/"; done
  (cd "$R/lib" && for l in cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13 cudart.so.13; do
    ln -sfn "lib$l" "lib${l%.*}"
  done)
  # libcuda.so (the driver) is in no wheel: link against a stub with its soname and every cu*
  # function cudarc declares; each returns CUDA_ERROR_NO_DEVICE (100).
  grep -hoE '^\s+fn cu[A-Za-z0-9_]+\(' ~/.cargo/registry/src/*/cudarc-0.19.10/src/driver/sys/mod.rs \
    | sed -E 's/^\s+fn //; s/\(//' | sort -u | awk '{print "int " $1 "(void){return 100;}"}' >"$R/cudastub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$R/lib/stubs/libcuda.so" "$R/cudastub.c"
fi
"$R/bin/nvcc" --version | tail -1

export CUDA_HOME=$R PATH=$R/bin:$PATH CUDA_COMPUTE_CAP=90 CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2} \
  LIBRARY_PATH=$R/lib:$R/lib/stubs
nice -n 10 cargo build --release -j "$JOBS" -p sidbooth-engine --features cuda --example gpu_bench
mkdir -p .gpu
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
strip -o .gpu/gpu_bench "$CARGO_TARGET_DIR/release/examples/gpu_bench"
xz -T2 -6 -f .gpu/gpu_bench
ls -la .gpu
# Smoke check: starts, and fails only for want of a GPU (the stub driver says there is none).
mkdir -p "$R/runstub" && ln -sfn ../lib/stubs/libcuda.so "$R/runstub/libcuda.so.1"
xz -dc .gpu/gpu_bench.xz >/tmp/gpu_bench.check && chmod +x /tmp/gpu_bench.check
out=$(LD_LIBRARY_PATH=$R/lib:$R/runstub /tmp/gpu_bench.check 2>&1 || true)
if grep -q CUDA_ERROR_NO_DEVICE <<<"$out"; then
  echo "ok: the binary starts and stops at the first driver call (no GPU here)"
else
  echo "unexpected: $(head -n 3 <<<"$out")"
fi
rm -f /tmp/gpu_bench.check
