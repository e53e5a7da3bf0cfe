import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax import config as C
from chipmunk_jax import selection as S
from chipmunk_jax.mlp import MLPCache, dense_mlp, init_mlp_cache, sparse_delta_mlp
from chipmunk_jax.schedule import MLPStep as M
from chipmunk_jax.schedule import mlp_step_kind
from helpers import drifting_x, max_rel_error, mlp_weights

B, N, CIN, F, COUT = 2, 300, 16, 256, 12  # N not a multiple of 128


def _weights(seed, bias2=True):
    return mlp_weights(seed, CIN, F, COUT, bias2=bias2)


def _config(**mlp):
    base = dict(enabled=True, first_n_dense_layers=0, counts_multiple_of=64, random_keys=0.0)
    base.update(mlp)
    return C.ChipmunkConfig(mlp=C.MLPConfig(**base))


def _x(step, seed=0):
    return drifting_x(step, (B, N, CIN), seed)


def _run(cfg, w, steps):
    cache = init_mlp_cache(cfg, batch=B, seq_len=N, in_features=CIN, hidden_features=F, out_features=COUT,
                           dtype=jnp.float32)
    for step in range(steps):
        y, cache = sparse_delta_mlp(_x(step), w, cache, mlp_step_kind(cfg, step, 0), cfg,
                                    key=jax.random.PRNGKey(step))
        yield step, y, cache


@pytest.mark.parametrize("bias2", [True, False])
def test_every_feature_kept_equals_dense(bias2):
    cfg = _config(top_keys=1.0)
    w = _weights(0, bias2)
    for step, y, _ in _run(cfg, w, 13):  # covers DENSE, SPARSE_SELECT and SPARSE_REUSE
        chex.assert_shape(y, (B, N, COUT))
        chex.assert_type(y, jnp.float32)
        assert max_rel_error(y, dense_mlp(_x(step), w)) <= 1e-5, step


def test_invariant_out_cache_equals_act_cache_w2_plus_b2():
    cfg = _config(top_keys=0.3, random_keys=0.05, full_step_every=20)
    w = _weights(1)
    kinds = set()
    for step, y, cache in _run(cfg, w, 14):
        kinds.add(mlp_step_kind(cfg, step, 0))
        implied = jnp.einsum("bfn,fc->bnc", cache.act_cache, w.w2, precision="highest") + w.b2
        assert max_rel_error(cache.out_cache, implied) <= 1e-5, step
        assert jnp.array_equal(y, cache.out_cache)
    assert kinds == {M.DENSE, M.SPARSE_SELECT, M.SPARSE_REUSE}


def test_full_step_fills_caches():
    cfg = _config(top_keys=0.3)
    w = _weights(2)
    (_, y, cache), = list(_run(cfg, w, 1))
    assert max_rel_error(y, dense_mlp(_x(0), w)) <= 1e-6
    z = jnp.einsum("bnc,cf->bnf", _x(0), w.w1, precision="highest") + w.b1
    chex.assert_shape([cache.act_cache, cache.out_cache, cache.blockmean_cache], [(B, F, N), (B, N, COUT), (B, 3, F)])
    chex.assert_trees_all_close(cache.act_cache, jnp.swapaxes(jax.nn.gelu(z), 1, 2), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(cache.blockmean_cache[:, 2], z[:, 256:].mean(1), rtol=1e-4, atol=1e-5)


def test_sparse_select_recomputes_only_selected_features():
    cfg = _config(top_keys=0.25)
    w = _weights(3)
    runs = list(_run(cfg, w, 2))
    (_, _, c0), (_, _, c1) = runs
    chosen = S.indices_to_mask(c1.indices, c1.counts, F)  # [B, NB, F]
    assert (c1.counts % 64 == 0).all() and (c1.counts == 64).all()  # round(0.25 * 256) = 64
    tok = jnp.repeat(chosen, 128, axis=1)[:, :N]  # [B, N, F]
    changed = jnp.swapaxes(c1.act_cache != c0.act_cache, 1, 2)
    assert not (changed & ~tok).any()  # nothing outside the sets moved
    z = jnp.einsum("bnc,cf->bnf", _x(1), w.w1, precision="highest") + w.b1
    fresh = jnp.swapaxes(jax.nn.gelu(z), 1, 2)
    np.testing.assert_allclose(jnp.where(jnp.swapaxes(tok, 1, 2), c1.act_cache - fresh, 0), 0, atol=1e-5)
    moved = c1.blockmean_cache != c0.blockmean_cache
    assert not (moved & ~chosen).any()


def test_traced_step_under_jit():
    cfg = _config(top_keys=0.3, random_keys=0.05, full_step_every=5, mask_cache_after_step=3)
    w = _weights(4)

    @jax.jit
    def step_fn(x, cache, step, key):
        return sparse_delta_mlp(x, w, cache, mlp_step_kind(cfg, step, 2), cfg, key=key)

    c_jit = c_py = init_mlp_cache(cfg, batch=B, seq_len=N, in_features=CIN, hidden_features=F, out_features=COUT,
                                  dtype=jnp.float32)
    for step in range(8):
        key = jax.random.PRNGKey(step)
        y_jit, c_jit = step_fn(_x(step), c_jit, jnp.int32(step), key)
        y_py, c_py = sparse_delta_mlp(_x(step), w, c_py, mlp_step_kind(cfg, step, 2), cfg, key=key)
        assert max_rel_error(y_jit, y_py) <= 1e-5, step
    assert step_fn._cache_size() == 1


def test_bf16_runs_and_stays_close():
    cfg = _config(top_keys=1.0)
    w = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), _weights(5))
    cache = init_mlp_cache(cfg, batch=B, seq_len=N, in_features=CIN, hidden_features=F, out_features=COUT)
    for step in range(3):
        x = _x(step).astype(jnp.bfloat16)
        y, cache = sparse_delta_mlp(x, w, cache, mlp_step_kind(cfg, step, 0), cfg)
        chex.assert_shape(y, (B, N, COUT))
        chex.assert_type(y, jnp.bfloat16)
        assert max_rel_error(y.astype(jnp.float32), dense_mlp(x, w).astype(jnp.float32)) <= 2e-2


def test_bad_input_raises():
    cfg = _config(top_keys=0.3)
    w = _weights(6)
    cache = init_mlp_cache(cfg, batch=B, seq_len=N, in_features=CIN, hidden_features=F, out_features=COUT)
    x = _x(0)
    with pytest.raises(ValueError, match="x must have rank 3"):
        sparse_delta_mlp(x[0], w, cache, M.DENSE, cfg)
    with pytest.raises(ValueError, match="w1 must be"):
        sparse_delta_mlp(x[..., :5], w, cache, M.DENSE, cfg)
    with pytest.raises(ValueError, match="act_cache must be"):
        sparse_delta_mlp(x[:, :200], w, cache, M.DENSE, cfg)
    with pytest.raises(ValueError, match="b2 must have shape"):
        sparse_delta_mlp(x, w.replace(b2=w.b2[:3]), cache, M.DENSE, cfg)
    with pytest.raises(TypeError, match="x must be a float array"):
        sparse_delta_mlp(x.astype(jnp.int32), w, cache, M.DENSE, cfg)
    with pytest.raises(TypeError, match="weights must be MLPWeights"):
        sparse_delta_mlp(x, (w.w1, w.b1), cache, M.DENSE, cfg)
    with pytest.raises(TypeError, match="cache must be an MLPCache"):
        sparse_delta_mlp(x, w, None, M.DENSE, cfg)
    with pytest.raises(ValueError, match="key"):
        sparse_delta_mlp(x, w, cache, M.SPARSE_SELECT, cfg.replace(mlp__random_keys=0.1))
    with pytest.raises(ValueError, match="hidden_features"):
        init_mlp_cache(cfg, batch=1, seq_len=N, in_features=CIN, hidden_features=0, out_features=COUT)
    assert isinstance(cache, MLPCache)
