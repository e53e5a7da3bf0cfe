# The device calls still owed to the open issues, one plan per 10-minute call (run it from the repo root on
# the device machine, after `source benchmarks/gpu_env.sh`). Issues 8 and 9 are measured (benchmarks/RESULTS.md).
#   bash benchmarks/gpu_plan.sh compile       # issue 20 (~6 min; compile_quick ~4 min): sampler compile time, memory,
#                                             #   persistent cache, speed
#   bash benchmarks/gpu_plan.sh stacked_mlp   # issue 20 (~8 min): GPU tests of the MLP kernels over stacked layers, then
#                                             #   the 50-step sampler, the unrolled tree (.baseline) vs this one
#   bash benchmarks/gpu_plan.sh scan_diag     # issue 20 (~4 min): the scanned Chipmunk sampler with XLA's dynamic-slice
#                                             #   fusion on / off, then the sparse step's device profile
#   bash benchmarks/gpu_plan.sh flux_static   # issue 5 (~8 min): dense vs Chipmunk with ONE lax.switch per step (one
#                                             #   host sync per step instead of 110 per-layer conditionals), compile timed
#   bash benchmarks/gpu_plan.sh flux_sparse   # issue 5 (~9 min): column-sparse tilings at N = 4,608, then the static
#                                             #   sampler with the fastest (flux_sample.py --sparse-config)
#   bash benchmarks/gpu_plan.sh h100          # nvidia-h100-x1 (~9 min): the two lines owed to the H100: issue 4's MLP
#                                             #   step (verify's kernel tests + table), issue 5's static sampler
#   bash benchmarks/gpu_plan.sh flux          # nvidia-h100-x1: issue 5, 50-step sampler (3 variants, ~5 min), then
#                                             #   the sparse step's profile (each phase written as it completes)
#   bash benchmarks/gpu_plan.sh kernels       # nvidia-h100-x1: issues 3, 4: GPU tests, dense / colsum vs cuDNN in
#                                             #   alternating blocks at the issue-3 sizes, the MLP table (~8 min)
#   bash benchmarks/gpu_plan.sh video hunyuan|wan  # nvidia-h200: issues 8, 9 again after kernel changes (~6 min)
#   bash benchmarks/gpu_plan.sh verify        # issues 3, 4 (~4 min): the Triton kernels inside XLA command buffers and
#                                             #   every Triton GPU test, then the FLUX-shape MLP step: Pallas defaults,
#                                             #   Pallas with 3-stage fc2, Triton defaults, vs dense XLA (no sweep)
#   bash benchmarks/gpu_plan.sh triton        # issues 3, 4: GPU tests of the Triton attention and MLP kernels, the
#                                             #   Triton MLP sweep + full steps vs Pallas and dense XLA, the table (~7 min)
#   bash benchmarks/gpu_plan.sh wan_memory    # issue 20 (~2 min): compiled memory of the Wan 720p CFG Chipmunk sampler with
#                                             #   the branch caches stacked vs split (no per-call branch slice + write-back)
#   bash benchmarks/gpu_plan.sh a14b          # issue 26 (~6 min; needs the H200: run(needs_h200=true)): Wan2.2-T2V-A14B
#                                             #   720p CFG, one expert's step kinds composed with the expert switch's
#                                             #   full step, dense in the same process
#   bash benchmarks/gpu_plan.sh video_profile hunyuan|wan  # issue 23 (H200: run(needs_h200=true); ~6 / ~5 min):
#                                             #   one model at 720p, every step kind timed and device-profiled
#   bash benchmarks/gpu_plan.sh flux_torch    # issue 24 (~6 min; needs diffusers, as `pipeline`): our dense FLUX.1-dev
#                                             #   step at 1024^2 vs diffusers eager and torch.compile, one process
#   bash benchmarks/gpu_plan.sh nnx           # issue 28 (~4 min; H200): the FLUX.1-dev 50-step Chipmunk sampler (static
#                                             #   dispatch) through the NNX module's state vs the functional tree, one
#                                             #   process: compile s (two orders) and wall time (alternating), the ratio
#   bash benchmarks/gpu_plan.sh pipeline      # pipelines (~4 min): the FLUX.1-dev-shaped random-weight FluxPipeline at
#                                             #   1024^2 end to end (text encoding + 50 steps + VAE decode; dense, Chipmunk,
#                                             #   + step caching), each part's share. Needs diffusers: carry .whl and run
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site && source benchmarks/gpu_env.sh && bash benchmarks/gpu_plan.sh pipeline
# Every plan writes its markdown sections and logs under $OUT (update the claim tables in benchmarks/RESULTS.md
# from them) and runs the GPU tests of what it measures first, each under a cap so a hang cannot eat the call.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
run() { echo "+ $*"; "$@" 2>&1 | grep -v "^WARNING" | tee -a "$OUT/plan.log"; }

case "${1:-}" in
compile|compile_quick)
  # issue 20: the FLUX.1-dev 1024^2 50-step sampler's compile seconds and compiled memory (dense / Chipmunk, static
  # dispatch) twice, in two processes sharing one persistent compilation cache (written, then hit), then the 50-step
  # run: dense vs Chipmunk (static) in one process. `compile` (~6 min on the H200) first runs the GPU tests of host
  # caches under the block scan and times 3 runs; `compile_quick` (~4 min) skips the tests and times 2.
  reps=2
  if [ "$1" = compile ]; then
    run timeout 150 python3 -P -m pytest -q -m gpu tests/test_offload.py
    reps=3
  fi
  rm -rf /tmp/xla_compile_cache
  for pass in 1 2; do
    run python3 -P benchmarks/compile_time.py --models flux --dispatch static --compile-cache /tmp/xla_compile_cache \
      --json "$OUT/compile_time_$pass.json" --results "$OUT/compile_time.md"
  done
  run python3 -P benchmarks/flux_sample.py --variants dense,chipmunk --static-step-dispatch --reps "$reps" \
    --results "$OUT/flux_static.md"
  ;;
stacked_mlp)
  # issue 20: the sparse-MLP kernels index the stacked weights and caches by layer (no per-layer slice copies).
  # GPU tests of the MLP kernels (the stacked variant under a scan included) and of host caches under the block
  # scan, then the 50-step FLUX sampler, dense and Chipmunk (static dispatch), in the unrolled tree (.baseline =
  # `git archive 852e711 chipmunk_jax models pallas_kernels ports benchmarks`) and in this one, one process each.
  run timeout 120 python3 -P -m pytest -q -m gpu tests/test_mlp_gpu.py tests/test_offload.py
  run bash benchmarks/flux_sample_ab.sh .baseline --variants dense,chipmunk --static-step-dispatch --reps 3
  ;;
wan_memory)
  # issue 20: where Wan's 106 GiB of temporaries go; the stacked CFG caches are sliced per branch and written back
  for layout in stacked split; do
    run timeout 200 python3 -P benchmarks/compile_time.py --models wan --modes chipmunk --dispatch static \
      --cfg-caches $layout --results "$OUT/wan_memory.md"
  done
  ;;
video_profile)
  # issue 23: where the refresh (DENSE_COLSUM) and SPARSE steps' time goes at 720p, dense timed and profiled in the
  # same process (both models' 720p caches need the H200's memory)
  case "${2:-}" in
  hunyuan) run timeout 560 python3 -P benchmarks/hunyuan_e2e.py --reps 1 --warmup 1 --profile 1 \
             --results "$OUT/hy_profile.md" ;;
  wan) run timeout 560 python3 -P benchmarks/wan_e2e.py --sizes 720p --reps 1 --warmup 1 --profile 1 \
         --results "$OUT/wan_profile.md" ;;
  *) echo "usage: bash benchmarks/gpu_plan.sh video_profile hunyuan|wan" >&2; exit 2 ;;
  esac
  ;;
flux_torch)
  # issue 24's baseline: the same random bf16 weights in JAX (dense) and in diffusers' FluxTransformer2DModel (eager
  # SDPA, then torch.compile: minutes of compilation, last so a cut-off run keeps the rest)
  python3 -c "import diffusers" 2>/dev/null || { echo "no diffusers: install .whl/*.whl first (header)" >&2; exit 2; }
  run timeout -k 20 560 python3 -P benchmarks/flux_e2e.py --sizes 1024x1024 --torch eager,compile --no-chipmunk \
    --reps 10 --results "$OUT/flux_torch.md"
  ;;
a14b)
  # issue 26: both A14B experts have the Wan2.1-14B shape, so one expert's step kinds are timed and the 50 steps
  # composed with the switch (step 32 of 50 at shift 12, boundary 0.875) made a full step; one 14B expert with one
  # 720p branch's caches peaks at ~77 GiB, more than an 80 GB H100 holds
  run timeout 560 python3 -P benchmarks/wan_e2e.py --model wan2.2-t2v-a14b --sizes 720p --reps 1 --warmup 1 \
    --results "$OUT/a14b.md"
  ;;
scan_diag)
  # issue 20: why the scanned Chipmunk sampler is slower than the unrolled one (RESULTS.md §12.1): 50 steps with
  # XLA's dynamic-slice fusion on, then off (each in its own process, same machine), then a device profile of the
  # statically dispatched sparse step (copies of cache / weight slices around the Pallas and Triton calls)
  run timeout 80 env XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true python3 -P benchmarks/flux_sample.py \
    --variants chipmunk --static-step-dispatch --reps 1 --results "$OUT/flux_dsf_on.md"
  run timeout 80 python3 -P benchmarks/flux_sample.py --variants chipmunk --static-step-dispatch --reps 1 \
    --results "$OUT/flux_dsf_off.md"
  run timeout 120 python3 -P benchmarks/flux_profile.py --no-dense --dispatch static --kinds SPARSE+SPARSE_SELECT \
    --calls 2 --top 30 --out "$OUT/flux_profile.md"
  ;;
video)
  # dense timed in the same process (on the H200: Hunyuan ~4.5 min, Wan 720p ~5 min): one model per call,
  # `video hunyuan` or `video wan`
  case "${2:-}" in
  hunyuan|wan) ;;
  *) echo "usage: bash benchmarks/gpu_plan.sh video hunyuan|wan" >&2; exit 2 ;;
  esac
  run timeout 120 python3 -P -m pytest -q -m gpu tests/test_selection_fast.py tests/test_offload.py
  if [ "$2" = hunyuan ]; then
    run python3 -P benchmarks/hunyuan_e2e.py --phase all --reps 1 --warmup 0 --results "$OUT/hy.md"
  else
    run python3 -P benchmarks/wan_e2e.py --sizes 720p --reps 1 --warmup 1 --results "$OUT/wan.md"
  fi
  ;;
flux)
  run timeout 330 python3 -P benchmarks/flux_sample.py --variants dense,chipmunk,chipmunk+cache --reps 1 \
    --results "$OUT/flux_sample.md"
  run timeout 200 python3 -P benchmarks/flux_profile.py --no-dense --dispatch static --kinds SPARSE+SPARSE_SELECT \
    --calls 2 --out "$OUT/flux_profile.md"
  ;;
flux_static)
  run timeout 560 python3 -P benchmarks/flux_sample.py --variants dense,chipmunk,dense-inline-mod \
    --static-step-dispatch --reps 1 --results "$OUT/flux_static.md"
  ;;
h100)
  # the issue lines that name the H100, most important first; each step capped so the next still runs
  run timeout 140 python3 -P -m pytest -q -m gpu tests/test_mlp_gpu.py -k "triton or command_buffer"
  run timeout 100 python3 -P benchmarks/mlp.py --kernels pallas,triton --no-sweep --quick --budget 85 \
    --out "$OUT/mlp.md" --log "$OUT/mlp.log"
  run timeout 330 python3 -P benchmarks/flux_sample.py --variants dense,chipmunk --static-step-dispatch --reps 1 \
    --results "$OUT/flux_static.md"
  ;;
flux_sparse)
  # issue 5 (~9 min): the column-sparse tilings at FLUX's size and density (deeper pipelines, index prefetch), then
  # the static-dispatch sampler with the fastest one in place of SMALL_GRID_SPARSE, dense in the same process
  run timeout 90 python3 -P -m pytest -q -m gpu tests/test_attention_gpu.py -k sparse_gpu
  run timeout 120 python3 -P benchmarks/attention.py --sizes 4608 --sparsities 0.83 --sweep sparse \
    --sweep-sparsity 0.83 --skip colsum,dense,triton --results "$OUT/att_sparse.md" --best-sparse-json "$OUT/best_sparse.json"
  run timeout 330 python3 -P benchmarks/flux_sample.py --variants dense,chipmunk --static-step-dispatch --reps 1 \
    --sparse-config "$OUT/best_sparse.json" --results "$OUT/flux_static.md"
  ;;
flux_profile)
  run python3 -P benchmarks/flux_profile.py --calls 3 --out "$OUT/flux_profile.md"
  ;;
nnx)
  # issue 28: "compile time and GPU speed of the FLUX sampler through the NNX module equal the functional path (H200,
  # same run, within 2%)": both paths compiled twice (orders swapped, caches cleared), 3 timed runs each alternating
  run timeout 560 python3 -P benchmarks/flux_nnx.py --prepared --reps 3 --results "$OUT/flux_nnx.md"
  ;;
pipeline)
  # FluxPipeline end to end with FLUX.1-dev-shaped random weights built in memory (torch CLIP / T5-XXL / VAE in bf16,
  # the JAX transformer in bf16): one warm-up (compile, ~20-35 s) + 3 timed calls per variant (~5-9 s each), ~4 min
  # in all; SIGTERM from the cap still writes the rows measured so far
  python3 -c "import diffusers" 2>/dev/null || { echo "no diffusers: install .whl/*.whl first (header)" >&2; exit 2; }
  run timeout -k 20 420 python3 -P benchmarks/flux_pipeline_e2e.py --static-step-dispatch --reps 3 \
    --results "$OUT/flux_pipeline.md"
  ;;
verify)
  run timeout 200 python3 -P -m pytest -q -m gpu tests/test_attention_gpu.py tests/test_mlp_gpu.py \
    -k "triton or command_buffer"
  run timeout 150 python3 -P benchmarks/mlp.py --kernels pallas,triton --no-sweep --quick --budget 130 \
    --out "$OUT/mlp.md" --log "$OUT/mlp.log"
  ;;
triton)
  run timeout 130 python3 -P -m pytest -q -m gpu tests/test_mlp_gpu.py tests/test_attention_gpu.py -k triton
  run timeout 300 python3 -P benchmarks/mlp.py --kernels pallas,triton --sweep triton --budget 270 \
    --out "$OUT/mlp.md" --log "$OUT/mlp.log"
  ;;
kernels)
  run timeout 240 python3 -P -m pytest -q -m gpu tests/test_attention_gpu.py tests/test_mlp_gpu.py
  run timeout 200 python3 -P benchmarks/attention.py --sizes 32760,118800 --sparsities 0.93 --sweep none \
    --pairs 5 --pairs-colsum --results "$OUT/attention.md"
  run timeout 220 python3 -P benchmarks/mlp.py --no-sweep --budget 180 --out "$OUT/mlp.md" --log "$OUT/mlp.log"
  ;;
*)
  echo "usage: bash benchmarks/gpu_plan.sh compile | compile_quick | stacked_mlp | wan_memory | scan_diag | video hunyuan|wan | flux | flux_static | flux_sparse | flux_profile | nnx | pipeline | kernels | verify | triton | h100" >&2
  exit 2
  ;;
esac
