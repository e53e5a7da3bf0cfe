"""Flow-matching Euler sampling as ONE jitted loop with the Chipmunk caches carried as state.

The sampler is model-agnostic. A model plugs in through a ``Denoiser``:

    compute(params, latents, t, cond, cache, plan, key) -> ModelOutput(sample=velocity, hidden, cache)
        the full model call with the step's ``schedule.StepPlan``; ``hidden`` is the pre-head hidden state
        kept for step caching
    head(params, hidden, t, cond) -> velocity
        only the final layer, conditioned on the current step (used on skipped steps, docs/algorithm.md §4.3)
    timestep_tables(params, sigmas, cond) -> tables (optional)
        conditioning that depends only on sigma and cond, for all steps at once (leading axis = steps),
        computed before the loop; ``t`` is then the step's slice of it, else the step's sigma
    probe(params, latents, t, cond, kind) -> step_policies.Probe(signal, base) (optional)
        the start of the model a step-caching policy reads (docs/algorithm.md §4.5), needed with ``step_policy``

``sigma`` is the flow-matching noise level in [0, 1]; each model converts it to its own timestep
convention (FLUX multiplies by 1000 inside the model, HunyuanVideo and Wan take sigma * 1000).
The loop is ``lax.fori_loop`` over steps with ``lax.cond`` on the step kind; latents, caches and
the step cache are the carry, and the jitted function donates them so they update in place. The model
never sees the step index: it gets the step's plan (what its sparse-capable layers do), traced from the
schedule tables or, with static step dispatch, as Python ints.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import parallel
from chipmunk_jax.cache import BranchCaches, StepCache, select_branch, split_branches, stack_branches, update_branch
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.schedule import (AttentionStep, MLPStep, ModelStep, StepPlan, attention_schedule, mlp_schedule,
                                   model_schedule, step_plan)
from chipmunk_jax.step_policies import MagCache, PolicyState, StepPolicy, init_policy_state
from chipmunk_jax.validation import positive_int

__all__ = [
    "Denoiser",
    "flux_shift",
    "flow_sigmas",
    "sample",
    "make_sampler",
    "calibrate_magnitude_ratios",
]


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """A model as the sampler sees it (the module docstring gives the three functions' signatures)."""

    compute: Callable[..., Any]
    head: Callable[..., Any]
    # Why: FLUX's modulation vectors are GEMVs per layer and step, bound by reading 6.5 GB of weights; over all
    # steps at once they are a few GEMMs (the models' ``timestep_conditioning``).
    timestep_tables: Callable[..., Any] | None = None
    # The ``parallel.make_mesh`` mesh the model's ops run on (the models' ``denoiser(..., mesh=)``); the sampler
    # shards its caches over the same mesh.
    mesh: Any = None
    probe: Callable[..., Any] | None = None
    # Whether the model runs Chipmunk's ops (the models' ``denoiser(config, chipmunk)``): a step policy then never
    # skips the config's refresh steps. The sampler's config alone cannot say it (a dense model samples with a
    # default ChipmunkConfig's schedule too).
    sparse: bool = False


def flux_shift(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
               base_seq_len: int = 256, max_seq_len: int = 4096) -> float:
    """FLUX's resolution-dependent ``mu`` (diffusers ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def flow_sigmas(num_steps: int, *, shift: float | None = None, mu: float | None = None) -> np.ndarray:
    """num_steps + 1 noise levels from 1 down to 0 (float32).

    ``shift``: fixed shift s (HunyuanVideo 7.0, Wan 5.0): sigma' = s sigma / (1 + (s - 1) sigma).
    ``mu``: FLUX's exponential time shift: sigma' = e^mu / (e^mu + 1/sigma - 1).
    """
    positive_int("num_steps", num_steps)
    if shift is not None and mu is not None:
        raise ValueError("pass either shift or mu, not both")
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps, dtype=np.float64)
    if shift is not None:
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    elif mu is not None:
        sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    return np.append(sigmas, 0.0).astype(np.float32)


def _guided(v_cond, v_uncond, guidance_scale):
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def _static_plans(config: ChipmunkConfig, num_steps: int, start: int, stop: int):
    """Groups the steps start .. stop - 1 by their plan: (group index per step of all num_steps, the distinct plans
    of those steps with Python-int kinds; steps outside the range get group 0, never run). Steps of one group run
    the same per-layer code."""
    kinds = list(zip(attention_schedule(config)[:num_steps].tolist(), mlp_schedule(config)[:num_steps].tolist()))
    ran = kinds[start:stop]
    unique = sorted(set(ran), key=ran.index)
    group = np.array([unique.index(k) if start <= s < stop else 0 for s, k in enumerate(kinds)], np.int32)
    return group, [StepPlan(attention=a, mlp=m) for a, m in unique]


def _guidance(guidance_scale, num_steps: int):
    """The sampler's guidance: None (no CFG), a Python float (one scale: a constant of the compiled loop, the common
    case) or float32 [num_steps] (one scale per step, read at the step inside the loop). A table whose entries are
    all equal becomes its float, so it compiles as the one-scale loop does."""
    if guidance_scale is None:
        return None
    if isinstance(guidance_scale, (bool, np.bool_)):
        raise TypeError(f"guidance_scale must be a number or one number per step, got {guidance_scale!r}")
    table = np.asarray(guidance_scale)
    if not (np.issubdtype(table.dtype, np.floating) or np.issubdtype(table.dtype, np.integer)):
        raise TypeError(f"guidance_scale must be a number or one number per step, got {guidance_scale!r:.80}")
    if table.ndim not in (0, 1) or (table.ndim == 1 and table.shape[0] != num_steps):
        raise ValueError(f"guidance_scale: one number, or one per sampling step ({num_steps}), got shape "
                         f"{table.shape}")
    if not np.all(np.isfinite(table)):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r:.80}")
    table = table.astype(np.float32)
    if table.ndim == 0 or np.all(table == table[0]):
        return float(table.reshape(-1)[0])
    return table


def _step_range(steps, num_steps: int) -> tuple[int, int]:
    if steps is None:
        return 0, num_steps
    if (not isinstance(steps, (tuple, list)) or len(steps) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in steps)):
        raise TypeError(f"steps must be None or a (start, stop) pair of ints, got {steps!r}")
    start, stop = int(steps[0]), int(steps[1])
    if not 0 <= start < stop <= num_steps:
        raise ValueError(f"steps=({start}, {stop}) must satisfy 0 <= start < stop <= {num_steps} (the sampling steps)")
    return start, stop


def make_sampler(
    denoiser: Denoiser,
    config: ChipmunkConfig,
    sigmas,
    *,
    guidance_scale=None,
    progress: bool = False,
    static_step_dispatch: bool = False,
    on_step: Callable[[int], None] | None = None,
    mesh=None,
    steps: tuple[int, int] | None = None,
    step_policy: StepPolicy | None = None,
):
    """Returns ``run(params, latents, cond, cache, step_cache, key, uncond=None)`` -> (latents, cache,
    step_cache), jitted once, with latents/cache/step_cache donated.

    With ``guidance_scale`` (classifier-free guidance) the cache and step cache carry a leading
    branch axis of 2 (cond, uncond; ``chipmunk_jax.cache.stack_branches``), or the cache is a
    ``BranchCaches`` pair (``split_branches``: the layout for host-resident caches), and ``uncond`` is required.
    ``guidance_scale`` is one number, or one per sampling step (a sequence or array of ``len(sigmas) - 1``: e.g.
    Wan 2.2 A14B's two experts, each with its own scale, ``models.wan_experts.guidance_schedule``); a table costs
    a lookup per step, and a table of equal entries compiles as its one number.

    ``static_step_dispatch``: instead of passing the model a plan of traced kinds (each layer then
    switches on its own kind), switch ONCE per step over the distinct plans of the schedule and call
    the model with that plan's Python-int kinds, so every layer dispatches statically. One model body
    is compiled per distinct plan (5 for FLUX). Why: on a GPU every ``lax.switch`` is a host sync (XLA
    copies the branch index to the host and waits for the stream), and traced dispatch runs one per
    Chipmunk op per layer: 110 per FLUX step, ~10 ms of idle GPU per sparse step on the H200
    (benchmarks/RESULTS.md). Static dispatch runs one per step; its compile is ~1.6x the traced one (the
    narrow 57-block FLUX with scanned block stacks, CPU: 5.7 s vs 3.6 s; RESULTS.md §12.2).

    ``on_step(step)``: host callback after each step's Euler update. It depends on the new latents,
    so it runs once that step's work is done: per-step wall times (the CLI); it syncs every step, so
    leave it off in benchmarks.

    ``mesh`` (default: the denoiser's, from the model's ``denoiser(..., mesh=mesh)``): a ``parallel.make_mesh``
    mesh. The caches are kept sharded as ``parallel.cache_shardings`` documents (attention caches on their head
    axis, MLP caches and the step cache on their token axis, the CFG branch axis on "cfg"), the params, latents
    and conditioning replicated. With a "cfg" axis of 2 the two CFG branches run side by side, each on its half
    of the devices (``jax.vmap`` over the branch axis with ``spmd_axis_name="cfg"``), and the guidance combine
    is their one exchange per step; with a "cfg" axis of 1 they run in turn on all devices. Host-resident caches
    (``BranchCaches``, ``offload_layer_caches``) are for one device: a mesh shards the caches instead.

    ``steps=(start, stop)``: run only the steps start .. stop - 1 (default: all), taking the latents, caches and
    step cache as they are before step ``start`` and returning them after step ``stop - 1``, so a run can be split
    into segments with host work between them (Wan 2.2 A14B with the idle expert's weights in host memory,
    ``models.wan_experts.sample_segments``). Step indices, sigmas, schedules, per-step guidance, the random key's
    per-step folds and ``on_step`` stay those of the whole run: the segments together equal the one loop.

    ``step_policy``: a step-caching baseline (``step_policies.FirstBlockCache``, ``TeaCache``, ``MagCache``;
    docs/algorithm.md §4.5) decides at run time which steps are skipped; the denoiser needs a ``probe``. The
    ``step_cache`` slot then holds the policy's ``step_policies.PolicyState`` (``init_policy_state``; stacked on a
    branch axis with CFG) and comes back with ``computed``, the per-step mask of the steps that ran the model
    (what executed compute is counted from). Each step probes every CFG branch, decides from the cond branch
    (both branches skip or compute together) and runs ONE ``lax.cond`` (or, with static dispatch, one
    ``lax.switch``) over the whole step: on a GPU one host sync per step, as the static step cache's. Computed
    steps run the Chipmunk plan of their step as usual; Chipmunk's static skip schedule (``config.step_cache``)
    and a policy both decide skips, so they are exclusive. Not yet on a mesh.
    """
    sigmas = np.asarray(sigmas, np.float32)
    num_steps = sigmas.size - 1
    if num_steps < 1:
        raise ValueError("sigmas must hold at least two noise levels")
    if num_steps > config.num_steps:
        raise ValueError(f"{num_steps} sampling steps exceed config.num_steps={config.num_steps}")
    start, stop = _step_range(steps, num_steps)
    policy = _step_policy(step_policy, denoiser, config, num_steps, mesh)
    skip_table = jnp.asarray(model_schedule(config)[:num_steps])
    refresh_table = jnp.asarray(_refresh_steps(config, num_steps) & denoiser.sparse)
    sigma_table = jnp.asarray(sigmas)
    guidance = _guidance(guidance_scale, num_steps)
    cfg_on = guidance is not None
    mesh = _sampler_mesh(denoiser, mesh, cfg_on)
    cfg_parallel = mesh is not None and parallel.cfg_size(mesh) == 2
    bar = _ProgressBar(num_steps, start, stop) if progress else None

    def guidance_at(step):
        return guidance if isinstance(guidance, float) else jnp.asarray(guidance)[step]

    if static_step_dispatch:
        group_table, static_plans = _static_plans(config, num_steps, start, stop)
        group_table = jnp.asarray(group_table)

    def model_call(params, x, t, cond, cache, step_cache, step, key, branches=False):
        """One model call, or with ``branches`` both CFG branches side by side (t, cond, cache and step cache
        stacked on a leading branch axis sharded over "cfg")."""
        per_branch = (lambda fn: jax.vmap(fn, spmd_axis_name=parallel.CFG)) if branches else (lambda fn: fn)

        def compute_with(plan):
            def compute(t, cond, cache, step_cache):
                out = denoiser.compute(params, x, t, cond, cache, plan, key)
                hidden = StepCache(hidden=out.hidden.astype(step_cache.hidden.dtype), valid=jnp.bool_(True))
                return out.sample, out.cache, hidden

            return lambda operand: per_branch(compute)(t, cond, *operand)

        def skip_one(t, cond, cache, step_cache):
            return denoiser.head(params, step_cache.hidden, t, cond), cache, step_cache

        skip = lambda operand: per_branch(skip_one)(t, cond, *operand)  # noqa: E731
        # both branches compute and skip at the same steps: their valid flags agree
        skipping = (skip_table[step] == ModelStep.SKIP) & jnp.all(step_cache.valid)
        if not static_step_dispatch:
            return jax.lax.cond(skipping, skip, compute_with(step_plan(config, step)), (cache, step_cache))
        branches = [skip] + [compute_with(plan) for plan in static_plans]
        index = jnp.where(skipping, 0, 1 + group_table[step])
        return jax.lax.switch(index, branches, (cache, step_cache))

    def over_branches(fn, t, cond, uncond, stacked=(), carried=()):
        """``fn(t, cond, *stacked, *carried) -> (value, *carried)`` of one CFG branch, over the branches in turn
        (``select_branch`` / ``update_branch``; one call without CFG). ``stacked``: per-branch inputs with a leading
        branch axis under CFG; ``value`` comes back with one too. (Policies run on one device: no mesh, so no
        side-by-side branches.)"""
        if not cfg_on:
            return fn(t, cond, *stacked, *carried)
        outs = [fn(t[i], branch_cond, *(select_branch(x, i) for x in stacked),
                   *(select_branch(c, i) for c in carried)) for i, branch_cond in enumerate((cond, uncond))]
        value = jax.tree.map(lambda a, b: jnp.stack([a, b]), outs[0][0], outs[1][0])
        return (value, *(update_branch(update_branch(c, 0, a), 1, b)
                         for c, a, b in zip(carried, outs[0][1:], outs[1][1:])))

    def policy_call(params, x, t, cond, uncond, cache, state, step, key):
        """One step under ``step_policy`` (docs/algorithm.md §4.5) -> (velocity, per branch under CFG; cache; state).
        Every branch is probed; the cond branch's signal decides for both; one lax.cond (lax.switch) runs the step."""
        probes = over_branches(lambda t, c: (denoiser.probe(params, x, t, c, policy.probe_kind),), t, cond, uncond)[0]
        # Chipmunk's refresh steps always run: skipping one would leave the column / feature sets and out_caches of
        # the next sparse steps stale until the following refresh (the presets' static skip schedules avoid them too)
        must_compute = refresh_table[step]
        if cfg_on:
            skip, decided = policy.decide(select_branch(state, 0), select_branch(probes, 0).signal, step, num_steps,
                                          must_compute)
            state = update_branch(update_branch(state, 0, decided), 1, select_branch(state, 1).with_decision(decided))
        else:
            skip, state = policy.decide(state, probes.signal, step, num_steps, must_compute)

        def skip_one(t, cond, base, cache, state):
            return denoiser.head(params, state.reused(base), t, cond), cache, state

        def compute_with(plan):
            def compute_one(t, cond, base, cache, state):
                out = denoiser.compute(params, x, t, cond, cache, plan, key)
                return out.sample, out.cache, state.stored(out.hidden, base, step)

            return lambda operand: over_branches(compute_one, t, cond, uncond, (probes.base,), operand)

        skip_all = lambda operand: over_branches(skip_one, t, cond, uncond, (probes.base,), operand)  # noqa: E731
        if not static_step_dispatch:
            return jax.lax.cond(skip, skip_all, compute_with(step_plan(config, step)), (cache, state))
        index = jnp.where(skip, 0, 1 + group_table[step])
        return jax.lax.switch(index, [skip_all] + [compute_with(plan) for plan in static_plans], (cache, state))

    def model_tables(params, cond):
        if denoiser.timestep_tables is None:
            return sigma_table[:num_steps]
        return denoiser.timestep_tables(params, sigma_table[:num_steps], cond)

    def sharded(cache, step_cache):
        if mesh is None:
            return cache, step_cache
        shardings = parallel.sampler_cache_shardings(cache, step_cache, mesh, branches=cfg_on)
        return jax.lax.with_sharding_constraint((cache, step_cache), shardings)

    def body(step, carry):
        params, cond, uncond, x, cache, step_cache, key, tables = carry
        sigma, sigma_next = sigma_table[step], sigma_table[step + 1]
        # sigma, or the denoiser's tables at the step (after the branch axis when the branches run side by side)
        model_t = jax.tree.map(lambda table: table[:, step] if cfg_parallel else table[step], tables)
        step_key = jax.random.fold_in(key, step)
        if policy is not None:
            v, cache, step_cache = policy_call(params, x, model_t, cond, uncond, cache, step_cache, step, step_key)
            if cfg_on:
                v = _guided(v[0].astype(jnp.float32), v[1].astype(jnp.float32), guidance_at(step))
        elif cfg_parallel:
            v, cache, step_cache = model_call(params, x, model_t, cond, cache, step_cache, step, step_key,
                                              branches=True)
            v = _guided(v[0].astype(jnp.float32), v[1].astype(jnp.float32), guidance_at(step))
        elif cfg_on:
            v_c, c_c, s_c = model_call(params, x, model_t[0], cond, select_branch(cache, 0),
                                       select_branch(step_cache, 0), step, step_key)
            v_u, c_u, s_u = model_call(params, x, model_t[1], uncond, select_branch(cache, 1),
                                       select_branch(step_cache, 1), step, step_key)
            v = _guided(v_c.astype(jnp.float32), v_u.astype(jnp.float32), guidance_at(step))
            cache = update_branch(update_branch(cache, 0, c_c), 1, c_u)
            step_cache = update_branch(update_branch(step_cache, 0, s_c), 1, s_u)
        else:
            v, cache, step_cache = model_call(params, x, model_t, cond, cache, step_cache, step, step_key)
        cache, step_cache = sharded(cache, step_cache)
        x = (x.astype(jnp.float32) + (sigma_next - sigma) * v.astype(jnp.float32)).astype(x.dtype)
        # ordered host callbacks run on one device only; on a mesh the data dependency on x keeps them in step
        if bar is not None:
            jax.debug.callback(bar.update, step, x.reshape(-1)[0], ordered=mesh is None)
        if on_step is not None:
            jax.debug.callback(lambda s, _: on_step(int(s)), step, x.reshape(-1)[0], ordered=mesh is None)
        return params, cond, uncond, x, cache, step_cache, key, tables

    def run(params, latents, cond, cache, step_cache, key, uncond=None):
        if cfg_on and uncond is None:
            raise ValueError("uncond is required when guidance_scale is set")
        if mesh is not None and isinstance(cache, BranchCaches):
            raise ValueError("host-resident BranchCaches (split_branches / offload_layer_caches) are for one "
                             "device; with a mesh pass stacked caches (cache.stack_branches): they are sharded")
        _check_step_cache(step_cache, policy, num_steps, branches=cfg_on)
        cache, step_cache = sharded(cache, step_cache)
        tables = model_tables(params, cond)
        if cfg_on:
            tables = (tables, model_tables(params, uncond))
        if cfg_parallel:  # side by side: the branches' conditioning stacked once, on a leading branch axis
            cond, uncond, tables = _stack(cond, uncond), None, _stack(*tables)
        carry = (params, cond, uncond, latents, cache, step_cache, key, tables)
        _, _, _, x, cache, step_cache, _, _ = jax.lax.fori_loop(start, stop, body, carry)
        return x, cache, step_cache

    jitted = jax.jit(run, donate_argnums=(1, 3, 4))
    return jitted if mesh is None else _MeshSampler(jitted)


def _refresh_steps(config: ChipmunkConfig, num_steps: int) -> np.ndarray:
    """bool [num_steps]: the steps on which Chipmunk's sparse-capable layers refresh (dense attention of any kind,
    a dense MLP step); all False without Chipmunk."""
    attention = np.isin(attention_schedule(config)[:num_steps],
                        (AttentionStep.DENSE, AttentionStep.DENSE_COLSUM, AttentionStep.DENSE_REFRESH))
    return attention | (mlp_schedule(config)[:num_steps] == MLPStep.DENSE)


def _step_policy(step_policy, denoiser: Denoiser, config: ChipmunkConfig, num_steps: int, mesh):
    """``step_policy`` checked against the sampler it joins (None: no policy)."""
    if step_policy is None:
        return None
    if not isinstance(step_policy, StepPolicy):
        raise TypeError(f"step_policy must be a step_policies.StepPolicy (FirstBlockCache, TeaCache, MagCache), got "
                        f"{type(step_policy).__name__}")
    if denoiser.probe is None:
        raise ValueError("step_policy needs a denoiser with a probe (the models' denoiser(...) have one)")
    if config.step_cache.enabled:
        raise ValueError("step_policy and Chipmunk's static step cache (config.step_cache) both choose the skipped "
                         "steps: use one of them (config.replace(step_cache__enabled=False) for the policy)")
    if mesh is not None or denoiser.mesh is not None:
        raise ValueError("step_policy runs on one device for now: build the denoiser without a mesh")
    step_policy.check_steps(num_steps)
    return step_policy


def _check_step_cache(step_cache, policy: StepPolicy | None, num_steps: int, *, branches: bool) -> None:
    """The sampler's step-cache slot holds a ``StepCache`` without a policy and the policy's ``PolicyState`` with
    one (over every sampling step)."""
    if policy is None:
        if isinstance(step_cache, PolicyState):
            raise TypeError("step_cache is a PolicyState but the sampler has no step_policy: pass a StepCache, or "
                            "make_sampler(..., step_policy=)")
        return
    if not isinstance(step_cache, PolicyState):
        raise TypeError(f"with a step_policy the step_cache slot holds the policy's state "
                        f"(step_policies.init_policy_state), got {type(step_cache).__name__}")
    expected = ((2,) if branches else ()) + (num_steps,)
    if tuple(step_cache.computed.shape) != expected or (step_cache.reference is None) == policy.reads_signal:
        raise ValueError(f"step_cache is not a state of this policy over {num_steps} steps"
                         f"{' with 2 CFG branches (cache.stack_branches)' if branches else ''}: build it with "
                         f"init_policy_state({type(policy).__name__}(...), num_steps={num_steps}, hidden_shape=...)")


def _stack(first, second):
    """Two pytrees of one structure and shapes (the CFG branches' conditioning) stacked on a new leading axis."""
    same = jax.tree.structure(first) == jax.tree.structure(second) and all(
        jnp.shape(a) == jnp.shape(b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))
    if not same:
        raise ValueError("cond and uncond must have the same structure and shapes to run the CFG branches side by "
                         f"side on the mesh's cfg axis: {jax.tree.map(jnp.shape, first)} vs "
                         f"{jax.tree.map(jnp.shape, second)}")
    return jax.tree.map(lambda a, b: jnp.stack([a, b]), first, second)


def _sampler_mesh(denoiser: Denoiser, mesh, cfg_on: bool):
    """The mesh the sampler shards over: the denoiser's (they must agree) and a cfg axis that fits the guidance."""
    if mesh is None:
        mesh = denoiser.mesh
    elif denoiser.mesh is not mesh:
        raise ValueError("make_sampler's mesh is not the denoiser's: build the denoiser on the same mesh "
                         "(the model's denoiser(..., mesh=mesh))")
    if mesh is None:
        return None
    cfg = parallel.cfg_size(mesh)
    if cfg > 1 and not cfg_on:
        raise ValueError(f"the mesh has a cfg axis of {cfg} but no guidance_scale is set: the cfg axis holds the "
                         "two classifier-free guidance branches (use cfg=1 without guidance)")
    if cfg > 2:
        raise ValueError(f"the mesh's cfg axis is {cfg}: classifier-free guidance has 2 branches (cfg=1 or 2)")
    return mesh


class _MeshSampler:
    """The jitted sampler over a mesh: refuses host-resident caches before they reach the devices (a sharding
    constraint would silently move them back), else the jitted function as is (``__call__``, ``lower``)."""

    def __init__(self, jitted):
        self._jitted = jitted

    @staticmethod
    def _check(args, kwargs):
        cache = kwargs["cache"] if "cache" in kwargs else args[3] if len(args) > 3 else None
        for leaf in jax.tree.leaves(cache):
            if getattr(getattr(leaf, "sharding", None), "memory_kind", None) == "pinned_host":
                raise ValueError("the cache holds host-resident layers (offload_layer_caches): with a mesh the "
                                 "caches are sharded over the devices instead; pass device caches")

    def __call__(self, *args, **kwargs):
        self._check(args, kwargs)
        return self._jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        self._check(args, kwargs)
        return self._jitted.lower(*args, **kwargs)


class _ProgressBar:
    """tqdm bar driven from inside the jitted loop by a host callback (one per sampler; the sampler of a segment,
    steps first .. stop - 1, shows the whole run's bar from ``first`` on and closes it after ``stop - 1``)."""

    def __init__(self, total: int, first: int = 0, stop: int | None = None):
        self.total, self.first, self.stop = total, first, total if stop is None else stop
        self._bar = None

    def update(self, step, _=None):
        step = int(step)
        if step == self.first or self._bar is None:
            from tqdm.auto import tqdm

            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=self.total, initial=step, desc="sampling")
        self._bar.update(1)
        if step + 1 == self.stop:
            self._bar.close()
            self._bar = None


def sample(denoiser: Denoiser, config: ChipmunkConfig, params, latents, cond, cache, *, sigmas, key,
           hidden_shape, hidden_dtype=jnp.bfloat16, guidance_scale=None, uncond=None, progress=False,
           static_step_dispatch=False, mesh=None, step_policy=None):
    """Convenience wrapper: builds the step cache, or the ``step_policy``'s state (and CFG branches), and runs the
    jitted loop (``guidance_scale``: one number or one per step, as ``make_sampler``'s)."""
    if step_policy is None:
        step_cache = StepCache(hidden=jnp.zeros(hidden_shape, hidden_dtype), valid=jnp.bool_(False))
    else:
        step_cache = init_policy_state(step_policy, num_steps=len(sigmas) - 1, hidden_shape=hidden_shape,
                                       dtype=hidden_dtype)
    if guidance_scale is not None:
        # one device: separate branch pytrees (cache.split_branches) that XLA updates in place; a stacked cache is
        # sliced per call and the branch written back (Wan2.1-14B 720p: 107 GiB of temporaries instead of 14,
        # benchmarks/RESULTS.md §12.4). A mesh shards the stacked branch axis over "cfg"; policy states stay stacked.
        layout = stack_branches if mesh is not None else split_branches
        cache = layout(cache, 2)
        step_cache = (stack_branches if step_policy is not None else layout)(step_cache, 2)
    run = make_sampler(denoiser, config, sigmas, guidance_scale=guidance_scale, progress=progress,
                       static_step_dispatch=static_step_dispatch, mesh=mesh, step_policy=step_policy)
    return run(params, latents, cond, cache, step_cache, key, uncond)


def calibrate_magnitude_ratios(denoiser: Denoiser, config: ChipmunkConfig, params, latents, cond, cache=None, *,
                               sigmas, key, hidden_shape, guidance_scale=None, uncond=None) -> np.ndarray:
    """MagCache's per-step magnitude ratios (arXiv 2506.09045, docs/algorithm.md §4.5) from one run of the sampler
    that computes every step: at step t the mean over tokens of ||r_t|| / ||r_{t-1}||, r = the pre-head hidden state
    minus the input embedding (MagCache's residual), float64 [num_steps] with 1 at step 0; with CFG the cond
    branch's (it decides for both). ``config``'s static step cache is turned off for the run; pass a dense
    ``denoiser`` (``chipmunk=None``) for the dense ratios, as the paper calibrates."""
    num_steps = len(np.asarray(sigmas)) - 1
    never = MagCache(threshold=0.0, magnitude_ratios=(1.0,) * num_steps)
    _, _, state = sample(denoiser, config.replace(step_cache__enabled=False), params, latents, cond, cache,
                         sigmas=sigmas, key=key, hidden_shape=hidden_shape, hidden_dtype=jnp.float32,
                         guidance_scale=guidance_scale, uncond=uncond, step_policy=never)
    ratios = np.asarray(state.magnitudes, np.float64)
    return ratios if guidance_scale is None else ratios[0]
