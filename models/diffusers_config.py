"""Round trip between a model config dataclass and a diffusers ``config.json`` dict."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

__all__ = ["DiffusersConfig"]


class DiffusersConfig:
    """Mixin for frozen config dataclasses whose fields carry diffusers' names.

    Subclasses set ``DIFFUSERS_CLASS`` (the diffusers model class) and convert lists back to tuples
    in their ``__post_init__``.
    """

    DIFFUSERS_CLASS: ClassVar[str]

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
