"""``chipmunk-jax`` command line (also ``python -m chipmunk_jax.apps.cli``).

    chipmunk-jax generate --model flux (--weights DIR | --diffusers DIR) [--pipeline DIR]
        (--prompt-embeds FILE.npz | --prompt TEXT) [--height 1024 --width 1024 --steps 50 --seed 0 --guidance 3.5]
        [--chipmunk PRESET|config.yaml | --dense] [--step-cache] [--compile-cache DIR|none]
        [--mesh sequence=P | none] --out out.png|out.npy
    chipmunk-jax generate --model hunyuan-video|wan|wan2.2-ti2v-5b (--diffusers PIPELINE | --pipeline PIPELINE
        --weights DIR) --prompt TEXT [--negative-prompt TEXT (wan*)] [--height --width --num-frames --fps --steps
        --seed --guidance] [--chipmunk PRESET|config.yaml | --dense] [--step-cache] --out out.mp4|.gif|.webp|.npy
    chipmunk-jax generate --model wan2.2-t2v-a14b --diffusers PIPELINE --prompt TEXT [--guidance --guidance-2]
        [--offload-idle-expert] [... as above] --out out.mp4|.gif|.webp|.npy
    chipmunk-jax generate --model wan2.2-i2v-a14b --diffusers PIPELINE --image FIRST_FRAME --prompt TEXT [... as
        wan2.2-t2v-a14b]; --model wan2.2-ti2v-5b [--image FIRST_FRAME]
    chipmunk-jax convert --model flux|hunyuan_video|wan --src CHECKPOINT --dst DIR

FLUX: --weights: converted params (``chipmunk-jax convert``) or an orbax checkpoint of a ``chipmunk_jax.nnx``
module's state (``ocp.StandardCheckpointer().save(path, nnx.state(model))``); --diffusers: a diffusers transformer
or pipeline folder, converted on the fly. A pipeline folder (--diffusers or --pipeline, with ``vae/``) decodes the latents through
its torch VAE into a PNG; without one, --out must be .npy and receives the latents [1, C, H/8, W/8] in VAE latent
space (before the scaling/shift undo). --prompt-embeds FILE.npz holds ``prompt_embeds`` [1, L, 4096] (T5) and
``pooled_prompt_embeds`` [1, 768] (CLIP); --prompt encodes the text with the pipeline's own text encoders (needs
transformers). --mesh runs the sampler sequence-parallel over P GPUs (``chipmunk_jax.parallel``;
docs/architecture.md §6); the default uses every local GPU when there are several (the most of them the image size
splits over), 'none' one.

HunyuanVideo / Wan: the diffusers pipeline folder (--diffusers, or --pipeline with the transformer from --weights
or --diffusers) runs through ``chipmunk_jax.pipelines`` (its torch text encoders encode --prompt, its torch VAE
decodes; the JAX transformer samples, one jit, on one device); --out .mp4 is H.264 through imageio-ffmpeg (an
animated GIF beside it when imageio-ffmpeg is missing), .gif / .webp animated images, .npy the latents
[1, C, (F-1)/4 + 1, H/s, W/s] (s: the VAE's factor, 8; 16 for Wan2.2-TI2V-5B). A checkpoint that needs converting
is converted once and cached in ``$XDG_CACHE_HOME/chipmunk-jax/weights``. Wan 2.2: --model wan2.2-ti2v-5b takes a
Wan2.2-TI2V-5B folder (text-to-video, or image-to-video with --image); --model wan2.2-t2v-a14b a Wan2.2-T2V-A14B
folder and --model wan2.2-i2v-a14b a Wan2.2-I2V-A14B folder (image-to-video: --image is required), whose two
experts (transformer/ and transformer_2/, switched at its boundary_ratio) each get their own guidance scale
(--guidance, --guidance-2) and, with --offload-idle-expert, wait in host memory while the other one samples.
--image (PNG, JPEG, ...) is the first frame, resized to --height x --width as diffusers does (no crop).

--compile-cache keeps the compiled sampling loop in JAX's persistent compilation cache, so a second run with the
same shapes and flags loads it from disk; 'none' leaves JAX's cache settings alone.
Exit codes: 0 done, 2 bad arguments, 1 bad files or contents.

This is the application layer over models, ports, pipelines and the sampler; torch, diffusers, transformers, imageio
and Pillow are optional and imported where they are used.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import logging
import os
import struct
import sys
import threading
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
from chipmunk_jax.ports import common as port_common
from chipmunk_jax.ports import convert
from chipmunk_jax.ports import flux as flux_ports
from chipmunk_jax.schedule import AttentionStep, MLPStep, ModelStep, attention_schedule, mlp_schedule, model_schedule

__all__ = ["main"]


@dataclasses.dataclass(frozen=True)
class _Model:
    """A ``--model`` choice: its name in messages, Chipmunk preset, defaults and (video) pipeline class."""

    title: str
    preset: str
    height: int
    width: int
    guidance: float
    num_frames: int | None = None  # None: an image model
    fps: int | None = None
    pipeline: str | None = None  # the chipmunk_jax.pipelines class (video models; None: not supported yet)
    wan_variant: str | None = None  # a Wan model: chipmunk_jax.pipelines.wan.folder_variant of its folders
    guidance_2: float | None = None  # two experts (Wan 2.2 A14B): the low-noise expert's guidance scale

    @property
    def video(self) -> bool:
        return self.num_frames is not None

    @property
    def wan(self) -> bool:
        """Wan models run true classifier-free guidance (two transformer calls per step, a negative prompt)."""
        return self.wan_variant is not None

    @property
    def experts(self) -> bool:
        return self.guidance_2 is not None


# defaults: the original Wan2.2 configs (wan/configs/wan_{t2v,i2v}_A14B.py, wan_ti2v_5B.py: size, frame_num,
# sample_fps, sample_guide_scale as (low-noise, high-noise))
_MODELS = {
    "flux": _Model("FLUX.1", "flux", 1024, 1024, 3.5),
    "hunyuan-video": _Model("HunyuanVideo", "hunyuan_video", 720, 1280, 6.0, num_frames=129, fps=24,
                            pipeline="HunyuanVideoPipeline"),
    "wan": _Model("Wan 2.1", "wan", 480, 832, 5.0, num_frames=81, fps=16, pipeline="WanPipeline", wan_variant="t2v"),
    "wan2.2-t2v-a14b": _Model("Wan 2.2 T2V-A14B", "wan", 720, 1280, 4.0, num_frames=81, fps=16,
                              pipeline="WanA14BPipeline", wan_variant="t2v-a14b", guidance_2=3.0),
    "wan2.2-i2v-a14b": _Model("Wan 2.2 I2V-A14B", "wan", 720, 1280, 3.5, num_frames=81, fps=16,
                              pipeline="WanA14BPipeline", wan_variant="i2v-a14b", guidance_2=3.5),
    "wan2.2-ti2v-5b": _Model("Wan 2.2 TI2V-5B", "wan", 704, 1280, 5.0, num_frames=121, fps=24,
                             pipeline="WanPipeline", wan_variant="ti2v-5b"),
}
_WAN_MODELS = " / ".join(name for name, m in _MODELS.items() if m.wan)
# --image: required by the image-to-video models, optional for TI2V-5B (text- or image-to-video)
_IMAGE_REQUIRED, _IMAGE_OPTIONAL = ("i2v-a14b",), ("ti2v-5b",)
_IMAGE_SUFFIXES = (".png", ".npy")
_VIDEO_SUFFIXES = (".mp4", ".gif", ".webp", ".npy")
_TEMPORAL = 4  # the video VAEs' temporal factor (HunyuanVideo, Wan 2.1 and 2.2): 4k + 1 frames


class UsageError(Exception):
    """Bad input found after parsing (files, contents): exit code 1."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Elapsed:
    """Progress of one long call: ``label ...`` on stderr; on a terminal the line then counts the elapsed seconds
    (a daemon thread rewrites it every second) until ``stop``, which clears it and returns the seconds."""

    def __init__(self, label: str):
        self.label = label
        self._done = threading.Event()
        self._thread = None
        self._t0 = time.perf_counter()
        if sys.stderr.isatty():
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        else:
            _log(f"{label} ...")

    def _tick(self) -> None:
        while True:
            sys.stderr.write(f"\r{self.label} ... {time.perf_counter() - self._t0:.0f} s")
            sys.stderr.flush()
            if self._done.wait(1.0):
                return

    def stop(self) -> float:
        seconds = time.perf_counter() - self._t0
        if self._thread is not None and not self._done.is_set():
            self._done.set()
            self._thread.join()
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        self._done.set()
        return seconds


# ----------------------------------------------------------------------------------------------
# Arguments


def _version() -> str:
    """The installed package's version (the source tree's when it is not installed)."""
    try:
        return importlib.metadata.version("chipmunk-jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written; ``(default: ...)`` after each option that has a default (not None / False:
    those options say their per-model defaults themselves)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _per_model(field: str) -> str:
    return ", ".join(f"{getattr(m, field)} {name}" for name, m in _MODELS.items() if getattr(m, field) is not None)


def _model_name(text: str) -> str:
    return text.replace("_", "-")  # hunyuan_video (the preset's and convert's spelling) = hunyuan-video


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chipmunk-jax", description="Chipmunk (JAX/Pallas) sampling tools")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    # parsed by the converter itself (main hands it the rest of the command line)
    commands.add_parser("convert", help="a PyTorch checkpoint -> Flax params folder (chipmunk-jax convert --help)",
                        add_help=False)
    gen = commands.add_parser("generate", help="sample one image (FLUX) or video (HunyuanVideo, Wan 2.1 / 2.2)",
                              description=__doc__.split("\n\n")[1], formatter_class=_HelpFormatter)
    gen.add_argument("--model", choices=tuple(_MODELS), default="flux", type=_model_name, help="the transformer")
    weights = gen.add_mutually_exclusive_group(required=True)
    weights.add_argument("--weights", metavar="DIR",
                         help="converted params folder (params.safetensors + config.json), or for flux an orbax "
                              "checkpoint of a chipmunk_jax.nnx module's state (its config: a config.json in it, "
                              "--pipeline's transformer/, or FLUX.1-dev / schnell by shape)")
    weights.add_argument("--diffusers", metavar="DIR",
                         help="diffusers pipeline folder (video models: its transformer/ may hold converted params), "
                              "or for flux a diffusers transformer folder")
    gen.add_argument("--pipeline", metavar="DIR",
                     help="diffusers pipeline folder for the VAE / text encoders when the transformer comes from "
                          "--weights (or --diffusers TRANSFORMER_DIR)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-embeds", metavar="FILE.npz",
                        help="flux only: prompt_embeds + pooled_prompt_embeds, precomputed (offline use)")
    prompt.add_argument("--prompt", metavar="TEXT", help="text, encoded with the pipeline's text encoders")
    gen.add_argument("--negative-prompt", metavar="TEXT",
                     help="wan models only: the unconditional text of classifier-free guidance (default: '')")
    gen.add_argument("--image", metavar="PATH",
                     help="wan2.2-i2v-a14b (required) and wan2.2-ti2v-5b: the first frame of an image-to-video "
                          "generation (an image file, resized to --height x --width)")
    gen.add_argument("--height", type=int, default=None,
                     help=f"height in pixels, a multiple of 16 (default: {_per_model('height')})")
    gen.add_argument("--width", type=int, default=None,
                     help=f"width in pixels, a multiple of 16 (default: {_per_model('width')})")
    gen.add_argument("--num-frames", type=int, default=None,
                     help=f"video models: frames, 4k + 1 (default: {_per_model('num_frames')})")
    gen.add_argument("--fps", type=float, default=None,
                     help=f"video models: frames per second of the video file (default: {_per_model('fps')})")
    gen.add_argument("--steps", type=int, default=50, help="sampling steps")
    gen.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    gen.add_argument("--guidance", type=float, default=None,
                     help="flux (guidance-distilled FLUX.1-dev) and hunyuan-video: the embedded guidance scale; wan "
                          "models: the classifier-free guidance scale (A14B: of the high-noise expert), <= 1 for none "
                          f"(default: {_per_model('guidance')})")
    gen.add_argument("--guidance-2", type=float, default=None,
                     help="wan2.2 A14B models: the low-noise expert's classifier-free guidance scale (default: "
                          f"{_per_model('guidance_2')})")
    gen.add_argument("--offload-idle-expert", action="store_true",
                     help="wan2.2 A14B models: keep both experts in pinned host memory and move each to the GPU for "
                          "its own steps (one expert on the GPU instead of two; the sampler runs as two jits)")
    sparsity = gen.add_mutually_exclusive_group()
    sparsity.add_argument("--chipmunk", default=None, metavar="PRESET|FILE",
                          help="Chipmunk preset name or a .yaml/.json config (default: the model's preset: "
                               f"{', '.join(dict.fromkeys(m.preset for m in _MODELS.values()))})")
    sparsity.add_argument("--dense", action="store_true", help="no Chipmunk: the dense model")
    gen.add_argument("--step-cache", action="store_true",
                     help="skip the config's skip_step_schedule steps (re-run only the final layer)")
    gen.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                     help="compute dtype of the transformer")
    gen.add_argument("--static-step-dispatch", action="store_true",
                     help="one switch per step over the schedule's kinds (see sampling.make_sampler)")
    gen.add_argument("--compile-cache", default=default_compile_cache_dir(), metavar="DIR|none",
                     help="JAX persistent compilation cache folder: a second run with the same shapes loads the "
                          "compiled sampler from it; 'none': no cache of ours")
    gen.add_argument("--mesh", default="auto", metavar="sequence=P[,cfg=1]|none|auto",
                     help="flux: devices to run on: the sampler sequence-parallel over P GPUs; 'auto' uses every local "
                          "GPU when there are several (the most of them the size splits over), 'none' one device. "
                          "Video models run on one device ('auto' / 'none')")
    gen.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    gen.add_argument("--out", required=True,
                     help="flux: out.png (needs a pipeline VAE) or out.npy (latents); video models: out.mp4 (else an "
                          "animated .gif beside it when imageio-ffmpeg is missing), out.gif, out.webp or out.npy "
                          "(latents)")
    return parser


def _check_generate_args(parser, args) -> None:
    """Argument-level checks (exit code 2, argparse's usage message); fills in the model's defaults."""
    model = _MODELS[args.model]
    name = f"--model {args.model}"
    for flag, given, which, fits in (
            ("--negative-prompt", args.negative_prompt is not None, f"--model {_WAN_MODELS}", model.wan),
            ("--guidance-2", args.guidance_2 is not None, "the two-expert --model wan2.2-t2v-a14b / wan2.2-i2v-a14b",
             model.experts),
            ("--offload-idle-expert", args.offload_idle_expert,
             "the two-expert --model wan2.2-t2v-a14b / wan2.2-i2v-a14b", model.experts),
            ("--image", args.image is not None, "--model wan2.2-i2v-a14b / wan2.2-ti2v-5b (image-to-video)",
             model.wan_variant in _IMAGE_REQUIRED + _IMAGE_OPTIONAL)):
        if given and not fits:
            parser.error(f"{flag} is for {which}, not {name}")
    if model.wan_variant in _IMAGE_REQUIRED and args.image is None:
        parser.error(f"{name} needs --image PATH (the first frame of the video)")
    if model.experts and (args.weights is not None or args.pipeline is not None):
        parser.error(f"{name} takes its two experts from the pipeline folder: --diffusers PIPELINE_DIR (its "
                     "transformer/ and transformer_2/ may hold converted params), without --weights / --pipeline")
    if not model.video:
        for flag, value in (("--num-frames", args.num_frames), ("--fps", args.fps)):
            if value is not None:
                parser.error(f"{flag} is for the video models (--model hunyuan-video / {_WAN_MODELS}), not {name}")
    else:
        if args.prompt_embeds is not None:
            parser.error(f"--prompt-embeds is for --model flux (precomputed T5 + CLIP embeddings); {name} encodes "
                         "--prompt TEXT with the pipeline folder's text encoders")
        if args.weights is not None and args.pipeline is None:
            parser.error(f"{name} needs its diffusers pipeline folder (text encoders, VAE, scheduler): "
                         "--diffusers PIPELINE_DIR, or --pipeline PIPELINE_DIR beside --weights")
        if args.dense and args.step_cache:
            parser.error(f"--step-cache with --dense runs for --model flux only; {name} caches steps with a "
                         "Chipmunk config (--chipmunk)")
        if args.num_frames is not None and (args.num_frames < 1 or (args.num_frames - 1) % _TEMPORAL):
            parser.error(f"--num-frames must be {_TEMPORAL}k + 1 (1, 5, 9, ..., the VAE's temporal factor is "
                         f"{_TEMPORAL}), got {args.num_frames}")
        if args.fps is not None and not args.fps > 0:
            parser.error(f"--fps must be > 0, got {args.fps}")
        args.num_frames = model.num_frames if args.num_frames is None else args.num_frames
        args.fps = model.fps if args.fps is None else args.fps
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and (value < 16 or value % 16):
            parser.error(f"--{flag} must be a positive multiple of 16 (VAE factor 8 x 2x2 packing), got {value}")
    args.height = model.height if args.height is None else args.height
    args.width = model.width if args.width is None else args.width
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.guidance is not None and not args.guidance >= 0:
        parser.error(f"--guidance must be >= 0, got {args.guidance}")
    if args.guidance_2 is not None and not args.guidance_2 >= 0:
        parser.error(f"--guidance-2 must be >= 0, got {args.guidance_2}")
    if model.video:
        args.guidance = model.guidance if args.guidance is None else args.guidance
        for flag, given in (("--negative-prompt", args.negative_prompt is not None),
                            ("--guidance-2", args.guidance_2 is not None)):
            if given and not args.guidance > 1:
                parser.error(f"{flag} needs classifier-free guidance: --guidance must be > 1, got {args.guidance}")
        if model.experts and args.guidance_2 is None and args.guidance > 1:
            args.guidance_2 = model.guidance_2
    suffixes = _VIDEO_SUFFIXES if model.video else _IMAGE_SUFFIXES
    if not args.out.lower().endswith(suffixes):
        what = "a video" if model.video else "an image"
        parser.error(f"--out must end in {', '.join(suffixes[:-1])} or {suffixes[-1]} ({name} makes {what}), "
                     f"got {args.out!r}")
    if args.step_cache and args.steps < 2:
        parser.error("--step-cache needs --steps >= 2")
    try:
        args.mesh_axes = _parse_mesh(args.mesh)
    except ValueError as e:
        parser.error(f"--mesh: {e}")
    if model.video and args.mesh_axes not in (None, "auto"):
        parser.error(f"--mesh {args.mesh}: sequence parallel runs for --model flux only for now; {name} runs on one "
                     "device (--mesh auto or none)")


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


_WEIGHTS_FORMS = ("a converted params folder (params.safetensors + config.json, from chipmunk-jax convert) or an "
                  "orbax checkpoint of an NNX module's state (ocp.StandardCheckpointer().save(path, nnx.state(model)), "
                  "README 'Flax NNX modules')")


def _folder_listing(path: str) -> str:
    names = sorted(os.listdir(path))
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"


def _load_orbax(path: str, args, dtype):
    """(config, params) of an orbax checkpoint of a ``chipmunk_jax.nnx.FluxTransformer2DModel`` state. The checkpoint
    holds no config: the first of a config.json in the checkpoint folder, the --pipeline folder's transformer/
    config.json, FLUX.1-dev and FLUX.1-schnell whose param shapes match it."""
    from chipmunk_jax.nnx import FluxTransformer2DModel  # local: flax / orbax only when an orbax checkpoint is read

    candidates = []
    for where, config_path in (("its config.json", os.path.join(path, "config.json")),
                               ("--pipeline's transformer/config.json",
                                None if args.pipeline is None else os.path.join(args.pipeline, "transformer",
                                                                                 "config.json"))):
        if config_path is not None and os.path.isfile(config_path):
            try:
                candidates.append((where, port_common.read_config_file(config_path, flux.FluxConfig)))
            except (ValueError, TypeError, KeyError, OSError) as e:
                raise UsageError(f"--weights {path!r}: {where} ({config_path}) is not a FLUX config: {e}") from None
    candidates += [("FLUX.1-dev", flux.FluxConfig.dev()), ("FLUX.1-schnell", flux.FluxConfig.schnell())]
    mismatches = []
    for where, config in candidates:
        try:  # paths and shapes are checked against the config before any array is read
            model = FluxTransformer2DModel.from_orbax(path, config, dtype=dtype)
        except ValueError as e:
            if "params do not match" not in str(e):
                raise UsageError(f"--weights {path!r}: {e}") from None
            problems = str(e).split(f"of {FluxTransformer2DModel.__name__}: ", 1)[-1]
            mismatches.append(f"{where}: {problems[:240]}{' ...' if len(problems) > 240 else ''}")
            continue
        _log(f"orbax checkpoint of an NNX module's state, config from {where}")
        return config, model.params_tree()
    raise UsageError(f"--weights {path!r}: an orbax checkpoint whose params match none of the FLUX configs tried (an "
                     "orbax checkpoint holds no config: put the model's diffusers config.json in the checkpoint "
                     "folder or pass its pipeline as --pipeline); " + " | ".join(mismatches))


def _load_model(args, dtype):
    from chipmunk_jax.nnx import is_orbax_checkpoint  # local: flax only when it is needed

    path = args.weights if args.weights is not None else args.diffusers
    flag = "--weights" if args.weights is not None else "--diffusers"
    if not os.path.exists(path):
        raise UsageError(f"{flag}: no such folder {path!r}")
    if args.weights is not None:
        if is_orbax_checkpoint(path):
            return _load_orbax(path, args, dtype)
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, port_common.PARAMS_FILE)):
            what = f"it holds {_folder_listing(path)}" if os.path.isdir(path) else "it is a file"
            raise UsageError(f"--weights {path!r} is neither {_WEIGHTS_FORMS}: {what}")
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
        args.chipmunk = _MODELS[args.model].preset  # the model's own preset
    if _MODELS[args.model].video:
        return generate_video(args, t_start)
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
    loading = _Elapsed(f"loading the transformer from {args.weights if args.weights is not None else args.diffusers}")
    try:
        config, params = _load_model(args, dtype)
    finally:
        loading.stop()
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
         f"{' + step caching' if args.step_cache else ''}, {args.dtype}, "
         f"loaded in {time.perf_counter() - t_start:.1f} s")

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

    compiling = _Elapsed("compiling the sampling loop")
    try:
        with watch_compile_cache() as cache_events:
            compiled = run.lower(params, latents, cond, cache, step_cache, sample_key).compile()
    finally:
        seconds = compiling.stop()
    _log(f"sampling loop compiled in {seconds:.1f} s (persistent cache: {_cache_words(cache_dir, cache_events)})")
    _log(f"sampling {args.steps} steps ...")
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
        decoding = _Elapsed("decoding with the VAE")
        image = _decode(vae, image_latents)
        _log(f"decoded in {decoding.stop():.1f} s")
        _write_png(args.out, image)
    print(f"wrote {args.out}")
    return 0


def _cache_words(cache_dir, events) -> str:
    """'off', or the persistent cache's folder and what it did (hit / written)."""
    cache_dir = cache_dir if cache_dir is not None else jax.config.jax_compilation_cache_dir  # none: JAX's own
    return "off" if cache_dir is None else f"{cache_dir}, {events.describe()}"


# ----------------------------------------------------------------------------------------------
# generate: video models (through chipmunk_jax.pipelines)


class _PipelineProgress(logging.Handler):
    """Prints the pipeline's sampler events (``chipmunk_jax.pipelines`` logger; pipelines/common.py): the compile
    with its elapsed seconds and what the persistent cache did (only the sampler's compile is watched), the sampling
    start (kept in ``sampling_start`` for the per-step times) and the hand-over to the VAE."""

    def __init__(self, cache_dir, decodes: bool):
        super().__init__(logging.INFO)
        self.cache_dir, self.decodes = cache_dir, decodes
        self.sampling_start = None
        self._compiling = self._watch = self._events = None

    def emit(self, record) -> None:
        event = getattr(record, "event", None)
        if event == "compile":
            self._watch = watch_compile_cache()
            self._events = self._watch.__enter__()
            self._compiling = _Elapsed("compiling the sampling loop")
        elif event == "compiled":
            self._stop_compile()
            _log(f"sampling loop compiled in {record.seconds:.1f} s (persistent cache: "
                 f"{_cache_words(self.cache_dir, self._events)})")
        elif event == "sampling":
            _log(f"sampling {record.steps} steps ...")
            self.sampling_start = time.perf_counter()
        elif event == "sampled" and self.decodes:
            _log("decoding with the VAE ...")

    def _stop_compile(self) -> None:
        if self._compiling is not None:
            self._compiling.stop()
            self._watch.__exit__(None, None, None)
            self._compiling = None

    def close(self) -> None:
        self._stop_compile()
        super().close()


def _quiet_torch_libraries() -> None:
    """diffusers' / transformers' loading bars and advice off (our own progress lines say what happens); their
    errors still print."""
    try:  # local: optional dependencies
        import diffusers
        import transformers
    except ImportError:
        return  # the pipeline says what is missing
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def _check_wan_folder(model: _Model, folder: str, flag: str) -> None:
    """A Wan pipeline folder of another Wan model than --model names: which --model runs it."""
    from chipmunk_jax.pipelines import wan as wan_pipelines  # local: the application layer above the models

    try:
        variant = wan_pipelines.folder_variant(folder)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UsageError(f"{flag} {folder!r}: {e}") from None
    if variant != model.wan_variant:
        name, other = next((n, m) for n, m in _MODELS.items() if m.wan_variant == variant)
        raise UsageError(f"{flag} {folder!r} is a {other.title} pipeline folder, not {model.title}: run it with "
                         f"--model {name}")


def _load_image(path: str):
    """The --image file as an RGB PIL image, turned upright by its EXIF orientation (diffusers' ``load_image``)."""
    from PIL import Image, ImageOps  # local: optional dependency (the pipelines extra)

    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError) as e:  # missing file, not an image (PIL.UnidentifiedImageError is an OSError)
        raise UsageError(f"--image {path!r}: {e}") from None


def generate_video(args, t_start: float) -> int:
    """--model hunyuan-video / wan*: ``chipmunk_jax.pipelines`` from the pipeline folder, one video, written."""
    from chipmunk_jax import pipelines  # local: the application layer above the models

    model = _MODELS[args.model]
    model_chipmunk, _ = _chipmunk_config(args)
    try:  # before JAX compiles anything
        cache_dir = enable_compile_cache(args.compile_cache)
    except ValueError as e:
        raise UsageError(f"--compile-cache: {e}") from None
    if args.pipeline is not None:
        folder, flag, transformer = args.pipeline, "--pipeline", args.weights or args.diffusers
        from chipmunk_jax.nnx import is_orbax_checkpoint  # local: flax only when it is needed

        if args.weights is not None and is_orbax_checkpoint(args.weights):
            raise UsageError(f"--weights {args.weights!r} is an orbax checkpoint: read for --model flux only so far; "
                             f"for {model.title} pass a converted params folder or a diffusers transformer folder")
    else:
        folder, flag, transformer = args.diffusers, "--diffusers", None
    if model.wan:
        _check_wan_folder(model, folder, flag)
    image = None if args.image is None else _load_image(args.image)
    load = dict(transformer=transformer)
    if model.experts:
        load = dict(offload_idle_expert=args.offload_idle_expert)
    _quiet_torch_libraries()
    loading = _Elapsed(f"loading the {model.title} pipeline from {folder}")
    try:
        pipe = getattr(pipelines, model.pipeline).from_pretrained(
            folder, chipmunk=model_chipmunk, dtype=jnp.dtype(args.dtype),
            static_step_dispatch=args.static_step_dispatch, **load)
    except ImportError as e:
        raise UsageError(str(e)) from None
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        raise UsageError(f"{flag} {folder!r}: {e}") from None
    finally:
        loaded_s = loading.stop()
    if args.model == "hunyuan-video":
        pipe.vae.enable_tiling()  # diffusers' advice: 720p x 129 frames does not fit the GPU untiled
    size = f"{args.num_frames} frames x {args.height}x{args.width}"
    first = "" if image is None else f" from the first frame {args.image} ({image.width}x{image.height})"
    experts = ""
    if model.experts:
        experts = (f", two experts switched at boundary_ratio {pipe.boundary_ratio:g}"
                   f"{', the idle one in host memory' if args.offload_idle_expert else ''}")
    _log(f"{model.title}, {size}{first}, {args.steps} steps, "
         f"{'dense' if model_chipmunk is None else 'Chipmunk ' + args.chipmunk}"
         f"{' + step caching' if args.step_cache else ''}, {args.dtype}{experts}, loaded in {loaded_s:.1f} s "
         f"(transformer: {pipe.weights_from}; torch text encoders and VAE on {pipe.torch_device})")

    latent_out = args.out.lower().endswith(".npy")
    call = dict(height=args.height, width=args.width, num_frames=args.num_frames, num_inference_steps=args.steps,
                guidance_scale=args.guidance, seed=args.seed, output_type="latent" if latent_out else "np",
                progress=not args.no_progress)
    if args.negative_prompt is not None:
        call["negative_prompt"] = args.negative_prompt
    if args.guidance_2 is not None:
        call["guidance_scale_2"] = args.guidance_2
    if image is not None:
        call["image"] = image
    step_ends: dict[int, float] = {}
    pipe.on_step = lambda s: step_ends.__setitem__(s, time.perf_counter())
    progress = _PipelineProgress(cache_dir, decodes=not latent_out)
    logger = logging.getLogger("chipmunk_jax.pipelines")
    level = logger.level
    logger.addHandler(progress)
    logger.setLevel(logging.INFO)
    _log("encoding the prompt ...")
    try:
        out = pipe(args.prompt, **call)
    except FloatingPointError as e:
        raise UsageError(str(e)) from None
    except (ValueError, TypeError) as e:
        raise UsageError(f"{size} with --chipmunk {args.chipmunk if model_chipmunk is not None else '(dense)'}: "
                         f"{e}") from None
    finally:
        logger.removeHandler(progress)
        logger.setLevel(level)
        progress.close()
    done = step_ends[args.steps - 1]

    kinds = _step_kinds(*pipe.step_configs(args.steps), args.steps)  # A14B: refreshed at the expert switch
    starts = [progress.sampling_start] + [step_ends[s] for s in range(args.steps - 1)]
    ends = [step_ends[s] for s in range(args.steps)]
    print(_timing_report(kinds, starts, ends))
    cfg = " (2 transformer calls per step: classifier-free guidance)" if model.wan and args.guidance > 1 else ""
    print(f"total sampling wall time {done - progress.sampling_start:.2f} s (compile excluded){cfg}")
    print("pipeline timings: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in out.timings.items()))

    frames = out.frames[0]
    writing = _Elapsed(f"writing {args.out}")
    if latent_out:
        np.save(args.out, np.asarray(frames, np.float32)[None])
        path, what = args.out, f"latents {tuple(np.shape(frames[None]))}"
    else:
        try:
            path = pipelines.write_video(args.out, frames, fps=args.fps)
        except (ValueError, OSError) as e:
            raise UsageError(f"--out {args.out!r}: {e}") from None
        what = f"{frames.shape[0]} frames of {frames.shape[1]}x{frames.shape[2]}, {args.fps:g} fps"
    _log(f"written in {writing.stop():.1f} s")
    print(f"wrote {path} ({what})")
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
