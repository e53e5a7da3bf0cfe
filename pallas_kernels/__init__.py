"""Pallas GPU kernels for Chipmunk, each beside its pure-jnp reference twin.

Imports nothing from the rest of chipmunk_jax (data flows ports -> models -> chipmunk_jax -> here) but the leaf
module chipmunk_jax.validation, which imports nothing of the package.
"""

from chipmunk_jax.pallas_kernels.attention import (
    column_sparse_attention,
    dense_attention,
    dense_attention_colsum,
)
from chipmunk_jax.pallas_kernels.mlp import sparse_mlp_delta
from chipmunk_jax.pallas_kernels.selection_fast import select_columns_fast

__all__ = [
    "dense_attention",
    "dense_attention_colsum",
    "column_sparse_attention",
    "sparse_mlp_delta",
    "select_columns_fast",
]
