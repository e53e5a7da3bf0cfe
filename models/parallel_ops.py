"""The models' dense attention on a device mesh (sequence parallel, Ulysses), shared by the three models; the
Chipmunk ops' sequence-parallel forms live in ``chipmunk_ops.ChipmunkRun`` (both through chipmunk_jax.parallel)."""

from __future__ import annotations

from chipmunk_jax import parallel
from chipmunk_jax.models.mmdit import dense_attention

__all__ = ["sequence_parallel_dense_attention"]


def sequence_parallel_dense_attention(mesh, implementation=None, key_lengths=None):
    """``attention_op(q, k, v) -> (out, None)``: the dense path of a block (layers without a Chipmunk op, and the
    dense model) with q, k, v, out token-sharded over ``mesh``'s sequence axis; each device attends over the whole
    sequence with its heads. ``key_lengths`` [B] (valid-key prefix lengths) reaches every device."""

    def op(q, k, v, cache, key_lengths):
        return dense_attention(q, k, v, key_lengths=key_lengths, implementation=implementation), None

    sharded = parallel.ulysses_attention(op, mesh, None, replicated=(key_lengths,))
    return lambda q, k, v: sharded(q, k, v, None, key_lengths)
