"""MMDiT double-stream and single-stream blocks (diffusers ``FluxTransformerBlock`` /
``FluxSingleTransformerBlock``), shared by FLUX.1 and HunyuanVideo (docs/models.md §1.1, §7.1).

Parameters use the diffusers names: a double block holds ``norm1``, ``norm1_context``, ``attn``
(``to_q/to_k/to_v``, ``add_q_proj/add_k_proj/add_v_proj``, ``norm_q/norm_k/norm_added_q/norm_added_k``,
``to_out["0"]``, ``to_add_out``), ``ff`` and ``ff_context`` (``net["0"]["proj"]``, ``net["2"]``); a single
block holds ``norm``, ``attn`` (``to_q/to_k/to_v``, ``norm_q/norm_k``), ``proj_mlp`` and ``proj_out``.

What differs between the models is passed in: the concat order of the joint sequence
(``text_first``: FLUX puts text first, HunyuanVideo image first), the RoPE tables (already in joint
order; text rows may be identity), and optional key lengths [B] (a valid prefix of the joint keys).

Chipmunk hooks: ``attention_op(q, k, v) -> (out, aux)`` replaces the joint attention (q/k/v are
[B, S, H, D] after QK-norm and RoPE) and ``mlp_op(x, w1, b1, w2, b2) -> (y, aux)`` replaces the
image-stream MLP of a double block or the MLP branch of a single block. Each block returns the aux
values its ops produced (None for the dense defaults), so caches stay explicit state.

The residual streams are float32; matmul inputs are cast to ``dtype``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from chipmunk_jax.models.layers import (
    apply_rotary_emb,
    gelu_tanh,
    layer_norm,
    linear,
    matmul_precision,
    modulate,
    per_token,
    split_heads,
)

__all__ = ["block_modulation", "dense_attention", "dense_mlp", "double_block", "single_block", "modulated_input"]

Params = dict[str, Any]
AttentionOp = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]
MLPOp = Callable[..., tuple[jax.Array, Any]]

_EPS = 1e-6


def _default_implementation(q):
    # jax.nn.dot_product_attention's own default is the XLA path (several times slower than cuDNN's
    # flash attention on Hopper at FLUX sizes); pick cuDNN where it supports the inputs.
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 \
            and q.shape[-1] <= 128:
        return "cudnn"
    return None


def dense_attention(q, k, v, *, key_lengths=None, implementation=None):
    """Softmax attention on [B, S, H, D], scale 1/sqrt(D). ``key_lengths`` [B] int: only the first
    ``key_lengths[b]`` keys are valid (right-padded text after the image, HunyuanVideo), passed to
    cuDNN as ``key_value_seq_lengths`` rather than as a dense mask. float32 runs an explicit
    HIGHEST-precision einsum (jax.nn.dot_product_attention would use TF32 on GPUs); other dtypes go to
    ``jax.nn.dot_product_attention`` with ``implementation`` ("xla", "cudnn"; None = cuDNN on GPUs
    where it applies, else XLA)."""
    if q.dtype == jnp.float32:
        scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
        hi = jax.lax.Precision.HIGHEST
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=hi) * scale
        if key_lengths is not None:
            valid = jnp.arange(k.shape[1])[None, :] < key_lengths[:, None]
            logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=hi)
    if implementation is None:
        implementation = _default_implementation(q)
    lengths = None if key_lengths is None else key_lengths.astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)


def dense_mlp(x, w1, b1, w2, b2, *, dtype, w1_transposed=False):
    """``GELU_tanh(x @ w1 + b1) @ w2 (+ b2)``; returns (y, None) like a Chipmunk MLP op.
    ``w1_transposed``: w1 is stored [F, C] (see ``_fc1_weight``)."""
    h = linear({"kernel_t" if w1_transposed else "kernel": w1, "bias": b1}, x, dtype, jnp.float32)
    h = gelu_tanh(h).astype(dtype)
    precision = matmul_precision(dtype)
    y = jnp.matmul(h, w2.astype(dtype), precision=precision, preferred_element_type=jnp.float32)
    if b2 is not None:
        y = y + b2.astype(jnp.float32)
    return y.astype(dtype), None


def _fc1_weight(proj: Params):
    """(w1, w1_transposed) of an MLP's first Linear: ``kernel`` [C, F], or ``kernel_t`` [F, C] when the
    params were prepared for the sparse MLP kernel (it gathers rows of W1^T; no transpose per call)."""
    return (proj["kernel_t"], True) if "kernel_t" in proj else (proj["kernel"], False)


def _proj_out_halves(proj_out: Params, dim: int):
    """A single block's fused proj_out as (attention-rows Linear with the bias, MLP rows [F, D]). Prepared
    params (flux.prepare_params) hold the halves apart, so a sparse step does not slice (copy) the fused
    kernel on every call; plain params are sliced here (unused slices cost nothing under jit)."""
    if "kernel" in proj_out:
        kernel_attn, kernel_mlp = proj_out["kernel"][:dim], proj_out["kernel"][dim:]
    else:
        kernel_attn, kernel_mlp = proj_out["kernel_attn"], proj_out["kernel_mlp"]
    return {"kernel": kernel_attn, "bias": proj_out["bias"]}, kernel_mlp


def _qkv(attn: Params, x, *, q_name, k_name, v_name, q_norm, k_norm, head_dim, dtype):
    """Projected q, k, v as [B, S, H, D] in ``dtype``; q and k come with their RMSNorm weights, applied by
    ``_norm_rope`` together with RoPE."""
    q = (split_heads(linear(attn[q_name], x, dtype), head_dim), attn[q_norm]["scale"])
    k = (split_heads(linear(attn[k_name], x, dtype), head_dim), attn[k_norm]["scale"])
    v = split_heads(linear(attn[v_name], x, dtype), head_dim)
    return q, k, v


def _joint(first, second):
    return jnp.concatenate([first, second], axis=1)


def _default_attention(key_lengths, implementation):
    def op(q, k, v):
        return dense_attention(q, k, v, key_lengths=key_lengths, implementation=implementation), None

    return op


def ada_modulation(params: Params, temb) -> jax.Array:
    """AdaLayerNormZero's ``linear(SiLU(temb))`` in float32: [B, n * D], n chunks of shift/scale/gate."""
    return linear(params["linear"], jax.nn.silu(temb), jnp.float32)


def block_modulation(params: Params, temb, *, double: bool) -> dict[str, jax.Array]:
    """The modulation vectors of one double (``double=True``) or single block, by norm name, float32.

    They depend only on ``temb``, so a sampler can compute them for every step before its loop as a few
    GEMMs over the steps and pass them as the blocks' ``modulation``: per step and layer they are GEMVs whose
    cost is reading the weights (FLUX.1: 6.5 GB of modulation weights per step)."""
    names = ("norm1", "norm1_context") if double else ("norm",)
    return {name: ada_modulation(params[name], temb) for name in names}


def _ada_chunks(params: Params, temb, n, token_replace=None, precomputed=None):
    """AdaLayerNormZero modulation: ``ada_modulation`` (or its ``precomputed`` value) split into n [B, D] chunks.

    ``token_replace`` = (emb [B, D], mask [S] bool): HunyuanVideo-I2V's token replace, whose first-frame
    tokens (mask True) take their modulation from ``emb`` (the embedding of timestep 0): chunks are then
    per token, [B, S, D]."""
    chunks = jnp.split(ada_modulation(params, temb) if precomputed is None else precomputed, n, axis=-1)
    if token_replace is None:
        return chunks
    emb, mask = token_replace
    replaced = jnp.split(ada_modulation(params, emb), n, axis=-1)
    return [jnp.where(mask[None, :, None], r[:, None], c[:, None]) for c, r in zip(chunks, replaced)]


def modulated_input(params: Params, hidden_states, temb, *, double: bool, token_replace=None, modulation=None):
    """The image stream's timestep-modulated normalised input of a double (``double=True``) or single block,
    ``norm1(x) * (1 + scale_msa) + shift_msa`` in float32: what the block's attention reads, and TeaCache's signal
    (docs/algorithm.md §4.5). ``hidden_states`` [B, N, D] are image tokens (the norm is per token, so a single
    block's image rows need no text); ``token_replace`` and ``modulation`` as in ``double_block``."""
    name = "norm1" if double else "norm"
    shift, scale = _ada_chunks(params[name], temb, 6 if double else 3, token_replace,
                               (modulation or {}).get(name))[:2]
    return modulate(layer_norm(hidden_states, _EPS), shift, scale)


def _norm_rope(parts, rotary_emb, dtype):
    """QK RMSNorm of each (x [B, S_i, H, D], weight [D]) part, the parts joined along the sequence in the given
    order, RoPE over the joint sequence (tables already in joint order), cast to ``dtype``; float32 math.

    RoPE rotates channel pairs, so it commutes with the RMS factor r of each (token, head):
    rope(x * r * w) = r * rope(x * w). Applying r last keeps norm, RoPE and cast elementwise on the projected x,
    so XLA fuses them into one pass beside the small reduction for r, instead of writing the normalised q and k
    in float32 and reading them back (~9 ms of each FLUX.1 step on the H100 went to those passes:
    benchmarks/profiles/flux_dense_norm_rope_h100_2026-11-25.md)."""
    weighted = jnp.concatenate([x.astype(jnp.float32) * w.astype(jnp.float32) for x, w in parts], axis=1)
    inv_rms = jnp.concatenate(
        [jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True) + _EPS) for x, _ in parts],
        axis=1,
    )
    if rotary_emb is not None:
        weighted = apply_rotary_emb(weighted, rotary_emb)
    return (weighted * inv_rms).astype(dtype)


def double_block(
    params: Params,
    hidden_states: jax.Array,
    encoder_hidden_states: jax.Array,
    temb: jax.Array,
    rotary_emb: tuple[jax.Array, jax.Array] | None,
    *,
    head_dim: int,
    text_first: bool = True,
    key_lengths: jax.Array | None = None,
    dtype=jnp.bfloat16,
    attention_op: AttentionOp | None = None,
    mlp_op: MLPOp | None = None,
    attention_impl: str | None = None,
    token_replace: tuple[jax.Array, jax.Array] | None = None,
    modulation: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, tuple[Any, Any]]:
    """One double-stream block. Returns (encoder_hidden_states, hidden_states, (attn_aux, mlp_aux)).
    ``token_replace`` = (emb [B, D], mask [N_img] bool): per-token image-stream modulation (``_ada_chunks``).
    ``modulation``: this block's ``block_modulation(params, temb, double=True)``, computed ahead (temb unused)."""
    modulation = modulation or {}
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ada_chunks(
        params["norm1"], temb, 6, token_replace, modulation.get("norm1")
    )
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _ada_chunks(
        params["norm1_context"], temb, 6, precomputed=modulation.get("norm1_context")
    )
    norm_img = modulate(layer_norm(hidden_states, _EPS), shift_msa, scale_msa)
    norm_txt = modulate(layer_norm(encoder_hidden_states, _EPS), c_shift_msa, c_scale_msa)

    attn = params["attn"]
    q_img, k_img, v_img = _qkv(
        attn, norm_img, q_name="to_q", k_name="to_k", v_name="to_v", q_norm="norm_q", k_norm="norm_k",
        head_dim=head_dim, dtype=dtype,
    )
    q_txt, k_txt, v_txt = _qkv(
        attn, norm_txt, q_name="add_q_proj", k_name="add_k_proj", v_name="add_v_proj",
        q_norm="norm_added_q", k_norm="norm_added_k", head_dim=head_dim, dtype=dtype,
    )
    order = (lambda txt, img: [txt, img]) if text_first else (lambda txt, img: [img, txt])
    q = _norm_rope(order(q_txt, q_img), rotary_emb, dtype)
    k = _norm_rope(order(k_txt, k_img), rotary_emb, dtype)
    v = _joint(*order(v_txt, v_img)).astype(dtype)

    attention_op = attention_op or _default_attention(key_lengths, attention_impl)
    out, attn_aux = attention_op(q, k, v)
    out = out.reshape(*out.shape[:2], -1)
    num_txt = encoder_hidden_states.shape[1]
    num_img = hidden_states.shape[1]
    if text_first:
        out_txt, out_img = out[:, :num_txt], out[:, num_txt:]
    else:
        out_img, out_txt = out[:, :num_img], out[:, num_img:]

    hidden_states = hidden_states + per_token(gate_msa) * linear(attn["to_out"]["0"], out_img, dtype, jnp.float32)
    norm_img = modulate(layer_norm(hidden_states, _EPS), shift_mlp, scale_mlp)
    ff = params["ff"]["net"]
    w1, w1_transposed = _fc1_weight(ff["0"]["proj"])
    weights = (w1, ff["0"]["proj"]["bias"], ff["2"]["kernel"], ff["2"]["bias"])
    if mlp_op is None:
        ff_out, mlp_aux = dense_mlp(norm_img, *weights, dtype=dtype, w1_transposed=w1_transposed)
    else:
        ff_out, mlp_aux = mlp_op(norm_img.astype(dtype), *weights, w1_transposed=w1_transposed)
    hidden_states = hidden_states + per_token(gate_mlp) * ff_out.astype(jnp.float32)

    encoder_hidden_states = encoder_hidden_states + c_gate_msa[:, None] * linear(
        attn["to_add_out"], out_txt, dtype, jnp.float32
    )
    norm_txt = modulate(layer_norm(encoder_hidden_states, _EPS), c_shift_mlp, c_scale_mlp)
    ffc = params["ff_context"]["net"]
    ff_txt, _ = dense_mlp(
        norm_txt, ffc["0"]["proj"]["kernel"], ffc["0"]["proj"]["bias"], ffc["2"]["kernel"], ffc["2"]["bias"],
        dtype=dtype,
    )
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp[:, None] * ff_txt.astype(jnp.float32)
    return encoder_hidden_states, hidden_states, (attn_aux, mlp_aux)


def single_block(
    params: Params,
    hidden_states: jax.Array,
    temb: jax.Array,
    rotary_emb: tuple[jax.Array, jax.Array] | None,
    *,
    head_dim: int,
    key_lengths: jax.Array | None = None,
    dtype=jnp.bfloat16,
    attention_op: AttentionOp | None = None,
    mlp_op: MLPOp | None = None,
    attention_impl: str | None = None,
    token_replace: tuple[jax.Array, jax.Array] | None = None,
    modulation: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, tuple[Any, Any]]:
    """One single-stream block on the joint sequence [B, S, D] (already concatenated in the model's
    order; diffusers re-concatenates per block, which is the same math). Returns (hidden_states, aux).

    With an ``mlp_op`` the fused ``proj_out`` is applied in two halves: ``attn @ W[:D] + bias`` and the
    op's ``mlp @ W[D:]`` without bias, so the bias is added once (the original Chipmunk adds it twice,
    docs/algorithm.md §10.2; we keep the FLUX math). ``modulation``: as in ``double_block`` (``double=False``).
    """
    shift, scale, gate = _ada_chunks(params["norm"], temb, 3, token_replace, (modulation or {}).get("norm"))
    norm = modulate(layer_norm(hidden_states, _EPS), shift, scale)
    q, k, v = _qkv(
        params["attn"], norm, q_name="to_q", k_name="to_k", v_name="to_v", q_norm="norm_q", k_norm="norm_k",
        head_dim=head_dim, dtype=dtype,
    )
    q, k, v = _norm_rope([q], rotary_emb, dtype), _norm_rope([k], rotary_emb, dtype), v.astype(dtype)
    attention_op = attention_op or _default_attention(key_lengths, attention_impl)
    attn_out, attn_aux = attention_op(q, k, v)
    attn_out = attn_out.reshape(*attn_out.shape[:2], -1).astype(dtype)

    proj_out = params["proj_out"]
    attn_proj, w_mlp = _proj_out_halves(proj_out, attn_out.shape[-1])
    if mlp_op is None:
        mlp_hidden = gelu_tanh(linear(params["proj_mlp"], norm, dtype, jnp.float32)).astype(dtype)
        if "kernel" in proj_out:  # one GEMM over [attn, mlp], as diffusers
            update = linear(proj_out, jnp.concatenate([attn_out, mlp_hidden], axis=-1), dtype, jnp.float32)
        else:
            update = linear(attn_proj, attn_out, dtype, jnp.float32)
            update = update + linear({"kernel": w_mlp}, mlp_hidden, dtype, jnp.float32)
        mlp_aux = None
    else:
        w1, w1_transposed = _fc1_weight(params["proj_mlp"])
        mlp_y, mlp_aux = mlp_op(norm.astype(dtype), w1, params["proj_mlp"]["bias"], w_mlp, None,
                                w1_transposed=w1_transposed)
        update = linear(attn_proj, attn_out, dtype, jnp.float32) + mlp_y.astype(jnp.float32)
    hidden_states = hidden_states + per_token(gate) * update
    return hidden_states, (attn_aux, mlp_aux)
