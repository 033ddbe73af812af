#!/usr/bin/env bash
# One training step per method on the tiny fixture model, ours (the engine's bench_methods
# example) against the PyTorch reference step (train_methods_torch.py), alternating method by
# method in one run so both see the same machine load. Prints a table with the ratio ours/torch.
#
#   PYTHON=/path/to/venv/bin/python bash scripts/bench/train_methods.sh [STEPS] [THREADS]
#
# The venv needs torch, diffusers, transformers, peft, and for svdiff
# `pip install einops && pip install --no-deps svdiff-pytorch==0.2.0`.
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-20}
threads=${2:-$(nproc)}
python=${PYTHON:-python3}
cargo build -q --release -p sidbooth-engine --example bench_methods
ours=target/release/examples/bench_methods
printf '%-18s %12s %12s %8s\n' method ours_ms torch_ms ratio
for m in lora dreambooth textual_inversion custom_diffusion svdiff; do
  o=$(RAYON_NUM_THREADS=$threads "$ours" --method "$m" --steps "$steps" | awk '/^method/ {print $4}')
  t=$("$python" scripts/bench/train_methods_torch.py --method "$m" --steps "$steps" \
        --threads "$threads" 2>/dev/null | awk '/^method/ {print $4}')
  printf '%-18s %12s %12s %8.2f\n' "$m" "$o" "$t" "$(echo "$o / $t" | bc -l)"
done
