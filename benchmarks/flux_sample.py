"""FLUX.1-dev sampling end to end: wall time of the ONE jitted 50-step sampler (chipmunk_jax.sampling)
for the dense model, Chipmunk (preset ``config.flux()``) and Chipmunk + step caching (docs/algorithm.md §4.3, the
default 25-of-50 skip schedule), each step's timestep conditioning computed before the loop (the denoiser's
timestep_tables). Random bf16 weights (torch's
default Linear init), batch 1, 1024^2 (4096 image + 512 text tokens), embedded guidance 3.5, FLUX's
resolution-dependent shift.

On the device machine:
  source benchmarks/gpu_env.sh && python3 -P benchmarks/flux_sample.py --results $OUT/flux_sample.md
then update the sampler's table in benchmarks/RESULTS.md from $OUT/flux_sample.md. Pick variants with
--variants (dense,chipmunk,chipmunk+cache) when one call must fit the 10-minute limit; --static-step-dispatch
switches once per step over the schedule's kind pairs instead of once per layer.
On a CPU: python benchmarks/flux_sample.py --tiny (a 2+2-block model, 256^2, 8 steps: checks the script).

Method: each variant is compiled once ahead of time (lower + compile, timed apart); then --reps full
runs, each on fresh latents / caches (the sampler donates them; building them is outside the timing),
timed from the call to block_until_ready of the final latents; median reported. No progress bar and
no per-step callbacks. Final latents of each variant are compared with the dense ones (max |diff| /
max |dense|): Chipmunk changes the trajectory, a large or NaN value means a bug, not a speed-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.timing import log, peak_gib, emit_section
from chipmunk_jax import config as chipmunk_config
from chipmunk_jax import sampling
from chipmunk_jax.cache import init_step_cache
from chipmunk_jax.models import flux
from chipmunk_jax.pallas_kernels import attention_pallas
from chipmunk_jax.schedule import model_schedule

VARIANTS = ("dense", "chipmunk", "chipmunk+cache")


def variant_configs(name, steps, tiny):
    """(model Chipmunk config or None, sampler config)."""
    base = chipmunk_config.flux().replace(num_steps=steps)
    if tiny:  # a 2+2-block model: keep some layers sparse, and schedules that fit 8 steps
        base = base.replace(attention__first_n_dense_layers=1, mlp__first_n_dense_layers=1,
                            attention__full_step_every=4, mlp__full_step_every=4,
                            step_cache__skip_step_schedule=(3, 5, 6))
    if name == "dense":
        return None, base.replace(step_cache__enabled=False)
    if name == "chipmunk":
        return base, base.replace(step_cache__enabled=False)
    return base, base.replace(step_cache__enabled=True)


def run_shape(args, parser):
    """(config, (height, width), steps, text_len, reps, kernel_impl): the tiny 2+2-block CPU check (--tiny) or
    FLUX.1-dev at --size / --steps / --text-len / --reps; sizes must be multiples of 16 (VAE 8 x 2x2 packing)."""
    if args.tiny:
        config = flux.FluxConfig(num_layers=2, num_single_layers=2, num_attention_heads=2, joint_attention_dim=64,
                                 pooled_projection_dim=32, guidance_embeds=True)
        return config, (256, 256), 8, 64, 1, "reference"
    height, width = (int(v) for v in args.size.split("x"))
    if height % 16 or width % 16:
        parser.error(f"--size must be multiples of 16, got {height}x{width}")
    return flux.FluxConfig.dev(), (height, width), args.steps, args.text_len, args.reps, None


def random_weights(config, text_len: int):
    """(params, text, pooled): random bf16 weights and text conditioning, the same seeds in every FLUX benchmark."""
    t0 = time.perf_counter()
    params = jax.block_until_ready(flux.init_params(config, jax.random.key(0), dtype=jnp.bfloat16))
    keys = jax.random.split(jax.random.key(1), 2)
    text = jax.random.normal(keys[0], (1, text_len, config.joint_attention_dim), jnp.bfloat16)
    pooled = jax.random.normal(keys[1], (1, config.pooled_projection_dim), jnp.bfloat16)
    log(f"random bf16 params in {time.perf_counter() - t0:.1f} s")
    return params, text, pooled


def run_variant(name, params, config, text, pooled, grid, steps, reps, tiny, static_dispatch, kernel_impl):
    model_chipmunk, sampler_config = variant_configs(name, steps, tiny)
    num_img, num_txt = grid[0] * grid[1], text.shape[1]
    cond = flux.sampling_cond(config, encoder_hidden_states=text, pooled_projections=pooled, grid=grid,
                              guidance=3.5)
    denoiser = flux.denoiser(config, model_chipmunk, grid=grid, dtype=jnp.bfloat16, kernel_impl=kernel_impl)
    sigmas = sampling.flow_sigmas(steps, mu=sampling.flux_shift(num_img))
    # The dense model has no per-step kinds: static dispatch would only compile one copy of it per kind pair.
    run = sampling.make_sampler(denoiser, sampler_config, sigmas,
                                static_step_dispatch=static_dispatch and model_chipmunk is not None)
    noise = jax.random.normal(jax.random.key(42), (1, num_img, config.in_channels), jnp.float32)
    key = jax.random.key(0)

    def fresh():
        cache = None if model_chipmunk is None else flux.init_cache(
            config, model_chipmunk, batch=1, grid=grid, num_text_tokens=num_txt, dtype=jnp.bfloat16)
        step_cache = init_step_cache(batch=1, seq_len=num_img, width=config.inner_dim, dtype=jnp.float32)
        return jax.block_until_ready((jnp.copy(noise), cache, step_cache))

    latents, cache, step_cache = fresh()
    t0 = time.perf_counter()
    compiled = run.lower(params, latents, cond, cache, step_cache, key).compile()
    del latents, cache, step_cache
    compile_s = time.perf_counter() - t0
    times, out = [], None
    for _ in range(reps + 1):  # the first run warms up (allocator, autotuning)
        latents, cache, step_cache = fresh()
        t0 = time.perf_counter()
        out, cache, step_cache = compiled(params, latents, cond, cache, step_cache, key)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
        del cache, step_cache
    out = np.asarray(out, np.float32)
    computed = int((model_schedule(sampler_config)[:steps] == 0).sum())
    return dict(name=name, seconds=statistics.median(times[1:]), spread=(max(times[1:]) - min(times[1:])),
                compile_s=compile_s, computed=computed, latents=out, peak=peak_gib())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1024x1024", help="HxW in pixels")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated subset of {VARIANTS}")
    parser.add_argument("--static-step-dispatch", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="2+2-block model, 256^2, 8 steps: a CPU check")
    parser.add_argument("--sparse-config", default=None, metavar="JSON",
                        help="a candidate SparseConfig (attention.py --best-sparse-json) in place of "
                             "attention_pallas.SMALL_GRID_SPARSE, the column-sparse kernel's tiling for FLUX's "
                             "small grids: measures a candidate before it becomes the default")
    parser.add_argument("--results", default=None, help="append the markdown section to this file")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {unknown}; choose from {VARIANTS}")

    config, (height, width), steps, text_len, reps, kernel_impl = run_shape(args, parser)
    grid = (height // 16, width // 16)
    if args.sparse_config:
        with open(args.sparse_config) as fh:
            fields = json.load(fh)
        fields["tiles"] = tuple(fields.get("tiles", ()))
        attention_pallas.SMALL_GRID_SPARSE = attention_pallas.SparseConfig(**fields)
        log(f"column-sparse kernel for small grids: {attention_pallas.SMALL_GRID_SPARSE}")
    device = jax.devices()[0]
    log(f"device {device.device_kind}, jax {jax.__version__}, {height}x{width}, {steps} steps, config {config}")

    params, text, pooled = random_weights(config, text_len)

    rows, dense = [], None
    for name in variants:
        model_chipmunk, _ = variant_configs(name, steps, args.tiny)
        if model_chipmunk is not None:
            # fc1 stored [F, C] and proj_out split once, not per sparse step; the plain layout is dropped (one copy
            # of the weights on the device, as a user holds them; a later dense variant reads the prepared layout)
            params = jax.block_until_ready(flux.prepare_params(params, config, model_chipmunk))
        row = run_variant(name, params, config, text, pooled, grid, steps, reps, args.tiny,
                          args.static_step_dispatch, kernel_impl)
        if name == "dense":
            dense = row
        rows.append(row)
        log(f"{name}: {row['seconds']:.2f} s for {steps} steps ({row['computed']} computed), compile "
            f"{row['compile_s']:.0f} s, peak {row['peak']:.1f} GiB")

    lines = [
        f"## FLUX.1-dev sampling, one jitted loop ({datetime.date.today()}, {device.device_kind}, jax {jax.__version__})",
        "",
        "Command: `source benchmarks/gpu_env.sh && python3 -P benchmarks/flux_sample.py "
        + " ".join(sys.argv[1:]) + f"`. {'Tiny 2+2-block model' if args.tiny else 'FLUX.1-dev, random bf16 weights'}, "
        f"{height}x{width} ({grid[0] * grid[1]} image + {text_len} text tokens), {steps} Euler steps, batch 1, "
        f"guidance 3.5; Chipmunk preset `config.flux()`, step caching with the default skip schedule; "
        f"{'static' if args.static_step_dispatch else 'traced'} per-step dispatch. Wall time of the whole compiled "
        f"loop, median of {reps} runs after one warm-up."
        + (f" Column-sparse kernel tiling: `{attention_pallas.SMALL_GRID_SPARSE}`." if args.sparse_config else ""),
        "",
        "| variant | computed steps | total s | ms/step | speedup vs dense | spread s | compile s | "
        "final latents vs dense | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = f"{dense['seconds'] / r['seconds']:.2f}x" if dense else "-"
        diff = "-"
        if dense is not None:
            ref = dense["latents"]
            diff = f"{float(np.abs(r['latents'] - ref).max() / np.abs(ref).max()):.2e}"
        lines.append(f"| {r['name']} | {r['computed']}/{steps} | {r['seconds']:.2f} | {1e3 * r['seconds'] / steps:.1f} "
                     f"| {speedup} | {r['spread']:.2f} | {r['compile_s']:.0f} | {diff} | {r['peak']:.1f} |")
    emit_section(lines, args.results)


if __name__ == "__main__":
    main()
