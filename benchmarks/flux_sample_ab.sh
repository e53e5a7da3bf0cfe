#!/usr/bin/env bash
# A/B of the FLUX.1-dev 50-step Chipmunk sampler: an older tree against this one, in one run on one GPU, so a
# refactor can show it costs no speed. Make the older tree here first (ignored by git, carried to the device):
#   git archive <commit> chipmunk_jax models pallas_kernels ports benchmarks/flux_sample.py | tar -x -C .baseline
# then on the device machine, from the repo root:
#   bash benchmarks/flux_sample_ab.sh .baseline [flux_sample.py args]
# Each tree runs benchmarks/flux_sample.py in its own process (same weights seed, same noise), the older one
# first, then this one; each writes its markdown section under $OUT.
set -euo pipefail
baseline=${1:?usage: bash benchmarks/flux_sample_ab.sh BASELINE_DIR [flux_sample.py args]}
shift
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--variants chipmunk --static-step-dispatch --reps 5)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

namespace() {  # the chipmunk_jax package of source tree $1, built under $2
  rm -rf "$2" && mkdir -p "$2/chipmunk_jax"
  cp -r "$1/chipmunk_jax/." "$2/chipmunk_jax/"
  for d in pallas_kernels models ports; do cp -r "$1/$d" "$2/chipmunk_jax/$d"; done
}

namespace "$baseline" /tmp/ns_baseline
namespace . /tmp/ns_current
echo "+ baseline tree $baseline"
PYTHONPATH=/tmp/ns_baseline python3 -P "$baseline/benchmarks/flux_sample.py" "${args[@]}" --results "$OUT/baseline.md"
echo "+ this tree"
PYTHONPATH=/tmp/ns_current python3 -P benchmarks/flux_sample.py "${args[@]}" --results "$OUT/current.md"
