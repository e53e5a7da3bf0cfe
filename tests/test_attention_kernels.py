"""Pallas attention kernels (interpret mode on CPU) against their pure-jnp reference twins.

Fresh random inputs per test, odd sizes (N not a multiple of 64/192), ragged counts, count 0,
duplicates, heads 3, batch 2; NaN checks (interpret mode fills unwritten outputs with NaN).
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import pytest

from chipmunk_jax.pallas_kernels import attention as A
from chipmunk_jax.pallas_kernels import attention_pallas as ap
from helpers import fresh_key, random_qkv, rel_error  # rel_error: float64 norms (colsum values may be ~e^50)


def _tol(dtype):
    return 1e-5 if dtype == jnp.float32 else 1e-2


# ------------------------------------------------------------------ dense


@pytest.mark.parametrize(
    "shape,dtype",
    [
        pytest.param((2, 301, 3, 64), jnp.float32, marks=pytest.mark.slow),
        ((1, 200, 2, 128), jnp.float32),
        pytest.param((2, 333, 3, 64), jnp.bfloat16, marks=pytest.mark.slow),
    ],
)
def test_dense_matches_reference(shape, dtype):
    q, k, v = random_qkv(*shape, dtype)
    o, lse = A.dense_attention(q, k, v, impl="interpret")
    ro, rl = A.dense_attention(q, k, v, impl="reference")
    chex.assert_shape(o, q.shape)
    chex.assert_type(o, q.dtype)
    chex.assert_shape(lse, (shape[0], shape[2], shape[1]))
    chex.assert_type(lse, jnp.float32)
    assert rel_error(o, ro) <= _tol(dtype)
    lse_tol = 1e-4 if dtype == jnp.float32 else 2e-2
    assert float(jnp.max(jnp.abs(lse - rl))) <= lse_tol


@pytest.mark.slow
def test_dense_other_configs_and_cross_lengths():
    q, k, v = random_qkv(1, 130, 2, 64, jnp.float32, nk=257)
    ro, rl = A.dense_attention(q, k, v, impl="reference")
    for cfg in (ap.DenseConfig(block_q=64, n_sub=2, block_k=64), ap.DenseConfig(block_q=32, n_sub=1, block_k=128)):
        o, lse = ap.dense_attention(q, k, v, scale=0.125, interpret=True, config=cfg)
        chex.assert_shape([o, lse], [q.shape, (1, 2, 130)])
        assert rel_error(o, ro) <= 1e-5
        assert float(jnp.max(jnp.abs(lse - rl))) <= 1e-4


# ------------------------------------------------------------------ dense + colsum


@pytest.mark.slow  # the fast suite runs the default (fixed-offset) layout: test_colsum_fixed_offset_kernel_*
@pytest.mark.parametrize(
    "shape,group_size,dtype",
    [
        ((2, 401, 3, 64), 192, jnp.float32),
        ((1, 250, 2, 128), 100, jnp.float32),
        ((1, 450, 3, 64), 192, jnp.bfloat16),
        ((2, 401, 3, 64), -192, jnp.float32),  # negative: explicit (128, 64) sub-tiles
    ],
)
def test_colsum_matches_reference(shape, group_size, dtype):
    _check_colsum(shape, group_size, dtype, None)


# "seq" layout (v3): sequential 128-row passes, MMA column sums, read-modify-write of straddling groups.
@pytest.mark.slow
@pytest.mark.parametrize(
    "shape,group_size,dtype,config",
    [
        ((1, 450, 3, 64), 192, jnp.bfloat16, ap.DenseConfig(block_q=128, block_k=64, seq=True, cs_dot="pw")),
        ((1, 333, 2, 64), 40, jnp.float32, ap.DenseConfig(block_q=128, block_k=64, seq=True)),  # 5 groups/tile
        ((1, 300, 2, 64), 192, jnp.float32, ap.DenseConfig(block_q=64, block_k=128, seq=True,
                                                            groups_per_program=3)),
        ((1, 401, 2, 64), 192, jnp.float32, ap.DenseConfig(block_q=64, block_k=64, num_warps=4)),  # v2 layout
        ((2, 401, 3, 64), 192, jnp.float32, ap.FIXED_OFFSET_COLSUM),
        ((1, 333, 2, 64), 40, jnp.bfloat16, ap.FIXED_OFFSET_COLSUM),
    ],
)
def test_colsum_seq_and_legacy_layouts(shape, group_size, dtype, config):
    _check_colsum(shape, group_size, dtype, config)


@pytest.mark.slow
@pytest.mark.parametrize("shift", [75.0, -75.0, float("inf")])
def test_colsum_fixed_offset_falls_back_when_lse_moved_far(shift):
    """|lse - prev_lse| beyond the fixed offset's range (one row is enough): the online kernel's result."""
    q, k, v = random_qkv(1, 300, 2, 64, jnp.float32)
    _, prev = A.dense_attention(q, k, v, impl="reference")
    prev = prev.at[0, 1, 17].add(shift)
    out = ap.dense_attention_colsum(q, k, v, prev, group_size=192, scale=0.125, interpret=True,
                                    config=ap.FIXED_OFFSET_COLSUM)
    online = ap.dense_attention_colsum(q, k, v, prev, group_size=192, scale=0.125, interpret=True,
                                       config=dataclasses.replace(ap.FIXED_OFFSET_COLSUM, fixed_offset=False))
    chex.assert_trees_all_equal(out, online)
    ro, rl, _ = A.dense_attention_colsum(q, k, v, prev, group_size=192, impl="reference")
    assert rel_error(out[0], ro) <= 1e-5 and float(jnp.max(jnp.abs(out[1] - rl))) <= 1e-4


@pytest.mark.parametrize("shift", [50.0, -50.0])
def test_colsum_fixed_offset_kernel_exact_within_range(shift):
    """The fixed-offset kernel itself (no fallback) while every row's LSE moved by 50 since prev_lse."""
    q, k, v = random_qkv(1, 333, 2, 64, jnp.float32)
    _, lse_now = A.dense_attention(q, k, v, impl="reference")
    prev = lse_now + shift
    o, lse, cs = ap._dense_call(q, k, v, prev, scale=0.125, group_size=192, colsum=True, interpret=True,
                                config=ap.FIXED_OFFSET_COLSUM)
    ro, rl, rcs = A.dense_attention_colsum(q, k, v, prev, group_size=192, impl="reference")
    assert rel_error(o, ro) <= 1e-5
    assert float(jnp.max(jnp.abs(lse - rl))) <= 1e-4
    assert rel_error(cs, rcs) <= 1e-4


def _check_colsum(shape, group_size, dtype, cfg, prev_noise=0.3):
    q, k, v = random_qkv(*shape, dtype)
    _, prev = A.dense_attention(q, k, v, impl="reference")
    prev = prev + prev_noise * jax.random.normal(fresh_key(), prev.shape)  # a "previous step" LSE
    if group_size < 0:
        group_size, cfg = -group_size, ap.DenseConfig(tiles=(128, 64), num_warps=8)
    o, lse, cs = ap.dense_attention_colsum(q, k, v, prev, group_size=group_size, scale=shape[-1] ** -0.5,
                                           interpret=True, config=cfg)
    ro, rl, rcs = A.dense_attention_colsum(q, k, v, prev, group_size=group_size, impl="reference")
    groups = -(-shape[1] // group_size)
    chex.assert_shape([o, lse, cs], [q.shape, (shape[0], shape[2], shape[1]), (shape[0], shape[2], groups, shape[1])])
    chex.assert_type([o, lse, cs], [dtype, jnp.float32, jnp.float32])
    assert rel_error(o, ro) <= _tol(dtype)
    assert float(jnp.max(jnp.abs(lse - rl))) <= (1e-4 if dtype == jnp.float32 else 2e-2)
    assert rel_error(cs, rcs) <= (1e-4 if dtype == jnp.float32 else 1e-2)


# ------------------------------------------------------------------ sparse


def _random_sets(b, h, g, kmax, n, *, zero_group=True, full=False):
    ki, kc = jax.random.split(fresh_key())
    idx = jax.random.randint(ki, (b, h, g, kmax), 0, n, jnp.int32)  # duplicates allowed
    cnt = jax.random.randint(kc, (b, h, g), 0, kmax + 1, jnp.int32)
    if zero_group:
        cnt = cnt.at[0, 0, 0].set(0)
    if full:
        cnt = cnt.at[-1, -1, -1].set(kmax)
    return idx, cnt


@pytest.mark.parametrize(
    "shape,group_size,kmax,dtype,config",
    [
        pytest.param((2, 401, 3, 64), 192, 150, jnp.float32, ap.DEFAULT_SPARSE, marks=pytest.mark.slow),
        pytest.param((1, 300, 2, 128), 192, 200, jnp.float32, ap.SparseConfig(programs_per_group=3, chunk=64),
                     marks=pytest.mark.slow),
        pytest.param((2, 250, 3, 64), 100, 77, jnp.float32, ap.SparseConfig(chunk=32), marks=pytest.mark.slow),
        pytest.param((1, 389, 3, 64), 192, 129, jnp.bfloat16, None, marks=pytest.mark.slow),
        pytest.param((1, 389, 3, 128), 192, 129, jnp.bfloat16, ap.SparseConfig(programs_per_group=3, chunk=128),
                     marks=pytest.mark.slow),
        pytest.param((2, 401, 3, 64), 192, 150, jnp.float32, ap.SparseConfig(tiles=(128, 64), num_warps=8),
                     marks=pytest.mark.slow),
        pytest.param((2, 401, 3, 64), 192, 150, jnp.float32,
                     ap.SparseConfig(programs_per_group=3, prefetch_indices=True), marks=pytest.mark.slow),
        ((1, 389, 3, 128), 192, 129, jnp.bfloat16, ap.SparseConfig(chunk=32, prefetch_indices=True)),
        pytest.param((1, 300, 2, 64), 100, 64, jnp.float32, ap.SparseConfig(chunk=64, prefetch_indices=True),
                     marks=pytest.mark.slow),
    ],
)
def test_sparse_matches_reference(shape, group_size, kmax, dtype, config):
    b, n, h, d = shape
    q, k, v = random_qkv(b, n, h, d, dtype)
    groups = -(-n // group_size)
    idx, cnt = _random_sets(b, h, groups, kmax, n, full=True)
    o = ap.column_sparse_attention(q, k, v, idx, cnt, group_size=group_size, scale=d**-0.5, interpret=True,
                                   config=config)
    ro = A.column_sparse_attention(q, k, v, idx, cnt, group_size=group_size, impl="reference")
    chex.assert_shape(o, q.shape)
    chex.assert_type(o, q.dtype)
    assert rel_error(o, ro) <= _tol(dtype)
    # Rows of the count-0 group are exactly zero.
    assert float(jnp.max(jnp.abs(o[0, :group_size, 0].astype(jnp.float32)))) == 0.0


def test_default_sparse_config_by_grid_size():
    # FLUX 1024^2 (24 groups x 24 heads) takes the 64-row programs; HunyuanVideo 720p (621 x 24) does not.
    assert ap.default_sparse_config(1, 24, 24) == ap.SMALL_GRID_SPARSE
    assert ap.default_sparse_config(1, 24, 621) == ap.DEFAULT_SPARSE
    assert ap.default_sparse_config(2, 24, 200) == ap.DEFAULT_SPARSE  # batch counts: 9,600 programs
    # float32 K/V tiles at the small-grid tiling's 5 stages would not fit an SM's shared memory
    assert ap.default_sparse_config(1, 24, 24, itemsize=4).num_stages == 3
    assert dataclasses.replace(ap.default_sparse_config(1, 24, 24, itemsize=4), num_stages=5) == ap.SMALL_GRID_SPARSE
    assert ap.SMALL_GRID_SPARSE in ap.PRODUCTION_SPARSE_CONFIGS and ap.DEFAULT_SPARSE in ap.PRODUCTION_SPARSE_CONFIGS


@pytest.mark.slow
def test_sparse_all_columns_equals_dense():
    b, n, h, d = 2, 301, 3, 64
    q, k, v = random_qkv(b, n, h, d, jnp.float32)
    groups = -(-n // 192)
    idx = jnp.broadcast_to(jax.random.permutation(fresh_key(), n).astype(jnp.int32), (b, h, groups, n))
    cnt = jnp.full((b, h, groups), n, jnp.int32)
    o = A.column_sparse_attention(q, k, v, idx, cnt, impl="interpret")
    do, _ = A.dense_attention(q, k, v, impl="reference")
    assert rel_error(o, do) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("sign", [1, -1])
def test_sparse_base_epilogue_with_donated_base(sign):
    b, n, h, d = 1, 300, 3, 64
    q, k, v = random_qkv(b, n, h, d, jnp.float32)
    groups = -(-n // 192)
    idx, cnt = _random_sets(b, h, groups, 90, n)
    base = jax.random.normal(fresh_key(), q.shape, jnp.float32)
    expected = A.column_sparse_attention(q, k, v, idx, cnt, base=base, sign=sign, impl="reference")

    @functools.partial(jax.jit, donate_argnums=(5,))
    def update(q, k, v, idx, cnt, base):
        return A.column_sparse_attention(q, k, v, idx, cnt, base=base, sign=sign, impl="interpret")

    out = update(q, k, v, idx, cnt, jnp.array(base))
    assert rel_error(out, expected) <= 1e-5


@pytest.mark.slow
def test_sparse_bf16_base_f32_cache():
    b, n, h, d = 1, 250, 3, 64
    q, k, v = random_qkv(b, n, h, d, jnp.bfloat16)
    idx, cnt = _random_sets(b, h, 2, 100, n)
    base = jax.random.normal(fresh_key(), q.shape, jnp.float32)
    out = A.column_sparse_attention(q, k, v, idx, cnt, base=base, sign=-1, impl="interpret")
    ref = A.column_sparse_attention(q, k, v, idx, cnt, base=base, sign=-1, impl="reference")
    chex.assert_shape(out, q.shape)
    chex.assert_type(out, jnp.float32)
    assert rel_error(out, ref) <= 1e-2


# ------------------------------------------------------------------ validation


def test_validation_errors():
    q, k, v = random_qkv(1, 64, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="q must be"):
        A.dense_attention(q[0], k, v, impl="interpret")
    with pytest.raises(TypeError, match="share a dtype"):
        A.dense_attention(q, k.astype(jnp.bfloat16), v, impl="interpret")
    with pytest.raises(TypeError, match="float32, bfloat16"):
        A.dense_attention(q.astype(jnp.int32), k, v, impl="interpret")
    with pytest.raises(ValueError, match="must agree"):
        A.dense_attention(q[:, :, :1], k, v, impl="interpret")
    with pytest.raises(ValueError, match="impl"):
        A.dense_attention(q, k, v, impl="cuda")
    q3, k3, v3 = random_qkv(1, 64, 2, 48, jnp.float32)
    with pytest.raises(ValueError, match="head_dim"):
        A.dense_attention(q3, k3, v3, impl="interpret")
    lse = jnp.zeros((1, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="prev_lse"):
        A.dense_attention_colsum(q, k, v, lse[:, :1], impl="interpret")
    with pytest.raises(TypeError, match="prev_lse"):
        A.dense_attention_colsum(q, k, v, lse.astype(jnp.bfloat16), impl="interpret")
    idx = jnp.zeros((1, 2, 1, 8), jnp.int32)
    cnt = jnp.zeros((1, 2, 1), jnp.int32)
    with pytest.raises(TypeError, match="indices must be int32"):
        A.column_sparse_attention(q, k, v, idx.astype(jnp.int16), cnt, impl="interpret")
    with pytest.raises(ValueError, match="indices must have shape"):
        A.column_sparse_attention(q, k, v, idx[:, :, :, 0], cnt, impl="interpret")
    with pytest.raises(ValueError, match="counts must have shape"):
        A.column_sparse_attention(q, k, v, idx, cnt[0], impl="interpret")
    with pytest.raises(ValueError, match="sign"):
        A.column_sparse_attention(q, k, v, idx, cnt, sign=2, impl="interpret")
    with pytest.raises(ValueError, match="base"):
        A.column_sparse_attention(q, k, v, idx, cnt, base=q[:, :5], impl="interpret")
