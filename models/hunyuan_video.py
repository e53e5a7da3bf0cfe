"""HunyuanVideo transformer (diffusers ``HunyuanVideoTransformer3DModel``) as pure functions, with Chipmunk.

Params: a nested dict whose paths joined by "." are the diffusers state-dict names, with each Linear
``weight`` renamed ``kernel`` ([in, out]) and each norm ``weight`` renamed ``scale``. The patch embedding
``x_embedder.proj`` (a Conv3d with kernel = stride = (pt, p, p)) is kept as patchify + Linear:
``kernel`` [C*pt*p*p, D] with patch features ordered (c, pt, ph, pw) (``W.reshape(D, -1).T``). Each block
type (``transformer_blocks``, ``single_transformer_blocks``, ``context_embedder.token_refiner.refiner_blocks``)
is ONE tree whose arrays carry a leading layer axis, run with ``lax.scan`` (``models.block_stack``). See
``chipmunk_jax.ports.hunyuan_video``.

``forward`` mirrors diffusers' keywords and shapes (docs/models.md §2):
  hidden_states [B, C, F, H, W], timestep [B] (in [0, 1000], no scaling inside), encoder_hidden_states
  [B, L, text_embed_dim], encoder_attention_mask [B, L] (1 = valid, right-padded), pooled_projections
  [B, pooled_projection_dim], guidance [B] (guidance_scale * 1000) when guidance_embeds=True.
It returns a ``ModelOutput`` whose ``sample`` is [B, out_channels, F, H, W] in hidden_states' dtype (the
model contract of docs/architecture.md §4, shared with FLUX and Wan). The double/single blocks are the shared
MMDiT blocks (``models/mmdit.py``) in image-first order; RoPE (theta 256, axes (t, h, w)) rotates image
tokens only (text rows of the joint tables are the identity); padded text keys are masked out (a
valid-length prefix of the joint sequence). I2V ``latent_concat`` needs nothing beyond in_channels=33;
I2V ``token_replace`` modulates the first latent frame's image tokens with the embedding of timestep 0
(plus the pooled text), every block, as diffusers' ``HunyuanVideoTokenReplace*`` blocks.

Chipmunk (docs/algorithm.md §5.2): the joint attention of all num_layers + num_single_layers blocks goes through
``sparse_delta_attention`` (no MLP sparsity, as the original); layers below first_n_dense_layers run the
dense path and keep no cache; the cache holds two block stacks (double, single), each stacked over its
sparse layers. Image tokens are put in voxel order (``reorder.voxel``,
tails in raster order, docs/algorithm.md §3.1) inside ``forward`` with their RoPE rows permuted identically, text is
appended unpermuted; ``sample`` is permuted back, ``hidden`` stays in voxel order. Chipmunk runs on the prefix [image; valid text]
(as the original, which cuts at ``cu_seqlens_q[1]``); the padded text queries attend densely to that
prefix (their values never reach a valid token: padded keys are masked). The valid text length must
therefore be static and equal over the batch: ``text_length=`` (or derived from a concrete mask;
different lengths in one batch raise). The static mask (text keys, dense text query groups, static
random keys; docs/algorithm.md §1.6) is built once per generation by ``init_cache`` and kept bit-packed in the cache
(``cache.static_mask_bits``), as are the column sets between full steps (``mask_bits``).

Memory per sparse layer at 720x1280x129 (118,800 image + 256 text tokens, B=1, bf16 out_cache), measured
with ``chipmunk_jax.cache.cache_bytes`` on ``jax.eval_shape(init_cache)`` (``cache_bytes_per_layer``):
  out_cache 731.5 MB, packed mask 221.8 MB, LSE 11.4 MB, counts 0.06 MB: 964.8 MB per layer,
  56.0 GB for the 58 sparse layers of the preset (the 2 always-dense layers keep no cache),
  plus the per-generation static mask, 9.2 MB packed.
With 23.9 GiB of bf16 weights that fits a 141 GB H200 (measured peak 99.8 GiB) but not an 80 GB H100: there,
``chipmunk_jax.cache.offload_layer_caches(cache)`` keeps every layer's cache in pinned host memory and each
op brings its own layer's cache to the device (the original offloads out_cache and the masks too).

Step caching (docs/algorithm.md §4.3): ``forward(...).hidden`` is the pre-head image hidden state (voxel order under
Chipmunk); ``head`` re-runs only the final layer on it with the current timestep's conditioning;
``denoiser`` wires both into ``chipmunk_jax.sampling``.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import parallel
from chipmunk_jax.attention import init_attention_cache
from chipmunk_jax.cache import ModelCache, cache_bytes, init_stack_cache
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.models import mmdit
from chipmunk_jax.models.block_stack import block_at, check_block_stack, num_blocks, scan_blocks
from chipmunk_jax.models.chipmunk_ops import ChipmunkRun, check_chipmunk, permute_tokens, token_permutation
from chipmunk_jax.models.chipmunk_ops import unpermute_tokens
from chipmunk_jax.models.denoising import model_denoiser
from chipmunk_jax.models.diffusers_config import DiffusersConfig
from chipmunk_jax.models.inputs import batch_vector, check_array, check_batch_scalar, check_compute_dtype, check_grid
from chipmunk_jax.models.inputs import check_guidance, check_rotary_emb, pooled_timestep_guidance
from chipmunk_jax.models.layers import (
    affine_layer_norm,
    layer_norm,
    linear,
    linear_init,
    matmul_precision,
    rotary_tables,
    split_heads,
    timestep_embedding,
    timestep_sinusoids,
)
from chipmunk_jax.models.parallel_ops import sequence_parallel_dense_attention
from chipmunk_jax.outputs import ModelOutput
from chipmunk_jax.sampling import Denoiser
from chipmunk_jax.schedule import StepPlan
from chipmunk_jax.selection import pack_mask, static_video_mask
from chipmunk_jax.step_policies import Probe, check_probe_kind
from chipmunk_jax.validation import (
    check_bool,
    check_choice,
    check_int,
    check_int_tuple,
    check_number,
    field,
    non_negative_int,
    optional,
    positive_int,
)

__all__ = [
    "HunyuanVideoConfig",
    "forward",
    "head",
    "timestep_conditioning",
    "init_params",
    "init_cache",
    "cache_bytes_per_layer",
    "pos_embed",
    "token_grid",
    "text_length_from_mask",
    "patchify",
    "unpatchify",
    "denoiser",
]

Params = dict[str, Any]
_EPS = 1e-6
# fold_in stream of the static random keys, apart from the per-layer streams 0..num_sparse_layers-1
_STATIC_MASK_STREAM = 1_000_003


@dataclasses.dataclass(frozen=True)
class HunyuanVideoConfig(DiffusersConfig):
    """``HunyuanVideoTransformer3DModel`` constructor arguments (diffusers names and defaults =
    HunyuanVideo T2V 720p, "HYVideo-T/2-cfgdistill")."""

    DIFFUSERS_CLASS: ClassVar[str] = "HunyuanVideoTransformer3DModel"

    in_channels: int = field(16, check=positive_int)
    out_channels: int | None = field(16, check=optional(positive_int))
    num_attention_heads: int = field(24, check=positive_int)
    attention_head_dim: int = field(128, check=positive_int)
    num_layers: int = field(20, check=non_negative_int)
    num_single_layers: int = field(40, check=non_negative_int)
    num_refiner_layers: int = field(2, check=non_negative_int)
    mlp_ratio: float = field(4.0, check=partial(check_number, positive=True))
    patch_size: int = field(2, check=positive_int)
    patch_size_t: int = field(1, check=positive_int)
    # the only released variant
    qk_norm: str = field("rms_norm", check=partial(check_choice, choices=("rms_norm",)))
    guidance_embeds: bool = field(True, check=check_bool)
    text_embed_dim: int = field(4096, check=positive_int)
    pooled_projection_dim: int = field(768, check=positive_int)
    rope_theta: float = field(256.0, check=partial(check_number, positive=True))
    rope_axes_dim: tuple[int, ...] = field((16, 56, 56), check=partial(check_int_tuple, length=3, minimum=2))
    image_condition_type: str | None = field(
        None, check=partial(check_choice, choices=(None, "latent_concat", "token_replace")))

    def _check(self):
        if any(d % 2 for d in self.rope_axes_dim) or sum(self.rope_axes_dim) != self.attention_head_dim:
            raise ValueError(
                f"rope_axes_dim {self.rope_axes_dim} must be three even sizes summing to attention_head_dim "
                f"({self.attention_head_dim})"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def refiner_mlp_hidden_dim(self) -> int:
        # diffusers builds the refiner with its own default mlp_ratio 4.0, whatever config.mlp_ratio says
        return int(self.inner_dim * 4.0)

    @property
    def patch_features(self) -> int:
        return self.in_channels * self.patch_size_t * self.patch_size * self.patch_size

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def num_sparse_layers(self) -> int:
        return self.num_layers + self.num_single_layers

    @property
    def block_stacks(self) -> tuple[tuple[int, int], ...]:
        """(first layer, count) of the double and the single block stack, in Chipmunk's layer numbering."""
        return ((0, self.num_layers), (self.num_layers, self.num_single_layers))



# ----------------------------------------------------------------------------------------------
# Parameters


def init_params(config: HunyuanVideoConfig, key: jax.Array, dtype=jnp.bfloat16) -> Params:
    """Random parameters with torch's default Linear init (norm scales 1, biases 0); for tests and timing."""
    if not isinstance(config, HunyuanVideoConfig):
        raise TypeError(f"config must be a HunyuanVideoConfig, got {type(config).__name__}")
    d, f, hd = config.inner_dim, config.mlp_hidden_dim, config.attention_head_dim
    key, refiner_key, double_key, single_key = jax.random.split(key, 4)

    def linears(key, n):
        keys = iter(jax.random.split(key, n))
        return lambda i, o: linear_init(next(keys), i, o, dtype)

    lin = linears(key, 32)
    rms = lambda: {"scale": jnp.ones((hd,), dtype)}  # noqa: E731
    ln = lambda: {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)}  # noqa: E731
    emb = lambda i: {"linear_1": lin(i, d), "linear_2": lin(d, d)}  # noqa: E731
    ff = lambda lin, hidden: {"net": {"0": {"proj": lin(d, hidden)}, "2": lin(hidden, d)}}  # noqa: E731

    def refiner_block(key):
        lin = linears(key, 8)
        attn = {name: lin(d, d) for name in ("to_q", "to_k", "to_v")}
        attn["to_out"] = {"0": lin(d, d)}
        return {"norm1": ln(), "attn": attn, "norm2": ln(), "ff": ff(lin, config.refiner_mlp_hidden_dim),
                "norm_out": {"linear": lin(d, 2 * d)}}

    def double(key):
        lin = linears(key, 16)
        attn = {name: lin(d, d) for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
        attn.update({name: rms() for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")})
        attn.update({"to_out": {"0": lin(d, d)}, "to_add_out": lin(d, d)})
        return {"norm1": {"linear": lin(d, 6 * d)}, "norm1_context": {"linear": lin(d, 6 * d)}, "attn": attn,
                "ff": ff(lin, f), "ff_context": ff(lin, f)}

    def single(key):
        lin = linears(key, 8)
        attn = {name: lin(d, d) for name in ("to_q", "to_k", "to_v")}
        attn.update({"norm_q": rms(), "norm_k": rms()})
        return {"norm": {"linear": lin(d, 3 * d)}, "attn": attn, "proj_mlp": lin(d, f), "proj_out": lin(d + f, d)}

    stack = lambda init, key, count: jax.vmap(init)(jax.random.split(key, count))  # noqa: E731
    time_text_embed = {"timestep_embedder": emb(256), "text_embedder": emb(config.pooled_projection_dim)}
    if config.guidance_embeds:
        time_text_embed["guidance_embedder"] = emb(256)
    context_embedder = {
        "time_text_embed": {"timestep_embedder": emb(256), "text_embedder": emb(config.text_embed_dim)},
        "proj_in": lin(config.text_embed_dim, d),
        "token_refiner": {"refiner_blocks": stack(refiner_block, refiner_key, config.num_refiner_layers)},
    }
    return {
        "x_embedder": {"proj": lin(config.patch_features, d)},
        "context_embedder": context_embedder,
        "time_text_embed": time_text_embed,
        "transformer_blocks": stack(double, double_key, config.num_layers),
        "single_transformer_blocks": stack(single, single_key, config.num_single_layers),
        "norm_out": {"linear": lin(d, 2 * d)},
        "proj_out": lin(d, config.patch_size_t * config.patch_size ** 2 * config.output_channels),
    }


# ----------------------------------------------------------------------------------------------
# Patches and positions


def token_grid(config: HunyuanVideoConfig, latent_shape) -> tuple[int, int, int]:
    """(frames, height, width) of the patch-token grid for latents [B, C, F, H, W] (or their shape)."""
    shape = tuple(getattr(latent_shape, "shape", latent_shape))
    if len(shape) != 5:
        raise ValueError(f"latent_shape must be [B, C, F, H, W], got {shape}")
    _, _, f, h, w = shape
    pt, p = config.patch_size_t, config.patch_size
    if f % pt or h % p or w % p:
        raise ValueError(f"hidden_states frames/height/width {(f, h, w)} must divide by the patch ({pt}, {p}, {p})")
    return f // pt, h // p, w // p


def patchify(x, patch_size_t: int, patch_size: int):
    """[B, C, F, H, W] -> [B, N, C*pt*p*p]: tokens in raster (t, h, w) order, features (c, pt, ph, pw)
    (the Conv3d input order, so ``x_embedder.proj`` is a Linear)."""
    b, c, f, h, w = x.shape
    pt, p = patch_size_t, patch_size
    x = x.reshape(b, c, f // pt, pt, h // p, p, w // p, p).transpose(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (f // pt) * (h // p) * (w // p), c * pt * p * p)


def unpatchify(x, grid, patch_size_t: int, patch_size: int):
    """[B, N, C*pt*p*p] (features (c, pt, ph, pw), diffusers' ``proj_out`` order) -> [B, C, F, H, W]."""
    tf, th, tw = grid
    pt, p = patch_size_t, patch_size
    b = x.shape[0]
    x = x.reshape(b, tf, th, tw, -1, pt, p, p).transpose(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, -1, tf * pt, th * p, tw * p)


def pos_embed(config: HunyuanVideoConfig, grid) -> tuple[jax.Array, jax.Array]:
    """``HunyuanVideoRotaryPosEmbed`` tables for the image tokens in raster order: ([N, head_dim],) * 2,
    f32 (angles from float64 numpy, as diffusers)."""
    tf, th, tw = (int(g) for g in grid)
    t, h, w = np.meshgrid(np.arange(tf), np.arange(th), np.arange(tw), indexing="ij")
    ids = np.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], axis=1).astype(np.float32)
    return rotary_tables(ids, config.rope_axes_dim, float(config.rope_theta))


def _joint_rotary(image_tables, num_text):
    # Text tokens are not rotated: identity rows (cos 1, sin 0) after the image rows.
    cos, sin = image_tables
    d = cos.shape[-1]
    return (jnp.concatenate([cos, jnp.ones((num_text, d), cos.dtype)], axis=0),
            jnp.concatenate([sin, jnp.zeros((num_text, d), sin.dtype)], axis=0))


def text_length_from_mask(encoder_attention_mask) -> int:
    """The valid text length of a concrete right-padded mask [B, L], equal over the batch (Chipmunk
    needs a static one)."""
    if isinstance(encoder_attention_mask, jax.core.Tracer):
        raise ValueError("encoder_attention_mask is traced: pass text_length= (the valid text length)")
    m = np.asarray(encoder_attention_mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"encoder_attention_mask must be [B, L], got shape {m.shape}")
    lengths = m.sum(axis=1)
    if not np.array_equal(m, np.arange(m.shape[1])[None, :] < lengths[:, None]):
        raise ValueError("encoder_attention_mask must be right-padded (valid tokens first)")
    if np.any(lengths != lengths[0]):
        raise ValueError(
            f"Chipmunk needs one valid text length for the whole batch, got {sorted(set(lengths.tolist()))}: "
            "run the prompts in separate calls (or pad their embeddings to one length)"
        )
    return int(lengths[0])


# ----------------------------------------------------------------------------------------------
# Embeddings and the token refiner


def _refiner_attention(attn: Params, x, mask, *, head_dim, dtype):
    """Self-attention with a [B, L, L] bool mask; logits and softmax in f32."""
    b, length, _ = x.shape
    q, k, v = (split_heads(linear(attn[n], x, dtype), head_dim) for n in ("to_q", "to_k", "to_v"))
    precision = matmul_precision(dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None], logits / np.sqrt(head_dim), -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=precision, preferred_element_type=jnp.float32)
    return linear(attn["to_out"]["0"], out.reshape(b, length, -1), dtype, jnp.float32)


def token_refiner(params: Params, config: HunyuanVideoConfig, encoder_hidden_states, timestep,
                  encoder_attention_mask, dtype):
    """``HunyuanVideoTokenRefiner``: masked-mean pooled text + t conditions 2-D-masked refiner blocks."""
    m = encoder_attention_mask.astype(jnp.float32)
    ehs = encoder_hidden_states.astype(jnp.float32)
    pooled = jnp.sum(ehs * m[..., None], axis=1) / jnp.sum(m, axis=1, keepdims=True)
    tte = params["time_text_embed"]
    temb = (timestep_embedding(tte["timestep_embedder"], timestep_sinusoids(timestep))
            + timestep_embedding(tte["text_embedder"], pooled))
    h = linear(params["proj_in"], encoder_hidden_states, dtype, jnp.float32)
    valid = jnp.asarray(encoder_attention_mask).astype(bool)
    # diffusers: mask[i, j] = valid_i & valid_j, with key 0 always visible (no all-masked rows)
    mask = (valid[:, :, None] & valid[:, None, :]).at[:, :, 0].set(True)

    def refiner_block(block, _, h, ops):
        gate_msa, gate_mlp = jnp.split(linear(block["norm_out"]["linear"], jax.nn.silu(temb), jnp.float32), 2, -1)
        attn_out = _refiner_attention(block["attn"], affine_layer_norm(block["norm1"], h, _EPS), mask,
                                      head_dim=config.attention_head_dim, dtype=dtype)
        h = h + attn_out * gate_msa[:, None]
        ff = block["ff"]["net"]
        hidden = jax.nn.silu(linear(ff["0"]["proj"], affine_layer_norm(block["norm2"], h, _EPS), dtype, jnp.float32))
        return h + linear(ff["2"], hidden, dtype, jnp.float32) * gate_mlp[:, None], (None, None)

    h, _ = scan_blocks(refiner_block, params.get("token_refiner", {}).get("refiner_blocks"), h, first_layer=0)
    return h


def _condition_embedding(params: Params, timestep, pooled_projections, guidance):
    # HunyuanVideoConditionEmbedding: timestep in [0, 1000] as given (no x1000 inside), all in f32
    temb = timestep_embedding(params["timestep_embedder"], timestep_sinusoids(timestep))
    if guidance is not None:
        temb = temb + timestep_embedding(params["guidance_embedder"], timestep_sinusoids(guidance))
    return temb + timestep_embedding(params["text_embedder"], pooled_projections.astype(jnp.float32))


def timestep_conditioning(params: Params, config: HunyuanVideoConfig, *, timestep, pooled_projections,
                          guidance=None) -> Params:
    """The timestep-conditioned embeddings of the blocks and the head (float32): ``{"temb": [B, D]}`` plus,
    for I2V token replace, ``"token_replace_temb"`` (the embedding of timestep 0 without guidance, which
    diffusers gives the first latent frame's tokens). ``timestep`` / ``guidance``: scalar or [B] (in [0, 1000]
    and guidance_scale * 1000, as the pipeline passes them). For ``forward(..., conditioning=)`` and ``head``."""
    _check_config(config)
    timestep, guidance = pooled_timestep_guidance(pooled_projections, config.pooled_projection_dim, timestep, guidance,
                                                  guidance_embeds=config.guidance_embeds,
                                                  model="this HunyuanVideo config")
    tte = params["time_text_embed"]
    out = {"temb": _condition_embedding(tte, timestep, pooled_projections, guidance)}
    if config.image_condition_type == "token_replace":
        out["token_replace_temb"] = _condition_embedding(tte, jnp.zeros_like(timestep), pooled_projections, None)
    return out


def _check_conditioning(config: HunyuanVideoConfig, conditioning, batch: int) -> None:
    keys = {"temb", "token_replace_temb"} if config.image_condition_type == "token_replace" else {"temb"}
    if not isinstance(conditioning, dict) or set(conditioning) != keys:
        raise ValueError(f"conditioning must come from hunyuan_video.timestep_conditioning for this config "
                         f"(keys {sorted(keys)})")
    if conditioning["temb"].shape != (batch, config.inner_dim):
        raise ValueError(f"conditioning['temb'] must be [{batch}, {config.inner_dim}], got "
                         f"{tuple(conditioning['temb'].shape)}")


# ----------------------------------------------------------------------------------------------
# Chipmunk cache


def _check_config(config) -> None:
    if not isinstance(config, HunyuanVideoConfig):
        raise TypeError(f"config must be a HunyuanVideoConfig, got {type(config).__name__}")


def _check_params(params, config: HunyuanVideoConfig) -> None:
    """Every block type stacked on a leading layer axis with the config's block count."""
    check_block_stack("transformer_blocks", params.get("transformer_blocks"), config.num_layers)
    check_block_stack("single_transformer_blocks", params.get("single_transformer_blocks"), config.num_single_layers)
    check_block_stack("context_embedder.token_refiner.refiner_blocks",
                      params.get("context_embedder", {}).get("token_refiner", {}).get("refiner_blocks"),
                      config.num_refiner_layers)


def _check_chipmunk(config, chipmunk) -> None:
    _check_config(config)
    check_chipmunk("HunyuanVideo", chipmunk, reorder_kinds=("none", "voxels"), mlp=False)
    a = chipmunk.attention
    if a.compress_indices and math.prod(chipmunk.reorder.voxel) != a.group_size:
        raise ValueError(f"reorder.voxel {chipmunk.reorder.voxel} must hold attention.group_size={a.group_size} "
                         "tokens (the static mask maps query groups to voxels)")


def init_cache(config: HunyuanVideoConfig, chipmunk: ChipmunkConfig, *, batch: int, grid: tuple[int, int, int],
               text_length: int, key: jax.Array | None = None, dtype=jnp.bfloat16) -> ModelCache:
    """The ``ModelCache`` of one generation over the token ``grid`` (``token_grid(config, latents)``) and
    ``text_length`` valid text tokens: per block stack (double, single) the attention caches of its sparse
    layers stacked on a leading axis (None for a stack that is dense at every step), no MLP caches
    (HunyuanVideo runs Chipmunk on attention only), and on the compressed path the static mask over the
    P = image tokens + text_length prefix Chipmunk runs on, bit-packed, with its eligible groups.
    ``key`` draws the static random keys (needed when attention.random_keys > 0 on the compressed path)."""
    _check_chipmunk(config, chipmunk)
    grid = check_grid(grid, 3)
    text_length = non_negative_int("text_length", text_length)
    prefix = math.prod(grid) + text_length
    layer_cache = lambda: init_attention_cache(  # noqa: E731
        chipmunk, batch=batch, seq_len=prefix, heads=config.num_attention_heads, head_dim=config.attention_head_dim,
        dtype=dtype)
    attention = tuple(init_stack_cache(chipmunk.attention, first, count, layer_cache)
                      for first, count in config.block_stacks)
    static_bits = eligible = None
    if chipmunk.attention.compress_indices:
        mask, eligible = static_video_mask(grid, text_length, chipmunk.attention, voxel=chipmunk.reorder.voxel,
                                           key=key)
        static_bits = pack_mask(mask)
    return ModelCache(attention=attention, mlp=(None,) * len(attention), static_mask_bits=static_bits,
                      eligible=eligible)


def cache_bytes_per_layer(config: HunyuanVideoConfig, chipmunk: ChipmunkConfig, *, grid, text_length,
                          batch: int = 1, dtype=jnp.bfloat16) -> dict[str, int]:
    """Bytes of one layer's attention cache by field (plus "total" and the per-generation
    "static_mask_bits"), from abstract shapes (``jax.eval_shape``: nothing is allocated)."""
    one_layer = dataclasses.replace(config, num_layers=1, num_single_layers=0)
    sparse_layer = chipmunk.replace(attention__first_n_dense_layers=0)  # a layer that keeps a cache
    abstract = jax.eval_shape(lambda key: init_cache(one_layer, sparse_layer, batch=batch, grid=grid,
                                                     text_length=text_length, key=key, dtype=dtype),
                              jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
    layer = abstract.attention[0]  # a stack of one layer: its bytes are the layer's
    out = {f.name: cache_bytes(getattr(layer, f.name)) for f in dataclasses.fields(layer)
           if getattr(layer, f.name) is not None}
    out["total"] = cache_bytes(layer)
    out["static_mask_bits"] = cache_bytes(abstract.static_mask_bits)
    return out


# ----------------------------------------------------------------------------------------------
# Forward


def _check_inputs(config, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                  pooled_projections, guidance):
    check_array("hidden_states", hidden_states, 5)
    check_array("encoder_hidden_states", encoder_hidden_states, 3)
    check_array("encoder_attention_mask", encoder_attention_mask, 2)
    check_array("pooled_projections", pooled_projections, 2)
    b, c = hidden_states.shape[:2]
    if c != config.in_channels:
        raise ValueError(f"hidden_states has {c} channels, config.in_channels is {config.in_channels}")
    token_grid(config, hidden_states.shape)
    if encoder_hidden_states.shape[0] != b or encoder_hidden_states.shape[2] != config.text_embed_dim:
        raise ValueError(f"encoder_hidden_states must be [{b}, L, {config.text_embed_dim}], got "
                         f"{tuple(encoder_hidden_states.shape)}")
    if encoder_attention_mask.shape != encoder_hidden_states.shape[:2]:
        raise ValueError(f"encoder_attention_mask must be {tuple(encoder_hidden_states.shape[:2])} (like "
                         f"encoder_hidden_states), got {tuple(encoder_attention_mask.shape)}")
    if pooled_projections.shape != (b, config.pooled_projection_dim):
        raise ValueError(f"pooled_projections must be [{b}, {config.pooled_projection_dim}], got "
                         f"{tuple(pooled_projections.shape)}")
    check_batch_scalar("timestep", timestep, b)
    check_batch_scalar("guidance", guidance, b)
    check_guidance(config.guidance_embeds, guidance, "this HunyuanVideo config")


def _final_layer(params, config, hidden, temb, grid, perm, dtype):
    """norm_out + proj_out on Chipmunk-order ``hidden``, back to raster order, unpatchify; float32."""
    scale, shift = jnp.split(linear(params["norm_out"]["linear"], jax.nn.silu(temb), jnp.float32), 2, axis=-1)
    x = layer_norm(hidden, _EPS) * (1.0 + scale[:, None]) + shift[:, None]
    out = unpermute_tokens(linear(params["proj_out"], x, dtype, jnp.float32), perm)
    return unpatchify(out, grid, config.patch_size_t, config.patch_size)


def head(params: Params, config: HunyuanVideoConfig, hidden: jax.Array, conditioning: Params, *,
         grid: tuple[int, int, int], chipmunk: ChipmunkConfig | None = None, dtype=jnp.bfloat16,
         out_dtype=jnp.float32) -> jax.Array:
    """Final layer only (a skipped step, docs/algorithm.md §4.3): ``norm_out`` conditioned on ``conditioning``
    (``timestep_conditioning`` of the current timestep), ``proj_out``, the inverse voxel permutation (when
    ``chipmunk`` reorders: ``hidden`` is in voxel order then) and unpatchify -> [B, C, F, H, W]."""
    _check_config(config)
    check_array("hidden", hidden, 3)
    grid = check_grid(grid, 3)
    if hidden.shape[1:] != (math.prod(grid), config.inner_dim):
        raise ValueError(f"hidden must be [B, {math.prod(grid)}, {config.inner_dim}] for grid {grid}, got "
                         f"{tuple(hidden.shape)}")
    _check_conditioning(config, conditioning, hidden.shape[0])
    if chipmunk is not None:
        _check_chipmunk(config, chipmunk)
    perm = token_permutation(chipmunk, grid)
    return _final_layer(params, config, hidden, conditioning["temb"], grid, perm,
                        check_compute_dtype(dtype)).astype(out_dtype)


def _text_length(text_length, encoder_attention_mask, num_txt: int) -> int:
    """The static valid text length Chipmunk runs with: given, or read from a concrete mask."""
    if text_length is None:
        return text_length_from_mask(encoder_attention_mask)
    text_length = check_int("text_length", text_length, minimum=0, maximum=num_txt)
    if not isinstance(encoder_attention_mask, jax.core.Tracer) and \
            text_length_from_mask(encoder_attention_mask) != text_length:
        raise ValueError(f"text_length={text_length} does not match encoder_attention_mask")
    return int(text_length)


def forward(
    params: Params, config: HunyuanVideoConfig, *, hidden_states: jax.Array, timestep: jax.Array,
    encoder_hidden_states: jax.Array, encoder_attention_mask: jax.Array, pooled_projections: jax.Array,
    guidance: jax.Array | None = None, chipmunk: ChipmunkConfig | None = None, cache: ModelCache | None = None,
    plan: StepPlan | None = None, key: jax.Array | None = None, text_length: int | None = None,
    rotary_emb: tuple[jax.Array, jax.Array] | None = None, conditioning: Params | None = None, dtype=jnp.bfloat16,
    attention_impl: str | None = None, kernel_impl: str | None = None, mesh=None, probe: str | None = None,
) -> ModelOutput | Probe:
    """HunyuanVideo transformer forward (see the module docstring for shapes) -> ``ModelOutput``.

    Chipmunk: pass ``chipmunk`` (a ChipmunkConfig, e.g. ``chipmunk_jax.config.hunyuan_video()``),
    ``plan`` (``schedule.step_plan(chipmunk, step)``) and ``cache`` (``init_cache``; None builds a fresh one,
    right for step 0, drawing the static random keys from ``key``). ``key`` also seeds the dynamic random
    keys (per layer via ``fold_in``); ``text_length`` is the static valid text length (derived from a concrete
    ``encoder_attention_mask`` when omitted).
    ``rotary_emb``: precomputed ``pos_embed(config, grid)`` (raster order), e.g. passed as a jit argument so
    large tables are not folded into the program as constants. ``conditioning``: ``timestep_conditioning``
    of this call's timestep, computed ahead (the token refiner still reads ``timestep``).
    ``attention_impl``: the dense path's ``jax.nn.dot_product_attention`` implementation; ``kernel_impl``:
    passed to the Chipmunk ops. The output's ``hidden`` is the image hidden state [B, N, D] (float32) after
    the last single block, in voxel order under Chipmunk. ``mesh``: a ``parallel.make_mesh`` mesh: the joint
    attention runs sequence-parallel over its "sequence" axis (Ulysses), the token refiner replicated; when the
    image + text tokens do not split evenly, masked text tokens are appended (as the prompt's own padding).
    ``probe``: a step-caching policy's probe kind (``step_policies.PROBE_KINDS``, docs/algorithm.md §4.5): run only
    the embeddings ("modulated_input": block 0's modulated image input) or also the first block ("first_block": its
    image residual), densely and in Chipmunk's token order, and return a ``step_policies.Probe`` whose ``base``
    lives in the space of ``hidden``; the Chipmunk cache, plan and key are not used.
    """
    _check_config(config)
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of parameters, got {type(params).__name__}")
    _check_inputs(config, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                  pooled_projections, guidance)
    _check_params(params, config)
    dtype = check_compute_dtype(dtype)
    if chipmunk is None and (cache is not None or plan is not None):
        raise ValueError("cache and plan are only used with chipmunk; pass chipmunk=ChipmunkConfig(...)")
    if chipmunk is not None:
        _check_chipmunk(config, chipmunk)
    if probe is not None:
        check_probe_kind(probe)
    batch = hidden_states.shape[0]
    num_txt = encoder_hidden_states.shape[1]
    grid = token_grid(config, hidden_states.shape)
    num_img = math.prod(grid)

    tokens = patchify(hidden_states, config.patch_size_t, config.patch_size)
    if rotary_emb is None:
        rotary_emb = pos_embed(config, grid)
    else:
        check_rotary_emb(rotary_emb, num_img, config.attention_head_dim)
    if conditioning is None:
        conditioning = timestep_conditioning(params, config, timestep=timestep,
                                             pooled_projections=pooled_projections, guidance=guidance)
    else:
        _check_conditioning(config, conditioning, batch)

    pad = 0
    if mesh is not None:
        parallel.check_heads("HunyuanVideo", config.num_attention_heads, mesh)
        pad = parallel.sequence_padding(num_img + num_txt, mesh)
    run = perm = None
    if chipmunk is not None:
        if probe is None:  # a probe runs dense: it keeps Chipmunk's token order only
            run = _chipmunk_run(config, chipmunk, plan, cache, key, grid=grid, batch=batch, num_img=num_img,
                                text_length=_text_length(text_length, encoder_attention_mask, num_txt), dtype=dtype,
                                kernel_impl=kernel_impl, attention_impl=attention_impl, mesh=mesh)
            cache = run.cache
        perm = token_permutation(chipmunk, grid)
        tokens = permute_tokens(tokens, perm)
        rotary_emb = parallel.replicate(tuple(permute_tokens(jnp.asarray(t), perm, axis=0) for t in rotary_emb),
                                        mesh)

    temb = conditioning["temb"]
    double_replace = single_replace = None
    if config.image_condition_type == "token_replace":
        first_frame = np.arange(num_img) < grid[1] * grid[2]  # raster order: latent frame 0 first
        if perm is not None:
            first_frame = first_frame[perm]
        replace_temb = conditioning["token_replace_temb"]
        double_replace = (replace_temb, jnp.asarray(first_frame))
        single_replace = (replace_temb, jnp.asarray(np.concatenate([first_frame, np.zeros(num_txt + pad, bool)])))
    img = linear(params["x_embedder"]["proj"], tokens, dtype, jnp.float32)
    txt = token_refiner(params["context_embedder"], config, encoder_hidden_states, batch_vector(timestep, batch),
                        encoder_attention_mask, dtype)
    # Right-padded text after the image: the valid keys are a prefix of the joint sequence.
    key_lengths = num_img + jnp.sum(encoder_attention_mask.astype(jnp.int32), axis=1)
    if (not pad and not isinstance(encoder_attention_mask, jax.core.Tracer)
            and np.all(np.asarray(encoder_attention_mask))):
        key_lengths = None  # nothing padded: the unmasked (faster) dense attention path
    if pad:  # on a mesh: more masked text tokens, so the joint sequence splits evenly over the sequence axis
        txt = jnp.pad(txt, ((0, 0), (0, pad), (0, 0)))
    rope = _joint_rotary(rotary_emb, num_txt + pad)

    block_kw = dict(head_dim=config.attention_head_dim, key_lengths=key_lengths, dtype=dtype,
                    attention_impl=attention_impl)
    default_ops = None
    if mesh is not None:  # the image + text joint attention, sequence-parallel; the text refiner stays replicated
        default_ops = {"attention_op": sequence_parallel_dense_attention(mesh, attention_impl, key_lengths)}

    def double(block, _, state, ops):
        img, txt = state
        txt, img, slots = mmdit.double_block(block, img, txt, temb, rope, text_first=False, **block_kw,
                                             token_replace=double_replace, **ops)
        return (img, txt), slots

    def single(block, _, joint, ops):
        return mmdit.single_block(block, joint, temb, rope, **block_kw, token_replace=single_replace, **ops)

    if probe is not None:
        return _probe(probe, params, img, txt, temb, double_replace, double, single, default_ops or {})
    (double_first, _), (single_first, _) = config.block_stacks
    (img, txt), run = scan_blocks(double, params.get("transformer_blocks"), (img, txt), first_layer=double_first,
                                  run=run, stack_index=0, default_ops=default_ops)
    joint, run = scan_blocks(single, params.get("single_transformer_blocks"), jnp.concatenate([img, txt], axis=1),
                             first_layer=single_first, run=run, stack_index=1, default_ops=default_ops)
    cache = None if run is None else run.cache
    hidden = joint[:, :num_img]
    sample = _final_layer(params, config, hidden, temb, grid, perm, dtype)
    return ModelOutput(sample=sample.astype(hidden_states.dtype), hidden=hidden, cache=cache)


def _chipmunk_run(config, chipmunk, plan, cache, key, *, grid, batch, num_img, text_length, dtype, kernel_impl,
                  attention_impl, mesh) -> ChipmunkRun:
    """``forward``'s Chipmunk prelude: Chipmunk runs on the prefix [image; valid text] (``text_length`` tokens)."""
    prefix = num_img + text_length
    if prefix < chipmunk.attention.group_size:
        raise ValueError(f"Chipmunk needs at least attention.group_size={chipmunk.attention.group_size} "
                         f"image + valid text tokens, got {prefix}")
    init = lambda: init_cache(  # noqa: E731
        config, chipmunk, batch=batch, grid=grid, text_length=text_length,
        key=None if key is None else jax.random.fold_in(key, _STATIC_MASK_STREAM), dtype=dtype)
    return ChipmunkRun.start(chipmunk, plan, cache, key, stacks=config.block_stacks, init_cache=init,
                             kernel_impl=kernel_impl, prefix=prefix, attention_impl=attention_impl,
                             num_tokens=prefix, mesh=mesh)


def _probe(kind: str, params: Params, img, txt, temb, token_replace, double, single, ops) -> Probe:
    """``forward``'s probe (docs/algorithm.md §4.5) from the embedded image tokens (Chipmunk's order) and refined
    text: block 0 is the first double block, or the first single block of a model without double blocks (image
    rows of its joint output). ``token_replace``: the image tokens' I2V token replace (or None)."""
    name = "transformer_blocks" if num_blocks(params.get("transformer_blocks")) else "single_transformer_blocks"
    if not num_blocks(params.get(name)):
        raise ValueError("a step-caching probe needs a block: this HunyuanVideo config has none")
    block, double_first = block_at(params[name], 0), name == "transformer_blocks"
    if kind == "modulated_input":
        signal = mmdit.modulated_input(block, img, temb, double=double_first, token_replace=token_replace)
        return Probe(signal=signal, base=img)
    if double_first:
        (out, _), _ = double(block, None, (img, txt), ops)
    else:
        joint, _ = single(block, None, jnp.concatenate([img, txt], axis=1), ops)
        out = joint[:, :img.shape[1]]
    return Probe(signal=out - img, base=out)


# ----------------------------------------------------------------------------------------------
# Sampling


def denoiser(config: HunyuanVideoConfig, chipmunk: ChipmunkConfig | None = None, *, grid, text_length: int,
             rotary_emb: tuple[jax.Array, jax.Array] | None = None, dtype=jnp.bfloat16,
             attention_impl: str | None = None, kernel_impl: str | None = None, mesh=None) -> Denoiser:
    """A ``chipmunk_jax.sampling.Denoiser`` for flow-matching sampling with step caching.

    ``cond`` is a dict with encoder_hidden_states, encoder_attention_mask, pooled_projections and (for
    guidance_embeds) guidance; the sampler's sigma in [0, 1] becomes timestep = 1000 * sigma (the
    pipeline's scheduler timesteps). The conditioning of every step is computed before the loop
    (``timestep_tables``); velocities come back in float32. ``grid``: the (frames, height, width) token grid;
    ``rotary_emb``: ``pos_embed(config, grid)``, passed in so large tables are computed once, outside the loop.
    """
    _check_config(config)
    if chipmunk is not None:
        _check_chipmunk(config, chipmunk)
    model_kw = dict(rotary_emb=rotary_emb, attention_impl=attention_impl)
    if chipmunk is not None:
        model_kw["text_length"] = text_length
    return model_denoiser(
        config, chipmunk, forward=forward, head=head, grid=check_grid(grid, 3), dtype=dtype, timestep_scale=1000.0,
        kernel_impl=kernel_impl, mesh=mesh, model_kw=model_kw,
        conditioning=lambda params, timestep, cond: timestep_conditioning(
            params, config, timestep=timestep, pooled_projections=cond["pooled_projections"],
            guidance=cond.get("guidance")))
