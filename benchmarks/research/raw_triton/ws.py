import os, sys, re
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
print("triton", triton.__version__, triton.__file__)

@triton.jit
def mm_ptr(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
    pid_m = tl.program_id(0); pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM); rn = pid_n * BN + tl.arange(0, BN); rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in tl.range(0, K, BK, warp_specialize=WS):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16))

@triton.jit
def mm_gather(a_ptr, idx_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
    pid_m = tl.program_id(0); pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM); rn = pid_n * BN + tl.arange(0, BN); rk = tl.arange(0, BK)
    rows = tl.load(idx_ptr + rm)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in tl.range(0, K, BK, warp_specialize=WS):
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16))

@triton.jit
def mm_desc(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
    pid_m = tl.program_id(0); pid_n = tl.program_id(1)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
    acc = tl.zeros((BM, BN), tl.float32)
    for k in tl.range(0, K, BK, warp_specialize=WS):
        a = a_desc.load([pid_m * BM, k])
        b = b_desc.load([k, pid_n * BN])
        acc = tl.dot(a, b, acc)
    rm = pid_m * BM + tl.arange(0, BM); rn = pid_n * BN + tl.arange(0, BN)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16))

sig_ptr = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "WS": "constexpr"}
sig_g = dict(sig_ptr); sig_g = {"a_ptr": "*bf16", "idx_ptr": "*i32", **{k: v for k, v in sig_ptr.items() if k != "a_ptr"}}
cap = int(os.environ.get("CAP", "90"))
target = GPUTarget("cuda", cap, 32)
for name, fn, sig in [("ptr", mm_ptr, sig_ptr), ("gather", mm_gather, sig_g), ("desc", mm_desc, sig_ptr)]:
    for ws in (False, True):
        for nw in (4, 8):
            consts = {"BM": 128, "BN": 128, "BK": 64, "WS": ws}
            try:
                k = triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": nw, "num_stages": 3})
                ttgir = k.asm["ttgir"]
                has_ws = "ttg.warp_specialize" in ttgir
                parts = re.findall(r"partition\d+\s*\([^)]*\)\s*num_warps\(\d+\)", ttgir)
                ptx = k.asm["ptx"]
                print(f"{name:6s} ws={ws!s:5} nw={nw} ok: meta.num_warps={k.metadata.num_warps} shared={k.metadata.shared} "
                      f"ttg.warp_specialize={has_ws} partitions={len(parts)} setmaxnreg={'setmaxnreg' in ptx} "
                      f"wgmma={'wgmma' in ptx} tma={'cp.async.bulk.tensor' in ptx} cp.async={'cp.async.cg' in ptx or 'cp.async.ca' in ptx} "
                      f"ptx_ver={re.search(r'.version (\S+)', ptx).group(1)} target={re.search(r'.target (\S+)', ptx).group(1)} cubin={len(k.asm['cubin'])}B")
            except Exception as e:
                print(f"{name:6s} ws={ws} nw={nw} FAIL: {type(e).__name__}: {str(e)[:300]}")
