"""A tiny Wan-architecture video model trained by the project on its own procedural moving-shapes videos.

It runs through the same ``chipmunk_jax.models.wan`` code as Wan 2.1 (smaller width and depth) in pixel space:
8 RGB frames of 32x32 in Wan's [B, C, F, H, W] latent layout (C = 3), cut into (2, 2, 2) patches (Wan's patch
embedding with a temporal patch of 2, where Wan's VAE compresses time 4x), give a (4, 16, 16) grid of 1,024 video
tokens with 24 values each; 12 "text" tokens carry the labels (shape, colour, motion direction). Trained weights
ship in ``chipmunk_jax/apps/tiny_video/weights``.
"""

from __future__ import annotations

import os
from pathlib import Path

from chipmunk_jax.models.wan import WanConfig
from chipmunk_jax.ports.wan import load_params
from chipmunk_jax.apps.tiny import load_trained

__all__ = ["tiny_video_config", "WEIGHTS_DIR", "load_shipped", "TOKEN_GRID"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TOKEN_GRID = (4, 16, 16)  # (frames, height, width) of the patch tokens: 8 frames of 32x32 in (2, 2, 2) patches


def tiny_video_config() -> WanConfig:
    """2 heads x 64 (width 128; Wan's RoPE split of a 64-dim head: 24 time, 20 height, 20 width), 8 blocks, FFN 512,
    3 pixel channels in (2, 2, 2) patches, 64-dim "text" tokens, Wan's 256 timestep frequencies and affine
    cross-attention norm: 2.3M parameters (9.2 MB float32)."""
    return WanConfig(
        patch_size=(2, 2, 2),
        num_attention_heads=2,
        attention_head_dim=64,
        in_channels=3,
        out_channels=3,
        text_dim=64,
        freq_dim=256,
        ffn_dim=512,
        num_layers=8,
    )


def load_shipped(directory: str | os.PathLike | None = None):
    """(WanConfig, params) of the shipped model (or of a ``train`` output folder)."""
    return load_trained(directory, WEIGHTS_DIR, load_params, what="tiny video model",
                        trainer="chipmunk_jax.apps.tiny_video.train")
