"""Quality harness: Chipmunk vs dense samples of the shipped tiny FLUX model, from the same noise.

    python -m chipmunk_jax.apps.quality [--images 8] [--steps 50] [--out benchmarks/quality] [--quick]

Sweeps attention top-k, MLP top-k, the full-step interval and step caching around the tiny FLUX preset
(``tiny_chipmunk_config``); for each setting reports PSNR / SSIM against the dense samples, the average
sparsity over all steps and sparse-capable layers, the label accuracy of a nearest-neighbour check, and
the sampling time. It also measures the paper's statistic (arXiv 2506.03275: "5-25% of attention/MLP
values explain 70-90% of the cross-step change") on the dense trajectory. Writes ``sweep.md``,
``results.json``, sample grids (PNG) and plots (PNG; matplotlib when importable, else Pillow) to ``--out``.
Quality against executed compute, with the step-caching baselines: ``python -m chipmunk_jax.apps.pareto``.

Metrics: PSNR and SSIM as in ``chipmunk_jax.apps.images``.
  Cross-step change: for consecutive dense steps t-1 -> t and each layer, the entries of the attention
    probabilities [B, H, S, S] and of the MLP hidden activations (after GELU) are sorted by |change|;
    reported is the smallest fraction of entries whose |change| sums to 70% / 90% of the total
    |change| (L1), averaged over step pairs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import sampling as SA
from chipmunk_jax.apps.images import image_grid, psnr, ssim, write_png
from chipmunk_jax.apps.tiny import IMAGE_GRID, load_shipped
from chipmunk_jax.apps.tiny import dataset as D
from chipmunk_jax.apps.tiny.label_check import NearestNeighbourCheck
from chipmunk_jax.apps.tiny.sampling import average_sparsity, sample_images, tiny_chipmunk_config
from chipmunk_jax.models import flux, mmdit
from chipmunk_jax.models.block_stack import block_at
from chipmunk_jax.models.layers import gelu_tanh, linear

__all__ = ["change_fractions", "cross_step_change", "line_chart", "write_charts", "COLOURS", "main"]


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


def _recording_forward(model: flux.FluxConfig, grid: tuple[int, int]):
    """Dense forward over a (height, width) token ``grid`` (same blocks as ``flux.forward``) that also returns
    each layer's attention probabilities [B, H, S, S] and MLP hidden activations (after GELU)."""

    def attention_op(q, k, v):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / jnp.sqrt(jnp.float32(q.shape[-1]))
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision="highest"), probs

    def mlp_op(x, w1, b1, w2, b2, w1_transposed=False):
        hidden = gelu_tanh(x @ (w1.T if w1_transposed else w1) + b1)
        y = hidden @ w2
        return (y if b2 is None else y + b2), hidden

    @jax.jit
    def run(params, x, sigma, text, pooled, rotary):
        conditioning = flux.timestep_conditioning(params, model, timestep=sigma, pooled_projections=pooled)
        img = linear(params["x_embedder"], x, jnp.float32, jnp.float32)
        txt = linear(params["context_embedder"], text, jnp.float32, jnp.float32)
        kw = dict(head_dim=model.attention_head_dim, dtype=jnp.float32, attention_op=attention_op, mlp_op=mlp_op)
        probs, hiddens = [], []
        # unrolled on purpose: every layer's probabilities and hidden features are kept for the analysis
        for i in range(model.num_layers):
            txt, img, (p, h) = mmdit.double_block(block_at(params["transformer_blocks"], i), img, txt, None, rotary,
                                                  text_first=True,
                                                  modulation=block_at(conditioning["transformer_blocks"], i), **kw)
            probs.append(p)
            hiddens.append(h)
        joint = jnp.concatenate([txt, img], axis=1)
        for i in range(model.num_single_layers):
            joint, (p, h) = mmdit.single_block(block_at(params["single_transformer_blocks"], i), joint, None, rotary,
                                               modulation=block_at(conditioning["single_transformer_blocks"], i), **kw)
            probs.append(p)
            hiddens.append(h)
        velocity = flux.head(params, model, joint[:, text.shape[1]:], conditioning, grid=grid, dtype=jnp.float32)
        return velocity, probs, hiddens

    return run


def cross_step_change(params, model: flux.FluxConfig, text, pooled, noise, *, num_steps: int,
                      grid=(32, 32), levels=(0.7, 0.9)) -> dict:
    """Runs the dense Euler trajectory and measures ``change_fractions`` between consecutive steps per
    layer. Returns {"attention"|"mlp": [layers][step pairs][levels], "curves": ...}."""
    run = _recording_forward(model, grid)
    sigmas = SA.flow_sigmas(num_steps, mu=SA.flux_shift(noise.shape[1]))
    img_ids = flux.image_ids(grid)
    txt_ids = np.zeros((text.shape[1], 3), np.float32)
    rotary = flux.pos_embed(model, txt_ids, img_ids)
    x = jnp.asarray(noise, jnp.float32)
    result = {"attention": [[] for _ in range(model.num_sparse_layers)],
              "mlp": [[] for _ in range(model.num_sparse_layers)], "levels": list(levels)}
    previous = None
    for i in range(num_steps):
        v, probs, hiddens = run(params, x, sigmas[i], jnp.asarray(text), jnp.asarray(pooled), rotary)
        current = ([np.asarray(p) for p in probs], [np.asarray(h) for h in hiddens])
        if previous is not None:
            for layer in range(model.num_sparse_layers):
                result["attention"][layer].append(change_fractions(previous[0][layer], current[0][layer], levels))
                result["mlp"][layer].append(change_fractions(previous[1][layer], current[1][layer], levels))
        previous = current
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return result


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


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def write_charts(out: Path, charts: dict) -> list[str]:
    """Writes each chart of ``charts`` ({file name: (title, series, x_label, y_label)}, series as ``line_chart``'s)
    into ``out``: matplotlib when importable, else Pillow's ``line_chart``, else none. Returns the names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        try:
            import PIL  # noqa: F401
        except ImportError:
            print("neither matplotlib nor Pillow is importable: no plots (the data is in the results json)")
            return []
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


def _plot(out: Path, results: dict) -> list[str]:
    """cross_step_change.png (per step, per layer) and sweep_psnr.png (PSNR vs average sparsity)."""
    change = results["cross_step_change"]
    charts = {}
    for op in ("attention", "mlp"):
        series = []
        for layer, pairs in enumerate(change[op]):
            pairs = 100 * np.asarray(pairs)
            steps = np.arange(1, len(pairs) + 1)
            series.append((f"layer {layer} 70%", steps, pairs[:, 0], COLOURS[layer % 6], False))
            series.append((f"layer {layer} 90%", steps, pairs[:, 1], COLOURS[layer % 6], True))
        charts[f"cross_step_change_{op}.png"] = (
            f"{op}: % of entries holding 70% (line) / 90% (dots) of the step-to-step |change|", series,
            "sampling step t (change t-1 -> t)", "% of entries")
    sweeps = {"attention top-k": "attention", "MLP top-k": "mlp", "full step every": "attention"}
    series = []
    for i, (prefix, axis) in enumerate(sweeps.items()):
        rows = [s for s in results["settings"] if s["name"].startswith(prefix) or s["name"] == "FLUX preset (tiny)"]
        rows.sort(key=lambda s: s["sparsity"][axis])
        series.append((f"{prefix} (x: {axis})", [100 * s["sparsity"][axis] for s in rows],
                       [s["psnr"] for s in rows], COLOURS[i], False))
    charts["sweep_psnr.png"] = ("PSNR vs dense samples, by the swept setting's average sparsity", series,
                                "average sparsity over all steps and layers (%)", "PSNR (dB)")
    return write_charts(out, charts)


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
