"""Research probe (not part of the library): can a kernel compiled by the `triton` package (not Pallas) run
inside a jitted JAX function through jaxlib's Triton custom call, and does a Hopper warp-specialised kernel
(12 warps, in-kernel TMA descriptors) launch that way? See NOTES.md beside this file.

On the device machine:  python3 -P benchmarks/research/raw_triton/launch_check.py
"""

import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl
from jax._src.lib import gpu_triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def add_kernel(x_ptr, y_ptr, o_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(o_ptr + i, tl.load(x_ptr + i, mask=i < n) + tl.load(y_ptr + i, mask=i < n), mask=i < n)


@triton.jit
def mm_desc_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   WS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
    acc = tl.zeros((BM, BN), tl.float32)
    for k in tl.range(0, K, BK, warp_specialize=WS):
        acc = tl.dot(a_desc.load([pid_m * BM, k]), b_desc.load([k, pid_n * BN]), acc)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16))


def _ptr_attrs(n_ptrs):
    return {(i,): [["tt.divisibility", 16]] for i in range(n_ptrs)}


def triton_call(fn, signature, constexprs, n_ptrs, scalars, grid, out_shape, *arrays, num_warps=4, num_stages=3):
    ck = triton.compile(ASTSource(fn, signature, constexprs, attrs=_ptr_attrs(n_ptrs)),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    md = ck.metadata
    scratch = md.global_scratch_size or None
    kernel = gpu_triton.TritonKernel(md.name, md.num_warps, md.num_ctas, md.shared, ck.asm["ptx"], ck.asm["ttir"], 90,
                                     scratch, md.global_scratch_align if scratch else None)
    params = [gpu_triton.create_array_parameter(0, 16)] * n_ptrs + [
        gpu_triton.create_scalar_parameter(v, "i32") for v in scalars]
    call = gpu_triton.TritonKernelCall(kernel, *grid, params)
    opaque = zlib.compress(call.to_proto(md.name, b""))
    print(f"  compiled {md.name}: num_warps {md.num_warps}, shared {md.shared} B, scratch {scratch}, "
          f"setmaxnreg {'setmaxnreg' in ck.asm['ptx']}", flush=True)
    return jax.ffi.ffi_call("triton_kernel_call_ffi", out_shape)(*arrays, opaque=opaque)


def median_ms(f, *args, reps=20):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))


def main():
    print(f"jax {jax.__version__}, triton {triton.__version__}, {jax.devices()[0].device_kind}", flush=True)
    x = jax.random.normal(jax.random.key(0), (100_003,), jnp.float32)
    y = jax.random.normal(jax.random.key(1), (100_003,), jnp.float32)
    n = x.size
    add = jax.jit(lambda x, y: triton_call(
        add_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "o_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
        {"BLOCK": 1024}, 3, [n], (triton.cdiv(n, 1024), 1, 1), jax.ShapeDtypeStruct(x.shape, x.dtype), x, y))
    err = float(jnp.max(jnp.abs(add(x, y) - (x + y))))
    print(f"add: max abs err {err:.2e}", flush=True)

    m = n_ = k = 8192
    a = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(3), (k, n_), jnp.bfloat16)
    ref = jnp.dot(a, b, preferred_element_type=jnp.float32)
    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "WS": "constexpr"}
    xla_ms = median_ms(jax.jit(lambda a, b: jnp.dot(a, b)), a, b)
    print(f"XLA bf16 GEMM 8192^3: {xla_ms:.3f} ms ({2 * m * n_ * k / xla_ms / 1e9:.0f} TFLOP/s)", flush=True)
    for ws in (False, True):
        try:
            mm = jax.jit(lambda a, b, ws=ws: triton_call(
                mm_desc_kernel, sig, {"BM": 128, "BN": 128, "BK": 64, "WS": ws}, 3, [m, n_, k],
                (m // 128, n_ // 128, 1), jax.ShapeDtypeStruct((m, n_), jnp.bfloat16), a, b))
            out = mm(a, b)
            rel = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
            ms = median_ms(mm, a, b)
            print(f"triton TMA GEMM warp_specialize={ws}: rel err {rel:.2e}, {ms:.3f} ms "
                  f"({2 * m * n_ * k / ms / 1e9:.0f} TFLOP/s)", flush=True)
        except Exception as e:  # noqa: BLE001 -- a probe: report and go on
            print(f"triton TMA GEMM warp_specialize={ws}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
    main()
