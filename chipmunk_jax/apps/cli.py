"""``chipmunk-jax`` command line (also ``python -m chipmunk_jax.apps.cli``).

    chipmunk-jax generate --model flux (--weights DIR | --diffusers DIR) [--pipeline DIR]
        (--prompt-embeds FILE.npz | --prompt TEXT) --height 1024 --width 1024 --steps 50 --seed 0
        [--guidance 3.5] [--chipmunk PRESET|config.yaml | --dense] [--step-cache] [--compile-cache DIR|none]
        [--mesh sequence=P | none] --out out.png|out.npy

--weights: converted params (``python -m chipmunk_jax.ports.convert``); --diffusers: a diffusers
transformer or pipeline folder, converted on the fly. A pipeline folder (--diffusers or --pipeline,
with ``vae/``) decodes the latents through its torch VAE into a PNG; without one, --out must be .npy
and receives the latents [1, C, H/8, W/8] in VAE latent space (before the scaling/shift undo).
--prompt-embeds FILE.npz holds ``prompt_embeds`` [1, L, 4096] (T5) and ``pooled_prompt_embeds``
[1, 768] (CLIP); --prompt encodes the text with the pipeline's own text encoders (needs transformers).
--compile-cache keeps the compiled sampling loop in JAX's persistent compilation cache, so a second run with the
same shapes and flags loads it from disk; 'none' leaves JAX's cache settings alone.
--mesh runs the sampler sequence-parallel over P GPUs (``chipmunk_jax.parallel``; docs/architecture.md §6); the
default uses every local GPU when there are several (the most of them the image size splits over), 'none' one.
Exit codes: 0 done, 2 bad arguments, 1 bad files or contents.

This is the application layer over models, ports and the sampler; torch, diffusers, transformers and
Pillow are optional and imported where they are used.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import struct
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import config as C
from chipmunk_jax import parallel, sampling
from chipmunk_jax.apps.compile_cache import default_compile_cache_dir, enable_compile_cache, watch_compile_cache
from chipmunk_jax.cache import init_step_cache
from chipmunk_jax.models import flux
from chipmunk_jax.ports import convert
from chipmunk_jax.ports import flux as flux_ports
from chipmunk_jax.schedule import AttentionStep, MLPStep, ModelStep, attention_schedule, mlp_schedule, model_schedule

__all__ = ["main"]

_MODELS = ("flux",)


class UsageError(Exception):
    """Bad input found after parsing (files, contents): exit code 1."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Arguments


def _version() -> str:
    """The installed package's version (the source tree's when it is not installed)."""
    try:
        return importlib.metadata.version("chipmunk-jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chipmunk-jax", description="Chipmunk (JAX/Pallas) sampling tools")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    # parsed by the converter itself (main hands it the rest of the command line)
    commands.add_parser("convert", help="a PyTorch checkpoint -> Flax params folder (chipmunk-jax convert --help)",
                        add_help=False)
    gen = commands.add_parser("generate", help="sample one image with a flow-matching DiT",
                              description=__doc__.split("\n\n")[1],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--model", choices=_MODELS, default="flux", help="the transformer")
    weights = gen.add_mutually_exclusive_group(required=True)
    weights.add_argument("--weights", metavar="DIR", help="converted params folder (params.safetensors + config.json)")
    weights.add_argument("--diffusers", metavar="DIR", help="diffusers transformer or pipeline folder")
    gen.add_argument("--pipeline", metavar="DIR", help="diffusers pipeline folder for the VAE / text encoders")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-embeds", metavar="FILE.npz", help="prompt_embeds + pooled_prompt_embeds")
    prompt.add_argument("--prompt", help="text, encoded with the pipeline's text encoders")
    gen.add_argument("--height", type=int, default=1024, help="image height in pixels (a multiple of 16)")
    gen.add_argument("--width", type=int, default=1024, help="image width in pixels (a multiple of 16)")
    gen.add_argument("--steps", type=int, default=50, help="sampling steps")
    gen.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    gen.add_argument("--guidance", type=float, default=None,
                     help="embedded guidance scale of guidance-distilled models (FLUX.1-dev; default 3.5)")
    sparsity = gen.add_mutually_exclusive_group()
    sparsity.add_argument("--chipmunk", default=None, metavar="PRESET|FILE",
                          help="Chipmunk preset name or a .yaml/.json config (default: flux)")
    sparsity.add_argument("--dense", action="store_true", help="no Chipmunk: the dense model")
    gen.add_argument("--step-cache", action="store_true",
                     help="skip the config's skip_step_schedule steps (re-run only the final layer)")
    gen.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                     help="compute dtype of the matmuls")
    gen.add_argument("--static-step-dispatch", action="store_true",
                     help="one switch per step over the schedule's kinds (see sampling.make_sampler)")
    gen.add_argument("--compile-cache", default=default_compile_cache_dir(), metavar="DIR|none",
                     help="JAX persistent compilation cache folder: a second run with the same shapes loads the "
                          "compiled sampler from it; 'none': no cache of ours")
    gen.add_argument("--mesh", default="auto", metavar="sequence=P[,cfg=1]|none|auto",
                     help="devices to run on: the sampler sequence-parallel over P GPUs; 'auto' uses every local GPU "
                          "when there are several (the most of them the size splits over), 'none' one device")
    gen.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    gen.add_argument("--out", required=True, help="out.png (needs a pipeline VAE) or out.npy (latents)")
    return parser


def _check_generate_args(parser, args) -> None:
    """Argument-level checks (exit code 2, argparse's usage message)."""
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < 16 or value % 16:
            parser.error(f"--{name} must be a positive multiple of 16 (VAE factor 8 x 2x2 packing), got {value}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.guidance is not None and not args.guidance >= 0:
        parser.error(f"--guidance must be >= 0, got {args.guidance}")
    if not args.out.endswith((".png", ".npy")):
        parser.error(f"--out must end in .png or .npy, got {args.out!r}")
    if args.step_cache and args.steps < 2:
        parser.error("--step-cache needs --steps >= 2")
    try:
        args.mesh_axes = _parse_mesh(args.mesh)
    except ValueError as e:
        parser.error(f"--mesh: {e}")


def _parse_mesh(spec: str):
    """'none' -> None, 'auto' -> 'auto', 'sequence=4,cfg=1' -> {"sequence": 4, "cfg": 1}."""
    if spec in ("none", "auto"):
        return None if spec == "none" else spec
    axes = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in (parallel.SEQUENCE, parallel.CFG) or name in axes or not value.strip().isdigit():
            raise ValueError(f"expected sequence=P[,cfg=C], 'auto' or 'none', got {spec!r}")
        axes[name] = int(value)
        if axes[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {spec!r}")
    return axes


# ----------------------------------------------------------------------------------------------
# Inputs


def _chipmunk_config(args):
    spec = args.chipmunk
    if args.dense:
        base = C.ChipmunkConfig()
    elif spec.endswith((".yaml", ".yml", ".json")):
        if not os.path.isfile(spec):
            raise UsageError(f"--chipmunk: no such config file {spec!r}")
        try:
            base = C.ChipmunkConfig.load(spec)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--chipmunk {spec!r}: {e}") from None
        except Exception as e:  # yaml / json syntax errors
            raise UsageError(f"--chipmunk {spec!r} is not a valid config file: {e}") from None
    elif spec in C.PRESETS:
        base = C.PRESETS[spec]()
    else:
        raise UsageError(f"--chipmunk: unknown preset {spec!r} (presets: {', '.join(sorted(C.PRESETS))}; "
                         "or a .yaml/.json config file)")
    try:
        sampler = base.replace(num_steps=args.steps, step_cache__enabled=bool(args.step_cache))
    except ValueError as e:  # e.g. a schedule entry past --steps
        raise UsageError(f"--chipmunk {spec} with --steps {args.steps}: {e}") from None
    return (None if args.dense else sampler), sampler


def _pipeline_dir(args) -> str | None:
    """The diffusers pipeline folder (with vae/), from --pipeline or a --diffusers pipeline folder."""
    if args.pipeline is not None:
        if not os.path.isdir(os.path.join(args.pipeline, "vae")):
            raise UsageError(f"--pipeline {args.pipeline!r} is not a diffusers pipeline folder (no vae/ subfolder)")
        return args.pipeline
    if args.diffusers is not None and os.path.isdir(os.path.join(args.diffusers, "vae")):
        return args.diffusers
    return None


def _load_model(args, dtype):
    path = args.weights if args.weights is not None else args.diffusers
    flag = "--weights" if args.weights is not None else "--diffusers"
    if not os.path.exists(path):
        raise UsageError(f"{flag}: no such folder {path!r}")
    try:
        if args.weights is not None:
            config, params = flux_ports.load_params(path)
        else:
            sub = os.path.join(path, "transformer")
            config, params = flux_ports.from_checkpoint(sub if os.path.isdir(sub) else path)
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        raise UsageError(f"{flag} {path!r}: {e}") from None
    params = jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), params)
    return config, params


_NPZ_WORDS = "--prompt-embeds must be an .npz file written by numpy.savez with prompt_embeds and pooled_prompt_embeds"


def _load_prompt_embeds(path, config):
    """(prompt_embeds, pooled_prompt_embeds) of an .npz file; pickles are never loaded (allow_pickle=False, and a
    file that is not a zip archive, e.g. JSON or a pickle, is refused before numpy sees it)."""
    if not os.path.isfile(path):
        raise UsageError(f"--prompt-embeds: no such file {path!r}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip archive (empty or not): what numpy.savez writes
        raise UsageError(f"{_NPZ_WORDS} ({path!r} is not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k], np.float32) for k in data.files}
    except ValueError as e:
        if "pickle" in str(e):  # an object array inside the archive
            raise UsageError(f"{_NPZ_WORDS} holding float arrays ({path!r} holds an object array, which would "
                             "need unpickling: refused)") from None
        raise UsageError(f"{_NPZ_WORDS} holding float arrays ({path!r}: {e})") from None
    except Exception as e:
        raise UsageError(f"{_NPZ_WORDS} ({path!r} is not a readable .npz file: {e})") from None
    missing = [k for k in ("prompt_embeds", "pooled_prompt_embeds") if k not in arrays]
    if missing:
        raise UsageError(f"--prompt-embeds {path!r} lacks {missing} (has {sorted(arrays)})")
    text, pooled = arrays["prompt_embeds"], arrays["pooled_prompt_embeds"]
    text = text[None] if text.ndim == 2 else text
    pooled = pooled[None] if pooled.ndim == 1 else pooled
    if text.ndim != 3 or text.shape[0] != 1 or text.shape[2] != config.joint_attention_dim:
        raise UsageError(f"--prompt-embeds: prompt_embeds must be [1, L, {config.joint_attention_dim}], "
                         f"got {arrays['prompt_embeds'].shape}")
    if pooled.shape != (1, config.pooled_projection_dim):
        raise UsageError(f"--prompt-embeds: pooled_prompt_embeds must be [1, {config.pooled_projection_dim}], "
                         f"got {arrays['pooled_prompt_embeds'].shape}")
    return text, pooled


def _encode_prompt(prompt, pipeline_dir):
    """T5 + CLIP embeddings from the pipeline's own text encoders (diffusers FluxPipeline.encode_prompt)."""
    if pipeline_dir is None:
        raise UsageError("--prompt needs a diffusers pipeline folder with text encoders (--pipeline or "
                         "--diffusers PIPELINE); or pass --prompt-embeds FILE.npz")
    try:  # local: optional dependencies
        import torch
        import transformers  # noqa: F401
        from diffusers import FluxPipeline
    except ImportError as e:
        raise UsageError(f"--prompt needs torch, transformers and diffusers ({e}); pass --prompt-embeds") from None
    pipe = FluxPipeline.from_pretrained(pipeline_dir, transformer=None, vae=None, torch_dtype=torch.float32)
    with torch.no_grad():
        text, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=512)
    return text.float().numpy(), pooled.float().numpy()


def _load_vae(pipeline_dir, config, args):
    try:  # local: optional dependency
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise UsageError(f"decoding to PNG needs torch and diffusers ({e}); write --out latents.npy instead") from None
    try:
        vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae").eval()
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the VAE from {pipeline_dir!r}/vae: {e}") from None
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if 4 * vae.config.latent_channels != config.in_channels:
        raise UsageError(f"the VAE has {vae.config.latent_channels} latent channels; the transformer takes "
                         f"{config.in_channels} = 4 x {config.in_channels // 4} packed channels")
    for name in ("height", "width"):
        if getattr(args, name) % (2 * factor):
            raise UsageError(f"--{name} must be a multiple of {2 * factor} for this VAE (factor {factor} x 2)")
    return vae, factor


# ----------------------------------------------------------------------------------------------
# Outputs


def _unpack(latents, config, grid):
    """Packed [1, h*w, 4C] (features c, ph, pw) -> VAE latents [1, C, 2h, 2w] (docs/models.md §1.1)."""
    h, w = grid
    c = config.in_channels // 4
    return latents.reshape(1, h, w, c, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(1, c, 2 * h, 2 * w)


def _decode(vae, latents):
    import torch  # local: optional dependency (the VAE is a torch module)

    shift = vae.config.shift_factor or 0.0
    with torch.no_grad():
        z = torch.from_numpy(latents).float() / vae.config.scaling_factor + shift
        image = vae.decode(z, return_dict=False)[0]
    image = ((image[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(image)


def _write_png(path, image) -> None:
    try:  # local: optional dependency
        from PIL import Image
    except ImportError:
        _write_png_plain(path, image)
        return
    Image.fromarray(image).save(path)


def _write_png_plain(path, image) -> None:
    """8-bit RGB PNG without pillow (zlib, filter 0 on every row)."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[r].tobytes() for r in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _step_kinds(model_chipmunk, sampler_config, steps):
    """Name of each step's kind: skipped / dense, or Chipmunk's attention + MLP kinds."""
    skip = model_schedule(sampler_config)[:steps]
    names = []
    for s in range(steps):
        if skip[s] == ModelStep.SKIP:
            names.append("skipped (final layer only)")
        elif model_chipmunk is None:
            names.append("dense")
        else:
            attn = AttentionStep(int(attention_schedule(model_chipmunk)[s])).name.lower()
            mlp = MLPStep(int(mlp_schedule(model_chipmunk)[s])).name.lower()
            names.append(f"attention {attn} + mlp {mlp}")
    return names


def _timing_report(kinds, starts, ends) -> str:
    lines = [f"{'step kind':<48} {'steps':>5} {'ms/step':>9} {'total s':>8}"]
    order = sorted(set(kinds), key=kinds.index)
    for kind in order:
        times = [ends[s] - starts[s] for s in range(len(kinds)) if kinds[s] == kind]
        lines.append(f"{kind:<48} {len(times):>5} {1e3 * sum(times) / len(times):>9.1f} {sum(times):>8.2f}")
    lines.append(f"{'total (sampling loop)':<48} {len(kinds):>5} {'':>9} {ends[-1] - starts[0]:>8.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Devices


def _mesh(args, config, model_chipmunk, num_img: int, num_txt: int):
    """The ``--mesh`` mesh (None: one device). FLUX runs no CFG branches, so the cfg axis is 1."""
    axes = args.mesh_axes
    if axes is None:
        return None
    if axes == "auto":
        gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
        for size in range(len(gpus), 1, -1):  # the most local GPUs this size splits over
            mesh = parallel.make_mesh(sequence=size, devices=gpus[:size])
            try:
                flux.check_mesh(config, model_chipmunk, mesh, num_img=num_img, num_txt=num_txt)
            except ValueError as e:
                _log(f"--mesh auto: not {size} GPUs ({e})")
                continue
            return mesh
        return None
    if axes.get(parallel.CFG, 1) != 1:
        raise UsageError("--mesh: FLUX.1 runs no classifier-free guidance branches (its guidance is embedded): "
                         "use cfg=1")
    size = axes.get(parallel.SEQUENCE, 1)
    if size > jax.device_count():
        raise UsageError(f"--mesh sequence={size}: only {jax.device_count()} devices are visible")
    mesh = parallel.make_mesh(sequence=size, devices=jax.devices()[:size])
    try:
        flux.check_mesh(config, model_chipmunk, mesh, num_img=num_img, num_txt=num_txt)
    except ValueError as e:
        raise UsageError(f"--mesh sequence={size}: {e}") from None
    return mesh


# ----------------------------------------------------------------------------------------------
# generate


def generate(args) -> int:
    t_start = time.perf_counter()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out: folder {out_dir!r} does not exist")
    if args.chipmunk is None:
        args.chipmunk = args.model  # the model's own preset
    model_chipmunk, sampler_config = _chipmunk_config(args)
    pipeline_dir = _pipeline_dir(args)
    if args.out.endswith(".png") and pipeline_dir is None:
        raise UsageError("--out .png needs a VAE: pass a diffusers pipeline folder (--pipeline, or --diffusers "
                         "with a vae/ subfolder), or write the latents with --out FILE.npy")
    try:  # before JAX compiles anything
        cache_dir = enable_compile_cache(args.compile_cache)
    except ValueError as e:
        raise UsageError(f"--compile-cache: {e}") from None
    dtype = jnp.dtype(args.dtype)
    config, params = _load_model(args, dtype)
    if args.guidance is not None and not config.guidance_embeds:
        raise UsageError("--guidance: this model has no guidance embedding (FLUX.1-schnell style); drop --guidance")
    guidance = (3.5 if args.guidance is None else args.guidance) if config.guidance_embeds else None
    vae = None
    if args.out.endswith(".png"):
        vae, _ = _load_vae(pipeline_dir, config, args)
    if args.prompt_embeds is not None:
        text, pooled = _load_prompt_embeds(args.prompt_embeds, config)
    else:
        text, pooled = _encode_prompt(args.prompt, pipeline_dir)
    grid = (args.height // 16, args.width // 16)
    num_img, num_txt = grid[0] * grid[1], text.shape[1]
    _log(f"FLUX {'dev' if config.guidance_embeds else 'schnell'}-style, {args.height}x{args.width} "
         f"({num_img} image + {num_txt} text tokens), {args.steps} steps, "
         f"{'dense' if model_chipmunk is None else 'Chipmunk ' + args.chipmunk}"
         f"{' + step caching' if args.step_cache else ''}, {args.dtype}, loaded in {time.perf_counter() - t_start:.1f} s")

    try:
        cond = flux.sampling_cond(config, encoder_hidden_states=jnp.asarray(text, dtype),
                                  pooled_projections=jnp.asarray(pooled, dtype), grid=grid, guidance=guidance)
        mesh = _mesh(args, config, model_chipmunk, num_img, num_txt)
        cache = None if model_chipmunk is None else flux.init_cache(
            config, model_chipmunk, batch=1, grid=grid, num_text_tokens=num_txt, dtype=dtype)
        if cache is not None and mesh is not None:
            cache = jax.device_put(cache, parallel.cache_shardings(cache, mesh))
        denoiser = flux.denoiser(config, model_chipmunk, grid=grid, dtype=dtype, mesh=mesh)
        if mesh is not None:
            _log(f"sequence-parallel over {mesh.size} devices ({', '.join(str(d) for d in mesh.devices.flat)})")
        if model_chipmunk is not None:  # the sparse MLP layers' layout, made once (the plain copy is dropped)
            params = flux.prepare_params(params, config, model_chipmunk)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--chipmunk {args.chipmunk!r} with this model and size: {e}") from None
    sigmas = sampling.flow_sigmas(args.steps, mu=sampling.flux_shift(num_img))
    step_ends: dict[int, float] = {}
    run = sampling.make_sampler(denoiser, sampler_config, sigmas, progress=not args.no_progress,
                                static_step_dispatch=args.static_step_dispatch,
                                on_step=lambda s: step_ends.__setitem__(s, time.perf_counter()))
    key = jax.random.key(args.seed)
    # raster-order packed latents: forward runs Chipmunk's tile order internally and returns raster order
    latents = jax.random.normal(jax.random.fold_in(key, 0), (1, num_img, config.in_channels), jnp.float32)
    step_cache = init_step_cache(batch=1, seq_len=num_img, width=config.inner_dim, dtype=jnp.float32)
    sample_key = jax.random.fold_in(key, 1)

    t0 = time.perf_counter()
    with watch_compile_cache() as cache_events:
        compiled = run.lower(params, latents, cond, cache, step_cache, sample_key).compile()
    cache_dir = cache_dir if cache_dir is not None else jax.config.jax_compilation_cache_dir  # none: JAX's own
    where = "off" if cache_dir is None else f"{cache_dir}, {cache_events.describe()}"
    _log(f"sampling loop compiled in {time.perf_counter() - t0:.1f} s (persistent cache: {where})")
    start = time.perf_counter()
    latents, _, _ = compiled(params, latents, cond, cache, step_cache, sample_key)
    latents = np.asarray(jax.block_until_ready(latents), np.float32)
    done = time.perf_counter()
    if not np.all(np.isfinite(latents)):
        raise UsageError("sampling produced non-finite latents")

    kinds = _step_kinds(model_chipmunk, sampler_config, args.steps)
    starts = [start] + [step_ends[s] for s in range(args.steps - 1)]
    ends = [step_ends[s] for s in range(args.steps)]
    print(_timing_report(kinds, starts, ends))
    print(f"total sampling wall time {done - start:.2f} s (compile excluded)")

    image_latents = _unpack(latents, config, grid)
    if vae is None:
        np.save(args.out, image_latents)
    else:
        _write_png(args.out, _decode(vae, image_latents))
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:
        return convert.main(argv[1:], prog="chipmunk-jax convert")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        _check_generate_args(parser, args)
        try:
            return generate(args)
        except UsageError as e:
            print(f"chipmunk-jax generate: error: {e}", file=sys.stderr)
            return 1
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
