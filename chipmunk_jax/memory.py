"""Where cache arrays live: device memory (the default) or pinned host memory (``jax.memory.Space.Host``).

A layer cache placed on the host (``cache.offload_layer_caches``) stays there between steps; each Chipmunk op
fetches its own layer's cache to the device, runs, and writes the new cache back to the host, so only
one layer's cache occupies device memory at a time (docs/algorithm.md §6.5: HunyuanVideo at 720p keeps ~56 GB of
caches, more than an 80 GB H100 holds beside 24 GiB of weights). The placement is read from the arrays'
abstract values (``jax.typeof(x).memory_space``), so it needs no flag and works under ``jit``.
"""

from __future__ import annotations

import jax

__all__ = ["on_host", "to_device", "to_host", "with_device_cache", "with_device_params"]

_HOST = jax.memory.Space.Host
_DEVICE = jax.memory.Space.Device


def on_host(tree) -> bool:
    """Whether any array of ``tree`` lives in host memory (traced or concrete)."""
    return any(jax.typeof(x).memory_space == _HOST for x in jax.tree_util.tree_leaves(tree))


def to_device(tree):
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, _DEVICE), tree)


def to_host(tree):
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, _HOST), tree)


def with_device_cache(fn, cache):
    """``fn(cache) -> (out, new_cache)`` on the device: a host-resident cache (``offload_layer_caches``) is
    fetched first and the new cache written back to the host; a device cache goes straight through."""
    if not on_host(cache):
        return fn(cache)
    out, new_cache = fn(to_device(cache))
    return out, to_host(new_cache)


def with_device_params(fn, params):
    """``fn(params)``, with host-resident ``params`` (e.g. a Wan 2.2 expert waiting in pinned host memory) copied to
    the device for the call; that copy is freed before this returns (it waits for ``fn``'s work), so the next call's
    params can take its place. Device params go straight through, without waiting."""
    if not on_host(params):
        return fn(params)
    return jax.block_until_ready(fn(to_device(params)))
