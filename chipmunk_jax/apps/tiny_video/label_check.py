"""The tiny video model's label check: does a generated video show the shape, colour and motion it was asked for?"""

from __future__ import annotations

import numpy as np

from chipmunk_jax.apps.tiny.label_check import centred_mask_features, foreground_masks, nearest_labels, palette_colours
from chipmunk_jax.apps.tiny_video import dataset as D

__all__ = ["VideoLabelCheck"]


class VideoLabelCheck:
    """Label check of generated videos [B, F, H, W, 3] against their conditioning (shape, colour, direction).

    Foreground: the tiny image model's check (``apps.tiny.label_check``: brightest channel above 0.65 on [0, 1]),
    per frame. Colour: the palette entry closest in direction (cosine) to the mean foreground colour of all
    frames. Shape: 1-nearest-neighbour (Euclidean) of the foreground mask cropped 20x20 around its centroid,
    averaged over the frames (the shapes do not turn), against a bank of real dataset videos. Direction: the
    least-squares velocity of the foreground centroid over the frames that show one, rounded to the nearest of
    the 8 directions. Run on held-out real videos it gives the check's own ceiling.
    """

    def __init__(self, bank_size: int = 1000, seed: int = 7):
        videos, labels = D.make_batch(seed, 0, bank_size)
        self.features, self.labels = self._shape_features(videos), labels

    @staticmethod
    def _frames(videos) -> np.ndarray:
        videos = np.asarray(videos)
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"videos must be [B, F, H, W, 3], got shape {videos.shape}")
        return videos.reshape(-1, *videos.shape[2:])

    def _shape_features(self, videos):
        b, f = np.shape(videos)[:2]
        features = centred_mask_features(foreground_masks(self._frames(videos)), half=10, pool=1)
        return features.reshape(b, f, -1).mean(axis=1)

    @staticmethod
    def directions(videos) -> np.ndarray:
        """[B] direction ids (``dataset.DIRECTIONS``) from the foreground centroids' velocity; 0 ("right") for a
        video whose foreground shows in fewer than two frames."""
        b, f, h, w = np.shape(videos)[:4]
        masks = foreground_masks(VideoLabelCheck._frames(videos)).reshape(b, f, h, w)
        area = masks.sum(axis=(2, 3))
        yy, xx = np.mgrid[0:h, 0:w]
        centroid = np.stack([(masks * yy).sum(axis=(2, 3)), (masks * xx).sum(axis=(2, 3))], -1)
        centroid = centroid / np.maximum(area, 1.0)[..., None]  # [B, F, 2]
        time = np.arange(f, dtype=np.float64)
        out = np.zeros(b, np.int32)
        for i in range(b):
            seen = area[i] > 0
            if seen.sum() < 2:
                continue
            t = time[seen] - time[seen].mean()
            velocity = (t[:, None] * centroid[i, seen]).sum(0) / (t**2).sum()  # (dy, dx) per frame
            angle = np.arctan2(velocity[0], velocity[1])
            out[i] = int(np.round(angle / (np.pi / 4))) % len(D.DIRECTIONS)
        return out

    def predict(self, videos) -> np.ndarray:
        """[B, 3] predicted (shape, colour, direction) ids."""
        shapes = nearest_labels(self._shape_features(videos), self.features, self.labels)[:, 0]
        tall = np.asarray(videos).reshape(len(videos), -1, *np.shape(videos)[3:])  # the frames stacked: [B, F*H, W, 3]
        colours = palette_colours(tall, foreground_masks(tall))
        return np.stack([shapes, colours, self.directions(videos)], axis=1).astype(np.int32)

    def accuracy(self, videos, labels) -> dict[str, float]:
        pred, labels = self.predict(videos), np.asarray(labels)
        scores = {kind: float(np.mean(pred[:, i] == labels[:, i])) for i, kind in enumerate(D.VOCABULARY.kinds)}
        scores["all"] = float(np.mean((pred == labels).all(axis=1)))
        return scores
