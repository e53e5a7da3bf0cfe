"""FLUX.1 transformer (diffusers ``FluxTransformer2DModel``) as pure functions, with Chipmunk inside.

Params: a nested dict whose paths joined by "." are the diffusers state-dict names, with each
``weight`` renamed ``kernel`` (Linear, transposed to [in, out]) or ``scale`` (RMSNorm). Blocks are
Python lists (``params["transformer_blocks"][i]``, ``params["single_transformer_blocks"][i]``), not
stacked: the loop is unrolled so each block can take its own Chipmunk step kind (first_n_dense_layers)
and its own cache slot; ModuleList indices inside a block stay string keys (``to_out["0"]``,
``ff["net"]["0"]["proj"]``). See ``chipmunk_jax.ports.flux`` for the converters.

``forward`` mirrors diffusers' keywords and shapes:
  hidden_states [B, N, in_channels] (packed latents), encoder_hidden_states [B, L, joint_attention_dim],
  pooled_projections [B, pooled_projection_dim], timestep [B] (sigma in [0, 1]; x1000 inside),
  img_ids [N, 3], txt_ids [L, 3], guidance [B] for dev (guidance_embeds=True) models.
It returns [B, N, patch_size^2 * out_channels] in hidden_states' dtype (as diffusers, whose inputs
come in the model dtype), and with ``chipmunk`` also the new cache. Timestep embeddings, RoPE, norms and modulation are float32; matmuls run in ``dtype``.

Chipmunk (SPEC §5.1): every double and single block's joint attention goes through
``sparse_delta_attention``; the double-block image MLP and the single-block MLP through
``sparse_delta_mlp`` (the text MLP stays dense). Layer indices count double blocks 0..num_layers-1 then
single blocks; the attention and MLP of one block share the index. Layers below first_n_dense_layers
(or with the op disabled) run the dense path (cuDNN attention on GPUs) and hand their cache slots back
unchanged, so the cache keeps one uniform slot per block. With ``reorder.kind == "tiles"``
the image tokens (and their RoPE rows) are permuted to 8x8/4x4 tile order inside ``forward`` and the
output is permuted back, unless ``tokens_in_tile_order=True`` says the caller already keeps them so.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.models.chipmunk_ops import chipmunk_ops
from chipmunk_jax.models.diffusers_config import DiffusersConfig
from chipmunk_jax.models.inputs import batch_vector, check_array, check_batch_scalar, check_compute_dtype
from chipmunk_jax.models import mmdit
from chipmunk_jax.models.layers import (
    layer_norm,
    linear,
    linear_init,
    rotary_tables,
    timestep_embedding,
    timestep_sinusoids,
)

__all__ = ["FluxConfig", "forward", "head", "modulation", "denoiser", "sampling_permutation", "sampling_cond",
           "init_params", "init_cache", "prepare_params", "rotary_emb", "image_grid_from_ids", "FLUX_THETA"]

Params = dict[str, Any]
FLUX_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class FluxConfig(DiffusersConfig):
    """``FluxTransformer2DModel`` constructor arguments (diffusers names and defaults = FLUX.1-schnell)."""

    DIFFUSERS_CLASS: ClassVar[str] = "FluxTransformer2DModel"

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        if isinstance(self.axes_dims_rope, list):
            object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        for name in ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads",
                     "joint_attention_dim", "pooled_projection_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_layers", "num_single_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.out_channels is not None and (
            isinstance(self.out_channels, bool) or not isinstance(self.out_channels, int) or self.out_channels < 1
        ):
            raise ValueError(f"out_channels must be a positive integer or None, got {self.out_channels!r}")
        if not isinstance(self.guidance_embeds, bool):
            raise ValueError(f"guidance_embeds must be a bool, got {self.guidance_embeds!r}")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must be even and sum to attention_head_dim "
                f"({self.attention_head_dim})"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return 4 * self.inner_dim

    @property
    def output_channels(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

    @property
    def num_sparse_layers(self) -> int:
        return self.num_layers + self.num_single_layers


    @classmethod
    def dev(cls) -> "FluxConfig":
        return cls(guidance_embeds=True)

    @classmethod
    def schnell(cls) -> "FluxConfig":
        return cls(guidance_embeds=False)


# ----------------------------------------------------------------------------------------------
# Parameters


def init_params(config: FluxConfig, key: jax.Array, dtype=jnp.bfloat16) -> Params:
    """Random parameters with torch's default Linear init (RMSNorm scales = 1); for tests and timing."""
    if not isinstance(config, FluxConfig):
        raise TypeError(f"config must be a FluxConfig, got {type(config).__name__}")
    d, f, hd = config.inner_dim, config.mlp_hidden_dim, config.attention_head_dim
    keys = iter(jax.random.split(key, 16 + 32 * config.num_sparse_layers))
    lin = lambda i, o: linear_init(next(keys), i, o, dtype)  # noqa: E731
    norm = lambda: {"scale": jnp.ones((hd,), dtype)}  # noqa: E731
    emb = lambda i: {"linear_1": lin(i, d), "linear_2": lin(d, d)}  # noqa: E731
    time_text_embed = {"timestep_embedder": emb(256), "text_embedder": emb(config.pooled_projection_dim)}
    if config.guidance_embeds:
        time_text_embed["guidance_embedder"] = emb(256)

    def double():
        attn = {name: lin(d, d) for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
        attn.update({name: norm() for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")})
        attn.update({"to_out": {"0": lin(d, d)}, "to_add_out": lin(d, d)})
        ff = lambda: {"net": {"0": {"proj": lin(d, f)}, "2": lin(f, d)}}  # noqa: E731
        return {"norm1": {"linear": lin(d, 6 * d)}, "norm1_context": {"linear": lin(d, 6 * d)}, "attn": attn,
                "ff": ff(), "ff_context": ff()}

    def single():
        attn = {name: lin(d, d) for name in ("to_q", "to_k", "to_v")}
        attn.update({"norm_q": norm(), "norm_k": norm()})
        return {"norm": {"linear": lin(d, 3 * d)}, "attn": attn, "proj_mlp": lin(d, f), "proj_out": lin(d + f, d)}

    return {
        "x_embedder": lin(config.in_channels, d),
        "context_embedder": lin(config.joint_attention_dim, d),
        "time_text_embed": time_text_embed,
        "transformer_blocks": [double() for _ in range(config.num_layers)],
        "single_transformer_blocks": [single() for _ in range(config.num_single_layers)],
        "norm_out": {"linear": lin(d, 2 * d)},
        "proj_out": lin(d, config.output_channels),
    }


# ----------------------------------------------------------------------------------------------
# Positions


def rotary_emb(config: FluxConfig, txt_ids, img_ids) -> tuple[jax.Array, jax.Array]:
    """``FluxPosEmbed`` tables for ``cat(txt_ids, img_ids)``: ([L+N, head_dim], [L+N, head_dim]) f32.

    Concrete ids are evaluated in float64 (as diffusers); call this outside jit and pass the result as
    ``forward(..., rotary_emb=...)`` to keep that accuracy for traced ids.
    """
    traced = isinstance(txt_ids, jax.core.Tracer) or isinstance(img_ids, jax.core.Tracer)
    xp = jnp if traced else np
    ids = xp.concatenate([xp.asarray(txt_ids), xp.asarray(img_ids)], axis=0)
    return rotary_tables(ids, config.axes_dims_rope, FLUX_THETA)


def image_grid_from_ids(img_ids) -> tuple[int, int]:
    """(height, width) of a raster image-token grid from concrete ``img_ids`` [(0, row, col)]."""
    if isinstance(img_ids, jax.core.Tracer):
        raise ValueError("img_ids are traced: pass image_grid=(height, width) to forward")
    ids = np.asarray(img_ids)
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    rows, cols = np.divmod(np.arange(ids.shape[0]), w)
    if h * w != ids.shape[0] or not (np.array_equal(ids[:, 1], rows) and np.array_equal(ids[:, 2], cols)):
        raise ValueError("img_ids are not a raster (0, row, col) grid: pass image_grid=(height, width)")
    return h, w


# ----------------------------------------------------------------------------------------------
# Chipmunk cache


def init_cache(
    config: FluxConfig,
    chipmunk: ChipmunkConfig,
    *,
    batch: int,
    num_image_tokens: int,
    num_text_tokens: int,
    dtype=jnp.bfloat16,
) -> dict[str, list]:
    """Model cache: ``{"attention": [AttentionCache] * (num_layers + num_single_layers),
    "mlp": [MLPCache] * (same)}``: one slot per block, double blocks first (the image MLP of a
    double block caches the N image tokens, the single-block MLP all L+N tokens); None for the
    layers that are dense at every step (below first_n_dense_layers, or the op disabled)."""
    from chipmunk_jax.attention import check_seq_len, init_attention_cache
    from chipmunk_jax.cache import layer_is_sparse
    from chipmunk_jax.mlp import init_mlp_cache

    _check_configs(config, chipmunk)
    joint = num_image_tokens + num_text_tokens
    check_seq_len(joint, chipmunk)  # also when every layer is dense: the config asks for Chipmunk
    attention = [
        init_attention_cache(chipmunk, batch=batch, seq_len=joint, heads=config.num_attention_heads,
                             head_dim=config.attention_head_dim, dtype=dtype)
        if layer_is_sparse(chipmunk.attention, i) else None
        for i in range(config.num_sparse_layers)
    ]
    mlp = [
        init_mlp_cache(chipmunk, batch=batch, seq_len=num_image_tokens if i < config.num_layers else joint,
                       in_features=config.inner_dim, hidden_features=config.mlp_hidden_dim,
                       out_features=config.inner_dim, dtype=dtype)
        if layer_is_sparse(chipmunk.mlp, i) else None
        for i in range(config.num_sparse_layers)
    ]
    return {"attention": attention, "mlp": mlp}


def prepare_params(params: Params, config: FluxConfig, chipmunk: ChipmunkConfig) -> Params:
    """Params laid out for the sparse MLP kernels, made ONCE before sampling (the same function).

    For every layer whose MLP is sparse-capable: fc1 (``ff.net.0.proj`` of a double block,
    ``proj_mlp`` of a single block) is stored transposed as ``kernel_t`` [F, C], the layout the Pallas
    fc1 kernel gathers rows from, and a single block's fused ``proj_out`` kernel is stored as its
    attention rows ``kernel_attn`` [D, D] and MLP rows ``kernel_mlp`` [F, D]. Otherwise every sparse
    step would transpose W1 and slice ``proj_out`` (two copies of ~75 MB per layer at FLUX.1 size).
    Other layers are returned as they are (shared, not copied). Converted checkpoints keep the plain
    layout: call this on loaded params; drop the originals to keep one copy on the device.
    """
    from chipmunk_jax.cache import layer_is_sparse

    _check_configs(config, chipmunk)
    dim = config.inner_dim
    doubles = list(params["transformer_blocks"])
    singles = list(params["single_transformer_blocks"])
    for i in range(config.num_sparse_layers):
        if not layer_is_sparse(chipmunk.mlp, i):
            continue
        if i < config.num_layers:
            block = doubles[i]
            net = dict(block["ff"]["net"])
            net["0"] = {"proj": _transposed_fc1(net["0"]["proj"])}
            doubles[i] = dict(block, ff=dict(block["ff"], net=net))
        else:
            j = i - config.num_layers
            block = singles[j]
            proj_out = block["proj_out"]
            if "kernel" in proj_out:
                proj_out = {"kernel_attn": proj_out["kernel"][:dim], "kernel_mlp": proj_out["kernel"][dim:],
                            "bias": proj_out["bias"]}
            singles[j] = dict(block, proj_mlp=_transposed_fc1(block["proj_mlp"]), proj_out=proj_out)
    return dict(params, transformer_blocks=doubles, single_transformer_blocks=singles)


def _transposed_fc1(proj: Params) -> Params:
    if "kernel_t" in proj:
        return proj
    return {"kernel_t": jnp.asarray(proj["kernel"]).T, **{k: v for k, v in proj.items() if k != "kernel"}}


def _check_configs(config, chipmunk):
    if not isinstance(config, FluxConfig):
        raise TypeError(f"config must be a FluxConfig, got {type(config).__name__}")
    if not isinstance(chipmunk, ChipmunkConfig):
        raise TypeError(f"chipmunk must be a ChipmunkConfig or None, got {type(chipmunk).__name__}")
    if chipmunk.reorder.kind not in ("none", "tiles"):
        raise ValueError(f"FLUX supports chipmunk.reorder.kind 'none' or 'tiles', got {chipmunk.reorder.kind!r}")


# ----------------------------------------------------------------------------------------------
# Forward


def _check_inputs(config, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance):
    check_array("hidden_states", hidden_states, 3)
    check_array("encoder_hidden_states", encoder_hidden_states, 3)
    check_array("pooled_projections", pooled_projections, 2)
    check_array("img_ids", img_ids, 2)
    check_array("txt_ids", txt_ids, 2)
    b, n, c = hidden_states.shape
    if c != config.in_channels:
        raise ValueError(f"hidden_states has {c} channels, config.in_channels is {config.in_channels}")
    if encoder_hidden_states.shape[0] != b or encoder_hidden_states.shape[2] != config.joint_attention_dim:
        raise ValueError(
            f"encoder_hidden_states must be [{b}, L, {config.joint_attention_dim}], got "
            f"{tuple(encoder_hidden_states.shape)}"
        )
    if pooled_projections.shape != (b, config.pooled_projection_dim):
        raise ValueError(
            f"pooled_projections must be [{b}, {config.pooled_projection_dim}], got {tuple(pooled_projections.shape)}"
        )
    n_axes = len(config.axes_dims_rope)
    if img_ids.shape != (n, n_axes):
        raise ValueError(f"img_ids must be [{n}, {n_axes}], got {tuple(img_ids.shape)}")
    if txt_ids.shape != (encoder_hidden_states.shape[1], n_axes):
        raise ValueError(f"txt_ids must be [{encoder_hidden_states.shape[1]}, {n_axes}], got {tuple(txt_ids.shape)}")
    check_batch_scalar("timestep", timestep, b)
    check_batch_scalar("guidance", guidance, b)
    _check_guidance(config, guidance)


def _check_guidance(config: FluxConfig, guidance) -> None:
    if config.guidance_embeds and guidance is None:
        raise ValueError("guidance is required: this config has guidance_embeds=True (FLUX.1-dev)")
    if not config.guidance_embeds and guidance is not None:
        raise ValueError("guidance must be None: this config has guidance_embeds=False (FLUX.1-schnell)")


def _time_text_embed(params: Params, timestep, guidance, pooled_projections):
    # The model scales sigma and the guidance scale by 1000 itself; kept in f32 (diffusers casts to the
    # model dtype first, which in bf16 quantises t*1000 to steps of 4).
    temb = timestep_embedding(params["timestep_embedder"], timestep_sinusoids(timestep * 1000.0))
    if guidance is not None:
        temb = temb + timestep_embedding(params["guidance_embedder"], timestep_sinusoids(guidance * 1000.0))
    return temb + timestep_embedding(params["text_embedder"], pooled_projections.astype(jnp.float32))


def _temb(params: Params, timestep, guidance, pooled_projections, batch: int):
    """``_time_text_embed`` of scalar-or-[B] timestep and guidance (checked by the caller)."""
    guidance = None if guidance is None else batch_vector(guidance, batch)
    return _time_text_embed(params["time_text_embed"], batch_vector(timestep, batch), guidance, pooled_projections)


def modulation(params: Params, config: FluxConfig, *, timestep, pooled_projections, guidance=None) -> Params:
    """Every timestep-conditioned vector of the model (float32): each block's AdaLayerNormZero outputs and
    ``norm_out``'s scale/shift, for ``forward(..., modulation=)`` and ``head(..., modulation=)``.

    They depend only on (timestep, guidance, pooled_projections), so the sampler computes them for all steps
    before its loop (``denoiser``), as one GEMM per layer over the steps: inside each step they are GEMVs that
    read 6.5 GB of FLUX.1 weights. ``timestep`` / ``guidance``: scalar or [B]; pooled_projections [B, P]."""
    check_array("pooled_projections", pooled_projections, 2)
    batch = pooled_projections.shape[0]
    check_batch_scalar("timestep", timestep, batch)
    check_batch_scalar("guidance", guidance, batch)
    _check_guidance(config, guidance)
    temb = _temb(params, timestep, guidance, pooled_projections, batch)
    return {
        "transformer_blocks": [mmdit.block_modulation(b, temb, double=True) for b in params["transformer_blocks"]],
        "single_transformer_blocks": [
            mmdit.block_modulation(b, temb, double=False) for b in params["single_transformer_blocks"]
        ],
        "norm_out": _norm_out_modulation(params, temb),
    }


def _norm_out_modulation(params: Params, temb) -> jax.Array:
    return linear(params["norm_out"]["linear"], jax.nn.silu(temb), jnp.float32)


def _check_modulation(config: FluxConfig, modulation: Params, batch: int) -> None:
    blocks = modulation.get("transformer_blocks", ()) if isinstance(modulation, dict) else ()
    singles = modulation.get("single_transformer_blocks", ()) if isinstance(modulation, dict) else ()
    if len(blocks) != config.num_layers or len(singles) != config.num_single_layers or "norm_out" not in modulation:
        raise ValueError(f"modulation must come from flux.modulation for this config ({config.num_layers} double and "
                         f"{config.num_single_layers} single blocks)")
    expected = (batch, 2 * config.inner_dim)
    if modulation["norm_out"].shape != expected:
        raise ValueError(f"modulation['norm_out'] must be {list(expected)} (batch {batch}), got "
                         f"{list(modulation['norm_out'].shape)}")


def forward(
    params: Params,
    config: FluxConfig,
    *,
    hidden_states: jax.Array,
    encoder_hidden_states: jax.Array,
    pooled_projections: jax.Array,
    timestep: jax.Array,
    img_ids: jax.Array,
    txt_ids: jax.Array,
    guidance: jax.Array | None = None,
    chipmunk: ChipmunkConfig | None = None,
    cache: dict[str, list] | None = None,
    step=None,
    key: jax.Array | None = None,
    image_grid: tuple[int, int] | None = None,
    tokens_in_tile_order: bool = False,
    rotary_emb: tuple[jax.Array, jax.Array] | None = None,
    dtype=jnp.bfloat16,
    attention_impl: str | None = None,
    kernel_impl: str | None = None,
    return_hidden: bool = False,
    modulation: Params | None = None,
):
    """FLUX.1 transformer forward (see the module docstring for shapes).

    Chipmunk: pass ``chipmunk`` (a ChipmunkConfig), ``step`` (int or traced int32) and ``cache``
    (from ``init_cache``; None builds a fresh one, right for step 0); returns ``(output, new_cache)``.
    ``key`` seeds the random keys/features (per layer via ``fold_in``). ``image_grid=(h, w)`` is the
    token grid for tile reordering (derived from concrete raster ``img_ids`` when omitted).
    ``rotary_emb``: precomputed ``rotary_emb(config, txt_ids, img_ids)`` tables (joint raster order).
    ``attention_impl``: passed to ``jax.nn.dot_product_attention`` for the dense path (None, "xla",
    "cudnn"); ``kernel_impl``: passed to the Chipmunk ops.
    ``return_hidden``: also return the pre-head image hidden state [B, N, inner_dim] (float32, after
    the last single block, before ``norm_out``), i.e. ``(output, hidden)`` or ``(output, hidden,
    new_cache)``. It is in the token order the blocks ran in: tile order when Chipmunk reorders tiles
    (whether ``forward`` permuted the tokens or the caller did), else the input order. ``head`` turns it
    back into the output for any timestep (step caching, SPEC §4.3).
    ``modulation``: ``modulation(params, config, ...)`` for this call's timestep, guidance and pooled projections,
    computed ahead (those inputs are then only checked).
    """
    if not isinstance(config, FluxConfig):
        raise TypeError(f"config must be a FluxConfig, got {type(config).__name__}")
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of parameters, got {type(params).__name__}")
    _check_inputs(config, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance)
    dtype = check_compute_dtype(dtype)
    batch, num_img, _ = hidden_states.shape
    num_txt = encoder_hidden_states.shape[1]
    out_dtype = hidden_states.dtype

    if rotary_emb is None:
        rotary_emb = globals()["rotary_emb"](config, txt_ids, img_ids)
    elif rotary_emb[0].shape != (num_txt + num_img, config.attention_head_dim):
        raise ValueError(
            f"rotary_emb tables must be [{num_txt + num_img}, {config.attention_head_dim}], got {rotary_emb[0].shape}"
        )

    inverse = None
    if chipmunk is not None:
        _check_configs(config, chipmunk)
        if step is None:
            raise ValueError("step is required when chipmunk is given")
        if cache is None:
            cache = init_cache(config, chipmunk, batch=batch, num_image_tokens=num_img, num_text_tokens=num_txt,
                               dtype=dtype)
        if chipmunk.reorder.kind == "tiles" and not tokens_in_tile_order:
            from chipmunk_jax.reorder import inverse_permutation, joint_permutation, tile_permutation

            grid = image_grid if image_grid is not None else image_grid_from_ids(img_ids)
            if len(grid) != 2 or grid[0] * grid[1] != num_img:
                raise ValueError(f"image_grid {grid} does not hold the {num_img} image tokens")
            perm = tile_permutation(int(grid[0]), int(grid[1]), chipmunk.reorder.tile, chipmunk.reorder.subtile)
            inverse = inverse_permutation(perm)
            hidden_states = jnp.take(hidden_states, jnp.asarray(perm), axis=1)
            joint = jnp.asarray(joint_permutation(perm, num_txt, text_first=True))
            rotary_emb = (jnp.take(rotary_emb[0], joint, axis=0), jnp.take(rotary_emb[1], joint, axis=0))
    elif cache is not None or step is not None:
        raise ValueError("cache and step are only used with chipmunk; pass chipmunk=ChipmunkConfig(...)")

    if modulation is None:
        modulation = globals()["modulation"](params, config, timestep=timestep, pooled_projections=pooled_projections,
                                             guidance=guidance)
    else:
        _check_modulation(config, modulation, batch)
    img = linear(params["x_embedder"], hidden_states, dtype, jnp.float32)
    txt = linear(params["context_embedder"], encoder_hidden_states, dtype, jnp.float32)

    block_kw = dict(head_dim=config.attention_head_dim, dtype=dtype, attention_impl=attention_impl)
    new_attention, new_mlp = [], []
    def keep_cache(layer, attn_aux, mlp_aux):
        if chipmunk is not None:
            new_attention.append(cache["attention"][layer] if attn_aux is None else attn_aux)
            new_mlp.append(cache["mlp"][layer] if mlp_aux is None else mlp_aux)

    for i, block in enumerate(params["transformer_blocks"]):
        ops = {} if chipmunk is None else chipmunk_ops(chipmunk, cache, step, key, i, kernel_impl)
        txt, img, (attn_aux, mlp_aux) = mmdit.double_block(
            block, img, txt, None, rotary_emb, text_first=True, modulation=modulation["transformer_blocks"][i],
            **block_kw, **ops
        )
        keep_cache(i, attn_aux, mlp_aux)

    joint_states = jnp.concatenate([txt, img], axis=1)
    for j, block in enumerate(params["single_transformer_blocks"]):
        layer = config.num_layers + j
        ops = {} if chipmunk is None else chipmunk_ops(chipmunk, cache, step, key, layer, kernel_impl)
        joint_states, (attn_aux, mlp_aux) = mmdit.single_block(
            block, joint_states, None, rotary_emb, modulation=modulation["single_transformer_blocks"][j], **block_kw,
            **ops
        )
        keep_cache(layer, attn_aux, mlp_aux)
    hidden = joint_states[:, num_txt:]

    output = _final_layer(params, hidden, modulation["norm_out"], dtype)
    if inverse is not None:
        output = jnp.take(output, jnp.asarray(inverse), axis=1)
    output = output.astype(out_dtype)
    result = (output, hidden) if return_hidden else (output,)
    if chipmunk is not None:
        result += ({"attention": new_attention, "mlp": new_mlp},)
    return result[0] if len(result) == 1 else result


def _final_layer(params: Params, hidden, norm_out_modulation, dtype):
    """norm_out (AdaLayerNormContinuous, scale first) + proj_out; float32 result."""
    scale, shift = jnp.split(norm_out_modulation, 2, axis=-1)
    hidden = layer_norm(hidden.astype(jnp.float32), 1e-6) * (1.0 + scale[:, None]) + shift[:, None]
    return linear(params["proj_out"], hidden, dtype, jnp.float32)


def head(
    params: Params,
    config: FluxConfig,
    *,
    hidden: jax.Array,
    timestep: jax.Array,
    pooled_projections: jax.Array,
    guidance: jax.Array | None = None,
    chipmunk: ChipmunkConfig | None = None,
    image_grid: tuple[int, int] | None = None,
    tokens_in_tile_order: bool = False,
    dtype=jnp.bfloat16,
    out_dtype=jnp.float32,
    modulation: Params | None = None,
) -> jax.Array:
    """Only the final layer: the output of ``forward`` for a stored ``forward(..., return_hidden=True)``
    hidden state, with the conditioning recomputed from the CURRENT ``timestep`` / ``guidance`` (the
    skipped steps of step caching, SPEC §4.3).

    ``hidden`` [B, N, inner_dim] is in forward's internal token order. Pass the same ``chipmunk``,
    ``image_grid`` and ``tokens_in_tile_order`` as to ``forward``: when forward permuted the tokens to
    tile order itself, the output is permuted back to raster order here too (``image_grid`` required).
    Returns [B, N, output_channels] in ``out_dtype``. ``modulation``: as in ``forward`` (only ``norm_out`` is read).
    """
    if not isinstance(config, FluxConfig):
        raise TypeError(f"config must be a FluxConfig, got {type(config).__name__}")
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of parameters, got {type(params).__name__}")
    check_array("hidden", hidden, 3)
    check_array("pooled_projections", pooled_projections, 2)
    batch, num_img, width = hidden.shape
    if width != config.inner_dim:
        raise ValueError(f"hidden must be [B, N, {config.inner_dim}], got {tuple(hidden.shape)}")
    if pooled_projections.shape != (batch, config.pooled_projection_dim):
        raise ValueError(
            f"pooled_projections must be [{batch}, {config.pooled_projection_dim}], got {tuple(pooled_projections.shape)}"
        )
    check_batch_scalar("timestep", timestep, batch)
    check_batch_scalar("guidance", guidance, batch)
    _check_guidance(config, guidance)
    if modulation is None:
        norm_out = _norm_out_modulation(params, _temb(params, timestep, guidance, pooled_projections, batch))
    else:
        _check_modulation(config, modulation, batch)
        norm_out = modulation["norm_out"]
    output = _final_layer(params, hidden, norm_out, jnp.dtype(dtype))
    if chipmunk is not None:
        _check_configs(config, chipmunk)
        if chipmunk.reorder.kind == "tiles" and not tokens_in_tile_order:
            from chipmunk_jax.reorder import inverse_permutation, tile_permutation

            if image_grid is None or len(image_grid) != 2 or image_grid[0] * image_grid[1] != num_img:
                raise ValueError(f"image_grid {image_grid} must be (height, width) holding the {num_img} image tokens")
            perm = tile_permutation(int(image_grid[0]), int(image_grid[1]), chipmunk.reorder.tile,
                                    chipmunk.reorder.subtile)
            output = jnp.take(output, jnp.asarray(inverse_permutation(perm)), axis=1)
    return output.astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# Sampling adapter (chipmunk_jax.sampling)


def sampling_permutation(chipmunk: ChipmunkConfig | None, image_grid: tuple[int, int]) -> np.ndarray | None:
    """Token order the sampler keeps the latents in: the tile permutation (raster -> tile) when
    ``chipmunk`` reorders tiles, else None (raster). The Euler update is elementwise (SPEC §3.2), so
    the latents are permuted once before the loop and back once after it, not at every step."""
    if chipmunk is None or chipmunk.reorder.kind != "tiles":
        return None
    from chipmunk_jax.reorder import tile_permutation

    return tile_permutation(int(image_grid[0]), int(image_grid[1]), chipmunk.reorder.tile, chipmunk.reorder.subtile)


def image_ids(image_grid: tuple[int, int]) -> np.ndarray:
    """Raster ``img_ids`` [(0, row, col)] float32 for a (height, width) token grid."""
    h, w = image_grid
    rows, cols = np.divmod(np.arange(h * w), w)
    return np.stack([np.zeros(h * w), rows, cols], axis=1).astype(np.float32)


def sampling_cond(
    config: FluxConfig,
    chipmunk: ChipmunkConfig | None,
    *,
    encoder_hidden_states,
    pooled_projections,
    image_grid: tuple[int, int],
    guidance=None,
) -> dict[str, Any]:
    """The ``cond`` pytree of ``denoiser``: text states, pooled CLIP, ids and RoPE tables, with the image
    ids and RoPE rows in ``sampling_permutation`` order (tables computed here in float64, as diffusers).
    ``guidance``: the embedded guidance scale of FLUX.1-dev models (required iff guidance_embeds)."""
    if not isinstance(config, FluxConfig):
        raise TypeError(f"config must be a FluxConfig, got {type(config).__name__}")
    _check_grid(image_grid)
    check_array("encoder_hidden_states", encoder_hidden_states, 3)
    check_array("pooled_projections", pooled_projections, 2)
    if config.guidance_embeds and guidance is None:
        raise ValueError("guidance is required: this config has guidance_embeds=True (FLUX.1-dev)")
    if not config.guidance_embeds and guidance is not None:
        raise ValueError("guidance must be None: this config has guidance_embeds=False (FLUX.1-schnell)")
    img_ids = image_ids(image_grid)
    perm = sampling_permutation(chipmunk, image_grid)
    if perm is not None:
        img_ids = img_ids[perm]
    txt_ids = np.zeros((encoder_hidden_states.shape[1], 3), np.float32)
    cond = dict(
        encoder_hidden_states=jnp.asarray(encoder_hidden_states),
        pooled_projections=jnp.asarray(pooled_projections),
        img_ids=jnp.asarray(img_ids),
        txt_ids=jnp.asarray(txt_ids),
        rotary_emb=rotary_emb(config, txt_ids, img_ids),
    )
    if guidance is not None:
        cond["guidance"] = batch_vector(guidance, encoder_hidden_states.shape[0])
    return cond


def _check_grid(image_grid):
    if (not isinstance(image_grid, (tuple, list)) or len(image_grid) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in image_grid)):
        raise ValueError(f"image_grid must be (height, width) in tokens, positive integers; got {image_grid!r}")


def denoiser(
    config: FluxConfig,
    chipmunk: ChipmunkConfig | None = None,
    *,
    image_grid: tuple[int, int],
    dtype=jnp.bfloat16,
    attention_impl: str | None = None,
    kernel_impl: str | None = None,
    precompute_modulation: bool = True,
):
    """FLUX as a ``chipmunk_jax.sampling.Denoiser``.

    ``chipmunk=None`` runs the dense model (the cache passes through untouched; use ``None``). With
    ``chipmunk`` the cache is ``init_cache(...)``. The latents and ``cond`` (``sampling_cond``) must be
    in ``sampling_permutation`` order for the whole loop. compute returns the velocity (float32), the
    pre-head hidden state (float32, [B, N, inner_dim]) and the new cache; head re-runs only the final
    layer for the current sigma. sigma is FLUX's timestep (the model multiplies by 1000 itself).
    ``precompute_modulation``: the sampler computes ``modulation`` for every step before its loop (the
    Denoiser's ``timestep_tables``) instead of inside each step; same math, up to float32 summation order.
    """
    from chipmunk_jax.sampling import Denoiser

    if not isinstance(config, FluxConfig):
        raise TypeError(f"config must be a FluxConfig, got {type(config).__name__}")
    if chipmunk is not None:
        _check_configs(config, chipmunk)
    _check_grid(image_grid)
    image_grid = (int(image_grid[0]), int(image_grid[1]))
    model_kw = dict(dtype=dtype, attention_impl=attention_impl)
    if chipmunk is not None:
        model_kw.update(chipmunk=chipmunk, image_grid=image_grid, tokens_in_tile_order=True, kernel_impl=kernel_impl)

    def model_inputs(cond):
        return {k: cond[k] for k in ("encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids")}

    def split(t):  # sigma, or (with precompute_modulation) the step's slice of timestep_tables
        return (t["sigma"], t["modulation"]) if precompute_modulation else (t, None)

    def timestep_tables(params, sigmas, cond):
        def at(sigma):
            return modulation(params, config, timestep=sigma, pooled_projections=cond["pooled_projections"],
                              guidance=cond.get("guidance"))

        return {"sigma": sigmas, "modulation": jax.vmap(at)(sigmas)}

    def compute(params, latents, t, cond, cache, step, key):
        sigma, step_modulation = split(t)
        inputs = dict(model_inputs(cond), hidden_states=latents, timestep=sigma, guidance=cond.get("guidance"),
                      rotary_emb=cond.get("rotary_emb"), modulation=step_modulation)
        if chipmunk is None:
            velocity, hidden = forward(params, config, **inputs, return_hidden=True, **model_kw)
        else:
            velocity, hidden, cache = forward(params, config, **inputs, cache=cache, step=step, key=key,
                                              return_hidden=True, **model_kw)
        return velocity.astype(jnp.float32), hidden, cache

    def final_layer(params, hidden, t, cond):
        # hidden is in the latents' (sampling) order, so no permutation here
        sigma, step_modulation = split(t)
        return head(params, config, hidden=hidden, timestep=sigma, pooled_projections=cond["pooled_projections"],
                    guidance=cond.get("guidance"), dtype=dtype, out_dtype=jnp.float32, modulation=step_modulation)

    return Denoiser(compute=compute, head=final_layer,
                    timestep_tables=timestep_tables if precompute_modulation else None)
