"""Per-layer weight copies of a ``lax.scan`` over stacked weights, and the XLA options that remove them.

A model that runs its blocks with ``lax.scan`` over params stacked on a leading layer axis reads layer i's weights
with a dynamic-slice (models/block_stack.py ``block_at``). XLA:GPU materialises that slice with a
``loop_dynamic_slice_fusion`` kernel (a full read + write of every weight, every step) before the GEMM, which an
unrolled model (one array per layer) does not pay: 11.6 ms of a 148 ms FLUX step
(benchmarks/profiles/flux_dense_and_sparse_reuse_scanned_stacked_mlp_h100_2026-12-07.md).

The hypotheses it tests (from XLA's source): the DynamicSliceFusionRewriter (default on in jaxlib 0.11.2,
xla_gpu_enable_dynamic_slice_fusion=true) turns ``dynamic-slice -> bitcast -> GEMM`` into a DynamicSliceThunk that
hands cuBLAS a pointer into the stack (offset computed on the host from the while loop's induction variable), but
it matches only LEGACY cuBLAS GEMMs (``__cublas$gemm``) and this jaxlib defaults to cuBLASLt
(xla_gpu_enable_cublaslt=true: ``__cublas$lt$matmul``), so it never fires; and the offset must be a function of the
loop's induction variable (and constants) alone, which ``arange[i]`` of a traced ``jnp.arange`` is not. A Triton
GEMM fusion can absorb a dynamic-slice of the major-most dim itself, but the autotuner picks cuBLAS. XLA's own
while-loop unrolling runs after fusion, so it cannot remove the copies.

What it measures, on one MLP stack ``for i: x = gelu(x @ W1[i]) @ W2[i]`` (bf16 weights W1 [L, D, F], W2 [L, F, D],
x [T, D], f32 accumulation and GELU as models/mmdit.py dense_mlp), each variant jitted and compiled with its own
``compiler_options`` (XLA DebugOptions by name, through ``jax.jit(f).lower(...).compile(compiler_options=...)``):
  unrolled*          Python loop over L separate per-layer arrays (the baseline: no slice at all)
  scan*              lax.scan with the stacks as xs (JAX's own counter indexes them)
  arange*            lax.scan over jnp.arange(L) with block_at-style dynamic_index_in_dim (models/block_stack.py)
  arange-np*         the same over np.arange(L) (a constant: XLA folds arange[i] into the loop counter)
  scan-t*            as scan with W1 stored [L, F, D] (layers.py ``kernel_t``, contracted on its last dim)
  carry*             lax.scan with the layer index carried in the carry
  fori*              lax.fori_loop with dynamic_index_in_dim
  ...-u2, -ufull     lax.scan(unroll=2 / unroll=True)
and the option sets: lt-off (xla_gpu_enable_cublaslt=false: legacy cuBLAS), dsf / dsf-off
(xla_gpu_enable_dynamic_slice_fusion), cb-off (xla_gpu_enable_command_buffer=''), triton
(xla_gpu_cublas_fallback=false: Triton GEMMs only), xla-unroll (xla_gpu_enable_while_loop_unrolling=FULL_UNROLL).
Per variant it prints ms/iteration (median of --iters timed calls after --warmup, each call block_until_ready),
the ratio to ``unrolled``, the max relative difference of the output to ``unrolled``'s, and from the optimized HLO
(``compiled.as_text()``; STATIC counts: an instruction inside the while body runs L times): ds-copy (loop/input
fusions or bare ops that dynamic-slice, i.e. weight copies), slice-copy (the same for static slices), dsf
(DynamicSliceFusion custom fusions: dynamic / static address computation), triton (Triton GEMM fusions), while
loops, and the custom-call targets. The optimized HLO of ``scan`` and of the fastest variant go to --out.

Variants in --isolate (default scan+triton) run in a child process: XLA's in-memory GEMM autotune cache is keyed
by device and fusion HLO, not by options, so a variant that changes which GEMM backend may win would otherwise
reuse the choice an earlier variant made for the same fusion.

On the device machine (one H100, about 2-3 minutes; --budget-s stops starting new variants, the slow-compiling
unroll=True variants come last; --variants a,b picks some):
  python3 -P benchmarks/scan_weight_slices.py --out $OUT
On a CPU (tiny sizes, a check of the script; GPU-only options are accepted by name and ignored there, and an option
the backend refuses skips its variant with a note):
  .venv/bin/python benchmarks/scan_weight_slices.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

# Before jax: no up-front grab of 75% of GPU memory (an --isolate child process shares the GPU).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# XLA option sets (DebugOptions field names; values as jax passes them to CompileOptions.env_option_overrides).

LT_OFF = {"xla_gpu_enable_cublaslt": False}                      # legacy cuBLAS: the only GEMM DSF matches
DSF_ON = {"xla_gpu_enable_dynamic_slice_fusion": True}            # default true in jaxlib 0.11.2; explicit here
DSF_OFF = {"xla_gpu_enable_dynamic_slice_fusion": False}
CB_OFF = {"xla_gpu_enable_command_buffer": ""}                    # no CUDA graphs (DSF commands re-record per trip)
TRITON = {"xla_gpu_enable_triton_gemm": True, "xla_gpu_cublas_fallback": False}  # Triton GEMM absorbs the slice
XLA_UNROLL = {"xla_gpu_enable_while_loop_unrolling": "WHILE_LOOP_UNROLLING_FULL_UNROLL"}  # runs after fusion


def _merge(*dicts):
    out = {}
    for d in dicts:
        out.update(d)
    return out


# (name, form, scan unroll, compiler options, what it tests), most telling first (--budget-s may cut the tail)
VARIANTS = [
    ("unrolled", "unrolled", 1, {}, "baseline: separate per-layer arrays, default options"),
    ("scan", "scan", 1, {}, "lax.scan over stacked xs, default options (the profiled case)"),
    ("scan+lt-off", "scan", 1, _merge(LT_OFF, DSF_ON), "legacy cuBLAS + DSF: GEMM reads the stack in place"),
    ("unrolled+lt-off", "unrolled", 1, LT_OFF, "baseline with legacy cuBLAS (GEMM library alone)"),
    ("arange", "arange", 1, {}, "block_stack.py style: scan over jnp.arange, dynamic_index_in_dim"),
    ("arange+lt-off", "arange", 1, _merge(LT_OFF, DSF_ON),
     "block_stack.py style + legacy + DSF (offset = arange[i]: not a function of the induction variable?)"),
    ("arange-np+lt-off", "arange_np", 1, _merge(LT_OFF, DSF_ON),
     "scan over np.arange (a constant XLA folds into the counter) + legacy + DSF"),
    ("carry+lt-off", "carry", 1, _merge(LT_OFF, DSF_ON), "index carried in the scan carry + legacy + DSF"),
    ("scan+triton", "scan", 1, TRITON, "Triton GEMMs only: dynamic-slice fused into the GEMM fusion"),
    ("scan+lt-off+cb-off", "scan", 1, _merge(LT_OFF, DSF_ON, CB_OFF), "as scan+lt-off, command buffers off"),
    ("scan+lt-off+dsf-off", "scan", 1, _merge(LT_OFF, DSF_OFF), "control: legacy cuBLAS, DSF off (copies back)"),
    ("scan-t+lt-off", "scan_t", 1, _merge(LT_OFF, DSF_ON), "W1 stored [L, F, D] (kernel_t) + legacy + DSF"),
    ("scan+xla-unroll", "scan", 1, XLA_UNROLL, "XLA full while-loop unroll (after fusion: copies stay)"),
    ("scan-u2+lt-off", "scan", 2, _merge(LT_OFF, DSF_ON), "lax.scan(unroll=2) + legacy cuBLAS + DSF"),
    ("scan-u2", "scan", 2, {}, "lax.scan(unroll=2), default options"),
    ("scan+dsf-off", "scan", 1, DSF_OFF, "control: DSF off, cuBLASLt (expect = scan)"),
    ("fori+lt-off", "fori", 1, _merge(LT_OFF, DSF_ON), "lax.fori_loop + legacy cuBLAS + DSF"),
    ("scan+xla-unroll+lt-off", "scan", 1, _merge(XLA_UNROLL, LT_OFF, DSF_ON), "XLA full unroll + legacy + DSF"),
    # last: every layer's static slice is its own GEMM fusion to autotune (slow compile)
    ("scan-ufull+lt-off", "scan", True, _merge(LT_OFF, DSF_ON), "lax.scan(unroll=True): static slices + legacy + DSF"),
    ("scan-ufull", "scan", True, {}, "lax.scan(unroll=True): static slices, default options"),
]


# ---------------------------------------------------------------------------------------------------------------
# The model variants.

def mlp(x, w1, w2):
    """gelu_tanh(x @ w1) @ w2 with f32 accumulation, bf16 in and out (as models/mmdit.py dense_mlp, no bias)."""
    h = jnp.matmul(x, w1, preferred_element_type=jnp.float32)
    h = jax.nn.gelu(h, approximate=True).astype(x.dtype)
    return jnp.matmul(h, w2, preferred_element_type=jnp.float32).astype(x.dtype)


def _at(stack, i):
    return jax.lax.dynamic_index_in_dim(stack, i, keepdims=False)


def make_fn(form: str, unroll, layers: int):
    if form == "unrolled":
        def f(x, w1s, w2s):
            for w1, w2 in zip(w1s, w2s):
                x = mlp(x, w1, w2)
            return x
    elif form == "scan":
        def f(x, w1, w2):
            x, _ = jax.lax.scan(lambda c, w: (mlp(c, *w), None), x, (w1, w2), unroll=unroll)
            return x
    elif form == "arange":
        def f(x, w1, w2):
            def body(c, i):
                return mlp(c, _at(w1, i), _at(w2, i)), None
            x, _ = jax.lax.scan(body, x, jnp.arange(0, layers, dtype=jnp.int32), unroll=unroll)
            return x
    elif form == "arange_np":
        def f(x, w1, w2):
            def body(c, i):
                return mlp(c, _at(w1, i), _at(w2, i)), None
            x, _ = jax.lax.scan(body, x, np.arange(0, layers, dtype=np.int32), unroll=unroll)
            return x
    elif form == "scan_t":
        def f(x, w1t, w2):  # w1t [L, F, D]: fc1 contracted on its last dim (layers.py ``kernel_t``)
            def body(c, w):
                h = jnp.einsum("td,fd->tf", c, w[0], preferred_element_type=jnp.float32)
                h = jax.nn.gelu(h, approximate=True).astype(c.dtype)
                return jnp.matmul(h, w[1], preferred_element_type=jnp.float32).astype(c.dtype), None
            x, _ = jax.lax.scan(body, x, (w1t, w2), unroll=unroll)
            return x
    elif form == "carry":
        def f(x, w1, w2):
            def body(carry, _):
                c, i = carry
                return (mlp(c, _at(w1, i), _at(w2, i)), i + 1), None
            (x, _), _ = jax.lax.scan(body, (x, jnp.int32(0)), None, length=layers, unroll=unroll)
            return x
    elif form == "fori":
        def f(x, w1, w2):
            return jax.lax.fori_loop(0, layers, lambda i, c: mlp(c, _at(w1, i), _at(w2, i)), x)
    else:
        raise ValueError(form)
    return f


# ---------------------------------------------------------------------------------------------------------------
# Optimized-HLO statistics.

_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([^\s(]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}


def _nbytes(shape_text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(shape_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dtype, 4)
    return total


def parse_hlo(text: str):
    """{computation name: [(name, shape, opcode, rest of line)]} of an HLO module's text."""
    comps, cur = {}, None
    for line in text.splitlines():
        if cur is None:
            m = _HEADER.match(line)
            if m:
                cur = m.group(1)
                comps[cur] = []
            continue
        if line.strip() == "}":
            cur = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[cur].append(m.groups())
    return comps


def hlo_stats(text: str, min_copy_bytes: int) -> dict:
    """Static counts in the optimized HLO (see the module docstring). Copies count only when their output has at
    least ``min_copy_bytes`` (one layer's weight matrix), so small index or activation slices are left out."""
    comps = parse_hlo(text)
    fused = set()
    for instrs in comps.values():
        for _, _, op, rest in instrs:
            for callee in re.findall(r"calls=%?([\w.\-]+)", rest):
                if op == "fusion":
                    fused.add(callee)
    stats = Counter()
    targets = Counter()
    copy_bytes = 0
    for comp, instrs in comps.items():
        if comp in fused:
            continue
        for name, shape, op, rest in instrs:
            if op == "custom-call":
                t = re.search(r'custom_call_target="([^"]+)"', rest)
                targets[t.group(1) if t else "?"] += 1
            elif op == "while":
                stats["while"] += 1
            elif op in ("dynamic-slice", "slice", "copy") and _nbytes(shape) >= min_copy_bytes:
                stats[{"dynamic-slice": "ds-copy", "slice": "slice-copy", "copy": "copy"}[op]] += 1
                copy_bytes += _nbytes(shape)
            elif op == "fusion":
                callee = re.search(r"calls=%?([\w.\-]+)", rest)
                body = comps.get(callee.group(1), []) if callee else []
                body_ops = {o for _, _, o, _ in body}
                for _, _, o, r in body:  # custom calls inside fusions (cuBLAS in a DSF, etc.)
                    if o == "custom-call":
                        t = re.search(r'custom_call_target="([^"]+)"', r)
                        targets[(t.group(1) if t else "?") + " (in fusion)"] += 1
                if "dynamic_address_computation" in rest:
                    stats["dsf-dynamic"] += 1
                elif '"address_computation"' in rest or "address_computation\\\"" in rest:
                    stats["dsf-static"] += 1
                elif "__triton_gemm" in rest or "__triton_nested_gemm" in rest or (
                        '"kind":"__triton' in rest and ("dot" in body_ops or "fusion" in body_ops)):
                    stats["triton"] += 1
                elif "kind=kCustom" in rest and "__cudnn" in rest:
                    stats["cudnn-fusion"] += 1
                elif _nbytes(shape) >= min_copy_bytes and "dot" not in body_ops and "convolution" not in body_ops:
                    if "dynamic-slice" in body_ops:
                        stats["ds-copy"] += 1
                        copy_bytes += _nbytes(shape)
                    elif "slice" in body_ops:
                        stats["slice-copy"] += 1
                        copy_bytes += _nbytes(shape)
                    elif "copy" in body_ops or "transpose" in body_ops:
                        stats["copy"] += 1
                        copy_bytes += _nbytes(shape)
    return {"counts": dict(stats), "targets": dict(targets), "copy_mb_static": copy_bytes / 2**20}


# ---------------------------------------------------------------------------------------------------------------

def time_calls(fn, args, warmup: int, iters: int):
    out = None
    for _ in range(warmup):
        out = fn(*args)
        jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def run_variant(fn, call_args, opts, args, row):
    """Compile ``fn`` with ``opts`` and time it; fills row (ms, compile_s, or skipped). -> (output f32 numpy, HLO)."""
    try:
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*call_args).compile(compiler_options=dict(opts) if opts else None)
        row["compile_s"] = time.perf_counter() - t0
    except Exception as e:  # an option this backend refuses: skip the variant, keep going
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        row["skipped"] = f"compile failed with options {opts}: {type(e).__name__}: {msg}"
        return None, None
    try:
        row["ms"], out = time_calls(compiled, call_args, args.warmup, args.iters)
    except Exception as e:
        row["skipped"] = f"run failed: {type(e).__name__}: {str(e)[:200]}"
        return None, None
    return np.asarray(jnp.asarray(out, jnp.float32)), compiled.as_text()


def run_isolated(name, args, row, timeout_s):
    """Run one variant in a child process of this script (its own XLA autotune cache)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.abspath(__file__), "--variants", name, "--child-out", tmp,
               "--layers", str(args.layers), "--tokens", str(args.tokens), "--dim", str(args.dim),
               "--hidden", str(args.hidden), "--iters", str(args.iters), "--warmup", str(args.warmup)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            row["skipped"] = f"child process timed out after {timeout_s:.0f} s"
            return None, None
        row["process_s"] = time.perf_counter() - t0
        try:
            with open(os.path.join(tmp, "row.json")) as fh:
                child = json.load(fh)
            row.update({k: child[k] for k in ("ms", "compile_s", "skipped") if k in child})
            if "ms" not in row:
                row.setdefault("skipped", "child process timed nothing")
                return None, None
            with open(os.path.join(tmp, "hlo.txt")) as fh:
                text = fh.read()
            return np.load(os.path.join(tmp, "out.npy")), text
        except (OSError, ValueError, KeyError) as e:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            row["skipped"] = f"child process failed (rc {proc.returncode}): {type(e).__name__}: {' | '.join(tail)}"
            return None, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4608, help="rows of x (FLUX 1024^2: 4096 image + 512 text)")
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--hidden", type=int, default=12288)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default="all", help="comma-separated variant names (default all): "
                        + ", ".join(v[0] for v in VARIANTS))
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="start no new variant after this many seconds (the 3-minute device call)")
    parser.add_argument("--tiny", action="store_true", help="L=4, 64x128x256: a CPU check of the script")
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help="folder for the optimized HLO of `scan` and the fastest variant, and results.json "
                             "(default $OUT; nothing written when neither is set)")
    parser.add_argument("--isolate", default="scan+triton",
                        help="variants run in a child process ('' for none): XLA's in-memory GEMM autotune cache is "
                             "keyed by device and fusion HLO, not by options, so an option that changes which GEMM "
                             "backends may win (xla_gpu_cublas_fallback) would otherwise reuse earlier choices")
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.layers, args.tokens, args.dim, args.hidden = 4, 64, 128, 256
        args.iters, args.warmup = min(args.iters, 3), 1

    t_start = time.perf_counter()
    if args.child_out:
        args.budget_s = float("inf")
    dev = jax.devices()[0]
    backend = jax.default_backend()
    if not args.child_out:
        print(f"jax {jax.__version__}, backend {backend}, device {dev.device_kind}; L={args.layers} x[{args.tokens}, "
              f"{args.dim}] W1[L, {args.dim}, {args.hidden}] W2[L, {args.hidden}, {args.dim}] bf16; "
              f"median of {args.iters} after {args.warmup} warmup", flush=True)
    if os.environ.get("XLA_FLAGS") and not args.child_out:
        print(f"XLA_FLAGS={os.environ['XLA_FLAGS']} (applies to every variant)")

    names = [v[0] for v in VARIANTS]
    if args.variants != "all":
        wanted = [s.strip() for s in args.variants.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            parser.error(f"unknown variants {unknown}; known: {names}")
        if "unrolled" not in wanted and not args.child_out:
            wanted.insert(0, "unrolled")  # the reference for ratios and output differences
        variants = [v for v in VARIANTS if v[0] in wanted]
    else:
        variants = VARIANTS

    L, T, D, F = args.layers, args.tokens, args.dim, args.hidden
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w1 = (jax.random.normal(k1, (L, D, F), jnp.float32) * (1.0 / np.sqrt(D))).astype(jnp.bfloat16)
    w2 = (jax.random.normal(k2, (L, F, D), jnp.float32) * (2.0 / np.sqrt(F))).astype(jnp.bfloat16)
    x = jax.random.normal(k3, (T, D), jnp.float32).astype(jnp.bfloat16)
    w1s = [jnp.array(w1[i]) for i in range(L)]  # separate per-layer buffers for the unrolled baseline
    w2s = [jnp.array(w2[i]) for i in range(L)]
    jax.block_until_ready((w1, w2, x, w1s, w2s))
    min_copy_bytes = min(D * F, F * D) * 2  # one layer's weight matrix
    gflop = 2 * 2 * T * D * F * L / 1e9

    results, ref, hlos, w1t = [], None, {}, None
    header = (f"{'variant':<24} {'ms/iter':>8} {'x unrl':>7} {'TFLOP/s':>8} {'maxrel':>8} {'ds-copy':>7} "
              f"{'sl-copy':>7} {'dsf d/s':>7} {'triton':>6} {'while':>5}  custom-call targets")
    if not args.child_out:
        print(header)
        print("-" * len(header))
    isolate = set() if args.child_out else {s.strip() for s in args.isolate.split(",") if s.strip()}

    def save(best=None, final=False):
        """results.json and the HLO of `scan` (+ the fastest variant at the end) into --out; rewritten after every
        variant, so a run cut short (time limit, a crash in XLA) keeps what it measured."""
        if args.child_out:
            return
        if not args.out:
            if final:
                print("no --out and no $OUT: nothing written")
            return
        os.makedirs(args.out, exist_ok=True)
        written = []
        for name in dict.fromkeys(["scan"] + ([best["variant"]] if best else [])):
            if name in hlos:
                path = os.path.join(args.out, f"scan_weight_slices_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.hlo.txt")
                with open(path, "w") as fh:
                    fh.write(hlos[name])
                written.append(path)
        path = os.path.join(args.out, "scan_weight_slices_results.json")
        with open(path, "w") as fh:
            json.dump({"jax": jax.__version__, "backend": backend, "device": dev.device_kind,
                       "shape": {"layers": L, "tokens": T, "dim": D, "hidden": F}, "iters": args.iters,
                       "complete": final, "results": results}, fh, indent=1, default=str)
        written.append(path)
        if final:
            print("wrote " + ", ".join(written))
    for name, form, unroll, opts, what in variants:
        row = {"variant": name, "form": form, "unroll": unroll, "options": opts, "what": what}
        results.append(row)
        if time.perf_counter() - t_start > args.budget_s:
            row["skipped"] = f"time budget ({args.budget_s:.0f} s) spent"
            print(f"{name:<24} skipped: {row['skipped']}", flush=True)
            continue
        if name in isolate:  # fresh process: XLA's in-memory autotune cache is keyed by fusion HLO, not options
            out, text = run_isolated(name, args, row, max(30.0, args.budget_s + 60 - (time.perf_counter() - t_start)))
        else:
            fn = make_fn(form, unroll, L)
            if form == "scan_t" and w1t is None:
                w1t = jnp.swapaxes(w1, 1, 2).copy()
            call_args = {"unrolled": (x, w1s, w2s), "scan_t": (x, w1t, w2)}.get(form, (x, w1, w2))
            out, text = run_variant(fn, call_args, opts, args, row)
        if out is None:
            print(f"{name:<24} skipped: {row['skipped']}", flush=True)
            continue
        if args.child_out:
            np.save(os.path.join(args.child_out, "out.npy"), out)
            with open(os.path.join(args.child_out, "hlo.txt"), "w") as fh:
                fh.write(text)
            continue
        if ref is None:
            ref = out
        scale = float(np.max(np.abs(ref))) or 1.0
        row["maxrel"] = float(np.max(np.abs(out - ref))) / scale if np.all(np.isfinite(out)) else float("nan")
        hlos[name] = text
        row.update(hlo_stats(text, min_copy_bytes))
        row["tflops"] = gflop / row["ms"]
        base = next((r["ms"] for r in results if r["variant"] == "unrolled" and "ms" in r), row["ms"])
        row["ratio"] = row["ms"] / base
        c = row["counts"]
        tg = ", ".join(f"{k} x{v}" for k, v in sorted(row["targets"].items())) or "-"
        print(f"{name:<24} {row['ms']:8.3f} {row['ratio']:7.3f} {row['tflops']:8.1f} {row['maxrel']:8.1e} "
              f"{c.get('ds-copy', 0):7d} {c.get('slice-copy', 0):7d} "
              f"{c.get('dsf-dynamic', 0):>3d}/{c.get('dsf-static', 0):<3d} {c.get('triton', 0):6d} "
              f"{c.get('while', 0):5d}  {tg}" + ("  [own process]" if name in isolate else ""), flush=True)
        del out
        save()
    if args.child_out:
        with open(os.path.join(args.child_out, "row.json"), "w") as fh:
            json.dump(results[-1] if results else {}, fh, default=str)
        return 0
    print("-" * len(header))
    print("counts are static (an instruction in the while body runs L times); ds-copy/sl-copy: fusions or ops that "
          "materialise a weight-sized dynamic/static slice; dsf d/s: DynamicSliceFusion custom fusions "
          "(dynamic/static address computation); maxrel: max |out - unrolled| / max |unrolled|")
    for r in results:
        if "maxrel" in r and not (r["maxrel"] < 5e-2):
            print(f"WARNING: {r['variant']} differs from unrolled by {r['maxrel']:.2e} (relative)")

    timed = [r for r in results if "ms" in r]
    others = [r for r in timed if r["variant"] != "unrolled"]
    best = min(others, key=lambda r: r["ms"]) if others else None
    if best is not None:
        print(f"fastest non-baseline variant: {best['variant']} {best['ms']:.3f} ms ({best['ratio']:.3f}x unrolled), "
              f"options {best['options']}")
    print(f"total {time.perf_counter() - t_start:.1f} s")

    save(best, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
