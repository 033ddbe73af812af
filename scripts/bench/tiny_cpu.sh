#!/usr/bin/env bash
# The engine's tiny-config benchmarks side by side with diffusers on the CPU, in the same run:
# one LoRA training step (services/engine/examples/bench_train.rs against
# scripts/parity/bench_train_diffusers.py) and one 50-step CFG sample (examples/bench.rs against
# scripts/parity/bench_diffusers.py), same thread count, interleaved for REPEATS rounds. Prints
# every run, then the fastest round of each and the ratios ours / diffusers.
#
#   PYTHON=/path/to/venv/bin/python REPEATS=3 bash scripts/bench/tiny_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
REPEATS=${REPEATS:-3}
THREADS=${THREADS:-$(nproc)}
cargo build --release -q -p sidbooth-engine --example bench --example bench_train
EX=target/release/examples
MODEL=services/engine/fixtures/tiny-sd
for _ in $(seq "$REPEATS"); do
  RAYON_NUM_THREADS=$THREADS "$EX/bench_train" --model tiny --steps 20 --rank 4 |
    awk '/ms per LoRA/ { print "train ours", $2 }'
  "$PYTHON" scripts/parity/bench_train_diffusers.py --threads "$THREADS" --steps 20 --rank 4 |
    awk '/ms per LoRA/ { print "train diffusers", $2 }'
  RAYON_NUM_THREADS=$THREADS "$EX/bench" --model "$MODEL" --steps 50 |
    awk '/s for 50 steps/ { print "sample ours", $2 * 1000 }'
  "$PYTHON" scripts/parity/bench_diffusers.py --threads "$THREADS" --steps 50 |
    awk '/s for 50 steps/ { print "sample diffusers", $2 * 1000 }'
done | tee /dev/stderr | awk -v threads="$THREADS" '
  { k = $1 " " $2; if (!(k in t) || $3 < t[k]) t[k] = $3 }
  END {
    printf "tiny LoRA step (%d threads): ours %.2f ms, diffusers %.2f ms, ratio %.2f\n", threads, t["train ours"], t["train diffusers"], t["train ours"] / t["train diffusers"]
    printf "tiny 50-step CFG sample: ours %.0f ms, diffusers %.0f ms, ratio %.2f\n", t["sample ours"], t["sample diffusers"], t["sample ours"] / t["sample diffusers"]
  }'
