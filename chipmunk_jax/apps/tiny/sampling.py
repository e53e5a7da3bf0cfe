"""Sampling the tiny FLUX model: its Chipmunk settings, the one-jit sampler run, and the nominal sparsity.

``SamplerSetup``, ``timed_sample``, ``calibrate_magnitudes`` and ``average_sparsity`` are model-agnostic: the tiny
video model samples through them too."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import config as C
from chipmunk_jax import sampling as SA
from chipmunk_jax.cache import init_step_cache
from chipmunk_jax.apps.compute import attention_keep_share, mlp_keep_share
from chipmunk_jax.models import flux
from chipmunk_jax.schedule import AttentionStep, MLPStep, ModelStep, attention_schedule, mlp_schedule, model_schedule
from chipmunk_jax.step_policies import StepPolicy, init_policy_state
from chipmunk_jax.validation import positive_int

__all__ = ["tiny_chipmunk_config", "average_sparsity", "SamplerSetup", "TimedRun", "image_setup", "sample_images",
           "timed_sample", "calibrate_magnitudes"]


def tiny_chipmunk_config(num_steps: int = 50, **changes) -> C.ChipmunkConfig:
    """``config.flux()`` adapted to the tiny model (1,024 image + 8 text tokens, MLP width 512, 6 blocks).

    Changes from the FLUX preset, and why:
      attention.counts_multiple_of 112 -> 8, mlp.counts_multiple_of 256 -> 8: the counts stay near the set
        fractions (at 1,032 keys a 112 multiple rounds 25% to 21.7%, 8 keeps 24.8%; a 256 multiple would round the
        tiny MLP's 512 features to 0% or 50%).
      The tiny model's quality is lost in attention, not in the MLP (``python -m chipmunk_jax.apps.quality``: the
        MLP's sparsity alone keeps the samples far closer to dense than the attention's), and at 1,032 tokens the
        attention's QK^T / PV are over half of a block's FLOPs; so compute moves from the MLP to attention:
        mlp.top_keys 0.3 -> 0.1 and mlp.random_keys 0.05 -> 0; attention.top_keys 0.165 -> 0.25 and
        attention.full_step_every 10 -> 5 (a dense attention step every 5 steps).
      attention.first_n_dense_layers 2 -> 0: the first block's attention changes least from step to step (about 3%
        of its entries carry 70% of the change, benchmarks/quality/sweep.md), so it runs sparse too.
      mlp.first_n_dense_layers 2 -> 1: 2 of FLUX's 57 layers are dense, 2 of our 6 would be a third of the model.
      num_steps = the sampling steps (the default step-cache schedule is clipped to num_steps by ChipmunkConfig).
    Measured against the FLUX densities with the first block dense (top-k 0.165 / 0.3 + 0.05 random, full steps
    every 10): 50.4% instead of 52.1% of the dense FLOPs and 33.2 instead of 28.6 dB PSNR vs dense (12 samples,
    3 seeds, 50 steps; benchmarks/quality/pareto.md). ``changes`` are ``ChipmunkConfig.replace`` keywords applied
    on top.
    """
    base = C.flux().replace(
        num_steps=num_steps,
        attention__counts_multiple_of=8,
        attention__first_n_dense_layers=0,
        attention__top_keys=0.25,
        attention__full_step_every=5,
        mlp__counts_multiple_of=8,
        mlp__first_n_dense_layers=1,
        mlp__top_keys=0.1,
        mlp__random_keys=0.0,
    )
    return base.replace(**changes) if changes else base


def average_sparsity(chipmunk: C.ChipmunkConfig, model, num_steps: int, num_tokens: int, *,
                     mlp_features: int | None = None, static_keys: float = 0.0) -> dict[str, float]:
    """Fraction of attention key-columns / MLP features skipped, averaged over all steps and all of the
    model's layers (always-dense layers, full steps and dense steps count as 0); skipped steps (step
    caching) count as fully sparse for both. Nominal counts from the config (``apps.compute.attention_keep_share``
    / ``mlp_keep_share``: random extras included). The executed FLOPs are ``apps.compute.executed_flops``'s.

    ``model``: a model config with ``num_sparse_layers``; ``mlp_features``: its MLP width (default
    ``model.mlp_hidden_dim``). ``static_keys``: the share of the keys the video models' static column mask keeps
    on every sparse step (local voxel window and static random keys, ``selection.static_video_mask``), added to
    the top-k share (an upper bound of the union)."""
    layers = model.num_sparse_layers
    hidden = model.mlp_hidden_dim if mlp_features is None else mlp_features
    a, m = chipmunk.attention, chipmunk.mlp
    attn_sparse = 1.0 - attention_keep_share(a, num_tokens, static_keys)
    mlp_sparse = 1.0 - mlp_keep_share(m, hidden)
    skip = model_schedule(chipmunk)[:num_steps] == ModelStep.SKIP
    a_kinds, m_kinds = attention_schedule(chipmunk)[:num_steps], mlp_schedule(chipmunk)[:num_steps]
    attn_layers = max(0, layers - a.first_n_dense_layers) if a.enabled else 0
    mlp_layers = max(0, layers - m.first_n_dense_layers) if m.enabled else 0
    attn = np.where(skip, 1.0, (a_kinds == AttentionStep.SPARSE) * attn_sparse * attn_layers / layers)
    mlp = np.where(skip, 1.0, np.isin(m_kinds, (MLPStep.SPARSE_SELECT, MLPStep.SPARSE_REUSE))
                   * mlp_sparse * mlp_layers / layers)
    return {"attention": float(attn.mean()), "mlp": float(mlp.mean()), "skipped_steps": int(skip.sum()),
            "attention_sparse_step": attn_sparse, "mlp_sparse_step": mlp_sparse}


# ----------------------------------------------------------------------------------------------
# Sampling


@dataclasses.dataclass(frozen=True)
class SamplerSetup:
    """One sampler run of a tiny model short of its params and noise: the denoiser (dense or with ``chipmunk``),
    the noise levels, the conditioning, a fresh model cache (``init_cache()``; None without ``chipmunk``), the
    [B, N, D] shape of the pre-head hidden state (the step cache's / a policy's residual) and the sampler's key."""

    denoiser: SA.Denoiser
    chipmunk: C.ChipmunkConfig | None
    sigmas: np.ndarray
    cond: Any
    init_cache: Callable[[], Any] | None
    hidden_shape: tuple[int, int, int]
    key: jax.Array

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def config(self) -> C.ChipmunkConfig:
        """The sampler's config: ``chipmunk``, or ``ChipmunkConfig(num_steps)``'s schedule (no skipped steps)."""
        return self.chipmunk if self.chipmunk is not None else C.ChipmunkConfig(num_steps=self.num_steps)


class TimedRun(NamedTuple):
    """samples: numpy float32 in the noise's layout; seconds: the timed run's wall time (with ``warm=False`` the
    only run's, compile included); computed: bool [num_steps], the steps that ran the full model."""

    samples: np.ndarray
    seconds: float
    computed: np.ndarray


def image_setup(model: flux.FluxConfig, text, pooled, *, batch: int, num_steps: int,
                chipmunk: C.ChipmunkConfig | None = None, key=None, grid=(32, 32)) -> SamplerSetup:
    """The tiny FLUX model's run over the (height, width) token ``grid`` (raster-order packed latents; ``flux.forward``
    moves them into Chipmunk's tile order and back internally) with FLUX's shift for its tokens; ``key`` default
    PRNGKey(0)."""
    positive_int("num_steps", num_steps)
    num_img = grid[0] * grid[1]
    cond = flux.sampling_cond(model, encoder_hidden_states=jnp.asarray(text), pooled_projections=jnp.asarray(pooled),
                              grid=grid)
    init_cache = None if chipmunk is None else lambda: flux.init_cache(
        model, chipmunk, batch=batch, grid=grid, num_text_tokens=text.shape[1], dtype=jnp.float32)
    return SamplerSetup(denoiser=flux.denoiser(model, chipmunk, grid=grid, dtype=jnp.float32), chipmunk=chipmunk,
                        sigmas=SA.flow_sigmas(num_steps, mu=SA.flux_shift(num_img)), cond=cond, init_cache=init_cache,
                        hidden_shape=(batch, num_img, model.inner_dim),
                        key=jax.random.PRNGKey(0) if key is None else key)


def sample_images(params, model: flux.FluxConfig, text, pooled, noise, *, num_steps: int,
                  chipmunk: C.ChipmunkConfig | None = None, key=None, grid=(32, 32)):
    """Euler flow-matching samples from ``noise`` [B, N, C] (packed, raster order; ``image_setup``).

    Returns (packed samples [B, N, C] numpy float32, seconds of the second, compiled, run)."""
    noise = np.asarray(noise, np.float32)
    if noise.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"noise has {noise.shape[1]} tokens, grid {grid} holds {grid[0] * grid[1]}")
    setup = image_setup(model, text, pooled, batch=noise.shape[0], num_steps=num_steps, chipmunk=chipmunk, key=key,
                        grid=grid)
    return timed_sample(setup, params, noise)[:2]


def timed_sample(setup: SamplerSetup, params, noise, *, step_policy: StepPolicy | None = None,
                 warm: bool = True) -> TimedRun:
    """Runs ``chipmunk_jax.sampling.make_sampler``'s one-jit loop from host ``noise`` with a fresh model cache and
    a float32 step cache (or ``step_policy``'s state) each time: twice with ``warm`` (the first run compiles, the
    second is timed), else once. ``key`` (the setup's) seeds the sampler's random keys."""
    noise = np.asarray(noise, np.float32)  # host copy: the sampler donates (deletes) its latents
    run = SA.make_sampler(setup.denoiser, setup.config, setup.sigmas, step_policy=step_policy)
    batch, seq_len, width = setup.hidden_shape

    def once():
        cache = None if setup.init_cache is None else setup.init_cache()
        if step_policy is None:
            step_cache = init_step_cache(batch=batch, seq_len=seq_len, width=width, dtype=jnp.float32)
        else:
            step_cache = init_policy_state(step_policy, num_steps=setup.num_steps, hidden_shape=setup.hidden_shape)
        out, _, state = run(params, jnp.asarray(noise), setup.cond, cache, step_cache, setup.key)
        return np.asarray(jax.block_until_ready(out)), state

    if warm:
        once()  # compile
    start = time.perf_counter()
    out, state = once()
    seconds = time.perf_counter() - start
    if step_policy is None:
        computed = model_schedule(setup.config)[:setup.num_steps] != ModelStep.SKIP
    else:
        computed = np.asarray(state.computed, bool)
    return TimedRun(out, seconds, computed)


def calibrate_magnitudes(setup: SamplerSetup, params, noise) -> np.ndarray:
    """MagCache's per-step magnitude ratios (``sampling.calibrate_magnitude_ratios``) from a run of ``setup``
    (pass a dense one, as the paper calibrates) on ``noise``."""
    cache = None if setup.init_cache is None else setup.init_cache()
    return SA.calibrate_magnitude_ratios(setup.denoiser, setup.config, params, jnp.asarray(noise, jnp.float32),
                                         setup.cond, cache, sigmas=setup.sigmas, key=setup.key,
                                         hidden_shape=setup.hidden_shape)
