"""Small functional building blocks shared by the DiT ports (diffusers math, docs/models.md §0).

Parameters are plain dicts named like the diffusers checkpoint: a Linear is ``{"kernel": [in, out],
"bias": [out]}`` (torch ``weight`` transposed), an RMSNorm is ``{"scale": [dim]}``.

Precision policy: timestep sinusoids, RoPE tables and their application, norms and modulation run in
float32; the big matmuls take their inputs in the compute ``dtype`` (bfloat16 by default) and, when
that dtype is float32, run at ``Precision.HIGHEST`` so fp32 parity with torch holds on every backend.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "matmul_precision",
    "linear",
    "layer_norm",
    "affine_layer_norm",
    "rms_norm",
    "split_heads",
    "modulate",
    "gelu_tanh",
    "timestep_sinusoids",
    "timestep_embedding",
    "rotary_tables_1d",
    "rotary_tables",
    "apply_rotary_emb",
]

Params = dict[str, Any]


def matmul_precision(dtype) -> jax.lax.Precision:
    """HIGHEST for float32 compute (no TF32 / bf16 passes), DEFAULT otherwise."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def linear_init(key: jax.Array, fan_in: int, fan_out: int, dtype) -> Params:
    """Random Dense params with torch's nn.Linear default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    kw, kb = jax.random.split(key)
    return {
        "kernel": jax.random.uniform(kw, (fan_in, fan_out), dtype, -bound, bound),
        "bias": jax.random.uniform(kb, (fan_out,), dtype, -bound, bound),
    }


def linear(params: Params, x: jax.Array, dtype=jnp.bfloat16, out_dtype=None) -> jax.Array:
    """``x @ kernel + bias`` with inputs cast to ``dtype``; f32 accumulation, result in ``out_dtype``.

    ``params`` holds ``kernel`` [in, out] or ``kernel_t`` [out, in] (weights prepared for a kernel that
    gathers rows of W^T, e.g. ``flux.prepare_params``): the same product, contracted without a copy."""
    out_dtype = dtype if out_dtype is None else out_dtype
    precision = matmul_precision(dtype)
    if "kernel_t" in params:
        y = jnp.einsum("...i,oi->...o", x.astype(dtype), params["kernel_t"].astype(dtype), precision=precision,
                       preferred_element_type=jnp.float32)
    else:
        y = jnp.matmul(x.astype(dtype), params["kernel"].astype(dtype), precision=precision,
                       preferred_element_type=jnp.float32)
    if "bias" in params:
        y = y + params["bias"].astype(jnp.float32)
    return y.astype(out_dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, computed in float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def affine_layer_norm(params: Params, x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm with a learned ``scale`` and ``bias`` (torch ``weight`` / ``bias``), float32."""
    return layer_norm(x, eps) * params["scale"].astype(jnp.float32) + params["bias"].astype(jnp.float32)


def split_heads(x: jax.Array, head_dim: int) -> jax.Array:
    """[..., H * D] -> [..., H, D]."""
    return x.reshape(*x.shape[:-1], -1, head_dim)


def rms_norm(params: Params, x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMSNorm over the last axis with a learned ``scale``, computed in float32, returned as f32."""
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return x * params["scale"].astype(jnp.float32)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * (1 + scale) + shift`` with per-sample [B, D] shift/scale broadcast over the sequence, or
    per-token [B, S, D] ones (HunyuanVideo-I2V token replace)."""
    return x * (1.0 + per_token(scale)) + per_token(shift)


def per_token(v: jax.Array) -> jax.Array:
    """A modulation vector as [B, 1, D] (per sample) or [B, S, D] (per token), for broadcasting over x."""
    return v[:, None, :] if v.ndim == 2 else v


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def timestep_sinusoids(timesteps: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``: [cos, sin], float32."""
    half = dim // 2
    # A constant table, rounded once from float64: t*1000 reaches 1000, so a one-ulp difference in a
    # frequency moves cos/sin by ~1e-4 (XLA's float32 exp is off by one ulp on 17 of 128 entries).
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def timestep_embedding(params: Params, x: jax.Array) -> jax.Array:
    """``TimestepEmbedding`` / ``PixArtAlphaTextProjection(act='silu')``: linear_1 -> SiLU -> linear_2, f32."""
    h = linear(params["linear_1"], x, jnp.float32)
    return linear(params["linear_2"], jax.nn.silu(h), jnp.float32)


def rotary_tables_1d(dim: int, pos, theta: float) -> tuple[Any, Any]:
    """``get_1d_rotary_pos_embed(dim, pos, theta, use_real=True, repeat_interleave_real=True)``.

    Concrete positions use float64 numpy as diffusers does (angles reach ~100 rad at 1024^2, where
    float32 loses ~1e-5); traced positions fall back to float32.
    """
    if isinstance(pos, jax.core.Tracer):
        freqs = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
        angles = pos.astype(jnp.float32)[:, None] * freqs[None, :]
        return jnp.repeat(jnp.cos(angles), 2, axis=1), jnp.repeat(jnp.sin(angles), 2, axis=1)
    pos = np.asarray(pos, dtype=np.float32).astype(np.float64)
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    angles = np.outer(pos, freqs)
    cos = np.repeat(np.cos(angles), 2, axis=1).astype(np.float32)
    sin = np.repeat(np.sin(angles), 2, axis=1).astype(np.float32)
    return cos, sin


def rotary_tables(ids, axes_dims, theta: float) -> tuple[jax.Array, jax.Array]:
    """Multi-axis RoPE (``FluxPosEmbed``): one table per id column, concatenated -> ([S, sum], [S, sum])."""
    if ids.ndim != 2 or ids.shape[1] != len(axes_dims):
        raise ValueError(f"ids must have shape [S, {len(axes_dims)}], got {tuple(ids.shape)}")
    xp = jnp if isinstance(ids, jax.core.Tracer) else np
    if xp is np:
        ids = np.asarray(ids)
    parts = [rotary_tables_1d(d, ids[:, i], theta) for i, d in enumerate(axes_dims)]
    cos = xp.concatenate([c for c, _ in parts], axis=-1)
    sin = xp.concatenate([s for _, s in parts], axis=-1)
    return jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32)


def apply_rotary_emb(x: jax.Array, rotary_emb: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Interleaved-pair (GPT-J) RoPE on x [B, S, H, D] with tables [S, D]; float32 math, dtype kept."""
    cos, sin = rotary_emb
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)
