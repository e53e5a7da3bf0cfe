"""CUDA lowering tests on CPU: the sparse-delta MLP kernels lower to the Triton custom call for an H100 at
every production shape and tile configuration (reproduces GPU-only errors: power-of-2 tiles, scalar prefetch)."""

import functools

import jax
import jax.numpy as jnp
import pytest

from chipmunk_jax.pallas_kernels import mlp_pallas, mlp_selection
from helpers import lower_for_h100, slow_beyond

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# (name, N, C, F, C_out): FLUX 1024^2 double-block image MLP and single-block MLP half, Wan 2.1 14B ffn at
# 480p x 81 frames (N not a multiple of 128).
SHAPES = [
    ("flux_double", 4096, 3072, 12288, 3072),
    ("flux_single", 4608, 3072, 12288, 3072),
    ("wan14b", 32_760, 5120, 13_824, 5120),
]


def _lower_cuda(f, *specs, donate=(4, 5)):
    """HLO text of ``f`` lowered for an H100; ``donate``: the donated arguments (default: the MLP caches)."""
    return lower_for_h100(f, *specs, donate=donate)


# Fast suite: the first production tiling at every shape; the other tilings: slow suite.
@pytest.mark.parametrize("tiles", slow_beyond(mlp_pallas.PRODUCTION_TILES),
                         ids=lambda t: f"bf{t.fc1_features}k{t.fc1_k}w{t.fc1_warps}g{t.row_group}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_sparse_mlp_delta_lowers_for_cuda(shape, tiles):
    _, n, c, f, c_out = shape
    nb = -(-n // 128)
    sds, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
    specs = (
        sds((1, n, c), bf16), sds((f, c), bf16), sds((f,), bf16), sds((f, c_out), bf16),
        sds((1, f, n), bf16), sds((1, n, c_out), bf16), sds((1, nb, f), jnp.int32), sds((1, nb), jnp.int32),
    )
    step = functools.partial(mlp_pallas.sparse_mlp_delta, block_size=128, w1_transposed=True, tiles=tiles)
    text = _lower_cuda(step, *specs)
    assert text.count("xla.gpu.triton") == 2
    assert "chipmunk_mlp_fc1_delta" in text and "chipmunk_mlp_fc2_delta" in text


def test_f32_lowers_for_cuda():
    sds, f32 = jax.ShapeDtypeStruct, jnp.float32
    specs = (
        sds((1, 200, 64), f32), sds((256, 64), f32), sds((256,), f32), sds((256, 64), f32),
        sds((1, 256, 200), f32), sds((1, 200, 64), f32), sds((1, 2, 256), jnp.int32), sds((1, 2), jnp.int32),
    )
    step = functools.partial(mlp_pallas.sparse_mlp_delta, block_size=128, w1_transposed=True)
    assert _lower_cuda(step, *specs).count("xla.gpu.triton") == 2


@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_selection_lowers_for_cuda(shape, with_extra):
    _, n, _, f, _ = shape
    scores = jax.ShapeDtypeStruct((1, -(-n // 128), f), jnp.float32)
    keep = round(0.3 * f)
    if with_extra:
        fn = lambda s, e: mlp_selection.select_top_features(s, keep, 256, extra=e, impl="pallas")
        text = _lower_cuda(fn, scores, jax.ShapeDtypeStruct(scores.shape, jnp.bool_), donate=())
    else:
        fn = lambda s: mlp_selection.select_top_features(s, keep, 256, impl="pallas")
        text = _lower_cuda(fn, scores, donate=())
    assert "xla.gpu.triton" in text and "chipmunk_mlp_select" in text


@pytest.mark.parametrize("num_warps", [8, 16])
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_fused_selection_lowers_for_cuda(shape, with_extra, num_warps):
    _, n, _, f, _ = shape
    z = jax.ShapeDtypeStruct((1, -(-n // 128), f), jnp.float32)
    keep = round(0.3 * f)
    if with_extra:
        fn = lambda z, b, e: mlp_selection.select_from_preactivation(
            z, b, keep, 128, extra=e, impl="pallas", num_warps=num_warps)
        text = _lower_cuda(fn, z, z, jax.ShapeDtypeStruct(z.shape, jnp.bool_), donate=(1,))
    else:
        fn = lambda z, b: mlp_selection.select_from_preactivation(z, b, keep, 128, impl="pallas", num_warps=num_warps)
        text = _lower_cuda(fn, z, z, donate=(1,))
    assert "xla.gpu.triton" in text and "chipmunk_mlp_select" in text
