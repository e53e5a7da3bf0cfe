"""HunyuanVideo weight ports: diffusers and original Tencent checkpoints -> ``chipmunk_jax.models.hunyuan_video``.

Names follow docs/models.md §5.2 / §5.5. The diffusers state dict maps one to one: ``a.b.weight`` [out, in]
becomes ``params[a][b]["kernel"]`` [in, out], a norm ``weight`` becomes ``scale``, biases are copied, and
the Conv3d patch embedding ``x_embedder.proj.weight`` [D, C, pt, p, p] becomes a Linear kernel
``W.reshape(D, -1).T`` (patch features (c, pt, ph, pw)). The Tencent layout is first rewritten to diffusers
names: fused ``*_qkv`` split in three, single-block ``linear1`` split into q, k, v, mlp, the refiner and
embedder names renamed, and the final modulation halves swapped from (shift, scale) to (scale, shift).

Returned params hold numpy arrays in the checkpoint dtype unless ``dtype`` is given. Every key is checked
against the config: missing keys, unexpected keys and wrong shapes raise one ValueError listing them all.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from chipmunk_jax.models.hunyuan_video import HunyuanVideoConfig, init_params
from chipmunk_jax.ports import common
from chipmunk_jax.ports.common import flatten_params

__all__ = [*common.PORT_API, "ORIGINAL_PREFIX"]

ORIGINAL_PREFIX = "model.diffusion_model."
_MODEL = "HunyuanVideo"
_LIST_NODES = ("transformer_blocks", "single_transformer_blocks")
_REFINER = "context_embedder.token_refiner.refiner_blocks"
_PATCH = "x_embedder.proj"


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``flatten_params`` (the block stacks, refiner blocks included, stacked on a leading axis)."""
    return common.unflatten_params(flat, (*_LIST_NODES, _REFINER))


def _patch_shape(config: HunyuanVideoConfig) -> tuple[int, ...]:
    return (config.inner_dim, config.in_channels, config.patch_size_t, config.patch_size, config.patch_size)


def expected_diffusers_shapes(config: HunyuanVideoConfig) -> dict[str, tuple[int, ...]]:
    """{diffusers state-dict name: torch shape} for ``config`` (the model's own structure, via eval_shape)."""
    shapes = common.expected_diffusers_shapes(lambda key: init_params(config, key))
    shapes[f"{_PATCH}.weight"] = _patch_shape(config)
    return shapes


def _check_state(state, expected, what):
    common.check_state(state, expected, what, _MODEL)


# ----------------------------------------------------------------------------------------------
# diffusers


def infer_config(state: Mapping[str, Any]) -> HunyuanVideoConfig:
    """HunyuanVideoConfig from a diffusers-layout state dict's shapes. rope_axes_dim cannot be seen in the
    weights: (16, 56, 56) is assumed for head_dim 128 (every released model), else pass a config."""
    try:
        inner_dim, in_channels, patch_t, patch, _ = state[f"{_PATCH}.weight"].shape
        head_dim = next(state[k].shape[0] for k in state if k.endswith("attn.norm_q.weight"))
        out_features = state["proj_out.weight"].shape[0]
        text_dim = state["context_embedder.proj_in.weight"].shape[1]
        pooled_dim = state["time_text_embed.text_embedder.linear_1.weight"].shape[1]
        mlp_dim = next(state[k].shape[0] for k in state if k.endswith("ff.net.0.proj.weight")
                       and k.startswith("transformer_blocks."))
    except (KeyError, StopIteration, ValueError) as e:
        raise ValueError(f"cannot infer the HunyuanVideo config from the state dict ({e!r}): pass config=") from None
    if head_dim != 128:
        raise ValueError(f"head_dim {head_dim} != 128: rope_axes_dim is unknown, pass config=")
    per_patch = patch_t * patch * patch
    if out_features % per_patch:
        raise ValueError(f"proj_out has {out_features} outputs, not a multiple of the patch {per_patch}: pass config=")
    return HunyuanVideoConfig(
        in_channels=int(in_channels),
        out_channels=int(out_features // per_patch),
        num_attention_heads=int(inner_dim // head_dim),
        attention_head_dim=int(head_dim),
        num_layers=common.block_count(state, "transformer_blocks"),
        num_single_layers=common.block_count(state, "single_transformer_blocks"),
        num_refiner_layers=common.block_count(state, _REFINER),
        mlp_ratio=float(mlp_dim / inner_dim),
        patch_size=int(patch),
        patch_size_t=int(patch_t),
        guidance_embeds=any(k.startswith("time_text_embed.guidance_embedder.") for k in state),
        text_embed_dim=int(text_dim),
        pooled_projection_dim=int(pooled_dim),
    )


def from_diffusers(module_or_state_dict, config: HunyuanVideoConfig | None = None, *, dtype=None):
    """(HunyuanVideoConfig, params) from a diffusers ``HunyuanVideoTransformer3DModel`` or its state dict.

    The config comes from ``config``, else the module's ``config``, else the state dict's shapes.
    ``dtype`` (e.g. ``ml_dtypes.bfloat16``) casts every tensor; None keeps the checkpoint's dtypes.
    """
    state, config = common.module_state(
        module_or_state_dict, config, HunyuanVideoConfig, "HunyuanVideoTransformer3DModel"
    )
    if is_original_layout(state):
        raise ValueError("this state dict is in the original Tencent layout (double_blocks.*): use from_original")
    state = {k: common.to_numpy(v) for k, v in state.items()}
    config = config or infer_config(state)
    _check_state(state, expected_diffusers_shapes(config), "diffusers state dict")
    patch = state[f"{_PATCH}.weight"]
    state[f"{_PATCH}.weight"] = patch.reshape(patch.shape[0], -1)  # the Conv3d as the Linear it is: [D, C*pt*p*p]
    return config, unflatten_params(common.diffusers_to_params(state, dtype))


def to_diffusers(params: Mapping[str, Any], config: HunyuanVideoConfig) -> dict[str, np.ndarray]:
    """The diffusers state dict (numpy, torch layout) of a params tree: the inverse of from_diffusers."""
    if not isinstance(config, HunyuanVideoConfig):
        raise TypeError(f"config must be a HunyuanVideoConfig, got {type(config).__name__}")
    out = common.params_to_diffusers(params)
    if f"{_PATCH}.weight" in out:
        out[f"{_PATCH}.weight"] = out[f"{_PATCH}.weight"].reshape(_patch_shape(config))
    return out


# ----------------------------------------------------------------------------------------------
# Original Tencent layout


def is_original_layout(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(("double_blocks.", "single_blocks.", "txt_in.", ORIGINAL_PREFIX)) for k in state)


_TOP_LEVEL = {
    "img_in.proj": _PATCH,
    "time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "time_in.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.mlp.0": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.mlp.2": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "txt_in.input_embedder": "context_embedder.proj_in",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.linear": "norm1.linear",
    "txt_mod.linear": "norm1_context.linear",
    "img_attn_q_norm": "attn.norm_q",
    "img_attn_k_norm": "attn.norm_k",
    "txt_attn_q_norm": "attn.norm_added_q",
    "txt_attn_k_norm": "attn.norm_added_k",
    "img_attn_proj": "attn.to_out.0",
    "txt_attn_proj": "attn.to_add_out",
    "img_mlp.fc1": "ff.net.0.proj",
    "img_mlp.fc2": "ff.net.2",
    "txt_mlp.fc1": "ff_context.net.0.proj",
    "txt_mlp.fc2": "ff_context.net.2",
}
_DOUBLE_QKV = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"modulation.linear": "norm.linear", "linear2": "proj_out", "q_norm": "attn.norm_q",
           "k_norm": "attn.norm_k"}
_REFINER_NAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "self_attn_proj": "attn.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm_out.linear",
}


def original_to_diffusers_state(state: Mapping[str, Any], config: HunyuanVideoConfig) -> dict[str, np.ndarray]:
    """Rewrites a Tencent-layout state dict (``model.diffusion_model.`` prefix optional) to diffusers
    names. Unknown or malformed keys raise one ValueError listing them."""
    d = config.inner_dim
    qkv = ("attn.to_q", "attn.to_k", "attn.to_v")
    double_qkv = {name: (targets, (d, d, d)) for name, targets in _DOUBLE_QKV.items()}
    linear1 = {"linear1": ((*qkv, "proj_mlp"), (d, d, d, config.mlp_hidden_dim))}
    return common.original_to_diffusers(
        state,
        prefixes=(ORIGINAL_PREFIX,),
        top_level={**_TOP_LEVEL, "final_layer.adaLN_modulation.1": ("norm_out.linear", common.swap_halves)},
        blocks={
            "double_blocks": ("transformer_blocks", _DOUBLE, double_qkv),
            "single_blocks": ("single_transformer_blocks", _SINGLE, linear1),
            "txt_in.individual_token_refiner.blocks": (_REFINER, _REFINER_NAMES, {"self_attn_qkv": (qkv, (d, d, d))}),
        },
        what="Tencent checkpoint",
    )


def from_original(state_dict: Mapping[str, Any], config: HunyuanVideoConfig | None = None, *, dtype=None):
    """(HunyuanVideoConfig, params) from an original Tencent checkpoint's state dict
    (``mp_rank_00_model_states.pt`` re-saved as safetensors, or a ComfyUI repack). ``config`` defaults to
    the released T2V model (``HunyuanVideoConfig()``)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors, got {type(state_dict).__name__}")
    if config is None:
        config = HunyuanVideoConfig()
    if not isinstance(config, HunyuanVideoConfig):
        raise TypeError(f"config must be a HunyuanVideoConfig or None, got {type(config).__name__}")
    try:
        return from_diffusers(original_to_diffusers_state(state_dict, config), config, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"Tencent checkpoint (converted to diffusers names): {e}") from None


def from_checkpoint(path: str | os.PathLike, config: HunyuanVideoConfig | None = None, *, dtype=None):
    """(HunyuanVideoConfig, params) from a diffusers folder (config.json + safetensors shards; a pipeline
    folder's ``transformer/`` works) or one .safetensors file in either layout, memory-mapped; pickle
    formats are refused."""
    state, config = common.checkpoint_state(path, config, HunyuanVideoConfig)
    convert = from_original if is_original_layout(state) else from_diffusers
    return convert(state, config, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Converted params on disk


def save_params(directory: str | os.PathLike, config: HunyuanVideoConfig, params: Mapping[str, Any]) -> None:
    """Writes ``params.safetensors`` (flattened param names) then ``config.json``, each atomically."""
    common.save_model_params(directory, config, params, HunyuanVideoConfig, "chipmunk_jax.hunyuan_video")


def load_params(directory: str | os.PathLike):
    """(HunyuanVideoConfig, params) written by ``save_params`` / the convert CLI (numpy: the block stacks are
    copied into stacked host arrays, the rest stay memory-mapped)."""
    config, flat = common.load_model_params(directory, HunyuanVideoConfig, init_params, _MODEL)
    return config, unflatten_params(flat)


def convert_checkpoint(src: str, dst: str, config_path: str | None, dtype) -> str:
    """The convert CLI's HunyuanVideo entry: checkpoint at ``src`` -> params folder at ``dst``."""
    config, params = from_checkpoint(src, common.read_config_file(config_path, HunyuanVideoConfig), dtype=dtype)
    save_params(dst, config, params)
    return f"HunyuanVideo ({common.parameter_count(params):,} parameters)"
