"""Triton (TMA) dense attention kernels: interpreter numerics against the reference twins, dispatch and input
errors, and sm_90 compiles of every production configuration, all on CPU. GPU numerics: test_attention_gpu.py."""

import chex
import jax
import jax.numpy as jnp
import pytest

from chipmunk_jax.pallas_kernels import attention as A
from chipmunk_jax.pallas_kernels import attention_triton as at
from chipmunk_jax.pallas_kernels import triton_call as tc
from helpers import fresh_key, random_qkv, rel_error


def _inputs(b, nq, nk, h, d, dtype=jnp.float32):
    return random_qkv(b, nq, h, d, dtype, nk=nk)


# batch 2 / heads 3, q and k lengths that are not multiples of 64 or 128, a key length below one key block, a
# query length below one 128-row program, and head_dim 64 and 128.
SHAPES = [(2, 300, 300, 3, 64), (1, 200, 77, 2, 64), (1, 100, 257, 1, 128)]


@pytest.mark.parametrize("shape", [pytest.param(s, marks=pytest.mark.slow) for s in SHAPES[:2]] + SHAPES[2:], ids=str)
def test_dense_interpreter_matches_reference(shape):
    b, nq, nk, h, d = shape
    q, k, v = _inputs(*shape)
    o, lse = A.dense_attention(q, k, v, impl="triton_interpret")
    ro, rl = A.dense_attention(q, k, v, impl="reference")
    chex.assert_shape([o, lse], [q.shape, (b, h, nq)])
    chex.assert_type([o, lse], jnp.float32)
    assert rel_error(o, ro) <= 1e-5
    assert float(jnp.max(jnp.abs(lse - rl))) <= 1e-4


@pytest.mark.parametrize("shape,group_size", [pytest.param(SHAPES[0], 192, marks=pytest.mark.slow), (SHAPES[1], 40),
                                              pytest.param(SHAPES[2], 9, marks=pytest.mark.slow)], ids=str)
def test_colsum_interpreter_matches_reference(shape, group_size):
    b, nq, nk, h, d = shape
    q, k, v = _inputs(*shape)
    _, prev = A.dense_attention(q, k, v, impl="reference")
    prev = prev + 0.5 * jax.random.normal(fresh_key(), prev.shape)
    o, lse, cs = A.dense_attention_colsum(q, k, v, prev, group_size=group_size, impl="triton_interpret")
    ro, rl, rcs = A.dense_attention_colsum(q, k, v, prev, group_size=group_size, impl="reference")
    chex.assert_shape([o, lse, cs], [q.shape, (b, h, nq), (b, h, -(-nq // group_size), nk)])
    chex.assert_type([o, lse, cs], jnp.float32)
    assert rel_error(o, ro) <= 1e-5
    assert float(jnp.max(jnp.abs(lse - rl))) <= 1e-4
    assert rel_error(cs, rcs) <= 1e-4


@pytest.mark.slow
def test_colsum_far_previous_lse_falls_back_to_online_kernel():
    q, k, v = _inputs(1, 150, 150, 2, 64)
    _, prev = A.dense_attention(q, k, v, impl="reference")
    prev = prev.at[0, 1, 7].add(80.0)  # one row 80 nats off: exp(s - prev) would underflow in the fixed offset
    o, lse, cs = A.dense_attention_colsum(q, k, v, prev, impl="triton_interpret")
    ro, rl, rcs = A.dense_attention_colsum(q, k, v, prev, impl="reference")
    assert rel_error(o, ro) <= 1e-5
    assert rel_error(cs, rcs) <= 1e-4


@pytest.mark.slow
def test_interpreter_takes_bf16_inputs():
    q, k, v = _inputs(1, 130, 130, 2, 64, jnp.bfloat16)
    o, lse = A.dense_attention(q, k, v, impl="triton_interpret")
    ro, _ = A.dense_attention(q, k, v, impl="reference")
    chex.assert_shape(o, q.shape)
    chex.assert_type(o, jnp.bfloat16)
    assert rel_error(o.astype(jnp.float32), ro.astype(jnp.float32)) <= 1e-2


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
# Fast suite: the first dense and the first colsum configuration at the Hunyuan shape; the rest: slow suite.
@pytest.mark.parametrize(
    "shape,dtype,colsum,config",
    [pytest.param(shape, dtype, colsum, config, id=f"{shape}-{dtype.__name__}-{colsum}-{config}",
                  marks=() if shape[1] == 118800 and config == configs[0] else pytest.mark.slow)
     for shape, dtype in [((1, 32760, 24, 128), jnp.bfloat16), ((1, 118800, 24, 128), jnp.bfloat16),
                          ((2, 4608, 24, 64), jnp.float16)]
     for colsum, configs in [(False, at.PRODUCTION_DENSE_CONFIGS), (True, at.PRODUCTION_COLSUM_CONFIGS)]
     for config in configs])
def test_production_configs_compile_for_sm90(shape, dtype, colsum, config):
    compiled = at.compile_for_sm90(shape, shape, dtype, colsum=colsum, config=config)
    ptx = compiled.asm["ptx"]
    assert compiled.metadata.shared <= tc.MAX_SHARED_BYTES
    assert compiled.metadata.num_warps == config.num_warps
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    assert ("red.global" in ptx or "atom.global" in ptx) == colsum  # colsum: fp32 atomics into the group sums
