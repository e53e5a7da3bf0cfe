"""Checkpoint conversion CLI.

    python -m chipmunk_jax.ports.convert --model flux|hunyuan_video|wan --src PATH --dst DIR [--config config.json]
                                         [--dtype keep|bfloat16|float32] [--overwrite]

SRC is a diffusers folder (config.json + safetensors, sharded or not; a pipeline folder with a
``transformer/`` subfolder works too) or one .safetensors file in the diffusers layout or the model's
original layout (BFL for FLUX, Tencent for HunyuanVideo, Wan-AI for Wan; a ``model.diffusion_model.``
prefix is stripped). DST receives ``params.safetensors`` (flattened Flax param names) and
``config.json``, each written atomically (config last). Pickle checkpoints (.bin, .pt, .ckpt, the
original Tencent .pt) are refused: re-save them as safetensors first.

DST must be a new or empty folder, not SRC or inside it; ``--overwrite`` lets an existing non-empty folder
have its params.safetensors and config.json replaced (atomically; its other files stay). Temp files
(``.chipmunk-tmp-<pid>-*``) are removed when the conversion fails or is interrupted (Ctrl-C, SIGTERM); the
ones a killed process (SIGKILL) left are removed by the next conversion into the same folder.
Exit codes: 0 done, 1 bad checkpoint or write error, 2 bad arguments, 130 interrupted, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import signal
import sys
import time

import ml_dtypes
import numpy as np

__all__ = ["main"]

_DTYPES = {"keep": None, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}


# --model name -> module in chipmunk_jax.ports defining
#   convert_checkpoint(src, dst, config_path, dtype) -> str (a one-line description of what was converted)
_MODELS = {"flux": "flux", "hunyuan_video": "hunyuan_video", "wan": "wan"}

# The port modules' messages name the Python keyword; from the command line the flag is the way to pass it.
_PYTHON_TO_CLI_WORDS = (("pass config=", "pass --config"),)


def _available_models() -> list[str]:
    return sorted(m for m, mod in _MODELS.items() if importlib.util.find_spec(f"chipmunk_jax.ports.{mod}"))


class _Terminated(BaseException):
    """SIGTERM during a conversion, raised (like KeyboardInterrupt, not an Exception) so the writers' cleanup runs."""


def _raise_terminated(signum, frame):
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises ``_Terminated`` inside the block (the main thread only: elsewhere Python cannot install a
    handler, and SIGTERM keeps its current action); the previous handler comes back afterwards."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _check_paths(parser: argparse.ArgumentParser, args) -> None:
    """--dst must not be --src, inside it, an existing file, or (without --overwrite) a non-empty folder."""
    from chipmunk_jax.ports.common import CONFIG_FILE, PARAMS_FILE  # local: keeps --help light
    from chipmunk_jax.ports.safetensors_io import remove_stale_temp_files

    src, dst = os.path.realpath(args.src), os.path.realpath(args.dst)
    if dst == src or dst.startswith(src.rstrip(os.sep) + os.sep):
        parser.error(f"--dst {args.dst!r} is --src {args.src!r} or inside it: write the converted params to "
                     "another folder")
    if os.path.isfile(src) and src in (os.path.join(dst, PARAMS_FILE), os.path.join(dst, CONFIG_FILE)):
        parser.error(f"--src {args.src!r} is one of the files the conversion writes into --dst {args.dst!r}: "
                     "write the converted params to another folder")
    if os.path.lexists(args.dst) and not os.path.isdir(args.dst):
        parser.error(f"--dst {args.dst!r} is an existing file, not a folder: pass a new or empty folder")
    if os.path.isdir(args.dst):
        remove_stale_temp_files(args.dst)
        entries = sorted(os.listdir(args.dst))
        if entries and not args.overwrite:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            parser.error(f"--dst {args.dst!r} exists and is not empty ({shown}): pass --overwrite to replace its "
                         f"{PARAMS_FILE} and {CONFIG_FILE}, or choose a new folder")


def _cli_words(message: str) -> str:
    for python, cli in _PYTHON_TO_CLI_WORDS:
        message = message.replace(python, cli)
    return message


def main(argv: list[str] | None = None, prog: str = "python -m chipmunk_jax.ports.convert") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, choices=_available_models())
    parser.add_argument("--src", required=True, help="diffusers folder or .safetensors file")
    parser.add_argument("--dst", required=True, help="output folder (new or empty, unless --overwrite)")
    parser.add_argument("--config", default=None, help="diffusers config.json (needed for a single "
                        "file whose sizes differ from the released model, or for HunyuanVideo I2V, whose weights "
                        "look like T2V)")
    parser.add_argument("--dtype", default="keep", choices=sorted(_DTYPES))
    parser.add_argument("--overwrite", action="store_true",
                        help="replace params.safetensors and config.json in an existing non-empty --dst")
    args = parser.parse_args(argv)
    _check_paths(parser, args)
    start = time.perf_counter()
    with _sigterm_raises():
        try:
            module = importlib.import_module(f"chipmunk_jax.ports.{_MODELS[args.model]}")
            what = module.convert_checkpoint(args.src, args.dst, args.config, _DTYPES[args.dtype])
        except (ValueError, TypeError, OSError) as e:
            print(f"error: {_cli_words(str(e))}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("error: interrupted (temp files removed)", file=sys.stderr)
            return 130
        except _Terminated:
            print("error: terminated by SIGTERM (temp files removed)", file=sys.stderr)
            return 128 + signal.SIGTERM
    print(f"converted {what} from {args.src} to {args.dst} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
