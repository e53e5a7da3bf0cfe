"""The tiny models' trainer, model-agnostic: rectified flow with EMA, a warmup-stable-decay schedule and a time budget.

``apps.tiny.train`` (FLUX, images) and ``apps.tiny_video.train`` (Wan, videos) each describe their model and
data as a ``TrainTask`` and call ``main(make_task, argv)``; the command line is the same for both.

Flow matching: x_t = (1 - t) x0 + t noise with t ~ logit-normal(0, 1) (SD3/FLUX), the model predicts the velocity
noise - x0 (the direction ``chipmunk_jax.sampling`` integrates from sigma = 1 to 0), MSE loss.

Optimiser: Adam (b2 0.99) with decoupled weight decay, gradient clipping at 1, and a warmup-stable-decay
learning rate: linear warmup, constant, then linear decay to 0 over the last ``--decay`` fraction of the
steps; an EMA of the weights. ``--time-budget S`` fits the run into S seconds of wall time: once the step
rate is measured, the planned number of steps (and so the decay phase) is set from it (re-estimated until
the decay starts) and logged, so ``--steps <planned>`` without a budget repeats the schedule.

Data: items ``step * batch ...`` of stream ``--seed``. The host draws each item's scene parameters (the task's
``host_batch``, one step ahead in a thread); the jitted step renders them on the device (the task's
``device_batch``), so the accelerator is not starved by numpy rendering.

Precision: ``--dtype auto`` computes in bfloat16 on a GPU (float32 master weights, float32 loss) and in
float32 elsewhere. If the first step fails to compile or run (e.g. cuDNN attention), it falls back to
XLA attention, then to float32.

Output folder: ``params.safetensors`` + ``config.json`` (the EMA weights, the task's ``save_params``),
``train_log.json`` (arguments, loss history, hardware, schedule), and ``raw/`` (the non-EMA weights),
written every ``--checkpoint-seconds`` and at the end, so a run cut short still leaves a usable model.
``--eval-images N`` then samples N items from the EMA and raw weights with the dense sampler and prints
the task's label check, saving its eval grid (rows: real, EMA, raw).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["TrainTask", "main", "parse_args", "make_train_step", "make_optimizer", "learning_rate"]


@dataclasses.dataclass(frozen=True)
class TrainTask:
    """One model and its dataset, as the trainer sees them.

    Attributes:
      name: printed in the log lines ("tiny FLUX").
      item: what one batch row is ("image", "video"): the log's ``<item>s_per_step`` / ``<item>s_seen`` keys.
      config: the model config (``--init`` folders must hold the same).
      init_params: key -> float32 params to start from.
      load_params: folder -> (config, params) (``--init``).
      save_params: (folder, config, params) -> None.
      host_batch: (seed, start, batch) -> a pytree of numpy arrays for items start .. start + batch - 1, drawn on
        the host in the prefetch thread.
      device_batch: that pytree -> (x0, inputs), traced inside the jitted step: the clean model input and the
        model's conditioning keywords.
      velocity: (params, x_t, t, inputs, *, dtype, attention_impl) -> the predicted velocity, like x_t; ``t`` [B]
        is the flow time in [0, 1].
      evaluate: (params, count, steps) -> (samples, labels [count, kinds], accuracy {name: fraction}): dense
        samples of ``count`` labels and their label check.
      write_eval: (folder, [EMA samples, raw samples], labels) -> the path of the eval grid it wrote (real items
        of the labels first).
    """

    name: str
    item: str
    config: Any
    init_params: Callable[[jax.Array], Any]
    load_params: Callable[[str], tuple]
    save_params: Callable[[Path, Any, Any], None]
    host_batch: Callable[[int, int, int], Any]
    device_batch: Callable[[Any], tuple]
    velocity: Callable[..., jax.Array]
    evaluate: Callable[[Any, int, int], tuple]
    write_eval: Callable[[Path, list, np.ndarray], Path]


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


def make_train_step(task: TrainTask, optimizer, *, dtype, attention_impl=None):
    """jitted (params, ema, opt_state, batch, key, lr, ema_decay) -> (params, ema, opt_state, loss); ``batch`` is a
    ``task.host_batch``, rendered inside the step."""

    def loss_fn(params, x0, inputs, key):
        t_key, n_key = jax.random.split(key)
        t = jax.nn.sigmoid(jax.random.normal(t_key, (x0.shape[0],)))
        noise = jax.random.normal(n_key, x0.shape)
        t_items = t.reshape((-1,) + (1,) * (x0.ndim - 1))
        x_t = (1.0 - t_items) * x0 + t_items * noise
        v = task.velocity(params, x_t, t, inputs, dtype=dtype, attention_impl=attention_impl)
        return jnp.mean((v.astype(jnp.float32) - (noise - x0)) ** 2)

    @jax.jit
    def train_step(params, ema, opt_state, batch, key, lr, ema_decay):
        x0, inputs = task.device_batch(batch)
        loss, grads = jax.value_and_grad(loss_fn)(params, x0, inputs, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        return params, ema, opt_state, loss

    return train_step


def parse_args(argv, description: str):
    """The trainer's command line (``description`` heads its help)."""
    p = argparse.ArgumentParser(description=description)
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
    p.add_argument("--eval-images", type=int, default=0, help="after training: sample this many images (videos) "
                   "and print the label check of the EMA and raw weights")
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


def _write_log(out: Path, log: dict):
    tmp = out / "train_log.json.tmp"
    tmp.write_text(json.dumps(log, indent=1))
    os.replace(tmp, out / "train_log.json")


def _save(task: TrainTask, out: Path, params, ema, log: dict):
    task.save_params(out, task.config, jax.device_get(ema))
    task.save_params(out / "raw", task.config, jax.device_get(params))
    _write_log(out, log)


class _Prefetch:
    """Host-side batches (``task.host_batch``) of consecutive steps, built in a thread."""

    def __init__(self, host_batch, seed: int, batch: int, first_step: int, depth: int = 4):
        self.host_batch = host_batch
        self.seed, self.batch, self.step = seed, batch, first_step
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        step = self.step
        while not self.stop.is_set():
            item = self.host_batch(self.seed, step * self.batch, self.batch)
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


def main(make_task: Callable[[], TrainTask], argv=None, *, description: str):
    """Trains ``make_task()`` as the command line ``argv`` says (``parse_args``, checked before the task is built;
    ``description`` heads its help)."""
    start = time.perf_counter()
    args = parse_args(argv, description)
    task = make_task()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = task.config
    key = jax.random.PRNGKey(args.seed)
    init_key, key = jax.random.split(key)
    params = task.init_params(init_key)
    if args.init is not None:
        init_config, loaded = task.load_params(args.init)
        if init_config != config:
            raise ValueError(f"--init {args.init!r} holds a different model config: {init_config}")
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), loaded)
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    optimizer = make_optimizer(args.weight_decay)
    opt_state = optimizer.init(params)
    ema = jax.tree.map(jnp.copy, params)
    on_gpu = jax.default_backend() == "gpu"
    dtype = {"auto": "bfloat16" if on_gpu else "float32"}.get(args.dtype, args.dtype)
    impl = None if args.attention_impl == "auto" else args.attention_impl
    attempts = [(dtype, impl)] + [(d, i) for d, i in ((dtype, "xla"), ("float32", None)) if (d, i) != (dtype, impl)]

    items = f"{task.item}s"
    log = {"args": vars(args), "parameters": count, "dataset_seed": args.seed, "device": _describe_device(),
           "history": [], f"{items}_per_step": args.batch}
    print(f"{task.name}: {count:,} parameters; batch {args.batch}, up to {args.steps} steps"
          f"{'' if args.time_budget is None else f' within {args.time_budget:.0f} s'}; {log['device']}", flush=True)
    data = _Prefetch(task.host_batch, args.seed, args.batch, 0)
    total = args.steps
    peak_scale = 1.0  # halved after a non-finite loss
    lr_of = lambda s: peak_scale * learning_rate(s, total, peak=args.lr, warmup=args.warmup,  # noqa: E731
                                                 decay=args.decay)
    ema_of = lambda s: min(args.ema, (1.0 + s) / (10.0 + s))  # noqa: E731

    # first step: compile, with fallbacks
    batch_in = jax.tree.map(jnp.asarray, data.next())
    for dtype_name, impl in attempts:
        try:
            train_step = make_train_step(task, optimizer, dtype=jnp.dtype(dtype_name), attention_impl=impl)
            t0 = time.perf_counter()
            result = train_step(params, ema, opt_state, batch_in, jax.random.fold_in(key, 0),
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
        batch_in = data.next()
        step = done
        params, ema, opt_state, loss = train_step(params, ema, opt_state, batch_in, jax.random.fold_in(key, step),
                                                  jnp.float32(lr_of(step)), jnp.float32(ema_of(step)))
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
            log["steps_done"], log[f"{items}_seen"] = done, done * args.batch
            log["wall_seconds"] = round(time.perf_counter() - start, 1)
            _save(task, out, params, ema, log)
            snapshot = jax.device_get((params, ema, opt_state))
            last_save = time.perf_counter()
        if out_of_time:
            stop_reason = "time budget"
            break
    data.close()
    log["steps_done"], log[f"{items}_seen"], log["stop"] = done, done * args.batch, stop_reason
    log["final_loss"] = log["history"][-1]["loss"] if log["history"] else loss0
    log["wall_seconds"] = round(time.perf_counter() - start, 1)
    _save(task, out, params, ema, log)
    print(f"trained {done} steps ({done * args.batch:,} {items}) in {log['wall_seconds']:.0f} s, stop: {stop_reason}; "
          f"final loss {log['final_loss']:.4f}; saved {out}", flush=True)

    if args.eval_images:
        t0 = time.perf_counter()
        rows, log["eval"] = [], {items: args.eval_images, "steps": args.eval_steps}
        for name, weights in (("ema", ema), ("raw", params)):
            samples, labels, acc = task.evaluate(weights, args.eval_images, args.eval_steps)
            rows.append(samples)
            log["eval"][name] = acc
            scores = ", ".join(f"{kind} {100 * value:.0f}%" for kind, value in acc.items())
            print(f"label check, {name} weights, {args.eval_images} dense samples x {args.eval_steps} steps: "
                  f"{scores}", flush=True)
        path = task.write_eval(out, rows, labels)
        _write_log(out, log)
        print(f"eval {time.perf_counter() - t0:.0f} s; {path} (rows: real, EMA, raw)", flush=True)
    return 0
