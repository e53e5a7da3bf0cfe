import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax import config as C
from chipmunk_jax import selection as S
from chipmunk_jax.attention import AttentionCache, init_attention_cache, sparse_delta_attention
from chipmunk_jax.pallas_kernels import attention as K
from chipmunk_jax.schedule import AttentionStep as A
from chipmunk_jax.schedule import attention_step_kind
from helpers import max_rel_error, random_qkv

B, N, H, D = 2, 450, 3, 32  # N not a multiple of 64 or 192


def _qkv(seed, n=N):
    return random_qkv(B, n, H, D, key=jax.random.PRNGKey(seed))


def _drift(qkv, seed, eps):
    return [x + eps * jax.random.normal(jax.random.PRNGKey(seed + i), x.shape) for i, x in enumerate(qkv)]


def _config(**attention):
    base = dict(first_n_dense_layers=0, random_keys=0.0, dynamic_random_keys=0.0)
    base.update(attention)
    return C.ChipmunkConfig(attention=C.AttentionConfig(**base))


def _run(cfg, steps, seed=0, eps=0.05):
    cache = init_attention_cache(cfg, batch=B, seq_len=N, heads=H, head_dim=D, dtype=jnp.float32)
    qkv = _qkv(seed)
    outs = []
    for step in range(steps):
        cur = _drift(qkv, 100 * step, eps * step)
        o, cache = sparse_delta_attention(*cur, cache, attention_step_kind(cfg, step, 0), cfg, key=jax.random.PRNGKey(step))
        outs.append((cur, o, cache))
    return outs


@pytest.mark.parametrize("compress", [False, True])
def test_every_column_kept_equals_dense(compress):
    cfg = _config(top_keys=1.0, counts_multiple_of=1, compress_indices=compress)
    for step, (cur, o, cache) in enumerate(_run(cfg, 4)):
        chex.assert_shape([o, cache.out_cache, cache.lse], [(B, N, H, D), (B, N, H, D), (B, H, N)])
        chex.assert_type([o, cache.lse], jnp.float32)
        dense, _ = K.dense_attention(*cur, impl="reference")
        assert max_rel_error(o, dense) <= 1e-5, step


@pytest.mark.parametrize("compress", [False, True])
def test_delta_identity_at_full_step_and_unchanged_inputs(compress):
    cfg = _config(top_keys=0.2, counts_multiple_of=64, compress_indices=compress)
    qkv = _qkv(1)
    cache = init_attention_cache(cfg, batch=B, seq_len=N, heads=H, head_dim=D, dtype=jnp.float32)
    _, cache = sparse_delta_attention(*qkv, cache, A.DENSE, cfg)
    o_full, cache = sparse_delta_attention(*qkv, cache, A.DENSE_COLSUM, cfg)
    dense, lse = K.dense_attention(*qkv, impl="reference")
    chex.assert_trees_all_close(cache.lse, lse, rtol=1e-7, atol=1e-5)  # numpy's assert_allclose defaults
    assert max_rel_error(o_full, dense) <= 1e-6
    idx, counts = (cache.indices, cache.counts) if not compress else (
        S.mask_to_indices(S.unpack_mask(cache.mask_bits, N), 64)[:2]
    )
    sparse_part = K.column_sparse_attention(*qkv, idx, counts, impl="reference")
    assert max_rel_error(cache.out_cache + sparse_part, dense) <= 1e-5  # out_cache + A_S(t0) == O(t0)
    o_sparse, cache2 = sparse_delta_attention(*qkv, cache, A.SPARSE, cfg)
    assert max_rel_error(o_sparse, o_full) <= 1e-5  # unchanged inputs reproduce the full step
    assert cache2.out_cache is cache.out_cache  # sparse steps do not touch the cache


def test_sparse_step_is_out_cache_plus_renormalised_sparse_attention():
    cfg = _config(top_keys=0.15, counts_multiple_of=32, compress_indices=False)
    runs = _run(cfg, 4)
    (cur, o, cache) = runs[3]
    assert attention_step_kind(cfg, 3, 0) == A.SPARSE
    # docs/algorithm.md §1.9 masked-softmax form, independent of the gather kernel
    s = jnp.einsum("bqhd,bkhd->bhqk", cur[0], cur[1], precision="highest") / np.sqrt(D)
    mask = S.indices_to_mask(cache.indices, cache.counts, N)  # [B, H, G, N]
    row_mask = jnp.repeat(mask, 192, axis=2)[:, :, :N]
    p = jax.nn.softmax(jnp.where(row_mask, s, -jnp.inf), axis=-1)
    a_s = jnp.einsum("bhqk,bkhd->bqhd", p, cur[2], precision="highest")
    assert max_rel_error(o, runs[1][2].out_cache + a_s) <= 1e-5
    assert (cache.counts == S.attention_column_count(0.15, N, 32)).all()


def test_dense_refresh_keeps_column_sets_and_lse():
    cfg = _config(top_keys=0.2, counts_multiple_of=64, compress_indices=False, recompute_mask=False, full_step_every=3)
    runs = _run(cfg, 4)
    assert attention_step_kind(cfg, 3, 0) == A.DENSE_REFRESH
    (_, _, c1), (cur3, o3, c3) = runs[1], runs[3]
    assert jnp.array_equal(c1.indices, c3.indices) and jnp.array_equal(c1.lse, c3.lse)
    dense3, _ = K.dense_attention(*cur3, impl="reference")
    assert max_rel_error(o3, dense3) <= 1e-6
    sparse3 = K.column_sparse_attention(*cur3, c3.indices, c3.counts, impl="reference")
    assert max_rel_error(c3.out_cache + sparse3, dense3) <= 1e-5


def test_always_dense_layer_leaves_cache_untouched():
    cfg = C.flux()
    qkv = _qkv(2)
    cache = init_attention_cache(cfg, batch=B, seq_len=N, heads=H, head_dim=D, dtype=jnp.float32)
    o, new = sparse_delta_attention(*qkv, cache, attention_step_kind(cfg, 5, 0), cfg)
    assert max_rel_error(o, K.dense_attention(*qkv, impl="reference")[0]) <= 1e-6
    chex.assert_trees_all_equal(new, cache)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["flux", "hunyuan_video"])
def test_traced_step_under_jit_matches_python_dispatch(preset):
    cfg = C.PRESETS[preset]().replace(attention__first_n_dense_layers=1, num_steps=6,
                                      attention__full_step_schedule=None, attention__full_step_every=4)
    n = 400
    qkv0 = _qkv(3, n=n)

    @jax.jit
    def step_fn(qkv, cache, step, key):
        kind = attention_step_kind(cfg, step, 1)
        return sparse_delta_attention(*qkv, cache, kind, cfg, key=key)

    c_jit = init_attention_cache(cfg, batch=B, seq_len=n, heads=H, head_dim=D, dtype=jnp.float32)
    c_py = c_jit
    for step in range(6):
        qkv = _drift(qkv0, step, 0.03 * step)
        key = jax.random.PRNGKey(step)
        o_jit, c_jit = step_fn(qkv, c_jit, jnp.int32(step), key)
        o_py, c_py = sparse_delta_attention(*qkv, c_py, attention_step_kind(cfg, step, 1), cfg, key=key)
        assert max_rel_error(o_jit, o_py) <= 1e-5, step
    assert step_fn._cache_size() == 1  # one trace for every step kind


def test_bad_input_raises():
    cfg = _config(top_keys=0.2)
    q, k, v = _qkv(4)
    cache = init_attention_cache(cfg, batch=B, seq_len=N, heads=H, head_dim=D)
    with pytest.raises(ValueError, match="shorter than one query group"):
        init_attention_cache(cfg, batch=1, seq_len=100, heads=1, head_dim=8)
    with pytest.raises(ValueError, match="shorter than one query group"):
        sparse_delta_attention(q[:, :100], k[:, :100], v[:, :100], cache, A.DENSE, cfg)
    with pytest.raises(ValueError, match="q must be"):
        sparse_delta_attention(q[0], k, v, cache, A.DENSE, cfg)
    with pytest.raises(TypeError, match="q must be float32"):
        sparse_delta_attention(q.astype(jnp.int32), k, v, cache, A.DENSE, cfg)
    with pytest.raises(ValueError, match="self-attention"):
        sparse_delta_attention(q, k[:, :300], v[:, :300], cache, A.DENSE, cfg)
    with pytest.raises(ValueError, match="cache.out_cache has shape"):
        sparse_delta_attention(q, k, v, cache.replace(out_cache=cache.out_cache[:, :, :2]), A.DENSE, cfg)
    with pytest.raises(TypeError, match="cache must be an AttentionCache"):
        sparse_delta_attention(q, k, v, {"lse": 1}, A.DENSE, cfg)
    with pytest.raises(TypeError, match="config must be a ChipmunkConfig"):
        sparse_delta_attention(q, k, v, cache, A.DENSE, cfg.attention)
    with pytest.raises(TypeError, match="step_kind"):
        sparse_delta_attention(q, k, v, cache, jnp.array([1, 2]), cfg)
    with pytest.raises(ValueError, match="compress_indices"):
        sparse_delta_attention(q, k, v, cache, A.DENSE, cfg.replace(attention__compress_indices=False))
    with pytest.raises(ValueError, match="key"):
        sparse_delta_attention(q, k, v, cache, A.DENSE_COLSUM, cfg.replace(attention__dynamic_random_keys=0.01))
    with pytest.raises(ValueError, match="batch"):
        init_attention_cache(cfg, batch=0, seq_len=N, heads=H, head_dim=D)
    assert isinstance(cache, AttentionCache)
