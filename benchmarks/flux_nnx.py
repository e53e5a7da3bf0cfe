"""FLUX.1-dev sampler through the NNX module vs the functional path: compile time and 50-step wall time, one process.

Issue 28's acceptance line "Compile time and GPU speed of the FLUX sampler through the NNX module equal the functional
path (H200, same run, within 2%)". Two paths over the SAME bf16 random params (torch's default Linear init, as
flux_sample.py makes them), 1024^2 (4096 image + 512 text tokens), 50 Euler steps, embedded guidance 3.5, Chipmunk
preset ``config.flux()`` (no step caching), static per-step dispatch:

  functional  ``flux.denoiser(config, chipmunk, ...)`` in ``sampling.make_sampler``, run on the plain param tree
  nnx         ``chipmunk_jax.nnx.FluxTransformer2DModel.from_params(params, config).denoiser(chipmunk, ...)`` in the
              same sampler, run on the module's ``nnx.split`` state (``nnx.Param`` leaves, the very same arrays)

Both hold the plain layout (the module's state is the functional tree; ``--prepared`` gives both the sparse-MLP
layout of ``flux.prepare_params`` instead, the NNX path reading ``prepare_params(model.params_tree())`` as README
"Flax NNX modules" advises). Method: each path is compiled twice (lower + compile, timed), in the order functional,
nnx, then after ``jax.clear_caches()`` nnx, functional; then --reps timed 50-step runs per path in alternating order
(after one warm-up each), each on fresh latents / caches, from the call to block_until_ready; medians reported, with
the ratio nnx / functional and the final latents' max |diff| (the two programs are the same: expect 0).

On the device machine:
  source benchmarks/gpu_env.sh && python3 -P benchmarks/flux_nnx.py --results $OUT/flux_nnx.md
On a CPU: python benchmarks/flux_nnx.py --tiny (a 2+2-block model, 256^2, 8 steps: checks the script).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # flux_sample's setup

from flux_sample import random_weights, run_shape, variant_configs  # noqa: E402

from chipmunk_jax import sampling  # noqa: E402
from chipmunk_jax.cache import init_step_cache  # noqa: E402
from chipmunk_jax.models import flux  # noqa: E402
from chipmunk_jax.nnx import FluxTransformer2DModel  # noqa: E402
from chipmunk_jax.timing import emit_section, log, peak_gib  # noqa: E402

PATHS = ("functional", "nnx")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1024x1024", help="HxW in pixels")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3, help="timed runs per path (after one warm-up each)")
    parser.add_argument("--prepared", action="store_true",
                        help="both paths on flux.prepare_params' sparse-MLP layout instead of the plain tree")
    parser.add_argument("--tiny", action="store_true", help="2+2-block model, 256^2, 8 steps: a CPU check")
    parser.add_argument("--results", default=None, help="append the markdown section to this file")
    args = parser.parse_args()

    config, (height, width), steps, text_len, reps, kernel_impl = run_shape(args, parser)
    grid = (height // 16, width // 16)
    num_img = grid[0] * grid[1]
    device = jax.devices()[0]
    log(f"device {device.device_kind}, jax {jax.__version__}, {height}x{width}, {steps} steps, config {config}")

    params, text, pooled = random_weights(config, text_len)

    chipmunk, sampler_config = variant_configs("chipmunk", steps, args.tiny)
    model = FluxTransformer2DModel.from_params(params, config)  # the very arrays of `params` (no copy)
    if args.prepared:
        params = jax.block_until_ready(flux.prepare_params(params, config, chipmunk))
        given = {"functional": params, "nnx": flux.prepare_params(model.params_tree(), config, chipmunk)}
    else:
        given = {"functional": params, "nnx": nnx.split(model)[1]}
    denoisers = {"functional": flux.denoiser(config, chipmunk, grid=grid, dtype=jnp.bfloat16,
                                             kernel_impl=kernel_impl),
                 "nnx": model.denoiser(chipmunk, grid=grid, dtype=jnp.bfloat16, kernel_impl=kernel_impl)}
    cond = flux.sampling_cond(config, encoder_hidden_states=text, pooled_projections=pooled, grid=grid, guidance=3.5)
    sigmas = sampling.flow_sigmas(steps, mu=sampling.flux_shift(num_img))
    noise = jax.random.normal(jax.random.key(42), (1, num_img, config.in_channels), jnp.float32)
    key = jax.random.key(0)

    def fresh():
        cache = flux.init_cache(config, chipmunk, batch=1, grid=grid, num_text_tokens=text_len, dtype=jnp.bfloat16)
        step_cache = init_step_cache(batch=1, seq_len=num_img, width=config.inner_dim, dtype=jnp.float32)
        return jax.block_until_ready((jnp.copy(noise), cache, step_cache))

    compile_s = {p: [] for p in PATHS}
    compiled = {}
    for order in (PATHS, PATHS[::-1]):
        jax.clear_caches()  # each pass traces and compiles from scratch
        for path in order:
            run = sampling.make_sampler(denoisers[path], sampler_config, sigmas, static_step_dispatch=True)
            latents, cache, step_cache = fresh()
            t0 = time.perf_counter()
            compiled[path] = run.lower(given[path], latents, cond, cache, step_cache, key).compile()
            compile_s[path].append(time.perf_counter() - t0)
            del latents, cache, step_cache
            log(f"{path}: compiled in {compile_s[path][-1]:.1f} s")

    times = {p: [] for p in PATHS}
    outs = {}
    for rep in range(reps + 1):  # the first round warms up (allocator, autotuning)
        for path in (PATHS if rep % 2 == 0 else PATHS[::-1]):
            latents, cache, step_cache = fresh()
            t0 = time.perf_counter()
            out, cache, step_cache = compiled[path](given[path], latents, cond, cache, step_cache, key)
            jax.block_until_ready(out)
            times[path].append(time.perf_counter() - t0)
            outs[path] = out
            del cache, step_cache
    rows = {p: dict(seconds=statistics.median(times[p][1:]), spread=max(times[p][1:]) - min(times[p][1:]),
                    compile_s=statistics.median(compile_s[p]), compiles=compile_s[p]) for p in PATHS}
    ref = np.asarray(outs["functional"], np.float32)
    diff = float(np.abs(np.asarray(outs["nnx"], np.float32) - ref).max() / max(np.abs(ref).max(), 1e-30))
    for p in PATHS:
        log(f"{p}: {rows[p]['seconds']:.3f} s for {steps} steps, compile {rows[p]['compile_s']:.1f} s")

    f, n = rows["functional"], rows["nnx"]
    layout = "flux.prepare_params layout" if args.prepared else "plain layout (the module's state)"
    lines = [
        f"## FLUX.1-dev sampler through the NNX module vs functional ({datetime.date.today()}, {device.device_kind}, "
        f"jax {jax.__version__})",
        "",
        "Command: `source benchmarks/gpu_env.sh && python3 -P benchmarks/flux_nnx.py " + " ".join(sys.argv[1:])
        + f"`. {'Tiny 2+2-block model' if args.tiny else 'FLUX.1-dev, random bf16 weights'}, {height}x{width} "
        f"({num_img} image + {text_len} text tokens), {steps} Euler steps, batch 1, guidance 3.5, Chipmunk preset "
        f"`config.flux()`, static per-step dispatch, params in the {layout}. Compile: median of 2 (orders "
        f"functional, nnx / nnx, functional, caches cleared between); wall time of the whole compiled loop, median of "
        f"{reps} runs in alternating order after one warm-up each."
        + (f" Peak {peak:.1f} GiB." if np.isfinite(peak := peak_gib()) else ""),
        "",
        "| path | compile s (each) | total s | ms/step | spread s |",
        "|---|---|---|---|---|",
    ]
    for p in PATHS:
        r = rows[p]
        each = ", ".join(f"{c:.1f}" for c in r["compiles"])
        lines.append(f"| {p} | {r['compile_s']:.1f} ({each}) | {r['seconds']:.3f} | {1e3 * r['seconds'] / steps:.1f} "
                     f"| {r['spread']:.3f} |")
    lines += ["", f"nnx / functional: compile {n['compile_s'] / f['compile_s']:.3f}, sampling "
                  f"{n['seconds'] / f['seconds']:.3f}; final latents max |diff| / max |functional| = {diff:.2e}"]
    emit_section(lines, args.results)


if __name__ == "__main__":
    main()
