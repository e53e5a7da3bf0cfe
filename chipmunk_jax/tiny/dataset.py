"""Procedural "shapes" dataset for the tiny FLUX model: 64x64 RGB scenes made by the project, no downloads.

Each image: a two-colour linear gradient background (random direction) with a faint sinusoidal texture,
and one anti-aliased foreground shape of a given class and colour at a jittered position and size.
The label is ``(shape, colour)``; ``text_embeddings`` turns it into FLUX's text inputs.

Deterministic: image ``i`` of seed ``s`` depends only on ``(s, i)`` (its own numpy Generator), so any
slice of the stream can be regenerated anywhere.

Pixel values are float32 in [-1, 1], layout [H, W, 3]. ``pack`` / ``unpack`` convert to FLUX's packed
token layout (2x2 patches, channel order (c, ph, pw) as FLUX packs latents, MODELS.md §1.1).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "SHAPES",
    "COLOURS",
    "IMAGE_SIZE",
    "PATCH",
    "NUM_TEXT_TOKENS",
    "TEXT_DIM",
    "make_image",
    "make_batch",
    "random_labels",
    "text_embedding_table",
    "text_embeddings",
    "pack",
    "unpack",
    "to_uint8",
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
# The embedding table is a fixed random matrix (no learning): a stand-in for a frozen text encoder.
_TABLE_SEED = 20250603


def _check_index(name, value, upper=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if upper is not None and value >= upper:
        raise ValueError(f"{name} must be < {upper}, got {value}")


def _shape_mask(shape: str, yy, xx, cy, cx, radius):
    """Soft coverage in [0, 1] from a signed distance (pixels; negative inside), 1-pixel edge."""
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        dist = np.hypot(dx, dy) - radius
    elif shape == "square":
        dist = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * radius
    elif shape == "ring":
        dist = np.abs(np.hypot(dx, dy) - 0.75 * radius) - 0.28 * radius
    elif shape == "cross":
        arm = 0.3 * radius
        horizontal = np.maximum(np.abs(dx) - radius, np.abs(dy) - arm)
        vertical = np.maximum(np.abs(dy) - radius, np.abs(dx) - arm)
        dist = np.minimum(horizontal, vertical)
    elif shape == "diamond":
        dist = (np.abs(dx) + np.abs(dy) - 1.1 * radius) / np.sqrt(2.0)
    elif shape == "triangle":
        # upward equilateral triangle: max of the three edge half-plane distances
        r = 1.1 * radius
        n = np.array([[0.0, 1.0], [np.sqrt(3) / 2, -0.5], [-np.sqrt(3) / 2, -0.5]])
        # with image y pointing down, "up" is -y: the bottom edge has normal (0, +1) in (x, y)
        dists = [dx * nx + dy * ny - 0.5 * r for nx, ny in n]
        dist = np.maximum(np.maximum(dists[0], dists[1]), dists[2])
    else:  # pragma: no cover - guarded by make_image
        raise ValueError(shape)
    return np.clip(0.5 - dist, 0.0, 1.0)


def make_image(seed: int, index: int, shape: int, colour: int) -> np.ndarray:
    """Image ``index`` of stream ``seed`` with the given shape and colour ids: [64, 64, 3] float32 in [-1, 1]."""
    _check_index("seed", seed)
    _check_index("index", index)
    _check_index("shape", shape, len(SHAPES))
    _check_index("colour", colour, len(COLOURS))
    rng = np.random.default_rng([seed, index])
    size = IMAGE_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    # background: dark-to-mid gradient so every foreground colour stays visible
    c0, c1 = rng.uniform(0.05, 0.45, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / size + 0.5
    ramp = np.clip(ramp, 0.0, 1.0)[..., None]
    image = c0 * (1 - ramp) + c1 * ramp
    freq, phase, tex_angle = rng.uniform(0.15, 0.45), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
    texture = np.sin(freq * (xx * np.cos(tex_angle) + yy * np.sin(tex_angle)) + phase)
    image = image + 0.05 * texture[..., None]

    radius = rng.uniform(10.0, 15.0)
    cy, cx = size / 2 + rng.uniform(-8, 8, size=2)
    mask = _shape_mask(SHAPES[shape], yy, xx, cy, cx, radius)[..., None]
    shade = np.asarray(list(COLOURS.values())[colour], np.float32) * rng.uniform(0.85, 1.0)
    image = image * (1 - mask) + shade * mask
    return (np.clip(image, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def random_labels(seed: int, index: int) -> tuple[int, int]:
    """The (shape, colour) the training stream uses for image ``index`` (uniform, deterministic)."""
    _check_index("seed", seed)
    _check_index("index", index)
    rng = np.random.default_rng([seed, index, 1])
    return int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS)))


def make_batch(seed: int, start: int, batch: int, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``start .. start+batch-1`` of stream ``seed``: ([B, 64, 64, 3] float32, [B, 2] int32 labels).

    ``labels`` [B, 2] fixes the (shape, colour) per image; default: ``random_labels`` of each index.
    """
    _check_index("start", start)
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if labels is None:
        labels = np.array([random_labels(seed, start + i) for i in range(batch)], np.int32)
    labels = np.asarray(labels, np.int32)
    if labels.shape != (batch, 2):
        raise ValueError(f"labels must be [{batch}, 2] (shape, colour) ids, got shape {labels.shape}")
    images = np.stack([make_image(seed, start + i, int(s), int(c)) for i, (s, c) in enumerate(labels)])
    return images, labels


def text_embedding_table() -> np.ndarray:
    """[len(SHAPES) + len(COLOURS) + NUM_TEXT_TOKENS, TEXT_DIM] fixed random rows (unit-variance entries):
    shape rows, colour rows, then one row per text position (added so tokens differ by position)."""
    rng = np.random.default_rng(_TABLE_SEED)
    rows = len(SHAPES) + len(COLOURS) + NUM_TEXT_TOKENS
    return rng.standard_normal((rows, TEXT_DIM)).astype(np.float32)


def text_embeddings(labels, table: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(encoder_hidden_states [B, 8, 64], pooled_projections [B, 64]) for (shape, colour) labels [B, 2].

    Tokens 0-3 carry the shape row, tokens 4-7 the colour row, each plus its position row; the pooled
    vector is the mean of the shape and colour rows (as CLIP's pooled output summarises the prompt).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != 2:
        raise ValueError(f"labels must be [B, 2] (shape, colour) ids, got shape {labels.shape}")
    if labels.min(initial=0) < 0 or (labels[:, 0] >= len(SHAPES)).any() or (labels[:, 1] >= len(COLOURS)).any():
        raise ValueError(f"labels out of range: shapes < {len(SHAPES)}, colours < {len(COLOURS)}")
    table = text_embedding_table() if table is None else np.asarray(table, np.float32)
    shape_rows = table[labels[:, 0]]
    colour_rows = table[len(SHAPES) + labels[:, 1]]
    position_rows = table[len(SHAPES) + len(COLOURS):]
    half = NUM_TEXT_TOKENS // 2
    tokens = np.concatenate(
        [np.repeat(shape_rows[:, None], half, 1), np.repeat(colour_rows[:, None], NUM_TEXT_TOKENS - half, 1)], 1
    )
    tokens = tokens + 0.5 * position_rows[None]
    pooled = 0.5 * (shape_rows + colour_rows)
    return tokens.astype(np.float32), pooled.astype(np.float32)


def pack(images) -> np.ndarray:
    """[B, H, W, C] -> [B, (H/2)(W/2), C*4] tokens, raster token order, channel order (c, ph, pw)."""
    images = np.asarray(images)
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


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255]."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
