"""Chipmunk configuration: frozen, validated dataclasses with the per-model presets of SPEC §5.

Field names follow the original YAML keys (``attn.top_keys``, ``mlp.full_step_every``, ...) so configs
translate one to one. ``ChipmunkConfig.from_dict`` / ``to_dict`` and ``load`` / ``save`` (YAML or JSON)
round-trip exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import yaml

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

# SPEC §0: 25 of 50 steps skipped by step caching.
DEFAULT_SKIP_STEP_SCHEDULE = (
    7, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26, 27, 29, 31, 33, 34, 35, 37, 38, 39, 41, 42, 43,
)


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_steps(name: str, steps: tuple[int, ...] | None) -> None:
    if steps is None:
        return
    if not isinstance(steps, tuple) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps
    ):
        raise ValueError(f"{name} must be a tuple of non-negative integers, got {steps!r}")
    if len(set(steps)) != len(steps) or list(steps) != sorted(steps):
        raise ValueError(f"{name} must be sorted and free of duplicates, got {steps!r}")


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Sparse-delta attention settings (SPEC §1, §4.2).

    Attributes:
      enabled: run attention layers through Chipmunk at all.
      top_keys: fraction of keys chosen by top-k of the column sums per (head, query group).
      random_keys: fraction of static random keys (video static mask, SPEC §1.6 step 4).
      dynamic_random_keys: fraction of fresh random keys added at each recompute (compressed path;
        hard-coded to 0.01 in the original, SPEC §10.10).
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

    enabled: bool = True
    top_keys: float = 0.05
    random_keys: float = 0.01
    dynamic_random_keys: float = 0.01
    local_voxels: int = 0
    local_1d_window: float = 0.0
    first_n_dense_layers: int = 2
    full_step_every: int = 10
    full_step_schedule: tuple[int, ...] | None = None
    recompute_mask: bool = True
    compress_indices: bool = True
    counts_multiple_of: int = 128
    group_size: int = 192

    def __post_init__(self):
        object.__setattr__(self, "full_step_schedule", _as_tuple(self.full_step_schedule))
        for name in ("top_keys", "random_keys", "dynamic_random_keys", "local_1d_window"):
            _check_fraction(f"attention.{name}", getattr(self, name))
        _check_int("attention.local_voxels", self.local_voxels, 0)
        _check_int("attention.first_n_dense_layers", self.first_n_dense_layers, 0)
        _check_int("attention.full_step_every", self.full_step_every, 1)
        _check_int("attention.counts_multiple_of", self.counts_multiple_of, 1)
        _check_int("attention.group_size", self.group_size, 64)
        if self.group_size % 64:
            raise ValueError(f"attention.group_size must be a multiple of 64, got {self.group_size}")
        _check_steps("attention.full_step_schedule", self.full_step_schedule)
        if self.full_step_schedule is not None and not {0, 1} <= set(self.full_step_schedule):
            raise ValueError(
                "attention.full_step_schedule must contain steps 0 and 1 (step 0 stores the LSE, step 1 "
                f"builds the first column sets and out_cache), got {self.full_step_schedule}"
            )


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """Sparse-delta MLP settings (SPEC §2, §4.2).

    Attributes:
      enabled: run the MLP layers through Chipmunk at all.
      top_keys: fraction of hidden features kept per row block (exact per-row top-k; SPEC §10.9).
      random_keys: extra random keep-probability per feature.
      full_step_every: full step iff ``step % full_step_every == 0``.
      block_mask_cache: for ``step >= mask_cache_after_step`` recompute the feature sets only on
        steps divisible by this (1 = every sparse step).
      mask_cache_after_step: first step at which ``block_mask_cache`` applies (10 in the original).
      first_n_dense_layers: layers with index < n are always dense and keep no cache.
      counts_multiple_of: counts are padded up to a multiple of this (the kernel's feature tile).
      block_size: tokens per row block (a multiple of 64; 128 in the original).
    """

    enabled: bool = False
    top_keys: float = 0.3
    random_keys: float = 0.05
    full_step_every: int = 10
    block_mask_cache: int = 2
    mask_cache_after_step: int = 10
    first_n_dense_layers: int = 2
    counts_multiple_of: int = 256
    block_size: int = 128

    def __post_init__(self):
        _check_fraction("mlp.top_keys", self.top_keys)
        _check_fraction("mlp.random_keys", self.random_keys)
        _check_int("mlp.full_step_every", self.full_step_every, 1)
        _check_int("mlp.block_mask_cache", self.block_mask_cache, 1)
        _check_int("mlp.mask_cache_after_step", self.mask_cache_after_step, 0)
        _check_int("mlp.first_n_dense_layers", self.first_n_dense_layers, 0)
        _check_int("mlp.counts_multiple_of", self.counts_multiple_of, 1)
        _check_int("mlp.block_size", self.block_size, 64)
        if self.block_size % 64:
            raise ValueError(f"mlp.block_size must be a multiple of 64, got {self.block_size}")


@dataclasses.dataclass(frozen=True)
class StepCacheConfig:
    """Whole-step skipping (SPEC §4.3): skipped steps re-run only the final layer."""

    enabled: bool = False
    skip_step_schedule: tuple[int, ...] = DEFAULT_SKIP_STEP_SCHEDULE

    def __post_init__(self):
        object.__setattr__(self, "skip_step_schedule", _as_tuple(self.skip_step_schedule))
        _check_steps("step_cache.skip_step_schedule", self.skip_step_schedule)
        if self.skip_step_schedule and self.skip_step_schedule[0] == 0:
            raise ValueError("step_cache.skip_step_schedule cannot skip step 0 (nothing is cached yet)")


@dataclasses.dataclass(frozen=True)
class ReorderConfig:
    """Token reordering (SPEC §3): "none", "tiles" (2-D images) or "voxels" (3-D video)."""

    kind: str = "none"
    tile: int = 8
    subtile: int = 4
    voxel: tuple[int, int, int] = (4, 6, 8)

    def __post_init__(self):
        object.__setattr__(self, "voxel", _as_tuple(self.voxel))
        if self.kind not in ("none", "tiles", "voxels"):
            raise ValueError(f"reorder.kind must be 'none', 'tiles' or 'voxels', got {self.kind!r}")
        _check_int("reorder.tile", self.tile, 1)
        _check_int("reorder.subtile", self.subtile, 1)
        if self.tile % self.subtile:
            raise ValueError(f"reorder.tile ({self.tile}) must be a multiple of reorder.subtile ({self.subtile})")
        if not (isinstance(self.voxel, tuple) and len(self.voxel) == 3):
            raise ValueError(f"reorder.voxel must be three integers, got {self.voxel!r}")
        for v in self.voxel:
            _check_int("reorder.voxel", v, 1)


_SECTIONS = {
    "attention": AttentionConfig,
    "mlp": MLPConfig,
    "step_cache": StepCacheConfig,
    "reorder": ReorderConfig,
}


@dataclasses.dataclass(frozen=True)
class ChipmunkConfig:
    """Everything Chipmunk needs to know; hashable, so it can be a static jit argument."""

    attention: AttentionConfig = AttentionConfig()
    mlp: MLPConfig = MLPConfig()
    step_cache: StepCacheConfig = StepCacheConfig()
    reorder: ReorderConfig = ReorderConfig()
    num_steps: int = 50
    invocations_per_step: int = 1

    def __post_init__(self):
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        _check_int("num_steps", self.num_steps, 1)
        _check_int("invocations_per_step", self.invocations_per_step, 1)

    def replace(self, **changes: Any) -> "ChipmunkConfig":
        """Returns a copy with top-level fields or ``section__field`` entries replaced."""
        top, nested = {}, {}
        for key, value in changes.items():
            if "__" in key:
                section, field = key.split("__", 1)
                nested.setdefault(section, {})[field] = value
            else:
                top[key] = value
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
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-config-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

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


def flux() -> ChipmunkConfig:
    """FLUX.1-dev (SPEC §5.1): 70% sparse MLP, ~85% sparse attention (tk = 672 of 4352), 8x8/4x4 tiles.

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
    """HunyuanVideo 720p (SPEC §5.2): ~93% sparse attention on sparse steps, voxel order, step caching."""
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
    """Wan 2.1 14B (SPEC §5.3): CFG (2 invocations per step), local voxel window 5, step caching."""
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


PRESETS = {"flux": flux, "hunyuan_video": hunyuan_video, "wan": wan}
