"""Quality harness: Chipmunk vs dense samples of the shipped tiny FLUX model, from the same noise.

    python -m chipmunk_jax.quality [--images 8] [--steps 50] [--out benchmarks/quality] [--quick]

Sweeps attention top-k, MLP top-k, the full-step interval and step caching around the tiny FLUX preset
(``tiny_chipmunk_config``); for each setting reports PSNR / SSIM against the dense samples, the average
sparsity over all steps and sparse-capable layers, the label accuracy of a nearest-neighbour check, and
the sampling time. It also measures the paper's statistic (arXiv 2506.03275: "5-25% of attention/MLP
values explain 70-90% of the cross-step change") on the dense trajectory. Writes ``sweep.md``,
``results.json``, sample grids (PNG) and plots (PNG; matplotlib when importable, else Pillow) to ``--out``.

Metrics (images in [-1, 1], compared on [0, 1]):
  PSNR: 10 log10(1 / MSE) per image, averaged over images.
  SSIM: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, "valid"
    windows only, per channel, averaged over channels, pixels and images.
  Cross-step change: for consecutive dense steps t-1 -> t and each layer, the entries of the attention
    probabilities [B, H, S, S] and of the MLP hidden activations (after GELU) are sorted by |change|;
    reported is the smallest fraction of entries whose |change| sums to 70% / 90% of the total
    |change| (L1), averaged over step pairs.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import config as C
from chipmunk_jax import sampling as SA
from chipmunk_jax.cache import StepCache
from chipmunk_jax.models import flux, mmdit
from chipmunk_jax.models.inputs import batch_vector
from chipmunk_jax.models.layers import gelu_tanh
from chipmunk_jax.schedule import AttentionStep, MLPStep, attention_schedule, mlp_schedule, model_schedule, ModelStep

__all__ = [
    "psnr",
    "ssim",
    "tiny_chipmunk_config",
    "sample_images",
    "average_sparsity",
    "change_fractions",
    "cross_step_change",
    "NearestNeighbourCheck",
    "write_png",
    "image_grid",
    "line_chart",
    "main",
]


# ----------------------------------------------------------------------------------------------
# Image metrics


def _as_unit(images) -> np.ndarray:
    images = np.asarray(images, np.float64)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [B, H, W, C] with C in (1, 3), got shape {images.shape}")
    return np.clip((images + 1.0) / 2.0, 0.0, 1.0)


def psnr(images, reference) -> float:
    """Mean per-image PSNR (dB) of [B, H, W, C] images in [-1, 1] against ``reference`` (peak 1 on [0, 1])."""
    a, b = _as_unit(images), _as_unit(reference)
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
    a, b = _as_unit(images), _as_unit(reference)
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


# ----------------------------------------------------------------------------------------------
# Chipmunk settings for the tiny model


def tiny_chipmunk_config(num_steps: int = 50, **changes) -> C.ChipmunkConfig:
    """``config.flux()`` adapted to the tiny model (1,024 image + 8 text tokens, MLP width 512, 6 blocks).

    Changes from the FLUX preset, and why:
      attention.counts_multiple_of 112 -> 8: at 1,032 keys a 112 multiple rounds 16.5% up to 21.7%
        (tk 224); 8 keeps tk = 168 (16.3%), the preset's fraction.
      mlp.counts_multiple_of 256 -> 8: the tiny MLP has only 512 features, so a 256 multiple would round
        the preset's 30% (154) up to 50% (256).
      attention/mlp.first_n_dense_layers 2 -> 1: 2 of FLUX's 57 layers are dense; 2 of our 6 would be
        a third of the model, 1 keeps the first block dense as the original does for its first layers.
      num_steps = the sampling steps (the preset's 10-step full-step interval and the 50-step step-cache
        schedule are kept as they are).
    ``changes`` are ``ChipmunkConfig.replace`` keywords applied on top.
    """
    base = C.flux().replace(
        num_steps=num_steps,
        attention__counts_multiple_of=8,
        attention__first_n_dense_layers=1,
        mlp__counts_multiple_of=8,
        mlp__first_n_dense_layers=1,
    )
    return base.replace(**changes) if changes else base


def average_sparsity(chipmunk: C.ChipmunkConfig, model: flux.FluxConfig, num_steps: int,
                     num_tokens: int) -> dict[str, float]:
    """Fraction of attention key-columns / MLP features skipped, averaged over all steps and all of the
    model's layers (always-dense layers, full steps and dense steps count as 0); skipped steps (step
    caching) count as fully sparse for both. Nominal counts from the config (random extras included)."""
    from chipmunk_jax.selection import attention_column_count, mlp_feature_count

    layers = model.num_sparse_layers
    a, m = chipmunk.attention, chipmunk.mlp
    tk = min(attention_column_count(a.top_keys, num_tokens, a.counts_multiple_of), num_tokens)
    attn_sparse = 1.0 - min(1.0, tk / num_tokens + a.random_keys)
    fk = mlp_feature_count(m.top_keys, model.mlp_hidden_dim)
    fk = min(model.mlp_hidden_dim, -(-fk // m.counts_multiple_of) * m.counts_multiple_of)
    mlp_sparse = 1.0 - min(1.0, fk / model.mlp_hidden_dim + m.random_keys)
    skip = model_schedule(chipmunk)[:num_steps] == ModelStep.SKIP
    a_kinds, m_kinds = attention_schedule(chipmunk)[:num_steps], mlp_schedule(chipmunk)[:num_steps]
    attn_layers = max(0, layers - a.first_n_dense_layers) if a.enabled else 0
    mlp_layers = max(0, layers - m.first_n_dense_layers) if m.enabled else 0
    attn = np.where(skip, 1.0, (a_kinds == AttentionStep.SPARSE) * attn_sparse * attn_layers / layers)
    mlp = np.where(skip, 1.0, np.isin(m_kinds, (MLPStep.SPARSE_SELECT, MLPStep.SPARSE_REUSE))
                   * mlp_sparse * mlp_layers / layers)
    return {"attention": float(attn.mean()), "mlp": float(mlp.mean()), "skipped_steps": int(skip.sum()),
            "attention_sparse_step": attn_sparse, "mlp_sparse_step": mlp_sparse}


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_images(params, model: flux.FluxConfig, text, pooled, noise, *, num_steps: int,
                  chipmunk: C.ChipmunkConfig | None = None, key=None, image_grid=(32, 32)):
    """Euler flow-matching samples from ``noise`` [B, N, C] (packed) with FLUX's shift for N tokens.

    Returns (packed samples [B, N, C] numpy float32, seconds of the second, compiled, run)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    noise = np.asarray(noise, np.float32)  # host copy: the sampler donates (deletes) its latents
    batch, num_img, _ = noise.shape
    if num_img != image_grid[0] * image_grid[1]:
        raise ValueError(f"noise has {num_img} tokens, image_grid {image_grid} holds {image_grid[0] * image_grid[1]}")
    sigmas = SA.flow_sigmas(num_steps, mu=SA.flux_shift(num_img))
    sampler_config = chipmunk if chipmunk is not None else C.ChipmunkConfig(num_steps=num_steps)
    den = flux.denoiser(model, chipmunk, image_grid=image_grid, dtype=jnp.float32)
    cond = flux.sampling_cond(model, chipmunk, encoder_hidden_states=jnp.asarray(text),
                              pooled_projections=jnp.asarray(pooled), image_grid=image_grid)
    perm = flux.sampling_permutation(chipmunk, image_grid)
    run = SA.make_sampler(den, sampler_config, sigmas)
    key = jax.random.PRNGKey(0) if key is None else key

    def once():
        latents = jnp.asarray(noise if perm is None else noise[:, perm])
        cache = None if chipmunk is None else flux.init_cache(
            model, chipmunk, batch=batch, num_image_tokens=num_img, num_text_tokens=text.shape[1], dtype=jnp.float32)
        step_cache = StepCache(hidden=jnp.zeros((batch, num_img, model.inner_dim), jnp.float32), valid=jnp.bool_(False))
        out, _, _ = run(params, latents, cond, cache, step_cache, key)
        out = np.asarray(jax.block_until_ready(out))
        return out if perm is None else out[:, np.argsort(perm)]

    once()  # compile
    start = time.perf_counter()
    out = once()
    return out, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# The paper's statistic: how concentrated the cross-step change is


def change_fractions(previous, current, levels=(0.7, 0.9)) -> list[float]:
    """Smallest fraction of entries whose |current - previous| sums to each level of the total |change|."""
    delta = np.abs(np.asarray(current, np.float64) - np.asarray(previous, np.float64)).ravel()
    total = delta.sum()
    if total == 0:
        return [0.0 for _ in levels]
    cumulative = np.cumsum(np.sort(delta)[::-1]) / total
    return [float((np.searchsorted(cumulative, level) + 1) / delta.size) for level in levels]


def _recording_forward(model: flux.FluxConfig):
    """Dense forward (same blocks as ``flux.forward``) that also returns each layer's attention
    probabilities [B, H, S, S] and MLP hidden activations (after GELU)."""

    def attention_op(q, k, v):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / jnp.sqrt(jnp.float32(q.shape[-1]))
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision="highest"), probs

    def mlp_op(x, w1, b1, w2, b2, w1_transposed=False):
        hidden = gelu_tanh(x @ (w1.T if w1_transposed else w1) + b1)
        y = hidden @ w2
        return (y if b2 is None else y + b2), hidden

    @jax.jit
    def run(params, x, sigma, text, pooled, img_ids, txt_ids, rotary):
        batch = x.shape[0]
        temb = flux._time_text_embed(params["time_text_embed"], batch_vector(sigma, batch), None, pooled)
        img = flux.linear(params["x_embedder"], x, jnp.float32, jnp.float32)
        txt = flux.linear(params["context_embedder"], text, jnp.float32, jnp.float32)
        kw = dict(head_dim=model.attention_head_dim, dtype=jnp.float32, attention_op=attention_op, mlp_op=mlp_op)
        probs, hiddens = [], []
        for block in params["transformer_blocks"]:
            txt, img, (p, h) = mmdit.double_block(block, img, txt, temb, rotary, text_first=True, **kw)
            probs.append(p)
            hiddens.append(h)
        joint = jnp.concatenate([txt, img], axis=1)
        for block in params["single_transformer_blocks"]:
            joint, (p, h) = mmdit.single_block(block, joint, temb, rotary, **kw)
            probs.append(p)
            hiddens.append(h)
        velocity = flux._final_layer(params, joint[:, text.shape[1]:], flux._norm_out_modulation(params, temb),
                                     jnp.float32)
        return velocity, probs, hiddens

    return run


def cross_step_change(params, model: flux.FluxConfig, text, pooled, noise, *, num_steps: int,
                      image_grid=(32, 32), levels=(0.7, 0.9)) -> dict:
    """Runs the dense Euler trajectory and measures ``change_fractions`` between consecutive steps per
    layer. Returns {"attention"|"mlp": [layers][step pairs][levels], "curves": ...}."""
    run = _recording_forward(model)
    sigmas = SA.flow_sigmas(num_steps, mu=SA.flux_shift(noise.shape[1]))
    img_ids = flux.image_ids(image_grid)
    txt_ids = np.zeros((text.shape[1], 3), np.float32)
    rotary = flux.rotary_emb(model, txt_ids, img_ids)
    x = jnp.asarray(noise, jnp.float32)
    result = {"attention": [[] for _ in range(model.num_sparse_layers)],
              "mlp": [[] for _ in range(model.num_sparse_layers)], "levels": list(levels)}
    previous = None
    for i in range(num_steps):
        v, probs, hiddens = run(params, x, sigmas[i], jnp.asarray(text), jnp.asarray(pooled), img_ids, txt_ids, rotary)
        current = ([np.asarray(p) for p in probs], [np.asarray(h) for h in hiddens])
        if previous is not None:
            for layer in range(model.num_sparse_layers):
                result["attention"][layer].append(change_fractions(previous[0][layer], current[0][layer], levels))
                result["mlp"][layer].append(change_fractions(previous[1][layer], current[1][layer], levels))
        previous = current
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return result


# ----------------------------------------------------------------------------------------------
# Distribution check


class NearestNeighbourCheck:
    """Label check of generated images against their conditioning (shape, colour).

    Foreground = pixels whose brightest channel exceeds 0.65 on [0, 1] (every background pixel of the
    dataset is below 0.5, every foreground colour above 0.8). Colour: the palette entry closest in
    direction (cosine) to the mean foreground colour. Shape: 1-nearest-neighbour (Euclidean) of the
    foreground mask, cropped 40x40 around its centroid and pooled to 20x20, against a bank of real
    dataset images. Run on held-out real images it gives the check's own ceiling.
    """

    def __init__(self, bank_size: int = 3000, seed: int = 7):
        from chipmunk_jax.tiny import dataset as D

        images, labels = D.make_batch(seed, 0, bank_size)
        self.palette = np.asarray(list(D.COLOURS.values()), np.float32)
        self.features, self.labels = self._shape_features(images), labels

    @staticmethod
    def _masks(images):
        return (_as_unit(images).max(axis=-1) > 0.65).astype(np.float32)

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
        unit, masks = _as_unit(images), self._masks(images)
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
    from chipmunk_jax.tiny.dataset import to_uint8

    lines = []
    for row in rows:
        tiles = [np.pad(t, ((gap, gap), (gap, gap), (0, 0)), constant_values=255) for t in to_uint8(row)]
        lines.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(lines, axis=0)
    return grid.repeat(scale, 0).repeat(scale, 1)


# ----------------------------------------------------------------------------------------------
# Sweep


def _sweep_settings(quick: bool):
    settings = [("FLUX preset (tiny)", {})]
    if quick:
        return settings + [("attention top-k 0.05", {"attention__top_keys": 0.05})]
    settings += [(f"attention top-k {v}", {"attention__top_keys": v}) for v in (0.05, 0.1, 0.3)]
    settings += [(f"MLP top-k {v}", {"mlp__top_keys": v}) for v in (0.1, 0.2, 0.5)]
    settings += [(f"full step every {v}", {"attention__full_step_every": v, "mlp__full_step_every": v})
                 for v in (5, 20)]
    settings += [("+ step caching", {"step_cache__enabled": True})]
    settings += [("attention only", {"mlp__enabled": False}), ("MLP only", {"attention__enabled": False})]
    return settings


def line_chart(path, title: str, series, *, x_label: str, y_label: str, size=(640, 400)) -> None:
    """A plain line chart with Pillow's ImageDraw (used when matplotlib is not installed).

    series: [(label, xs, ys, (r, g, b), marker_only)], drawn in a shared axis box with a legend."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, w - 200, 48, h - 45
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    xs_all = np.concatenate([np.asarray(s[1], float) for s in series])
    ys_all = np.concatenate([np.asarray(s[2], float) for s in series])
    x0, x1 = float(xs_all.min()), float(xs_all.max())
    y0, y1 = min(0.0, float(ys_all.min())), float(ys_all.max()) * 1.08 or 1.0
    x1 = x1 if x1 > x0 else x0 + 1
    px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)  # noqa: E731
    py = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)  # noqa: E731
    for t in np.linspace(y0, y1, 5):
        draw.line([(left, py(t)), (right, py(t))], fill=(225, 225, 225))
        draw.text((5, py(t) - 6), f"{t:.3g}", fill="black")
    for t in np.linspace(x0, x1, 5):
        draw.text((px(t) - 10, bottom + 5), f"{t:.3g}", fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    draw.text(((left + right) // 2 - 40, h - 20), x_label, fill="black")
    draw.text((5, 26), y_label, fill="black")
    for i, (label, xs, ys, colour, marker_only) in enumerate(series):
        points = [(px(x), py(y)) for x, y in zip(xs, ys)]
        if not marker_only and len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.line([(right + 10, top + 10 + 16 * i), (right + 30, top + 10 + 16 * i)], fill=colour, width=3)
        draw.text((right + 35, top + 4 + 16 * i), label, fill="black")
    img.save(path)


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _plot(out: Path, results: dict) -> list[str]:
    """cross_step_change.png (per step, per layer) and sweep_psnr.png (PSNR vs average sparsity);
    matplotlib when importable, else Pillow, else none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        try:
            import PIL  # noqa: F401
        except ImportError:
            print("neither matplotlib nor Pillow is importable: no plots (the data is in results.json)")
            return []
    change = results["cross_step_change"]
    charts = {}
    for op in ("attention", "mlp"):
        series = []
        for layer, pairs in enumerate(change[op]):
            pairs = 100 * np.asarray(pairs)
            steps = np.arange(1, len(pairs) + 1)
            series.append((f"layer {layer} 70%", steps, pairs[:, 0], _COLOURS[layer % 6], False))
            series.append((f"layer {layer} 90%", steps, pairs[:, 1], _COLOURS[layer % 6], True))
        charts[f"cross_step_change_{op}.png"] = (
            f"{op}: % of entries holding 70% (line) / 90% (dots) of the step-to-step |change|", series,
            "sampling step t (change t-1 -> t)", "% of entries")
    sweeps = {"attention top-k": "attention", "MLP top-k": "mlp", "full step every": "attention"}
    series = []
    for i, (prefix, axis) in enumerate(sweeps.items()):
        rows = [s for s in results["settings"] if s["name"].startswith(prefix) or s["name"] == "FLUX preset (tiny)"]
        rows.sort(key=lambda s: s["sparsity"][axis])
        series.append((f"{prefix} (x: {axis})", [100 * s["sparsity"][axis] for s in rows],
                       [s["psnr"] for s in rows], _COLOURS[i], False))
    charts["sweep_psnr.png"] = ("PSNR vs dense samples, by the swept setting's average sparsity", series,
                                "average sparsity over all steps and layers (%)", "PSNR (dB)")
    written = []
    for name, (title, series, x_label, y_label) in charts.items():
        if plt is None:
            line_chart(out / name, title, series, x_label=x_label, y_label=y_label)
        else:
            fig, ax = plt.subplots(figsize=(7, 4))
            for label, xs, ys, colour, marker_only in series:
                ax.plot(xs, ys, "o" if marker_only else "o-", color=np.asarray(colour) / 255, label=label, ms=3)
            ax.set(title=title, xlabel=x_label, ylabel=y_label)
            ax.title.set_fontsize(8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
            fig.tight_layout()
            fig.savefig(out / name, dpi=120)
            plt.close(fig)
        written.append(name)
    return written


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8, help="samples per setting (batch)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--change-images", type=int, default=2, help="batch for the cross-step change statistic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=None, help="model folder (default: the shipped weights)")
    p.add_argument("--out", default="benchmarks/quality")
    p.add_argument("--quick", action="store_true", help="two settings only (smoke test)")
    args = p.parse_args(argv)
    for name in ("images", "steps", "change_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None):
    from chipmunk_jax.tiny import IMAGE_GRID, load_shipped
    from chipmunk_jax.tiny import dataset as D

    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, params = load_shipped(args.weights)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    rng = np.random.default_rng(args.seed)
    labels = np.stack([np.arange(args.images) % len(D.SHAPES),
                       rng.integers(len(D.COLOURS), size=args.images)], axis=1).astype(np.int32)
    text, pooled = D.text_embeddings(labels)
    num_tokens = IMAGE_GRID[0] * IMAGE_GRID[1]
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(args.seed), (args.images, num_tokens, 12)))
    checker = NearestNeighbourCheck()
    held_out, held_labels = D.make_batch(12345, 0, 200)
    results = {"steps": args.steps, "images": args.images, "labels": labels.tolist(),
               "nn_check_on_real": checker.accuracy(held_out, held_labels), "settings": []}

    print(f"dense: {args.images} images, {args.steps} steps ...", flush=True)
    dense_packed, dense_time = sample_images(params, model, text, pooled, noise, num_steps=args.steps)
    dense = D.unpack(dense_packed)
    results["dense"] = {"seconds": dense_time, "nn_check": checker.accuracy(dense, labels)}
    rows = [D.make_batch(99, 0, args.images, labels)[0], dense]
    for name, changes in _sweep_settings(args.quick):
        chipmunk = tiny_chipmunk_config(args.steps, **changes)
        packed, seconds = sample_images(params, model, text, pooled, noise, num_steps=args.steps, chipmunk=chipmunk)
        images = D.unpack(packed)
        entry = {"name": name, "changes": changes, "psnr": psnr(images, dense), "ssim": ssim(images, dense),
                 "sparsity": average_sparsity(chipmunk, model, args.steps, num_tokens + D.NUM_TEXT_TOKENS),
                 "seconds": seconds, "nn_check": checker.accuracy(images, labels)}
        results["settings"].append(entry)
        print(f"{name:24s} PSNR {entry['psnr']:6.2f} dB  SSIM {entry['ssim']:.4f}  "
              f"attn {100 * entry['sparsity']['attention']:4.1f}% mlp {100 * entry['sparsity']['mlp']:4.1f}% sparse  "
              f"{seconds:.1f} s", flush=True)
        if name == "FLUX preset (tiny)":
            rows.append(images)

    print("cross-step change statistic ...", flush=True)
    change = cross_step_change(params, model, text[:args.change_images], pooled[:args.change_images],
                               noise[:args.change_images], num_steps=args.steps)
    results["cross_step_change"] = change
    write_png(out / "samples_real_dense_chipmunk.png", image_grid(rows))
    results["plots"] = _plot(out, results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "sweep.md").write_text(markdown_report(results))
    print(markdown_report(results))
    return 0


def markdown_report(results: dict) -> str:
    lines = [f"Tiny FLUX, {results['images']} images x {results['steps']} Euler steps, f32 CPU, same noise as dense.",
             "", "| setting | PSNR vs dense (dB) | SSIM vs dense | attn sparsity (avg) | MLP sparsity (avg) | "
             "label check shape / colour / both | time (s) |", "|---|---|---|---|---|---|---|"]
    d = results["dense"]
    check = lambda c: f"{100 * c['shape']:.0f}% / {100 * c['colour']:.0f}% / {100 * c['both']:.0f}%"  # noqa: E731
    lines.append(f"| dense | inf | 1.0000 | 0% | 0% | {check(d['nn_check'])} | {d['seconds']:.1f} |")
    for s in results["settings"]:
        lines.append(f"| {s['name']} | {s['psnr']:.2f} | {s['ssim']:.4f} | {100 * s['sparsity']['attention']:.1f}% | "
                     f"{100 * s['sparsity']['mlp']:.1f}% | {check(s['nn_check'])} | {s['seconds']:.1f} |")
    real = results["nn_check_on_real"]
    lines += ["", f"NN label check on 200 held-out real images (ceiling): shape {100 * real['shape']:.0f}%, "
              f"colour {100 * real['colour']:.0f}%, both {100 * real['both']:.0f}%.", ""]
    change = results.get("cross_step_change")
    if change:
        lines += ["Cross-step change (dense trajectory): % of entries holding 70% / 90% of the L1 change, "
                  "mean (min-max) over step pairs.", "", "| layer | attention 70% | attention 90% | MLP 70% | MLP 90% |",
                  "|---|---|---|---|---|"]
        for layer in range(len(change["attention"])):
            cells = []
            for op in ("attention", "mlp"):
                pairs = 100 * np.asarray(change[op][layer])
                cells += [f"{pairs[:, i].mean():.1f} ({pairs[:, i].min():.1f}-{pairs[:, i].max():.1f})" for i in (0, 1)]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
