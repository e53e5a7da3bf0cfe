"""Chipmunk layers in a user's own Flax NNX DiT (``chipmunk_jax.nnx.layers``).

The DiT is written here, not taken from ``chipmunk_jax.models``: patch embedding, a sinusoidal time embedding and a
label embedding, two blocks of adaLN-modulated self-attention (own q/k/v projections, an attention core ``(q, k, v)
-> o``) and a GELU(tanh) MLP (``fc1`` / ``fc2``), an adaLN final layer and unpatchify. The Chipmunk twin is that very
model with each block's core and MLP swapped for ``ChipmunkAttention`` / ``ChipmunkMLP`` (same weights). Float32 on
the CPU, reference kernels (``kernel_impl=None``), 100 tokens (not a multiple of the 64-token groups and blocks),
3 heads of 8, MLP width 40."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chipmunk_jax import config as chipmunk_config
from chipmunk_jax import sampling
from chipmunk_jax.cache import AttentionCache, MLPCache, StepCache
from chipmunk_jax.nnx import ChipmunkAttention, ChipmunkCache, ChipmunkMLP, chipmunk_step, init_caches, make_denoiser
from chipmunk_jax.schedule import AttentionStep, MLPStep, attention_schedule, mlp_schedule, step_plan

from helpers import assert_raises_with, max_rel_error

CHANNELS, PATCH, SIZE, DIM, HEADS, HIDDEN, DEPTH, CLASSES = 4, 2, 20, 24, 3, 40, 2, 5
TOKENS = (SIZE // PATCH) ** 2  # 100
RTOL = 1e-5


# ---- the user's DiT ----------------------------------------------------------------------------------------------


class DenseAttention(nnx.Module):
    def __call__(self, q, k, v):  # [B, N, H, D]
        return jax.nn.dot_product_attention(q, k, v)


class MLP(nnx.Module):
    def __init__(self, dim, hidden, *, rngs):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * 1000.0 * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class Block(nnx.Module):
    def __init__(self, *, rngs):
        self.norm1 = nnx.LayerNorm(DIM, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
        self.norm2 = nnx.LayerNorm(DIM, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
        self.modulation = nnx.Linear(DIM, 6 * DIM, rngs=rngs)
        self.qkv = nnx.Linear(DIM, 3 * DIM, rngs=rngs)
        self.proj = nnx.Linear(DIM, DIM, rngs=rngs)
        self.attention = DenseAttention()
        self.mlp = MLP(DIM, HIDDEN, rngs=rngs)

    def __call__(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.modulation(nnx.silu(c))[:, None], 6, axis=-1)
        b, n, _ = x.shape
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = (t.reshape(b, n, HEADS, DIM // HEADS) for t in jnp.split(self.qkv(h), 3, axis=-1))
        x = x + gate1 * self.proj(self.attention(q, k, v).reshape(b, n, DIM))
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class DiT(nnx.Module):
    def __init__(self, *, rngs):
        self.patch_embed = nnx.Linear(CHANNELS * PATCH * PATCH, DIM, rngs=rngs)
        self.pos_embed = nnx.Param(0.1 * jax.random.normal(rngs.params(), (TOKENS, DIM)))
        self.time_mlp = nnx.Sequential(nnx.Linear(DIM, DIM, rngs=rngs), nnx.silu, nnx.Linear(DIM, DIM, rngs=rngs))
        self.label_embed = nnx.Embed(CLASSES, DIM, rngs=rngs)
        self.blocks = nnx.List([Block(rngs=rngs) for _ in range(DEPTH)])
        self.norm_out = nnx.LayerNorm(DIM, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
        self.modulation_out = nnx.Linear(DIM, 2 * DIM, rngs=rngs)
        self.proj_out = nnx.Linear(DIM, PATCH * PATCH * CHANNELS, rngs=rngs)

    def __call__(self, x, t, labels):  # x [B, C, H, W], t [B] in [0, 1], labels [B] int
        b, g = x.shape[0], SIZE // PATCH
        patches = x.reshape(b, CHANNELS, g, PATCH, g, PATCH).transpose(0, 2, 4, 1, 3, 5).reshape(b, TOKENS, -1)
        h = self.patch_embed(patches) + self.pos_embed[...]
        c = self.time_mlp(timestep_embedding(t, DIM)) + self.label_embed(labels)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = jnp.split(self.modulation_out(nnx.silu(c))[:, None], 2, axis=-1)
        out = self.proj_out(self.norm_out(h) * (1 + scale) + shift)
        return out.reshape(b, g, g, CHANNELS, PATCH, PATCH).transpose(0, 3, 1, 4, 2, 5).reshape(x.shape)


def chipmunk_twin(dense: DiT) -> DiT:
    """A copy of ``dense`` with every block's attention core and MLP swapped for the Chipmunk layers."""
    model = nnx.clone(dense)
    for i, block in enumerate(model.blocks):
        block.attention = ChipmunkAttention(HEADS, DIM // HEADS, layer=i)
        block.mlp = ChipmunkMLP.from_linears(block.mlp.fc1, block.mlp.fc2, layer=i)
    return model


def call(model, latents, sigma, labels):
    return model(latents, jnp.broadcast_to(sigma, (latents.shape[0],)), labels)


def small(preset: chipmunk_config.ChipmunkConfig, **changes) -> chipmunk_config.ChipmunkConfig:
    """``preset`` at this test's sizes: 64-token query groups and row blocks, counts in steps of 16, raster order."""
    return preset.replace(reorder__kind="none", attention__group_size=64, attention__counts_multiple_of=16,
                          mlp__block_size=64, mlp__counts_multiple_of=16, **changes)


# every column and feature kept: each step kind equals dense
KEPT = small(chipmunk_config.flux(), num_steps=7, attention__top_keys=1.0, attention__first_n_dense_layers=0,
             attention__full_step_every=3, mlp__top_keys=1.0, mlp__random_keys=0.0, mlp__first_n_dense_layers=0,
             mlp__full_step_every=3, mlp__mask_cache_after_step=0)
# FLUX's preset (16 of 100 keys, 30% of the MLP features + 5% random) with block 0 dense
SPARSE = small(chipmunk_config.flux(), num_steps=8, attention__first_n_dense_layers=1, attention__full_step_every=4,
               mlp__first_n_dense_layers=1, mlp__full_step_every=4)


@pytest.fixture(scope="module")
def dense():
    """The DiT with random biases too (nnx.Linear starts them at zero, which would hide a dropped bias)."""
    model = DiT(rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for path, bias in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "bias":
            bias.set_value(jnp.asarray(0.1 * rng.standard_normal(bias.get_value().shape), jnp.float32))
    return model


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    return jnp.asarray(rng.standard_normal((1, CHANNELS, SIZE, SIZE)), jnp.float32), jnp.asarray([3])


def params_of(model):
    return nnx.state(model, nnx.Not(ChipmunkCache))


def sample(model, chipmunk, config, latents, labels, caches, key=0):
    """The one-jit sampler over ``model`` (``chipmunk=None``: dense) -> (latents, caches, run)."""
    run = sampling.make_sampler(make_denoiser(model, chipmunk, call=call), config, sampling.flow_sigmas(
        config.num_steps, shift=3.0))
    step_cache = StepCache(hidden=jnp.zeros(latents.shape, jnp.float32), valid=jnp.bool_(False))
    x, caches, _ = run(params_of(model), jnp.copy(latents), labels, caches, step_cache, jax.random.key(key))
    return x, caches, run


def test_twin_has_the_dense_state_paths_and_runs_dense_outside_a_step(dense, inputs):
    """The swap keeps every param path and array (a dense checkpoint loads into the Chipmunk model); outside
    ``chipmunk_step`` the Chipmunk layers are the dense layers they replace."""
    model = chipmunk_twin(dense)
    want, got = nnx.to_flat_state(nnx.state(dense, nnx.Param)), nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert [p for p, _ in got] == [p for p, _ in want]
    assert all(np.array_equal(a.get_value(), b.get_value()) for (_, a), (_, b) in zip(got, want))
    assert all(v.get_value() is None for _, v in nnx.to_flat_state(nnx.state(model, ChipmunkCache)))
    latents, labels = inputs
    t = jnp.asarray([0.7])
    assert max_rel_error(model(latents, t, labels), dense(latents, t, labels)) <= RTOL


def test_every_column_kept_equals_the_dense_sample(dense, inputs):
    """Acceptance: with every key and MLP feature kept, Chipmunk's multi-step sample (dense, column-sum, refresh and
    sparse attention steps; dense, select and reuse MLP steps) equals the dense model's, <= 1e-5 in float32."""
    assert {AttentionStep(int(k)) for k in attention_schedule(KEPT)} == {
        AttentionStep.DENSE, AttentionStep.DENSE_COLSUM, AttentionStep.DENSE_REFRESH, AttentionStep.SPARSE}
    assert {MLPStep(int(k)) for k in mlp_schedule(KEPT)} == {MLPStep.DENSE, MLPStep.SPARSE_SELECT,
                                                             MLPStep.SPARSE_REUSE}
    latents, labels = inputs
    want, _, _ = sample(dense, None, KEPT, latents, labels, nnx.State({}))
    model = chipmunk_twin(dense)
    caches = init_caches(model, KEPT, batch=1, seq_len=TOKENS, dtype=jnp.float32)
    got, caches, _ = sample(model, KEPT, KEPT, latents, labels, caches)
    assert max_rel_error(got, want) <= RTOL
    assert max_rel_error(want, latents) > 0.1  # the sample moved
    # the MLP caches came back filled (out_cache holds fc2's bias at least)
    assert all(np.any(np.asarray(c.out_cache)) for c in jax.tree.leaves(caches, is_leaf=lambda x: isinstance(
        x, (AttentionCache, MLPCache))))


@pytest.mark.slow
def test_preset_samples_under_one_jit_with_the_caches_threaded(dense, inputs):
    """A sparse preset: one trace for two samples, the caches carried from step to step (the jitted loop equals a
    Python loop that threads them by hand through the denoiser), block 0 dense without caches, and a result that
    is close to the dense one but not equal to it."""
    latents, labels = inputs
    model = chipmunk_twin(dense)
    traces = []

    def counting_call(model, latents, sigma, labels):
        traces.append(1)
        return call(model, latents, sigma, labels)

    caches = init_caches(model, SPARSE, batch=1, seq_len=TOKENS, dtype=jnp.float32)
    assert model.blocks[0].attention.cache.get_value() is None and model.blocks[0].mlp.cache.get_value() is None
    initial = jax.tree.map(np.asarray, caches)
    den = make_denoiser(model, SPARSE, call=counting_call)
    sigmas = sampling.flow_sigmas(SPARSE.num_steps, shift=3.0)
    run = sampling.make_sampler(den, SPARSE, sigmas)
    fresh = lambda: StepCache(hidden=jnp.zeros(latents.shape, jnp.float32), valid=jnp.bool_(False))  # noqa: E731
    got, new_caches, _ = run(params_of(model), jnp.copy(latents), labels, caches, fresh(), jax.random.key(0))
    run(params_of(model), jnp.copy(latents) + 1.0, labels, init_caches(model, SPARSE, batch=1, seq_len=TOKENS,
                                                                        dtype=jnp.float32), fresh(), jax.random.key(1))
    assert len(traces) == 1 and run._cache_size() == 1
    assert jax.tree.structure(new_caches) == jax.tree.structure(initial)
    for before, after in zip(jax.tree.leaves(initial), jax.tree.leaves(new_caches)):
        assert not np.array_equal(before, after)  # every cache array was written
    # the same steps with the caches threaded by hand
    compute = jax.jit(den.compute)
    x, caches, params = jnp.copy(latents), init_caches(model, SPARSE, batch=1, seq_len=TOKENS,
                                                        dtype=jnp.float32), params_of(model)
    for step in range(SPARSE.num_steps):
        out = compute(params, x, sigmas[step], labels, caches, step_plan(SPARSE, jnp.int32(step)),
                      jax.random.fold_in(jax.random.key(0), step))
        x, caches = x + (sigmas[step + 1] - sigmas[step]) * out.sample, out.cache
    assert max_rel_error(got, x) <= RTOL
    for a, b in zip(jax.tree.leaves(new_caches), jax.tree.leaves(caches)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    want, _, _ = sample(dense, None, SPARSE, latents, labels, nnx.State({}))
    assert 1e-4 < max_rel_error(got, want) < 0.1  # sparse, yet near the dense sample


def test_bad_input(dense):
    model = chipmunk_twin(dense)
    attention, mlp = model.blocks[1].attention, model.blocks[1].mlp
    q = jnp.zeros((1, TOKENS, HEADS, DIM // HEADS))
    assert_raises_with(lambda: attention(jnp.zeros((1, TOKENS, 2, 8)), q, q), "ChipmunkAttention(layer=1): q must be",
                       "[batch, tokens, 3, 8]")
    assert_raises_with(lambda: attention(q, q[:, :50], q[:, :50]), "self-attention", "same shape")
    assert_raises_with(lambda: attention(q, q, q.astype(jnp.bfloat16)), "one float dtype", error=TypeError)
    assert_raises_with(lambda: attention(q.astype(jnp.int32), q, q), "one float dtype", error=TypeError)
    assert_raises_with(lambda: mlp(jnp.zeros((1, TOKENS, DIM + 1))), "ChipmunkMLP(layer=1): x must be",
                       f"[batch, tokens, {DIM}]")
    assert_raises_with(lambda: ChipmunkAttention(0, 8, layer=0), "num_heads")
    assert_raises_with(lambda: ChipmunkAttention(3, 8, layer=-1), "layer")
    assert_raises_with(lambda: ChipmunkMLP(DIM, HIDDEN, layer=0, activation="silu", rngs=nnx.Rngs(0)),
                       "activation must be one of ('gelu_tanh',)")
    assert_raises_with(lambda: ChipmunkMLP.from_linears(model.blocks[0].qkv, nnx.Linear(DIM, DIM, rngs=nnx.Rngs(0)),
                                                        layer=0), "fc1's out_features (72)", "in_features (24)")
    assert_raises_with(lambda: ChipmunkMLP.from_linears(DenseAttention(), mlp.fc2, layer=0), "fc1 must be an "
                       "nnx.Linear", error=TypeError)
    # configs the layers cannot follow, models without layers
    assert_raises_with(lambda: make_denoiser(model, chipmunk_config.flux()), "reorder.kind", "'tiles'")
    assert_raises_with(lambda: make_denoiser(model, SPARSE.replace(step_cache__enabled=True)), "step caching")
    assert_raises_with(lambda: make_denoiser(dense, SPARSE), "holds no ChipmunkAttention or ChipmunkMLP")
    assert_raises_with(lambda: make_denoiser(dense.blocks, SPARSE), "holds no")
    assert_raises_with(lambda: make_denoiser(lambda x: x, SPARSE), "model must be an nnx.Module", error=TypeError)
    assert_raises_with(lambda: init_caches(model, SPARSE, batch=1, seq_len=32), "shorter than one query group")
    twice = nnx.clone(model)
    twice.blocks[1].mlp.layer = 0
    assert_raises_with(lambda: init_caches(twice, SPARSE, batch=1, seq_len=TOKENS), "two ChipmunkMLP layers have "
                       "layer=0")
    # caches missing, of another size, dtype or config
    plan = step_plan(SPARSE, 0)
    with chipmunk_step(model, SPARSE, plan):
        assert_raises_with(lambda: attention(q, q, q), "ChipmunkAttention(layer=1) has no Chipmunk cache",
                           "init_caches(model, chipmunk, batch=1, seq_len=100, dtype=jnp.float32)")
        assert_raises_with(lambda: chipmunk_step(model, SPARSE, plan).__enter__(), "cannot be nested")
    assert attention.step is None and mlp.step is None  # cleared on exit
    init_caches(model, SPARSE, batch=1, seq_len=TOKENS, dtype=jnp.float32)
    with chipmunk_step(model, SPARSE, plan):
        assert_raises_with(lambda: attention(*(jnp.zeros((2, TOKENS, HEADS, DIM // HEADS)),) * 3),
                           "its cache (lse (1, 3, 100) float32", "is not the cache of these inputs",
                           "batch=2, seq_len=100")
        assert_raises_with(lambda: mlp(jnp.zeros((1, 90, DIM))), "ChipmunkMLP(layer=1): its cache", "seq_len=90")
        assert_raises_with(lambda: mlp(jnp.zeros((1, TOKENS, DIM), jnp.bfloat16)), "dtype=jnp.bfloat16")
    with chipmunk_step(model, SPARSE.replace(attention__top_keys=0.5), plan):
        assert_raises_with(lambda: attention(q, q, q), "indices (1, 3, 2, 48) int32", "indices (1, 3, 2, 16) int32")
    with chipmunk_step(model, SPARSE.replace(attention__first_n_dense_layers=2), plan):
        assert_raises_with(lambda: attention(q, q, q), "is dense under this config but holds a cache")
    assert_raises_with(lambda: chipmunk_step(model, SPARSE, 0).__enter__(), "plan must be a StepPlan",
                       error=TypeError)
    # the denoiser's arguments
    den = make_denoiser(model, SPARSE, call=call)
    latents, labels = jnp.zeros((1, CHANNELS, SIZE, SIZE)), jnp.asarray([0])
    caches = nnx.state(model, ChipmunkCache)
    assert_raises_with(lambda: den.compute(nnx.state(model), latents, 0.5, labels, caches, plan, None),
                       "params holds the Chipmunk caches", error=TypeError)
    assert_raises_with(lambda: den.compute(model, latents, 0.5, labels, caches, plan, None),
                       "params must be an nnx.State", error=TypeError)
    wrong = make_denoiser(model, SPARSE, call=lambda m, x, s, c: call(m, x, s, c)[:, :2])
    assert_raises_with(lambda: wrong.compute(params_of(model), latents, 0.5, labels, caches, plan, None),
                       "velocity in the latents' shape (1, 4, 20, 20)", "(1, 2, 20, 20)")
    assert_raises_with(lambda: make_denoiser(model, SPARSE, call=3), "call must be a function", error=TypeError)
