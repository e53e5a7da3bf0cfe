# Source at the start of a device-machine command: builds the chipmunk_jax namespace from the working tree
# (the GPU image has jax/flax/chex/pytest but no network, so no editable install) and sets PYTHONPATH.
# Run Python with -P there (python3 -P -m pytest ..., python3 -P benchmarks/x.py) so the repo's own
# chipmunk_jax/ folder in the working directory does not shadow the namespace built here.
ns=/tmp/chipmunk_ns
rm -rf "$ns" && mkdir -p "$ns/chipmunk_jax"
cp -r chipmunk_jax/. "$ns/chipmunk_jax/"
for d in pallas_kernels models ports; do cp -r "$d" "$ns/chipmunk_jax/$d"; done
export PYTHONPATH="$ns${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
