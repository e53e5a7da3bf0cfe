"""Train the tiny FLUX model on the procedural shapes dataset (rectified flow, as FLUX is trained).

    python -m chipmunk_jax.apps.tiny.train --out runs/tiny [--steps 20000] [--time-budget 400] [--batch 128]

Flow matching: x_t = (1 - t) x0 + t noise with t ~ logit-normal(0, 1) (SD3/FLUX), the model
(``chipmunk_jax.models.flux.forward``, ``tiny_config()``) predicts the velocity noise - x0 (the direction
``chipmunk_jax.sampling`` integrates from sigma = 1 to 0), MSE loss.

Optimiser: Adam (b2 0.99) with decoupled weight decay, gradient clipping at 1, and a warmup-stable-decay
learning rate: linear warmup, constant, then linear decay to 0 over the last ``--decay`` fraction of the
steps; an EMA of the weights. ``--time-budget S`` fits the run into S seconds of wall time: once the step
rate is measured, the planned number of steps (and so the decay phase) is set from it (re-estimated until
the decay starts) and logged, so ``--steps <planned>`` without a budget repeats the schedule.

Data: images ``step * batch ...`` of stream ``--seed``. The host draws each image's scene parameters
(``dataset.scene_batch``, a few us per image, one step ahead in a thread); the jitted step renders them
with ``dataset.render(..., jax.numpy)``, so the accelerator is not starved by numpy rendering.

Precision: ``--dtype auto`` computes in bfloat16 on a GPU (float32 master weights, float32 loss) and in
float32 elsewhere. If the first step fails to compile or run (e.g. cuDNN attention), it falls back to
XLA attention, then to float32.

Output folder: ``params.safetensors`` + ``config.json`` (the EMA weights, ``ports.flux.save_params``),
``train_log.json`` (arguments, loss history, hardware, schedule), and ``raw/`` (the non-EMA weights),
written every ``--checkpoint-seconds`` and at the end, so a run cut short still leaves a usable model.
``--eval-images N`` then samples N images from the EMA and raw weights with the dense sampler and prints
the label check (``quality.NearestNeighbourCheck``), saving ``eval_grid.png``.

DiT-style "adaLN-zero" init on top of FLUX's torch-default init: modulation and output projections start
at zero, so every block starts as the identity and the model output starts at 0 (trains much faster).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from chipmunk_jax.models import flux
from chipmunk_jax.ports.flux import save_params
from chipmunk_jax.apps.images import image_grid, write_png
from chipmunk_jax.apps.tiny import IMAGE_GRID, load_shipped, tiny_config
from chipmunk_jax.apps.tiny import dataset as D
from chipmunk_jax.apps.tiny.label_check import NearestNeighbourCheck
from chipmunk_jax.apps.tiny.sampling import sample_images

__all__ = ["main", "init_tiny_params", "make_train_step", "model_inputs", "learning_rate"]


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


def learning_rate(step: int, total: int, *, peak: float, warmup: int, decay: float) -> float:
    """Warmup-stable-decay: linear warmup over ``warmup`` steps, constant, then linear to 0 over the
    last ``decay`` fraction of ``total`` steps."""
    lr = peak * min(1.0, (step + 1) / warmup)
    decay_steps = max(1, int(round(decay * total)))
    if step >= total - decay_steps:
        lr = min(lr, peak * max(0.0, (total - step) / decay_steps))
    return lr


def make_optimizer(weight_decay: float):
    """Clipped Adam direction + decoupled weight decay; the step multiplies by -lr (passed per step)."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b1=0.9, b2=0.99),
                       optax.add_decayed_weights(weight_decay))


def make_train_step(config, optimizer, constants, *, dtype, attention_impl=None):
    """jitted (params, ema, opt_state, scene, text, pooled, key, lr, ema_decay) -> (params, ema, opt_state,
    loss); ``scene`` is a ``dataset.scene_batch`` rendered inside the step."""

    def loss_fn(params, x0, text, pooled, key):
        t_key, n_key = jax.random.split(key)
        t = jax.nn.sigmoid(jax.random.normal(t_key, (x0.shape[0],)))
        noise = jax.random.normal(n_key, x0.shape)
        x_t = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * noise
        v = flux.forward(params, config, hidden_states=x_t, encoder_hidden_states=text, pooled_projections=pooled,
                         timestep=t, dtype=dtype, attention_impl=attention_impl, **constants).sample
        return jnp.mean((v.astype(jnp.float32) - (noise - x0)) ** 2)

    @jax.jit
    def train_step(params, ema, opt_state, scene, text, pooled, key, lr, ema_decay):
        x0 = D.pack(D.render(scene, jnp), jnp)
        loss, grads = jax.value_and_grad(loss_fn)(params, x0, text, pooled, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        return params, ema, opt_state, loss

    return train_step


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (params.safetensors, config.json, train_log.json)")
    p.add_argument("--steps", type=int, default=20000, help="planned steps (the schedule's length)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of wall time for the whole run (start-up and compile included); the planned "
                        "steps are cut to fit, from the measured step rate")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--decay", type=float, default=0.2, help="fraction of the steps in the final linear decay")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999, help="maximum EMA decay")
    p.add_argument("--seed", type=int, default=0, help="data stream, noise and init seed")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (auto: bfloat16 on GPUs, else float32); weights stay float32")
    p.add_argument("--attention-impl", choices=("auto", "xla", "cudnn"), default="auto")
    p.add_argument("--checkpoint-seconds", type=float, default=60.0)
    p.add_argument("--log-every", type=int, default=200, help="log every this many steps (and every 20 s)")
    p.add_argument("--init", default=None, help="start from the weights in this params folder (a further run)")
    p.add_argument("--eval-images", type=int, default=0, help="after training: sample this many images and "
                   "print the label check of the EMA and raw weights")
    p.add_argument("--eval-steps", type=int, default=50)
    args = p.parse_args(argv)
    for name in ("steps", "batch", "warmup", "log_every", "eval_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    if not args.lr > 0:
        p.error("--lr must be > 0")
    if not 0 < args.decay < 1:
        p.error("--decay must be in (0, 1)")
    if not 0 <= args.ema < 1:
        p.error("--ema must be in [0, 1)")
    if args.seed < 0 or args.eval_images < 0 or args.weight_decay < 0:
        p.error("--seed, --eval-images and --weight-decay must be >= 0")
    if args.time_budget is not None and not args.time_budget > 0:
        p.error("--time-budget must be > 0")
    if not args.checkpoint_seconds > 0:
        p.error("--checkpoint-seconds must be > 0")
    return args


def _save(out: Path, config, params, ema, log: dict):
    save_params(out, config, jax.device_get(ema))
    save_params(out / "raw", config, jax.device_get(params))
    tmp = out / "train_log.json.tmp"
    tmp.write_text(json.dumps(log, indent=1))
    os.replace(tmp, out / "train_log.json")


class _Prefetch:
    """Host-side batches (scene parameters + text embeddings) of consecutive steps, built in a thread."""

    def __init__(self, seed: int, batch: int, first_step: int, depth: int = 4):
        self.table = D.text_embedding_table()
        self.seed, self.batch, self.step = seed, batch, first_step
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _make(self, step):
        scene = D.scene_batch(self.seed, step * self.batch, self.batch)
        text, pooled = D.text_embeddings(np.stack([scene["shape"], scene["colour"]], 1), self.table)
        return scene, text, pooled

    def _run(self):
        step = self.step
        while not self.stop.is_set():
            item = self._make(step)
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            step += 1

    def next(self):
        return self.queue.get()

    def close(self):
        self.stop.set()


def _describe_device():
    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": d.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__}


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


def main(argv=None):
    start = time.perf_counter()
    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    key = jax.random.PRNGKey(args.seed)
    init_key, key = jax.random.split(key)
    params = init_tiny_params(config, init_key)
    if args.init is not None:

        init_config, loaded = load_shipped(args.init)
        if init_config != config:
            raise ValueError(f"--init {args.init!r} holds a different model config: {init_config}")
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), loaded)
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    optimizer = make_optimizer(args.weight_decay)
    opt_state = optimizer.init(params)
    ema = jax.tree.map(jnp.copy, params)
    constants = model_inputs(config)
    on_gpu = jax.default_backend() == "gpu"
    dtype = {"auto": "bfloat16" if on_gpu else "float32"}.get(args.dtype, args.dtype)
    impl = None if args.attention_impl == "auto" else args.attention_impl
    attempts = [(dtype, impl)] + [(d, i) for d, i in ((dtype, "xla"), ("float32", None)) if (d, i) != (dtype, impl)]

    log = {"args": vars(args), "parameters": count, "dataset_seed": args.seed, "device": _describe_device(),
           "history": [], "images_per_step": args.batch}
    print(f"tiny FLUX: {count:,} parameters; batch {args.batch}, up to {args.steps} steps"
          f"{'' if args.time_budget is None else f' within {args.time_budget:.0f} s'}; {log['device']}", flush=True)
    data = _Prefetch(args.seed, args.batch, 0)
    total = args.steps
    peak_scale = 1.0  # halved after a non-finite loss
    lr_of = lambda s: peak_scale * learning_rate(s, total, peak=args.lr, warmup=args.warmup,  # noqa: E731
                                                 decay=args.decay)
    ema_of = lambda s: min(args.ema, (1.0 + s) / (10.0 + s))  # noqa: E731

    # first step: compile, with fallbacks
    scene, text, pooled = data.next()
    batch_in = (jax.tree.map(jnp.asarray, scene), jnp.asarray(text), jnp.asarray(pooled))
    for dtype_name, impl in attempts:
        try:
            train_step = make_train_step(config, optimizer, constants, dtype=jnp.dtype(dtype_name),
                                         attention_impl=impl)
            t0 = time.perf_counter()
            result = train_step(params, ema, opt_state, *batch_in, jax.random.fold_in(key, 0),
                                jnp.float32(lr_of(0)), jnp.float32(ema_of(0)))
            loss0 = float(result[3])
            if not np.isfinite(loss0):
                raise FloatingPointError(f"first loss is {loss0}")
            break
        except Exception as e:  # noqa: BLE001 - any compile/run failure: try the next setting
            print(f"compute {dtype_name} / attention {impl or 'auto'} failed: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:300] if str(e) else ''}", flush=True)
    else:
        raise RuntimeError("every compute setting failed")
    params, ema, opt_state, _ = result
    log["compute"] = {"dtype": dtype_name, "attention_impl": impl or "auto"}
    print(f"compute {dtype_name}, attention {impl or 'auto'}: first step (compile) {time.perf_counter() - t0:.1f} s, "
          f"loss {loss0:.4f}", flush=True)

    done, losses = 1, []
    window_start, window_steps = time.perf_counter(), 0
    last_save = time.perf_counter()
    snapshot = jax.device_get((params, ema, opt_state))
    decaying = False
    stop_reason = "steps"
    while done < total:
        scene, text, pooled = data.next()
        step = done
        params, ema, opt_state, loss = train_step(params, ema, opt_state, scene, text, pooled,
                                                  jax.random.fold_in(key, step), jnp.float32(lr_of(step)),
                                                  jnp.float32(ema_of(step)))
        losses.append(loss)
        done += 1
        window_steps += 1
        # log (and sync, so the host clock is real) every --log-every steps, at the end, and at least every
        # 20 s; in the budget's last 15 s, sync every step (the host may run ahead of the device)
        host_now = time.perf_counter()
        if args.time_budget is not None and host_now - start > args.time_budget - 15.0:
            jax.block_until_ready(loss)
        out_of_time = args.time_budget is not None and time.perf_counter() - start > args.time_budget - 5.0
        if done % args.log_every and done < total and host_now - window_start < 20.0 and not out_of_time:
            continue
        mean_loss = float(jnp.mean(jnp.stack(losses)))  # syncs: the clock below is real
        losses = []
        now = time.perf_counter()
        elapsed = now - start
        rate = window_steps / (now - window_start)
        window_start, window_steps = now, 0
        if not np.isfinite(mean_loss):
            peak_scale *= 0.5
            params, ema, opt_state = jax.tree.map(jnp.asarray, snapshot)
            print(f"step {done}: loss {mean_loss}; back to the last checkpoint, peak lr x{peak_scale}", flush=True)
            log.setdefault("restarts", []).append({"step": done, "peak_scale": peak_scale})
            continue
        entry = {"step": done, "loss": mean_loss, "lr": lr_of(done - 1), "seconds": round(elapsed, 1),
                 "steps_per_s": round(rate, 2)}
        log["history"].append(entry)
        if args.time_budget is not None and not decaying:
            # re-plan: steps that fit into the budget, leaving the final save (and a margin) out
            fit = done + int(rate * (args.time_budget - elapsed - 10.0))
            total = max(min(args.steps, fit), args.warmup + 1, done + 1)
            log["planned_steps"] = total
        decaying = decaying or done >= total - max(1, int(round(args.decay * total)))
        print(f"step {done:6d}/{total}  loss {mean_loss:.4f}  lr {entry['lr']:.2e}  {rate:5.1f} steps/s  "
              f"{elapsed:6.0f} s", flush=True)
        if now - last_save > args.checkpoint_seconds or done >= total or out_of_time:
            log["steps_done"], log["images_seen"] = done, done * args.batch
            log["wall_seconds"] = round(time.perf_counter() - start, 1)
            _save(out, config, params, ema, log)
            snapshot = jax.device_get((params, ema, opt_state))
            last_save = time.perf_counter()
        if out_of_time:
            stop_reason = "time budget"
            break
    data.close()
    log["steps_done"], log["images_seen"], log["stop"] = done, done * args.batch, stop_reason
    log["final_loss"] = log["history"][-1]["loss"] if log["history"] else loss0
    log["wall_seconds"] = round(time.perf_counter() - start, 1)
    _save(out, config, params, ema, log)
    print(f"trained {done} steps ({done * args.batch:,} images) in {log['wall_seconds']:.0f} s, stop: {stop_reason}; "
          f"final loss {log['final_loss']:.4f}; saved {out}", flush=True)

    if args.eval_images:

        t0 = time.perf_counter()
        rows, log["eval"] = [], {"images": args.eval_images, "steps": args.eval_steps}
        for name, weights in (("ema", ema), ("raw", params)):
            samples, labels, acc = evaluate(weights, config, images=args.eval_images, steps=args.eval_steps)
            rows.append(samples)
            log["eval"][name] = acc
            print(f"label check, {name} weights, {args.eval_images} dense samples x {args.eval_steps} steps: "
                  f"shape {100 * acc['shape']:.0f}%, colour {100 * acc['colour']:.0f}%, both {100 * acc['both']:.0f}%",
                  flush=True)
        rows.insert(0, D.make_batch(99, 0, args.eval_images, labels)[0])
        write_png(out / "eval_grid.png", image_grid(rows, scale=1))
        tmp = out / "train_log.json.tmp"
        tmp.write_text(json.dumps(log, indent=1))
        os.replace(tmp, out / "train_log.json")
        print(f"eval {time.perf_counter() - t0:.0f} s; {out / 'eval_grid.png'} (rows: real, EMA, raw)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
