"""The reference twins against independent float64 formulations (docs/algorithm.md §1.9)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax.pallas_kernels import attention as K
from chipmunk_jax.pallas_kernels import mlp as KM
from helpers import random_qkv


def _qkv(seed, b=2, n=211, h=3, d=16):
    return random_qkv(b, n, h, d, key=jax.random.PRNGKey(seed))


def _logits64(q, k):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    return np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])


def test_dense_reference_matches_float64():
    q, k, v = _qkv(0)
    o, lse = K.dense_attention(q, k, v, impl="reference")
    s = _logits64(q, k)
    m = s.max(-1, keepdims=True)
    lse64 = (m + np.log(np.exp(s - m).sum(-1, keepdims=True)))[..., 0]
    o64 = np.einsum("bhqk,bkhd->bqhd", np.exp(s - lse64[..., None]), np.asarray(v, np.float64))
    chex.assert_shape([o, lse], [q.shape, lse64.shape])
    chex.assert_type([o, lse], jnp.float32)
    chex.assert_trees_all_close(lse, lse64, rtol=1e-7, atol=1e-5)  # rtol: numpy's assert_allclose default
    chex.assert_trees_all_close(o, o64, rtol=1e-5, atol=1e-5)
    with jax.default_matmul_precision("highest"):
        o_jax = jax.nn.dot_product_attention(q, k, v)
    chex.assert_trees_all_close(o, o_jax, rtol=1e-5, atol=1e-5)


def test_colsum_reference_matches_float64_groups():
    q, k, v = _qkv(1, n=250)
    q2 = q + 0.1 * jax.random.normal(jax.random.PRNGKey(9), q.shape)
    _, prev_lse = K.dense_attention(q, k, v, impl="reference")
    o, lse, colsum = K.dense_attention_colsum(q2, k, v, prev_lse, group_size=64, impl="reference")
    chex.assert_shape(colsum, (2, 3, 4, 250))
    chex.assert_type(colsum, jnp.float32)
    p = np.exp(_logits64(q2, k) - np.asarray(prev_lse, np.float64)[..., None])
    for g in range(4):
        expected = p[:, :, 64 * g: min(64 * (g + 1), 250)].sum(2)
        chex.assert_trees_all_close(colsum[:, :, g], expected, rtol=1e-4, atol=0)
    o_dense, lse_dense = K.dense_attention(q2, k, v, impl="reference")
    chex.assert_trees_all_close(o, o_dense, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(lse, lse_dense, rtol=1e-7, atol=1e-6)


def _masked_softmax64(q, k, v, indices, counts, group_size):
    s = _logits64(q, k)
    b, h, n, _ = s.shape
    out = np.zeros((b, n, h, q.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            for g in range(indices.shape[2]):
                ids = np.asarray(indices[bi, hi, g, : counts[bi, hi, g]])
                rows = slice(g * group_size, min((g + 1) * group_size, n))
                if ids.size == 0:
                    continue
                sg = s[bi, hi, rows][:, ids]
                p = np.exp(sg - sg.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                out[bi, rows, hi] = p @ np.asarray(v, np.float64)[bi, ids, hi]
    return out


def test_column_sparse_reference_ragged_counts_and_empty_groups():
    q, k, v = _qkv(2, n=201)
    g, kmax = 4, 90
    key = jax.random.PRNGKey(3)
    indices = jnp.stack(
        [jax.random.permutation(jax.random.fold_in(key, i), 201)[:kmax] for i in range(2 * 3 * g)]
    ).reshape(2, 3, g, kmax).astype(jnp.int32)
    counts = jax.random.randint(jax.random.fold_in(key, 99), (2, 3, g), 1, kmax + 1).astype(jnp.int32)
    counts = counts.at[0, 1, 2].set(0)
    o = K.column_sparse_attention(q, k, v, indices, counts, group_size=64, impl="reference")
    expected = _masked_softmax64(q, k, v, np.asarray(indices), np.asarray(counts), 64)
    chex.assert_trees_all_close(o, expected, rtol=1e-5, atol=1e-5)
    assert not np.asarray(o[0, 128:192, 1]).any()  # count 0 -> zeros
    base = jax.random.normal(jax.random.PRNGKey(4), q.shape)
    for sign in (1, -1):
        ob = K.column_sparse_attention(q, k, v, indices, counts, group_size=64, base=base, sign=sign, impl="reference")
        chex.assert_trees_all_close(ob, np.asarray(base) + sign * expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_column_sparse_all_columns_equals_dense():
    q, k, v = _qkv(5, n=150)
    g = 3
    indices = jnp.broadcast_to(jnp.arange(150, dtype=jnp.int32), (2, 3, g, 150))
    counts = jnp.full((2, 3, g), 150, jnp.int32)
    o = K.column_sparse_attention(q, k, v, indices, counts, group_size=64, impl="reference")
    chex.assert_trees_all_close(o, K.dense_attention(q, k, v, impl="reference")[0], rtol=1e-5, atol=1e-6)


def test_attention_ops_reject_bad_input():
    q, k, v = _qkv(6, n=70)
    idx = jnp.zeros((2, 3, 2, 8), jnp.int32)
    cnt = jnp.zeros((2, 3, 2), jnp.int32)
    with pytest.raises(ValueError, match="q must be"):
        K.dense_attention(q[0], k, v)
    with pytest.raises(TypeError, match="k must be float32"):
        K.dense_attention(q, k.astype(jnp.int32), v)
    with pytest.raises(TypeError, match="share a dtype"):
        K.dense_attention(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match="must agree"):
        K.dense_attention(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(ValueError, match="impl must be"):
        K.dense_attention(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="prev_lse must have shape"):
        K.dense_attention_colsum(q, k, v, jnp.zeros((2, 3, 69)), group_size=64)
    with pytest.raises(TypeError, match="prev_lse must be float32"):
        K.dense_attention_colsum(q, k, v, jnp.zeros((2, 3, 70), jnp.bfloat16), group_size=64)
    with pytest.raises(ValueError, match="indices must have shape"):
        K.column_sparse_attention(q, k, v, idx[:, :, :1], cnt, group_size=64)
    with pytest.raises(TypeError, match="indices must be int32"):
        K.column_sparse_attention(q, k, v, idx.astype(jnp.int16), cnt, group_size=64)
    with pytest.raises(ValueError, match="counts must have shape"):
        K.column_sparse_attention(q, k, v, idx, cnt[..., :1], group_size=64)
    with pytest.raises(ValueError, match="sign"):
        K.column_sparse_attention(q, k, v, idx, cnt, group_size=64, sign=2)
    with pytest.raises(ValueError, match="base must have"):
        K.column_sparse_attention(q, k, v, idx, cnt, group_size=64, base=q[:, :10])
    with pytest.raises(ValueError, match="group_size"):
        K.column_sparse_attention(q, k, v, idx, cnt, group_size=0)


@pytest.mark.slow
def test_sparse_mlp_reference_matches_float64():
    b, n, c, f, co, bs = 2, 150, 8, 64, 6, 64
    ks = jax.random.split(jax.random.PRNGKey(7), 8)
    x = jax.random.normal(ks[0], (b, n, c))
    w1, b1 = jax.random.normal(ks[1], (c, f)) / 3, jax.random.normal(ks[2], (f,))
    w2 = jax.random.normal(ks[3], (f, co)) / 8
    act = jax.random.normal(ks[4], (b, f, n))
    out = jax.random.normal(ks[5], (b, n, co))
    nb = 3
    indices = jnp.stack([jax.random.permutation(jax.random.fold_in(ks[6], i), f) for i in range(b * nb)])
    indices = indices.reshape(b, nb, f).astype(jnp.int32)
    counts = jnp.array([[0, 17, 64], [5, 40, 1]], jnp.int32)
    new_act, new_out = KM.sparse_mlp_delta(x, w1, b1, w2, act, out, indices, counts, block_size=bs, impl="reference")
    x64, a64, o64 = (np.asarray(t, np.float64) for t in (x, act, out))
    a64, o64 = a64.copy(), o64.copy()
    z = x64 @ np.asarray(w1, np.float64) + np.asarray(b1, np.float64)
    gelu = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    for bi in range(b):
        for m in range(nb):
            feats = np.asarray(indices[bi, m, : counts[bi, m]])
            rows = np.arange(m * bs, min((m + 1) * bs, n))
            delta = gelu[bi][np.ix_(rows, feats)] - a64[bi][np.ix_(feats, rows)].T
            a64[bi][np.ix_(feats, rows)] += delta.T
            o64[bi, rows] += delta @ np.asarray(w2, np.float64)[feats]
    chex.assert_trees_all_close((new_act, new_out), (a64, o64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_dense_attention_output_matches_dense_attention(impl):
    q, k, v = _qkv(8, n=130, d=32)
    o = K.dense_attention_output(q, k, v, impl=impl)
    chex.assert_trees_all_close(o, K.dense_attention(q, k, v, impl="reference")[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="q must be"):
        K.dense_attention_output(q[0], k, v)
