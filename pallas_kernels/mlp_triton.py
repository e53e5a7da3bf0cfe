"""The sparse-delta MLP kernels (fc1 delta, fc2 delta) in Triton with Hopper TMA loads; twin: mlp_reference.py.

Same algorithm as mlp_pallas (docs/algorithm.md §2.2), written in Triton itself and launched by triton_call.py, because the
token-side operand (x tiles for fc1, packed delta tiles for fc2) can then arrive by TMA
(``tl.make_tensor_descriptor``), which Pallas-Triton on jax 0.11.2 cannot emit. The gathered weight rows stay
pointer loads (cp.async): Hopper has no TMA gather.

  fc1: program (row block r, packed feature chunk j): the [BM tokens, BF features] tile
       z = x[rows] @ w1t[ids]^T + b1[ids] (``tokens_major``; else the transposed [BF, BM] tile), GELU-tanh in
       f32, delta = new - act_cache[ids, rows], act_cache[ids, rows] = new in place, and delta stored
       token-major into delta [B, NB*BM, Kp] (column c of row block r <-> feature indices[b, r, c]).
  fc2: program (row block r, output tile n): out_cache[rows, n-tile] += delta[rows, :count] @ w2[ids, n-tile],
       f32 accumulation, in place.

Both kernels also take a layer scan's stacks (weights [L, ...] and / or caches [L', ...], told apart by rank): they
load the [weights layer, cache layer] index pair and offset their pointers, and a stacked cache is updated in place
as a whole (aliased), so no layer is copied out of a stack for them (pallas_kernels.mlp.sparse_mlp_delta).

The delta buffer is token-major here (mlp_pallas keeps it feature-major): fc2 then reads it as the MMA's A
operand with K contiguous, the layout TMA and wgmma want. It is internal to sparse_mlp_delta.
Chunks at or past ceil(count / BF) are never written and never read (fc2 reads ceil(count / fc2 BK) chunks of
BK <= BF columns); within written chunks, slots past count and tokens past N hold 0.
Ragged N: token rows past N load the next batch's rows (or TMA's zero fill) and are masked at every store.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from chipmunk_jax.pallas_kernels import triton_call as tc
from chipmunk_jax.pallas_kernels.mlp_pallas import _pow2_divisor, pad_indices
from chipmunk_jax.validation import (
    check_bool,
    check_power_of_two,
    field,
    non_negative_int,
    positive_int,
    validate_fields,
)

_tile = functools.partial(check_power_of_two, minimum=16)  # tile sizes: powers of 2, the smallest MMA 16


@dataclasses.dataclass(frozen=True)
class TritonMlpConfig:
    """Tiles and launch options of the two kernels. Tile sizes are powers of 2 (Triton's rule).

    fc1_features (BF) must be a multiple of fc2_k: fc2 reads only chunks fc1 wrote. ``row_group``: programs
    run in groups of that many row blocks (0 = all), row blocks fastest within a group, so a group's token tiles
    stay in L2 while its programs gather nearby weight rows (mlp_pallas.MlpTiles.row_group, measured there).
    """

    fc1_features: int = field(128, check=_tile)
    fc1_k: int = field(64, check=_tile)
    fc1_warps: int = field(4, check=check_power_of_two)
    fc1_stages: int = field(3, check=positive_int)
    fc1_tokens_major: bool = field(True, check=check_bool)  # MMA M = tokens (x is the A operand) or M = features
    fc2_cols: int = field(128, check=_tile)
    fc2_k: int = field(64, check=_tile)
    fc2_warps: int = field(4, check=check_power_of_two)
    # 3 tiles in flight (see PRODUCTION_CONFIGS); H200: 0.224 ms vs 0.291 ms with 3 stages
    fc2_stages: int = field(5, check=positive_int)
    row_group: int = field(32, check=non_negative_int)

    def __post_init__(self):
        validate_fields(self, prefix="TritonMlpConfig.")
        if self.fc1_features % self.fc2_k:
            raise ValueError(f"TritonMlpConfig.fc1_features ({self.fc1_features}) must be a multiple of fc2_k "
                             f"({self.fc2_k})")


DEFAULT_CONFIG = TritonMlpConfig()
# What benchmarks/mlp.py sweeps on the GPU and the compile tests cover: the 128x128 tiles of the Pallas default
# (4 warps, two CTAs per SM) and the 128 x 256 tiles of Hopper GEMMs (8 warps, two consumer warpgroups). fc2's
# gathered rows hang off an index load in the same K step, which costs a pipeline stage: fc2 keeps
# 2 tiles in flight at 3 and 4 stages, 3 tiles at 5 (triton 3.6), fc1 (loop-invariant indices) num_stages.
PRODUCTION_CONFIGS = (
    DEFAULT_CONFIG,
    TritonMlpConfig(fc1_tokens_major=False, fc2_stages=3),
    TritonMlpConfig(fc1_features=256, fc1_warps=8, fc2_cols=256, fc2_warps=8, fc2_stages=3),
    TritonMlpConfig(fc1_features=256, fc1_warps=8, fc1_stages=4, fc2_cols=256, fc2_warps=8, fc2_stages=5),
    TritonMlpConfig(fc1_features=256, fc1_warps=8, fc1_tokens_major=False, fc2_cols=256, fc2_k=128, fc2_warps=8,
                    fc2_stages=3),
    TritonMlpConfig(fc1_features=128, fc1_warps=8, fc1_stages=4, fc2_cols=128, fc2_warps=8, fc2_stages=5),
    TritonMlpConfig(fc1_k=128, fc1_warps=8),
)
# Not here: K = 32 with deep pipelines (fc1 5-6 stages, fc2 8), two CTAs per SM with 3-4 half tiles in flight.
# H200, 2026-12-03: fc1 0.244-0.269 ms vs 0.217 for the default, fc2 0.220 vs 0.191
# (benchmarks/archive/RESULTS-2026-11-23-to-2026-12-03.md).
BLOCK_SIZES = (64, 128, 256)  # tokens per row block: the M of a TMA box (<= 256) and a power of 2
DTYPES = (jnp.bfloat16, jnp.float16)


def unsupported_reason(x, w1, w2, block_size: int, interpret: bool = False) -> str | None:
    """Why these kernels cannot take the inputs (None: they can); the platform is triton_call.platform_unsupported's
    to check. Shapes are validated by the op."""
    if not interpret:
        if not (x.dtype == w1.dtype == w2.dtype) or x.dtype not in DTYPES:
            return f"it takes x, w1, w2 all bfloat16 or all float16, got {x.dtype}, {w1.dtype}, {w2.dtype}"
    if block_size not in BLOCK_SIZES:
        return f"it takes block_size in {BLOCK_SIZES}, got {block_size}"
    if x.shape[-1] % 16:
        return f"it takes C (x's features) a multiple of 16, got {x.shape[-1]}"
    if w2.shape[1] % 16:
        return f"it takes C_out a multiple of 16, got {w2.shape[1]}"
    return None


@triton.jit
def _launch_order(pid, NB: tl.constexpr, INNER, GROUP: tl.constexpr):
    """(row block, inner index) of program ``pid``: groups of GROUP row blocks, row blocks fastest."""
    group: tl.constexpr = NB if GROUP == 0 else min(GROUP, NB)
    per_group = group * INNER
    first = (pid // per_group) * group
    size = tl.minimum(group, NB - first)
    within = pid % per_group
    return first + within % size, within // size


@triton.jit
def _gelu_tanh(z):
    # 0.5 z (1 + tanh u) == z - z / (exp(2u) + 1): one exp2 (2.885... = 2 / ln 2; 0.797... = sqrt(2 / pi)),
    # no NaN at either end (exp2 -> 0 or inf).
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    return z - z / (tl.math.exp2(2.8853900817779268 * u) + 1.0)


@triton.jit
def chipmunk_triton_mlp_fc1(layers_ptr, ids_ptr, counts_ptr, x_ptr, w1t_ptr, b1_ptr, act_ptr, delta_ptr, act_out_ptr,
                            B: tl.constexpr, N: tl.constexpr, C: tl.constexpr, F: tl.constexpr, KP: tl.constexpr,
                            NB: tl.constexpr, BM: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr,
                            GROUP: tl.constexpr, TOKENS_M: tl.constexpr, W_STACKED: tl.constexpr,
                            CACHE_STACKED: tl.constexpr):
    r, j = _launch_order(tl.program_id(0), NB, KP // BF, GROUP)
    b = tl.program_id(1)
    count = tl.load(counts_ptr + b * NB + r)
    if j * BF < count:
        if W_STACKED:  # entry layers[0] of [L, F, C] / [L, F]
            w_layer = tl.load(layers_ptr).to(tl.int64)
            w1t_ptr += w_layer * F * C
            b1_ptr += w_layer * F
        if CACHE_STACKED:  # entry layers[1] of [L', B, F, N], updated in place in the whole stack
            c_layer = tl.load(layers_ptr + 1).to(tl.int64)
            act_ptr += c_layer * B * F * N
            act_out_ptr += c_layer * B * F * N
        pos = j * BF + tl.arange(0, BF)
        feat_ok = pos < count
        feats = tl.where(feat_ok, tl.load(ids_ptr + (b * NB + r) * KP + pos), 0)
        xd = tl.make_tensor_descriptor(x_ptr, shape=[B * N, C], strides=[C, 1], block_shape=[BM, BK])
        w_rows = w1t_ptr + feats.to(tl.int64)[:, None] * C + tl.arange(0, BK)[None, :]
        tokens = r * BM + tl.arange(0, BM)
        token_ok = tokens < N
        bias = tl.load(b1_ptr + feats).to(tl.float32)
        act_rows = (b * F + feats).to(tl.int64) * N
        delta_rows = (b * NB * BM + tokens).to(tl.int64) * KP
        if TOKENS_M:  # [BM, BF]: tokens are the MMA's M, x its A operand
            acc = tl.zeros([BM, BF], tl.float32)
            for k in tl.range(0, C, BK):
                acc = tl.dot(xd.load([b * N + r * BM, k]), tl.load(w_rows + k).T, acc)
            new = _gelu_tanh(acc + bias[None, :])
            ok = token_ok[:, None] & feat_ok[None, :]
            act_off = act_rows[None, :] + tokens[:, None]
            delta_off = delta_rows[:, None] + pos[None, :]
        else:  # [BF, BM]: features are M, the tile is already feature-major like act_cache
            acc = tl.zeros([BF, BM], tl.float32)
            for k in tl.range(0, C, BK):
                acc = tl.dot(tl.load(w_rows + k), xd.load([b * N + r * BM, k]).T, acc)
            new = _gelu_tanh(acc + bias[:, None])
            ok = feat_ok[:, None] & token_ok[None, :]
            act_off = act_rows[:, None] + tokens[None, :]
            delta_off = delta_rows[None, :] + pos[:, None]
        cached = tl.load(act_ptr + act_off, mask=ok, other=0.0).to(tl.float32)
        tl.store(delta_ptr + delta_off, tl.where(ok, new - cached, 0.0).to(delta_ptr.dtype.element_ty))
        tl.store(act_out_ptr + act_off, new.to(act_out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def chipmunk_triton_mlp_fc2(layers_ptr, ids_ptr, counts_ptr, delta_ptr, w2_ptr, out_ptr, out_out_ptr,
                            B: tl.constexpr, N: tl.constexpr, F: tl.constexpr, KP: tl.constexpr, COUT: tl.constexpr,
                            NB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            GROUP: tl.constexpr, W_STACKED: tl.constexpr, CACHE_STACKED: tl.constexpr):
    r, nt = _launch_order(tl.program_id(0), NB, COUT // BN, GROUP)
    b = tl.program_id(1)
    count = tl.load(counts_ptr + b * NB + r)
    if count > 0:
        if W_STACKED:  # entry layers[0] of [L, F, C_out]
            w2_ptr += tl.load(layers_ptr).to(tl.int64) * F * COUT
        if CACHE_STACKED:  # entry layers[1] of [L', B, N, C_out], updated in place in the whole stack
            c_layer = tl.load(layers_ptr + 1).to(tl.int64)
            out_ptr += c_layer * B * N * COUT
            out_out_ptr += c_layer * B * N * COUT
        dd = tl.make_tensor_descriptor(delta_ptr, shape=[B * NB * BM, KP], strides=[KP, 1], block_shape=[BM, BK])
        cols = nt * BN + tl.arange(0, BN)
        acc = tl.zeros([BM, BN], tl.float32)
        for kc in tl.range(0, tl.cdiv(count, BK)):
            pos = kc * BK + tl.arange(0, BK)
            feats = tl.where(pos < count, tl.load(ids_ptr + (b * NB + r) * KP + pos), 0)
            w = tl.load(w2_ptr + feats.to(tl.int64)[:, None] * COUT + cols[None, :])
            acc = tl.dot(dd.load([(b * NB + r) * BM, kc * BK]), w, acc)
        tokens = r * BM + tl.arange(0, BM)
        off = (b * N + tokens).to(tl.int64)[:, None] * COUT + cols[None, :]
        ok = (tokens < N)[:, None]
        old = tl.load(out_ptr + off, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_out_ptr + off, (old + acc).to(out_out_ptr.dtype.element_ty), mask=ok)


def _fc1_constexprs(x_shape, num_features, indices_shape, block_size, config, *, w_stacked=False,
                    cache_stacked=False):
    b, n, c = x_shape
    nb, kp = indices_shape[1:]
    return dict(B=b, N=n, C=c, F=num_features, KP=kp, NB=nb, BM=block_size, BF=config.fc1_features,
                BK=_pow2_divisor(c, config.fc1_k, "C"), GROUP=config.row_group, TOKENS_M=config.fc1_tokens_major,
                W_STACKED=w_stacked, CACHE_STACKED=cache_stacked)


def _fc2_constexprs(out_shape, num_features, indices_shape, block_size, config, *, w_stacked=False,
                    cache_stacked=False):
    b, n, c_out = out_shape
    nb, kp = indices_shape[1:]
    return dict(B=b, N=n, F=num_features, KP=kp, COUT=c_out, NB=nb, BM=block_size,
                BN=_pow2_divisor(c_out, config.fc2_cols, "C_out"),
                BK=config.fc2_k, GROUP=config.row_group, W_STACKED=w_stacked, CACHE_STACKED=cache_stacked)


def _layers_operand(weights_layer, cache_layer):
    """[weights_layer, cache_layer] as the int32 [2] array the kernels load (0 for an operand not stacked)."""
    as_index = lambda i: jnp.zeros((), jnp.int32) if i is None else jnp.asarray(i, jnp.int32)  # noqa: E731
    return jnp.stack([as_index(weights_layer), as_index(cache_layer)])


def fc1_delta(x, w1t, b1, act_cache, indices, counts, *, block_size: int, weights_layer=None, cache_layer=None,
              config: TritonMlpConfig = DEFAULT_CONFIG, interpret: bool = False):
    """(delta [B, NB*block_size, Kp] token-major, new act_cache); Kp a multiple of config.fc1_features.

    Stacks (told apart by rank): w1t [L, F, C] with b1 [L, F] use entry ``weights_layer``, act_cache
    [L', B, F, N] entry ``cache_layer`` (int32 scalars, may be traced); a stacked act_cache is returned whole,
    updated in place (aliased), so a layer scan never copies its layer out and back."""
    b, n, c = x.shape
    nb, kp = indices.shape[1:]
    w_stacked, cache_stacked = w1t.ndim == 3, act_cache.ndim == 4
    if interpret:  # Triton's interpreter (3.7) misreads bf16 through tensor descriptors: the MMA operands in f32
        x, w1t = x.astype(jnp.float32), w1t.astype(jnp.float32)
    outs = (jax.ShapeDtypeStruct((b, nb * block_size, kp), x.dtype),
            jax.ShapeDtypeStruct(act_cache.shape, act_cache.dtype))
    constexprs = _fc1_constexprs(x.shape, w1t.shape[-2], indices.shape, block_size, config, w_stacked=w_stacked,
                                 cache_stacked=cache_stacked)
    return tc.triton_call(chipmunk_triton_mlp_fc1, _layers_operand(weights_layer, cache_layer), indices, counts, x, w1t, b1, act_cache,
                          out_shapes=outs, grid=(nb * (kp // config.fc1_features), b, 1), constexprs=constexprs,
                          num_warps=config.fc1_warps, num_stages=config.fc1_stages, input_output_aliases={6: 1},
                          interpret=interpret)


def fc2_delta(delta, w2, out_cache, indices, counts, *, block_size: int, weights_layer=None, cache_layer=None,
              config: TritonMlpConfig = DEFAULT_CONFIG, interpret: bool = False):
    """out_cache[b, rows of block r] += delta[b, rows, :counts] @ w2[indices[b, r, :counts]], in place.

    Stacks as fc1_delta's: w2 [L, F, C_out] (``weights_layer``), out_cache [L', B, N, C_out] (``cache_layer``)."""
    w_stacked, cache_stacked = w2.ndim == 3, out_cache.ndim == 4
    b, n, c_out = out_cache.shape[-3:]
    nb = indices.shape[1]
    if interpret:
        delta, w2 = delta.astype(jnp.float32), w2.astype(jnp.float32)
    constexprs = _fc2_constexprs((b, n, c_out), w2.shape[-2], indices.shape, block_size, config,
                                 w_stacked=w_stacked, cache_stacked=cache_stacked)
    (out,) = tc.triton_call(chipmunk_triton_mlp_fc2, _layers_operand(weights_layer, cache_layer), indices, counts, delta, w2, out_cache,
                            out_shapes=(jax.ShapeDtypeStruct(out_cache.shape, out_cache.dtype),),
                            grid=(nb * (c_out // constexprs["BN"]), b, 1), constexprs=constexprs,
                            num_warps=config.fc2_warps, num_stages=config.fc2_stages, input_output_aliases={5: 0},
                            interpret=interpret)
    return out


def sparse_mlp_delta(x, w1, b1, w2, act_cache, out_cache, indices, counts, *, block_size: int = 128,
                     interpret: bool = False, w1_transposed: bool = False, weights_layer=None, cache_layer=None,
                     config: TritonMlpConfig = DEFAULT_CONFIG):
    """fc1_delta then fc2_delta; returns (act_cache, out_cache). Arguments as in mlp.sparse_mlp_delta (weights and
    / or caches stacked on a leading layer axis, told apart by rank; stacked caches come back whole)."""
    w1t = w1 if w1_transposed else jnp.swapaxes(w1, -1, -2)
    indices = pad_indices(indices, config.fc1_features)
    layers = dict(weights_layer=weights_layer, cache_layer=cache_layer)
    delta, act_cache = fc1_delta(x, w1t, b1, act_cache, indices, counts, block_size=block_size, **layers,
                                 config=config, interpret=interpret)
    out_cache = fc2_delta(delta, w2, out_cache, indices, counts, block_size=block_size, **layers, config=config,
                          interpret=interpret)
    return act_cache, out_cache


def compile_for_sm90(x_shape, num_features, c_out, block_size, dtype, *, config: TritonMlpConfig = DEFAULT_CONFIG,
                     stacked: bool = False):
    """triton.compile of both kernels for the H100 without a GPU (compile tests): (fc1, fc2) compiled kernels.

    The packed width is every feature (Kp = F rounded up to fc1_features), as on a step that keeps them all.
    ``stacked``: the variant that indexes stacked weights and caches by a layer operand (a layer scan's)."""
    b, n, _ = x_shape
    nb = -(-n // block_size)
    kp = -(-num_features // config.fc1_features) * config.fc1_features
    ptr = tc._POINTER_TYPES[jnp.dtype(dtype)]
    i32 = tc._POINTER_TYPES[jnp.dtype(jnp.int32)]
    stacked = dict(w_stacked=stacked, cache_stacked=stacked)
    fc1 = tc.compile_kernel(
        chipmunk_triton_mlp_fc1, (i32, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr),
        tuple(sorted(_fc1_constexprs(x_shape, num_features, (b, nb, kp), block_size, config, **stacked).items())),
        config.fc1_warps, config.fc1_stages, 90)
    fc2 = tc.compile_kernel(
        chipmunk_triton_mlp_fc2, (i32, i32, i32, ptr, ptr, ptr, ptr),
        tuple(sorted(_fc2_constexprs((b, n, c_out), num_features, (b, nb, kp), block_size, config,
                                     **stacked).items())),
        config.fc2_warps, config.fc2_stages, 90)
    return fc1, fc2
