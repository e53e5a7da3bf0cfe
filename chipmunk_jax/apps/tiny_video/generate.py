"""Offline demo: the shipped tiny Wan video model, dense vs Chipmunk from the same noise, on the CPU.

    python -m chipmunk_jax.apps.tiny_video.generate [--videos 4] [--steps 50] [--out tiny_wan_strip.gif]

Prints PSNR / SSIM of the Chipmunk samples against the dense ones, the nominal attention sparsity, a label
check (does each sample show the shape, colour and motion it was asked for?) and the sampling times; saves an
animated GIF with one row per video: dense | Chipmunk | 4x |difference|.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.pipelines.video import write_video
from chipmunk_jax.apps.images import psnr, ssim, video_grid
from chipmunk_jax.apps.tiny.generate import check_demo_args
from chipmunk_jax.apps.tiny_video import load_shipped
from chipmunk_jax.apps.tiny_video import dataset as D
from chipmunk_jax.apps.tiny_video.label_check import VideoLabelCheck
from chipmunk_jax.apps.tiny_video.sampling import sample_videos, tiny_video_chipmunk_config, video_sparsity

__all__ = ["main", "video_psnr", "video_ssim", "strip_frames"]


def video_psnr(videos, reference) -> float:
    """Mean per-video PSNR (dB; one MSE over all frames of a video) of [B, F, H, W, 3] videos in [-1, 1]."""
    b, f, h, w, c = np.shape(videos)
    return psnr(np.reshape(videos, (b, f * h, w, c)), np.reshape(reference, (b, f * h, w, c)))


def video_ssim(videos, reference) -> float:
    """Mean SSIM over every frame of [B, F, H, W, 3] videos in [-1, 1] (frame by frame: no window across frames)."""
    frames = lambda v: np.reshape(v, (-1,) + np.shape(v)[2:])  # noqa: E731
    return ssim(frames(videos), frames(reference))


def strip_frames(dense, sparse, *, scale: int = 3) -> np.ndarray:
    """uint8 frames [F, H', W', 3] of one row per video: dense | Chipmunk | 4x |difference| (white = 0.25 apart
    on [0, 1])."""
    diff = np.clip(4 * np.abs(sparse - dense) - 1, -1, 1)
    rows = [np.stack([d, s, x]) for d, s, x in zip(dense, sparse, diff)]
    return video_grid(rows, scale=scale)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="Euler steps (the Wan preset's schedule is for 50)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--labels", default="circle:red:right,square:blue:up,triangle:yellow:down-left,ring:green:left,"
                   "cross:white:down,diamond:magenta:up-right",
                   help="comma-separated shape:colour:direction prompts, cycled over the videos")
    p.add_argument("--weights", default=None, help="model folder (default: the shipped weights)")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--out", default="tiny_wan_strip.gif", help=".gif, .webp or .mp4 (write_video)")
    args = p.parse_args(argv)
    if not args.fps > 0:
        p.error("--fps must be > 0")
    check_demo_args(p, args, "videos", D.VOCABULARY)
    return args


def main(argv=None):
    args = _parse(argv)
    start = time.perf_counter()
    model, params = load_shipped(args.weights)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    text = D.text_embeddings(args.labels)
    shape = (args.videos, 3, D.FRAMES, D.FRAME_SIZE, D.FRAME_SIZE)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(args.seed), shape))
    chipmunk = tiny_video_chipmunk_config(args.steps)
    count = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(params))
    print(f"tiny Wan video ({count:,} parameters, {D.FRAMES} frames of {D.FRAME_SIZE}x{D.FRAME_SIZE}); "
          f"{args.videos} videos x {args.steps} steps on {jax.default_backend()}", flush=True)

    dense_latents, dense_s = sample_videos(params, model, text, noise, num_steps=args.steps)
    sparse_latents, sparse_s = sample_videos(params, model, text, noise, num_steps=args.steps, chipmunk=chipmunk)
    dense, sparse = D.from_latents(dense_latents), D.from_latents(sparse_latents)
    sparsity = video_sparsity(chipmunk, model, args.steps)
    checker = VideoLabelCheck(bank_size=500)
    dense_ok, sparse_ok = checker.accuracy(dense, args.labels), checker.accuracy(sparse, args.labels)

    path = write_video(args.out, strip_frames(dense, sparse), fps=args.fps)
    print(f"PSNR Chipmunk vs dense: {video_psnr(sparse, dense):.2f} dB   SSIM: {video_ssim(sparse, dense):.4f}")
    print(f"attention sparsity (nominal, average over all steps and layers): {100 * sparsity['attention']:.1f}% "
          f"({100 * sparsity['attention_sparse_step']:.1f}% on sparse steps of sparse layers; "
          f"{sparsity['skipped_steps']} of {args.steps} steps skipped by step caching)")
    show = lambda c: ", ".join(f"{kind} {100 * c[kind]:.0f}%" for kind in D.VOCABULARY.kinds)  # noqa: E731
    print(f"label check (as asked): dense {show(dense_ok)}; Chipmunk {show(sparse_ok)}")
    print(f"sampling time (compiled, {jax.default_backend()}): dense {dense_s:.2f} s, Chipmunk {sparse_s:.2f} s "
          f"(the CPU path runs reference kernels: speed is measured on GPUs, see benchmarks/RESULTS.md)")
    print(f"saved {path} (one row per video: dense | Chipmunk | 4x |difference|); "
          f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
