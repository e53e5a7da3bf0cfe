"""Writing generated frames to a file: ``write_video(path, frames, fps)``.

* ``.mp4``: H.264 (libx264, yuv420p) through imageio + imageio-ffmpeg (the ``pipelines`` extra; imageio-ffmpeg's wheel
  ships the ffmpeg binary). When either is missing, the frames go to an animated GIF beside it instead
  (``name.gif``, through Pillow) with a warning, and the returned path says so.
* ``.gif`` / ``.webp``: animated GIF (256-colour palette per frame) / lossless animated WebP through Pillow.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from chipmunk_jax.validation import check_number

__all__ = ["write_video"]

_SUFFIXES = (".mp4", ".gif", ".webp")


def _as_uint8_frames(frames) -> np.ndarray:
    """[F, H, W, 3] uint8 (uint8 as is; floats in [0, 1] scaled, as diffusers' ``export_to_video``; a list of PIL
    images or arrays stacked)."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("frames is empty")
        frames = np.stack([np.asarray(f) for f in frames])
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or min(array.shape) == 0:
        raise ValueError(f"frames must be [F, H, W, 3] (RGB), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
            raise ValueError("float frames must lie in [0, 1]")
        return (array * 255).round().astype(np.uint8)
    raise ValueError(f"frames must be uint8 or float in [0, 1], got {array.dtype}")


def write_video(path, frames, fps: float = 16) -> str:
    """Writes ``frames`` ([F, H, W, 3] uint8, or floats in [0, 1]; e.g. ``pipe(...).frames[0]``) at ``fps`` frames per
    second and returns the path written: ``path``, or for an .mp4 without imageio + imageio-ffmpeg the .gif written
    beside it through Pillow (see the module docstring). H.264 needs even sizes: an odd height or width is padded by
    one edge row / column in the .mp4."""
    path = os.fspath(path)
    fps = check_number("fps", fps, positive=True)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"path must end in {', '.join(_SUFFIXES)}, got {path!r}")
    frames = _as_uint8_frames(frames)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no such folder {folder!r} for {path!r}")
    if suffix == ".mp4":
        try:  # local: optional dependencies
            import imageio
            import imageio_ffmpeg  # noqa: F401
        except ImportError as e:
            gif = os.path.splitext(path)[0] + ".gif"
            warnings.warn(f"writing {gif!r} instead of {path!r}: an .mp4 needs imageio and imageio-ffmpeg ({e})",
                          stacklevel=2)
            _write_pillow(gif, frames, fps)
            return gif
        _write_mp4(imageio, path, frames, fps)
        return path
    _write_pillow(path, frames, fps)
    return path


def _write_mp4(imageio, path, frames, fps) -> None:
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:  # yuv420p subsamples chroma 2x2
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with warnings.catch_warnings():
        # imageio-ffmpeg starts ffmpeg through subprocess (fork + exec at once), which JAX's os.fork warning flags
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        with imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                                macro_block_size=1, quality=8) as writer:
            for frame in frames:
                writer.append_data(frame)


def _write_pillow(path, frames, fps) -> None:
    from PIL import Image  # local: optional dependency

    images = [Image.fromarray(frame) for frame in frames]
    duration = max(1, round(1000.0 / fps))  # milliseconds per frame
    extra = {"lossless": True} if path.lower().endswith(".webp") else {"disposal": 1}
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0, **extra)
