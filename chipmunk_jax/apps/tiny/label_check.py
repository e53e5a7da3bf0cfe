"""The tiny model's label check: does a generated image show the shape and colour it was asked for?"""

from __future__ import annotations

import numpy as np

from chipmunk_jax.apps.images import as_unit
from chipmunk_jax.apps.tiny import dataset as D

__all__ = ["NearestNeighbourCheck"]


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
        self.palette = np.asarray(list(D.COLOURS.values()), np.float32)
        self.features, self.labels = self._shape_features(images), labels

    @staticmethod
    def _masks(images):
        return (as_unit(images).max(axis=-1) > 0.65).astype(np.float32)

    def _shape_features(self, images):
        masks = self._masks(images)
        b, h, w = masks.shape
        half = 20
        padded = np.pad(masks, ((0, 0), (half, half), (half, half)))
        yy, xx = np.mgrid[0:h, 0:w]
        out = np.zeros((b, 2 * half, 2 * half), np.float32)
        for i, m in enumerate(masks):
            total = m.sum()
            cy, cx = ((int(round((m * yy).sum() / total)), int(round((m * xx).sum() / total))) if total > 0
                      else (h // 2, w // 2))
            out[i] = padded[i, cy:cy + 2 * half, cx:cx + 2 * half]
        return out.reshape(b, half, 2, half, 2).mean(axis=(2, 4)).reshape(b, -1)

    def predict(self, images) -> np.ndarray:
        f = self._shape_features(images)
        d = (f**2).sum(1)[:, None] - 2 * f @ self.features.T + (self.features**2).sum(1)[None]
        shapes = self.labels[np.argmin(d, axis=1), 0]
        unit, masks = as_unit(images), self._masks(images)
        mean = (unit * masks[..., None]).sum(axis=(1, 2)) / np.maximum(masks.sum(axis=(1, 2))[:, None], 1.0)
        cos = (mean @ self.palette.T) / (np.linalg.norm(mean, axis=1, keepdims=True) + 1e-6)
        cos = cos / np.linalg.norm(self.palette, axis=1)[None]
        colours = np.argmax(cos, axis=1)
        return np.stack([shapes, colours], axis=1).astype(np.int32)

    def accuracy(self, images, labels) -> dict[str, float]:
        pred, labels = self.predict(images), np.asarray(labels)
        return {"shape": float(np.mean(pred[:, 0] == labels[:, 0])),
                "colour": float(np.mean(pred[:, 1] == labels[:, 1])),
                "both": float(np.mean((pred == labels).all(axis=1)))}
