"""Executed-compute accounting: the matmul FLOPs a sampler run actually executes, as a fraction of the dense run's.

What is counted (2 FLOPs per multiply-add; per sample and CFG branch, so the fraction does not depend on the batch):
  - every matmul of a model call: input embeddings, the blocks' linear projections, the attention's quadratic part
    (QK^T and PV: 4 * queries * keys * heads * head_dim) and the MLP, the head (final layer);
  - the timestep conditioning of every step (the samplers compute it for all steps before their loop);
  - Chipmunk per layer and step from the schedule (``schedule.attention_schedule`` / ``mlp_schedule``, the layers
    below ``first_n_dense_layers`` dense): a sparse attention step runs QK^T and PV over its kept keys only; a full
    step runs dense attention plus, from step 1, the sparse pass that refreshes ``out_cache``
    (docs/algorithm.md §1.2); a sparse MLP step runs fc1 and fc2 over its kept features; the MLP steps that choose
    features (and the full steps, which store the baseline) also run fc1 on each row block's mean token;
  - step caching: a skipped step of the static schedule (``config.step_cache``) runs only the head; under a step
    policy (docs/algorithm.md §4.5) every step runs the probe ("modulated_input": the latent embedding;
    "first_block": the input embeddings and block 0, dense) and the run's ``computed`` mask says which steps ran
    the full model (the rest run the head), the probe's work not shared with the full call, as the code runs it.
What is not counted: elementwise work (norms, RoPE, softmax, GELU, the column sums' adds), top-k selection, gathers
and the kernels' padding (query groups, counts rounded to ``counts_multiple_of``).

Densities are nominal, from the config: a sparse attention step keeps ``tk / N`` of the keys (``tk`` from
``selection.attention_column_count``) plus the dynamic random keys (compressed path) plus the static mask's share
(video: local window and static random keys, computed by the caller); a sparse MLP step keeps ``fk / F`` of the
features (rounded up to ``counts_multiple_of``) plus the random features. The shares are added, an upper bound of
their union: Chipmunk's compute is counted high rather than low.

Per-model formulas (``model_cost``): ``flux_cost`` (FLUX.1's MMDiT: double blocks with separate text / image
streams, single blocks on the joint sequence; Chipmunk attention over the joint sequence, Chipmunk MLP on the image
MLP of a double block and the MLP branch of a single block) and ``wan_cost`` (Wan 2.1 / 2.2 text-to-video blocks:
self-attention (Chipmunk), cross-attention to the text, MLP).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from chipmunk_jax.config import AttentionConfig, ChipmunkConfig, MLPConfig
from chipmunk_jax.models.flux import FluxConfig
from chipmunk_jax.models.wan import WanConfig
from chipmunk_jax.schedule import AttentionStep, MLPStep, ModelStep, attention_schedule, mlp_schedule, model_schedule
from chipmunk_jax.selection import attention_column_count, mlp_feature_count
from chipmunk_jax.step_policies import check_probe_kind
from chipmunk_jax.validation import non_negative_int, positive_int

__all__ = [
    "LayerCost",
    "ModelCost",
    "ComputeCount",
    "attention_keep_share",
    "mlp_keep_share",
    "flux_cost",
    "wan_cost",
    "model_cost",
    "executed_flops",
]

_FLOPS = ("attention", "mlp", "linear", "embed", "head", "conditioning", "probe")


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One transformer block's matmul FLOPs for one sample.

    other: the matmuls Chipmunk never touches (QKV and output projections, the text stream of a double block, Wan's
      cross-attention).
    attention_queries, attention_keys, attention_width: the Chipmunk-capable attention's query and key tokens and
      heads * head_dim: dense QK^T + PV cost 4 * queries * keys * width.
    mlp_tokens, mlp_in, mlp_hidden, mlp_out: the Chipmunk-capable MLP (fc1 [in, hidden], fc2 [hidden, out]).
    """

    other: float
    attention_queries: int
    attention_keys: int
    attention_width: int
    mlp_tokens: int
    mlp_in: int
    mlp_hidden: int
    mlp_out: int

    def attention(self, keep: float = 1.0) -> float:
        """QK^T + PV over ``keep`` of the keys."""
        return 4.0 * self.attention_queries * keep * self.attention_keys * self.attention_width

    def mlp(self, keep: float = 1.0) -> float:
        """fc1 + fc2 over ``keep`` of the hidden features."""
        return 2.0 * self.mlp_tokens * keep * self.mlp_hidden * (self.mlp_in + self.mlp_out)

    def block_means(self, block_size: int) -> float:
        """fc1 of each row block's mean token (the sparse MLP's feature scores)."""
        return 2.0 * math.ceil(self.mlp_tokens / block_size) * self.mlp_in * self.mlp_hidden

    @property
    def dense(self) -> float:
        return self.other + self.attention() + self.mlp()


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """A model's matmul FLOPs for one sample at one token count.

    layers: the blocks in Chipmunk's global layer numbering (``num_sparse_layers`` of them).
    embed: the input embeddings of a full call (latent patches and text).
    probe_embed: what a "modulated_input" probe runs: the latent embedding (the text embedding is unused there).
    head: the final layer.
    conditioning: one step's timestep conditioning (embedders and every block's modulation vectors).
    """

    layers: tuple[LayerCost, ...]
    embed: float
    probe_embed: float
    head: float
    conditioning: float

    def dense_call(self) -> float:
        return self.embed + sum(layer.dense for layer in self.layers) + self.head

    def probe(self, kind: str) -> float:
        """The FLOPs of a step policy's probe (``step_policies.PROBE_KINDS``)."""
        if check_probe_kind(kind) == "modulated_input":
            return self.probe_embed
        return self.embed + self.layers[0].dense


@dataclasses.dataclass(frozen=True)
class ComputeCount:
    """The FLOPs of a sampler run for one sample (all CFG branches): ``total``, its parts (``parts``: attention =
    the Chipmunk-capable attentions' QK^T / PV, mlp = the Chipmunk-capable MLPs, linear = every other block matmul,
    embed, head, conditioning, probe), the dense sampler's ``dense`` over the same steps and branches, and the
    number of steps that ran the full model."""

    total: float
    dense: float
    parts: dict[str, float]
    computed_steps: int
    num_steps: int

    @property
    def fraction(self) -> float:
        """Executed / dense FLOPs."""
        return self.total / self.dense


def attention_keep_share(attention: AttentionConfig, num_keys: int, static_keys: float = 0.0) -> float:
    """Share of the keys a sparse attention step attends (nominal, an upper bound of the union): ``tk / N``, the
    dynamic random keys (compressed path) and ``static_keys``, the static mask's share (video; 0 without one)."""
    positive_int("num_keys", num_keys)
    tk = min(attention_column_count(attention.top_keys, num_keys, attention.counts_multiple_of), num_keys)
    dynamic = attention.dynamic_random_keys if attention.compress_indices else 0.0
    return min(1.0, tk / num_keys + dynamic + static_keys)


def mlp_keep_share(mlp: MLPConfig, hidden: int) -> float:
    """Share of the hidden features a sparse MLP step computes (nominal): the top-k count rounded up to
    ``counts_multiple_of``, plus the random features' probability (an upper bound of the union)."""
    positive_int("hidden", hidden)
    fk = mlp_feature_count(mlp.top_keys, hidden)
    fk = min(hidden, -(-fk // mlp.counts_multiple_of) * mlp.counts_multiple_of)
    return min(1.0, fk / hidden + mlp.random_keys)


def _linear(tokens: int, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def flux_cost(model: FluxConfig, *, num_image_tokens: int, num_text_tokens: int) -> ModelCost:
    """FLUX.1 (``models.flux``, ``models.mmdit``) with N image and L text tokens, D = inner_dim, F = 4 D, S = N + L.

    double block: image + text QKV 6 (N + L) D^2, outputs 2 (N + L) D^2, text MLP 4 L D F (other); attention over the
      joint S x S; Chipmunk MLP = the image MLP (N tokens).
    single block: QKV 6 S D^2 and proj_out's attention half 2 S D^2 (other); attention S x S; Chipmunk MLP =
      proj_mlp + proj_out's MLP half (S tokens).
    embed: x_embedder 2 N C_in D + context_embedder 2 L C_txt D (probe: x_embedder only); head: proj_out 2 N D C_out;
    conditioning: timestep (256 frequencies), guidance and pooled-text embedders (two Linears each), each block's
      AdaLayerNormZero Linears (6 D per stream of a double block, 3 D of a single block) and norm_out's (2 D)."""
    if not isinstance(model, FluxConfig):
        raise TypeError(f"model must be a FluxConfig, got {type(model).__name__}")
    n, l = positive_int("num_image_tokens", num_image_tokens), non_negative_int("num_text_tokens", num_text_tokens)
    d, f, s = model.inner_dim, model.mlp_hidden_dim, n + l
    double = LayerCost(other=_linear(s, d, 4 * d) + _linear(l, d, f) + _linear(l, f, d),
                       attention_queries=s, attention_keys=s, attention_width=d,
                       mlp_tokens=n, mlp_in=d, mlp_hidden=f, mlp_out=d)
    single = LayerCost(other=_linear(s, d, 4 * d), attention_queries=s, attention_keys=s, attention_width=d,
                       mlp_tokens=s, mlp_in=d, mlp_hidden=f, mlp_out=d)
    embedders = (2 if model.guidance_embeds else 1) * (_linear(1, 256, d) + _linear(1, d, d))
    embedders += _linear(1, model.pooled_projection_dim, d) + _linear(1, d, d)
    modulation = model.num_layers * 2 * _linear(1, d, 6 * d) + model.num_single_layers * _linear(1, d, 3 * d)
    probe_embed = _linear(n, model.in_channels, d)
    return ModelCost(layers=(double,) * model.num_layers + (single,) * model.num_single_layers,
                     embed=probe_embed + _linear(l, model.joint_attention_dim, d), probe_embed=probe_embed,
                     head=_linear(n, d, model.output_channels),
                     conditioning=embedders + modulation + _linear(1, d, 2 * d))


def wan_cost(model: WanConfig, *, num_video_tokens: int, num_text_tokens: int) -> ModelCost:
    """Wan 2.1 / 2.2 text-to-video (``models.wan``) with N video and L text tokens, D = inner_dim, F = ffn_dim.

    block: self-attention QKV 6 N D^2 + output 2 N D^2, cross-attention query and output 4 N D^2, its keys / values
      4 L D^2 and its N x L attention 4 N L D (other); Chipmunk attention = the N x N self-attention; Chipmunk MLP
      = the FFN (N tokens).
    embed: the patch embedding 2 N (C_in * prod(patch)) D + the text embedder 2 L (C_txt D + D^2) (probe: the patch
      embedding only); head: proj_out 2 N D (prod(patch) * C_out); conditioning: time embedder (freq_dim -> D -> D)
      and time_proj (D -> 6 D). The image context of the I2V models has no formula here."""
    if not isinstance(model, WanConfig):
        raise TypeError(f"model must be a WanConfig, got {type(model).__name__}")
    if model.image_dim is not None:
        raise ValueError("no FLOP formula for Wan's image context (I2V models, image_dim set): text-to-video only")
    n, l = positive_int("num_video_tokens", num_video_tokens), non_negative_int("num_text_tokens", num_text_tokens)
    d, f = model.inner_dim, model.ffn_dim
    block = LayerCost(other=_linear(n, d, 6 * d) + _linear(l, d, 2 * d) + 4.0 * n * l * d,
                      attention_queries=n, attention_keys=n, attention_width=d,
                      mlp_tokens=n, mlp_in=d, mlp_hidden=f, mlp_out=d)
    patches = math.prod(model.patch_size)
    probe_embed = _linear(n, model.in_channels * patches, d)
    return ModelCost(layers=(block,) * model.num_layers,
                     embed=probe_embed + _linear(l, model.text_dim, d) + _linear(l, d, d), probe_embed=probe_embed,
                     head=_linear(n, d, patches * model.output_channels),
                     conditioning=_linear(1, model.freq_dim, d) + _linear(1, d, d) + _linear(1, d, 6 * d))


def model_cost(model, *, num_tokens: int, num_text_tokens: int) -> ModelCost:
    """``flux_cost`` or ``wan_cost`` by the config's type (``num_tokens``: the image / video tokens)."""
    if isinstance(model, FluxConfig):
        return flux_cost(model, num_image_tokens=num_tokens, num_text_tokens=num_text_tokens)
    if isinstance(model, WanConfig):
        return wan_cost(model, num_video_tokens=num_tokens, num_text_tokens=num_text_tokens)
    raise TypeError(f"no FLOP formula for a {type(model).__name__} (FluxConfig and WanConfig have one)")


def _layer_step(layer: LayerCost, index: int, step: int, chipmunk: ChipmunkConfig | None, attention_keep: float,
                mlp_keep: float) -> tuple[float, float]:
    """(attention, MLP) FLOPs of Chipmunk-capable layer ``index`` at ``step`` under ``chipmunk`` (None: dense)."""
    if chipmunk is None:
        return layer.attention(), layer.mlp()
    a, m = chipmunk.attention, chipmunk.mlp
    a_kind = int(attention_schedule(chipmunk)[step]) if a.enabled and index >= a.first_n_dense_layers else None
    m_kind = int(mlp_schedule(chipmunk)[step]) if m.enabled and index >= m.first_n_dense_layers else None
    if a_kind == AttentionStep.SPARSE:
        attention = layer.attention(attention_keep)
    elif a_kind in (AttentionStep.DENSE_COLSUM, AttentionStep.DENSE_REFRESH):  # + the out_cache refresh
        attention = layer.attention() + layer.attention(attention_keep)
    else:
        attention = layer.attention()
    if m_kind in (MLPStep.SPARSE_SELECT, MLPStep.SPARSE_REUSE):
        mlp = layer.mlp(mlp_keep)
    else:
        mlp = layer.mlp()
    if m_kind in (MLPStep.DENSE, MLPStep.SPARSE_SELECT):  # the block-mean scores (a full step stores the baseline)
        mlp += layer.block_means(m.block_size)
    return attention, mlp


def executed_flops(cost: ModelCost, num_steps: int, *, chipmunk: ChipmunkConfig | None = None, computed=None,
                   probe: str | None = None, branches: int = 1, static_keys: float = 0.0) -> ComputeCount:
    """The FLOPs of a ``num_steps``-step sampler run of the model ``cost`` describes (see the module docstring).

    chipmunk: the run's Chipmunk config (None: dense layers); its static step cache skips steps unless a policy ran.
    computed: bool [num_steps], the steps a step policy ran the full model on (its state's ``computed`` mask);
      None: every step not skipped by the static step cache.
    probe: the policy's ``probe_kind`` (needed with ``computed``; None without a policy).
    branches: model calls per step (2 with classifier-free guidance): every count is per branch.
    static_keys: the share of the keys the video static mask keeps on every sparse attention step.
    """
    num_steps = positive_int("num_steps", num_steps)
    branches = positive_int("branches", branches)
    if chipmunk is not None and not isinstance(chipmunk, ChipmunkConfig):
        raise TypeError(f"chipmunk must be a ChipmunkConfig or None, got {type(chipmunk).__name__}")
    if chipmunk is not None and num_steps > chipmunk.num_steps:
        raise ValueError(f"{num_steps} steps exceed chipmunk.num_steps={chipmunk.num_steps}")
    if (computed is None) != (probe is None):
        raise ValueError("a step policy's run gives both computed (its mask) and probe (its probe kind)")
    if computed is not None:
        if chipmunk is not None and chipmunk.step_cache.enabled:
            raise ValueError("a step policy and the static step cache both skip steps: the sampler runs one of them")
        computed = np.asarray(computed)
        if computed.dtype != np.bool_ or computed.shape != (num_steps,):
            raise ValueError(f"computed must be a bool mask of the {num_steps} steps, got {computed.dtype} "
                             f"{computed.shape}")
    elif chipmunk is not None:
        computed = model_schedule(chipmunk)[:num_steps] != ModelStep.SKIP
    else:
        computed = np.ones(num_steps, bool)
    layers = cost.layers
    attention_keep = mlp_keep = 1.0
    if chipmunk is not None:
        attention_keep = attention_keep_share(chipmunk.attention, layers[0].attention_keys, static_keys)
        mlp_keep = mlp_keep_share(chipmunk.mlp, layers[0].mlp_hidden) if layers else 1.0
    parts = dict.fromkeys(_FLOPS, 0.0)
    parts["conditioning"] = num_steps * cost.conditioning
    parts["probe"] = 0.0 if probe is None else num_steps * cost.probe(probe)
    parts["head"] = num_steps * cost.head
    for step in np.flatnonzero(computed):
        parts["embed"] += cost.embed
        for index, layer in enumerate(layers):
            attention, mlp = _layer_step(layer, index, int(step), chipmunk, attention_keep, mlp_keep)
            parts["attention"] += attention
            parts["mlp"] += mlp
            parts["linear"] += layer.other
    parts = {name: branches * value for name, value in parts.items()}
    dense = branches * num_steps * (cost.conditioning + cost.dense_call())
    return ComputeCount(total=sum(parts.values()), dense=dense, parts=parts, computed_steps=int(computed.sum()),
                        num_steps=num_steps)
