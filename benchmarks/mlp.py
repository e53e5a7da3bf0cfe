"""Dense XLA MLP vs the Chipmunk sparse-delta MLP step (scores + selection + fc1 + fc2), one process, one GPU.

    source benchmarks/gpu_env.sh && python3 -P benchmarks/mlp.py [--out results.md] [--quick] [--budget S]

Shapes: FLUX.1 1024^2 double-block image MLP (N=4096) and single-block MLP half (N=4608), 3072 -> 12288 -> 3072;
Wan 2.1 14B ffn 5120 -> 13824 -> 5120 at N=32,760 (480p x 81). bf16 everywhere, f32 accumulation.

The sparse step: block means of x -> z = fc1 of the means (the block pre-activations) -> scores |z - baseline|
-> exact per-row top-k (counts padded to 128) -> fc1 delta kernel -> fc2 delta kernel, act_cache/out_cache (and
the baseline) donated, updated in place; w1 stored [F, C]. No random features. Three different x rotate so no
step sees a zero delta.

One run does, in this order (each part with its own timings, in the same process as the dense baseline):
  1. variant sweep on the FLUX double block at 70%: block pre-activation (XLA einsum reading W1 [F, C] or
     [C, F]), selection (scores + select_top_features vs the fused select_from_preactivation), fc1 tiles,
     fc2 tiles; every fc1/fc2 variant is checked against the f32 reference on the same inputs (a variant
     that fails is never picked); the step always reads W1 [F, C] (the layout a model stores);
  2. the full step with the old choices (XLA scores, unfused selection, old default tiles) vs the best of
     each part, a per-kernel device-time breakdown of the best step (jax.profiler trace);
  3. the table: flux_double / flux_single / wan14b at 50/70/85% with the best choices;
  4. (if time is left) the model op chipmunk_jax.mlp.sparse_delta_mlp, SPARSE_SELECT step, FLUX double 70%.
--kernels pallas,triton adds mlp_triton's TMA kernels: a sweep of their fc1 / fc2 variants (--sweep picks the
families to sweep), their best full step beside the Pallas one; the table uses whichever full step was faster.
Timing: each sample runs the jitted function REPS times back to back and blocks once; median over SAMPLES.
Small parts (scores, selection) run UNROLL distinct inputs inside one jit call, so dispatch is amortised.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.pallas_kernels import mlp_pallas, mlp_reference, mlp_selection, mlp_triton

warnings.filterwarnings("ignore", category=DeprecationWarning)

SHAPES = {  # name: (N, C, F, C_out)
    "flux_double": (4096, 3072, 12288, 3072),
    "flux_single": (4608, 3072, 12288, 3072),
    "wan14b": (32_760, 5120, 13_824, 5120),
}
SPARSITIES = (0.5, 0.7, 0.85)
BLOCK = 128
MULTIPLE = 128  # counts padded to this (same work for every tile variant)
REPS, SAMPLES, UNROLL = 5, 20, 6
INTERPRET = False  # --cpu-smoke: tiny shapes in interpret mode, to check this script without a GPU

T = mlp_pallas.MlpTiles
# fc1 variants: (fc1_features, fc1_k, warps, stages). 128x128 tiles (64 FLOP per byte of operands) are bound by
# the L2 -> SM bandwidth; 256 features x 128 tokens (85 FLOP/B) need 8-16 warps (one CTA per SM).
FC1_VARIANTS = {  # most promising first (the sweep skips the rest when the time budget runs low)
    "256x64 w16s3": (256, 64, 16, 3),
    "128x64 w4s3": (128, 64, 4, 3),
    "256x64 w8s3": (256, 64, 8, 3),
    "256x32 w16s4": (256, 32, 16, 4),
    "128x64 w8s3": (128, 64, 8, 3),
    "64x64 w4s3": (64, 64, 4, 3),
    "256x64 w8s4": (256, 64, 8, 4),
}
# fc2 variants: (fc2_cols, fc2_k, warps, stages)
FC2_VARIANTS = {
    "256x64 w16s3": (256, 64, 16, 3),
    "128x64 w8s3": (128, 64, 8, 3),
    "256x64 w8s3": (256, 64, 8, 3),
    "128x64 w4s3": (128, 64, 4, 3),
    "128x64 w8s4": (128, 64, 8, 4),
    "256x64 w8s4": (256, 64, 8, 4),
    "256x64 w16s4": (256, 64, 16, 4),
}
SCORE_VARIANTS = {  # block pre-activation z = fc1(block means): XLA einsum reading W1 in either layout
    "xla einsum, w1 [F,C]": "xla_fc",
    "xla einsum, w1 [C,F]": "xla_cf",
}
SELECT_VARIANTS = {  # name -> (fused, num_warps)
    "scores + select_top_features w8": (False, 8),
    "fused select_from_preactivation w8": (True, 8),
    "fused select_from_preactivation w16": (True, 16),
}


TT = mlp_triton.TritonMlpConfig
# Triton (TMA) kernels, --kernels triton: fc1 (fc1_features, fc1_k, warps, stages, tokens_major) and
# fc2 (fc2_cols, fc2_k, warps, stages). 128x128 tiles with 4 warps (two CTAs per SM) as the Pallas default, and the
# 128 x 256 tiles of Hopper GEMMs (8 warps = two consumer warpgroups, one CTA per SM), fc1 in both orientations.
# Offline sm_90 SASS (triton 3.6, benchmarks/mlp_sass.py): fc1's K loop at 3 stages waits until ONE cp.async group is
# outstanding (DEPBAR.LE SB0, 0x1), i.e. a single 32 KB tile in flight per CTA; 4 stages (131 KB of shared memory)
# drop to one CTA per SM. K = 32 with 5-6 stages keeps two CTAs per SM (82 / 98 KB) with 3-4 half tiles in flight.
# Measured on the H200: the K = 32 variants lost (fc1 0.244 / 0.269 ms vs 0.217 for 128 tok w4s3; fc2 0.220 vs 0.191;
# benchmarks/archive/RESULTS-2026-11-23-to-2026-12-03.md), hence last in the lists below.
TRITON_FC1_VARIANTS = {  # most promising first (the sweep skips the rest when the time budget runs low)
    "128 tok w4s3": (128, 64, 4, 3, True),
    "128 feat w4s3": (128, 64, 4, 3, False),
    "256 tok w8s3": (256, 64, 8, 3, True),
    "128 tok k128 w8s3": (128, 128, 8, 3, True),
    "256 tok w8s4": (256, 64, 8, 4, True),
    "128 tok w8s4": (128, 64, 8, 4, True),
    "256 feat w8s3": (256, 64, 8, 3, False),
    "128 tok w4s4": (128, 64, 4, 4, True),
    "128 tok k32 w4s5": (128, 32, 4, 5, True),
    "128 tok k32 w4s6": (128, 32, 4, 6, True),
}
# fc2's gathered rows depend on an index load in the same iteration, so Triton's pipeliner gives that load a stage of
# its own: num_stages 3 and 4 keep 2 data buffers in flight, 5 keeps 3 (triton 3.6 TTGIR; 6 still 3).
TRITON_FC2_VARIANTS = {
    "128x64 w4s5": (128, 64, 4, 5),
    "256x64 w8s5": (256, 64, 8, 5),
    "256x64 w8s3": (256, 64, 8, 3),
    "128x64 w4s3": (128, 64, 4, 3),
    "128x64 w8s5": (128, 64, 8, 5),
    "256x128 w8s3": (256, 128, 8, 3),
    "128x32 w4s8": (128, 32, 4, 8),
}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    scores: str = "xla_fc"  # "xla_fc" | "xla_cf" (W1 layout read by the z einsum)
    fused_select: bool = False
    select_warps: int = 8
    tiles: mlp_pallas.MlpTiles = T()
    triton: mlp_triton.TritonMlpConfig | None = None  # set: the delta kernels are mlp_triton's


OLD_CONFIG = StepConfig(tiles=T(fc1_features=128, fc1_k=64, fc1_warps=4, fc1_stages=3, fc2_cols=128, fc2_k=64,
                                fc2_warps=4, fc2_stages=3))


class Budget:
    def __init__(self, seconds):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self):
        return self.seconds - (time.perf_counter() - self.t0)


def _impl():
    return "interpret" if INTERPRET else "pallas"


def _time(fn, state, step_args, reps=None, samples=None):
    """fn(state, *args) -> state; median ms per call."""
    reps, samples = reps or REPS, samples or SAMPLES
    for _ in range(2):
        state = fn(state, *step_args(0))
    jax.block_until_ready(state)
    times = []
    for s in range(samples):
        t0 = time.perf_counter()
        for r in range(reps):
            state = fn(state, *step_args(s * reps + r))
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t0) * 1e3 / reps)
    return statistics.median(times), state


def _rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@dataclasses.dataclass
class Problem:
    name: str
    n: int
    c: int
    f: int
    c_out: int
    xs: list
    w1: jax.Array
    w1t: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array

    @property
    def nb(self):
        return -(-self.n // BLOCK)


def make_problem(name, seed=0):
    n, c, f, c_out = SHAPES[name]
    ks = jax.random.split(jax.random.key(seed), 8)
    bf = jnp.bfloat16
    xs = [jax.random.normal(ks[i], (1, n, c), bf) for i in range(3)]
    w1 = (jax.random.normal(ks[3], (c, f), jnp.float32) / c**0.5).astype(bf)
    b1 = (0.1 * jax.random.normal(ks[4], (f,), jnp.float32)).astype(bf)
    w2 = (jax.random.normal(ks[5], (f, c_out), jnp.float32) / f**0.5).astype(bf)
    b2 = (0.1 * jax.random.normal(ks[6], (c_out,), jnp.float32)).astype(bf)
    return Problem(name, n, c, f, c_out, xs, w1, jnp.asarray(w1.T), b1, w2, b2)


def dense_mlp(x, w1, b1, w2, b2):
    h = jax.nn.gelu(jnp.dot(x, w1) + b1, approximate=True)
    return jnp.dot(h, w2) + b2


def initial_state(p: Problem):
    """act/out caches of a dense step on xs[2], baseline z of xs[2]'s row 0 of each block (any fixed baseline
    gives realistic score spreads)."""
    act = jnp.swapaxes(jax.nn.gelu(jnp.dot(p.xs[2], p.w1) + p.b1, approximate=True), 1, 2)
    out = dense_mlp(p.xs[2], p.w1, p.b1, p.w2, p.b2)
    base = jnp.einsum("bmc,fc->bmf", p.xs[2][:, :: BLOCK].astype(jnp.float32), p.w1t.astype(jnp.float32))
    return act, out, base


def time_dense(p: Problem):
    dense = jax.jit(lambda y, x, w1, b1, w2, b2: dense_mlp(x, w1, b1, w2, b2))
    ms, _ = _time(dense, jnp.zeros((1, p.n, p.c_out), jnp.bfloat16), lambda i: (p.xs[i % 3], p.w1, p.b1, p.w2, p.b2))
    return ms


def block_means(x):
    """[B, N, C] -> [B, NB, C] f32 mean over the valid tokens of each block (== selection.block_mean)."""
    b, n, c = x.shape
    nb = -(-n // BLOCK)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * BLOCK - n), (0, 0)))
    sizes = jnp.minimum(BLOCK, n - jnp.arange(nb) * BLOCK).astype(jnp.float32)
    return xp.reshape(b, nb, BLOCK, c).sum(2) / sizes[None, :, None]


def preactivation(kind, x, w1, w1t, b1):
    means = block_means(x).astype(x.dtype)
    if kind == "xla_fc":
        z = jnp.einsum("bmc,fc->bmf", means, w1t, preferred_element_type=jnp.float32)
    else:
        z = jnp.einsum("bmc,cf->bmf", means, w1, preferred_element_type=jnp.float32)
    return z + b1.astype(jnp.float32)


def select(cfg: StepConfig, z, base, keep):
    if cfg.fused_select:
        return mlp_selection.select_from_preactivation(
            z, base, keep, MULTIPLE, impl=_impl(), num_warps=cfg.select_warps
        )
    idx, cnt = mlp_selection.select_top_features(
        jnp.abs(z - base), keep, MULTIPLE, impl=_impl(), num_warps=cfg.select_warps
    )
    return idx, cnt, base  # (the unfused path of this benchmark never updated the baseline)


def make_sparse_step(keep, f, cfg: StepConfig):
    def step(state, x, w1, w1t, b1, w2):
        act, out, base = state
        z = preactivation(cfg.scores, x, w1, w1t, b1)
        idx, cnt, base = select(cfg, z, base, keep)
        if cfg.triton is not None:
            act, out = mlp_triton.sparse_mlp_delta(
                x, w1t, b1, w2, act, out, idx, cnt, block_size=BLOCK, w1_transposed=True, config=cfg.triton,
                interpret=INTERPRET,
            )
        else:
            act, out = mlp_pallas.sparse_mlp_delta(
                x, w1t, b1, w2, act, out, idx, cnt, block_size=BLOCK, w1_transposed=True, tiles=cfg.tiles,
                interpret=INTERPRET,
            )
        return act, out, base

    return jax.jit(step, donate_argnums=(0,))


def time_step(p: Problem, keep, cfg: StepConfig, state=None):
    act, out, base = state if state is not None else initial_state(p)
    step = make_sparse_step(keep, p.f, cfg)
    ms, state = _time(step, (act, out, base), lambda i: (p.xs[i % 3], p.w1, p.w1t, p.b1, p.w2))
    return ms, state, step


def _cfg_str(cfg: StepConfig):
    sel = f"{'fused' if cfg.fused_select else 'unfused'} w{cfg.select_warps}"
    if cfg.triton is not None:
        t = cfg.triton
        return (f"scores {cfg.scores}, select {sel}, "
                f"Triton fc1 {t.fc1_features}x{t.fc1_k} w{t.fc1_warps}s{t.fc1_stages} "
                f"{'tokens' if t.fc1_tokens_major else 'features'}-M, fc2 {t.fc2_cols}x{t.fc2_k} "
                f"w{t.fc2_warps}s{t.fc2_stages}")
    t = cfg.tiles
    return (f"scores {cfg.scores}, select {sel}, fc1 {t.fc1_features}x{t.fc1_k} w{t.fc1_warps}s{t.fc1_stages}, "
            f"fc2 {t.fc2_cols}x{t.fc2_k} w{t.fc2_warps}s{t.fc2_stages}")


# ---- part sweep ---------------------------------------------------------------------------------------------


def sweep_parts(p: Problem, keep, log, budget):
    """Times each part alone on the FLUX double block; returns the best StepConfig (numerics-checked)."""
    act0, out0, base0 = initial_state(p)
    x0 = p.xs[0]
    many = [p.xs[i % 3] * (1.0 + 0.01 * i) for i in range(UNROLL)]  # distinct inputs (no CSE across calls)
    results = {}

    # -- block pre-activation
    best_scores = ("xla einsum, w1 [F,C]", float("inf"))
    z_ref = preactivation("xla_fc", x0, p.w1, p.w1t, p.b1)
    for name, kind in SCORE_VARIANTS.items():
        try:
            z = jax.jit(lambda x, w1, w1t, b1, k=kind: preactivation(k, x, w1, w1t, b1))(x0, p.w1, p.w1t, p.b1)
            err = _rel(z, z_ref)
            fn = jax.jit(lambda st, xs, w1, w1t, b1, k=kind: tuple(preactivation(k, x, w1, w1t, b1) for x in xs))
            ms, _ = _time(fn, None, lambda i: (many, p.w1, p.w1t, p.b1), reps=2, samples=10)
            ms /= UNROLL
            ok = err <= 1e-2
            log(f"  z (block means + fc1 of the means) {name}: {ms * 1e3:.1f} us, rel err vs xla {err:.1e}"
                f"{'' if ok else '  FAILED'}")
            if ok and ms < best_scores[1]:
                best_scores = (name, ms)
        except Exception as e:  # noqa: BLE001 -- a variant that fails to compile is reported, not fatal
            log(f"  z {name}: ERROR {type(e).__name__}: {str(e)[:300]}")
    results["scores"] = best_scores

    # -- selection
    zs = [preactivation("xla_fc", x, p.w1, p.w1t, p.b1) for x in many]
    idx_ref, cnt_ref = mlp_selection.select_top_features(jnp.abs(zs[0] - base0), keep, MULTIPLE, impl="reference")
    best_sel = ("scores + select_top_features w8", float("inf"))
    for name, (fused, warps) in SELECT_VARIANTS.items():
        try:
            cfg = StepConfig(fused_select=fused, select_warps=warps)
            idx, cnt, _ = jax.jit(lambda z, b, c=cfg: select(c, z, b, keep))(zs[0], jnp.array(base0))
            ok = bool(jnp.array_equal(idx, idx_ref)) and bool(jnp.array_equal(cnt, cnt_ref))

            def chain(base, zs, c=cfg):
                outs = []
                for z in zs:
                    i, n, base = select(c, z, base, keep)
                    outs.append((i, n))
                return base, outs

            # Returns every index list (else XLA drops the unfused selection); only the baseline is chained.
            fn = jax.jit(lambda st, zs: chain(st[0], zs), donate_argnums=(0,))
            ms, _ = _time(fn, (jnp.array(base0), None), lambda i: (zs,), reps=2, samples=10)
            ms /= UNROLL
            log(f"  selection {name}: {ms * 1e3:.1f} us, same indices/counts as the reference: {ok}")
            if ok and ms < best_sel[1]:
                best_sel = (name, ms)
        except Exception as e:  # noqa: BLE001
            log(f"  selection {name}: ERROR {type(e).__name__}: {str(e)[:300]}")
    results["select"] = best_sel

    tiles = sweep_delta_kernels(p, idx_ref, cnt_ref, "pallas", log, budget) or OLD_CONFIG.tiles
    fused, warps = SELECT_VARIANTS[best_sel[0]]
    # z reads W1 [F, C], the only copy a model keeps (the [C, F] einsum is timed for reference only).
    return StepConfig(scores="xla_fc", fused_select=fused, select_warps=warps, tiles=tiles)


# Per kernel family: its tile class, how a sweep variant becomes a config, and its fc1 / fc2 entry points.
KERNEL_FAMILIES = {
    "pallas": dict(
        label="", default=T(), fc1_variants=FC1_VARIANTS, fc2_variants=FC2_VARIANTS,
        fc1_config=lambda bf, bk, w, st: dataclasses.replace(T(), fc1_features=bf, fc1_k=bk, fc1_warps=w,
                                                             fc1_stages=st),
        fc1=lambda x, w1t, b1, act, i, c, t: mlp_pallas.fc1_delta(x, w1t, b1, act, i, c, block_size=BLOCK, tiles=t,
                                                                  interpret=INTERPRET),
        fc2=lambda d, w2, out, i, c, t: mlp_pallas.fc2_delta(d, w2, out, i, c, block_size=BLOCK, tiles=t,
                                                             interpret=INTERPRET)),
    "triton": dict(
        label="triton ", default=TT(), fc1_variants=TRITON_FC1_VARIANTS, fc2_variants=TRITON_FC2_VARIANTS,
        fc1_config=lambda bf, bk, w, st, tok: dataclasses.replace(TT(), fc1_features=bf, fc1_k=bk, fc1_warps=w,
                                                                  fc1_stages=st, fc1_tokens_major=tok),
        fc1=lambda x, w1t, b1, act, i, c, t: mlp_triton.fc1_delta(x, w1t, b1, act, i, c, block_size=BLOCK,
                                                                  config=t, interpret=INTERPRET),
        fc2=lambda d, w2, out, i, c, t: mlp_triton.fc2_delta(d, w2, out, i, c, block_size=BLOCK, config=t,
                                                             interpret=INTERPRET)),
}


def sweep_delta_kernels(p: Problem, idx, cnt, family: str, log, budget):
    """Times each fc1 variant, then each fc2 variant, of one kernel family alone on the FLUX double block, every
    variant checked against the f32 reference on the same inputs (fc1 through the family's default fc2; fc2 fed
    the delta of the first passing fc1 variant: all variants write the same layout). Returns the fastest passing
    fc1 variant with the fastest passing fc2 variant's fields, or None when either kind had none."""
    fam = KERNEL_FAMILIES[family]
    act0, out0, _ = initial_state(p)
    x0 = p.xs[0]
    idx_p = mlp_pallas.pad_indices(idx, 256)
    act_r, out_r = jax.jit(lambda *a: mlp_reference.sparse_mlp_delta_reference(*a, block_size=BLOCK))(
        x0, p.w1, p.b1, p.w2, act0, out0, idx, cnt)
    d_ref = out_r.astype(jnp.float32) - out0.astype(jnp.float32)
    useful = 2 * p.n * p.c * int(cnt.sum()) / p.nb  # fc1 FLOPs (fc2: C_out for C; equal for these shapes)
    fc2_default = jax.jit(lambda out, d, w2, i, c: fam["fc2"](d, w2, out, i, c, fam["default"]), donate_argnums=(0,))
    out_error = lambda out: _rel(out.astype(jnp.float32) - out0.astype(jnp.float32), d_ref)
    found = {"delta": None}

    def fc1_trial(spec):
        t = fam["fc1_config"](*spec)
        fn = jax.jit(lambda act, x, w1t, b1, i, c: fam["fc1"](x, w1t, b1, act, i, c, t), donate_argnums=(0,))
        delta, act = fn(jnp.array(act0), x0, p.w1t, p.b1, idx_p, cnt)
        errors = dict(act=(_rel(act, act_r), 1e-2), delta=(out_error(fc2_default(jnp.array(out0), delta, p.w2, idx_p,
                                                                                      cnt)), 2e-2))
        if found["delta"] is None and all(e <= tol for e, tol in errors.values()):
            found["delta"] = delta
        ms, _ = _time(lambda a, *args: fn(a, *args)[1], jnp.array(act0),
                      lambda i: (p.xs[i % 3], p.w1t, p.b1, idx_p, cnt))
        return ms, errors, t

    def fc2_trial(spec):
        bn, bk, w, st = spec
        t = dataclasses.replace(fam["default"], fc2_cols=bn, fc2_k=bk, fc2_warps=w, fc2_stages=st)
        fn = jax.jit(lambda out, d, w2, i, c: fam["fc2"](d, w2, out, i, c, t), donate_argnums=(0,))
        errors = dict(delta=(out_error(fn(jnp.array(out0), found["delta"], p.w2, idx_p, cnt)), 2e-2))
        ms, _ = _time(fn, jnp.array(out0), lambda i: (found["delta"], p.w2, idx_p, cnt))
        return ms, errors, t

    fc1_rows = _time_variants(f"{fam['label']}fc1", fam["fc1_variants"], fc1_trial, useful, log, budget, 150)
    if found["delta"] is None:
        log(f"  {fam['label']}fc2: no fc1 variant passed, nothing to feed fc2")
        return None
    fc2_rows = _time_variants(f"{fam['label']}fc2", fam["fc2_variants"], fc2_trial, useful, log, budget, 120)
    if not fc1_rows or not fc2_rows:
        return None
    t1 = min(fc1_rows, key=lambda r: r[0])[1]
    t2 = min(fc2_rows, key=lambda r: r[0])[1]
    fc2_k = t2.fc2_k if t1.fc1_features % t2.fc2_k == 0 else 64
    return dataclasses.replace(t1, fc2_cols=t2.fc2_cols, fc2_k=fc2_k, fc2_warps=t2.fc2_warps, fc2_stages=t2.fc2_stages)


def _time_variants(label, variants, trial, flops, log, budget, min_left):
    """trial(spec) -> (ms, {name: (rel err, tolerance)}, config) per variant, logged; returns [(ms, config)] of the
    variants within every tolerance. A variant that fails to compile or run is reported, not fatal."""
    rows = []
    for name, spec in variants.items():
        if budget.left() < min_left:
            log(f"  {label} {name}: skipped (time budget)")
            continue
        try:
            ms, errors, config = trial(spec)
            ok = all(err <= tol for err, tol in errors.values())
            errs = " ".join(f"{what} {err:.1e}" for what, (err, _) in errors.items())
            log(f"  {label} {name}: {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s), rel err {errs}"
                f"{'' if ok else '  FAILED'}")
            if ok:
                rows.append((ms, config))
        except Exception as e:  # noqa: BLE001
            log(f"  {label} {name}: ERROR {type(e).__name__}: {str(e)[:300]}")
    return rows


# ---- device-time breakdown ----------------------------------------------------------------------------------


def profile_step(step, state, args, n_calls, log):
    """Per-kernel device time of `step` from a jax.profiler trace (µs per call, by kernel name)."""
    try:
        from jax.profiler import ProfileData
    except ImportError:
        log("  profile: jax.profiler.ProfileData unavailable")
        return state
    d = tempfile.mkdtemp()
    try:
        with jax.profiler.trace(d):
            for i in range(n_calls):
                state = step(state, *args(i))
            jax.block_until_ready(state)
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        pd = ProfileData.from_file(files[0])
        totals, line_names = {}, []
        for plane in pd.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                line_names.append(line.name)
                if not line.name.startswith("Stream"):
                    continue
                for ev in line.events:
                    totals[ev.name] = totals.get(ev.name, 0.0) + ev.duration_ns
        if not totals:
            log(f"  profile: no GPU stream events (lines: {line_names[:12]})")
            return state
        total = sum(totals.values()) / n_calls / 1e3
        log(f"  device time per step (sum of kernels, {n_calls} steps traced): {total:.1f} us")
        for name, ns in sorted(totals.items(), key=lambda kv: -kv[1]):
            log(f"    {ns / n_calls / 1e3:8.1f} us  {name[:110]}")
    except Exception as e:  # noqa: BLE001
        log(f"  profile failed: {type(e).__name__}: {str(e)[:300]}")
    return state


# ---- model op -----------------------------------------------------------------------------------------------


def time_model_op(p: Problem, keep, log, impl="pallas"):
    """chipmunk_jax.mlp.sparse_delta_mlp, SPARSE_SELECT step, W1 stored [F, C], no random features, the kernel
    family's default tiles."""
    try:
        from chipmunk_jax import config as C
        from chipmunk_jax.mlp import MLPCache, MLPWeights, sparse_delta_mlp
        from chipmunk_jax.schedule import MLPStep
    except Exception as e:  # noqa: BLE001 -- other modules may be mid-edit; this part is optional
        log(f"  model op: import failed ({type(e).__name__}: {str(e)[:200]})")
        return
    try:
        cfg = C.ChipmunkConfig(mlp=C.MLPConfig(enabled=True, top_keys=keep / p.f, random_keys=0.0,
                                               counts_multiple_of=MULTIPLE, first_n_dense_layers=0))
        w = MLPWeights(w1=p.w1t, b1=p.b1, w2=p.w2, b2=p.b2, w1_transposed=True)
        act, out, base = initial_state(p)
        cache = MLPCache(act_cache=act, out_cache=out, blockmean_cache=base,
                         indices=jnp.zeros((1, p.nb, p.f), jnp.int32), counts=jnp.zeros((1, p.nb), jnp.int32))
        fn = jax.jit(lambda cache, x, w: sparse_delta_mlp(x, w, cache, MLPStep.SPARSE_SELECT, cfg, impl=impl)[1],
                     donate_argnums=(0,))
        ms, _ = _time(fn, cache, lambda i: (p.xs[i % 3], w))
        log(f"  model op sparse_delta_mlp (SPARSE_SELECT, w1_transposed=True, impl {impl}): {ms:.3f} ms")
    except Exception as e:  # noqa: BLE001
        log(f"  model op failed: {type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc()


def _cfg_to_dict(cfg: StepConfig):
    return dict(scores=cfg.scores, fused_select=cfg.fused_select, select_warps=cfg.select_warps,
                tiles=dataclasses.asdict(cfg.tiles), triton=cfg.triton and dataclasses.asdict(cfg.triton))


def _cfg_from_dict(d):
    return StepConfig(scores=d["scores"], fused_select=d["fused_select"], select_warps=d["select_warps"],
                      tiles=T(**d["tiles"]), triton=TT(**d["triton"]) if d.get("triton") else None)


def probe(path):
    """One call of each kernel of the chosen configuration (FLUX double, 70%): a target for ncu."""
    with open(path) as fh:
        cfg = _cfg_from_dict(json.load(fh))
    p = make_problem("flux_double")
    keep = round(0.3 * p.f)
    act, out, base = initial_state(p)
    z = jax.jit(lambda x, w1, w1t, b1: preactivation(cfg.scores, x, w1, w1t, b1))(p.xs[0], p.w1, p.w1t, p.b1)
    idx, cnt, base = jax.jit(lambda z, b: select(cfg, z, b, keep))(z, base)
    idx_p = mlp_pallas.pad_indices(idx, cfg.tiles.fc1_features)
    delta, act = jax.jit(lambda act, x: mlp_pallas.fc1_delta(x, p.w1t, p.b1, act, idx_p, cnt, block_size=BLOCK,
                                                             tiles=cfg.tiles,
                                                             interpret=INTERPRET))(act, p.xs[0])
    out = jax.jit(lambda out, d: mlp_pallas.fc2_delta(d, p.w2, out, idx_p, cnt, block_size=BLOCK, tiles=cfg.tiles,
                                                    interpret=INTERPRET))(out, delta)
    jax.block_until_ready((act, out, base))
    print(f"probe done: {_cfg_str(cfg)}")
    return 0


# ---- launch order -------------------------------------------------------------------------------------------


def sweep_orders(shapes, groups, log, profile_shape=None):
    """Full 70% step per MlpTiles.row_group (default tiles otherwise) against the dense MLP, per shape, with a
    per-kernel device-time profile of the fastest and the slowest order on ``profile_shape``."""
    rows = []
    for name in shapes:
        p = make_problem(name)
        keep = round(0.3 * p.f)
        dense_ms = time_dense(p)
        log(f"{name}: N={p.n} C={p.c} F={p.f} ({p.nb} row blocks), 70% keep {keep}: dense XLA MLP {dense_ms:.3f} ms")
        timed = {}
        for group in groups:
            cfg = StepConfig(scores="xla_fc", fused_select=True, tiles=T(row_group=group))
            try:
                ms, state, step = time_step(p, keep, cfg)
            except Exception as e:  # noqa: BLE001
                log(f"  row_group {group}: ERROR {type(e).__name__}: {str(e)[:300]}")
                continue
            timed[group] = (ms, state, step)
            log(f"  row_group {group:3d} ({'all' if group == 0 else group} row blocks per group): sparse step "
                f"{ms:.3f} ms, dense/sparse {dense_ms / ms:.2f}x")
            rows.append((name, group, dense_ms, ms))
        if name == profile_shape and timed and not INTERPRET:
            fastest = min(timed, key=lambda g: timed[g][0])
            slowest = max(timed, key=lambda g: timed[g][0])
            for group in dict.fromkeys((fastest, slowest)):
                ms, state, step = timed[group]
                log(f"  device-time profile, row_group {group}:")
                profile_step(step, state, lambda i: (p.xs[i % 3], p.w1, p.w1t, p.b1, p.w2), 5, log)
        log(f"  dense XLA MLP again: {time_dense(p):.3f} ms")
        del p, timed
    return rows


def write_results(path, lines, table):
    """The markdown section: the run's log in a code block, then its table (nothing without a path)."""
    if path:
        with open(path, "w") as fh:
            fh.write("\n".join(["```", *lines, "```", "", *table, ""]))


# ---- main ---------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="write the markdown results section here")
    parser.add_argument("--quick", action="store_true", help="FLUX double block only (sweep + 70%% step)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the part sweep; use the current defaults")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; optional parts are skipped past it")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, interpret mode (no GPU)")
    parser.add_argument("--log", default=None, help="append every line here as it is printed (partial runs)")
    parser.add_argument("--best-json", default=None, help="write the chosen configuration here")
    parser.add_argument("--probe", default=None, metavar="BEST_JSON",
                        help="run each kernel of that configuration once on FLUX double 70%% (for ncu) and exit")
    parser.add_argument("--orders", default=None, metavar="SHAPES",
                        help="only time the launch orders (MlpTiles.row_group) at 70%% on these shapes, e.g. "
                             "flux_single,wan14b (the last one also gets a device-time profile)")
    parser.add_argument("--groups", default="0,1,4,8,16,32", help="row_group values for --orders")
    parser.add_argument("--kernels", default="pallas", help="delta kernel families to sweep and time: pallas, "
                        "triton (mlp_triton's TMA kernels) or pallas,triton; the table uses the fastest full step")
    parser.add_argument("--sweep", default=None, help="families of --kernels to sweep (default: all of them; "
                        "--no-sweep: none); the others run their default tiles")
    args = parser.parse_args()
    for flag in ("kernels", "sweep"):
        value = getattr(args, flag)
        if value is not None and not set(value.split(",")) <= {"pallas", "triton", ""}:
            parser.error(f"--{flag} takes pallas and/or triton, got {value!r}")
    budget = Budget(args.budget)
    global INTERPRET, REPS, SAMPLES, UNROLL
    if args.cpu_smoke:
        INTERPRET, REPS, SAMPLES, UNROLL = True, 1, 1, 2
        SHAPES.update(flux_double=(256, 64, 512, 64), flux_single=(384, 64, 512, 64), wan14b=(200, 64, 256, 64))
        for table, keep_names in ((FC1_VARIANTS, ("128x64 w4s3", "256x64 w16s3")),
                                  (FC2_VARIANTS, ("128x64 w4s3", "256x64 w8s3")),
                                  (SCORE_VARIANTS, ("xla einsum, w1 [F,C]",)),
                                  (SELECT_VARIANTS, ("scores + select_top_features w8",
                                                     "fused select_from_preactivation w8")),
                                  (TRITON_FC1_VARIANTS, ("128 tok w4s3", "256 feat w8s3")),
                                  (TRITON_FC2_VARIANTS, ("128x64 w4s5", "256x128 w8s3"))):
            for k in list(table):
                if k not in keep_names:
                    del table[k]
        if budget.seconds == 420.0:
            budget.seconds = 1e9
    if args.probe:
        return probe(args.probe)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)
        if args.log:
            with open(args.log, "a") as fh:
                fh.write(msg + "\n")

    dev = jax.devices()[0]
    log(f"device {dev.device_kind}, jax {jax.__version__}, date {datetime.date.today()}")
    if args.orders:
        shapes = args.orders.split(",")
        rows = sweep_orders(shapes, [int(g) for g in args.groups.split(",")], log, profile_shape=shapes[-1])
        table = ["| shape | row_group | dense XLA ms | sparse step ms (70%) | dense/sparse |", "|---|---|---|---|---|"]
        table += [f"| {n} | {g} | {d:.3f} | {ms:.3f} | {d / ms:.2f}x |" for n, g, d, ms in rows]
        print("\n".join(table))
        write_results(args.out, lines, table)
        return 0
    rows = []
    p = make_problem("flux_double")
    keep70 = round(0.3 * p.f)
    dense_ms = time_dense(p)
    log(f"flux_double: dense XLA MLP {dense_ms:.3f} ms ({4 * p.n * p.c * p.f / dense_ms / 1e9:.0f} TFLOP/s)")
    kernels = args.kernels.split(",")
    swept = set() if args.no_sweep else set(kernels if args.sweep is None else args.sweep.split(","))
    candidates = []  # (label, StepConfig) timed as full steps below
    if "pallas" in kernels:
        if "pallas" not in swept:  # the defaults, and fc2 with 3 stages (the default before 5 stages measured faster)
            for label, tiles in (("Pallas defaults", mlp_pallas.DEFAULT_TILES),
                                 ("Pallas defaults, fc2 3 stages", dataclasses.replace(mlp_pallas.DEFAULT_TILES,
                                                                                       fc2_stages=3))):
                candidates.append((label, StepConfig(scores="xla_fc", fused_select=True, tiles=tiles)))
        else:
            log(f"part sweep, flux_double sparsity 0.70 keep {keep70}/{p.f} (counts padded to {MULTIPLE}):")
            best = sweep_parts(p, keep70, log, budget)
            log(f"best Pallas: {_cfg_str(best)}   [{budget.left():.0f} s of budget left]")
            candidates += [("old choices", OLD_CONFIG), ("best Pallas choices", best)]
    if "triton" in kernels:
        triton_cfg = mlp_triton.DEFAULT_CONFIG
        if "triton" in swept:
            log(f"Triton kernel sweep, flux_double sparsity 0.70 keep {keep70}/{p.f} (counts padded to {MULTIPLE}):")
            _, _, base = initial_state(p)
            z = preactivation("xla_fc", p.xs[0], p.w1, p.w1t, p.b1)
            idx, cnt, _ = mlp_selection.select_from_preactivation(z, base, keep70, MULTIPLE, impl=_impl())
            triton_cfg = sweep_delta_kernels(p, idx, cnt, "triton", log, budget) or triton_cfg
        candidates.append(("best Triton choices", StepConfig(scores="xla_fc", fused_select=True, triton=triton_cfg)))
        log(f"best Triton: {_cfg_str(candidates[-1][1])}   [{budget.left():.0f} s of budget left]")

    # The full steps, same process; the fastest is the configuration of the table, with its device-time breakdown.
    timed = []
    for label, cfg in candidates:
        try:
            ms, state, step = time_step(p, keep70, cfg)
            log(f"  full sparse step, {label} ({_cfg_str(cfg)}): {ms:.3f} ms, dense/sparse {dense_ms / ms:.2f}x")
            timed.append((ms, label, cfg, state, step))
        except Exception as e:  # noqa: BLE001
            log(f"  full sparse step, {label}: ERROR {type(e).__name__}: {str(e)[:300]}")
    if not timed:
        log("no full sparse step ran")
        return 1
    ms, label, best, state, step = min(timed, key=lambda t: t[0])
    log(f"fastest full step: {label} ({_cfg_str(best)}) {ms:.3f} ms")
    rows.append(("flux_double", 0.7, keep70, dense_ms, ms))
    if not INTERPRET:
        profile_step(step, state, lambda i: (p.xs[i % 3], p.w1, p.w1t, p.b1, p.w2), 10, log)
    del timed, state, step
    if args.best_json:
        with open(args.best_json, "w") as fh:
            json.dump(_cfg_to_dict(best), fh)
    dense2 = time_dense(p)
    log(f"  dense XLA MLP again: {dense2:.3f} ms")

    # The table.
    plan = [("flux_double", (0.5, 0.85)), ("flux_single", SPARSITIES), ("wan14b", SPARSITIES)]
    if args.quick:
        plan = plan[:1]
    for name, sparsities in plan:
        if budget.left() < (60 if name == "wan14b" else 25):
            log(f"{name}: skipped (time budget)")
            continue
        if name != "flux_double":
            del p
            p = make_problem(name)
            dense_ms = time_dense(p)
        log(f"{name}: N={p.n} C={p.c} F={p.f} C_out={p.c_out} dense XLA MLP {dense_ms:.3f} ms "
            f"({4 * p.n * p.c * p.f / dense_ms / 1e9:.0f} TFLOP/s)")
        for sparsity in sparsities:
            keep = round((1 - sparsity) * p.f)
            try:
                ms, _, _ = time_step(p, keep, best)
                rows.append((name, sparsity, keep, dense_ms, ms))
                log(f"  sparsity {sparsity:.2f} keep {keep}/{p.f}: sparse step {ms:.3f} ms, dense/sparse {dense_ms / ms:.2f}x")
            except Exception as e:  # noqa: BLE001
                log(f"  sparsity {sparsity:.2f}: ERROR {type(e).__name__}: {str(e)[:300]}")

    if budget.left() > 20 and not args.quick:
        p = make_problem("flux_double")
        log("flux_double sparsity 0.70, the model op:")
        family = "pallas" if best.triton is None else "triton"
        time_model_op(p, keep70, log, impl=family if not INTERPRET else {"pallas": "interpret"}.get(family,
                                                                                                    "triton_interpret"))

    table = ["| shape | N, C -> F -> C_out | sparsity | kept/F | dense XLA ms | sparse step ms | dense/sparse |",
             "|---|---|---|---|---|---|---|"]
    for name, sparsity, keep, d_ms, ms in sorted(rows, key=lambda r: (r[0], r[1])):
        n, c, f, c_out = SHAPES[name]
        table.append(f"| {name} | {n}, {c} -> {f} -> {c_out} | {sparsity:.0%} | {keep}/{f} | {d_ms:.3f} | "
                     f"{ms:.3f} | {d_ms / ms:.2f}x |")
    log(f"[{budget.left():.0f} s of budget left]")
    print("\n".join(table))
    write_results(args.out, lines, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
