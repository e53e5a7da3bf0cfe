"""Public attention ops: dense (+LSE), dense + column sums, gathered column-sparse attention.

Each op validates its inputs, then dispatches on ``impl``:
  None         -> "pallas" on GPU, "reference" elsewhere (with TRITON_BY_DEFAULT: "triton" for dense_attention
                  and dense_attention_colsum on a Hopper GPU with bf16/f16 inputs and head_dim 64 or 128)
  "pallas"     -> the Pallas-Triton kernel, compiled
  "interpret"  -> the same Pallas kernel in interpret mode (CPU tests)
  "triton"     -> dense / dense+colsum: the Triton kernels with TMA loads (attention_triton.py); other ops,
                  which have no such kernel, take it as "pallas"
  "triton_interpret" -> those Triton kernels in Triton's interpreter (CPU tests; other ops: "interpret")
  "reference"  -> the pure-jnp twin in attention_reference.py
q, k, v are [batch, seq, heads, head_dim]; statistics are [batch, heads, ...] float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.pallas_kernels import attention_pallas, triton_call
from chipmunk_jax.pallas_kernels import attention_reference as ref
from chipmunk_jax.validation import positive_int

__all__ = [
    "dense_attention",
    "dense_attention_output",
    "dense_attention_colsum",
    "column_sparse_attention",
    "resolve_impl",
]

IMPLS = ("pallas", "interpret", "reference", "triton", "triton_interpret")
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_TRITON_TO_PALLAS = {"triton": "pallas", "triton_interpret": "interpret"}


def resolve_impl(impl: str | None) -> str:
    """"pallas", "interpret" or "reference" for ops without a Triton kernel (see the module docstring)."""
    if impl is None:
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    return _TRITON_TO_PALLAS.get(impl, impl)


def _triton_unsupported(q, group_size=None, interpret=False) -> str | None:
    reason = triton_call.platform_unsupported(interpret)
    if reason:
        return reason
    from chipmunk_jax.pallas_kernels import attention_triton  # local: it imports triton, an optional dependency

    if not interpret and q.dtype not in attention_triton.DTYPES:
        return f"it takes bfloat16 or float16 inputs, got {q.dtype}"
    if q.shape[-1] not in attention_triton.HEAD_DIMS:
        return f"it takes head_dim 64 or 128, got {q.shape[-1]}"
    if group_size is not None and group_size < 9:
        return f"it takes group_size >= 9 (a 128-row program touches at most 16 groups), got {group_size}"
    return None


# Whether impl=None picks the Triton kernels on a Hopper GPU. On because they run inside XLA command buffers on the
# GPU (tests/test_attention_gpu.py::test_triton_kernels_inside_a_command_buffer_gpu, H200): their global scratch is
# an XLA buffer (triton_call.launch_layout), not the plugin's per-launch allocation that the CUDA graphs XLA builds
# from a model's jit cannot hold.
TRITON_BY_DEFAULT = True


def _dense_impl(impl: str | None, q, group_size=None) -> str:
    """resolve_impl for the two ops that also have Triton kernels."""
    if impl is None and TRITON_BY_DEFAULT and jax.default_backend() == "gpu":
        return "triton" if _triton_unsupported(q, group_size) is None else "pallas"
    if impl in _TRITON_TO_PALLAS:
        reason = _triton_unsupported(q, group_size, interpret=impl == "triton_interpret")
        if reason:
            raise ValueError(f"impl={impl!r} cannot run these inputs: {reason}")
        return impl
    return resolve_impl(impl)


def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {getattr(x, 'shape', None)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"q {q.shape} and k {k.shape} must agree on batch, heads and head_dim ([B, N, H, D] layout)"
        )
    if q.shape[1] < 1 or k.shape[1] < 1:
        raise ValueError(f"sequence lengths must be >= 1, got q {q.shape} and k {k.shape}")


def _is_concrete(x) -> bool:
    """A numpy array, or a JAX array with values here (not a tracer, not spread over other hosts)."""
    if isinstance(x, np.ndarray):
        return True
    return (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
            and getattr(x, "is_fully_addressable", True))


def check_concrete_indices(indices, counts, num_items: int, *, items: str) -> None:
    """When ``indices`` [..., K] and ``counts`` [...] are concrete arrays (not jit tracers): a ValueError naming the
    argument, the bad value and its position for a count outside [0, K] or, among the entries in use
    (``indices[..., :count]``), an index outside [0, num_items). Entries past a row's count are padding and are
    not checked. Tracers are not checked (the caller's docstring says what happens). One min/max per array."""
    if not (_is_concrete(indices) and _is_concrete(counts)):
        return
    counts = np.asarray(counts)
    capacity = indices.shape[-1]
    if counts.size and (counts.min() < 0 or counts.max() > capacity):
        pos = tuple(int(i) for i in np.argwhere((counts < 0) | (counts > capacity))[0])
        raise ValueError(f"counts must be in [0, K = {capacity}] (K: indices' last axis), got counts{list(pos)} = "
                         f"{int(counts[pos])}")
    indices = np.asarray(indices)
    used = np.arange(capacity) < counts[..., None]
    if not used.any():
        return
    in_use = np.where(used, indices, 0)
    if in_use.min() < 0 or in_use.max() >= num_items:
        pos = tuple(int(i) for i in np.argwhere(used & ((indices < 0) | (indices >= num_items)))[0])
        raise ValueError(f"indices must be in [0, {num_items}) ({items}) within each row's count, got "
                         f"indices{list(pos)} = {int(indices[pos])}")


def _scale(scale, head_dim):
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def dense_attention(q, k, v, *, scale: float | None = None, impl: str | None = None):
    """Dense attention. Returns (o like q, lse [B, H, N_q] float32, natural log)."""
    _check_qkv(q, k, v)
    impl = _dense_impl(impl, q)
    scale = _scale(scale, q.shape[-1])
    if impl == "reference":
        return ref.dense_attention_reference(q, k, v, scale=scale)
    if impl in _TRITON_TO_PALLAS:
        from chipmunk_jax.pallas_kernels import attention_triton  # local: it imports triton (optional)

        return attention_triton.dense_attention(q, k, v, scale=scale, interpret=impl == "triton_interpret")
    return attention_pallas.dense_attention(q, k, v, scale=scale, interpret=impl == "interpret")


def dense_attention_output(q, k, v, *, scale: float | None = None, impl: str | None = None):
    """Dense attention output only, for callers that need no LSE.

    With impl "pallas" this is cuDNN's flash attention where it applies (bf16/f16, head_dim a multiple
    of 8 up to 128): ~1.2x faster than our Pallas dense kernel on the H100 (benchmarks/RESULTS.md §2);
    otherwise the dense kernel of ``impl``.
    """
    _check_qkv(q, k, v)
    impl = resolve_impl(impl)
    d = q.shape[-1]
    if impl == "pallas" and q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128:
        return jax.nn.dot_product_attention(q, k, v, scale=_scale(scale, d), implementation="cudnn")
    return dense_attention(q, k, v, scale=scale, impl=impl)[0]


def dense_attention_colsum(
    q, k, v, prev_lse, *, group_size: int = 192, scale: float | None = None, impl: str | None = None
):
    """Dense attention plus column sums with the previous LSE (docs/algorithm.md §1.4).

    Returns (o, lse [B, H, N_q] f32, colsum [B, H, ceil(N_q/group_size), N_k] f32). The Pallas kernel uses
    ``prev_lse`` as its softmax offset (one exp per logit serves o, lse and the column sums); rows whose LSE
    moved by 60 or more since ``prev_lse`` (or a non-finite ``prev_lse``) make it rerun the online-softmax
    kernel, so the result never depends on how good ``prev_lse`` is. The Triton kernel does the same and
    falls back to the Pallas online kernel.
    """
    _check_qkv(q, k, v)
    group_size = positive_int("group_size", group_size)
    b, nq, h, _ = q.shape
    if getattr(prev_lse, "shape", None) != (b, h, nq):
        raise ValueError(f"prev_lse must have shape [B, H, N_q] = {(b, h, nq)}, got {getattr(prev_lse, 'shape', None)}")
    if prev_lse.dtype != jnp.float32:
        raise TypeError(f"prev_lse must be float32, got {prev_lse.dtype}")
    impl = _dense_impl(impl, q, group_size)
    scale = _scale(scale, q.shape[-1])
    if impl == "reference":
        return ref.dense_attention_colsum_reference(q, k, v, prev_lse, group_size=group_size, scale=scale)
    if impl in _TRITON_TO_PALLAS:
        from chipmunk_jax.pallas_kernels import attention_triton  # local: it imports triton (optional)

        return attention_triton.dense_attention_colsum(q, k, v, prev_lse, group_size=group_size, scale=scale,
                                                       interpret=impl == "triton_interpret")
    return attention_pallas.dense_attention_colsum(
        q, k, v, prev_lse, group_size=group_size, scale=scale, interpret=impl == "interpret"
    )


def column_sparse_attention(
    q,
    k,
    v,
    indices,
    counts,
    *,
    group_size: int = 192,
    scale: float | None = None,
    base=None,
    sign: int = 1,
    impl: str | None = None,
):
    """Each query group attends only to its gathered keys indices[b, h, g, :counts[b, h, g]].

    indices [B, H, G, K] int32 with entries in [0, N_k); counts [B, H, G] int32 in [0, K];
    G = ceil(N_q / group_size). Rows of a group with count 0 give 0. With ``base`` (like q) the
    result is base + sign * attention (a new array: base is read, never aliased, so a cached base survives).

    Concrete (not traced) indices and counts are checked: a count outside [0, K] or an index outside [0, N_k)
    among each group's first ``count`` entries raises ValueError (entries past the count are padding, never
    read). Under jit nothing is checked: an out-of-range index makes the result undefined (the reference gathers
    another key, negative indices wrapping and large ones clamped; the kernels may read another key's row or
    memory out of bounds), and so does a count outside [0, K].
    """
    _check_qkv(q, k, v)
    group_size = positive_int("group_size", group_size)
    b, nq, h, _ = q.shape
    groups = -(-nq // group_size)
    if getattr(indices, "ndim", None) != 4 or indices.shape[:3] != (b, h, groups):
        raise ValueError(
            f"indices must have shape [B, H, G, K] with (B, H, G) = {(b, h, groups)}, "
            f"got {getattr(indices, 'shape', None)}"
        )
    if indices.dtype != jnp.int32:
        raise TypeError(f"indices must be int32, got {indices.dtype}")
    if getattr(counts, "shape", None) != (b, h, groups):
        raise ValueError(f"counts must have shape [B, H, G] = {(b, h, groups)}, got {getattr(counts, 'shape', None)}")
    if counts.dtype != jnp.int32:
        raise TypeError(f"counts must be int32, got {counts.dtype}")
    check_concrete_indices(indices, counts, k.shape[1], items="the key count N_k")
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    if base is not None:
        if base.shape != q.shape:
            raise ValueError(f"base must have the shape of q {q.shape}, got {base.shape}")
        if base.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"base must be a float array, got {base.dtype}")
    impl = resolve_impl(impl)
    scale = _scale(scale, q.shape[-1])
    if impl == "reference":
        return ref.column_sparse_attention_reference(
            q, k, v, indices, counts, group_size=group_size, scale=scale, base=base, sign=sign
        )
    return attention_pallas.column_sparse_attention(
        q, k, v, indices, counts, group_size=group_size, scale=scale, base=base, sign=sign,
        interpret=impl == "interpret",
    )
