import re, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
@triton.jit
def mm_dgather(a_ptr, idx_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
    pid_m = tl.program_id(0); pid_n = tl.program_id(1)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[1, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
    rows = tl.load(idx_ptr + pid_m * BM + tl.arange(0, BM))
    acc = tl.zeros((BM, BN), tl.float32)
    for k in tl.range(0, K, BK, warp_specialize=WS):
        a = a_desc.gather(rows, k)
        b = b_desc.load([k, pid_n * BN])
        acc = tl.dot(a, b, acc)
    rm = pid_m * BM + tl.arange(0, BM); rn = pid_n * BN + tl.arange(0, BN)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16))
sig = {"a_ptr": "*bf16", "idx_ptr": "*i32", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
       "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "WS": "constexpr"}
for cap in (90, 100):
  for ws in (False, True):
    try:
        k = triton.compile(ASTSource(mm_dgather, sig, {"BM": 128, "BN": 128, "BK": 64, "WS": ws}), target=GPUTarget("cuda", cap, 32), options={"num_warps": 4, "num_stages": 3})
        ptx = k.asm["ptx"]
        print(f"cap={cap} ws={ws} OK warps={k.metadata.num_warps} ttg.ws={'ttg.warp_specialize' in k.asm['ttgir']} tma_gather4={'tile::gather4' in ptx} tma={'cp.async.bulk.tensor' in ptx} ld.global={'ld.global' in ptx}")
    except Exception as e:
        print(f"cap={cap} ws={ws} FAIL {type(e).__name__}: {str(e).splitlines()[0][:200]}")
