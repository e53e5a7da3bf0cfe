"""Sparse-delta attention (docs/algorithm.md §1): one attention layer's Chipmunk op and its cache pytree.

    full step t0:  o = dense(q, k, v);            out_cache = o - A_S(q, k, v)
    sparse step t: o = out_cache + A_S(q, k, v)

A_S is attention restricted to (and renormalised over) each query group's column set S (docs/algorithm.md §1.7).
The column sets come from column sums scored with the previous full step's LSE (docs/algorithm.md §1.4-1.5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from chipmunk_jax import memory, selection
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.pallas_kernels import attention as kernels
from chipmunk_jax.schedule import AttentionStep, dispatch
from chipmunk_jax.validation import positive_int

__all__ = [
    "AttentionCache",
    "init_attention_cache",
    "sparse_delta_attention",
    "attention_cache_bytes",
    "check_seq_len",
]


@struct.dataclass
class AttentionCache:
    """Cache of one attention layer (one CFG branch; stack a leading axis for several).

    lse:       [B, H, N] f32, natural-log softmax normaliser of the last dense/colsum step.
    indices:   [B, H, G, K] int32 column sets (uncompressed path), else None.
    counts:    [B, H, G] int32 used entries of each column set.
    mask_bits: [B, H, G, ceil(N / 8)] uint8 bit-packed column sets (compressed path), else None.
    out_cache: [B, N, H, D] dense output minus the sparse part at the last full step.
    """

    lse: jax.Array
    counts: jax.Array
    out_cache: jax.Array
    indices: jax.Array | None = None
    mask_bits: jax.Array | None = None


def _num_groups(seq_len: int, group_size: int) -> int:
    return -(-seq_len // group_size)


def check_seq_len(seq_len: int, config: ChipmunkConfig) -> None:
    """Chipmunk attention needs at least one full query group."""
    if config.attention.enabled and seq_len < config.attention.group_size:
        raise ValueError(
            f"sequence length {seq_len} is shorter than one query group "
            f"(attention.group_size={config.attention.group_size})"
        )


def init_attention_cache(
    config: ChipmunkConfig, *, batch: int, seq_len: int, heads: int, head_dim: int, dtype=jnp.bfloat16
) -> AttentionCache:
    """Empty cache for an attention layer over ``seq_len`` tokens (self-attention)."""
    for name, value in (("batch", batch), ("seq_len", seq_len), ("heads", heads), ("head_dim", head_dim)):
        positive_int(name, value)
    check_seq_len(seq_len, config)
    a = config.attention
    g = _num_groups(seq_len, a.group_size)
    common = dict(
        lse=jnp.zeros((batch, heads, seq_len), jnp.float32),
        counts=jnp.zeros((batch, heads, g), jnp.int32),
        out_cache=jnp.zeros((batch, seq_len, heads, head_dim), dtype),
    )
    if a.compress_indices:
        return AttentionCache(**common, mask_bits=jnp.zeros((batch, heads, g, -(-seq_len // 8)), jnp.uint8))
    tk = min(selection.attention_column_count(a.top_keys, seq_len, a.counts_multiple_of), seq_len)
    return AttentionCache(**common, indices=jnp.zeros((batch, heads, g, max(tk, 1)), jnp.int32))


def attention_cache_bytes(cache: AttentionCache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))


def _check_inputs(q, k, v, cache: AttentionCache, config: ChipmunkConfig):
    if not isinstance(config, ChipmunkConfig):
        raise TypeError(f"config must be a ChipmunkConfig, got {type(config).__name__}")
    kernels._check_qkv(q, k, v)
    if q.shape != k.shape:
        raise ValueError(f"sparse-delta attention is self-attention: q {q.shape} and k {k.shape} must match")
    check_seq_len(q.shape[1], config)
    if not isinstance(cache, AttentionCache):
        raise TypeError(f"cache must be an AttentionCache, got {type(cache).__name__}")
    b, n, h, d = q.shape
    g = _num_groups(n, config.attention.group_size)
    expected = {"lse": (b, h, n), "counts": (b, h, g), "out_cache": (b, n, h, d)}
    for name, shape in expected.items():
        if getattr(cache, name).shape != shape:
            raise ValueError(f"cache.{name} has shape {getattr(cache, name).shape}, expected {shape} for q {q.shape}")
    if config.attention.compress_indices != (cache.mask_bits is not None):
        raise ValueError("cache layout does not match attention.compress_indices; build it with init_attention_cache")


def _column_sets(cache: AttentionCache, config: ChipmunkConfig, num_keys: int, impl):
    if cache.mask_bits is None:
        return cache.indices, cache.counts
    return selection.mask_bits_to_indices(
        cache.mask_bits, cache.counts, num_keys, config.attention.counts_multiple_of, impl=impl
    )


def sparse_delta_attention(
    q,
    k,
    v,
    cache: AttentionCache,
    step_kind,
    config: ChipmunkConfig,
    *,
    key=None,
    static_mask=None,
    eligible=None,
    scale: float | None = None,
    impl: str | None = None,
):
    """One Chipmunk attention call. q, k, v: [B, N, H, D] (RoPE and qk-norm already applied).

    step_kind: an AttentionStep (Python int: static dispatch) or a traced int32 (``lax.switch``),
      usually from ``schedule.attention_step_kind(config, step, layer)``.
    key: PRNG key for the dynamic random keys (compressed path, recompute steps).
    static_mask, eligible: the video static column mask [G, N] and eligibility [G]
      (``selection.static_video_mask``), or None.
    Returns (o like q, new cache).
    """
    _check_inputs(q, k, v, cache, config)
    a = config.attention
    n = q.shape[1]
    opts = dict(group_size=a.group_size, scale=scale, impl=impl)

    def always_dense(cache):
        return kernels.dense_attention_output(q, k, v, scale=scale, impl=impl), cache

    def dense(cache):
        o, lse = kernels.dense_attention(q, k, v, scale=scale, impl=impl)
        return o, cache.replace(lse=lse)

    def dense_colsum(cache):
        o, lse, colsum = kernels.dense_attention_colsum(q, k, v, cache.lse, **opts)
        sel = selection.select_attention_columns(
            colsum, a, key=key, static_mask=static_mask, eligible=eligible, impl=impl
        )
        out_cache = kernels.column_sparse_attention(q, k, v, sel.indices, sel.counts, base=o, sign=-1, **opts)
        if sel.mask is None:
            new = cache.replace(lse=lse, indices=sel.indices, counts=sel.counts, out_cache=out_cache)
        else:
            new = cache.replace(
                lse=lse, mask_bits=selection.pack_mask(sel.mask), counts=sel.counts, out_cache=out_cache
            )
        return o, new

    def dense_refresh(cache):
        o = kernels.dense_attention_output(q, k, v, scale=scale, impl=impl)  # the LSE is kept (docs/algorithm.md §1.2)
        indices, counts = _column_sets(cache, config, n, impl)
        out_cache = kernels.column_sparse_attention(q, k, v, indices, counts, base=o, sign=-1, **opts)
        return o, cache.replace(out_cache=out_cache)

    def sparse(cache):
        indices, counts = _column_sets(cache, config, n, impl)
        o = kernels.column_sparse_attention(q, k, v, indices, counts, base=cache.out_cache, sign=1, **opts)
        return o.astype(q.dtype), cache

    branches = (always_dense, dense, dense_colsum, dense_refresh, sparse)
    # a host-resident cache (cache.offload_layer_caches) visits the device for this call
    return memory.with_device_cache(
        lambda c: dispatch(step_kind, branches, c.replace(out_cache=c.out_cache.astype(q.dtype)), AttentionStep),
        cache,
    )
