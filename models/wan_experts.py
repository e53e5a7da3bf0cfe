"""Wan 2.2 A14B: two Wan experts in the one-jit sampler (diffusers ``WanPipeline`` with ``transformer_2``;
docs/models.md §3.4).

diffusers picks the expert per step from the scheduler timestep t (= 1000 sigma for flow matching):
``t >= boundary_timestep`` runs ``transformer`` (high noise) with ``guidance_scale``, else ``transformer_2`` (low
noise) with ``guidance_scale_2``; ``boundary_timestep = boundary_ratio * num_train_timesteps`` (1000). Here:

* ``two_expert_denoiser(config_high, config_low, chipmunk, boundary_timestep=...)`` is a ``sampling.Denoiser`` whose
  params are the pair ``(high, low)``; the expert of each step is a ``lax.cond`` on the step's expert flag,
  computed before the loop from the same float32 timestep the model sees (``sigma * 1000``). Both experts'
  timestep conditioning is precomputed for every step (a few [steps, B, 6, D] tables).
* Guidance: ``guidance_schedule`` gives the sampler one scale per step (``guidance_scale`` on the high-noise
  steps, ``guidance_scale_2`` on the low-noise ones; one number when they agree); ``sample`` passes it.
* Chipmunk: ONE cache set serves both experts (same shapes). ``switch_refresh(chipmunk, switch_step)`` adds the
  switch step (the low-noise expert's first step) to the attention and the MLP full-step schedules and keeps step
  caching off it, so the low-noise expert starts on a full step: dense output, fresh column sets, fresh caches.
* Idle expert off the device: ``sample_segments`` runs the same steps as two jitted segments (``expert_segments``:
  the high-noise steps, then the low-noise ones; ``sampling.make_sampler(steps=...)``), each with one expert's
  plain ``wan.denoiser``, moving that expert's params to the device for its segment. With the params kept in pinned
  host memory (``chipmunk_jax.memory.to_host``) one expert (~28.6 GB in bf16) occupies the device at a time.
  Why not inside the one jit: a loop carry has fixed buffers, so the jitted loop would either hold both experts
  on the device (what offloading avoids) or copy the active expert's 28.6 GB from the host inside every step that
  uses it; between two jits the copy is one ``device_put`` at the switch and the first expert's device buffers
  are freed before the second segment starts.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import memory, sampling
from chipmunk_jax.cache import init_step_cache, split_branches
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.models import wan
from chipmunk_jax.models.wan import WanConfig
from chipmunk_jax.sampling import Denoiser

__all__ = [
    "BOUNDARY_RATIOS",
    "NUM_TRAIN_TIMESTEPS",
    "HIGH",
    "LOW",
    "Segment",
    "boundary_timestep",
    "expert_schedule",
    "switch_step",
    "switch_refresh",
    "guidance_schedule",
    "expert_segments",
    "check_expert_pair",
    "expert_denoisers",
    "two_expert_denoiser",
    "sample",
    "sample_segments",
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


def _full_steps(section, num_steps: int, implied) -> set[int]:
    """The full steps of a config section: its explicit ``full_step_schedule``, else those ``implied(step)``."""
    if section.full_step_schedule is not None:
        return set(section.full_step_schedule)
    return {s for s in range(num_steps) if implied(s)}


def switch_refresh(chipmunk: ChipmunkConfig, switch: int | None) -> ChipmunkConfig:
    """``chipmunk`` with step ``switch`` (the low-noise expert's first step, ``switch_step``) made a full step:
    added to ``attention.full_step_schedule`` and ``mlp.full_step_schedule`` (the schedules their
    ``full_step_every`` imply, made explicit) and dropped from ``step_cache.skip_step_schedule``. None (no switch)
    returns ``chipmunk`` unchanged.

    The MLP's feature sets are not chosen on full steps (docs/algorithm.md §2.1): a sparse step after the switch
    that reuses sets (``mlp.block_mask_cache``) reuses the high-noise expert's last ones, as any sparse step after
    a full step reuses the sets chosen before it."""
    if not isinstance(chipmunk, ChipmunkConfig):
        raise TypeError(f"chipmunk must be a ChipmunkConfig, got {type(chipmunk).__name__}")
    if switch is None:
        return chipmunk
    if not 0 < switch < chipmunk.num_steps:
        raise ValueError(f"switch step {switch} is not in [1, num_steps={chipmunk.num_steps})")
    a, m, n = chipmunk.attention, chipmunk.mlp, chipmunk.num_steps
    attention = _full_steps(a, n, lambda s: s < 2 or s % a.full_step_every == 0) | {switch}
    mlp = _full_steps(m, n, lambda s: s % m.full_step_every == 0) | {switch}
    skip = tuple(s for s in chipmunk.step_cache.skip_step_schedule if s != switch)
    return chipmunk.replace(attention__full_step_schedule=tuple(sorted(attention)),
                            mlp__full_step_schedule=tuple(sorted(mlp)), step_cache__skip_step_schedule=skip)


def _expert_scales(guidance_scale, guidance_scale_2) -> tuple[float | None, float | None]:
    """(high, low) guidance scales by diffusers' rule: ``guidance_scale_2`` defaults to ``guidance_scale``."""
    if guidance_scale is None:
        if guidance_scale_2 is not None:
            raise ValueError("guidance_scale_2 without guidance_scale: pass both (or guidance_scale alone)")
        return None, None
    for name, value in (("guidance_scale", guidance_scale), ("guidance_scale_2", guidance_scale_2)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    return float(guidance_scale), float(guidance_scale if guidance_scale_2 is None else guidance_scale_2)


def guidance_schedule(sigmas, boundary_timestep: float, guidance_scale: float | None,
                      guidance_scale_2: float | None = None):
    """The sampler's ``guidance_scale`` for an expert pair (``sampling.make_sampler``): None (no guidance), one
    number when both experts use it (``guidance_scale_2`` None, diffusers' default, or equal), else float32
    [num_steps]: ``guidance_scale`` on the high-noise steps, ``guidance_scale_2`` on the low-noise ones."""
    high, low = _expert_scales(guidance_scale, guidance_scale_2)
    if high == low:
        return high
    experts = expert_schedule(sigmas, boundary_timestep)
    return np.where(experts == HIGH, np.float32(high), np.float32(low)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Segment:
    """Steps ``start`` .. ``stop`` - 1 of a sampling run, all on ``expert`` (HIGH or LOW) with its
    ``guidance_scale`` (None: no guidance)."""

    expert: int
    start: int
    stop: int
    guidance_scale: float | None


def expert_segments(sigmas, boundary_timestep: float, guidance_scale: float | None = None,
                    guidance_scale_2: float | None = None) -> list[Segment]:
    """The run split where the expert changes (``switch_step``): [high-noise steps, low-noise steps], or one
    segment when one expert runs every step."""
    scales = _expert_scales(guidance_scale, guidance_scale_2)
    num_steps = np.asarray(sigmas).size - 1
    switch = switch_step(sigmas, boundary_timestep)
    if switch is None:
        expert = int(expert_schedule(sigmas, boundary_timestep)[0])
        return [Segment(expert, 0, num_steps, scales[expert])]
    return [Segment(HIGH, 0, switch, scales[HIGH]), Segment(LOW, switch, num_steps, scales[LOW])]


def check_expert_pair(config_high: WanConfig, config_low: WanConfig) -> None:
    """Raises unless both configs are WanConfigs of one shape (one latent, one cache set for both experts)."""
    for config in (config_high, config_low):
        if not isinstance(config, WanConfig):
            raise TypeError(f"configs must be WanConfigs, got {type(config).__name__}")
    shared = ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "in_channels", "out_channels",
              "patch_size")
    differ = [f for f in shared if getattr(config_high, f) != getattr(config_low, f)]
    if differ:
        raise ValueError(f"the two experts must share their shapes (one latent, one cache set); they differ in "
                         f"{differ}")


def expert_denoisers(config_high: WanConfig, config_low: WanConfig, chipmunk: ChipmunkConfig | None = None, *,
                     grid, rotary_emb=None, dtype=jnp.bfloat16, attention_impl: str | None = None,
                     kernel_impl: str | None = None) -> tuple[Denoiser, Denoiser]:
    """(high, low): each expert's own ``wan.denoiser`` (params: that expert's), for ``sample_segments``. Arguments
    as ``two_expert_denoiser``."""
    check_expert_pair(config_high, config_low)
    kw = dict(grid=grid, rotary_emb=rotary_emb, dtype=dtype, attention_impl=attention_impl, kernel_impl=kernel_impl)
    return wan.denoiser(config_high, chipmunk, **kw), wan.denoiser(config_low, chipmunk, **kw)


def two_expert_denoiser(config_high: WanConfig, config_low: WanConfig, chipmunk: ChipmunkConfig | None = None, *,
                        boundary_timestep: float, grid, rotary_emb=None, dtype=jnp.bfloat16,
                        attention_impl: str | None = None, kernel_impl: str | None = None) -> Denoiser:
    """``sampling.Denoiser`` of a Wan 2.2 A14B expert pair: params = (high, low) (``wan.init_params`` /
    ``ports.wan.load_experts``). Steps with ``1000 sigma >= boundary_timestep`` run the high-noise expert, the
    others the low-noise one (diffusers' rule); give the sampler ``guidance_schedule(...)`` as its guidance scale
    (``sample`` does). ``chipmunk``: pass it through ``switch_refresh`` for the sigmas you sample with; one cache
    set (``wan.init_cache`` / ``init_branch_caches`` of either config) serves both experts. Other arguments as
    ``wan.denoiser`` (one device: no mesh)."""
    if not math.isfinite(boundary_timestep):
        raise ValueError(f"boundary_timestep must be finite, got {boundary_timestep}")
    experts = expert_denoisers(config_high, config_low, chipmunk, grid=grid, rotary_emb=rotary_emb, dtype=dtype,
                               attention_impl=attention_impl, kernel_impl=kernel_impl)

    def timestep_tables(params, sigmas, cond):
        tables = [d.timestep_tables(p, sigmas, cond) for d, p in zip(experts, params)]
        return {"expert": _expert_of(sigmas, boundary_timestep), "tables": tuple(tables)}

    def compute(params, latents, t, cond, cache, plan, key):
        branches = [lambda d=d, p=p, tab=tab: d.compute(p, latents, tab, cond, cache, plan, key)
                    for d, p, tab in zip(experts, params, t["tables"])]
        return jax.lax.cond(t["expert"] == HIGH, branches[HIGH], branches[LOW])

    def head(params, hidden, t, cond):
        branches = [lambda d=d, p=p, tab=tab: d.head(p, hidden, tab, cond)
                    for d, p, tab in zip(experts, params, t["tables"])]
        return jax.lax.cond(t["expert"] == HIGH, branches[HIGH], branches[LOW])

    return dataclasses.replace(experts[0], compute=compute, head=head, timestep_tables=timestep_tables)


def sample(denoiser: Denoiser, chipmunk: ChipmunkConfig, params, latents, cond, cache, *, sigmas, key, hidden_shape,
           boundary_timestep: float, hidden_dtype=jnp.bfloat16, guidance_scale=None, guidance_scale_2=None,
           uncond=None, static_step_dispatch=False):
    """``sampling.sample`` for a ``two_expert_denoiser`` (built with the same ``boundary_timestep``), with each
    expert's guidance scale (``guidance_schedule``)."""
    guidance = guidance_schedule(sigmas, boundary_timestep, guidance_scale, guidance_scale_2)
    return sampling.sample(denoiser, chipmunk, params, latents, cond, cache, sigmas=sigmas, key=key,
                           hidden_shape=hidden_shape, hidden_dtype=hidden_dtype, guidance_scale=guidance,
                           uncond=uncond, static_step_dispatch=static_step_dispatch)


def sample_segments(denoisers: tuple[Denoiser, Denoiser], chipmunk: ChipmunkConfig, params, latents, cond, cache, *,
                    sigmas, key, hidden_shape, boundary_timestep: float, hidden_dtype=jnp.bfloat16,
                    guidance_scale=None, guidance_scale_2=None, uncond=None, static_step_dispatch=False):
    """``sample`` as two jitted segments (``expert_segments``), each running one expert's denoiser
    (``expert_denoisers``); the same steps, plans, keys and result. ``params`` = (high, low) wherever they are:
    host-resident expert params are copied to the device for their segment and that copy freed after it
    (``memory.with_device_params``), so with both kept in pinned host memory (``memory.to_host``) one expert
    occupies the device at a time. Returns (latents, cache, step cache) as ``sampling.sample``."""
    if len(denoisers) != 2 or len(params) != 2:
        raise ValueError("denoisers and params must be (high, low) pairs")
    segments = expert_segments(sigmas, boundary_timestep, guidance_scale, guidance_scale_2)
    batch, seq_len, width = hidden_shape
    step_cache = init_step_cache(batch=batch, seq_len=seq_len, width=width, dtype=hidden_dtype)
    if guidance_scale is not None:
        cache, step_cache = split_branches(cache, 2), split_branches(step_cache, 2)  # updated in place
    x = latents
    for segment in segments:
        run = sampling.make_sampler(denoisers[segment.expert], chipmunk, sigmas,
                                    guidance_scale=segment.guidance_scale, static_step_dispatch=static_step_dispatch,
                                    steps=(segment.start, segment.stop))
        x, cache, step_cache = memory.with_device_params(
            lambda p: run(p, x, cond, cache, step_cache, key, uncond), params[segment.expert])
    return x, cache, step_cache
