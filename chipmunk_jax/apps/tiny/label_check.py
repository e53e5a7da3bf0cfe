"""The tiny model's label check: does a generated image show the shape and colour it was asked for?

The pieces (``foreground_masks``, ``centred_mask_features``, ``palette_colours``, ``nearest_labels``) also make up
the tiny video model's check (``chipmunk_jax.apps.tiny_video.label_check``): both datasets draw their shapes in
the same palette over the same dark backgrounds.
"""

from __future__ import annotations

import numpy as np

from chipmunk_jax.apps.images import as_unit
from chipmunk_jax.apps.tiny import dataset as D

__all__ = ["NearestNeighbourCheck", "foreground_masks", "centred_mask_features", "palette_colours", "nearest_labels"]

# every background pixel of the datasets is below 0.5 on [0, 1] in every channel, every foreground colour's
# brightest channel above 0.8
_FOREGROUND = 0.65


def foreground_masks(images) -> np.ndarray:
    """[B, H, W] float32 masks of the pixels of [B, H, W, 3] images (in [-1, 1]) whose brightest channel exceeds
    0.65 on [0, 1]."""
    return (as_unit(images).max(axis=-1) > _FOREGROUND).astype(np.float32)


def centred_mask_features(masks, half: int, pool: int) -> np.ndarray:
    """[B, (2 half / pool)^2]: each [H, W] mask cropped to 2 half x 2 half around its centroid (the frame centre
    for an empty mask; zero padding outside) and mean-pooled over pool x pool cells."""
    masks = np.asarray(masks, np.float32)
    b, h, w = masks.shape
    padded = np.pad(masks, ((0, 0), (half, half), (half, half)))
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((b, 2 * half, 2 * half), np.float32)
    for i, m in enumerate(masks):
        total = m.sum()
        cy, cx = ((int(round((m * yy).sum() / total)), int(round((m * xx).sum() / total))) if total > 0
                  else (h // 2, w // 2))
        out[i] = padded[i, cy:cy + 2 * half, cx:cx + 2 * half]
    cells = 2 * half // pool
    return out.reshape(b, cells, pool, cells, pool).mean(axis=(2, 4)).reshape(b, -1)


def palette_colours(images, masks) -> np.ndarray:
    """[B] ids of the palette entry (``dataset.COLOURS``) closest in direction (cosine) to the mean colour of the
    masked pixels of [B, H, W, 3] images (masks [B, H, W])."""
    palette = np.asarray(list(D.COLOURS.values()), np.float32)
    unit = as_unit(images)
    mean = (unit * masks[..., None]).sum(axis=(1, 2)) / np.maximum(masks.sum(axis=(1, 2))[:, None], 1.0)
    cos = (mean @ palette.T) / (np.linalg.norm(mean, axis=1, keepdims=True) + 1e-6)
    cos = cos / np.linalg.norm(palette, axis=1)[None]
    return np.argmax(cos, axis=1)


def nearest_labels(features, bank_features, bank_labels) -> np.ndarray:
    """The labels of each feature row's nearest (Euclidean) bank row."""
    d = (features**2).sum(1)[:, None] - 2 * features @ bank_features.T + (bank_features**2).sum(1)[None]
    return bank_labels[np.argmin(d, axis=1)]


class NearestNeighbourCheck:
    """Label check of generated images against their conditioning (shape, colour).

    Foreground = pixels whose brightest channel exceeds 0.65 on [0, 1] (every background pixel of the
    dataset is below 0.5, every foreground colour above 0.8). Colour: the palette entry closest in
    direction (cosine) to the mean foreground colour. Shape: 1-nearest-neighbour (Euclidean) of the
    foreground mask, cropped 40x40 around its centroid and pooled to 20x20, against a bank of real
    dataset images. Run on held-out real images it gives the check's own ceiling.
    """

    def __init__(self, bank_size: int = 3000, seed: int = 7):
        images, labels = D.make_batch(seed, 0, bank_size)
        self.features, self.labels = self._shape_features(images), labels

    @staticmethod
    def _shape_features(images):
        return centred_mask_features(foreground_masks(images), half=20, pool=2)

    def predict(self, images) -> np.ndarray:
        shapes = nearest_labels(self._shape_features(images), self.features, self.labels)[:, 0]
        colours = palette_colours(images, foreground_masks(images))
        return np.stack([shapes, colours], axis=1).astype(np.int32)

    def accuracy(self, images, labels) -> dict[str, float]:
        pred, labels = self.predict(images), np.asarray(labels)
        return {"shape": float(np.mean(pred[:, 0] == labels[:, 0])),
                "colour": float(np.mean(pred[:, 1] == labels[:, 1])),
                "both": float(np.mean((pred == labels).all(axis=1)))}
