"""Chipmunk configuration: frozen, validated dataclasses with the per-model presets of docs/algorithm.md §5.

Field names follow the original YAML keys (``attn.top_keys``, ``mlp.full_step_every``, ...) so configs
translate one to one. ``ChipmunkConfig.from_dict`` / ``to_dict`` and ``load`` / ``save`` (YAML or JSON)
round-trip exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from functools import partial
from typing import Any

import yaml

from chipmunk_jax.validation import (
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_int_tuple,
    field,
    non_negative_int,
    optional,
    positive_int,
    validate_fields,
)

__all__ = [
    "AttentionConfig",
    "MLPConfig",
    "StepCacheConfig",
    "ReorderConfig",
    "ChipmunkConfig",
    "DEFAULT_SKIP_STEP_SCHEDULE",
    "flux",
    "hunyuan_video",
    "wan",
    "PRESETS",
]

# docs/algorithm.md §0: 25 of 50 steps skipped by step caching.
DEFAULT_SKIP_STEP_SCHEDULE = (
    7, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26, 27, 29, 31, 33, 34, 35, 37, 38, 39, 41, 42, 43,
)


def _default_skip_schedule(num_steps: int) -> tuple[int, ...]:
    """DEFAULT_SKIP_STEP_SCHEDULE without the steps a ``num_steps``-step run does not reach."""
    return tuple(s for s in DEFAULT_SKIP_STEP_SCHEDULE if s < num_steps)


def _check_steps(name: str, steps) -> tuple[int, ...]:
    """A step schedule: a sorted tuple of distinct non-negative step indices (a list becomes a tuple)."""
    steps = check_int_tuple(name, steps, minimum=0)
    if len(set(steps)) != len(steps) or list(steps) != sorted(steps):
        raise ValueError(f"{name} must be sorted and free of duplicates, got {steps!r}")
    return steps


_at_least_64 = partial(check_int, minimum=64)  # group / block sizes: the kernels' 64-row tiles


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Sparse-delta attention settings (docs/algorithm.md §1, §4.2).

    Attributes:
      enabled: run attention layers through Chipmunk at all.
      top_keys: fraction of keys chosen by top-k of the column sums per (head, query group).
      random_keys: fraction of static random keys (video static mask, docs/algorithm.md §1.6 step 4).
      dynamic_random_keys: fraction of fresh random keys added at each recompute (compressed path;
        hard-coded to 0.01 in the original, docs/algorithm.md §10.10).
      local_voxels: static local 3-D voxel window (in voxels per axis; 0 = off).
      local_1d_window: static 1-D window as a fraction of the video tokens (0 = off).
      first_n_dense_layers: layers with index < n are always dense and keep no cache.
      full_step_every: full step iff ``step < 2 or step % full_step_every == 0`` (when no schedule).
      full_step_schedule: explicit sorted set of full steps; must contain 0 and 1.
      recompute_mask: recompute the column sets at every full step >= 1 (else only at step 1).
      compress_indices: the "compressed" selection path (top-k OR dynamic random, AND eligibility, OR
        static mask) with the mask kept bit-packed between full steps; False = plain top-k indices.
      counts_multiple_of: counts are padded up to a multiple of this (the kernel's key tile).
      group_size: query group size (a multiple of 64; 192 in the original).
    """

    enabled: bool = field(True, check=check_bool)
    top_keys: float = field(0.05, check=check_fraction)
    random_keys: float = field(0.01, check=check_fraction)
    dynamic_random_keys: float = field(0.01, check=check_fraction)
    local_voxels: int = field(0, check=non_negative_int)
    local_1d_window: float = field(0.0, check=check_fraction)
    first_n_dense_layers: int = field(2, check=non_negative_int)
    full_step_every: int = field(10, check=positive_int)
    full_step_schedule: tuple[int, ...] | None = field(None, check=optional(_check_steps))
    recompute_mask: bool = field(True, check=check_bool)
    compress_indices: bool = field(True, check=check_bool)
    counts_multiple_of: int = field(128, check=positive_int)
    group_size: int = field(192, check=_at_least_64)

    def __post_init__(self):
        validate_fields(self, prefix="attention.")
        if self.group_size % 64:
            raise ValueError(f"attention.group_size must be a multiple of 64, got {self.group_size}")
        if self.full_step_schedule is not None and not {0, 1} <= set(self.full_step_schedule):
            raise ValueError(
                "attention.full_step_schedule must contain steps 0 and 1 (step 0 stores the LSE, step 1 "
                f"builds the first column sets and out_cache), got {self.full_step_schedule}"
            )


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """Sparse-delta MLP settings (docs/algorithm.md §2, §4.2).

    Attributes:
      enabled: run the MLP layers through Chipmunk at all.
      top_keys: fraction of hidden features kept per row block (exact per-row top-k; docs/algorithm.md §10.9).
      random_keys: extra random keep-probability per feature.
      full_step_every: full step iff ``step % full_step_every == 0`` (when no schedule).
      full_step_schedule: explicit sorted set of full steps; must contain 0 (not in the original Chipmunk: the
        attention's ``full_step_schedule`` for the MLP, e.g. a full step at a Wan 2.2 expert switch).
      block_mask_cache: for ``step >= mask_cache_after_step`` recompute the feature sets only on
        steps divisible by this (1 = every sparse step).
      mask_cache_after_step: first step at which ``block_mask_cache`` applies (10 in the original).
      first_n_dense_layers: layers with index < n are always dense and keep no cache.
      counts_multiple_of: counts are padded up to a multiple of this (the kernel's feature tile).
      block_size: tokens per row block (a multiple of 64; 128 in the original).
    """

    enabled: bool = field(False, check=check_bool)
    top_keys: float = field(0.3, check=check_fraction)
    random_keys: float = field(0.05, check=check_fraction)
    full_step_every: int = field(10, check=positive_int)
    full_step_schedule: tuple[int, ...] | None = field(None, check=optional(_check_steps))
    block_mask_cache: int = field(2, check=positive_int)
    mask_cache_after_step: int = field(10, check=non_negative_int)
    first_n_dense_layers: int = field(2, check=non_negative_int)
    counts_multiple_of: int = field(256, check=positive_int)
    block_size: int = field(128, check=_at_least_64)

    def __post_init__(self):
        validate_fields(self, prefix="mlp.")
        if self.block_size % 64:
            raise ValueError(f"mlp.block_size must be a multiple of 64, got {self.block_size}")
        if self.full_step_schedule is not None and 0 not in self.full_step_schedule:
            raise ValueError(f"mlp.full_step_schedule must contain step 0 (it fills the MLP caches the sparse steps "
                             f"update), got {self.full_step_schedule}")


@dataclasses.dataclass(frozen=True)
class StepCacheConfig:
    """Whole-step skipping (docs/algorithm.md §4.3): skipped steps re-run only the final layer."""

    enabled: bool = field(False, check=check_bool)
    skip_step_schedule: tuple[int, ...] = field(DEFAULT_SKIP_STEP_SCHEDULE, check=_check_steps)

    def __post_init__(self):
        validate_fields(self, prefix="step_cache.")
        if self.skip_step_schedule and self.skip_step_schedule[0] == 0:
            raise ValueError("step_cache.skip_step_schedule cannot skip step 0 (nothing is cached yet)")


@dataclasses.dataclass(frozen=True)
class ReorderConfig:
    """Token reordering (docs/algorithm.md §3): "none", "tiles" (2-D images) or "voxels" (3-D video)."""

    kind: str = field("none", check=partial(check_choice, choices=("none", "tiles", "voxels")))
    tile: int = field(8, check=positive_int)
    subtile: int = field(4, check=positive_int)
    voxel: tuple[int, int, int] = field((4, 6, 8), check=partial(check_int_tuple, length=3))

    def __post_init__(self):
        validate_fields(self, prefix="reorder.")
        if self.tile % self.subtile:
            raise ValueError(f"reorder.tile ({self.tile}) must be a multiple of reorder.subtile ({self.subtile})")


_SECTIONS = {
    "attention": AttentionConfig,
    "mlp": MLPConfig,
    "step_cache": StepCacheConfig,
    "reorder": ReorderConfig,
}


@dataclasses.dataclass(frozen=True)
class ChipmunkConfig:
    """Everything Chipmunk needs to know; hashable, so it can be a static jit argument.

    Step schedules must fit ``num_steps``: an entry of ``step_cache.skip_step_schedule``,
    ``attention.full_step_schedule`` or ``mlp.full_step_schedule`` >= num_steps is a ValueError, except in the
    default skip schedule (DEFAULT_SKIP_STEP_SCHEDULE, made for 50 steps, given or left out), which is clipped to
    num_steps, so ``ChipmunkConfig(num_steps=8)`` and ``flux().replace(num_steps=8)`` work and skip step 7 only
    (and ``replace(num_steps=50)`` restores the full default).
    """

    attention: AttentionConfig = AttentionConfig()
    mlp: MLPConfig = MLPConfig()
    step_cache: StepCacheConfig = StepCacheConfig()
    reorder: ReorderConfig = ReorderConfig()
    num_steps: int = field(50, check=positive_int)
    invocations_per_step: int = field(1, check=positive_int)

    def __post_init__(self):
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        validate_fields(self)
        self._fit_schedules()

    def _fit_schedules(self) -> None:
        """The default skip schedule (DEFAULT_SKIP_STEP_SCHEDULE, made for 50 steps) is clipped to num_steps; an
        entry of any other skip schedule, or of a full-step schedule, past the last step is an error."""
        if self.step_cache.skip_step_schedule == DEFAULT_SKIP_STEP_SCHEDULE:
            clipped = _default_skip_schedule(self.num_steps)
            if clipped != DEFAULT_SKIP_STEP_SCHEDULE:
                object.__setattr__(self, "step_cache", dataclasses.replace(self.step_cache, skip_step_schedule=clipped))
        for name, steps in (("step_cache.skip_step_schedule", self.step_cache.skip_step_schedule),
                            ("attention.full_step_schedule", self.attention.full_step_schedule or ()),
                            ("mlp.full_step_schedule", self.mlp.full_step_schedule or ())):
            late = [s for s in steps if s >= self.num_steps]
            if late:
                raise ValueError(
                    f"{name} entry {late[0]} is past the last step: num_steps={self.num_steps} runs steps 0.."
                    f"{self.num_steps - 1} (entries past it: {late}); drop them or raise num_steps"
                )

    def replace(self, **changes: Any) -> "ChipmunkConfig":
        """Returns a copy with top-level fields or ``section__field`` entries replaced."""
        top, nested = {}, {}
        for key, value in changes.items():
            if "__" in key:
                section, name = key.split("__", 1)
                nested.setdefault(section, {})[name] = value
            else:
                top[key] = value
        if ("num_steps" in top and "step_cache" not in top and "skip_step_schedule" not in nested.get("step_cache", {})
                and self.step_cache.skip_step_schedule == _default_skip_schedule(self.num_steps)):
            # the default schedule, clipped to the old num_steps: clipped again to the new one (so a round trip
            # replace(num_steps=8).replace(num_steps=50) gives the full default back)
            nested.setdefault("step_cache", {})["skip_step_schedule"] = DEFAULT_SKIP_STEP_SCHEDULE
        for section, fields in nested.items():
            if section not in _SECTIONS:
                raise ValueError(f"unknown config section {section!r}")
            top[section] = dataclasses.replace(top.get(section, getattr(self, section)), **fields)
        return dataclasses.replace(self, **top)

    def to_dict(self) -> dict[str, Any]:
        def plain(v):
            return list(v) if isinstance(v, tuple) else v

        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name] = {k: plain(v) for k, v in dataclasses.asdict(value).items()}
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChipmunkConfig":
        if not isinstance(data, dict):
            raise TypeError(f"a Chipmunk config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)} (known: {sorted(known)})")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in _SECTIONS:
                section_cls = _SECTIONS[key]
                if not isinstance(value, dict):
                    raise TypeError(f"config section {key!r} must be a mapping, got {type(value).__name__}")
                fields = {f.name for f in dataclasses.fields(section_cls)}
                bad = set(value) - fields
                if bad:
                    raise ValueError(f"unknown keys in config section {key!r}: {sorted(bad)}")
                kwargs[key] = section_cls(**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the config as YAML (.yaml/.yml) or JSON (.json), atomically."""
        path = os.fspath(path)
        if path.endswith((".yaml", ".yml")):
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        elif path.endswith(".json"):
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        else:
            raise ValueError(f"config path must end in .yaml, .yml or .json, got {path!r}")
        _write_atomically(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ChipmunkConfig":
        path = os.fspath(path)
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                data = yaml.safe_load(f)
            elif path.endswith(".json"):
                data = json.load(f)
            else:
                raise ValueError(f"config path must end in .yaml, .yml or .json, got {path!r}")
        return cls.from_dict(data)


def _write_atomically(path: str, text: str) -> None:
    """Writes ``text`` to a temp file beside ``path`` and renames it onto ``path``. The temp file is created with
    mode 0o666 less the umask (the user's normal permissions; mkstemp's would be 0o600) and named like
    ``chipmunk_jax.ports.safetensors_io.atomic_write``'s (``.chipmunk-tmp-<pid>-...``: the core cannot import the
    ports), so that the converter's stale-file cleanup recognises one a killed process left."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".chipmunk-tmp-{os.getpid()}-{secrets.token_hex(6)}.config")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def flux() -> ChipmunkConfig:
    """FLUX.1-dev (docs/algorithm.md §5.1): 70% sparse MLP, ~85% sparse attention (tk = 672 of 4352), 8x8/4x4 tiles.

    Counts stay multiples of 112 as in the original strided kernel: our kernels take any count.
    """
    return ChipmunkConfig(
        attention=AttentionConfig(
            top_keys=0.165,
            random_keys=0.0,
            dynamic_random_keys=0.0,
            first_n_dense_layers=2,
            full_step_every=10,
            recompute_mask=False,
            compress_indices=False,
            counts_multiple_of=112,
        ),
        mlp=MLPConfig(enabled=True, top_keys=0.3, random_keys=0.05, full_step_every=10, block_mask_cache=2),
        step_cache=StepCacheConfig(enabled=False),
        reorder=ReorderConfig(kind="tiles", tile=8, subtile=4),
    )


def hunyuan_video() -> ChipmunkConfig:
    """HunyuanVideo 720p (docs/algorithm.md §5.2): ~93% sparse attention on sparse steps, voxel order, step caching."""
    return ChipmunkConfig(
        attention=AttentionConfig(
            top_keys=0.05,
            random_keys=0.01,
            dynamic_random_keys=0.01,
            local_voxels=0,
            first_n_dense_layers=2,
            full_step_schedule=(0, 1, 10, 40),
            recompute_mask=True,
            compress_indices=True,
            counts_multiple_of=128,
        ),
        mlp=MLPConfig(enabled=False),
        step_cache=StepCacheConfig(enabled=True),
        reorder=ReorderConfig(kind="voxels", voxel=(4, 6, 8)),
    )


def wan() -> ChipmunkConfig:
    """Wan 2.1 14B (docs/algorithm.md §5.3): CFG (2 invocations per step), local voxel window 5, step caching."""
    return ChipmunkConfig(
        attention=AttentionConfig(
            top_keys=0.10,
            random_keys=0.01,
            dynamic_random_keys=0.01,
            local_voxels=5,
            first_n_dense_layers=2,
            full_step_every=10,
            recompute_mask=True,
            compress_indices=True,
            counts_multiple_of=128,
        ),
        mlp=MLPConfig(enabled=False),
        step_cache=StepCacheConfig(enabled=True),
        reorder=ReorderConfig(kind="voxels", voxel=(4, 6, 8)),
        invocations_per_step=2,
    )


def wan_480p() -> ChipmunkConfig:
    """Wan 2.1 14B at 480x832 (docs/algorithm.md §5.3): ``wan()`` with a local voxel window of 3. Why: the window is
    counted in voxels, and the 480p voxel grid (5 x 5 x 6 voxels of 4 x 6 x 8 tokens) is smaller than 720p's
    (5 x 7 x 10): the 720p window of 5 covers 32% of the image keys at 720p but 73% at 480p, so sparse steps
    kept most keys and ran slower than dense ones; a window of 3 covers 16% at 480p."""
    return wan().replace(attention__local_voxels=3)


PRESETS = {"flux": flux, "hunyuan_video": hunyuan_video, "wan": wan, "wan_480p": wan_480p}
