"""Out-of-range indices and counts given to the public kernel entries (issue 27): concrete arrays raise a
ValueError naming the argument, the value and its position (column_sparse_attention, sparse_mlp_delta); entries
past a row's count are padding and stay unchecked; traced arrays (under jit) are not checked.
Checks run before any kernel, so impl="reference" keeps these tests fast."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax.pallas_kernels import column_sparse_attention, sparse_mlp_delta

B, N, H, D, GROUP = 1, 32, 2, 8, 16  # G = 2 query groups over N_k = 32 keys
K = 4  # gathered keys per group


def _attention_inputs():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, N, H, D)), jnp.float32) for _ in range(3))
    indices = np.tile(np.arange(K, dtype=np.int32), (B, H, 2, 1))  # [B, H, G, K]
    counts = np.full((B, H, 2), K, np.int32)
    return q, k, v, indices, counts


def _attend(indices, counts):
    q, k, v, _, _ = _attention_inputs()
    return column_sparse_attention(q, k, v, jnp.asarray(indices), jnp.asarray(counts), group_size=GROUP,
                                   impl="reference")


@pytest.mark.parametrize("where, value, match", [
    ((0, 1, 0, 2), N, r"indices must be in \[0, 32\) \(the key count N_k\).*indices\[0, 1, 0, 2\] = 32"),
    ((0, 0, 1, 0), -1, r"indices\[0, 0, 1, 0\] = -1"),
], ids=["index-too-large", "negative-index"])
def test_column_sparse_attention_rejects_out_of_range_indices(where, value, match):
    _, _, _, indices, counts = _attention_inputs()
    indices[where] = value
    with pytest.raises(ValueError, match=match):
        _attend(indices, counts)


@pytest.mark.parametrize("value, match", [
    (-1, r"counts must be in \[0, K = 4\].*counts\[0, 1, 1\] = -1"),
    (K + 1, r"counts\[0, 1, 1\] = 5"),
], ids=["negative-count", "count-over-capacity"])
def test_column_sparse_attention_rejects_bad_counts(value, match):
    _, _, _, indices, counts = _attention_inputs()
    counts[0, 1, 1] = value
    with pytest.raises(ValueError, match=match):
        _attend(indices, counts)


def test_column_sparse_attention_padding_past_the_count_and_jit_are_not_checked():
    _, _, _, indices, counts = _attention_inputs()
    counts[:] = 2
    indices[..., 2:] = N + 7  # padding: never read
    out = _attend(indices, counts)
    assert np.isfinite(np.asarray(out)).all()
    indices[0, 0, 0, 0] = N  # under jit: a tracer, no check (documented as undefined)
    q, k, v, _, _ = _attention_inputs()
    jitted = jax.jit(lambda i, c: column_sparse_attention(q, k, v, i, c, group_size=GROUP, impl="reference"))
    jitted(jnp.asarray(indices), jnp.asarray(counts))


def _mlp_inputs(f=16, nb=2, block=64):
    rng = np.random.default_rng(1)
    n, c = nb * block, 8
    x = jnp.asarray(rng.standard_normal((B, n, c)), jnp.float32)
    w1 = jnp.asarray(rng.standard_normal((c, f)), jnp.float32)
    b1 = jnp.zeros((f,), jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((f, c)), jnp.float32)
    act = jnp.zeros((B, f, n), jnp.float32)
    out = jnp.zeros((B, n, c), jnp.float32)
    indices = np.tile(np.arange(K, dtype=np.int32), (B, nb, 1))
    counts = np.full((B, nb), K, np.int32)
    return (x, w1, b1, w2, act, out), indices, counts


def _mlp(arrays, indices, counts):
    return sparse_mlp_delta(*arrays, jnp.asarray(indices), jnp.asarray(counts), block_size=64, impl="reference")


@pytest.mark.parametrize("change, match", [
    (lambda i, c: i.__setitem__((0, 1, 3), 16), r"indices must be in \[0, 16\) \(the hidden feature count F\).*"
                                               r"indices\[0, 1, 3\] = 16"),
    (lambda i, c: i.__setitem__((0, 0, 0), -3), r"indices\[0, 0, 0\] = -3"),
    (lambda i, c: c.__setitem__((0, 1), -1), r"counts must be in \[0, K = 4\].*counts\[0, 1\] = -1"),
    (lambda i, c: c.__setitem__((0, 0), 9), r"counts\[0, 0\] = 9"),
], ids=["index-too-large", "negative-index", "negative-count", "count-over-capacity"])
def test_sparse_mlp_delta_rejects_bad_indices_and_counts(change, match):
    arrays, indices, counts = _mlp_inputs()
    change(indices, counts)
    with pytest.raises(ValueError, match=match):
        _mlp(arrays, indices, counts)


def test_sparse_mlp_delta_padding_past_the_count_is_not_checked():
    arrays, indices, counts = _mlp_inputs()
    counts[:] = 1
    indices[..., 1:] = -5
    act, out = _mlp(arrays, indices, counts)
    assert np.isfinite(np.asarray(out)).all()
