import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax import reorder as R


def _rc(perm, width):
    return [(int(p) // width, int(p) % width) for p in perm]


def test_tile_order_spot_checks_from_spec():
    h, w = 16, 24
    perm = R.tile_permutation(h, w)
    rc = _rc(perm, w)
    assert sorted(rc[:16]) == [(r, c) for r in range(4) for c in range(4)]
    assert sorted(rc[16:32]) == [(r, c) for r in range(4) for c in range(4, 8)]
    assert rc[:4] == [(0, 0), (0, 1), (0, 2), (0, 3)]  # raster inside a subtile
    assert rc[64] == (0, 8)  # the second 8x8 tile starts at column 8
    assert sorted(rc[:64]) == [(r, c) for r in range(8) for c in range(8)]


def test_voxel_order_spot_checks_and_hunyuan_tails():
    t, h, w = 5, 13, 17
    perm = R.voxel_permutation(t, h, w)
    coords = np.stack(np.unravel_index(perm, (t, h, w)), axis=1)
    first = coords[:192]
    assert sorted(map(tuple, first)) == [(a, b, c) for a in range(4) for b in range(6) for c in range(8)]
    second = coords[192:384]
    assert second[:, 2].min() == 8 and second[:, 0].max() == 3  # next voxel along w
    n_main = 4 * 12 * 16
    tail1 = coords[n_main:n_main + 1 * h * w]
    assert (tail1[:, 0] == 4).all()  # [T':, :, :] in raster order
    assert np.array_equal(perm[n_main:n_main + h * w], np.arange(4 * h * w, 5 * h * w))
    # docs/algorithm.md §3.1: Hunyuan 720p (33, 45, 80) -> main 107,520 + tails 3,600 + 7,680 + 0
    hy = R.voxel_permutation(33, 45, 80)
    assert hy.size == 118_800
    hy_coords = np.stack(np.unravel_index(hy, (33, 45, 80)), axis=1)
    assert (hy_coords[107_520:111_120, 0] == 32).all()
    assert (hy_coords[111_120:, 1] >= 42).all()


@pytest.mark.parametrize(
    "make, n",
    [
        (lambda: R.tile_permutation(16, 24), 16 * 24),
        (lambda: R.tile_permutation(13, 21), 13 * 21),  # tails on both axes
        (lambda: R.tile_permutation(3, 5), 15),  # smaller than one tile
        (lambda: R.voxel_permutation(5, 13, 17), 5 * 13 * 17),
        (lambda: R.voxel_permutation(33, 45, 80), 118_800),
        (lambda: R.voxel_permutation(2, 3, 4), 24),
    ],
)
def test_round_trip_exact(make, n):
    perm = make()
    assert perm.dtype == np.int32 and np.array_equal(np.sort(perm), np.arange(n))
    x = jax.random.normal(jax.random.PRNGKey(n), (2, n, 3))
    back = R.permute_tokens(R.permute_tokens(x, perm), R.inverse_permutation(perm))
    assert jnp.array_equal(back, x)


def test_joint_permutation_keeps_text_fixed():
    img = R.tile_permutation(8, 16)
    flux = R.joint_permutation(img, 5, text_first=True)
    assert np.array_equal(flux[:5], np.arange(5)) and np.array_equal(flux[5:], img + 5)
    hy = R.joint_permutation(img, 5, text_first=False)
    assert np.array_equal(hy[:128], img) and np.array_equal(hy[128:], np.arange(128, 133))


def _rotate_interleaved(x, cos, sin):
    # diffusers' apply_rotary_emb with interleaved pairs (docs/models.md §0)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rot = jnp.stack([-x2, x1], axis=-1).reshape(x.shape)
    return x * cos + rot * sin


def test_rope_permutation_commutes_with_rotation():
    n, d = 8 * 24, 16
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (1, n, 2, d))
    angles = jax.random.uniform(jax.random.fold_in(key, 1), (n, d // 2)) * 6.0
    cos = jnp.repeat(jnp.cos(angles), 2, axis=-1)
    sin = jnp.repeat(jnp.sin(angles), 2, axis=-1)
    perm = R.tile_permutation(8, 24)
    rotated_then_permuted = R.permute_tokens(_rotate_interleaved(x, cos[None, :, None], sin[None, :, None]), perm)
    pc, ps = R.permute_rope(cos, sin, perm)
    permuted_then_rotated = _rotate_interleaved(R.permute_tokens(x, perm), pc[None, :, None], ps[None, :, None])
    np.testing.assert_array_equal(rotated_then_permuted, permuted_then_rotated)


def test_bad_input():
    with pytest.raises(ValueError, match="height, width"):
        R.tile_permutation(0, 8)
    with pytest.raises(ValueError, match="multiple of subtile"):
        R.tile_permutation(8, 8, tile=8, subtile=3)
    with pytest.raises(ValueError, match="voxel"):
        R.voxel_permutation(4, 6, 8, voxel=(4, 6))
    with pytest.raises(ValueError, match="permutation"):
        R.inverse_permutation([0, 0, 1])
    with pytest.raises(ValueError, match="tokens on axis"):
        R.permute_tokens(jnp.zeros((1, 5, 2)), np.arange(4))
    with pytest.raises(ValueError, match="num_text"):
        R.joint_permutation(np.arange(4), -1)
