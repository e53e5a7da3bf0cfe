"""HunyuanVideo end to end: per-step transformer time of our dense JAX model and of the Chipmunk model per
step kind (dense, dense+colsum, sparse, skipped), the 50-step totals composed from the preset's schedule
(with and without step caching), and peak GPU memory. Prints a markdown section; --results appends it.

Full size is 720x1280x129 pixels: latent 16x33x90x160, 118,800 image + 256 text tokens, 12.8 B parameters
(23.9 GiB bf16). Chipmunk's caches at that size are 56 GB, so on the 141 GB H200 everything stays on the
device (run 1: peak 99.8 GiB; both phases in one command with --reps 1, ~6.5 min); on an 80 GB H100 pass
--offload (layer caches in pinned host memory, chipmunk_jax.memory; not yet measured):
  source benchmarks/gpu_env.sh && python3 -P benchmarks/hunyuan_e2e.py --reps 1 --results $OUT/hy.md
Reuse a dense figure from an earlier run on the same device kind with --phase chipmunk --dense-ms MS.
Smaller: --frames 33 --height 480 --width 848; fewer blocks: --blocks 4,8 (times then cover those blocks
only; say so). On a CPU: --tiny checks the script itself.

Method: weights from ``hunyuan_video.init_params`` (torch's default Linear init) in bf16; inputs random
bf16 with a fully valid text mask (a concrete constant, so the dense path runs unmasked). RoPE tables are
jit arguments (not folded constants). Times are medians of --reps calls after warm-up with
block_until_ready. The Chipmunk step is compiled once with a traced step (``lax.switch`` per layer) and
its cache donated; steps 0 and 1 run first (LSE, column sets), then each kind is timed on its own
trajectory state; the skipped step times ``head`` alone. The 50-step totals sum the schedule:
``model_schedule`` (skip or compute) x ``attention_schedule`` (kind of the sparse-capable layers).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.timing import log, median_ms, rel_err, peak_gib, emit_section
from chipmunk_jax import config as chipmunk_config
from chipmunk_jax.cache import offload_layer_caches
from chipmunk_jax.models import hunyuan_video as hv
from chipmunk_jax.schedule import AttentionStep, ModelStep, attention_schedule, model_schedule, step_plan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_profile import compiled_sources, profile, summarise  # noqa: E402










def latent_shape(config, frames, height, width):
    # the HunyuanVideo VAE: 4x in time (plus the first frame), 8x in space
    if (frames - 1) % 4 or height % 16 or width % 16:
        raise SystemExit("--frames must be 4k+1 and --height/--width multiples of 16")
    return (1, config.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)


def make_inputs(config, shape, text_len, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    inputs = dict(
        hidden_states=jax.random.normal(keys[0], shape, dtype),
        encoder_hidden_states=jax.random.normal(keys[1], (1, text_len, config.text_embed_dim), dtype),
        pooled_projections=jax.random.normal(keys[2], (1, config.pooled_projection_dim), dtype),
        timestep=jnp.asarray([1000.0], jnp.float32),
    )
    if config.guidance_embeds:
        inputs["guidance"] = jnp.asarray([6000.0], jnp.float32)
    return inputs


def trajectory(inputs, step):
    """Inputs at sampling step ``step``: latents drift along one fixed direction (2% of their scale per
    step) so the sparse deltas are not trivially zero; the timestep walks down from 1000."""
    direction = jax.random.normal(jax.random.key(1000), inputs["hidden_states"].shape, jnp.float32)
    moved = inputs["hidden_states"].astype(jnp.float32) + 0.02 * step * direction
    return dict(inputs, hidden_states=moved.astype(inputs["hidden_states"].dtype),
                timestep=jnp.asarray([1000.0 * (1.0 - step / 50)], jnp.float32))


def dense_step(params, config, text_mask, rope):
    jitted = jax.jit(lambda p, x, r: hv.forward(p, config, **x, encoder_attention_mask=text_mask,
                                                 rotary_emb=r, dtype=jnp.bfloat16).sample)
    return lambda p, x: jitted(p, x, rope)


def time_dense(params, config, inputs, text_mask, rope, reps):
    fn = dense_step(params, config, text_mask, rope)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, inputs))
    compile_s = time.perf_counter() - t0
    ms = median_ms(lambda: jax.block_until_ready(fn(params, inputs)), reps)
    return ms, compile_s, fn


def time_chipmunk(params, config, inputs, text_mask, rope, chipmunk, reps, kernel_impl, dense_fn, check, warmup=1,
                  offload=False, profile_calls=0, trace_root=None):
    grid = hv.token_grid(config, inputs["hidden_states"].shape)
    text_len = int(text_mask.shape[1])
    cache = hv.init_cache(config, chipmunk, batch=1, grid=grid, text_length=text_len, key=jax.random.key(1),
                          dtype=jnp.bfloat16)
    if offload:  # per-layer caches in pinned host memory; each layer's visits the device for its op
        cache = offload_layer_caches(cache)
    log(f"  cache {sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache)) / 1e9:.1f} GB, "
        f"peak {peak_gib():.1f} GiB")

    def step_fn(params, x, cache, step, rope):
        out = hv.forward(params, config, **x, encoder_attention_mask=text_mask, chipmunk=chipmunk, cache=cache,
                         plan=step_plan(chipmunk, step), key=jax.random.fold_in(jax.random.key(0), step),
                         text_length=text_len, rotary_emb=rope, dtype=jnp.bfloat16, kernel_impl=kernel_impl)
        return out.sample, out.hidden, out.cache

    jitted = jax.jit(step_fn, donate_argnums=(2,))
    state = {"cache": cache}

    def run(step):
        out, hidden, state["cache"] = jitted(params, trajectory(inputs, step), state["cache"], jnp.int32(step), rope)
        return jax.block_until_ready(out), hidden

    t0 = time.perf_counter()
    run(0)
    compile_s = time.perf_counter() - t0
    run(1)
    kinds = {AttentionStep.DENSE: 0, AttentionStep.DENSE_COLSUM: 1, AttentionStep.SPARSE: 2}
    times, errors, profiles, sources = {}, {}, [], {}
    for kind, step in kinds.items():
        times[kind.name] = median_ms(lambda: run(step), reps, warmup=warmup)
        if check:
            errors[kind.name] = rel_err(run(step)[0], dense_fn(params, trajectory(inputs, step)))
        if profile_calls:
            if not sources:  # one executable serves every step kind (traced step)
                sources = compiled_sources(jitted, params, trajectory(inputs, step), state["cache"], jnp.int32(step),
                                           rope)
            wall, events = profile(lambda: run(step), profile_calls, os.path.join(trace_root, kind.name))
            profiles += summarise(f"Chipmunk {kind.name} step (step {step})", wall, events, profile_calls, 25,
                                  sources)
    _, hidden = run(2)
    head = jax.jit(lambda p, h, t: hv.head(p, config, h, hv.timestep_conditioning(
        p, config, timestep=t, pooled_projections=inputs["pooled_projections"], guidance=inputs.get("guidance")),
        grid=grid, chipmunk=chipmunk))
    t = jnp.asarray([500.0], jnp.float32)
    times["SKIPPED"] = median_ms(lambda: jax.block_until_ready(head(params, hidden, t)), max(reps, 5))
    return times, errors, compile_s, profiles


def compose(chipmunk, times, dense_ms):
    attn = attention_schedule(chipmunk)
    skip = model_schedule(chipmunk)
    n = chipmunk.num_steps
    computed = [times[AttentionStep(int(attn[s])).name] for s in range(n)]
    with_skip = sum(times["SKIPPED"] if skip[s] == ModelStep.SKIP else computed[s] for s in range(n))
    counts = {k: sum(1 for s in range(n) if skip[s] != ModelStep.SKIP and AttentionStep(int(attn[s])).name == k)
              for k in ("DENSE", "DENSE_COLSUM", "SPARSE")}
    counts["SKIPPED"] = int(np.sum(skip == ModelStep.SKIP))
    return {"dense": n * dense_ms, "chipmunk": sum(computed), "chipmunk+step_cache": with_skip, "counts": counts}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=129, help="video frames in pixels (4k+1)")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--text-len", type=int, default=256, help="valid text tokens (all valid)")
    parser.add_argument("--blocks", default="20,40", help="double,single block counts (default: full model)")
    parser.add_argument("--phase", default="all", choices=["all", "dense", "chipmunk"])
    parser.add_argument("--dense-ms", type=float, default=None,
                        help="dense ms/step measured by an earlier --phase dense run (for the composition)")
    parser.add_argument("--check", action="store_true", help="also compare each Chipmunk kind to the dense model")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--offload", action="store_true", help="keep the layer caches in pinned host memory "
                        "(chipmunk_jax.memory): what lets 720p fit an 80 GB H100")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per Chipmunk step kind before timing "
                        "(0: the step function is already compiled by steps 0 and 1)")
    parser.add_argument("--profile", type=int, default=0, metavar="CALLS", help="also profile CALLS calls of the "
                        "dense step and of each Chipmunk step kind (device time per kernel; trace_profile.py)")
    parser.add_argument("--tiny", action="store_true", help="2+2 blocks, 2 heads, 17x96x128: a CPU check of the script")
    parser.add_argument("--results", default=None, help="append the markdown section to this file")
    args = parser.parse_args()
    if args.profile < 0:
        parser.error("--profile must be >= 0")

    if args.tiny:
        config = hv.HunyuanVideoConfig(num_layers=2, num_single_layers=2, num_refiner_layers=1, num_attention_heads=2,
                                       text_embed_dim=64, pooled_projection_dim=32)
        args.frames, args.height, args.width, args.text_len, args.reps = 17, 96, 128, 16, 1
        kernel_impl = "reference"
    else:
        double, single = (int(v) for v in args.blocks.split(","))
        config = hv.HunyuanVideoConfig(num_layers=double, num_single_layers=single)
        kernel_impl = None
    chipmunk = chipmunk_config.hunyuan_video()
    shape = latent_shape(config, args.frames, args.height, args.width)
    grid = hv.token_grid(config, shape)
    tokens = f"{int(np.prod(grid)):,} + {args.text_len}"
    device = jax.devices()[0]
    log(f"device {device.device_kind}, jax {jax.__version__}, latent {shape}, tokens {tokens}, config {config}")

    t0 = time.perf_counter()
    params = jax.block_until_ready(hv.init_params(config, jax.random.key(0), dtype=jnp.bfloat16))
    log(f"random bf16 params in {time.perf_counter() - t0:.1f} s; peak {peak_gib():.1f} GiB")
    inputs = make_inputs(config, shape, args.text_len, jnp.bfloat16)
    text_mask = np.ones((1, args.text_len), np.float32)  # concrete: closed over, not traced
    rope = tuple(jnp.asarray(t) for t in hv.pos_embed(config, grid))

    dense_ms, dense_fn, row, profiles = args.dense_ms, None, {}, []
    trace_root = tempfile.mkdtemp(prefix="hunyuan_profile_") if args.profile else None
    if args.phase in ("all", "dense") or args.check:
        ms, compile_s, dense_fn = time_dense(params, config, inputs, text_mask, rope, args.reps)
        if args.phase != "chipmunk":
            dense_ms = ms
        row["dense_peak"] = peak_gib()
        log(f"dense {ms:.1f} ms/step (compile {compile_s:.0f} s), peak {row['dense_peak']:.1f} GiB")
        if args.profile:
            wall, events = profile(lambda: jax.block_until_ready(dense_fn(params, inputs)), args.profile,
                                   os.path.join(trace_root, "dense"))
            profiles += summarise("dense step", wall, events, args.profile, 25)
    if args.phase in ("all", "chipmunk"):
        times, errors, compile_s, kind_profiles = time_chipmunk(
            params, config, inputs, text_mask, rope, chipmunk, args.reps, kernel_impl, dense_fn, args.check,
            warmup=args.warmup, offload=args.offload, profile_calls=args.profile, trace_root=trace_root)
        profiles += kind_profiles
        row["chipmunk_peak"] = peak_gib()
        log(f"Chipmunk compile {compile_s:.0f} s, peak {row['chipmunk_peak']:.1f} GiB")
        for kind, ms in times.items():
            log(f"  {kind:>13}: {ms:.1f} ms" + (f", output vs dense {errors[kind]:.2e}" if kind in errors else ""))
        row["times"] = times
        if dense_ms is not None:
            row["composed"] = compose(chipmunk, times, dense_ms)

    lines = [
        f"## HunyuanVideo end to end ({datetime.date.today()}, {device.device_kind}, jax {jax.__version__})",
        "",
        "Command: `source benchmarks/gpu_env.sh && python3 -P benchmarks/hunyuan_e2e.py " + " ".join(sys.argv[1:])
        + f"`. Random bf16 weights, batch 1, latent {shape[1:]}, tokens {tokens} (image + text), blocks "
        f"{config.num_layers}+{config.num_single_layers}, Chipmunk preset `config.hunyuan_video()`"
        + ("; layer caches offloaded to pinned host memory" if args.offload else "") + "; per-step "
        f"transformer times in ms (median of {args.reps}, {args.warmup} warm-up per kind"
        + (f"; dense ms/step {args.dense_ms} given by --dense-ms from an earlier run" if args.dense_ms and args.phase == "chipmunk" else "")
        + "); 50-step totals composed from the schedule (a full "
        "generation does not fit one 10-minute command).",
        "",
    ]
    if dense_ms is not None:
        lines.append(f"- dense: {dense_ms:.1f} ms/step, peak {row.get('dense_peak', float('nan')):.1f} GiB")
    if "times" in row:
        lines.append(f"- Chipmunk peak {row['chipmunk_peak']:.1f} GiB; per step kind (ms): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in row["times"].items()))
    if "composed" in row:
        c = row["composed"]
        lines += [
            "",
            "| 50 steps | seconds | speedup vs dense |",
            "|---|---|---|",
            f"| dense | {c['dense'] / 1e3:.1f} | 1.00x |",
            f"| Chipmunk | {c['chipmunk'] / 1e3:.1f} | {c['dense'] / c['chipmunk']:.2f}x |",
            f"| Chipmunk + step caching | {c['chipmunk+step_cache'] / 1e3:.1f} | "
            f"{c['dense'] / c['chipmunk+step_cache']:.2f}x |",
            "",
            "Steps per kind with step caching: " + ", ".join(f"{k} {v}" for k, v in c["counts"].items()),
        ]
    if profiles:
        lines += ["", f"Device profiles ({args.profile} call(s) each, after the timed calls):", ""] + profiles
    emit_section(lines, args.results)


if __name__ == "__main__":
    main()
