"""README demo: the shipped tiny FLUX model, dense vs Chipmunk from the same noise, on the CPU.

    python -m chipmunk_jax.apps.tiny.generate [--images 4] [--steps 50] [--out tiny_flux_grid.png]

Prints PSNR / SSIM of the Chipmunk samples against the dense ones, the average attention / MLP sparsity
over all steps and layers, a label check (does each sample show the shape and colour it was asked
for?) and the sampling times; saves a PNG grid (rows: dense, Chipmunk, 4x |difference|).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.apps.images import image_grid, psnr, ssim, write_png
from chipmunk_jax.apps.tiny import IMAGE_GRID, load_shipped
from chipmunk_jax.apps.tiny import dataset as D
from chipmunk_jax.apps.tiny.label_check import NearestNeighbourCheck
from chipmunk_jax.apps.tiny.sampling import average_sparsity, sample_images, tiny_chipmunk_config

__all__ = ["main", "parse_labels", "check_demo_args"]


def parse_labels(text: str, count: int) -> np.ndarray:
    """"circle:red,square:blue" -> [[0, 0], [1, 2]], cycled to ``count`` images."""
    return D.VOCABULARY.parse(text, count)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="Euler steps (the FLUX preset's schedule is for 50)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--labels", default="circle:red,square:blue,triangle:yellow,ring:green,cross:white,diamond:magenta",
                   help="comma-separated shape:colour prompts, cycled over the images")
    p.add_argument("--weights", default=None, help="model folder (default: the shipped weights)")
    p.add_argument("--out", default="tiny_flux_grid.png")
    args = p.parse_args(argv)
    check_demo_args(p, args, "images", D.VOCABULARY)
    return args


def check_demo_args(parser: argparse.ArgumentParser, args, count: str, vocabulary) -> None:
    """The tiny demos' shared checks: ``--<count>`` (how many samples) >= 1 and ``--steps`` >= 2; ``args.labels``
    becomes the prompts parsed by ``vocabulary`` (a ``labels.LabelVocabulary``), cycled to that many samples.
    A bad value exits through ``parser.error``."""
    if getattr(args, count) < 1:
        parser.error(f"--{count} must be >= 1")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (Chipmunk's step 0 and 1 are dense)")
    try:
        args.labels = vocabulary.parse(args.labels, getattr(args, count))
    except ValueError as e:
        parser.error(str(e))


def main(argv=None):
    args = _parse(argv)
    start = time.perf_counter()
    model, params = load_shipped(args.weights)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    text, pooled = D.text_embeddings(args.labels)
    num_tokens = IMAGE_GRID[0] * IMAGE_GRID[1]
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(args.seed), (args.images, num_tokens, 12)))
    chipmunk = tiny_chipmunk_config(max(args.steps, 2))
    count = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(params))
    print(f"tiny FLUX ({count:,} parameters, {num_tokens} image + {D.NUM_TEXT_TOKENS} text tokens); "
          f"{args.images} images x {args.steps} steps on {jax.default_backend()}", flush=True)

    dense_packed, dense_s = sample_images(params, model, text, pooled, noise, num_steps=args.steps)
    sparse_packed, sparse_s = sample_images(params, model, text, pooled, noise, num_steps=args.steps,
                                              chipmunk=chipmunk)
    dense, sparse = D.unpack(dense_packed), D.unpack(sparse_packed)
    sparsity = average_sparsity(chipmunk, model, args.steps, num_tokens + D.NUM_TEXT_TOKENS)
    checker = NearestNeighbourCheck(bank_size=1000)
    dense_ok, sparse_ok = checker.accuracy(dense, args.labels), checker.accuracy(sparse, args.labels)

    diff = np.clip(4 * np.abs(sparse - dense) - 1, -1, 1)
    write_png(args.out, image_grid([dense, sparse, diff], scale=3))
    print(f"PSNR Chipmunk vs dense: {psnr(sparse, dense):.2f} dB   SSIM: {ssim(sparse, dense):.4f}")
    print(f"sparsity (average over all steps and layers): attention {100 * sparsity['attention']:.1f}%, "
          f"MLP {100 * sparsity['mlp']:.1f}%  (on sparse steps of sparse layers: attention "
          f"{100 * sparsity['attention_sparse_step']:.1f}%, MLP {100 * sparsity['mlp_sparse_step']:.1f}%)")
    show = lambda c: f"shape {100 * c['shape']:.0f}%, colour {100 * c['colour']:.0f}%"  # noqa: E731
    print(f"label check (as asked): dense {show(dense_ok)}; Chipmunk {show(sparse_ok)}")
    print(f"sampling time (compiled, CPU): dense {dense_s:.2f} s, Chipmunk {sparse_s:.2f} s "
          f"(the CPU path runs reference kernels: speed is measured on GPUs, see benchmarks/RESULTS.md)")
    print(f"saved {args.out} (rows: dense, Chipmunk, 4x |difference|); total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
