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

Where this package sits (docs/architecture.md §1): in the application layer, beside ``chipmunk_jax.pipelines``, not
in ``chipmunk_jax.models``, because ``from_pretrained`` loads checkpoints through ``chipmunk_jax.ports``, which sits
above the models. ``tests/test_layers.py`` maps ``chipmunk_jax.nnx.*`` to the apps layer.
"""

from __future__ import annotations

from chipmunk_jax.nnx.modules import FluxTransformer2DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel
from chipmunk_jax.nnx.transformer import TransformerModule, param_tree

__all__ = [
    "FluxTransformer2DModel",
    "HunyuanVideoTransformer3DModel",
    "WanTransformer3DModel",
    "TransformerModule",
    "param_tree",
]
