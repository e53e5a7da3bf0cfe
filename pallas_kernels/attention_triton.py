"""Dense attention (+LSE) and dense attention + column sums as Triton kernels with Hopper TMA loads.

Written in Triton itself (launched by triton_call.py), not in Pallas: the same algorithm as
attention_pallas's dense kernels, but K/V (and Q) tiles arrive by TMA (``tl.make_tensor_descriptor`` on the
[B*N, H*D] view of the [B, N, H, D] arrays), which Pallas-Triton on jax 0.11.2 cannot emit. On the H100 this
is what takes dense+LSE from ~1.27x to ~1.1x the cuDNN time and dense+LSE+colsum from ~1.7x to ~1.4x
(2026-11-25 in benchmarks/archive/RESULTS-2026-11-23-to-2026-12-03.md).

Column sums (docs/algorithm.md §1.4) come from the tensor cores: with the previous LSE as a fixed softmax offset (as
attention_pallas's default), P = exp(s - prev_lse) is final when computed, and each key block's group sums are
P^T @ W, W [BM, 16] the 0/1 "row i is in the j-th group this program touches" matrix. A 128-row program
touches at most ceil(127 / group_size) + 1 groups and adds its partial sums into the zeroed colsum with fp32
atomics; with group_size 192 every colsum entry receives exactly two partial sums, so the result does not
depend on their order (0 + a + b == 0 + b + a). Rows whose LSE moved by 60 or more since ``prev_lse``
make the call fall back to attention_pallas's online-softmax colsum kernel (as there).

Ragged lengths: query rows past N_q load the next batch's rows (or TMA's zero fill past the array) and are
never stored; in the fixed-offset kernel their offset is +inf, so they add nothing to the column sums.
Key columns past N_k are masked to -inf in the last block and their V rows zeroed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl
from jax import lax

from chipmunk_jax.pallas_kernels import attention_pallas as ap
from chipmunk_jax.pallas_kernels import triton_call as tc
from chipmunk_jax.validation import check_power_of_two, field, positive_int, validate_fields

_LOG2E = 1.4426950408889634
_FIXED_OFFSET_LIMIT = 60.0  # as attention_pallas: |lse - prev_lse| bound of the fixed offset (natural log)
_GROUP_SLOTS = 16  # columns of W: groups one program may touch (the smallest wgmma-friendly width)


@dataclasses.dataclass(frozen=True)
class TritonAttentionConfig:
    """Tiles and launch options. block_q / block_k powers of 2 (Triton's rule), block_q >= 64, block_k >= 16."""

    block_q: int = field(128, check=functools.partial(check_power_of_two, minimum=64))
    block_k: int = field(128, check=functools.partial(check_power_of_two, minimum=16))
    num_warps: int = field(8, check=check_power_of_two)
    num_stages: int = field(3, check=positive_int)

    def __post_init__(self):
        validate_fields(self, prefix="TritonAttentionConfig.")


# H100, 2026-11-25 (colsum probe kernels, 32,640 and 118,656 tokens, 24 heads; benchmarks/NOTES_triton.md §6): online
# dense 128x128 tiles, 8 warps, 3 stages 1.09-1.12x cuDNN; colsum 128x64 tiles: 3 stages 1.45x (stored halves) /
# 1.37x (atomics), 4 stages 1.40-1.42x (stored halves), 2 stages 2.0x; 64-key blocks with 4 warps 1.43-1.45x.
DEFAULT_DENSE = TritonAttentionConfig(block_q=128, block_k=128, num_warps=8, num_stages=3)
DEFAULT_COLSUM = TritonAttentionConfig(block_q=128, block_k=64, num_warps=8, num_stages=4)
PRODUCTION_DENSE_CONFIGS = (DEFAULT_DENSE,)
PRODUCTION_COLSUM_CONFIGS = (
    DEFAULT_COLSUM,
    TritonAttentionConfig(block_q=128, block_k=64, num_warps=8, num_stages=3),
    TritonAttentionConfig(block_q=128, block_k=64, num_warps=8, num_stages=5),
)
HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)


@triton.jit
def _attend_block(q, kd, vd, key_row, col0, acc, m_i, l_i, offset,
                  NK: tl.constexpr, BN: tl.constexpr, HD, SCALE2: tl.constexpr, FIXED: tl.constexpr,
                  MASKED: tl.constexpr):
    k = kd.load([key_row + col0, HD])
    v = vd.load([key_row + col0, HD])
    qk = tl.dot(q, k.T)
    if MASKED:  # the last, partial key block: columns past N_k hold the next batch's keys or TMA's zeros
        col_ok = col0 + tl.arange(0, BN) < NK
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
        v = tl.where(col_ok[:, None], v, 0.0)
    if FIXED:
        p = tl.math.exp2(qk * SCALE2 - offset[:, None])
        l_i += tl.sum(p, 1)
    else:  # online softmax; the running max is over scaled logits in log2 units
        m_new = tl.maximum(m_i, tl.max(qk, 1) * SCALE2)
        p = tl.math.exp2(qk * SCALE2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_i, l_i, p


@triton.jit
def _add_group_sums(cs_ptr, p, w, cs_rows, slot_ok, col0, NK: tl.constexpr, BN: tl.constexpr):
    part = tl.dot(tl.trans(p.to(w.dtype)), w)  # [BN, slots]: the key block's sums over each touched group
    cols = col0 + tl.arange(0, BN)
    mask = slot_ok[None, :] & (cols < NK)[:, None]
    tl.atomic_add(cs_ptr + cs_rows[None, :] + cols[:, None], part, mask=mask, sem="relaxed")


@triton.jit
def chipmunk_triton_attention(q_ptr, k_ptr, v_ptr, plse_ptr, o_ptr, lse_ptr, cs_ptr,
                              B: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, H: tl.constexpr,
                              D: tl.constexpr, SCALE2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                              FIXED: tl.constexpr, COLSUM: tl.constexpr, GROUP: tl.constexpr, SLOTS: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    hd = (bh % H) * D
    # [B, N, H, D] seen as a [B*N, H*D] matrix: one head's rows are a [rows, D] box at column h*D.
    qd = tl.make_tensor_descriptor(q_ptr, shape=[B * NQ, H * D], strides=[H * D, 1], block_shape=[BM, D])
    kd = tl.make_tensor_descriptor(k_ptr, shape=[B * NK, H * D], strides=[H * D, 1], block_shape=[BN, D])
    vd = tl.make_tensor_descriptor(v_ptr, shape=[B * NK, H * D], strides=[H * D, 1], block_shape=[BN, D])
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < NQ
    q = qd.load([b * NQ + pid_m * BM, hd])
    if FIXED:  # rows past N_q get offset +inf: p = 0 there
        offset = tl.load(plse_ptr + bh * NQ + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    else:
        offset = tl.zeros([BM], tl.float32)
    m_i = tl.zeros([BM], tl.float32) - float("inf")
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    if COLSUM:
        g0 = (pid_m * BM) // GROUP
        slot = tl.arange(0, SLOTS)
        w = tl.where(((rows // GROUP - g0)[:, None] == slot[None, :]) & row_ok[:, None], 1.0, 0.0)
        w = w.to(q_ptr.dtype.element_ty)
        last_row = tl.minimum(pid_m * BM + BM, NQ) - 1
        slot_ok = slot <= last_row // GROUP - g0
        cs_rows = (bh * ((NQ + GROUP - 1) // GROUP) + g0 + slot).to(tl.int64) * NK
    key_row = b * NK
    for col0 in tl.range(0, (NK // BN) * BN, BN):
        acc, m_i, l_i, p = _attend_block(q, kd, vd, key_row, col0, acc, m_i, l_i, offset, NK, BN, hd, SCALE2,
                                         FIXED, False)
        if COLSUM:
            _add_group_sums(cs_ptr, p, w, cs_rows, slot_ok, col0, NK, BN)
    if NK % BN != 0:
        col0 = (NK // BN) * BN
        acc, m_i, l_i, p = _attend_block(q, kd, vd, key_row, col0, acc, m_i, l_i, offset, NK, BN, hd, SCALE2,
                                         FIXED, True)
        if COLSUM:
            _add_group_sums(cs_ptr, p, w, cs_rows, slot_ok, col0, NK, BN)
    base = offset if FIXED else m_i
    tl.store(lse_ptr + bh * NQ + rows, (base + tl.math.log2(l_i)) * 0.6931471805599453, mask=row_ok)
    out_rows = (b * NQ + rows).to(tl.int64) * (H * D) + hd
    o_ptrs = o_ptr + out_rows[:, None] + tl.arange(0, D)[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def _call(q, k, v, prev_lse, *, scale, group_size, fixed, colsum, config, interpret):
    b, nq, h, d = q.shape
    nk = k.shape[1]
    dtype = q.dtype
    if interpret:  # Triton's interpreter (3.7) misreads bf16 through tensor descriptors: run it in f32
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    groups = -(-nq // group_size)
    outs = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, nq), jnp.float32),
            jax.ShapeDtypeStruct((b, h, groups, nk) if colsum else (1,), jnp.float32))
    plse = prev_lse if fixed else jnp.zeros((1,), jnp.float32)
    constexprs = dict(B=b, NQ=nq, NK=nk, H=h, D=d, SCALE2=float(scale) * _LOG2E, BM=config.block_q,
                      BN=config.block_k, FIXED=fixed, COLSUM=colsum, GROUP=group_size, SLOTS=_GROUP_SLOTS)
    o, lse, cs = tc.triton_call(
        chipmunk_triton_attention, q, k, v, plse, out_shapes=outs, grid=(-(-nq // config.block_q), b * h, 1),
        constexprs=constexprs, num_warps=config.num_warps, num_stages=config.num_stages,
        zeroed_outputs=(2,) if colsum else (), interpret=interpret)
    return o.astype(dtype), lse, cs


def dense_attention(q, k, v, *, scale: float, interpret: bool = False,
                    config: TritonAttentionConfig | None = None):
    """(o, lse [B, H, N_q] f32) with online softmax; attention.dense_attention validates the inputs."""
    o, lse, _ = _call(q, k, v, None, scale=scale, group_size=1, fixed=False, colsum=False,
                      config=config or DEFAULT_DENSE, interpret=interpret)
    return o, lse


def dense_attention_colsum(q, k, v, prev_lse, *, group_size: int, scale: float, interpret: bool = False,
                           config: TritonAttentionConfig | None = None):
    """(o, lse, colsum [B, H, ceil(N_q / group_size), N_k] f32), prev_lse as the fixed softmax offset."""
    o, lse, cs = _call(q, k, v, prev_lse, scale=scale, group_size=group_size, fixed=True, colsum=True,
                       config=config or DEFAULT_COLSUM, interpret=interpret)
    fits = jnp.all(jnp.abs(lse - prev_lse) < _FIXED_OFFSET_LIMIT)  # NaN / inf fail too

    def online():
        return ap.dense_attention_colsum(q, k, v, prev_lse, group_size=group_size, scale=scale, interpret=interpret,
                                         config=dataclasses.replace(ap.DEFAULT_COLSUM, fixed_offset=False))

    return lax.cond(fits, lambda: (o, lse, cs), online)


def compile_for_sm90(shape_q, shape_k, dtype, *, colsum: bool, group_size: int = 192,
                     config: TritonAttentionConfig | None = None):
    """triton.compile for the H100 without a GPU (lowering tests): returns the compiled kernel."""
    config = config or (DEFAULT_COLSUM if colsum else DEFAULT_DENSE)
    b, nq, h, d = shape_q
    ptr = tc._POINTER_TYPES[jnp.dtype(dtype)]
    pointer_types = (ptr, ptr, ptr, "*fp32", ptr, "*fp32", "*fp32")
    constexprs = dict(B=b, NQ=nq, NK=shape_k[1], H=h, D=d, SCALE2=d**-0.5 * _LOG2E, BM=config.block_q,
                      BN=config.block_k, FIXED=colsum, COLSUM=colsum, GROUP=group_size, SLOTS=_GROUP_SLOTS)
    return tc.compile_kernel(chipmunk_triton_attention, pointer_types, tuple(sorted(constexprs.items())),
                             config.num_warps, config.num_stages, 90)
