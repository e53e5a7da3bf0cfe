"""Pure-jnp reference twins of the attention kernels (f32 math, HIGHEST precision).

Layout: q, k, v are [batch, seq, heads, head_dim] (as jax.nn.dot_product_attention). Statistics are
[batch, heads, ...]. These define the semantics every Pallas kernel must reproduce; they materialise
[B, H, N_q, N_k] logits, so keep them to test sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "dense_attention_reference",
    "dense_attention_colsum_reference",
    "column_sparse_attention_reference",
]

_HI = jax.lax.Precision.HIGHEST


def _logits(q, k, scale):
    return scale * jnp.einsum(
        "bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32), precision=_HI
    )


def dense_attention_reference(q, k, v, *, scale: float):
    """Returns (o like q, lse [B, H, N_q] f32): lse_i = log sum_j exp(scale q_i.k_j)."""
    s = _logits(q, k, scale)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32), precision=_HI)
    return o.astype(q.dtype), lse


def dense_attention_colsum_reference(q, k, v, prev_lse, *, group_size: int, scale: float):
    """Dense attention plus column sums scored with the previous step's LSE (docs/algorithm.md §1.4).

    colsum[b, h, g, j] = sum_{i in group g, i < N_q} exp(scale q_i.k_j - prev_lse[b, h, i]), f32,
    shape [B, H, ceil(N_q / group_size), N_k].
    """
    b, nq, h, _ = q.shape
    s = _logits(q, k, scale)
    lse = jax.nn.logsumexp(s, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), v.astype(jnp.float32), precision=_HI)
    p_prev = jnp.exp(s - prev_lse.astype(jnp.float32)[..., None])
    groups = -(-nq // group_size)
    p_prev = jnp.pad(p_prev, ((0, 0), (0, 0), (0, groups * group_size - nq), (0, 0)))
    colsum = p_prev.reshape(b, h, groups, group_size, -1).sum(axis=3)
    return o.astype(q.dtype), lse, colsum


def column_sparse_attention_reference(
    q, k, v, indices, counts, *, group_size: int, scale: float, base=None, sign: int = 1
):
    """Attention of each query group over its own gathered key list (docs/algorithm.md §1.7).

    For query i in group g: softmax over keys indices[b, h, g, :counts[b, h, g]] (duplicates count
    as separate keys, exactly as a gather kernel sees them); groups with count 0 give 0. With
    ``base`` returns base + sign * result (in f32, cast to base.dtype).
    """
    b, nq, h, d = q.shape
    groups, kmax = indices.shape[2], indices.shape[3]
    pad = groups * group_size - nq
    qg = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    qg = qg.reshape(b, groups, group_size, h, d)
    # Gather [B, H, G, K, D] rows of K and V.
    kt = jnp.transpose(k.astype(jnp.float32), (0, 2, 1, 3))
    vt = jnp.transpose(v.astype(jnp.float32), (0, 2, 1, 3))
    take = jax.vmap(jax.vmap(lambda rows, ids: rows[ids]))  # over b, h
    kg = take(kt, indices)
    vg = take(vt, indices)
    s = scale * jnp.einsum("bgihd,bhgkd->bhgik", qg, kg, precision=_HI)
    valid = jnp.arange(kmax)[None, None, None, :] < counts[..., None]  # [B, H, G, K]
    s = jnp.where(valid[:, :, :, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(valid[:, :, :, None, :], jnp.exp(s - m), 0.0)
    denom = p.sum(-1, keepdims=True)
    o = jnp.einsum("bhgik,bhgkd->bgihd", p / jnp.where(denom > 0, denom, 1.0), vg, precision=_HI)
    o = o.reshape(b, groups * group_size, h, d)[:, :nq]
    if base is None:
        return o.astype(q.dtype)
    return (base.astype(jnp.float32) + sign * o).astype(base.dtype)
