"""Public sparse-delta MLP op (docs/algorithm.md §2.2) with the same ``impl`` switch as the attention ops.

impl: None -> "triton" on a Hopper GPU when those kernels take the inputs (bf16/f16, block_size 64/128/256, C and
C_out multiples of 16; H200, FLUX double block 70%: full step 0.475 ms vs 0.490 ms Pallas, 2026-12-03 in
benchmarks/archive/RESULTS-2026-11-23-to-2026-12-03.md), else "pallas" on GPU, "reference" elsewhere;
"pallas" / "interpret": mlp_pallas's kernels compiled / in interpret mode; "triton" / "triton_interpret":
mlp_triton's kernels (TMA token tiles; Hopper, bf16/f16) compiled / in Triton's interpreter; "reference": the
pure-jnp twin in mlp_reference.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from chipmunk_jax.pallas_kernels import mlp_pallas, triton_call
from chipmunk_jax.pallas_kernels import mlp_reference as ref
from chipmunk_jax.pallas_kernels.attention import check_concrete_indices, resolve_impl
from chipmunk_jax.validation import check_bool, positive_int

__all__ = ["sparse_mlp_delta"]

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check_layer(name: str, layer, stacks: dict):
    """``layer`` indexes the leading axis the arrays of ``stacks`` share (checked when concrete)."""
    sizes = {k: a.shape[0] if getattr(a, "ndim", 0) else None for k, a in stacks.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the stacked operands must share their leading layer axis, got {sizes}")
    if layer is None:
        raise ValueError(f"{', '.join(stacks)} carry a leading layer axis (shapes "
                         f"{[tuple(a.shape) for a in stacks.values()]}): pass {name}= (the entry to use)")
    dtype = jnp.result_type(layer)
    if jnp.ndim(layer) != 0 or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer scalar, got {dtype} of shape {jnp.shape(layer)}")
    num_layers = next(iter(sizes.values()))
    if not isinstance(layer, jax.core.Tracer) and not 0 <= int(layer) < num_layers:
        raise ValueError(f"{name} must be in [0, {num_layers}), got {int(layer)}")


def _layer_shapes(weights_layer, cache_layer, w1, b1, w2, act_cache, out_cache):
    """(w1, b1, w2, act_cache, out_cache) with one layer's shapes, whether the weights are stacked, whether the
    caches are (a leading layer axis, told apart by rank), after checking the layer indices against the stacks."""
    w_stacked = getattr(w1, "ndim", None) == 3
    cache_stacked = getattr(act_cache, "ndim", None) == 4
    for name, layer, stacked, stacks in (("weights_layer", weights_layer, w_stacked, dict(w1=w1, b1=b1, w2=w2)),
                                         ("cache_layer", cache_layer, cache_stacked,
                                          dict(act_cache=act_cache, out_cache=out_cache))):
        if stacked:
            _check_layer(name, layer, stacks)
        elif layer is not None:
            raise ValueError(f"{name}= is for {' / '.join(stacks)} stacked on a leading layer axis, got shapes "
                             f"{[tuple(getattr(a, 'shape', ())) for a in stacks.values()]}")
    one = lambda a, stacked: jax.ShapeDtypeStruct(a.shape[1:], a.dtype) if stacked else a  # noqa: E731
    return ((one(w1, w_stacked), one(b1, w_stacked), one(w2, w_stacked), one(act_cache, cache_stacked),
             one(out_cache, cache_stacked)), w_stacked, cache_stacked)


def _check_mlp_args(x, w1, b1, w2, act_cache, out_cache, indices, counts, block_size, w1_transposed=False):
    for name, arr, ndim in (
        ("x", x, 3), ("w1", w1, 2), ("b1", b1, 1), ("w2", w2, 2),
        ("act_cache", act_cache, 3), ("out_cache", out_cache, 3),
    ):
        if getattr(arr, "ndim", None) != ndim:
            raise ValueError(f"{name} must have rank {ndim}, got shape {getattr(arr, 'shape', None)}")
        if arr.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float array, got {arr.dtype}")
    b, n, c = x.shape
    w1_transposed = check_bool("w1_transposed", w1_transposed)
    f = w1.shape[0] if w1_transposed else w1.shape[1]
    c_out = w2.shape[1]
    if (w1.shape[1] if w1_transposed else w1.shape[0]) != c:
        layout = "[F, C] (w1_transposed=True)" if w1_transposed else "[C, F]"
        raise ValueError(f"w1 must be {layout} with C = {c} (x's features), got {w1.shape}")
    if b1.shape != (f,):
        raise ValueError(f"b1 must have shape ({f},), got {b1.shape}")
    if w2.shape[0] != f:
        raise ValueError(f"w2 must be [F, C_out] with F = {f}, got {w2.shape}")
    if act_cache.shape != (b, f, n):
        raise ValueError(f"act_cache must be [B, F, N] = {(b, f, n)} (feature-major), got {act_cache.shape}")
    if out_cache.shape != (b, n, c_out):
        raise ValueError(f"out_cache must be [B, N, C_out] = {(b, n, c_out)}, got {out_cache.shape}")
    block_size = positive_int("block_size", block_size)
    nb = -(-n // block_size)
    if getattr(indices, "ndim", None) != 3 or indices.shape[:2] != (b, nb):
        raise ValueError(f"indices must be [B, NB, K] with (B, NB) = {(b, nb)}, got {getattr(indices, 'shape', None)}")
    if indices.dtype != jnp.int32:
        raise TypeError(f"indices must be int32, got {indices.dtype}")
    if getattr(counts, "shape", None) != (b, nb):
        raise ValueError(f"counts must be [B, NB] = {(b, nb)}, got {getattr(counts, 'shape', None)}")
    if counts.dtype != jnp.int32:
        raise TypeError(f"counts must be int32, got {counts.dtype}")
    check_concrete_indices(indices, counts, f, items="the hidden feature count F")


def _triton_unsupported(x, w1, w2, block_size: int, interpret: bool) -> str | None:
    reason = triton_call.platform_unsupported(interpret)  # first: importing mlp_triton needs the triton package
    if reason:
        return reason
    from chipmunk_jax.pallas_kernels import mlp_triton  # local: it imports triton, an optional dependency

    return mlp_triton.unsupported_reason(x, w1, w2, block_size, interpret=interpret)


def resolve_mlp_impl(impl, x, w1, w2, block_size: int, tiles=None) -> str:
    """The implementation that runs: impl itself, or for None the platform default (see the module docstring);
    None with an mlp_pallas.MlpTiles as tiles keeps the Pallas kernels those tiles are for.
    Asking for "triton" / "triton_interpret" with inputs those kernels cannot take is an error that says why."""
    if impl is None and resolve_impl(None) == "pallas" and not isinstance(tiles, mlp_pallas.MlpTiles):
        return "triton" if _triton_unsupported(x, w1, w2, block_size, interpret=False) is None else "pallas"
    if impl in ("triton", "triton_interpret"):
        reason = _triton_unsupported(x, w1, w2, block_size, interpret=impl == "triton_interpret")
        if reason:
            raise ValueError(f"impl={impl!r} cannot run these inputs: {reason}")
        return impl
    return resolve_impl(impl)


def sparse_mlp_delta(
    x, w1, b1, w2, act_cache, out_cache, indices, counts, *, block_size: int = 128, impl: str | None = None,
    w1_transposed: bool = False, tiles=None, weights_layer=None, cache_layer=None,
):
    """Sparse MLP delta step; returns the updated (act_cache, out_cache). See mlp_reference.

    w1_transposed: w1 is given as [F, C] (the layout the Pallas fc1 kernel gathers rows from); with the
      default [C, F] the Pallas path transposes it on every call (one extra read + write of w1).
    tiles: an mlp_pallas.MlpTiles for the Pallas paths (None: mlp_pallas.DEFAULT_TILES), an
      mlp_triton.TritonMlpConfig for the Triton paths (None: mlp_triton.DEFAULT_CONFIG).
    weights_layer / cache_layer: integer scalars (may be traced) for weights stacked on a leading layer axis
      (w1 [L, ...], b1 [L, F], w2 [L, F, C_out]) and / or caches (act_cache [L', B, F, N], out_cache
      [L', B, N, C_out]), as a ``lax.scan`` over blocks holds them (the two stacks may differ: a model's caches
      cover only its sparse layers): those entries are used, and stacked caches come back whole with their entry
      updated. The Triton kernels index the stacks in place (a dynamic slice feeding a kernel is copied out, and
      the new cache copied back: ~0.35 ms per FLUX layer on the H100); the other paths slice.
    Under jax.jit, donate act_cache and out_cache: the Pallas kernels update them in place.
    indices [B, NB, K] int32 in [0, F), counts [B, NB] int32 in [0, K]: concrete (not traced) ones are checked,
    a count outside [0, K] or an index outside [0, F) among a block's first ``count`` entries raises ValueError
    (entries past the count are padding). Under jit nothing is checked: an out-of-range index or count makes the
    result undefined (the reference wraps negative indices and drops large ones; the kernels may touch another
    feature or memory out of bounds).
    """
    shapes, w_stacked, cache_stacked = _layer_shapes(weights_layer, cache_layer, w1, b1, w2, act_cache, out_cache)
    _check_mlp_args(x, *shapes, indices, counts, block_size, w1_transposed)
    impl = resolve_mlp_impl(impl, x, shapes[0], shapes[2], block_size, tiles)
    if impl in ("triton", "triton_interpret"):
        from chipmunk_jax.pallas_kernels import mlp_triton  # local: it imports triton (optional)

        if tiles is None:
            tiles = mlp_triton.DEFAULT_CONFIG
        elif not isinstance(tiles, mlp_triton.TritonMlpConfig):
            raise TypeError(f"tiles must be an mlp_triton.TritonMlpConfig or None for impl={impl!r}, "
                            f"got {type(tiles).__name__}")
        return mlp_triton.sparse_mlp_delta(
            x, w1, b1, w2, act_cache, out_cache, indices, counts, block_size=block_size,
            interpret=impl == "triton_interpret", w1_transposed=w1_transposed, weights_layer=weights_layer,
            cache_layer=cache_layer, config=tiles,
        )
    if w_stacked:
        w1, b1, w2 = (jax.lax.dynamic_index_in_dim(a, weights_layer, keepdims=False) for a in (w1, b1, w2))
    caches = act_cache, out_cache
    if cache_stacked:
        caches = tuple(jax.lax.dynamic_index_in_dim(a, cache_layer, keepdims=False) for a in caches)
    act, out = _one_layer(x, w1, b1, w2, *caches, indices, counts, block_size=block_size, impl=impl,
                          w1_transposed=w1_transposed, tiles=tiles)
    if not cache_stacked:
        return act, out
    return (jax.lax.dynamic_update_index_in_dim(act_cache, act, cache_layer, 0),
            jax.lax.dynamic_update_index_in_dim(out_cache, out, cache_layer, 0))


def _one_layer(x, w1, b1, w2, act_cache, out_cache, indices, counts, *, block_size, impl, w1_transposed, tiles):
    if impl == "reference":
        return ref.sparse_mlp_delta_reference(
            x, w1, b1, w2, act_cache, out_cache, indices, counts, block_size=block_size, w1_transposed=w1_transposed
        )
    if tiles is None:
        tiles = mlp_pallas.DEFAULT_TILES
    elif not isinstance(tiles, mlp_pallas.MlpTiles):
        raise TypeError(f"tiles must be an mlp_pallas.MlpTiles or None for impl={impl!r}, got {type(tiles).__name__}")
    return mlp_pallas.sparse_mlp_delta(
        x, w1, b1, w2, act_cache, out_cache, indices, counts, block_size=block_size,
        interpret=impl == "interpret", w1_transposed=w1_transposed, tiles=tiles,
    )
