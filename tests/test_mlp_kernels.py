"""Sparse-delta MLP kernels vs the pure-jnp reference (docs/algorithm.md §2.2): the Pallas kernels in interpret mode and the
Triton (TMA) kernels of mlp_triton in Triton's interpreter, on the same problems."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax.pallas_kernels import mlp as mlp_op
from chipmunk_jax.pallas_kernels import mlp_pallas
from chipmunk_jax.pallas_kernels import mlp_reference as ref
from chipmunk_jax.pallas_kernels import mlp_triton
from helpers import mlp_problem, random_feature_sets, rel_error

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
warnings.filterwarnings("ignore", category=DeprecationWarning)

_HI = jax.lax.Precision.HIGHEST


# Both kernel families run every numerics test below: the Pallas kernels (interpret mode) and mlp_triton's
# kernels (Triton's interpreter, f32 MMA operands).
KERNEL_IMPLS = pytest.mark.parametrize("impl", ["interpret", "triton_interpret"])
# The same, with the Pallas interpret-mode case (seconds per compile) only in the slow suite.
KERNEL_IMPLS_SLOW_PALLAS = pytest.mark.parametrize(
    "impl", [pytest.param("interpret", marks=pytest.mark.slow), "triton_interpret"])


def _run(p, indices, counts, impl, **kw):
    return mlp_op.sparse_mlp_delta(
        p["x"], p["w1"], p["b1"], p["w2"], p["act"], p["out"], indices, counts, impl=impl, **kw
    )


@pytest.mark.parametrize(
    "b, n, counts, k",
    [
        (1, 200, [[150, 0]], None),  # N not a multiple of 128, ragged count, count 0
        pytest.param(2, 256, [[256, 37], [128, 1]], None, marks=pytest.mark.slow),  # all features, tiny counts
        # packed axis K shorter than a tile (padded by the wrapper)
        pytest.param(1, 300, [[64, 100, 3]], 100, marks=pytest.mark.slow),
    ],
)
@KERNEL_IMPLS
def test_interpret_matches_reference_f32(b, n, counts, k, impl):
    p = mlp_problem(1 + n + b, b=b, n=n)
    nb = -(-n // 128)
    indices, counts = random_feature_sets(7 + n, b, nb, 256, counts, k)
    act_k, out_k = _run(p, indices, counts, impl)
    act_r, out_r = _run(p, indices, counts, "reference")
    chex.assert_shape([act_k, out_k], [(b, 256, n), (b, n, 64)])
    chex.assert_type([act_k, out_k], jnp.float32)
    assert rel_error(out_k, out_r) <= 1e-5
    assert rel_error(out_k - p["out"], out_r - p["out"]) <= 1e-4  # the delta itself, not just the sum
    assert rel_error(act_k, act_r) <= 1e-5
    # Unselected (feature, token) pairs keep their exact cached value.
    mask = jnp.repeat(ref.feature_mask(indices, counts, 256), 128, axis=1)[:, :n]
    untouched = ~jnp.swapaxes(mask, 1, 2)
    np.testing.assert_array_equal(np.asarray(act_k)[untouched], np.asarray(p["act"])[untouched])
    chex.assert_tree_all_finite(out_k)


@KERNEL_IMPLS_SLOW_PALLAS
def test_interpret_matches_reference_bf16(impl):
    p = mlp_problem(3, b=1, n=256, dtype=jnp.bfloat16)
    indices, counts = random_feature_sets(4, 1, 2, 256, [[192, 77]])
    act_k, out_k = _run(p, indices, counts, impl)
    act_r, out_r = _run(p, indices, counts, "reference")
    chex.assert_shape([act_k, out_k], [(1, 256, 256), (1, 256, 64)])
    chex.assert_type([act_k, out_k], jnp.bfloat16)
    assert rel_error(out_k, out_r) <= 1e-2
    assert rel_error(act_k, act_r) <= 1e-2


@KERNEL_IMPLS
def test_padding_slots_past_counts_are_ignored(impl):
    """Slots past counts repeat selected features (and an out-of-range id): no effect on the result."""
    p = mlp_problem(5, n=256)
    indices, counts = random_feature_sets(6, 1, 2, 256, [[90, 40]])
    dup = jnp.concatenate([indices[..., :128], indices[..., :128]], axis=-1)
    dup = dup.at[0, 1, 200].set(10_000)
    act_k, out_k = _run(p, dup, counts, impl)
    act_r, out_r = _run(p, indices, counts, "reference")
    assert rel_error(out_k, out_r) <= 1e-5
    assert rel_error(act_k, act_r) <= 1e-5


@KERNEL_IMPLS_SLOW_PALLAS
def test_all_features_selected_equals_dense_mlp(impl):
    p = mlp_problem(8, n=200)
    indices, counts = random_feature_sets(9, 1, 2, 256, [[256, 256]])
    act_k, out_k = _run(p, indices, counts, impl)
    a = ref.gelu_tanh(jnp.einsum("bnc,cf->bnf", p["x"], p["w1"], precision=_HI) + p["b1"])
    y = jnp.einsum("bnf,fc->bnc", a, p["w2"], precision=_HI) + p["b2"]
    assert rel_error(act_k, jnp.swapaxes(a, 1, 2)) <= 1e-5
    assert rel_error(out_k, y) <= 1e-5


@KERNEL_IMPLS_SLOW_PALLAS
def test_invariant_out_equals_act_w2_plus_b2_after_several_steps(impl):
    p = mlp_problem(10, n=200)
    step = jax.jit(
        lambda x, act, out, idx, cnt: mlp_op.sparse_mlp_delta(
            x, p["w1"].T, p["b1"], p["w2"], act, out, idx, cnt, impl=impl, w1_transposed=True
        ),
        donate_argnums=(1, 2),
    )
    act, out = jnp.array(p["act"]), jnp.array(p["out"])
    for s in range(3):
        x = p["x"] + 0.3 * jax.random.normal(jax.random.key(100 + s), p["x"].shape)
        indices, counts = random_feature_sets(200 + s, 1, 2, 256, [[64 * (s + 1), 40 + s]])
        act, out = step(x, act, out, indices, counts)
    expected = jnp.einsum("bfn,fc->bnc", act, p["w2"], precision=_HI) + p["b2"]
    assert rel_error(out, expected) <= 1e-5
    assert rel_error(out, p["out"]) > 1e-2  # the steps did change the output


@pytest.mark.slow
def test_custom_tiles():
    p = mlp_problem(11, n=256, c=96, c_out=48)
    indices, counts = random_feature_sets(12, 1, 2, 256, [[130, 250]])
    tiles = mlp_pallas.MlpTiles(fc1_features=64, fc1_k=32, fc2_k=32, fc2_cols=16)
    act_k, out_k = _run(p, indices, counts, "interpret", tiles=tiles)
    act_r, out_r = _run(p, indices, counts, "reference")
    assert rel_error(out_k, out_r) <= 1e-5
    assert rel_error(act_k, act_r) <= 1e-5




@pytest.mark.slow
def test_w1_transposed_reference_path():
    p = mlp_problem(13, n=130)
    indices, counts = random_feature_sets(14, 1, 2, 256, [[100, 20]])
    a1, o1 = _run(p, indices, counts, "reference")
    a2, o2 = mlp_op.sparse_mlp_delta(
        p["x"], p["w1"].T, p["b1"], p["w2"], p["act"], p["out"], indices, counts,
        impl="reference", w1_transposed=True,
    )
    chex.assert_trees_all_close((o1, a1), (o2, a2), rtol=1e-6, atol=1e-6)


def _bad_call(**overrides):
    p = mlp_problem(15, n=128)
    indices, counts = random_feature_sets(16, 1, 1, 256, [[64]])
    args = dict(x=p["x"], w1=p["w1"], b1=p["b1"], w2=p["w2"], act_cache=p["act"], out_cache=p["out"],
                indices=indices, counts=counts)
    kw = dict(impl="interpret")
    for name, value in overrides.items():
        (args if name in args else kw)[name] = value
    return mlp_op.sparse_mlp_delta(*args.values(), **kw)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(w1=jnp.ones((256, 64))), ValueError, "w1"),
        (dict(w1=jnp.ones((64, 256)), w1_transposed=True), ValueError, "w1"),
        (dict(w1_transposed=1), TypeError, "w1_transposed"),
        (dict(tiles=(128, 64)), TypeError, "tiles"),
        (dict(indices=jnp.zeros((1, 1, 8), jnp.int16)), TypeError, "indices"),
        (dict(counts=jnp.zeros((1, 2), jnp.int32)), ValueError, "counts"),
        (dict(x=jnp.ones((1, 128, 40)), w1=jnp.ones((40, 256))), ValueError, "multiple of 16"),
        (dict(block_size=96, indices=jnp.zeros((1, 2, 8), jnp.int32), counts=jnp.zeros((1, 2), jnp.int32)),
         ValueError, "block_size"),
    ],
)
def test_bad_inputs_raise(overrides, error, match):
    with pytest.raises(error, match=match):
        _bad_call(**overrides)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fc1_features=96), "fc1_features"),
        (dict(fc2_k=8), "fc2_k"),
        (dict(fc1_features=64, fc2_k=128), "multiple of fc2_k"),
        (dict(fc1_warps=0), "fc1_warps"),
        (dict(row_group=-1), "row_group"),
        (dict(row_group=True), "row_group"),
        (dict(row_group=2.0), "row_group"),
    ],
)
def test_bad_tiles_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlp_pallas.MlpTiles(**kwargs)


# ---- fast feature selection (mlp_selection) -------------------------------------------------------------

from chipmunk_jax.pallas_kernels import mlp_selection  # noqa: E402


# Fast suite: keep 0 and 77 (with and without extra); keep 1 and 300 (all features): slow suite.
@pytest.mark.parametrize("keep", [0, pytest.param(1, marks=pytest.mark.slow), 77,
                                  pytest.param(300, marks=pytest.mark.slow)])
@pytest.mark.parametrize("with_extra", [False, True])
def test_selection_interpret_matches_reference_and_exact_topk(keep, with_extra):
    key_s, key_e = jax.random.split(jax.random.key(keep + 31 * with_extra))
    scores = jax.random.normal(key_s, (2, 3, 300), jnp.float32)
    scores = scores.at[0].set(jnp.abs(scores[0]))  # both signs: the bit-pattern keys must keep the order
    extra = jax.random.bernoulli(key_e, 0.05, scores.shape) if with_extra else None
    idx_k, cnt_k = mlp_selection.select_top_features(scores, keep, 64, extra=extra, impl="interpret")
    idx_r, cnt_r = mlp_selection.select_top_features(scores, keep, 64, extra=extra, impl="reference")
    chex.assert_shape([idx_k, cnt_k], [(2, 3, 300), (2, 3)])
    chex.assert_type([idx_k, cnt_k], jnp.int32)
    chex.assert_trees_all_equal((idx_k, cnt_k), (idx_r, cnt_r))
    # Exactly the top `keep` (OR extra) come first; every row is a permutation of the features.
    s = np.asarray(scores)
    top = np.argsort(-s, axis=-1)[..., :keep]
    chosen = np.zeros(s.shape, bool)
    np.put_along_axis(chosen, top, True, axis=-1)
    if extra is not None:
        chosen |= np.asarray(extra)
    n_sel = chosen.sum(-1)
    idx = np.asarray(idx_k)
    for row in np.ndindex(*s.shape[:-1]):
        assert sorted(idx[row]) == list(range(300))
        np.testing.assert_array_equal(idx[row][: n_sel[row]], np.flatnonzero(chosen[row]))
    np.testing.assert_array_equal(np.asarray(cnt_k), np.minimum(-(-n_sel // 64) * 64, 300))


@pytest.mark.slow
def test_selection_matches_lead_select_mlp_features_layout():
    from chipmunk_jax import selection

    scores = jnp.abs(jax.random.normal(jax.random.key(41), (1, 2, 512)))
    idx_k, cnt_k = mlp_selection.select_top_features(scores, 154, 128, impl="interpret")
    idx_l, cnt_l = selection.select_mlp_features(scores, 0.3, 0.0, 128)
    chex.assert_trees_all_equal((idx_k, cnt_k), (idx_l, cnt_l))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(keep=-1), ValueError, "keep"),
        (dict(keep=2.5), ValueError, "keep"),
        (dict(multiple_of=0), ValueError, "multiple_of"),
        (dict(scores=jnp.ones((2, 8), jnp.int32)), TypeError, "scores"),
        (dict(extra=jnp.ones((2, 9), jnp.bool_)), ValueError, "extra"),
        (dict(extra=jnp.ones((2, 8), jnp.int8)), TypeError, "extra"),
        (dict(impl="cuda"), ValueError, "impl"),
    ],
)
def test_selection_bad_inputs_raise(kwargs, error, match):
    args = dict(scores=jnp.ones((2, 8), jnp.float32), keep=3, multiple_of=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        mlp_selection.select_top_features(
            args.pop("scores"), args.pop("keep"), args.pop("multiple_of"), **args
        )


@pytest.mark.parametrize("row_group", [1, 2, 4, 0])  # chunk-major, even groups, a short last group, all rows
@KERNEL_IMPLS_SLOW_PALLAS
def test_launch_orders_match_reference(row_group, impl):
    # 5 row blocks (the last one ragged), so row_group 2 and 4 end with a smaller group.
    p = mlp_problem(17, b=2, n=600, f=256)
    indices, counts = random_feature_sets(18, 2, 5, 256, [[200, 0, 256, 13, 128], [64, 131, 0, 250, 1]])
    tiles = (mlp_pallas.MlpTiles if impl == "interpret" else mlp_triton.TritonMlpConfig)(row_group=row_group)
    act_k, out_k = _run(p, indices, counts, impl, tiles=tiles)
    act_r, out_r = _run(p, indices, counts, "reference")
    assert rel_error(out_k, out_r) <= 1e-5
    assert rel_error(act_k, act_r) <= 1e-5


@pytest.mark.parametrize("num_blocks, num_inner, row_group", [(5, 3, 2), (5, 3, 0), (7, 4, 3), (4, 2, 1), (3, 5, 9)])
def test_launch_order_is_a_bijection(num_blocks, num_inner, row_group):
    pids = jnp.arange(num_blocks * num_inner)
    r, j = mlp_pallas._launch_order(pids, num_blocks, num_inner, row_group)
    pairs = set(zip(np.asarray(r).tolist(), np.asarray(j).tolist()))
    assert pairs == {(a, c) for a in range(num_blocks) for c in range(num_inner)}
    if row_group in (0, 9):  # one group: row blocks fastest
        assert np.asarray(r)[:num_blocks].tolist() == list(range(num_blocks))
