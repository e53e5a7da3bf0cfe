"""Input checks and conversions shared by the models' forward functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from chipmunk_jax.validation import check_int_tuple

__all__ = ["check_array", "check_batch_scalar", "batch_vector", "check_compute_dtype", "check_guidance", "check_grid",
           "pooled_timestep_guidance", "check_rotary_emb"]


def check_array(name: str, x, ndim: int) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def check_batch_scalar(name: str, value, batch: int) -> None:
    """``value`` (timestep, guidance) is a scalar or one value per batch element (or None)."""
    if value is None:
        return
    if jnp.ndim(value) > 1 or (jnp.ndim(value) == 1 and jnp.shape(value)[0] not in (1, batch)):
        raise ValueError(f"{name} must be a scalar or have shape [{batch}], got shape {jnp.shape(value)}")


def batch_vector(value, batch: int) -> jax.Array:
    """A scalar or [1] / [B] value as a float32 [B] vector."""
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32).reshape(-1), (batch,))


def check_compute_dtype(dtype):
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def check_guidance(guidance_embeds: bool, guidance, model: str = "this config") -> None:
    """``guidance`` is given exactly when the model embeds a guidance scale (``guidance_embeds``)."""
    if guidance_embeds and guidance is None:
        raise ValueError(f"guidance is required: {model} has guidance_embeds=True")
    if not guidance_embeds and guidance is not None:
        raise ValueError(f"guidance must be None: {model} has guidance_embeds=False")


def check_grid(grid, ndim: int) -> tuple[int, ...]:
    """A token grid of ``ndim`` positive integers ((height, width) for images, (frames, height, width) for
    video), as a tuple of Python ints."""
    return check_int_tuple("grid", grid, length=ndim)


def pooled_timestep_guidance(pooled_projections, pooled_dim: int, timestep, guidance, *, guidance_embeds: bool,
                             model: str):
    """The checked inputs of a pooled-text model's timestep conditioning (FLUX, HunyuanVideo): pooled_projections
    [B, pooled_dim], a scalar or [B] timestep, and a guidance exactly when the model embeds one. Returns
    (timestep [B], guidance [B] or None) as float32 vectors."""
    check_array("pooled_projections", pooled_projections, 2)
    batch = pooled_projections.shape[0]
    if pooled_projections.shape[1] != pooled_dim:
        raise ValueError(f"pooled_projections must be [{batch}, {pooled_dim}], got {tuple(pooled_projections.shape)}")
    check_batch_scalar("timestep", timestep, batch)
    check_batch_scalar("guidance", guidance, batch)
    check_guidance(guidance_embeds, guidance, model)
    return batch_vector(timestep, batch), None if guidance is None else batch_vector(guidance, batch)


def check_rotary_emb(rotary_emb, rows: int, head_dim: int) -> None:
    """Precomputed RoPE tables (cos, sin) of [rows, head_dim] each, as the model's ``pos_embed`` makes them."""
    shape = tuple(getattr(rotary_emb[0], "shape", ()))
    if shape != (rows, head_dim):
        raise ValueError(f"rotary_emb tables must be [{rows}, {head_dim}], got {shape}")
