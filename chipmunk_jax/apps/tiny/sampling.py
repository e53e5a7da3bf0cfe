"""Sampling the tiny FLUX model: its Chipmunk settings, the one-jit sampler run, and the nominal sparsity.

``timed_sample`` and ``average_sparsity`` are model-agnostic: the tiny video model samples through them too."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import config as C
from chipmunk_jax import sampling as SA
from chipmunk_jax.cache import init_step_cache
from chipmunk_jax.models import flux
from chipmunk_jax.schedule import AttentionStep, MLPStep, ModelStep, attention_schedule, mlp_schedule, model_schedule
from chipmunk_jax.selection import attention_column_count, mlp_feature_count
from chipmunk_jax.validation import positive_int

__all__ = ["tiny_chipmunk_config", "average_sparsity", "sample_images", "timed_sample"]


def tiny_chipmunk_config(num_steps: int = 50, **changes) -> C.ChipmunkConfig:
    """``config.flux()`` adapted to the tiny model (1,024 image + 8 text tokens, MLP width 512, 6 blocks).

    Changes from the FLUX preset, and why:
      attention.counts_multiple_of 112 -> 8: at 1,032 keys a 112 multiple rounds 16.5% up to 21.7%
        (tk 224); 8 keeps tk = 168 (16.3%), the preset's fraction.
      mlp.counts_multiple_of 256 -> 8: the tiny MLP has only 512 features, so a 256 multiple would round
        the preset's 30% (154) up to 50% (256).
      attention/mlp.first_n_dense_layers 2 -> 1: 2 of FLUX's 57 layers are dense; 2 of our 6 would be
        a third of the model, 1 keeps the first block dense as the original does for its first layers.
      num_steps = the sampling steps (the preset's 10-step full-step interval is kept; the default
        step-cache schedule is clipped to num_steps by ChipmunkConfig).
    ``changes`` are ``ChipmunkConfig.replace`` keywords applied on top.
    """
    base = C.flux().replace(
        num_steps=num_steps,
        attention__counts_multiple_of=8,
        attention__first_n_dense_layers=1,
        mlp__counts_multiple_of=8,
        mlp__first_n_dense_layers=1,
    )
    return base.replace(**changes) if changes else base


def average_sparsity(chipmunk: C.ChipmunkConfig, model, num_steps: int, num_tokens: int, *,
                     mlp_features: int | None = None, static_keys: float = 0.0) -> dict[str, float]:
    """Fraction of attention key-columns / MLP features skipped, averaged over all steps and all of the
    model's layers (always-dense layers, full steps and dense steps count as 0); skipped steps (step
    caching) count as fully sparse for both. Nominal counts from the config (random extras included).

    ``model``: a model config with ``num_sparse_layers``; ``mlp_features``: its MLP width (default
    ``model.mlp_hidden_dim``). ``static_keys``: the share of the keys the video models' static column mask keeps
    on every sparse step (local voxel window and static random keys, ``selection.static_video_mask``), added to
    the top-k share (an upper bound of the union)."""
    layers = model.num_sparse_layers
    hidden = model.mlp_hidden_dim if mlp_features is None else mlp_features
    a, m = chipmunk.attention, chipmunk.mlp
    tk = min(attention_column_count(a.top_keys, num_tokens, a.counts_multiple_of), num_tokens)
    attn_sparse = 1.0 - min(1.0, tk / num_tokens + a.random_keys + static_keys)
    fk = mlp_feature_count(m.top_keys, hidden)
    fk = min(hidden, -(-fk // m.counts_multiple_of) * m.counts_multiple_of)
    mlp_sparse = 1.0 - min(1.0, fk / hidden + m.random_keys)
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


def sample_images(params, model: flux.FluxConfig, text, pooled, noise, *, num_steps: int,
                  chipmunk: C.ChipmunkConfig | None = None, key=None, grid=(32, 32)):
    """Euler flow-matching samples from ``noise`` [B, N, C] (packed, raster order) with FLUX's shift for N
    tokens over the (height, width) token ``grid``; the latents stay in raster order (``flux.forward`` moves
    them into Chipmunk's tile order and back internally).

    Returns (packed samples [B, N, C] numpy float32, seconds of the second, compiled, run)."""
    positive_int("num_steps", num_steps)
    noise = np.asarray(noise, np.float32)
    batch, num_img, _ = noise.shape
    if num_img != grid[0] * grid[1]:
        raise ValueError(f"noise has {num_img} tokens, grid {grid} holds {grid[0] * grid[1]}")
    sigmas = SA.flow_sigmas(num_steps, mu=SA.flux_shift(num_img))
    den = flux.denoiser(model, chipmunk, grid=grid, dtype=jnp.float32)
    cond = flux.sampling_cond(model, encoder_hidden_states=jnp.asarray(text), pooled_projections=jnp.asarray(pooled),
                              grid=grid)
    init_cache = None if chipmunk is None else lambda: flux.init_cache(
        model, chipmunk, batch=batch, grid=grid, num_text_tokens=text.shape[1], dtype=jnp.float32)
    return timed_sample(den, chipmunk, sigmas, params, noise, cond, init_cache=init_cache,
                        hidden_shape=(batch, num_img, model.inner_dim), key=key)


def timed_sample(denoiser, chipmunk: C.ChipmunkConfig | None, sigmas, params, noise, cond, *, init_cache,
                 hidden_shape, key=None):
    """Runs ``chipmunk_jax.sampling.make_sampler``'s one-jit loop from host ``noise`` twice, the first run
    compiling, with a fresh model cache (``init_cache()``; None without ``chipmunk``) and float32 step cache
    ([B, N, D] ``hidden_shape``) each time; dense sampling uses ``ChipmunkConfig(num_steps)``'s schedule (no
    skipped steps). ``key`` (default PRNGKey(0)) seeds the sampler's random keys.

    Returns (samples numpy float32, seconds of the second run)."""
    noise = np.asarray(noise, np.float32)  # host copy: the sampler donates (deletes) its latents
    num_steps = len(sigmas) - 1
    sampler_config = chipmunk if chipmunk is not None else C.ChipmunkConfig(num_steps=num_steps)
    run = SA.make_sampler(denoiser, sampler_config, sigmas)
    key = jax.random.PRNGKey(0) if key is None else key
    batch, seq_len, width = hidden_shape

    def once():
        cache = None if init_cache is None else init_cache()
        step_cache = init_step_cache(batch=batch, seq_len=seq_len, width=width, dtype=jnp.float32)
        out, _, _ = run(params, jnp.asarray(noise), cond, cache, step_cache, key)
        return np.asarray(jax.block_until_ready(out))

    once()  # compile
    start = time.perf_counter()
    out = once()
    return out, time.perf_counter() - start
