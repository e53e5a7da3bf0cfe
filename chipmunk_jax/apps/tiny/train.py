"""Train the tiny FLUX model on the procedural shapes dataset (rectified flow, as FLUX is trained).

    python -m chipmunk_jax.apps.tiny.train --out runs/tiny [--steps 20000] [--time-budget 400] [--batch 128]

The trainer is ``chipmunk_jax.apps.training`` (flow matching with logit-normal t, Adam, warmup-stable-decay
learning rate, EMA, ``--time-budget``, checkpoints, precision fallbacks; its docstring has the details); this
module gives it the model and the data (``tiny_task``): ``chipmunk_jax.models.flux.forward`` with
``tiny_config()`` predicts the velocity; the host draws each image's scene parameters (``dataset.scene_batch``,
a few us per image) and the jitted step renders them with ``dataset.render(..., jax.numpy)``.

Output folder: ``params.safetensors`` + ``config.json`` (the EMA weights, ``ports.flux.save_params``),
``train_log.json`` and ``raw/`` (the non-EMA weights). ``--eval-images N`` then samples N images from the EMA and
raw weights with the dense sampler and prints the label check (``label_check.NearestNeighbourCheck``), saving
``eval_grid.png``.

DiT-style "adaLN-zero" init on top of FLUX's torch-default init: modulation and output projections start
at zero, so every block starts as the identity and the model output starts at 0 (trains much faster).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.models import flux
from chipmunk_jax.ports.flux import save_params
from chipmunk_jax.apps import training
from chipmunk_jax.apps.images import image_grid, write_png
from chipmunk_jax.apps.tiny import IMAGE_GRID, load_shipped, tiny_config
from chipmunk_jax.apps.tiny import dataset as D
from chipmunk_jax.apps.tiny.label_check import NearestNeighbourCheck
from chipmunk_jax.apps.tiny.sampling import sample_images
from chipmunk_jax.apps.training import learning_rate  # noqa: F401  (re-exported: the schedule of this trainer)

__all__ = ["main", "tiny_task", "init_tiny_params", "model_inputs", "evaluate", "learning_rate"]


def init_tiny_params(config: flux.FluxConfig, key: jax.Array):
    params = flux.init_params(config, key, jnp.float32)
    zero = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    blocks = params["transformer_blocks"]  # block stacks: one tree per block type, a leading layer axis
    blocks["norm1"], blocks["norm1_context"] = zero(blocks["norm1"]), zero(blocks["norm1_context"])
    params["single_transformer_blocks"]["norm"] = zero(params["single_transformer_blocks"]["norm"])
    params["norm_out"] = zero(params["norm_out"])
    params["proj_out"] = zero(params["proj_out"])
    return params


def model_inputs(config: flux.FluxConfig):
    """Constant inputs shared by every step: ids and precomputed RoPE tables (raster order)."""
    img_ids = flux.image_ids(IMAGE_GRID)
    txt_ids = np.zeros((D.NUM_TEXT_TOKENS, 3), np.float32)
    return dict(img_ids=jnp.asarray(img_ids), txt_ids=jnp.asarray(txt_ids),
                rotary_emb=flux.pos_embed(config, txt_ids, img_ids))


def evaluate(params, config, *, images: int, steps: int, seed: int = 0):
    """Dense samples of ``images`` labels (shapes cycled, colours random) and their label check."""

    rng = np.random.default_rng(seed)
    labels = np.stack([np.arange(images) % len(D.SHAPES), rng.integers(len(D.COLOURS), size=images)], 1)
    labels = labels.astype(np.int32)
    text, pooled = D.text_embeddings(labels)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (images, IMAGE_GRID[0] * IMAGE_GRID[1], 12)))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    packed, _ = sample_images(params, config, text, pooled, noise, num_steps=steps)
    samples = D.unpack(packed)
    return samples, labels, NearestNeighbourCheck().accuracy(samples, labels)


def tiny_task() -> training.TrainTask:
    """The tiny FLUX model and the shapes dataset as ``training.main`` takes them."""
    config = tiny_config()
    constants = model_inputs(config)
    table = D.text_embedding_table()

    def host_batch(seed, start, batch):
        scene = D.scene_batch(seed, start, batch)
        text, pooled = D.text_embeddings(np.stack([scene["shape"], scene["colour"]], 1), table)
        return scene, text, pooled

    def device_batch(batch):
        scene, text, pooled = batch
        return D.pack(D.render(scene, jnp), jnp), dict(encoder_hidden_states=text, pooled_projections=pooled)

    def velocity(params, x_t, t, inputs, *, dtype, attention_impl):
        return flux.forward(params, config, hidden_states=x_t, timestep=t, dtype=dtype, attention_impl=attention_impl,
                            **inputs, **constants).sample

    def write_eval(out: Path, rows, labels):
        path = out / "eval_grid.png"
        write_png(path, image_grid([D.make_batch(99, 0, len(labels), labels)[0]] + rows, scale=1))
        return path

    return training.TrainTask(
        name="tiny FLUX", item="image", config=config, init_params=lambda key: init_tiny_params(config, key),
        load_params=load_shipped, save_params=save_params, host_batch=host_batch, device_batch=device_batch,
        velocity=velocity, evaluate=lambda params, count, steps: evaluate(params, config, images=count, steps=steps),
        write_eval=write_eval)


def _parse(argv):
    return training.parse_args(argv, __doc__.split("\n\n")[0])


def main(argv=None):
    return training.main(tiny_task, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
