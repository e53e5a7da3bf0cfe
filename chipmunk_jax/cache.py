"""Cache pytrees: re-exports of the per-layer caches, the model-level step cache, and CFG branches.

Caches are plain pytrees (flax.struct dataclasses), carried explicitly through the model call and
the sampling loop: ``forward(params, inputs, cache, step) -> (output, new_cache)``. Several CFG
branches (cond / uncond) keep one cache each, stacked on a leading branch axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from chipmunk_jax.attention import AttentionCache, attention_cache_bytes, init_attention_cache
from chipmunk_jax.memory import offload_layer_caches
from chipmunk_jax.mlp import MLPCache, init_mlp_cache

__all__ = [
    "AttentionCache",
    "MLPCache",
    "StepCache",
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
    "layer_is_sparse",
    "offload_layer_caches",
]


@struct.dataclass
class StepCache:
    """Model-level step cache (SPEC §4.3): the pre-head hidden state of the last computed step.

    hidden: [B, N, D]; valid: scalar bool, False until a computed step has stored it.
    """

    hidden: jax.Array
    valid: jax.Array


def init_step_cache(*, batch: int, seq_len: int, width: int, dtype=jnp.bfloat16) -> StepCache:
    for name, value in (("batch", batch), ("seq_len", seq_len), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return StepCache(hidden=jnp.zeros((batch, seq_len, width), dtype), valid=jnp.zeros((), jnp.bool_))


def stack_branches(cache, num_branches: int):
    """One copy of ``cache`` per CFG branch, stacked on a new leading axis."""
    if isinstance(num_branches, bool) or not isinstance(num_branches, int) or num_branches < 1:
        raise ValueError(f"num_branches must be a positive integer, got {num_branches!r}")
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_branches,) + x.shape), cache)


class BranchCaches(tuple):
    """One cache per CFG branch kept as separate pytrees instead of stacked on a leading axis
    (``split_branches``): taking a branch is Python indexing, not an array slice, so branch caches held
    in host memory (``memory.offload_layer_caches``) are never sliced on the host. The sampler accepts
    either layout."""


jax.tree_util.register_pytree_node(BranchCaches, lambda b: (tuple(b), None), lambda _, kids: BranchCaches(kids))


def split_branches(cache, num_branches: int) -> BranchCaches:
    """``num_branches`` independent copies of ``cache`` (the unstacked twin of ``stack_branches``)."""
    if isinstance(num_branches, bool) or not isinstance(num_branches, int) or num_branches < 1:
        raise ValueError(f"num_branches must be a positive integer, got {num_branches!r}")
    return BranchCaches([cache] + [jax.tree_util.tree_map(jnp.copy, cache) for _ in range(num_branches - 1)])


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
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < len(cache):
        raise ValueError(f"BranchCaches take a Python int branch in [0, {len(cache)}), got {branch!r}")
    return branch


def layer_is_sparse(section, layer: int) -> bool:
    """Whether sparse-capable layer ``layer`` ever leaves the dense path under ``section``
    (``config.attention`` or ``config.mlp``); layers that never do need no cache slot (None)."""
    return bool(section.enabled) and layer >= section.first_n_dense_layers


def cache_bytes(cache) -> int:
    """Bytes held by any cache pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
