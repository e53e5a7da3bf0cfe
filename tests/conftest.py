"""Shared pytest setup: the ``gpu`` marker skips unless JAX runs on a GPU. jax_enable_x64 stays off.

Markers (pyproject.toml): ``gpu`` (needs a CUDA GPU) and ``slow`` (CPU tests over ~5 s, redundant variants of a
fast test, and the benchmark-script runs). The fast CPU subset is ``pytest -m "not gpu and not slow"``; CI runs
everything. Shared helpers live in tests/helpers.py (``from helpers import rel_error``: pytest's default
``prepend`` import mode puts tests/ on sys.path).

On the CPU backend, XLA's optimisation passes are turned off (``jax_disable_most_optimizations``): the tests'
problems are small, so compiling dominates (Pallas interpret mode compiles large loops), and the suite needs about
a third less CPU time. Set ``CHIPMUNK_TEST_XLA_OPTIMIZE=1`` to keep the optimisations. The CPU backend gets 8
devices (``--xla_force_host_platform_device_count=8``) for the multi-device tests; single-device code runs on the
first, as before.
"""

import os

# 8 host-platform devices, so the multi-device tests (tests/test_parallel.py) run the same SPMD programs XLA runs on
# 8 GPUs; read when the CPU backend starts, so it must be set before anything touches jax's backends.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    if jax.default_backend() == "cpu" and os.environ.get("CHIPMUNK_TEST_XLA_OPTIMIZE", "") in ("", "0"):
        jax.config.update("jax_disable_most_optimizations", True)


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (jax.default_backend() != 'gpu')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
