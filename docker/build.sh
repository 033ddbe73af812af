#!/usr/bin/env bash
# The build steps of sidbooth's images, in one place: the Dockerfiles in this folder RUN this
# script, and CI runs it outside a container (.ci/deploy-check), so a broken step is caught on
# a machine without a container daemon.
#
# usage: docker/build.sh TARGET [--profile PROFILE] [--out DIR] [--step STEP] [--recipe FILE]
#
#   TARGET       api          sidbooth-api (no candle inside: checked before building)
#                worker-cpu   sidbooth-worker and the sidbooth CLI (migrate, s3-server, keys)
#                worker-cuda  the same with the `cuda` feature (needs nvcc; CUDA_COMPUTE_CAP,
#                             e.g. 80 for A100, 89 for L4/L40S, 90 for H100/H200, when the
#                             build machine has no GPU)
#   --profile    cargo profile (default release; `dev` reuses what the test build compiled)
#   --out DIR    where the binaries are copied (default target/docker/TARGET)
#   --step STEP  build (default): compile the binaries and copy them to --out
#                plan: write the cargo-chef recipe (--recipe, default recipe.json)
#                deps: compile the dependencies only, from the recipe (the images' cached layer)
#
# Run from anywhere; it works in the repository root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit "${1:-2}"
}

target="${1:-}"
case "$target" in "") usage ;; -h | --help) usage 0 ;; esac
shift
profile=release
out=""
step=build
recipe=recipe.json
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
    --out) out="${2:?--out needs a value}"; shift 2 ;;
    --step) step="${2:?--step needs a value}"; shift 2 ;;
    --recipe) recipe="${2:?--recipe needs a value}"; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; usage ;;
  esac
done
out="${out:-target/docker/$target}"

features=()
case "$target" in
  api)
    packages=(-p sidbooth-api)
    bins=(sidbooth-api)
    ;;
  worker-cpu)
    packages=(-p sidbooth-worker -p sidbooth-cli)
    bins=(sidbooth-worker sidbooth)
    ;;
  worker-cuda)
    packages=(-p sidbooth-worker -p sidbooth-cli)
    bins=(sidbooth-worker sidbooth)
    # candle's CUDA backend (sidbooth-engine/cuda, sidbooth-evaluate/cuda) through both binaries.
    features=(--features "sidbooth-worker/cuda,sidbooth-cli/cuda")
    ;;
  *) echo "build.sh: unknown target $target (api, worker-cpu, worker-cuda)" >&2; exit 2 ;;
esac
bin_args=()
for b in "${bins[@]}"; do bin_args+=(--bin "$b"); done

if [ "$target" = worker-cuda ] && [ "$step" != plan ]; then
  command -v nvcc >/dev/null ||
    { echo "build.sh: worker-cuda needs nvcc (the CUDA toolkit) on PATH" >&2; exit 1; }
  if [ -z "${CUDA_COMPUTE_CAP:-}" ] && ! command -v nvidia-smi >/dev/null; then
    echo "build.sh: no GPU here to detect the compute capability: set CUDA_COMPUTE_CAP (e.g. 80, 89, 90)" >&2
    exit 1
  fi
  echo "build.sh: CUDA $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute capability ${CUDA_COMPUTE_CAP:-detected by nvidia-smi}"
fi

# The API image must not carry the diffusion engine: no candle crate in its dependency tree.
check_api_has_no_candle() {
  local tree
  tree="$(cargo tree --locked -p sidbooth-api -e normal --prefix none)"
  if grep -i '^candle' <<<"$tree"; then
    echo "build.sh: sidbooth-api depends on candle (above); the API image must not" >&2
    exit 1
  fi
  echo "build.sh: sidbooth-api's dependency tree has no candle crate ($(wc -l <<<"$tree") entries)"
}

case "$step" in
  plan)
    set -x
    cargo chef prepare --recipe-path "$recipe"
    ;;
  deps)
    set -x
    cargo chef cook --locked --profile "$profile" --recipe-path "$recipe" \
      "${packages[@]}" "${bin_args[@]}" "${features[@]}"
    ;;
  build)
    [ "$target" = api ] && check_api_has_no_candle
    (
      set -x
      cargo build --locked --profile "$profile" "${packages[@]}" "${bin_args[@]}" "${features[@]}"
    )
    case "$profile" in
      dev | test) profile_dir=debug ;;
      bench) profile_dir=release ;;
      *) profile_dir="$profile" ;;
    esac
    target_dir="${CARGO_TARGET_DIR:-target}"
    mkdir -p "$out"
    for b in "${bins[@]}"; do
      install -m 0755 "$target_dir/$profile_dir/$b" "$out/$b"
      echo "build.sh: $out/$b ($(du -h "$out/$b" | cut -f1))"
    done
    ;;
  *) echo "build.sh: unknown step $step (plan, deps, build)" >&2; exit 2 ;;
esac
