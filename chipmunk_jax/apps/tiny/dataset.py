"""Procedural "shapes" dataset for the tiny FLUX model: 64x64 RGB scenes made by the project, no downloads.

Each image: a two-colour linear gradient background (random direction) with a faint sinusoidal texture,
and one anti-aliased foreground shape of a given class and colour at a jittered position and size.
The label is ``(shape, colour)``; ``text_embeddings`` turns it into FLUX's text inputs (``VOCABULARY``,
``chipmunk_jax.apps.labels``). ``signed_distances``, ``gradient_background`` and ``paint_shape`` also draw the tiny
video model's scenes (``chipmunk_jax.apps.tiny_video.dataset``).

Deterministic: image ``i`` of seed ``s`` depends only on ``(s, i)`` (its own numpy Generator draws its
scene parameters, ``scene_params``; ``render`` draws them with numpy or, jitted on a GPU, jax.numpy), so any
slice of the stream can be regenerated anywhere.

Pixel values are float32 in [-1, 1], layout [H, W, 3]. ``pack`` / ``unpack`` convert to FLUX's packed
token layout (2x2 patches, channel order (c, ph, pw) as FLUX packs latents, docs/models.md §1.1).
"""

from __future__ import annotations

import numpy as np

from chipmunk_jax.apps.labels import LabelVocabulary
from chipmunk_jax.validation import check_int

__all__ = [
    "SHAPES",
    "COLOURS",
    "IMAGE_SIZE",
    "PATCH",
    "NUM_TEXT_TOKENS",
    "TEXT_DIM",
    "make_image",
    "make_batch",
    "scene_params",
    "scene_batch",
    "render",
    "random_labels",
    "VOCABULARY",
    "text_embedding_table",
    "text_embeddings",
    "signed_distances",
    "gradient_background",
    "paint_shape",
    "pack",
    "unpack",
]

SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond")
COLOURS = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (0.98, 0.9, 0.15),
    "magenta": (0.9, 0.2, 0.85),
    "cyan": (0.15, 0.9, 0.95),
    "white": (0.97, 0.97, 0.97),
    "orange": (1.0, 0.55, 0.1),
}
IMAGE_SIZE = 64
PATCH = 2
NUM_TEXT_TOKENS = 8
TEXT_DIM = 64
# Tokens 0-3 carry the shape row, tokens 4-7 the colour row; the table is fixed (a frozen text encoder's stand-in).
VOCABULARY = LabelVocabulary(kinds=("shape", "colour"), values=(SHAPES, tuple(COLOURS)), num_tokens=NUM_TEXT_TOKENS,
                             dim=TEXT_DIM, seed=20250603)


def _check_index(name, value, upper=None):
    check_int(name, value, minimum=0, maximum=None if upper is None else upper - 1)


_SCENE_FIELDS = ("c0", "c1", "angle", "freq", "phase", "tex_angle", "radius", "cy", "cx", "brightness",
                 "shape", "colour")


def scene_params(seed: int, index: int, shape: int, colour: int) -> dict:
    """The random draws of image ``index`` of stream ``seed`` (its own Generator, in a fixed order):
    background colours ``c0``/``c1`` [3], gradient ``angle``, texture ``freq``/``phase``/``tex_angle``,
    shape ``radius`` and centre ``cy``/``cx`` (pixels), colour ``brightness``; plus the given ids."""
    _check_index("seed", seed)
    _check_index("index", index)
    _check_index("shape", shape, len(SHAPES))
    _check_index("colour", colour, len(COLOURS))
    rng = np.random.default_rng([seed, index])
    c0, c1 = rng.uniform(0.05, 0.45, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    freq, phase, tex_angle = rng.uniform(0.15, 0.45), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
    radius = rng.uniform(10.0, 15.0)
    cy, cx = IMAGE_SIZE / 2 + rng.uniform(-8, 8, size=2)
    brightness = rng.uniform(0.85, 1.0)
    return dict(c0=c0, c1=c1, angle=angle, freq=freq, phase=phase, tex_angle=tex_angle, radius=radius, cy=cy,
                cx=cx, brightness=brightness, shape=int(shape), colour=int(colour))


def scene_batch(seed: int, start: int, batch: int, labels=None) -> dict:
    """``scene_params`` of images ``start .. start+batch-1`` stacked into arrays with a leading [B] axis
    (float32; ``shape``/``colour`` int32): the input of ``render``. ``labels`` as in ``make_batch``."""
    labels = VOCABULARY.stream(seed, start, batch, labels)
    scenes = [scene_params(seed, start + i, int(s), int(c)) for i, (s, c) in enumerate(labels)]
    out = {k: np.asarray([sc[k] for sc in scenes], np.float32) for k in _SCENE_FIELDS[:-2]}
    out["shape"], out["colour"] = labels[:, 0].copy(), labels[:, 1].copy()
    return out


def signed_distances(dy, dx, radius, xp=np):
    """[6, ...] signed distances (pixels; negative inside) of the six shapes, in ``SHAPES`` order, at offsets
    ``dy``, ``dx`` (pixels, y down) from the shape's centre, for ``radius`` (all broadcast together)."""
    circle = xp.sqrt(dx * dx + dy * dy) - radius
    square = xp.maximum(xp.abs(dx), xp.abs(dy)) - 0.85 * radius
    ring = xp.abs(circle + 0.25 * radius) - 0.28 * radius  # |hypot - 0.75 r| - 0.28 r
    arm = 0.3 * radius
    horizontal = xp.maximum(xp.abs(dx) - radius, xp.abs(dy) - arm)
    vertical = xp.maximum(xp.abs(dy) - radius, xp.abs(dx) - arm)
    cross = xp.minimum(horizontal, vertical)
    diamond = (xp.abs(dx) + xp.abs(dy) - 1.1 * radius) / np.sqrt(2.0)
    # upward equilateral triangle (image y points down): max of the three edge half-plane distances
    half = 0.55 * radius
    s3 = np.sqrt(3) / 2
    triangle = xp.maximum(xp.maximum(dy - half, s3 * dx - 0.5 * dy - half), -s3 * dx - 0.5 * dy - half)
    return xp.stack([circle, square, triangle, ring, cross, diamond])


def gradient_background(c0, c1, angle, yy, xx, size: int, xp=np):
    """Two-colour linear gradient from ``c0`` to ``c1`` ([..., 3]) along ``angle`` (radians) across a ``size``-pixel
    frame, at pixel centres ``yy``, ``xx``; ``angle`` broadcasts with ``yy``/``xx``, the colours with their result
    plus a channel axis."""
    ramp = ((xx - size / 2) * xp.cos(angle) + (yy - size / 2) * xp.sin(angle)) / size + 0.5
    ramp = xp.clip(ramp, 0.0, 1.0)[..., None]
    return c0 * (1 - ramp) + c1 * ramp


def paint_shape(image, scene: dict, dy, dx, radius, xp=np):
    """``image`` [B, ..., 3] with each scene's shape painted over it: anti-aliased coverage clip(0.5 - distance,
    0, 1) of shape ``scene["shape"]`` [B] at offsets ``dy``, ``dx`` from its centre (broadcasting to [B, ...]),
    in ``scene["brightness"]`` [B] x its palette colour ``scene["colour"]`` [B]."""
    dists = signed_distances(dy, dx, radius, xp)
    per_item = lambda v: xp.reshape(v, (-1,) + (1,) * (dists.ndim - 2))  # noqa: E731  [B] -> [B, 1, ...]
    shape = xp.asarray(scene["shape"], np.int32)
    dist = sum(xp.where(per_item(shape == i), dists[i], 0.0) for i in range(len(SHAPES)))
    mask = xp.clip(0.5 - dist, 0.0, 1.0)[..., None]
    palette = xp.asarray(np.asarray(list(COLOURS.values()), np.float32))
    shade = palette[xp.asarray(scene["colour"], np.int32)] * xp.asarray(scene["brightness"], np.float32)[:, None]
    return image * (1 - mask) + xp.reshape(shade, (shade.shape[0],) + (1,) * (dists.ndim - 2) + (3,)) * mask


def render(scene: dict, xp=np):
    """Images [B, 64, 64, 3] in [-1, 1] of a ``scene_batch`` (arrays with a leading [B] axis), float32.

    ``xp`` is ``numpy`` or ``jax.numpy`` (the same code renders on the host and, jitted, on a GPU).
    Background: dark-to-mid two-colour gradient along ``angle`` plus 0.05 x a sinusoidal texture;
    foreground: the shape's anti-aliased coverage (clip(0.5 - distance, 0, 1)) in ``brightness`` x its
    palette colour."""
    f32 = np.float32
    size = IMAGE_SIZE
    grid = xp.arange(size, dtype=f32) + f32(0.5)
    yy, xx = grid[None, :, None], grid[None, None, :]  # [1, H, 1], [1, 1, W]
    col = lambda v: xp.asarray(v, f32)[:, None, None]  # noqa: E731  [B] -> [B, 1, 1]
    tex_angle = col(scene["tex_angle"])
    colour = lambda name: xp.asarray(scene[name], f32)[:, None, None, :]  # noqa: E731  [B, 3] -> [B, 1, 1, 3]
    image = gradient_background(colour("c0"), colour("c1"), col(scene["angle"]), yy, xx, size, xp)
    texture = xp.sin(col(scene["freq"]) * (xx * xp.cos(tex_angle) + yy * xp.sin(tex_angle)) + col(scene["phase"]))
    image = image + 0.05 * texture[..., None]
    image = paint_shape(image, scene, yy - col(scene["cy"]), xx - col(scene["cx"]), col(scene["radius"]), xp)
    return (xp.clip(image, 0.0, 1.0) * 2.0 - 1.0).astype(f32)


def make_image(seed: int, index: int, shape: int, colour: int) -> np.ndarray:
    """Image ``index`` of stream ``seed`` with the given shape and colour ids: [64, 64, 3] float32 in [-1, 1]."""
    scene = scene_params(seed, index, shape, colour)
    return render({k: np.asarray(v)[None] for k, v in scene.items()})[0]


def random_labels(seed: int, index: int) -> tuple[int, int]:
    """The (shape, colour) the training stream uses for image ``index`` (uniform, deterministic)."""
    return VOCABULARY.random(seed, index)


def make_batch(seed: int, start: int, batch: int, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``start .. start+batch-1`` of stream ``seed``: ([B, 64, 64, 3] float32, [B, 2] int32 labels).

    ``labels`` [B, 2] fixes the (shape, colour) per image; default: ``random_labels`` of each index.
    """
    scene = scene_batch(seed, start, batch, labels)
    return render(scene), np.stack([scene["shape"], scene["colour"]], axis=1)


def text_embedding_table() -> np.ndarray:
    """[len(SHAPES) + len(COLOURS) + NUM_TEXT_TOKENS, TEXT_DIM] fixed random rows (unit-variance entries):
    shape rows, colour rows, then one row per text position (added so tokens differ by position)."""
    return VOCABULARY.table()


def text_embeddings(labels, table: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(encoder_hidden_states [B, 8, 64], pooled_projections [B, 64]) for (shape, colour) labels [B, 2].

    Tokens 0-3 carry the shape row, tokens 4-7 the colour row, each plus its position row; the pooled
    vector is the mean of the shape and colour rows (as CLIP's pooled output summarises the prompt).
    """
    return VOCABULARY.embed(labels, table)


def pack(images, xp=np):
    """[B, H, W, C] -> [B, (H/2)(W/2), C*4] tokens, raster token order, channel order (c, ph, pw).
    ``xp``: numpy or jax.numpy."""
    images = xp.asarray(images)
    b, h, w, c = images.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"image size {h}x{w} must be divisible by the patch size {PATCH}")
    x = images.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> np.ndarray:
    """Inverse of ``pack``."""
    tokens = np.asarray(tokens)
    b, n, d = tokens.shape
    gh, gw, c = height // PATCH, width // PATCH, d // (PATCH * PATCH)
    if gh * gw != n or c * PATCH * PATCH != d:
        raise ValueError(f"tokens {tokens.shape} do not form a {height}x{width} image")
    x = tokens.reshape(b, gh, gw, c, PATCH, PATCH)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, height, width, c)
