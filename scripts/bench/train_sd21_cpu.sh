#!/usr/bin/env bash
# One LoRA training step of Stable Diffusion 2.1-base-sized random weights on the CPU, as a new
# user runs it: `sidbooth train --model DIR --resolution 256` against diffusers'
# train_dreambooth_lora.py loop (scripts/bench/train_lora_diffusers.py, fp32), runs of 1 and
# 3 steps each, interleaved, in the same run. Prints wall seconds and peak RSS of every run, then
# seconds per step (the 3-step run minus the 1-step run, halved, and as each program times it
# in its 3-step run), the one-step run and peak RSS, ours / diffusers.
#
#   PYTHON=/path/to/venv/bin/python bash scripts/bench/train_sd21_cpu.sh
#
# Knobs: MODEL (the random-weight directory; made with make_sd21_random.py when missing),
# IMAGES (training photos), RES (pixels), OURS_ARGS (extra `sidbooth train` flags), REPEATS
# (rounds of the four runs; the summary takes each run's fastest round, the machine being
# shared and noisy).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-/tmp/sd21-random}
IMAGES=${IMAGES:-../shared/datasets/dreambooth/dog6}
RES=${RES:-256}
OURS_ARGS=${OURS_ARGS:-}
REPEATS=${REPEATS:-1}
[ -d "$MODEL/unet" ] || "$PYTHON" scripts/bench/make_sd21_random.py "$MODEL"
cargo build --release -q -p sidbooth-cli
BIN=target/release/sidbooth
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# Both read the weights from the page cache, not from disk.
cat "$MODEL"/*/*.safetensors > /dev/null

run() { # NAME STEPS COMMAND...
  local name=$1 steps=$2
  shift 2
  if ! /usr/bin/time -f "%e %M" -o "$OUT/time" "$@" > "$OUT/log" 2>&1; then
    cat "$OUT/log" >&2
    exit 1
  fi
  read -r secs kb < "$OUT/time"
  # Both print "..., then S s per step, ..." at the end of a run of several steps: the time from
  # the end of the first step to the end of the last, per step, timed inside the process.
  local per
  per=$(sed -n 's/.*then \([0-9.]*\) s per step.*/\1/p' "$OUT/log" | tail -1)
  echo "$name $steps $secs $kb ${per:--}"
}

for _ in $(seq "$REPEATS"); do for steps in 1 3; do
  # shellcheck disable=SC2086
  run ours "$steps" "$BIN" train --model "$MODEL" --images "$IMAGES" --class dog \
    --resolution "$RES" --steps "$steps" --output "$OUT/ours-$steps" $OURS_ARGS
  run diffusers "$steps" "$PYTHON" scripts/bench/train_lora_diffusers.py --model "$MODEL" \
    --images "$IMAGES" --resolution "$RES" --steps "$steps" --output "$OUT/diffusers-$steps"
done; done | tee "$OUT/results" | awk '{printf "%-9s %d step(s): %7.1f s, peak RSS %6.2f GB\n", $1, $2, $3, $4 / 1e6}'

awk -v res="$RES" '
  { if (!(($1, $2) in t) || $3 < t[$1, $2]) t[$1, $2] = $3; if ($4 > m[$1]) m[$1] = $4
    if ($5 != "-" && (!($1 in p) || $5 < p[$1])) p[$1] = $5 }
  END {
    so = (t["ours", 3] - t["ours", 1]) / 2; sd = (t["diffusers", 3] - t["diffusers", 1]) / 2
    printf "seconds per step at %dx%d: ours %.2f, diffusers %.2f, ratio %.2f\n", res, res, so, sd, so / sd
    printf "seconds per step timed in the process (3-step runs, after the first step): ours %.2f, diffusers %.2f, ratio %.2f\n", p["ours"], p["diffusers"], p["ours"] / p["diffusers"]
    printf "one-step run: ours %.1f s, diffusers %.1f s, ratio %.2f\n", t["ours", 1], t["diffusers", 1], t["ours", 1] / t["diffusers", 1]
    printf "peak RSS: ours %.2f GB, diffusers %.2f GB, ratio %.2f\n", m["ours"] / 1e6, m["diffusers"] / 1e6, m["ours"] / m["diffusers"]
  }' "$OUT/results"
