"""Schedules: pure functions of (config, step, layer) -> what each layer does at that step.

No global counter (docs/algorithm.md §4.1, §10.4): the caller passes the step and the layer index. The step may
be a Python int (the kind is then a Python int and the ops dispatch statically) or a traced int32
(the kind comes from a precomputed table and the ops use ``lax.switch``).
"""

from __future__ import annotations

import enum
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.config import ChipmunkConfig

__all__ = [
    "StepPlan",
    "step_plan",
    "AttentionStep",
    "MLPStep",
    "ModelStep",
    "attention_full_step",
    "mlp_full_step",
    "attention_step_kind",
    "mlp_step_kind",
    "model_step_kind",
    "attention_schedule",
    "mlp_schedule",
    "model_schedule",
    "dispatch",
]


class AttentionStep(enum.IntEnum):
    """What one attention layer does at one step (docs/algorithm.md §1.2)."""

    ALWAYS_DENSE = 0  # layer < first_n_dense_layers (or Chipmunk off): dense, cache untouched
    DENSE = 1  # step 0: dense output, store the LSE
    DENSE_COLSUM = 2  # full step with recompute: dense + column sums -> new column sets + out_cache
    DENSE_REFRESH = 3  # full step without recompute: dense, out_cache refreshed with the kept sets
    SPARSE = 4  # out_cache + sparse attention over the kept sets


class MLPStep(enum.IntEnum):
    """What one MLP layer does at one step (docs/algorithm.md §2)."""

    ALWAYS_DENSE = 0  # layer < first_n_dense_layers (or Chipmunk off)
    DENSE = 1  # full step: dense MLP, refresh all caches
    SPARSE_SELECT = 2  # sparse step that re-chooses the feature sets
    SPARSE_REUSE = 3  # sparse step that reuses the previous feature sets


class ModelStep(enum.IntEnum):
    """Model-level step caching (docs/algorithm.md §4.3)."""

    COMPUTE = 0  # run all blocks, store the pre-head hidden state
    SKIP = 1  # reuse the stored hidden state, run only the final layer


def attention_full_step(config: ChipmunkConfig, step: int) -> bool:
    a = config.attention
    if a.full_step_schedule is not None:
        return step in a.full_step_schedule
    return step < 2 or step % a.full_step_every == 0


def mlp_full_step(config: ChipmunkConfig, step: int) -> bool:
    m = config.mlp
    if m.full_step_schedule is not None:
        return step in m.full_step_schedule
    return step % m.full_step_every == 0


def _attention_kind_for_step(config: ChipmunkConfig, step: int) -> AttentionStep:
    if not config.attention.enabled:
        return AttentionStep.ALWAYS_DENSE
    if not attention_full_step(config, step):
        return AttentionStep.SPARSE
    if step == 0:
        return AttentionStep.DENSE
    if step == 1 or config.attention.recompute_mask:
        return AttentionStep.DENSE_COLSUM
    return AttentionStep.DENSE_REFRESH


def _mlp_kind_for_step(config: ChipmunkConfig, step: int) -> MLPStep:
    m = config.mlp
    if not m.enabled:
        return MLPStep.ALWAYS_DENSE
    if mlp_full_step(config, step):
        return MLPStep.DENSE
    sets_exist = any(not mlp_full_step(config, s) for s in range(step))
    if sets_exist and step >= m.mask_cache_after_step and step % m.block_mask_cache != 0:
        return MLPStep.SPARSE_REUSE
    return MLPStep.SPARSE_SELECT


@functools.lru_cache(maxsize=64)
def attention_schedule(config: ChipmunkConfig, num_steps: int | None = None) -> np.ndarray:
    """int32 table [num_steps] of AttentionStep values for a sparse-capable layer."""
    n = config.num_steps if num_steps is None else num_steps
    table = np.array([_attention_kind_for_step(config, s) for s in range(n)], np.int32)
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=64)
def mlp_schedule(config: ChipmunkConfig, num_steps: int | None = None) -> np.ndarray:
    """int32 table [num_steps] of MLPStep values for a sparse-capable layer."""
    n = config.num_steps if num_steps is None else num_steps
    table = np.array([_mlp_kind_for_step(config, s) for s in range(n)], np.int32)
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=64)
def model_schedule(config: ChipmunkConfig, num_steps: int | None = None) -> np.ndarray:
    """int32 table [num_steps] of ModelStep values."""
    n = config.num_steps if num_steps is None else num_steps
    skip = set(config.step_cache.skip_step_schedule) if config.step_cache.enabled else set()
    table = np.array([ModelStep.SKIP if s in skip else ModelStep.COMPUTE for s in range(n)], np.int32)
    table.setflags(write=False)
    return table


def _lookup(table: np.ndarray, step, layer, first_n_dense: int, dense_value: int, enum_cls):
    concrete = isinstance(step, (int, np.integer)) and isinstance(layer, (int, np.integer))
    if concrete:
        if not 0 <= step < len(table):
            raise ValueError(f"step must be in [0, {len(table)}), got {step}")
        if layer < 0:
            raise ValueError(f"layer must be >= 0, got {layer}")
        return enum_cls(dense_value if layer < first_n_dense else int(table[step]))
    step = jnp.asarray(step, jnp.int32)
    layer = jnp.asarray(layer, jnp.int32)
    kind = jnp.asarray(table)[jnp.clip(step, 0, len(table) - 1)]
    return jnp.where(layer < first_n_dense, jnp.int32(dense_value), kind)


def attention_step_kind(config: ChipmunkConfig, step, layer):
    """AttentionStep for sparse-capable attention layer ``layer`` at ``step`` (int or traced)."""
    return _lookup(
        attention_schedule(config), step, layer, config.attention.first_n_dense_layers,
        AttentionStep.ALWAYS_DENSE, AttentionStep,
    )


def mlp_step_kind(config: ChipmunkConfig, step, layer):
    """MLPStep for sparse-capable MLP layer ``layer`` at ``step`` (int or traced)."""
    return _lookup(
        mlp_schedule(config), step, layer, config.mlp.first_n_dense_layers, MLPStep.ALWAYS_DENSE, MLPStep
    )


def model_step_kind(config: ChipmunkConfig, step):
    """ModelStep at ``step`` (int or traced)."""
    return _lookup(model_schedule(config), step, 0, 0, ModelStep.COMPUTE, ModelStep)


def dispatch(step_kind, branches, operand, kind_enum: type[enum.IntEnum]):
    """``branches[step_kind](operand)``: a Python call for a concrete kind, ``lax.switch`` for a traced
    one (then every branch is traced and must return the same structure)."""
    if isinstance(step_kind, (int, np.integer)):
        return branches[kind_enum(int(step_kind))](operand)
    step_kind = jnp.asarray(step_kind)
    if step_kind.shape != () or not jnp.issubdtype(step_kind.dtype, jnp.integer):
        raise TypeError(f"step_kind must be an {kind_enum.__name__} or a scalar integer array, got {step_kind!r}")
    return jax.lax.switch(step_kind, branches, operand)


class StepPlan(NamedTuple):
    """What a model's sparse-capable layers do at one step: the models receive this, not the step index.

    attention: an ``AttentionStep`` for every sparse-capable attention layer at or above
      ``attention.first_n_dense_layers`` (the layers below it are dense at every step and need no plan).
    mlp: the same for the MLP layers (an ``MLPStep``).
    Python ints dispatch statically (one compiled body per kind); traced int32 scalars switch inside each
    layer with ``lax.switch``. A NamedTuple, so a plan of arrays is a pytree that can cross ``jit``.
    """

    attention: Any
    mlp: Any


def step_plan(config: ChipmunkConfig, step) -> StepPlan:
    """The plan of step ``step``: Python-int kinds for a Python-int step, traced int32 kinds for a traced one."""
    if not isinstance(config, ChipmunkConfig):
        raise TypeError(f"config must be a ChipmunkConfig, got {type(config).__name__}")
    layer = max(config.attention.first_n_dense_layers, config.mlp.first_n_dense_layers)
    return StepPlan(attention=attention_step_kind(config, step, layer), mlp=mlp_step_kind(config, step, layer))
