"""Wan end to end with classifier-free guidance: per-invocation transformer time of our dense JAX model and of
the Chipmunk model per step kind (dense, dense + column sums, sparse, skipped = head only), the 50-step totals
composed from the Wan schedule (2 invocations per step: cond, uncond) with and without step caching, and peak GPU
memory. Prints a markdown section; --results appends it.

--model wan2.1-t2v-14b (default), wan2.2-t2v-a14b or wan2.2-ti2v-5b. Wan 2.2 A14B's two experts have one shape, so
one expert's params are timed; its schedule adds the full step at the expert switch (``wan_experts.switch_refresh``,
the switch from ``--shift`` and the release's boundary ratio), and the second expert's weights are reported as
memory. TI2V-5B: the Wan2.2 VAE's (4, 16, 16) stride, 121 frames, e.g. --sizes 1280x704.

On the device machine (720p needs the H200: 26.6 GiB of weights + one branch's caches ~37 GiB):
  source benchmarks/gpu_env.sh && python3 -P benchmarks/wan_e2e.py --results $OUT/wan.md
Smaller runs: --sizes 480p (or WxH), --frames 41, --layers 8, --reps 3, --no-chipmunk, --no-step-cache.
On a CPU: python benchmarks/wan_e2e.py --tiny (a 2-block model, 320 tokens, to check the script itself).

Method: weights come from ``wan.init_params`` (torch's default inits) in bf16 on the device. Times are
medians of --reps calls after warm-up (block_until_ready). The Chipmunk invocation is compiled once
with a traced step index (``lax.switch`` per layer) and the cache donated; each step kind of the
schedule is timed on a drifting trajectory (steps 0 and 1 run first, so the column sets exist). Both
CFG branches run the same shapes, so one branch's cache is timed and a step counts two invocations;
the second branch's cache is reported as memory (it is what a full run holds in addition).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.timing import log, median_ms, rel_err, peak_gib, emit_section
from chipmunk_jax import cache as chipmunk_cache
from chipmunk_jax import config as chipmunk_config
from chipmunk_jax.cache import offload_layer_caches
from chipmunk_jax.models import wan, wan_experts
from chipmunk_jax.sampling import flow_sigmas
from chipmunk_jax.schedule import AttentionStep, ModelStep, attention_schedule, model_schedule, step_plan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_profile import compiled_sources, profile, summarise  # noqa: E402

SIZES = {"480p": (832, 480), "720p": (1280, 720), "704p": (1280, 704)}  # width x height in pixels
INVOCATIONS = 2  # CFG: cond + uncond per step


@dataclasses.dataclass(frozen=True)
class Model:
    title: str
    config: object  # () -> WanConfig
    vae_stride: tuple[int, int, int]  # frames (1 + 4k -> 1 + k), height, width
    frames: int  # the release's default frame count
    boundary: str | None = None  # wan_experts.BOUNDARY_RATIOS key: two experts, switch at the boundary
    shift: float = 5.0  # flow shift of the sigmas that place the switch (the original Wan2.2 A14B configs: 12.0)


MODELS = {
    "wan2.1-t2v-14b": Model("Wan2.1-T2V-14B", wan.WanConfig.t2v_14b, (4, 8, 8), 81),
    "wan2.2-t2v-a14b": Model("Wan2.2-T2V-A14B (two 14B experts)", wan.WanConfig.t2v_a14b, (4, 8, 8), 81,
                             boundary="t2v_a14b", shift=12.0),
    "wan2.2-ti2v-5b": Model("Wan2.2-TI2V-5B", wan.WanConfig.ti2v_5b, (4, 16, 16), 121),
}


def latent_shape(width, height, frames, vae_stride=(4, 8, 8)):
    patch = 2 * vae_stride[1]  # the VAE's stride times the transformer's (1, 2, 2) patches
    if (frames - 1) % vae_stride[0] or height % patch or width % patch:
        raise SystemExit(f"frames must be 1 + {vae_stride[0]}k and width/height multiples of {patch}, got "
                         f"{width}x{height}x{frames}")
    return (frames - 1) // vae_stride[0] + 1, height // vae_stride[1], width // vae_stride[2]


def expert_switch(model: Model, num_steps: int, shift: float):
    """The A14B switch step (the low-noise expert's first step) of ``num_steps`` flow sigmas, None for one expert."""
    if model.boundary is None:
        return None
    sigmas = flow_sigmas(num_steps, shift=shift)
    return wan_experts.switch_step(sigmas, wan_experts.boundary_timestep(wan_experts.BOUNDARY_RATIOS[model.boundary]))


def make_inputs(config, latent, text_len, seed):
    keys = jax.random.split(jax.random.key(seed), 2)
    return dict(
        hidden_states=jax.random.normal(keys[0], (1, config.in_channels, *latent), jnp.bfloat16),
        timestep=jnp.asarray([1000.0], jnp.float32),
        encoder_hidden_states=jax.random.normal(keys[1], (1, text_len, config.text_dim), jnp.bfloat16),
    )


def trajectory(inputs, step, num_steps=50):
    """Inputs of sampling step ``step``: latents drift along one fixed direction (2% of their scale per
    step), so sparse deltas are not trivially zero; the timestep falls from 1000."""
    direction = jax.random.normal(jax.random.key(1000), inputs["hidden_states"].shape, jnp.float32)
    moved = inputs["hidden_states"].astype(jnp.float32) + 0.02 * step * direction
    return dict(inputs, hidden_states=moved.astype(jnp.bfloat16),
                timestep=jnp.asarray([1000.0 * (1.0 - step / num_steps)], jnp.float32))


# ----------------------------------------------------------------------------------------------


def time_dense(params, config, inputs, rope, reps):
    # the RoPE tables travel as an argument: as closed-over constants they would be folded into the HLO
    jitted = jax.jit(lambda p, x, r: wan.forward(p, config, **x, rotary_emb=r, dtype=jnp.bfloat16).sample)
    fn = lambda p, x: jitted(p, x, rope)  # noqa: E731
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, inputs))
    compile_s = time.perf_counter() - t0
    return median_ms(lambda: jax.block_until_ready(fn(params, inputs)), reps), compile_s, fn, jitted


def time_chipmunk(params, config, inputs, rope, latent, chipmunk, reps, kernel_impl, dense_fn, warmup=1,
                  offload=False, profile_calls=0, trace_root=None):
    grid = wan.token_grid(config, (1, config.in_channels) + tuple(latent))
    cache = wan.init_cache(config, chipmunk, batch=1, grid=grid, key=jax.random.key(7), dtype=jnp.bfloat16)
    if offload:  # layer caches in pinned host memory (what two 720p branches need on an 80 GB H100)
        cache = offload_layer_caches(cache)
    cache_gb = chipmunk_cache.cache_bytes(cache) / 2**30

    def step_fn(params, x, cache, step, rope):
        out = wan.forward(params, config, **x, chipmunk=chipmunk, cache=cache, plan=step_plan(chipmunk, step),
                          key=jax.random.key(0), rotary_emb=rope, dtype=jnp.bfloat16, kernel_impl=kernel_impl)
        return out.sample, out.cache, out.hidden

    jitted = jax.jit(step_fn, donate_argnums=(2,))
    fn = lambda p, x, c, s: jitted(p, x, c, s, rope)  # noqa: E731
    t0 = time.perf_counter()
    out0, cache, hidden = fn(params, trajectory(inputs, 0), cache, jnp.int32(0))
    jax.block_until_ready(out0)
    compile_s = time.perf_counter() - t0
    err0 = float("nan") if dense_fn is None else rel_err(out0, dense_fn(params, trajectory(inputs, 0)))
    _, cache, hidden = fn(params, trajectory(inputs, 1), cache, jnp.int32(1))

    attn = attention_schedule(chipmunk)
    kinds = [AttentionStep(int(attn[s])) for s in range(chipmunk.num_steps)]
    representative = {}
    for s, kind in enumerate(kinds):
        representative.setdefault(kind, s)
    times, errors, profiles, sources = {}, {}, [], {}
    state = {"cache": cache}
    for kind, s in representative.items():
        x = trajectory(inputs, s)

        def call():
            out, state["cache"], _ = fn(params, x, state["cache"], jnp.int32(s))
            return jax.block_until_ready(out)

        times[kind.name] = median_ms(call, reps, warmup=warmup)
        if dense_fn is not None:
            errors[kind.name] = rel_err(call(), dense_fn(params, x))
        if profile_calls:
            if not sources:  # one executable serves every step kind (traced step)
                sources = compiled_sources(jitted, params, x, state["cache"], jnp.int32(s), rope)
            wall, events = profile(call, profile_calls, os.path.join(trace_root, kind.name))
            profiles += summarise(f"Chipmunk {kind.name} invocation (step {s})", wall, events, profile_calls, 25,
                                  sources)

    head = jax.jit(lambda p, h, t: wan.head(p, config, h, wan.timestep_conditioning(p, config, timestep=t), grid=grid,
                                            chipmunk=chipmunk, out_dtype=jnp.bfloat16))
    t_skip = jnp.asarray([500.0], jnp.float32)
    times["SKIP (head)"] = median_ms(lambda: jax.block_until_ready(head(params, hidden, t_skip)), max(reps, 5))

    skip = model_schedule(chipmunk)
    per_step_cached = [times["SKIP (head)"] if skip[s] == ModelStep.SKIP else times[kinds[s].name]
                       for s in range(chipmunk.num_steps)]
    counts = {k.name: kinds.count(k) for k in representative}
    counts_cached = {k.name: sum(1 for s in range(chipmunk.num_steps) if kinds[s] == k and skip[s] != ModelStep.SKIP)
                     for k in representative}
    counts_cached["SKIP (head)"] = int(np.sum(skip == ModelStep.SKIP))
    return dict(
        times=times, errors=errors, profiles=profiles, err0=err0, compile_s=compile_s, cache_gb=cache_gb,
        counts=counts, counts_cached=counts_cached,
        total=INVOCATIONS * sum(times[k.name] for k in kinds),
        total_cached=INVOCATIONS * sum(per_step_cached),
    )


# ----------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="wan2.1-t2v-14b")
    parser.add_argument("--sizes", default="480p,720p", help="480p, 720p, 704p or WxH in pixels, comma separated")
    parser.add_argument("--frames", type=int, default=None, help="video frames (1 + 4k; default: the model's)")
    parser.add_argument("--shift", type=float, default=None, help="A14B: the flow shift that places the expert "
                        "switch (default: the original release's 12.0)")
    parser.add_argument("--preset", choices=("wan", "wan_480p"), default="wan", help="the Chipmunk preset")
    parser.add_argument("--layers", type=int, default=None, help="fewer blocks than the model's")
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per Chipmunk step kind before timing "
                        "(0: the step function is already compiled by steps 0 and 1)")
    parser.add_argument("--dense-ms", type=float, default=None, help="dense ms/invocation from an earlier run on "
                        "the same device kind: skips the dense timing and the output checks (one size only)")
    parser.add_argument("--offload", action="store_true", help="layer caches in pinned host memory "
                        "(chipmunk_jax.memory)")
    parser.add_argument("--profile", type=int, default=0, metavar="CALLS", help="also profile CALLS calls of the "
                        "dense invocation and of each Chipmunk step kind (device time per kernel; trace_profile.py)")
    parser.add_argument("--no-chipmunk", action="store_true")
    parser.add_argument("--no-step-cache", action="store_true", help="preset without step caching")
    parser.add_argument("--tiny", action="store_true", help="2-block model, 320 tokens: a CPU check of the script")
    parser.add_argument("--results", default=None, help="append the markdown section to this file")
    args = parser.parse_args()
    model = MODELS[args.model]
    args.frames = model.frames if args.frames is None else args.frames
    args.shift = model.shift if args.shift is None else args.shift
    if not args.shift > 0:
        parser.error("--shift must be > 0")
    for name in ("frames", "text_len", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.profile < 0:
        parser.error("--warmup and --profile must be >= 0")
    if args.dense_ms is not None and ("," in args.sizes or args.dense_ms <= 0):
        parser.error("--dense-ms needs one --sizes entry and a positive value")

    chipmunk = chipmunk_config.PRESETS[args.preset]()
    switch = expert_switch(model, chipmunk.num_steps, args.shift)
    chipmunk = wan_experts.switch_refresh(chipmunk, switch)  # unchanged without a switch
    if args.no_step_cache:
        chipmunk = chipmunk.replace(step_cache__enabled=False)
    if args.tiny:
        config = wan.WanConfig(num_attention_heads=2, attention_head_dim=24, text_dim=64, ffn_dim=96, num_layers=2)
        sizes, frames, text_len, reps, kernel_impl = [(128, 128)], 17, 16, 1, "reference"
        chipmunk = chipmunk.replace(attention__first_n_dense_layers=1)
    else:
        config = model.config()
        if args.layers is not None:
            if args.layers < 1:
                parser.error("--layers must be >= 1")
            config = dataclasses.replace(config, num_layers=args.layers)
        sizes = []
        for s in args.sizes.split(","):
            try:
                sizes.append(SIZES[s] if s in SIZES else tuple(int(v) for v in s.split("x")))
            except ValueError:
                parser.error(f"--sizes: {s!r} is neither 480p/720p nor WxH")
        frames, text_len, reps, kernel_impl = args.frames, args.text_len, args.reps, None
    device = jax.devices()[0]
    log(f"device {device.device_kind}, jax {jax.__version__}, {config.num_layers} blocks, D {config.inner_dim}")

    t0 = time.perf_counter()
    params = wan.init_params(config, jax.random.key(0), dtype=jnp.bfloat16)
    jax.block_until_ready(params)
    weights_gib = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**30
    log(f"random bf16 params in {time.perf_counter() - t0:.1f} s; peak {peak_gib():.1f} GiB")

    rows, profiles = [], []
    trace_root = tempfile.mkdtemp(prefix="wan_profile_") if args.profile else None
    for width, height in sizes:
        latent = latent_shape(width, height, frames, (4, 8, 8) if args.tiny else model.vae_stride)
        grid = wan.token_grid(config, (1, config.in_channels) + tuple(latent))
        tokens = int(np.prod(grid))
        inputs = make_inputs(config, latent, text_len, seed=0)
        rope = wan.pos_embed(config, grid)
        label = f"{width}x{height}x{frames}"
        if args.dense_ms is None:
            dense_ms, compile_s, dense_fn, dense_jitted = time_dense(params, config, inputs, rope, reps)
            log(f"[{label}] {tokens} tokens: dense {dense_ms:.1f} ms/invocation (compile {compile_s:.0f} s), "
                f"peak {peak_gib():.1f} GiB")
            if args.profile:
                wall, events = profile(lambda: jax.block_until_ready(dense_fn(params, inputs)), args.profile,
                                       os.path.join(trace_root, f"dense_{label}"))
                profiles += summarise(f"{label}: dense invocation", wall, events, args.profile, 25,
                                      compiled_sources(dense_jitted, params, inputs, rope))
        else:
            dense_ms, dense_fn = args.dense_ms, None
            log(f"[{label}] {tokens} tokens: dense {dense_ms:.1f} ms/invocation (--dense-ms, earlier run)")
        row = {"size": label, "tokens": tokens, "dense": dense_ms, "peak": peak_gib()}
        rows.append(row)
        if not args.no_chipmunk:
            r = time_chipmunk(params, config, inputs, rope, latent, chipmunk, reps, kernel_impl, dense_fn,
                              warmup=args.warmup, offload=args.offload, profile_calls=args.profile,
                              trace_root=os.path.join(trace_root, label) if args.profile else None)
            profiles += [line.replace("### Chipmunk", f"### {label}: Chipmunk", 1) for line in r["profiles"]]
            log(f"[{label}] Chipmunk compile {r['compile_s']:.0f} s; step-0 output vs dense {r['err0']:.2e}; "
                f"one branch's cache {r['cache_gb']:.1f} GiB")
            for kind, ms in r["times"].items():
                err = r["errors"].get(kind)
                log(f"  {kind:>13}: {ms:.1f} ms/invocation" + ("" if err is None else f", output vs dense {err:.2e}"))
            row.update(chipmunk=r, peak=peak_gib())
            dense_total = INVOCATIONS * 50 * dense_ms
            log(f"[{label}] 50 steps x {INVOCATIONS}: dense {dense_total / 1e3:.1f} s, Chipmunk "
                f"{r['total'] / 1e3:.1f} s ({dense_total / r['total']:.2f}x), + step caching "
                f"{r['total_cached'] / 1e3:.1f} s ({dense_total / r['total_cached']:.2f}x)")

    lines = [
        f"## {model.title if not args.tiny else 'tiny Wan'} end to end, CFG ({datetime.date.today()}, {device.device_kind}, jax {jax.__version__})",
        "",
        "Command: `source benchmarks/gpu_env.sh && python3 -P benchmarks/wan_e2e.py " + " ".join(sys.argv[1:])
        + f"`. Random bf16 weights (torch default inits), {config.num_layers} blocks, batch 1 per invocation, "
        f"text length {text_len}, Chipmunk preset `config.{args.preset}()`"
        + (f"; two experts, switch at step {switch} of 50 (flow shift {args.shift:g}, boundary ratio "
           f"{wan_experts.BOUNDARY_RATIOS[model.boundary]}), a full step there (`wan_experts.switch_refresh`), one "
           f"expert timed (same shapes); the second expert's weights add {weights_gib:.1f} GiB to the peak"
           if model.boundary else "")
        + (" without step caching" if args.no_step_cache else "")
        + ("; layer caches offloaded to pinned host memory" if args.offload else "")
        + f"; per-invocation times in ms (median of {reps}"
        + (f", {args.warmup} warm-up" if args.warmup != 1 else "")
        + (f"; dense ms/invocation {args.dense_ms} given by --dense-ms from an earlier run" if args.dense_ms else "")
        + f"); 50-step totals composed from the schedule with "
        f"{INVOCATIONS} invocations (cond, uncond) per step.",
        "",
        "| size | tokens | dense ms | dense 50-step (s) | Chipmunk 50-step (s) | speedup | + step caching (s) "
        "| speedup | peak GiB | 2nd branch cache GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dense_total = INVOCATIONS * 50 * r["dense"]
        c = r.get("chipmunk")
        cells = (f"{c['total'] / 1e3:.1f} | {dense_total / c['total']:.2f}x | {c['total_cached'] / 1e3:.1f} | "
                 f"{dense_total / c['total_cached']:.2f}x" if c else "- | - | - | -")
        lines.append(f"| {r['size']} | {r['tokens']} | {r['dense']:.1f} | {dense_total / 1e3:.1f} | {cells} | "
                     f"{r['peak']:.1f} | {c['cache_gb']:.1f} |" if c else
                     f"| {r['size']} | {r['tokens']} | {r['dense']:.1f} | {dense_total / 1e3:.1f} | {cells} | "
                     f"{r['peak']:.1f} | - |")
    for r in rows:
        if "chipmunk" in r:
            c = r["chipmunk"]
            lines += ["", f"Chipmunk step kinds at {r['size']} (ms per invocation; invocations of 50 steps without "
                          "/ with step caching, per branch):"]
            for kind, ms in c["times"].items():
                err = c["errors"].get(kind)
                lines.append(f"- {kind}: {ms:.1f} ms x {c['counts'].get(kind, 0)} / {c['counts_cached'].get(kind, 0)}"
                             + ("" if err is None else f" (output vs dense {err:.1e})"))
    if profiles:
        lines += ["", f"Device profiles ({args.profile} call(s) each, after the timed calls):", ""] + profiles
    emit_section(lines, args.results)


if __name__ == "__main__":
    main()
