"""The Chipmunk attention / MLP hooks a model block calls instead of its dense attention and MLP."""

from __future__ import annotations

import jax

from chipmunk_jax.attention import sparse_delta_attention
from chipmunk_jax.cache import layer_is_sparse
from chipmunk_jax.mlp import MLPWeights, sparse_delta_mlp
from chipmunk_jax.schedule import attention_step_kind, mlp_step_kind

__all__ = ["chipmunk_ops"]


def chipmunk_ops(chipmunk, cache, step, key, layer, kernel_impl, *, static_mask=None, eligible=None) -> dict:
    """{"attention_op", "mlp_op"} for sparse-capable layer ``layer``; each op returns its new cache slot
    (``cache["attention"][layer]`` / ``cache["mlp"][layer]``).

    Layers that are dense at every step (below first_n_dense_layers, or the op disabled) get no op:
    they run the model's own dense path (cuDNN attention on GPUs), and their cache slots pass through.
    ``key`` seeds this layer's random keys / features (``fold_in(key, layer)``); ``static_mask`` and
    ``eligible`` are the video static column mask (SPEC §1.6).
    """
    ops = {}
    attn_key = mlp_key = None
    if key is not None:
        attn_key, mlp_key = jax.random.split(jax.random.fold_in(key, layer))
    if layer_is_sparse(chipmunk.attention, layer):
        attn_kind = attention_step_kind(chipmunk, step, layer)

        def attention_op(q, k, v):
            return sparse_delta_attention(
                q, k, v, cache["attention"][layer], attn_kind, chipmunk, key=attn_key,
                static_mask=static_mask, eligible=eligible, impl=kernel_impl,
            )

        ops["attention_op"] = attention_op
    if layer_is_sparse(chipmunk.mlp, layer):
        mlp_kind = mlp_step_kind(chipmunk, step, layer)

        def mlp_op(x, w1, b1, w2, b2, w1_transposed=False):
            cast = lambda w: None if w is None else w.astype(x.dtype)  # noqa: E731
            weights = MLPWeights(cast(w1), cast(b1), cast(w2), cast(b2), w1_transposed=w1_transposed)
            return sparse_delta_mlp(x, weights, cache["mlp"][layer], mlp_kind, chipmunk, key=mlp_key,
                                    impl=kernel_impl)

        ops["mlp_op"] = mlp_op
    return ops
