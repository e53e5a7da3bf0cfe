"""FLUX.1-dev end to end: per-step transformer time of our dense JAX model, of diffusers'
FluxTransformer2DModel in torch (eager SDPA and torch.compile) on the same GPU with the same random
bf16 weights, and of the Chipmunk model per step kind; the 50-step total composed from the FLUX
schedule; peak GPU memory. Prints a markdown section and writes it to --results.

On the device machine (diffusers travels as a wheel in .whl/, carry=[".whl"]):
  source benchmarks/gpu_env.sh && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site && python3 -P benchmarks/flux_e2e.py --results $OUT/flux_e2e.md
Flags pick sizes and phases so one call fits the 10-minute limit (--torch eager,compile; --no-chipmunk).
On a CPU: python benchmarks/flux_e2e.py --tiny (a 2+2-block model, to check the script itself).

Method: weights come from ``flux.init_params`` (torch's default Linear init) in bf16 on the GPU and are
copied into the torch model (transposed, contiguous), so both run the same function. Times are medians
of --reps calls after warm-up (block_until_ready / CUDA events). The Chipmunk step is compiled once with
a traced step index (``lax.switch`` per layer) and the caches donated; each distinct (attention kind,
MLP kind) of the 50-step schedule is timed on a real trajectory state (steps 0 and 1 run first), and
the 50-step total is the sum over the schedule.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.timing import log, median_ms, rel_err, peak_gib, emit_section
from chipmunk_jax import config as chipmunk_config
from chipmunk_jax.models import flux
from chipmunk_jax.ports import flux as flux_ports
from chipmunk_jax.schedule import AttentionStep, MLPStep, attention_schedule, mlp_schedule, step_plan








def make_inputs(config, height, width, text_len, dtype, seed=0):
    h, w = height // 16, width // 16
    rows, cols = np.divmod(np.arange(h * w), w)
    keys = jax.random.split(jax.random.key(seed), 4)
    return dict(
        hidden_states=jax.random.normal(keys[0], (1, h * w, config.in_channels), dtype),
        encoder_hidden_states=jax.random.normal(keys[1], (1, text_len, config.joint_attention_dim), dtype),
        pooled_projections=jax.random.normal(keys[2], (1, config.pooled_projection_dim), dtype),
        timestep=jnp.asarray([1.0], dtype),
        img_ids=np.stack([np.zeros(h * w), rows, cols], 1).astype(np.float32),
        txt_ids=np.zeros((text_len, 3), np.float32),
        **({"guidance": jnp.asarray([3.5], dtype)} if config.guidance_embeds else {}),
    ), (h, w)




# ----------------------------------------------------------------------------------------------


def time_jax_dense(params, config, inputs, rope, reps):
    # the RoPE tables travel as an argument: as closed-over constants they would be folded into the HLO
    jitted = jax.jit(lambda p, x, r: flux.forward(p, config, **x, rotary_emb=r, dtype=jnp.bfloat16).sample)
    fn = lambda p, x: jitted(p, x, rope)  # noqa: E731
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(params, inputs))
    compile_s = time.perf_counter() - t0
    ms = median_ms(lambda: jax.block_until_ready(fn(params, inputs)), reps, warmup=2)
    return ms, compile_s, out, fn


def torch_model(params, config):
    import torch
    from diffusers import FluxTransformer2DModel

    kwargs = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
    with torch.device("meta"):
        model = FluxTransformer2DModel(**kwargs)
    state = {}
    for name, value in flux_ports.flatten_params(params).items():
        t = torch.from_dlpack(value)
        if name.endswith(".kernel"):
            t = t.t().contiguous()
        state[flux_ports.common.param_to_diffusers_name(name)] = t
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def time_torch(model, inputs, reps, compiled):
    import torch

    device = next(model.parameters()).device
    x = {k: torch.from_dlpack(jnp.asarray(v)) for k, v in inputs.items()}
    fn = torch.compile(model) if compiled else model

    def call():
        with torch.no_grad():
            return fn(**x, return_dict=False)[0]

    t0 = time.perf_counter()
    out = call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    if device.type == "cuda":
        for _ in range(2):
            call()
        samples = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        ms = statistics.median(samples)
    else:
        ms = median_ms(call, reps, warmup=2)
    return ms, first_s, out.float().cpu().numpy()


def trajectory(inputs, step):
    """Inputs of sampling step ``step``: the latents drift along one fixed direction, 2% of their scale
    per step, as in sampling, so MLP feature scores and sparse deltas are not trivially zero."""
    direction = jax.random.normal(jax.random.key(1000), inputs["hidden_states"].shape, jnp.float32)
    moved = inputs["hidden_states"].astype(jnp.float32) + 0.02 * step * direction
    return dict(inputs, hidden_states=moved.astype(inputs["hidden_states"].dtype),
                timestep=jnp.asarray([1.0 - step / 50], inputs["timestep"].dtype))


def time_chipmunk(params, config, inputs, rope, grid, chipmunk, reps, kernel_impl, dense_fn):
    n_img = grid[0] * grid[1]
    n_txt = inputs["encoder_hidden_states"].shape[1]
    cache = flux.init_cache(config, chipmunk, batch=1, grid=grid, num_text_tokens=n_txt, dtype=jnp.bfloat16)
    dense_params = params  # the dense reference keeps the plain layout
    params = flux.prepare_params(params, config, chipmunk)  # fc1 [F, C] and proj_out halves, made once

    def step_fn(params, x, cache, step, rope):
        out = flux.forward(params, config, **x, chipmunk=chipmunk, cache=cache, plan=step_plan(chipmunk, step),
                           key=jax.random.key(0), grid=grid, rotary_emb=rope, dtype=jnp.bfloat16,
                           kernel_impl=kernel_impl)
        return out.sample, out.cache

    jitted = jax.jit(step_fn, donate_argnums=(2,))
    fn = lambda p, x, c, s: jitted(p, x, c, s, rope)  # noqa: E731
    t0 = time.perf_counter()
    out0, cache = fn(params, trajectory(inputs, 0), cache, jnp.int32(0))
    jax.block_until_ready(out0)
    compile_s = time.perf_counter() - t0
    out1, cache = fn(params, trajectory(inputs, 1), cache, jnp.int32(1))
    jax.block_until_ready(out1)

    attn = attention_schedule(chipmunk)
    mlp = mlp_schedule(chipmunk)
    kinds = [(AttentionStep(int(attn[s])), MLPStep(int(mlp[s]))) for s in range(chipmunk.num_steps)]
    representative = {}
    for s, kind in enumerate(kinds):
        representative.setdefault(kind, s)
    times, errors = {}, {}
    state = {"cache": cache}
    for kind, s in representative.items():
        x = trajectory(inputs, s)

        def call():
            out, state["cache"] = fn(params, x, state["cache"], jnp.int32(s))
            return jax.block_until_ready(out)

        times[kind] = median_ms(call, reps, warmup=2)
        errors[kind] = rel_err(call(), dense_fn(dense_params, x))
    total = sum(times[k] for k in kinds)
    counts = {k: kinds.count(k) for k in representative}
    del state
    return times, counts, representative, total, compile_s, errors, rel_err(out0, dense_fn(dense_params, trajectory(inputs, 0)))


# ----------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1024x1024,1280x768", help="HxW in pixels, comma separated")
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--torch", default="eager,compile", help="torch modes: eager, compile, or none")
    parser.add_argument("--no-chipmunk", action="store_true")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="2+2-block model, 128x128: a CPU check of the script")
    parser.add_argument("--results", default=None, help="write the markdown section here")
    args = parser.parse_args()

    if args.tiny:
        config = flux.FluxConfig(num_layers=2, num_single_layers=2, num_attention_heads=2, joint_attention_dim=64,
                                 pooled_projection_dim=32, guidance_embeds=True)
        sizes = [(256, 256)]
        text_len, reps, kernel_impl = 64, 2, "reference"
    else:
        config = flux.FluxConfig.dev()
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        text_len, reps, kernel_impl = args.text_len, args.reps, None
    torch_modes = [] if args.torch == "none" else args.torch.split(",")
    device = jax.devices()[0]
    log(f"device {device.device_kind}, jax {jax.__version__}, config {config}")

    t0 = time.perf_counter()
    params = flux.init_params(config, jax.random.key(0), dtype=jnp.bfloat16)
    jax.block_until_ready(params)
    log(f"random bf16 params in {time.perf_counter() - t0:.1f} s; JAX peak {peak_gib():.1f} GiB")

    chipmunk = chipmunk_config.flux()
    rows = []
    for height, width in sizes:
        inputs, grid = make_inputs(config, height, width, text_len, jnp.bfloat16)
        rope = flux.pos_embed(config, inputs["txt_ids"], inputs["img_ids"])
        tokens = f"{grid[0] * grid[1]} + {text_len}"
        dense_ms, compile_s, dense_out, dense_fn = time_jax_dense(params, config, inputs, rope, reps)
        log(f"[{height}x{width}] JAX dense {dense_ms:.1f} ms/step (compile {compile_s:.0f} s), peak {peak_gib():.1f} GiB")
        row = {"size": f"{height}x{width}", "tokens": tokens, "jax_dense": dense_ms, "jax_peak": peak_gib()}
        rows.append(row)
        model = torch_model(params, config) if torch_modes else None

        def run_torch(mode):
            ms, first_s, out = time_torch(model, inputs, reps, compiled=(mode == "compile"))
            err = rel_err(out, dense_out)
            log(f"[{height}x{width}] torch {mode} {ms:.1f} ms/step (first call {first_s:.0f} s), "
                f"max rel diff vs JAX {err:.2e}")
            row[f"torch_{mode}"] = ms
            import torch

            if torch.cuda.is_available():
                row["torch_peak"] = torch.cuda.max_memory_allocated() / 2**30

        # cheapest first, torch.compile (minutes of compilation) last, so a cut-off run keeps the rest
        if "eager" in torch_modes:
            run_torch("eager")
        if not args.no_chipmunk:
            times, counts, representative, total, compile_s, errors, err0 = time_chipmunk(
                params, config, inputs, rope, grid, chipmunk, reps, kernel_impl, dense_fn
            )
            log(f"[{height}x{width}] Chipmunk compile {compile_s:.0f} s; step-0 output vs dense {err0:.2e}")
            for kind, ms in times.items():
                log(f"  {kind[0].name:>13} attn + {kind[1].name:>13} mlp (e.g. step {representative[kind]:2d}, "
                    f"x{counts[kind]:2d}): {ms:.1f} ms, output vs dense {errors[kind]:.2e}")
            row.update(chipmunk_steps=times, chipmunk_counts=counts, chipmunk_total=total, chipmunk_peak=peak_gib())
            log(f"[{height}x{width}] 50 steps: dense {50 * dense_ms / 1e3:.2f} s, Chipmunk {total / 1e3:.2f} s, "
                f"speedup {50 * dense_ms / total:.2f}x, JAX peak {peak_gib():.1f} GiB")
        if "compile" in torch_modes:
            run_torch("compile")
        del model
        if torch_modes:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    lines = [
        f"## FLUX.1-dev end to end ({datetime.date.today()}, {device.device_kind}, jax {jax.__version__}"
        + (f", torch {__import__('torch').__version__}" if torch_modes else "") + ")",
        "",
        "Command: `source benchmarks/gpu_env.sh && python3 -P benchmarks/flux_e2e.py "
        + " ".join(sys.argv[1:]) + "` (diffusers 0.42.1 from .whl/). Random bf16 weights (torch default init), "
        f"batch 1, text length {text_len}, Chipmunk preset `config.flux()`; per-step transformer times in ms "
        f"(median of {reps}); 50-step totals composed from the schedule.",
        "",
        "| size | tokens (img + txt) | JAX dense | torch eager | torch.compile | Chipmunk 50-step (s) | dense 50-step (s) "
        "| speedup | JAX peak GiB | torch peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        total = r.get("chipmunk_total")
        lines.append(
            f"| {r['size']} | {r['tokens']} | {r['jax_dense']:.1f} | {r.get('torch_eager', float('nan')):.1f} "
            f"| {r.get('torch_compile', float('nan')):.1f} | "
            + (f"{total / 1e3:.2f} | {50 * r['jax_dense'] / 1e3:.2f} | {50 * r['jax_dense'] / total:.2f}x"
               if total else "- | - | -")
            + f" | {r.get('chipmunk_peak', r['jax_peak']):.1f} | {r.get('torch_peak', float('nan')):.1f} |"
        )
    for r in rows:
        if "chipmunk_steps" in r:
            lines += ["", f"Chipmunk step kinds at {r['size']} (attention kind + MLP kind: ms, steps of 50):"]
            for kind, ms in r["chipmunk_steps"].items():
                lines.append(f"- {kind[0].name} + {kind[1].name}: {ms:.1f} ms x {r['chipmunk_counts'][kind]}")
    emit_section(lines, args.results)


if __name__ == "__main__":
    main()
