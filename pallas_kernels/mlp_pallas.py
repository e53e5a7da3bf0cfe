"""Pallas-Triton kernels for the sparse-delta MLP step (docs/algorithm.md §2.2, §2.4); twin: mlp_reference.py.

Two kernels, both gathering only the selected hidden features of each row block:

  fc1: grid (row block r x feature chunk j, batch b), launched in groups of MlpTiles.row_group row blocks
       (see _launch_order). Tile zt[f, t] = w1t[ids_f, :] . x[t, :] + b1[ids_f]
       for BF gathered features x BM tokens (features are the GEMM's M dimension so the tile is already
       feature-major like the activation cache). Epilogue: GELU-tanh in f32, delta = new - cached, the
       new activations scattered back into act_cache in place, delta written packed and feature-major
       into delta_t [B, Kp, NBxBM] (column c of row block r <-> feature indices[b, r, c]).
  fc2: grid (row block r x output tile n, batch b), same launch order. out[t, n-tile] += sum over packed chunks of
       delta_t[chunk, t]^T . w2[ids_chunk, n-tile], accumulated in f32 and added to out_cache in place.

Everything the kernels index with program-dependent offsets is passed as a whole-array block (a
pointer in Triton) and read with gathers (`ref[ids, ...]`): Triton needs power-of-two sizes only for the
values loaded, and jax 0.11.2 does not mask edge blocks, so ragged token edges are masked by hand.
Entries of `indices` at positions >= counts are never used: gathers read feature 0 there and the
act_cache scatter is masked (and points past the array, so interpret mode drops it too).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from chipmunk_jax.validation import (
    check_power_of_two,
    field,
    is_power_of_two,
    non_negative_int,
    positive_int,
    validate_fields,
)

__all__ = ["MlpTiles", "DEFAULT_TILES", "PRODUCTION_TILES", "sparse_mlp_delta", "fc1_delta", "fc2_delta"]

_tile = functools.partial(check_power_of_two, minimum=16)  # Triton tiles: powers of two, the smallest dot 16


@dataclasses.dataclass(frozen=True)
class MlpTiles:
    """Tile and launch parameters. fc1_features must be a multiple of fc2_k (fc2 reads only chunks fc1 wrote)."""

    fc1_features: int = field(128, check=_tile)  # BF: gathered features per fc1 program; counts are best padded to this
    fc1_k: int = field(64, check=_tile)  # K step over C in fc1
    fc1_warps: int = field(4, check=positive_int)
    fc1_stages: int = field(3, check=positive_int)
    fc2_k: int = field(64, check=_tile)  # packed features per fc2 K step
    fc2_cols: int = field(128, check=_tile)  # BN: output columns per fc2 program
    fc2_warps: int = field(4, check=positive_int)
    # The gathered W2 rows hang off an in-loop index load, so the pipeliner keeps 2 tiles in flight at 3-4 stages
    # and 3 at 5 (TTGIR, triton 3.6). H200, FLUX double block 70%: full step 0.490 ms vs 0.509 ms with 3 stages.
    fc2_stages: int = field(5, check=positive_int)
    # Launch order: programs run in groups of `row_group` row blocks (0 = all of them), row blocks fastest
    # within a group, then the next chunk / output tile. Selections list features ascending, so programs of
    # one group running together gather nearby weight rows and share them through L2, while a group's token
    # tiles (x for fc1, delta for fc2) stay L2-resident across its chunks. 1 = chunk-major. H100, 2026-11-25
    # (`mlp.py --orders`, 70%): Wan 14B (256 row blocks) 6.76 ms with 32 vs 9.49 ms with all row blocks in one
    # group (their x tiles, 335 MB, cannot stay in the 50 MB L2); FLUX (36 row blocks) 0.66-0.70 ms for every order.
    row_group: int = field(32, check=non_negative_int)

    def __post_init__(self):
        validate_fields(self, prefix="MlpTiles.")
        if self.fc1_features % self.fc2_k:
            raise ValueError(
                f"MlpTiles.fc1_features ({self.fc1_features}) must be a multiple of fc2_k ({self.fc2_k})"
            )


DEFAULT_TILES = MlpTiles()

# Configurations the benchmark has swept on the H100 (benchmarks/NOTES_mlp.md) and the lowering tests cover. The
# default (first) stayed the fastest full step: larger tiles (256 features, 8-16 warps, one CTA per SM) were slower;
# its fc2 runs 5 stages, not 3, since the H200 sweep of 2026-12-03 (see fc2_stages).
PRODUCTION_TILES = (
    DEFAULT_TILES,
    MlpTiles(fc2_stages=3),  # the default before that sweep
    MlpTiles(fc1_warps=8, fc2_warps=8, fc2_stages=3),
    MlpTiles(fc1_features=256, fc1_warps=8, fc2_cols=256, fc2_warps=8, fc2_stages=3),
    MlpTiles(fc1_features=256, fc1_warps=16, fc2_cols=256, fc2_warps=16, fc2_stages=3),
    MlpTiles(fc1_features=256, fc1_warps=8, fc1_stages=4, fc2_cols=256, fc2_warps=8, fc2_stages=4),
    MlpTiles(fc1_features=256, fc1_k=32, fc1_warps=16, fc1_stages=4, fc2_cols=128, fc2_warps=8, fc2_stages=4),
    MlpTiles(fc1_features=64, fc2_cols=256, fc2_warps=16, fc2_stages=4),
    MlpTiles(fc1_features=128, fc1_k=64, fc1_warps=8, fc1_stages=4, fc2_cols=256, fc2_warps=8, fc2_stages=4),
    MlpTiles(fc1_features=128, fc1_k=128, fc1_warps=8, fc1_stages=3, fc2_cols=128, fc2_k=128, fc2_warps=8,
             fc2_stages=3),
    MlpTiles(row_group=0),
    MlpTiles(row_group=1),
    MlpTiles(row_group=8),
)


def _pow2_divisor(dim: int, cap: int, name: str) -> int:
    """Largest power of two <= cap dividing dim, at least 16 (the smallest Triton dot)."""
    tile = cap
    while tile >= 16:
        if dim % tile == 0:
            return tile
        tile //= 2
    raise ValueError(f"{name} = {dim} must be a multiple of 16 for the Pallas MLP kernels")


def _launch_order(pid, num_blocks: int, num_inner: int, row_group: int):
    """(row block, inner index) of the flattened program id ``pid`` in [0, num_blocks * num_inner).

    Programs go in groups of ``row_group`` row blocks (0: all): within a group the row block is fastest,
    then the inner index (fc1: packed feature chunk, fc2: output tile); the last group may be smaller. Works on
    traced ints, so the kernels and their BlockSpec index maps share it."""
    group = num_blocks if row_group == 0 else min(row_group, num_blocks)
    per_group = group * num_inner
    first = (pid // per_group) * group
    size = jnp.minimum(group, num_blocks - first)
    within = pid % per_group
    return first + within % size, within // size


def _gelu_tanh(z):
    return jax.nn.gelu(z, approximate=True)


def _precision(dtype):
    # f32 dots are TF32 on the GPU unless asked for full precision.
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _fc1_kernel(
    counts_ref, ids_ref, x_ref, w1t_ref, b1_ref, act_ref, delta_ref, act_out_ref,
    *, n_tokens, bk, mask_tokens, order,
):
    r, j = order(pl.program_id(0))
    b = pl.program_id(1)
    bf, bm = delta_ref.shape
    num_features, c = w1t_ref.shape
    count = counts_ref[b, r]

    @pl.when(j * bf < count)
    def _():
        pos = j * bf + jnp.arange(bf, dtype=jnp.int32)
        feat_valid = pos < count
        ids = ids_ref[...]
        gather_ids = jnp.where(feat_valid, ids, 0)
        tokens = r * bm + jnp.arange(bm, dtype=jnp.int32)
        token_valid = tokens < n_tokens
        dtype = w1t_ref.dtype

        def k_step(kk, acc):
            cols = pl.ds(pl.multiple_of(kk * bk, bk), bk)
            w = w1t_ref[gather_ids, cols]
            rows = pl.ds(pl.multiple_of(r * bm, bm), bm)
            if mask_tokens:
                xs = plgpu.load(x_ref.at[rows, cols], mask=token_valid[:, None], other=0)
            else:
                xs = x_ref[rows, cols]
            return acc + jax.lax.dot_general(
                w, xs.astype(dtype), (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32, precision=_precision(dtype),
            )

        zt = jax.lax.fori_loop(0, c // bk, k_step, jnp.zeros((bf, bm), jnp.float32))
        zt = zt + b1_ref[gather_ids].astype(jnp.float32)[:, None]
        new = _gelu_tanh(zt)
        valid = (feat_valid[:, None] & token_valid[None, :]) if mask_tokens else jnp.broadcast_to(
            feat_valid[:, None], (bf, bm)
        )
        # Invalid slots point past the array: masked on the GPU, dropped by interpret mode's scatter, so a
        # padding id equal to a selected one can never overwrite it.
        feat_idx = jnp.broadcast_to(jnp.where(feat_valid, ids, num_features)[:, None], (bf, bm))
        tok_idx = jnp.broadcast_to(tokens[None, :], (bf, bm))
        cached = plgpu.load(act_ref.at[feat_idx, tok_idx], mask=valid, other=0).astype(jnp.float32)
        delta_ref[...] = jnp.where(valid, new - cached, 0.0).astype(delta_ref.dtype)
        plgpu.store(act_out_ref.at[feat_idx, tok_idx], new.astype(act_out_ref.dtype), mask=valid)


def fc1_delta(x, w1t, b1, act_cache, indices, counts, *, block_size, tiles=DEFAULT_TILES, interpret=False):
    """Gathered fc1 + bias + GELU-tanh + delta; updates act_cache in place (donate it under jit).

    x [B, N, C], w1t [F, C] (fc1 weight pre-transposed), b1 [F], act_cache [B, F, N],
    indices [B, NB, Kp] int32 with Kp a multiple of tiles.fc1_features, counts [B, NB] int32.
    Returns (delta_t [B, Kp, NB*block_size] in w1t's dtype, new act_cache). delta_t entries of chunks
    at or past ceil(counts / fc1_features) are left unwritten; within written chunks, invalid slots are 0.
    """
    b, n, c = x.shape
    num_features = w1t.shape[0]
    nb, kp = indices.shape[1], indices.shape[2]
    bf = tiles.fc1_features
    bk = _pow2_divisor(c, tiles.fc1_k, "C (x's feature dim)")
    if kp % bf:
        raise ValueError(f"indices' last dim ({kp}) must be a multiple of fc1_features ({bf})")
    if not is_power_of_two(block_size) or block_size < 16:
        raise ValueError(f"block_size must be a power of two >= 16 for the Pallas kernels, got {block_size}")
    order = functools.partial(_launch_order, num_blocks=nb, num_inner=kp // bf, row_group=tiles.row_group)
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    per_batch = lambda shape: pl.BlockSpec((None, *shape), lambda p, bb: (bb, 0, 0))
    kernel = functools.partial(_fc1_kernel, n_tokens=n, bk=bk, mask_tokens=n % block_size != 0, order=order)
    delta_t, act_cache = pl.pallas_call(
        kernel,
        grid=(nb * (kp // bf), b),
        in_specs=[
            whole(counts.shape),
            pl.BlockSpec((None, None, bf), lambda p, bb: (bb, *order(p))),
            per_batch((n, c)),
            whole(w1t.shape),
            whole(b1.shape),
            per_batch((num_features, n)),
        ],
        out_specs=[
            pl.BlockSpec((None, bf, block_size), lambda p, bb: (bb, order(p)[1], order(p)[0])),
            per_batch((num_features, n)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kp, nb * block_size), w1t.dtype),
            jax.ShapeDtypeStruct(act_cache.shape, act_cache.dtype),
        ],
        input_output_aliases={5: 1},
        compiler_params=plgpu.CompilerParams(num_warps=tiles.fc1_warps, num_stages=tiles.fc1_stages),
        interpret=interpret,
        name="chipmunk_mlp_fc1_delta",
    )(counts, indices, x, w1t, b1, act_cache)
    return delta_t, act_cache


def _fc2_body(
    counts_ref, ids_ref, delta_ref, w2_ref, out_ref, out_out_ref, *, n_tokens, bk, bm, bn, mask_tokens, order
):
    r, nt = order(pl.program_id(0))
    b = pl.program_id(1)
    count = counts_ref[b, r]
    dtype = w2_ref.dtype

    @pl.when(count > 0)
    def _():
        cols = pl.ds(pl.multiple_of(nt * bn, bn), bn)
        tok = pl.ds(pl.multiple_of(r * bm, bm), bm)

        def k_step(kc, acc):
            chunk = pl.ds(pl.multiple_of(kc * bk, bk), bk)
            pos = kc * bk + jnp.arange(bk, dtype=jnp.int32)
            ids = jnp.where(pos < count, ids_ref[b, r, chunk], 0)
            d = delta_ref[b, chunk, tok]  # [bk, bm], zero at invalid slots (written so by fc1)
            w = w2_ref[ids, cols]  # [bk, bn]
            return acc + jax.lax.dot_general(
                d.astype(dtype), w, (((0,), (0,)), ((), ())),
                preferred_element_type=jnp.float32, precision=_precision(dtype),
            )

        acc = jax.lax.fori_loop(0, pl.cdiv(count, bk), k_step, jnp.zeros((bm, bn), jnp.float32))
        if mask_tokens:
            token_valid = (r * bm + jnp.arange(bm, dtype=jnp.int32)) < n_tokens
            mask = token_valid[:, None]
            old = plgpu.load(out_ref.at[b, tok, cols], mask=mask, other=0)
            new = (old.astype(jnp.float32) + acc).astype(out_out_ref.dtype)
            plgpu.store(out_out_ref.at[b, tok, cols], new, mask=mask)
        else:
            old = out_ref[b, tok, cols]
            out_out_ref[b, tok, cols] = (old.astype(jnp.float32) + acc).astype(out_out_ref.dtype)


def fc2_delta(delta_t, w2, out_cache, indices, counts, *, block_size, tiles=DEFAULT_TILES, interpret=False):
    """out_cache[b, rows of block r] += delta_t[b, :counts, rows]^T @ w2[indices[b, r, :counts]], in place.

    delta_t [B, Kp, NB*block_size] from fc1_delta, w2 [F, C_out], out_cache [B, N, C_out].
    """
    b, n, c_out = out_cache.shape
    nb = indices.shape[1]
    bk = tiles.fc2_k
    bn = _pow2_divisor(c_out, tiles.fc2_cols, "C_out (w2's output dim)")
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    kernel = functools.partial(
        _fc2_body, n_tokens=n, bk=bk, bm=block_size, bn=bn, mask_tokens=n % block_size != 0,
        order=functools.partial(_launch_order, num_blocks=nb, num_inner=c_out // bn, row_group=tiles.row_group),
    )
    return pl.pallas_call(
        kernel,
        grid=(nb * (c_out // bn), b),
        in_specs=[whole(counts.shape), whole(indices.shape), whole(delta_t.shape), whole(w2.shape),
                  whole(out_cache.shape)],
        out_specs=whole(out_cache.shape),
        out_shape=jax.ShapeDtypeStruct(out_cache.shape, out_cache.dtype),
        input_output_aliases={4: 0},
        compiler_params=plgpu.CompilerParams(num_warps=tiles.fc2_warps, num_stages=tiles.fc2_stages),
        interpret=interpret,
        name="chipmunk_mlp_fc2_delta",
    )(counts, indices, delta_t, w2, out_cache)


def pad_indices(indices, multiple: int):
    """Pads the packed axis with feature 0 up to a multiple (padding slots lie past counts: unused)."""
    k = indices.shape[-1]
    kp = -(-k // multiple) * multiple
    if kp == k:
        return indices
    return jnp.pad(indices, ((0, 0), (0, 0), (0, kp - k)))


def sparse_mlp_delta(
    x, w1, b1, w2, act_cache, out_cache, indices, counts, *, block_size=128, interpret=False,
    w1_transposed=False, tiles=DEFAULT_TILES,
):
    """fc1_delta then fc2_delta; returns (act_cache, out_cache). Arguments as in mlp.sparse_mlp_delta."""
    w1t = w1 if w1_transposed else w1.T
    indices = pad_indices(indices, tiles.fc1_features)
    delta_t, act_cache = fc1_delta(
        x, w1t, b1, act_cache, indices, counts, block_size=block_size, tiles=tiles, interpret=interpret
    )
    out_cache = fc2_delta(
        delta_t, w2, out_cache, indices, counts, block_size=block_size, tiles=tiles, interpret=interpret
    )
    return act_cache, out_cache
