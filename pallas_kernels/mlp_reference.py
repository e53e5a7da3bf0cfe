"""Pure-jnp reference twin of the sparse-delta MLP kernels (docs/algorithm.md §2.2), f32 math."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["gelu_tanh", "feature_mask", "sparse_mlp_delta_reference"]

_HI = jax.lax.Precision.HIGHEST


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def feature_mask(indices, counts, num_features: int):
    """[B, NB, K] indices + [B, NB] counts -> bool [B, NB, F]: feature f selected in row block m."""
    b, nb, kmax = indices.shape
    valid = jnp.arange(kmax)[None, None, :] < counts[..., None]
    mask = jnp.zeros((b, nb, num_features), jnp.bool_)
    bi = jnp.arange(b)[:, None, None]
    mi = jnp.arange(nb)[None, :, None]
    return mask.at[bi, mi, indices].max(valid)


def sparse_mlp_delta_reference(
    x, w1, b1, w2, act_cache, out_cache, indices, counts, *, block_size: int, w1_transposed: bool = False
):
    """One sparse MLP step: for every row block m, token i in it and feature f in its set,

        a = gelu_tanh(x_i . w1[:, f] + b1[f]);  delta = a - act_cache[f, i];  act_cache[f, i] = a
        out_cache[i] += sum_f delta[i, f] * w2[f, :]

    x [B, N, C], w1 [C, F] ([F, C] with w1_transposed), b1 [F], w2 [F, C_out], act_cache [B, F, N] (feature-major),
    out_cache [B, N, C_out], indices [B, NB, K] int32 (unique within counts), counts [B, NB] int32.
    Returns (act_cache, out_cache) in their own dtypes.
    """
    n = x.shape[1]
    f = w1.shape[0] if w1_transposed else w1.shape[1]
    spec = "bnc,fc->bnf" if w1_transposed else "bnc,cf->bnf"
    z = jnp.einsum(spec, x.astype(jnp.float32), w1.astype(jnp.float32), precision=_HI)
    a_new = gelu_tanh(z + b1.astype(jnp.float32))
    block_mask = feature_mask(indices, counts, f)  # [B, NB, F]
    token_mask = jnp.repeat(block_mask, block_size, axis=1)[:, :n]  # [B, N, F]
    cached = jnp.swapaxes(act_cache, 1, 2).astype(jnp.float32)
    delta = jnp.where(token_mask, a_new - cached, 0.0)
    new_act = jnp.where(token_mask, a_new.astype(act_cache.dtype), jnp.swapaxes(act_cache, 1, 2))
    out = out_cache.astype(jnp.float32) + jnp.einsum(
        "bnf,fc->bnc", delta, w2.astype(jnp.float32), precision=_HI
    )
    return jnp.swapaxes(new_act, 1, 2), out.astype(out_cache.dtype)
