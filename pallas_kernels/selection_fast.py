"""Fast attention column selection (docs/algorithm.md §1.5): column sums -> (indices, counts[, mask]) at video scale.

Computes what ``chipmunk_jax.selection.select_attention_columns`` computes (this package must not import it:
it takes plain arguments), without ``lax.top_k`` over 118,800 columns for 14,904 rows:

1. Threshold (pure jnp, XLA): per row the exact k-th largest column sum, found by a 32-step greedy bisection on
   order-preserving int32 keys of the f32 values (the idea of mlp_selection.py), then n_gt = #{key > t}. Each
   step is one fused compare+count pass over the column sums (33 passes of B*H*G*N*4 bytes).
2. Compaction (Pallas-Triton, one program per (b, h, g) row, ``width`` columns at a time; or pure jnp): the
   top-k set is {key > t} plus the first k - n_gt columns with key == t in column order, so EXACTLY k columns
   are kept, ties broken towards the lowest column index (lax.top_k's order for equal values). Then
   compressed path: mask = ((top-k OR random) AND eligible[g]) OR static[g]; indices [.., N] = selected
   columns ascending, then the lowest-numbered unselected ones (a permutation of 0..N-1, every slot valid);
   counts = min(ceil(popcount / multiple_of) * multiple_of, N). Two passes per row (count, then write).
   Uncompressed path: indices [.., k] = the top-k columns in ascending column order (the reference returns
   lax.top_k's descending-score order: same set, and the order is irrelevant to attention), counts = k.

Ties: none kept extra (unlike mlp_selection.py, which keeps all ties at the threshold). NaN column sums sort
above +inf (they should not occur). Float inputs of any dtype are compared as f32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from chipmunk_jax.validation import check_power_of_two, non_negative_int, positive_int

__all__ = ["select_columns_fast", "row_thresholds", "mask_bits_to_indices"]

_INT_MIN = -(2**31)
_IMPLS = ("pallas", "interpret", "jnp")
_MAX_ELEMS = 2**31 - 1  # keep every in-kernel flat offset in int32


def _by_row_pieces(fn, per: int, *row_arrays):
    """``fn`` over consecutive slices of ``per`` rows of ``row_arrays`` (None passes through), outputs joined
    along rows: keeps every in-kernel flat offset of a Pallas call within int32. ``fn`` returns an array or a
    tuple of arrays / None."""
    rows = row_arrays[0].shape[0]
    outs = [fn(*(None if a is None else a[r0:r0 + per] for a in row_arrays)) for r0 in range(0, rows, per)]
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], tuple):
        return tuple(None if parts[0] is None else jnp.concatenate(parts) for parts in zip(*outs))
    return jnp.concatenate(outs)


def _sortable_key(x):
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def row_thresholds(scores, k: int):
    """scores [R, N] -> (t [R] int32 key of the k-th largest value, need [R] int32 = k - #{key > t}).

    The top-k set is {key > t} plus the first ``need`` columns with key == t. k = 0 gives need = 0 and no
    column above t; k >= N keeps every column.
    """
    n = scores.shape[-1]
    k = max(0, min(int(k), n))

    def bit_step(i, t):
        cand = t | lax.shift_left(jnp.int32(1), 31 - i)
        n_ge = jnp.sum(_sortable_key(scores) >= (cand ^ jnp.int32(_INT_MIN))[:, None], axis=-1, dtype=jnp.int32)
        return jnp.where(n_ge >= k, cand, t)

    t = lax.fori_loop(0, 32, bit_step, jnp.zeros(scores.shape[:-1], jnp.int32)) ^ jnp.int32(_INT_MIN)
    n_gt = jnp.sum(_sortable_key(scores) > t[:, None], axis=-1, dtype=jnp.int32)
    return t, (k - n_gt).astype(jnp.int32)


_RADIX_BITS = 4
_RADIX = 1 << _RADIX_BITS


def _to_i32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _radix_kernel(cs_ref, thr_ref, need_ref, *, n, k, width):
    """One row: the k-th largest key by 8 radix passes of 4 bits, most significant first.

    Works on u = key ^ INT_MIN (unsigned order in int32 bits). Pass p histograms the next 4-bit digit
    of the elements whose higher digits equal the prefix found so far, then keeps the largest digit d
    with (#elements above the prefix) + #{digit >= d} >= k. After 8 passes the prefix is the k-th
    largest key and ``above`` counts the keys strictly greater."""
    lanes = jnp.arange(width, dtype=jnp.int32)
    digits = jnp.arange(_RADIX, dtype=jnp.int32)
    n_chunks = -(-n // width)
    prefix = jnp.int32(0)
    above = jnp.int32(0)
    for p in range(32 // _RADIX_BITS):
        shift = 32 - _RADIX_BITS * (p + 1)
        hi_mask = jnp.int32(_to_i32(~((1 << (32 - _RADIX_BITS * p)) - 1)))

        def hist_step(c, hist, prefix=prefix, shift=shift, hi_mask=hi_mask):
            cols = c * width + lanes
            valid = cols < n
            u = _sortable_key(plgpu.load(cs_ref.at[pl.ds(c * width, width)], mask=valid, other=0.0))
            u = u ^ jnp.int32(_INT_MIN)
            live = valid & ((u & hi_mask) == (prefix & hi_mask))
            digit = lax.shift_right_logical(u, jnp.int32(shift)) & (_RADIX - 1)
            onehot = live[:, None] & (digit[:, None] == digits[None, :])
            return hist + jnp.sum(onehot.astype(jnp.int32), axis=0)

        hist = lax.fori_loop(0, n_chunks, hist_step, jnp.zeros((_RADIX,), jnp.int32))
        # suffix[d] = #{digit >= d}; keep the largest d with above + suffix[d] >= k
        suffix = jnp.sum(jnp.where(digits[None, :] >= digits[:, None], hist[None, :], 0), axis=1)
        best = jnp.max(jnp.where(above + suffix >= k, digits, 0))
        above = above + jnp.sum(jnp.where(digits > best, hist, 0))
        prefix = prefix | lax.shift_left(best, jnp.int32(shift))
    thr_ref[...] = jnp.full((1,), prefix ^ jnp.int32(_INT_MIN), jnp.int32)
    need_ref[...] = jnp.full((1,), k - above, jnp.int32)


def _row_thresholds_pallas(scores, k: int, *, interpret: bool, width: int = 2048, num_warps: int = 8):
    """The Pallas twin of ``row_thresholds`` (same (t, need), bit for bit): 8 reads of each row instead of 33."""
    rows, n = scores.shape
    k = max(0, min(int(k), n))
    kernel = functools.partial(_radix_kernel, n=n, k=k, width=width)
    t, need = pl.pallas_call(
        kernel,
        grid=(rows,),
        in_specs=[pl.BlockSpec((None, n), lambda r: (r, 0))],
        out_specs=[pl.BlockSpec((1,), lambda r: (r,)), pl.BlockSpec((1,), lambda r: (r,))],
        out_shape=[jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="chipmunk_row_thresholds",
    )(scores.astype(jnp.float32))
    return t, need


# ----------------------------------------------------------------------------------------------------------
# pure jnp compaction (CPU default; also the twin the Pallas kernel is tested against)
# ----------------------------------------------------------------------------------------------------------


def _topk_mask_jnp(scores, t, need):
    key = _sortable_key(scores)
    tie = key == t[:, None]
    rank = jnp.cumsum(tie, axis=-1, dtype=jnp.int32)
    return (key > t[:, None]) | (tie & (rank <= need[:, None]))


def _mask_to_indices_jnp(mask, multiple_of, capacity):
    n = mask.shape[-1]
    selected = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    counts = jnp.minimum(-(-selected // multiple_of) * multiple_of, min(n, capacity)).astype(jnp.int32)
    slot = jnp.where(
        mask,
        jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1,
        selected[:, None] + jnp.cumsum(~mask, axis=-1, dtype=jnp.int32) - 1,
    )
    rows = jnp.arange(mask.shape[0])[:, None]
    cols = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), mask.shape)
    indices = jnp.zeros((mask.shape[0], capacity), jnp.int32).at[rows, slot].set(cols, mode="drop")
    return indices, counts


def _select_jnp(flat, t, need, k, multiple_of, compress, rand, static, elig, n_groups):
    top = _topk_mask_jnp(flat, t, need)
    if not compress:
        idx, _ = _mask_to_indices_jnp(top, 1, k)
        return idx, jnp.full(flat.shape[:1], k, jnp.int32), None
    g = jnp.arange(flat.shape[0]) % n_groups
    dyn = top
    if rand is not None:
        dyn = dyn | rand
    if elig is not None:
        dyn = dyn & elig[g][:, None]
    if static is not None:
        dyn = dyn | static[g]
    idx, cnt = _mask_to_indices_jnp(dyn, multiple_of, flat.shape[-1])
    return idx, cnt, dyn


# ----------------------------------------------------------------------------------------------------------
# Pallas-Triton compaction
# ----------------------------------------------------------------------------------------------------------


def _compact_kernel(cs_ref, thr_ref, need_ref, *refs, n, width, n_groups, capacity, multiple_of, compress,
                    has_rand, has_static, has_elig):
    refs = list(refs)
    rand_ref = refs.pop(0) if has_rand else None
    static_ref = refs.pop(0) if has_static else None
    elig_ref = refs.pop(0) if has_elig else None
    idx_ref, cnt_ref = refs[0], refs[1]
    mask_ref = refs[2] if compress else None
    row = pl.program_id(0)
    thr = thr_ref[row]
    need = need_ref[row]
    elig = (elig_ref[row % n_groups] != 0) if has_elig else None
    n_chunks = -(-n // width)
    lanes = jnp.arange(width, dtype=jnp.int32)

    def chosen(c, ties_before):
        cols = c * width + lanes
        valid = cols < n
        win = pl.ds(c * width, width)
        key = _sortable_key(plgpu.load(cs_ref.at[win], mask=valid, other=0.0))
        tie = valid & (key == thr)
        rank = ties_before + jnp.cumsum(tie.astype(jnp.int32))
        sel = valid & ((key > thr) | (tie & (rank <= need)))
        if compress:
            if has_rand:
                sel = sel | (valid & (plgpu.load(rand_ref.at[win], mask=valid, other=0) != 0))
            if has_elig:
                sel = sel & elig
            if has_static:
                sel = sel | (valid & (plgpu.load(static_ref.at[win], mask=valid, other=0) != 0))
        return cols, valid, sel, ties_before + jnp.sum(tie.astype(jnp.int32))

    zero = jnp.int32(0)
    if compress:
        def count(c, carry):
            ties, nsel = carry
            _, _, sel, ties = chosen(c, ties)
            return ties, nsel + jnp.sum(sel.astype(jnp.int32))

        _, n_sel = lax.fori_loop(0, n_chunks, count, (zero, zero))
    else:
        n_sel = jnp.int32(capacity)

    def write(c, carry):
        ties, sel_before, unsel_before = carry
        cols, valid, sel, ties = chosen(c, ties)
        rest = valid & ~sel
        sel_i = sel.astype(jnp.int32)
        rest_i = rest.astype(jnp.int32)
        slot = jnp.where(sel, sel_before + jnp.cumsum(sel_i) - 1, n_sel + unsel_before + jnp.cumsum(rest_i) - 1)
        ok = sel | rest if compress else sel
        plgpu.store(idx_ref.at[jnp.where(ok, slot, capacity)], cols, mask=ok)
        if compress:
            plgpu.store(mask_ref.at[pl.ds(c * width, width)], sel.astype(jnp.int8), mask=valid)
        return ties, sel_before + jnp.sum(sel_i), unsel_before + jnp.sum(rest_i)

    lax.fori_loop(0, n_chunks, write, (zero, zero, zero))
    if compress:
        padded = jnp.minimum((n_sel + multiple_of - 1) // multiple_of * multiple_of, n)
    else:
        padded = n_sel
    cnt_ref[...] = jnp.full((1,), padded, jnp.int32)


def _select_pallas(flat, t, need, k, multiple_of, compress, rand, static, elig, n_groups, *, interpret, width,
                   num_warps):
    rows, n = flat.shape
    capacity = n if compress else k
    kernel = functools.partial(
        _compact_kernel, n=n, width=width, n_groups=n_groups, capacity=capacity, multiple_of=multiple_of,
        compress=compress, has_rand=compress and rand is not None, has_static=compress and static is not None,
        has_elig=compress and elig is not None,
    )
    row_spec = pl.BlockSpec((None, n), lambda r: (r, 0))
    whole_rows = pl.BlockSpec((rows,), lambda r: (0,))
    args = [flat, t, need]
    in_specs = [row_spec, whole_rows, whole_rows]
    if compress and rand is not None:
        args.append(rand.astype(jnp.int8))
        in_specs.append(row_spec)
    if compress and static is not None:
        args.append(static.astype(jnp.int8))
        in_specs.append(pl.BlockSpec((None, n), lambda r: (r % n_groups, 0)))
    if compress and elig is not None:
        args.append(elig.astype(jnp.int32))
        in_specs.append(pl.BlockSpec((n_groups,), lambda r: (0,)))
    out_shape = [jax.ShapeDtypeStruct((rows, capacity), jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.int32)]
    out_specs = [pl.BlockSpec((None, capacity), lambda r: (r, 0)), pl.BlockSpec((1,), lambda r: (r,))]
    if compress:
        out_shape.append(jax.ShapeDtypeStruct((rows, n), jnp.int8))
        out_specs.append(row_spec)
    outs = pl.pallas_call(
        kernel,
        grid=(rows,),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="chipmunk_select_columns",
    )(*args)
    if compress:
        return outs[0], outs[1], outs[2] != 0
    return outs[0], outs[1], None


# ----------------------------------------------------------------------------------------------------------
# public entry
# ----------------------------------------------------------------------------------------------------------


def _check(colsum, k, multiple_of, compress, random_mask, eligible, static_mask, width, num_warps):
    if getattr(colsum, "ndim", None) != 4:
        raise ValueError(f"colsum must be [B, H, G, N], got shape {getattr(colsum, 'shape', None)}")
    if colsum.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise TypeError(f"colsum must be a float array, got {colsum.dtype}")
    non_negative_int("k", k)
    positive_int("multiple_of", multiple_of)
    g, n = colsum.shape[2], colsum.shape[3]
    if random_mask is not None:
        if getattr(random_mask, "shape", None) != colsum.shape or random_mask.dtype != jnp.bool_:
            raise ValueError(f"random_mask must be a bool array of shape {colsum.shape}")
    if eligible is not None:
        if getattr(eligible, "shape", None) != (g,) or eligible.dtype != jnp.bool_:
            raise ValueError(f"eligible must be a bool array of shape ({g},)")
    if static_mask is not None:
        if getattr(static_mask, "shape", None) != (g, n) or static_mask.dtype != jnp.bool_:
            raise ValueError(f"static_mask must be a bool array of shape ({g}, {n})")
    if not compress and (random_mask is not None or eligible is not None or static_mask is not None):
        raise ValueError("random / eligible / static masks belong to the compressed path (compress=True)")
    check_power_of_two("width", width, minimum=16)
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of 2 <= 32, got {num_warps!r}")


@functools.partial(jax.jit, static_argnames=("k", "multiple_of", "compress", "random_p", "impl", "width",
                                             "num_warps"))
def _select(colsum, key, random_mask, eligible, static_mask, *, k, multiple_of, compress, random_p, impl, width,
            num_warps):
    b, h, g, n = colsum.shape
    if compress and random_p > 0:
        drawn = jax.random.bernoulli(key, random_p, colsum.shape)
        random_mask = drawn if random_mask is None else random_mask | drawn
    flat = colsum.reshape(b * h * g, n)
    rand = None if random_mask is None else random_mask.reshape(b * h * g, n)
    if impl == "jnp":
        t, need = row_thresholds(flat, k)
    else:
        t, need = _by_row_pieces(lambda rows: _row_thresholds_pallas(rows, k, interpret=impl == "interpret"),
                                 max(1, _MAX_ELEMS // n), flat)
    if impl == "jnp":
        idx, cnt, mask = _select_jnp(flat, t, need, k, multiple_of, compress, rand, static_mask, eligible, g)
    else:
        # pieces of whole G-row blocks: the kernel maps row r to static-mask row r % G
        idx, cnt, mask = _by_row_pieces(
            lambda rows, t_, need_, rand_: _select_pallas(
                rows, t_, need_, k, multiple_of, compress, rand_, static_mask, eligible, g,
                interpret=impl == "interpret", width=width, num_warps=num_warps),
            max(1, _MAX_ELEMS // (n * g)) * g, flat, t, need, rand)
    cap = idx.shape[-1]
    idx = idx.reshape(b, h, g, cap)
    cnt = cnt.reshape(b, h, g)
    return idx, cnt, None if mask is None else mask.reshape(b, h, g, n)


def select_columns_fast(
    colsum,
    k: int,
    multiple_of: int,
    *,
    compress: bool,
    key=None,
    random_p: float = 0.0,
    random_mask=None,
    eligible=None,
    static_mask=None,
    impl: str | None = None,
    width: int = 2048,
    num_warps: int = 4,
):
    """Column sets from column sums [B, H, G, N] (the semantics of selection.select_attention_columns).

    k: top-k count per row (the caller's ``attention_column_count``, capped at N here). multiple_of: counts
    granularity of the compressed path. compress=False: returns (indices [B, H, G, max(k, 1)] int32, the
    top-k columns ascending (zeros if k = 0), counts [B, H, G] = k, None). compress=True: mask =
    ((top-k OR random) AND eligible[g]) OR static_mask[g]; random = ``random_mask`` (bool [B, H, G, N]) and/or
    jax.random.bernoulli(key, random_p, colsum.shape) (the reference's draw: identical given the same key);
    returns (indices [B, H, G, N], counts [B, H, G], mask bool [B, H, G, N]). ``impl``: "pallas" (GPU
    default), "interpret" (the Pallas kernel on CPU), "jnp" (CPU default).
    """
    compress = bool(compress)
    _check(colsum, k, multiple_of, compress, random_mask, eligible, static_mask, width, num_warps)
    random_p = float(random_p)
    if not 0.0 <= random_p <= 1.0:
        raise ValueError(f"random_p must be in [0, 1], got {random_p!r}")
    if compress and random_p > 0 and key is None:
        raise ValueError("key (a PRNG key) is required when random_p > 0")
    if not compress and random_p > 0:
        raise ValueError("random_p belongs to the compressed path (compress=True)")
    if impl is None:
        impl = "pallas" if jax.default_backend() == "gpu" else "jnp"
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS} or None, got {impl!r}")
    n = colsum.shape[-1]
    k = min(int(k), n)
    if not compress and k == 0:
        b, h, g, _ = colsum.shape
        return jnp.zeros((b, h, g, 1), jnp.int32), jnp.zeros((b, h, g), jnp.int32), None
    return _select(colsum, key if random_p > 0 else None, random_mask, eligible, static_mask, k=k,
                   multiple_of=multiple_of, compress=compress, random_p=random_p if compress else 0.0, impl=impl,
                   width=width, num_warps=num_warps)


# ----------------------------------------------------------------------------------------------------------
# sparse steps: bit-packed mask -> index lists
# ----------------------------------------------------------------------------------------------------------


def _bits_kernel(words_ref, cnt_ref, idx_ref, *, n, words_per_chunk):
    """One row: its bit-packed mask as int32 words -> the first ``counts`` index slots.

    A chunk is a [words, 32] tile of columns: a column's slot is the running count before its word (an
    exclusive cumsum of per-word popcounts, over words only) plus the popcount of the lower bits of its own
    word, so the per-column work is a few integer ops instead of a scan. Pass 1 writes the set columns
    ascending and counts them; pass 2 writes the padding (the lowest unset columns) and stops as soon as the
    ``counts`` slots are full, which is usually within its first chunk."""
    row = pl.program_id(0)
    count = cnt_ref[row]
    wpc = words_per_chunk
    word_ids = jnp.arange(wpc, dtype=jnp.int32)
    bit = jnp.arange(32, dtype=jnp.int32)
    below = lax.shift_left(jnp.int32(1), bit) - 1  # bits under each position (bit 31: 0x7FFFFFFF)
    n_words = -(-n // 32)
    n_chunks = -(-n_words // wpc)

    def chunk(c, unset):
        w = c * wpc + word_ids
        words = plgpu.load(words_ref.at[pl.ds(c * wpc, wpc)], mask=w < n_words, other=0)
        cols = w[:, None] * 32 + bit[None, :]
        if unset:  # columns past n are neither set nor padding
            last = jnp.clip(n - w * 32, 0, 32)
            valid_bits = jnp.where(last >= 32, jnp.int32(-1), lax.shift_left(jnp.int32(1), last) - 1)
            words = ~words & valid_bits
        on = lax.shift_right_logical(words[:, None], bit[None, :]) & 1 != 0
        per_word = lax.population_count(words)
        before = jnp.cumsum(per_word) - per_word
        within = lax.population_count(words[:, None] & below[None, :])
        return cols, on, before[:, None] + within, jnp.sum(per_word)

    def write_set(c, sel_before):
        cols, on, rank, total = chunk(c, unset=False)
        slot = sel_before + rank
        ok = on & (slot < count)
        plgpu.store(idx_ref.at[jnp.where(ok, slot, n)], cols, mask=ok)
        return sel_before + total

    n_sel = lax.fori_loop(0, n_chunks, write_set, jnp.int32(0))

    def pad_more(carry):
        c, rest_before = carry
        return (c < n_chunks) & (n_sel + rest_before < count)

    def write_pad(carry):
        c, rest_before = carry
        cols, on, rank, total = chunk(c, unset=True)
        slot = n_sel + rest_before + rank
        ok = on & (slot < count)
        plgpu.store(idx_ref.at[jnp.where(ok, slot, n)], cols, mask=ok)
        return c + 1, rest_before + total

    lax.while_loop(pad_more, write_pad, (jnp.int32(0), jnp.int32(0)))


def _bits_to_indices_jnp(bits, counts, n):
    mask = jnp.unpackbits(bits, axis=-1, count=n, bitorder="little").astype(jnp.bool_)
    idx, _ = _mask_to_indices_jnp(mask, 1, n)
    return idx


def _bits_to_indices_pallas(bits, counts, n, *, interpret, width, num_warps):
    rows, nb = bits.shape
    n_words = -(-nb // 4)
    # little-endian bytes -> int32 words: bit j of word w is column 32 w + j (the byte order of packbits)
    padded = jnp.pad(bits, ((0, 0), (0, 4 * n_words - nb)))
    words = lax.bitcast_convert_type(padded.reshape(rows, n_words, 4), jnp.int32)
    kernel = functools.partial(_bits_kernel, n=n, words_per_chunk=max(1, width // 32))
    return pl.pallas_call(
        kernel,
        grid=(rows,),
        in_specs=[pl.BlockSpec((None, n_words), lambda r: (r, 0)), pl.BlockSpec((rows,), lambda r: (0,))],
        out_specs=pl.BlockSpec((None, n), lambda r: (r, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, n), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="chipmunk_mask_bits_to_indices",
    )(words, counts)


@functools.partial(jax.jit, static_argnames=("n", "impl", "width", "num_warps"))
def _bits_to_indices(bits, counts, *, n, impl, width, num_warps):
    lead = bits.shape[:-1]
    flat_bits = bits.reshape(-1, bits.shape[-1])
    flat_counts = counts.reshape(-1).astype(jnp.int32)
    if impl == "jnp":
        idx = _bits_to_indices_jnp(flat_bits, flat_counts, n)
    else:
        idx = _by_row_pieces(
            lambda bits_, counts_: _bits_to_indices_pallas(bits_, counts_, n, interpret=impl == "interpret",
                                                           width=width, num_warps=num_warps),
            max(1, _MAX_ELEMS // n), flat_bits, flat_counts)
    return idx.reshape(*lead, n)


def mask_bits_to_indices(bits, counts, num_columns: int, *, impl: str | None = None, width: int = 1024,
                         num_warps: int = 4):
    """Index lists of a bit-packed column mask (the compressed path's cache, between full steps).

    bits: uint8 [..., ceil(N / 8)] (little-endian bits, ``jnp.packbits(..., bitorder="little")``);
    counts: int32 [...], the padded counts stored with the mask (>= its popcount). Returns int32
    [..., N] whose first ``counts`` slots are what ``chipmunk_jax.selection.mask_to_indices`` puts there:
    the set columns ascending, then the lowest-numbered unset columns as padding. The Pallas kernel writes
    ONLY those slots (slots >= counts are left unwritten: the sparse kernels never read them), so a sparse
    step reads ~N/8 bytes and writes ``counts`` indices per row instead of a cumsum + scatter over N.
    ``impl``: "pallas" (GPU default), "interpret", "jnp" (CPU default; writes every slot).
    """
    if getattr(bits, "ndim", 0) < 1 or bits.dtype != jnp.uint8:
        raise TypeError(f"bits must be a uint8 array [..., ceil(N / 8)], got {getattr(bits, 'dtype', None)} "
                        f"{getattr(bits, 'shape', None)}")
    num_columns = positive_int("num_columns", num_columns)
    if bits.shape[-1] != -(-num_columns // 8):
        raise ValueError(f"bits has {bits.shape[-1]} bytes per row, expected ceil({num_columns} / 8)")
    if getattr(counts, "shape", None) != bits.shape[:-1] or not jnp.issubdtype(counts.dtype, jnp.integer):
        raise ValueError(f"counts must be an integer array of shape {bits.shape[:-1]}, got "
                         f"{getattr(counts, 'dtype', None)} {getattr(counts, 'shape', None)}")
    width = check_power_of_two("width", width, minimum=32)
    if impl is None:
        impl = "pallas" if jax.default_backend() == "gpu" else "jnp"
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS} or None, got {impl!r}")
    return _bits_to_indices(bits, counts, n=num_columns, impl=impl, width=width, num_warps=num_warps)
