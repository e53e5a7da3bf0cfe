"""FLUX.1 transformer (diffusers ``FluxTransformer2DModel``) as pure functions, with Chipmunk inside.

Params: a nested dict whose paths joined by "." are the diffusers state-dict names, with each
``weight`` renamed ``kernel`` (Linear, transposed to [in, out]) or ``scale`` (RMSNorm). Each block type
is ONE tree whose arrays carry a leading layer axis (``params["transformer_blocks"]["attn"]["to_q"]["kernel"]``
is [num_layers, D, D]), run with ``lax.scan`` (``models.block_stack``); the diffusers name
``transformer_blocks.3.attn.to_q.weight`` is row 3 of that array. ModuleList indices inside a block stay
string keys (``to_out["0"]``, ``ff["net"]["0"]["proj"]``). See ``chipmunk_jax.ports.flux`` for the converters.

``forward`` mirrors diffusers' keywords and shapes:
  hidden_states [B, N, in_channels] (packed latents, raster order), encoder_hidden_states
  [B, L, joint_attention_dim], pooled_projections [B, pooled_projection_dim], timestep [B] (sigma in [0, 1];
  x1000 inside), img_ids [N, 3], txt_ids [L, 3], guidance [B] for dev (guidance_embeds=True) models.
It returns a ``ModelOutput`` whose ``sample`` is [B, N, patch_size^2 * out_channels] in hidden_states' dtype
(as diffusers, whose inputs come in the model dtype). Timestep embeddings, RoPE, norms and modulation are
float32; matmuls run in ``dtype``. The model contract (output, head, cache, plan, token order) is the one of
docs/architecture.md §4, shared with HunyuanVideo and Wan.

Chipmunk (docs/algorithm.md §5.1): every double and single block's joint attention goes through
``sparse_delta_attention``; the double-block image MLP and the single-block MLP through
``sparse_delta_mlp`` (the text MLP stays dense). Layer indices count double blocks 0..num_layers-1 then
single blocks; the attention and MLP of one block share the index. Layers below first_n_dense_layers
(or with the op disabled) run the dense path (cuDNN attention on GPUs) and keep no cache; the cache
holds two block stacks (double, single), each stacked over its sparse layers.
With ``reorder.kind == "tiles"`` the image tokens (and their RoPE rows) are permuted to 8x8/4x4 tile order
inside ``forward``; ``sample`` comes back in raster order, ``hidden`` stays in tile order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import parallel
from chipmunk_jax.attention import check_seq_len, init_attention_cache
from chipmunk_jax.cache import ModelCache, init_stack_cache, sparse_layer_range
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.mlp import init_mlp_cache
from chipmunk_jax.models import mmdit
from chipmunk_jax.models.block_stack import block_at, check_block_stack, num_blocks, scan_blocks
from chipmunk_jax.models.chipmunk_ops import ChipmunkRun, check_chipmunk, permute_tokens, token_permutation
from chipmunk_jax.models.chipmunk_ops import unpermute_tokens
from chipmunk_jax.models.denoising import model_denoiser
from chipmunk_jax.models.diffusers_config import DiffusersConfig
from chipmunk_jax.models.inputs import batch_vector, check_array, check_batch_scalar, check_compute_dtype, check_grid
from chipmunk_jax.models.inputs import check_guidance, check_rotary_emb, pooled_timestep_guidance
from chipmunk_jax.models.layers import (
    layer_norm,
    linear,
    linear_init,
    rotary_tables,
    timestep_embedding,
    timestep_sinusoids,
)
from chipmunk_jax.models.parallel_ops import sequence_parallel_dense_attention
from chipmunk_jax.outputs import ModelOutput
from chipmunk_jax.reorder import joint_permutation
from chipmunk_jax.sampling import Denoiser
from chipmunk_jax.schedule import StepPlan
from chipmunk_jax.step_policies import Probe, check_probe_kind
from chipmunk_jax.validation import check_bool, check_int_tuple, field, non_negative_int, optional, positive_int

__all__ = ["FluxConfig", "forward", "head", "timestep_conditioning", "denoiser", "sampling_cond", "init_params",
           "init_cache", "prepare_params", "pos_embed", "image_ids", "grid_from_ids", "check_mesh", "FLUX_THETA"]

Params = dict[str, Any]
FLUX_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class FluxConfig(DiffusersConfig):
    """``FluxTransformer2DModel`` constructor arguments (diffusers names and defaults = FLUX.1-schnell)."""

    DIFFUSERS_CLASS: ClassVar[str] = "FluxTransformer2DModel"

    patch_size: int = field(1, check=positive_int)
    in_channels: int = field(64, check=positive_int)
    out_channels: int | None = field(None, check=optional(positive_int))
    num_layers: int = field(19, check=non_negative_int)
    num_single_layers: int = field(38, check=non_negative_int)
    attention_head_dim: int = field(128, check=positive_int)
    num_attention_heads: int = field(24, check=positive_int)
    joint_attention_dim: int = field(4096, check=positive_int)
    pooled_projection_dim: int = field(768, check=positive_int)
    guidance_embeds: bool = field(False, check=check_bool)
    axes_dims_rope: tuple[int, ...] = field((16, 56, 56), check=check_int_tuple)

    def _check(self):
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

    @property
    def block_stacks(self) -> tuple[tuple[int, int], ...]:
        """(first layer, count) of the double and the single block stack, in Chipmunk's layer numbering."""
        return ((0, self.num_layers), (self.num_layers, self.num_single_layers))

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
    key, double_key, single_key = jax.random.split(key, 3)
    keys = iter(jax.random.split(key, 16))
    lin = lambda i, o, keys=keys: linear_init(next(keys), i, o, dtype)  # noqa: E731
    norm = lambda: {"scale": jnp.ones((hd,), dtype)}  # noqa: E731
    emb = lambda i: {"linear_1": lin(i, d), "linear_2": lin(d, d)}  # noqa: E731
    time_text_embed = {"timestep_embedder": emb(256), "text_embedder": emb(config.pooled_projection_dim)}
    if config.guidance_embeds:
        time_text_embed["guidance_embedder"] = emb(256)

    def double(key):
        keys = iter(jax.random.split(key, 16))
        lin = lambda i, o: linear_init(next(keys), i, o, dtype)  # noqa: E731
        attn = {name: lin(d, d) for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
        attn.update({name: norm() for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")})
        attn.update({"to_out": {"0": lin(d, d)}, "to_add_out": lin(d, d)})
        ff = lambda: {"net": {"0": {"proj": lin(d, f)}, "2": lin(f, d)}}  # noqa: E731
        return {"norm1": {"linear": lin(d, 6 * d)}, "norm1_context": {"linear": lin(d, 6 * d)}, "attn": attn,
                "ff": ff(), "ff_context": ff()}

    def single(key):
        keys = iter(jax.random.split(key, 8))
        lin = lambda i, o: linear_init(next(keys), i, o, dtype)  # noqa: E731
        attn = {name: lin(d, d) for name in ("to_q", "to_k", "to_v")}
        attn.update({"norm_q": norm(), "norm_k": norm()})
        return {"norm": {"linear": lin(d, 3 * d)}, "attn": attn, "proj_mlp": lin(d, f), "proj_out": lin(d + f, d)}

    return {
        "x_embedder": lin(config.in_channels, d),
        "context_embedder": lin(config.joint_attention_dim, d),
        "time_text_embed": time_text_embed,
        "transformer_blocks": jax.vmap(double)(jax.random.split(double_key, config.num_layers)),
        "single_transformer_blocks": jax.vmap(single)(jax.random.split(single_key, config.num_single_layers)),
        "norm_out": {"linear": lin(d, 2 * d)},
        "proj_out": lin(d, config.output_channels),
    }


# ----------------------------------------------------------------------------------------------
# Positions


def pos_embed(config: FluxConfig, txt_ids, img_ids) -> tuple[jax.Array, jax.Array]:
    """``FluxPosEmbed`` tables for ``cat(txt_ids, img_ids)``: ([L+N, head_dim], [L+N, head_dim]) f32.

    Concrete ids are evaluated in float64 (as diffusers); call this outside jit and pass the result as
    ``forward(..., rotary_emb=...)`` to keep that accuracy for traced ids.
    """
    traced = isinstance(txt_ids, jax.core.Tracer) or isinstance(img_ids, jax.core.Tracer)
    xp = jnp if traced else np
    ids = xp.concatenate([xp.asarray(txt_ids), xp.asarray(img_ids)], axis=0)
    return rotary_tables(ids, config.axes_dims_rope, FLUX_THETA)


def image_ids(grid: tuple[int, int]) -> np.ndarray:
    """Raster ``img_ids`` [(0, row, col)] float32 for a (height, width) token grid."""
    h, w = check_grid(grid, 2)
    rows, cols = np.divmod(np.arange(h * w), w)
    return np.stack([np.zeros(h * w), rows, cols], axis=1).astype(np.float32)


def grid_from_ids(img_ids) -> tuple[int, int]:
    """(height, width) of a raster image-token grid from concrete ``img_ids`` [(0, row, col)]."""
    if isinstance(img_ids, jax.core.Tracer):
        raise ValueError("img_ids are traced: pass grid=(height, width) to forward")
    ids = np.asarray(img_ids)
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if ids.shape != (h * w, 3) or not np.array_equal(ids, image_ids((h, w))):
        raise ValueError("img_ids are not a raster (0, row, col) grid: pass grid=(height, width)")
    return h, w


# ----------------------------------------------------------------------------------------------
# Chipmunk cache


def init_cache(config: FluxConfig, chipmunk: ChipmunkConfig, *, batch: int, grid: tuple[int, int],
               num_text_tokens: int, key: jax.Array | None = None, dtype=jnp.bfloat16) -> ModelCache:
    """The ``ModelCache`` of one generation over a (height, width) token ``grid`` and ``num_text_tokens``:
    per block stack (double, single) the attention and MLP caches of its sparse layers stacked on a leading
    axis (the image MLP of a double block caches the N image tokens, the single-block MLP all L+N tokens);
    None for a stack whose layers are dense at every step. FLUX has no static mask (``key`` is accepted for
    the common signature and unused)."""
    _check_chipmunk(config, chipmunk)
    num_img = math.prod(check_grid(grid, 2))
    non_negative_int("num_text_tokens", num_text_tokens)
    joint = num_img + num_text_tokens
    check_seq_len(joint, chipmunk)  # also when every layer is dense: the config asks for Chipmunk
    attention, mlp = [], []
    for (first, count), mlp_tokens in zip(config.block_stacks, (num_img, joint)):
        attention.append(init_stack_cache(chipmunk.attention, first, count, lambda: init_attention_cache(
            chipmunk, batch=batch, seq_len=joint, heads=config.num_attention_heads,
            head_dim=config.attention_head_dim, dtype=dtype)))
        mlp.append(init_stack_cache(chipmunk.mlp, first, count, lambda: init_mlp_cache(
            chipmunk, batch=batch, seq_len=mlp_tokens, in_features=config.inner_dim,
            hidden_features=config.mlp_hidden_dim, out_features=config.inner_dim, dtype=dtype)))
    return ModelCache(attention=tuple(attention), mlp=tuple(mlp))


def prepare_params(params: Params, config: FluxConfig, chipmunk: ChipmunkConfig) -> Params:
    """Params laid out for the sparse MLP kernels, made ONCE before sampling (the same function).

    For every block stack with a sparse-capable MLP layer: fc1 (``ff.net.0.proj`` of the double blocks,
    ``proj_mlp`` of the single blocks) is stored transposed as ``kernel_t`` [L, F, C], the layout the Pallas
    fc1 kernel gathers rows from, and the single blocks' fused ``proj_out`` kernel is stored as its attention
    rows ``kernel_attn`` [L, D, D] and MLP rows ``kernel_mlp`` [L, F, D]. Otherwise every sparse step would
    transpose W1 and slice ``proj_out`` (two copies of ~75 MB per layer at FLUX.1 size). A stack is prepared
    whole (its dense layers read the same layout; the dense path takes either). Other params are returned as
    they are (shared, not copied). Converted checkpoints keep the plain layout: call this on loaded params and
    drop the originals to keep one copy on the device.
    """
    _check_chipmunk(config, chipmunk)
    dim = config.inner_dim
    (double_first, doubles), (single_first, singles) = config.block_stacks
    out = dict(params)
    if len(sparse_layer_range(chipmunk.mlp, double_first, doubles)):
        block = params["transformer_blocks"]
        net = dict(block["ff"]["net"])
        net["0"] = {"proj": _transposed_fc1(net["0"]["proj"])}
        out["transformer_blocks"] = dict(block, ff=dict(block["ff"], net=net))
    if len(sparse_layer_range(chipmunk.mlp, single_first, singles)):
        block = params["single_transformer_blocks"]
        proj_out = block["proj_out"]
        if "kernel" in proj_out:
            proj_out = {"kernel_attn": proj_out["kernel"][:, :dim], "kernel_mlp": proj_out["kernel"][:, dim:],
                        "bias": proj_out["bias"]}
        out["single_transformer_blocks"] = dict(block, proj_mlp=_transposed_fc1(block["proj_mlp"]),
                                                proj_out=proj_out)
    return out


def _transposed_fc1(proj: Params) -> Params:
    if "kernel_t" in proj:
        return proj
    kernel_t = jnp.swapaxes(jnp.asarray(proj["kernel"]), -1, -2)
    return {"kernel_t": kernel_t, **{k: v for k, v in proj.items() if k != "kernel"}}


def _check_config(config) -> None:
    if not isinstance(config, FluxConfig):
        raise TypeError(f"config must be a FluxConfig, got {type(config).__name__}")


def _check_chipmunk(config, chipmunk) -> None:
    _check_config(config)
    check_chipmunk("FLUX", chipmunk, reorder_kinds=("none", "tiles"))


# ----------------------------------------------------------------------------------------------
# Timestep conditioning


def _time_text_embed(params: Params, timestep, guidance, pooled_projections):
    # The model scales sigma and the guidance scale by 1000 itself; kept in f32 (diffusers casts to the
    # model dtype first, which in bf16 quantises t*1000 to steps of 4).
    temb = timestep_embedding(params["timestep_embedder"], timestep_sinusoids(timestep * 1000.0))
    if guidance is not None:
        temb = temb + timestep_embedding(params["guidance_embedder"], timestep_sinusoids(guidance * 1000.0))
    return temb + timestep_embedding(params["text_embedder"], pooled_projections.astype(jnp.float32))


def timestep_conditioning(params: Params, config: FluxConfig, *, timestep, pooled_projections,
                          guidance=None) -> Params:
    """Every timestep-conditioned vector of the model (float32): each block's AdaLayerNormZero outputs and
    ``norm_out``'s scale/shift, for ``forward(..., conditioning=)`` and ``head``.

    They depend only on (timestep, guidance, pooled_projections), so the sampler computes them for all steps
    before its loop (``denoiser``), as one GEMM per layer over the steps: inside each step they are GEMVs that
    read 6.5 GB of FLUX.1 weights. ``timestep`` / ``guidance``: scalar or [B]; pooled_projections [B, P]."""
    _check_config(config)
    timestep, guidance = pooled_timestep_guidance(pooled_projections, config.pooled_projection_dim, timestep, guidance,
                                                  guidance_embeds=config.guidance_embeds, model="this FLUX config")
    temb = _time_text_embed(params["time_text_embed"], timestep, guidance, pooled_projections)
    def modulation(name, double):
        if not num_blocks(params.get(name)):
            return {}
        # one layer at a time (lax.map): the float32 modulation of every layer at once would hold a float32 copy of
        # all 6 GB of modulation weights (12 GiB of temporaries at FLUX.1 size)
        return jax.lax.map(lambda block: mmdit.block_modulation(block, temb, double=double),
                           _modulation_params(params[name]))

    return {
        "transformer_blocks": modulation("transformer_blocks", True),
        "single_transformer_blocks": modulation("single_transformer_blocks", False),
        "norm_out": linear(params["norm_out"]["linear"], jax.nn.silu(temb), jnp.float32),
    }


def _modulation_params(stack: Params) -> Params:
    """The AdaLayerNormZero Linears of a block stack (what ``block_modulation`` reads)."""
    return {name: stack[name] for name in ("norm1", "norm1_context", "norm") if name in stack}


def _check_conditioning(config: FluxConfig, conditioning: Params, batch: int) -> None:
    message = (f"conditioning must come from flux.timestep_conditioning for this config ({config.num_layers} double "
               f"and {config.num_single_layers} single blocks, batch {batch})")
    if not isinstance(conditioning, dict) or "norm_out" not in conditioning:
        raise ValueError(message)
    for name, count in (("transformer_blocks", config.num_layers), ("single_transformer_blocks",
                                                                     config.num_single_layers)):
        shapes = {x.shape[:2] for x in jax.tree_util.tree_leaves(conditioning.get(name))}
        if shapes != ({(count, batch)} if count else set()):
            raise ValueError(f"{message}; conditioning[{name!r}] has leading axes {sorted(shapes)}")
    expected = (batch, 2 * config.inner_dim)
    if conditioning["norm_out"].shape != expected:
        raise ValueError(f"conditioning['norm_out'] must be {list(expected)} (batch {batch}), got "
                         f"{list(conditioning['norm_out'].shape)}")


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
    check_guidance(config.guidance_embeds, guidance, "this FLUX config")


def forward(
    params: Params, config: FluxConfig, *, hidden_states: jax.Array, encoder_hidden_states: jax.Array,
    pooled_projections: jax.Array, timestep: jax.Array, img_ids: jax.Array, txt_ids: jax.Array,
    guidance: jax.Array | None = None, chipmunk: ChipmunkConfig | None = None, cache: ModelCache | None = None,
    plan: StepPlan | None = None, key: jax.Array | None = None, grid: tuple[int, int] | None = None,
    rotary_emb: tuple[jax.Array, jax.Array] | None = None, conditioning: Params | None = None, dtype=jnp.bfloat16,
    attention_impl: str | None = None, kernel_impl: str | None = None, mesh=None, probe: str | None = None,
) -> ModelOutput | Probe:
    """FLUX.1 transformer forward (see the module docstring for shapes) -> ``ModelOutput``.

    Chipmunk: pass ``chipmunk`` (a ChipmunkConfig), ``plan`` (``schedule.step_plan(chipmunk, step)``) and
    ``cache`` (``init_cache``; None builds a fresh one, right for step 0); ``key`` seeds the random
    keys/features (per layer via ``fold_in``). ``grid=(h, w)`` is the image-token grid (derived from concrete
    raster ``img_ids`` when omitted), needed when Chipmunk reorders tokens into tiles.
    ``rotary_emb``: precomputed ``pos_embed(config, txt_ids, img_ids)`` tables (joint raster order).
    ``conditioning``: ``timestep_conditioning(params, config, ...)`` for this call's timestep, guidance and pooled
    projections, computed ahead (those inputs are then only checked).
    ``attention_impl``: passed to ``jax.nn.dot_product_attention`` for the dense path (None, "xla",
    "cudnn"); ``kernel_impl``: passed to the Chipmunk ops.
    ``mesh``: a ``parallel.make_mesh`` mesh: every attention runs sequence-parallel over its "sequence" axis
    (Ulysses: all-to-all to head shards and back; the text tokens join the image tokens in the one joint
    sequence, so text + image tokens must split evenly), the Chipmunk MLPs on each device's token shard
    (whole mlp.block_size blocks per shard). The output's ``hidden`` is the image hidden state after the last
    single block, before ``norm_out``.
    ``probe``: a step-caching policy's probe kind (``step_policies.PROBE_KINDS``, docs/algorithm.md §4.5): run only
    the input embedding ("modulated_input": block 0's modulated image input) or also the first block ("first_block":
    its image residual), densely and in Chipmunk's token order, and return a ``step_policies.Probe`` whose ``base``
    lives in the space of ``hidden``; the Chipmunk cache, plan and key are not used.
    """
    _check_config(config)
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of parameters, got {type(params).__name__}")
    _check_inputs(config, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance)
    _check_params(params, config)
    dtype = check_compute_dtype(dtype)
    if chipmunk is None and (cache is not None or plan is not None):
        raise ValueError("cache and plan are only used with chipmunk; pass chipmunk=ChipmunkConfig(...)")
    if chipmunk is not None:
        _check_chipmunk(config, chipmunk)
    if probe is not None:
        check_probe_kind(probe)
    batch, num_img, _ = hidden_states.shape
    num_txt = encoder_hidden_states.shape[1]

    if rotary_emb is None:
        rotary_emb = pos_embed(config, txt_ids, img_ids)
    else:
        check_rotary_emb(rotary_emb, num_txt + num_img, config.attention_head_dim)
    if conditioning is None:
        conditioning = timestep_conditioning(params, config, timestep=timestep,
                                             pooled_projections=pooled_projections, guidance=guidance)
    else:
        _check_conditioning(config, conditioning, batch)

    if mesh is not None:
        check_mesh(config, chipmunk, mesh, num_img=num_img, num_txt=num_txt)
    run = perm = None
    if chipmunk is not None:
        grid = _image_grid(grid, img_ids, num_img, chipmunk)
        if probe is None:  # a probe runs dense: it keeps Chipmunk's token order only
            init = lambda: init_cache(config, chipmunk, batch=batch, grid=grid,  # noqa: E731
                                      num_text_tokens=num_txt, dtype=dtype)
            run = ChipmunkRun.start(chipmunk, plan, cache, key, stacks=config.block_stacks, init_cache=init,
                                    kernel_impl=kernel_impl, num_tokens=num_txt + num_img, mesh=mesh)
            cache = run.cache
        perm = token_permutation(chipmunk, grid)
        if perm is not None:
            hidden_states = permute_tokens(hidden_states, perm)
            joint = joint_permutation(perm, num_txt, text_first=True)
            rotary_emb = parallel.replicate(tuple(permute_tokens(t, joint, axis=0) for t in rotary_emb), mesh)

    img = linear(params["x_embedder"], hidden_states, dtype, jnp.float32)
    txt = linear(params["context_embedder"], encoder_hidden_states, dtype, jnp.float32)
    block_kw = dict(head_dim=config.attention_head_dim, dtype=dtype, attention_impl=attention_impl)
    default_ops = None if mesh is None else {"attention_op": sequence_parallel_dense_attention(mesh, attention_impl)}

    def double(block, modulation, state, ops):
        txt, img = state
        txt, img, slots = mmdit.double_block(block, img, txt, None, rotary_emb, text_first=True,
                                             modulation=modulation, **block_kw, **ops)
        return (txt, img), slots

    def single(block, modulation, joint_states, ops):
        return mmdit.single_block(block, joint_states, None, rotary_emb, modulation=modulation, **block_kw, **ops)

    if probe is not None:
        return _probe(probe, params, conditioning, img, txt, double, single, default_ops or {})
    (double_first, _), (single_first, _) = config.block_stacks
    (txt, img), run = scan_blocks(double, params["transformer_blocks"], (txt, img), first_layer=double_first,
                                  run=run, stack_index=0, per_layer=conditioning["transformer_blocks"],
                                  default_ops=default_ops)
    joint_states, run = scan_blocks(single, params["single_transformer_blocks"], jnp.concatenate([txt, img], axis=1),
                                    first_layer=single_first, run=run, stack_index=1,
                                    per_layer=conditioning["single_transformer_blocks"], default_ops=default_ops)
    cache = None if run is None else run.cache
    hidden = joint_states[:, num_txt:]
    sample = _final_layer(params, hidden, conditioning["norm_out"], dtype)
    return ModelOutput(sample=unpermute_tokens(sample, perm).astype(hidden_states.dtype), hidden=hidden, cache=cache)


def _probe(kind: str, params: Params, conditioning: Params, img, txt, double, single, ops) -> Probe:
    """``forward``'s probe (docs/algorithm.md §4.5) from the embedded image and text tokens: block 0 is the first
    double block, or the first single block of a model without double blocks (image rows of its joint output)."""
    name = "transformer_blocks" if num_blocks(params["transformer_blocks"]) else "single_transformer_blocks"
    if not num_blocks(params[name]):
        raise ValueError("a step-caching probe needs a block: this FLUX config has none")
    block, modulation = block_at(params[name], 0), block_at(conditioning[name], 0)
    double_first = name == "transformer_blocks"
    if kind == "modulated_input":
        return Probe(signal=mmdit.modulated_input(block, img, None, double=double_first, modulation=modulation),
                     base=img)
    if double_first:
        (_, out), _ = double(block, modulation, (txt, img), ops)
    else:
        joint, _ = single(block, modulation, jnp.concatenate([txt, img], axis=1), ops)
        out = joint[:, txt.shape[1]:]
    return Probe(signal=out - img, base=out)


def check_mesh(config: FluxConfig, chipmunk: ChipmunkConfig | None, mesh, *, num_img: int, num_txt: int) -> None:
    """Raises ValueError unless ``forward`` can run sequence-parallel on ``mesh`` at this size: heads divisible by
    the sequence axis, the joint sequence split evenly, and with Chipmunk's MLP into whole mlp.block_size blocks
    (image tokens and joint sequence alike). FLUX adds no padding: its attention has no key mask."""
    parallel.check_heads("FLUX", config.num_attention_heads, mesh)
    parallel.check_tokens("FLUX's joint sequence (text + image)", num_txt + num_img, mesh)
    if chipmunk is not None and chipmunk.mlp.enabled:
        block = chipmunk.mlp.block_size
        parallel.check_tokens("FLUX's image tokens (the double blocks' sparse MLP)", num_img, mesh, multiple=block)
        parallel.check_tokens("FLUX's joint sequence (the single blocks' sparse MLP)", num_txt + num_img, mesh,
                              multiple=block)


def _check_params(params, config: FluxConfig) -> None:
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of parameters, got {type(params).__name__}")
    check_block_stack("transformer_blocks", params.get("transformer_blocks"), config.num_layers)
    check_block_stack("single_transformer_blocks", params.get("single_transformer_blocks"), config.num_single_layers)


def _image_grid(grid, img_ids, num_img: int, chipmunk: ChipmunkConfig) -> tuple[int, int]:
    """The image-token grid Chipmunk runs on: ``grid``, else read from raster ``img_ids`` when tiles need it,
    else one row of tokens (only the token count matters then)."""
    if grid is None:
        grid = grid_from_ids(img_ids) if chipmunk.reorder.kind == "tiles" else (1, num_img)
    grid = check_grid(grid, 2)
    if grid[0] * grid[1] != num_img:
        raise ValueError(f"grid {grid} does not hold the {num_img} image tokens")
    return grid


def _final_layer(params: Params, hidden, norm_out_modulation, dtype):
    """norm_out (AdaLayerNormContinuous, scale first) + proj_out; float32 result."""
    scale, shift = jnp.split(norm_out_modulation, 2, axis=-1)
    hidden = layer_norm(hidden.astype(jnp.float32), 1e-6) * (1.0 + scale[:, None]) + shift[:, None]
    return linear(params["proj_out"], hidden, dtype, jnp.float32)


def head(params: Params, config: FluxConfig, hidden: jax.Array, conditioning: Params, *, grid: tuple[int, int],
         chipmunk: ChipmunkConfig | None = None, dtype=jnp.bfloat16, out_dtype=jnp.float32) -> jax.Array:
    """Only the final layer: ``forward``'s sample for a stored ``forward(...).hidden``, conditioned on the
    timestep that ``conditioning`` (``timestep_conditioning(params, config, ...)``) was computed for (the skipped steps
    of step caching, docs/algorithm.md §4.3).

    ``hidden`` [B, N, inner_dim] is in forward's token order (tile order when ``chipmunk`` reorders tiles);
    the output comes back in raster order over the (height, width) token ``grid``: [B, N, output_channels]
    in ``out_dtype``."""
    _check_config(config)
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of parameters, got {type(params).__name__}")
    check_array("hidden", hidden, 3)
    batch, num_img, width = hidden.shape
    grid = check_grid(grid, 2)
    if width != config.inner_dim or grid[0] * grid[1] != num_img:
        raise ValueError(f"hidden must be [B, {grid[0] * grid[1]}, {config.inner_dim}] for grid {grid}, got "
                         f"{tuple(hidden.shape)}")
    _check_conditioning(config, conditioning, batch)
    if chipmunk is not None:
        _check_chipmunk(config, chipmunk)
    output = _final_layer(params, hidden, conditioning["norm_out"], check_compute_dtype(dtype))
    return unpermute_tokens(output, token_permutation(chipmunk, grid)).astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# Sampling adapter (chipmunk_jax.sampling)


def sampling_cond(config: FluxConfig, *, encoder_hidden_states, pooled_projections, grid: tuple[int, int],
                  guidance=None) -> dict[str, Any]:
    """The ``cond`` pytree of ``denoiser``: text states, pooled CLIP, raster ids and RoPE tables (computed
    here in float64, as diffusers). ``guidance``: the embedded guidance scale of FLUX.1-dev models (required
    iff guidance_embeds)."""
    _check_config(config)
    check_array("encoder_hidden_states", encoder_hidden_states, 3)
    check_array("pooled_projections", pooled_projections, 2)
    check_guidance(config.guidance_embeds, guidance, "this FLUX config")
    img_ids = image_ids(grid)
    txt_ids = np.zeros((encoder_hidden_states.shape[1], 3), np.float32)
    cond = dict(
        encoder_hidden_states=jnp.asarray(encoder_hidden_states),
        pooled_projections=jnp.asarray(pooled_projections),
        img_ids=jnp.asarray(img_ids),
        txt_ids=jnp.asarray(txt_ids),
        rotary_emb=pos_embed(config, txt_ids, img_ids),
    )
    if guidance is not None:
        cond["guidance"] = batch_vector(guidance, encoder_hidden_states.shape[0])
    return cond


def denoiser(config: FluxConfig, chipmunk: ChipmunkConfig | None = None, *, grid: tuple[int, int],
             dtype=jnp.bfloat16, attention_impl: str | None = None, kernel_impl: str | None = None, mesh=None) -> Denoiser:
    """FLUX as a ``chipmunk_jax.sampling.Denoiser`` over raster-order packed latents [B, N, C].

    ``chipmunk=None`` runs the dense model (the cache passes through untouched; use ``None``). With
    ``chipmunk`` the cache is ``init_cache(...)``. ``cond`` comes from ``sampling_cond``. The conditioning of
    every step (``timestep_conditioning``: ~115 GEMVs per step at FLUX.1 size, bound by reading 6.5 GB of weights) is
    computed before the loop as a few GEMMs over the steps (the Denoiser's ``timestep_tables``). sigma is
    FLUX's timestep (the model multiplies by 1000 itself); the velocity comes back in float32.
    """
    _check_config(config)
    if chipmunk is not None:
        _check_chipmunk(config, chipmunk)
    grid = check_grid(grid, 2)
    return model_denoiser(
        config, chipmunk, forward=forward, head=head, grid=grid, dtype=dtype, timestep_scale=1.0,
        kernel_impl=kernel_impl, mesh=mesh, model_kw=dict(grid=grid, attention_impl=attention_impl),
        conditioning=lambda params, timestep, cond: timestep_conditioning(
            params, config, timestep=timestep, pooled_projections=cond["pooled_projections"],
            guidance=cond.get("guidance")))
