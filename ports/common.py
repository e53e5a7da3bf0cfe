"""Model-independent pieces of the weight ports: param trees <-> flat names, diffusers names <-> param names,
original-layout renaming from tables, state-dict checks, arrays from torch/numpy/JAX, and the converted-params
folder format (params.safetensors + config.json)."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np

from chipmunk_jax.ports.safetensors_io import atomic_write, load_state_dict, read_safetensors, write_safetensors

__all__ = [
    "PORT_API",
    "flatten_params",
    "unflatten_params",
    "STACKED_BLOCKS",
    "param_to_diffusers_name",
    "diffusers_to_params",
    "params_to_diffusers",
    "expected_diffusers_shapes",
    "strip_prefix",
    "swap_halves",
    "original_to_diffusers",
    "to_numpy",
    "check_state",
    "block_count",
    "module_state",
    "checkpoint_state",
    "write_params_folder",
    "read_params_folder",
    "PARAMS_FILE",
    "CONFIG_FILE",
    "check_class_name",
]

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"

# What every model port (flux, hunyuan_video, wan) defines under these names; the convert CLI calls
# ``convert_checkpoint``. Each port's ``__all__`` is this plus its own extras.
PORT_API = [
    "from_diffusers",
    "from_original",
    "from_checkpoint",
    "to_diffusers",
    "expected_diffusers_shapes",
    "flatten_params",
    "unflatten_params",
    "infer_config",
    "is_original_layout",
    "original_to_diffusers_state",
    "save_params",
    "load_params",
    "convert_checkpoint",
]


# The block stacks of the three models (dotted paths): in a params tree each is ONE subtree whose arrays carry a
# leading layer axis (the models scan over it); flat names and files keep diffusers' per-block names
# (``transformer_blocks.3.attn.to_q.kernel``), so converted folders stay readable by name.
STACKED_BLOCKS = ("transformer_blocks", "single_transformer_blocks", "blocks",
                  "context_embedder.token_refiner.refiner_blocks")


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """{"transformer_blocks.0.attn.to_q.kernel": array, ...}: the params tree with "."-joined paths; a stacked
    block node (``STACKED_BLOCKS``) is unstacked into one name per block (``value[i]``: a view of numpy
    arrays; abstract ``ShapeDtypeStruct`` leaves lose their leading axis)."""
    out: dict[str, Any] = {}

    def walk(node, prefix):
        if prefix[:-1] in STACKED_BLOCKS and isinstance(node, Mapping):
            for i in range(_stack_size(node, prefix[:-1])):
                walk(jax.tree_util.tree_map(lambda x: _block_of(x, i), node), f"{prefix}{i}.")
            return
        if isinstance(node, Mapping):
            items = node.items()
        elif isinstance(node, (list, tuple)):
            items = ((str(i), v) for i, v in enumerate(node))
        else:
            out[prefix[:-1]] = node
            return
        for k, v in items:
            walk(v, f"{prefix}{k}.")

    walk(params, "")
    return out


def _stack_size(node, name: str) -> int:
    sizes = {int(x.shape[0]) for x in jax.tree_util.tree_leaves(node)}
    if len(sizes) > 1:
        raise ValueError(f"the arrays of block stack {name} have different leading (layer) axes: {sorted(sizes)}")
    return sizes.pop() if sizes else 0


def _block_of(x, i: int):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[i]


def unflatten_params(flat: Mapping[str, Any], stacked_nodes: Iterable[str] = ()) -> dict[str, Any]:
    """Inverse of ``flatten_params``: the nodes named in ``stacked_nodes`` (dotted paths), keyed by block index
    ``0..n-1``, become one tree stacked on a leading layer axis (``np.stack``: a host copy of each block array,
    made one stacked array at a time)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    for name in stacked_nodes:
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.get(p, {})
        if leaf not in node:
            continue
        blocks = node[leaf]
        if not all(i.isdigit() for i in blocks):
            raise ValueError(f"{name} must hold numbered blocks, got keys {sorted(blocks)[:5]}")
        indices = sorted(int(i) for i in blocks)
        if indices != list(range(len(indices))):
            raise ValueError(f"{name} indices are not contiguous from 0: {indices}")
        node[leaf] = _stack_numbered([blocks.pop(str(i)) for i in indices], name)
    return tree


def _stack_numbered(blocks: list, name: str):
    structures = {jax.tree_util.tree_structure(b) for b in blocks}
    if len(structures) > 1:
        raise ValueError(f"the blocks of {name} do not all hold the same parameters")
    if all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(blocks)):
        return jax.tree_util.tree_map(lambda *xs: jax.numpy.stack(xs), *blocks)
    return jax.tree_util.tree_map(lambda *xs: np.stack([to_numpy(x) for x in xs]), *blocks)


def param_to_diffusers_name(name: str) -> str:
    return re.sub(r"\.(kernel|scale)$", ".weight", name)


def diffusers_to_params(state: Mapping[str, np.ndarray], dtype=None) -> dict[str, np.ndarray]:
    """Flat param names and arrays of a (checked) diffusers state dict: a ``weight`` with two or more axes becomes
    ``kernel`` with its axes reversed (Linear [out, in] -> [in, out]), a 1-D one ``scale``; everything else is
    copied. ``dtype`` casts every array (None keeps the checkpoint's)."""
    flat = {}
    for name, value in state.items():
        stem, _, kind = name.rpartition(".")
        if kind == "weight":
            name, value = (f"{stem}.kernel", value.T) if value.ndim >= 2 else (f"{stem}.scale", value)
        flat[name] = value if dtype is None else value.astype(dtype)
    return flat


def params_to_diffusers(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The diffusers state dict (numpy, torch layout) of a params tree: the inverse of ``diffusers_to_params``."""
    out = {}
    for name, value in flatten_params(params).items():
        value = to_numpy(value)
        out[param_to_diffusers_name(name)] = value.T if name.endswith(".kernel") else value
    return out


def strip_prefix(key: str, prefixes: Iterable[str]) -> str:
    """``key`` without the first of ``prefixes`` it starts with (ComfyUI / original repacks nest the model)."""
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def swap_halves(x: np.ndarray) -> np.ndarray:
    """The halves of the first axis swapped: original (shift, scale) modulation rows <-> diffusers' (scale, shift)."""
    first, second = np.split(x, 2, axis=0)
    return np.concatenate([second, first], axis=0)


def original_to_diffusers(state: Mapping[str, Any], *, prefixes: Iterable[str], top_level: Mapping[str, Any],
                          blocks: Mapping[str, tuple], what: str) -> dict[str, np.ndarray]:
    """Rewrites an original-layout state dict to diffusers names from rename tables; unknown keys (and fused
    weights whose rows do not add up) raise one ValueError listing them (missing keys and shapes are checked
    later, against the config).

    Keys lose the first of ``prefixes`` they start with. An entry ``stem.kind`` (kind: weight, bias, scale, ...)
    is renamed by its whole key if a table has it, else by its stem (the kind is kept):
      top_level: {original key or stem: diffusers key or stem, or (that, fn) to transform the array};
      blocks: {original block list: (diffusers block list, renames, fused)} for keys ``<list>.<i>.<rest>``, with
        renames as top_level for ``rest``, and fused {stem of rest: (diffusers stems, row counts)}: a fused weight
        or bias split on its first axis, malformed unless its rows add up.
    """
    pattern = re.compile(rf"({'|'.join(map(re.escape, blocks))})\.(\d+)\.(.+)$")
    out: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    for key, value in state.items():
        key = strip_prefix(key, prefixes)
        m = pattern.match(key)
        if m is None:
            renamed = _renamed(key, to_numpy(value), top_level, {}, "")
        else:
            target, renames, fused = blocks[m.group(1)]
            renamed = _renamed(m.group(3), to_numpy(value), renames, fused, f"{target}.{m.group(2)}.")
        if renamed is None:
            unknown.append(key)
        else:
            out.update(renamed)
    if unknown:
        bad = "unknown or malformed keys" if any(fused for _, _, fused in blocks.values()) else "unknown keys"
        raise ValueError(f"{bad} in the {what} ({len(unknown)}): {sorted(unknown)}")
    return out


def _renamed(key: str, value: np.ndarray, renames: Mapping[str, Any], fused: Mapping[str, tuple], prefix: str):
    """[(diffusers name, array), ...] of one entry of ``original_to_diffusers`` (None: unknown or malformed)."""
    stem, _, kind = key.rpartition(".")
    if key in renames:
        target, suffix = renames[key], ""
    elif stem in renames:
        target, suffix = renames[stem], f".{kind}"
    elif stem in fused:
        names, rows = fused[stem]
        if value.shape[0] != sum(rows):
            return None
        parts = np.split(value, np.cumsum(rows)[:-1], axis=0)
        return [(f"{prefix}{name}.{kind}", part) for name, part in zip(names, parts)]
    else:
        return None
    target, fn = target if isinstance(target, tuple) else (target, None)
    return [(f"{prefix}{target}{suffix}", value if fn is None else fn(value))]


def expected_diffusers_shapes(init_params: Callable[[jax.Array], Any]) -> dict[str, tuple[int, ...]]:
    """{diffusers state-dict name: torch shape} of the params ``init_params(key)`` builds (via
    eval_shape: nothing is allocated). Dense kernels are [in, out] here, [out, in] in torch."""
    abstract = jax.eval_shape(init_params, jax.ShapeDtypeStruct((2,), np.uint32))
    shapes = {}
    for name, leaf in flatten_params(abstract).items():
        shape = tuple(leaf.shape)
        shapes[param_to_diffusers_name(name)] = shape[::-1] if name.endswith(".kernel") else shape
    return shapes


def to_numpy(value) -> np.ndarray:
    """numpy view of a torch tensor (bf16 through an int16 view: numpy has no torch bf16), numpy or JAX array."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        import torch  # local: torch is optional (the ports extra); a torch tensor means it is installed

        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(value)


def check_state(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str, model: str) -> None:
    """One ValueError listing every missing key, unexpected key and wrong shape."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: got {tuple(state[k].shape)}, expected {expected[k]}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != expected[k]
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if wrong:
            parts.append(f"wrong shapes ({len(wrong)}): {wrong}")
        raise ValueError(f"{what} does not match the {model} config: " + "; ".join(parts))


def block_count(keys: Iterable[str], prefix: str) -> int:
    """Number of ``prefix.N.`` blocks among ``keys`` (max N + 1)."""
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def write_params_folder(directory: str | os.PathLike, config_dict: Mapping[str, Any], params, fmt: str) -> None:
    """Writes ``params.safetensors`` (flattened names) then ``config.json``, each atomically
    (``safetensors_io.atomic_write``: no temp file survives an exception, files get the umask's permissions);
    the config goes last, so a folder with a config always has complete params."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    flat = {k: to_numpy(v) for k, v in flatten_params(params).items()}
    write_safetensors(os.path.join(directory, PARAMS_FILE), flat, metadata={"format": fmt})
    text = json.dumps(dict(config_dict), indent=2) + "\n"
    atomic_write(os.path.join(directory, CONFIG_FILE), lambda f: f.write(text), binary=False, suffix=".json")


def read_params_folder(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config dict, flat memory-mapped params) of a folder written by ``write_params_folder``."""
    directory = os.fspath(directory)
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        config_dict = json.load(f)
    return config_dict, read_safetensors(os.path.join(directory, PARAMS_FILE))


def module_state(module_or_state_dict, config, config_cls, module_class: str):
    """(state mapping, config) from a diffusers module (its state dict, and its config unless one is
    given) or a plain mapping of tensors; ``config`` must be a ``config_cls`` or None."""
    if hasattr(module_or_state_dict, "state_dict") and callable(module_or_state_dict.state_dict):
        module = module_or_state_dict
        if config is None and hasattr(module, "config"):
            config = config_cls.from_diffusers(dict(module.config))
        state = module.state_dict()
    elif isinstance(module_or_state_dict, Mapping):
        state = module_or_state_dict
    else:
        raise TypeError(
            f"module_or_state_dict must be a diffusers {module_class} or a mapping of tensors, "
            f"got {type(module_or_state_dict).__name__}"
        )
    if config is not None and not isinstance(config, config_cls):
        raise TypeError(f"config must be a {config_cls.__name__} or None, got {type(config).__name__}")
    return state, config


def checkpoint_state(path: str | os.PathLike, config, config_cls):
    """(state mapping, config) of a diffusers folder (config.json + safetensors shards; a pipeline folder's
    ``transformer/`` works) or one .safetensors file, memory-mapped: the config is ``config``, else the folder's
    config.json read by ``config_cls.from_diffusers``, else None. Pickle formats are refused."""
    config_dict, state = load_state_dict(path)
    if config is None and config_dict is not None:
        config = config_cls.from_diffusers(config_dict)
    return state, config


def expected_param_shapes(init_params: Callable[[jax.Array], Any]) -> dict[str, tuple[int, ...]]:
    """{flat param name: shape} of the params ``init_params(key)`` builds (via eval_shape)."""
    abstract = jax.eval_shape(init_params, jax.ShapeDtypeStruct((2,), np.uint32))
    return {k: tuple(v.shape) for k, v in flatten_params(abstract).items()}


def save_model_params(directory, config, params, config_cls, fmt: str) -> None:
    """``write_params_folder`` for a model config with ``to_diffusers()``, type-checked."""
    if not isinstance(config, config_cls):
        raise TypeError(f"config must be a {config_cls.__name__}, got {type(config).__name__}")
    write_params_folder(directory, config.to_diffusers(), params, fmt)


def load_model_params(directory, config_cls, init_params: Callable[[Any, jax.Array], Any], model: str):
    """(config, flat params) of a folder written by ``save_model_params``, every key and shape checked
    against the params ``init_params(config, key)`` builds."""
    config_dict, flat = read_params_folder(directory)
    config = config_cls.from_diffusers(config_dict)
    expected = expected_param_shapes(lambda key: init_params(config, key))
    check_state(flat, expected, f"params in {os.fspath(directory)!r}", model)
    return config, flat


def check_class_name(folder: str | os.PathLike, expected: str, what: str) -> None:
    """A folder's config.json ``_class_name`` (diffusers' folders and converted ones both write it) must be
    ``expected``; ``what`` starts the error. A folder without a readable config.json passes: its loader reports it."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            found = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return
    if found is not None and found != expected:
        raise ValueError(f"{what} {os.fspath(folder)!r} holds a {found}, not a {expected}")


def read_config_file(config_path: str | None, config_cls):
    """``config_cls.from_diffusers`` of a diffusers config.json, or None without a path."""
    if config_path is None:
        return None
    with open(config_path) as f:
        return config_cls.from_diffusers(json.load(f))


def parameter_count(params) -> int:
    return sum(int(np.prod(np.shape(v))) for v in flatten_params(params).values())
