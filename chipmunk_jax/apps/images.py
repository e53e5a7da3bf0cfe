"""Image utilities of the applications: PSNR / SSIM metrics, uint8 conversion, PNG output and grids.

Metrics (images in [-1, 1], compared on [0, 1]):
  PSNR: 10 log10(1 / MSE) per image, averaged over images.
  SSIM: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, "valid"
    windows only, per channel, averaged over channels, pixels and images.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

__all__ = ["psnr", "ssim", "as_unit", "to_uint8", "write_png", "image_grid", "video_grid"]


def as_unit(images) -> np.ndarray:
    images = np.asarray(images, np.float64)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [B, H, W, C] with C in (1, 3), got shape {images.shape}")
    return np.clip((images + 1.0) / 2.0, 0.0, 1.0)


def psnr(images, reference) -> float:
    """Mean per-image PSNR (dB) of [B, H, W, C] images in [-1, 1] against ``reference`` (peak 1 on [0, 1])."""
    a, b = as_unit(images), as_unit(reference)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def _gaussian_filter_valid(x, window):
    # separable 'valid' filtering over axes 1 and 2 of [B, H, W, C]
    k = window.size
    h = sum(window[i] * x[:, i:x.shape[1] - k + 1 + i] for i in range(k))
    return sum(window[i] * h[:, :, i:h.shape[2] - k + 1 + i] for i in range(k))


def ssim(images, reference, *, window_size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of [B, H, W, C] images in [-1, 1] against ``reference`` (Gaussian window, see module doc)."""
    a, b = as_unit(images), as_unit(reference)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if min(a.shape[1:3]) < window_size:
        raise ValueError(f"images must be at least {window_size}x{window_size} pixels")
    r = np.arange(window_size) - (window_size - 1) / 2
    window = np.exp(-(r**2) / (2 * sigma**2))
    window /= window.sum()
    f = lambda x: _gaussian_filter_valid(x, window)  # noqa: E731
    mu_a, mu_b = f(a), f(b)
    var_a, var_b, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(np.mean(s))


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255]."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# PNG output without extra dependencies


def write_png(path, image: np.ndarray) -> None:
    """Writes an [H, W, 3] uint8 array as an 8-bit RGB PNG (zlib only)."""
    image = np.ascontiguousarray(image, np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3] uint8, got shape {image.shape}")
    h, w, _ = image.shape

    def chunk(tag, data):
        body = tag + data
        return len(data).to_bytes(4, "big") + body + (zlib.crc32(body) & 0xFFFFFFFF).to_bytes(4, "big")

    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(h))
    header = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                           + chunk(b"IEND", b""))


def image_grid(rows: list[np.ndarray], scale: int = 2, gap: int = 2) -> np.ndarray:
    """Rows of [B, H, W, 3] images in [-1, 1] -> one uint8 grid (nearest-neighbour upscaled)."""
    lines = []
    for row in rows:
        tiles = [np.pad(t, ((gap, gap), (gap, gap), (0, 0)), constant_values=255) for t in to_uint8(row)]
        lines.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(lines, axis=0)
    return grid.repeat(scale, 0).repeat(scale, 1)


def video_grid(rows: list[np.ndarray], scale: int = 2, gap: int = 2) -> np.ndarray:
    """Rows of [B, F, H, W, 3] videos in [-1, 1] (one frame count) -> uint8 frames [F, H', W', 3], frame f the
    ``image_grid`` of every video's frame f."""
    frames = {row.shape[1] for row in rows}
    if len(frames) != 1:
        raise ValueError(f"every row must hold videos of one frame count, got {sorted(frames)}")
    return np.stack([image_grid([row[:, f] for row in rows], scale, gap) for f in range(frames.pop())])
