"""Flax NNX modules for the three transformers, over the same param trees as the functional models.

    from flax import nnx
    from chipmunk_jax.nnx import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained("/path/to/FLUX.1-dev/transformer", dtype=jnp.bfloat16)
    out = model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                img_ids=img_ids, txt_ids=txt_ids, guidance=g)            # ModelOutput(sample, hidden, cache)

``FluxTransformer2DModel``, ``HunyuanVideoTransformer3DModel`` and ``WanTransformer3DModel`` (diffusers' class names)
are built from their model config (``Model(config, rngs=nnx.Rngs(0))``), around an existing param tree
(``Model.from_params(params, config)``) or from a checkpoint (``Model.from_pretrained(path)``: a diffusers model or
pipeline folder, one .safetensors file, or a folder converted by ``chipmunk-jax convert``). Each top-level entry of
the param tree (``x_embedder``, ``transformer_blocks``, ...) is an attribute holding that subtree with ``nnx.Param``
leaves, so ``nnx.state(model, nnx.Param)`` has exactly the paths and the very arrays of the functional tree
(docs/models.md §5.6; no copy) and ``model.params_tree()`` gives the plain dict back. A call runs the functional
``forward`` (docs/architecture.md §4), so the module and the function agree bit for bit; ``model.denoiser(...)`` is
the model's ``sampling.Denoiser``, and its functions take the params as a plain tree, an ``nnx.State`` or the module
itself, so ``nnx.split`` -> the jitted one-loop sampler -> ``nnx.merge`` works.

Every ``nnx.Param`` carries flax's sharding annotation (``out_sharding``, as ``nnx.with_partitioning`` sets it) in
the axis names of ``parallel.make_mesh``'s meshes: replicated (``param_partition``; docs/architecture.md §6 keeps the
params whole on every device), so ``nnx.get_partition_spec(nnx.state(model))`` is ``P(None, ...)`` (= ``P()``) per
param and ``model.shard(mesh)`` places the state for the sampler built on that mesh. ``Model.from_orbax(path,
config)`` restores an orbax checkpoint of ``nnx.state(model)`` (``is_orbax_checkpoint`` tells one apart).

``ChipmunkAttention`` and ``ChipmunkMLP`` (``chipmunk_jax.nnx.layers``) are Chipmunk for your own NNX DiT: they take
the place of a block's attention core and MLP, keep their caches in ``ChipmunkCache`` variables of the module state,
and ``make_denoiser(model, chipmunk)`` runs the model in the one-jit sampler, each step under ``chipmunk_step``
(README "Chipmunk for your own Flax DiT"; ``init_caches`` builds the caches).

Where this package sits (docs/architecture.md §1): in the application layer, beside ``chipmunk_jax.pipelines``, not
in ``chipmunk_jax.models``, because ``from_pretrained`` loads checkpoints through ``chipmunk_jax.ports``, which sits
above the models. ``tests/test_layers.py`` maps ``chipmunk_jax.nnx.*`` to the apps layer.
"""

from __future__ import annotations

from chipmunk_jax.nnx.layers import (ChipmunkAttention, ChipmunkCache, ChipmunkMLP, chipmunk_step, init_caches,
                                     make_denoiser)
from chipmunk_jax.nnx.modules import FluxTransformer2DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel
from chipmunk_jax.nnx.transformer import TransformerModule, is_orbax_checkpoint, param_partition, param_tree

__all__ = [
    "FluxTransformer2DModel",
    "HunyuanVideoTransformer3DModel",
    "WanTransformer3DModel",
    "TransformerModule",
    "param_tree",
    "param_partition",
    "is_orbax_checkpoint",
    "ChipmunkAttention",
    "ChipmunkMLP",
    "ChipmunkCache",
    "chipmunk_step",
    "init_caches",
    "make_denoiser",
]
