"""Triton (TMA) dense attention kernels: interpreter numerics against the reference twins, dispatch and input
errors, and sm_90 compiles of every production configuration, all on CPU. GPU numerics: test_attention_gpu.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax.pallas_kernels import attention as A
from chipmunk_jax.pallas_kernels import attention_triton as at
from chipmunk_jax.pallas_kernels import triton_call as tc

_SEED = iter(range(10_000))


def _key():
    return jax.random.key(np.random.SeedSequence().entropy % (2**31) + next(_SEED))


def _inputs(b, nq, nk, h, d, dtype=jnp.float32):
    ks = jax.random.split(_key(), 3)
    q = jax.random.normal(ks[0], (b, nq, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, nk, h, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, nk, h, d), jnp.float32).astype(dtype)
    return q, k, v


def _rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.all(np.isfinite(x)), "NaN/inf in kernel output"
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


# batch 2 / heads 3, q and k lengths that are not multiples of 64 or 128, a key length below one key block, a
# query length below one 128-row program, and head_dim 64 and 128.
SHAPES = [(2, 300, 300, 3, 64), (1, 200, 77, 2, 64), (1, 100, 257, 1, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dense_interpreter_matches_reference(shape):
    b, nq, nk, h, d = shape
    q, k, v = _inputs(*shape)
    o, lse = A.dense_attention(q, k, v, impl="triton_interpret")
    ro, rl = A.dense_attention(q, k, v, impl="reference")
    assert o.shape == q.shape and lse.shape == (b, h, nq) and lse.dtype == jnp.float32
    assert _rel(o, ro) <= 1e-5
    assert float(jnp.max(jnp.abs(lse - rl))) <= 1e-4


@pytest.mark.parametrize("shape,group_size", [(SHAPES[0], 192), (SHAPES[1], 40), (SHAPES[2], 9)], ids=str)
def test_colsum_interpreter_matches_reference(shape, group_size):
    b, nq, nk, h, d = shape
    q, k, v = _inputs(*shape)
    _, prev = A.dense_attention(q, k, v, impl="reference")
    prev = prev + 0.5 * jax.random.normal(_key(), prev.shape)
    o, lse, cs = A.dense_attention_colsum(q, k, v, prev, group_size=group_size, impl="triton_interpret")
    ro, rl, rcs = A.dense_attention_colsum(q, k, v, prev, group_size=group_size, impl="reference")
    assert cs.shape == (b, h, -(-nq // group_size), nk)
    assert _rel(o, ro) <= 1e-5
    assert float(jnp.max(jnp.abs(lse - rl))) <= 1e-4
    assert _rel(cs, rcs) <= 1e-4


def test_colsum_far_previous_lse_falls_back_to_online_kernel():
    q, k, v = _inputs(1, 150, 150, 2, 64)
    _, prev = A.dense_attention(q, k, v, impl="reference")
    prev = prev.at[0, 1, 7].add(80.0)  # one row 80 nats off: exp(s - prev) would underflow in the fixed offset
    o, lse, cs = A.dense_attention_colsum(q, k, v, prev, impl="triton_interpret")
    ro, rl, rcs = A.dense_attention_colsum(q, k, v, prev, impl="reference")
    assert _rel(o, ro) <= 1e-5
    assert _rel(cs, rcs) <= 1e-4


def test_interpreter_takes_bf16_inputs():
    q, k, v = _inputs(1, 130, 130, 2, 64, jnp.bfloat16)
    o, lse = A.dense_attention(q, k, v, impl="triton_interpret")
    ro, _ = A.dense_attention(q, k, v, impl="reference")
    assert o.dtype == jnp.bfloat16
    assert _rel(o.astype(jnp.float32), ro.astype(jnp.float32)) <= 1e-2


def test_dispatch_and_errors():
    q, k, v = _inputs(1, 64, 64, 1, 64)
    assert A.resolve_impl("triton") == "pallas" and A.resolve_impl("triton_interpret") == "interpret"
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="Hopper GPU"):
            A.dense_attention(q, k, v, impl="triton")
    q32, k32, v32 = _inputs(1, 64, 64, 1, 32)
    with pytest.raises(ValueError, match="head_dim 64 or 128"):
        A.dense_attention(q32, k32, v32, impl="triton_interpret")
    _, prev = A.dense_attention(q, k, v, impl="reference")
    with pytest.raises(ValueError, match="group_size >= 9"):
        A.dense_attention_colsum(q, k, v, prev, group_size=8, impl="triton_interpret")
    with pytest.raises(ValueError, match="impl must be one of"):
        A.dense_attention(q, k, v, impl="cuda")


@pytest.mark.parametrize("field,value", [("block_q", 96), ("block_k", 0), ("num_warps", 6), ("block_q", 32),
                                         ("num_stages", 0), ("block_k", True)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match="TritonAttentionConfig"):
        at.TritonAttentionConfig(**{field: value})


# Every production configuration compiles for sm_90 (TMA loads, wgmma) within the H100's shared memory, at the
# issue sizes (ragged: 32,760 and 118,800 are not multiples of 64) and FLUX's joint length, both head dims.
@pytest.mark.parametrize("colsum,config", [(False, c) for c in at.PRODUCTION_DENSE_CONFIGS]
                         + [(True, c) for c in at.PRODUCTION_COLSUM_CONFIGS], ids=str)
@pytest.mark.parametrize("shape,dtype", [((1, 32760, 24, 128), jnp.bfloat16), ((1, 118800, 24, 128), jnp.bfloat16),
                                         ((2, 4608, 24, 64), jnp.float16)], ids=str)
def test_production_configs_compile_for_sm90(shape, dtype, colsum, config):
    compiled = at.compile_for_sm90(shape, shape, dtype, colsum=colsum, config=config)
    ptx = compiled.asm["ptx"]
    assert compiled.metadata.shared <= tc.MAX_SHARED_BYTES
    assert compiled.metadata.num_warps == config.num_warps
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    assert ("red.global" in ptx or "atom.global" in ptx) == colsum  # colsum: fp32 atomics into the group sums
