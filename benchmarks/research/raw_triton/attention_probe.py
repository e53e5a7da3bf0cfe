"""Research probe (not part of the library): a warp-specialised Triton attention forward on our [B, N, H, D]
layout, with the fixed-offset column sums of dense_attention_colsum, launched from JAX through
launch_check.triton_call. Question for the device: how close to cuDNN do Triton 3.6's automatic Hopper warp
specialisation and TMA get us, with and without the column sums (issue 3's 1.4x line)?

    CPU numerics (Triton interpreter, torch CPU tensors; needs triton >= 3.7 for the interpreter):
        python -P benchmarks/research/raw_triton/attention_probe.py --interpret
    sm_90 compile check on CPU (does warp specialisation apply?):
        python -P benchmarks/research/raw_triton/attention_probe.py --compile
    On the device machine (times against cuDNN and our Pallas kernels in alternating ~1 s blocks):
        python3 -P benchmarks/research/raw_triton/attention_probe.py --device

Restrictions of the probe: N a multiple of 384 (whole 64- and 128-row blocks and 192-query groups; the issue
sizes 32,760 / 118,800 become 32,640 / 118,656), no fallback when |lse - prev_lse| is large.
Column sums: Triton's Hopper WS only accepts a reduction over the query rows with 64-row blocks and plain stores
(NOTES.md section 3), so each 64-row block stores its partial sums [B*H, N/64, N] and XLA adds the three blocks of
each 192-query group.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def kernel_source():
    import triton
    import triton.language as tl

    @triton.jit
    def attn_fwd(q_ptr, k_ptr, v_ptr, plse_ptr, o_ptr, lse_ptr, cs_ptr,
                 B: tl.constexpr, N: tl.constexpr, H: tl.constexpr, D: tl.constexpr, SCALE2: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, WS: tl.constexpr, FIXED: tl.constexpr, COLSUM: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        # [B, N, H, D] seen as a [B*N, H*D] matrix: a head's rows are a [rows, D] box at column h*D.
        qd = tl.make_tensor_descriptor(q_ptr, shape=[B * N, H * D], strides=[H * D, 1], block_shape=[BM, D])
        kd = tl.make_tensor_descriptor(k_ptr, shape=[B * N, H * D], strides=[H * D, 1], block_shape=[BN, D])
        vd = tl.make_tensor_descriptor(v_ptr, shape=[B * N, H * D], strides=[H * D, 1], block_shape=[BN, D])
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = tl.arange(0, BN)
        q = qd.load([b * N + pid_m * BM, h * D])
        if FIXED:
            offset = tl.load(plse_ptr + bh * N + offs_m) * 1.4426950408889634  # previous LSE, log2 units
        m_i = tl.zeros([BM], tl.float32) - float("inf")
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        for start in tl.range(0, N, BN, warp_specialize=WS):
            k = kd.load([b * N + start, h * D])
            v = vd.load([b * N + start, h * D])
            qk = tl.dot(q, k.T)
            if FIXED:
                p = tl.math.exp2(qk * SCALE2 - offset[:, None])
                l_i += tl.sum(p, 1)
                if COLSUM:
                    tl.store(cs_ptr + (bh * (N // BM) + pid_m) * N + start + offs_n, tl.sum(p, 0))
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * SCALE2)
                p = tl.math.exp2(qk * SCALE2 - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None]
                m_i = m_new
            acc = tl.dot(p.to(v.dtype), v, acc)
        base = offset if FIXED else m_i
        tl.store(lse_ptr + bh * N + offs_m, (base + tl.math.log2(l_i)) * 0.6931471805599453)
        rd = tl.arange(0, D)
        o = acc / l_i[:, None]
        tl.store(o_ptr + ((b * N + offs_m) * (H * D) + h * D)[:, None] + rd[None, :], o.to(o_ptr.dtype.element_ty))

    return attn_fwd


VARIANTS = {  # name: (BM, BN, WS, FIXED, COLSUM, num_warps, num_stages)
    "online bm128 bn128 ws": (128, 128, True, False, False, 4, 2),
    "online bm128 bn128": (128, 128, False, False, False, 8, 3),
    "fixed bm64 bn128 ws": (64, 128, True, True, False, 4, 2),
    "fixed+colsum bm64 bn128 ws": (64, 128, True, True, True, 4, 2),
    "fixed+colsum bm64 bn64 ws": (64, 64, True, True, True, 4, 3),
    "fixed+colsum bm64 bn128": (64, 128, False, True, True, 4, 3),
}


def _signature():
    sig = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
    sig.update(plse_ptr="*fp32", lse_ptr="*fp32", cs_ptr="*fp32")
    order = ("q_ptr", "k_ptr", "v_ptr", "plse_ptr", "o_ptr", "lse_ptr", "cs_ptr")
    sig = {k: sig[k] for k in order}
    sig.update({k: "constexpr" for k in ("B", "N", "H", "D", "SCALE2", "BM", "BN", "WS", "FIXED", "COLSUM")})
    return sig


def _constexprs(b, n, h, d, variant):
    bm, bn, ws, fixed, colsum, _, _ = VARIANTS[variant]
    return dict(B=b, N=n, H=h, D=d, SCALE2=d**-0.5 * LOG2E, BM=bm, BN=bn, WS=ws, FIXED=fixed, COLSUM=colsum)


def compile_check():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel_source()
    b, n, h, d = 1, 32_640, 24, 128
    for variant, (bm, bn, ws, fixed, colsum, warps, stages) in VARIANTS.items():
        try:
            ck = triton.compile(ASTSource(fn, _signature(), _constexprs(b, n, h, d, variant),
                                          attrs={(i,): [["tt.divisibility", 16]] for i in range(7)}),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
            md = ck.metadata
            print(f"{variant:28s} ok: total warps {md.num_warps}, shared {md.shared} B, scratch {md.global_scratch_size},"
                  f" warp_specialize {'ttg.warp_specialize' in ck.asm['ttgir']}, setmaxnreg {'setmaxnreg' in ck.asm['ptx']}")
        except Exception as e:  # noqa: BLE001 -- a probe: report every variant
            print(f"{variant:28s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def interpret_check():
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    fn = kernel_source()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    b, n, h, d = 2, 384, 2, 64
    g = torch.Generator().manual_seed(0)
    # float32: the interpreter (triton 3.7.1) reads bf16 through tensor descriptors wrongly (values ~1e9)
    q, k, v = (torch.randn(b, n, h, d, generator=g) for _ in range(3))
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * d**-0.5
    lse_ref = torch.logsumexp(s, -1)
    o_ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.float())
    prev = lse_ref + 0.1 * torch.randn(lse_ref.shape, generator=g)
    cs_ref = torch.exp(s - prev[..., None]).reshape(b, h, n // 192, 192, n).sum(3)
    for variant, (bm, bn, ws, fixed, colsum, warps, stages) in VARIANTS.items():
        o = torch.empty_like(q)
        lse = torch.empty(b, h, n)
        cs = torch.full((b * h, n // bm, n), float("nan")) if colsum else torch.empty(1)
        fn[(n // bm, b * h)](q, k, v, prev.contiguous(), o, lse, cs, **_constexprs(b, n, h, d, variant))
        rel = ((o.float() - o_ref).norm() / o_ref.norm()).item()
        lse_want = prev + torch.log(torch.exp(s - prev[..., None]).sum(-1)) if fixed else lse_ref
        line = f"{variant:28s} o rel err {rel:.1e}, lse max abs err {(lse - lse_want).abs().max().item():.1e}"
        if colsum:
            got = cs.reshape(b, h, n // 192, 192 // bm, n).sum(3)
            line += f", colsum rel err {((got - cs_ref).norm() / cs_ref.norm()).item():.1e}"
        print(line)
        assert rel < 1e-5, variant


def device_run(sizes, rounds):
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from launch_check import triton_call

    from chipmunk_jax.pallas_kernels import attention_pallas as ap

    fn = kernel_source()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
    for n in sizes:
        b, h, d = 1, 24, 128
        keys = jax.random.split(jax.random.key(n), 4)
        q, k, v = (jax.random.normal(kk, (b, n, h, d), jnp.bfloat16) for kk in keys[:3])
        o_ref, lse_ref = jax.jit(lambda q, k, v: ap.dense_attention(q, k, v, scale=d**-0.5))(q, k, v)
        prev = lse_ref + 0.1 * jax.random.normal(keys[3], lse_ref.shape, jnp.float32)

        def probe(variant):
            bm, bn, ws, fixed, colsum, warps, stages = VARIANTS[variant]
            outs = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, n), jnp.float32),
                    jax.ShapeDtypeStruct((b * h, n // bm, n) if colsum else (1,), jnp.float32))

            def f(q, k, v, prev):
                o, lse, cs = triton_call(fn, _signature(), _constexprs(b, n, h, d, variant), 7, [],
                                         (n // bm, b * h, 1), outs, q, k, v, prev, num_warps=warps,
                                         num_stages=stages)
                if colsum:  # three 64-row blocks per 192-query group
                    cs = cs.reshape(b, h, n // 192, 192 // bm, n).sum(3)
                return o, lse, cs
            return jax.jit(f)

        fns = {"cudnn": jax.jit(lambda q, k, v, p: jax.nn.dot_product_attention(q, k, v, scale=d**-0.5,
                                                                                implementation="cudnn")),
               "pallas dense+lse": jax.jit(lambda q, k, v, p: ap.dense_attention(q, k, v, scale=d**-0.5)),
               "pallas dense+lse+colsum": jax.jit(lambda q, k, v, p: ap.dense_attention_colsum(
                   q, k, v, p, group_size=192, scale=d**-0.5))}
        cs_ref = fns["pallas dense+lse+colsum"](q, k, v, prev)[2]
        for variant in VARIANTS:
            try:
                f = probe(variant)
                o, lse, cs = f(q, k, v, prev)
                rel = float(jnp.linalg.norm((o.astype(jnp.float32) - o_ref.astype(jnp.float32)))
                            / jnp.linalg.norm(o_ref.astype(jnp.float32)))
                line = f"N={n} {variant}: o rel err vs Pallas {rel:.1e}"
                if VARIANTS[variant][4]:
                    line += f", colsum rel err {float(jnp.linalg.norm(cs - cs_ref) / jnp.linalg.norm(cs_ref)):.1e}"
                print(line, flush=True)
                fns[f"triton {variant}"] = f
            except Exception as e:  # noqa: BLE001 -- a probe: report and go on
                print(f"N={n} {variant}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        blocks, calls = {name: [] for name in fns}, {}
        for name, f in fns.items():
            jax.block_until_ready(f(q, k, v, prev))
            t0 = time.perf_counter()
            jax.block_until_ready(f(q, k, v, prev))
            calls[name] = max(3, int(1.0 / (time.perf_counter() - t0)) + 1)
        for _ in range(rounds):
            for name, f in fns.items():
                xs = []
                for _ in range(calls[name]):
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(q, k, v, prev))
                    xs.append((time.perf_counter() - t0) * 1e3)
                blocks[name].append(statistics.median(xs))
        print(f"| N | op | ms (median of {rounds} rounds) | op time / cuDNN time (median, min-max over rounds) |")
        print("|---|---|---|---|")
        for name, xs in blocks.items():
            r = [x / c for x, c in zip(xs, blocks["cudnn"])]
            print(f"| {n} | {name} | {statistics.median(xs):.3f} | {statistics.median(r):.3f} "
                  f"({min(r):.3f}-{max(r):.3f}) |", flush=True)


def main():
    ap_ = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap_.add_mutually_exclusive_group(required=True)
    mode.add_argument("--interpret", action="store_true")
    mode.add_argument("--compile", action="store_true")
    mode.add_argument("--device", action="store_true")
    ap_.add_argument("--sizes", default="32640,118656")
    ap_.add_argument("--rounds", type=int, default=5)
    args = ap_.parse_args()
    if args.interpret:
        interpret_check()
    elif args.compile:
        compile_check()
    else:
        sizes = [int(s) for s in args.sizes.split(",")]
        if any(s % 384 for s in sizes):
            ap_.error("the probe needs N a multiple of 384")
        device_run(sizes, args.rounds)


if __name__ == "__main__":
    main()
