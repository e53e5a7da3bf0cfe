"""Sparse-delta MLP (docs/algorithm.md §2): fc1 -> GELU(tanh) -> fc2 with activation and output caches.

    full step:   A = gelu(x W1 + b1);  Y = A W2 + b2;  caches <- A (feature-major), Y, block means
    sparse step: per 128-token row block m, features S_m with the largest |fc1(mean x_m) - cached|
                 A[f, i] <- gelu(x_i W1[:, f] + b1[f]) for f in S_m; Y += (A_new - A_old) W2[S_m]

Invariant after any step: out_cache == act_cache^T W2 + b2 (up to rounding).

Weights: ``MLPWeights`` holds W1 as [C, F] (default) or, with the static flag ``w1_transposed=True``, as
[F, C]. Store [F, C] for the Pallas path (the fc1 kernel gathers W1 rows); [C, F] still works but the sparse
steps then transpose W1 on every call (~0.07 ms for FLUX's 3072 x 12288 on the H100).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from chipmunk_jax import memory, selection
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.pallas_kernels import mlp as kernels
from chipmunk_jax.pallas_kernels import mlp_selection
from chipmunk_jax.pallas_kernels.attention import resolve_impl
from chipmunk_jax.pallas_kernels.mlp_reference import gelu_tanh
from chipmunk_jax.schedule import MLPStep, dispatch
from chipmunk_jax.validation import check_bool, positive_int

__all__ = ["MLPWeights", "MLPCache", "init_mlp_cache", "sparse_delta_mlp", "dense_mlp"]

_HI = jax.lax.Precision.HIGHEST


@struct.dataclass
class MLPWeights:
    """MLP weights: w1, b1 [F], w2 [F, C_out], b2 [C_out] or None (FLUX single blocks add the shared
    proj_out bias once, with the attention half, instead of twice as the original; docs/algorithm.md §10.2).

    w1 layout: [C, F] by default (Flax Dense kernel). With ``w1_transposed=True`` (a static pytree field,
    part of the treedef, not traced) w1 is stored [F, C] (torch's Linear.weight layout): the layout the
    Pallas fc1 kernel gathers rows from, so the sparse step never transposes W1 per call; the dense and
    selection matmuls read either layout through einsum (a dot_general contraction, no transposed copy).
    Convert once at load time, e.g. ``MLPWeights(w1=kernel.T, b1=..., w2=..., b2=..., w1_transposed=True)``
    (or ``weights.with_w1_transposed()``).
    """

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array | None = None
    w1_transposed: bool = struct.field(pytree_node=False, default=False)

    @property
    def hidden_features(self) -> int:
        return self.w1.shape[0] if self.w1_transposed else self.w1.shape[1]

    def with_w1_transposed(self) -> "MLPWeights":
        """The same weights with w1 stored [F, C] (one transpose, at load time)."""
        if self.w1_transposed:
            return self
        return self.replace(w1=jnp.asarray(self.w1.T), w1_transposed=True)


@struct.dataclass
class MLPCache:
    """Cache of one MLP layer.

    act_cache:       [B, F, N] post-activation cache, feature-major (a feature gather is a row gather).
    out_cache:       [B, N, C_out] output cache (b2 included).
    blockmean_cache: [B, NB, F] f32 block means of the pre-activation, the selection baseline.
    indices:         [B, NB, F] int32 feature sets per row block; counts [B, NB] int32.
    """

    act_cache: jax.Array
    out_cache: jax.Array
    blockmean_cache: jax.Array
    indices: jax.Array
    counts: jax.Array


def init_mlp_cache(
    config: ChipmunkConfig,
    *,
    batch: int,
    seq_len: int,
    in_features: int,
    hidden_features: int,
    out_features: int,
    dtype=jnp.bfloat16,
) -> MLPCache:
    del in_features  # part of the signature so call sites read like the layer they cache
    for name, value in (
        ("batch", batch), ("seq_len", seq_len), ("hidden_features", hidden_features), ("out_features", out_features)
    ):
        positive_int(name, value)
    nb = -(-seq_len // config.mlp.block_size)
    return MLPCache(
        act_cache=jnp.zeros((batch, hidden_features, seq_len), dtype),
        out_cache=jnp.zeros((batch, seq_len, out_features), dtype),
        blockmean_cache=jnp.zeros((batch, nb, hidden_features), jnp.float32),
        indices=jnp.zeros((batch, nb, hidden_features), jnp.int32),
        counts=jnp.zeros((batch, nb), jnp.int32),
    )


def _matmul(x, w):
    return jnp.einsum("...c,cf->...f", x, w, precision=_HI, preferred_element_type=jnp.float32)


def _fc1(x, weights: MLPWeights, feature_major: bool = False):
    """x @ W1 in f32 for either W1 layout ([F, C] is contracted on its last axis: no transposed copy).

    ``feature_major``: [B, F, N] instead of [B, N, F], the act cache's layout straight from the GEMM (cuBLAS writes
    either layout at the same cost), so a full step does not transpose its activations for the cache (a separate
    pass, 4.5 ms of each FLUX refresh step on the H100: benchmarks/archive/RESULTS-2026-11-23-to-2026-12-03.md,
    2026-11-25)."""
    w = "fc" if weights.w1_transposed else "cf"
    if feature_major:
        return jnp.einsum(f"{w},bnc->bfn", weights.w1, x, precision=_HI, preferred_element_type=jnp.float32)
    return jnp.einsum(f"...c,{w}->...f", x, weights.w1, precision=_HI, preferred_element_type=jnp.float32)


def _bias(weights: MLPWeights, width: int):
    return jnp.zeros((width,), jnp.float32) if weights.b2 is None else weights.b2.astype(jnp.float32)


def dense_mlp(x, weights: MLPWeights):
    """gelu_tanh(x W1 + b1) W2 + b2 with f32 accumulation; returns x's dtype."""
    a = gelu_tanh(_fc1(x, weights) + weights.b1.astype(jnp.float32))
    y = _matmul(a.astype(x.dtype), weights.w2) + _bias(weights, weights.w2.shape[1])
    return y.astype(x.dtype)


def _check_inputs(x, weights: MLPWeights, cache: MLPCache, config: ChipmunkConfig, weights_layer, cache_layer):
    if not isinstance(config, ChipmunkConfig):
        raise TypeError(f"config must be a ChipmunkConfig, got {type(config).__name__}")
    if not isinstance(weights, MLPWeights):
        raise TypeError(f"weights must be MLPWeights, got {type(weights).__name__}")
    check_bool("weights.w1_transposed", weights.w1_transposed)
    if not isinstance(cache, MLPCache):
        raise TypeError(f"cache must be an MLPCache, got {type(cache).__name__}")
    w_stacked, cache_stacked = weights.w1.ndim == 3, cache.act_cache.ndim == 4
    if w_stacked and weights.b2 is not None and weights.b2.ndim != 2:
        raise ValueError(f"stacked weights need b2 stacked too ([L, C_out]), got shape {weights.b2.shape}")
    if cache_stacked:
        held = {name: getattr(cache, name).shape[0] for name in ("blockmean_cache", "indices", "counts")}
        if set(held.values()) != {cache.act_cache.shape[0]}:
            raise ValueError(f"a stacked MLPCache has every field on one leading layer axis of "
                             f"{cache.act_cache.shape[0]} layers, got {held}")
    # the kernels' checks of one layer (and of the layer indices against the stacks)
    shapes, _, _ = kernels._layer_shapes(weights_layer, cache_layer, weights.w1, weights.b1, weights.w2,
                                         cache.act_cache, cache.out_cache)
    one = lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype) if cache_stacked else a  # noqa: E731
    indices, counts, blockmean = one(cache.indices), one(cache.counts), one(cache.blockmean_cache)
    kernels._check_mlp_args(x, *shapes, indices, counts, config.mlp.block_size, weights.w1_transposed)
    c_out = shapes[2].shape[1]
    b2_shape = None if weights.b2 is None else weights.b2.shape[int(w_stacked):]
    if b2_shape is not None and b2_shape != (c_out,):
        raise ValueError(f"b2 must have shape ({c_out},), got {b2_shape}")
    if blockmean.shape != indices.shape:
        raise ValueError(f"cache.blockmean_cache has shape {blockmean.shape}, expected {indices.shape}")


def _layer_weights(weights: MLPWeights, layer) -> MLPWeights:
    """One layer of stacked weights (a dynamic slice: the XLA paths' GEMMs read it)."""
    if weights.w1.ndim == 2:
        return weights
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), weights)


def _block_preactivation(x, weights: MLPWeights, block_size: int):
    """fc1 of each row block's mean token (== block mean of fc1(x), by linearity), f32.

    The means are rounded to x's dtype so that bf16 models run this small product on bf16 inputs
    with f32 accumulation (an f32 copy of W1 made it ~3x slower than its floor on the H100). XLA's einsum
    reads either W1 layout; on the H100 (FLUX double block) block means + this product take ~42 us of
    device time, near the ~30 us floor of one pass over W1 and x (a Pallas kernel for it was slower)."""
    means = selection.block_mean(x, block_size).astype(x.dtype)
    return _fc1(means, weights) + weights.b1.astype(jnp.float32)


def sparse_delta_mlp(
    x, weights: MLPWeights, cache: MLPCache, step_kind, config: ChipmunkConfig, *, key=None, impl: str | None = None,
    weights_layer=None, cache_layer=None,
):
    """One Chipmunk MLP call. x: [B, N, C]. step_kind: an MLPStep (static) or a traced int32.

    key: PRNG key for the random features (mlp.random_keys > 0) on steps that re-select.
    impl: "pallas" | "interpret" | "triton" | "triton_interpret" | "reference" | None (the kernels' default:
      pallas_kernels.mlp.resolve_mlp_impl). "triton*" runs the delta kernels of mlp_triton. The kernel paths
      select with mlp_selection.select_from_preactivation (scores, top-k and the block-mean baseline update
      in one kernel) and run the fc1/fc2 delta kernels; weights.w1_transposed=True avoids a per-call W1
      transpose there (see MLPWeights).
    weights_layer / cache_layer: for weights (every field, w1 [L, ...]) and / or a cache (every field,
      act_cache [L', B, F, N]) stacked on a leading layer axis, as a scan over blocks holds them: the entries
      this call uses (int32 scalars, may be traced). A stacked cache comes back whole with its entry updated;
      the Triton delta kernels read and update the stacks in place (pallas_kernels.mlp.sparse_mlp_delta).
    Returns (y [B, N, C_out] in x's dtype, new cache).
    """
    _check_inputs(x, weights, cache, config, weights_layer, cache_layer)
    m = config.mlp
    kernel_impl = impl  # the delta kernels also have a Triton implementation; selection maps it to Pallas
    impl = resolve_impl(impl)
    stacked_weights = weights
    weights = _layer_weights(weights, weights_layer)  # what the XLA paths read
    cache_stacked = cache.act_cache.ndim == 4

    def get(cache, field):  # this layer's entry of a cache field
        value = getattr(cache, field)
        return jax.lax.dynamic_index_in_dim(value, cache_layer, keepdims=False) if cache_stacked else value

    def put(cache, **fields):  # the cache with this layer's entries of ``fields`` replaced
        if cache_stacked:
            fields = {k: jax.lax.dynamic_update_index_in_dim(getattr(cache, k), v.astype(getattr(cache, k).dtype),
                                                             cache_layer, 0) for k, v in fields.items()}
        return cache.replace(**fields)

    def always_dense(cache):
        return dense_mlp(x, weights), cache

    def dense(cache):
        a_t = gelu_tanh(_fc1(x, weights, feature_major=True) + weights.b1.astype(jnp.float32)[:, None])
        y = jnp.einsum("bfn,fo->bno", a_t.astype(x.dtype), weights.w2, precision=_HI,
                       preferred_element_type=jnp.float32) + _bias(weights, weights.w2.shape[1])
        new = put(cache, act_cache=a_t.astype(cache.act_cache.dtype), out_cache=y.astype(cache.out_cache.dtype),
                  blockmean_cache=_block_preactivation(x, weights, m.block_size))
        return y.astype(x.dtype), new

    def delta(cache, indices, counts):
        w = stacked_weights
        act, out = kernels.sparse_mlp_delta(
            x, w.w1, w.b1, w.w2, cache.act_cache, cache.out_cache, indices, counts,
            block_size=m.block_size, impl=kernel_impl, w1_transposed=w.w1_transposed,
            weights_layer=weights_layer if w.w1.ndim == 3 else None, cache_layer=cache_layer if cache_stacked else None,
        )
        y = jax.lax.dynamic_index_in_dim(out, cache_layer, keepdims=False) if cache_stacked else out
        return y.astype(x.dtype), put(cache.replace(act_cache=act, out_cache=out), indices=indices, counts=counts)

    def sparse_select(cache):
        z_blocks = _block_preactivation(x, weights, m.block_size)
        if impl != "reference":
            # One kernel: scores |z - baseline|, exact top-k (+ random), index lists and the baseline update
            # (no scores array, no index-to-mask scatter). Same sets as the reference path except exact ties.
            extra = None
            if m.random_keys > 0:
                if key is None:
                    raise ValueError("key (a PRNG key) is required when mlp.random_keys > 0")
                extra = jax.random.bernoulli(key, m.random_keys, z_blocks.shape)
            keep = selection.mlp_feature_count(m.top_keys, weights.hidden_features)
            indices, counts, baseline = mlp_selection.select_from_preactivation(
                z_blocks, get(cache, "blockmean_cache"), keep, m.counts_multiple_of, extra=extra, impl=impl
            )
            return delta(put(cache, blockmean_cache=baseline), indices, counts)
        baseline = get(cache, "blockmean_cache")
        scores = jnp.abs(z_blocks - baseline)
        indices, counts, recomputed = selection.mlp_feature_sets(
            scores, m.top_keys, m.random_keys, m.counts_multiple_of, key=key
        )
        return delta(put(cache, blockmean_cache=jnp.where(recomputed, z_blocks, baseline)), indices, counts)

    def sparse_reuse(cache):
        return delta(cache, get(cache, "indices"), get(cache, "counts"))

    branches = (always_dense, dense, sparse_select, sparse_reuse)
    # a host-resident cache (cache.offload_layer_caches) visits the device for this call
    return memory.with_device_cache(lambda c: dispatch(step_kind, branches, c, MLPStep), cache)
