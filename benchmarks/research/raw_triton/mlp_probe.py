"""Research probe (not part of the library): the sparse-delta MLP kernels (mlp_pallas.fc1_delta / fc2_delta) in
Triton itself, with the token-side operand by TMA (x tiles for fc1, packed delta tiles for fc2) and the gathered
weight rows by pointer loads (Hopper has no TMA gather). Question for the device: does it beat the Pallas kernels,
which are L2 -> SM bandwidth bound at 128x128 tiles (NOTES_mlp.md), now that bigger tiles with TMA may pay?

    python -P benchmarks/research/raw_triton/mlp_probe.py --interpret   # numerics vs mlp_reference, f32, CPU
    python3 -P benchmarks/research/raw_triton/mlp_probe.py --device     # H100: FLUX double-block shape, 70%
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from chipmunk_jax.pallas_kernels import triton_call as tc


@triton.jit
def _order(pid, NB: tl.constexpr, INNER, GROUP: tl.constexpr):
    group: tl.constexpr = NB if GROUP == 0 else min(GROUP, NB)
    per_group = group * INNER
    first = (pid // per_group) * group
    size = tl.minimum(group, NB - first)
    within = pid % per_group
    return first + within % size, within // size


@triton.jit
def fc1_kernel(ids_ptr, counts_ptr, x_ptr, w1t_ptr, b1_ptr, act_ptr, delta_ptr, act_out_ptr,
               B: tl.constexpr, N: tl.constexpr, C: tl.constexpr, F: tl.constexpr, KP: tl.constexpr,
               NB: tl.constexpr, BF: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    r, j = _order(tl.program_id(0), NB, KP // BF, GROUP)
    b = tl.program_id(1)
    count = tl.load(counts_ptr + b * NB + r)
    if j * BF < count:
        pos = j * BF + tl.arange(0, BF)
        feat_ok = pos < count
        ids = tl.load(ids_ptr + (b * NB + r) * KP + pos)
        gids = tl.where(feat_ok, ids, 0)
        xd = tl.make_tensor_descriptor(x_ptr, shape=[B * N, C], strides=[C, 1], block_shape=[BM, BK])
        acc = tl.zeros([BF, BM], tl.float32)
        w_rows = w1t_ptr + gids.to(tl.int64)[:, None] * C + tl.arange(0, BK)[None, :]
        for k in tl.range(0, C, BK):
            w = tl.load(w_rows + k)
            xs = xd.load([b * N + r * BM, k])
            acc = tl.dot(w, xs.T, acc)
        z = acc + tl.load(b1_ptr + gids).to(tl.float32)[:, None]
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        new = z - z / (tl.math.exp2(2.8853900817779268 * u) + 1.0)  # 0.5 z (1 + tanh u)
        tokens = r * BM + tl.arange(0, BM)
        ok = feat_ok[:, None] & (tokens < N)[None, :]
        act_off = (b * F + gids).to(tl.int64)[:, None] * N + tokens[None, :]
        cached = tl.load(act_ptr + act_off, mask=ok, other=0.0).to(tl.float32)
        d_off = (b * KP + pos).to(tl.int64)[:, None] * (NB * BM) + tokens[None, :]
        tl.store(delta_ptr + d_off, tl.where(ok, new - cached, 0.0).to(delta_ptr.dtype.element_ty))
        tl.store(act_out_ptr + act_off, new.to(act_out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def fc2_kernel(ids_ptr, counts_ptr, delta_ptr, w2_ptr, out_ptr, out_out_ptr,
               B: tl.constexpr, N: tl.constexpr, KP: tl.constexpr, COUT: tl.constexpr, NB: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    r, nt = _order(tl.program_id(0), NB, COUT // BN, GROUP)
    b = tl.program_id(1)
    count = tl.load(counts_ptr + b * NB + r)
    if count > 0:
        dd = tl.make_tensor_descriptor(delta_ptr, shape=[B * KP, NB * BM], strides=[NB * BM, 1],
                                       block_shape=[BK, BM])
        cols = nt * BN + tl.arange(0, BN)
        acc = tl.zeros([BM, BN], tl.float32)
        for kc in tl.range(0, tl.cdiv(count, BK)):
            pos = kc * BK + tl.arange(0, BK)
            ids = tl.where(pos < count, tl.load(ids_ptr + (b * NB + r) * KP + pos), 0)
            d = dd.load([b * KP + kc * BK, r * BM])
            w = tl.load(w2_ptr + ids.to(tl.int64)[:, None] * COUT + cols[None, :])
            acc = tl.dot(d.T, w, acc)
        tokens = r * BM + tl.arange(0, BM)
        off = (b * N + tokens).to(tl.int64)[:, None] * COUT + cols[None, :]
        ok = (tokens < N)[:, None]
        old = tl.load(out_ptr + off, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_out_ptr + off, (old + acc).to(out_out_ptr.dtype.element_ty), mask=ok)


def fc1(x, w1t, b1, act, ids, counts, *, bf, bm, bk, warps, stages, group, interpret=False):
    b, n, c = x.shape
    f = w1t.shape[0]
    nb, kp = ids.shape[1:]
    outs = (jax.ShapeDtypeStruct((b, kp, nb * bm), w1t.dtype), jax.ShapeDtypeStruct(act.shape, act.dtype))
    return tc.triton_call(fc1_kernel, ids, counts, x, w1t, b1, act, out_shapes=outs, grid=(nb * (kp // bf), b, 1),
                          constexprs=dict(B=b, N=n, C=c, F=f, KP=kp, NB=nb, BF=bf, BM=bm, BK=bk, GROUP=group),
                          num_warps=warps, num_stages=stages, input_output_aliases={5: 1}, interpret=interpret)


def fc2(delta_t, w2, out, ids, counts, *, bm, bn, bk, warps, stages, group, interpret=False):
    b, n, cout = out.shape
    nb, kp = ids.shape[1:]
    outs = (jax.ShapeDtypeStruct(out.shape, out.dtype),)
    return tc.triton_call(fc2_kernel, ids, counts, delta_t, w2, out, out_shapes=outs,
                          grid=(nb * (cout // bn), b, 1),
                          constexprs=dict(B=b, N=n, KP=kp, COUT=cout, NB=nb, BM=bm, BN=bn, BK=bk, GROUP=group),
                          num_warps=warps, num_stages=stages, input_output_aliases={4: 0},
                          interpret=interpret)[0]


def _inputs(b, n, c, f, cout, density, dtype, seed=0):
    bm = 128
    nb = -(-n // bm)
    ks = jax.random.split(jax.random.key(seed), 8)
    x = jax.random.normal(ks[0], (b, n, c), jnp.float32).astype(dtype)
    w1t = (jax.random.normal(ks[1], (f, c), jnp.float32) * c**-0.5).astype(dtype)
    b1 = jax.random.normal(ks[2], (f,), jnp.float32).astype(dtype) * 0.1
    w2 = (jax.random.normal(ks[3], (f, cout), jnp.float32) * f**-0.5).astype(dtype)
    act = jax.random.normal(ks[4], (b, f, n), jnp.float32).astype(dtype)
    out = jax.random.normal(ks[5], (b, n, cout), jnp.float32).astype(dtype)
    keep = int(round(density * f / 128)) * 128
    scores = jax.random.uniform(ks[6], (b, nb, f))
    ids = jnp.sort(jax.lax.top_k(scores, keep)[1], axis=-1).astype(jnp.int32)
    counts = jnp.full((b, nb), keep, jnp.int32).at[0, 0].set(keep - 37 if keep > 64 else keep)
    return x, w1t, b1, w2, act, out, ids, counts


def interpret_check():
    from chipmunk_jax.pallas_kernels import mlp_pallas

    x, w1t, b1, w2, act, out, ids, counts = _inputs(1, 300, 64, 512, 64, 0.5, jnp.float32)
    d_ref, act_ref = mlp_pallas.fc1_delta(x, w1t, b1, act, ids, counts, block_size=128, interpret=True)
    out_ref = mlp_pallas.fc2_delta(d_ref, w2, out, ids, counts, block_size=128, interpret=True)
    d, act_new = fc1(x, w1t, b1, act, ids, counts, bf=128, bm=128, bk=32, warps=4, stages=2, group=2, interpret=True)
    out_new = fc2(d, w2, out, ids, counts, bm=128, bn=64, bk=64, warps=4, stages=2, group=2, interpret=True)
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    valid = (jnp.arange(ids.shape[-1])[None, None, :] < counts[..., None])  # compare written chunks only
    vmask = jnp.repeat(valid[:, :, :, None], 128, 3).transpose(0, 2, 1, 3).reshape(d.shape)
    print(f"act rel err {rel(act_new, act_ref):.1e}, delta rel err {rel(d * vmask, d_ref * vmask):.1e}, "
          f"out rel err {rel(out_new, out_ref):.1e}")


def device_run(rounds):
    from chipmunk_jax.pallas_kernels import mlp_pallas

    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
    for (n, c, f, cout) in ((4096, 3072, 12288, 3072), (32760, 5120, 13824, 5120)):
        x, w1t, b1, w2, act, out, ids, counts = _inputs(1, n, c, f, cout, 0.3, jnp.bfloat16)
        d_ref, act_ref = jax.jit(lambda *a: mlp_pallas.fc1_delta(*a, block_size=128))(x, w1t, b1, act, ids, counts)
        out_ref = jax.jit(lambda *a: mlp_pallas.fc2_delta(*a, block_size=128))(d_ref, w2, out, ids, counts)
        fns = {
            "pallas fc1": (jax.jit(lambda *a: mlp_pallas.fc1_delta(*a, block_size=128)), (x, w1t, b1, act, ids, counts)),
            "pallas fc2": (jax.jit(lambda *a: mlp_pallas.fc2_delta(*a, block_size=128)), (d_ref, w2, out, ids, counts)),
            "xla dense mlp": (jax.jit(lambda x, w1t, b1, w2: jnp.dot(jax.nn.gelu(jnp.dot(x, w1t.T) + b1, approximate=True),
                                                                       w2)), (x, w1t[:, :c], b1, w2[:, :cout])),
        }
        for bf, bk, warps, stages in ((128, 64, 4, 3), (128, 64, 8, 4), (256, 64, 8, 3), (256, 64, 8, 4),
                                      (128, 128, 8, 3)):
            name = f"triton fc1 bf{bf} bk{bk} w{warps} s{stages}"
            try:
                f1 = jax.jit(lambda *a, bf=bf, bk=bk, warps=warps, stages=stages: fc1(
                    *a, bf=bf, bm=128, bk=bk, warps=warps, stages=stages, group=32))
                d, a_new = f1(x, w1t, b1, act, ids, counts)
                err = float(jnp.linalg.norm((a_new - act_ref).astype(jnp.float32)) /
                            jnp.linalg.norm(act_ref.astype(jnp.float32)))
                print(f"n={n} {name}: act rel err vs Pallas {err:.1e}", flush=True)
                fns[name] = (f1, (x, w1t, b1, act, ids, counts))
            except Exception as e:  # noqa: BLE001 -- a probe: report and go on
                print(f"n={n} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        for bn, bk, warps, stages in ((128, 64, 4, 3), (256, 64, 8, 3), (256, 64, 8, 4), (256, 128, 8, 3),
                                      (128, 128, 8, 4)):
            name = f"triton fc2 bn{bn} bk{bk} w{warps} s{stages}"
            try:
                f2 = jax.jit(lambda *a, bn=bn, bk=bk, warps=warps, stages=stages: fc2(
                    *a, bm=128, bn=bn, bk=bk, warps=warps, stages=stages, group=32))
                o = f2(d_ref, w2, out, ids, counts)
                err = float(jnp.linalg.norm((o - out_ref).astype(jnp.float32)) /
                            jnp.linalg.norm(out_ref.astype(jnp.float32)))
                print(f"n={n} {name}: out rel err vs Pallas {err:.1e}", flush=True)
                fns[name] = (f2, (d_ref, w2, out, ids, counts))
            except Exception as e:  # noqa: BLE001
                print(f"n={n} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        blocks = {name: [] for name in fns}
        for _ in range(rounds):
            for name, (fn, a) in fns.items():
                jax.block_until_ready(fn(*a))
                xs = []
                for _ in range(30):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(*a))
                    xs.append((time.perf_counter() - t0) * 1e3)
                blocks[name].append(statistics.median(xs))
        print(f"| shape | op | ms (median of {rounds} rounds, 30 calls each) |\n|---|---|---|")
        for name, xs in blocks.items():
            print(f"| n={n} c={c} f={f} 30% | {name} | {statistics.median(xs):.4f} ({min(xs):.4f}-{max(xs):.4f}) |",
                  flush=True)


def main():
    ap_ = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap_.add_mutually_exclusive_group(required=True)
    mode.add_argument("--interpret", action="store_true")
    mode.add_argument("--device", action="store_true")
    ap_.add_argument("--rounds", type=int, default=5)
    args = ap_.parse_args()
    interpret_check() if args.interpret else device_run(args.rounds)


if __name__ == "__main__":
    main()
