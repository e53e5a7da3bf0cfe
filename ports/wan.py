"""Wan 2.1 weight ports: diffusers and original Wan-AI checkpoints -> ``chipmunk_jax.models.wan`` params.

Names follow docs/models.md §5.3 / §5.5. The diffusers state dict maps one to one: a ``weight`` with two or
more axes becomes ``kernel`` with its axes reversed (Linear [out, in] -> [in, out], the patch Conv3d
[out, in, pt, ph, pw] -> [pw, ph, pt, in, out]), a 1-D ``weight`` (RMSNorm, affine LayerNorm) becomes
``scale``; biases, ``scale_shift_table`` and ``pos_embed`` are copied. The unused
``attn2.norm_added_q.weight`` some I2V checkpoints carry is dropped (diffusers ignores it too). RoPE
tables are no checkpoint entries: the model recomputes them.

The original layout (``blocks.N.self_attn.q``, ``head.head``, ...) is first rewritten to diffusers
names; its affine cross-attention norm ``norm3`` becomes ``norm2``. A ``model.diffusion_model.`` or
``diffusion_model.`` prefix (ComfyUI repacks) is stripped.

Returned params hold numpy arrays (memory-mapped views where the input was, outside the stacked blocks), in
the checkpoint dtype unless ``dtype`` is given. Every key is checked against the config: missing keys,
unexpected keys and wrong shapes raise one ValueError that lists them all. Pickle checkpoints are refused. """

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from chipmunk_jax.models.wan import WanConfig, init_params
from chipmunk_jax.ports import common
from chipmunk_jax.ports.common import flatten_params  # noqa: F401  (re-exported: common.PORT_API)

__all__ = [*common.PORT_API, "ORIGINAL_PREFIXES", "pipeline_options", "load_experts"]

ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_LIST_NODES = ("blocks",)
_IGNORED = re.compile(r"blocks\.\d+\.attn2\.norm_added_q\.weight$")
_RAW = ("scale_shift_table", "pos_embed")


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``flatten_params`` (``blocks`` stacked on a leading layer axis)."""
    return common.unflatten_params(flat, _LIST_NODES)


def expected_diffusers_shapes(config: WanConfig) -> dict[str, tuple[int, ...]]:
    """{diffusers state-dict name: torch shape} for ``config`` (the model's own structure, via eval_shape)."""
    return common.expected_diffusers_shapes(lambda key: init_params(config, key))


def _check_state(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    common.check_state(state, expected, what, "Wan")


def _strip_prefix(key: str) -> str:
    return common.strip_prefix(key, ORIGINAL_PREFIXES)


# ----------------------------------------------------------------------------------------------
# diffusers


def infer_config(state: Mapping[str, Any]) -> WanConfig:
    """WanConfig from a diffusers-layout state dict's shapes. The head size cannot be seen in the weights
    (q/k norms run across heads): 128 is assumed (every released Wan 2.1), else pass a config."""
    try:
        inner_dim, in_channels, *patch_size = state["patch_embedding.weight"].shape
        freq_dim = state["condition_embedder.time_embedder.linear_1.weight"].shape[1]
        text_dim = state["condition_embedder.text_embedder.linear_1.weight"].shape[1]
        ffn_dim = state["blocks.0.ffn.net.0.proj.weight"].shape[0]
        out_features = state["proj_out.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ValueError(f"cannot infer the Wan config from the state dict (no {e}): pass config=") from None
    if inner_dim % 128:
        raise ValueError(f"inner dim {inner_dim} is not a multiple of 128: the head size is unknown, pass config=")
    image = "condition_embedder.image_embedder.norm1.weight"
    add_k = "blocks.0.attn2.add_k_proj.weight"
    pos = "condition_embedder.image_embedder.pos_embed"
    return WanConfig(
        patch_size=tuple(int(p) for p in patch_size),
        num_attention_heads=int(inner_dim // 128),
        attention_head_dim=128,
        in_channels=int(in_channels),
        out_channels=int(out_features // int(np.prod(patch_size))),
        text_dim=int(text_dim),
        freq_dim=int(freq_dim),
        ffn_dim=int(ffn_dim),
        num_layers=common.block_count(state, "blocks"),
        cross_attn_norm="blocks.0.norm2.weight" in state,
        image_dim=int(state[image].shape[0]) if image in state else None,
        added_kv_proj_dim=int(state[add_k].shape[1]) if add_k in state else None,
        pos_embed_seq_len=int(state[pos].shape[1]) if pos in state else None,
    )


def from_diffusers(module_or_state_dict, config: WanConfig | None = None, *, dtype=None):
    """(WanConfig, params) from a diffusers ``WanTransformer3DModel`` or its state dict.

    The config comes from ``config``, else the module's ``config``, else the state dict's shapes.
    ``dtype`` (e.g. ``ml_dtypes.bfloat16``) casts every tensor; None keeps the checkpoint's dtypes.
    """
    state, config = common.module_state(module_or_state_dict, config, WanConfig, "WanTransformer3DModel")
    if is_original_layout(state):
        raise ValueError("this state dict is in the original Wan-AI layout (blocks.N.self_attn.*): use from_original")
    state = {_strip_prefix(k): common.to_numpy(v) for k, v in state.items() if not _IGNORED.search(k)}
    config = config or infer_config(state)
    _check_state(state, expected_diffusers_shapes(config), "diffusers state dict")
    return config, unflatten_params(common.diffusers_to_params(state, dtype))


def to_diffusers(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The diffusers state dict (numpy, torch layout) of a params tree: the inverse of from_diffusers."""
    return common.params_to_diffusers(params)


# ----------------------------------------------------------------------------------------------
# Original Wan-AI layout


def is_original_layout(state: Mapping[str, Any]) -> bool:
    return any(re.match(r"blocks\.\d+\.(self_attn|cross_attn)\.", _strip_prefix(k)) for k in state)


_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
_TOP_LEVEL_RAW = {"head.modulation": "scale_shift_table", "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed"}
_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "norm_q": "norm_q", "norm_k": "norm_k",
              "k_img": "add_k_proj", "v_img": "add_v_proj", "norm_k_img": "norm_added_k"}
_BLOCK = {"norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}


def original_to_diffusers_state(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Rewrites an original-layout state dict (prefix optional) to diffusers names. Unknown keys raise one
    ValueError listing them; missing keys and shapes are checked afterwards against the config."""
    attention = {f"{src}.{name}": f"{dst}.{target}" for src, dst in (("self_attn", "attn1"), ("cross_attn", "attn2"))
                 for name, target in _ATTENTION.items()}
    return common.original_to_diffusers(
        state,
        prefixes=ORIGINAL_PREFIXES,
        top_level={**_TOP_LEVEL, **_TOP_LEVEL_RAW},
        blocks={"blocks": ("blocks", {"modulation": "scale_shift_table", **_BLOCK, **attention}, {})},
        what="original Wan checkpoint",
    )


def from_original(state_dict: Mapping[str, Any], config: WanConfig | None = None, *, dtype=None):
    """(WanConfig, params) from an original Wan-AI (or ComfyUI) state dict. The config is inferred from the
    shapes when not given (head size 128 assumed)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors, got {type(state_dict).__name__}")
    if config is not None and not isinstance(config, WanConfig):
        raise TypeError(f"config must be a WanConfig or None, got {type(config).__name__}")
    try:
        return from_diffusers(original_to_diffusers_state(state_dict), config, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"original Wan checkpoint (converted to diffusers names): {e}") from None


def from_checkpoint(path: str | os.PathLike, config: WanConfig | None = None, *, dtype=None,
                    subfolder: str | None = None):
    """(WanConfig, params) from a diffusers folder (config.json + safetensors shards; a pipeline folder
    with ``transformer/`` works too) or one .safetensors file in either layout, memory-mapped.
    ``subfolder``: the model folder inside a pipeline folder, e.g. ``"transformer_2"`` for the low-noise expert
    of a Wan 2.2 A14B pipeline (``"transformer"`` is the high-noise one); a missing one is a clear error."""
    if subfolder is not None:
        path = _pipeline_subfolder(path, subfolder)
    state, config = common.checkpoint_state(path, config, WanConfig)
    convert = from_original if is_original_layout(state) else from_diffusers
    return convert(state, config, dtype=dtype)


def _pipeline_subfolder(path, subfolder: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"subfolder={subfolder!r} needs a diffusers pipeline folder, got {path!r}")
    folder = os.path.join(path, subfolder)
    if not os.path.isdir(folder):
        hint = ""
        if subfolder == "transformer_2":
            hint = (": this pipeline has no low-noise expert (Wan 2.1 and Wan2.2-TI2V-5B pipelines hold one "
                    "transformer; Wan 2.2 A14B pipelines hold transformer/ and transformer_2/)")
        raise FileNotFoundError(f"no {subfolder}/ in pipeline folder {path!r}{hint}")
    return folder


def pipeline_options(path: str | os.PathLike) -> dict[str, Any]:
    """The Wan 2.2 entries of a diffusers pipeline folder's model_index.json: ``boundary_ratio`` (None for one
    expert) and ``expand_timesteps`` (per-token timesteps, TI2V-5B), with diffusers' defaults when absent."""
    index = os.path.join(os.fspath(path), "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"no model_index.json in pipeline folder {os.fspath(path)!r}")
    with open(index) as f:
        data = json.load(f)
    return {"boundary_ratio": data.get("boundary_ratio"), "expand_timesteps": bool(data.get("expand_timesteps", False))}


def load_experts(path: str | os.PathLike, *, dtype=None):
    """Both experts of a Wan 2.2 A14B diffusers pipeline folder: ((config, params) of ``transformer/`` (high
    noise), (config, params) of ``transformer_2/`` (low noise), boundary_ratio). A folder without transformer_2/
    or without a boundary_ratio in model_index.json is refused."""
    high = from_checkpoint(path, dtype=dtype, subfolder="transformer")
    low = from_checkpoint(path, dtype=dtype, subfolder="transformer_2")
    ratio = pipeline_options(path)["boundary_ratio"]
    if ratio is None:
        raise ValueError(f"pipeline folder {os.fspath(path)!r} holds transformer_2/ but its model_index.json sets no "
                         "boundary_ratio: the expert switch is unknown")
    return high, low, float(ratio)


# ----------------------------------------------------------------------------------------------
# Converted params on disk


def save_params(directory: str | os.PathLike, config: WanConfig, params: Mapping[str, Any]) -> None:
    """Writes ``params.safetensors`` (flattened param names) then ``config.json``, each atomically."""
    common.save_model_params(directory, config, params, WanConfig, "chipmunk_jax.wan")


def load_params(directory: str | os.PathLike):
    """(WanConfig, params) written by ``save_params`` / the convert CLI (numpy: the block stacks are copied into
    stacked host arrays, the rest stay memory-mapped)."""
    config, flat = common.load_model_params(directory, WanConfig, init_params, "Wan")
    return config, unflatten_params(flat)


def convert_checkpoint(src: str, dst: str, config_path: str | None, dtype) -> str:
    """The convert CLI's Wan entry: checkpoint at ``src`` -> params folder at ``dst``."""
    config, params = from_checkpoint(src, common.read_config_file(config_path, WanConfig), dtype=dtype)
    save_params(dst, config, params)
    kind = "I2V" if config.image_dim is not None else "T2V"
    return f"Wan 2.1 {kind} ({config.num_layers} blocks, {common.parameter_count(params):,} parameters)"
