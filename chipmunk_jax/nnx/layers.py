"""Chipmunk layers for your own Flax NNX DiT: ``ChipmunkAttention`` and ``ChipmunkMLP`` take the place of a block's
attention core and MLP, ``make_denoiser`` runs the model in the one-jit sampler (``sampling.make_sampler``).

    block.attention = ChipmunkAttention(num_heads, head_dim, layer=i)       # the core: (q, k, v) -> o
    block.mlp = ChipmunkMLP.from_linears(block.mlp.fc1, block.mlp.fc2, layer=i)   # x -> fc2(gelu_tanh(fc1(x)))
    caches = init_caches(model, chipmunk, batch=1, seq_len=num_tokens, dtype=jnp.float32)
    run = sampling.make_sampler(make_denoiser(model, chipmunk), chipmunk, sigmas)        # one jax.jit
    latents, caches, _ = run(nnx.state(model, nnx.Not(ChipmunkCache)), latents, cond, caches, step_cache, key)

Caches live in the module state (a ``ChipmunkCache`` variable per layer), so the user's blocks stay as they are and
``nnx.state(model, ChipmunkCache)`` is the sampler's explicit cache pytree; the step (config, ``StepPlan``, key) is
set by ``chipmunk_step`` on the per-call module copy the denoiser merges inside the jitted step, so no global holds
it and no ``__call__`` forwards it. Outside a step the layers are the dense layers they replace. Why, and the limits
(token order, static masks, step caching): docs/architecture.md §3.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from chipmunk_jax.attention import init_attention_cache, sparse_delta_attention
from chipmunk_jax.cache import sparse_layer_range
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.mlp import MLPWeights, init_mlp_cache, sparse_delta_mlp
from chipmunk_jax.models.chipmunk_ops import check_chipmunk
from chipmunk_jax.outputs import ModelOutput
from chipmunk_jax.pallas_kernels.attention import dense_attention_output
from chipmunk_jax.sampling import Denoiser
from chipmunk_jax.schedule import StepPlan
from chipmunk_jax.validation import check_number, non_negative_int, positive_int

__all__ = ["ChipmunkCache", "ChipmunkAttention", "ChipmunkMLP", "chipmunk_step", "init_caches", "make_denoiser"]

ACTIVATIONS = ("gelu_tanh",)  # what sparse_delta_mlp computes between fc1 and fc2


class ChipmunkCache(nnx.Cache):
    """One Chipmunk layer's cache: an ``AttentionCache`` / ``MLPCache``, or None (before ``init_caches``, and for a
    layer the config keeps dense: below ``first_n_dense_layers`` or in a disabled section)."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (it holds traced arrays)
class _Step:
    config: ChipmunkConfig
    plan: StepPlan
    key: Any
    kernel_impl: str | None

    def layer_key(self, layer: int, op: int):
        """The key of ``layer``'s attention (op 0) or MLP (op 1), folded as the built-in models fold theirs."""
        return None if self.key is None else jax.random.split(jax.random.fold_in(self.key, layer))[op]


def _check_config(chipmunk) -> None:
    check_chipmunk("the Chipmunk layers (their tokens come in your model's order)", chipmunk, reorder_kinds=("none",))


def _describe(tree) -> str:
    return ", ".join(f"{jax.tree_util.keystr(path, simple=True, separator='.')} {tuple(x.shape)} {x.dtype}"
                     for path, x in jax.tree_util.tree_flatten_with_path(tree)[0])


class _ChipmunkLayer(nnx.Module):
    """What both layers share: their index in the model, their cache variable and the current step."""

    _section: str  # "attention" or "mlp": the config section the layer follows

    def _init_layer(self, layer) -> None:
        self.layer = non_negative_int("layer", layer)
        self.cache = ChipmunkCache(None)
        self.step = None  # a _Step inside chipmunk_step, else None (dense)

    def _name(self) -> str:
        return f"{type(self).__name__}(layer={self.layer})"

    def _sparse_under(self, config: ChipmunkConfig) -> bool:
        return len(sparse_layer_range(getattr(config, self._section), self.layer, 1)) > 0

    def init_cache(self, chipmunk: ChipmunkConfig, *, batch: int, seq_len: int, dtype=jnp.bfloat16):
        """This layer's empty cache under ``chipmunk`` for ``batch`` x ``seq_len`` tokens of ``dtype`` (the compute
        dtype), or None where the config keeps the layer dense. ``init_caches`` sets it for every layer."""
        if not isinstance(chipmunk, ChipmunkConfig):
            raise TypeError(f"chipmunk must be a ChipmunkConfig, got {type(chipmunk).__name__}")
        return self._new_cache(chipmunk, batch, seq_len, dtype) if self._sparse_under(chipmunk) else None

    def _step_cache(self, batch: int, seq_len: int, dtype):
        """The cache the op runs on under the current step, checked against what ``init_cache`` builds for these
        inputs; None: the layer runs dense."""
        cache = self.cache.get_value()
        if self.step is None:
            return None
        hint = f"init_caches(model, chipmunk, batch={batch}, seq_len={seq_len}, dtype=jnp.{jnp.dtype(dtype).name})"
        if not self._sparse_under(self.step.config):
            if cache is not None:
                raise ValueError(f"{self._name()} is dense under this config but holds a cache: it was built for "
                                 f"another config; rebuild the caches with {hint}")
            return None
        if cache is None:
            raise ValueError(f"{self._name()} has no Chipmunk cache: build the caches with {hint} first")
        want = jax.eval_shape(lambda: self._new_cache(self.step.config, batch, seq_len, dtype))
        if jax.tree.map(lambda x: (x.shape, x.dtype), cache) != jax.tree.map(lambda x: (x.shape, x.dtype), want):
            raise ValueError(f"{self._name()}: its cache ({_describe(cache)}) is not the cache of these inputs and "
                             f"config ({_describe(want)}): rebuild the caches with {hint}")
        return cache


class ChipmunkAttention(_ChipmunkLayer):
    """Self-attention core ``(q, k, v) -> o`` on ``[batch, tokens, num_heads, head_dim]`` arrays, the layout of
    ``jax.nn.dot_product_attention``: put it where your block calls its attention core, after its q/k/v projections
    (RoPE and qk-norm applied) and before its output projection.

    Under ``chipmunk_step`` it runs ``attention.sparse_delta_attention`` with the step's plan on its cache (dense,
    dense + column sums, sparse: docs/algorithm.md §1); otherwise, and where the config keeps the layer dense, dense
    softmax attention. ``layer``: the block's index in the model (``first_n_dense_layers`` counts it, the per-layer
    random keys fold it in). ``scale``: the softmax scale (default ``1 / sqrt(head_dim)``). No params.
    """

    _section = "attention"

    def __init__(self, num_heads: int, head_dim: int, *, layer: int, scale: float | None = None):
        self.num_heads = positive_int("num_heads", num_heads)
        self.head_dim = positive_int("head_dim", head_dim)
        self.scale = None if scale is None else check_number("scale", scale, positive=True)
        self._init_layer(layer)

    def _new_cache(self, config, batch, seq_len, dtype):
        return init_attention_cache(config, batch=batch, seq_len=seq_len, heads=self.num_heads,
                                    head_dim=self.head_dim, dtype=dtype)

    def __call__(self, q, k, v):
        """o [batch, tokens, num_heads, head_dim] in q's dtype."""
        expected = f"[batch, tokens, {self.num_heads}, {self.head_dim}] (num_heads, head_dim)"
        for name, x in (("q", q), ("k", k), ("v", v)):
            if getattr(x, "ndim", None) != 4 or tuple(x.shape[2:]) != (self.num_heads, self.head_dim):
                raise ValueError(f"{self._name()}: {name} must be {expected}, got shape {getattr(x, 'shape', None)}")
            if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype != q.dtype:
                raise TypeError(f"{self._name()}: q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, "
                                f"{v.dtype}")
        if not q.shape == k.shape == v.shape:
            raise ValueError(f"{self._name()}: self-attention: q, k, v must have the same shape, got {q.shape}, "
                             f"{k.shape}, {v.shape}")
        cache = self._step_cache(q.shape[0], q.shape[1], q.dtype)
        impl = None if self.step is None else self.step.kernel_impl
        if cache is None:
            return dense_attention_output(q, k, v, scale=self.scale, impl=impl)
        out, cache = sparse_delta_attention(q, k, v, cache, self.step.plan.attention, self.step.config,
                                            key=self.step.layer_key(self.layer, 0), scale=self.scale, impl=impl)
        self.cache.set_value(cache)
        return out


class ChipmunkMLP(_ChipmunkLayer):
    """The MLP ``x -> fc2(gelu_tanh(fc1(x)))`` on ``[batch, tokens, in_features]``, with its weights in two
    ``nnx.Linear`` submodules named ``fc1`` and ``fc2`` (so a dense MLP of that shape and naming loads into it).

    Under ``chipmunk_step`` it runs ``mlp.sparse_delta_mlp`` with the step's plan on its cache (docs/algorithm.md
    §2); otherwise, and where the config keeps the layer dense, ``fc2(gelu_tanh(fc1(x)))`` as the Linear layers
    compute it. ``activation``: ``"gelu_tanh"`` (``jax.nn.gelu(approximate=True)``), the one the sparse-delta op
    computes. ``layer``: as ``ChipmunkAttention``'s. ``from_linears`` wraps an existing pair (no copy).
    """

    _section = "mlp"

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, *, layer: int,
                 activation: str = "gelu_tanh", use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS} (sparse_delta_mlp computes fc1 -> GELU(tanh) "
                             f"-> fc2), got {activation!r}")
        out_features = in_features if out_features is None else out_features
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = nnx.Linear(positive_int("in_features", in_features), positive_int("hidden_features",
                                                                                    hidden_features), **kw)
        self.fc2 = nnx.Linear(hidden_features, positive_int("out_features", out_features), **kw)
        self.activation = activation
        self._init_layer(layer)

    @classmethod
    def from_linears(cls, fc1: nnx.Linear, fc2: nnx.Linear, *, layer: int, activation: str = "gelu_tanh"):
        """The layer around an existing ``fc1`` / ``fc2`` pair (their very variables: no copy, no new draws)."""
        for name, linear in (("fc1", fc1), ("fc2", fc2)):
            if not isinstance(linear, nnx.Linear):
                raise TypeError(f"{name} must be an nnx.Linear, got {type(linear).__name__}")
        if fc1.out_features != fc2.in_features:
            raise ValueError(f"fc1's out_features ({fc1.out_features}) must be fc2's in_features ({fc2.in_features})")
        module = nnx.eval_shape(lambda: cls(fc1.in_features, fc1.out_features, fc2.out_features, layer=layer,
                                            activation=activation, rngs=nnx.Rngs(0)))  # traced: nothing is drawn
        module.fc1, module.fc2 = fc1, fc2
        return module

    def _new_cache(self, config, batch, seq_len, dtype):
        return init_mlp_cache(config, batch=batch, seq_len=seq_len, in_features=self.fc1.in_features,
                              hidden_features=self.fc1.out_features, out_features=self.fc2.out_features, dtype=dtype)

    def _weights(self, dtype) -> MLPWeights:
        """fc1 / fc2 as ``MLPWeights`` (Flax's [in, out] kernels) in the compute dtype; fc1 without a bias adds 0."""
        cast = lambda p: None if p is None else p[...].astype(dtype)  # noqa: E731
        b1 = cast(self.fc1.bias)
        b1 = jnp.zeros((self.fc1.out_features,), dtype) if b1 is None else b1
        return MLPWeights(cast(self.fc1.kernel), b1, cast(self.fc2.kernel), cast(self.fc2.bias))

    def __call__(self, x):
        """y [batch, tokens, out_features] in x's dtype."""
        if getattr(x, "ndim", None) != 3 or x.shape[-1] != self.fc1.in_features:
            raise ValueError(f"{self._name()}: x must be [batch, tokens, {self.fc1.in_features}] (in_features), got "
                             f"shape {getattr(x, 'shape', None)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{self._name()}: x must be a float array, got {x.dtype}")
        cache = self._step_cache(x.shape[0], x.shape[1], x.dtype)
        if cache is None:
            return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))
        out, cache = sparse_delta_mlp(x, self._weights(x.dtype), cache, self.step.plan.mlp, self.step.config,
                                      key=self.step.layer_key(self.layer, 1), impl=self.step.kernel_impl)
        self.cache.set_value(cache)
        return out


def _layers_of(model) -> list[_ChipmunkLayer]:
    """Every ``ChipmunkAttention`` / ``ChipmunkMLP`` of ``model`` (at least one)."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, _ChipmunkLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no ChipmunkAttention or ChipmunkMLP layer: put them where "
                         "its blocks call their attention core and MLP")
    return layers


@contextlib.contextmanager
def chipmunk_step(model, chipmunk: ChipmunkConfig, plan: StepPlan, *, key=None, kernel_impl: str | None = None):
    """Within the ``with`` block, every Chipmunk layer of ``model`` runs step ``plan`` of ``chipmunk`` on its cache
    (writing the new one into its ``ChipmunkCache``); on exit they are dense again. ``plan``:
    ``schedule.step_plan(chipmunk, step)``; ``key``: the step's PRNG key (each layer folds in its index);
    ``kernel_impl``: the ops' ``impl``."""
    _check_config(chipmunk)
    if not isinstance(plan, StepPlan):
        raise TypeError(f"plan must be a StepPlan (schedule.step_plan(chipmunk, step)), got {type(plan).__name__}")
    layers = _layers_of(model)
    if any(layer.step is not None for layer in layers):
        raise ValueError("chipmunk_step blocks cannot be nested: the model is already running a Chipmunk step")
    step = _Step(chipmunk, plan, key, kernel_impl)
    for layer in layers:
        layer.step = step
    try:
        yield model
    finally:
        for layer in layers:
            layer.step = None


def init_caches(model, chipmunk: ChipmunkConfig, *, batch: int, seq_len: int, dtype=jnp.bfloat16) -> nnx.State:
    """Sets every Chipmunk layer's empty cache for ``batch`` x ``seq_len`` tokens of ``dtype`` (the compute dtype of
    the layers' inputs) and returns them: ``nnx.state(model, ChipmunkCache)``, the sampler's ``cache``. Each layer
    needs its own ``layer`` index (one attention and one MLP per block)."""
    _check_config(chipmunk)
    layers = _layers_of(model)
    seen = set()
    for layer in layers:
        if (type(layer), layer.layer) in seen:
            raise ValueError(f"two {type(layer).__name__} layers have layer={layer.layer}: give each block its own "
                             "index (the schedule's first_n_dense_layers and the random keys count it)")
        seen.add((type(layer), layer.layer))
    for layer in layers:
        layer.cache.set_value(layer.init_cache(chipmunk, batch=batch, seq_len=seq_len, dtype=dtype))
    return nnx.state(model, ChipmunkCache)


def _default_call(model, latents, sigma, cond):
    return model(latents, sigma, cond)


def make_denoiser(model, chipmunk: ChipmunkConfig | None = None, *,
                  call: Callable[..., Any] | None = None, kernel_impl: str | None = None) -> Denoiser:
    """``model`` as a ``sampling.Denoiser``. The sampler's ``params``: ``nnx.state(model, nnx.Not(ChipmunkCache))``;
    its ``cache``: the ``ChipmunkCache`` state (``init_caches``; donated: ``nnx.update(model, caches)`` keeps the
    returned ones). Each step merges them into a copy of ``model`` and calls ``call(model, latents, sigma, cond) ->
    velocity`` (default ``model(latents, sigma, cond)``; sigma: the scalar noise level in [0, 1]) under
    ``chipmunk_step`` with the step's plan and key; without ``chipmunk`` the layers run dense. The velocity is also
    the step cache's ``hidden`` (``StepCache(hidden=jnp.zeros(latents.shape), valid=jnp.bool_(False))``); with no
    separate head the model cannot skip steps (``step_cache.enabled=False``; a skipped step would reuse it)."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    if chipmunk is not None:
        _check_config(chipmunk)
        _layers_of(model)
        if chipmunk.step_cache.enabled:
            raise ValueError("step caching (step_cache.enabled) needs a model split into body and head, which the "
                             "layers' denoiser does not have: use chipmunk.replace(step_cache__enabled=False)")
    call = _default_call if call is None else call
    if not callable(call):
        raise TypeError(f"call must be a function (model, latents, sigma, cond) -> velocity, got {type(call).__name__}")
    graphdef = nnx.graphdef(model)

    def compute(params, latents, t, cond, cache, plan, key):
        for name, state in (("params", params), ("cache", cache)):
            if not isinstance(state, nnx.State):
                raise TypeError(f"{name} must be an nnx.State (params: nnx.state(model, nnx.Not(ChipmunkCache)); "
                                f"cache: init_caches(...)), got {type(state).__name__}")
        if any(isinstance(v, ChipmunkCache) for _, v in nnx.to_flat_state(params)):
            raise TypeError("params holds the Chipmunk caches: pass nnx.state(model, nnx.Not(ChipmunkCache)) as "
                            "params and the caches as cache")
        module = nnx.merge(graphdef, params, cache, copy=True)  # new variables: the arguments stay as they are
        run = contextlib.nullcontext() if chipmunk is None else chipmunk_step(module, chipmunk, plan, key=key,
                                                                             kernel_impl=kernel_impl)
        with run:
            velocity = call(module, latents, t, cond)
        if getattr(velocity, "shape", None) != latents.shape:
            raise ValueError(f"call must return the velocity in the latents' shape {latents.shape}, got "
                             f"{getattr(velocity, 'shape', None)}")
        velocity = velocity.astype(jnp.float32)
        return ModelOutput(sample=velocity, hidden=velocity, cache=nnx.state(module, ChipmunkCache))

    def head(params, hidden, t, cond):
        return hidden

    return Denoiser(compute=compute, head=head, sparse=chipmunk is not None)
