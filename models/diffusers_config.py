"""Round trip between a model config dataclass and a diffusers ``config.json`` dict."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from chipmunk_jax.validation import validate_fields

__all__ = ["DiffusersConfig"]


class DiffusersConfig:
    """Mixin for frozen config dataclasses whose fields carry diffusers' names.

    Subclasses set ``DIFFUSERS_CLASS`` (the diffusers model class), declare each field's check with
    ``chipmunk_jax.validation.field`` (lists from a config.json become tuples there) and put the checks
    that relate several fields in ``_check``.
    """

    DIFFUSERS_CLASS: ClassVar[str]

    def __post_init__(self):
        validate_fields(self)
        self._check()

    def _check(self) -> None:
        """Checks across fields (after each field's own check)."""

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]):
        """From a diffusers ``config.json`` dict; ``_``-prefixed bookkeeping keys are ignored."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown {cls.DIFFUSERS_CLASS} config keys: {unknown}")
        return cls(**data)

    def to_diffusers(self) -> dict[str, Any]:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"_class_name": self.DIFFUSERS_CLASS, **out}
