"""Many devices through JAX's own SPMD: a ("cfg", "sequence") mesh, the shardings of Chipmunk's caches, and
Ulysses sequence parallelism for the attention ops (docs/architecture.md §6).

Sequence parallel, Ulysses style (as xDiT's USP and DeepSpeed-Ulysses): between attentions the tokens are
sharded along the mesh's "sequence" axis; an attention op receives q, k, v token-sharded, trades the token
shard for a head shard with one ``all_to_all`` each (every device then holds ``heads / P`` heads over the
whole sequence), runs the SAME single-device op (dense, dense + column sums, selection, column-sparse
kernels) on its local heads, and trades back with one more ``all_to_all``. Chipmunk's attention caches are
per head, so they live head-sharded and never move: out_cache [B, N, H, D] on its head axis, the LSE, counts,
indices and packed masks [B, H, ...] on theirs. Per-token MLP caches live token-sharded (the per-128-token
feature selection stays local when every shard holds whole blocks).

Nothing here is a communication layer of our own: ``jax.shard_map`` with ``jax.lax.all_to_all`` over a
``jax.sharding.Mesh``; a multi-host run builds the same mesh after ``jax.distributed.initialize()``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from chipmunk_jax.attention import AttentionCache
from chipmunk_jax.cache import ModelCache, StepCache
from chipmunk_jax.mlp import MLPCache
from chipmunk_jax.validation import positive_int

__all__ = [
    "CFG",
    "SEQUENCE",
    "make_mesh",
    "check_heads",
    "check_tokens",
    "sequence_padding",
    "attention_cache_spec",
    "mlp_cache_spec",
    "cfg_size",
    "cache_shardings",
    "step_cache_shardings",
    "sampler_cache_shardings",
    "token_spec",
    "ulysses_attention",
    "token_local",
    "replicate",
    "per_device_bytes",
]

CFG = "cfg"
SEQUENCE = "sequence"


def make_mesh(*, sequence: int = 1, cfg: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (cfg, sequence) mesh over ``devices`` (default: every device JAX sees, all hosts together)."""
    sequence = positive_int("sequence", sequence)
    cfg = positive_int("cfg", cfg)
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != sequence * cfg:
        raise ValueError(f"a mesh of cfg={cfg} x sequence={sequence} needs {sequence * cfg} devices, got "
                         f"{len(devices)}: pass devices=jax.devices()[:{sequence * cfg}] or other axis sizes")
    return Mesh(np.asarray(devices, dtype=object).reshape(cfg, sequence), (CFG, SEQUENCE))


def _sequence_size(mesh: Mesh) -> int:
    if not isinstance(mesh, Mesh) or SEQUENCE not in mesh.shape:
        raise TypeError(f"mesh must be a Mesh from parallel.make_mesh (axes {CFG!r}, {SEQUENCE!r}), got {mesh!r}")
    return int(mesh.shape[SEQUENCE])


def check_heads(model: str, heads: int, mesh: Mesh) -> None:
    """Ulysses gives every device ``heads / P`` whole heads: ``heads`` must divide by the sequence axis."""
    size = _sequence_size(mesh)
    if heads % size:
        raise ValueError(f"{model} has {heads} attention heads, not divisible by the mesh's sequence axis of size "
                         f"{size}: pick a sequence size that divides {heads}")


def check_tokens(what: str, tokens: int, mesh: Mesh, *, multiple: int = 1) -> None:
    """``tokens`` split into equal shards of whole ``multiple``-token blocks along the sequence axis."""
    size = _sequence_size(mesh)
    if tokens % (size * multiple):
        unit = f"{size} x {multiple}-token blocks" if multiple > 1 else f"{size} shards"
        raise ValueError(f"{what}: {tokens} tokens do not split into {unit} of the mesh's sequence axis "
                         f"(size {size})")


def sequence_padding(tokens: int, mesh: Mesh, *, multiple: int = 1) -> int:
    """How many tokens to append so ``tokens`` split into equal shards of whole ``multiple``-token blocks along
    the sequence axis (a model masks them: HunyuanVideo appends masked text tokens)."""
    unit = _sequence_size(mesh) * multiple
    return -tokens % unit


def token_spec(ndim: int, axis: int = 1) -> P:
    """PartitionSpec of an array whose ``axis`` is the token axis, sharded along "sequence"."""
    return P(*[SEQUENCE if i == axis else None for i in range(ndim)])


def _leading(layer_axis: bool, branch) -> tuple:
    """The spec entries of a cache's leading axes: the CFG branch axis (``branch``: its mesh axis name or None
    for a branch axis kept whole, ``False`` for no branch axis), then the block stack's layer axis."""
    return (() if branch is False else (branch,)) + ((None,) if layer_axis else ())


def _spec(x, axis: int, lead: tuple):
    """PartitionSpec of ``x`` whose ``axis`` (counted after the ``lead`` axes) is on "sequence"."""
    return None if x is None else P(*lead, *[SEQUENCE if i == axis else None for i in range(x.ndim - len(lead))])


def attention_cache_spec(cache: AttentionCache, *, layer_axis: bool = False, branch=False) -> AttentionCache:
    """The PartitionSpecs of an ``AttentionCache``: every field on its head axis (out_cache [B, N, H, D] on axis 2,
    the rest [B, H, ...] on axis 1); ``layer_axis``: the fields carry a leading layer axis (a block stack);
    ``branch``: a CFG branch axis before it, on that mesh axis (``CFG``) or whole (None)."""
    lead = _leading(layer_axis, branch)
    return AttentionCache(lse=_spec(cache.lse, 1, lead), counts=_spec(cache.counts, 1, lead),
                          out_cache=_spec(cache.out_cache, 2, lead), indices=_spec(cache.indices, 1, lead),
                          mask_bits=_spec(cache.mask_bits, 1, lead))


def mlp_cache_spec(cache: MLPCache, *, layer_axis: bool = False, branch=False) -> MLPCache:
    """The PartitionSpecs of an ``MLPCache``: every field on its token (or token-block) axis: act_cache [B, F, N]
    on axis 2, out_cache [B, N, C], blockmean_cache / indices [B, NB, F] and counts [B, NB] on axis 1 (leading
    axes as ``attention_cache_spec``)."""
    lead = _leading(layer_axis, branch)
    return MLPCache(act_cache=_spec(cache.act_cache, 2, lead), out_cache=_spec(cache.out_cache, 1, lead),
                    blockmean_cache=_spec(cache.blockmean_cache, 1, lead), indices=_spec(cache.indices, 1, lead),
                    counts=_spec(cache.counts, 1, lead))


def cfg_size(mesh: Mesh) -> int:
    """The size of the mesh's "cfg" axis (2: the CFG branches run side by side)."""
    _sequence_size(mesh)
    return int(mesh.shape[CFG])


def _branch_axis(mesh: Mesh, branches: bool):
    return False if not branches else (CFG if cfg_size(mesh) == 2 else None)


def _named(mesh: Mesh, specs):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def cache_shardings(cache, mesh: Mesh, *, branches: bool = False):
    """``NamedSharding``s of a ``ModelCache`` (block stacks with a leading layer axis): attention caches
    head-sharded, MLP caches token-sharded, the static mask and eligible groups replicated. ``branches``: the
    cache holds the two CFG branches on a leading axis (``cache.stack_branches``), sharded over "cfg" when the
    mesh's cfg axis is 2, else whole on every device."""
    if not isinstance(cache, ModelCache):
        raise TypeError(f"cache must be a ModelCache, got {type(cache).__name__}")
    branch = _branch_axis(mesh, branches)
    shared = lambda x: None if x is None else NamedSharding(mesh, P(*_leading(False, branch)))  # noqa: E731
    return ModelCache(
        attention=tuple(None if c is None else _named(mesh, attention_cache_spec(c, layer_axis=True, branch=branch))
                        for c in cache.attention),
        mlp=tuple(None if c is None else _named(mesh, mlp_cache_spec(c, layer_axis=True, branch=branch))
                  for c in cache.mlp),
        static_mask_bits=shared(cache.static_mask_bits), eligible=shared(cache.eligible))


def step_cache_shardings(step_cache, mesh: Mesh, *, branches: bool = False):
    """``NamedSharding``s of a ``StepCache``: the stored hidden state [B, N, D] on its token axis (when N splits
    evenly over "sequence", else whole), ``valid`` replicated; a CFG branch axis as ``cache_shardings``."""
    lead = _leading(False, _branch_axis(mesh, branches))
    hidden = step_cache.hidden
    even = hidden.shape[len(lead) + 1] % _sequence_size(mesh) == 0
    return StepCache(hidden=NamedSharding(mesh, _spec(hidden, 1 if even else -1, lead)),
                     valid=NamedSharding(mesh, P(*lead)))


def sampler_cache_shardings(cache, step_cache, mesh: Mesh, *, branches: bool = False):
    """``(cache_shardings, step_cache_shardings)`` of the sampler's carried state (``cache`` None: the dense
    model keeps none)."""
    return (None if cache is None else cache_shardings(cache, mesh, branches=branches),
            step_cache_shardings(step_cache, mesh, branches=branches))


def _to_heads(x):
    """Token-sharded [B, N/P, H, D] -> head-sharded [B, N, H/P, D] (inside shard_map)."""
    return jax.lax.all_to_all(x, SEQUENCE, split_axis=2, concat_axis=1, tiled=True)


def _to_tokens(x):
    """Head-sharded [B, N, H/P, D] -> token-sharded [B, N/P, H, D] (inside shard_map)."""
    return jax.lax.all_to_all(x, SEQUENCE, split_axis=1, concat_axis=2, tiled=True)


def ulysses_attention(op: Callable, mesh: Mesh, cache: AttentionCache | None, *, replicated=()) -> Callable:
    """``op(q, k, v, cache, *replicated) -> (out, new cache)`` (one layer, single-device, any step kind) as a
    sequence-parallel op over ``mesh``: ``(q, k, v, cache, *replicated) -> (out, new cache)`` with q, k, v, out
    [B, N, H, D] token-sharded, the cache head-sharded (``attention_cache_spec``) and the ``replicated`` extra
    arguments (static mask, eligible groups; None entries pass through) on every device. ``cache`` gives the
    cache's structure (None: the op keeps none and returns None)."""
    qkv = token_spec(4)
    present = [i for i, x in enumerate(replicated) if x is not None]

    def extras(given):
        full = [None] * len(replicated)
        for i, x in zip(present, given):
            full[i] = x
        return full

    if cache is None:  # a dense op: no cache crosses the map
        def local(q, k, v, *extra):
            out, _ = op(_to_heads(q), _to_heads(k), _to_heads(v), None, *extras(extra))
            return _to_tokens(out)

        mapped = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, *[P()] * len(present)), out_specs=qkv,
                               check_vma=False)
        return lambda q, k, v, cache, *extra: (mapped(q, k, v, *[extra[i] for i in present]), None)

    cache_spec = attention_cache_spec(cache)

    def local(q, k, v, cache, *extra):
        out, new = op(_to_heads(q), _to_heads(k), _to_heads(v), cache, *extras(extra))
        return _to_tokens(out), new

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, cache_spec, *[P()] * len(present)),
                           out_specs=(qkv, cache_spec), check_vma=False)
    return lambda q, k, v, cache, *extra: mapped(q, k, v, cache, *[extra[i] for i in present])


def token_local(op: Callable, mesh: Mesh, cache: MLPCache | None, *, ndim: int = 3,
                layer_axis: bool = False) -> Callable:
    """``op(x, weights, cache, *replicated) -> (y, new cache)`` of a per-token layer (the MLP) run on each device's
    token shard: x and y [B, N, C] token-sharded, ``weights`` and the rest replicated, the cache token-sharded
    (``mlp_cache_spec``; ``layer_axis``: a stack of layer caches)."""
    spec = token_spec(ndim)
    cache_spec = None if cache is None else mlp_cache_spec(cache, layer_axis=layer_axis)

    def local(x, weights, cache, *replicated):
        return jax.shard_map(op, mesh=mesh, in_specs=(spec, P(), cache_spec) + (P(),) * len(replicated),
                             out_specs=(spec, cache_spec), check_vma=False)(x, weights, cache, *replicated)

    return local


def replicate(tree, mesh: Mesh | None):
    """``tree`` whole on every device of ``mesh`` (as is without one): for small tables every device reads in
    full (RoPE tables in Chipmunk's token order), which XLA would otherwise shard and gather back each step."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P()))


def per_device_bytes(x) -> int:
    """Bytes one device holds of a (sharded) array: its first addressable shard's."""
    shard = x.addressable_shards[0].data
    return math.prod(shard.shape) * shard.dtype.itemsize
