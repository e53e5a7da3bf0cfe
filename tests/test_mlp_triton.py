"""Triton (TMA) sparse-delta MLP kernels (mlp_triton.py) on CPU: every production configuration in Triton's
interpreter against the reference twin, dispatch and input errors, and sm_90 compiles of every production
configuration at the model shapes. The shared numerics tests (ragged counts, count 0, all features, invariant,
launch orders) run for both kernel families in test_mlp_kernels.py; GPU numerics: test_mlp_gpu.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax.pallas_kernels import mlp as mlp_op
from chipmunk_jax.pallas_kernels import mlp_pallas
from chipmunk_jax.pallas_kernels import mlp_reference as ref
from chipmunk_jax.pallas_kernels import mlp_triton as mt
from chipmunk_jax.pallas_kernels import triton_call as tc
from helpers import slow_beyond

_HI = jax.lax.Precision.HIGHEST
_SEED = iter(range(10_000))


def _key():
    return jax.random.key(np.random.SeedSequence().entropy % (2**31) + next(_SEED))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "NaN/inf in kernel output"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _problem(b, n, c, f, c_out, counts, dtype=jnp.float32, block_size=128):
    ks = jax.random.split(_key(), 8)
    x = jax.random.normal(ks[0], (b, n, c), jnp.float32)
    w1 = jax.random.normal(ks[1], (c, f), jnp.float32) / np.sqrt(c)
    b1 = 0.5 * jax.random.normal(ks[2], (f,), jnp.float32)
    w2 = jax.random.normal(ks[3], (f, c_out), jnp.float32) / np.sqrt(f)
    act = ref.gelu_tanh(jax.random.normal(ks[4], (b, f, n), jnp.float32))
    out = jax.random.normal(ks[5], (b, n, c_out), jnp.float32)
    nb = -(-n // block_size)
    perms = jnp.stack([jax.random.permutation(k, f) for k in jax.random.split(ks[6], b * nb)])
    indices = perms.reshape(b, nb, f).astype(jnp.int32)
    arrays = [a.astype(dtype) for a in (x, w1, b1, w2, act, out)]
    return (*arrays, indices, jnp.asarray(counts, jnp.int32).reshape(b, nb))


# Every production configuration (tokens-major and features-major fc1, 128- and 256-wide tiles, fc2 K steps of
# 64 and 128) on a ragged problem: N = 300 (not a multiple of 128), batch 2, count 0, counts that are not tile
# multiples, all features, C_out = 192 (not a power of 2: the fc2 column tile shrinks to 64).
# Fast suite: the first two configurations (tokens-major and features-major fc1); the others: slow suite.
@pytest.mark.parametrize("config", slow_beyond(mt.PRODUCTION_CONFIGS, 2), ids=str)
def test_production_configs_interpreter_match_reference(config):
    x, w1, b1, w2, act, out, idx, cnt = _problem(2, 300, 64, 512, 192, [[512, 0, 77], [300, 1, 256]])
    act_k, out_k = mlp_op.sparse_mlp_delta(x, w1, b1, w2, act, out, idx, cnt, impl="triton_interpret", tiles=config)
    act_r, out_r = mlp_op.sparse_mlp_delta(x, w1, b1, w2, act, out, idx, cnt, impl="reference")
    assert _rel(act_k, act_r) <= 1e-5
    assert _rel(out_k - out, out_r - out) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("block_size", [64, 256])
def test_other_block_sizes_match_reference(block_size):
    x, w1, b1, w2, act, out, idx, cnt = _problem(1, 520, 32, 256, 32, [[256, 13, 100]] if block_size == 256
                                                 else [[1, 64, 0, 200, 256, 9, 77, 128, 3]], block_size=block_size)
    kw = dict(block_size=block_size)
    act_k, out_k = mlp_op.sparse_mlp_delta(x, w1, b1, w2, act, out, idx, cnt, impl="triton_interpret", **kw)
    act_r, out_r = mlp_op.sparse_mlp_delta(x, w1, b1, w2, act, out, idx, cnt, impl="reference", **kw)
    assert _rel(act_k, act_r) <= 1e-5
    assert _rel(out_k - out, out_r - out) <= 1e-5


def test_kernels_update_caches_in_place_under_donation():
    x, w1, b1, w2, act, out, idx, cnt = _problem(1, 256, 32, 256, 32, [[128, 64]])
    step = jax.jit(lambda a, o: mt.sparse_mlp_delta(x, w1, b1, w2, a, o, idx, cnt, interpret=True),
                   donate_argnums=(0, 1))
    a_in, o_in = jnp.array(act), jnp.array(out)
    a_new, o_new = step(a_in, o_in)
    assert a_in.is_deleted() and o_in.is_deleted()  # donated buffers were consumed (aliased in place)
    act_r, out_r = mlp_op.sparse_mlp_delta(x, w1, b1, w2, act, out, idx, cnt, impl="reference")
    assert _rel(a_new, act_r) <= 1e-5 and _rel(o_new - out, out_r - out) <= 1e-5


def test_dispatch_and_errors():
    x, w1, b1, w2, act, out, idx, cnt = _problem(1, 128, 32, 256, 32, [[64]])
    args = (x, w1, b1, w2, act, out, idx, cnt)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="Hopper GPU"):
            mlp_op.sparse_mlp_delta(*args, impl="triton")
        assert mlp_op.resolve_mlp_impl(None, x, w1, w2, 128) == "reference"
        assert mlp_op.resolve_mlp_impl(None, x, w1, w2, 128, mlp_pallas.MlpTiles()) == "reference"
    with pytest.raises(ValueError, match=r"block_size in \(64, 128, 256\)"):
        mlp_op.sparse_mlp_delta(*args[:6], jnp.zeros((1, 2, 256), jnp.int32), jnp.zeros((1, 2), jnp.int32),
                                impl="triton_interpret", block_size=96)
    with pytest.raises(TypeError, match="TritonMlpConfig"):
        mlp_op.sparse_mlp_delta(*args, impl="triton_interpret", tiles=mlp_pallas.MlpTiles())
    with pytest.raises(TypeError, match="MlpTiles"):
        mlp_op.sparse_mlp_delta(*args, impl="interpret", tiles=mt.TritonMlpConfig())
    with pytest.raises(ValueError, match="impl must be one of"):
        mlp_op.sparse_mlp_delta(*args, impl="cuda")
    with pytest.raises(ValueError, match=r"C \(x's features\) a multiple of 16"):
        mlp_op.sparse_mlp_delta(jnp.ones((1, 128, 40)), jnp.ones((40, 256)), *args[2:], impl="triton_interpret")


@pytest.mark.parametrize("field,value", [("fc1_features", 96), ("fc2_k", 8), ("fc1_warps", 6), ("fc2_cols", 0),
                                         ("fc1_stages", 0), ("fc1_tokens_major", 1), ("row_group", -1),
                                         ("row_group", True), ("fc1_k", True)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match="TritonMlpConfig"):
        mt.TritonMlpConfig(**{field: value})


def test_config_needs_fc1_chunks_that_fc2_steps_divide():
    with pytest.raises(ValueError, match="multiple of fc2_k"):
        mt.TritonMlpConfig(fc1_features=64, fc2_k=128)


# Every production configuration compiles for sm_90 within the H100's shared memory at FLUX's double-block shape
# and at Wan 14B's (N = 32,760: ragged last row block; C = 5120), with TMA token tiles and wgmma.
# The first production configuration at both shapes in the fast suite, the others in the slow suite.
@pytest.mark.parametrize("config", slow_beyond(mt.PRODUCTION_CONFIGS), ids=str)
@pytest.mark.parametrize("shape", [(4096, 3072, 12288, 3072), (32_760, 5120, 13_824, 5120)], ids=str)
def test_production_configs_compile_for_sm90(shape, config):
    n, c, f, c_out = shape
    for compiled, warps in zip(mt.compile_for_sm90((1, n, c), f, c_out, 128, jnp.bfloat16, config=config),
                               (config.fc1_warps, config.fc2_warps)):
        ptx = compiled.asm["ptx"]
        assert compiled.metadata.shared <= tc.MAX_SHARED_BYTES
        assert compiled.metadata.num_warps == warps
        assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
        assert "cp.async.cg.shared.global" in ptx  # the gathered weight rows: 16-byte cp.async


def _stacked_problem(weights_layers: int, cache_layers: int, **kw):
    """_problem with w1 [F, C], b1, w2 stacked over ``weights_layers`` and act / out over ``cache_layers`` (fresh
    random layers around entry 0, the problem's own)."""
    x, w1, b1, w2, act, out, idx, cnt = _problem(**kw)
    noise = lambda a, n: jnp.concatenate([a[None], jax.random.normal(_key(), (n - 1, *a.shape), a.dtype)])  # noqa
    return (x, noise(w1.T, weights_layers), noise(b1, weights_layers), noise(w2, weights_layers),
            noise(act, cache_layers), noise(out, cache_layers), idx, cnt)


@pytest.mark.parametrize("impl", ["triton_interpret", "interpret", "reference"])
def test_stacked_weights_and_caches_match_one_layer(impl):
    """weights_layer / cache_layer (a scan's stacks): the chosen entries give the one-layer result, the other cache
    entries come back untouched (stacks of different lengths, as a model's caches cover only its sparse layers)."""
    x, w1, b1, w2, act, out, idx, cnt = _stacked_problem(4, 3, b=1, n=200, c=32, f=128, c_out=48,
                                                         counts=[[128, 0]])
    wl, cl = 2, 1
    act_s, out_s = mlp_op.sparse_mlp_delta(x, w1, b1, w2, act, out, idx, cnt, impl=impl, w1_transposed=True,
                                           weights_layer=wl, cache_layer=cl)
    act_r, out_r = mlp_op.sparse_mlp_delta(x, w1[wl], b1[wl], w2[wl], act[cl], out[cl], idx, cnt, impl="reference",
                                           w1_transposed=True)
    assert act_s.shape == act.shape and out_s.shape == out.shape
    assert _rel(act_s[cl], act_r) <= 1e-5 and _rel(out_s[cl] - out[cl], out_r - out[cl]) <= 1e-5
    others = np.array([i for i in range(act.shape[0]) if i != cl])
    np.testing.assert_array_equal(act_s[others], act[others])
    np.testing.assert_array_equal(out_s[others], out[others])


def test_stacked_caches_with_one_layer_of_weights_under_jit():
    """Only the caches stacked, the layer traced (a scan's index): in place under donation."""
    x, w1, b1, w2, act, out, idx, cnt = _stacked_problem(1, 3, b=1, n=128, c=32, f=256, c_out=32, counts=[[128]])
    w1, b1, w2 = w1[0], b1[0], w2[0]
    step = jax.jit(lambda a, o, layer: mt.sparse_mlp_delta(x, w1, b1, w2, a, o, idx, cnt, interpret=True,
                                                           w1_transposed=True, cache_layer=layer),
                   donate_argnums=(0, 1))
    a_in, o_in = jnp.array(act), jnp.array(out)
    a_new, o_new = step(a_in, o_in, jnp.int32(2))
    assert a_in.is_deleted() and o_in.is_deleted()
    act_r, out_r = mlp_op.sparse_mlp_delta(x, w1, b1, w2, act[2], out[2], idx, cnt, impl="reference",
                                           w1_transposed=True)
    assert _rel(a_new[2], act_r) <= 1e-5 and _rel(o_new[2] - out[2], out_r - out[2]) <= 1e-5
    np.testing.assert_array_equal(a_new[:2], act[:2])


def test_stacked_operand_errors():
    x, w1, b1, w2, act, out, idx, cnt = _stacked_problem(3, 2, b=1, n=128, c=32, f=256, c_out=32, counts=[[64]])
    kw = dict(w1_transposed=True, impl="reference")
    with pytest.raises(ValueError, match="pass weights_layer="):
        mlp_op.sparse_mlp_delta(x, w1, b1, w2, act, out, idx, cnt, cache_layer=0, **kw)
    with pytest.raises(ValueError, match="pass cache_layer="):
        mlp_op.sparse_mlp_delta(x, w1, b1, w2, act, out, idx, cnt, weights_layer=0, **kw)
    with pytest.raises(ValueError, match=r"weights_layer must be in \[0, 3\), got 3"):
        mlp_op.sparse_mlp_delta(x, w1, b1, w2, act, out, idx, cnt, weights_layer=3, cache_layer=0, **kw)
    with pytest.raises(ValueError, match=r"cache_layer must be in \[0, 2\), got -1"):
        mlp_op.sparse_mlp_delta(x, w1, b1, w2, act, out, idx, cnt, weights_layer=0, cache_layer=-1, **kw)
    with pytest.raises(TypeError, match="cache_layer must be an integer scalar"):
        mlp_op.sparse_mlp_delta(x, w1, b1, w2, act, out, idx, cnt, weights_layer=0, cache_layer=1.0, **kw)
    with pytest.raises(ValueError, match="share their leading layer axis"):
        mlp_op.sparse_mlp_delta(x, w1, b1[:2], w2, act, out, idx, cnt, weights_layer=0, cache_layer=0, **kw)
    with pytest.raises(ValueError, match="cache_layer= is for act_cache / out_cache stacked"):
        mlp_op.sparse_mlp_delta(x, w1, b1, w2, act[0], out[0], idx, cnt, weights_layer=0, cache_layer=0, **kw)
    with pytest.raises(ValueError, match="act_cache must be"):  # one layer's shapes are still checked
        mlp_op.sparse_mlp_delta(x, w1, b1, w2, act[:, :, :128], out, idx, cnt, weights_layer=0, cache_layer=0, **kw)


def test_stacked_variant_compiles_for_sm90():
    """The layer-indexed kernels (stacked weights and caches) compile at FLUX's single-block shape with TMA."""
    for compiled in mt.compile_for_sm90((1, 4608, 3072), 12288, 3072, 128, jnp.bfloat16, stacked=True):
        assert compiled.metadata.shared <= tc.MAX_SHARED_BYTES
        assert "wgmma.mma_async" in compiled.asm["ptx"] and "cp.async.bulk.tensor" in compiled.asm["ptx"]
