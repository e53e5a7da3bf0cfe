"""Dense XLA MLP vs the Chipmunk sparse-delta MLP step (scores + selection + fc1 + fc2), one process, one GPU.

    source benchmarks/gpu_env.sh && python3 -P benchmarks/mlp.py [--out results.md] [--quick]

Shapes: FLUX.1 1024^2 double-block image MLP (N=4096) and single-block MLP half (N=4608), 3072 -> 12288 -> 3072;
Wan 2.1 14B ffn 5120 -> 13824 -> 5120 at N=32,760 (480p x 81). bf16 everywhere, f32 accumulation.
The sparse step: block means of x -> fc1 of the means -> |. - cached block means| -> exact per-row top-k
(mlp_selection kernel; counts padded to the fc1 feature tile) -> fc1 delta kernel -> fc2 delta kernel, with
act_cache/out_cache donated (updated in place). Three different x rotate so no step sees a zero delta.
Timing: each sample runs the jitted function REPS times back to back and blocks once (dispatch amortised);
median over SAMPLES samples, after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp

from chipmunk_jax.pallas_kernels import mlp_pallas, mlp_selection

warnings.filterwarnings("ignore", category=DeprecationWarning)

SHAPES = {  # name: (N, C, F, C_out)
    "flux_double": (4096, 3072, 12288, 3072),
    "flux_single": (4608, 3072, 12288, 3072),
    "wan14b": (32_760, 5120, 13_824, 5120),
}
SPARSITIES = (0.5, 0.7, 0.85)
BLOCK = 128
REPS, SAMPLES = 5, 20
INTERPRET = False  # --cpu-smoke: tiny shapes in interpret mode, to check this script without a GPU


def _time(fn, state, step_args):
    """fn(state, *args) -> state; median ms per call."""
    for _ in range(3):
        state = fn(state, *step_args(0))
    jax.block_until_ready(state)
    samples = []
    for s in range(SAMPLES):
        t0 = time.perf_counter()
        for r in range(REPS):
            state = fn(state, *step_args(s * REPS + r))
        jax.block_until_ready(state)
        samples.append((time.perf_counter() - t0) * 1e3 / REPS)
    return statistics.median(samples), state


def _inputs(n, c, f, c_out, seed=0):
    ks = jax.random.split(jax.random.key(seed), 8)
    bf = jnp.bfloat16
    xs = [jax.random.normal(ks[i], (1, n, c), bf) for i in range(3)]
    w1 = (jax.random.normal(ks[3], (c, f), jnp.float32) / c**0.5).astype(bf)
    b1 = (0.1 * jax.random.normal(ks[4], (f,), jnp.float32)).astype(bf)
    w2 = (jax.random.normal(ks[5], (f, c_out), jnp.float32) / f**0.5).astype(bf)
    b2 = (0.1 * jax.random.normal(ks[6], (c_out,), jnp.float32)).astype(bf)
    return xs, w1, b1, w2, b2


def dense_mlp(x, w1, b1, w2, b2):
    h = jax.nn.gelu(jnp.dot(x, w1) + b1, approximate=True)
    return jnp.dot(h, w2) + b2


def block_scores(x, w1t, b1, blockmean_cache):
    b, n, c = x.shape
    nb = -(-n // BLOCK)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * BLOCK - n), (0, 0)))
    sizes = jnp.minimum(BLOCK, n - jnp.arange(nb) * BLOCK).astype(jnp.float32)
    means = (xp.reshape(b, nb, BLOCK, c).sum(2) / sizes[None, :, None]).astype(w1t.dtype)
    z = jnp.einsum("bmc,fc->bmf", means, w1t, preferred_element_type=jnp.float32) + b1.astype(jnp.float32)
    return jnp.abs(z - blockmean_cache)


def make_sparse_step(keep, tiles, selector="pallas", sel_warps=8):
    def step(state, x, w1t, b1, w2, blockmean_cache):
        act, out = state
        scores = block_scores(x, w1t, b1, blockmean_cache)
        if selector == "pallas":
            indices, counts = mlp_selection.select_top_features(
                scores, keep, tiles.fc1_features, impl="interpret" if INTERPRET else "pallas",
                num_warps=sel_warps,
            )
        else:  # XLA top_k + mask compaction, as chipmunk_jax.selection.select_mlp_features
            from chipmunk_jax import selection

            indices, counts = selection.select_mlp_features(
                scores, keep / scores.shape[-1], 0.0, tiles.fc1_features
            )
        return mlp_pallas.sparse_mlp_delta(
            x, w1t, b1, w2, act, out, indices, counts, block_size=BLOCK, w1_transposed=True, tiles=tiles,
            interpret=INTERPRET,
        )

    return jax.jit(step, donate_argnums=(0,))


def make_selection_only(keep, multiple_of, selector):
    def sel(state, scores):
        if selector == "pallas":
            i, c = mlp_selection.select_top_features(
                scores, keep, multiple_of, impl="interpret" if INTERPRET else "pallas"
            )
        else:
            from chipmunk_jax import selection

            i, c = selection.select_mlp_features(scores, keep / scores.shape[-1], 0.0, multiple_of)
        return (i, c)

    return jax.jit(sel)


def bench_shape(name, sparsities, tiles_list, log, extra_selection=False):
    n, c, f, c_out = SHAPES[name]
    xs, w1, b1, w2, b2 = _inputs(n, c, f, c_out)
    w1t = jnp.asarray(w1.T)
    dense = jax.jit(lambda y, x: dense_mlp(x, w1, b1, w2, b2))
    dense_ms, _ = _time(dense, jnp.zeros((1, n, c_out), jnp.bfloat16), lambda i: (xs[i % 3],))
    flops = 2 * 2 * n * c * f
    log(f"{name}: N={n} C={c} F={f} C_out={c_out} dense XLA MLP {dense_ms:.3f} ms "
        f"({flops / dense_ms / 1e9:.0f} TFLOP/s)")
    nb = -(-n // BLOCK)
    bm_cache = jnp.einsum("bmc,fc->bmf", xs[0][:, : nb * BLOCK : BLOCK].astype(jnp.float32),
                          w1t.astype(jnp.float32))  # any fixed baseline gives realistic score spreads
    rows = []
    for sparsity in sparsities:
        keep = round((1 - sparsity) * f)
        for tiles in tiles_list:
            act = jnp.swapaxes(jax.nn.gelu(jnp.dot(xs[2], w1) + b1, approximate=True), 1, 2)
            out = dense_mlp(xs[2], w1, b1, w2, b2)
            step = make_sparse_step(keep, tiles)
            ms, _ = _time(step, (act, out), lambda i: (xs[i % 3], w1t, b1, w2, bm_cache))
            rows.append((name, sparsity, keep, tiles, dense_ms, ms))
            log(f"  sparsity {sparsity:.2f} keep {keep}/{f} tiles {_tiles_str(tiles)}: sparse step {ms:.3f} ms, "
                f"dense/sparse {dense_ms / ms:.2f}x")
    if extra_selection:
        scores = block_scores(xs[0], w1t, b1, bm_cache)
        keep = round(0.3 * f)
        for selector in ("pallas", "xla_top_k"):
            sel = make_selection_only(keep, 128, selector)
            ms, _ = _time(lambda st, s: sel(st, s), None, lambda i: (scores,))
            log(f"  selection only ({selector}), [1,{nb},{f}] keep {keep}: {ms:.3f} ms")
        t_ms, _ = _time(jax.jit(lambda st, w: w.T + 0), None, lambda i: (w1,))
        log(f"  w1 transpose (cost per call if w1 is not stored [F, C]): {t_ms:.3f} ms")
    return rows


FC1_VARIANTS = [  # (fc1_features, fc1_k, warps, stages)
    (128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (256, 64, 8, 3), (128, 32, 4, 5),
]
FC2_VARIANTS = [  # (fc2_cols, fc2_k, warps, stages)
    (128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (256, 64, 8, 3), (128, 32, 4, 5),
]


def breakdown(log, sparsity=0.7, name="flux_double"):
    """Times each part of the sparse step separately, fc1/fc2 tile variants independently, then the full
    step with the best fc1 + best fc2 tiles, against the dense MLP timed in the same process."""
    import dataclasses

    n, c, f, c_out = SHAPES[name]
    keep = round((1 - sparsity) * f)
    xs, w1, b1, w2, b2 = _inputs(n, c, f, c_out)
    w1t = jnp.asarray(w1.T)
    nb = -(-n // BLOCK)
    bm_cache = jnp.einsum("bmc,fc->bmf", xs[0][:, : nb * BLOCK : BLOCK].astype(jnp.float32),
                          w1t.astype(jnp.float32))
    dense = jax.jit(lambda y, x: dense_mlp(x, w1, b1, w2, b2))
    dense_ms, _ = _time(dense, jnp.zeros((1, n, c_out), jnp.bfloat16), lambda i: (xs[i % 3],))
    log(f"breakdown {name} sparsity {sparsity}: dense XLA MLP {dense_ms:.3f} ms")
    sc = jax.jit(lambda st, x: block_scores(x, w1t, b1, bm_cache))
    ms, _ = _time(sc, None, lambda i: (xs[i % 3],))
    log(f"  scores (block means + fc1 of means + |.-cache|): {ms:.3f} ms")
    scores = block_scores(xs[0], w1t, b1, bm_cache)
    for warps in (8, 16, 32):
        sel = jax.jit(lambda st, s, w=warps: mlp_selection.select_top_features(
            s, keep, 128, num_warps=w, impl="interpret" if INTERPRET else "pallas"))
        ms, _ = _time(sel, None, lambda i: (scores,))
        log(f"  selection pallas num_warps={warps}: {ms:.3f} ms")
    indices, counts = mlp_selection.select_top_features(scores, keep, 128, impl="interpret" if INTERPRET else "pallas")
    indices = mlp_pallas.pad_indices(indices, 256)
    act0 = jnp.swapaxes(jax.nn.gelu(jnp.dot(xs[2], w1) + b1, approximate=True), 1, 2)
    out0 = dense_mlp(xs[2], w1, b1, w2, b2)
    best1 = best2 = None
    delta_t = None
    for bf, bk, w, st in FC1_VARIANTS:
        t = dataclasses.replace(DEFAULT_TILES_, fc1_features=bf, fc1_k=bk, fc1_warps=w, fc1_stages=st)
        fn = jax.jit(lambda act, x, t=t: mlp_pallas.fc1_delta(x, w1t, b1, act, indices, counts, block_size=BLOCK,
                                                               tiles=t, interpret=INTERPRET)[1], donate_argnums=(0,))
        ms, _ = _time(fn, jnp.array(act0), lambda i: (xs[i % 3],))
        log(f"  fc1 BF={bf} BK={bk} warps={w} stages={st}: {ms:.3f} ms")
        best1 = min(best1 or (ms, t), (ms, t), key=lambda z: z[0])
    delta_t, _ = mlp_pallas.fc1_delta(xs[0], w1t, b1, jnp.array(act0), indices, counts, block_size=BLOCK,
                                      tiles=DEFAULT_TILES_, interpret=INTERPRET)
    for bn, bk, w, st in FC2_VARIANTS:
        t = dataclasses.replace(DEFAULT_TILES_, fc2_cols=bn, fc2_k=bk, fc2_warps=w, fc2_stages=st)
        fn = jax.jit(lambda out, d, t=t: mlp_pallas.fc2_delta(d, w2, out, indices, counts, block_size=BLOCK,
                                                              tiles=t, interpret=INTERPRET), donate_argnums=(0,))
        ms, _ = _time(fn, jnp.array(out0), lambda i: (delta_t,))
        log(f"  fc2 BN={bn} BK={bk} warps={w} stages={st}: {ms:.3f} ms")
        best2 = min(best2 or (ms, t), (ms, t), key=lambda z: z[0])
    b1t, b2t = best1[1], best2[1]
    best = dataclasses.replace(b1t, fc2_cols=b2t.fc2_cols, fc2_k=b2t.fc2_k, fc2_warps=b2t.fc2_warps,
                               fc2_stages=b2t.fc2_stages)
    for warps in (8, 16):
        step = make_sparse_step(keep, best, sel_warps=warps)
        ms, _ = _time(step, (jnp.array(act0), jnp.array(out0)), lambda i: (xs[i % 3], w1t, b1, w2, bm_cache))
        log(f"  full sparse step, tiles {_tiles_str(best)}, selection warps {warps}: {ms:.3f} ms, "
            f"dense/sparse {dense_ms / ms:.2f}x")
    ms2, _ = _time(dense, jnp.zeros((1, n, c_out), jnp.bfloat16), lambda i: (xs[i % 3],))
    log(f"  dense XLA MLP again: {ms2:.3f} ms")


DEFAULT_TILES_ = mlp_pallas.DEFAULT_TILES


def _tiles_str(t):
    return (f"fc1 {t.fc1_features}x{t.fc1_k} w{t.fc1_warps}s{t.fc1_stages} / "
            f"fc2 {t.fc2_cols}x{t.fc2_k} w{t.fc2_warps}s{t.fc2_stages}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="write the markdown results section here")
    parser.add_argument("--quick", action="store_true", help="FLUX double block at 70%% only")
    parser.add_argument("--breakdown", action="store_true", help="per-part timings + fc1/fc2 tile variants only")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, interpret mode (no GPU)")
    args = parser.parse_args()
    if args.cpu_smoke:
        global INTERPRET, REPS, SAMPLES
        INTERPRET, REPS, SAMPLES = True, 1, 2
        SHAPES.update(flux_double=(256, 64, 512, 64), flux_single=(384, 64, 512, 64), wan14b=(200, 64, 256, 64))
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    dev = jax.devices()[0]
    log(f"device {dev.device_kind}, jax {jax.__version__}, date {datetime.date.today()}")
    if args.breakdown:
        breakdown(log)
        if args.out:
            with open(args.out, "w") as fh:
                fh.write("\n".join(["```", *lines, "```", ""]))
        return 0
    # Tile sweep on the FLUX double block at 70%, then the best tiles everywhere.
    sweep = bench_shape("flux_double", (0.7,), mlp_pallas.PRODUCTION_TILES, log, extra_selection=True)
    best = min(sweep, key=lambda r: r[5])[3]
    log(f"best tiles: {_tiles_str(best)}")
    rows = [r for r in sweep if r[3] == best]
    if not args.quick:
        rows += bench_shape("flux_double", (0.5, 0.85), [best], log)
        for name in ("flux_single", "wan14b"):
            rows += bench_shape(name, SPARSITIES, [best], log)
    table = ["| shape | N, C -> F -> C_out | sparsity | kept/F | dense XLA ms | sparse step ms | dense/sparse |",
             "|---|---|---|---|---|---|---|"]
    for name, sparsity, keep, _, dense_ms, ms in sorted(rows, key=lambda r: (r[0], r[1])):
        n, c, f, c_out = SHAPES[name]
        table.append(f"| {name} | {n}, {c} -> {f} -> {c_out} | {sparsity:.0%} | {keep}/{f} | {dense_ms:.3f} | "
                     f"{ms:.3f} | {dense_ms / ms:.2f}x |")
    print("\n".join(table))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(["```", *lines, "```", "", *table, ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
