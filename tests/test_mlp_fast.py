"""Faster sparse-MLP pieces on CPU (interpret mode vs references): the exp-form GELU of the fc1 epilogue, the
fc1 chunk-stride grid (expected_count), the block pre-activation kernel, the fused selection, and the
pre-transposed W1 layout of chipmunk_jax.mlp (issue 4)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax import config as C
from chipmunk_jax import selection as S
from chipmunk_jax.mlp import MLPWeights, dense_mlp, expected_feature_count, init_mlp_cache, sparse_delta_mlp
from chipmunk_jax.pallas_kernels import mlp as mlp_op
from chipmunk_jax.pallas_kernels import mlp_pallas, mlp_selection
from chipmunk_jax.pallas_kernels import mlp_reference as ref
from chipmunk_jax.schedule import MLPStep as M
from chipmunk_jax.schedule import mlp_step_kind

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
warnings.filterwarnings("ignore", category=DeprecationWarning)

_HI = jax.lax.Precision.HIGHEST


def _rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_exp_form_gelu_matches_tanh_form():
    z = jnp.concatenate([jnp.linspace(-40.0, 40.0, 4001), 3 * jax.random.normal(jax.random.key(0), (4000,))])
    got = np.asarray(mlp_pallas._gelu_tanh(z), np.float64)
    zd = np.asarray(z, np.float64)
    want = 0.5 * zd * (1 + np.tanh(np.sqrt(2 / np.pi) * (zd + 0.044715 * zd**3)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)
    assert _rel(mlp_pallas._gelu_tanh(z), jax.nn.gelu(z, approximate=True)) <= 1e-6


# ---- fc1 with a chunk-stride grid ---------------------------------------------------------------------------


def _problem(seed, *, b, n, c, f, c_out, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (b, n, c))
    w1 = jax.random.normal(ks[1], (c, f)) / np.sqrt(c)
    b1 = 0.5 * jax.random.normal(ks[2], (f,))
    w2 = jax.random.normal(ks[3], (f, c_out)) / np.sqrt(f)
    act = ref.gelu_tanh(jax.random.normal(ks[4], (b, f, n)))
    out = jnp.einsum("bfn,fc->bnc", act, w2, precision=_HI)
    return [a.astype(dtype) for a in (x, w1, b1, w2, act, out)]


def _selection(seed, b, nb, f, counts):
    keys = jax.random.split(jax.random.key(seed), b * nb)
    perms = jnp.stack([jax.random.permutation(k, f) for k in keys]).reshape(b, nb, f).astype(jnp.int32)
    return perms, jnp.asarray(counts, jnp.int32).reshape(b, nb)


@pytest.mark.parametrize("expected", [0, 64, 100, 200])
def test_fc1_expected_count_grid_matches_reference(expected):
    """Counts above, at and below the hint (programs loop over further chunks), count 0, N % 128 != 0."""
    b, n, c, f, c_out = 2, 200, 64, 256, 48
    x, w1, b1, w2, act, out = _problem(expected + 1, b=b, n=n, c=c, f=f, c_out=c_out)
    idx, cnt = _selection(expected + 2, b, 2, f, [[256, 0], [65, 130]])
    tiles = mlp_pallas.MlpTiles(fc1_features=64, fc1_k=32, fc2_k=32, fc2_cols=16)
    got = mlp_op.sparse_mlp_delta(x, w1.T, b1, w2, act, out, idx, cnt, impl="interpret", w1_transposed=True,
                                  tiles=tiles, expected_count=expected)
    want = mlp_op.sparse_mlp_delta(x, w1, b1, w2, act, out, idx, cnt, impl="reference")
    assert mlp_pallas.fc1_chunk_programs(256, 64, expected) == max(1, -(-expected // 64))
    for g, w in zip(got, want):
        assert _rel(g, w) <= 1e-5
    assert _rel(got[1] - out, want[1] - out) <= 1e-4


def test_fc1_expected_count_bad_raises():
    with pytest.raises(ValueError, match="expected_count"):
        mlp_pallas.fc1_chunk_programs(256, 64, -1)
    assert mlp_pallas.fc1_chunk_programs(256, 64, None) == 4
    assert mlp_pallas.fc1_chunk_programs(256, 64, 10_000) == 4


# ---- block pre-activation kernel ----------------------------------------------------------------------------


@pytest.mark.parametrize("w1_transposed", [False, True])
@pytest.mark.parametrize("b, nb, dtype, tol", [(1, 3, jnp.float32, 1e-5), (2, 130, jnp.float32, 1e-5),
                                               (1, 20, jnp.bfloat16, 1e-5)])
def test_block_preactivation_matches_reference(w1_transposed, b, nb, dtype, tol):
    c, f = 96, 192
    ks = jax.random.split(jax.random.key(nb), 3)
    means = jax.random.normal(ks[0], (b, nb, c)).astype(dtype)
    w1 = (jax.random.normal(ks[1], (c, f)) / 8).astype(dtype)
    w1 = w1.T if w1_transposed else w1
    b1 = jax.random.normal(ks[2], (f,)).astype(dtype)
    tiles = mlp_selection.ScoreTiles(features=64, k=32)
    got = mlp_selection.block_preactivation(means, w1, b1, w1_transposed=w1_transposed, impl="interpret",
                                            tiles=tiles)
    want = mlp_selection.block_preactivation(means, w1, b1, w1_transposed=w1_transposed, impl="reference")
    assert got.shape == (b, nb, f) and got.dtype == jnp.float32
    assert _rel(got, want) <= tol


def test_block_preactivation_bad_inputs_raise():
    means = jnp.ones((1, 2, 32))
    with pytest.raises(ValueError, match="does not match"):
        mlp_selection.block_preactivation(means, jnp.ones((64, 16)), jnp.ones(64))
    with pytest.raises(ValueError, match="b1"):
        mlp_selection.block_preactivation(means, jnp.ones((32, 64)), jnp.ones(63))
    with pytest.raises(ValueError, match="power of two"):
        mlp_selection.ScoreTiles(features=48)


# ---- fused selection ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 5, 150, 300])
@pytest.mark.parametrize("with_extra", [False, True])
def test_fused_selection_matches_reference_and_lead_path(keep, with_extra):
    kz, kb, ke = jax.random.split(jax.random.key(keep + 7 * with_extra), 3)
    z = jax.random.normal(kz, (2, 3, 300))
    base = jax.random.normal(kb, (2, 3, 300))
    extra = jax.random.bernoulli(ke, 0.05, z.shape) if with_extra else None
    got = mlp_selection.select_from_preactivation(z, base, keep, 64, extra=extra, impl="interpret")
    want = mlp_selection.select_from_preactivation(z, base, keep, 64, extra=extra, impl="reference")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # The lead's unfused path: scores, select, indices_to_mask, where.
    idx, cnt = mlp_selection.select_top_features(jnp.abs(z - base), keep, 64, extra=extra, impl="reference")
    recomputed = S.indices_to_mask(idx, cnt, 300)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(idx))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(cnt))
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(jnp.where(recomputed, z, base)))


def test_fused_selection_bad_inputs_raise():
    with pytest.raises(ValueError, match="base"):
        mlp_selection.select_from_preactivation(jnp.ones((2, 8)), jnp.ones((2, 9)), 3, 4)
    with pytest.raises(TypeError, match="base"):
        mlp_selection.select_from_preactivation(jnp.ones((2, 8)), jnp.ones((2, 8), jnp.int32), 3, 4)


# ---- chipmunk_jax.mlp with W1 stored [F, C] ------------------------------------------------------------------

B, N, CIN, F, COUT = 2, 300, 16, 256, 32


def _weights(seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return MLPWeights(
        w1=jax.random.normal(ks[0], (CIN, F)) / 4,
        b1=0.1 * jax.random.normal(ks[1], (F,)),
        w2=jax.random.normal(ks[2], (F, COUT)) / 16,
        b2=0.1 * jax.random.normal(ks[3], (COUT,)),
    )


def _x(step):
    x0 = jax.random.normal(jax.random.PRNGKey(0), (B, N, CIN))
    return x0 + 0.05 * step * jax.random.normal(jax.random.PRNGKey(1000 + step), x0.shape)


def _cfg(**mlp):
    base = dict(enabled=True, first_n_dense_layers=0, counts_multiple_of=64, top_keys=0.3, random_keys=0.05,
                full_step_every=20)
    base.update(mlp)
    return C.ChipmunkConfig(mlp=C.MLPConfig(**base))


def _steps(cfg, w, steps, impl):
    cache = init_mlp_cache(cfg, batch=B, seq_len=N, in_features=CIN, hidden_features=F, out_features=COUT,
                           dtype=jnp.float32)
    outs = []
    for step in range(steps):
        y, cache = sparse_delta_mlp(_x(step), w, cache, mlp_step_kind(cfg, step, 0), cfg,
                                    key=jax.random.PRNGKey(step), impl=impl)
        outs.append((y, cache))
    return outs


def test_mlp_weights_w1_transposed_is_static():
    w = _weights(0)
    wt = w.with_w1_transposed()
    assert wt.w1.shape == (F, CIN) and wt.w1_transposed and wt.hidden_features == w.hidden_features == F
    assert wt.with_w1_transposed() is wt
    leaves, treedef = jax.tree_util.tree_flatten(wt)
    assert len(leaves) == 4  # w1, b1, w2, b2: the flag is part of the treedef
    assert jax.tree_util.tree_unflatten(treedef, leaves).w1_transposed
    assert _rel(dense_mlp(_x(0), wt), dense_mlp(_x(0), w)) <= 1e-6


def test_pretransposed_w1_same_results_over_all_step_kinds():
    cfg = _cfg()
    w = _weights(1)
    kinds = {mlp_step_kind(cfg, s, 0) for s in range(14)}
    assert kinds == {M.DENSE, M.SPARSE_SELECT, M.SPARSE_REUSE}
    a = _steps(cfg, w, 14, "reference")
    b = _steps(cfg, w.with_w1_transposed(), 14, "reference")
    for (ya, ca), (yb, cb) in zip(a, b):
        assert _rel(yb, ya) <= 1e-6
        np.testing.assert_array_equal(np.asarray(cb.indices), np.asarray(ca.indices))
        assert _rel(cb.blockmean_cache, ca.blockmean_cache) <= 1e-6


def test_interpret_op_matches_reference_op_with_pretransposed_w1():
    """Pallas path (block pre-activation kernel + fused selection + fc1 with expected_count + fc2) in
    interpret mode vs the reference path, over DENSE, SPARSE_SELECT and SPARSE_REUSE steps."""
    cfg = _cfg(mask_cache_after_step=3, block_mask_cache=2)
    w = _weights(2)
    a = _steps(cfg, w, 6, "reference")
    b = _steps(cfg, w.with_w1_transposed(), 6, "interpret")
    for step, ((ya, ca), (yb, cb)) in enumerate(zip(a, b)):
        assert _rel(yb, ya) <= 1e-5, step
        np.testing.assert_array_equal(np.asarray(cb.counts), np.asarray(ca.counts))
        np.testing.assert_array_equal(np.asarray(cb.indices), np.asarray(ca.indices))
        assert _rel(cb.blockmean_cache, ca.blockmean_cache) <= 1e-5, step
        implied = jnp.einsum("bfn,fc->bnc", cb.act_cache, w.w2, precision="highest") + w.b2
        assert _rel(cb.out_cache, implied) <= 1e-5, step


def _transposes_of(jaxpr, shape):
    """transpose equations (in jaxpr and every sub-jaxpr) whose operand has the given shape."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "transpose" and any(getattr(v.aval, "shape", None) == shape for v in eqn.invars):
            found.append(eqn)
        for param in eqn.params.values():
            for j in (param if isinstance(param, (tuple, list)) else (param,)):
                inner = j if hasattr(j, "eqns") else getattr(j, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    found += _transposes_of(inner, shape)
    return found


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_pretransposed_w1_is_never_transposed(impl):
    cfg = _cfg()
    wt = _weights(3).with_w1_transposed()
    cache = init_mlp_cache(cfg, batch=B, seq_len=N, in_features=CIN, hidden_features=F, out_features=COUT,
                           dtype=jnp.float32)
    for kind in (M.ALWAYS_DENSE, M.DENSE, M.SPARSE_SELECT, M.SPARSE_REUSE):
        jaxpr = jax.make_jaxpr(
            lambda x, w, c, k=kind: sparse_delta_mlp(x, w, c, k, cfg, key=jax.random.PRNGKey(0), impl=impl)
        )(_x(0), wt, cache).jaxpr
        assert not _transposes_of(jaxpr, (F, CIN)), kind
    # The default layout on the Pallas path does transpose W1 (the cost the [F, C] layout avoids).
    if impl == "interpret":
        jaxpr = jax.make_jaxpr(lambda x, w, c: sparse_delta_mlp(x, w, c, M.SPARSE_REUSE, cfg, impl=impl))(
            _x(0), _weights(3), cache).jaxpr
        assert _transposes_of(jaxpr, (CIN, F))


def test_expected_feature_count():
    assert expected_feature_count(0.3, 0.0, 12288, 128) == 3712
    assert expected_feature_count(0.3, 0.05, 12288, 256) == 4352  # 3686 + 430 + 3 sigma (60) -> 4176 -> 4352
    assert expected_feature_count(1.0, 0.05, 256, 64) == 256


def test_wrong_layout_flag_raises():
    cfg = _cfg()
    w = _weights(4)
    cache = init_mlp_cache(cfg, batch=B, seq_len=N, in_features=CIN, hidden_features=F, out_features=COUT)
    with pytest.raises(ValueError, match="w1 must be"):
        sparse_delta_mlp(_x(0), w.replace(w1_transposed=True), cache, M.DENSE, cfg)
    with pytest.raises(TypeError, match="w1_transposed"):
        sparse_delta_mlp(_x(0), w.replace(w1_transposed=1), cache, M.DENSE, cfg)
