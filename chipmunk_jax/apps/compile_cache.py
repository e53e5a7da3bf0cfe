"""JAX's persistent compilation cache for the applications (the CLI's ``--compile-cache``).

A second run with the same shapes, flags and JAX / XLA versions then loads the compiled sampler from disk instead of
compiling it again (minutes for FLUX at 1024^2). Only the applications call :func:`enable_compile_cache`; importing
this module sets nothing. JAX keys each entry on the lowered program, the compile options, the devices and the
jax / jaxlib versions, so a stale entry is never used for a different program.

The cache is trusted code: whoever can write to the folder can make the process run arbitrary code (JAX's
``set_cache_dir`` warning), so keep it in a private folder such as :func:`default_compile_cache_dir`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache as _jax_cache

__all__ = ["CacheEvents", "default_compile_cache_dir", "enable_compile_cache", "watch_compile_cache"]

_HIT = "/jax/compilation_cache/cache_hits"
_WRITE = "/jax/compilation_cache/cache_misses"  # recorded when a freshly compiled executable is written


def default_compile_cache_dir() -> str:
    """``$XDG_CACHE_HOME/chipmunk-jax/xla``, or ``~/.cache/chipmunk-jax/xla`` when XDG_CACHE_HOME is unset, empty
    or relative (the XDG base directory spec ignores relative paths)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "chipmunk-jax", "xla")


def enable_compile_cache(directory: str | None) -> str | None:
    """Turn on JAX's persistent compilation cache in ``directory`` (created if missing) for every executable.

    ``None`` or ``"none"`` (any case) sets nothing and returns None: JAX's own settings stay (no persistent cache,
    unless e.g. ``JAX_COMPILATION_CACHE_DIR`` is set). Otherwise sets ``jax_compilation_cache_dir`` to the absolute
    path, ``jax_persistent_cache_min_compile_time_secs = 0`` and ``jax_persistent_cache_min_entry_size_bytes = -1``
    (no size threshold, and none that JAX may substitute) so that every compiled executable is written, resets
    JAX's cache state so that the folder is used even after earlier compiles in this process, and returns the
    absolute path. Call it before the first ``jit`` whose executable should be cached.

    Raises ValueError (naming the path) when ``directory`` is empty, is a file, or cannot be created.
    """
    if directory is None or directory.strip().lower() == "none":
        return None
    if not directory.strip():
        raise ValueError("compile cache folder: empty path (pass a folder, or 'none' to disable)")
    path = os.path.abspath(os.path.expanduser(directory))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"compile cache folder {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a parent is a file, no permission, ...
        raise ValueError(f"cannot create the compile cache folder {path!r}: {e}") from None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    # JAX decides once per process whether the cache is used (at the first compile) and opens the folder once:
    # start over so that this folder counts
    _jax_cache.reset_cache()
    return path


@dataclasses.dataclass
class CacheEvents:
    """Persistent-cache events seen by :func:`watch_compile_cache`: executables loaded from the cache (``hits``) and
    compiled executables written to it (``writes``)."""

    hits: int = 0
    writes: int = 0

    def describe(self) -> str:
        """``hit``, ``written`` or ``not used`` (nothing read or written: the cache is off)."""
        if self.hits:
            return "hit" if not self.writes else f"{self.hits} hit, {self.writes} written"
        return "written" if self.writes else "not used"


@contextlib.contextmanager
def watch_compile_cache() -> Iterator[CacheEvents]:
    """Count the persistent-cache hits and writes of the compiles inside the ``with`` block (a ``jax.monitoring``
    listener, removed on exit)."""
    events = CacheEvents()

    def listener(event: str, **_) -> None:
        if event == _HIT:
            events.hits += 1
        elif event == _WRITE:
            events.writes += 1

    jax.monitoring.register_event_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_listener(listener)
