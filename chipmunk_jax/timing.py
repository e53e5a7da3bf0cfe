"""Wall-clock timing helpers shared by the end-to-end benchmark scripts in benchmarks/."""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

__all__ = ["log", "median_ms", "rel_err", "peak_gib", "emit_section"]


def log(msg):
    print(msg, flush=True)


def median_ms(fn, reps, warmup=1):
    """Median wall time of ``fn()`` in ms over ``reps`` calls after ``warmup`` calls; ``fn`` must block
    until its device work is done (``jax.block_until_ready``)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def rel_err(a, b):
    """max |a - b| / max |b| in float32."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def peak_gib():
    """Peak device memory in GiB since the process started (NaN where the backend does not say)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / 2**30


def emit_section(lines, path=None):
    """Print a markdown results section (a list of lines) and, with ``path``, append it to that file."""
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if path:
        with open(path, "a") as f:
            f.write("\n" + text)
