"""Train the tiny FLUX model on the procedural shapes dataset (rectified flow, as FLUX is trained).

    python -m chipmunk_jax.tiny.train --out runs/tiny [--steps 3000] [--batch 8] [--lr 6e-4] [--seed 0]

Flow matching: x_t = (1 - t) x0 + t noise with t ~ logit-normal(0, 1) (SD3/FLUX), the model predicts the
velocity noise - x0 (the direction ``chipmunk_jax.sampling`` integrates from sigma = 1 to 0), MSE loss.
AdamW with linear warmup then cosine decay, gradient clipping at 1, and an EMA of the weights; the EMA
weights are what gets saved (``ports.flux.save_params`` folder + ``train_log.json``) every
``--checkpoint-every`` steps, so a run cut short still leaves a usable model. Float32 on CPU.

DiT-style "adaLN-zero" init on top of FLUX's torch-default init: modulation and output projections start
at zero, so every block starts as the identity and the model output starts at 0 (trains much faster).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from chipmunk_jax.models import flux
from chipmunk_jax.ports.flux import save_params
from chipmunk_jax.tiny import IMAGE_GRID, tiny_config
from chipmunk_jax.tiny import dataset as D

__all__ = ["main", "init_tiny_params", "make_train_step", "model_inputs"]


def init_tiny_params(config: flux.FluxConfig, key: jax.Array):
    params = flux.init_params(config, key, jnp.float32)
    zero = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    for block in params["transformer_blocks"]:
        block["norm1"] = zero(block["norm1"])
        block["norm1_context"] = zero(block["norm1_context"])
    for block in params["single_transformer_blocks"]:
        block["norm"] = zero(block["norm"])
    params["norm_out"] = zero(params["norm_out"])
    params["proj_out"] = zero(params["proj_out"])
    return params


def model_inputs(config: flux.FluxConfig, batch: int):
    """Constant inputs shared by every step: ids and precomputed RoPE tables (raster order)."""
    img_ids = flux.image_ids(IMAGE_GRID)
    txt_ids = np.zeros((D.NUM_TEXT_TOKENS, 3), np.float32)
    return dict(img_ids=jnp.asarray(img_ids), txt_ids=jnp.asarray(txt_ids),
                rotary_emb=flux.rotary_emb(config, txt_ids, img_ids))


def make_train_step(config, optimizer, constants, ema_decay_max: float):
    def loss_fn(params, x0, text, pooled, key):
        t_key, n_key = jax.random.split(key)
        t = jax.nn.sigmoid(jax.random.normal(t_key, (x0.shape[0],)))
        noise = jax.random.normal(n_key, x0.shape)
        x_t = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * noise
        v = flux.forward(params, config, hidden_states=x_t, encoder_hidden_states=text, pooled_projections=pooled,
                         timestep=t, dtype=jnp.float32, **constants)
        return jnp.mean((v - (noise - x0)) ** 2)

    @jax.jit
    def train_step(params, ema, opt_state, step, x0, text, pooled, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, x0, text, pooled, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        decay = jnp.minimum(ema_decay_max, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
        return params, ema, opt_state, loss

    return train_step


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (params.safetensors, config.json, train_log.json)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.998, help="maximum EMA decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--init", default=None, help="start from the weights in this params folder (a further run)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much wall time")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "warmup", "checkpoint_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    if not args.lr > 0:
        p.error("--lr must be > 0")
    if not 0 <= args.ema < 1:
        p.error("--ema must be in [0, 1)")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    return args


def _save(out: Path, config, ema, log: dict):
    save_params(out, config, jax.device_get(ema))
    tmp = out / "train_log.json.tmp"
    tmp.write_text(json.dumps(log, indent=1))
    os.replace(tmp, out / "train_log.json")


def main(argv=None):
    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    key = jax.random.PRNGKey(args.seed)
    init_key, key = jax.random.split(key)
    params = init_tiny_params(config, init_key)
    if args.init is not None:
        from chipmunk_jax.tiny import load_shipped

        init_config, loaded = load_shipped(args.init)
        if init_config != config:
            raise ValueError(f"--init {args.init!r} holds a different model config: {init_config}")
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), loaded)
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps, end_value=0.1 * args.lr)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.99, weight_decay=0.01))
    opt_state = optimizer.init(params)
    ema = jax.tree.map(jnp.copy, params)
    train_step = make_train_step(config, optimizer, model_inputs(config, args.batch), args.ema)
    table = D.text_embedding_table()

    log = {"args": vars(args), "parameters": count, "dataset_seed": args.seed, "history": []}
    print(f"tiny FLUX: {count:,} parameters; {args.steps} steps of batch {args.batch}", flush=True)
    start, window = time.perf_counter(), []
    for step in range(args.steps):
        images, labels = D.make_batch(args.seed, step * args.batch, args.batch)
        text, pooled = D.text_embeddings(labels, table)
        params, ema, opt_state, loss = train_step(params, ema, opt_state, jnp.float32(step),
                                                  jnp.asarray(D.pack(images)), jnp.asarray(text),
                                                  jnp.asarray(pooled), jax.random.fold_in(key, step))
        window.append(float(loss))
        done = step + 1
        elapsed = time.perf_counter() - start
        if done % args.log_every == 0 or done == args.steps:
            entry = {"step": done, "loss": float(np.mean(window)), "seconds": round(elapsed, 1)}
            log["history"].append(entry)
            print(f"step {done:5d}  loss {entry['loss']:.4f}  {elapsed / 60:.1f} min", flush=True)
            window = []
        out_of_time = args.max_minutes is not None and elapsed > 60 * args.max_minutes
        if done % args.checkpoint_every == 0 or done == args.steps or out_of_time:
            log["steps_done"] = done
            _save(out, config, ema, log)
        if out_of_time:
            print(f"stopping after {done} steps: --max-minutes {args.max_minutes} reached", flush=True)
            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
