"""Where one FLUX.1-dev step spends its time: a device-side kernel profile of the dense model and of
Chipmunk step kinds, summed per kernel and per category (GEMM, cuDNN attention, Pallas kernels, XLA
fusions, copies), with the wall time per step beside it (the gap = launch / dispatch overhead).

Why: the Chipmunk sparse steps measured 117-125 ms against ~104 ms predicted from the kernel tables
(issue 5; archive/RESULTS-2026-11-23-to-2026-12-03.md): this names the kernels that make up the difference,
e.g. copies of cache buffers around the per-layer ``lax.switch`` (compare --dispatch traced with --dispatch
static).

On the device machine (one command, ~4 min at 1024^2):
  source benchmarks/gpu_env.sh && python3 -P benchmarks/flux_profile.py --out $OUT/flux_profile.md
On a CPU: python benchmarks/flux_profile.py --tiny (checks the script; CPU "kernels" are XLA thunks).

Method: random bf16 weights (``flux.init_params``), Chipmunk preset ``config.flux()`` with
``flux.prepare_params``; the Chipmunk step is jitted with a traced step (as in sampling) or, with
--dispatch static, one jit per step kind with a Python-int step. Steps 0 and 1 run first (LSE, column
sets, MLP selection). Each profiled phase runs --calls calls inside ``jax.profiler.trace`` (perfetto
trace), after one untimed call; device events are summed per kernel name and divided by --calls.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # flux_e2e's input builders

from flux_e2e import make_inputs, trajectory  # noqa: E402
from trace_profile import compiled_sources, profile, summarise  # noqa: E402

from chipmunk_jax import config as chipmunk_config  # noqa: E402
from chipmunk_jax.models import flux  # noqa: E402
from chipmunk_jax.schedule import AttentionStep, MLPStep, attention_schedule, mlp_schedule, step_plan  # noqa: E402
from chipmunk_jax.timing import emit_section, log  # noqa: E402

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1024x1024", help="HxW in pixels")
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--kinds", default="SPARSE+SPARSE_SELECT,SPARSE+SPARSE_REUSE",
                        help="Chipmunk (attention+MLP) step kinds to profile, comma separated; none: the dense model only")
    parser.add_argument("--dispatch", default="traced,static", help="traced (lax.switch per layer), static, or both")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense model's profile")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace-dir", default=None, help="where the raw traces go (default: a temp dir)")
    parser.add_argument("--tiny", action="store_true", help="2+2-block model, 256x256: a CPU check of the script")
    parser.add_argument("--out", default=None, help="append the markdown section to this file")
    args = parser.parse_args()
    if args.calls < 1:
        parser.error("--calls must be >= 1")
    dispatches = args.dispatch.split(",")
    if not set(dispatches) <= {"traced", "static"}:
        parser.error("--dispatch takes traced, static or both")

    chipmunk = chipmunk_config.flux()
    if args.tiny:
        config = flux.FluxConfig(num_layers=2, num_single_layers=2, num_attention_heads=2, joint_attention_dim=64,
                                 pooled_projection_dim=32, guidance_embeds=True)
        height = width = 256
        text_len, kernel_impl = 32, "reference"
        chipmunk = chipmunk.replace(attention__first_n_dense_layers=1, mlp__first_n_dense_layers=1)
    else:
        config = flux.FluxConfig.dev()
        height, width = (int(v) for v in args.size.split("x"))
        text_len, kernel_impl = args.text_len, None
    attn_table, mlp_table = attention_schedule(chipmunk), mlp_schedule(chipmunk)
    steps_of = {}
    for s in range(chipmunk.num_steps):
        steps_of.setdefault(f"{AttentionStep(int(attn_table[s])).name}+{MLPStep(int(mlp_table[s])).name}", s)
    kinds = [] if args.kinds == "none" else args.kinds.split(",")
    unknown = [k for k in kinds if k not in steps_of]
    if unknown:
        parser.error(f"--kinds {unknown}: the FLUX schedule has {sorted(steps_of)}")
    trace_root = args.trace_dir or tempfile.mkdtemp(prefix="flux_profile_")
    device = jax.devices()[0]
    log(f"device {device.device_kind}, jax {jax.__version__}, {height}x{width}, traces in {trace_root}")

    params = jax.block_until_ready(flux.init_params(config, jax.random.key(0), dtype=jnp.bfloat16))
    prepared = flux.prepare_params(params, config, chipmunk)
    inputs, grid = make_inputs(config, height, width, text_len, jnp.bfloat16)
    rope = flux.pos_embed(config, inputs["txt_ids"], inputs["img_ids"])
    lines = [f"## FLUX.1 step profile ({datetime.date.today()}, {device.device_kind}, jax {jax.__version__})", "",
             "Command: `source benchmarks/gpu_env.sh && python3 -P benchmarks/flux_profile.py "
             + " ".join(sys.argv[1:]) + f"`. {height}x{width}, text {text_len}, random bf16 weights, Chipmunk preset "
             f"`config.flux()` with `flux.prepare_params`; per call averages over {args.calls} profiled calls.", ""]

    if not args.no_dense:
        dense = jax.jit(lambda p, x, r: flux.forward(p, config, **x, rotary_emb=r, dtype=jnp.bfloat16).sample)
        wall, events = profile(lambda: jax.block_until_ready(dense(params, inputs, rope)), args.calls,
                               os.path.join(trace_root, "dense"))
        lines += summarise("dense model", wall, events, args.calls, args.top,
                           compiled_sources(dense, params, inputs, rope))
        emit_section(lines, args.out)  # each phase is written as it completes: a capped run keeps what it did
        lines = []
        log(f"dense: {wall:.1f} ms/call")

    def chipmunk_fn(step_arg):
        def step_fn(p, x, cache, step, r):
            out = flux.forward(p, config, **x, chipmunk=chipmunk, cache=cache, plan=step_plan(chipmunk, step),
                               key=jax.random.key(0), grid=grid, rotary_emb=r, dtype=jnp.bfloat16,
                               kernel_impl=kernel_impl)
            return out.sample, out.cache
        if step_arg == "traced":
            return jax.jit(step_fn, donate_argnums=(2,))
        return jax.jit(lambda p, x, cache, r: step_fn(p, x, cache, step_arg, r), donate_argnums=(2,))

    for dispatch in dispatches if kinds else ():
        traced = chipmunk_fn("traced")
        cache = flux.init_cache(config, chipmunk, batch=1, grid=grid, num_text_tokens=text_len, dtype=jnp.bfloat16)
        for s in (0, 1):  # LSE, column sets and MLP selections exist after these
            _, cache = traced(prepared, trajectory(inputs, s), cache, jnp.int32(s), rope)
        state = {"cache": cache}
        for kind in kinds:
            s = steps_of[kind]
            x = trajectory(inputs, s)
            fn = traced if dispatch == "traced" else chipmunk_fn(s)

            def call():
                if dispatch == "traced":
                    out, state["cache"] = fn(prepared, x, state["cache"], jnp.int32(s), rope)
                else:
                    out, state["cache"] = fn(prepared, x, state["cache"], rope)
                jax.block_until_ready(out)

            call_args = (prepared, x, state["cache"]) + ((jnp.int32(s),) if dispatch == "traced" else ()) + (rope,)
            sources = compiled_sources(fn, *call_args)
            wall, events = profile(call, args.calls, os.path.join(trace_root, f"{dispatch}_{kind}"))
            lines += summarise(f"Chipmunk {kind} (step {s}), {dispatch} dispatch", wall, events, args.calls, args.top,
                               sources)
            emit_section(lines, args.out)
            lines = []
            log(f"{kind} {dispatch}: {wall:.1f} ms/call")
        del state, cache

    if lines:
        emit_section(lines, args.out)


if __name__ == "__main__":
    main()
