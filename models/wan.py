"""Wan 2.1 transformer (diffusers ``WanTransformer3DModel``) as pure functions, with Chipmunk inside.

Params: a nested dict whose paths joined by "." are the diffusers state-dict names, with each
``weight`` renamed ``kernel`` (Linear and the patch Conv3d: the torch weight with its axes reversed,
so a Linear kernel is [in, out] and the patch kernel [pw, ph, pt, in, out]) or ``scale`` (RMSNorm and
affine LayerNorm). ``blocks`` is ONE tree whose arrays carry a leading layer axis, run with ``lax.scan``
(``models.block_stack``); ModuleList indices inside a block stay string keys
(``attn1["to_out"]["0"]``, ``ffn["net"]["0"]["proj"]``). Converters: ``chipmunk_jax.ports.wan``.

``forward`` mirrors diffusers' keywords and shapes:
  hidden_states [B, C, F, H, W] (latents), timestep [B] (raw, in [0, 1000]: no x1000 inside) or per token
  [B, N] in raster token order (Wan 2.2 TI2V, diffusers' ``expand_timesteps``: per-token modulation),
  encoder_hidden_states [B, L, text_dim] (umT5 states, zero-padded, never masked: as diffusers),
  encoder_hidden_states_image [B, 257, image_dim] (CLIP states, I2V models only).
It returns a ``ModelOutput`` whose ``sample`` is [B, out_channels, F, H, W] in hidden_states' dtype (the
model contract of docs/architecture.md §4, shared with FLUX and HunyuanVideo). The image and text contexts
are kept apart, so I2V needs no hard-coded text length (diffusers' processor assumes L == 512; with
L == 512 the two agree). Timestep embedding, RoPE, norms, modulation and the residual stream are float32;
matmuls run in ``dtype``.

Chipmunk (docs/algorithm.md §5.3): only self-attention (``attn1``) is sparse-delta; cross-attention stays
dense. With ``reorder.kind == "voxels"`` the video tokens (and their RoPE rows) are permuted to (4, 6, 8)
voxel order after the patch embedding; ``sample`` is permuted back, ``hidden`` stays in voxel order. The
static column mask (local voxel window + static random keys, docs/algorithm.md §1.6) is drawn once per
generation by ``init_cache`` and lives bit-packed in the cache. CFG: each branch (cond / uncond) has its own
cache; build both with ``init_branch_caches`` and pass ``chipmunk_jax.cache.select_branch(caches, i)`` to
``forward``.
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
from chipmunk_jax.cache import BranchCaches, ModelCache, init_stack_cache, offload_layer_caches, stack_branches
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.mlp import init_mlp_cache
from chipmunk_jax.models.block_stack import block_at, check_block_stack, scan_blocks
from chipmunk_jax.models.chipmunk_ops import ChipmunkRun, check_chipmunk, permute_tokens, token_permutation
from chipmunk_jax.models.chipmunk_ops import unpermute_tokens
from chipmunk_jax.models.denoising import model_denoiser
from chipmunk_jax.models.diffusers_config import DiffusersConfig
from chipmunk_jax.models.inputs import batch_vector, check_array, check_batch_scalar, check_compute_dtype, check_grid
from chipmunk_jax.models.inputs import check_rotary_emb
from chipmunk_jax.models.layers import (
    affine_layer_norm,
    apply_rotary_emb,
    gelu_tanh,
    layer_norm,
    linear,
    linear_init,
    rms_norm,
    rotary_tables,
    split_heads,
    timestep_embedding,
    timestep_sinusoids,
)
from chipmunk_jax.models.mmdit import dense_attention, dense_mlp
from chipmunk_jax.models.parallel_ops import sequence_parallel_dense_attention
from chipmunk_jax.outputs import ModelOutput
from chipmunk_jax.sampling import Denoiser
from chipmunk_jax.schedule import StepPlan
from chipmunk_jax.selection import pack_mask, static_video_mask
from chipmunk_jax.step_policies import Probe, check_probe_kind
from chipmunk_jax.validation import (
    check_bool,
    check_choice,
    check_int_tuple,
    check_number,
    field,
    non_negative_int,
    optional,
    positive_int,
)

__all__ = [
    "WanConfig",
    "forward",
    "head",
    "timestep_conditioning",
    "init_params",
    "init_cache",
    "init_branch_caches",
    "denoiser",
    "pos_embed",
    "rope_dims",
    "token_grid",
    "WAN_THETA",
]

Params = dict[str, Any]
WAN_THETA = 10000.0
_IMAGE_NORM_EPS = 1e-5  # WanImageEmbedding's FP32LayerNorms keep torch's default eps


@dataclasses.dataclass(frozen=True)
class WanConfig(DiffusersConfig):
    """``WanTransformer3DModel`` constructor arguments (diffusers names and defaults = Wan2.1-T2V-14B)."""

    DIFFUSERS_CLASS: ClassVar[str] = "WanTransformer3DModel"

    patch_size: tuple[int, int, int] = field((1, 2, 2), check=partial(check_int_tuple, length=3))
    num_attention_heads: int = field(40, check=positive_int)
    attention_head_dim: int = field(128, check=positive_int)
    in_channels: int = field(16, check=positive_int)
    out_channels: int | None = field(16, check=optional(positive_int))
    text_dim: int = field(4096, check=positive_int)
    freq_dim: int = field(256, check=positive_int)
    ffn_dim: int = field(13824, check=positive_int)
    num_layers: int = field(40, check=non_negative_int)
    cross_attn_norm: bool = field(True, check=check_bool)
    # diffusers' WanAttention always builds across-heads RMSNorms, whatever qk_norm says: the only Wan variant
    qk_norm: str | None = field("rms_norm_across_heads", check=partial(check_choice, choices=("rms_norm_across_heads",)))
    eps: float = field(1e-6, check=partial(check_number, positive=True))
    image_dim: int | None = field(None, check=optional(positive_int))
    added_kv_proj_dim: int | None = field(None, check=optional(positive_int))
    rope_max_seq_len: int = field(1024, check=positive_int)
    pos_embed_seq_len: int | None = field(None, check=optional(positive_int))

    def _check(self):
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")
        if self.added_kv_proj_dim is not None and self.image_dim is None:
            raise ValueError("added_kv_proj_dim needs image_dim (the image embedder feeds add_k_proj/add_v_proj)")
        if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.inner_dim:
            # the image embedder outputs inner_dim features, which add_k_proj/add_v_proj then take
            raise ValueError(f"added_kv_proj_dim must equal the inner dim {self.inner_dim}, got {self.added_kv_proj_dim}")
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError("pos_embed_seq_len needs image_dim")
        if any(d % 2 for d in rope_dims(self.attention_head_dim)):
            raise ValueError(f"attention_head_dim {self.attention_head_dim} gives odd RoPE axis sizes "
                             f"{rope_dims(self.attention_head_dim)}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def patch_features(self) -> int:
        return math.prod(self.patch_size)

    @property
    def num_sparse_layers(self) -> int:
        return self.num_layers

    @property
    def block_stacks(self) -> tuple[tuple[int, int], ...]:
        """(first layer, count) of the one block stack, in Chipmunk's layer numbering."""
        return ((0, self.num_layers),)


    @classmethod
    def t2v_1_3b(cls) -> "WanConfig":
        return cls(num_attention_heads=12, ffn_dim=8960, num_layers=30)

    @classmethod
    def t2v_14b(cls) -> "WanConfig":
        return cls()

    @classmethod
    def i2v_14b(cls) -> "WanConfig":
        """Wan2.1-I2V-14B (480P and 720P share the config): 36 input channels (noise + condition + mask)."""
        return cls(in_channels=36, image_dim=1280, added_kv_proj_dim=5120)

    # Wan 2.2 (docs/models.md §3.4). The A14B models are two Wan2.1-14B-shaped experts each (diffusers
    # ``transformer`` = high noise, ``transformer_2`` = low noise; both experts share one config).
    @classmethod
    def t2v_a14b(cls) -> "WanConfig":
        """One expert of Wan2.2-T2V-A14B: the Wan2.1-T2V-14B shape."""
        return cls()

    @classmethod
    def i2v_a14b(cls) -> "WanConfig":
        """One expert of Wan2.2-I2V-A14B: 36 input channels (noise + condition + mask) like Wan2.1-I2V-14B, but
        no CLIP image embedder (image_dim / added_kv_proj_dim None: the image enters through the latents only)."""
        return cls(in_channels=36)

    @classmethod
    def ti2v_5b(cls) -> "WanConfig":
        """Wan2.2-TI2V-5B: 48-channel Wan2.2-VAE latents in and out, 24 heads x 128 (D 3072), ffn 14336, 30 blocks;
        its pipeline passes per-token timesteps [B, N] (``expand_timesteps``: the first latent frame at t = 0 for
        image conditioning)."""
        return cls(num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30)


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) RoPE sizes of ``WanRotaryPosEmbed``: h = w = 2 (head_dim // 6), t takes the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def token_grid(config: WanConfig, latent_shape) -> tuple[int, int, int]:
    """(frames, height, width) of the patch-token grid for latents [B, C, F, H, W] (or their shape)."""
    shape = tuple(getattr(latent_shape, "shape", latent_shape))
    if len(shape) != 5:
        raise ValueError(f"latent_shape must be [B, C, F, H, W], got {shape}")
    f, h, w = (int(s) for s in shape[2:])
    for name, size, p in zip(("frames", "height", "width"), (f, h, w), config.patch_size):
        if size % p:
            raise ValueError(f"latent {name} {size} is not a multiple of the patch size {p}")
    return f // config.patch_size[0], h // config.patch_size[1], w // config.patch_size[2]


# ----------------------------------------------------------------------------------------------
# Parameters


def init_params(config: WanConfig, key: jax.Array, dtype=jnp.bfloat16) -> Params:
    """Random parameters with torch's default inits (norm scales 1, biases 0, scale_shift_table
    randn / sqrt(D) as diffusers); for tests and timing."""
    if not isinstance(config, WanConfig):
        raise TypeError(f"config must be a WanConfig, got {type(config).__name__}")
    d, f = config.inner_dim, config.ffn_dim
    key, blocks_key = jax.random.split(key)
    keys = iter(jax.random.split(key, 16))
    lin = lambda i, o: linear_init(next(keys), i, o, dtype)  # noqa: E731
    rms = lambda: {"scale": jnp.ones((d,), dtype)}  # noqa: E731
    affine = lambda n: {"scale": jnp.ones((n,), dtype), "bias": jnp.zeros((n,), dtype)}  # noqa: E731
    table = lambda key, n: jax.random.normal(key, (1, n, d), dtype) / np.sqrt(d)  # noqa: E731

    def attention(lin, cross):
        attn = {name: lin(d, d) for name in ("to_q", "to_k", "to_v")}
        attn.update({"to_out": {"0": lin(d, d)}, "norm_q": rms(), "norm_k": rms()})
        if cross and config.added_kv_proj_dim is not None:
            attn.update({"add_k_proj": lin(config.added_kv_proj_dim, d), "add_v_proj": lin(config.added_kv_proj_dim, d),
                         "norm_added_k": rms()})
        return attn

    def block(key):
        keys = iter(jax.random.split(key, 16))
        lin = lambda i, o: linear_init(next(keys), i, o, dtype)  # noqa: E731
        out = {"scale_shift_table": table(next(keys), 6), "attn1": attention(lin, False),
               "attn2": attention(lin, True), "ffn": {"net": {"0": {"proj": lin(d, f)}, "2": lin(f, d)}}}
        if config.cross_attn_norm:
            out["norm2"] = affine(d)
        return out

    patch_in = config.in_channels * config.patch_features
    patch = linear_init(next(keys), patch_in, d, dtype)
    pt, ph, pw = config.patch_size
    patch["kernel"] = patch["kernel"].reshape(pw, ph, pt, config.in_channels, d)
    condition_embedder = {
        "time_embedder": {"linear_1": lin(config.freq_dim, d), "linear_2": lin(d, d)},
        "time_proj": lin(d, 6 * d),
        "text_embedder": {"linear_1": lin(config.text_dim, d), "linear_2": lin(d, d)},
    }
    if config.image_dim is not None:
        image = {"norm1": affine(config.image_dim), "ff": {"net": {"0": {"proj": lin(config.image_dim, config.image_dim)},
                                                                   "2": lin(config.image_dim, d)}},
                 "norm2": affine(d)}
        if config.pos_embed_seq_len is not None:
            image["pos_embed"] = jnp.zeros((1, config.pos_embed_seq_len, config.image_dim), dtype)
        condition_embedder["image_embedder"] = image
    return {
        "patch_embedding": patch,
        "condition_embedder": condition_embedder,
        "blocks": jax.vmap(block)(jax.random.split(blocks_key, config.num_layers)),
        "proj_out": lin(d, config.patch_features * config.output_channels),
        "scale_shift_table": table(next(keys), 2),
    }


# ----------------------------------------------------------------------------------------------
# Positions


def pos_embed(config: WanConfig, grid) -> tuple[jax.Array, jax.Array]:
    """``WanRotaryPosEmbed`` tables for a raster (F', H', W') token grid: ([N, head_dim], [N, head_dim]) f32,
    computed in float64 as diffusers. Pass them as ``forward(..., rotary_emb=...)`` under jit to keep
    large tables out of the compiled constants."""
    _check_config(config)
    grid = check_grid(grid, 3)
    for name, size in zip(("frames", "height", "width"), grid):
        if size > config.rope_max_seq_len:
            raise ValueError(f"token grid {name} {size} exceeds rope_max_seq_len={config.rope_max_seq_len}")
    ids = np.stack(np.meshgrid(*(np.arange(s) for s in grid), indexing="ij"), axis=-1).reshape(-1, 3)
    return rotary_tables(ids, rope_dims(config.attention_head_dim), WAN_THETA)


# ----------------------------------------------------------------------------------------------
# Chipmunk cache


def _check_config(config) -> None:
    if not isinstance(config, WanConfig):
        raise TypeError(f"config must be a WanConfig, got {type(config).__name__}")


def _check_chipmunk(config, chipmunk) -> None:
    _check_config(config)
    check_chipmunk("Wan", chipmunk, reorder_kinds=("none", "voxels"))


def init_cache(config: WanConfig, chipmunk: ChipmunkConfig, *, batch: int, grid: tuple[int, int, int],
               key: jax.Array | None = None, dtype=jnp.bfloat16) -> ModelCache:
    """The ``ModelCache`` of ONE invocation branch over the (F', H', W') token ``grid`` (``token_grid``): the
    attention and the MLP caches of the sparse blocks, each stacked on a leading layer axis in a one-stack tuple
    (None when no block ever leaves the dense path, e.g. the MLP when chipmunk.mlp is off) and the bit-packed
    static mask (docs/algorithm.md §1.6), drawn here, once per generation, from ``key`` (required when
    attention.random_keys > 0)."""
    _check_chipmunk(config, chipmunk)
    grid = check_grid(grid, 3)
    n = math.prod(grid)
    attention = init_stack_cache(chipmunk.attention, 0, config.num_layers, lambda: init_attention_cache(
        chipmunk, batch=batch, seq_len=n, heads=config.num_attention_heads, head_dim=config.attention_head_dim,
        dtype=dtype))
    mlp = init_stack_cache(chipmunk.mlp, 0, config.num_layers, lambda: init_mlp_cache(
        chipmunk, batch=batch, seq_len=n, in_features=config.inner_dim, hidden_features=config.ffn_dim,
        out_features=config.inner_dim, dtype=dtype))
    static_mask, eligible = static_video_mask(grid, 0, chipmunk.attention, voxel=chipmunk.reorder.voxel, key=key)
    return ModelCache(attention=(attention,), mlp=(mlp,), static_mask_bits=pack_mask(static_mask), eligible=eligible)


def init_branch_caches(config: WanConfig, chipmunk: ChipmunkConfig, *, batch: int, grid: tuple[int, int, int],
                       key: jax.Array | None = None, dtype=jnp.bfloat16, offload: bool = False, stacked: bool = False):
    """One cache per CFG branch (``chipmunk.invocations_per_step`` of them: cond, uncond); the branches share one
    static mask draw, as the original. Pass ``chipmunk_jax.cache.select_branch(caches, i)`` to ``forward`` and store
    its new cache back with ``update_branch``.

    Default: separate per-branch pytrees (``cache.BranchCaches``), which XLA updates in place on one device.
    ``stacked=True``: one array per leaf with a leading branch axis (``cache.stack_branches``), the layout a mesh
    shards over "cfg"; on one device each call then slices its branch out and writes it back (Wan2.1-14B 720p's
    50-step sampler: 107 GiB of temporaries instead of 14, benchmarks/RESULTS.md §12.4). ``offload=True``: the
    per-branch layer caches in pinned host memory (``cache.offload_layer_caches``): two 720p branches of
    Wan2.1-14B hold ~66 GiB of caches, more than an 80 GB H100 keeps beside the weights."""
    if offload and stacked:
        raise ValueError("offload=True keeps the branches as separate pytrees: it cannot be stacked=True")
    make = lambda: init_cache(config, chipmunk, batch=batch, grid=grid, key=key, dtype=dtype)  # noqa: E731
    if stacked:
        return stack_branches(make(), chipmunk.invocations_per_step)
    # each branch built on its own (the same key: the same static mask), offloaded before the next one exists
    return BranchCaches(offload_layer_caches(make()) if offload else make()
                        for _ in range(chipmunk.invocations_per_step))


# ----------------------------------------------------------------------------------------------
# Building blocks


def _attention_projection(attn, name, norm, x, head_dim, dtype, eps):
    """``norm(to_x(x))`` across all heads (``rms_norm_across_heads``), then the head split."""
    y = linear(attn[name], x, dtype)
    if norm is not None:
        y = rms_norm(attn[norm], y, eps)
    return split_heads(y.astype(dtype), head_dim)


def _self_attention(attn, x, rope, *, head_dim, dtype, eps, attention_op, attention_impl):
    q = _attention_projection(attn, "to_q", "norm_q", x, head_dim, dtype, eps)
    k = _attention_projection(attn, "to_k", "norm_k", x, head_dim, dtype, eps)
    v = _attention_projection(attn, "to_v", None, x, head_dim, dtype, eps)
    q, k = apply_rotary_emb(q, rope), apply_rotary_emb(k, rope)
    if attention_op is None:
        out, aux = dense_attention(q, k, v, implementation=attention_impl), None
    else:
        out, aux = attention_op(q, k, v)
    return linear(attn["to_out"]["0"], out.reshape(*out.shape[:2], -1).astype(dtype), dtype, jnp.float32), aux


def _cross_attention(attn, x, text, image, *, head_dim, dtype, eps, attention_impl):
    """Dense cross-attention to the text context; with ``add_k_proj`` (I2V) a second attention over the
    image context is added before ``to_out`` (diffusers' processor)."""
    q = _attention_projection(attn, "to_q", "norm_q", x, head_dim, dtype, eps)
    k = _attention_projection(attn, "to_k", "norm_k", text, head_dim, dtype, eps)
    v = _attention_projection(attn, "to_v", None, text, head_dim, dtype, eps)
    out = dense_attention(q, k, v, implementation=attention_impl).astype(jnp.float32)
    if "add_k_proj" in attn:
        k_img = _attention_projection(attn, "add_k_proj", "norm_added_k", image, head_dim, dtype, eps)
        v_img = _attention_projection(attn, "add_v_proj", None, image, head_dim, dtype, eps)
        out = out + dense_attention(q, k_img, v_img, implementation=attention_impl).astype(jnp.float32)
    return linear(attn["to_out"]["0"], out.reshape(*out.shape[:2], -1).astype(dtype), dtype, jnp.float32)


def _modulation(params, timestep_proj):
    """A block's six modulation vectors (shift, scale, gate of the self-attention, then of the MLP), float32,
    broadcastable over x [B, N, D]: [B, 1, D] each, or [B, N, D] for a per-token timestep (Wan 2.2 TI2V)."""
    if timestep_proj.ndim == 4:  # per-token (Wan 2.2 TI2V): [B, N, 6, D]
        modulation = params["scale_shift_table"].astype(jnp.float32)[:, None] + timestep_proj
        return tuple(modulation[:, :, i] for i in range(6))
    modulation = params["scale_shift_table"].astype(jnp.float32) + timestep_proj  # [B, 6, D]
    return tuple(modulation[:, i][:, None] for i in range(6))


def _modulated_input(x, shift, scale, eps):
    """``norm1(x) * (1 + scale) + shift``, float32: what the self-attention reads (TeaCache's signal)."""
    return layer_norm(x, eps) * (1.0 + scale) + shift


def _block(params, x, text, image, timestep_proj, rope, *, config, dtype, attention_op, mlp_op, attention_impl):
    """One ``WanTransformerBlock`` on the float32 residual stream x [B, N, D]."""
    eps, hd = config.eps, config.attention_head_dim
    shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = _modulation(params, timestep_proj)

    norm = _modulated_input(x, shift_msa, scale_msa, eps).astype(dtype)
    attn_out, attn_aux = _self_attention(params["attn1"], norm, rope, head_dim=hd, dtype=dtype, eps=eps,
                                         attention_op=attention_op, attention_impl=attention_impl)
    x = x + attn_out * gate_msa

    norm = affine_layer_norm(params["norm2"], x, eps) if config.cross_attn_norm else x
    x = x + _cross_attention(params["attn2"], norm.astype(dtype), text, image, head_dim=hd, dtype=dtype, eps=eps,
                             attention_impl=attention_impl)

    norm = (layer_norm(x, eps) * (1.0 + c_scale) + c_shift).astype(dtype)
    ffn = params["ffn"]["net"]
    weights = (ffn["0"]["proj"]["kernel"], ffn["0"]["proj"]["bias"], ffn["2"]["kernel"], ffn["2"]["bias"])
    if mlp_op is None:
        ff_out, mlp_aux = dense_mlp(norm, *weights, dtype=dtype)
    else:
        ff_out, mlp_aux = mlp_op(norm, *weights)
    x = x + ff_out.astype(jnp.float32) * c_gate
    return x, (attn_aux, mlp_aux)


def timestep_conditioning(params: Params, config: WanConfig, *, timestep, batch: int | None = None) -> Params:
    """The timestep-conditioned embeddings (float32), as ``WanTimeTextImageEmbedding``'s time path:
    ``{"temb": [B, D], "timestep_proj": [B, 6, D]}`` for ``forward(..., conditioning=)`` and ``head``.
    ``timestep``: scalar or [B] in [0, 1000]; ``batch`` broadcasts a scalar timestep (default: its size).
    A per-token timestep [B, N] (or [1, N]; Wan 2.2 TI2V, diffusers' ``expand_timesteps``) gives per-token
    ``{"temb": [B, N, D], "timestep_proj": [B, N, 6, D]}`` in raster token order."""
    _check_config(config)
    if jnp.ndim(timestep) == 2:
        return _token_conditioning(params, config, timestep, batch)
    batch = max(1, int(jnp.size(timestep))) if batch is None else batch
    check_batch_scalar("timestep", timestep, batch)
    timestep = batch_vector(timestep, batch)
    cond = params["condition_embedder"]
    temb = timestep_embedding(cond["time_embedder"], timestep_sinusoids(timestep, config.freq_dim))
    timestep_proj = linear(cond["time_proj"], jax.nn.silu(temb), jnp.float32).reshape(batch, 6, -1)
    return {"temb": temb, "timestep_proj": timestep_proj}


def _token_conditioning(params, config, timestep, batch):
    """Per-token conditioning of a [B, N] timestep, as diffusers: the sinusoids and embedders of the flattened
    B * N timesteps, unflattened to [B, N, ...]."""
    timestep = jnp.asarray(timestep, jnp.float32)
    batch = timestep.shape[0] if batch is None else batch
    if timestep.shape[0] not in (1, batch):
        raise ValueError(f"a per-token timestep must be [{batch}, N] (or [1, N]), got shape {timestep.shape}")
    timestep = jnp.broadcast_to(timestep, (batch, timestep.shape[1]))
    cond = params["condition_embedder"]
    temb = timestep_embedding(cond["time_embedder"], timestep_sinusoids(timestep.reshape(-1), config.freq_dim))
    timestep_proj = linear(cond["time_proj"], jax.nn.silu(temb), jnp.float32)
    return {"temb": temb.reshape(*timestep.shape, -1), "timestep_proj": timestep_proj.reshape(*timestep.shape, 6, -1)}


def _check_conditioning(config: WanConfig, conditioning, batch: int, num_tokens: int | None = None) -> None:
    if not isinstance(conditioning, dict) or set(conditioning) != {"temb", "timestep_proj"}:
        raise ValueError("conditioning must come from wan.timestep_conditioning (keys 'temb', 'timestep_proj')")
    shape = tuple(conditioning["timestep_proj"].shape)
    if shape == (batch, num_tokens, 6, config.inner_dim) and conditioning["temb"].ndim == 3:
        return  # per-token (Wan 2.2 TI2V)
    if shape != (batch, 6, config.inner_dim):
        per_token = "" if num_tokens is None else f" or [{batch}, {num_tokens}, 6, {config.inner_dim}]"
        raise ValueError(f"conditioning['timestep_proj'] must be [{batch}, 6, {config.inner_dim}]{per_token}, got "
                         f"{shape}")


def _context(params, config, encoder_hidden_states, encoder_hidden_states_image, dtype):
    """(text context, image context or None), as ``WanTimeTextImageEmbedding``'s text and image paths."""
    text = params["text_embedder"]
    context = gelu_tanh(linear(text["linear_1"], encoder_hidden_states, dtype, jnp.float32))
    context = linear(text["linear_2"], context, dtype)
    image = None
    if encoder_hidden_states_image is not None:
        emb = params["image_embedder"]
        x = encoder_hidden_states_image.astype(jnp.float32)
        if "pos_embed" in emb:
            # FLF2V: first and last frame CLIP states of one sample are joined (diffusers' view)
            x = x.reshape(-1, 2 * x.shape[1], x.shape[2]) + emb["pos_embed"].astype(jnp.float32)
        x = affine_layer_norm(emb["norm1"], x, _IMAGE_NORM_EPS)
        x = jax.nn.gelu(linear(emb["ff"]["net"]["0"]["proj"], x, dtype, jnp.float32), approximate=False)
        x = linear(emb["ff"]["net"]["2"], x, dtype, jnp.float32)
        image = affine_layer_norm(emb["norm2"], x, _IMAGE_NORM_EPS).astype(dtype)
    return context, image


def _patchify(params, config, hidden_states, dtype):
    b, c, f, h, w = hidden_states.shape
    pt, ph, pw = config.patch_size
    x = hidden_states.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    # to the patch kernel's (pw, ph, pt, c) feature order (the torch Conv3d weight, axes reversed)
    x = x.transpose(0, 2, 4, 6, 7, 5, 3, 1).reshape(b, (f // pt) * (h // ph) * (w // pw), -1)
    kernel = params["patch_embedding"]["kernel"].reshape(-1, config.inner_dim)
    return linear({"kernel": kernel, "bias": params["patch_embedding"]["bias"]}, x, dtype, jnp.float32)


def _final_layer(params, config, hidden, temb, grid, perm, dtype):
    """Final norm with (shift, scale) = table + temb, ``proj_out``, Chipmunk order back to raster order and
    unpatchify -> [B, C, F, H, W] f32."""
    table = params["scale_shift_table"].astype(jnp.float32)[0]  # [2, D]
    if temb.ndim == 3:  # per-token (Wan 2.2 TI2V): [B, N, D] in raster order, to the hidden state's token order
        temb = permute_tokens(temb, perm)
        shift, scale = table[0] + temb, table[1] + temb
    else:
        modulation = table[:, None, :] + temb[None]  # [2, B, D]
        shift, scale = modulation[0][:, None], modulation[1][:, None]
    x = (layer_norm(hidden, config.eps) * (1.0 + scale) + shift).astype(dtype)
    x = unpermute_tokens(linear(params["proj_out"], x, dtype, jnp.float32), perm)
    b = x.shape[0]
    (f, h, w), (pt, ph, pw) = grid, config.patch_size
    # proj_out features are (pt, ph, pw, c): channel last
    x = x.reshape(b, f, h, w, pt, ph, pw, -1).transpose(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, -1, f * pt, h * ph, w * pw)


# ----------------------------------------------------------------------------------------------
# Forward


def _check_inputs(config, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image):
    check_array("hidden_states", hidden_states, 5)
    check_array("encoder_hidden_states", encoder_hidden_states, 3)
    b, c = hidden_states.shape[:2]
    if c != config.in_channels:
        raise ValueError(f"hidden_states has {c} channels, config.in_channels is {config.in_channels}")
    grid = token_grid(config, hidden_states.shape)
    for name, size in zip(("frames", "height", "width"), grid):
        if size > config.rope_max_seq_len:
            raise ValueError(f"hidden_states token {name} {size} exceeds rope_max_seq_len={config.rope_max_seq_len}")
    if encoder_hidden_states.shape[0] != b or encoder_hidden_states.shape[2] != config.text_dim:
        raise ValueError(
            f"encoder_hidden_states must be [{b}, L, {config.text_dim}], got {tuple(encoder_hidden_states.shape)}"
        )
    if encoder_hidden_states_image is not None:
        if config.image_dim is None:
            raise ValueError("encoder_hidden_states_image is given but this config has no image_dim (T2V model)")
        check_array("encoder_hidden_states_image", encoder_hidden_states_image, 3)
        # FLF2V (pos_embed) joins two CLIP states per sample
        image_batch = 2 * b if config.pos_embed_seq_len is not None else b
        if encoder_hidden_states_image.shape[0] != image_batch or encoder_hidden_states_image.shape[2] != config.image_dim:
            raise ValueError(f"encoder_hidden_states_image must be [{image_batch}, S, {config.image_dim}], got "
                             f"{tuple(encoder_hidden_states_image.shape)}")
        if config.pos_embed_seq_len is not None and 2 * encoder_hidden_states_image.shape[1] != config.pos_embed_seq_len:
            raise ValueError(f"encoder_hidden_states_image must hold {config.pos_embed_seq_len // 2} tokens per image "
                             f"(pos_embed_seq_len={config.pos_embed_seq_len}), got {encoder_hidden_states_image.shape[1]}")
    elif config.added_kv_proj_dim is not None:
        raise ValueError("encoder_hidden_states_image is required: this config has added_kv_proj_dim (I2V model)")
    num_tokens = math.prod(grid)
    if jnp.ndim(timestep) == 2:  # per-token (Wan 2.2 TI2V, diffusers' expand_timesteps)
        if jnp.shape(timestep)[0] not in (1, b) or jnp.shape(timestep)[1] != num_tokens:
            raise ValueError(f"a per-token timestep must be [{b}, {num_tokens}] (one per patch token), got shape "
                             f"{jnp.shape(timestep)}")
    elif jnp.ndim(timestep) > 1 or (jnp.ndim(timestep) == 1 and jnp.shape(timestep)[0] not in (1, b)):
        raise ValueError(f"timestep must be a scalar, [{b}] or per-token [{b}, {num_tokens}], got shape "
                         f"{jnp.shape(timestep)}")
    return grid


def forward(
    params: Params, config: WanConfig, *, hidden_states: jax.Array, timestep: jax.Array,
    encoder_hidden_states: jax.Array, encoder_hidden_states_image: jax.Array | None = None,
    chipmunk: ChipmunkConfig | None = None, cache: ModelCache | None = None, plan: StepPlan | None = None,
    key: jax.Array | None = None, rotary_emb: tuple[jax.Array, jax.Array] | None = None,
    conditioning: Params | None = None, dtype=jnp.bfloat16, attention_impl: str | None = None,
    kernel_impl: str | None = None, mesh=None, probe: str | None = None,
) -> ModelOutput | Probe:
    """Wan 2.1 / 2.2 transformer forward (see the module docstring for shapes) -> ``ModelOutput``.

    Chipmunk: pass ``chipmunk`` (a ChipmunkConfig), ``plan`` (``schedule.step_plan(chipmunk, step)``) and the
    cache of this invocation's CFG branch (``init_cache`` / ``select_branch(init_branch_caches(...), i)``;
    None builds a fresh one, right for step 0 when attention.random_keys == 0). ``key`` seeds the dynamic
    random keys (per layer via ``fold_in``).
    ``rotary_emb``: precomputed raster-order ``pos_embed(config, grid)`` tables. ``conditioning``:
    ``timestep_conditioning`` of this call's timestep, computed ahead (``timestep`` is then only checked).
    ``attention_impl``: the dense attention implementation (None, "xla", "cudnn"); ``kernel_impl``:
    passed to the Chipmunk ops. ``mesh``: a ``parallel.make_mesh`` mesh: the self-attentions run sequence-parallel
    over its "sequence" axis (Ulysses), the Chipmunk MLPs on each device's token shard; the cross-attention reads
    the replicated text per token (the tokens must split evenly, and into whole mlp.block_size blocks with MLP
    sparsity). The output's ``hidden`` is the hidden state [B, N, D] (float32) after the last block, in voxel
    order under Chipmunk's voxel reordering.
    ``probe``: a step-caching policy's probe kind (``step_policies.PROBE_KINDS``, docs/algorithm.md §4.5): run only
    the patch embedding ("modulated_input": block 0's modulated input) or also the first block ("first_block": its
    residual), densely and in Chipmunk's token order, and return a ``step_policies.Probe`` whose ``base`` lives in
    the space of ``hidden``; the Chipmunk cache, plan and key are not used.
    """
    _check_config(config)
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of parameters, got {type(params).__name__}")
    grid = _check_inputs(config, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)
    dtype = check_compute_dtype(dtype)
    if chipmunk is None and (cache is not None or plan is not None):
        raise ValueError("cache and plan are only used with chipmunk; pass chipmunk=ChipmunkConfig(...)")
    if chipmunk is not None:
        _check_chipmunk(config, chipmunk)
    if probe is not None:
        check_probe_kind(probe)
    batch, num_tokens = hidden_states.shape[0], math.prod(grid)

    if rotary_emb is None:
        rotary_emb = pos_embed(config, grid)
    else:
        check_rotary_emb(rotary_emb, num_tokens, config.attention_head_dim)
    check_block_stack("blocks", params.get("blocks"), config.num_layers)
    if conditioning is None:
        conditioning = timestep_conditioning(params, config, timestep=timestep, batch=batch)
    else:
        _check_conditioning(config, conditioning, batch, num_tokens)

    if mesh is not None:
        parallel.check_heads("Wan", config.num_attention_heads, mesh)
        multiple = chipmunk.mlp.block_size if chipmunk is not None and chipmunk.mlp.enabled else 1
        parallel.check_tokens("Wan's video tokens", num_tokens, mesh, multiple=multiple)
    run = perm = None
    if chipmunk is not None:
        if probe is None:  # a probe runs dense: it keeps Chipmunk's token order only
            init = lambda: init_cache(config, chipmunk, batch=batch, grid=grid, dtype=dtype)  # noqa: E731
            run = ChipmunkRun.start(chipmunk, plan, cache, key, stacks=config.block_stacks, init_cache=init,
                                    kernel_impl=kernel_impl, num_tokens=num_tokens, mesh=mesh)
            cache = run.cache
        perm = token_permutation(chipmunk, grid)

    text, image = _context(params["condition_embedder"], config, encoder_hidden_states, encoder_hidden_states_image,
                           dtype)
    if image is not None and config.added_kv_proj_dim is None:
        # image_dim without added_kv_proj_dim: the image tokens join the text context (diffusers' concat)
        text, image = jnp.concatenate([image, text], axis=1), None

    x = permute_tokens(_patchify(params, config, hidden_states, dtype), perm)
    rotary_emb = parallel.replicate(tuple(permute_tokens(jnp.asarray(t), perm, axis=0) for t in rotary_emb), mesh)

    timestep_proj = conditioning["timestep_proj"]
    if timestep_proj.ndim == 4:  # per-token modulation follows the tokens into Chipmunk's order
        timestep_proj = permute_tokens(timestep_proj, perm)

    def block(block_params, _, x, ops):
        return _block(block_params, x, text, image, timestep_proj, rotary_emb, config=config,
                      dtype=dtype, attention_op=ops.get("attention_op"), mlp_op=ops.get("mlp_op"),
                      attention_impl=attention_impl)

    default_ops = None if mesh is None else {"attention_op": sequence_parallel_dense_attention(mesh, attention_impl)}
    if probe is not None:
        return _probe(probe, params, config, x, timestep_proj, block, default_ops or {})
    x, run = scan_blocks(block, params["blocks"], x, first_layer=0, run=run, default_ops=default_ops)
    cache = None if run is None else run.cache
    sample = _final_layer(params, config, x, conditioning["temb"], grid, perm, dtype)
    return ModelOutput(sample=sample.astype(hidden_states.dtype), hidden=x, cache=cache)


def _probe(kind: str, params: Params, config: WanConfig, x, timestep_proj, block, ops) -> Probe:
    """``forward``'s probe (docs/algorithm.md §4.5) from the patch-embedded tokens ``x`` (Chipmunk's order)."""
    if not config.num_layers:
        raise ValueError("a step-caching probe needs a block: this Wan config has none")
    first = block_at(params["blocks"], 0)
    if kind == "modulated_input":
        shift, scale = _modulation(first, timestep_proj)[:2]
        return Probe(signal=_modulated_input(x, shift, scale, config.eps), base=x)
    out, _ = block(first, None, x, ops)
    return Probe(signal=out - x, base=out)


def head(params: Params, config: WanConfig, hidden: jax.Array, conditioning: Params, *,
         grid: tuple[int, int, int], chipmunk: ChipmunkConfig | None = None, dtype=jnp.bfloat16,
         out_dtype=jnp.float32) -> jax.Array:
    """Output of a skipped step (step caching, docs/algorithm.md §4.3): the final layer on a stored
    ``forward(...).hidden`` [B, N, D] (voxel order when ``chipmunk`` reorders), conditioned on
    ``conditioning`` (``timestep_conditioning`` of the CURRENT timestep), over the (frames, height, width)
    token ``grid`` -> [B, out_channels, F, H, W]."""
    _check_config(config)
    grid = check_grid(grid, 3)
    check_array("hidden", hidden, 3)
    if hidden.shape[1:] != (math.prod(grid), config.inner_dim):
        raise ValueError(f"hidden must be [B, {math.prod(grid)}, {config.inner_dim}] for grid {grid}, got "
                         f"{tuple(hidden.shape)}")
    _check_conditioning(config, conditioning, hidden.shape[0], hidden.shape[1])
    if chipmunk is not None:
        _check_chipmunk(config, chipmunk)
    return _final_layer(params, config, hidden.astype(jnp.float32), conditioning["temb"], grid,
                        token_permutation(chipmunk, grid), check_compute_dtype(dtype)).astype(out_dtype)


def denoiser(config: WanConfig, chipmunk: ChipmunkConfig | None = None, *, grid: tuple[int, int, int],
             rotary_emb: tuple[jax.Array, jax.Array] | None = None, dtype=jnp.bfloat16,
             attention_impl: str | None = None, kernel_impl: str | None = None, mesh=None) -> Denoiser:
    """``chipmunk_jax.sampling.Denoiser`` for this model: ``cond`` is a dict with ``encoder_hidden_states``
    (and ``encoder_hidden_states_image`` for I2V); sigma in [0, 1] becomes the timestep sigma * 1000
    (diffusers' flow-matching scheduler). ``grid`` is the (frames, height, width) token grid; the conditioning
    of every step is computed before the loop; velocities come back in float32."""
    _check_config(config)
    if chipmunk is not None:
        _check_chipmunk(config, chipmunk)
    return model_denoiser(
        config, chipmunk, forward=forward, head=head, grid=check_grid(grid, 3), dtype=dtype, timestep_scale=1000.0,
        kernel_impl=kernel_impl, mesh=mesh, model_kw=dict(rotary_emb=rotary_emb, attention_impl=attention_impl),
        conditioning=lambda params, timestep, cond: timestep_conditioning(
            params, config, timestep=timestep, batch=cond["encoder_hidden_states"].shape[0]))
