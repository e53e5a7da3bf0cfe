"""Cache pytrees: the per-layer caches (re-exported), the ``ModelCache`` every model keeps, the model-level
step cache, CFG branches and host offload.

Caches are plain pytrees (flax.struct dataclasses), carried explicitly through the model call and the sampling
loop: ``forward(params, config, ..., cache=cache, plan=plan) -> ModelOutput(sample, hidden, cache)``. Several CFG
branches (cond / uncond) keep one cache each, stacked on a leading branch axis (or as ``BranchCaches``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from chipmunk_jax.attention import AttentionCache, attention_cache_bytes, init_attention_cache
from chipmunk_jax.memory import to_host
from chipmunk_jax.mlp import MLPCache, init_mlp_cache
from chipmunk_jax.validation import check_int, positive_int

__all__ = [
    "AttentionCache",
    "MLPCache",
    "StepCache",
    "ModelCache",
    "init_attention_cache",
    "init_mlp_cache",
    "init_step_cache",
    "stack_branches",
    "split_branches",
    "BranchCaches",
    "select_branch",
    "update_branch",
    "cache_bytes",
    "attention_cache_bytes",
    "stack_layers",
    "sparse_layer_range",
    "offload_layer_caches",
    "init_stack_cache",
]


@struct.dataclass
class StepCache:
    """Model-level step cache (docs/algorithm.md §4.3): the pre-head hidden state of the last computed step.

    hidden: [B, N, D]; valid: scalar bool, False until a computed step has stored it.
    """

    hidden: jax.Array
    valid: jax.Array


def init_step_cache(*, batch: int, seq_len: int, width: int, dtype=jnp.bfloat16) -> StepCache:
    for name, value in (("batch", batch), ("seq_len", seq_len), ("width", width)):
        positive_int(name, value)
    return StepCache(hidden=jnp.zeros((batch, seq_len, width), dtype), valid=jnp.zeros((), jnp.bool_))


def stack_branches(cache, num_branches: int):
    """One copy of ``cache`` per CFG branch, stacked on a new leading axis."""
    num_branches = positive_int("num_branches", num_branches)
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_branches,) + x.shape), cache)


class BranchCaches(tuple):
    """One cache per CFG branch kept as separate pytrees instead of stacked on a leading axis
    (``split_branches``): taking a branch is Python indexing, not an array slice, so branch caches held
    in host memory (``memory.offload_layer_caches``) are never sliced on the host. The sampler accepts
    either layout."""


jax.tree_util.register_pytree_node(BranchCaches, lambda b: (tuple(b), None), lambda _, kids: BranchCaches(kids))


def split_branches(cache, num_branches: int) -> BranchCaches:
    """``num_branches`` independent copies of ``cache`` (the unstacked twin of ``stack_branches``). Every branch is a
    new copy, as ``stack_branches`` makes new arrays: the sampler donates its caches, and ``cache`` stays usable."""
    num_branches = positive_int("num_branches", num_branches)
    return BranchCaches([jax.tree_util.tree_map(jnp.copy, cache) for _ in range(num_branches)])


def select_branch(cache, branch):
    """The cache of one branch (``branch`` may be traced for stacked caches; a Python int for BranchCaches)."""
    if isinstance(cache, BranchCaches):
        return cache[_branch_index(cache, branch)]
    return jax.tree_util.tree_map(lambda x: x[branch], cache)


def update_branch(cache, branch, new_branch_cache):
    """``cache`` with branch ``branch`` replaced by ``new_branch_cache``."""
    if isinstance(cache, BranchCaches):
        i = _branch_index(cache, branch)
        return BranchCaches(new_branch_cache if j == i else c for j, c in enumerate(cache))
    return jax.tree_util.tree_map(lambda full, one: full.at[branch].set(one), cache, new_branch_cache)


def _branch_index(cache: BranchCaches, branch) -> int:
    """A BranchCaches index: a concrete int (a traced one cannot pick a Python list entry)."""
    return check_int("branch of BranchCaches (a Python int)", branch, minimum=0, maximum=len(cache) - 1)


def cache_bytes(cache) -> int:
    """Bytes held by any cache pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))


@struct.dataclass
class ModelCache:
    """The Chipmunk caches of one model call (one CFG branch), the same type for every model.

    Each model runs its blocks as stacks of same-shaped blocks (FLUX: double then single blocks; HunyuanVideo:
    double then single; Wan: one stack) under ``lax.scan``, and its caches are stacked the same way:
    attention: one entry per block stack, in the model's stack order: an ``AttentionCache`` whose arrays carry a
      leading layer axis over the stack's sparse layers (those at or above first_n_dense_layers, counted in the
      model's global layer order), or None when no layer of the stack ever leaves the dense path.
    mlp: the same for the MLP layers (``MLPCache`` or None).
    static_mask_bits: uint8 [G, ceil(P / 8)] bit-packed static column mask of video models (local voxel
      window, text keys, static random keys; docs/algorithm.md §1.6) over the P tokens Chipmunk runs on,
      drawn once per generation by the model's ``init_cache``; None when the model or config has none.
    eligible: bool [G], the query groups that get dynamic top-k columns besides the static mask (or None).
    """

    attention: tuple
    mlp: tuple
    static_mask_bits: jax.Array | None = None
    eligible: jax.Array | None = None

    def with_stack(self, stack: int, attention=None, mlp=None) -> "ModelCache":
        """This cache with block stack ``stack``'s attention / MLP caches replaced (None keeps them)."""
        attn = self.attention if attention is None else _replaced(self.attention, stack, attention)
        mlps = self.mlp if mlp is None else _replaced(self.mlp, stack, mlp)
        return self.replace(attention=attn, mlp=mlps)

    def layer(self, stack: int, index: int) -> tuple:
        """(attention, mlp) cache of the ``index``-th sparse layer of block stack ``stack`` (None where the stack
        keeps none); for inspection and tests, the models index inside their scan."""
        pick = lambda slot: None if slot is None else jax.tree_util.tree_map(lambda x: x[index], slot)  # noqa: E731
        return pick(self.attention[stack]), pick(self.mlp[stack])


def stack_layers(layer_cache, num_layers: int):
    """``num_layers`` copies of one layer's cache stacked on a new leading layer axis (None for 0 layers)."""
    if num_layers == 0 or layer_cache is None:
        return None
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x[None], (num_layers,) + x.shape), layer_cache)


def init_stack_cache(section, first_layer: int, num_layers: int, init_layer_cache):
    """The cache of one block stack under ``section`` (``config.attention`` or ``config.mlp``): one layer's cache
    (``init_layer_cache()``, called only when needed) stacked over the stack's sparse layers; None when every layer
    of the stack is dense."""
    layers = len(sparse_layer_range(section, first_layer, num_layers))
    return stack_layers(init_layer_cache(), layers) if layers else None


def sparse_layer_range(section, first_layer: int, num_layers: int) -> range:
    """The global layer indices of a block stack (``first_layer`` .. +``num_layers``) that ever leave the dense
    path under ``section`` (``config.attention`` or ``config.mlp``): the layers the stack's cache covers."""
    end = first_layer + num_layers
    start = min(max(section.first_n_dense_layers, first_layer), end) if section.enabled else end
    return range(start, end)


def _replaced(slots: tuple, index: int, value) -> tuple:
    return tuple(value if i == index else slot for i, slot in enumerate(slots))


def offload_layer_caches(cache):
    """A ``ModelCache`` (or a ``BranchCaches`` of them: stacked CFG caches would be sliced on the host, split
    them first) with its per-layer caches moved to pinned host memory; shared entries (the static mask) stay
    on the device. Run it outside ``jit`` before sampling; the ops then keep each layer's cache on the host
    and bring it to the device for their own call (``memory.with_device_cache``)."""
    if isinstance(cache, BranchCaches):
        return BranchCaches(offload_layer_caches(branch) for branch in cache)
    if not isinstance(cache, ModelCache):
        raise TypeError(f"cache must be a model cache (the ModelCache of a model's init_cache) or BranchCaches, got "
                        f"{type(cache).__name__}")
    host = lambda slots: tuple(None if slot is None else to_host(slot) for slot in slots)  # noqa: E731
    return cache.replace(attention=host(cache.attention), mlp=host(cache.mlp))
