"""Fast MLP feature selection (docs/algorithm.md §2.2-2.3): per-row top-k by an exact k-th-value threshold, one kernel.

The original (docs/algorithm.md §2.3, §10.9) sorts only the first 1024 features of each row and keeps those at or above
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

from chipmunk_jax.validation import non_negative_int, positive_int

__all__ = [
    "select_top_features", "select_top_features_reference", "select_from_preactivation",
    "select_from_preactivation_reference",
]

_INT_MIN = -(2**31)
_IMPLS = ("pallas", "interpret", "reference")


def _sortable_key(bits):
    """int32 float bit patterns -> int32 keys with the floats' order (negative floats reversed)."""
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _select_kernel(
    scores_ref, base_ref, extra_ref, indices_ref, counts_ref, new_base_ref, *, num_features, keep, multiple_of, width
):
    """One row: exact keep-th largest score by bisection, OR extra, compaction. With base_ref (fused
    scoring), scores_ref holds the new block pre-activations z: scores = |z - base|, and the new baseline
    where(recomputed, z, base) is written to new_base_ref (recomputed = the first counts index slots)."""
    row = pl.program_id(0)
    cols = jnp.arange(width, dtype=jnp.int32)
    valid = cols < num_features
    window = pl.ds(0, width)
    scores = plgpu.load(scores_ref.at[row, window], mask=valid, other=0.0).astype(jnp.float32)
    if base_ref is not None:
        z = scores
        base = plgpu.load(base_ref.at[row, window], mask=valid, other=0.0).astype(jnp.float32)
        scores = jnp.abs(z - base)
    keys = _sortable_key(jax.lax.bitcast_convert_type(scores, jnp.int32))

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
    if new_base_ref is not None:
        new_base = jnp.where(slot < padded, z, base)
        plgpu.store(new_base_ref.at[row, window], new_base.astype(new_base_ref.dtype), mask=valid)


def _check(scores, keep, multiple_of, extra):
    if getattr(scores, "ndim", None) is None or scores.ndim < 1:
        raise ValueError(f"scores must be an array [..., F], got {getattr(scores, 'shape', None)}")
    if scores.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise TypeError(f"scores must be a float array, got {scores.dtype}")
    non_negative_int("keep", keep)
    positive_int("multiple_of", multiple_of)
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
    impl = _resolve(impl, num_warps)
    if impl == "reference":
        return select_top_features_reference(scores, keep, multiple_of, extra=extra)
    indices, counts, _ = _select_call(scores, None, keep, multiple_of, extra, impl, num_warps)
    return indices, counts


def select_from_preactivation_reference(z, base, keep: int, multiple_of: int, *, extra=None):
    """Pure-jnp twin of select_from_preactivation."""
    scores = jnp.abs(z.astype(jnp.float32) - base.astype(jnp.float32))
    indices, counts = select_top_features_reference(scores, keep, multiple_of, extra=extra)
    # recomputed[f] <=> f sits in the first counts slots of its row's index list.
    pos = jnp.argsort(indices, axis=-1)  # inverse permutation: slot of each feature
    recomputed = pos < counts[..., None]
    new_base = jnp.where(recomputed, z.astype(base.dtype), base)
    return indices, counts, new_base


def select_from_preactivation(
    z, base, keep: int, multiple_of: int, *, extra=None, impl: str | None = None, num_warps: int = 8
):
    """Fused MLP selection step (docs/algorithm.md §2.2): scores = |z - base| per row of [..., F] (z: the new block
    pre-activations, base: the cached ones), then select_top_features on them, and the new baseline
    where(recomputed, z, base) with recomputed = the features in the first counts slots of the index list
    (selected + padding: exactly the (block, feature) pairs fc1 recomputes). One kernel: no scores array,
    no index-to-mask scatter. Returns (indices, counts, new_base in base's dtype); under jit donate base
    (the Pallas path writes the new baseline in place).
    """
    _check(z, keep, multiple_of, extra)
    if getattr(base, "shape", None) != z.shape:
        raise ValueError(f"base must have the shape of z {z.shape}, got {getattr(base, 'shape', None)}")
    if base.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise TypeError(f"base must be a float array, got {base.dtype}")
    impl = _resolve(impl, num_warps)
    if impl == "reference":
        return select_from_preactivation_reference(z, base, keep, multiple_of, extra=extra)
    return _select_call(z, base, keep, multiple_of, extra, impl, num_warps)


def _resolve(impl, num_warps):
    if num_warps not in (4, 8, 16, 32):
        raise ValueError(f"num_warps must be 4, 8, 16 or 32, got {num_warps!r}")
    if impl is None:
        impl = "pallas" if jax.default_backend() == "gpu" else "reference"
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS} or None, got {impl!r}")
    return impl


def _select_call(scores, base, keep, multiple_of, extra, impl, num_warps):
    lead, f = scores.shape[:-1], scores.shape[-1]
    rows = math.prod(lead)
    width = max(16, 1 << (f - 1).bit_length())
    kernel = functools.partial(
        _select_kernel, num_features=f, keep=min(keep, f), multiple_of=multiple_of, width=width
    )
    whole = pl.BlockSpec((rows, f), lambda r: (0, 0))
    names = ["scores", "base", "extra"]
    args = {"scores": scores.reshape(rows, f)}
    if base is not None:
        args["base"] = base.reshape(rows, f)
    if extra is not None:
        args["extra"] = extra.reshape(rows, f).astype(jnp.int8)
    present = [name for name in names if name in args]

    def body(*refs):
        ins = dict(zip(present, refs[: len(present)]))
        outs = refs[len(present):]
        new_base_ref = outs[2] if base is not None else None
        return kernel(ins["scores"], ins.get("base"), ins.get("extra"), outs[0], outs[1], new_base_ref)

    out_specs = [whole, pl.BlockSpec((1,), lambda r: (r,))]
    out_shape = [jax.ShapeDtypeStruct((rows, f), jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.int32)]
    aliases = {}
    if base is not None:
        out_specs.append(whole)
        out_shape.append(jax.ShapeDtypeStruct((rows, f), base.dtype))
        aliases = {present.index("base"): 2}
    outs = pl.pallas_call(
        body,
        grid=(rows,),
        in_specs=[whole] * len(present),
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=impl == "interpret",
        name="chipmunk_mlp_select",
    )(*[args[name] for name in present])
    indices, counts = outs[0].reshape(*lead, f), outs[1].reshape(lead)
    new_base = outs[2].reshape(*lead, f) if base is not None else None
    return indices, counts, new_base

