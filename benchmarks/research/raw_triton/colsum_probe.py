"""Research probe (not part of the library), second round after attention_probe.py's device run: 64-row query
blocks cost 2x whatever else the kernel does (fixed bm64 WS: 1.95x cuDNN without any column sum), while the
128-row online kernel runs at 1.08x (WS) / 1.11x (8 warps, software pipelined). Here the column sums are taken
from 128-row blocks: each warpgroup of the 8-warp kernel owns one 64-row half, so sum over a half is a
reduction inside a warpgroup, and a 64-row half lies inside one 192-query group. Variants:
  halves-store: per-64-row partial sums [B*H, N/64, N] (plain stores), XLA adds the three of each group;
  halves-atomic: fp32 atomic add of each half into colsum [B*H, G, N] (zeroed by the launcher);
  group3: one 192-query group per program as three 64-row sub-tiles sharing each K/V block;
  wp: the half sums from one MMA W @ P (W [64, BM] indicator rows, P through shared memory);
  ptw: from P^T @ W^T (the [BM, 16] indicator as the small B operand).
Device run 1 (H100): fixed bm128 8w 1.03-1.07x cuDNN, halves-store 1.70-1.74x, group3 3.0-7.9x (all variants).
Device run 2: wp bn128 1.72-1.82x, ptw bn128 1.60-1.67x, wp bn64 s3 1.57-1.61x, ptw bn64 s3 1.48-1.50x.
The fixed-offset 128-row kernel does not compile with warp_specialize=True (NVGPUWarpSpecialization pass failure,
triton 3.7.1 for sm_90, with or without column sums), so only group3 has a WS variant.

    python -P benchmarks/research/raw_triton/colsum_probe.py --compile      # sm_90 compile on CPU
    python -P benchmarks/research/raw_triton/colsum_probe.py --interpret    # numerics, Triton interpreter, f32
    python3 -P benchmarks/research/raw_triton/colsum_probe.py --device      # H100: times vs cuDNN / Pallas
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import zlib

LOG2E = 1.4426950408889634


def kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def block_fwd(q_ptr, k_ptr, v_ptr, plse_ptr, o_ptr, lse_ptr, cs_ptr,
                  B: tl.constexpr, N: tl.constexpr, H: tl.constexpr, D: tl.constexpr, SCALE2: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, WS: tl.constexpr, FIXED: tl.constexpr, CS: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        qd = tl.make_tensor_descriptor(q_ptr, shape=[B * N, H * D], strides=[H * D, 1], block_shape=[BM, D])
        kd = tl.make_tensor_descriptor(k_ptr, shape=[B * N, H * D], strides=[H * D, 1], block_shape=[BN, D])
        vd = tl.make_tensor_descriptor(v_ptr, shape=[B * N, H * D], strides=[H * D, 1], block_shape=[BN, D])
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = tl.arange(0, BN)
        HALVES: tl.constexpr = BM // 64
        half = tl.arange(0, HALVES)
        q = qd.load([b * N + pid_m * BM, h * D])
        if FIXED:
            offset = tl.load(plse_ptr + bh * N + offs_m) * 1.4426950408889634
        m_i = tl.zeros([BM], tl.float32) - float("inf")
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        if CS == 1:
            cs_rows = (bh * (N // 64) + pid_m * HALVES + half).to(tl.int64) * N
        if CS == 2:
            cs_rows = (bh * (N // 192) + (pid_m * BM + 64 * half) // 192).to(tl.int64) * N
        if CS == 4:
            j = tl.arange(0, 64)
            w_half = tl.where(j[:, None] == tl.arange(0, BM)[None, :] // 64, 1.0, 0.0).to(q_ptr.dtype.element_ty)
            w_rows = (bh * (N // 64) + pid_m * HALVES + tl.minimum(j, HALVES - 1)).to(tl.int64) * N
        if CS == 5 or CS == 6:
            j = tl.arange(0, 16)
            wt_half = tl.where(tl.arange(0, BM)[:, None] // 64 == j[None, :], 1.0, 0.0).to(q_ptr.dtype.element_ty)
            if CS == 5:
                wt_cols = (bh * (N // 64) + pid_m * HALVES + tl.minimum(j, HALVES - 1)).to(tl.int64) * N
            else:
                wt_cols = (bh * (N // 192) + (pid_m * BM + 64 * tl.minimum(j, HALVES - 1)) // 192).to(tl.int64) * N
        for start in tl.range(0, N, BN, warp_specialize=WS):
            k = kd.load([b * N + start, h * D])
            v = vd.load([b * N + start, h * D])
            qk = tl.dot(q, k.T)
            if FIXED:
                p = tl.math.exp2(qk * SCALE2 - offset[:, None])
                l_i += tl.sum(p, 1)
                if CS == 1 or CS == 2:
                    part = tl.sum(tl.reshape(p, [HALVES, 64, BN]), 1)
                    ptrs = cs_ptr + cs_rows[:, None] + start + offs_n[None, :]
                    if CS == 1:
                        tl.store(ptrs, part)
                    else:
                        tl.atomic_add(ptrs, part, sem="relaxed")
                if CS == 4:  # W @ P: W [64, BM] holds the half indicators in its first rows, P goes to smem
                    part = tl.dot(w_half, p.to(v.dtype))
                    tl.store(cs_ptr + w_rows[:, None] + start + offs_n[None, :], part,
                             mask=(tl.arange(0, 64) < HALVES)[:, None])
                if CS == 5 or CS == 6:  # P^T @ W^T: P^T (smem) times the [BM, 16] half indicator
                    part = tl.dot(tl.trans(p.to(v.dtype)), wt_half)
                    ptrs = cs_ptr + wt_cols[None, :] + start + offs_n[:, None]
                    if CS == 5:
                        tl.store(ptrs, part, mask=(tl.arange(0, 16) < HALVES)[None, :])
                    else:
                        tl.atomic_add(ptrs, part, mask=(tl.arange(0, 16) < HALVES)[None, :], sem="relaxed")
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
        tl.store(o_ptr + ((b * N + offs_m) * (H * D) + h * D)[:, None] + rd[None, :],
                 (acc / l_i[:, None]).to(o_ptr.dtype.element_ty))

    @triton.jit
    def _sub(q, k, v, off, acc, l, SCALE2: tl.constexpr):
        p = tl.math.exp2(tl.dot(q, k.T) * SCALE2 - off[:, None])
        return p, tl.dot(p.to(v.dtype), v, acc), l + tl.sum(p, 1)

    @triton.jit
    def _finish(o_ptr, lse_ptr, b, h, bh, rows, a, l, off, N: tl.constexpr, H: tl.constexpr, D: tl.constexpr):
        rd = tl.arange(0, D)
        tl.store(lse_ptr + bh * N + rows, (off + tl.math.log2(l)) * 0.6931471805599453)
        tl.store(o_ptr + ((b * N + rows) * (H * D) + h * D)[:, None] + rd[None, :],
                 (a / l[:, None]).to(o_ptr.dtype.element_ty))

    globals().update(_sub=_sub, _finish=_finish)  # the interpreter resolves callees as module globals

    @triton.jit
    def group3_fwd(q_ptr, k_ptr, v_ptr, plse_ptr, o_ptr, lse_ptr, cs_ptr,
                   B: tl.constexpr, N: tl.constexpr, H: tl.constexpr, D: tl.constexpr, SCALE2: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, WS: tl.constexpr, FIXED: tl.constexpr, CS: tl.constexpr):
        g = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        qd = tl.make_tensor_descriptor(q_ptr, shape=[B * N, H * D], strides=[H * D, 1], block_shape=[64, D])
        kd = tl.make_tensor_descriptor(k_ptr, shape=[B * N, H * D], strides=[H * D, 1], block_shape=[BN, D])
        vd = tl.make_tensor_descriptor(v_ptr, shape=[B * N, H * D], strides=[H * D, 1], block_shape=[BN, D])
        r = tl.arange(0, 64)
        row0 = b * N + g * 192
        q0 = qd.load([row0, h * D])
        q1 = qd.load([row0 + 64, h * D])
        q2 = qd.load([row0 + 128, h * D])
        o0 = tl.load(plse_ptr + bh * N + g * 192 + r) * 1.4426950408889634
        o1 = tl.load(plse_ptr + bh * N + g * 192 + 64 + r) * 1.4426950408889634
        o2 = tl.load(plse_ptr + bh * N + g * 192 + 128 + r) * 1.4426950408889634
        a0 = tl.zeros([64, D], tl.float32)
        a1 = tl.zeros([64, D], tl.float32)
        a2 = tl.zeros([64, D], tl.float32)
        l0 = tl.zeros([64], tl.float32)
        l1 = tl.zeros([64], tl.float32)
        l2 = tl.zeros([64], tl.float32)
        cs_row = (bh * (N // 192) + g).to(tl.int64) * N
        offs_n = tl.arange(0, BN)
        for start in tl.range(0, N, BN, warp_specialize=WS):
            k = kd.load([b * N + start, h * D])
            v = vd.load([b * N + start, h * D])
            p0, a0, l0 = _sub(q0, k, v, o0, a0, l0, SCALE2)
            p1, a1, l1 = _sub(q1, k, v, o1, a1, l1, SCALE2)
            p2, a2, l2 = _sub(q2, k, v, o2, a2, l2, SCALE2)
            tl.store(cs_ptr + cs_row + start + offs_n, tl.sum(p0, 0) + tl.sum(p1, 0) + tl.sum(p2, 0))
        _finish(o_ptr, lse_ptr, b, h, bh, g * 192 + r, a0, l0, o0, N, H, D)
        _finish(o_ptr, lse_ptr, b, h, bh, g * 192 + 64 + r, a1, l1, o1, N, H, D)
        _finish(o_ptr, lse_ptr, b, h, bh, g * 192 + 128 + r, a2, l2, o2, N, H, D)

    return {"block": block_fwd, "group3": group3_fwd}


# name: (kernel, BM, BN, WS, FIXED, CS, num_warps, num_stages); CS 0 none, 1 halves-store, 2 halves-atomic, 3 group
VARIANTS = {
    "online bm128 8w": ("block", 128, 128, False, False, 0, 8, 3),
    "fixed bm128 8w": ("block", 128, 128, False, True, 0, 8, 3),
    "fixed bm128 bn64 8w s3": ("block", 128, 64, False, True, 0, 8, 3),
    "ptw bm128 bn64 8w s3": ("block", 128, 64, False, True, 5, 8, 3),
    "ptw bm128 bn64 8w s2": ("block", 128, 64, False, True, 5, 8, 2),
    "ptw bm128 bn64 8w s4": ("block", 128, 64, False, True, 5, 8, 4),
    "ptw bm128 bn32 8w s4": ("block", 128, 32, False, True, 5, 8, 4),
    "ptw bm128 bn64 4w s2": ("block", 128, 64, False, True, 5, 4, 2),
    "ptw bm128 bn32 4w s3": ("block", 128, 32, False, True, 5, 4, 3),
    "ptw-atomic bm128 bn64 8w s3": ("block", 128, 64, False, True, 6, 8, 3),
}

NAMES = ("q_ptr", "k_ptr", "v_ptr", "plse_ptr", "o_ptr", "lse_ptr", "cs_ptr")


def _signature():
    sig = {name: ("*fp32" if name in ("plse_ptr", "lse_ptr", "cs_ptr") else "*bf16") for name in NAMES}
    sig.update({k: "constexpr" for k in ("B", "N", "H", "D", "SCALE2", "BM", "BN", "WS", "FIXED", "CS")})
    return sig


def _constexprs(b, n, h, d, variant, scale):
    _, bm, bn, ws, fixed, cs, _, _ = VARIANTS[variant]
    return dict(B=b, N=n, H=h, D=d, SCALE2=scale * LOG2E, BM=bm, BN=bn, WS=ws, FIXED=fixed, CS=cs)


def _grid(n, b, h, variant):
    kind, bm = VARIANTS[variant][:2]
    return (n // 192 if kind == "group3" else n // bm, b * h, 1)


def _cs_shape(n, b, h, variant):
    cs = VARIANTS[variant][5]
    return {0: (1,), 1: (b * h, n // 64, n), 4: (b * h, n // 64, n), 5: (b * h, n // 64, n), 6: (b * h, n // 192, n), 2: (b * h, n // 192, n), 3: (b * h, n // 192, n)}[cs]


def _compile(variant, b, n, h, d, scale):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kind, _, _, _, _, _, warps, stages = VARIANTS[variant]
    src = ASTSource(kernels()[kind], _signature(), _constexprs(b, n, h, d, variant, scale),
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(len(NAMES))})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def compile_check():
    b, n, h, d = 1, 32_640, 24, 128
    for variant in VARIANTS:
        try:
            ck = _compile(variant, b, n, h, d, 0.125)
            md = ck.metadata
            ptx = ck.asm["ptx"]
            print(f"{variant:26s} ok: warps {md.num_warps}, shared {md.shared} B, WS {'ttg.warp_specialize' in ck.asm['ttgir']}"
                  f", spills {'local' in ptx and 'st.local' in ptx}, wgmma {ptx.count('wgmma.mma_async')}", flush=True)
        except Exception as e:  # noqa: BLE001 -- a probe: report every variant
            print(f"{variant:26s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)


def interpret_check():
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    ks = kernels()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    b, n, h, d = 2, 384, 2, 64
    scale = 0.125
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, generator=g) for _ in range(3))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    lse_ref = torch.logsumexp(s, -1)
    o_ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)
    prev = lse_ref + 0.1 * torch.randn(lse_ref.shape, generator=g)
    cs_ref = torch.exp(s - prev[..., None]).reshape(b, h, n // 192, 192, n).sum(3)
    for variant, (kind, bm, bn, ws, fixed, cs_mode, warps, stages) in VARIANTS.items():
        o, lse = torch.empty_like(q), torch.empty(b, h, n)
        cs = torch.zeros(_cs_shape(n, b, h, variant))
        ks[kind][_grid(n, b, h, variant)[:2]](q, k, v, prev.contiguous(), o, lse, cs,
                                               **_constexprs(b, n, h, d, variant, scale))
        rel = ((o - o_ref).norm() / o_ref.norm()).item()
        lse_want = prev + torch.log(torch.exp(s - prev[..., None]).sum(-1)) if fixed else lse_ref
        line = f"{variant:26s} o rel err {rel:.1e}, lse max abs err {(lse - lse_want).abs().max().item():.1e}"
        if cs_mode:
            got = cs.reshape(b, h, n // 192, 3, n).sum(3) if cs_mode in (1, 4, 5) else cs.reshape(b, h, n // 192, n)
            line += f", colsum rel err {((got - cs_ref).norm() / cs_ref.norm()).item():.1e}"
        print(line, flush=True)


def device_run(sizes, rounds):
    import jax
    import jax.numpy as jnp
    from jax._src.lib import gpu_triton

    from chipmunk_jax.pallas_kernels import attention_pallas as ap

    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
    for n in sizes:
        b, h, d = 1, 24, 128
        scale = d**-0.5
        keys = jax.random.split(jax.random.key(n), 4)
        q, k, v = (jax.random.normal(kk, (b, n, h, d), jnp.bfloat16) for kk in keys[:3])
        o_ref, lse_ref = jax.jit(lambda q, k, v: ap.dense_attention(q, k, v, scale=scale))(q, k, v)
        prev = lse_ref + 0.1 * jax.random.normal(keys[3], lse_ref.shape, jnp.float32)

        def probe(variant):
            ck = _compile(variant, b, n, h, d, scale)
            md = ck.metadata
            scratch = md.global_scratch_size or None
            kernel = gpu_triton.TritonKernel(md.name, md.num_warps, md.num_ctas, md.shared, ck.asm["ptx"],
                                             ck.asm["ttir"], 90, scratch, md.global_scratch_align if scratch else None)
            cs_shape = _cs_shape(n, b, h, variant)
            cs_bytes = 4 * int(__import__("math").prod(cs_shape)) if VARIANTS[variant][5] in (2, 6) else 0
            params = [gpu_triton.create_array_parameter(0, 16)] * 6 + [gpu_triton.create_array_parameter(cs_bytes, 16)]
            opaque = zlib.compress(gpu_triton.TritonKernelCall(kernel, *_grid(n, b, h, variant), params)
                                   .to_proto(md.name, b""))
            outs = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, n), jnp.float32),
                    jax.ShapeDtypeStruct(cs_shape, jnp.float32))
            print(f"  {variant}: warps {md.num_warps}, shared {md.shared} B, WS {'ttg.warp_specialize' in ck.asm['ttgir']}",
                  flush=True)

            def f(q, k, v, prev):
                o, lse, cs = jax.ffi.ffi_call("triton_kernel_call_ffi", outs)(q, k, v, prev, opaque=opaque)
                if VARIANTS[variant][5] in (1, 4, 5):
                    cs = cs.reshape(b, h, n // 192, 3, n).sum(3)
                return o, lse, cs.reshape(b, h, -1, n) if VARIANTS[variant][5] else cs
            return jax.jit(f)

        fns = {"cudnn": jax.jit(lambda q, k, v, p: jax.nn.dot_product_attention(q, k, v, scale=scale,
                                                                                implementation="cudnn")),
               "pallas dense+lse": jax.jit(lambda q, k, v, p: ap.dense_attention(q, k, v, scale=scale)),
               "pallas dense+lse+colsum": jax.jit(lambda q, k, v, p: ap.dense_attention_colsum(
                   q, k, v, p, group_size=192, scale=scale))}
        cs_ref = fns["pallas dense+lse+colsum"](q, k, v, prev)[2]
        for variant in VARIANTS:
            try:
                f = probe(variant)
                o, lse, cs = f(q, k, v, prev)
                rel = float(jnp.linalg.norm(o.astype(jnp.float32) - o_ref.astype(jnp.float32))
                            / jnp.linalg.norm(o_ref.astype(jnp.float32)))
                line = f"N={n} {variant}: o rel err vs Pallas {rel:.1e}"
                if VARIANTS[variant][5]:
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
            calls[name] = max(3, int(0.7 / (time.perf_counter() - t0)) + 1)
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
    ap_.add_argument("--rounds", type=int, default=4)
    ap_.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = ap_.parse_args()
    if args.only:
        keep = set(args.only.split(","))
        for name in list(VARIANTS):
            if name not in keep:
                del VARIANTS[name]
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
