"""CUDA lowering tests on CPU: every production block configuration of the attention kernels lowers to the
Triton custom call for an H100 (reproduces GPU-only lowering errors: power-of-2 shapes, scalar prefetch)."""

import jax
import jax.numpy as jnp
import pytest

from chipmunk_jax.pallas_kernels import attention_pallas as ap
from helpers import lower_for_h100, slow_beyond


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


# Production-like shapes: odd N (Hunyuan 118,800 is not a multiple of 128 or 192), H=24, D=128, bf16.
N, H, D = 118_800, 24, 128
G = -(-N // 192)


@pytest.mark.parametrize("config", ap.PRODUCTION_DENSE_CONFIGS, ids=str)
def test_dense_lowers_for_cuda(config):
    x = _sds((1, N, H, D), jnp.bfloat16)
    text = lower_for_h100(lambda q, k, v: ap.dense_attention(q, k, v, scale=D**-0.5, config=config), x, x, x)
    assert "xla.gpu.triton" in text and "chipmunk_dense" in text


@pytest.mark.parametrize("config", ap.PRODUCTION_COLSUM_CONFIGS, ids=str)
def test_colsum_lowers_for_cuda(config):
    x = _sds((1, N, H, D), jnp.bfloat16)
    lse = _sds((1, H, N), jnp.float32)
    text = lower_for_h100(
        lambda q, k, v, l: ap.dense_attention_colsum(q, k, v, l, group_size=192, scale=D**-0.5, config=config),
        x, x, x, lse,
    )
    assert "xla.gpu.triton" in text and "chipmunk_dense_colsum" in text


# Fast suite: DEFAULT_SPARSE and SMALL_GRID_SPARSE (the first two); the other configurations: slow suite.
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("config", slow_beyond(ap.PRODUCTION_SPARSE_CONFIGS, 2), ids=str)
def test_sparse_lowers_for_cuda(config, with_base):
    x = _sds((1, N, H, D), jnp.bfloat16)
    kmax = 8320
    idx = _sds((1, H, G, kmax), jnp.int32)
    cnt = _sds((1, H, G), jnp.int32)
    if with_base:
        f = lambda q, k, v, i, c, b: ap.column_sparse_attention(
            q, k, v, i, c, group_size=192, scale=D**-0.5, base=b, sign=-1, config=config)
        text = lower_for_h100(f, x, x, x, idx, cnt, x)
        # base is read, never aliased: an alias made XLA copy the live attention cache before every sparse step
        assert "output_operand_alias" not in text
    else:
        f = lambda q, k, v, i, c: ap.column_sparse_attention(
            q, k, v, i, c, group_size=192, scale=D**-0.5, config=config)
        text = lower_for_h100(f, x, x, x, idx, cnt)
    assert "xla.gpu.triton" in text and "chipmunk_column_sparse" in text


def test_f32_small_group_lowers_for_cuda():
    """f32 (HIGHEST dots) and a group size that is not a multiple of 64 also lower."""
    x = _sds((2, 301, 3, 64), jnp.float32)
    idx = _sds((2, 3, -(-301 // 100), 50), jnp.int32)
    cnt = _sds((2, 3, -(-301 // 100)), jnp.int32)
    text = lower_for_h100(
        lambda q, k, v, i, c: ap.column_sparse_attention(q, k, v, i, c, group_size=100, scale=0.125), x, x, x, idx, cnt
    )
    assert "xla.gpu.triton" in text
    lse = _sds((2, 3, 301), jnp.float32)
    text = lower_for_h100(
        lambda q, k, v, l: ap.dense_attention_colsum(q, k, v, l, group_size=100, scale=0.125), x, x, x, lse
    )
    assert "xla.gpu.triton" in text
