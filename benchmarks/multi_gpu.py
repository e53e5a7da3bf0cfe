"""Many GPUs: per-step-kind times and composed 50-step totals of HunyuanVideo 720p x129 and Wan2.1-14B 720p x81 CFG,
dense and Chipmunk, on P = 1, 2, 4, 8 devices (as many as the machine has), with scaling efficiency, per-device peak
memory and the bytes the collectives move per step. Prints a markdown section; --results appends it, --json keeps
the rows. On the device machine (one GPU runs P = 1 only and says so):
  source benchmarks/gpu_env.sh && python3 -P benchmarks/multi_gpu.py --results $OUT/multi_gpu.md     # 8 GPUs
  source benchmarks/gpu_env.sh && python3 -P benchmarks/multi_gpu.py --devices 1 --results $OUT/multi_gpu.md
A full-size sweep does not fit one 10-minute command; run it in parts, P = 1 first, e.g. `--models hunyuan --devices 1
--reps 1 --warmup 0 --json $OUT/hy1.json`, then `--models hunyuan --devices 8,4 ... --baseline hy1.json` with that
file copied back into the working tree (--baseline's P = 1 rows give T(P=1) where a run has none; said in the notes).
Smaller: --frames 33 --height 480 --width 848, --blocks 4,8 (HunyuanVideo), --layers 8 (Wan); stated in the output.
CPU check of the script: XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/multi_gpu.py --tiny

Method: per (model, P) the mesh is ``parallel.make_mesh`` over ``jax.devices()[:P]`` (P = 1: no mesh, the plain
single-device path): HunyuanVideo sequence = P (embedded guidance); Wan cfg = 2 x sequence = P/2 for even P (each CFG
branch on half the devices), or with --wan-mesh sequence all P on "sequence" and the branches in turn. Random bf16
weights (``init_params``) are created replicated; the caches (two stacked CFG branches for Wan) are created directly
sharded as ``parallel.sampler_cache_shardings`` says. Timed: ONE sampling step per step kind, the loop body of
``sampling.make_sampler(..., static_step_dispatch=True, mesh=mesh)``: the model's ``denoiser(..., mesh=mesh).compute``
with a static ``StepPlan`` per CFG branch (vmapped over "cfg" or in turn), the guidance combine, the caches'
sharding constraint and the Euler update, jitted with the caches donated and carried; a skipped step runs ``head`` on
the step cache. Steps 0, 1, 2 (DENSE, DENSE_COLSUM, SPARSE) run in order on a drifting trajectory (hunyuan_e2e /
wan_e2e ``trajectory``), so each kind sees real caches; medians of --reps calls after --warmup, compiled ahead of
time. The dense model is the same step without Chipmunk. 50-step totals sum the preset's schedule
(``model_schedule`` x ``attention_schedule``, as the e2e scripts), without and with step caching; a Wan step holds
both invocations. Scaling efficiency = T(P=1) / (P T(P)) of the totals without step caching.

Peak memory: ``memory_stats()["peak_bytes_in_use"]``, a process-lifetime high-water mark, max over the mesh's
devices after the row. P runs from the largest down so per-device memory grows row by row; "<= X": that device's
mark did not rise during the row (an earlier row set it). n/a where the backend does not say (CPU).

Collective bytes: per device (shapes after SPMD partitioning) from each step kind's compiled HLO, the summed result
sizes of all-to-all, all-gather, all-reduce, reduce-scatter and collective-permute (async pairs: the -done; wrapped
async ops once), each while body (the scanned block stacks) times its ``known_trip_count`` (">=": a loop without
one, counted once), the larger branch of a conditional. A result is what a device receives; an all-to-all keeps 1/P
of it local.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
import time
import traceback
from types import SimpleNamespace
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from chipmunk_jax import config as chipmunk_config
from chipmunk_jax import parallel
from chipmunk_jax.cache import StepCache, init_step_cache, select_branch, stack_branches, update_branch
from chipmunk_jax.models import hunyuan_video as hv
from chipmunk_jax.models import wan
from chipmunk_jax.schedule import AttentionStep, MLPStep, ModelStep, attention_schedule, mlp_schedule, model_schedule
from chipmunk_jax.schedule import step_plan
from chipmunk_jax.timing import emit_section, log, median_ms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hunyuan_e2e  # noqa: E402
import wan_e2e  # noqa: E402

SKIPPED = "SKIPPED"
DENSE_MODEL = "dense model"


@dataclasses.dataclass
class Workload:
    """One model at one size: what the step functions need."""

    key: str  # "hunyuan" / "wan"
    title: str
    label: str  # size, tokens, blocks
    heads: int
    chipmunk: Any
    init_params: Callable  # key -> params
    init_cache: Callable  # chipmunk -> one branch's ModelCache
    denoiser: Callable  # (chipmunk or None, mesh, rope) -> sampling.Denoiser
    latents: Callable  # step -> latents of the drifting trajectory
    rope: tuple
    cond: dict
    uncond: dict | None  # CFG: the second branch's conditioning
    static_cond: dict  # concrete, closed over (HunyuanVideo's all-valid text mask: the unmasked path, as hunyuan_e2e)
    hidden_shape: tuple  # the step cache's hidden state
    guidance_scale: float | None = None

    def mesh_axes(self, count: int, wan_mesh: str) -> tuple[int, int]:
        cfg = 2 if self.guidance_scale is not None and wan_mesh == "cfg" and count % 2 == 0 else 1
        return cfg, count // cfg


def hunyuan_workload(args) -> Workload:
    frames, text_len, kernel_impl = args.frames or 129, args.text_len or 256, None
    if args.tiny:
        config = hv.HunyuanVideoConfig(num_layers=2, num_single_layers=2, num_refiner_layers=1, num_attention_heads=4,
                                       attention_head_dim=32, rope_axes_dim=(8, 12, 12), text_embed_dim=64,
                                       pooled_projection_dim=32)
        frames, height, width, text_len, kernel_impl = 17, 96, 128, 16, "reference"
    else:
        double, single = (int(v) for v in args.blocks.split(","))
        config = hv.HunyuanVideoConfig(num_layers=double, num_single_layers=single)
        height, width = args.height, args.width
    shape = hunyuan_e2e.latent_shape(config, frames, height, width)
    inputs = hunyuan_e2e.make_inputs(config, shape, text_len, jnp.bfloat16)
    grid = hv.token_grid(config, shape)
    num_img = int(np.prod(grid))
    return Workload(
        key="hunyuan", title="HunyuanVideo", heads=config.num_attention_heads, chipmunk=chipmunk_config.hunyuan_video(),
        label=f"{width}x{height}x{frames}, {num_img:,} + {text_len} tokens, {config.num_layers}+"
              f"{config.num_single_layers} blocks",
        init_params=lambda key: hv.init_params(config, key, dtype=jnp.bfloat16),
        init_cache=lambda chipmunk: hv.init_cache(config, chipmunk, batch=1, grid=grid, text_length=text_len,
                                                  key=jax.random.key(1), dtype=jnp.bfloat16),
        denoiser=lambda chipmunk, mesh, rope: hv.denoiser(config, chipmunk, grid=grid, text_length=text_len,
                                                          rotary_emb=rope, kernel_impl=kernel_impl, mesh=mesh),
        latents=lambda step: hunyuan_e2e.trajectory(inputs, step)["hidden_states"],
        rope=tuple(jnp.asarray(t) for t in hv.pos_embed(config, grid)),
        cond={k: inputs[k] for k in ("encoder_hidden_states", "pooled_projections", "guidance")}, uncond=None,
        static_cond={"encoder_attention_mask": np.ones((1, text_len), np.float32)},
        hidden_shape=(1, num_img, config.inner_dim))


def wan_workload(args) -> Workload:
    frames, text_len, kernel_impl = args.frames or 81, args.text_len or 512, None
    chipmunk = chipmunk_config.wan()
    if args.tiny:
        config = wan.WanConfig(num_attention_heads=4, attention_head_dim=24, text_dim=64, ffn_dim=96, num_layers=2)
        frames, height, width, text_len, kernel_impl = 17, 128, 128, 16, "reference"
        chipmunk = chipmunk.replace(attention__first_n_dense_layers=1)
    else:
        config, height, width = wan.WanConfig.t2v_14b(), args.height, args.width
        if args.layers is not None:
            config = dataclasses.replace(config, num_layers=args.layers)
    latent = wan_e2e.latent_shape(width, height, frames)
    grid = wan.token_grid(config, (1, config.in_channels) + tuple(latent))
    tokens = int(np.prod(grid))
    inputs = wan_e2e.make_inputs(config, latent, text_len, seed=0)
    uncond_text = wan_e2e.make_inputs(config, latent, text_len, seed=1)["encoder_hidden_states"]
    return Workload(
        key="wan", title="Wan2.1-T2V-14B, CFG", heads=config.num_attention_heads, chipmunk=chipmunk,
        label=f"{width}x{height}x{frames}, {tokens:,} tokens, text {text_len}, {config.num_layers} blocks",
        init_params=lambda key: wan.init_params(config, key, dtype=jnp.bfloat16),
        init_cache=lambda chipmunk: wan.init_cache(config, chipmunk, batch=1, grid=grid, key=jax.random.key(7),
                                                   dtype=jnp.bfloat16),
        denoiser=lambda chipmunk, mesh, rope: wan.denoiser(config, chipmunk, grid=grid, rotary_emb=rope,
                                                           kernel_impl=kernel_impl, mesh=mesh),
        latents=lambda step: wan_e2e.trajectory(inputs, step)["hidden_states"],
        rope=tuple(jnp.asarray(t) for t in wan.pos_embed(config, grid)),
        cond={"encoder_hidden_states": inputs["encoder_hidden_states"]},
        uncond={"encoder_hidden_states": uncond_text}, static_cond={},
        hidden_shape=(1, tokens, config.inner_dim), guidance_scale=5.0)


def step_kinds(chipmunk) -> list[tuple[str, int, Any]]:
    """(name, representative step, static plan) of each step kind, in the order the schedule first reaches them;
    the skipped step (plan None) last."""
    attn, mlp, n = attention_schedule(chipmunk), mlp_schedule(chipmunk), chipmunk.num_steps
    first = {}
    for s in range(n):
        first.setdefault((int(attn[s]), int(mlp[s])), s)
    kinds = [(kind_name(chipmunk, s), s, step_plan(chipmunk, s)) for s in first.values()]
    skips = np.flatnonzero(model_schedule(chipmunk) == ModelStep.SKIP)
    return kinds + ([(SKIPPED, int(skips[0]), None)] if skips.size else [])


def kind_name(chipmunk, step: int) -> str:
    name = AttentionStep(int(attention_schedule(chipmunk)[step])).name
    return name + (f"+{MLPStep(int(mlp_schedule(chipmunk)[step])).name}" if chipmunk.mlp.enabled else "")


def make_step(work: Workload, chipmunk, mesh, plan, skip: bool, num_steps: int):
    """jit of ``(params, x, t, cond, uncond, cache, step_cache, rope, key) -> (x, cache, step_cache)``: one step of
    ``sampling.make_sampler`` with static dispatch (``t``: the denoiser's timestep tables at the step, stacked over
    the CFG branches when they run side by side, else a (cond, uncond) pair)."""
    cfg_on = work.guidance_scale is not None
    cfg_parallel = mesh is not None and parallel.cfg_size(mesh) == 2

    def step(params, x, t, cond, uncond, cache, step_cache, rope, key):
        den = work.denoiser(chipmunk, mesh, rope)

        def one(t, cond, cache, step_cache):
            cond = dict(cond, **work.static_cond)
            if skip:
                return den.head(params, step_cache.hidden, t, cond), cache, step_cache
            out = den.compute(params, x, t, cond, cache, plan, key)
            return out.sample, out.cache, StepCache(hidden=out.hidden.astype(step_cache.hidden.dtype),
                                                    valid=jnp.bool_(True))

        if cfg_parallel:
            both = jax.tree.map(lambda a, b: jnp.stack([a, b]), cond, uncond)
            v, cache, step_cache = jax.vmap(one, spmd_axis_name=parallel.CFG)(t, both, cache, step_cache)
            v_c, v_u = v[0], v[1]
        elif cfg_on:
            v_c, c_c, s_c = one(t[0], cond, select_branch(cache, 0), select_branch(step_cache, 0))
            v_u, c_u, s_u = one(t[1], uncond, select_branch(cache, 1), select_branch(step_cache, 1))
            cache = update_branch(update_branch(cache, 0, c_c), 1, c_u)
            step_cache = update_branch(update_branch(step_cache, 0, s_c), 1, s_u)
        else:
            v, cache, step_cache = one(t, cond, cache, step_cache)
        if cfg_on:
            v_u = v_u.astype(jnp.float32)
            v = v_u + work.guidance_scale * (v_c.astype(jnp.float32) - v_u)
        if mesh is not None:
            shardings = parallel.sampler_cache_shardings(cache, step_cache, mesh, branches=cfg_on)
            cache, step_cache = jax.lax.with_sharding_constraint((cache, step_cache), shardings)
        x = (x.astype(jnp.float32) - v.astype(jnp.float32) / num_steps).astype(x.dtype)
        return x, cache, step_cache

    return jax.jit(step, donate_argnums=(5, 6))


COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z][\w\-]*)\((.*)$")


def shape_bytes(text: str) -> int:
    """Bytes of an HLO type: ``f32[1,128,4,8]{3,2,1,0}`` or a tuple of them (f8 types: 1 byte)."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]", text):
        size = DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
        total += size * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
    return total


def collective_bytes(hlo: str) -> tuple[int, bool]:
    """(bytes per device the collectives of one run of the entry computation receive, whether every loop's trip
    count was known): see the module docstring."""
    own, calls, entry, name = {}, {}, None, None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            entry = name if line.startswith("ENTRY") else entry
            own[name], calls[name] = 0, []
            continue
        match = name and _INSTRUCTION.match(line)
        if not match:
            continue
        result, opcode, rest = match.groups()
        if opcode in COLLECTIVES or (opcode.endswith("-done") and opcode[:-5] in COLLECTIVES):
            own[name] += shape_bytes(result)
        if opcode == "while":
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
            body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
            calls[name].append(("loop", [body], int(trip.group(1)) if trip else None))
        elif opcode == "conditional":
            listed = re.search(r"branch_computations=\{([^}]*)\}", rest)
            branches = (re.findall(r"%?([\w.\-]+)", listed.group(1)) if listed else
                        re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", rest))
            calls[name].append(("max", branches, 1))
        elif opcode not in ("async-update", "async-done"):
            calls[name] += [("call", [c], 1) for c in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest)]
    memo = {}

    def total(comp):
        if comp not in memo:
            exact, count = True, own.get(comp, 0)
            for how, callees, trips in calls.get(comp, []):
                parts = [total(c) for c in callees]
                exact &= all(e for _, e in parts) and trips is not None
                inner = max(b for b, _ in parts) if how == "max" else sum(b for b, _ in parts)
                count += inner * (trips or 1)
            memo[comp] = (count, exact)
        return memo[comp]

    return total(entry) if entry else (0, True)


def peaks(devices) -> list[int] | None:
    stats = [d.memory_stats() or {} for d in devices]
    return None if any("peak_bytes_in_use" not in s for s in stats) else [s["peak_bytes_in_use"] for s in stats]


def replicated(tree, mesh):
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def narrow(params, mesh):
    """``params`` replicated over some first devices, as arrays replicated over ``mesh`` (None: device 0) made of
    the same per-device buffers (no copy; the other devices' copies go with the wider arrays)."""
    devices = jax.devices()[:1] if mesh is None else list(mesh.devices.flat)

    def one(x):
        shards = {shard.device: shard.data for shard in x.addressable_shards}
        return shards[devices[0]] if mesh is None else jax.make_array_from_single_device_arrays(
            x.shape, NamedSharding(mesh, PartitionSpec()), [shards[d] for d in devices])

    return jax.tree.map(one, params)


def place(work: Workload, mesh, params) -> SimpleNamespace:
    """What every step of one (model, P) reads, replicated over ``mesh``, with the timestep tables of all 50 steps
    per CFG branch (computed before the loop, as the sampler does)."""
    cond, uncond, rope = (replicated(x, mesh) for x in (work.cond, work.uncond, work.rope))
    tables_fn = jax.jit(work.denoiser(None, mesh, rope).timestep_tables)
    sigmas = jnp.asarray([1.0 - s / 50 for s in range(50)], jnp.float32)  # the e2e trajectories' timesteps / 1000
    tables = [tables_fn(params, sigmas, c) for c in ((cond, uncond) if work.guidance_scale is not None else (cond,))]
    return SimpleNamespace(mesh=mesh, params=params, cond=cond, uncond=uncond, rope=rope, tables=tables)


def time_mode(work: Workload, mode: str, placed: SimpleNamespace, args) -> dict:
    """Per-step-kind ms, compile s and collective bytes of one mode on one mesh (``mesh`` None: one device)."""
    chipmunk = work.chipmunk if mode == "chipmunk" else None
    cfg_on = work.guidance_scale is not None
    mesh, params, cond, uncond, rope = placed.mesh, placed.params, placed.cond, placed.uncond, placed.rope
    devices = jax.devices()[:1] if mesh is None else list(mesh.devices.flat)
    before = peaks(devices)

    def init_state():
        cache = None if chipmunk is None else work.init_cache(chipmunk)
        step_cache = init_step_cache(batch=1, seq_len=work.hidden_shape[1], width=work.hidden_shape[2])
        return (None if cache is None else stack_branches(cache, 2), stack_branches(step_cache, 2)) if cfg_on else \
            (cache, step_cache)

    shardings = None if mesh is None else parallel.sampler_cache_shardings(
        *jax.eval_shape(init_state), mesh, branches=cfg_on)
    state = dict(zip(("cache", "step_cache"), jax.jit(init_state, out_shardings=shardings)()))
    kinds = step_kinds(chipmunk) if chipmunk is not None else [(DENSE_MODEL, 0, None)]
    cfg_parallel = mesh is not None and parallel.cfg_size(mesh) == 2
    row = {"times": {}, "compile_s": {}, "collective_bytes": {}, "collectives_exact": True}
    for name, step, plan in kinds:
        t = [jax.tree.map(lambda a: a[step], branch) for branch in placed.tables]
        t = jax.tree.map(lambda *a: jnp.stack(a), *t) if cfg_parallel else (tuple(t) if cfg_on else t[0])
        x, key = (replicated(a, mesh) for a in (work.latents(step), jax.random.fold_in(jax.random.key(0), step)))
        jitted = make_step(work, chipmunk, mesh, plan, skip=name == SKIPPED, num_steps=work.chipmunk.num_steps)
        t0 = time.perf_counter()
        compiled = jitted.lower(params, x, t, cond, uncond, state["cache"], state["step_cache"], rope, key).compile()
        row["compile_s"][name] = time.perf_counter() - t0
        row["collective_bytes"][name], exact = collective_bytes(compiled.as_text())
        row["collectives_exact"] &= exact

        def call():
            out, state["cache"], state["step_cache"] = compiled(params, x, t, cond, uncond, state["cache"],
                                                                state["step_cache"], rope, key)
            jax.block_until_ready(out)

        row["times"][name] = median_ms(call, args.reps, warmup=args.warmup)
        log(f"    {name}: {row['times'][name]:.1f} ms, compile {row['compile_s'][name]:.1f} s, collectives "
            f"{row['collective_bytes'][name] / 1e6:.2f} MB/device")
    after = peaks(devices)
    if after is not None:
        top = int(np.argmax(after))
        row["peak_gib"], row["peak_exact"] = after[top] / 2**30, after[top] > before[top]
    row.update(compose(chipmunk, row["times"]))
    return row


def compose(chipmunk, times: dict) -> dict:
    """50-step totals in s (hunyuan_e2e.compose): the schedule's kinds, with and without step caching."""
    if chipmunk is None:
        return {"total_s": 50 * times[DENSE_MODEL] / 1e3, "total_cached_s": None}
    skip, n = model_schedule(chipmunk), chipmunk.num_steps
    computed = [times[kind_name(chipmunk, s)] for s in range(n)]
    cached = [times[SKIPPED] if skip[s] == ModelStep.SKIP else computed[s] for s in range(n)]
    return {"total_s": sum(computed) / 1e3, "total_cached_s": sum(cached) / 1e3 if SKIPPED in times else None}


def run_model(work: Workload, args, device_counts: list[int], modes: list[str]) -> list[dict]:
    rows, params = [], None
    for count in sorted(device_counts, reverse=True):  # largest P first: per-device memory grows row by row
        cfg, sequence = work.mesh_axes(count, args.wan_mesh)
        base = {"model": work.key, "label": work.label, "P": count,
                "mesh": "one device" if count == 1 else f"cfg {cfg} x sequence {sequence}"}
        if count > jax.device_count():
            rows += [dict(base, mode=m, error=f"only {jax.device_count()} device(s)") for m in modes]
            continue
        log(f"[{work.title}] P={count} ({base['mesh']})")
        try:
            mesh = None if count == 1 else parallel.make_mesh(cfg=cfg, sequence=sequence,
                                                              devices=jax.devices()[:count])
            if mesh is not None:
                parallel.check_heads(work.title, work.heads, mesh)
            if params is None:  # created once per model, replicated over the largest mesh, narrowed from there
                everywhere = NamedSharding(parallel.make_mesh(sequence=count, devices=jax.devices()[:count]),
                                           PartitionSpec())
                params = jax.jit(work.init_params, out_shardings=everywhere)(jax.random.key(0))
            params = narrow(params, mesh)
            placed = place(work, mesh, params)
        except Exception as error:  # noqa: BLE001 (a P the model cannot split: a skipped row, not a crash)
            rows += [dict(base, mode=m, error=error_text(error)) for m in modes]
            continue
        for mode in modes:
            log(f"  {mode}")
            try:
                rows.append(dict(base, mode=mode, **time_mode(work, mode, placed, args)))
            except Exception as error:  # noqa: BLE001 (out of memory, ...: a skipped row)
                rows.append(dict(base, mode=mode, error=error_text(error)))
        del placed  # the caches of the next (smaller) mesh need the room
    return rows


def error_text(error: Exception) -> str:
    """The error's first line, for a skipped row."""
    text = traceback.format_exception_only(type(error), error)[-1].strip().splitlines()[0]
    log(f"  skipped: {text}")
    return text[:300]


def table(work: Workload, rows: list[dict], baseline: list[dict]) -> list[str]:
    lines = [f"### {work.title}: {work.label}", "",
             "| P | mesh | mode | ms per step kind | 50 steps (s) | + step caching (s) | speedup vs P=1 | efficiency "
             "| peak GiB/device | collectives MB/device per step kind |", "|" + "---|" * 10]
    for r in sorted(rows, key=lambda r: (r["P"], r["mode"] != "dense")):
        if "error" in r:
            lines.append(f"| {r['P']} | {r['mesh']} | {r['mode']} | skipped: {r['error'].replace('|', '/')} |"
                         + " - |" * 6)
            continue
        ones = [o for o in rows + baseline if o["P"] == 1 and o["mode"] == r["mode"] and o["label"] == r["label"]
                and "error" not in o]
        t1 = ones[0]["total_s"] if ones else None
        speedup = "n/a" if t1 is None else f"{t1 / r['total_s']:.2f}x"
        efficiency = "n/a" if t1 is None else f"{t1 / (r['P'] * r['total_s']):.2f}"
        peak = ("n/a" if r.get("peak_gib") is None else
                ("" if r["peak_exact"] else "<= ") + f"{r['peak_gib']:.1f}")
        mark = "" if r["collectives_exact"] else ">= "
        cached = "-" if r["total_cached_s"] is None else f"{r['total_cached_s']:.2f}"
        lines.append(f"| {r['P']} | {r['mesh']} | {r['mode']} | "
                     + ", ".join(f"{k} {v:.1f}" for k, v in r["times"].items())
                     + f" | {r['total_s']:.2f} | {cached} | {speedup} | {efficiency} | {peak} | "
                     + ", ".join(f"{k} {mark}{v / 1e6:.2f}" for k, v in r["collective_bytes"].items()) + " |")
    n, skip = work.chipmunk.num_steps, model_schedule(work.chipmunk)
    kinds = [kind_name(work.chipmunk, s) for s in range(n)]
    counts = {k: f"{kinds.count(k)} / {sum(kinds[s] == k and skip[s] != ModelStep.SKIP for s in range(n))}"
              for k in dict.fromkeys(kinds)}
    counts[SKIPPED] = f"0 / {int(np.sum(skip == ModelStep.SKIP))}"
    lines += ["", "Chipmunk steps per kind of 50 (without / with step caching): "
              + ", ".join(f"{k} {v}" for k, v in counts.items())
              + (". T(P=1) from --baseline where this run has no P = 1 row." if baseline else ".")]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    arg = parser.add_argument
    arg("--models", default="hunyuan,wan", help="hunyuan, wan (comma separated)")
    arg("--devices", default=None, help="P values, comma separated (default: powers of two up to the device count)")
    arg("--modes", default="dense,chipmunk")
    arg("--wan-mesh", default="cfg", choices=["cfg", "sequence"], help="Wan, even P: cfg 2 x sequence P/2 or all P "
        "on the sequence axis (the CFG branches in turn)")
    arg("--frames", type=int, default=None, help="video frames, 4k+1 (default 129 HunyuanVideo, 81 Wan)")
    arg("--height", type=int, default=720)
    arg("--width", type=int, default=1280)
    arg("--text-len", type=int, default=None, help="text tokens (default 256 HunyuanVideo, 512 Wan)")
    arg("--blocks", default="20,40", help="HunyuanVideo double,single blocks (default: the full model)")
    arg("--layers", type=int, default=None, help="Wan blocks (default: the 14B model's 40)")
    arg("--reps", type=int, default=3)
    arg("--warmup", type=int, default=1, help="untimed calls per step kind (compiled ahead of time)")
    arg("--baseline", default=None, help="--json file of an earlier run: its P = 1 rows give T(P=1) where none ran")
    arg("--tiny", action="store_true", help="tiny configs: a CPU check of the script (fake devices), not a measurement")
    arg("--results", default=None, help="append the markdown section to this file")
    arg("--json", default=None, help="write the rows to this file")
    args = parser.parse_args()
    builders = {"hunyuan": hunyuan_workload, "wan": wan_workload}
    models, modes, available = args.models.split(","), args.modes.split(","), jax.device_count()
    counts = ([int(v) for v in args.devices.split(",")] if args.devices else
              [2**i for i in range(available.bit_length()) if 2**i <= available])
    if not set(models) <= set(builders) or not set(modes) <= {"dense", "chipmunk"} or min(counts) < 1:
        parser.error("--models takes hunyuan,wan, --modes dense,chipmunk, --devices positive counts")
    if args.reps < 1 or args.warmup < 0 or (args.layers is not None and args.layers < 1):
        parser.error("--reps and --layers must be >= 1, --warmup >= 0")
    if args.tiny:
        args.reps, args.warmup = 1, 0
    baseline = []
    if args.baseline:
        with open(args.baseline) as f:
            baseline = json.load(f)["rows"]
    device = jax.devices()[0]
    log(f"{available} x {device.device_kind}, jax {jax.__version__}, P = {counts}")
    lines = [
        f"## Many GPUs, P = {', '.join(map(str, counts))} ({datetime.date.today()}, {available} x "
        f"{device.device_kind}, jax {jax.__version__})", "",
        "Command: `source benchmarks/gpu_env.sh && python3 -P benchmarks/multi_gpu.py " + " ".join(sys.argv[1:]) + "`. "
        f"Random bf16 weights, batch 1. One sampling step per step kind (Wan: both CFG branches and the combine), "
        f"median of {args.reps} after {args.warmup} warm-up, caches donated and carried; 50-step totals composed from "
        "the presets' schedules; efficiency = T(P=1) / (P T(P)) without step caching; peak = max over the mesh's "
        "devices of peak_bytes_in_use (<=: an earlier row set it); collectives = result bytes per device per step "
        "from the compiled HLO (scanned layers times their trip count)."
        + (" TINY CONFIGS: a check of the script, not a measurement." if args.tiny else ""), ""]
    lines += ["One device: P = 1 only.", ""] if available == 1 else []
    rows = []
    for name in models:
        work = builders[name](args)
        log(f"{work.title}: {work.label}")
        rows += (model_rows := run_model(work, args, counts, modes))
        lines += table(work, model_rows, [b for b in baseline if b["model"] == name]) + [""]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "count": available, "argv": sys.argv[1:], "rows": rows}, f)
    emit_section(lines, args.results)


if __name__ == "__main__":
    main()
