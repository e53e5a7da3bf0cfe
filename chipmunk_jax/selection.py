"""Column selection: which keys (attention) and hidden features (MLP) each group recomputes.

Reference semantics (pure jnp). Deviations from the original, all deliberate:
- Padding never leaves an index out of range: counts are rounded up to the tile but capped at the
  number of columns, and every index slot holds a valid column (docs/algorithm.md §1.5, §10.11).
- The video static mask has no voxel-0 artifact (docs/algorithm.md §10.3), and the dense text query groups are
  fully dense rather than dense from column ``N mod 128`` on (docs/algorithm.md §1.6 step 3).
- The MLP keeps an exact per-row top-k (plus random features), not a threshold sampled from the
  first 1024 features (docs/algorithm.md §10.9).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.config import AttentionConfig
from chipmunk_jax.pallas_kernels import mlp_selection, selection_fast
from chipmunk_jax.pallas_kernels.attention import resolve_impl
from chipmunk_jax.validation import positive_int

__all__ = [
    "ColumnSelection",
    "attention_column_count",
    "mlp_feature_count",
    "topk_mask",
    "mask_to_indices",
    "mask_bits_to_indices",
    "indices_to_mask",
    "pack_mask",
    "unpack_mask",
    "select_attention_columns",
    "static_video_mask",
    "select_mlp_features",
    "mlp_feature_sets",
    "block_mean",
]


class ColumnSelection(NamedTuple):
    indices: jax.Array  # [..., K] int32, every entry a valid column
    counts: jax.Array  # [...] int32, entries [0, counts) are used
    mask: jax.Array | None  # [..., N] bool of the selected columns (compressed path), else None


def attention_column_count(top_keys: float, num_keys: int, multiple_of: int) -> int:
    """``tk = m * round(top_keys * N / m)`` with Python's round, as the original (docs/algorithm.md §1.5).

    ``top_keys >= 1`` keeps every key: the rounding would otherwise drop up to m/2 keys when N is not
    a multiple of m, and "all columns" must mean the dense result."""
    if top_keys >= 1.0:
        return int(num_keys)
    return int(multiple_of * round(top_keys * num_keys / multiple_of))


def mlp_feature_count(top_keys: float, num_features: int) -> int:
    return int(round(top_keys * num_features))


def topk_mask(scores, k: int):
    """bool mask [..., N] of the k largest scores per row (ties broken by lax.top_k)."""
    n = scores.shape[-1]
    k = min(int(k), n)
    if k <= 0:
        return jnp.zeros(scores.shape, jnp.bool_)
    if k >= n:
        return jnp.ones(scores.shape, jnp.bool_)
    _, idx = jax.lax.top_k(scores, k)
    return indices_to_mask(idx, jnp.full(scores.shape[:-1], k, jnp.int32), n)


def indices_to_mask(indices, counts, num_columns: int):
    """[..., K] indices + [...] counts -> bool [..., num_columns]."""
    lead = indices.shape[:-1]
    flat_idx = indices.reshape(-1, indices.shape[-1])
    valid = jnp.arange(indices.shape[-1])[None, :] < counts.reshape(-1, 1)
    rows = jnp.arange(flat_idx.shape[0])[:, None]
    mask = jnp.zeros((flat_idx.shape[0], num_columns), jnp.bool_).at[rows, flat_idx].max(valid)
    return mask.reshape(*lead, num_columns)


def mask_to_indices(mask, multiple_of: int, capacity: int | None = None) -> ColumnSelection:
    """bool [..., N] -> (indices [..., K], counts [...]), the original's ``mask_to_indices``.

    counts = min(ceil(popcount / m) * m, N, K); indices[:popcount] are the selected columns in
    ascending order, then the lowest-numbered unselected columns as padding (they are attended /
    recomputed like selected ones). K = capacity (default N); every slot holds a valid column.
    """
    multiple_of = positive_int("multiple_of", multiple_of)
    n = mask.shape[-1]
    capacity = n if capacity is None else int(capacity)
    if not 1 <= capacity <= n:
        raise ValueError(f"capacity must be in [1, {n}], got {capacity}")
    mask = mask.astype(jnp.bool_)
    selected = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    counts = jnp.minimum(-(-selected // multiple_of) * multiple_of, min(n, capacity)).astype(jnp.int32)
    # Selected columns first, then unselected, both ascending: a stable sort on "not selected". (Two cumsums
    # giving each column its slot + a scatter did the same in ~3x the compile time on CPU: 15 XLA kernels.)
    order = jnp.argsort(~mask, axis=-1, stable=True)
    return ColumnSelection(order[..., :capacity].astype(jnp.int32), counts, None)


def _listed_columns(mask, indices, counts):
    """bool [..., N]: the columns in ``indices[..., :counts]`` for lists made by ``mask_to_indices(mask, ...)`` (the
    selected columns, then the lowest-numbered unselected ones up to the count), i.e.
    ``indices_to_mask(indices, counts, N)`` without a scatter: past the selected columns the list holds every
    unselected column up to its last entry."""
    padded = counts > jnp.sum(mask, axis=-1, dtype=jnp.int32)
    last = jnp.take_along_axis(indices, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    return mask | (padded[..., None] & (jnp.arange(mask.shape[-1], dtype=indices.dtype) <= last))


def pack_mask(mask):
    """bool [..., N] -> uint8 [..., ceil(N / 8)], little-endian bits (8x smaller between full steps)."""
    return jnp.packbits(mask.astype(jnp.bool_), axis=-1, bitorder="little")


def unpack_mask(bits, num_columns: int):
    return jnp.unpackbits(bits, axis=-1, count=num_columns, bitorder="little").astype(jnp.bool_)


def mask_bits_to_indices(bits, counts, num_columns: int, multiple_of: int, *, impl: str | None = None):
    """Index lists of a bit-packed mask kept between full steps: ``mask_to_indices(unpack_mask(bits))``.

    ``counts`` are the padded counts stored with the mask. Returns (indices [..., N], counts). With
    impl "pallas"/"interpret" the index lists come from ``pallas_kernels.selection_fast``'s kernel, which
    writes only the first ``counts`` slots (all the sparse kernels read): no cumsum + scatter over N on
    every sparse step. "reference": the plain jnp composition above (every slot written).
    """
    impl = resolve_impl(impl)
    if impl == "reference":
        sel = mask_to_indices(unpack_mask(bits, num_columns), multiple_of)
        return sel.indices, sel.counts
    return selection_fast.mask_bits_to_indices(bits, counts, num_columns, impl=impl), counts


def select_attention_columns(
    colsum, config: AttentionConfig, *, key=None, static_mask=None, eligible=None, impl: str | None = None
) -> ColumnSelection:
    """Column sets from column sums [B, H, G, N_k] (docs/algorithm.md §1.5).

    Uncompressed path: exactly tk top-k keys per group, indices [B, H, G, tk], mask None.
    Compressed path: mask = ((top-k OR Bernoulli(dynamic_random_keys)) AND eligible[g]) OR
    static_mask[g], indices [B, H, G, N_k] padded per ``mask_to_indices``; the mask is returned so
    it can be kept bit-packed. ``static_mask`` [G, N_k] and ``eligible`` [G] come from
    ``static_video_mask`` (shared over batch and heads).
    ``impl`` "pallas"/"interpret": ``pallas_kernels.selection_fast`` (threshold by bit bisection +
    compaction kernel; 104 ms at HunyuanVideo scale on the H100); the same sets (the uncompressed
    path lists them ascending instead of by score). "reference" (default off GPU): ``lax.top_k``.
    """
    if getattr(colsum, "ndim", None) != 4:
        raise ValueError(f"colsum must be [B, H, G, N_k], got shape {getattr(colsum, 'shape', None)}")
    n = colsum.shape[-1]
    tk = min(attention_column_count(config.top_keys, n, config.counts_multiple_of), n)
    impl = resolve_impl(impl)
    if impl != "reference":
        if config.compress_indices and config.dynamic_random_keys > 0 and key is None:
            raise ValueError("key (a PRNG key) is required when attention.dynamic_random_keys > 0")
        indices, counts, mask = selection_fast.select_columns_fast(
            colsum, tk, config.counts_multiple_of, compress=config.compress_indices, key=key,
            random_p=config.dynamic_random_keys if config.compress_indices else 0.0,
            eligible=eligible, static_mask=static_mask, impl=impl,
        )
        return ColumnSelection(indices, counts, mask)
    if not config.compress_indices:
        if tk == 0:
            idx = jnp.zeros(colsum.shape[:-1] + (1,), jnp.int32)
        else:
            _, idx = jax.lax.top_k(colsum, tk)
        return ColumnSelection(idx.astype(jnp.int32), jnp.full(colsum.shape[:-1], tk, jnp.int32), None)
    dynamic = topk_mask(colsum, tk)
    if config.dynamic_random_keys > 0:
        if key is None:
            raise ValueError("key (a PRNG key) is required when attention.dynamic_random_keys > 0")
        dynamic = dynamic | jax.random.bernoulli(key, config.dynamic_random_keys, colsum.shape)
    g = colsum.shape[2]
    if eligible is not None:
        if eligible.shape != (g,):
            raise ValueError(f"eligible must have shape ({g},), got {eligible.shape}")
        dynamic = dynamic & eligible[None, None, :, None]
    if static_mask is not None:
        if static_mask.shape != (g, n):
            raise ValueError(f"static_mask must have shape ({g}, {n}), got {static_mask.shape}")
        dynamic = dynamic | static_mask[None, None]
    sel = mask_to_indices(dynamic, config.counts_multiple_of)
    return ColumnSelection(sel.indices, sel.counts, dynamic)


def _window_offsets(center: int, size: int, radius: int) -> np.ndarray:
    """2r+1 consecutive coordinates containing ``center``, shifted inward at the borders."""
    width = min(2 * radius + 1, size)
    start = min(max(center - radius, 0), size - width)
    return np.arange(start, start + width)


_WIDE_WINDOW = 0.5  # static window share above which static_video_mask warns


def static_video_mask(
    grid: tuple[int, int, int],
    num_text: int,
    config: AttentionConfig,
    *,
    voxel=(4, 6, 8),
    key=None,
):
    """Static part of the video column sets (docs/algorithm.md §1.6) for tokens in voxel order + text appended.

    Returns (static_mask [G, N] bool, eligible [G] bool), shared by all heads and layers of one
    generation. Needs ``key`` when ``config.random_keys > 0``.
    """
    tt, th, tw = grid
    vt, vh, vw = voxel
    group = config.group_size
    if vt * vh * vw != group:
        raise ValueError(f"voxel {tuple(voxel)} must hold exactly group_size={group} tokens")
    n_img = tt * th * tw
    n = n_img + num_text
    g_total = -(-n // group)
    mask = np.zeros((g_total, n), np.bool_)
    mask[:, n_img:] = True  # every group sees all text keys
    grid_v = (tt // vt, th // vh, tw // vw)
    n_main = math.prod(grid_v)
    lv = config.local_voxels
    if lv > 0:
        radius = lv // 2
        for u in range(n_main):
            ct, ch, cw = np.unravel_index(u, grid_v)
            window = np.ix_(
                _window_offsets(ct, grid_v[0], radius),
                _window_offsets(ch, grid_v[1], radius),
                _window_offsets(cw, grid_v[2], radius),
            )
            for w in np.ravel_multi_index(window, grid_v).reshape(-1):
                mask[u, group * w: group * (w + 1)] = True
        mask[n_main:, max(n - group * lv**3, 0):] = True
        window_share = float(mask[:n_main, :n_img].mean()) if n_main else 0.0
        if window_share > _WIDE_WINDOW:
            # the window was sized for 720p (docs/algorithm.md §5.3); on small grids it keeps most keys on every sparse step
            warnings.warn(
                f"attention.local_voxels={lv}: the static window covers {window_share:.0%} of the image keys on "
                f"this {grid_v} voxel grid, so sparse steps keep at least that share and may be slower than "
                "dense ones; a smaller local_voxels suits this resolution", stacklevel=2)
    if config.local_1d_window > 0:
        half = int(config.local_1d_window * n_img) // 2
        for g in range(n_img // group):
            c = group * g + group // 2
            mask[g, max(0, c - half): min(n_img, c + half)] = True
    text_rows = np.zeros((g_total,), np.bool_)
    text_rows[g_total - (num_text // group + 1):] = True  # text query groups stay dense
    mask[text_rows] = True
    mask_j = jnp.asarray(mask)
    if config.random_keys > 0:
        if key is None:
            raise ValueError("key (a PRNG key) is required when attention.random_keys > 0")
        rand = jax.random.bernoulli(key, config.random_keys, mask.shape)
        mask_j = mask_j | (rand & ~jnp.asarray(text_rows)[:, None])
    eligible = jnp.sum(mask_j, axis=-1) + int(config.top_keys * n_img) < n
    return mask_j, eligible


def block_mean(x, block_size: int):
    """[B, N, C] -> [B, ceil(N / block_size), C] f32 mean over the valid tokens of each block."""
    b, n, c = x.shape
    nb = -(-n // block_size)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * block_size - n), (0, 0)))
    sums = xp.reshape(b, nb, block_size, c).sum(axis=2)
    sizes = jnp.minimum(block_size, n - jnp.arange(nb) * block_size).astype(jnp.float32)
    return sums / sizes[None, :, None]


def select_mlp_features(
    scores, top_keys: float, random_keys: float, multiple_of: int, *, key=None, impl: str | None = None
):
    """Feature sets per row block from scores [B, NB, F] (docs/algorithm.md §2.2-2.3).

    Keeps the round(top_keys * F) highest scores of each row (an exact per-row threshold) OR
    Bernoulli(random_keys); counts rounded up to ``multiple_of`` (capped at F) with the
    lowest-numbered unselected features as padding. Returns (indices [B, NB, F], counts [B, NB]).
    ``impl`` "pallas"/"interpret" runs the one-kernel threshold + compaction of
    ``pallas_kernels.mlp_selection`` (2x faster than top_k on the H100; it also keeps exact ties at
    the threshold); "reference" (the default off GPU) uses ``lax.top_k``.
    """
    if getattr(scores, "ndim", None) != 3:
        raise ValueError(f"scores must be [B, NB, F], got shape {getattr(scores, 'shape', None)}")
    f = scores.shape[-1]
    keep = mlp_feature_count(top_keys, f)
    extra = None
    if random_keys > 0:
        if key is None:
            raise ValueError("key (a PRNG key) is required when mlp.random_keys > 0")
        extra = jax.random.bernoulli(key, random_keys, scores.shape)
    impl = resolve_impl(impl)
    if impl != "reference":
        return mlp_selection.select_top_features(scores, keep, multiple_of, extra=extra, impl=impl)
    indices, counts, _ = _mlp_feature_sets(scores, keep, extra, multiple_of)
    return indices, counts


def mlp_feature_sets(scores, top_keys: float, random_keys: float, multiple_of: int, *, key=None):
    """``select_mlp_features``'s reference path (``lax.top_k``) plus the features a sparse step recomputes:
    (indices [B, NB, F], counts [B, NB], listed [B, NB, F] bool: the features in ``indices[..., :counts]``, the
    selected ones and their padding), ``listed`` without an index-to-mask scatter."""
    if getattr(scores, "ndim", None) != 3:
        raise ValueError(f"scores must be [B, NB, F], got shape {getattr(scores, 'shape', None)}")
    extra = None
    if random_keys > 0:
        if key is None:
            raise ValueError("key (a PRNG key) is required when mlp.random_keys > 0")
        extra = jax.random.bernoulli(key, random_keys, scores.shape)
    return _mlp_feature_sets(scores, mlp_feature_count(top_keys, scores.shape[-1]), extra, multiple_of)


def _mlp_feature_sets(scores, keep: int, extra, multiple_of: int):
    mask = topk_mask(scores, keep)
    if extra is not None:
        mask = mask | extra
    sel = mask_to_indices(mask, multiple_of)
    return sel.indices, sel.counts, _listed_columns(mask, sel.indices, sel.counts)
