"""Checkpoint conversion CLI.

    python -m chipmunk_jax.ports.convert --model flux --src PATH --dst DIR [--config config.json]
                                         [--dtype keep|bfloat16|float32]

SRC is a diffusers folder (config.json + safetensors, sharded or not; a pipeline folder with a
``transformer/`` subfolder works too) or one .safetensors file in the diffusers or the original BFL
layout. DST receives ``params.safetensors`` (flattened Flax param names) and ``config.json``, each
written atomically (config last). Pickle checkpoints (.bin, .pt, .ckpt) are refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import ml_dtypes
import numpy as np

__all__ = ["main"]

_DTYPES = {"keep": None, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}


def _convert_flux(src: str, dst: str, config_path: str | None, dtype) -> str:
    from chipmunk_jax.models.flux import FluxConfig
    from chipmunk_jax.ports import flux as flux_ports

    config = None
    if config_path is not None:
        with open(config_path) as f:
            config = FluxConfig.from_diffusers(json.load(f))
    config, params = flux_ports.from_checkpoint(src, config, dtype=dtype)
    flux_ports.save_params(dst, config, params)
    count = sum(int(np.prod(np.shape(v))) for v in flux_ports.flatten_params(params).values())
    return f"FLUX ({'dev' if config.guidance_embeds else 'schnell'}-style, {count:,} parameters)"


_MODELS = {"flux": _convert_flux}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chipmunk_jax.ports.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(_MODELS))
    parser.add_argument("--src", required=True, help="diffusers folder or .safetensors file")
    parser.add_argument("--dst", required=True, help="output folder")
    parser.add_argument("--config", default=None, help="diffusers config.json (needed for a single file "
                        "whose sizes differ from the released FLUX.1)")
    parser.add_argument("--dtype", default="keep", choices=sorted(_DTYPES))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        what = _MODELS[args.model](args.src, args.dst, args.config, _DTYPES[args.dtype])
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {what} from {args.src} to {args.dst} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
