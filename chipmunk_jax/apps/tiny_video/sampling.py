"""Sampling the tiny Wan video model: its Chipmunk settings, the one-jit sampler run, and the nominal sparsity."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import config as C
from chipmunk_jax import sampling as SA
from chipmunk_jax.apps.tiny.sampling import SamplerSetup, average_sparsity, timed_sample
from chipmunk_jax.apps.tiny_video import TOKEN_GRID
from chipmunk_jax.models import wan
from chipmunk_jax.selection import static_video_mask
from chipmunk_jax.validation import positive_int

__all__ = ["tiny_video_chipmunk_config", "static_key_share", "video_reference_settings", "video_sparsity",
           "video_setup", "sample_videos"]

# the full-size presets' token grids (latent frames, height, width after the (1, 2, 2) patches)
WAN_720P_GRID = (21, 45, 80)  # 1280x720x81
WAN_480P_GRID = (21, 30, 52)  # 832x480x81


def tiny_video_chipmunk_config(num_steps: int = 50, **changes) -> C.ChipmunkConfig:
    """``config.wan()`` adapted to the tiny video model (a (4, 16, 16) grid of 1,024 video tokens, 8 blocks).

    Changes from the Wan preset, and why:
      reorder.voxel (4, 6, 8) -> (4, 4, 4) and attention.group_size 192 -> 64: a voxel is one query group
        (4 x 6 x 8 = 192 in the original); the tiny grid splits into 1 x 4 x 4 voxels of 64 tokens, the smallest
        group the kernels take.
      attention.local_voxels 5 -> 1 (each group's own voxel, 6% of the keys): at 720p the 5-voxel window holds
        about 36% of the keys; on the tiny 1 x 4 x 4 voxel grid the next wider window (3 voxels, shifted inward at
        the borders) would hold 56%, past the half where ``static_video_mask`` warns that sparse steps keep too
        many keys to pay off.
      attention.counts_multiple_of 128 -> 16: 10% of 1,024 keys is 102; a 128 multiple would make it 12.5%, 16
        gives 96 (9.4%; ``selection.attention_column_count`` rounds to the nearest multiple).
      attention.first_n_dense_layers 2 -> 1: 2 of Wan's 40 layers are dense; 2 of our 8 would be a quarter.
      invocations_per_step 2 -> 1: the tiny model is sampled without classifier-free guidance (it was trained
        on labels only, with no unconditional branch).
      num_steps = the sampling steps (the preset's 10-step full-step interval and default step-cache schedule
        are kept; ChipmunkConfig clips the schedule to num_steps).
    Kept: top_keys 0.10, random / dynamic random keys 0.01, compressed indices, mask recompute, step caching,
    attention-only sparsity (Wan's MLP stays dense, as the original). ``changes`` are ``ChipmunkConfig.replace``
    keywords applied on top.
    """
    base = C.wan().replace(
        num_steps=num_steps,
        invocations_per_step=1,
        reorder__voxel=(4, 4, 4),
        attention__group_size=64,
        attention__local_voxels=1,
        attention__counts_multiple_of=16,
        attention__first_n_dense_layers=1,
    )
    return base.replace(**changes) if changes else base


def static_key_share(chipmunk: C.ChipmunkConfig, grid=TOKEN_GRID) -> float:
    """Share of the (query group, key) pairs the static column mask keeps (local voxel window; the static random
    keys are added at their rate): what every sparse step attends on top of its top-k."""
    a = chipmunk.attention
    mask, _ = static_video_mask(grid, 0, dataclasses.replace(a, random_keys=0.0), voxel=chipmunk.reorder.voxel)
    share = float(np.asarray(mask).mean())
    return min(1.0, share + a.random_keys * (1.0 - share))


def video_reference_settings(num_steps: int = 50) -> tuple[tuple[str, dict], ...]:
    """The full-size video presets on the tiny grid, as (name, ``tiny_video_chipmunk_config`` changes).

    A sparse step of a preset attends its static share of the keys (local voxel window + static random keys,
    ``static_key_share`` at the preset's own token grid) plus its top-k and dynamic random keys. The tiny grid's
    windows come in coarse steps (1 voxel: 13% with the static random keys, 3 voxels: 56%), so the Wan presets
    keep the tiny preset's 1-voxel window and move the difference of the static shares into the top-k: the
    same share of the keys per sparse step, with more of it chosen dynamically (which favours quality).
      "Wan 720p density": ``config.wan()`` (window 5 at 720p: 33% static, ~44% attended).
      "Wan 480p preset density": ``config.wan_480p()`` (window 3 at 480p: 17% static, ~28% attended).
      "HunyuanVideo preset": ``config.hunyuan_video()`` has no window (each group's own voxel + 1% static random
        keys: 1.2% at 720p, 7% on the tiny grid's 16 voxels), so it maps as it is: top-k 5%, window 0, its full
        steps (0, 1, 10, 40 of 50) scaled to ``num_steps``; 1 of 8 layers dense as the tiny Wan preset.
    """
    positive_int("num_steps", num_steps)
    tiny = tiny_video_chipmunk_config(num_steps)
    tiny_static = static_key_share(tiny)
    settings = []
    for name, preset, grid in (("Wan 720p density", C.wan(), WAN_720P_GRID),
                               ("Wan 480p preset density", C.wan_480p(), WAN_480P_GRID)):
        extra = static_key_share(preset, grid) - tiny_static
        settings.append((name, {"attention__top_keys": round(preset.attention.top_keys + max(0.0, extra), 3)}))
    hunyuan = C.hunyuan_video().attention
    schedule = sorted({0, 1} | {min(num_steps - 1, round(s * num_steps / 50)) for s in hunyuan.full_step_schedule})
    settings.append(("HunyuanVideo preset", {"attention__top_keys": hunyuan.top_keys, "attention__local_voxels": 0,
                                             "attention__full_step_schedule": tuple(schedule)}))
    return tuple(settings)


def video_sparsity(chipmunk: C.ChipmunkConfig, model: wan.WanConfig, num_steps: int,
                   grid=TOKEN_GRID) -> dict[str, float]:
    """``apps.tiny.sampling.average_sparsity`` of the video model: the static mask's share counts as kept keys."""
    return average_sparsity(chipmunk, model, num_steps, math.prod(grid), mlp_features=model.ffn_dim,
                            static_keys=static_key_share(chipmunk, grid) if chipmunk.attention.enabled else 0.0)


def video_setup(model: wan.WanConfig, text, noise_shape, *, num_steps: int, chipmunk: C.ChipmunkConfig | None = None,
                key=None) -> SamplerSetup:
    """The tiny video model's run on noise of ``noise_shape`` [B, 3, F, H, W] (Wan's latent layout) with FLUX's
    resolution-dependent shift for the video tokens (Wan's fixed shifts 3.0 / 5.0 are set for 32k-75k tokens);
    ``text``: the label tokens [B, 12, 64]. ``wan.forward`` moves the tokens into Chipmunk's voxel order and back.
    ``key`` (default PRNGKey(0)) seeds the static mask (its fold 1) and the sampler's random keys."""
    positive_int("num_steps", num_steps)
    grid = wan.token_grid(model, noise_shape)
    batch, num_tokens = noise_shape[0], math.prod(grid)
    key = jax.random.PRNGKey(0) if key is None else key
    init_cache = None if chipmunk is None else lambda: wan.init_cache(
        model, chipmunk, batch=batch, grid=grid, key=jax.random.fold_in(key, 1), dtype=jnp.float32)
    return SamplerSetup(denoiser=wan.denoiser(model, chipmunk, grid=grid, dtype=jnp.float32), chipmunk=chipmunk,
                        sigmas=SA.flow_sigmas(num_steps, mu=SA.flux_shift(num_tokens)),
                        cond={"encoder_hidden_states": jnp.asarray(text, jnp.float32)}, init_cache=init_cache,
                        hidden_shape=(batch, num_tokens, model.inner_dim), key=key)


def sample_videos(params, model: wan.WanConfig, text, noise, *, num_steps: int,
                  chipmunk: C.ChipmunkConfig | None = None, key=None):
    """Euler flow-matching samples from ``noise`` [B, 3, F, H, W] (``video_setup``).

    Returns (samples [B, 3, F, H, W] numpy float32, seconds of the second, compiled, run)."""
    noise = np.asarray(noise, np.float32)
    setup = video_setup(model, text, noise.shape, num_steps=num_steps, chipmunk=chipmunk, key=key)
    return timed_sample(setup, params, noise)[:2]
