"""Train the tiny Wan video model on the procedural moving-shapes videos (rectified flow, as Wan is trained).

    python -m chipmunk_jax.apps.tiny_video.train --out runs/tiny_video [--steps 20000] [--time-budget 300] [--batch 128]

The trainer is ``chipmunk_jax.apps.training`` (the tiny FLUX model's: flow matching with logit-normal t, Adam,
warmup-stable-decay learning rate, EMA, ``--time-budget``, checkpoints, bfloat16 on GPUs with fallbacks; its
docstring has the details); this module gives it the model and the data (``tiny_video_task``):
``chipmunk_jax.models.wan.forward`` with ``tiny_video_config()`` predicts the velocity from the timestep
t x 1000 (Wan's convention, as ``wan.denoiser`` passes it); the host draws each video's scene parameters
(``dataset.scene_batch``) and the jitted step renders them with ``dataset.render(..., jax.numpy)``.

Output folder: ``params.safetensors`` + ``config.json`` (the EMA weights, ``ports.wan.save_params``),
``train_log.json`` and ``raw/`` (the non-EMA weights). ``--eval-images N`` then samples N videos from the EMA and
raw weights with the dense sampler and prints the label check (``label_check.VideoLabelCheck``), saving
``eval_grid.gif`` (rows: real videos of the same labels, EMA samples, raw samples).

DiT-style "adaLN-zero" init on top of Wan's torch-default init: the timestep projection (all blocks' modulation),
the blocks' modulation tables, the cross-attention output projections and the final projection start at zero,
so every block starts as the identity and the model output starts at 0.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.models import wan
from chipmunk_jax.ports.wan import save_params
from chipmunk_jax.pipelines.video import write_video
from chipmunk_jax.apps import training
from chipmunk_jax.apps.images import video_grid
from chipmunk_jax.apps.tiny_video import TOKEN_GRID, load_shipped, tiny_video_config
from chipmunk_jax.apps.tiny_video import dataset as D
from chipmunk_jax.apps.tiny_video.label_check import VideoLabelCheck
from chipmunk_jax.apps.tiny_video.sampling import sample_videos

__all__ = ["main", "tiny_video_task", "init_tiny_video_params", "evaluate", "write_eval_gif"]


def init_tiny_video_params(config: wan.WanConfig, key: jax.Array):
    params = wan.init_params(config, key, jnp.float32)
    zero = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    blocks = params["blocks"]  # one stack with a leading layer axis
    params["condition_embedder"]["time_proj"] = zero(params["condition_embedder"]["time_proj"])
    blocks["scale_shift_table"] = zero(blocks["scale_shift_table"])
    blocks["attn2"]["to_out"]["0"] = zero(blocks["attn2"]["to_out"]["0"])
    params["proj_out"] = zero(params["proj_out"])
    return params


def evaluate(params, config, *, videos: int, steps: int, seed: int = 0):
    """Dense samples of ``videos`` labels (shapes cycled, colours and directions random) and their label check:
    (videos [N, F, H, W, 3], labels [N, 3], accuracy)."""
    rng = np.random.default_rng(seed)
    labels = np.stack([np.arange(videos) % len(D.SHAPES), rng.integers(len(D.COLOURS), size=videos),
                       rng.integers(len(D.DIRECTIONS), size=videos)], 1).astype(np.int32)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (videos, 3, D.FRAMES, D.FRAME_SIZE, D.FRAME_SIZE)))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    latents, _ = sample_videos(params, config, D.text_embeddings(labels), noise, num_steps=steps)
    samples = D.from_latents(latents)
    return samples, labels, VideoLabelCheck().accuracy(samples, labels)


def write_eval_gif(path, rows, labels, *, fps: float = 8) -> Path:
    """An animated GIF of real videos of ``labels`` above the sample ``rows`` ([N, F, H, W, 3] each)."""
    real = D.make_batch(99, 0, len(labels), labels)[0]
    return Path(write_video(path, video_grid([real] + list(rows), scale=2), fps=fps))


def tiny_video_task(config: wan.WanConfig | None = None) -> training.TrainTask:
    """The tiny Wan model (``config``, default ``tiny_video_config()``: 3 pixel channels, 64-dim text) and the
    moving-shapes dataset as ``training.main`` takes them."""
    config = tiny_video_config() if config is None else config
    rotary_emb = wan.pos_embed(config, TOKEN_GRID)
    table = D.text_embedding_table()

    def host_batch(seed, start, batch):
        scene = D.scene_batch(seed, start, batch)
        return scene, D.text_embeddings(np.stack([scene[kind] for kind in D.VOCABULARY.kinds], 1), table)

    def device_batch(batch):
        scene, text = batch
        return D.to_latents(D.render(scene, jnp), jnp), dict(encoder_hidden_states=text)

    def velocity(params, x_t, t, inputs, *, dtype, attention_impl):
        return wan.forward(params, config, hidden_states=x_t, timestep=t * 1000.0, rotary_emb=rotary_emb, dtype=dtype,
                           attention_impl=attention_impl, **inputs).sample

    return training.TrainTask(
        name="tiny Wan video", item="video", config=config,
        init_params=lambda key: init_tiny_video_params(config, key), load_params=load_shipped,
        save_params=save_params, host_batch=host_batch, device_batch=device_batch, velocity=velocity,
        evaluate=lambda params, count, steps: evaluate(params, config, videos=count, steps=steps),
        write_eval=lambda out, rows, labels: write_eval_gif(out / "eval_grid.gif", rows, labels))


def main(argv=None):
    return training.main(tiny_video_task, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
