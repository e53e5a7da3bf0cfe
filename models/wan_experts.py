"""Wan 2.2 A14B: two Wan experts in the one-jit sampler (diffusers ``WanPipeline`` with ``transformer_2``;
docs/models.md §3.4).

diffusers picks the expert per step from the scheduler timestep t (= 1000 sigma for flow matching):
``t >= boundary_timestep`` runs ``transformer`` (high noise) with ``guidance_scale``, else ``transformer_2`` (low
noise) with ``guidance_scale_2``; ``boundary_timestep = boundary_ratio * num_train_timesteps`` (1000). Here:

* ``two_expert_denoiser(config_high, config_low, chipmunk, boundary_timestep=...)`` is a ``sampling.Denoiser`` whose
  params are the pair ``(high, low)``; the expert of each step is a ``lax.cond`` on the step's expert flag,
  computed before the loop from the same float32 timestep the model sees (``sigma * 1000``). Both experts'
  timestep conditioning is precomputed for every step (a few [steps, B, 6, D] tables).
* Guidance: ``make_sampler`` combines the branches with ONE ``guidance_scale`` g. A per-step scale g_k is exact
  with a per-branch factor on each branch's velocity (cond x g_k / g, uncond x (1 - g_k) / (1 - g)): the combine
  ``v_u' + g (v_c' - v_u')`` is then ``v_u + g_k (v_c - v_u)``. The factor depends on the branch, so the two
  cond dicts carry a ``cfg_branch`` marker (``cfg_conds``); on the high-noise steps the factors are exactly 1.
  Without guidance, or with guidance_scale_2 == guidance_scale, no marker is needed.
* Chipmunk: ONE cache set serves both experts (same shapes). ``switch_refresh(chipmunk, switch_step)`` adds the
  switch step (the low-noise expert's first step) to the attention full-step schedule and keeps step caching off
  it, so the low-noise expert starts on a full step: dense output, fresh column sets, fresh out_cache.

``sample`` wraps ``sampling.sample`` with the guidance scale the denoiser was built for.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import sampling
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.models import wan
from chipmunk_jax.models.wan import WanConfig
from chipmunk_jax.sampling import Denoiser

__all__ = [
    "BOUNDARY_RATIOS",
    "NUM_TRAIN_TIMESTEPS",
    "HIGH",
    "LOW",
    "boundary_timestep",
    "expert_schedule",
    "switch_step",
    "switch_refresh",
    "cfg_conds",
    "two_expert_denoiser",
    "sample",
]

# Wan2.2 releases (original Wan2.2 configs wan_{t2v,i2v}_A14B.py ``boundary``; the diffusers pipelines'
# model_index.json ``boundary_ratio``). TI2V-5B has one expert (boundary_ratio None).
BOUNDARY_RATIOS = {"t2v_a14b": 0.875, "i2v_a14b": 0.900}
NUM_TRAIN_TIMESTEPS = 1000  # FlowMatchEulerDiscreteScheduler / UniPCMultistepScheduler num_train_timesteps
TIMESTEP_SCALE = 1000.0  # the sampler's sigma -> Wan's timestep (wan.denoiser)
HIGH, LOW = 0, 1  # expert indices: params = (high, low)


def boundary_timestep(boundary_ratio: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> float:
    """diffusers' ``boundary_ratio * scheduler.config.num_train_timesteps``."""
    if not 0.0 <= boundary_ratio <= 1.0:
        raise ValueError(f"boundary_ratio must be in [0, 1], got {boundary_ratio}")
    return float(boundary_ratio) * num_train_timesteps


def _expert_of(sigmas, boundary):
    """Expert per noise level (jnp or np): the model's float32 timestep sigma * 1000 against the boundary."""
    xp = jnp if isinstance(sigmas, jax.Array) else np
    t = sigmas.astype(xp.float32) * xp.float32(TIMESTEP_SCALE)
    return xp.where(t >= xp.float32(boundary), HIGH, LOW).astype(xp.int32)


def expert_schedule(sigmas, boundary_timestep: float) -> np.ndarray:
    """int32 [num_steps]: the expert (HIGH = 0, LOW = 1) of each of the sampler's steps for ``sigmas`` (num_steps + 1
    levels), as diffusers chooses it (``t >= boundary_timestep`` -> high)."""
    sigmas = np.asarray(sigmas, np.float32)
    if sigmas.ndim != 1 or sigmas.size < 2:
        raise ValueError(f"sigmas must be num_steps + 1 noise levels, got shape {sigmas.shape}")
    return _expert_of(sigmas[:-1], boundary_timestep)


def switch_step(sigmas, boundary_timestep: float) -> int | None:
    """The first low-noise step (the switch), or None when one expert runs every step. The sigmas decrease, so
    the experts run high ... high, low ... low; anything else is refused."""
    experts = expert_schedule(sigmas, boundary_timestep)
    if np.any(np.diff(experts) < 0):
        raise ValueError("the sigmas go back above the boundary: the experts must run high, then low")
    low = np.flatnonzero(experts == LOW)
    return int(low[0]) if low.size and low[0] > 0 else None


def switch_refresh(chipmunk: ChipmunkConfig, switch: int | None) -> ChipmunkConfig:
    """``chipmunk`` with step ``switch`` (the low-noise expert's first step, ``switch_step``) made a full step:
    added to ``attention.full_step_schedule`` (the schedule ``full_step_every`` implies, made explicit) and dropped
    from ``step_cache.skip_step_schedule``. None (no switch) returns ``chipmunk`` unchanged.

    The MLP's full steps are ``step % mlp.full_step_every == 0`` with no explicit schedule (config.MLPConfig), so with
    ``mlp.enabled`` a switch that is not a multiple of ``mlp.full_step_every`` is refused (choose full_step_every
    or the step count so it is, or turn the MLP off, as the Wan preset does)."""
    if not isinstance(chipmunk, ChipmunkConfig):
        raise TypeError(f"chipmunk must be a ChipmunkConfig, got {type(chipmunk).__name__}")
    if switch is None:
        return chipmunk
    if not 0 < switch < chipmunk.num_steps:
        raise ValueError(f"switch step {switch} is not in [1, num_steps={chipmunk.num_steps})")
    mlp = chipmunk.mlp
    if mlp.enabled and switch % mlp.full_step_every:
        raise ValueError(f"the MLP cannot be refreshed at the switch step {switch}: its full steps are the multiples "
                         f"of mlp.full_step_every={mlp.full_step_every} (no explicit MLP schedule); pick a "
                         "full_step_every that divides the switch step, or mlp.enabled=False")
    a = chipmunk.attention
    if a.full_step_schedule is not None:
        full = set(a.full_step_schedule)
    else:
        full = {s for s in range(chipmunk.num_steps) if s < 2 or s % a.full_step_every == 0}
    skip = tuple(s for s in chipmunk.step_cache.skip_step_schedule if s != switch)
    return chipmunk.replace(attention__full_step_schedule=tuple(sorted(full | {switch})),
                            step_cache__skip_step_schedule=skip)


def cfg_conds(cond: dict, uncond: dict) -> tuple[dict, dict]:
    """The sampler's (cond, uncond) with the ``cfg_branch`` marker (0 / 1) a per-expert guidance scale needs."""
    return dict(cond, cfg_branch=np.int32(0)), dict(uncond, cfg_branch=np.int32(1))


def _branch_factors(guidance_scale, guidance_scale_2):
    """Velocity factors (cond, uncond) per expert for a sampler combining with ``guidance_scale``."""
    if guidance_scale is None or guidance_scale_2 is None or guidance_scale_2 == guidance_scale:
        return None
    g, g2 = float(guidance_scale), float(guidance_scale_2)
    if g == 1.0:
        raise ValueError("guidance_scale 1 with a different guidance_scale_2 cannot be expressed through the sampler's "
                         "combine (and diffusers runs no CFG when guidance_scale <= 1): pass guidance_scale=None")
    # rows: expert (HIGH, LOW); columns: branch (cond, uncond)
    return np.array([[1.0, 1.0], [g2 / g, (1.0 - g2) / (1.0 - g)]], np.float32)


def two_expert_denoiser(config_high: WanConfig, config_low: WanConfig, chipmunk: ChipmunkConfig | None = None, *,
                        boundary_timestep: float, grid, guidance_scale: float | None = None,
                        guidance_scale_2: float | None = None, rotary_emb=None, dtype=jnp.bfloat16,
                        attention_impl: str | None = None, kernel_impl: str | None = None) -> Denoiser:
    """``sampling.Denoiser`` of a Wan 2.2 A14B expert pair: params = (high, low) (``wan.init_params`` /
    ``ports.wan.load_experts``). Steps with ``1000 sigma >= boundary_timestep`` run the high-noise expert, the
    others the low-noise one (diffusers' rule). ``guidance_scale`` must be the one given to the sampler (``sample``
    passes it); ``guidance_scale_2`` (diffusers' default: guidance_scale) is the low-noise expert's, and when it
    differs, the sampler's cond / uncond dicts come from ``cfg_conds``. ``chipmunk``: pass it through
    ``switch_refresh`` for the sigmas you sample with; one cache set (``wan.init_cache`` / ``init_branch_caches``
    of either config) serves both experts. Other arguments as ``wan.denoiser`` (one device: no mesh)."""
    for config in (config_high, config_low):
        if not isinstance(config, WanConfig):
            raise TypeError(f"configs must be WanConfigs, got {type(config).__name__}")
    shared = ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "in_channels", "out_channels",
              "patch_size")
    differ = [f for f in shared if getattr(config_high, f) != getattr(config_low, f)]
    if differ:
        raise ValueError(f"the two experts must share their shapes (one latent, one cache set); they differ in "
                         f"{differ}")
    if not math.isfinite(boundary_timestep):
        raise ValueError(f"boundary_timestep must be finite, got {boundary_timestep}")
    factors = _branch_factors(guidance_scale, guidance_scale_2)
    kw = dict(grid=grid, rotary_emb=rotary_emb, dtype=dtype, attention_impl=attention_impl, kernel_impl=kernel_impl)
    experts = (wan.denoiser(config_high, chipmunk, **kw), wan.denoiser(config_low, chipmunk, **kw))

    def model_cond(cond):
        return {k: v for k, v in cond.items() if k != "cfg_branch"}

    def timestep_tables(params, sigmas, cond):
        expert = _expert_of(sigmas, boundary_timestep)
        if factors is None:
            scale = jnp.ones(sigmas.shape, jnp.float32)
        else:
            if "cfg_branch" not in cond:
                raise ValueError("guidance_scale_2 differs from guidance_scale: build the sampler's cond and uncond "
                                 "with wan_experts.cfg_conds(cond, uncond)")
            scale = jnp.asarray(factors)[expert, jnp.asarray(cond["cfg_branch"], jnp.int32)]
        tables = [d.timestep_tables(p, sigmas, model_cond(cond)) for d, p in zip(experts, params)]
        return {"expert": expert, "scale": scale, "tables": tuple(tables)}

    def compute(params, latents, t, cond, cache, plan, key):
        cond = model_cond(cond)
        branches = [lambda d=d, p=p, tab=tab: d.compute(p, latents, tab, cond, cache, plan, key)
                    for d, p, tab in zip(experts, params, t["tables"])]
        out = jax.lax.cond(t["expert"] == HIGH, branches[HIGH], branches[LOW])
        return out.replace(sample=out.sample * t["scale"])

    def head(params, hidden, t, cond):
        cond = model_cond(cond)
        branches = [lambda d=d, p=p, tab=tab: d.head(p, hidden, tab, cond)
                    for d, p, tab in zip(experts, params, t["tables"])]
        return jax.lax.cond(t["expert"] == HIGH, branches[HIGH], branches[LOW]) * t["scale"]

    return dataclasses.replace(experts[0], compute=compute, head=head, timestep_tables=timestep_tables)


def sample(denoiser: Denoiser, chipmunk: ChipmunkConfig, params, latents, cond, cache, *, sigmas, key, hidden_shape,
           hidden_dtype=jnp.bfloat16, guidance_scale=None, uncond=None, static_step_dispatch=False):
    """``sampling.sample`` for a two-expert denoiser: ``guidance_scale`` must be the denoiser's; cond / uncond
    get their ``cfg_branch`` markers here when guidance is on."""
    if guidance_scale is not None:
        cond, uncond = cfg_conds(cond, uncond)
    return sampling.sample(denoiser, chipmunk, params, latents, cond, cache, sigmas=sigmas, key=key,
                           hidden_shape=hidden_shape, hidden_dtype=hidden_dtype, guidance_scale=guidance_scale,
                           uncond=uncond, static_step_dispatch=static_step_dispatch)
