import os
os.environ["TRITON_INTERPRET"] = "1"
import torch, numpy as np, triton, triton.language as tl
print("triton", triton.__version__, "torch", torch.__version__)

@triton.jit
def attn_colsum(q_ptr, k_ptr, v_ptr, o_ptr, cs_ptr, N, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, WS: tl.constexpr):
    pid = tl.program_id(0)
    qd = tl.make_tensor_descriptor(q_ptr, shape=[N, D], strides=[D, 1], block_shape=[BM, D])
    kd = tl.make_tensor_descriptor(k_ptr, shape=[N, D], strides=[D, 1], block_shape=[BN, D])
    vd = tl.make_tensor_descriptor(v_ptr, shape=[N, D], strides=[D, 1], block_shape=[BN, D])
    q = qd.load([pid * BM, 0])
    m_i = tl.zeros([BM], tl.float32) - float("inf"); l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    offs_n = tl.arange(0, BN)
    for s in tl.range(0, N, BN, warp_specialize=WS):
        k = kd.load([s, 0]); v = vd.load([s, 0])
        qk = tl.dot(q, k.T)
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp(qk - m_ij[:, None]); alpha = tl.exp(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1); acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        tl.store(cs_ptr + pid * N + s + offs_n, tl.sum(p, 0))   # unnormalised partial column sums
        m_i = m_ij
    rm = pid * BM + tl.arange(0, BM); rd = tl.arange(0, D)
    tl.store(o_ptr + rm[:, None] * D + rd[None, :], (acc / l_i[:, None]))

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
N, D, BM, BN = 256, 64, 64, 32
q, k, v = (torch.randn(N, D) for _ in range(3))
o = torch.empty(N, D); cs = torch.empty(N // BM, N)
attn_colsum[(N // BM,)](q, k, v, o, cs, N, D=D, BM=BM, BN=BN, WS=True)
ref = torch.softmax(q @ k.T, -1) @ v
print("interpret max err", (o - ref).abs().max().item(), "colsum tensor finite:", bool(torch.isfinite(cs).all()))
