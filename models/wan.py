"""Wan 2.1 transformer (diffusers ``WanTransformer3DModel``) as pure functions, with Chipmunk inside.

Params: a nested dict whose paths joined by "." are the diffusers state-dict names, with each
``weight`` renamed ``kernel`` (Linear and the patch Conv3d: the torch weight with its axes reversed,
so a Linear kernel is [in, out] and the patch kernel [pw, ph, pt, in, out]) or ``scale`` (RMSNorm and
affine LayerNorm). ``blocks`` is a Python list (the loop is unrolled so each block takes its own
Chipmunk step kind and cache slot); ModuleList indices inside a block stay string keys
(``attn1["to_out"]["0"]``, ``ffn["net"]["0"]["proj"]``). Converters: ``chipmunk_jax.ports.wan``.

``forward`` mirrors diffusers' keywords and shapes:
  hidden_states [B, C, F, H, W] (latents), timestep [B] (raw, in [0, 1000]: no x1000 inside),
  encoder_hidden_states [B, L, text_dim] (umT5 states, zero-padded, never masked: as diffusers),
  encoder_hidden_states_image [B, 257, image_dim] (CLIP states, I2V models only).
It returns [B, out_channels, F, H, W] in hidden_states' dtype. The image and text contexts are kept
apart, so I2V needs no hard-coded text length (diffusers' processor assumes L == 512; with L == 512 the
two agree). Timestep embedding, RoPE, norms, modulation and the residual stream are float32; matmuls
run in ``dtype``.

Chipmunk (SPEC §5.3): only self-attention (``attn1``) is sparse-delta; cross-attention stays dense.
With ``reorder.kind == "voxels"`` the video tokens (and their RoPE rows) are permuted to (4, 6, 8)
voxel order after the patch embedding and the pre-head hidden state is permuted back. The static
column mask (local voxel window + static random keys, SPEC §1.6) is drawn once per generation by
``init_cache`` and lives in the cache. CFG: each branch (cond / uncond) has its own cache; build both
with ``init_branch_caches`` and pass ``chipmunk_jax.cache.select_branch(caches, i)`` to ``forward``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.models.chipmunk_ops import chipmunk_ops
from chipmunk_jax.models.diffusers_config import DiffusersConfig
from chipmunk_jax.models.inputs import batch_vector, check_array, check_compute_dtype
from chipmunk_jax.models.layers import (
    linear_init,
    apply_rotary_emb,
    gelu_tanh,
    layer_norm,
    linear,
    rms_norm,
    rotary_tables,
    timestep_embedding,
    timestep_sinusoids,
)
from chipmunk_jax.models.mmdit import dense_attention, dense_mlp

__all__ = [
    "WanConfig",
    "forward",
    "head",
    "init_params",
    "init_cache",
    "init_branch_caches",
    "denoiser",
    "rotary_emb",
    "rope_dims",
    "token_grid",
    "WAN_THETA",
]

Params = dict[str, Any]
WAN_THETA = 10000.0
_IMAGE_NORM_EPS = 1e-5  # WanImageEmbedding's FP32LayerNorms keep torch's default eps


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class WanConfig(DiffusersConfig):
    """``WanTransformer3DModel`` constructor arguments (diffusers names and defaults = Wan2.1-T2V-14B)."""

    DIFFUSERS_CLASS: ClassVar[str] = "WanTransformer3DModel"

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self):
        if isinstance(self.patch_size, list):
            object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if not isinstance(self.patch_size, tuple) or len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be three integers, got {self.patch_size!r}")
        for p in self.patch_size:
            _positive_int("patch_size", p)
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "freq_dim", "ffn_dim",
                     "rope_max_seq_len"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ValueError(f"num_layers must be a non-negative integer, got {self.num_layers!r}")
        for name in ("out_channels", "image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")
        if not isinstance(self.cross_attn_norm, bool):
            raise ValueError(f"cross_attn_norm must be a bool, got {self.cross_attn_norm!r}")
        # diffusers' WanAttention always builds across-heads RMSNorms, whatever qk_norm says
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm must be 'rms_norm_across_heads' (the only Wan variant), got {self.qk_norm!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
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


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) RoPE sizes of ``WanRotaryPosEmbed``: h = w = 2 (head_dim // 6), t takes the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def token_grid(config: WanConfig, latent_shape) -> tuple[int, int, int]:
    """(F', H', W') tokens for latents of (F, H, W) frames/rows/columns."""
    f, h, w = (int(s) for s in latent_shape)
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
    keys = iter(jax.random.split(key, 16 + 16 * config.num_layers))
    lin = lambda i, o: linear_init(next(keys), i, o, dtype)  # noqa: E731
    rms = lambda: {"scale": jnp.ones((d,), dtype)}  # noqa: E731
    affine = lambda n: {"scale": jnp.ones((n,), dtype), "bias": jnp.zeros((n,), dtype)}  # noqa: E731
    table = lambda n: jax.random.normal(next(keys), (1, n, d), dtype) / np.sqrt(d)  # noqa: E731

    def attention(cross):
        attn = {name: lin(d, d) for name in ("to_q", "to_k", "to_v")}
        attn.update({"to_out": {"0": lin(d, d)}, "norm_q": rms(), "norm_k": rms()})
        if cross and config.added_kv_proj_dim is not None:
            attn.update({"add_k_proj": lin(config.added_kv_proj_dim, d), "add_v_proj": lin(config.added_kv_proj_dim, d),
                         "norm_added_k": rms()})
        return attn

    def block():
        out = {"scale_shift_table": table(6), "attn1": attention(False), "attn2": attention(True),
               "ffn": {"net": {"0": {"proj": lin(d, f)}, "2": lin(f, d)}}}
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
        "blocks": [block() for _ in range(config.num_layers)],
        "proj_out": lin(d, config.patch_features * config.output_channels),
        "scale_shift_table": table(2),
    }


# ----------------------------------------------------------------------------------------------
# Positions


def rotary_emb(config: WanConfig, grid) -> tuple[jax.Array, jax.Array]:
    """``WanRotaryPosEmbed`` tables for a raster (F', H', W') token grid: ([N, head_dim], [N, head_dim]) f32,
    computed in float64 as diffusers. Pass them as ``forward(..., rotary_emb=...)`` under jit to keep
    large tables out of the compiled constants."""
    if not isinstance(config, WanConfig):
        raise TypeError(f"config must be a WanConfig, got {type(config).__name__}")
    if len(grid) != 3:
        raise ValueError(f"grid must be (frames, height, width) in tokens, got {grid!r}")
    for name, size in zip(("frames", "height", "width"), grid):
        _positive_int(f"grid {name}", int(size))
        if size > config.rope_max_seq_len:
            raise ValueError(f"token grid {name} {size} exceeds rope_max_seq_len={config.rope_max_seq_len}")
    ids = np.stack(np.meshgrid(*(np.arange(int(s)) for s in grid), indexing="ij"), axis=-1).reshape(-1, 3)
    return rotary_tables(ids, rope_dims(config.attention_head_dim), WAN_THETA)


# ----------------------------------------------------------------------------------------------
# Chipmunk cache


def _check_configs(config, chipmunk):
    if not isinstance(config, WanConfig):
        raise TypeError(f"config must be a WanConfig, got {type(config).__name__}")
    if not isinstance(chipmunk, ChipmunkConfig):
        raise TypeError(f"chipmunk must be a ChipmunkConfig or None, got {type(chipmunk).__name__}")
    if chipmunk.reorder.kind not in ("none", "voxels"):
        raise ValueError(f"Wan supports chipmunk.reorder.kind 'voxels' or 'none', got {chipmunk.reorder.kind!r}")
    if chipmunk.reorder.kind == "none" and chipmunk.attention.local_voxels > 0:
        raise ValueError("attention.local_voxels > 0 needs reorder.kind='voxels' (the window is over voxel order)")


def init_cache(
    config: WanConfig,
    chipmunk: ChipmunkConfig,
    *,
    batch: int,
    grid: tuple[int, int, int],
    key: jax.Array | None = None,
    dtype=jnp.bfloat16,
) -> dict[str, Any]:
    """Cache of ONE invocation branch: ``{"attention": [AttentionCache] * num_layers, "mlp": [MLPCache]
    * num_layers (empty when chipmunk.mlp is off), "static_mask": [G, N] bool, "eligible": [G] bool}``.

    ``grid`` is the (F', H', W') token grid (``token_grid``). The static mask (SPEC §1.6) is drawn here,
    once per generation, from ``key`` (required when attention.random_keys > 0).
    """
    from chipmunk_jax.attention import init_attention_cache
    from chipmunk_jax.cache import layer_is_sparse
    from chipmunk_jax.mlp import init_mlp_cache
    from chipmunk_jax.selection import static_video_mask

    _check_configs(config, chipmunk)
    if len(grid) != 3:
        raise ValueError(f"grid must be (frames, height, width) in tokens, got {grid!r}")
    grid = tuple(int(g) for g in grid)
    for g in grid:
        _positive_int("grid", g)
    n = math.prod(grid)
    # always-dense layers (below first_n_dense_layers, or the op disabled) keep no cache: None
    attention = [
        init_attention_cache(chipmunk, batch=batch, seq_len=n, heads=config.num_attention_heads,
                             head_dim=config.attention_head_dim, dtype=dtype)
        if layer_is_sparse(chipmunk.attention, i) else None
        for i in range(config.num_layers)
    ]
    mlp = []
    if chipmunk.mlp.enabled:
        mlp = [init_mlp_cache(chipmunk, batch=batch, seq_len=n, in_features=config.inner_dim,
                              hidden_features=config.ffn_dim, out_features=config.inner_dim, dtype=dtype)
               if layer_is_sparse(chipmunk.mlp, i) else None
               for i in range(config.num_layers)]
    static_mask, eligible = static_video_mask(grid, 0, chipmunk.attention, voxel=chipmunk.reorder.voxel, key=key)
    return {"attention": attention, "mlp": mlp, "static_mask": static_mask, "eligible": eligible}


def init_branch_caches(
    config: WanConfig,
    chipmunk: ChipmunkConfig,
    *,
    batch: int,
    grid: tuple[int, int, int],
    key: jax.Array | None = None,
    dtype=jnp.bfloat16,
    offload: bool = False,
):
    """One cache per CFG branch (``chipmunk.invocations_per_step`` of them: cond, uncond), stacked on a
    leading axis; the branches share one static mask draw, as the original. Pass
    ``chipmunk_jax.cache.select_branch(caches, i)`` to ``forward`` and store its new cache back with
    ``update_branch``. ``offload=True``: separate per-branch caches (``cache.BranchCaches``) with the layer
    caches in pinned host memory (``memory.offload_layer_caches``): two 720p branches of Wan2.1-14B hold
    ~66 GiB of caches, more than an 80 GB H100 keeps beside the weights."""
    from chipmunk_jax.cache import split_branches, stack_branches
    from chipmunk_jax.memory import offload_layer_caches

    one = init_cache(config, chipmunk, batch=batch, grid=grid, key=key, dtype=dtype)
    if offload:
        return offload_layer_caches(split_branches(one, chipmunk.invocations_per_step))
    return stack_branches(one, chipmunk.invocations_per_step)


# ----------------------------------------------------------------------------------------------
# Building blocks


def _affine_layer_norm(params, x, eps):
    return layer_norm(x, eps) * params["scale"].astype(jnp.float32) + params["bias"].astype(jnp.float32)


def _heads(x, head_dim):
    return x.reshape(*x.shape[:-1], -1, head_dim)


def _attention_projection(attn, name, norm, x, head_dim, dtype, eps):
    """``norm(to_x(x))`` across all heads (``rms_norm_across_heads``), then the head split."""
    y = linear(attn[name], x, dtype)
    if norm is not None:
        y = rms_norm(attn[norm], y, eps)
    return _heads(y.astype(dtype), head_dim)


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


def _block(params, x, text, image, timestep_proj, rope, *, config, dtype, attention_op, mlp_op, attention_impl):
    """One ``WanTransformerBlock`` on the float32 residual stream x [B, N, D]."""
    eps, hd = config.eps, config.attention_head_dim
    modulation = params["scale_shift_table"].astype(jnp.float32) + timestep_proj  # [B, 6, D]
    shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (modulation[:, i][:, None] for i in range(6))

    norm = (layer_norm(x, eps) * (1.0 + scale_msa) + shift_msa).astype(dtype)
    attn_out, attn_aux = _self_attention(params["attn1"], norm, rope, head_dim=hd, dtype=dtype, eps=eps,
                                         attention_op=attention_op, attention_impl=attention_impl)
    x = x + attn_out * gate_msa

    norm = _affine_layer_norm(params["norm2"], x, eps) if config.cross_attn_norm else x
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


def _condition_embedder(params, config, timestep, encoder_hidden_states, encoder_hidden_states_image, dtype):
    """(temb [B, D], timestep_proj [B, 6, D], text context, image context or None), as
    ``WanTimeTextImageEmbedding``; the time path is float32 throughout."""
    temb = timestep_embedding(params["time_embedder"], timestep_sinusoids(timestep, config.freq_dim))
    timestep_proj = linear(params["time_proj"], jax.nn.silu(temb), jnp.float32).reshape(temb.shape[0], 6, -1)
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
        x = _affine_layer_norm(emb["norm1"], x, _IMAGE_NORM_EPS)
        x = jax.nn.gelu(linear(emb["ff"]["net"]["0"]["proj"], x, dtype, jnp.float32), approximate=False)
        x = linear(emb["ff"]["net"]["2"], x, dtype, jnp.float32)
        image = _affine_layer_norm(emb["norm2"], x, _IMAGE_NORM_EPS).astype(dtype)
    return temb, timestep_proj, context, image


def _patchify(params, config, hidden_states, dtype):
    b, c, f, h, w = hidden_states.shape
    pt, ph, pw = config.patch_size
    x = hidden_states.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    # to the patch kernel's (pw, ph, pt, c) feature order (the torch Conv3d weight, axes reversed)
    x = x.transpose(0, 2, 4, 6, 7, 5, 3, 1).reshape(b, (f // pt) * (h // ph) * (w // pw), -1)
    kernel = params["patch_embedding"]["kernel"].reshape(-1, config.inner_dim)
    return linear({"kernel": kernel, "bias": params["patch_embedding"]["bias"]}, x, dtype, jnp.float32)


def _head(params, config, hidden, temb, grid, dtype):
    """Final norm with (shift, scale) = table + temb, ``proj_out`` and unpatchify -> [B, C, F, H, W] f32."""
    modulation = params["scale_shift_table"].astype(jnp.float32)[0][:, None, :] + temb[None]  # [2, B, D]
    shift, scale = modulation[0][:, None], modulation[1][:, None]
    x = (layer_norm(hidden, config.eps) * (1.0 + scale) + shift).astype(dtype)
    x = linear(params["proj_out"], x, dtype, jnp.float32)
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
    grid = token_grid(config, hidden_states.shape[2:])
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
    if jnp.ndim(timestep) > 1 or (jnp.ndim(timestep) == 1 and jnp.shape(timestep)[0] not in (1, b)):
        raise ValueError(f"timestep must be a scalar or have shape [{b}] (per-token Wan 2.2 timesteps are not "
                         f"supported), got shape {jnp.shape(timestep)}")
    return grid


def forward(
    params: Params,
    config: WanConfig,
    *,
    hidden_states: jax.Array,
    timestep: jax.Array,
    encoder_hidden_states: jax.Array,
    encoder_hidden_states_image: jax.Array | None = None,
    chipmunk: ChipmunkConfig | None = None,
    cache: dict[str, Any] | None = None,
    step=None,
    key: jax.Array | None = None,
    rotary_emb: tuple[jax.Array, jax.Array] | None = None,
    return_hidden: bool = False,
    dtype=jnp.bfloat16,
    attention_impl: str | None = None,
    kernel_impl: str | None = None,
):
    """Wan 2.1 transformer forward (see the module docstring for shapes).

    Chipmunk: pass ``chipmunk`` (a ChipmunkConfig), ``step`` (int or traced int32) and the cache of
    this invocation's CFG branch (``init_cache`` / ``select_branch(init_branch_caches(...), i)``; None
    builds a fresh one, right for step 0 when attention.random_keys == 0); returns
    ``(output, new_cache)``. ``key`` seeds the dynamic random keys (per layer via ``fold_in``).
    ``rotary_emb``: precomputed raster-order ``rotary_emb(config, grid)`` tables.
    ``return_hidden``: also return the raster-order pre-head hidden state [B, N, D] (f32) for step
    caching (``head`` turns it into the output of a later step).
    ``attention_impl``: the dense attention implementation (None, "xla", "cudnn"); ``kernel_impl``:
    passed to the Chipmunk ops.
    """
    if not isinstance(config, WanConfig):
        raise TypeError(f"config must be a WanConfig, got {type(config).__name__}")
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of parameters, got {type(params).__name__}")
    grid = _check_inputs(config, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)
    dtype = check_compute_dtype(dtype)
    batch, num_tokens = hidden_states.shape[0], math.prod(grid)
    out_dtype = hidden_states.dtype

    if rotary_emb is None:
        rotary_emb = globals()["rotary_emb"](config, grid)
    elif tuple(rotary_emb[0].shape) != (num_tokens, config.attention_head_dim):
        raise ValueError(f"rotary_emb tables must be [{num_tokens}, {config.attention_head_dim}], "
                         f"got {tuple(rotary_emb[0].shape)}")

    perm = inverse = None
    if chipmunk is not None:
        _check_configs(config, chipmunk)
        if step is None:
            raise ValueError("step is required when chipmunk is given")
        if cache is None:
            cache = init_cache(config, chipmunk, batch=batch, grid=grid, dtype=dtype)
        _check_cache(cache, config, chipmunk, num_tokens)
        if chipmunk.reorder.kind == "voxels":
            from chipmunk_jax.reorder import inverse_permutation, voxel_permutation

            perm = voxel_permutation(*grid, voxel=chipmunk.reorder.voxel)
            inverse = inverse_permutation(perm)
    elif cache is not None or step is not None:
        raise ValueError("cache and step are only used with chipmunk; pass chipmunk=ChipmunkConfig(...)")

    timestep = batch_vector(timestep, batch)
    temb, timestep_proj, text, image = _condition_embedder(
        params["condition_embedder"], config, timestep, encoder_hidden_states, encoder_hidden_states_image, dtype
    )
    if image is not None and config.added_kv_proj_dim is None:
        # image_dim without added_kv_proj_dim: the image tokens join the text context (diffusers' concat)
        text, image = jnp.concatenate([image, text], axis=1), None

    x = _patchify(params, config, hidden_states, dtype)
    if perm is not None:
        perm_j = jnp.asarray(perm)
        x = jnp.take(x, perm_j, axis=1)
        rotary_emb = (jnp.take(rotary_emb[0], perm_j, axis=0), jnp.take(rotary_emb[1], perm_j, axis=0))

    new_attention, new_mlp = [], []
    for i, block in enumerate(params["blocks"]):
        ops = {} if chipmunk is None else chipmunk_ops(
            chipmunk, cache, step, key, i, kernel_impl, static_mask=cache["static_mask"], eligible=cache["eligible"]
        )
        x, (attn_aux, mlp_aux) = _block(block, x, text, image, timestep_proj, rotary_emb, config=config, dtype=dtype,
                                        attention_op=ops.get("attention_op"), mlp_op=ops.get("mlp_op"),
                                        attention_impl=attention_impl)
        if chipmunk is not None:
            new_attention.append(cache["attention"][i] if attn_aux is None else attn_aux)
            if cache["mlp"]:
                new_mlp.append(cache["mlp"][i] if mlp_aux is None else mlp_aux)

    if inverse is not None:
        x = jnp.take(x, jnp.asarray(inverse), axis=1)
    output = _head(params, config, x, temb, grid, dtype).astype(out_dtype)
    result = [output]
    if chipmunk is not None:
        result.append({**cache, "attention": new_attention, "mlp": new_mlp})
    if return_hidden:
        result.append(x)
    return result[0] if len(result) == 1 else tuple(result)


def _check_cache(cache, config, chipmunk, num_tokens):
    if not isinstance(cache, dict) or not {"attention", "mlp", "static_mask", "eligible"} <= set(cache):
        raise TypeError("cache must be the dict built by wan.init_cache (one CFG branch: use "
                        "chipmunk_jax.cache.select_branch on init_branch_caches)")
    if len(cache["attention"]) != config.num_layers:
        raise ValueError(f"cache has {len(cache['attention'])} attention slots, the config {config.num_layers} layers")
    if cache["static_mask"].ndim != 2 or cache["static_mask"].shape[1] != num_tokens:
        raise ValueError(f"cache static_mask has shape {tuple(cache['static_mask'].shape)}: not one branch's cache "
                         f"for {num_tokens} tokens (select a branch, or rebuild it for this token grid)")
    if chipmunk.mlp.enabled != bool(cache["mlp"]):
        raise ValueError("cache mlp slots do not match chipmunk.mlp.enabled; rebuild it with init_cache")


def head(
    params: Params,
    config: WanConfig,
    hidden: jax.Array,
    timestep: jax.Array,
    *,
    latent_shape: tuple[int, int, int],
    out_dtype=jnp.float32,
    dtype=jnp.bfloat16,
) -> jax.Array:
    """Output of a skipped step (step caching, SPEC §4.3): the final layer on a stored raster-order
    ``hidden`` [B, N, D] (``forward(..., return_hidden=True)``), conditioned on the CURRENT timestep.
    ``latent_shape`` is the (F, H, W) of the latents -> [B, out_channels, F, H, W]."""
    if not isinstance(config, WanConfig):
        raise TypeError(f"config must be a WanConfig, got {type(config).__name__}")
    grid = token_grid(config, latent_shape)
    check_array("hidden", hidden, 3)
    if hidden.shape[1:] != (math.prod(grid), config.inner_dim):
        raise ValueError(f"hidden must be [B, {math.prod(grid)}, {config.inner_dim}], got {tuple(hidden.shape)}")
    dtype = check_compute_dtype(dtype)
    timestep = batch_vector(timestep, hidden.shape[0])
    cond = params["condition_embedder"]["time_embedder"]
    temb = timestep_embedding(cond, timestep_sinusoids(timestep, config.freq_dim))
    return _head(params, config, hidden.astype(jnp.float32), temb, grid, dtype).astype(out_dtype)


def denoiser(
    config: WanConfig,
    chipmunk: ChipmunkConfig,
    *,
    latent_shape: tuple[int, int, int],
    latent_dtype=jnp.float32,
    rotary_emb: tuple[jax.Array, jax.Array] | None = None,
    dtype=jnp.bfloat16,
    attention_impl: str | None = None,
    kernel_impl: str | None = None,
):
    """``chipmunk_jax.sampling.Denoiser`` for this model: ``cond`` is a dict with
    ``encoder_hidden_states`` (and ``encoder_hidden_states_image`` for I2V); sigma in [0, 1] becomes the
    timestep sigma * 1000 (diffusers' flow-matching scheduler). ``latent_shape`` is (F, H, W) and
    ``latent_dtype`` the latents' dtype (the skipped-step head must return it too)."""
    from chipmunk_jax.sampling import Denoiser

    _check_configs(config, chipmunk)
    token_grid(config, latent_shape)
    kw = dict(rotary_emb=rotary_emb, dtype=dtype, attention_impl=attention_impl, kernel_impl=kernel_impl)

    def compute(params, latents, sigma, cond, cache, step, key):
        out, cache, hidden = forward(params, config, hidden_states=latents, timestep=sigma * 1000.0, **cond,
                                     chipmunk=chipmunk, cache=cache, step=step, key=key, return_hidden=True, **kw)
        return out, hidden, cache

    def head_fn(params, hidden, sigma, cond):
        return head(params, config, hidden, sigma * 1000.0, latent_shape=latent_shape, out_dtype=latent_dtype,
                    dtype=dtype)

    return Denoiser(compute=compute, head=head_fn)
