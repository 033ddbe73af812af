#!/usr/bin/env bash
# Queue throughput beside graphile-worker 0.16 on the same Postgres and machine: no-op jobs
# claimed and completed, ours by WORKERS concurrent queue loops (the worker crate's bench_queue),
# graphile-worker by one runner at the same concurrency, alternating, ROUNDS times per
# concurrency. Prints every run and the median ratio per concurrency.
#
#   bash scripts/bench/queue_vs_graphile.sh            # JOBS=5000 ROUNDS=3 CONCURRENCY="4 16"
#
# Needs Node and npm (graphile-worker is installed into ~/.cache/sidbooth-bench on first use)
# and Postgres at SIDBOOTH_TEST_DATABASE_URL or postgres://postgres@127.0.0.1:5432/postgres.
set -euo pipefail
cd "$(dirname "$0")/../.."

JOBS=${JOBS:-5000}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-"4 16"}
SERVER=${SIDBOOTH_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
BASE=${SERVER%/*}
GRAPHILE_DIR=${GRAPHILE_DIR:-$HOME/.cache/sidbooth-bench/graphile-worker-0.16}

if [ ! -d "$GRAPHILE_DIR/node_modules/graphile-worker" ]; then
  mkdir -p "$GRAPHILE_DIR"
  (cd "$GRAPHILE_DIR" && npm init -y >/dev/null && npm install --silent graphile-worker@0.16)
fi
cp scripts/bench/graphile_noop.mjs "$GRAPHILE_DIR/"

# The queue's own crates optimised, as in a release build (their dependencies already are).
cargo build -q -p sidbooth-worker --example bench_queue \
  --config 'profile.dev.package.sidbooth-core.opt-level=3' \
  --config 'profile.dev.package.sidbooth-domain.opt-level=3' \
  --config 'profile.dev.package.sidbooth-worker.opt-level=3'
OURS=target/debug/examples/bench_queue

declare -A ours_rates graphile_rates
for c in $CONCURRENCY; do
  for round in $(seq 1 "$ROUNDS"); do
    line=$("$OURS" "$JOBS" "$c" | tail -n 1)
    echo "round $round ours     $line"
    ours_rates[$c]+="$(sed -E 's/.*= ([0-9]+) jobs\/s.*/\1/' <<<"$line") "

    db="sidbooth_graphile_bench_$$_${c}_${round}"
    psql -q "$SERVER" -c "CREATE DATABASE $db"
    line=$(node "$GRAPHILE_DIR/graphile_noop.mjs" "$BASE/$db" "$JOBS" "$c" | tail -n 1)
    psql -q "$SERVER" -c "DROP DATABASE $db WITH (FORCE)"
    echo "round $round graphile $line"
    graphile_rates[$c]+="$(sed -E 's/.*= ([0-9]+) jobs\/s.*/\1/' <<<"$line") "
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for c in $CONCURRENCY; do
  o=$(median <<<"${ours_rates[$c]}")
  g=$(median <<<"${graphile_rates[$c]}")
  echo "concurrency $c: ours median $o jobs/s, graphile-worker median $g jobs/s, ratio $(awk -v o="$o" -v g="$g" 'BEGIN {printf "%.2f", o / g}')"
done
