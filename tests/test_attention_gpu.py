"""Compiled Pallas-Triton attention kernels on the GPU against the reference twins (marker ``gpu``).

Run on the device machine: ``source benchmarks/gpu_env.sh && python3 -P -m pytest -q -m gpu tests/test_attention_gpu.py``.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax.pallas_kernels import attention as A
from chipmunk_jax.pallas_kernels import attention_pallas as ap
from helpers import fresh_key, random_qkv, rel_error

pytestmark = pytest.mark.gpu


TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


# Each config compiles a kernel (seconds): the GPU run covers the defaults plus the tile variants.
@pytest.mark.parametrize("config", ap.PRODUCTION_DENSE_CONFIGS[:1], ids=str)
@pytest.mark.parametrize("shape,dtype", [((2, 1001, 3, 128), jnp.bfloat16), ((1, 777, 3, 64), jnp.float32)])
def test_dense_gpu(shape, dtype, config):
    q, k, v = random_qkv(*shape, dtype)
    o, lse = ap.dense_attention(q, k, v, scale=shape[-1] ** -0.5, config=config)
    ro, rl = A.dense_attention(q, k, v, impl="reference")
    chex.assert_shape([o, lse], [q.shape, (shape[0], shape[2], shape[1])])
    chex.assert_type([o, lse], [dtype, jnp.float32])
    assert rel_error(o, ro) <= TOL[dtype]
    assert float(jnp.max(jnp.abs(lse - rl))) <= (1e-4 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize("config", ap.PRODUCTION_COLSUM_CONFIGS[:2], ids=str)
@pytest.mark.parametrize("shape,dtype", [((2, 1001, 3, 128), jnp.bfloat16), ((1, 777, 3, 64), jnp.float32)])
def test_colsum_gpu(shape, dtype, config):
    q, k, v = random_qkv(*shape, dtype)
    _, prev = A.dense_attention(q, k, v, impl="reference")
    prev = prev + 0.3 * jax.random.normal(fresh_key(), prev.shape)
    o, lse, cs = ap.dense_attention_colsum(q, k, v, prev, group_size=192, scale=shape[-1] ** -0.5, config=config)
    ro, rl, rcs = A.dense_attention_colsum(q, k, v, prev, impl="reference")
    assert rel_error(o, ro) <= TOL[dtype]
    assert float(jnp.max(jnp.abs(lse - rl))) <= (1e-4 if dtype == jnp.float32 else 2e-2)
    assert rel_error(cs, rcs) <= (1e-4 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("config", ap.PRODUCTION_SPARSE_CONFIGS, ids=str)
@pytest.mark.parametrize("shape,dtype", [((2, 1001, 3, 128), jnp.bfloat16), ((1, 777, 3, 64), jnp.float32)])
def test_sparse_gpu(shape, dtype, config):
    b, n, h, d = shape
    q, k, v = random_qkv(b, n, h, d, dtype)
    g = -(-n // 192)
    kmax = 333
    ki, kc = jax.random.split(fresh_key())
    idx = jax.random.randint(ki, (b, h, g, kmax), 0, n, jnp.int32)
    cnt = jax.random.randint(kc, (b, h, g), 0, kmax + 1, jnp.int32).at[0, 0, 0].set(0).at[0, 0, 1].set(kmax)
    o = ap.column_sparse_attention(q, k, v, idx, cnt, group_size=192, scale=d**-0.5, config=config)
    ro = A.column_sparse_attention(q, k, v, idx, cnt, impl="reference")
    chex.assert_shape(o, q.shape)
    chex.assert_type(o, dtype)
    assert rel_error(o, ro) <= TOL[dtype]
    assert float(jnp.max(jnp.abs(o[0, :192, 0].astype(jnp.float32)))) == 0.0
    base = jax.random.normal(fresh_key(), q.shape, jnp.float32).astype(dtype)
    f = jax.jit(
        lambda q, k, v, i, c, bb: A.column_sparse_attention(q, k, v, i, c, base=bb, sign=-1, impl="pallas"),
        donate_argnums=(5,),
    )
    ob = f(q, k, v, idx, cnt, jnp.array(base))
    rb = A.column_sparse_attention(q, k, v, idx, cnt, base=base, sign=-1, impl="reference")
    assert rel_error(ob, rb) <= TOL[dtype]


def test_sparse_all_columns_equals_dense_gpu():
    b, n, h, d = 1, 4700, 4, 128
    q, k, v = random_qkv(b, n, h, d, jnp.bfloat16)
    g = -(-n // 192)
    idx = jnp.broadcast_to(jax.random.permutation(fresh_key(), n).astype(jnp.int32), (b, h, g, n))
    cnt = jnp.full((b, h, g), n, jnp.int32)
    o = A.column_sparse_attention(q, k, v, idx, cnt, impl="pallas")
    do, _ = A.dense_attention(q, k, v, impl="reference")
    assert rel_error(o, do) <= 1e-2
    o2, lse = A.dense_attention(q, k, v, impl="pallas")
    assert rel_error(o2, do) <= 1e-2


def test_default_impl_is_pallas_on_gpu():
    q, k, v = random_qkv(1, 256, 2, 128, jnp.bfloat16)
    o, _ = A.dense_attention(q, k, v)
    ro, _ = A.dense_attention(q, k, v, impl="reference")
    assert rel_error(o, ro) <= 1e-2


# ---- Triton (TMA) kernels: attention_triton.py ----
from chipmunk_jax.pallas_kernels import attention_triton as at  # noqa: E402


@pytest.mark.parametrize("shape", [(2, 1001, 3, 128), (1, 777, 2, 64), (1, 4608 + 512, 24, 128)], ids=str)
def test_triton_dense_gpu(shape):
    q, k, v = random_qkv(*shape, jnp.bfloat16)
    o, lse = A.dense_attention(q, k, v, impl="triton")
    ro, rl = A.dense_attention(q, k, v, impl="reference")
    assert rel_error(o, ro) <= 1e-2
    assert float(jnp.max(jnp.abs(lse - rl))) <= 2e-2


@pytest.mark.parametrize("config", at.PRODUCTION_COLSUM_CONFIGS, ids=str)
@pytest.mark.parametrize("shape,group_size", [((2, 1001, 3, 128), 192), ((1, 777, 2, 64), 40)], ids=str)
def test_triton_colsum_gpu(shape, group_size, config):
    q, k, v = random_qkv(*shape, jnp.bfloat16)
    _, prev = A.dense_attention(q, k, v, impl="reference")
    prev = prev + 0.3 * jax.random.normal(fresh_key(), prev.shape)
    f = jax.jit(lambda q, k, v, p: at.dense_attention_colsum(q, k, v, p, group_size=group_size,
                                                             scale=shape[-1] ** -0.5, config=config))
    o, lse, cs = f(q, k, v, prev)
    ro, rl, rcs = A.dense_attention_colsum(q, k, v, prev, group_size=group_size, impl="reference")
    assert rel_error(o, ro) <= 1e-2
    assert float(jnp.max(jnp.abs(lse - rl))) <= 2e-2
    assert rel_error(cs, rcs) <= 1e-2
    if group_size == 192:  # two partial sums per entry: the atomics' order cannot change the result
        assert np.array_equal(np.asarray(cs), np.asarray(f(q, k, v, prev)[2]))


def test_triton_colsum_fallback_and_default_dispatch_gpu():
    q, k, v = random_qkv(1, 500, 2, 128, jnp.bfloat16)
    _, prev = A.dense_attention(q, k, v, impl="reference")
    far = prev.at[0, 1, 3].add(90.0)
    o, lse, cs = A.dense_attention_colsum(q, k, v, far, impl="triton")  # Triton, then the online fallback
    ro, rl, rcs = A.dense_attention_colsum(q, k, v, far, impl="reference")
    assert rel_error(o, ro) <= 1e-2 and rel_error(cs, rcs) <= 1e-2
    assert A._dense_impl(None, q, 192) == ("triton" if A.TRITON_BY_DEFAULT else "pallas")


@pytest.mark.parametrize("colsum", [False, True])
def test_triton_kernels_inside_a_command_buffer_gpu(colsum):
    """The Triton kernels among projections and fusions in one jit: XLA captures such runs of commands into CUDA
    graphs, where the plugin's per-launch scratch allocation failed (2026-12-03); triton_call passes the scratch
    as an XLA buffer instead."""
    b, n, h, d = 1, 1000, 4, 128
    c = h * d
    ks = jax.random.split(fresh_key(), 5)
    x = jax.random.normal(ks[0], (b, n, c), jnp.float32).astype(jnp.bfloat16)
    ws = [(jax.random.normal(k, (c, c), jnp.float32) / np.sqrt(c)).astype(jnp.bfloat16) for k in ks[1:]]
    prev = jnp.zeros((b, h, n), jnp.float32)

    def block(x, wq, wk, wv, wo, prev, impl):
        q, k, v = ((jnp.sin(x) @ w).reshape(b, n, h, d) for w in (wq, wk, wv))
        if colsum:
            o, lse, cs = A.dense_attention_colsum(q, k, v, prev + 1.0, impl=impl)
            extra = jnp.sum(cs) + jnp.sum(lse)
        else:
            o, lse = A.dense_attention(q, k, v, impl=impl)
            extra = jnp.sum(lse)
        return x + jnp.tanh(o.reshape(b, n, c) @ wo), extra

    got = jax.jit(functools.partial(block, impl="triton"))(x, *ws, prev)
    want = jax.jit(functools.partial(block, impl="reference"))(x, *ws, prev)
    assert rel_error(got[0], want[0]) <= 1e-2
    assert abs(float(got[1]) - float(want[1])) <= 1e-2 * abs(float(want[1])) + 1e-2
