"""Sparse-MLP pieces of issue 4 on CPU (interpret mode vs references): the fused selection kernel
(scores + top-k + baseline update) and the pre-transposed W1 layout ([F, C]) of chipmunk_jax.mlp."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax import config as C
from chipmunk_jax import selection as S
from chipmunk_jax.mlp import dense_mlp, init_mlp_cache, sparse_delta_mlp
from chipmunk_jax.pallas_kernels import mlp_selection
from chipmunk_jax.schedule import MLPStep as M
from chipmunk_jax.schedule import mlp_step_kind
from helpers import drifting_x, mlp_weights, rel_error

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
warnings.filterwarnings("ignore", category=DeprecationWarning)


# ---- fused selection ----------------------------------------------------------------------------------------


# Fast suite: keep 150 (with and without extra); keep 0, 5 and 300: slow suite.
@pytest.mark.parametrize("keep", [pytest.param(k, marks=pytest.mark.slow) if k != 150 else k for k in (0, 5, 150, 300)])
@pytest.mark.parametrize("with_extra", [False, True])
def test_fused_selection_matches_reference_and_lead_path(keep, with_extra):
    kz, kb, ke = jax.random.split(jax.random.key(keep + 7 * with_extra), 3)
    z = jax.random.normal(kz, (2, 3, 300))
    base = jax.random.normal(kb, (2, 3, 300))
    extra = jax.random.bernoulli(ke, 0.05, z.shape) if with_extra else None
    got = mlp_selection.select_from_preactivation(z, base, keep, 64, extra=extra, impl="interpret")
    want = mlp_selection.select_from_preactivation(z, base, keep, 64, extra=extra, impl="reference")
    chex.assert_trees_all_equal(tuple(got), tuple(want))
    # The lead's unfused path: scores, select, indices_to_mask, where.
    idx, cnt = mlp_selection.select_top_features(jnp.abs(z - base), keep, 64, extra=extra, impl="reference")
    recomputed = S.indices_to_mask(idx, cnt, 300)
    chex.assert_trees_all_equal(tuple(got), (idx, cnt, jnp.where(recomputed, z, base)))


def test_fused_selection_bad_inputs_raise():
    with pytest.raises(ValueError, match="base"):
        mlp_selection.select_from_preactivation(jnp.ones((2, 8)), jnp.ones((2, 9)), 3, 4)
    with pytest.raises(TypeError, match="base"):
        mlp_selection.select_from_preactivation(jnp.ones((2, 8)), jnp.ones((2, 8), jnp.int32), 3, 4)


# ---- chipmunk_jax.mlp with W1 stored [F, C] ------------------------------------------------------------------

B, N, CIN, F, COUT = 2, 300, 16, 256, 32


def _weights(seed):
    return mlp_weights(seed, CIN, F, COUT)


def _x(step):
    return drifting_x(step, (B, N, CIN))


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
    chex.assert_shape(wt.w1, (F, CIN))
    assert wt.w1_transposed and wt.hidden_features == w.hidden_features == F
    assert wt.with_w1_transposed() is wt
    leaves, treedef = jax.tree_util.tree_flatten(wt)
    assert len(leaves) == 4  # w1, b1, w2, b2: the flag is part of the treedef
    assert jax.tree_util.tree_unflatten(treedef, leaves).w1_transposed
    assert rel_error(dense_mlp(_x(0), wt), dense_mlp(_x(0), w)) <= 1e-6


@pytest.mark.slow
def test_pretransposed_w1_same_results_over_all_step_kinds():
    cfg = _cfg()
    w = _weights(1)
    kinds = {mlp_step_kind(cfg, s, 0) for s in range(14)}
    assert kinds == {M.DENSE, M.SPARSE_SELECT, M.SPARSE_REUSE}
    a = _steps(cfg, w, 14, "reference")
    b = _steps(cfg, w.with_w1_transposed(), 14, "reference")
    for (ya, ca), (yb, cb) in zip(a, b):
        assert rel_error(yb, ya) <= 1e-6
        np.testing.assert_array_equal(np.asarray(cb.indices), np.asarray(ca.indices))
        assert rel_error(cb.blockmean_cache, ca.blockmean_cache) <= 1e-6


@pytest.mark.slow
def test_interpret_op_matches_reference_op_with_pretransposed_w1():
    """Pallas path (fused selection + fc1 + fc2 kernels) in interpret mode vs the reference path, over DENSE,
    SPARSE_SELECT and SPARSE_REUSE steps."""
    cfg = _cfg(mask_cache_after_step=3, block_mask_cache=2)
    w = _weights(2)
    a = _steps(cfg, w, 6, "reference")
    b = _steps(cfg, w.with_w1_transposed(), 6, "interpret")
    for step, ((ya, ca), (yb, cb)) in enumerate(zip(a, b)):
        chex.assert_shape([yb, cb.act_cache, cb.out_cache], [(B, N, COUT), (B, F, N), (B, N, COUT)])
        chex.assert_type([yb, cb.act_cache], jnp.float32)
        assert rel_error(yb, ya) <= 1e-5, step
        chex.assert_trees_all_equal((cb.counts, cb.indices), (ca.counts, ca.indices))
        assert rel_error(cb.blockmean_cache, ca.blockmean_cache) <= 1e-5, step
        implied = jnp.einsum("bfn,fc->bnc", cb.act_cache, w.w2, precision="highest") + w.b2
        assert rel_error(cb.out_cache, implied) <= 1e-5, step


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


def test_wrong_layout_flag_raises():
    cfg = _cfg()
    w = _weights(4)
    cache = init_mlp_cache(cfg, batch=B, seq_len=N, in_features=CIN, hidden_features=F, out_features=COUT)
    with pytest.raises(ValueError, match="w1 must be"):
        sparse_delta_mlp(_x(0), w.replace(w1_transposed=True), cache, M.DENSE, cfg)
    with pytest.raises(TypeError, match="w1_transposed"):
        sparse_delta_mlp(_x(0), w.replace(w1_transposed=1), cache, M.DENSE, cfg)
