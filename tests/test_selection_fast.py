"""Fast attention column selection (pallas_kernels.selection_fast) against chipmunk_jax.selection.

Small shapes on CPU: the Pallas compaction kernel in interpret mode and the pure-jnp path, both compared with
select_attention_columns (the reference semantics); exact equality, ties included (the fast path keeps exactly
k columns, ties broken towards the lowest column, as lax.top_k). Plus a CUDA lowering test of the kernel.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax import selection as S
from chipmunk_jax.config import AttentionConfig
from chipmunk_jax.pallas_kernels import selection_fast as F
from helpers import fresh_key, lower_for_h100


def _colsum(shape, ties=False):
    x = jnp.exp(2.0 * jax.random.normal(fresh_key(), shape, jnp.float32))
    if ties:  # few distinct values: many exact ties at every threshold
        x = jnp.round(x * 2.0) / 2.0
    return x


def _cfg(**kw):
    return dataclasses.replace(AttentionConfig(), **kw)


@pytest.mark.parametrize("impl", ["interpret", "jnp"])
@pytest.mark.parametrize("ties", [False, True])
def test_uncompressed_matches_reference(impl, ties):
    cs = _colsum((2, 3, 4, 333), ties)
    cfg = _cfg(top_keys=0.2, counts_multiple_of=16, compress_indices=False, dynamic_random_keys=0.0)
    ref = S.select_attention_columns(cs, cfg)
    k = S.attention_column_count(cfg.top_keys, 333, 16)
    idx, cnt, mask = F.select_columns_fast(cs, k, 16, compress=False, impl=impl, width=128)
    assert mask is None
    chex.assert_equal_shape([idx, ref.indices])
    chex.assert_type([idx, cnt], jnp.int32)
    chex.assert_trees_all_equal(cnt, ref.counts)
    # Same set (the reference is in descending score order, ours ascending by column).
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(np.asarray(ref.indices), -1))
    assert np.all(np.diff(np.asarray(idx), axis=-1) > 0)


@pytest.mark.parametrize("impl", ["interpret", "jnp"])
@pytest.mark.parametrize("ties", [False, True])
def test_compressed_matches_reference(impl, ties):
    b, h, g, n = 1, 3, 5, 301
    cs = _colsum((b, h, g, n), ties)
    static = jax.random.bernoulli(fresh_key(), 0.05, (g, n)).at[-1].set(True)  # last group dense
    eligible = jnp.array([True, True, False, True, False])
    cfg = _cfg(top_keys=0.1, counts_multiple_of=32, compress_indices=True, dynamic_random_keys=0.03)
    key = fresh_key()
    ref = S.select_attention_columns(cs, cfg, key=key, static_mask=static, eligible=eligible)
    k = S.attention_column_count(cfg.top_keys, n, 32)
    idx, cnt, mask = F.select_columns_fast(cs, k, 32, compress=True, key=key, random_p=0.03, eligible=eligible,
                                           static_mask=static, impl=impl, width=64)
    chex.assert_trees_all_equal((mask, cnt, idx), (ref.mask, ref.counts, ref.indices))


@pytest.mark.slow
def test_compressed_bool_random_mask_and_edge_k():
    b, h, g, n = 2, 2, 3, 200
    cs = _colsum((b, h, g, n))
    rnd = jax.random.bernoulli(fresh_key(), 0.1, cs.shape)
    for k in (0, 1, n):
        dyn = S.topk_mask(cs, k) | rnd
        ref = S.mask_to_indices(dyn, 64)
        idx, cnt, mask = F.select_columns_fast(cs, k, 64, compress=True, random_mask=rnd, impl="interpret",
                                               width=128)
        chex.assert_trees_all_equal((mask, cnt, idx), (dyn, ref.counts, ref.indices))
    idx, cnt, _ = F.select_columns_fast(cs, 0, 8, compress=False, impl="interpret")
    assert idx.shape == (b, h, g, 1) and int(jnp.max(cnt)) == 0


def test_validation():
    cs = _colsum((1, 2, 3, 50))
    with pytest.raises(ValueError, match="colsum"):
        F.select_columns_fast(cs[0], 5, 8, compress=False)
    with pytest.raises(ValueError, match="key"):
        F.select_columns_fast(cs, 5, 8, compress=True, random_p=0.1)
    with pytest.raises(ValueError, match="static_mask"):
        F.select_columns_fast(cs, 5, 8, compress=True, static_mask=jnp.ones((3, 49), bool))
    with pytest.raises(ValueError, match="compressed path"):
        F.select_columns_fast(cs, 5, 8, compress=False, eligible=jnp.ones((3,), bool))
    with pytest.raises(ValueError, match="impl"):
        F.select_columns_fast(cs, 5, 8, compress=False, impl="cuda")


@pytest.mark.parametrize("compress", [True, False])
def test_kernel_lowers_for_cuda(compress):
    """Hunyuan scale (G=621, H=24, N=118,800) lowers to the Triton custom call (power-of-2 rules etc.)."""
    g, n = 621, 118_800
    spec = jax.ShapeDtypeStruct((1, 24, g, n), jnp.float32)

    def f(cs, static, elig):
        if compress:
            return F.select_columns_fast(cs, 5888, 128, compress=True, key=jax.random.key(0), random_p=0.01,
                                         static_mask=static, eligible=elig, impl="pallas")
        return F.select_columns_fast(cs, 5888, 128, compress=False, impl="pallas")

    text = lower_for_h100(f, spec, jax.ShapeDtypeStruct((g, n), jnp.bool_), jax.ShapeDtypeStruct((g,), jnp.bool_))
    assert "xla.gpu.triton" in text and "chipmunk_select_columns" in text and "chipmunk_row_thresholds" in text


@pytest.mark.gpu
@pytest.mark.parametrize("ties", [False, True])
def test_pallas_matches_reference_gpu(ties):
    """Compiled kernel on the GPU vs the reference selection (compressed Hunyuan-like path, 2 heads)."""
    b, h, g, n = 1, 2, 7, 20_000
    cs = _colsum((b, h, g, n), ties)
    static = jax.random.bernoulli(fresh_key(), 0.01, (g, n)).at[-1].set(True)
    eligible = jnp.arange(g) < g - 1
    cfg = _cfg(top_keys=0.05, counts_multiple_of=128, compress_indices=True, dynamic_random_keys=0.01)
    key = fresh_key()
    ref = S.select_attention_columns(cs, cfg, key=key, static_mask=static, eligible=eligible)
    k = S.attention_column_count(cfg.top_keys, n, 128)
    idx, cnt, mask = F.select_columns_fast(cs, k, 128, compress=True, key=key, random_p=0.01, eligible=eligible,
                                           static_mask=static, impl="pallas")
    chex.assert_trees_all_equal((mask, cnt, idx), (ref.mask, ref.counts, ref.indices))
    idx, cnt, _ = F.select_columns_fast(cs, k, 128, compress=False, impl="pallas")
    ref = S.select_attention_columns(cs, dataclasses.replace(cfg, compress_indices=False, dynamic_random_keys=0.0))
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(np.asarray(ref.indices), -1))


def _bits_case(shape, p):
    """A random mask (fresh each run), its packed bits and the reference index lists / counts."""
    mask = jax.random.bernoulli(fresh_key(), p, shape)
    ref = S.mask_to_indices(mask, 128)
    return S.pack_mask(mask), ref


def _assert_prefix_equal(idx, ref):
    idx, ref_idx, counts = np.asarray(idx), np.asarray(ref.indices), np.asarray(ref.counts)
    for row in np.ndindex(counts.shape):
        c = counts[row]
        np.testing.assert_array_equal(idx[row][:c], ref_idx[row][:c], err_msg=f"row {row}, count {c}")


@pytest.mark.parametrize("impl", ["interpret", "jnp"])
@pytest.mark.parametrize("p", [0.0, 0.03, 0.5, 0.9])  # 0.9: the padding spans several chunks
def test_mask_bits_to_indices_matches_mask_to_indices(impl, p):
    """Odd N (not a multiple of 8 or of the chunk width), batch 2, 3 heads, ragged counts, empty rows."""
    shape = (2, 3, 5, 1_234)
    bits, ref = _bits_case(shape, p)
    mask = np.array(S.unpack_mask(bits, shape[-1]))
    mask[0, 0, 0] = False  # a row with count 0
    mask[1, 2, 4] = True  # a full row (count capped at N)
    ref = S.mask_to_indices(jnp.asarray(mask), 128)
    idx = F.mask_bits_to_indices(S.pack_mask(jnp.asarray(mask)), ref.counts, shape[-1], impl=impl, width=256)
    chex.assert_shape(idx, shape)
    chex.assert_type(idx, jnp.int32)
    _assert_prefix_equal(idx, ref)


def test_mask_bits_to_indices_validation():
    bits = jnp.zeros((2, 4), jnp.uint8)
    counts = jnp.zeros((2,), jnp.int32)
    with pytest.raises(TypeError, match="uint8"):
        F.mask_bits_to_indices(bits.astype(jnp.int32), counts, 30)
    with pytest.raises(ValueError, match="bytes per row"):
        F.mask_bits_to_indices(bits, counts, 40)
    with pytest.raises(ValueError, match="counts must be"):
        F.mask_bits_to_indices(bits, jnp.zeros((3,), jnp.int32), 30)
    with pytest.raises(ValueError, match="width"):
        F.mask_bits_to_indices(bits, counts, 30, width=100)
    with pytest.raises(ValueError, match="impl"):
        F.mask_bits_to_indices(bits, counts, 30, impl="cuda")


def test_mask_bits_to_indices_lowers_for_cuda():
    """Hunyuan scale (24 heads x 621 groups x 118,800 keys) lowers to the Triton custom call."""
    g, n = 621, 118_800
    bits = jax.ShapeDtypeStruct((1, 24, g, -(-n // 8)), jnp.uint8)
    counts = jax.ShapeDtypeStruct((1, 24, g), jnp.int32)
    text = lower_for_h100(lambda b, c: F.mask_bits_to_indices(b, c, n, impl="pallas"), bits, counts)
    assert "xla.gpu.triton" in text and "chipmunk_mask_bits_to_indices" in text


@pytest.mark.gpu
def test_mask_bits_to_indices_gpu():
    shape = (1, 2, 7, 20_000)
    bits, ref = _bits_case(shape, 0.07)
    _assert_prefix_equal(F.mask_bits_to_indices(bits, ref.counts, shape[-1], impl="pallas"), ref)


@pytest.mark.slow
@pytest.mark.parametrize("ties", [False, True])
def test_radix_thresholds_match_bisection(ties):
    """The Pallas radix threshold kernel (interpret) gives row_thresholds' (t, need) bit for bit: odd N,
    negative values, ties, k = 0, 1, N - 1, N."""
    rows, n = 6, 1_237
    x = _colsum((rows, n), ties)
    x = x.at[1].multiply(-1.0).at[2].set(0.5)  # a negative row and a constant row
    for k in (0, 1, 77, n - 1, n):
        t_ref, need_ref = F.row_thresholds(x, k)
        t, need = F._row_thresholds_pallas(x, k, interpret=True, width=256)
        np.testing.assert_array_equal(np.asarray(t), np.asarray(t_ref), err_msg=f"k={k}")
        np.testing.assert_array_equal(np.asarray(need), np.asarray(need_ref), err_msg=f"k={k}")


@pytest.mark.slow
def test_row_pieces_split_gives_the_same_result(monkeypatch):
    """Calls split into row pieces (the int32 offset guard, hit for real only at ~2**31 elements) match one call:
    a tiny limit forces several pieces here (shapes unique to this test, so no earlier trace is reused)."""
    b, h, g, n = 1, 3, 3, 401
    cs = _colsum((b, h, g, n), ties=True)
    cfg = _cfg(top_keys=0.1, counts_multiple_of=16, compress_indices=True, dynamic_random_keys=0.0)
    k = S.attention_column_count(cfg.top_keys, n, 16)
    bits = S.pack_mask(jax.random.bernoulli(fresh_key(), 0.2, (b, h, g, n)))
    counts = S.mask_to_indices(S.unpack_mask(bits, n), 16).counts
    whole = (F.select_columns_fast(cs, k, 16, compress=True, impl="interpret"),
             F.mask_bits_to_indices(bits, counts, n, impl="interpret"))
    monkeypatch.setattr(F, "_MAX_ELEMS", 2 * n * g)  # two G-row blocks / 2 * 3 rows per piece
    split = (F.select_columns_fast(cs, k, 16, compress=True, impl="interpret", width=512),
             F.mask_bits_to_indices(bits, counts, n, impl="interpret", width=512))
    chex.assert_trees_all_equal(whole[0], split[0])
    _assert_prefix_equal(split[1], S.ColumnSelection(whole[1], counts, None))
