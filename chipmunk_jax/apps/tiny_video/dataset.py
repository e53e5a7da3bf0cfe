"""Procedural "moving shapes" videos for the tiny Wan model: 8 RGB frames of 32x32, made by the project, no downloads.

Each video: a static two-colour linear gradient background (random direction) and one anti-aliased shape of a
given class and colour (the tiny image model's shapes and palette, ``chipmunk_jax.apps.tiny.dataset``) moving in
a straight line in one of 8 directions at 1.0-1.6 pixels per frame, its whole path inside the frame. The label is
``(shape, colour, direction)``; ``text_embeddings`` turns it into Wan's text input (``VOCABULARY``).

Deterministic: video ``i`` of seed ``s`` depends only on ``(s, i)`` (its own numpy Generator draws its scene
parameters, ``scene_params``; ``render`` draws them with numpy or, jitted on a GPU, jax.numpy).

Pixel values are float32 in [-1, 1], layout [B, F, H, W, 3]. ``to_latents`` / ``from_latents`` convert to
Wan's [B, C, F, H, W] latent layout (the model runs in pixel space: the "latents" are the frames).
"""

from __future__ import annotations

import numpy as np

from chipmunk_jax.apps.labels import LabelVocabulary
from chipmunk_jax.apps.tiny.dataset import COLOURS, SHAPES, gradient_background, paint_shape
from chipmunk_jax.validation import check_int

__all__ = [
    "SHAPES",
    "COLOURS",
    "DIRECTIONS",
    "FRAMES",
    "FRAME_SIZE",
    "NUM_TEXT_TOKENS",
    "TEXT_DIM",
    "VOCABULARY",
    "direction_vectors",
    "scene_params",
    "scene_batch",
    "render",
    "make_video",
    "make_batch",
    "random_labels",
    "text_embedding_table",
    "text_embeddings",
    "to_latents",
    "from_latents",
]

# image y points down: "down" is +y; direction k moves along the angle k * 45 degrees from +x towards +y
DIRECTIONS = ("right", "down-right", "down", "down-left", "left", "up-left", "up", "up-right")
FRAMES = 8
FRAME_SIZE = 32
NUM_TEXT_TOKENS = 12  # 4 per label kind
TEXT_DIM = 64
VOCABULARY = LabelVocabulary(kinds=("shape", "colour", "direction"), values=(SHAPES, tuple(COLOURS), DIRECTIONS),
                             num_tokens=NUM_TEXT_TOKENS, dim=TEXT_DIM, seed=20251207)

_SCENE_FIELDS = ("c0", "c1", "angle", "radius", "cy", "cx", "vy", "vx", "brightness")


def direction_vectors() -> np.ndarray:
    """[8, 2] unit (dy, dx) steps of ``DIRECTIONS`` (pixels, y down)."""
    angles = np.arange(len(DIRECTIONS)) * (np.pi / 4)
    return np.stack([np.sin(angles), np.cos(angles)], axis=1)


_DIRECTION_VECTORS = direction_vectors()


def _check_index(name, value, upper=None):
    check_int(name, value, minimum=0, maximum=None if upper is None else upper - 1)


def scene_params(seed: int, index: int, shape: int, colour: int, direction: int) -> dict:
    """The random draws of video ``index`` of stream ``seed`` (its own Generator, in a fixed order): background
    colours ``c0``/``c1`` [3] and gradient ``angle``, shape ``radius``, speed (pixels per frame) and colour
    ``brightness``, and the path's centre ``cy``/``cx`` (pixels, at the middle of the clip: the shape is at
    centre + (f - 3.5) x velocity in frame f), drawn so the whole path keeps the shape at least 1 px inside the
    frame; ``vy``/``vx`` the velocity; plus the given ids."""
    _check_index("seed", seed)
    _check_index("index", index)
    for kind, value, size in zip(VOCABULARY.kinds, (shape, colour, direction), VOCABULARY.sizes):
        _check_index(kind, value, size)
    rng = np.random.default_rng([seed, index])
    c0, c1 = rng.uniform(0.05, 0.45, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    radius = rng.uniform(5.0, 7.5)
    speed = rng.uniform(1.0, 1.6)
    brightness = rng.uniform(0.85, 1.0)
    where = rng.uniform(0.0, 1.0, size=2)
    vy, vx = speed * _DIRECTION_VECTORS[direction]
    low, high = radius + 1.0, FRAME_SIZE - radius - 1.0  # the shapes reach at most ``radius`` from their centre
    reach = np.abs([vy, vx]) * (FRAMES - 1) / 2
    cy, cx = low + reach + where * (high - low - 2 * reach)
    return dict(c0=c0, c1=c1, angle=angle, radius=radius, cy=cy, cx=cx, vy=vy, vx=vx, brightness=brightness,
                shape=int(shape), colour=int(colour), direction=int(direction))


def random_labels(seed: int, index: int) -> tuple[int, int, int]:
    """The (shape, colour, direction) the training stream uses for video ``index`` (uniform, deterministic)."""
    return VOCABULARY.random(seed, index)


def scene_batch(seed: int, start: int, batch: int, labels=None) -> dict:
    """``scene_params`` of videos ``start .. start+batch-1`` stacked into arrays with a leading [B] axis
    (float32; ``shape``/``colour``/``direction`` int32): the input of ``render``. ``labels`` as in ``make_batch``."""
    labels = VOCABULARY.stream(seed, start, batch, labels)
    scenes = [scene_params(seed, start + i, *(int(v) for v in label)) for i, label in enumerate(labels)]
    out = {k: np.asarray([sc[k] for sc in scenes], np.float32) for k in _SCENE_FIELDS}
    for i, kind in enumerate(VOCABULARY.kinds):
        out[kind] = labels[:, i].copy()
    return out


def render(scene: dict, xp=np):
    """Videos [B, 8, 32, 32, 3] in [-1, 1] of a ``scene_batch`` (arrays with a leading [B] axis), float32.

    ``xp`` is ``numpy`` or ``jax.numpy`` (the same code renders on the host and, jitted, on a GPU).
    Background: dark-to-mid two-colour gradient along ``angle``, the same in every frame; foreground: the
    shape's anti-aliased coverage in ``brightness`` x its palette colour, centred at centre + (f - 3.5) x
    velocity in frame f."""
    f32 = np.float32
    size = FRAME_SIZE
    grid = xp.arange(size, dtype=f32) + f32(0.5)
    yy, xx = grid[None, None, :, None], grid[None, None, None, :]  # [1, 1, H, 1], [1, 1, 1, W]
    per_video = lambda v: xp.asarray(v, f32)[:, None, None, None]  # noqa: E731  [B] -> [B, 1, 1, 1]
    colour = lambda name: xp.asarray(scene[name], f32)[:, None, None, None, :]  # noqa: E731  [B, 3] -> [B,1,1,1,3]
    image = gradient_background(colour("c0"), colour("c1"), per_video(scene["angle"]), yy, xx, size, xp)
    time = (xp.arange(FRAMES, dtype=f32) - f32((FRAMES - 1) / 2))[None, :, None, None]  # [1, F, 1, 1]
    cy = per_video(scene["cy"]) + time * per_video(scene["vy"])  # [B, F, 1, 1]
    cx = per_video(scene["cx"]) + time * per_video(scene["vx"])
    video = paint_shape(image, scene, yy - cy, xx - cx, per_video(scene["radius"]), xp)
    return (xp.clip(video, 0.0, 1.0) * 2.0 - 1.0).astype(f32)


def make_video(seed: int, index: int, shape: int, colour: int, direction: int) -> np.ndarray:
    """Video ``index`` of stream ``seed`` with the given label ids: [8, 32, 32, 3] float32 in [-1, 1]."""
    scene = scene_params(seed, index, shape, colour, direction)
    return render({k: np.asarray(v)[None] for k, v in scene.items()})[0]


def make_batch(seed: int, start: int, batch: int, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Videos ``start .. start+batch-1`` of stream ``seed``: ([B, 8, 32, 32, 3] float32, [B, 3] int32 labels).

    ``labels`` [B, 3] fixes the (shape, colour, direction) per video; default: ``random_labels`` of each index.
    """
    scene = scene_batch(seed, start, batch, labels)
    return render(scene), np.stack([scene[kind] for kind in VOCABULARY.kinds], axis=1)


def text_embedding_table() -> np.ndarray:
    """[6 + 8 + 8 + 12, 64] fixed random rows: shape, colour and direction rows, then one row per text position."""
    return VOCABULARY.table()


def text_embeddings(labels, table: np.ndarray | None = None) -> np.ndarray:
    """Wan's encoder_hidden_states [B, 12, 64] for (shape, colour, direction) labels [B, 3]: tokens 0-3 carry the
    shape row, 4-7 the colour row, 8-11 the direction row, each plus 0.5 x its position row."""
    return VOCABULARY.embed(labels, table)[0]


def to_latents(videos, xp=np):
    """[B, F, H, W, 3] frames -> Wan's [B, 3, F, H, W] latent layout. ``xp``: numpy or jax.numpy."""
    videos = xp.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be [B, F, H, W, 3], got shape {videos.shape}")
    return videos.transpose(0, 4, 1, 2, 3)


def from_latents(latents) -> np.ndarray:
    """Inverse of ``to_latents`` (numpy)."""
    latents = np.asarray(latents)
    if latents.ndim != 5 or latents.shape[1] != 3:
        raise ValueError(f"latents must be [B, 3, F, H, W], got shape {latents.shape}")
    return latents.transpose(0, 2, 3, 4, 1)
