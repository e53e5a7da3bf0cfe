"""The Chipmunk side of a model call, shared by FLUX, HunyuanVideo and Wan (docs/architecture.md §4).

``ChipmunkRun.start`` is the prelude every model runs before its blocks: it checks the config and the
step plan, builds a fresh cache when none is given, checks a given one against the model, unpacks the
video static mask and fixes the token order. ``ops(layer, attention_cache, mlp_cache)`` then gives a block
its attention / MLP op over that layer's caches (``models.block_stack`` picks them out of the stacked
caches inside its scan and writes back the caches the ops return), so the new cache comes out of the call
as an explicit value. Layers that are dense at every step get no op: they run the model's own dense path
(cuDNN attention on GPUs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import parallel
from chipmunk_jax.attention import sparse_delta_attention
from chipmunk_jax.cache import ModelCache, sparse_layer_range
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.mlp import MLPWeights, sparse_delta_mlp
from chipmunk_jax.models.mmdit import dense_attention
from chipmunk_jax.reorder import tile_permutation, voxel_permutation
from chipmunk_jax.schedule import StepPlan
from chipmunk_jax.selection import unpack_mask

__all__ = ["ChipmunkRun", "WeightStacks", "BlockStacks", "check_chipmunk", "token_permutation", "permute_tokens",
           "unpermute_tokens", "check_model_cache"]

# A model's block stacks as (first global layer, number of blocks), in stack order: FLUX ((0, 19), (19, 38)).
BlockStacks = tuple[tuple[int, int], ...]


def check_chipmunk(model: str, chipmunk, *, reorder_kinds: tuple[str, ...], mlp: bool = True) -> None:
    """``chipmunk`` is a ChipmunkConfig this model can run: one of its token orders, MLP sparsity if it has it."""
    if not isinstance(chipmunk, ChipmunkConfig):
        raise TypeError(f"chipmunk must be a ChipmunkConfig or None, got {type(chipmunk).__name__}")
    if chipmunk.reorder.kind not in reorder_kinds:
        raise ValueError(f"{model} supports chipmunk.reorder.kind in {reorder_kinds}, got {chipmunk.reorder.kind!r}")
    if chipmunk.mlp.enabled and not mlp:
        raise ValueError(f"{model} runs Chipmunk on attention only (as the original): set mlp.enabled=False")
    if chipmunk.reorder.kind == "none" and chipmunk.attention.local_voxels > 0:
        raise ValueError("attention.local_voxels > 0 needs reorder.kind='voxels' (the window is over voxel order)")


def token_permutation(chipmunk: ChipmunkConfig | None, grid) -> np.ndarray | None:
    """Raster -> Chipmunk token order for a token ``grid`` ((h, w) tiles or (f, h, w) voxels), or None."""
    if chipmunk is None or chipmunk.reorder.kind == "none":
        return None
    r = chipmunk.reorder
    if r.kind == "tiles":
        return tile_permutation(*grid, r.tile, r.subtile)
    return voxel_permutation(*grid, voxel=r.voxel)


def permute_tokens(x, perm, axis: int = 1):
    """``x`` with its token axis put in ``perm`` order (identity for None)."""
    return x if perm is None else jnp.take(x, jnp.asarray(perm), axis=axis)


def unpermute_tokens(x, perm, axis: int = 1):
    """The inverse of ``permute_tokens``: Chipmunk order back to raster order."""
    return x if perm is None else jnp.take(x, jnp.asarray(np.argsort(perm)), axis=axis)


@dataclasses.dataclass(frozen=True)
class ChipmunkRun:
    """Chipmunk's state for one model call: the config, the step plan, the cache and the static mask."""

    chipmunk: ChipmunkConfig
    plan: StepPlan
    cache: ModelCache
    key: jax.Array | None
    kernel_impl: str | None
    static_mask: jax.Array | None  # [G, P] bool, unpacked once per call
    prefix: int | None  # Chipmunk runs on the first ``prefix`` tokens; the rest attend densely (HunyuanVideo)
    attention_impl: str | None
    mesh: Any = None  # a parallel.make_mesh mesh: the ops run sequence-parallel (Ulysses attention, token-local MLP)

    @classmethod
    def start(cls, chipmunk, plan, cache, key, *, stacks: BlockStacks, init_cache: Callable[[], ModelCache],
              kernel_impl=None, prefix: int | None = None, attention_impl=None, num_tokens: int,
              mesh=None) -> "ChipmunkRun":
        """The prelude: ``plan`` required, ``cache`` from ``init_cache()`` when None, else checked against the
        model's block ``stacks``.

        ``num_tokens``: the tokens Chipmunk's attention runs on (the static mask's columns)."""
        if not isinstance(plan, StepPlan):
            raise TypeError("plan is required with chipmunk: pass plan=chipmunk_jax.schedule.step_plan(chipmunk, "
                            f"step), got {type(plan).__name__}")
        if cache is None:
            cache = init_cache()
        check_model_cache(cache, chipmunk, stacks, num_tokens)
        static_mask = None
        if cache.static_mask_bits is not None:
            static_mask = unpack_mask(cache.static_mask_bits, num_tokens)
        return cls(chipmunk, plan, cache, key, kernel_impl, static_mask, prefix, attention_impl, mesh)

    def _layer_keys(self, layer):
        if self.key is None:
            return None, None
        return tuple(jax.random.split(jax.random.fold_in(self.key, layer)))

    def ops(self, layer, attention_cache=None, mlp_cache=None, *, mlp_cache_layer=None,
            weight_stacks: "WeightStacks | None" = None) -> dict[str, Any]:
        """``{"attention_op", "mlp_op"}`` of global layer ``layer`` (an int, or traced inside a scan) over that
        layer's caches (each op returns ``(out, new cache)``); an op whose cache is None is left out (the layer
        runs the dense path).

        ``mlp_cache_layer``: ``mlp_cache`` is a whole stack (every field [L', ...]) and this layer's entry is
        ``mlp_cache_layer``; the op then returns the whole stack updated. ``weight_stacks``: the stacks behind
        the block's param slices, so the MLP kernels read the stacked weights in place."""
        ops = {}
        attn_key, mlp_key = self._layer_keys(layer)
        if attention_cache is not None:
            ops["attention_op"] = self._attention_op(attention_cache, attn_key)
        if mlp_cache is not None:
            ops["mlp_op"] = self._mlp_op(mlp_cache, mlp_key, mlp_cache_layer, weight_stacks)
        return ops

    def _attention_op(self, layer_cache, key):
        def op(q, k, v, layer_cache, static_mask, eligible):
            p = q.shape[1] if self.prefix is None else self.prefix
            out, slot = sparse_delta_attention(
                q[:, :p], k[:, :p], v[:, :p], layer_cache, self.plan.attention, self.chipmunk,
                key=key, static_mask=static_mask, eligible=eligible, impl=self.kernel_impl,
            )
            if p < q.shape[1]:  # the queries past the prefix (padded text) attend densely to the prefix
                tail = dense_attention(q[:, p:], k[:, :p], v[:, :p], implementation=self.attention_impl)
                out = jnp.concatenate([out, tail.astype(out.dtype)], axis=1)
            return out, slot

        shared = (self.static_mask, self.cache.eligible)
        if self.mesh is not None:  # every device runs the op on its heads over the whole sequence
            op = parallel.ulysses_attention(op, self.mesh, layer_cache, replicated=shared)
        return lambda q, k, v: op(q, k, v, layer_cache, *shared)

    def _mlp_op(self, layer_cache, key, cache_layer, weight_stacks):
        def op(x, weights, layer_cache, weights_layer):
            return sparse_delta_mlp(x, weights, layer_cache, self.plan.mlp, self.chipmunk, key=key,
                                    impl=self.kernel_impl, weights_layer=weights_layer, cache_layer=cache_layer)

        if self.mesh is not None:  # each device's whole token blocks select their own features
            op = parallel.token_local(op, self.mesh, layer_cache, layer_axis=cache_layer is not None)

        def mlp_op(x, w1, b1, w2, b2, w1_transposed=False):
            given = (w1, b1, w2, b2)
            stacks = None if weight_stacks is None or not w1_transposed else weight_stacks.find(given, x.dtype)
            if stacks is not None:  # the kernels index the stacks: no per-layer copy of W1 / W2
                return op(x, MLPWeights(*stacks, w1_transposed=True), layer_cache, weight_stacks.index)
            cast = lambda w: None if w is None else w.astype(x.dtype)  # noqa: E731
            return op(x, MLPWeights(*map(cast, given), w1_transposed=w1_transposed), layer_cache, None)

        return mlp_op


@dataclasses.dataclass(frozen=True)
class WeightStacks:
    """The stacked params behind one scan iteration's param slices (``models.block_stack``): ``find`` maps arrays a
    block passes to an op back to their whole stacks, so a kernel can take the stack and ``index`` instead of the
    slice, which XLA would copy out for a custom call (a dynamic slice is materialized for every kernel operand)."""

    by_slice: dict  # id(slice) -> (slice, stack): the slice is kept so its id stays its own
    index: Any

    @classmethod
    def of(cls, slices, stacks, index) -> "WeightStacks":
        pairs = zip(jax.tree_util.tree_leaves(slices), jax.tree_util.tree_leaves(stacks))
        return cls({id(s): (s, full) for s, full in pairs}, index)

    def find(self, arrays, dtype):
        """The stacks of ``arrays`` (None entries stay None), or None when any is not a slice of this iteration's
        params or not already ``dtype`` (then the caller casts the slices)."""
        stacks = []
        for a in arrays:
            if a is None:
                stacks.append(None)
                continue
            hit = self.by_slice.get(id(a))
            if hit is None or hit[0] is not a or hit[1].dtype != dtype:
                return None
            stacks.append(hit[1])
        return tuple(stacks)


def check_model_cache(cache, chipmunk: ChipmunkConfig, stacks: BlockStacks, num_tokens: int) -> None:
    """A ``ModelCache`` of this model's block ``stacks`` under ``chipmunk`` (one CFG branch) over ``num_tokens``
    tokens: one entry per stack, holding a leading layer axis over the stack's sparse layers."""
    if not isinstance(cache, ModelCache):
        raise TypeError("cache must be the ModelCache of the model's init_cache (one CFG branch: use "
                        f"chipmunk_jax.cache.select_branch on stacked caches), got {type(cache).__name__}")
    if len(cache.attention) != len(stacks) or len(cache.mlp) != len(stacks):
        raise ValueError(f"cache has {len(cache.attention)} attention and {len(cache.mlp)} MLP block stacks, the model "
                         f"{len(stacks)}: rebuild it with the model's init_cache")
    slots = [slot for slot in cache.attention if slot is not None]
    stacked = (slots and slots[0].lse.ndim != 4) or (cache.static_mask_bits is not None
                                                     and cache.static_mask_bits.ndim != 2)
    if stacked:
        raise ValueError("cache holds several CFG branches: pass one branch's cache "
                         "(chipmunk_jax.cache.select_branch(caches, i))")
    for what, section, slots in (("attention", chipmunk.attention, cache.attention), ("MLP", chipmunk.mlp, cache.mlp)):
        for s, (first, count) in enumerate(stacks):
            expected = len(sparse_layer_range(section, first, count))
            leaves = jax.tree_util.tree_leaves(slots[s])
            held = leaves[0].shape[0] if leaves else 0
            if held != expected or any(x.shape[0] != held for x in leaves):
                raise ValueError(f"cache block stack {s} holds {held} {what} layers, this model and chipmunk config "
                                 f"{expected}: rebuild it with the model's init_cache")
    if cache.static_mask_bits is not None and cache.static_mask_bits.shape[-1] != -(-num_tokens // 8):
        raise ValueError(f"cache static mask covers {cache.static_mask_bits.shape[-1] * 8} tokens, not {num_tokens}: "
                         "not this token grid's cache (rebuild it with the model's init_cache)")
