"""A tiny FLUX-architecture model trained by the project on its own procedural shapes dataset.

It runs through the same ``chipmunk_jax.models.flux`` code as FLUX.1 (smaller width and depth), in
pixel space: 64x64 RGB images packed into 2x2 patches give a 32x32 grid of 1,024 image tokens with
12 channels, plus 8 text tokens. Trained weights ship in ``chipmunk_jax/apps/tiny/weights``.
"""

from __future__ import annotations

import os
from pathlib import Path

from chipmunk_jax.models.flux import FluxConfig
from chipmunk_jax.ports.flux import load_params

__all__ = ["tiny_config", "WEIGHTS_DIR", "load_shipped", "load_trained", "IMAGE_GRID"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
IMAGE_GRID = (32, 32)


def tiny_config() -> FluxConfig:
    """2 heads x 64 (width 128), 2 double + 4 single blocks (FLUX's 1:2 ratio), MLP 512, 12 pixel-patch
    channels, RoPE axes 8/28/28 (FLUX's 16/56/56 halved): 2.3M parameters (8.8 MB float32). Trained on
    one GPU in minutes; samples on two CPU cores at ~25 ms per image and step."""
    return FluxConfig(
        patch_size=1,
        in_channels=12,
        out_channels=12,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=64,
        num_attention_heads=2,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=False,
        axes_dims_rope=(8, 28, 28),
    )


def load_shipped(directory: str | os.PathLike | None = None):
    """(FluxConfig, params) of the shipped model (or of a ``train`` output folder)."""
    return load_trained(directory, WEIGHTS_DIR, load_params, what="tiny model", trainer="chipmunk_jax.apps.tiny.train")


def load_trained(directory, shipped: Path, load_params, *, what: str, trainer: str):
    """(config, params) by ``load_params`` from ``directory`` (None: the ``shipped`` weights folder); a folder
    without config.json is a FileNotFoundError that names the ``trainer`` module to run."""
    directory = shipped if directory is None else Path(directory)
    if not (Path(directory) / "config.json").is_file():
        raise FileNotFoundError(f"no trained {what} in {os.fspath(directory)!r}: run `python -m {trainer}` first")
    return load_params(directory)
