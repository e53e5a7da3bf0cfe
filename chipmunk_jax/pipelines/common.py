"""What the three pipelines share: the folder layout check, the transformer weights (converted once, cached on disk),
the Chipmunk config, the torch components, the scheduler's sigmas, argument checks, the compiled sampler and the
typed outputs.

Weights cache: a diffusers (or original single-file) transformer checkpoint is converted to our params once and
saved with the ports' own ``save_params`` (params.safetensors, then config.json, each written atomically) under
``<cache_dir>/<key>``, where ``cache_dir`` defaults to :func:`default_weights_cache_dir`
(``$XDG_CACHE_HOME/chipmunk-jax/weights``) and ``key`` hashes the model, the checkpoint's real path and the name,
size and mtime of every file in its folder: editing or replacing the checkpoint gives a new key, so a stale
conversion is never read. The next ``from_pretrained`` of the same checkpoint loads the cached params
(``load_params``, names and shapes checked) instead of converting again. Old entries are never deleted by us:
remove the folder to reclaim the space. A folder converted by ``chipmunk-jax convert`` is read as it is (nothing
cached).

Progress: the pipelines log to the ``chipmunk_jax.pipelines`` logger at INFO level (silent unless configured), one
record per sampler event with an ``event`` attribute: "compile" (a sampler is being compiled), "compiled" (with
``seconds``), "sampling" (with ``steps``) and "sampled" (with ``seconds``). ``Pipeline.on_step`` (None or a callable
taking the step index) runs on the host after each sampling step (the CLI's per-step times; it syncs every step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import config as C
from chipmunk_jax import memory, sampling
from chipmunk_jax.ports import common as port_common
from chipmunk_jax.ports.safetensors_io import atomic_write
from chipmunk_jax.validation import check_int, check_number, positive_int

__all__ = [
    "ImagePipelineOutput",
    "VideoPipelineOutput",
    "SamplerLoop",
    "default_weights_cache_dir",
    "weights_cache_key",
    "load_transformer",
    "resolve_chipmunk",
    "scheduler_sigmas",
    "Pipeline",
]

logger = logging.getLogger("chipmunk_jax.pipelines")

# Bump when the cached layout changes, so old entries are not read.
WEIGHTS_CACHE_FORMAT = 1
SOURCE_FILE = "source.json"

# diffusers pipeline class -> ours (for the "wrong pipeline" error)
_OUR_CLASS = {"FluxPipeline": "FluxPipeline", "WanPipeline": "WanPipeline",
              "WanImageToVideoPipeline": "WanA14BPipeline", "HunyuanVideoPipeline": "HunyuanVideoPipeline"}


@dataclasses.dataclass(frozen=True)
class ImagePipelineOutput:
    """``images``: one entry per prompt: a ``PIL.Image.Image`` (output_type "pil"), a uint8 [H, W, 3] array ("np";
    diffusers' "np" is float in [0, 1]) or the final VAE latents [C, H/8, W/8] float32 ("latent": before the
    scaling / shift undo). ``timings``: seconds spent encoding prompts, compiling the sampler (0 when a compiled
    one was reused), sampling and decoding, summed over the prompts. Each part's time ends once its device work is
    done: the encoders' and the VAE's outputs come back as numpy through blocking device-to-host copies, and the
    sampler's latents through ``jax.block_until_ready``. The host work between the parts (initial noise, the
    transformer's conditioning, the Chipmunk caches) is in none of them (their device work, queued ahead of the
    sampler, is waited for in ``sampling``)."""

    images: list
    timings: dict[str, float]


@dataclasses.dataclass(frozen=True)
class VideoPipelineOutput:
    """``frames``: one entry per prompt: a uint8 [F, H, W, 3] array ("np", the default; diffusers' is float in
    [0, 1]), a list of F ``PIL.Image.Image`` ("pil") or the final VAE latents [C, F', H/8, W/8] float32 ("latent").
    ``timings``: as ``ImagePipelineOutput``'s, with ``encode_image`` when an image conditions the video (its VAE
    encoding, once per call)."""

    frames: list
    timings: dict[str, float]


@dataclasses.dataclass(frozen=True)
class SamplerLoop:
    """One jitted sampling loop of a generation (``Pipeline._sample_loops``): ``make_denoiser()`` builds its
    ``sampling.Denoiser``, ``static`` names it among the compiled samplers, ``params`` are its params (on the device,
    or in pinned host memory: then moved to the device for this loop only), ``guidance_scale`` and ``steps`` (a
    (start, stop) range; None: all steps) as ``sampling.make_sampler``'s."""

    static: Any
    make_denoiser: Callable
    params: Any
    guidance_scale: Any = None
    steps: tuple[int, int] | None = None


# ----------------------------------------------------------------------------------------------
# Optional dependencies


def import_torch_stack():
    """(torch, diffusers): the pipelines' optional dependencies, with one clear error when one is missing."""
    try:  # local: optional dependencies
        import diffusers
        import torch
        import transformers  # noqa: F401  (diffusers imports the text encoders' classes lazily)
    except ImportError as e:
        raise ImportError(f"chipmunk_jax.pipelines needs torch, diffusers and transformers ({e}); install them with "
                          "pip install -c constraints.txt -e '.[pipelines]'") from None
    return torch, diffusers


def torch_placement(torch_device, torch_dtype):
    """(torch.device, torch.dtype) of the text encoders and the VAE: the GPU when torch sees one, else the CPU;
    bfloat16 on a GPU, float32 on the CPU, unless given (a torch.dtype or its name, e.g. "float16")."""
    torch, _ = import_torch_stack()
    if torch_device is None:
        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(torch_device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"torch_device: {e}") from None
    if torch_dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(torch_dtype, str):
        dtype = getattr(torch, torch_dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"torch_dtype: unknown torch dtype {torch_dtype!r} (e.g. 'float32', 'bfloat16')")
    elif isinstance(torch_dtype, torch.dtype):
        dtype = torch_dtype
    else:
        raise TypeError(f"torch_dtype must be a torch.dtype, its name or None, got {type(torch_dtype).__name__}")
    return device, dtype


# ----------------------------------------------------------------------------------------------
# Folders


def _layout_hint(path: str) -> str:
    """Why ``path`` is not a diffusers pipeline folder, and what to pass instead."""
    names = sorted(os.listdir(path))
    if port_common.PARAMS_FILE in names:
        return (f"{path!r} is a converted chipmunk-jax transformer folder ({port_common.PARAMS_FILE}), not a pipeline: "
                "pass the diffusers pipeline folder (model_index.json, text encoders, vae/) as the path and this "
                "folder as transformer=")
    if "config.json" in names:
        try:
            with open(os.path.join(path, "config.json")) as f:
                cls = json.load(f).get("_class_name")
        except (OSError, ValueError, AttributeError):
            cls = None
        what = f"a diffusers {cls} model folder" if cls else "a model folder (config.json)"
        return (f"{path!r} is {what}, not a pipeline folder (no model_index.json): pass the diffusers pipeline folder "
                "as the path (and a transformer checkpoint as transformer= if it lives elsewhere)")
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"
    return f"{path!r} is not a diffusers pipeline folder: no model_index.json (it holds {shown})"


def read_model_index(path, pipeline_class: str | tuple[str, ...], components: tuple[str, ...]) -> dict:
    """The ``model_index.json`` of a diffusers ``pipeline_class`` folder (or of one of several classes), after
    checking that the folder holds that pipeline and the ``components`` subfolders. Errors name the folder and what
    to pass instead."""
    path = os.fspath(path)
    classes = (pipeline_class,) if isinstance(pipeline_class, str) else tuple(pipeline_class)
    wanted = " or ".join(classes)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such pipeline folder {path!r}")
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is a file: pass a diffusers {wanted} folder (model_index.json, "
                         "text encoders, tokenizers, vae/, scheduler/)")
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(_layout_hint(path))
    try:
        with open(index) as f:
            data = json.load(f)
    except ValueError as e:
        raise ValueError(f"{index!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{index!r} must hold a JSON object, got {type(data).__name__}")
    found = data.get("_class_name")
    if found not in classes:
        ours = _OUR_CLASS.get(found)
        hint = (f": load it with chipmunk_jax.pipelines.{ours}" if ours
                else f" (supported: {', '.join(sorted(_OUR_CLASS))})")
        raise ValueError(f"{path!r} holds a diffusers {found} pipeline, not a {wanted}{hint}")
    missing = [c for c in components if not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise ValueError(f"{path!r}: the {wanted} folder lacks the subfolders {missing}")
    return data


# ----------------------------------------------------------------------------------------------
# Transformer weights and their cache


def default_weights_cache_dir() -> str:
    """``$XDG_CACHE_HOME/chipmunk-jax/weights``, or ``~/.cache/chipmunk-jax/weights`` when XDG_CACHE_HOME is unset,
    empty or relative (the XDG base directory spec ignores relative paths)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "chipmunk-jax", "weights")


def _source_files(source: str) -> list[list]:
    """[name, size, mtime_ns] of the checkpoint file, or of every file in the checkpoint folder."""
    if os.path.isdir(source):
        folder, names = source, sorted(n for n in os.listdir(source) if os.path.isfile(os.path.join(source, n)))
    else:
        folder, names = os.path.dirname(source), [os.path.basename(source)]
    entries = []
    for name in names:
        st = os.stat(os.path.join(folder, name))
        entries.append([name, st.st_size, st.st_mtime_ns])
    return entries


def weights_cache_key(model: str, source) -> str:
    """The cache entry name of a transformer checkpoint: sha256 (32 hex digits) of the model name, the checkpoint's
    real path and the name, size and mtime of each of its files."""
    real = os.path.realpath(os.fspath(source))
    blob = json.dumps({"format": WEIGHTS_CACHE_FORMAT, "model": model, "source": real, "files": _source_files(real)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load_transformer(port, model: str, source, *, cache_weights: bool = True, cache_dir=None,
                     expected_class: str | None = None):
    """(config, numpy params, where they came from) of a transformer checkpoint.

    ``source``: a converted params folder (``params.safetensors`` + ``config.json``: read as it is), a diffusers
    transformer folder or one .safetensors file (converted by ``port.from_checkpoint``). With ``cache_weights`` a
    conversion is saved under ``cache_dir`` (default :func:`default_weights_cache_dir`) and read from there next
    time (see the module docstring). ``expected_class``: the diffusers model class the folder's config.json must
    name (checked before anything is read)."""
    source = os.fspath(source)
    if not os.path.exists(source):
        raise FileNotFoundError(f"transformer: no such file or folder {source!r}")
    if os.path.isdir(source):
        if expected_class is not None:
            port_common.check_class_name(source, expected_class, "transformer")
    try:
        if os.path.isdir(source) and os.path.isfile(os.path.join(source, port_common.PARAMS_FILE)):
            config, params = port.load_params(source)
            return config, params, f"converted params {source}"
        if not cache_weights:
            config, params = port.from_checkpoint(source)
            return config, params, f"converted from {source} (not cached)"
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ValueError(f"transformer {source!r}: {e}") from None
    root = os.path.abspath(os.path.expanduser(os.fspath(cache_dir))) if cache_dir is not None \
        else default_weights_cache_dir()
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"cache_dir {root!r} exists and is not a folder")
    target = os.path.join(root, weights_cache_key(model, source))
    if os.path.isfile(os.path.join(target, port_common.CONFIG_FILE)):  # written last: the params are complete
        try:
            config, params = port.load_params(target)
            return config, params, f"cached conversion {target} (of {source})"
        except (ValueError, TypeError, KeyError, OSError):
            pass  # unreadable (e.g. written by another version): converted and written again below
    try:
        config, params = port.from_checkpoint(source)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ValueError(f"transformer {source!r}: {e}") from None
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the weights cache folder {target!r} ({e}); pass cache_dir= or "
                         "cache_weights=False") from None
    note = json.dumps({"model": model, "source": os.path.realpath(source), "files": _source_files(source)}, indent=1)
    atomic_write(os.path.join(target, SOURCE_FILE), lambda f: f.write(note), binary=False, suffix=".json")
    port.save_params(target, config, params)
    return config, params, f"converted from {source}, cached in {target}"


def to_device(params, dtype):
    """The numpy param tree as JAX arrays in the compute ``dtype``."""
    return jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), params)


# ----------------------------------------------------------------------------------------------
# Chipmunk


def resolve_chipmunk(spec, preset: str):
    """A ChipmunkConfig, or None (the dense model), from ``chipmunk=``: a preset name (``chipmunk_jax.config.PRESETS``),
    a .yaml/.json config file, a ``ChipmunkConfig`` or None."""
    if spec is None or isinstance(spec, C.ChipmunkConfig):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"chipmunk must be a preset name, a .yaml/.json path, a ChipmunkConfig or None, "
                        f"got {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec.endswith((".yaml", ".yml", ".json")):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"chipmunk: no such config file {spec!r}")
        try:
            return C.ChipmunkConfig.load(spec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"chipmunk config {spec!r}: {e}") from None
        except Exception as e:  # yaml / json syntax errors
            raise ValueError(f"chipmunk config {spec!r} is not a valid config file: {e}") from None
    if spec in C.PRESETS:
        return C.PRESETS[spec]()
    raise ValueError(f"chipmunk: unknown preset {spec!r} (presets: {', '.join(sorted(C.PRESETS))}, this model's is "
                     f"{preset!r}; or a .yaml/.json config file, a ChipmunkConfig, or None for the dense model)")


def step_configs(chipmunk, num_steps: int):
    """(the model's Chipmunk config or None, the sampler's config) for ``num_steps`` steps."""
    if chipmunk is None:  # Chipmunk off: one step plan, so static dispatch compiles the dense model once
        return None, C.ChipmunkConfig(num_steps=num_steps).replace(attention__enabled=False)
    try:
        config = chipmunk.replace(num_steps=num_steps)
    except ValueError as e:  # a schedule entry past the last step
        raise ValueError(f"the Chipmunk config with num_inference_steps={num_steps}: {e}") from None
    return config, config


# ----------------------------------------------------------------------------------------------
# Scheduler


_UNSUPPORTED_FLOW_MATCH = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                           "invert_sigmas", "stochastic_sampling")


def _is_flow_unipc(name: str, cfg: dict) -> bool:
    return (name == "UniPCMultistepScheduler" and bool(cfg.get("use_flow_sigmas"))
            and cfg.get("prediction_type") == "flow_prediction")


def scheduler_sigmas(scheduler, num_steps: int, *, image_seq_len: int | None = None, shift: float | None = None,
                     pipeline_sigmas: bool = True) -> np.ndarray:
    """The num_steps + 1 noise levels (float32, 1 -> 0) diffusers' pipeline would step through with the folder's
    ``scheduler``, for our Euler sampler.

    ``pipeline_sigmas=True`` (FLUX, HunyuanVideo: the diffusers pipeline hands its FlowMatchEulerDiscreteScheduler
    ``sigmas = linspace(1, 1/N, N)``): ``sampling.flow_sigmas`` with the scheduler's shift: FLUX's exponential
    ``mu = flux_shift(image_seq_len, ...)`` with the scheduler's base/max shift and sequence lengths when
    ``use_dynamic_shifting``, else the fixed ``shift`` (``shift=`` overrides it). Equal to diffusers' sigmas.

    ``pipeline_sigmas=False`` (Wan: diffusers' WanPipeline calls ``set_timesteps(N)`` and the scheduler picks its own
    grid, e.g. FlowMatchEuler's ``linspace(1, sigma_min, N)`` shifted, where sigma_min depends on the scheduler's
    training sigmas): the sigmas of the scheduler's own ``set_timesteps(N)`` on a copy (``shift=`` overrides its
    ``shift`` / ``flow_shift``). FlowMatchEulerDiscreteScheduler (without ``use_dynamic_shifting``) and
    UniPCMultistepScheduler with flow sigmas (the Wan 2.1 folders) are accepted; with UniPC our sampler still takes
    first-order Euler steps on its sigmas, where diffusers takes UniPC's 2nd-order multistep ones, so results differ
    from diffusers' at equal step counts.

    Other schedulers and options raise ValueError naming them.
    """
    cfg = dict(scheduler.config)
    name = type(scheduler).__name__
    if shift is not None:
        shift = check_number("shift", shift, positive=True)
    flow_match = name == "FlowMatchEulerDiscreteScheduler"
    if not flow_match and not (not pipeline_sigmas and _is_flow_unipc(name, cfg)):
        accepted = "FlowMatchEulerDiscreteScheduler" + ("" if pipeline_sigmas else
                                                        " or UniPCMultistepScheduler with use_flow_sigmas")
        raise ValueError(f"the folder's scheduler {name} is not supported here: {accepted} (flow matching) only")
    if flow_match and cfg.get("stochastic_sampling"):
        raise ValueError("the folder's FlowMatchEulerDiscreteScheduler sets stochastic_sampling: not supported")
    if not pipeline_sigmas:
        if cfg.get("use_dynamic_shifting"):
            raise ValueError(f"the folder's {name} sets use_dynamic_shifting (resolution-dependent shift): not "
                             "supported for this model")
        if shift is not None:
            cfg["flow_shift" if not flow_match else "shift"] = shift
        copy = type(scheduler).from_config(cfg)
        copy.set_timesteps(num_steps)
        sigmas = copy.sigmas.detach().float().cpu().numpy()
        if sigmas.shape != (num_steps + 1,) or not sigmas[-1] == 0 or np.any(np.diff(sigmas) >= 0):
            raise ValueError(f"the folder's {name} gives sigmas {sigmas.tolist()}: not a decreasing flow-matching "
                             f"schedule of {num_steps} steps ending at 0")
        return sigmas.astype(np.float32)
    unsupported = [k for k in _UNSUPPORTED_FLOW_MATCH if cfg.get(k)]
    if unsupported:
        raise ValueError(f"the folder's FlowMatchEulerDiscreteScheduler sets {unsupported}: not supported")
    if cfg.get("use_dynamic_shifting"):
        if shift is not None:
            raise ValueError("shift=: this scheduler shifts by resolution (use_dynamic_shifting); leave shift None")
        if cfg.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"time_shift_type={cfg.get('time_shift_type')!r} is not supported (exponential only)")
        if image_seq_len is None:
            raise ValueError("image_seq_len is required: this scheduler shifts by resolution (use_dynamic_shifting)")
        mu = sampling.flux_shift(image_seq_len, base_shift=cfg.get("base_shift", 0.5),
                                 max_shift=cfg.get("max_shift", 1.15), base_seq_len=cfg.get("base_image_seq_len", 256),
                                 max_seq_len=cfg.get("max_image_seq_len", 4096))
        return sampling.flow_sigmas(num_steps, mu=mu)
    return sampling.flow_sigmas(num_steps, shift=shift if shift is not None else float(cfg.get("shift", 1.0)))


# ----------------------------------------------------------------------------------------------
# Arguments


def check_prompts(prompt, negative_prompt) -> tuple[list[str], list[str | None]]:
    """(prompts, one negative prompt or None per prompt): a str or a non-empty list of str each."""
    def as_list(name, value):
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
            return list(value)
        raise TypeError(f"{name} must be a str or a non-empty list of str, got {value!r:.80}")

    prompts = as_list("prompt", prompt)
    if negative_prompt is None:
        return prompts, [None] * len(prompts)
    negatives = as_list("negative_prompt", negative_prompt)
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
    return prompts, negatives


def check_size(name: str, value, multiple: int) -> int:
    """A height or width in pixels: a positive multiple of ``multiple``."""
    value = positive_int(name, value)
    if value % multiple:
        raise ValueError(f"{name} must be a multiple of {multiple}, got {value}")
    return value


def check_num_frames(num_frames, temporal: int) -> int:
    """A frame count ``temporal * k + 1`` (what the video VAE decodes from k + 1 latent frames)."""
    num_frames = positive_int("num_frames", num_frames)
    if (num_frames - 1) % temporal:
        raise ValueError(f"num_frames must be {temporal}k + 1 (the VAE's temporal factor is {temporal}: 1, "
                         f"{temporal + 1}, {2 * temporal + 1}, ...), got {num_frames}")
    return num_frames


def video_request(*, height, width, num_frames, spatial: int, temporal: int, patch_hw: tuple[int, int],
                  latent_channels: int, token_grid: Callable, latents, num_prompts: int):
    """The checked size of a video call: (height, width, num_frames, latent shape [1, C, F', H', W'], token grid,
    checked ``latents`` or None). Height / width are multiples of 16 and of the VAE factor x the patch size;
    ``token_grid(shape)`` is the model's; ``latents`` (one prompt only) must have the latent shape."""
    height = check_size("height", height, int(np.lcm(16, spatial * patch_hw[0])))
    width = check_size("width", width, int(np.lcm(16, spatial * patch_hw[1])))
    num_frames = check_num_frames(num_frames, temporal)
    shape = (1, latent_channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial)
    try:
        grid = token_grid(shape)
    except ValueError as e:
        raise ValueError(f"num_frames={num_frames}: {e}") from None
    if latents is not None:
        if num_prompts > 1:
            raise ValueError("latents= is for one prompt; pass a str prompt")
        latents = check_latents(latents, shape)
    return height, width, num_frames, shape, grid, latents


def check_output_type(output_type, allowed: tuple[str, ...]) -> str:
    if output_type not in allowed:
        raise ValueError(f"output_type must be one of {allowed}, got {output_type!r}")
    return output_type


def check_latents(latents, shape: tuple[int, ...]) -> np.ndarray:
    """User-given initial noise as float32 numpy of ``shape`` (a torch tensor, numpy or JAX array)."""
    if hasattr(latents, "detach"):  # a torch tensor
        latents = latents.detach().float().cpu().numpy()
    array = np.asarray(latents, np.float32)
    if array.shape != tuple(shape):
        raise ValueError(f"latents must have shape {tuple(shape)}, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("latents hold NaN or inf")
    return array


def check_seed(seed) -> int:
    return check_int("seed", seed, minimum=0)


def to_pil_frames(video):
    """uint8 frames [F, H, W, 3] -> a list of PIL images."""
    from PIL import Image  # local: optional dependency (diffusers needs Pillow)

    return [Image.fromarray(frame) for frame in video]


def video_frames(latents, output_type: str, decode):
    """One video's entry of ``VideoPipelineOutput.frames``: its latents ("latent"), or ``decode(latents)`` as
    uint8 frames ("np") or PIL frames ("pil")."""
    if output_type == "latent":
        return latents[0]
    video = decode(latents)
    return video if output_type == "np" else to_pil_frames(video)


def to_uint8(images):
    """torch [..., 3, H, W] in [-1, 1] -> uint8 numpy [..., H, W, 3] (diffusers' postprocess + numpy_to_pil math)."""
    x = (images / 2 + 0.5).clamp(0, 1).float().cpu().numpy()
    x = np.moveaxis(x, -3, -1)
    return np.ascontiguousarray((x * 255).round().astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# The pipeline base


class Pipeline:
    """Shared state and plumbing of the three pipelines (build them with ``from_pretrained``, or with
    ``from_components`` from parts already in memory).

    Attributes: ``config`` (the transformer's model config), ``params`` (JAX arrays in ``dtype``), ``chipmunk`` (the
    Chipmunk config, None when dense), ``dtype`` (the transformer's compute dtype), ``components`` (the diffusers
    pipeline loaded without its transformer: tokenizers, text encoders, ``vae``, ``scheduler``; torch modules on
    ``torch_device``, a ``torch.device``), ``weights_from`` (where the params came from: a converted folder, the
    weights cache or a fresh conversion) and ``path``. ``on_step``: None, or a callable run on the host with the
    step index after each sampling step (it syncs every step: leave it None when timing).
    """

    on_step: Callable[[int], None] | None = None

    _MODEL: str
    _PIPELINE_CLASS: str
    _PRESET: str
    _COMPONENTS: tuple[str, ...]
    _PORT: Any
    _TRANSFORMER_CLASS: str
    # diffusers pipeline classes whose folders this pipeline reads besides ``_PIPELINE_CLASS``'s (their components
    # are loaded with the folder's own class)
    _OTHER_PIPELINE_CLASSES: tuple[str, ...] = ()

    def __init__(self, *, path, config, params, chipmunk, dtype, components, weights_from, static_step_dispatch,
                 torch_device):
        self.path = path
        self.torch_device = torch_device
        self.config = config
        self.params = params
        self.chipmunk = chipmunk
        self.dtype = dtype
        self.components = components
        self.weights_from = weights_from
        self.static_step_dispatch = bool(static_step_dispatch)
        self._compiled: dict = {}

    @property
    def vae(self):
        """The torch VAE (e.g. ``pipe.vae.enable_tiling()`` for large videos)."""
        return self.components.vae

    @property
    def scheduler(self):
        return self.components.scheduler

    @classmethod
    def from_pretrained(cls, path, *, chipmunk: Any = "default", transformer=None, dtype=jnp.bfloat16,
                        cache_weights: bool = True, cache_dir=None, torch_device=None, torch_dtype=None,
                        static_step_dispatch: bool = False):
        """A pipeline from a diffusers pipeline folder.

        ``path``: the diffusers pipeline folder (``model_index.json``; text encoders, tokenizers, ``vae/`` and
        ``scheduler/`` are loaded from it). Its ``transformer/`` may hold the diffusers checkpoint or params converted
        by ``chipmunk-jax convert``; ``transformer=`` (a converted params folder, a diffusers transformer folder or one
        .safetensors file, diffusers or original layout) takes the transformer from elsewhere instead.
        ``chipmunk``: "default" (this model's own preset: "flux", "wan" or "hunyuan_video"), a preset name, a
        .yaml/.json config file, a ``ChipmunkConfig`` or None for the dense model. ``dtype``: the transformer's
        compute (and param) dtype.
        ``cache_weights`` / ``cache_dir``: a checkpoint that needs converting is converted once and cached in
        ``cache_dir`` (default ``$XDG_CACHE_HOME/chipmunk-jax/weights``), keyed by the checkpoint's path, file sizes
        and mtimes; ``cache_weights=False`` converts in memory every time and writes nothing.
        ``torch_device`` / ``torch_dtype``: where the torch text encoders and VAE run (default: "cuda" when torch sees
        a GPU, else "cpu"; bfloat16 on a GPU, float32 on the CPU). ``static_step_dispatch``: see
        ``sampling.make_sampler`` (faster steps on GPUs, longer compile).

        Note for GPUs: JAX preallocates 75% of the GPU memory at its first use; the torch encoders and VAE need
        the rest (or set ``XLA_PYTHON_CLIENT_MEM_FRACTION`` / ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` before
        importing jax).
        """
        path = os.fspath(path)
        cls._check_index(path, read_model_index(path, cls._pipeline_classes(), cls._COMPONENTS))
        model_chipmunk = resolve_chipmunk(cls._PRESET if chipmunk == "default" else chipmunk, cls._PRESET)
        config, params, weights_from = cls._load_weights(path, transformer, "transformer", cache_weights=cache_weights,
                                                         cache_dir=cache_dir)
        return cls._assemble(path, config, params, weights_from, chipmunk=model_chipmunk, dtype=dtype,
                             torch_device=torch_device, torch_dtype=torch_dtype,
                             static_step_dispatch=static_step_dispatch)

    @classmethod
    def _load_weights(cls, path: str, transformer, subfolder: str, *, cache_weights: bool, cache_dir):
        """(config, numpy params, where they came from) of the pipeline folder's ``subfolder`` (or of ``transformer``,
        a checkpoint elsewhere), checked to be this pipeline's kind of model."""
        source = os.path.join(path, subfolder) if transformer is None else os.fspath(transformer)
        if transformer is None and not os.path.isdir(source):
            raise ValueError(f"{path!r} has no {subfolder}/ subfolder: pass {subfolder}= (a converted params folder, a "
                             "diffusers transformer folder or a .safetensors checkpoint)")
        config, params, weights_from = load_transformer(cls._PORT, cls._MODEL, source, cache_weights=cache_weights,
                                                        cache_dir=cache_dir, expected_class=cls._TRANSFORMER_CLASS)
        cls._check_config(config, source)
        return config, params, weights_from

    @classmethod
    def _assemble(cls, path: str, config, params, weights_from: str, *, chipmunk, dtype, torch_device, torch_dtype,
                  static_step_dispatch: bool, **attributes):
        """The pipeline of a folder's loaded weights: its torch components loaded, then the checks and the params
        placed (``attributes``: a subclass's own constructor arguments)."""
        device, torch_dtype = torch_placement(torch_device, torch_dtype)
        components = cls._load_components(path, device, torch_dtype)
        return cls._finish(params, path=path, config=config, chipmunk=chipmunk, dtype=jnp.dtype(dtype),
                           components=components, weights_from=weights_from, static_step_dispatch=static_step_dispatch,
                           torch_device=device, **attributes)

    @classmethod
    def _finish(cls, params, **attributes):
        pipe = cls(params=None, **attributes)
        pipe._check_components()
        pipe.params = pipe._place_params(params)
        return pipe

    @classmethod
    def from_components(cls, components, config, params, *, chipmunk: Any = "default", dtype=jnp.bfloat16,
                        static_step_dispatch: bool = False, weights_from: str = "in-memory params"):
        """A pipeline from parts already in memory: nothing is read from or written to disk (benchmarks with random
        weights, weights loaded by other means).

        ``components``: this model's diffusers pipeline built without its transformer (e.g.
        ``diffusers.FluxPipeline(scheduler=..., vae=..., text_encoder=..., tokenizer=..., text_encoder_2=...,
        tokenizer_2=..., transformer=None)``), its torch modules already on the device and in the dtype they are to
        run in: they are not moved, and ``torch_device`` is theirs. ``config``: the transformer's model config (e.g.
        ``flux.FluxConfig.dev()``); ``params``: its param tree (numpy or JAX arrays), cast to ``dtype`` (JAX arrays
        already in ``dtype`` are used as they are, not copied) and laid out for the Chipmunk config as
        ``from_pretrained`` does (FLUX: ``flux.prepare_params``, which leaves prepared params as they are, so params
        prepared once can be shared by several pipelines). ``chipmunk``, ``dtype``, ``static_step_dispatch``: as
        ``from_pretrained``'s; ``weights_from``: shown by ``repr``.
        """
        cls._check_diffusers_components(components)
        model_chipmunk = resolve_chipmunk(cls._PRESET if chipmunk == "default" else chipmunk, cls._PRESET)
        cls._check_config(config, f"<{type(config).__name__}>")
        return cls._finish(params, path=None, config=config, chipmunk=model_chipmunk, dtype=jnp.dtype(dtype),
                           components=components, weights_from=weights_from, static_step_dispatch=static_step_dispatch,
                           torch_device=components.device)

    @classmethod
    def _pipeline_classes(cls) -> tuple[str, ...]:
        """The diffusers pipeline classes whose folders (and ``from_components`` pipelines) this pipeline takes."""
        return (cls._PIPELINE_CLASS, *cls._OTHER_PIPELINE_CLASSES)

    @classmethod
    def _check_diffusers_components(cls, components) -> None:
        """``from_components``' ``components``: this model's diffusers pipeline with every component but the
        transformer."""
        _, diffusers = import_torch_stack()
        names = cls._pipeline_classes()
        if not isinstance(components, tuple(getattr(diffusers, name) for name in names)):
            raise TypeError(f"components must be a diffusers {' or '.join(names)} (built with transformer=None), "
                            f"got {type(components).__name__}")
        missing = [name for name in cls._COMPONENTS if getattr(components, name, None) is None]
        if missing:
            raise ValueError(f"components: the {type(components).__name__} lacks {missing}")

    # ---- model hooks ----------------------------------------------------------------------------

    @classmethod
    def _check_index(cls, path: str, index: dict) -> None:
        """Raises when the folder's ``model_index.json`` (``index``) describes a variant this pipeline does not run."""

    @classmethod
    def _check_config(cls, config, source) -> None:
        """Raises when the transformer is not this pipeline's kind of model."""

    def _check_components(self) -> None:
        """Raises when the VAE / text encoders do not fit the transformer."""

    def _place_params(self, params):
        """The params as the sampler takes them: JAX arrays in ``dtype`` (laid out by ``_prepare_params``)."""
        return self._prepare_params(to_device(params, self.dtype))

    def _prepare_params(self, params):
        return params

    @classmethod
    def _load_components(cls, path, device, torch_dtype):
        """The diffusers pipeline without its transformer (tokenizers, text encoders, VAE, scheduler) on ``device``,
        loaded with the folder's own pipeline class (one of ``_pipeline_classes``)."""
        _, diffusers = import_torch_stack()
        name = read_model_index(path, cls._pipeline_classes(), ())["_class_name"]
        try:
            loaded = cls._preloaded_components(path, torch_dtype)
            pipe = getattr(diffusers, name).from_pretrained(path, transformer=None, dtype=torch_dtype, **loaded)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"cannot load the {name} components of {path!r}: {e}") from None
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def _preloaded_components(cls, path, torch_dtype) -> dict:
        """Components loaded ahead with their own settings (e.g. a float32 VAE), passed to diffusers' loader."""
        return {}

    # ---- sampling -------------------------------------------------------------------------------

    def _sample(self, *, static, make_denoiser: Callable, sampler_config, sigmas, guidance_scale, progress, latents,
                cond, cache, step_cache, key, uncond=None):
        """Runs the one-jit sampler over ``self.params``; returns (final latents as float32 numpy, compile seconds,
        sampling seconds). Compiled samplers are kept per (``static``, shapes, steps, guidance, ...) and reused by
        later calls."""
        loop = SamplerLoop(static=static, make_denoiser=make_denoiser, params=self.params,
                           guidance_scale=guidance_scale)
        return self._sample_loops([loop], sampler_config=sampler_config, sigmas=sigmas, progress=progress,
                                  latents=latents, cond=cond, cache=cache, step_cache=step_cache, key=key,
                                  uncond=uncond)

    def _sample_loops(self, loops, *, sampler_config, sigmas, progress, latents, cond, cache, step_cache, key,
                      uncond=None):
        """Runs the ``SamplerLoop``s in turn, the latents, caches and step cache of one going into the next; returns
        as ``_sample``. Every loop is compiled before the first runs (the sampling time and the per-step times hold
        no compile). A loop's host-resident params are copied to the device when it starts, and that copy is freed
        (after the loop has finished) before the next loop's params come in (``memory.with_device_params``)."""
        x = jnp.asarray(latents)
        compiled, compile_s = [], 0.0
        for loop in loops:
            run, seconds = self._compiled_loop(loop, sampler_config, sigmas, progress,
                                               (x, cond, cache, step_cache, key, uncond))
            compiled.append(run)
            compile_s += seconds
        steps = int(np.size(sigmas)) - 1
        logger.info("sampling %d steps", steps, extra={"event": "sampling", "steps": steps})
        t0 = time.perf_counter()
        for loop, run in zip(loops, compiled):
            x, cache, step_cache = memory.with_device_params(
                lambda params: run(params, x, cond, cache, step_cache, key, uncond), loop.params)
        out = np.asarray(jax.block_until_ready(x), np.float32)
        sample_s = time.perf_counter() - t0
        logger.info("sampled %d steps in %.2f s", steps, sample_s, extra={"event": "sampled", "seconds": sample_s})
        if not np.all(np.isfinite(out)):
            raise FloatingPointError("sampling produced non-finite latents (NaN or inf)")
        return out, compile_s, sample_s

    def _compiled_loop(self, loop, sampler_config, sigmas, progress, args):
        """(the compiled sampler of ``loop``, compile seconds: 0 when a compiled one was reused). ``args``: the
        sampler's arguments after the params. Host-resident params are lowered as the device arrays they become."""
        params = loop.params
        if memory.on_host(params):
            params = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
        shapes = jax.tree_util.tree_map(lambda x: (tuple(jnp.shape(x)), str(jnp.result_type(x))), args)
        hooked = self.on_step is not None
        guidance = loop.guidance_scale
        entry_key = (loop.static, sampler_config, tuple(np.asarray(sigmas).tolist()), loop.steps,
                     None if guidance is None else tuple(np.asarray(guidance, np.float64).reshape(-1).tolist()),
                     bool(progress), hooked, str(jax.tree_util.tree_structure(shapes)),
                     tuple(jax.tree_util.tree_leaves(shapes)))
        compiled = self._compiled.get(entry_key)
        if compiled is not None:
            return compiled, 0.0
        run = sampling.make_sampler(loop.make_denoiser(), sampler_config, sigmas, guidance_scale=guidance,
                                    progress=progress, static_step_dispatch=self.static_step_dispatch,
                                    on_step=self._step_done if hooked else None, steps=loop.steps)
        logger.info("compiling the sampling loop", extra={"event": "compile"})
        t0 = time.perf_counter()
        compiled = run.lower(params, *args).compile()
        compile_s = time.perf_counter() - t0
        logger.info("sampling loop compiled in %.1f s", compile_s, extra={"event": "compiled", "seconds": compile_s})
        self._compiled[entry_key] = compiled
        return compiled, compile_s

    def step_configs(self, num_inference_steps: int, sigmas=None):
        """(the model's Chipmunk config, None when dense; the sampler's config) a call with ``num_inference_steps``
        steps runs (``sigmas``: its noise levels, for pipelines whose schedules depend on them)."""
        return step_configs(self.chipmunk, positive_int("num_inference_steps", num_inference_steps))

    def _step_done(self, step: int) -> None:
        """The sampler's per-step host callback: forwards to ``on_step`` (read at each call, so it can change)."""
        if self.on_step is not None:
            self.on_step(step)

    @staticmethod
    def _keys(seed: int):
        """(noise key, sampler key, Chipmunk cache key) of a seed (the CLI draws its noise the same way)."""
        key = jax.random.key(check_seed(seed))
        return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)

    def __repr__(self) -> str:
        kind = "dense" if self.chipmunk is None else "Chipmunk"
        return (f"{type(self).__name__}({self.path!r}, {kind}, dtype={self.dtype.name}, "
                f"torch on {self.torch_device}, weights: {self.weights_from})")


def add_timings(total: dict[str, float], **seconds: float) -> None:
    for name, value in seconds.items():
        total[name] = total.get(name, 0.0) + value
