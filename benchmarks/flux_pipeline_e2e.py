"""FLUX.1-dev-shaped text-to-image pipeline end to end: wall time of ``chipmunk_jax.pipelines.FluxPipeline``'s
``pipe(prompt, height=1024, width=1024, num_inference_steps=50, output_type="np")`` (text encoding + 50 steps + VAE
decode) and each part's share of it, for the dense transformer, Chipmunk (the FLUX preset ``config.flux()``) and
Chipmunk + step caching (the preset with ``step_cache.enabled``, the default 25-of-50 skip schedule).

Everything is built in memory with random weights (nothing downloaded, no multi-GB file written): diffusers'
``FluxPipeline`` components of FLUX.1-dev's shapes (CLIP ViT-L/14 text encoder, T5-v1.1-XXL encoder, the FLUX VAE,
FLUX.1-dev's scheduler config; tokenizers with a small word-list vocabulary, tests/pipeline_folders.py's), in torch
bf16 on the GPU, and the FLUX.1-dev transformer's params as random bf16 JAX arrays (``flux.init_params``, as
benchmarks/flux_sample.py), put together with ``FluxPipeline.from_components``.

On the device machine (diffusers travels as a wheel in .whl/, carry=[".whl"]):
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site && source benchmarks/gpu_env.sh \
    && python3 -P benchmarks/flux_pipeline_e2e.py --static-step-dispatch --results $OUT/flux_pipeline.md
(or `bash benchmarks/gpu_plan.sh pipeline`). On a CPU: python benchmarks/flux_pipeline_e2e.py --tiny (tiny encoders,
VAE and a 2+2-block transformer, 256^2, 4 steps: checks the script).

Method: per variant, one pipeline (the params and the torch components are shared: prepared once for the sparse
MLP layout, which the dense model reads too), one warm-up call (it compiles the sampler: its ``compile`` seconds are
reported), then --reps timed calls of ``pipe(...)``, each timed whole on the host. The parts are the pipeline's own
``ImagePipelineOutput.timings``, each ending when its device work is done (blocking device-to-host copies of the
encoders' and the VAE's outputs, ``jax.block_until_ready`` of the latents); "other" is the rest of the call (the
host work between the parts: argument checks, the sigmas, the noise, the transformer's conditioning and caches).
Means over the reps (so the shares add up to 100%). ``--static-step-dispatch`` is passed to the Chipmunk variants
only (the dense model has one step kind: nothing to dispatch).

GPU memory: JAX's preallocation (75% of the GPU) is turned off before jax is imported (XLA_PYTHON_CLIENT_PREALLOCATE
= false, unless set), so torch (T5-XXL 9.5 GB + CLIP + VAE and the decode's activations) and JAX (FLUX.1-dev 22 GiB
+ Chipmunk caches ~9 GiB) share an 80 GiB card. A failing phase prints its error; the results measured so far are
still printed and written (also on SIGTERM, e.g. from ``timeout``).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax is imported: torch shares the GPU

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from chipmunk_jax import config as chipmunk_config  # noqa: E402
from chipmunk_jax.models import flux  # noqa: E402
from chipmunk_jax.pipelines.common import step_configs  # noqa: E402
from chipmunk_jax.schedule import model_schedule  # noqa: E402
from chipmunk_jax.timing import emit_section, log, peak_gib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("dense", "chipmunk", "chipmunk+cache")
PARTS = ("encode_prompt", "sampling", "decode", "other")


# ----------------------------------------------------------------------------------------------
# Shapes


def shapes(tiny: bool) -> dict:
    """Constructor arguments of every component: FLUX.1-dev's (its folders' config.json files), or tiny ones."""
    if tiny:
        return dict(
            clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      projection_dim=32, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"),
            t5=dict(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6),
            vae=dict(block_out_channels=[8, 8, 8, 8], layers_per_block=1, latent_channels=16, norm_num_groups=4),
            transformer=flux.FluxConfig(num_layers=2, num_single_layers=2, num_attention_heads=2,
                                        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True),
        )
    return dict(
        # text_encoder: openai/clip-vit-large-patch14's text model (123 M params)
        clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"),
        # text_encoder_2: google/t5-v1_1-xxl's encoder (4.76 B params)
        t5=dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6),
        # vae: FLUX.1-dev's AutoencoderKL (84 M params)
        vae=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16, norm_num_groups=32),
        transformer=flux.FluxConfig.dev(),  # 19 double + 38 single blocks, 11.9 B params
    )


def variant_chipmunk(name: str, tiny: bool):
    """The pipeline's ``chipmunk=`` of a variant: None (dense), the FLUX preset, or the preset with step caching."""
    if name == "dense":
        return None
    config = chipmunk_config.flux()
    if tiny:  # a 2+2-block model and 4 steps: keep some layers sparse, and schedules that fit 4 steps
        config = config.replace(attention__first_n_dense_layers=1, mlp__first_n_dense_layers=1,
                                attention__full_step_every=3, mlp__full_step_every=3,
                                step_cache__skip_step_schedule=(2,))
    return config.replace(step_cache__enabled=name == "chipmunk+cache")


# ----------------------------------------------------------------------------------------------
# Building the pipeline in memory


def torch_module(cls, config, device, dtype):
    """``cls(config)`` made directly on ``device`` in ``dtype`` (its own random init runs there: seconds for T5-XXL
    on a GPU, where a CPU init and a copy would take minutes and 19 GB of host memory)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = cls(config)
    finally:
        torch.set_default_dtype(previous)
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return module


def build_components(shape: dict, device, dtype):
    """diffusers' ``FluxPipeline`` without its transformer: FLUX.1-dev's components with random weights."""
    import diffusers
    import torch
    import transformers

    from pipeline_folders import bpe, t5_tokenizer  # the tests' tokenizers (tests/ is on sys.path: main)

    torch.manual_seed(0)
    vocab, merges = bpe(["<|startoftext|>", "<|endoftext|>"], suffix="</w>")
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    clip_config = transformers.CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                              pad_token_id=tokenizer.pad_token_id, **shape["clip"])
    clip = torch_module(transformers.CLIPTextModel, clip_config, device, dtype)
    tokenizer_2 = t5_tokenizer()
    t5_config = transformers.T5Config(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                      tie_word_embeddings=False, use_cache=False, is_encoder_decoder=False,
                                      **shape["t5"])
    t5 = torch_module(transformers.T5EncoderModel, t5_config, device, dtype)
    vae_config = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                      up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu", sample_size=1024,
                      scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True, use_quant_conv=False,
                      use_post_quant_conv=False, mid_block_add_attention=True, **shape["vae"])
    vae = torch_module(lambda kw: diffusers.AutoencoderKL(**kw), vae_config, device, dtype)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler/scheduler_config.json
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    components = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                                        text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=None)
    components.set_progress_bar_config(disable=True)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("CLIP", clip), ("T5", t5), ("VAE", vae))}
    return components, counts


# ----------------------------------------------------------------------------------------------
# Timing


def torch_peak_gib():
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def timed_call(pipe, call: dict) -> dict:
    """One ``pipe(...)`` call: its wall seconds, the pipeline's timings and "other" (wall - parts)."""
    t0 = time.perf_counter()
    out = pipe(**call)
    wall = time.perf_counter() - t0
    image = out.images[0]
    size = (call["height"], call["width"], 3)
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == size):
        raise ValueError(f"expected a uint8 {size} image, got {type(image).__name__} "
                         f"{getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}")
    t = dict(out.timings)
    t["other"] = wall - sum(t.get(k, 0.0) for k in ("encode_prompt", "compile", "sampling", "decode"))
    t["total"] = wall
    return t


def run_variant(name, components, config, params, call, reps, tiny, static_dispatch, row):
    """Fills ``row`` (a dict kept by the caller, so a failure keeps what was measured) as it goes."""
    from chipmunk_jax.pipelines import FluxPipeline

    chipmunk = variant_chipmunk(name, tiny)
    pipe = FluxPipeline.from_components(components, config, params, chipmunk=chipmunk,
                                        static_step_dispatch=static_dispatch and chipmunk is not None,
                                        weights_from="random bf16 (in memory)")
    steps = call["num_inference_steps"]
    _, sampler_config = step_configs(pipe.chipmunk, steps)  # the pipeline's own
    row["computed"] = int((model_schedule(sampler_config)[:steps] == 0).sum())
    row["warmup"] = timed_call(pipe, call)
    log(f"[{name}] warm-up {row['warmup']['total']:.1f} s (compile {row['warmup']['compile']:.1f} s, sampling "
        f"{row['warmup']['sampling']:.2f} s)")
    for i in range(reps):
        t = timed_call(pipe, call)
        row["reps"].append(t)
        log(f"[{name}] call {i + 1}/{reps}: total {t['total']:.2f} s = encode {t['encode_prompt']:.3f} + sampling "
            f"{t['sampling']:.2f} + decode {t['decode']:.3f} + other {t['other']:.3f} (compile {t['compile']:.1f})")
    row["jax_peak"], row["torch_peak"] = peak_gib(), torch_peak_gib()
    del pipe


def summary(row) -> dict | None:
    """Means over the timed calls of every part and of the total, and the spread of the totals."""
    if not row["reps"]:
        return None
    mean = {k: statistics.fmean(t[k] for t in row["reps"]) for k in PARTS + ("total",)}
    totals = [t["total"] for t in row["reps"]]
    mean["spread"] = max(totals) - min(totals)
    return mean


def table(rows, steps) -> list[str]:
    lines = ["| variant | computed steps | encode_prompt s (%) | sampling s (%) | decode s (%) | other s (%) | total s "
             "| spread s | sampling ms/step | speedup vs dense: total / sampling | sampler compile s | warm-up call s "
             "| JAX peak GiB | torch peak GiB | timed calls |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = next((summary(r) for r in rows if r["name"] == "dense" and r["reps"]), None)
    for r in rows:
        m, warm = summary(r), r.get("warmup")
        cells = [r["name"], f"{r['computed']}/{steps}" if "computed" in r else "-"]
        if m:
            cells += [f"{m[p]:.3f} ({100 * m[p] / m['total']:.1f}%)" if p != "sampling" else
                      f"{m[p]:.2f} ({100 * m[p] / m['total']:.1f}%)" for p in PARTS]
            cells += [f"{m['total']:.2f}", f"{m['spread']:.2f}", f"{1e3 * m['sampling'] / steps:.1f}"]
            cells.append(f"{dense['total'] / m['total']:.2f}x / {dense['sampling'] / m['sampling']:.2f}x"
                         if dense else "-")
        else:
            cells += ["-"] * 8
        cells += [f"{warm['compile']:.1f}" if warm else "-", f"{warm['total']:.1f}" if warm else "-",
                  f"{r.get('jax_peak', float('nan')):.1f}", f"{r.get('torch_peak', float('nan')):.1f}",
                  str(len(r["reps"])) + (f"; FAILED: {r['error']}" if r.get("error") else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1024x1024", help="HxW in pixels")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--text-len", type=int, default=512, help="max_sequence_length (T5 tokens)")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per variant after the warm-up call")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated subset of {VARIANTS}")
    parser.add_argument("--static-step-dispatch", action="store_true",
                        help="the Chipmunk pipelines' static_step_dispatch (one lax.switch per step; longer compile)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny encoders / VAE / 2+2-block transformer on the CPU, 256^2, 4 steps: a check")
    parser.add_argument("--results", default=None, help="append the markdown section to this file")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {unknown}; choose from {VARIANTS}")
    if args.tiny:
        height = width = 256  # 256 image tokens: Chipmunk's query groups (192) need a sequence that long
        steps, text_len, reps = 4, 8, 1
    else:
        height, width = (int(v) for v in args.size.split("x"))
        steps, text_len, reps = args.steps, args.text_len, args.reps
    if height % 16 or width % 16:
        parser.error(f"--size must be multiples of 16, got {height}x{width}")

    # `timeout` sends SIGTERM: end through the finally below, so what was measured is still written
    def on_sigterm(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)

    import diffusers
    import torch
    import transformers

    # tests/pipeline_folders.py: the prompt and the tokenizers (a word list with BPE merges, nothing downloaded)
    sys.path.append(os.path.join(ROOT, "tests"))
    from pipeline_folders import PROMPT

    shape = shapes(args.tiny)
    config = shape["transformer"]
    torch_device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch_dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    device_name = jax.devices()[0].device_kind
    if not args.tiny and (jax.default_backend() != "gpu" or torch_device.type != "cuda"):
        sys.exit(f"the full-size run needs JAX and torch on a GPU (JAX: {jax.default_backend()}, torch: "
                 f"{torch_device.type}); on a CPU use --tiny")
    grid = (height // 16, width // 16)
    log(f"device {device_name}, jax {jax.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}; {height}x{width}, {steps} steps, text length {text_len}; "
        f"XLA_PYTHON_CLIENT_PREALLOCATE={os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE')}, "
        f"XLA_PYTHON_CLIENT_MEM_FRACTION={os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')}")

    rows, notes, failed = [], [], False
    try:
        phase = "building the torch components (CLIP, T5, VAE)"
        t0 = time.perf_counter()
        components, counts = build_components(shape, torch_device, torch_dtype)
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        notes.append(f"torch components (random, {str(torch_dtype).removeprefix('torch.')} on {torch_device}) built "
                     f"in {time.perf_counter() - t0:.1f} s: "
                     + ", ".join(f"{k} {v / 1e6:,.1f} M params" for k, v in counts.items())
                     + f"; torch memory {torch_peak_gib():.1f} GiB")
        log(notes[-1])

        phase = "making the transformer's random bf16 params (JAX)"
        t0 = time.perf_counter()
        params = flux.init_params(config, jax.random.key(0), dtype=jnp.bfloat16)
        chipmunks = [c for c in (variant_chipmunk(v, args.tiny) for v in variants) if c is not None]
        if chipmunks:
            # the sparse-MLP layout made once, shared by every variant's pipeline (the dense model reads it too;
            # from_components' own prepare_params leaves it as it is): one copy of the weights on the device
            params = flux.prepare_params(params, config, chipmunks[0])
        params = jax.block_until_ready(params)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
        notes.append(f"transformer params ({n_params / 1e9:.2f} B, bf16{', sparse-MLP layout' if chipmunks else ''}) "
                     f"made in {time.perf_counter() - t0:.1f} s; JAX peak {peak_gib():.1f} GiB")
        log(notes[-1])
    except BaseException as e:  # noqa: BLE001  (report, then write what there is)
        failed = True
        log(f"FAILED while {phase}: {type(e).__name__}: {e}")
        traceback.print_exc()
        notes.append(f"FAILED while {phase}: {type(e).__name__}: {str(e)[:300]}")
        variants = []

    call = dict(prompt=PROMPT, height=height, width=width, num_inference_steps=steps, max_sequence_length=text_len,
                output_type="np", progress=False, seed=0)
    try:
        for name in variants:
            row = dict(name=name, reps=[])
            rows.append(row)
            try:
                run_variant(name, components, config, params, call, reps, args.tiny, args.static_step_dispatch,
                            row)
            except Exception as e:  # noqa: BLE001  (the next variant still runs)
                failed = True
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                log(f"[{name}] FAILED: {row['error']}")
                traceback.print_exc()
                row.setdefault("jax_peak", peak_gib())
                row.setdefault("torch_peak", torch_peak_gib())
            gc.collect()
            m = summary(row)
            if m:
                log(f"[{name}] mean of {len(row['reps'])}: total {m['total']:.2f} s; "
                    + ", ".join(f"{p} {m[p]:.3f} s ({100 * m[p] / m['total']:.1f}%)" for p in PARTS))
    except BaseException as e:  # SIGTERM, Ctrl-C: write what there is
        failed = True
        log(f"STOPPED: {type(e).__name__}: {e}")
        notes.append(f"STOPPED during the variants: {type(e).__name__}: {e}")
        if rows and not rows[-1].get("error"):
            rows[-1]["error"] = f"stopped ({type(e).__name__})"
    finally:
        lines = [
            f"## FLUX.1-dev pipeline end to end ({datetime.date.today()}, {device_name}, jax {jax.__version__}, "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__})",
            "",
            "Command: `source benchmarks/gpu_env.sh && python3 -P benchmarks/flux_pipeline_e2e.py "
            + " ".join(sys.argv[1:]) + "` (diffusers from .whl/). "
            + ("Tiny components (a check of the script). " if args.tiny else
               "FLUX.1-dev-shaped random weights built in memory: CLIP ViT-L/14 text encoder, T5-v1.1-XXL encoder, "
               "the FLUX VAE (16 latent channels) in torch on the GPU, FLUX.1-dev's FlowMatchEuler scheduler config "
               "(dynamic shift); the FLUX.1-dev transformer (19 + 38 blocks) random bf16 in JAX. ")
            + f"`pipe(prompt, height={height}, width={width}, num_inference_steps={steps}, "
            f"max_sequence_length={text_len}, output_type=\"np\")`: {grid[0] * grid[1]} image + {text_len} text "
            f"tokens, batch 1, guidance 3.5. Chipmunk = preset `config.flux()`, + step caching = its default skip "
            f"schedule; {'static' if args.static_step_dispatch else 'traced'} per-step dispatch for Chipmunk (dense: "
            f"traced). One warm-up call per variant (compiles the sampler), then the mean of {reps} timed calls; the "
            "parts are the pipeline's own `timings` (each waits for its device work), \"other\" the rest of the "
            "call (host work between the parts); shares are of the total. Peaks: the process's high-water marks "
            "up to the end of that variant (JAX's allocator and torch's, which share the GPU).",
            "",
        ]
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
        lines += table(rows, steps) if rows else ["(no variant ran)"]
        emit_section(lines, args.results)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
