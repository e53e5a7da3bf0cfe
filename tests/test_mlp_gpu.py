"""Sparse-delta MLP kernels compiled on the GPU vs the pure-jnp reference (skipped without a CUDA GPU).

    source benchmarks/gpu_env.sh && python3 -P -m pytest -q tests/test_mlp_gpu.py
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax.pallas_kernels import mlp as mlp_op
from chipmunk_jax.pallas_kernels import mlp_pallas
from chipmunk_jax.pallas_kernels import mlp_selection, triton_call
from helpers import mlp_problem, random_feature_sets, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

_HI = jax.lax.Precision.HIGHEST


def _problem(seed, b, n, c, f, c_out, dtype):
    """(x, w1, b1, w2, b2, act, out) of helpers.mlp_problem."""
    return list(mlp_problem(seed, b=b, n=n, c=c, f=f, c_out=c_out, dtype=dtype).values())


def _step(x, w1, b1, w2, act, out, idx, cnt, impl):
    fn = jax.jit(
        lambda *a: mlp_op.sparse_mlp_delta(*a, impl=impl, w1_transposed=True), donate_argnums=(4, 5)
    )
    return fn(x, w1.T, b1, w2, jnp.array(act), jnp.array(out), idx, cnt)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_compiled_matches_reference(dtype, tol):
    b, n, c, f, c_out = 2, 1000, 256, 1024, 192  # N not a multiple of 128; C_out not a power of two
    x, w1, b1, w2, _, act, out = _problem(1, b, n, c, f, c_out, dtype)
    counts = [[256, 0, 1, 1024, 130, 512, 77, 384], [128, 3, 1000, 256, 0, 640, 200, 17]]
    idx, cnt = random_feature_sets(2, b, 8, f, counts)
    act_k, out_k = _step(x, w1, b1, w2, act, out, idx, cnt, "pallas")
    act_r, out_r = _step(x, w1, b1, w2, act, out, idx, cnt, "reference")
    chex.assert_shape([act_k, out_k], [(b, f, n), (b, n, c_out)])
    chex.assert_type([act_k, out_k], dtype)
    assert not np.isnan(np.asarray(out_k, np.float32)).any()
    assert rel_error(out_k, out_r) <= tol
    assert rel_error(act_k, act_r) <= tol
    if dtype == jnp.float32:
        assert rel_error(out_k - out, out_r - out) <= 1e-4


def test_padding_slots_with_duplicate_ids_are_ignored_on_gpu():
    b, n, c, f, c_out = 1, 512, 128, 512, 128
    x, w1, b1, w2, _, act, out = _problem(3, b, n, c, f, c_out, jnp.float32)
    idx, cnt = random_feature_sets(4, b, 4, f, [[100, 200, 37, 0]])
    dup = jnp.concatenate([idx[..., :256], idx[..., :256]], axis=-1)  # slots past counts repeat selected ids
    act_k, out_k = _step(x, w1, b1, w2, act, out, dup, cnt, "pallas")
    act_r, out_r = _step(x, w1, b1, w2, act, out, idx, cnt, "reference")
    assert rel_error(out_k, out_r) <= 1e-5
    assert rel_error(act_k, act_r) <= 1e-5


def test_invariant_after_several_sparse_steps_on_gpu():
    b, n, c, f, c_out = 1, 640, 256, 1024, 256
    x, w1, b1, w2, b2, act, out = _problem(5, b, n, c, f, c_out, jnp.float32)
    fn = jax.jit(
        lambda *a: mlp_op.sparse_mlp_delta(*a, impl="pallas", w1_transposed=True), donate_argnums=(4, 5)
    )
    for s in range(4):
        xs = x + 0.3 * jax.random.normal(jax.random.key(10 + s), x.shape)
        idx, cnt = random_feature_sets(20 + s, b, 5, f, [[256 + 128 * s, 128, 384, 0, 1024]])
        act, out = fn(xs, w1.T, b1, w2, act, out, idx, cnt)
    expected = jnp.einsum("bfn,fc->bnc", act, w2, precision=_HI) + b2
    assert rel_error(out, expected) <= 1e-5


def test_flux_shape_step_bf16_with_selection():
    n, c, f = 4096, 3072, 12288
    x, w1, b1, w2, _, act, out = _problem(6, 1, n, c, f, c, jnp.bfloat16)
    scores = jax.random.uniform(jax.random.key(7), (1, n // 128, f))
    idx_k, cnt_k = mlp_selection.select_top_features(scores, 3686, 128, impl="pallas")
    idx_r, cnt_r = mlp_selection.select_top_features(scores, 3686, 128, impl="reference")
    chex.assert_trees_all_equal((idx_k, cnt_k), (idx_r, cnt_r))
    act_k, out_k = _step(x, w1, b1, w2, act, out, idx_k, cnt_k, "pallas")
    act_r, out_r = _step(x, w1, b1, w2, act, out, idx_k, cnt_k, "reference")
    assert rel_error(out_k, out_r) <= 1e-2
    assert rel_error(out_k - out, out_r - out) <= 2e-2
    assert rel_error(act_k, act_r) <= 1e-2


def test_selection_compiled_with_random_features():
    scores = jax.random.normal(jax.random.key(8), (2, 36, 13_824))
    extra = jax.random.bernoulli(jax.random.key(9), 0.035, scores.shape)
    idx_k, cnt_k = mlp_selection.select_top_features(scores, 4147, 256, extra=extra, impl="pallas")
    idx_r, cnt_r = mlp_selection.select_top_features(scores, 4147, 256, extra=extra, impl="reference")
    chex.assert_trees_all_equal((idx_k, cnt_k), (idx_r, cnt_r))


# ---- issue 4: fused selection, W1 stored [F, C] -----------------------------------------------------------


@pytest.mark.parametrize("num_warps", [8, 16])
def test_fused_selection_compiled(num_warps):
    z = jax.random.normal(jax.random.key(30), (1, 36, 12288))
    base = jax.random.normal(jax.random.key(31), z.shape)
    extra = jax.random.bernoulli(jax.random.key(32), 0.035, z.shape)
    got = jax.jit(lambda z, b, e: mlp_selection.select_from_preactivation(
        z, b, 3686, 256, extra=e, impl="pallas", num_warps=num_warps), donate_argnums=(1,))(z, jnp.array(base), extra)
    want = mlp_selection.select_from_preactivation(z, base, 3686, 256, extra=extra, impl="reference")
    chex.assert_trees_all_equal(tuple(got), tuple(want))


def test_model_op_pallas_matches_reference_with_pretransposed_w1():
    from chipmunk_jax import config as C
    from chipmunk_jax.mlp import MLPWeights, init_mlp_cache, sparse_delta_mlp
    from chipmunk_jax.schedule import mlp_step_kind

    b, n, c, f, c_out = 1, 640, 256, 1024, 256
    x, w1, b1, w2, b2, _, _ = _problem(40, b, n, c, f, c_out, jnp.float32)
    w = MLPWeights(w1=w1, b1=b1, w2=w2, b2=b2)
    wt = w.with_w1_transposed()
    cfg = C.ChipmunkConfig(mlp=C.MLPConfig(enabled=True, first_n_dense_layers=0, top_keys=0.3, random_keys=0.05,
                                           counts_multiple_of=128, mask_cache_after_step=3))
    caches = [init_mlp_cache(cfg, batch=b, seq_len=n, in_features=c, hidden_features=f, out_features=c_out,
                             dtype=jnp.float32) for _ in range(2)]
    for step in range(6):
        xs = x + 0.2 * step * jax.random.normal(jax.random.key(50 + step), x.shape)
        kind = mlp_step_kind(cfg, step, 0)
        y_r, caches[0] = sparse_delta_mlp(xs, w, caches[0], kind, cfg, key=jax.random.key(step), impl="reference")
        y_k, caches[1] = sparse_delta_mlp(xs, wt, caches[1], kind, cfg, key=jax.random.key(step), impl="pallas")
        assert rel_error(y_k, y_r) <= 1e-5, step
        np.testing.assert_array_equal(np.asarray(caches[1].indices), np.asarray(caches[0].indices))


# ---- mlp_triton: the Triton (TMA) kernels ----------------------------------------------------------------

from chipmunk_jax.pallas_kernels import mlp_triton  # noqa: E402


@pytest.mark.parametrize("config", mlp_triton.PRODUCTION_CONFIGS, ids=str)
def test_triton_compiled_matches_reference(config):
    b, n, c, f, c_out = 2, 1000, 256, 1024, 192  # N not a multiple of 128; C_out not a power of two
    x, w1, b1, w2, _, act, out = _problem(60, b, n, c, f, c_out, jnp.bfloat16)
    counts = [[256, 0, 1, 1024, 130, 512, 77, 384], [128, 3, 1000, 256, 0, 640, 200, 17]]
    idx, cnt = random_feature_sets(61, b, 8, f, counts)
    fn = jax.jit(lambda *a: mlp_op.sparse_mlp_delta(*a, impl="triton", w1_transposed=True, tiles=config),
                 donate_argnums=(4, 5))
    act_k, out_k = fn(x, w1.T, b1, w2, jnp.array(act), jnp.array(out), idx, cnt)
    act_r, out_r = _step(x, w1, b1, w2, act, out, idx, cnt, "reference")
    assert not np.isnan(np.asarray(out_k, np.float32)).any()
    assert rel_error(act_k, act_r) <= 1e-2
    assert rel_error(out_k - out, out_r - out) <= 2e-2


def test_triton_flux_shape_step_and_invariant():
    n, c, f = 4096, 3072, 12288
    x, w1, b1, w2, b2, act, out = _problem(62, 1, n, c, f, c, jnp.bfloat16)
    fn = jax.jit(lambda *a: mlp_op.sparse_mlp_delta(*a, impl="triton", w1_transposed=True), donate_argnums=(4, 5))
    w1t = jnp.asarray(w1.T)
    for s in range(3):
        scores = jax.random.uniform(jax.random.key(63 + s), (1, n // 128, f))
        idx, cnt = mlp_selection.select_top_features(scores, 3686, 128, impl="pallas")
        xs = x + 0.3 * jax.random.normal(jax.random.key(70 + s), x.shape, jnp.bfloat16)
        if s == 0:
            act_r, out_r = _step(xs, w1, b1, w2, act, out, idx, cnt, "reference")
        act, out_new = fn(xs, w1t, b1, w2, act, jnp.array(out), idx, cnt)
        if s == 0:
            assert rel_error(out_new - out, out_r - out) <= 2e-2
            assert rel_error(act, act_r) <= 1e-2
        out = out_new
    expected = jnp.einsum("bfn,fc->bnc", act.astype(jnp.float32), w2.astype(jnp.float32), precision=_HI) + b2
    assert rel_error(out, expected) <= 1e-2  # out_cache == act_cache W2 + b2 after three bf16 steps


def test_default_impl_is_triton_where_it_runs():
    b, n, c, f, c_out = 1, 1000, 256, 1024, 192
    x, w1, b1, w2, _, act, out = _problem(64, b, n, c, f, c_out, jnp.bfloat16)
    hopper = triton_call.platform_unsupported(interpret=False) is None
    assert mlp_op.resolve_mlp_impl(None, x, w1, w2, 128) == ("triton" if hopper else "pallas")
    assert mlp_op.resolve_mlp_impl(None, x, w1, w2, 128, mlp_pallas.MlpTiles()) == "pallas"
    assert mlp_op.resolve_mlp_impl(None, x, w1, w2, 32) == "pallas"  # no Triton block size 32
    f32 = [a.astype(jnp.float32) for a in (x, w1, w2)]
    assert mlp_op.resolve_mlp_impl(None, *f32, 128) == "pallas"
    idx, cnt = random_feature_sets(65, b, 8, f, [[256, 0, 1, 1024, 130, 512, 77, 384]])
    act_k, out_k = _step(x, w1, b1, w2, act, out, idx, cnt, None)
    act_r, out_r = _step(x, w1, b1, w2, act, out, idx, cnt, "reference")
    assert rel_error(act_k, act_r) <= 1e-2
    assert rel_error(out_k - out, out_r - out) <= 2e-2


def test_triton_model_op_inside_a_command_buffer():
    """sparse_delta_mlp with impl='triton' on a SPARSE_SELECT step (block means, the z GEMM, the fused Pallas
    selection, then the Triton kernels): XLA captures this run of commands into a CUDA graph, where the plugin's
    per-launch scratch allocation failed (2026-12-03); triton_call passes the scratch as an XLA buffer instead."""
    from chipmunk_jax import config as C
    from chipmunk_jax.mlp import MLPCache, MLPWeights, sparse_delta_mlp
    from chipmunk_jax.schedule import MLPStep

    b, n, c, f = 1, 2048, 1024, 4096
    x, w1, b1, w2, b2, act, out = _problem(80, b, n, c, f, c, jnp.bfloat16)
    cfg = C.ChipmunkConfig(mlp=C.MLPConfig(enabled=True, top_keys=0.3, random_keys=0.0, counts_multiple_of=128,
                                           first_n_dense_layers=0))
    w = MLPWeights(w1=jnp.asarray(w1.T), b1=b1, w2=w2, b2=b2, w1_transposed=True)
    base = jnp.einsum("bmc,fc->bmf", x[:, ::128].astype(jnp.float32), w.w1.astype(jnp.float32))
    nb = n // 128

    def cache():
        return MLPCache(act_cache=jnp.array(act), out_cache=jnp.array(out), blockmean_cache=jnp.array(base),
                        indices=jnp.zeros((b, nb, f), jnp.int32), counts=jnp.zeros((b, nb), jnp.int32))

    step = lambda impl: jax.jit(lambda cc, xx: sparse_delta_mlp(xx, w, cc, MLPStep.SPARSE_SELECT, cfg, impl=impl),
                                donate_argnums=(0,))
    y_k, c_k = step("triton")(cache(), x)
    y_r, c_r = step("reference")(cache(), x)
    np.testing.assert_array_equal(np.asarray(c_k.counts), np.asarray(c_r.counts))
    assert rel_error(y_k - out, y_r - out) <= 2e-2
    assert rel_error(c_k.act_cache, c_r.act_cache) <= 1e-2


def test_triton_stacked_layers_in_place_under_a_scan():
    """A lax.scan over 3 layers with stacked weights and caches (a model's block scan): each iteration's kernels
    index the stacks by the loop counter and update the cache stack in place; equals three one-layer calls."""
    b, n, c, f, c_out, layers = 1, 1000, 256, 1024, 256, 3
    problems = [_problem(80 + i, b, n, c, f, c_out, jnp.bfloat16) for i in range(layers)]
    w1t, b1, w2, act, out = (jnp.stack([p[i].T if i == 1 else p[i] for p in problems]) for i in (1, 2, 3, 5, 6))
    x = problems[0][0]
    idx, cnt = random_feature_sets(90, b, 8, f, [[256, 0, 1, 1024, 130, 512, 77, 384]])

    def run(act, out):
        def body(carry, i):
            act, out = carry
            return mlp_op.sparse_mlp_delta(x, w1t, b1, w2, act, out, idx, cnt, impl="triton", w1_transposed=True,
                                           weights_layer=i, cache_layer=i), None
        return jax.lax.scan(body, (act, out), jnp.arange(layers, dtype=jnp.int32))[0]

    hlo = jax.jit(run, donate_argnums=(0, 1)).lower(act, out).compile().as_text()
    act_k, out_k = jax.jit(run, donate_argnums=(0, 1))(jnp.array(act), jnp.array(out))
    for i in range(layers):
        act_r, out_r = _step(x, w1t[i].T, b1[i], w2[i], act[i], out[i], idx, cnt, "reference")
        assert rel_error(act_k[i], act_r) <= 1e-2
        assert rel_error(out_k[i] - out[i], out_r - out[i]) <= 2e-2
    for one_layer in ("bf16[1,1024,1000]", "bf16[1,1000,256]", "bf16[1024,256]"):  # act, out, w1t / w2
        assert one_layer not in hlo, f"a layer of a stack is materialized: {one_layer}"
