"""Fast MLP feature selection (SPEC §2.2-2.3): per-row top-k by an exact k-th-value threshold, one kernel.

The original (SPEC §2.3, §10.9) sorts only the first 1024 features of each row and keeps those at or above
the value at rank int(1024 * sparsity): a sampled threshold, so the kept fraction varies per row. Here the
threshold is the exact k-th largest score of the whole row, found by a 32-step bisection on the scores'
bit patterns (order-preserving int32 keys), so each row keeps exactly k features (more only on exact
ties at the threshold). The same program then ORs in the random features, compacts with two prefix sums
and writes the index list: selected features ascending, then the unselected ones ascending as padding
(the layout of chipmunk_jax.selection.mask_to_indices with capacity F), and counts rounded up to
``multiple_of`` and capped at F. One program per row; no sort, no XLA top_k.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["select_top_features", "select_top_features_reference"]

_INT_MIN = -(2**31)
_IMPLS = ("pallas", "interpret", "reference")


def _sortable_key(bits):
    """int32 float bit patterns -> int32 keys with the floats' order (negative floats reversed)."""
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _select_kernel(scores_ref, extra_ref, indices_ref, counts_ref, *, num_features, keep, multiple_of, width):
    row = pl.program_id(0)
    cols = jnp.arange(width, dtype=jnp.int32)
    valid = cols < num_features
    window = pl.ds(0, width)
    scores = plgpu.load(scores_ref.at[row, window], mask=valid, other=0.0)
    keys = _sortable_key(jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32))

    # Greedy bit-by-bit search, in the biased (unsigned) order, of the largest t with
    # #{key >= t} >= keep: the keep-th largest key. (t ^ INT_MIN) maps the biased value back to int32.
    def bit_step(i, t):
        cand = t | jax.lax.shift_left(jnp.int32(1), 31 - i)
        n_ge = jnp.sum((valid & (keys >= (cand ^ jnp.int32(_INT_MIN)))).astype(jnp.int32))
        return jnp.where(n_ge >= keep, cand, t)

    threshold = jax.lax.fori_loop(0, 32, bit_step, jnp.int32(0)) ^ jnp.int32(_INT_MIN)
    chosen = valid & (keys >= threshold) if keep > 0 else jnp.zeros((width,), jnp.bool_)
    if extra_ref is not None:
        chosen = chosen | (valid & (plgpu.load(extra_ref.at[row, window], mask=valid, other=0) != 0))
    n_sel = jnp.sum(chosen.astype(jnp.int32))
    rest = valid & ~chosen
    slot = jnp.where(
        chosen,
        jnp.cumsum(chosen.astype(jnp.int32)) - 1,
        n_sel + jnp.cumsum(rest.astype(jnp.int32)) - 1,
    )
    plgpu.store(indices_ref.at[row, jnp.where(valid, slot, num_features)], cols, mask=valid)
    padded = jnp.minimum((n_sel + multiple_of - 1) // multiple_of * multiple_of, num_features)
    counts_ref[...] = jnp.full((1,), padded, jnp.int32)


def _check(scores, keep, multiple_of, extra):
    if getattr(scores, "ndim", None) is None or scores.ndim < 1:
        raise ValueError(f"scores must be an array [..., F], got {getattr(scores, 'shape', None)}")
    if scores.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise TypeError(f"scores must be a float array, got {scores.dtype}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep must be a non-negative integer, got {keep!r}")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be a positive integer, got {multiple_of!r}")
    if extra is not None:
        if getattr(extra, "shape", None) != scores.shape:
            raise ValueError(f"extra must have the shape of scores {scores.shape}, got {getattr(extra, 'shape', None)}")
        if extra.dtype != jnp.bool_:
            raise TypeError(f"extra must be a bool mask, got {extra.dtype}")


def select_top_features_reference(scores, keep: int, multiple_of: int, *, extra=None):
    """Pure-jnp twin: scores >= the keep-th largest score of the row, OR extra; same index layout."""
    f = scores.shape[-1]
    keep = min(keep, f)
    s = scores.astype(jnp.float32)
    if keep == 0:
        chosen = jnp.zeros(s.shape, jnp.bool_)
    else:
        kth = jnp.sort(s, axis=-1)[..., f - keep]
        chosen = s >= kth[..., None]
    if extra is not None:
        chosen = chosen | extra
    n_sel = jnp.sum(chosen, axis=-1, dtype=jnp.int32)
    slot = jnp.where(
        chosen,
        jnp.cumsum(chosen, axis=-1, dtype=jnp.int32) - 1,
        n_sel[..., None] + jnp.cumsum(~chosen, axis=-1, dtype=jnp.int32) - 1,
    )
    # slot is a permutation of each row: invert it with a stable argsort.
    indices = jnp.argsort(slot, axis=-1).astype(jnp.int32)
    counts = jnp.minimum(-(-n_sel // multiple_of) * multiple_of, f).astype(jnp.int32)
    return indices, counts


def select_top_features(
    scores, keep: int, multiple_of: int, *, extra=None, impl: str | None = None, num_warps: int = 8
):
    """Per row of scores [..., F]: the ``keep`` highest scores (exact threshold) OR ``extra`` (bool, e.g. a
    Bernoulli mask of random features). Returns (indices [..., F] int32, counts [...] int32): selected
    features ascending, then unselected ascending; counts = min(ceil(selected / multiple_of) * multiple_of, F).
    """
    _check(scores, keep, multiple_of, extra)
    if num_warps not in (4, 8, 16, 32):
        raise ValueError(f"num_warps must be 4, 8, 16 or 32, got {num_warps!r}")
    if impl is None:
        impl = "pallas" if jax.default_backend() == "gpu" else "reference"
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS} or None, got {impl!r}")
    if impl == "reference":
        return select_top_features_reference(scores, keep, multiple_of, extra=extra)
    lead, f = scores.shape[:-1], scores.shape[-1]
    rows = math.prod(lead)
    flat = scores.reshape(rows, f)
    width = max(16, 1 << (f - 1).bit_length())
    kernel = functools.partial(
        _select_kernel, num_features=f, keep=min(keep, f), multiple_of=multiple_of, width=width
    )
    whole = pl.BlockSpec((rows, f), lambda r: (0, 0))
    args = [flat]
    in_specs = [whole]
    if extra is not None:
        args.append(extra.reshape(rows, f).astype(jnp.int8))
        in_specs.append(whole)
    else:
        kernel = functools.partial(_drop_extra, kernel)
    indices, counts = pl.pallas_call(
        kernel,
        grid=(rows,),
        in_specs=in_specs,
        out_specs=[whole, pl.BlockSpec((1,), lambda r: (r,))],
        out_shape=[jax.ShapeDtypeStruct((rows, f), jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=impl == "interpret",
        name="chipmunk_mlp_select",
    )(*args)
    return indices.reshape(*lead, f), counts.reshape(lead)


def _drop_extra(kernel, scores_ref, indices_ref, counts_ref):
    return kernel(scores_ref, None, indices_ref, counts_ref)
