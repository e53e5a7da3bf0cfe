"""Attention kernel benchmark: cuDNN dense vs our dense, dense+colsum, and gathered column-sparse attention.

One process on the GPU, bf16, B=1, H=24, D=128 by default, random column sets (a random window of a
per-head random permutation per query group: distinct columns, uniformly spread). Prints ms, useful TFLOP/s
and the ratio to cuDNN dense of the same shape, and appends a markdown section to --results.

On the device machine:
  source benchmarks/gpu_env.sh && python3 -P benchmarks/attention.py --sizes 32760,118800 --results $OUT/results.md
Flags restrict sizes / sparsities / block-config sweeps so that one call fits the 10-minute limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.pallas_kernels import attention_pallas as ap
from chipmunk_jax.pallas_kernels import attention_triton as at
from chipmunk_jax.pallas_kernels import selection_fast as sf


def _median_ms(f, *args, **kw):
    try:
        return _median_ms_raw(f, *args, **kw)
    except Exception as e:  # a config that fails to compile / run is reported, not fatal
        print(f"  FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return float("nan"), float("nan")


def _median_ms_raw(f, *args, min_reps=5, max_reps=20, budget_s=3.0):
    """Median wall time of f(*args) in ms after warm-up; short calls are batched back to back per sample."""
    jax.block_until_ready(f(*args))  # compile + warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    one = time.perf_counter() - t0
    inner = max(1, int(0.02 / max(one, 1e-6)))  # >= ~20 ms per sample
    reps = int(min(max_reps, max(min_reps, budget_s / max(one * inner, 1e-6))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = f(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(samples), (max(samples) - min(samples)) / statistics.median(samples)


def alternating_blocks(n, q, k, v, args, scale, best, report, dense_flops):
    """cuDNN, our dense+LSE (and dense+LSE+colsum) in alternating ~1 s blocks of calls (see --pairs).

    Blocks, not single calls: alternating single calls runs each op in the clock state the previous op left, which
    moved cuDNN by -7% at N=32,760 (after the colsum kernel) and the ratio with it; blocks keep clocks steady."""
    h, gs = q.shape[2], args.group_size
    prev = jnp.asarray(jax.random.normal(jax.random.key(n + 1), (1, h, n), jnp.float32) + 0.5 * math.log(n))
    fns = {
        "cudnn dense": (jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, implementation=None if args.interpret else "cudnn")), (q, k, v),
            "jax.nn.dot_product_attention"),
        "dense+lse": (jax.jit(functools.partial(ap.dense_attention, scale=scale, config=best["dense"][1],
                                                interpret=args.interpret)), (q, k, v), _cfg(best["dense"][1])),
    }
    if "triton" not in args.skip.split(","):
        fns["dense+lse triton"] = (jax.jit(functools.partial(
            at.dense_attention, scale=scale, config=best["dense triton"][1], interpret=args.interpret)),
            (q, k, v), _cfg(best["dense triton"][1]))
    if args.pairs_colsum:
        fns["dense+lse+colsum"] = (jax.jit(functools.partial(
            ap.dense_attention_colsum, group_size=gs, scale=scale, config=best["colsum"][1],
            interpret=args.interpret)), (q, k, v, prev), _cfg(best["colsum"][1]))
        if "triton" not in args.skip.split(","):
            fns["dense+lse+colsum triton"] = (jax.jit(functools.partial(
                at.dense_attention_colsum, group_size=gs, scale=scale, config=best["colsum triton"][1],
                interpret=args.interpret)), (q, k, v, prev), _cfg(best["colsum triton"][1]))
    blocks = {name: [] for name in fns}
    calls = {}
    for name, (f, a, _) in fns.items():
        jax.block_until_ready(f(*a))  # compile + warm-up
        t0 = time.perf_counter()
        jax.block_until_ready(f(*a))
        calls[name] = max(3, math.ceil(1.0 / (time.perf_counter() - t0)))
    for _ in range(args.pairs):
        for name, (f, a, _) in fns.items():
            xs = []
            for _ in range(calls[name]):
                t0 = time.perf_counter()
                jax.block_until_ready(f(*a))
                xs.append((time.perf_counter() - t0) * 1e3)
            blocks[name].append(statistics.median(xs))
    base = statistics.median(blocks["cudnn dense"])
    for name, (_, _, cfg) in fns.items():
        xs = blocks[name]
        med = statistics.median(xs)
        ratios = [x / c for c, x in zip(blocks["cudnn dense"], xs)]  # this / cuDNN, round by round
        report(n, f"{name} (alternating x{args.pairs})", cfg, med, dense_flops, base, (max(xs) - min(xs)) / med)
        if name != "cudnn dense":
            print(f"  {name}: time / cuDNN time per round: median {statistics.median(ratios):.4f} "
                  f"(min {min(ratios):.4f}, max {max(ratios):.4f}; {calls[name]} calls per block)", flush=True)
    del prev


def random_column_sets(key, b, h, n, group_size, count, kmax):
    """indices [B, H, G, kmax] int32 (distinct random columns per group), counts [B, H, G] = count."""
    g = -(-n // group_size)
    kp, ko = jax.random.split(key)
    perms = jax.vmap(lambda kk: jax.random.permutation(kk, n).astype(jnp.int32))(jax.random.split(kp, b * h))
    offs = jax.random.randint(ko, (b * h, g), 0, n, jnp.int32)
    pos = (offs[:, :, None] + jnp.arange(kmax, dtype=jnp.int32)[None, None, :]) % n
    idx = jax.vmap(lambda p, q: p[q])(perms, pos)
    return idx.reshape(b, h, g, kmax), jnp.full((b, h, g), count, jnp.int32)


def ceilings():
    x = jnp.ones((1024, 1024, 1024), jnp.bfloat16) * 1.5  # 2 GiB
    copy = jax.jit(lambda a: a + 1)
    ms, _ = _median_ms(copy, x)
    bw = 2 * x.size * 2 / (ms * 1e-3) / 1e12
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    ms2, _ = _median_ms(mm, a, a)
    tf = 2 * 8192**3 / (ms2 * 1e-3) / 1e12
    del x
    return bw, tf


def main(argv=None):
    ap_ = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap_.add_argument("--sizes", default="4608,32760,75600,118800")
    ap_.add_argument("--sparsities", default="0.80,0.85,0.90,0.93,0.95")
    ap_.add_argument("--heads", type=int, default=24)
    ap_.add_argument("--dim", type=int, default=128)
    ap_.add_argument("--group-size", type=int, default=192)
    ap_.add_argument("--sweep", default="dense,colsum,sparse", help="which ops sweep all production configs")
    ap_.add_argument("--sweep-sparsity", type=float, default=0.93)
    ap_.add_argument("--sweep-sizes", default="", help="sizes at which to sweep (default: all); other sizes use "
                     "the fastest config found so far")
    ap_.add_argument("--skip", default="", help="comma list of ops to skip: cudnn,dense,colsum,sparse,triton (the TMA kernels)")
    ap_.add_argument("--select-sizes", default="", help="sizes N at which to time the selection fast path on "
                     "column sums [1, H, ceil((N + 256) / group), N] (Hunyuan: N=118,800 -> G=621)")
    ap_.add_argument("--select-top-keys", type=float, default=0.05, help="Hunyuan preset: top_keys 0.05, "
                     "dynamic random 0.01, counts multiple of 128, compressed")
    ap_.add_argument("--select-density", type=float, default=0.07, help="fraction of set mask bits for the "
                     "bits -> indices timing (Hunyuan ~0.07; Wan's 5x5x5 window + top 10%% ~0.44)")
    ap_.add_argument("--select-sweep", action="store_true", help="also time the selection kernels' width / "
                     "num_warps variants")
    ap_.add_argument("--pairs", type=int, default=0, help="also time cuDNN and our dense+LSE (and with "
                     "--pairs-colsum dense+LSE+colsum) in PAIRS alternating rounds, each op a ~1 s block of "
                     "back-to-back calls per round (steady clocks within a block; drift between rounds hits "
                     "every op alike); reports the median over rounds of each op's block median")
    ap_.add_argument("--pairs-colsum", action="store_true", help="include dense+LSE+colsum in the --pairs rotation")
    ap_.add_argument("--ceilings", action="store_true", help="measure copy bandwidth and bf16 GEMM rate first")
    ap_.add_argument("--results", default="benchmarks/RESULTS.md")
    ap_.add_argument("--interpret", action="store_true", help="CPU smoke test of this script (interpret mode)")
    ap_.add_argument("--best-sparse-json", default=None,
                     help="write the swept sparse configuration with the best cuDNN ratio here (over every swept "
                          "size: sweep one size to pick for it; flux_sample.py --sparse-config reads it)")
    args = ap_.parse_args(argv)
    if args.pairs < 0:
        ap_.error(f"--pairs must be >= 0, got {args.pairs}")

    sizes = [int(s) for s in args.sizes.split(",") if s]
    select_sizes = {int(s) for s in args.select_sizes.split(",") if s}
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    sweep_all = set(args.sweep.split(","))
    sweep_sizes = {int(x) for x in args.sweep_sizes.split(",") if x} or set(sizes)
    best = {"dense": (float("inf"), ap.DEFAULT_DENSE), "colsum": (float("inf"), ap.DEFAULT_COLSUM),
            "sparse": (float("inf"), ap.DEFAULT_SPARSE), "dense triton": (float("inf"), at.DEFAULT_DENSE),
            "colsum triton": (float("inf"), at.DEFAULT_COLSUM)}

    def keep(op, ms, cfg, ref_ms):
        rel = ms / ref_ms if ref_ms else ms
        if not math.isnan(rel) and rel < best[op][0]:
            best[op] = (rel, cfg)
    skip = set(args.skip.split(","))
    h, d, gs = args.heads, args.dim, args.group_size
    scale = d**-0.5
    dev = jax.devices()[0]
    header = f"{datetime.date.today()} | {dev.device_kind} | jax {jax.__version__} | B=1 H={h} D={d} bf16 group={gs}"
    print(header, flush=True)
    rows = []

    def report(n, op, cfg, ms, flops, cudnn_ms, spread):
        tf = flops / (ms * 1e-3) / 1e12
        ratio = (cudnn_ms / ms) if cudnn_ms else float("nan")
        rows.append((n, op, cfg, ms, tf, ratio, spread))
        print(f"N={n:>6} {op:<22} {cfg:<44} {ms:9.3f} ms {tf:7.1f} TFLOP/s  cuDNN/this={ratio:6.2f}x  spread={spread:.2f}",
              flush=True)

    if args.ceilings:
        bw, tf = ceilings()
        print(f"ceilings: copy {bw:.2f} TB/s (read+write), bf16 GEMM 8192^3 {tf:.0f} TFLOP/s", flush=True)
        rows.append((0, "ceiling: copy TB/s", "2 GiB a+1", 0.0, bw, float("nan"), 0.0))
        rows.append((0, "ceiling: GEMM TFLOP/s", "8192^3 bf16", 0.0, tf, float("nan"), 0.0))

    for n in sizes:
        sweep = sweep_all if n in sweep_sizes else set()
        key = jax.random.key(n)
        kq, kk, kv, ks, kl = jax.random.split(key, 5)
        q = jax.random.normal(kq, (1, n, h, d), jnp.bfloat16)
        k = jax.random.normal(kk, (1, n, h, d), jnp.bfloat16)
        v = jax.random.normal(kv, (1, n, h, d), jnp.bfloat16)
        dense_flops = 4.0 * h * n * n * d
        cudnn_ms = None
        if "cudnn" not in skip:
            f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn"))
            cudnn_ms, sp = _median_ms(f, q, k, v)
            report(n, "cudnn dense", "jax.nn.dot_product_attention", cudnn_ms, dense_flops, cudnn_ms, sp)
        if "dense" not in skip:
            cfgs = ap.PRODUCTION_DENSE_CONFIGS if "dense" in sweep else (best["dense"][1],)
            for cfg in cfgs:
                f = jax.jit(functools.partial(ap.dense_attention, scale=scale, config=cfg, interpret=args.interpret))
                ms, sp = _median_ms(f, q, k, v)
                report(n, "dense+lse", _cfg(cfg), ms, dense_flops, cudnn_ms, sp)
                keep("dense", ms, cfg, cudnn_ms)
            for cfg in at.PRODUCTION_DENSE_CONFIGS if "triton" not in skip else ():
                f = jax.jit(functools.partial(at.dense_attention, scale=scale, config=cfg, interpret=args.interpret))
                ms, sp = _median_ms(f, q, k, v)
                report(n, "dense+lse triton", _cfg(cfg), ms, dense_flops, cudnn_ms, sp)
                keep("dense triton", ms, cfg, cudnn_ms)
        if args.pairs:
            alternating_blocks(n, q, k, v, args, scale, best, report, dense_flops)
        if "colsum" not in skip:
            prev = jnp.asarray(jax.random.normal(kl, (1, h, n), jnp.float32) + 0.5 * math.log(n))
            cfgs = ap.PRODUCTION_COLSUM_CONFIGS if "colsum" in sweep else (best["colsum"][1],)
            for cfg in cfgs:
                f = jax.jit(functools.partial(ap.dense_attention_colsum, group_size=gs, scale=scale, config=cfg, interpret=args.interpret))
                ms, sp = _median_ms(f, q, k, v, prev)
                report(n, "dense+lse+colsum", _cfg(cfg), ms, dense_flops, cudnn_ms, sp)
                keep("colsum", ms, cfg, cudnn_ms)
            for cfg in at.PRODUCTION_COLSUM_CONFIGS if "triton" not in skip else ():
                f = jax.jit(functools.partial(at.dense_attention_colsum, group_size=gs, scale=scale, config=cfg,
                                              interpret=args.interpret))
                ms, sp = _median_ms(f, q, k, v, prev)
                report(n, "dense+lse+colsum triton", _cfg(cfg), ms, dense_flops, cudnn_ms, sp)
                keep("colsum triton", ms, cfg, cudnn_ms)
            del prev
        if "sparse" not in skip:
            g = -(-n // gs)
            best_cfg = best["sparse"][1]
            order = sorted(sparsities, key=lambda s: abs(s - args.sweep_sparsity))  # sweep point first
            for s in order:
                count = max(64, int(round((1 - s) * n / 64)) * 64)
                kmax = count
                idx, cnt = jax.jit(random_column_sets, static_argnums=(1, 2, 3, 4, 5, 6))(ks, 1, h, n, gs, count, kmax)
                useful = 4.0 * h * n * count * d
                swept = "sparse" in sweep and abs(s - args.sweep_sparsity) < 1e-9
                cfgs = ap.PRODUCTION_SPARSE_CONFIGS if swept else (best_cfg,)
                best_s = None
                for cfg in cfgs:
                    f = jax.jit(functools.partial(ap.column_sparse_attention, group_size=gs, scale=scale, config=cfg, interpret=args.interpret))
                    ms, sp = _median_ms(f, q, k, v, idx, cnt)
                    report(n, f"sparse {100 * s:.0f}% ({count}/{n})", _cfg(cfg), ms, useful, cudnn_ms, sp)
                    if not math.isnan(ms) and (best_s is None or ms < best_s[0]):
                        best_s = (ms, cfg)
                    if swept:
                        keep("sparse", ms, cfg, cudnn_ms)
                best_cfg = best_s[1] if best_s else best_cfg
                del idx, cnt
        del q, k, v
        if n in select_sizes:
            time_selection(n, h, gs, args.select_top_keys, cudnn_ms, report, args.interpret,
                           density=args.select_density, sweep=args.select_sweep)

    if args.best_sparse_json:
        rel, cfg = best["sparse"]
        with open(args.best_sparse_json, "w") as fh:
            json.dump(dataclasses.asdict(cfg), fh)
        print(f"best sparse configuration over sizes {sorted(sweep_sizes & set(sizes))} ({rel:.3f} of the cuDNN "
              f"time): {_cfg(cfg)} -> {args.best_sparse_json}")
    lines = [
        "",
        f"### Attention kernels (issue 3) — {header}",
        "",
        f"Command: `source benchmarks/gpu_env.sh && python3 -P benchmarks/attention.py {' '.join(sys.argv[1:])}`",
        "",
        "| N | op | config | ms | useful TFLOP/s | cuDNN ms / this ms | spread |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, op, cfg, ms, tf, ratio, sp in rows:
        lines.append(f"| {n} | {op} | {cfg} | {ms:.3f} | {tf:.1f} | {ratio:.2f} | {sp:.2f} |")
    with open(args.results, "a") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def time_selection(n, h, gs, top_keys, cudnn_ms, report, interpret, density=0.07, sweep=False):
    """Selection fast path at Hunyuan scale: column sums [1, H, G, N] f32 -> indices/counts (+ mask)."""
    g = -(-(n + 256) // gs)
    mult = 128
    k = int(mult * round(top_keys * n / mult))
    kc, ks, kr = jax.random.split(jax.random.key(7), 3)
    cs = jax.jit(lambda kk: jnp.exp(2.0 * jax.random.normal(kk, (1, h, g, n), jnp.float32)))(kc)
    # Static part like Hunyuan's (docs/algorithm.md §1.6, lv=0): the last 256 columns (text) + 1% random, last group dense.
    static = jax.random.bernoulli(ks, 0.01, (g, n)).at[:, n - 256:].set(True).at[-1].set(True)
    eligible = jnp.arange(g) < g - 1
    impl = "interpret" if interpret else "pallas"
    rows = [
        ("select compressed", "k=%d m=%d rand 1%% static+eligible %s" % (k, mult, impl),
         jax.jit(lambda c, kk: sf.select_columns_fast(c, k, mult, compress=True, key=kk, random_p=0.01,
                                                       static_mask=static, eligible=eligible, impl=impl)), (cs, kr)),
        ("select threshold only", "k=%d (33 jnp count passes)" % k,
         jax.jit(lambda c: sf.row_thresholds(c.reshape(-1, n), k)), (cs,)),
        ("select threshold only", "k=%d (Pallas radix, 8 passes of 4 bits) %s" % (k, impl),
         jax.jit(lambda c: sf._row_thresholds_pallas(c.reshape(-1, n), k, interpret=interpret)), (cs,)),
        ("select uncompressed", "k=%d %s" % (k, impl),
         jax.jit(lambda c: sf.select_columns_fast(c, k, mult, compress=False, impl=impl)), (cs,)),
    ]
    bits = (jnp.packbits(jax.random.bernoulli(kr, density, (1, h, g, n)), axis=-1, bitorder="little"),
            jnp.full((1, h, g), min(n, mult * math.ceil(density * n / mult)), jnp.int32))
    variants = [(1024, 4)] + ([(512, 4), (2048, 4), (1024, 8), (2048, 8), (4096, 8)] if sweep else [])
    for width, warps in variants:
        rows.append(("bits -> indices (sparse step)", "density %.2f m=%d width %d warps %d %s"
                     % (density, mult, width, warps, impl),
                     jax.jit(functools.partial(lambda b, c, w, nw: sf.mask_bits_to_indices(
                         b, c, n, impl=impl, width=w, num_warps=nw), w=width, nw=warps)), bits))
    for width, warps in ([(1024, 8), (4096, 8), (2048, 4), (2048, 16)] if sweep else []):
        rows.append(("select threshold only", "k=%d radix width %d warps %d %s" % (k, width, warps, impl),
                     jax.jit(functools.partial(lambda c, w, nw: sf._row_thresholds_pallas(
                         c.reshape(-1, n), k, interpret=interpret, width=w, num_warps=nw), w=width, nw=warps)),
                     (cs,)))
    for op, cfg, f, a in rows:
        ms, sp = _median_ms(f, *a, min_reps=3, max_reps=10, budget_s=2.0)
        report(n, f"{op} G={g}", cfg, ms, 0.0, cudnn_ms, sp)
    del cs


def _cfg(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.__dict__.items()).replace("programs_per_group", "ppg").replace(
        "num_", "")


if __name__ == "__main__":
    main()
