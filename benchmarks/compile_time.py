"""Compile seconds and compiled memory of the jitted 50-step samplers, dense and Chipmunk, from abstract inputs.

The ONE jitted sampler (chipmunk_jax.sampling.make_sampler) of FLUX.1-dev 1024^2, HunyuanVideo 720p (129 frames) and
Wan2.1-T2V-14B 720p (81 frames, classifier-free guidance), dense and Chipmunk, with static and traced per-step
dispatch, lowered and compiled from ABSTRACT inputs: no weight, cache or latent is ever allocated.

On the device machine (pick rows with --models / --modes / --dispatch so that one call fits the 10-minute limit;
static dispatch compiles several model bodies, ~2.5x the traced compile time per sampling.make_sampler):
  source benchmarks/gpu_env.sh && python3 -P benchmarks/compile_time.py --models flux --json $OUT/ct_flux.json \
    --results $OUT/compile_time.md
  source benchmarks/gpu_env.sh && python3 -P benchmarks/compile_time.py --models hunyuan,wan --modes chipmunk \
    --dispatch static --results $OUT/compile_time.md
Compiling allocates nothing, so every row compiles on an 80 GB H100 too, but Wan 720p with CFG and Chipmunk holds
26.6 GiB of weights + 69 GiB of caches (two branches): running it needs the H200 (or wan_e2e.py's --offload).
On a CPU: python benchmarks/compile_time.py --tiny (the tiny configs of the *_e2e.py / flux_sample.py --tiny runs:
checks the script; compile seconds then are a CPU's, with the reference kernels).

Method: each model is set up as its end-to-end script and the sampler tests do it: FLUX as flux_sample.py (random
bf16 weights, 4096 image + 512 text tokens, embedded guidance 3.5, FLUX's resolution shift, ``prepare_params`` under
Chipmunk, preset ``config.flux()``: no step caching); HunyuanVideo as hunyuan_e2e.py (latent 16x33x90x160, 118,800
image + 256 valid text tokens, embedded guidance 6.0 (x1000), shift 7, preset ``config.hunyuan_video()``: step
caching); Wan as wan_e2e.py (latent 16x21x90x160, 75,600 tokens, 512 text tokens, shift 5, preset ``config.wan()``:
step caching) with CFG scale 5.0: cond and uncond branches, the Chipmunk caches of both stacked
(``wan.init_branch_caches``) and the step cache likewise. The presets are fitted to --steps (``num_steps``; full-step
and skip-schedule entries past the last step dropped). "dense" is the model without Chipmunk (cache None, the sampler's
config with attention, MLP and step caching off, so static dispatch compiles one model body); the step cache is
carried in both modes. Every argument of ``run(params, latents, cond, cache, step_cache, key, uncond)`` is a
``jax.ShapeDtypeStruct`` from ``jax.eval_shape`` of the model's own builders (init_params, prepare_params,
init_cache, sampling_cond, init_step_cache); the RoPE tables travel in ``cond`` (an argument, not folded
constants: FLUX's ``sampling_cond`` does this, HunyuanVideo and Wan get theirs through a thin Denoiser wrapper).
HunyuanVideo's text mask is in ``cond`` too (traced, as in any sampler call: the dense path then masks by key
length; Chipmunk gets the static ``text_length``). Latents are float32, the step cache float32, params and caches
bf16. Per row: ``jax.clear_caches()`` (no tracing
reused from an earlier row; the persistent compilation cache is off unless --compile-cache DIR: then a second
process with the same rows loads the executables from DIR, the CLI's second-run case), then ``lower`` and ``compile`` timed apart,
and ``compiled.memory_analysis()``: argument, output, temp and alias bytes (latents, cache and step cache are
donated, so their outputs alias their arguments), the peak estimate argument + output + temp - alias, XLA's own
peak where the backend reports one, and the check peak <= weights + caches + 3 GiB (weights: the params' bytes;
caches: the Chipmunk caches' plus the step cache's, both branches under CFG). "bodies" counts the model bodies
compiled per invocation: the distinct per-step plans with static dispatch, one with traced dispatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.apps.compile_cache import enable_compile_cache, watch_compile_cache
from chipmunk_jax.timing import log, emit_section
from chipmunk_jax import config as chipmunk_config
from chipmunk_jax import sampling
from chipmunk_jax.cache import init_step_cache, split_branches, stack_branches
from chipmunk_jax.schedule import attention_schedule, mlp_schedule

MODELS = ("flux", "hunyuan", "wan")
MODES = ("dense", "chipmunk")
DISPATCH = ("static", "traced")
HEADROOM_GIB = 3.0  # the formula check: peak <= weights + caches + HEADROOM_GIB
GIB = 2**30
MEMORY_FIELDS = ("argument", "output", "temp", "alias")


@dataclasses.dataclass
class Setup:
    """One model as the sampler sees it, built from abstract shapes."""

    label: str  # e.g. "FLUX.1-dev 1024x1024"
    tokens: str  # e.g. "4096 + 512"
    chipmunk: Any  # the preset, fitted to --steps
    sigmas: np.ndarray
    guidance_scale: float | None  # CFG scale (two branches) or None (one invocation per step)
    # build(model_chipmunk or None, kernel_impl) -> (Denoiser, abstract args of run(...) as a dict)
    build: Callable[..., tuple[sampling.Denoiser, dict]]


def abstract(fn, *args):
    """``jax.eval_shape``: the ShapeDtypeStructs of ``fn(*args)``, nothing allocated."""
    return jax.eval_shape(fn, *args)


def tree_gib(tree) -> float:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)) / GIB


def key_struct(seed=0):
    return abstract(lambda: jax.random.key(seed))


def fit_steps(chipmunk, steps):
    """The preset for a ``steps``-step run: num_steps = steps, full-step and skip schedule entries past it dropped."""
    changes = dict(num_steps=steps, step_cache__skip_step_schedule=tuple(
        s for s in chipmunk.step_cache.skip_step_schedule if s < steps))
    for section in ("attention", "mlp"):
        full = getattr(chipmunk, section).full_step_schedule
        if full is not None:
            changes[f"{section}__full_step_schedule"] = tuple(s for s in full if s < steps)
    return chipmunk.replace(**changes)


def dense_sampler_config(chipmunk):
    """The sampler's config for the dense model: every step computes and has the same (always-dense) plan."""
    return chipmunk.replace(attention__enabled=False, mlp__enabled=False, step_cache__enabled=False)


def rope_in_cond(make_denoiser):
    """A Denoiser whose RoPE tables come in ``cond["rotary_emb"]`` (a jit argument) instead of being closed over
    (folded into the program as constants): ``make_denoiser(rotary_emb)`` is the model's own ``denoiser``."""

    def split(cond):
        rest = dict(cond)
        rope = rest.pop("rotary_emb")
        return make_denoiser(rope), rest

    def compute(params, latents, t, cond, cache, plan, key):
        den, rest = split(cond)
        return den.compute(params, latents, t, rest, cache, plan, key)

    def head(params, hidden, t, cond):
        den, rest = split(cond)
        return den.head(params, hidden, t, rest)

    def timestep_tables(params, sigmas, cond):
        den, rest = split(cond)
        return den.timestep_tables(params, sigmas, rest)

    return sampling.Denoiser(compute=compute, head=head, timestep_tables=timestep_tables)


# ----------------------------------------------------------------------------------------------
# The three models (imported when asked for: one mid-edit model does not stop the others)


def flux_setup(tiny, steps, narrow=False):
    from chipmunk_jax.models import flux

    base = chipmunk_config.flux()
    if narrow:  # FLUX.1's 19 + 38 blocks at the tiny widths, the preset as is: block count drives compile time
        config = flux.FluxConfig(num_layers=19, num_single_layers=38, num_attention_heads=2, joint_attention_dim=64,
                                 pooled_projection_dim=32, guidance_embeds=True)
        height = width = 256
        text_len = 64
    elif tiny:  # flux_sample.py --tiny: a 2+2-block model, 256^2, 64 text tokens; some layers sparse
        config = flux.FluxConfig(num_layers=2, num_single_layers=2, num_attention_heads=2, joint_attention_dim=64,
                                 pooled_projection_dim=32, guidance_embeds=True)
        height = width = 256
        text_len = 64
        base = base.replace(attention__first_n_dense_layers=1, mlp__first_n_dense_layers=1,
                            attention__full_step_every=4, mlp__full_step_every=4,
                            step_cache__skip_step_schedule=(3, 5, 6))
    else:
        config = flux.FluxConfig.dev()
        height = width = 1024
        text_len = 512
    grid = (height // 16, width // 16)
    num_img = grid[0] * grid[1]
    chipmunk = fit_steps(base, steps)

    def build(model_chipmunk, kernel_impl):
        params = abstract(lambda: flux.init_params(config, jax.random.key(0), dtype=jnp.bfloat16))
        if model_chipmunk is not None:  # fc1 stored [F, C] and proj_out split, as sampling does it
            params = abstract(lambda p: flux.prepare_params(p, config, model_chipmunk), params)
        cond = abstract(lambda: flux.sampling_cond(
            config, encoder_hidden_states=jnp.zeros((1, text_len, config.joint_attention_dim), jnp.bfloat16),
            pooled_projections=jnp.zeros((1, config.pooled_projection_dim), jnp.bfloat16), grid=grid, guidance=3.5))
        cache = None if model_chipmunk is None else abstract(lambda: flux.init_cache(
            config, model_chipmunk, batch=1, grid=grid, num_text_tokens=text_len, dtype=jnp.bfloat16))
        args = dict(
            params=params,
            latents=jax.ShapeDtypeStruct((1, num_img, config.in_channels), jnp.float32),
            cond=cond,
            cache=cache,
            step_cache=abstract(lambda: init_step_cache(batch=1, seq_len=num_img, width=config.inner_dim,
                                                        dtype=jnp.float32)),
            key=key_struct(),
            uncond=None,
        )
        den = flux.denoiser(config, model_chipmunk, grid=grid, dtype=jnp.bfloat16, kernel_impl=kernel_impl)
        return den, args

    return Setup(
        label=f"{'narrow 19+38-block FLUX' if narrow else 'tiny FLUX' if tiny else 'FLUX.1-dev'} {height}x{width}",
        tokens=f"{num_img} + {text_len}",
        chipmunk=chipmunk, sigmas=sampling.flow_sigmas(steps, mu=sampling.flux_shift(num_img)), guidance_scale=None,
        build=build)


def hunyuan_setup(tiny, steps):
    from chipmunk_jax.models import hunyuan_video as hv

    if tiny:  # hunyuan_e2e.py --tiny
        config = hv.HunyuanVideoConfig(num_layers=2, num_single_layers=2, num_refiner_layers=1, num_attention_heads=2,
                                       text_embed_dim=64, pooled_projection_dim=32)
        frames, height, width, text_len = 17, 96, 128, 16
    else:
        config = hv.HunyuanVideoConfig()
        frames, height, width, text_len = 129, 720, 1280, 256
    # the HunyuanVideo VAE: 4x in time (plus the first frame), 8x in space
    shape = (1, config.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
    grid = hv.token_grid(config, shape)
    num_img = math.prod(grid)
    chipmunk = fit_steps(chipmunk_config.hunyuan_video(), steps)

    def build(model_chipmunk, kernel_impl):
        def make_cond():
            cond = dict(
                encoder_hidden_states=jnp.zeros((1, text_len, config.text_embed_dim), jnp.bfloat16),
                encoder_attention_mask=jnp.ones((1, text_len), jnp.float32),
                pooled_projections=jnp.zeros((1, config.pooled_projection_dim), jnp.bfloat16),
                rotary_emb=tuple(jnp.asarray(t) for t in hv.pos_embed(config, grid)),
            )
            if config.guidance_embeds:
                cond["guidance"] = jnp.asarray([6000.0], jnp.float32)  # 6.0, the pipeline's x1000
            return cond

        cache = None if model_chipmunk is None else abstract(lambda: hv.init_cache(
            config, model_chipmunk, batch=1, grid=grid, text_length=text_len, key=jax.random.key(1),
            dtype=jnp.bfloat16))
        args = dict(
            params=abstract(lambda: hv.init_params(config, jax.random.key(0), dtype=jnp.bfloat16)),
            latents=jax.ShapeDtypeStruct(shape, jnp.float32),
            cond=abstract(make_cond),
            cache=cache,
            step_cache=abstract(lambda: init_step_cache(batch=1, seq_len=num_img, width=config.inner_dim,
                                                        dtype=jnp.float32)),
            key=key_struct(),
            uncond=None,
        )
        den = rope_in_cond(lambda rope: hv.denoiser(config, model_chipmunk, grid=grid, text_length=text_len,
                                                    rotary_emb=rope, dtype=jnp.bfloat16, kernel_impl=kernel_impl))
        return den, args

    return Setup(
        label=f"{'tiny HunyuanVideo' if tiny else 'HunyuanVideo'} {width}x{height}x{frames}",
        tokens=f"{num_img} + {text_len}", chipmunk=chipmunk, sigmas=sampling.flow_sigmas(steps, shift=7.0),
        guidance_scale=None, build=build)


def wan_setup(tiny, steps, cfg_caches="stacked"):
    from chipmunk_jax.models import wan

    chipmunk = chipmunk_config.wan()
    if tiny:  # wan_e2e.py --tiny
        config = wan.WanConfig(num_attention_heads=2, attention_head_dim=24, text_dim=64, ffn_dim=96, num_layers=2)
        frames, height, width, text_len = 17, 128, 128, 16
        chipmunk = chipmunk.replace(attention__first_n_dense_layers=1)
    else:
        config = wan.WanConfig.t2v_14b()
        frames, height, width, text_len = 81, 720, 1280, 512
    # the Wan VAE: frames 1 + 4k -> 1 + k, 8x in space
    shape = (1, config.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
    grid = wan.token_grid(config, shape)
    num_img = math.prod(grid)
    chipmunk = fit_steps(chipmunk, steps)
    branches = 2  # CFG: cond, uncond

    def build(model_chipmunk, kernel_impl):
        def make_cond():
            return dict(encoder_hidden_states=jnp.zeros((1, text_len, config.text_dim), jnp.bfloat16),
                        rotary_emb=tuple(jnp.asarray(t) for t in wan.pos_embed(config, grid)))

        # the two CFG branches' caches stacked on a leading axis (the sampler slices a branch out and writes it
        # back each call) or as separate pytrees (``--cfg-caches split``: BranchCaches, taken by Python indexing)
        branch_layout = stack_branches if cfg_caches == "stacked" else split_branches
        cache = None if model_chipmunk is None else abstract(lambda: branch_layout(wan.init_cache(
            config, model_chipmunk, batch=1, grid=grid, key=jax.random.key(7), dtype=jnp.bfloat16), branches))
        cond = abstract(make_cond)
        args = dict(
            params=abstract(lambda: wan.init_params(config, jax.random.key(0), dtype=jnp.bfloat16)),
            latents=jax.ShapeDtypeStruct(shape, jnp.float32),
            cond=cond,
            cache=cache,
            step_cache=abstract(lambda: branch_layout(init_step_cache(
                batch=1, seq_len=num_img, width=config.inner_dim, dtype=jnp.float32), branches)),
            key=key_struct(),
            uncond=cond,
        )
        den = rope_in_cond(lambda rope: wan.denoiser(config, model_chipmunk, grid=grid, rotary_emb=rope,
                                                     dtype=jnp.bfloat16, kernel_impl=kernel_impl))
        return den, args

    return Setup(
        label=f"{'tiny Wan' if tiny else 'Wan2.1-T2V-14B'} {width}x{height}x{frames}, CFG ({cfg_caches} branch caches)",
        tokens=f"{num_img} + {text_len}", chipmunk=chipmunk, sigmas=sampling.flow_sigmas(steps, shift=5.0),
        guidance_scale=5.0, build=build)


SETUPS = {"flux": flux_setup, "hunyuan": hunyuan_setup, "wan": wan_setup}


# ----------------------------------------------------------------------------------------------


def num_bodies(sampler_config, steps, static):
    """Model bodies compiled per invocation: the distinct (attention, MLP) plans of the steps run, or one."""
    if not static:
        return 1
    kinds = zip(attention_schedule(sampler_config)[:steps].tolist(), mlp_schedule(sampler_config)[:steps].tolist())
    return len(set(kinds))


def memory_row(compiled):
    """GiB per memory_analysis field (None where the backend does not say) and the peak estimate."""
    try:
        stats = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - some backends do not implement it
        log(f"  memory_analysis() unavailable: {type(e).__name__}: {e}")
        stats = None
    out = {}
    for name in MEMORY_FIELDS:
        value = getattr(stats, f"{name}_size_in_bytes", None) if stats is not None else None
        out[f"{name}_gib"] = None if value is None else value / GIB
    if all(out[f"{name}_gib"] is not None for name in MEMORY_FIELDS):
        out["peak_gib"] = out["argument_gib"] + out["output_gib"] + out["temp_gib"] - out["alias_gib"]
    else:
        out["peak_gib"] = None
    xla_peak = getattr(stats, "peak_memory_in_bytes", None) if stats is not None else None
    out["xla_peak_gib"] = xla_peak / GIB if xla_peak else None  # 0 / absent: not reported
    return out


def run_row(setup, model, mode, dispatch, steps, kernel_impl):
    model_chipmunk = setup.chipmunk if mode == "chipmunk" else None
    sampler_config = setup.chipmunk if mode == "chipmunk" else dense_sampler_config(setup.chipmunk)
    static = dispatch == "static"
    jax.clear_caches()  # no tracing or lowering reused from an earlier row
    den, args = setup.build(model_chipmunk, kernel_impl)
    weights = tree_gib(args["params"])
    caches = tree_gib(args["cache"]) + tree_gib(args["step_cache"])
    run = sampling.make_sampler(den, sampler_config, setup.sigmas, guidance_scale=setup.guidance_scale,
                                static_step_dispatch=static)
    order = ("params", "latents", "cond", "cache", "step_cache", "key", "uncond")
    t0 = time.perf_counter()
    lowered = run.lower(*(args[name] for name in order))
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with watch_compile_cache() as cache_events:
        compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    row = dict(model=model, label=setup.label, tokens=setup.tokens, mode=mode, dispatch=dispatch, steps=steps,
               cfg=setup.guidance_scale is not None, bodies=num_bodies(sampler_config, steps, static),
               lower_s=lower_s, compile_s=compile_s, persistent_cache=cache_events.describe(), **memory_row(compiled), weights_gib=weights, caches_gib=caches)
    row["budget_gib"] = weights + caches + HEADROOM_GIB
    row["fits"] = None if row["peak_gib"] is None else bool(row["peak_gib"] <= row["budget_gib"])
    del compiled, lowered
    return row


def fmt(value):
    """GiB: two decimals, three significant digits below 1 GiB (the tiny configs' MiB)."""
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def table(rows):
    lines = [
        "| model | mode | dispatch | bodies | lower s | compile s | args GiB | out GiB | temp GiB | alias GiB "
        "| peak est. GiB | XLA peak GiB | weights GiB | caches GiB | peak <= w + c + 3 | persistent cache |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['dispatch']} | FAILED: {r['error']} |"
                         + " |" * 12)
            continue
        fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "NO")
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['dispatch']} | {r['bodies']} | {r['lower_s']:.1f} "
            f"| {r['compile_s']:.1f} | {fmt(r['argument_gib'])} | {fmt(r['output_gib'])} | {fmt(r['temp_gib'])} "
            f"| {fmt(r['alias_gib'])} | {fmt(r['peak_gib'])} | {fmt(r['xla_peak_gib'])} | {fmt(r['weights_gib'])} "
            f"| {fmt(r['caches_gib'])} | {fits} | {r['persistent_cache']} |")
    return lines


def choices(parser, option, value, allowed):
    picked = [v for v in value.split(",") if v]
    unknown = sorted(set(picked) - set(allowed))
    if unknown or not picked:
        parser.error(f"--{option}: unknown {unknown or 'empty list'}; choose from {','.join(allowed)}")
    return [v for v in allowed if v in picked]  # fixed order, no duplicates


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma separated subset of {','.join(MODELS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma separated subset of {','.join(MODES)}")
    parser.add_argument("--dispatch", default=",".join(DISPATCH),
                        help=f"per-step dispatch, comma separated subset of {','.join(DISPATCH)} "
                             "(static: sampling.make_sampler(static_step_dispatch=True))")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (>= 2; presets clipped to them)")
    parser.add_argument("--kernel-impl", default=None, help="the Chipmunk ops' kernel_impl (default: the kernels' "
                        "own, Pallas on GPU and the jnp reference elsewhere)")
    parser.add_argument("--cfg-caches", choices=("stacked", "split"), default="stacked",
                        help="Wan's two CFG branch caches: stacked on a leading axis (wan.init_branch_caches) or split "
                             "(cache.split_branches: no per-call branch slice and write-back)")
    parser.add_argument("--tiny", action="store_true", help="the e2e scripts' tiny configs: a CPU check in seconds")
    parser.add_argument("--narrow", action="store_true",
                        help="FLUX only: FLUX.1's 19 + 38 blocks at the tiny widths with the FLUX preset (the CPU "
                             "check of compile time against block count)")
    parser.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="use JAX's persistent compilation cache in DIR (as the CLI does) instead of turning it "
                             "off: run twice, in two processes, to time a compile served from disk")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows (and the run's metadata) here")
    parser.add_argument("--results", default=None, help="append the markdown section to this file")
    args = parser.parse_args()
    models = choices(parser, "models", args.models, MODELS)
    modes = choices(parser, "modes", args.modes, MODES)
    dispatches = choices(parser, "dispatch", args.dispatch, DISPATCH)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (steps 0 and 1 are Chipmunk's full steps)")
    if args.narrow and (models != ["flux"] or args.tiny):
        parser.error("--narrow is a FLUX size: pass --models flux and no --tiny")

    if args.compile_cache is None:
        jax.config.update("jax_enable_compilation_cache", False)  # measure compiles, not cache loads
    else:
        enable_compile_cache(args.compile_cache)
    device = jax.devices()[0]
    log(f"device {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, {args.steps} steps, "
        f"models {models}, modes {modes}, dispatch {dispatches}{', tiny' if args.tiny else ''}")

    rows, labels = [], {}
    for model in models:
        try:
            extra = {"narrow": True} if args.narrow and model == "flux" else {}
            extra |= {"cfg_caches": args.cfg_caches} if model == "wan" else {}
            setup = SETUPS[model](args.tiny, args.steps, **extra)
        except Exception as e:  # noqa: BLE001 - e.g. a model mid-edit: the other models still run
            traceback.print_exc()
            rows += [dict(model=model, mode=m, dispatch=d, error=f"{type(e).__name__}: {e}".splitlines()[0])
                     for m in modes for d in dispatches]
            continue
        labels[model] = f"{setup.label} ({setup.tokens} tokens)"
        log(f"[{model}] {labels[model]}")
        for mode in modes:
            for dispatch in dispatches:
                try:
                    row = run_row(setup, model, mode, dispatch, args.steps, args.kernel_impl)
                except Exception as e:  # noqa: BLE001 - one failing row (an OOM while compiling) keeps the others
                    traceback.print_exc()
                    row = dict(model=model, mode=mode, dispatch=dispatch,
                               error=f"{type(e).__name__}: {e}".splitlines()[0][:200])
                    log(f"  {mode} {dispatch}: FAILED {row['error']}")
                else:
                    log(f"  {mode} {dispatch}: lower {row['lower_s']:.1f} s, compile {row['compile_s']:.1f} s "
                        f"({row['bodies']} bodies), peak est. {fmt(row['peak_gib'])} GiB (weights "
                        f"{fmt(row['weights_gib'])} + caches {fmt(row['caches_gib'])} GiB)")
                rows.append(row)

    lines = [
        f"## Sampler compile time and compiled memory ({datetime.date.today()}, {device.device_kind}, "
        f"jax {jax.__version__})",
        "",
        "Command: `source benchmarks/gpu_env.sh && python3 -P benchmarks/compile_time.py " + " ".join(sys.argv[1:])
        + f"`. One jitted {args.steps}-step sampler per row (`sampling.make_sampler`), lowered and compiled from "
        "abstract bf16 params, caches and inputs (nothing allocated); memory from `compiled.memory_analysis()`, "
        "peak est. = args + out + temp - alias; caches = Chipmunk caches + step cache (both CFG branches for Wan). "
        "Models: " + "; ".join(f"{m}: {label}" for m, label in labels.items()) + ".",
        "",
    ] + table(rows)
    emit_section(lines, args.results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(date=str(datetime.date.today()), device=device.device_kind, backend=jax.default_backend(),
                           jax=jax.__version__, argv=sys.argv[1:], steps=args.steps, tiny=args.tiny, models=labels,
                           rows=rows), f, indent=1)
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
