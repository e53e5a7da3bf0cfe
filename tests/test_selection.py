import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax import config as C
from chipmunk_jax import selection as S


def test_column_count_uses_bankers_rounding_like_the_original():
    assert S.attention_column_count(0.165, 4352, 112) == 672  # FLUX 1280x768 (docs/algorithm.md §5.1)
    assert S.attention_column_count(0.05, 119_056, 128) == 6016  # 46.5x -> 47 tiles
    assert S.attention_column_count(0.5, 640, 128) == 256  # round(2.5) == 2
    assert S.attention_column_count(2.5 / 128, 128, 1) == 2  # round(2.5) == 2
    assert S.attention_column_count(0.0, 1000, 128) == 0
    assert S.attention_column_count(1.0, 1032, 112) == 1032  # all keys, although 112 * round(9.2) = 1008


@pytest.mark.parametrize("multiple", [1, 8, 128])
def test_mask_to_indices_padding_is_valid_and_unselected(multiple):
    key = jax.random.PRNGKey(multiple)
    n = 301
    mask = jax.random.bernoulli(key, 0.1, (2, 3, 5, n))
    mask = mask.at[0, 0, 0].set(False)  # count 0
    mask = mask.at[0, 0, 1].set(True)  # full row: counts capped at N
    sel = S.mask_to_indices(mask, multiple)
    idx, counts, m = np.asarray(sel.indices), np.asarray(sel.counts), np.asarray(mask)
    chex.assert_shape(idx, (2, 3, 5, n))
    chex.assert_type(idx, np.int32)
    assert ((idx >= 0) & (idx < n)).all()
    pop = m.sum(-1)
    assert np.array_equal(counts, np.minimum(-(-pop // multiple) * multiple, n))
    assert counts[0, 0, 0] == 0 and counts[0, 0, 1] == n
    for row in np.ndindex(*counts.shape):
        used = idx[row][: counts[row]]
        assert len(set(used)) == counts[row]  # no duplicates
        assert np.array_equal(np.sort(used[: pop[row]]), np.flatnonzero(m[row]))  # selected first
        padding = used[pop[row]:]
        assert not m[row][padding].any()  # padding columns are unselected
        expected_pad = np.flatnonzero(~m[row])[: counts[row] - pop[row]]
        assert np.array_equal(padding, expected_pad)  # lowest-numbered unselected


def test_mask_to_indices_capacity_and_bad_args():
    mask = jnp.ones((1, 40), bool)
    sel = S.mask_to_indices(mask, 16, capacity=32)
    assert sel.indices.shape == (1, 32) and int(sel.counts[0]) == 32
    with pytest.raises(ValueError, match="multiple_of"):
        S.mask_to_indices(mask, 0)
    with pytest.raises(ValueError, match="capacity"):
        S.mask_to_indices(mask, 8, capacity=41)


def test_pack_unpack_round_trip():
    for n in (7, 64, 301):
        mask = jax.random.bernoulli(jax.random.PRNGKey(n), 0.3, (2, 4, n))
        bits = S.pack_mask(mask)
        chex.assert_type(bits, jnp.uint8)
        chex.assert_shape(bits, (2, 4, -(-n // 8)))
        assert jnp.array_equal(S.unpack_mask(bits, n), mask)


def test_uncompressed_selection_is_exact_topk():
    cfg = C.AttentionConfig(top_keys=0.2, compress_indices=False, counts_multiple_of=16)
    colsum = jax.random.uniform(jax.random.PRNGKey(0), (2, 3, 4, 200))
    sel = S.select_attention_columns(colsum, cfg)
    tk = S.attention_column_count(0.2, 200, 16)
    chex.assert_shape(sel.indices, (2, 3, 4, tk))
    assert sel.mask is None
    assert (sel.counts == tk).all()
    chosen = np.sort(np.asarray(sel.indices), -1)
    expected = np.sort(np.argsort(-np.asarray(colsum), -1)[..., :tk], -1)
    assert np.array_equal(chosen, expected)


def test_compressed_selection_combines_topk_random_static_and_eligibility():
    cfg = C.AttentionConfig(top_keys=0.1, dynamic_random_keys=0.05, counts_multiple_of=32)
    g, n = 4, 300
    colsum = jax.random.uniform(jax.random.PRNGKey(1), (1, 2, g, n))
    static = jnp.zeros((g, n), bool).at[:, 290:].set(True)
    eligible = jnp.array([True, True, True, False])
    sel = S.select_attention_columns(
        colsum, cfg, key=jax.random.PRNGKey(2), static_mask=static, eligible=eligible
    )
    mask = np.asarray(sel.mask)
    top = np.asarray(S.topk_mask(colsum, S.attention_column_count(0.1, n, 32)))
    assert (mask[..., 290:]).all()
    assert (mask[:, :, :3] >= top[:, :, :3]).all()  # top-k kept where eligible
    assert not mask[:, :, 3, :290].any()  # ineligible group: static part only
    extra = mask[:, :, :3, :290] & ~top[:, :, :3, :290]
    assert 0.01 < extra.mean() < 0.1  # ~5% dynamic random keys
    assert (np.asarray(sel.counts) % 32 == 0).all()
    with pytest.raises(ValueError, match="key"):
        S.select_attention_columns(colsum, cfg)
    with pytest.raises(ValueError, match="static_mask must have shape"):
        S.select_attention_columns(colsum, cfg, key=jax.random.PRNGKey(0), static_mask=static[:2])


def test_static_video_mask_spec_rules():
    grid = (8, 12, 16)  # 2 x 2 x 2 main voxels, no tails
    cfg = C.AttentionConfig(top_keys=0.05, random_keys=0.0, local_voxels=1)
    num_text = 50
    static, eligible = S.static_video_mask(grid, num_text, cfg)
    n_img = 8 * 12 * 16
    n = n_img + num_text
    g = -(-n // 192)
    assert static.shape == (g, n) and eligible.shape == (g,)
    s = np.asarray(static)
    assert s[:, n_img:].all()  # all groups see all text keys
    for u in range(8):  # local window of 1 voxel: each main group sees its own voxel only
        own = np.zeros(n_img, bool)
        own[192 * u: 192 * (u + 1)] = True
        assert np.array_equal(s[u, :n_img], own)
    assert s[-1].all()  # text query group dense
    assert not np.asarray(eligible)[-1] and np.asarray(eligible)[:8].all()
    with pytest.warns(UserWarning, match="covers 100%"):  # the window is the whole grid
        wide, _ = S.static_video_mask(grid, num_text, C.AttentionConfig(local_voxels=3, random_keys=0.0))
    assert np.asarray(wide)[0, :n_img].all()  # 3x3x3 window covers the whole 2x2x2 grid
    rnd, _ = S.static_video_mask(grid, 0, C.AttentionConfig(random_keys=0.2), key=jax.random.PRNGKey(0))
    frac = np.asarray(rnd)[:-1].mean()
    assert 0.15 < frac < 0.25
    with pytest.raises(ValueError, match="key"):
        S.static_video_mask(grid, 0, C.AttentionConfig(random_keys=0.2))
    with pytest.raises(ValueError, match="group_size"):
        S.static_video_mask(grid, 0, C.AttentionConfig(random_keys=0.0), voxel=(4, 4, 4))


def test_mlp_selection_counts_and_kept_fraction():
    scores = jax.random.uniform(jax.random.PRNGKey(3), (1, 6, 1024))
    idx, counts = S.select_mlp_features(scores, 0.3, 0.05, 256, key=jax.random.PRNGKey(4))
    assert idx.shape == (1, 6, 1024)
    c = np.asarray(counts)
    assert (c % 256 == 0).all()
    expected = 0.3 + 0.05 * 0.7
    assert ((c >= expected * 1024 * 0.9) & (c <= expected * 1024 + 256)).all()
    top = np.asarray(S.topk_mask(scores, S.mlp_feature_count(0.3, 1024)))
    chosen = np.asarray(S.indices_to_mask(idx, counts, 1024))
    assert (chosen >= top).all()
    idx0, counts0 = S.select_mlp_features(scores, 0.0, 0.0, 256)
    assert (np.asarray(counts0) == 0).all()
    with pytest.raises(ValueError, match="key"):
        S.select_mlp_features(scores, 0.3, 0.05, 256)


@pytest.mark.parametrize("top_keys,random_keys,multiple", [(0.3, 0.05, 256), (0.0, 0.0, 256), (0.3, 0.0, 1),
                                                            (0.97, 0.05, 256), (1.0, 0.0, 64)])
def test_mlp_feature_sets_list_the_features_a_sparse_step_recomputes(top_keys, random_keys, multiple):
    """``mlp_feature_sets``: ``select_mlp_features``' lists and, without a scatter, the features in their first
    ``counts`` entries (the selected ones and their padding; at 0.97 the count is capped at F)."""
    scores = jnp.round(jax.random.uniform(jax.random.PRNGKey(5), (2, 3, 1000)) * 50)  # ties at the threshold
    key = jax.random.PRNGKey(6) if random_keys else None
    idx, counts = S.select_mlp_features(scores, top_keys, random_keys, multiple, key=key)
    idx2, counts2, listed = S.mlp_feature_sets(scores, top_keys, random_keys, multiple, key=key)
    np.testing.assert_array_equal(idx2, idx)
    np.testing.assert_array_equal(counts2, counts)
    np.testing.assert_array_equal(listed, S.indices_to_mask(idx, counts, 1000))


def test_block_mean_partial_last_block():
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 300, 4))
    m = S.block_mean(x, 128)
    chex.assert_shape(m, (2, 3, 4))
    chex.assert_trees_all_close((m[:, 2], m[:, 0]), (x[:, 256:].mean(1), x[:, :128].mean(1)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the kernel itself: test_mlp_kernels.py
def test_mlp_selection_kernel_path_matches_reference():
    scores = jax.random.uniform(jax.random.PRNGKey(7), (1, 3, 300))
    for random_keys in (0.0, 0.1):
        ref = S.select_mlp_features(scores, 0.3, random_keys, 64, key=jax.random.PRNGKey(8), impl="reference")
        fast = S.select_mlp_features(scores, 0.3, random_keys, 64, key=jax.random.PRNGKey(8), impl="interpret")
        assert jnp.array_equal(ref[1], fast[1])
        for r, f_, c in zip(np.asarray(ref[0])[0], np.asarray(fast[0])[0], np.asarray(ref[1])[0]):
            assert np.array_equal(r[:c], f_[:c])


@pytest.mark.slow  # the kernel itself: test_selection_fast.py
@pytest.mark.parametrize("compress", [False, True])
def test_attention_selection_kernel_path_matches_reference(compress):
    cfg = C.AttentionConfig(top_keys=0.1, dynamic_random_keys=0.05, counts_multiple_of=32, compress_indices=compress)
    g, n = 3, 300
    colsum = jax.random.uniform(jax.random.PRNGKey(11), (1, 2, g, n))
    static = jnp.zeros((g, n), bool).at[:, 290:].set(True) if compress else None
    eligible = jnp.array([True, False, True]) if compress else None
    kw = dict(key=jax.random.PRNGKey(12), static_mask=static, eligible=eligible)
    ref = S.select_attention_columns(colsum, cfg, impl="reference", **kw)
    fast = S.select_attention_columns(colsum, cfg, impl="interpret", **kw)
    assert jnp.array_equal(ref.counts, fast.counts)
    ref_sets = np.asarray(S.indices_to_mask(ref.indices, ref.counts, n))
    fast_sets = np.asarray(S.indices_to_mask(fast.indices, fast.counts, n))
    assert np.array_equal(ref_sets, fast_sets)
    if compress:
        assert jnp.array_equal(ref.mask, fast.mask)


def test_static_video_mask_warns_when_the_window_covers_most_keys():
    """Wan's 5x5x5 window: 32% of the keys at 720p (no warning), 73% at 480p (warning naming the share)."""
    import warnings

    a = C.wan().replace(attention__random_keys=0.0).attention
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S.static_video_mask((21, 45, 80), 0, a)
    with pytest.warns(UserWarning, match=r"covers 73% of the image keys"):
        S.static_video_mask((21, 30, 52), 0, a)
