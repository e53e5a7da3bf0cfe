"""Token reordering (docs/algorithm.md §3): 3-D voxels for video, 2-D tiles for images, and their inverses.

A permutation ``perm`` is an int32 numpy array over raster-order token ids with
``reordered = raster[perm]`` and ``raster = reordered[inverse_permutation(perm)]``. Permutations are
static (they depend only on the token grid), so they are built in numpy and baked into the jit.

Grids that do not divide by the voxel / tile keep the original's tail layout: the main region in
voxel (tile) order, then each tail in raster order (docs/algorithm.md §3.1). For tiles we extend the same rule to
2-D (the original requires divisible grids, where both layouts agree).
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from chipmunk_jax.validation import check_int_tuple, non_negative_int

__all__ = [
    "voxel_permutation",
    "tile_permutation",
    "inverse_permutation",
    "joint_permutation",
    "permute_tokens",
    "permute_rope",
]


def voxel_permutation(frames: int, height: int, width: int, voxel=(4, 6, 8)) -> np.ndarray:
    """Raster (t, h, w) -> voxel order: main voxels (raster over voxels, raster inside), then the tails
    [T':, :, :], [:T', H':, :], [:T', :H', W':] each in raster order (``voxel_chunk_no_padding``)."""
    check_int_tuple("(frames, height, width)", (frames, height, width))
    vt, vh, vw = check_int_tuple("voxel", voxel, length=3)
    ids = np.arange(frames * height * width, dtype=np.int32).reshape(frames, height, width)
    t_main, h_main, w_main = frames // vt * vt, height // vh * vh, width // vw * vw
    main = ids[:t_main, :h_main, :w_main]
    main = main.reshape(t_main // vt, vt, h_main // vh, vh, w_main // vw, vw).transpose(0, 2, 4, 1, 3, 5)
    pieces = [
        main.reshape(-1),
        ids[t_main:, :, :].reshape(-1),
        ids[:t_main, h_main:, :].reshape(-1),
        ids[:t_main, :h_main, w_main:].reshape(-1),
    ]
    return np.concatenate(pieces).astype(np.int32)


def tile_permutation(height: int, width: int, tile: int = 8, subtile: int = 4) -> np.ndarray:
    """Raster (h, w) -> tile order (``ops/patch.py``): tile x tile blocks in raster order, inside each
    the subtile x subtile blocks in raster order, inside those raster. Tails ([H':, :] then [:H', W':])
    follow in raster order."""
    check_int_tuple("(height, width)", (height, width))
    tile, subtile = check_int_tuple("(tile, subtile)", (tile, subtile))
    if tile % subtile:
        raise ValueError(f"tile ({tile}) must be a multiple of subtile ({subtile})")
    ids = np.arange(height * width, dtype=np.int32).reshape(height, width)
    h_main, w_main = height // tile * tile, width // tile * tile
    main = ids[:h_main, :w_main]
    r = tile // subtile
    # (tile row, subtile row, row in subtile, tile col, subtile col, col in subtile)
    main = main.reshape(h_main // tile, r, subtile, w_main // tile, r, subtile).transpose(0, 3, 1, 4, 2, 5)
    pieces = [main.reshape(-1), ids[h_main:, :].reshape(-1), ids[:h_main, w_main:].reshape(-1)]
    return np.concatenate(pieces).astype(np.int32)


def inverse_permutation(perm) -> np.ndarray:
    perm = np.asarray(perm)
    if perm.ndim != 1 or not np.array_equal(np.sort(perm), np.arange(perm.size)):
        raise ValueError("perm must be a 1-D permutation of 0..n-1")
    inv = np.empty_like(perm, dtype=np.int32)
    inv[perm] = np.arange(perm.size, dtype=np.int32)
    return inv


def joint_permutation(image_perm, num_text: int, text_first: bool = True) -> np.ndarray:
    """Permutation over a joint [text; image] (FLUX) or [image; text] (HunyuanVideo) sequence that
    reorders the image tokens only; text positions stay fixed."""
    image_perm = np.asarray(image_perm, np.int32)
    num_text = non_negative_int("num_text", num_text)
    text = np.arange(num_text, dtype=np.int32)
    if text_first:
        return np.concatenate([text, image_perm + num_text])
    return np.concatenate([image_perm, text + image_perm.size])


def permute_tokens(x, perm, axis: int = 1):
    """x[..., perm, ...] along ``axis`` (the sequence axis of [B, S, ...] by default)."""
    perm = np.asarray(perm)
    if x.shape[axis] != perm.size:
        raise ValueError(f"x has {x.shape[axis]} tokens on axis {axis}, perm has {perm.size}")
    return jnp.take(x, jnp.asarray(perm), axis=axis)


def permute_rope(cos, sin, perm, axis: int = 0):
    """Permutes RoPE tables (rows = token positions) exactly as the tokens, so rotating then
    permuting equals permuting the tables and the tokens and then rotating."""
    return permute_tokens(cos, perm, axis), permute_tokens(sin, perm, axis)
