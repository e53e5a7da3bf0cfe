"""Checkpoint conversion CLI.

    python -m chipmunk_jax.ports.convert --model flux|hunyuan_video|wan --src PATH --dst DIR [--config config.json]
                                         [--dtype keep|bfloat16|float32]

SRC is a diffusers folder (config.json + safetensors, sharded or not; a pipeline folder with a
``transformer/`` subfolder works too) or one .safetensors file in the diffusers layout or the model's
original layout (BFL for FLUX, Tencent for HunyuanVideo, Wan-AI for Wan; a ``model.diffusion_model.``
prefix is stripped). DST receives ``params.safetensors`` (flattened Flax param names) and
``config.json``, each written atomically (config last). Pickle checkpoints (.bin, .pt, .ckpt, the
original Tencent .pt) are refused: re-save them as safetensors first.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time

import ml_dtypes
import numpy as np

__all__ = ["main"]

_DTYPES = {"keep": None, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}


# --model name -> module in chipmunk_jax.ports defining
#   convert_checkpoint(src, dst, config_path, dtype) -> str (a one-line description of what was converted)
_MODELS = {"flux": "flux", "hunyuan_video": "hunyuan_video", "wan": "wan"}


def _available_models() -> list[str]:
    return sorted(m for m, mod in _MODELS.items() if importlib.util.find_spec(f"chipmunk_jax.ports.{mod}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chipmunk_jax.ports.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, choices=_available_models())
    parser.add_argument("--src", required=True, help="diffusers folder or .safetensors file")
    parser.add_argument("--dst", required=True, help="output folder")
    parser.add_argument("--config", default=None, help="diffusers config.json (needed for a single "
                        "file whose sizes differ from the released model, or for HunyuanVideo I2V, whose weights "
                        "look like T2V)")
    parser.add_argument("--dtype", default="keep", choices=sorted(_DTYPES))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"chipmunk_jax.ports.{_MODELS[args.model]}")
        what = module.convert_checkpoint(args.src, args.dst, args.config, _DTYPES[args.dtype])
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {what} from {args.src} to {args.dst} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
