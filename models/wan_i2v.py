"""Wan image-to-video conditioning as ``sampling.Denoiser`` wrappers, as diffusers 0.42's ``WanImageToVideoPipeline``
feeds its transformer (docs/models.md §3.4).

The VAE-encoded image is a constant of the generation: it rides in the sampler's ``cond`` (and ``uncond``: both CFG
branches see the same image) under the key ``CONDITION``, and the wrappers below turn it into the model's input, so
the sampler, the expert switch, the Chipmunk caches and step caching run unchanged. The wrappers take any Denoiser
whose ``cond`` is otherwise the model's own keywords (``wan.denoiser``, ``wan_experts.two_expert_denoiser`` /
``expert_denoisers``) and hand it ``cond`` without ``CONDITION``.

* Extra input channels (Wan2.2-I2V-A14B): ``channel_conditioned``. ``cond[CONDITION]`` is [B, T + C, F', H', W']:
  ``frame_mask`` (T = the VAE's temporal factor channels) then the normalised VAE latents of the pixel video [image,
  zeros, ...] (``channel_condition``). Every model call takes ``concat([latents, condition])`` on the channel axis
  (in_channels = C + T + C: 16 + 4 + 16 = 36 for A14B); the velocity has C channels, as the latents.
* First frame (Wan2.2-TI2V-5B, diffusers' ``expand_timesteps``): ``first_frame_conditioned``. ``cond[CONDITION]`` is
  the image's normalised VAE latents [B, C, 1, H', W']. Every model call sees them as latent frame 0, with timestep 0
  on that frame's tokens and the step's timestep on the others (per-token conditioning [B, N, 6, D], as diffusers'
  [B, N] timestep gives). diffusers steps its whole latent with the scheduler, frame 0 included, then overwrites
  frame 0 with the condition at every model input and once at the end; frame 0 of its latents never reaches anything
  else (the model sees the condition there; the Euler update is elementwise). Here the velocity of frame 0 is 0, so
  the sampler's frame 0 stays what ``with_first_frame`` put there before the loop: the condition at every step and in
  the result, which is diffusers' result.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.models.wan import WanConfig
from chipmunk_jax.sampling import Denoiser

__all__ = ["CONDITION", "frame_mask", "channel_condition", "with_first_frame", "channel_conditioned",
           "first_frame_conditioned"]

CONDITION = "image_condition"


def frame_mask(num_latent_frames: int, height: int, width: int, temporal: int) -> np.ndarray:
    """float32 [1, temporal, num_latent_frames, height, width]: diffusers' ``mask_lat_size`` for a first-frame
    condition. diffusers marks the pixel frames (1 for the image, 0 after), repeats the first one ``temporal`` times
    so the sequence is temporal x num_latent_frames long, and folds it into [latent frame, temporal] (a view), then
    moves the temporal axis to the channels; the result is 1 on every channel of latent frame 0, 0 elsewhere."""
    for name, value in (("num_latent_frames", num_latent_frames), ("height", height), ("width", width),
                        ("temporal", temporal)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    pixel_frames = np.zeros(temporal * num_latent_frames, np.float32)
    pixel_frames[:temporal] = 1.0  # the image's frame, repeated; the later frames are not given
    per_channel = pixel_frames.reshape(num_latent_frames, temporal).T  # [temporal, latent frame]
    return np.ascontiguousarray(np.broadcast_to(per_channel[None, :, :, None, None],
                                                (1, temporal, num_latent_frames, height, width)))


def channel_condition(latent_condition, temporal: int) -> np.ndarray:
    """float32 [B, temporal + C, F', H', W']: ``frame_mask`` then ``latent_condition`` (the normalised VAE latents
    [B, C, F', H', W'] of the pixel video [image, zeros, ...]), diffusers' ``concat([mask_lat_size,
    latent_condition], dim=1)``."""
    latent_condition = np.asarray(latent_condition, np.float32)
    if latent_condition.ndim != 5:
        raise ValueError(f"latent_condition must be [B, C, F', H', W'], got shape {latent_condition.shape}")
    b, _, f, h, w = latent_condition.shape
    mask = np.broadcast_to(frame_mask(f, h, w, temporal), (b, temporal, f, h, w))
    return np.concatenate([mask, latent_condition], axis=1)


def with_first_frame(latents, condition):
    """``latents`` [B, C, F', H', W'] with latent frame 0 replaced by ``condition`` [B, C, 1, H', W'] (diffusers'
    ``(1 - first_frame_mask) * condition + first_frame_mask * latents``)."""
    _check_first_frame(latents, condition)
    return jnp.concatenate([jnp.asarray(condition).astype(latents.dtype), jnp.asarray(latents)[:, :, 1:]], axis=2)


def _check_first_frame(latents, condition) -> None:
    b, c, _, h, w = jnp.shape(latents)
    if jnp.shape(condition) != (b, c, 1, h, w):
        raise ValueError(f"the first-frame condition must be [{b}, {c}, 1, {h}, {w}] (the image's VAE latents), got "
                         f"shape {tuple(jnp.shape(condition))}")


def _split(cond):
    """(the image condition, ``cond`` without it: the model's own keywords)."""
    if not isinstance(cond, dict) or CONDITION not in cond:
        raise ValueError(f"an image-conditioned denoiser needs cond[{CONDITION!r}] (in cond and uncond alike)")
    return cond[CONDITION], {k: v for k, v in cond.items() if k != CONDITION}


def _wrapped(denoiser: Denoiser, *, model_input, model_t, compute_velocity=None, head_velocity=None,
             timestep_tables=None) -> Denoiser:
    """``denoiser`` with every model call fed ``model_input(latents, condition)`` and ``model_t(t)`` and the model's
    ``cond`` (without ``CONDITION``); ``compute_velocity`` / ``head_velocity`` post-process what ``compute`` / ``head``
    return; ``timestep_tables(params, sigmas, model_cond)`` replaces the denoiser's tables."""
    keep = lambda x: x  # noqa: E731
    compute_velocity, head_velocity = compute_velocity or keep, head_velocity or keep

    def compute(params, latents, t, cond, cache, plan, key):
        condition, model_cond = _split(cond)
        out = denoiser.compute(params, model_input(latents, condition), model_t(t), model_cond, cache, plan, key)
        return compute_velocity(out)

    def head(params, hidden, t, cond):
        return head_velocity(denoiser.head(params, hidden, model_t(t), _split(cond)[1]))

    tables = denoiser.timestep_tables
    if tables is not None:
        inner = timestep_tables or tables
        tables = lambda params, sigmas, cond: inner(params, sigmas, _split(cond)[1])  # noqa: E731
    wrapped = dict(compute=compute, head=head, timestep_tables=tables)
    if getattr(denoiser, "probe", None) is not None:  # a step-caching policy's probe: one more model call
        def probe(params, latents, t, cond, kind):
            condition, model_cond = _split(cond)
            return denoiser.probe(params, model_input(latents, condition), model_t(t), model_cond, kind)

        wrapped["probe"] = probe
    return dataclasses.replace(denoiser, **wrapped)


def channel_conditioned(denoiser: Denoiser) -> Denoiser:
    """``denoiser`` whose every model call takes ``concat([latents, cond[CONDITION]])`` on the channel axis
    (Wan2.2-I2V-A14B; module docstring). Step caching's final layer takes no input: ``head`` only drops the
    condition from ``cond``."""

    def model_input(latents, condition):
        b, _, f, h, w = latents.shape
        if condition.ndim != 5 or (condition.shape[0], *condition.shape[2:]) != (b, f, h, w):
            raise ValueError(f"the channel condition must be [{b}, channels, {f}, {h}, {w}] (the latents' batch, "
                             f"frames and size), got shape {tuple(condition.shape)}")
        return jnp.concatenate([latents, condition.astype(latents.dtype)], axis=1)

    return _wrapped(denoiser, model_input=model_input, model_t=lambda t: t)


def first_frame_conditioned(denoiser: Denoiser, config: WanConfig, grid: tuple[int, int, int]) -> Denoiser:
    """``denoiser`` (a ``wan.denoiser`` over the same ``config`` and token ``grid``) with the image latents
    ``cond[CONDITION]`` as latent frame 0, timestep 0 on its tokens and a zero velocity there (Wan2.2-TI2V-5B;
    module docstring). Before sampling, put the condition into the latents' frame 0 (``with_first_frame``) so that
    the result holds it, as diffusers' does.

    The step tables hold the model's conditioning at the step's timestep and at 0 ([B] rows each, as
    ``wan.denoiser``'s); each call spreads them over the tokens, [B, N, 6, D] float32 as diffusers' per-token
    timestep builds it (the model takes per-token modulation in that form)."""
    if not isinstance(config, WanConfig):
        raise TypeError(f"config must be a WanConfig, got {type(config).__name__}")
    if denoiser.timestep_tables is None:
        raise ValueError("first_frame_conditioned needs a denoiser with timestep tables (wan.denoiser)")
    if config.patch_size[0] != 1:
        # diffusers' expand_timesteps marks the first latent frame's tokens, one token frame per latent frame
        raise ValueError(f"first-frame conditioning needs a temporal patch size of 1, got {config.patch_size}")
    f, h, w = grid
    first = np.arange(f * h * w) < h * w  # raster (frame, row, column) token order: frame 0's tokens come first

    def per_token(t):
        def spread(at_zero, at_t):  # [B, ...] rows -> [B, N, ...]
            where = first.reshape((1, first.size) + (1,) * (at_t.ndim - 1))
            return jnp.where(where, at_zero[:, None], at_t[:, None])

        conditioning = jax.tree.map(spread, t["first_frame"], t["conditioning"])
        return {k: v for k, v in t.items() if k != "first_frame"} | {"conditioning": conditioning}

    def timestep_tables(params, sigmas, model_cond):
        tables = denoiser.timestep_tables(params, sigmas, model_cond)
        if not isinstance(tables, dict) or "conditioning" not in tables:
            raise ValueError("first_frame_conditioned needs wan.denoiser's tables (with 'conditioning')")
        at_zero = denoiser.timestep_tables(params, jnp.zeros_like(sigmas), model_cond)["conditioning"]
        return dict(tables, first_frame=at_zero)

    def still_first_frame(velocity):  # frame 0 is the condition, not sampled
        return velocity.at[:, :, :1].set(0.0)

    return _wrapped(denoiser, model_input=with_first_frame, model_t=per_token, timestep_tables=timestep_tables,
                    compute_velocity=lambda out: out.replace(sample=still_first_frame(out.sample)),
                    head_velocity=still_first_frame)
