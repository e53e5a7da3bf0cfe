"""FLUX.1 weight ports: diffusers and original BFL checkpoints -> ``chipmunk_jax.models.flux`` params.

Names follow docs/models.md §5.1 / §5.5. The diffusers state dict maps one to one: ``a.b.weight`` [out, in]
becomes ``params[a][b]["kernel"]`` [in, out] (an RMSNorm ``weight`` becomes ``scale``), biases are copied, and
``transformer_blocks`` / ``single_transformer_blocks`` are stacked on a leading layer axis. The BFL layout is
first rewritten to diffusers names (fused qkv split in three, single-block ``linear1`` split into q, k, v,
mlp, the final modulation halves swapped from (shift, scale) to (scale, shift)).

Returned params hold numpy arrays (memory-mapped views where the input was, outside the stacked blocks), in
the checkpoint dtype unless ``dtype`` is given; ``jax.device_put`` them when needed. Every key is checked
against the config: missing keys, unexpected keys and wrong shapes raise one ValueError that lists them all.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from chipmunk_jax.models.flux import FluxConfig, init_params
from chipmunk_jax.ports import common
from chipmunk_jax.ports.common import flatten_params  # noqa: F401  (re-exported: common.PORT_API)

__all__ = [*common.PORT_API, "original_config_guess", "ORIGINAL_PREFIX"]

ORIGINAL_PREFIX = "model.diffusion_model."
_LIST_NODES = ("transformer_blocks", "single_transformer_blocks")
_NORM_NAMES = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


# ----------------------------------------------------------------------------------------------
# Tree <-> flat names, checks


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``flatten_params`` (the two block stacks stacked on a leading layer axis)."""
    return common.unflatten_params(flat, _LIST_NODES)


def expected_diffusers_shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    """{diffusers state-dict name: torch shape} for ``config`` (the model's own structure, via eval_shape)."""
    return common.expected_diffusers_shapes(lambda key: init_params(config, key))


_to_numpy = common.to_numpy


def _check_state(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    common.check_state(state, expected, what, "FLUX")


# ----------------------------------------------------------------------------------------------
# diffusers


_block_count = common.block_count


def infer_config(state: Mapping[str, Any]) -> FluxConfig:
    """FluxConfig from a diffusers-layout state dict's shapes. axes_dims_rope cannot be seen in the
    weights: (16, 56, 56) is assumed for head_dim 128 (every released FLUX.1), else pass a config."""
    try:
        inner_dim, in_channels = state["x_embedder.weight"].shape
        head_dim = next(state[k].shape[0] for k in state if k.endswith("attn.norm_q.weight"))
        out_features = state["proj_out.weight"].shape[0]
        joint_dim = state["context_embedder.weight"].shape[1]
        pooled_dim = state["time_text_embed.text_embedder.linear_1.weight"].shape[1]
    except (KeyError, StopIteration) as e:
        raise ValueError(f"cannot infer the FLUX config from the state dict (no {e}): pass config=") from None
    if head_dim != 128:
        raise ValueError(f"head_dim {head_dim} != 128: axes_dims_rope is unknown, pass config=")
    if out_features != in_channels:
        raise ValueError(f"proj_out has {out_features} outputs for {in_channels} inputs: pass config=")
    return FluxConfig(
        in_channels=int(in_channels),
        num_layers=_block_count(state, "transformer_blocks"),
        num_single_layers=_block_count(state, "single_transformer_blocks"),
        attention_head_dim=int(head_dim),
        num_attention_heads=int(inner_dim // head_dim),
        joint_attention_dim=int(joint_dim),
        pooled_projection_dim=int(pooled_dim),
        guidance_embeds=any(k.startswith("time_text_embed.guidance_embedder.") for k in state),
    )


def from_diffusers(module_or_state_dict, config: FluxConfig | None = None, *, dtype=None):
    """(FluxConfig, params) from a diffusers ``FluxTransformer2DModel`` or its state dict.

    The config comes from ``config``, else the module's ``config``, else the state dict's shapes.
    ``dtype`` (e.g. ``jnp.bfloat16``) casts every tensor; None keeps the checkpoint's dtypes.
    """
    state, config = common.module_state(module_or_state_dict, config, FluxConfig, "FluxTransformer2DModel")
    if is_original_layout(state):
        raise ValueError("this state dict is in the original BFL layout (double_blocks.*): use from_original")
    state = {k: _to_numpy(v) for k, v in state.items()}
    config = config or infer_config(state)
    _check_state(state, expected_diffusers_shapes(config), "diffusers state dict")
    return config, unflatten_params(common.diffusers_to_params(state, dtype))


def to_diffusers(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The diffusers state dict (numpy, torch layout) of a params tree: the inverse of from_diffusers."""
    return common.params_to_diffusers(params)


# ----------------------------------------------------------------------------------------------
# Original BFL layout


def is_original_layout(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(("double_blocks.", "single_blocks.", ORIGINAL_PREFIX + "double_blocks.")) for k in state)


_TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def original_to_diffusers_state(state: Mapping[str, Any], config: FluxConfig) -> dict[str, np.ndarray]:
    """Rewrites a BFL-layout state dict (``model.diffusion_model.`` prefix optional) to diffusers names.
    Keys it does not know are reported together with the missing/shape errors of the result."""
    d = config.inner_dim
    qkv = {name: (targets, (d, d, d)) for name, targets in _DOUBLE_QKV.items()}
    linear1 = {"linear1": (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (d, d, d, config.mlp_hidden_dim))}
    return common.original_to_diffusers(
        state,
        prefixes=(ORIGINAL_PREFIX,),
        top_level={**_TOP_LEVEL, "final_layer.adaLN_modulation.1": ("norm_out.linear", common.swap_halves)},
        blocks={
            "double_blocks": ("transformer_blocks", {**_DOUBLE, **_DOUBLE_NORMS}, qkv),
            "single_blocks": ("single_transformer_blocks", {**_SINGLE, **_SINGLE_NORMS}, linear1),
        },
        what="BFL checkpoint",
    )


def from_original(state_dict: Mapping[str, Any], config: FluxConfig, *, dtype=None):
    """(FluxConfig, params) from a BFL single-file checkpoint's state dict (``flux1-dev.safetensors``)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors, got {type(state_dict).__name__}")
    if not isinstance(config, FluxConfig):
        raise TypeError(f"config must be a FluxConfig, got {type(config).__name__}")
    try:
        return from_diffusers(original_to_diffusers_state(state_dict, config), config, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"BFL checkpoint (converted to diffusers names): {e}") from None


def original_config_guess(state: Mapping[str, Any]) -> FluxConfig:
    """FLUX.1 config for a BFL checkpoint: dev if it has ``guidance_in``, else schnell; block counts
    from the keys (the BFL file carries no config)."""
    keys = [common.strip_prefix(k, (ORIGINAL_PREFIX,)) for k in state]
    return FluxConfig(
        num_layers=_block_count(keys, "double_blocks"),
        num_single_layers=_block_count(keys, "single_blocks"),
        guidance_embeds=any(k.startswith("guidance_in.") for k in keys),
    )


def from_checkpoint(path: str | os.PathLike, config: FluxConfig | None = None, *, dtype=None):
    """(FluxConfig, params) from a diffusers folder (config.json + safetensors shards) or one
    .safetensors file in either layout, memory-mapped; pickle formats are refused."""
    state, config = common.checkpoint_state(path, config, FluxConfig)
    if is_original_layout(state):
        return from_original(state, config or original_config_guess(state), dtype=dtype)
    return from_diffusers(state, config, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Converted params on disk

PARAMS_FILE = common.PARAMS_FILE
CONFIG_FILE = common.CONFIG_FILE


def save_params(directory: str | os.PathLike, config: FluxConfig, params: Mapping[str, Any]) -> None:
    """Writes ``params.safetensors`` (flattened param names) then ``config.json``, each atomically; the
    config is written last, so a folder with a config always has complete params."""
    common.save_model_params(directory, config, params, FluxConfig, "chipmunk_jax.flux")


def load_params(directory: str | os.PathLike):
    """(FluxConfig, params) written by ``save_params`` / the convert CLI (numpy: the block stacks are copied into
    stacked host arrays, the rest stay memory-mapped)."""
    config, flat = common.load_model_params(directory, FluxConfig, init_params, "FLUX")
    return config, unflatten_params(flat)


def convert_checkpoint(src: str, dst: str, config_path: str | None, dtype) -> str:
    """The convert CLI's FLUX entry: checkpoint at ``src`` -> params folder at ``dst``."""
    config, params = from_checkpoint(src, common.read_config_file(config_path, FluxConfig), dtype=dtype)
    save_params(dst, config, params)
    kind = "dev" if config.guidance_embeds else "schnell"
    return f"FLUX ({kind}-style, {common.parameter_count(params):,} parameters)"
