"""Blocks of one type stacked on a leading layer axis and run with ``lax.scan`` (docs/architecture.md §2.4).

Every model keeps each block type's params as ONE tree whose arrays carry a leading layer axis (FLUX's
``transformer_blocks`` [19, ...] and ``single_transformer_blocks`` [38, ...]), and runs a stack as a scan:
XLA compiles one block body per stack instead of one per layer, so a 57-block FLUX compiles in seconds
and static step dispatch (one model body per step kind) stays cheap. The Chipmunk caches of a stack are
stacked the same way (``ModelCache``) and carried through the scan: each iteration reads its layer's
cache with a dynamic index and writes the new one back in place.

Layers that differ (below ``first_n_dense_layers``, or with one of the ops off) still run their own code:
the stack is cut into segments where every layer does the same thing (at most three: dense, one op
sparse, both sparse), and each segment is its own scan over a range of the same stacked params (a
dynamic index into the whole stack, so no segment copies weights). No per-layer switch is traced, so a
statically dispatched step has no per-layer host sync on the GPU.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import memory
from chipmunk_jax.cache import sparse_layer_range
from chipmunk_jax.models.chipmunk_ops import ChipmunkRun, WeightStacks

__all__ = ["stack_blocks", "num_blocks", "check_block_stack", "block_at", "scan_blocks"]

Params = dict[str, Any]


def stack_blocks(blocks: Sequence[Params]) -> Params:
    """Same-shaped block param trees (a list, as diffusers' ModuleList) -> one tree with a leading layer axis.
    numpy leaves stay numpy (host memory, for ports); anything else becomes a jax array."""
    blocks = list(blocks)
    if not blocks:
        raise ValueError("stack_blocks needs at least one block")
    leaves = jax.tree_util.tree_leaves(blocks)
    stack = np.stack if all(isinstance(x, np.ndarray) for x in leaves) else jnp.stack
    return jax.tree_util.tree_map(lambda *xs: stack(xs), *blocks)


def num_blocks(stack) -> int:
    """Blocks in a stacked tree (0 for None or an empty tree)."""
    leaves = jax.tree_util.tree_leaves(stack)
    return int(leaves[0].shape[0]) if leaves else 0


def check_block_stack(name: str, stack, expected: int) -> None:
    """``params[name]`` is a stacked tree of ``expected`` blocks, every array with that leading axis."""
    if isinstance(stack, (list, tuple)):
        raise TypeError(f"params[{name!r}] is a list of blocks: blocks are stacked on a leading layer axis (the "
                        "ports and init_params build them so; models.block_stack.stack_blocks(list) converts a list)")
    leaves = jax.tree_util.tree_leaves(stack)
    counts = {int(x.shape[0]) if np.ndim(x) else None for x in leaves} or {0}
    if counts != {expected}:
        raise ValueError(f"params[{name!r}] must hold {expected} blocks stacked on a leading axis, got leading axes "
                         f"{sorted(counts, key=str)}")


def block_at(stack, index):
    """Block ``index`` (an int or traced) of a stacked tree: a dynamic index, no copy of the stack."""
    return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), stack)


def _put_block(stack, index, value):
    return jax.tree_util.tree_map(
        lambda x, v: jax.lax.dynamic_update_index_in_dim(x, v.astype(x.dtype), index, 0), stack, value)


def _segments(run: ChipmunkRun | None, first_layer: int, count: int):
    """(start, stop, attention sparse, mlp sparse, attention offset, mlp offset) over local block indices."""
    if run is None:
        return [(0, count, False, False, 0, 0)]
    attn = sparse_layer_range(run.chipmunk.attention, first_layer, count).start - first_layer
    mlp = sparse_layer_range(run.chipmunk.mlp, first_layer, count).start - first_layer
    cuts = sorted({0, count, attn, mlp})
    return [(a, b, a >= attn, a >= mlp, attn, mlp) for a, b in itertools.pairwise(cuts) if b > a]


def scan_blocks(block: Callable, stack: Params, state, *, first_layer: int, run: ChipmunkRun | None = None,
                stack_index: int = 0, per_layer=None, default_ops: dict | None = None):
    """Runs every block of a stack on ``state``; returns (state, ``run`` with this stack's caches updated in its
    cache, or None without ``run``), so the next stack continues from it.

    ``block(params, per_layer, state, ops) -> (state, (attention cache, mlp cache))`` is one block: ``params``
    and ``per_layer`` (e.g. that block's precomputed modulation; None) are the block's slices, ``ops`` the
    Chipmunk ops of its layer (``ChipmunkRun.ops``; empty on dense layers, whose returned caches are ignored).
    ``first_layer``: the stack's first global layer index (Chipmunk's layer numbering, for first_n_dense_layers
    and the per-layer random keys); ``stack_index``: its entry in ``ModelCache.attention`` / ``.mlp``.
    ``default_ops``: the ops of layers without a Chipmunk op (the sequence-parallel dense attention on a mesh).
    """
    count = num_blocks(stack)
    if count == 0:
        return state, run
    cache = None if run is None else run.cache
    attn_cache = None if run is None else cache.attention[stack_index]
    mlp_cache = None if run is None else cache.mlp[stack_index]
    # The MLP op takes its cache stack whole (its kernels update their layer in place: a layer sliced out for a
    # kernel is a copy, and so is writing it back), unless the caches live on the host (then one layer visits
    # the device per call: memory.with_device_cache).
    whole_mlp_stack = mlp_cache is not None and not memory.on_host(mlp_cache)
    for start, stop, attn_on, mlp_on, attn_offset, mlp_offset in _segments(run, first_layer, count):
        def body(carry, _, attn_on=attn_on, mlp_on=mlp_on, attn_offset=attn_offset, mlp_offset=mlp_offset):
            state, attn_cache, mlp_cache, i = carry
            params = block_at(stack, i)
            ops = dict(default_ops or {})
            if run is not None:
                layer_mlp = None
                if mlp_on:
                    layer_mlp = mlp_cache if whole_mlp_stack else block_at(mlp_cache, i - mlp_offset)
                ops |= run.ops(first_layer + i, block_at(attn_cache, i - attn_offset) if attn_on else None,
                               layer_mlp, mlp_cache_layer=i - mlp_offset if whole_mlp_stack else None,
                               weight_stacks=WeightStacks.of(params, stack, i))
            extra = None if per_layer is None else block_at(per_layer, i)
            state, (new_attn, new_mlp) = block(params, extra, state, ops)
            if attn_on:
                attn_cache = _put_block(attn_cache, i - attn_offset, new_attn)
            if mlp_on:
                mlp_cache = new_mlp if whole_mlp_stack else _put_block(mlp_cache, i - mlp_offset, new_mlp)
            return (state, attn_cache, mlp_cache, i + 1), None

        # The layer index is carried, not scanned over an arange: XLA's dynamic-slice fusion reads a GEMM operand
        # in place only when the slice offset is a function of the loop counter alone (an index read from an
        # iota array is not), otherwise every layer's weights are copied out of the stack before each GEMM.
        carry = (state, attn_cache, mlp_cache, jnp.int32(start))
        (state, attn_cache, mlp_cache, _), _ = jax.lax.scan(body, carry, None, length=stop - start)
    if run is not None:
        run = dataclasses.replace(run, cache=cache.with_stack(stack_index, attn_cache, mlp_cache))
    return state, run
