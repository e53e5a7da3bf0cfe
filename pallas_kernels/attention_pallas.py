"""Pallas-Triton attention kernels: dense (+LSE), dense + fused column sums, gathered column-sparse.

Semantics are defined by attention_reference.py; the public op API (validation, impl switch) is
attention.py. Layout: q, k, v stay [batch, seq, heads, head_dim]; every kernel reads them in place
through whole-sequence blocks per (batch, head) (a pointer plus strides on the GPU), so the wrapper
never transposes or pads. Edge rows are handled with masked loads/stores (jax 0.11.2's Triton lowering
does not mask edge blocks itself), key positions >= N are masked to -inf.

Triton rules honoured here (docs/kernels.md §1): every in-kernel array has a power-of-2 size, so a
192-query group is processed as sub-tiles of ``block_q`` (64) rows that share every K/V chunk they
load; no scalar prefetch (counts and indices are ordinary inputs, the loop bound is read in the
kernel); static grids; f32 inputs use precision=HIGHEST dots (TF32 otherwise).

Grids put the query-block / query-group axis first (fastest varying in launch order), so the
programs in flight at any time work on the same (batch, head) and share its K/V in L2.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from chipmunk_jax.validation import is_power_of_two

__all__ = [
    "DenseConfig",
    "SparseConfig",
    "dense_attention",
    "dense_attention_colsum",
    "column_sparse_attention",
    "SUPPORTED_HEAD_DIMS",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_FIXED_OFFSET_LIMIT = 60.0  # |lse - prev_lse| bound of DenseConfig.fixed_offset (natural log units)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class DenseConfig:
    """Tiling of the dense kernels.

    Each program owns ``n_sub`` sub-tiles of ``block_q`` query rows (for the colsum kernel: one
    query group, ``n_sub = ceil(group_size / block_q)``, the field is then ignored) and loops over
    keys in blocks of ``block_k``.
    """

    block_q: int = 128
    n_sub: int = 1
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    tiles: tuple[int, ...] = ()  # colsum only: explicit sub-tile heights per group, e.g. (128, 64)
    # colsum only, "seq" layout (v3): one program owns ``groups_per_program`` whole query groups (default:
    # lcm(group, block_q) rows, e.g. 2 groups = 3 tiles of 128 for 192/128) and runs them as sequential
    # ``block_q``-row flash passes, each exactly the fast dense tile; the column sums of a pass are one small
    # MMA W[16, block_q] @ P[block_q, block_k] (row j of W = the rows' weights of the j-th group the tile
    # touches) and are added into the [G, N] output (read-modify-write by the same program for a group
    # that straddles two tiles). cs_dot: "wp" = W @ P (M=16), "pw" = (P^T @ W^T)^T (M=block_k).
    seq: bool = False
    cs_dot: str = "wp"
    groups_per_program: int = 0
    # "seq" colsum only: softmax with the previous LSE as a fixed offset instead of an online running max.
    # p = exp(s - prev_lse) is then both the column-sum term (docs/algorithm.md §1.4) and the unnormalised softmax:
    # o = (p @ v) / sum(p), lse = prev_lse + log(sum(p)); no running max, no rescaling of the accumulator and a
    # constant column-sum weight matrix. Exact while |lse - prev_lse| stays within f32's exponent range;
    # dense_attention_colsum checks that per row and reruns the online kernel when it does not hold.
    fixed_offset: bool = False


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """Tiling of the gathered sparse kernel.

    A query group is split into ``ceil(group_size / block_q)`` sub-tiles of ``block_q`` rows; they are
    shared out over ``programs_per_group`` programs (1: one program holds all sub-tiles and gathers
    each K/V chunk once; 3 for 192/64: one 64-row program per sub-tile, each gathering the chunk).
    Keys are gathered ``chunk`` at a time.
    """

    block_q: int = 64
    programs_per_group: int = 1
    chunk: int = 64
    num_warps: int = 4
    num_stages: int = 3
    tiles: tuple[int, ...] = ()  # explicit sub-tile heights per group, e.g. (128, 64); implies 1 program/group
    # Load the next chunk's key indices one step ahead (a loop-carried vector), so the K/V gathers of a step do
    # not wait on an index load of the same step.
    prefetch_indices: bool = False


# Timings below: benchmarks/archive/RESULTS-2026-11-23-to-2026-12-03.md (H100 runs 2-4 and 2026-11-25, H200 2026-12-03).
# block_k=128 (run 3, H100): 0.613 vs 0.643 ms for block_k=64 at N=4,608 in the same sweep; 28.1 ms (1.22x cuDNN) at
# 32,760 and 151.3 ms (1.25x) at 75,600. block_k=64 measured 391.8 ms (1.29x) at 118,800 in run 2; block_k=128 376.5 ms
# (1.25x) at 118,800 and 28.1 ms (1.24x) at 32,760 later. With the max taken over unscaled logits (scale in the
# exponent's FFMA): 355.7 / 27.4 ms; alternating 1 s blocks with cuDNN: 1.200x / 1.211x its time. A degree-3
# polynomial exp2 on the FMA pipe for 16 or 32 of each 128 keys (FlashAttention-4's trick) was 20-26% SLOWER
# (449.4 / 420.8 ms at 118,800): the split dots and the extra FP32 instructions cost more than the MUFU time saved.
DEFAULT_DENSE = DenseConfig(block_q=128, n_sub=1, block_k=128, num_warps=8, num_stages=3)
# v3: sequential 128-row passes with the MMA column sums (see DenseConfig.seq). Run 4 (H100): 591.6 ms at N=118,800
# (1.95x cuDNN time), 46.5 ms at 32,760 (1.99x); "pw" dot 615 / 47.0 ms, 4 stages 594 / 46.6 ms; the v2 layout (3x64
# sub-tiles per group, jnp.sum reduction) 1033 / 78.0 ms in the same run.
# Default (NOTES_attention.md v5): the same with the previous LSE as a fixed softmax offset. H100, N=75,600, H=40:
# 345.4 ms (1.68x cuDNN) vs 400.1 ms (1.94x) for v3 in the same run.
ONLINE_COLSUM = DenseConfig(block_q=128, block_k=64, num_warps=8, num_stages=3, seq=True)
FIXED_OFFSET_COLSUM = dataclasses.replace(ONLINE_COLSUM, fixed_offset=True)
DEFAULT_COLSUM = FIXED_OFFSET_COLSUM
# Run 2 (H100): 3x64-row sub-tiles in one program, C=64, 4 warps: 32.1 ms at N=118,800 (9.45x cuDNN), 2.92 ms
# at 32,760 (8.07x); 64-row programs (ppg=3) 36.5 / 2.69 ms; (128, 64) tiles with 8 warps slower (43 / 3.3 ms).
DEFAULT_SPARSE = SparseConfig(block_q=64, programs_per_group=1, chunk=64, num_warps=4, num_stages=3)
# Short sequences launch too few (batch, head, group) programs to fill the H100; 64-row programs (ppg=3) then win:
# N=4,608 (576 programs) 0.088 vs 0.097 ms at 93% (run 3), 0.169 vs 0.181 ms at 83% (2026-11-25, FLUX's density);
# at 32,760 (4,104 programs) ppg=1 wins at 83% (5.84 vs 6.24 ms, 2026-11-25; run 2 had ppg=3 ahead at 93%), and at
# 118,800 (14,904) at 93% (32.1 vs 36.5 ms).
# H200, 2026-12-03 (83%, one sweep): 5 stages 0.141 ms at N=4,608 vs 0.155 with 3 (the gathered K/V rows hang off an
# index load in the same step, which costs the pipeliner a stage; 4 stages 0.156, 32-key chunks 6 stages 0.149,
# index prefetch 0.143). It was also the fastest at 32,760 (5.74 vs 5.90 ms for DEFAULT_SPARSE), but ppg=1 won at
# 118,800 with 3 stages (above) and that size has not been re-swept, so DEFAULT_SPARSE stays.
SMALL_GRID_SPARSE = dataclasses.replace(DEFAULT_SPARSE, programs_per_group=3, num_stages=5)
SMALL_GRID_PROGRAMS = 2048


def default_sparse_config(batch: int, heads: int, groups: int, itemsize: int = 2) -> SparseConfig:
    """The sparse kernel configuration for a launch of batch x heads x groups query groups of ``itemsize``-byte
    q/k/v. The small-grid tiling's 5 stages were measured for 2-byte inputs; 4-byte K/V tiles at that depth would
    ask for more shared memory than an SM has, so float32 keeps 3 stages."""
    if batch * heads * groups > SMALL_GRID_PROGRAMS:
        return DEFAULT_SPARSE
    return SMALL_GRID_SPARSE if itemsize <= 2 else dataclasses.replace(SMALL_GRID_SPARSE, num_stages=3)

# Every configuration the benchmarks / production may use: the lowering tests cover all of these.
PRODUCTION_DENSE_CONFIGS = (
    DEFAULT_DENSE,
    DenseConfig(block_q=128, n_sub=1, block_k=64, num_warps=8, num_stages=3),
    DenseConfig(block_q=128, n_sub=1, block_k=64, num_warps=8, num_stages=4),
)
PRODUCTION_COLSUM_CONFIGS = (
    DEFAULT_COLSUM,
    ONLINE_COLSUM,
    # fixed-offset variants (H100, 2026-11-25): block_k 128 / 2 stages 41.5 / 558.7 ms at 32,760 / 118,800 (slower
    # than the default's 38.9 / 513.9); 4 stages 36.4 / 516.9 ms (faster at 32,760 only).
    dataclasses.replace(FIXED_OFFSET_COLSUM, block_k=128, num_stages=2),
    dataclasses.replace(FIXED_OFFSET_COLSUM, num_stages=4),
    dataclasses.replace(ONLINE_COLSUM, cs_dot="pw"),
    # v1/v2 layout: one program per group, parallel sub-tiles, jnp.sum column reduction (run 2: 3.3x cuDNN).
    DenseConfig(block_q=64, block_k=64, num_warps=4, num_stages=2),
)
PRODUCTION_SPARSE_CONFIGS = (
    DEFAULT_SPARSE,
    SMALL_GRID_SPARSE,
    SparseConfig(chunk=64, num_warps=8, num_stages=3, tiles=(128, 64)),
    SparseConfig(chunk=64, num_warps=8, num_stages=2, tiles=(128, 64)),
    SparseConfig(chunk=128, num_warps=8, num_stages=2, tiles=(128, 64)),
    # The gathered K/V rows hang off an index load in the same step, which costs the pipeliner a stage (as in the
    # MLP's fc2, whose 5 stages beat 3 by 23%): deeper pipelines, and 32-key chunks to keep two CTAs per SM.
    # H200 sweep of 2026-12-03 (83% sparse, N = 4,608 / 32,760 ms): the small-grid default before it (3 stages)
    # 0.155 / 6.26, 4 stages 0.156 / 6.23, 32-key chunks with 4 / 6 stages 0.155 / 6.53 and 0.149 / 6.47, ppg=1 with
    # 5 stages 0.220 / 8.86 and 32-key chunks 0.189 / 6.09; index prefetch (ppg=3 3 / 4 stages, ppg=1) 0.143 / 5.99,
    # 0.206 / 8.46, 0.253 / 10.28.
    dataclasses.replace(DEFAULT_SPARSE, programs_per_group=3),
    dataclasses.replace(DEFAULT_SPARSE, programs_per_group=3, num_stages=4),
    dataclasses.replace(DEFAULT_SPARSE, programs_per_group=3, chunk=32, num_stages=4),
    dataclasses.replace(DEFAULT_SPARSE, programs_per_group=3, chunk=32, num_stages=6),
    dataclasses.replace(DEFAULT_SPARSE, chunk=32, num_stages=5),
    dataclasses.replace(DEFAULT_SPARSE, num_stages=5),
    dataclasses.replace(DEFAULT_SPARSE, programs_per_group=3, prefetch_indices=True),
    dataclasses.replace(DEFAULT_SPARSE, programs_per_group=3, prefetch_indices=True, num_stages=4),
    dataclasses.replace(DEFAULT_SPARSE, prefetch_indices=True),
)


def _check_head_dim(d: int):
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {d} is not supported by the Pallas kernels; supported: {SUPPORTED_HEAD_DIMS}")


def _precision(dtype):
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _sub_rows(group_size: int, block_q: int) -> tuple[int, int]:
    """Sub-tile height for a query group and the number of sub-tiles (power-of-2 heights >= 16)."""
    bq = min(block_q, max(16, pl.next_power_of_2(group_size)))
    return bq, -(-group_size // bq)


def _group_tiles(group_size, block_q, tiles):
    """Sub-tile heights covering one query group: explicit ``tiles`` if they cover it, else equal ones."""
    if tiles and sum(tiles) >= group_size and all(is_power_of_two(t) and t >= 16 for t in tiles):
        return tuple(tiles)
    bq, n = _sub_rows(group_size, block_q)
    return (bq,) * n


def _bh_index(num_heads):
    """Index map (program, bh) -> block of a [B, N, H, D] array holding one whole (b, h) slice."""
    return lambda i, bh: (bh // num_heads, 0, bh % num_heads, 0)


def _exp2(x, fast):
    """exp2; on the GPU the single MUFU instruction (jnp.exp2 lowers to libdevice's slower __nv_exp2f)."""
    if not fast:
        return jnp.exp2(x)
    (y,) = plgpu.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )
    return y


def _online_update(qk2, v, carry, precision, fast):
    """One flash-attention step for one sub-tile. qk2: logits in log2 units (masked = -inf)."""
    acc, m, l = carry
    m_new = jnp.maximum(m, jnp.max(qk2, axis=1))
    alpha = _exp2(m - m_new, fast)
    p = _exp2(qk2 - m_new[:, None], fast)
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
    return (acc, m_new, l), p


# ----------------------------------------------------------------------------------------------
# Dense (+ colsum)
# ----------------------------------------------------------------------------------------------


def _load_kv_block(k_ref, v_ref, kstart, bk, nk, masked):
    """The key block at kstart: (k, v, valid-key mask or None); ``masked``: the ragged last block."""
    if not masked:
        return k_ref[pl.ds(kstart, bk), :], v_ref[pl.ds(kstart, bk), :], None
    kok = (kstart + jnp.arange(bk)) < nk
    k = plgpu.load(k_ref.at[pl.ds(kstart, bk), :], mask=kok[:, None], other=0.0)
    v = plgpu.load(v_ref.at[pl.ds(kstart, bk), :], mask=kok[:, None], other=0.0)
    return k, v, kok


def _dense_kernel(q_ref, k_ref, v_ref, *refs, scale, nq, nk, tiles, bk, group_size, colsum, precision, fast):
    if colsum:
        plse_ref, o_ref, lse_ref, cs_ref = refs
    else:
        o_ref, lse_ref = refs
    pid = pl.program_id(0)
    d = q_ref.shape[-1]
    if colsum:
        row0 = pid * group_size
        row_end = jnp.minimum(row0 + group_size, nq)
    else:
        row0 = pid * sum(tiles)
        row_end = nq
    scale2 = scale * _LOG2E
    n_sub = len(tiles)

    starts, oks, qs, plse2 = [], [], [], []
    for s, bq in enumerate(tiles):
        start = row0 + sum(tiles[:s])
        ok = (start + jnp.arange(bq)) < row_end
        starts.append(start)
        oks.append(ok)
        qs.append(plgpu.load(q_ref.at[pl.ds(start, bq), :], mask=ok[:, None], other=0.0))
        if colsum:
            pls = plgpu.load(plse_ref.at[pl.ds(start, bq)], mask=ok, other=float("inf"))
            plse2.append(pls * _LOG2E)

    def dense_step(kb, carry, masked):
        """One key block for every sub-tile, logits kept unscaled: the running max is over raw logits and
        scale2 enters each exponent as one FFMA, s * scale2 - m * scale2."""
        kstart = kb * bk
        k, v, kok = _load_kv_block(k_ref, v_ref, kstart, bk, nk, masked)
        new = []
        for s in range(n_sub):
            acc, m, l = carry[s]
            sc = plgpu.dot(qs[s], k, trans_b=True, precision=precision)
            if masked:
                sc = jnp.where(kok[None, :], sc, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(sc, axis=1))
            mb = m_new * scale2
            alpha = _exp2(m * scale2 - mb, fast)
            p = _exp2(sc * scale2 - mb[:, None], fast)
            l = l * alpha + jnp.sum(p, axis=1)
            acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
            new.append((acc, m_new, l))
        return tuple(new)

    def step(kb, carry, masked):
        if not colsum:
            return dense_step(kb, carry, masked)
        kstart = kb * bk
        k, v, kok = _load_kv_block(k_ref, v_ref, kstart, bk, nk, masked)
        new = []
        csum = None
        for s in range(n_sub):
            qk2 = plgpu.dot(qs[s], k, trans_b=True, precision=precision) * scale2
            if masked:
                qk2 = jnp.where(kok[None, :], qk2, -jnp.inf)
            c, p = _online_update(qk2, v, carry[s], precision, fast)
            new.append(c)
            # exp(scale s - prev_lse) = p * exp2(m_new - prev_lse2); rows outside the group: 0.
            r = _exp2(c[1] - plse2[s], fast)
            part = jnp.sum(p * r[:, None], axis=0)
            csum = part if csum is None else csum + part
        if masked:
            plgpu.store(cs_ref.at[pid, pl.ds(kstart, bk)], csum, mask=kok)
        else:
            cs_ref[pid, pl.ds(kstart, bk)] = csum
        return tuple(new)

    init = tuple(
        (
            jnp.zeros((bq, d), jnp.float32),
            jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32),
        )
        for bq in tiles
    )
    n_full, tail = divmod(nk, bk)
    carry = init
    if n_full:
        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    if tail:  # a one-trip loop keeps the start index traced (static slices are bounds-checked)
        carry = lax.fori_loop(n_full, n_full + 1, functools.partial(step, masked=True), carry)

    for s, bq in enumerate(tiles):
        acc, m, l = carry[s]
        o = acc / l[:, None]
        m2 = m if colsum else m * scale2  # the dense path keeps the max of unscaled logits
        plgpu.store(o_ref.at[pl.ds(starts[s], bq), :], o.astype(o_ref.dtype), mask=oks[s][:, None])
        plgpu.store(lse_ref.at[pl.ds(starts[s], bq)], (m2 + jnp.log2(l)) * _LN2, mask=oks[s])


def _colsum_seq_kernel(q_ref, k_ref, v_ref, plse_ref, o_ref, lse_ref, cs_ref, *, scale, nq, nk, bq, bk,
                       group_size, groups_per_prog, slots, cs_dot, fixed_offset, precision, fast):
    """Dense attention + column sums, "seq" layout (DenseConfig.seq): sequential ``bq``-row passes.

    The program's rows [row0, row0 + groups_per_prog * group_size) start and end on group boundaries; pass t
    covers rows row0 + t*bq ..., touching groups g_first .. g_first + slots - 1. Per key block the column sums
    of all touched groups come from one MMA: part[j, :] = sum_i W[j, i] P[i, :], W[j, i] = r_i if row i is in
    group g_first + j, with r_i = exp2(m_i - prev_lse2_i) (so W @ P sums exp(s - prev_lse), docs/algorithm.md §1.4).
    A group that began in an earlier pass of this program is read back and added (same program, a whole key
    pass later); a group's first pass stores. ``fixed_offset``: see DenseConfig (W is then the 0/1 indicator).
    """
    pid = pl.program_id(0)
    d = q_ref.shape[-1]
    prog_row0 = pid * (groups_per_prog * group_size)
    prog_end = jnp.minimum(prog_row0 + groups_per_prog * group_size, nq)
    n_tiles = lax.div(prog_end - prog_row0 + (bq - 1), bq)
    scale2 = scale * _LOG2E
    cdt = v_ref.dtype
    slot_ids = jnp.arange(slots, dtype=jnp.int32)
    n_full, tail = divmod(nk, bk)

    def tile(t, tile_carry):
        start = prog_row0 + t * bq
        rows = start + jnp.arange(bq, dtype=jnp.int32)
        ok = rows < prog_end
        q = plgpu.load(q_ref.at[pl.ds(start, bq), :], mask=ok[:, None], other=0.0)
        plse2 = plgpu.load(plse_ref.at[pl.ds(start, bq)], mask=ok, other=float("inf")) * _LOG2E
        g_first = lax.div(start, group_size)
        rel = lax.div(rows, group_size) - g_first
        sel = (rel[None, :] == slot_ids[:, None]) & ok[None, :]  # [slots, bq]
        tile_end = jnp.minimum(start + bq, prog_end)
        g_start = (g_first + slot_ids) * group_size
        slot_ok = g_start < tile_end  # the group has rows in this pass
        cont = slot_ok & (g_start < start)  # ... and rows in an earlier pass: accumulate
        indicator = jnp.where(sel, 1.0, 0.0).astype(cdt) if fixed_offset else None  # fixed offset's W

        def step(kb, carry, masked):
            kstart = kb * bk
            k, v, kok = _load_kv_block(k_ref, v_ref, kstart, bk, nk, masked)
            qk2 = plgpu.dot(q, k, trans_b=True, precision=precision) * scale2
            if masked:
                qk2 = jnp.where(kok[None, :], qk2, -jnp.inf)
            if fixed_offset:
                acc, l = carry
                p = _exp2(qk2 - plse2[:, None], fast)
                pc = p.astype(cdt)
                c = (acc + plgpu.dot(pc, v, precision=precision), l + jnp.sum(p, axis=1))
                w = indicator
            else:
                c, p = _online_update(qk2, v, carry, precision, fast)
                r = _exp2(c[1] - plse2, fast)
                w = jnp.where(sel, r[None, :], 0.0).astype(cdt)
                pc = p.astype(cdt)
            if cs_dot == "wp":
                part = plgpu.dot(w, pc, precision=precision)
            else:
                part = plgpu.dot(pc, w, trans_a=True, trans_b=True, precision=precision).T
            at = cs_ref.at[pl.ds(g_first, slots), pl.ds(kstart, bk)]
            smask = slot_ok[:, None] if kok is None else slot_ok[:, None] & kok[None, :]
            lmask = cont[:, None] if kok is None else cont[:, None] & kok[None, :]
            prev = plgpu.load(at, mask=lmask, other=0.0)
            plgpu.store(at, prev + part, mask=smask)
            return c

        acc0, l0 = jnp.zeros((bq, d), jnp.float32), jnp.zeros((bq,), jnp.float32)
        carry = (acc0, l0) if fixed_offset else (acc0, jnp.full((bq,), -jnp.inf, jnp.float32), l0)
        if n_full:
            carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
        if tail:
            carry = lax.fori_loop(n_full, n_full + 1, functools.partial(step, masked=True), carry)
        if fixed_offset:
            (acc, l), m = carry, plse2
        else:
            acc, m, l = carry
        plgpu.store(o_ref.at[pl.ds(start, bq), :], (acc / l[:, None]).astype(o_ref.dtype), mask=ok[:, None])
        plgpu.store(lse_ref.at[pl.ds(start, bq)], (m + jnp.log2(l)) * _LN2, mask=ok)
        return tile_carry

    lax.fori_loop(0, n_tiles, tile, jnp.int32(0))


def _seq_layout(group_size, config):
    """(groups per program, slots) of the "seq" colsum layout."""
    bq = config.block_q
    gpp = config.groups_per_program
    if gpp <= 0:
        lcm = group_size * bq // math.gcd(group_size, bq)
        gpp = lcm // group_size if lcm // bq <= 8 else 1
    slots = max(16, pl.next_power_of_2(min(gpp, bq // group_size + 2)))
    return gpp, slots


@functools.partial(jax.jit, static_argnames=("scale", "group_size", "colsum", "interpret", "config"))
def _dense_call(q, k, v, prev_lse, *, scale, group_size, colsum, interpret, config):
    b, nq, h, d = q.shape
    nk = k.shape[1]
    _check_head_dim(d)
    bk = config.block_k
    if colsum and config.seq:
        return _colsum_seq_call(q, k, v, prev_lse, scale=scale, group_size=group_size, interpret=interpret,
                                config=config)
    if colsum:
        tiles = _group_tiles(group_size, config.block_q, config.tiles)
        n_prog = -(-nq // group_size)
    else:
        tiles = (config.block_q,) * config.n_sub
        n_prog = -(-nq // sum(tiles))
    assert all(is_power_of_two(t) for t in tiles) and is_power_of_two(bk), (tiles, bk)
    kernel = functools.partial(
        _dense_kernel, scale=scale, nq=nq, nk=nk, tiles=tiles, bk=bk,
        group_size=group_size, colsum=colsum, precision=_precision(q.dtype), fast=not interpret,
    )
    bh_map = _bh_index(h)
    in_specs = [
        pl.BlockSpec((None, nq, None, d), bh_map),
        pl.BlockSpec((None, nk, None, d), bh_map),
        pl.BlockSpec((None, nk, None, d), bh_map),
    ]
    stat_spec = pl.BlockSpec((None, None, nq), lambda i, bh: (bh // h, bh % h, 0))
    out_shape = [q, jax.ShapeDtypeStruct((b, h, nq), jnp.float32)]
    out_specs = [pl.BlockSpec((None, nq, None, d), bh_map), stat_spec]
    args = [q, k, v]
    if colsum:
        in_specs.append(stat_spec)
        args.append(prev_lse)
        out_shape.append(jax.ShapeDtypeStruct((b, h, n_prog, nk), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, n_prog, nk), lambda i, bh: (bh // h, bh % h, 0, 0)))
    return pl.pallas_call(
        kernel,
        grid=(n_prog, b * h),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="chipmunk_dense_colsum" if colsum else "chipmunk_dense",
    )(*args)


def _colsum_seq_call(q, k, v, prev_lse, *, scale, group_size, interpret, config):
    b, nq, h, d = q.shape
    nk = k.shape[1]
    bq, bk = config.block_q, config.block_k
    assert is_power_of_two(bq) and bq >= 16 and is_power_of_two(bk) and bk >= 16, (bq, bk)
    if config.cs_dot not in ("wp", "pw"):
        raise ValueError(f"cs_dot must be 'wp' or 'pw', got {config.cs_dot!r}")
    gpp, slots = _seq_layout(group_size, config)
    n_groups = -(-nq // group_size)
    n_prog = -(-n_groups // gpp)
    kernel = functools.partial(
        _colsum_seq_kernel, scale=scale, nq=nq, nk=nk, bq=bq, bk=bk, group_size=group_size,
        groups_per_prog=gpp, slots=slots, cs_dot=config.cs_dot, fixed_offset=config.fixed_offset,
        precision=_precision(q.dtype),
        fast=not interpret,
    )
    bh_map = _bh_index(h)
    stat_spec = pl.BlockSpec((None, None, nq), lambda i, bh: (bh // h, bh % h, 0))
    return pl.pallas_call(
        kernel,
        grid=(n_prog, b * h),
        in_specs=[
            pl.BlockSpec((None, nq, None, d), bh_map),
            pl.BlockSpec((None, nk, None, d), bh_map),
            pl.BlockSpec((None, nk, None, d), bh_map),
            stat_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, nq, None, d), bh_map),
            stat_spec,
            pl.BlockSpec((None, None, n_groups, nk), lambda i, bh: (bh // h, bh % h, 0, 0)),
        ],
        out_shape=[
            q,
            jax.ShapeDtypeStruct((b, h, nq), jnp.float32),
            jax.ShapeDtypeStruct((b, h, n_groups, nk), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="chipmunk_dense_colsum",
    )(q, k, v, prev_lse)


def dense_attention(q, k, v, *, scale: float, interpret: bool = False, config: DenseConfig | None = None):
    o, lse = _dense_call(
        q, k, v, None, scale=scale, group_size=1, colsum=False, interpret=interpret,
        config=config or DEFAULT_DENSE,
    )
    return o, lse


def dense_attention_colsum(
    q, k, v, prev_lse, *, group_size: int, scale: float, interpret: bool = False, config: DenseConfig | None = None
):
    config = config or DEFAULT_COLSUM
    call = functools.partial(_dense_call, q, k, v, prev_lse, scale=scale, group_size=group_size, colsum=True,
                             interpret=interpret)
    if not (config.seq and config.fixed_offset):
        return call(config=config)
    o, lse, cs = call(config=config)
    # the fixed offset is exact while every row's sum(p) = exp(lse - prev_lse) is a normal f32 far from
    # overflow: |lse - prev_lse| < 60 (NaN / inf fail the test too). Else the online kernel redoes the call.
    fits = jnp.all(jnp.abs(lse - prev_lse) < _FIXED_OFFSET_LIMIT)
    online = dataclasses.replace(config, fixed_offset=False)
    return lax.cond(fits, lambda: (o, lse, cs), lambda: call(config=online))


# ----------------------------------------------------------------------------------------------
# Gathered column-sparse attention
# ----------------------------------------------------------------------------------------------


def _sparse_kernel(q_ref, k_ref, v_ref, idx_ref, cnt_ref, *refs, scale, nq, group_size, tiles, ppg,
                   chunk, has_base, sign, precision, fast, prefetch):
    if has_base:
        base_ref, o_ref = refs
    else:
        (o_ref,) = refs
    pid = pl.program_id(0)
    g = pid // ppg if ppg > 1 else pid
    part = pid % ppg if ppg > 1 else 0
    d = q_ref.shape[-1]
    row0 = g * group_size + part * sum(tiles)
    row_end = jnp.minimum(g * group_size + group_size, nq)
    count = cnt_ref[g]
    scale2 = scale * _LOG2E
    kmax = idx_ref.shape[-1]
    n_sub = len(tiles)

    starts, oks, qs = [], [], []
    for s, bq in enumerate(tiles):
        start = row0 + sum(tiles[:s])
        ok = (start + jnp.arange(bq)) < row_end
        starts.append(start)
        oks.append(ok)
        qs.append(plgpu.load(q_ref.at[pl.ds(start, bq), :], mask=ok[:, None], other=0.0))

    def load_ids(c):  # chunk c of the index row, 0 past its end
        return plgpu.load(idx_ref.at[pl.ds(c * chunk, chunk)], mask=c * chunk + jnp.arange(chunk) < kmax, other=0)

    def step(c, carry, masked, ids=None):
        j = c * chunk + jnp.arange(chunk)
        if masked:
            jok = j < count
            ids = plgpu.load(idx_ref.at[pl.ds(c * chunk, chunk)], mask=jok, other=0)
        elif ids is None:
            ids = idx_ref[pl.ds(c * chunk, chunk)]
        k = k_ref[ids, :]
        v = v_ref[ids, :]
        new = []
        for s in range(n_sub):
            qk2 = plgpu.dot(qs[s], k, trans_b=True, precision=precision) * scale2
            if masked:
                qk2 = jnp.where(jok[None, :], qk2, -jnp.inf)
            cs, _ = _online_update(qk2, v, carry[s], precision, fast)
            new.append(cs)
        return tuple(new)

    init = tuple(
        (
            jnp.zeros((bq, d), jnp.float32),
            jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32),
        )
        for bq in tiles
    )
    n_full = lax.div(count, chunk)
    n_all = lax.div(count + (chunk - 1), chunk)
    carry = init
    if kmax >= chunk and prefetch:
        def prefetched(c, state):
            ids, carry = state
            return load_ids(c + 1), step(c, carry, masked=False, ids=ids)

        _, carry = lax.fori_loop(0, n_full, prefetched, (load_ids(0), carry))
    elif kmax >= chunk:  # else count < chunk: only the masked tail can run
        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(n_full, n_all, functools.partial(step, masked=True), carry)

    for s, bq in enumerate(tiles):
        acc, _, l = carry[s]
        o = acc / jnp.where(l > 0, l, 1.0)[:, None]
        rows = pl.ds(starts[s], bq)
        if has_base:
            base = plgpu.load(base_ref.at[rows, :], mask=oks[s][:, None], other=0.0).astype(jnp.float32)
            o = base + o if sign == 1 else base - o
        plgpu.store(o_ref.at[rows, :], o.astype(o_ref.dtype), mask=oks[s][:, None])


@functools.partial(jax.jit, static_argnames=("group_size", "scale", "sign", "interpret", "config"))
def _sparse_call(q, k, v, indices, counts, base, *, group_size, scale, sign, interpret, config):
    b, nq, h, d = q.shape
    nk = k.shape[1]
    _check_head_dim(d)
    groups, kmax = indices.shape[2], indices.shape[3]
    all_tiles = _group_tiles(group_size, config.block_q, config.tiles)
    ppg = config.programs_per_group
    if len(set(all_tiles)) != 1 or len(all_tiles) % ppg:
        ppg = 1
    tiles = all_tiles[: len(all_tiles) // ppg]
    chunk = config.chunk
    assert all(is_power_of_two(t) for t in tiles) and is_power_of_two(chunk), (tiles, chunk)
    has_base = base is not None
    kernel = functools.partial(
        _sparse_kernel, scale=scale, nq=nq, group_size=group_size, tiles=tiles, ppg=ppg,
        chunk=chunk, has_base=has_base, sign=sign, precision=_precision(q.dtype), fast=not interpret,
        prefetch=config.prefetch_indices,
    )
    bh_map = _bh_index(h)
    in_specs = [
        pl.BlockSpec((None, nq, None, d), bh_map),
        pl.BlockSpec((None, nk, None, d), bh_map),
        pl.BlockSpec((None, nk, None, d), bh_map),
        pl.BlockSpec((None, None, None, kmax), lambda i, bh: (bh // h, bh % h, i // ppg, 0)),
        pl.BlockSpec((None, None, groups), lambda i, bh: (bh // h, bh % h, 0)),
    ]
    args = [q, k, v, indices, counts]
    # base is read, not aliased to the output: every output row is written, and on a sparse step base is the
    # attention cache, which stays live, so an alias made XLA copy it first (one 28 MB MemcpyD2D per FLUX layer
    # and step: benchmarks/profiles/flux_sparse_h200_2026-12-03.md).
    if has_base:
        in_specs.append(pl.BlockSpec((None, nq, None, d), bh_map))
        args.append(base)
    out_dtype = base.dtype if has_base else q.dtype
    return pl.pallas_call(
        kernel,
        grid=(groups * ppg, b * h),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, nq, None, d), bh_map),
        out_shape=jax.ShapeDtypeStruct(q.shape, out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="chipmunk_column_sparse",
    )(*args)


def column_sparse_attention(
    q, k, v, indices, counts, *, group_size: int, scale: float, base=None, sign: int = 1,
    interpret: bool = False, config: SparseConfig | None = None,
):
    if config is None:
        config = default_sparse_config(q.shape[0], q.shape[2], indices.shape[2], jnp.dtype(k.dtype).itemsize)
    return _sparse_call(
        q, k, v, indices, counts, base, group_size=group_size, scale=scale, sign=sign,
        interpret=interpret, config=config,
    )
