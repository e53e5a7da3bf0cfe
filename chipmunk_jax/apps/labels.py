"""Text-free conditioning of the tiny models: labels (shape, colour, ...) as fixed random "text" tokens.

The tiny models are trained on procedural data without a text encoder. Each label kind (shape, colour, motion
direction, ...) owns an equal share of the text tokens, filled with the row of a FIXED random table (not learned:
a stand-in for a frozen text encoder) that its label value picks, plus 0.5 x a per-position row so the tokens
differ by position. The pooled vector (for models with a pooled text input, FLUX) is the mean of the label rows,
as CLIP's pooled output summarises a prompt.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from chipmunk_jax.validation import check_int, positive_int

__all__ = ["LabelVocabulary"]


@dataclasses.dataclass(frozen=True)
class LabelVocabulary:
    """The label kinds of a tiny model and their token embedding.

    Attributes:
      kinds: the label kinds in label-column order, e.g. ("shape", "colour").
      values: the value names of each kind, e.g. (SHAPES, tuple(COLOURS)); a label is one index per kind.
      num_tokens: text tokens per prompt, split over the kinds in order (earlier kinds take any remainder).
      dim: the text embedding width.
      seed: the seed of the fixed random table.
    """

    kinds: tuple[str, ...]
    values: tuple[tuple[str, ...], ...]
    num_tokens: int
    dim: int
    seed: int

    def __post_init__(self):
        if len(self.kinds) != len(self.values) or not self.kinds:
            raise ValueError(f"one value list per label kind: {len(self.kinds)} kinds, {len(self.values)} value lists")
        if self.num_tokens < len(self.kinds):
            raise ValueError(f"num_tokens {self.num_tokens} must give each of the {len(self.kinds)} kinds a token")

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.values)

    def table(self) -> np.ndarray:
        """[sum(sizes) + num_tokens, dim] fixed random rows (unit-variance entries): each kind's value rows in
        kind order, then one row per text position."""
        rng = np.random.default_rng(self.seed)
        return rng.standard_normal((sum(self.sizes) + self.num_tokens, self.dim)).astype(np.float32)

    def check(self, labels, batch: int | None = None) -> np.ndarray:
        """``labels`` as int32 [B, kinds] (B == ``batch`` when given), every id in range."""
        labels = np.asarray(labels)
        k = len(self.kinds)
        rows = "B" if batch is None else batch
        if labels.ndim != 2 or labels.shape[1] != k or (batch is not None and labels.shape[0] != batch):
            raise ValueError(f"labels must be [{rows}, {k}] ({', '.join(self.kinds)}) ids, got shape {labels.shape}")
        if labels.min(initial=0) < 0 or any((labels[:, i] >= n).any() for i, n in enumerate(self.sizes)):
            bounds = ", ".join(f"{kind}s < {n}" for kind, n in zip(self.kinds, self.sizes))
            raise ValueError(f"labels out of range: {bounds}")
        return labels.astype(np.int32)

    def random(self, seed: int, index: int) -> tuple[int, ...]:
        """The label a dataset stream ``seed`` draws for item ``index``: uniform, one id per kind in kind order, from
        the item's own Generator (so any item can be regenerated alone)."""
        check_int("seed", seed, minimum=0)
        check_int("index", index, minimum=0)
        rng = np.random.default_rng([seed, index, 1])
        return tuple(int(rng.integers(n)) for n in self.sizes)

    def stream(self, seed: int, start: int, batch: int, labels=None) -> np.ndarray:
        """int32 [batch, kinds] labels of items ``start .. start+batch-1`` of stream ``seed``: ``labels`` checked, or
        when None each item's ``random`` draw."""
        check_int("start", start, minimum=0)
        positive_int("batch", batch)
        if labels is None:
            labels = [self.random(seed, start + i) for i in range(batch)]
        return self.check(labels, batch)

    def embed(self, labels, table: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [B, num_tokens, dim], pooled [B, dim]) float32 of labels [B, kinds] (see the module docstring);
        ``table``: a precomputed ``table()``."""
        labels = self.check(labels)
        table = self.table() if table is None else np.asarray(table, np.float32)
        offsets = np.cumsum((0,) + self.sizes)
        rows = [table[offsets[i] + labels[:, i]] for i in range(len(self.kinds))]
        k, n = len(self.kinds), self.num_tokens
        shares = [n // k + (i < n % k) for i in range(k)]
        tokens = np.concatenate([np.repeat(r[:, None], s, 1) for r, s in zip(rows, shares)], 1)
        tokens = tokens + 0.5 * table[offsets[-1]:][None]
        pooled = sum(rows) / k
        return tokens.astype(np.float32), pooled.astype(np.float32)

    def parse(self, text: str, count: int) -> np.ndarray:
        """"circle:red,square:blue" (one name per kind, ":"-joined, comma-separated prompts) -> int32 labels
        [count, kinds], the prompts cycled to ``count``."""
        labels = []
        for item in text.split(","):
            names = item.strip().split(":")
            if len(names) != len(self.kinds) or any(n not in v for n, v in zip(names, self.values)):
                allowed = " and ".join(f"{kind} in {values}" for kind, values in zip(self.kinds, self.values))
                raise ValueError(f"label {item!r} must be {':'.join(self.kinds)} with {allowed}")
            labels.append([v.index(n) for n, v in zip(names, self.values)])
        return np.asarray([labels[i % len(labels)] for i in range(count)], np.int32)
