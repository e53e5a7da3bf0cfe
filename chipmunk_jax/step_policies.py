"""Step-caching baselines as sampler policies (docs/algorithm.md §4.5): skip a whole step when a cheap signal from
the start of the model says the step changes little, and reuse the residual the blocks added on the last computed
step instead.

Each step the sampler (``sampling.make_sampler(..., step_policy=)``) asks the model for a ``Probe`` of the
policy's ``probe_kind`` (the models' ``forward(..., probe=kind)``, the Denoiser's ``probe``):
  "first_block"      the input embedding and the first block only: ``signal`` = the first block's residual
                     (its output minus its input, image tokens), ``base`` = the first block's output;
  "modulated_input"  the input embedding only: ``signal`` = the first block's timestep-modulated normalised input
                     (norm1(x) * (1 + scale) + shift of block 0), ``base`` = the input embedding.
``base`` lives in the space of the pre-head hidden state (``ModelOutput.hidden``: image tokens, Chipmunk's token
order). The policy decides from ``signal`` and its state (``PolicyState``) whether to skip:
  computed step: the model runs fully and the residual ``hidden - base`` is stored;
  skipped step:  ``hidden = base + residual`` of the last computed step, then only the head (final layer).
The first ``warmup`` steps and the last step are always computed, and so are Chipmunk's refresh steps when the
model runs Chipmunk (``Denoiser.sparse``; the sampler passes them to ``StepPolicy.decide`` as ``must_compute``).

Policies (frozen dataclasses, validated on construction):
  ``FirstBlockCache`` (ParaAttention's First Block Cache, as in xDiT): skip while the first block's residual is
    close to the one of the last computed step (relative mean absolute difference < threshold).
  ``TeaCache`` ("Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model", arXiv 2411.19108):
    accumulate the polynomially rescaled relative L1 change of the modulated input from step to step; skip while the
    sum < threshold, reset it on a computed step.
  ``MagCache`` ("MagCache: Fast Video Generation with Magnitude-Aware Cache", arXiv 2506.09045): accumulate the
    error |1 - prod(magnitude ratios)| of reusing the residual, from a per-step table of calibrated ratios
    ||r_t|| / ||r_{t-1}|| (``sampling.calibrate_magnitude_ratios``); skip while the accumulated error < threshold
    and at most ``max_skips`` steps in a row.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from chipmunk_jax.validation import check_choice, check_number, positive_int

__all__ = [
    "PROBE_KINDS",
    "Probe",
    "check_probe_kind",
    "PolicyState",
    "init_policy_state",
    "StepPolicy",
    "FirstBlockCache",
    "TeaCache",
    "MagCache",
]

PROBE_KINDS = ("first_block", "modulated_input")


def check_probe_kind(kind) -> str:
    """``kind`` when it is one of ``PROBE_KINDS``."""
    return check_choice("probe", kind, PROBE_KINDS)


@struct.dataclass
class Probe:
    """What a step policy reads from the start of a model call (the models' ``forward(..., probe=kind)``).

    signal: [B, N, D] float32, what the policy compares between steps (the first block's residual, or its modulated
      input), image tokens in the hidden state's token order.
    base: [B, N, D] float32, what a skipped step adds the stored residual to, in the space and token order of
      ``ModelOutput.hidden`` (the first block's output, or the input embedding).
    """

    signal: jax.Array
    base: jax.Array


@struct.dataclass
class PolicyState:
    """The state a step policy carries through the sampling loop (the sampler's step-cache slot; with CFG one per
    branch, stacked on a leading branch axis as ``cache.stack_branches`` does, the decision fields equal in both).

    residual: [B, N, D] the last computed step's ``hidden - base`` (its branch's), reused on skipped steps.
    valid: scalar bool, whether a computed step has stored ``residual``.
    reference: [B, N, D] the signal the next one is compared with (FirstBlockCache: the last computed step's;
      TeaCache: the previous step's), None for MagCache (it reads no signal).
    accumulated: float32, TeaCache's rescaled change / MagCache's error since the last computed step.
    ratio: float32, MagCache's product of magnitude ratios since the last computed step.
    skips: int32, steps skipped in a row.
    computed: bool [num_steps], which steps ran the model (all False before the run): what the executed compute
      is counted from.
    magnitudes: float32 [num_steps], at each computed step the mean over tokens of ||residual|| / ||previous
      computed step's residual|| (1 at the first): MagCache's calibration (``sampling.calibrate_magnitude_ratios``).
    """

    residual: jax.Array
    valid: jax.Array
    reference: jax.Array | None
    accumulated: jax.Array
    ratio: jax.Array
    skips: jax.Array
    computed: jax.Array
    magnitudes: jax.Array

    def with_decision(self, decided: "PolicyState") -> "PolicyState":
        """This state (another CFG branch's) with the decision fields of ``decided``: the branches decide together."""
        return self.replace(reference=decided.reference, accumulated=decided.accumulated, ratio=decided.ratio,
                            skips=decided.skips, computed=decided.computed)

    def stored(self, hidden, base, step) -> "PolicyState":
        """After a computed step: its residual ``hidden - base`` and magnitude ratio to the residual before."""
        residual = hidden.astype(jnp.float32) - base.astype(jnp.float32)
        norms = jnp.linalg.norm(residual, axis=-1)
        previous = jnp.linalg.norm(self.residual.astype(jnp.float32), axis=-1)
        ratio = jnp.mean(jnp.where(previous > 0, norms / jnp.where(previous > 0, previous, 1.0), 1.0))
        return self.replace(residual=residual.astype(self.residual.dtype), valid=jnp.bool_(True),
                            magnitudes=self.magnitudes.at[step].set(jnp.where(self.valid, ratio, 1.0)))

    def reused(self, base) -> jax.Array:
        """A skipped step's pre-head hidden state: ``base + residual`` (float32)."""
        return base.astype(jnp.float32) + self.residual.astype(jnp.float32)


def init_policy_state(policy: "StepPolicy", *, num_steps: int, hidden_shape, dtype=jnp.float32) -> PolicyState:
    """A fresh ``PolicyState`` for ``policy`` over ``num_steps`` sampling steps, the residual (and signal
    reference) of ``hidden_shape`` [B, N, D] (the model's pre-head hidden state) in ``dtype``. With CFG pass
    ``cache.stack_branches(state, 2)`` to the sampler."""
    if not isinstance(policy, StepPolicy):
        raise TypeError(f"policy must be a step policy (FirstBlockCache, TeaCache, MagCache), got "
                        f"{type(policy).__name__}")
    num_steps = positive_int("num_steps", num_steps)
    hidden_shape = tuple(hidden_shape)
    if len(hidden_shape) != 3:
        raise ValueError(f"hidden_shape must be [B, N, D] (the model's pre-head hidden state), got {hidden_shape}")
    # separate buffers: the sampler donates the state
    return PolicyState(residual=jnp.zeros(hidden_shape, dtype), valid=jnp.bool_(False),
                       reference=jnp.zeros(hidden_shape, dtype) if policy.reads_signal else None,
                       accumulated=jnp.float32(0.0), ratio=jnp.float32(1.0), skips=jnp.int32(0),
                       computed=jnp.zeros((num_steps,), jnp.bool_), magnitudes=jnp.zeros((num_steps,), jnp.float32))


def _threshold(name: str, value) -> float:
    return check_number(name, value, minimum=0)


def _numbers(name: str, value, *, positive: bool = False) -> tuple[float, ...]:
    """``value`` as a tuple of floats, for a non-empty 1-D sequence of finite (positive) real numbers."""
    kind = "positive finite numbers" if positive else "finite numbers"
    if isinstance(value, (np.ndarray, jax.Array)):
        value = np.asarray(value).tolist() if np.ndim(value) == 1 else value
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in value)):
        raise TypeError(f"{name} must be a non-empty sequence of {kind}, got {value!r:.80}")
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in value):
        raise ValueError(f"{name} must hold {kind}, got {value!r:.80}")
    return tuple(float(v) for v in value)


def _relative_l1(signal, reference):
    """mean |signal - reference| / mean |reference| (float32): the change measure of First Block Cache and
    TeaCache; infinite when the reference is all zeros (never close)."""
    signal, reference = signal.astype(jnp.float32), reference.astype(jnp.float32)
    scale = jnp.mean(jnp.abs(reference))
    change = jnp.mean(jnp.abs(signal - reference))
    return jnp.where(scale > 0, change / jnp.where(scale > 0, scale, 1.0), jnp.inf)


@dataclasses.dataclass(frozen=True)
class StepPolicy:
    """A step-caching policy: ``decide`` whether the sampler skips a step (the subclasses' criteria).

    threshold: >= 0; 0 never skips (every criterion is a strict "< threshold"), a large one skips every allowed step.
    warmup: the first ``warmup`` steps are always computed (>= 1: step 0 stores the first residual); so is the
      last step.
    """

    threshold: float
    warmup: int = 1

    probe_kind: ClassVar[str]
    reads_signal: ClassVar[bool] = True

    def __post_init__(self):
        if type(self) is StepPolicy:
            raise TypeError("StepPolicy is the base class: use FirstBlockCache, TeaCache or MagCache")
        object.__setattr__(self, "threshold", _threshold(f"{type(self).__name__}.threshold", self.threshold))
        object.__setattr__(self, "warmup", positive_int(f"{type(self).__name__}.warmup", self.warmup))

    def check_steps(self, num_steps: int) -> None:
        """Raises ValueError unless the policy fits a run of ``num_steps`` sampling steps."""

    def decide(self, state: PolicyState, signal, step, num_steps: int,
               must_compute=False) -> tuple[jax.Array, PolicyState]:
        """(skip: traced bool, the state after this step's decision) from the probe's ``signal`` at traced ``step``
        of ``num_steps``. Skipping needs a stored residual, a step past the warmup and not the last step, and not
        ``must_compute`` (traced bool: the sampler's Chipmunk refresh steps); the residual itself is updated by the
        sampler after a computed step (``PolicyState.stored``)."""
        allowed = (step >= self.warmup) & (step < num_steps - 1) & state.valid & ~jnp.asarray(must_compute)
        wants, if_skipped, if_computed = self._criterion(state, signal, step)
        skip = allowed & wants
        changed = {name: jnp.where(skip, if_skipped.get(name, getattr(state, name)),
                                   if_computed.get(name, getattr(state, name)))
                   for name in {**if_skipped, **if_computed}}
        return skip, state.replace(**changed, skips=jnp.where(skip, state.skips + 1, 0).astype(jnp.int32),
                                   computed=state.computed.at[step].set(~skip))

    def _criterion(self, state: PolicyState, signal, step) -> tuple[jax.Array, dict, dict]:
        """(wants to skip, the fields that change if the step is skipped, those that change if it is computed)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class FirstBlockCache(StepPolicy):
    """First Block Cache (ParaAttention's ``FBCache``, also in xDiT): the model runs its first block; when that
    block's residual differs from the one of the last COMPUTED step by a relative mean absolute difference below
    ``threshold``, the rest of the step is skipped (ParaAttention stores the first block's residual only when the
    remaining blocks run, so a slow drift over several skipped steps still forces a computed step)."""

    probe_kind: ClassVar[str] = "first_block"

    def _criterion(self, state, signal, step):
        close = _relative_l1(signal, state.reference) < self.threshold
        return close, {}, {"reference": signal.astype(state.reference.dtype)}


@dataclasses.dataclass(frozen=True)
class TeaCache(StepPolicy):
    """TeaCache (arXiv 2411.19108): the relative L1 change of the first block's modulated input from the
    previous step, rescaled by the polynomial ``coefficients`` (highest degree first, ``numpy.polyval`` order;
    the paper fits one per model; default identity: (1, 0)), is accumulated; the step is skipped while the sum stays
    below ``threshold``, and a computed step resets it to 0."""

    coefficients: tuple[float, ...] = (1.0, 0.0)

    probe_kind: ClassVar[str] = "modulated_input"

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "coefficients", _numbers("TeaCache.coefficients", self.coefficients))

    def _criterion(self, state, signal, step):
        change = _relative_l1(signal, state.reference)
        accumulated = state.accumulated + jnp.polyval(jnp.asarray(self.coefficients, jnp.float32), change)
        reference = signal.astype(state.reference.dtype)  # TeaCache compares consecutive steps, skipped or not
        return (accumulated < self.threshold, {"reference": reference, "accumulated": accumulated},
                {"reference": reference, "accumulated": jnp.float32(0.0)})


@dataclasses.dataclass(frozen=True)
class MagCache(StepPolicy):
    """MagCache (arXiv 2506.09045): the residual's magnitude ratio between steps, ``magnitude_ratios[t]`` =
    mean over tokens of ||r_t|| / ||r_{t-1}|| (one per sampling step, calibrated once on a dense run:
    ``sampling.calibrate_magnitude_ratios``), is nearly the same for every prompt. Reusing the residual of step k at
    steps k+1..t errs by |1 - prod_{i=k+1..t} ratio_i| at step t; these errors are accumulated over the skipped
    steps, and a step is skipped while the sum stays below ``threshold`` and fewer than ``max_skips`` steps were
    skipped in a row. The decision reads no model signal (the table decides); the probe gives only the base (the
    input embedding). The paper keeps the first 20% of the steps computed (its retention ratio): set ``warmup``."""

    max_skips: int = 2
    magnitude_ratios: tuple[float, ...] = ()
    warmup: int = 2

    probe_kind: ClassVar[str] = "modulated_input"
    reads_signal: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "max_skips", positive_int("MagCache.max_skips", self.max_skips))
        if isinstance(self.magnitude_ratios, (tuple, list)) and not self.magnitude_ratios:
            raise ValueError("MagCache needs magnitude_ratios: one per sampling step, calibrated on a dense run "
                             "(sampling.calibrate_magnitude_ratios)")
        object.__setattr__(self, "magnitude_ratios", _numbers("MagCache.magnitude_ratios", self.magnitude_ratios,
                                                              positive=True))

    def check_steps(self, num_steps: int) -> None:
        if len(self.magnitude_ratios) != num_steps:
            raise ValueError(f"MagCache.magnitude_ratios holds {len(self.magnitude_ratios)} ratios, one per sampling "
                             f"step is needed ({num_steps}): calibrate them for this schedule "
                             "(sampling.calibrate_magnitude_ratios)")

    def _criterion(self, state, signal, step):
        ratio = state.ratio * jnp.asarray(self.magnitude_ratios, jnp.float32)[step]
        error = state.accumulated + jnp.abs(1.0 - ratio)
        wants = (error < self.threshold) & (state.skips < self.max_skips)
        return (wants, {"ratio": ratio, "accumulated": error},
                {"ratio": jnp.float32(1.0), "accumulated": jnp.float32(0.0)})
