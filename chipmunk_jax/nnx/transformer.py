"""``TransformerModule``: one functional model (docs/architecture.md §4) as a Flax NNX module over its param tree.

The module holds nothing but the param tree (as ``nnx.Param`` leaves, one attribute per top-level entry) and two
static attributes, ``config`` and ``dtype``. Everything it computes is the functional model's: a call is
``forward(params_tree(), config, ...)``, ``denoiser`` is the model's ``denoiser``. ``param_tree`` turns any of the
forms a user may hold (plain tree, ``nnx.State``, the module) into the plain tree the functions take.

Sharding (docs/architecture.md §6): every ``nnx.Param`` carries flax's sharding annotation (``out_sharding``, the
metadata ``nnx.with_partitioning`` sets) in the axis names of ``parallel.make_mesh``'s ("cfg", "sequence") meshes.
The multi-GPU design keeps the params replicated (sequence and CFG parallel, no weight sharding), so each annotation
is one ``None`` per array axis: ``nnx.get_partition_spec(nnx.state(model))`` gives ``P(None, ..., None)`` (= ``P()``)
for every param, ``nnx.get_named_sharding(state, mesh)`` the fully replicated ``NamedSharding``s, and
``model.shard(mesh)`` puts the state there. The annotation is metadata only (``eager_sharding=False``): building a
module never moves or copies an array, also under ``jax.set_mesh``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from types import ModuleType
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from chipmunk_jax.outputs import ModelOutput
from chipmunk_jax.ports import common as port_common
from chipmunk_jax.sampling import Denoiser

__all__ = ["TransformerModule", "param_tree", "param_partition", "is_orbax_checkpoint"]

_SHOWN = 8  # names listed per kind of mismatch in an error message


def param_tree(params) -> dict[str, Any]:
    """The plain param tree (nested dicts of arrays) of ``params``: a ``TransformerModule``, an ``nnx.State`` of one
    (``nnx.split`` / ``nnx.state``, ``nnx.Param`` leaves), or a plain tree (returned as it is). The arrays are the
    very ones ``params`` holds (no copy); inside ``jax.jit`` they are the tracers."""
    if isinstance(params, TransformerModule):
        return params.params_tree()
    if isinstance(params, nnx.Variable) or not isinstance(params, Mapping):
        raise TypeError("params must be a param tree (a dict), an nnx.State of a chipmunk_jax.nnx module or the "
                        f"module itself, got {type(params).__name__}")
    if isinstance(params, dict) and not any(isinstance(x, nnx.Variable) for x in _leaves(params)):
        return params
    return _plain(params)


def _leaves(node):
    return jax.tree_util.tree_leaves(node, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _plain(node):
    """Mappings -> dicts, ``nnx.Variable`` -> its value, other leaves as they are."""
    if isinstance(node, nnx.Variable):
        return node.get_value()
    if isinstance(node, Mapping):
        return {key: _plain(value) for key, value in node.items()}
    return node


def param_partition(shape) -> tuple[None, ...]:
    """The sharding annotation (``out_sharding``, mesh axis names per array axis) of a param of this ``shape``:
    replicated, one ``None`` per axis, on every ``parallel.make_mesh`` mesh (docs/architecture.md §6: the params stay
    whole on every device; no weight sharding). The one place a weight-sharded layout would name mesh axes."""
    return (None,) * len(shape)


def _as_params(node):
    """The same nested dicts with every array wrapped in an ``nnx.Param`` carrying its sharding annotation
    (``param_partition``): a JAX array itself, a numpy array put on the device (``jnp.asarray``)."""
    if isinstance(node, dict):
        return {key: _as_params(value) for key, value in node.items()}
    value = jnp.asarray(node) if isinstance(node, np.ndarray) else node
    # metadata only: eager sharding would device_put the value under a mesh context (a copy) or fail without one
    return nnx.Param(value, out_sharding=param_partition(value.shape), eager_sharding=False)


def is_orbax_checkpoint(path) -> bool:
    """Whether ``path`` is a folder an orbax ``StandardCheckpointer`` (or ``PyTreeCheckpointer``) saved: it holds
    orbax's ``_METADATA`` or ``_CHECKPOINT_METADATA`` file."""
    path = os.fspath(path)
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name))
                                       for name in ("_METADATA", "_CHECKPOINT_METADATA"))


def _orbax_metadata_tree(path: str):
    """The nested dicts of ``ArrayMetadata`` (shape, dtype) an orbax checkpoint holds (no array is read)."""
    import orbax.checkpoint as ocp  # a flax dependency; imported where it is used

    metadata = ocp.StandardCheckpointer().metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    return getattr(tree, "tree", tree)


def _strip_values(node):
    """An orbax-read ``nnx.State`` (each param saved as ``{"value": array}``) as the plain param tree; a plain
    tree as it is."""
    if isinstance(node, Mapping):
        if set(node) == {"value"} and not isinstance(node["value"], Mapping):
            return node["value"]
        return {key: _strip_values(value) for key, value in node.items()}
    return node


class TransformerModule(nnx.Module):
    """A functional model (``models.flux``, ``models.hunyuan_video``, ``models.wan``) as an NNX module.

    Attributes: one per top-level entry of the param tree (e.g. ``transformer_blocks``), holding that subtree with
    ``nnx.Param`` leaves; ``config`` (the model config, static); ``dtype`` (the default compute dtype of calls,
    denoisers and caches, static). ``nnx.state(module)`` is the param tree: same paths, same arrays.

    Subclasses name the functional model (``_model``), its weight port (``_port``) and config class (``_config``).
    """

    _model: ClassVar[ModuleType]
    _port: ClassVar[ModuleType]
    _config: ClassVar[type]

    def __init__(self, config, *, rngs: nnx.Rngs | None = None, dtype=None, params=None):
        """Random params from the model's ``init_params(config, rngs.params(), dtype=dtype)`` (torch's default
        inits; for tests and timing), or, with ``params=`` instead of ``rngs``, the given param tree
        (``from_params``).

        ``dtype``: the dtype of the params built here (None: bfloat16) and the default compute dtype; with
        ``params=``, the compute dtype only (None: the params' own dtype)."""
        self._check_config(config)
        if (rngs is None) == (params is None):
            raise TypeError(f"{type(self).__name__}: pass rngs=nnx.Rngs(seed) to build random params, or params= "
                            "(or use from_params / from_pretrained)")
        if params is None:
            if not isinstance(rngs, nnx.Rngs):
                raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
            dtype = jnp.bfloat16 if dtype is None else dtype
            params = self._model.init_params(config, rngs.params(), dtype=dtype)
        else:
            params = self._checked_params(param_tree(params), config)
            dtype = _common_dtype(params) if dtype is None else dtype
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self._param_names = tuple(params)
        for name, subtree in params.items():
            if not name.isidentifier() or name.startswith("_") or hasattr(type(self), name):
                raise ValueError(f"param entry {name!r} cannot be a {type(self).__name__} attribute")
            value = _as_params(subtree)
            setattr(self, name, nnx.data(value) if isinstance(value, dict) else value)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_params(cls, params, config, *, dtype=None):
        """The module around an existing param tree (``init_params``, the ports, ``params_tree()`` of another
        module, or an ``nnx.State``): its JAX arrays become the module's ``nnx.Param`` values as they are (no copy,
        no cast), numpy arrays (the ports' output) are put on the device. Every path and shape is checked against
        ``config``. ``dtype``: the default compute dtype (None: the params' own dtype)."""
        return cls(config, params=params, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, *, dtype=jnp.bfloat16, config=None):
        """The module from a checkpoint, through the model's weight port (``chipmunk_jax.ports``):

        ``path``: a diffusers model folder (config.json + safetensors shards), a diffusers pipeline folder (its
        ``transformer/``), one .safetensors file (diffusers or original layout), or a folder converted by
        ``chipmunk-jax convert`` / the port's ``save_params`` (params.safetensors + config.json). Pickle formats are
        refused. ``dtype``: the params' dtype on the device and the default compute dtype (None keeps the
        checkpoint's). ``config``: the model config when the checkpoint carries none (a single file); a folder's
        own config.json must agree with it."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{cls.__name__}.from_pretrained: no such file or folder {path!r}")
        if config is not None:
            cls._check_config(config)
        source = _transformer_folder(path)
        if os.path.isdir(source):
            port_common.check_class_name(source, cls._config.DIFFUSERS_CLASS, f"{cls.__name__}.from_pretrained:")
        try:
            if os.path.isfile(os.path.join(source, port_common.PARAMS_FILE)):
                loaded, params = cls._port.load_params(source)
                if config is not None and config != loaded:
                    raise ValueError(f"config= differs from the folder's {port_common.CONFIG_FILE}: {loaded}")
            else:
                loaded, params = cls._port.from_checkpoint(source, config)
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise ValueError(f"{cls.__name__}.from_pretrained({path!r}): {e}") from None
        params = jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), params)
        return cls.from_params(params, loaded, dtype=dtype)

    @classmethod
    def from_orbax(cls, path, config, *, dtype=None, mesh=None):
        """The module from an orbax checkpoint of a module's state, as saved by
        ``ocp.StandardCheckpointer().save(path, nnx.state(model))`` (README "Flax NNX modules"; a plain param tree
        saved the same way reads too). The checkpoint holds no config: pass the model's ``config`` (every path and
        shape is checked against it before anything is read). ``dtype``: the params' dtype after restoring (orbax
        casts while reading) and the default compute dtype (None: the checkpoint's own). ``mesh``: restore straight
        onto a ``parallel.make_mesh`` mesh with the params' annotated (replicated) shardings (None: the default
        device)."""
        import orbax.checkpoint as ocp  # a flax dependency; imported where it is used

        path = os.path.abspath(os.fspath(path))
        cls._check_config(config)
        if not is_orbax_checkpoint(path):
            raise ValueError(f"{cls.__name__}.from_orbax: {path!r} is not an orbax checkpoint folder (no _METADATA / "
                             "_CHECKPOINT_METADATA; save one with ocp.StandardCheckpointer().save(path, "
                             "nnx.state(model)))")
        try:
            saved = _orbax_metadata_tree(path)
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise ValueError(f"{cls.__name__}.from_orbax({path!r}): {e}") from None
        if not isinstance(saved, Mapping):
            raise ValueError(f"{cls.__name__}.from_orbax({path!r}): the checkpoint holds a "
                             f"{type(saved).__name__}, not a module state (a tree of params)")
        is_array = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
        # the restore target in the checkpoint's own structure: the wanted dtype, the annotated placement
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(
                tuple(x.shape), x.dtype if dtype is None else dtype,
                sharding=one_device if mesh is None else NamedSharding(mesh, P(*param_partition(x.shape)))),
            saved, is_leaf=is_array)
        try:
            cls.from_params(_strip_values(target), config, dtype=dtype)  # checks paths and shapes; nothing is read
            restored = ocp.StandardCheckpointer().restore(path, target)
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise ValueError(f"{cls.__name__}.from_orbax({path!r}): {e}") from None
        return cls.from_params(_strip_values(restored), config, dtype=dtype)

    # ---- placement on a mesh --------------------------------------------------------------------

    def shardings(self, mesh):
        """The params' ``NamedSharding``s on ``mesh`` (a ``parallel.make_mesh`` mesh, or any ``jax.sharding.Mesh``),
        from their sharding annotations: ``nnx.get_named_sharding(nnx.state(self), mesh)``, an ``nnx.State`` of the
        state's structure (replicated: every param whole on every device). An annotation naming an axis the mesh
        lacks is an error."""
        if not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh (parallel.make_mesh), got {type(mesh).__name__}")
        state = nnx.state(self, nnx.Param)
        for path, spec in nnx.to_flat_state(nnx.get_partition_spec(state)):
            spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
            names = [n for entry in spec if entry is not None for n in (entry if isinstance(entry, tuple) else
                                                                         (entry,))]
            unknown = [n for n in names if n not in mesh.axis_names]
            if unknown:
                raise ValueError(f"param {'.'.join(map(str, path))} is annotated with mesh axes {unknown} that the "
                                 f"mesh (axes {mesh.axis_names}) lacks")
        return nnx.get_named_sharding(state, mesh)

    def shard(self, mesh):
        """Puts every param on ``mesh`` with its annotated sharding (replicated: ``jax.device_put`` of the state
        onto ``self.shardings(mesh)``) and returns the module, now holding the placed arrays; the sampler built on
        the same mesh (``model.denoiser(..., mesh=mesh)``) takes it, its ``nnx.state`` or its ``params_tree()``."""
        placed = jax.device_put(nnx.state(self, nnx.Param), self.shardings(mesh))
        nnx.update(self, placed)
        return self

    # ---- the functional model -------------------------------------------------------------------

    def params_tree(self) -> dict[str, Any]:
        """The plain param tree the functional model, the ports and the sampler take: the module's arrays
        themselves, in the structure of ``init_params`` (no copy)."""
        return {name: _plain(getattr(self, name)) for name in self._param_names}

    def __call__(self, hidden_states, *, dtype=None, **keywords) -> ModelOutput:
        """The model's ``forward(params_tree(), config, hidden_states=..., **keywords)`` -> ``ModelOutput(sample,
        hidden, cache)``. ``keywords``: diffusers' (see the subclass) and forward's own: ``chipmunk``, ``cache``,
        ``plan``, ``key``, ``conditioning``, ``rotary_emb``, ``attention_impl``, ``kernel_impl``, ``mesh`` and the
        model's extras. ``dtype``: the compute dtype (default: the module's ``dtype``)."""
        return self._model.forward(self.params_tree(), self.config, hidden_states=hidden_states,
                                   dtype=self.dtype if dtype is None else dtype, **keywords)

    def denoiser(self, chipmunk=None, *, dtype=None, **keywords) -> Denoiser:
        """The model's ``denoiser(config, chipmunk, **keywords)`` for ``sampling.make_sampler``; its functions take
        the params in any form ``param_tree`` reads, so the jitted sampler runs as ``run(module, ...)``,
        ``run(nnx.state(module), ...)`` or ``run(module.params_tree(), ...)`` (each form traces its own program,
        all of them the functional one). ``dtype``: the compute dtype (default: the
        module's). ``keywords``: the model's (``grid=`` always; HunyuanVideo ``text_length=``; ...)."""
        den = self._model.denoiser(self.config, chipmunk, dtype=self.dtype if dtype is None else dtype, **keywords)
        tables = den.timestep_tables
        return dataclasses.replace(
            den,
            compute=lambda params, *args: den.compute(param_tree(params), *args),
            head=lambda params, *args: den.head(param_tree(params), *args),
            timestep_tables=None if tables is None else lambda params, *args: tables(param_tree(params), *args))

    def init_cache(self, chipmunk, *, dtype=None, **keywords):
        """The model's ``init_cache(config, chipmunk, **keywords)`` (``batch=``, ``grid=``, ...); ``dtype``: the
        cache dtype (default: the module's)."""
        return self._model.init_cache(self.config, chipmunk, dtype=self.dtype if dtype is None else dtype, **keywords)

    # ---- checks ---------------------------------------------------------------------------------

    @classmethod
    def _check_config(cls, config) -> None:
        if not isinstance(config, cls._config):
            raise TypeError(f"config must be a {cls._config.__name__} (the config of {cls.__name__}), got "
                            f"{type(config).__name__}")

    @classmethod
    def _checked_params(cls, params: dict, config) -> dict:
        """``params`` after checking its paths and shapes against ``init_params(config)`` (traced, not built)."""
        expected = _shapes(jax.eval_shape(lambda: cls._model.init_params(config, jax.random.key(0))), "expected")
        got = _shapes(params, "params")
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        wrong = sorted(f"{k}: {got[k]} (expected {expected[k]})" for k in set(got) & set(expected)
                       if got[k] != expected[k])
        problems = [f"{what} ({len(names)}): {names[:_SHOWN]}{' ...' if len(names) > _SHOWN else ''}"
                    for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong))
                    if names]
        if problems:
            raise ValueError(f"params do not match the {type(config).__name__} of {cls.__name__}: "
                             + "; ".join(problems))
        return params


def _shapes(tree, what: str) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of a param tree: nested dicts with array leaves (lists of blocks are refused)."""
    if not isinstance(tree, dict):
        raise TypeError(f"params must be a dict of parameters, got {type(tree).__name__}")
    out = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, (list, tuple)):
            raise TypeError(f"{what}[{prefix!r}] is a {type(node).__name__}: block stacks hold their blocks on a "
                            "leading layer axis (models.block_stack.stack_blocks converts a list)")
        elif isinstance(node, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
            out[prefix] = tuple(node.shape)
        else:
            raise TypeError(f"{what}[{prefix!r}] must be an array, got {type(node).__name__}")

    walk(tree, "")
    return out


def _common_dtype(params) -> np.dtype:
    dtypes = {jnp.dtype(x.dtype) for x in jax.tree_util.tree_leaves(params)}
    if len(dtypes) != 1:
        raise ValueError(f"the params hold several dtypes {sorted(map(str, dtypes))}: pass dtype= (the compute dtype)")
    return dtypes.pop()


def _transformer_folder(path: str) -> str:
    """``path``, or its ``transformer/`` when ``path`` is a diffusers pipeline folder."""
    sub = os.path.join(path, "transformer")
    has_own = any(os.path.isfile(os.path.join(path, name)) for name in (port_common.CONFIG_FILE,
                                                                          port_common.PARAMS_FILE))
    return sub if os.path.isdir(path) and not has_own and os.path.isdir(sub) else path
