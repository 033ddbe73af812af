#!/usr/bin/env bash
# The GPU benchmark of issue 3 in one command, on a CUDA 13 machine with python3 + torch +
# transformers + peft (diffusers may come as wheels in .whl/) and the prebuilt engine benchmark in
# .gpu/ (see scripts/gpu/README.md for how both are made):
#
#   bash scripts/gpu/run.sh            # from the repository root; logs and JSON go to $OUT
#
# Runs, each under its own timeout: ours (.gpu/gpu_bench, candle CUDA f16) then diffusers
# (scripts/gpu/bench_diffusers.py, torch CUDA fp16), on the same SD 2.1-base-sized random weights
# at 512x512 (training: LoRA, and DreamBooth for ours), and prints a table last. Knobs: T_OURS,
# T_DIFF (seconds), OURS_ARGS, DIFF_ARGS.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-bench-out}
mkdir -p "$OUT"
T_OURS=${T_OURS:-260}
T_DIFF=${T_DIFF:-150}
OURS_ARGS=${OURS_ARGS:-"--steps 50 --repeats 3 --train-steps 10 --train-warmup 3 --mem-steps 2 --budget 45 --train-methods lora,dreambooth"}
DIFF_ARGS=${DIFF_ARGS:-"--steps 50 --repeats 3 --train-steps 10 --train-warmup 3 --mem-steps 2"}
CONFIG=services/engine/fixtures/configs/sd21-base
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
t_start=$(date +%s)

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
command -v nvcc >/dev/null && nvcc --version | tail -2

echo "== python wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tail -3

echo "== engine binary"
BIN=""
if [ -f .gpu/gpu_bench.xz ]; then
  xz -dc .gpu/gpu_bench.xz >/tmp/gpu_bench && chmod +x /tmp/gpu_bench && BIN=/tmp/gpu_bench
elif [ -f .gpu/gpu_bench.gz ]; then
  gzip -dc .gpu/gpu_bench.gz >/tmp/gpu_bench && chmod +x /tmp/gpu_bench && BIN=/tmp/gpu_bench
elif [ -f .gpu/gpu_bench ]; then
  cp .gpu/gpu_bench /tmp/gpu_bench && chmod +x /tmp/gpu_bench && BIN=/tmp/gpu_bench
fi
# The binary needs (NEEDED) libcuda.so.1 (driver), libcudart.so.13, libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13: take them from the CUDA 13 pip wheels of the
# torch environment, else from a CUDA toolkit.
libdirs=""
site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  f=$(find "$site/nvidia" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
        -maxdepth 4 -name "$lib" 2>/dev/null | head -n 1)
  if [ -n "$f" ]; then
    d=$(dirname "$f"); case ":$libdirs:" in *":$d:"*) ;; *) libdirs="$libdirs:$d" ;; esac
  else
    echo "warning: $lib not found"
  fi
done
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do [ -d "$d" ] && libdirs="$libdirs:$d"; done
libdirs="${libdirs#:}"
export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+${libdirs:+:}$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
if [ -n "$BIN" ]; then
  ldd "$BIN" >"$OUT/ldd.txt" 2>&1
  grep -E 'cuda|cublas|curand|nvrtc|not found' "$OUT/ldd.txt"
fi

ours_rc=skipped
if [ -n "$BIN" ]; then
  echo "== ours (candle, timeout ${T_OURS}s)"
  # shellcheck disable=SC2086
  timeout -k 10 "$T_OURS" "$BIN" --config "$CONFIG" --json "$OUT/ours.json" $OURS_ARGS 2>&1 | tee "$OUT/ours.log"
  ours_rc=${PIPESTATUS[0]}
  echo "ours exit code: $ours_rc"
else
  echo "== ours: no .gpu/gpu_bench[.xz|.gz] carried; skipped"
fi

echo "== diffusers (timeout ${T_DIFF}s)"
# shellcheck disable=SC2086
timeout -k 10 "$T_DIFF" python3 scripts/gpu/bench_diffusers.py --config "$CONFIG" --json "$OUT/diffusers.json" $DIFF_ARGS 2>&1 \
  | grep -v -E 'FutureWarning|warnings.warn|^\s*$' | tee "$OUT/diffusers.log"
diff_rc=${PIPESTATUS[0]}
echo "diffusers exit code: $diff_rc"

echo "== summary (total $(($(date +%s) - t_start)) s; ours rc=$ours_rc, diffusers rc=$diff_rc)"
python3 - "$OUT/ours.json" "$OUT/diffusers.json" <<'PY' | tee "$OUT/table.txt"
import json, sys

def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except Exception:
        return {}

o, d = load(sys.argv[1]), load(sys.argv[2])

def num(x, k):
    try:
        return float(x[k])
    except (KeyError, TypeError, ValueError):
        return None

rows = [
    ("s per 50-step CFG 512x512 image", "sample_s_per_image", "{:.3f}"),
    ("ms per LoRA training step (b1, r4)", "train_ms_per_step", "{:.1f}"),
    ("train peak device mem GiB (MemGetInfo)", "train_peak_device_gib", "{:.2f}"),
    ("  same, above CUDA context GiB", "train_peak_above_context_gib", "{:.2f}"),
    ("train torch max_memory_allocated GiB", "train_max_allocated_gib", "{:.2f}"),
    ("train torch max_memory_reserved GiB", "train_max_reserved_gib", "{:.2f}"),
    ("trainable LoRA params", "train_trainable_params", "{:.0f}"),
    # Full fine-tuning (UNet and text encoder, gradient checkpointing on); ours only so far.
    ("ms per DreamBooth training step (b1)", "dreambooth_train_ms_per_step", "{:.1f}"),
    ("DreamBooth peak device mem GiB", "dreambooth_train_peak_device_gib", "{:.2f}"),
]
print(f"device: {d.get('device', '?')}; ours {o.get('device', '?')} {o.get('dtype', '')}; diffusers {d.get('dtype', '')}")
print(f"{'metric':42s} {'ours':>10s} {'diffusers':>10s} {'ours/diff':>10s}")
for name, k, fmt in rows:
    a, b = num(o, k), num(d, k)
    ratio = f"{a / b:.2f}" if a is not None and b else "-"
    print(f"{name:42s} {fmt.format(a) if a is not None else '-':>10s} {fmt.format(b) if b is not None else '-':>10s} {ratio:>10s}")
for k in ("sample_error", "train_error", "dreambooth_train_error"):
    if k in o:
        print(f"ours {k}: {o[k][:300]}")
PY
