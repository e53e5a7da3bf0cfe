"""The one model contract (docs/architecture.md §4), the same test functions for FLUX, HunyuanVideo and Wan:
``forward`` returns a ``ModelOutput``; ``head`` turns its hidden state back into the sample; caches are
``ModelCache``s with one entry per block stack, stacked over its sparse layers; models take a ``StepPlan`` (static or traced), not
a step index; the hidden state is in Chipmunk's token order; with every column kept Chipmunk equals dense
at every step kind; the denoisers run dense (``chipmunk=None``) and Chipmunk in the one-jit sampler."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax import config as chipmunk_config
from chipmunk_jax import sampling
from chipmunk_jax.cache import AttentionCache, MLPCache, ModelCache, StepCache, stack_branches
from chipmunk_jax.models import flux, hunyuan_video, wan
from chipmunk_jax.models.block_stack import block_at, num_blocks, stack_blocks
from chipmunk_jax.models.chipmunk_ops import token_permutation
from chipmunk_jax.outputs import ModelOutput
from chipmunk_jax.schedule import AttentionStep, MLPStep, StepPlan, attention_schedule, mlp_schedule, step_plan

from helpers import max_rel_error

RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    """One model under the contract: its module, a tiny config and the model-specific keywords."""

    name: str
    module: Any
    config: Any
    grid: tuple[int, ...]
    inputs: Callable[[int], dict]  # forward's diffusers keywords at a step of a slowly moving trajectory
    conditioning: Callable[[dict], dict]  # timestep_conditioning's keywords from those inputs
    chipmunk: Any  # a preset with every column kept, so every step kind equals dense
    cache_kw: dict  # init_cache's model-specific keywords
    forward_kw: dict  # forward's model-specific keywords (with chipmunk)
    sample_shape: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def params(self, seed=0):
        return self.module.init_params(self.config, jax.random.key(seed), dtype=jnp.float32)

    def init_cache(self, chipmunk=None, key=None):
        return self.module.init_cache(self.config, chipmunk or self.chipmunk, batch=1, grid=self.grid, key=key,
                                      dtype=jnp.float32, **self.cache_kw)


def _drift(x, step):
    drift = np.random.default_rng(1000 + step).standard_normal(x.shape).astype(np.float32)
    return x + 0.05 * step * drift


def _flux_case() -> Case:
    config = flux.FluxConfig(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             axes_dims_rope=(4, 4, 8), guidance_embeds=True)
    grid, text = (16, 16), 8

    def inputs(step):
        rng = np.random.default_rng(20)
        return dict(
            hidden_states=_drift(rng.standard_normal((1, 256, 4)).astype(np.float32), step),
            encoder_hidden_states=rng.standard_normal((1, text, 32)).astype(np.float32),
            pooled_projections=rng.standard_normal((1, 32)).astype(np.float32),
            timestep=np.asarray([1.0 - 0.1 * step], np.float32), guidance=np.asarray([3.5], np.float32),
            img_ids=flux.image_ids(grid), txt_ids=np.zeros((text, 3), np.float32))

    chipmunk = chipmunk_config.flux().replace(
        attention__top_keys=1.0, attention__first_n_dense_layers=0, attention__full_step_every=3,
        mlp__top_keys=1.0, mlp__random_keys=0.0, mlp__first_n_dense_layers=0, mlp__full_step_every=3,
        mlp__mask_cache_after_step=0)
    return Case("flux", flux, config, grid, inputs,
                lambda x: dict(timestep=x["timestep"], pooled_projections=x["pooled_projections"],
                               guidance=x["guidance"]),
                chipmunk, dict(num_text_tokens=text), dict(grid=grid), (1, 256, 4))


def _hunyuan_case() -> Case:
    config = hunyuan_video.HunyuanVideoConfig(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
    latent, text, valid = (4, 12, 16), 12, 7

    def inputs(step):
        rng = np.random.default_rng(20)
        return dict(
            hidden_states=_drift(rng.standard_normal((1, 4) + latent).astype(np.float32), step),
            timestep=np.asarray([1000.0 - 100.0 * step], np.float32),
            encoder_hidden_states=rng.standard_normal((1, text, 16)).astype(np.float32),
            encoder_attention_mask=(np.arange(text) < valid)[None].astype(np.float32),
            pooled_projections=rng.standard_normal((1, 8)).astype(np.float32),
            guidance=np.asarray([6000.0], np.float32))

    # static random keys with probability 1: every group's static mask is every key
    chipmunk = chipmunk_config.hunyuan_video().replace(
        attention__random_keys=1.0, attention__first_n_dense_layers=0, attention__full_step_schedule=(0, 1, 4),
        step_cache__enabled=False)
    return Case("hunyuan_video", hunyuan_video, config, latent, inputs,
                lambda x: dict(timestep=x["timestep"], pooled_projections=x["pooled_projections"],
                               guidance=x["guidance"]),
                chipmunk, dict(text_length=valid), dict(text_length=valid), (1, 4) + latent)


def _wan_case() -> Case:
    config = wan.WanConfig(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                           out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    latent, grid = (4, 12, 32), (4, 6, 16)  # two (4, 6, 8) voxels: a real permutation

    def inputs(step):
        rng = np.random.default_rng(20)
        return dict(
            hidden_states=_drift(rng.standard_normal((1, 4) + latent).astype(np.float32), step),
            timestep=np.asarray([1000.0 - 100.0 * step], np.float32),
            encoder_hidden_states=rng.standard_normal((1, 8, 16)).astype(np.float32))

    # compressed selection keeps a group's top-k only while static + top-k stays below N (eligibility), so
    # "every key" is top-k = N (0.995 * 384 rounds up to 384 in steps of 16) over an empty static mask
    chipmunk = chipmunk_config.wan().replace(
        attention__top_keys=0.995, attention__counts_multiple_of=16, attention__local_voxels=0,
        attention__random_keys=0.0, attention__first_n_dense_layers=0, attention__full_step_every=3,
        mlp__enabled=True, mlp__top_keys=1.0, mlp__random_keys=0.0, mlp__first_n_dense_layers=0,
        mlp__full_step_every=3, mlp__mask_cache_after_step=0, step_cache__enabled=False)
    return Case("wan", wan, config, grid, inputs, lambda x: dict(timestep=x["timestep"]), chipmunk, {}, {},
                (1, 4) + latent)


CASES = {"flux": _flux_case, "hunyuan_video": _hunyuan_case, "wan": _wan_case}


@pytest.fixture(params=list(CASES), scope="module")
def case(request) -> Case:
    return CASES[request.param]()


@pytest.fixture(scope="module")
def params(case):
    return case.params()


def _dense_fn(case, params):
    return jax.jit(lambda inputs: case.module.forward(params, case.config, **inputs, dtype=jnp.float32))


def _chipmunk_fn(case, params, chipmunk=None):
    chipmunk = chipmunk or case.chipmunk
    return jax.jit(lambda inputs, cache, plan, key: case.module.forward(
        params, case.config, **inputs, chipmunk=chipmunk, cache=cache, plan=plan, key=key, dtype=jnp.float32,
        **case.forward_kw))


@pytest.mark.slow
def test_output_structure(case, params):
    inputs = case.inputs(0)
    dense = _dense_fn(case, params)(inputs)
    assert isinstance(dense, ModelOutput) and dense.cache is None
    chex.assert_shape(dense.sample, case.sample_shape)
    chex.assert_type(dense.sample, jnp.float32)
    chex.assert_shape(dense.hidden, (1, case.num_tokens, case.config.inner_dim))
    chex.assert_tree_all_finite((dense.sample, dense.hidden))
    # bf16 inputs: the sample comes back in the input's dtype, the hidden state in float32
    bf16 = case.module.forward(params, case.config, **{k: jnp.asarray(v, jnp.bfloat16) if k == "hidden_states"
                                                          else v for k, v in inputs.items()})
    chex.assert_type([bf16.sample, bf16.hidden], [jnp.bfloat16, jnp.float32])

    cache = case.init_cache(key=jax.random.key(1))
    out = _chipmunk_fn(case, params)(inputs, cache, step_plan(case.chipmunk, 0), jax.random.key(0))
    assert isinstance(out, ModelOutput) and isinstance(out.cache, ModelCache)
    chex.assert_trees_all_equal_shapes_and_dtypes(out.cache, cache)  # the cache keeps its structure
    chex.assert_trees_all_close(out.sample, dense.sample, rtol=RTOL, atol=RTOL * float(jnp.abs(dense.sample).max()))


def test_head_reproduces_the_sample_for_its_timestep(case, params):
    inputs = case.inputs(0)
    for chipmunk in (None, case.chipmunk):
        if chipmunk is None:
            out = _dense_fn(case, params)(inputs)
        else:
            out = _chipmunk_fn(case, params)(inputs, case.init_cache(key=jax.random.key(1)),
                                             step_plan(chipmunk, 0), jax.random.key(0))
        cond = case.module.timestep_conditioning(params, case.config, **case.conditioning(inputs))
        sample = case.module.head(params, case.config, out.hidden, cond, grid=case.grid, chipmunk=chipmunk,
                                  dtype=jnp.float32)
        chex.assert_type(sample, jnp.float32)
        assert max_rel_error(sample, out.sample) <= 1e-6
        # conditioned on the timestep it is given (a skipped step of step caching)
        later = case.module.timestep_conditioning(params, case.config,
                                                  **case.conditioning(case.inputs(5)))
        moved = case.module.head(params, case.config, out.hidden, later, grid=case.grid, chipmunk=chipmunk,
                                 dtype=jnp.float32)
        assert max_rel_error(moved, out.sample) > 1e-3
    with pytest.raises(ValueError, match="conditioning"):
        case.module.head(params, case.config, out.hidden, {"x": 1}, grid=case.grid, chipmunk=case.chipmunk)
    with pytest.raises(ValueError, match="grid"):
        case.module.head(params, case.config, out.hidden, cond, grid=(3,) * len(case.grid))


def test_caches(case):
    cache = case.init_cache(key=jax.random.key(1))
    stacks = case.config.block_stacks
    assert isinstance(cache, ModelCache) and len(cache.attention) == len(cache.mlp) == len(stacks)
    # one cache per block stack, stacked on a leading layer axis as the stack's params
    assert [slot.lse.shape[0] for slot in cache.attention] == [count for _, count in stacks]
    assert all(isinstance(slot, AttentionCache) for slot in cache.attention)
    dense_layers = case.chipmunk.replace(attention__first_n_dense_layers=1, mlp__first_n_dense_layers=1)
    cache = case.init_cache(dense_layers, key=jax.random.key(1))
    for s, (first, count) in enumerate(stacks):
        sparse = count - min(count, max(0, 1 - first))  # the stack's layers at or above layer 1
        for slots, kind, enabled in ((cache.attention, AttentionCache, True),
                                     (cache.mlp, MLPCache, dense_layers.mlp.enabled)):
            if sparse and enabled:
                assert isinstance(slots[s], kind)
                assert {x.shape[0] for x in jax.tree_util.tree_leaves(slots[s])} == {sparse}
            else:  # always-dense layers keep no cache
                assert slots[s] is None
    attention, mlp = cache.layer(len(stacks) - 1, 0)  # one layer's caches, as forward's ops receive them
    assert attention.lse.shape == cache.attention[-1].lse.shape[1:]
    assert (mlp is None) == (cache.mlp[-1] is None)
    if case.name == "flux":
        assert cache.static_mask_bits is None
    else:  # the video static mask, bit-packed over the tokens Chipmunk runs on
        assert cache.static_mask_bits.dtype == jnp.uint8 and cache.eligible.dtype == jnp.bool_
    # wrong caches are named
    params = case.params(3)
    fn = lambda c: case.module.forward(params, case.config, **case.inputs(0), chipmunk=case.chipmunk, cache=c,  # noqa: E731
                                       plan=step_plan(case.chipmunk, 0), dtype=jnp.float32, **case.forward_kw)
    with pytest.raises(TypeError, match="ModelCache"):
        fn({"attention": []})
    with pytest.raises(ValueError, match="block stacks"):
        fn(cache.replace(attention=cache.attention[:-1]))
    full = case.init_cache(key=jax.random.key(1))
    with pytest.raises(ValueError, match="rebuild it"):  # a cache built for other first_n_dense_layers
        fn(full.replace(attention=tuple(jax.tree_util.tree_map(lambda x: x[1:], s) for s in full.attention)))
    stacked = stack_branches(case.init_cache(key=jax.random.key(1)), 2)
    with pytest.raises(ValueError, match="select_branch"):
        fn(stacked)


@pytest.mark.slow
def test_step_plan(case, params):
    """Models take the step's plan: traced kinds (lax.switch per layer) and static kinds give the same
    outputs; no plan with Chipmunk, or a plan without Chipmunk, is an error."""
    inputs = case.inputs(0)
    with pytest.raises(TypeError, match="step_plan"):
        case.module.forward(params, case.config, **inputs, chipmunk=case.chipmunk, dtype=jnp.float32,
                            **case.forward_kw)
    with pytest.raises(ValueError, match="chipmunk"):
        case.module.forward(params, case.config, **inputs, plan=step_plan(case.chipmunk, 0), dtype=jnp.float32)
    traced = _chipmunk_fn(case, params)
    cache_traced = cache_static = case.init_cache(key=jax.random.key(1))
    for step in range(3):
        inputs = case.inputs(step)
        plan = step_plan(case.chipmunk, step)
        assert isinstance(plan, StepPlan) and isinstance(plan.attention, AttentionStep)
        static = jax.jit(lambda x, c, p=plan: case.module.forward(  # Python-int kinds: static dispatch
            params, case.config, **x, chipmunk=case.chipmunk, cache=c, plan=p, key=jax.random.key(step),
            dtype=jnp.float32, **case.forward_kw))
        out_static = static(inputs, cache_static)
        out_traced = traced(inputs, cache_traced, step_plan(case.chipmunk, jnp.int32(step)), jax.random.key(step))
        chex.assert_trees_all_close(out_traced.sample, out_static.sample, rtol=1e-6, atol=1e-6)
        cache_static, cache_traced = out_static.cache, out_traced.cache
    chex.assert_trees_all_close(cache_traced, cache_static, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_hidden_is_in_chipmunk_token_order(case, params):
    inputs = case.inputs(0)
    dense = _dense_fn(case, params)(inputs)
    out = _chipmunk_fn(case, params)(inputs, case.init_cache(key=jax.random.key(1)), step_plan(case.chipmunk, 0),
                                     jax.random.key(0))
    perm = token_permutation(case.chipmunk, case.grid)
    assert perm is not None and not np.array_equal(perm, np.arange(perm.size))
    assert max_rel_error(out.hidden, np.asarray(dense.hidden)[:, perm]) <= RTOL
    assert max_rel_error(out.sample, dense.sample) <= RTOL  # the sample is back in the input's order
    # without reordering, the hidden state stays in raster order
    plain = case.chipmunk.replace(reorder__kind="none")
    cache = case.init_cache(plain, key=jax.random.key(1))
    out = _chipmunk_fn(case, params, plain)(inputs, cache, step_plan(plain, 0), jax.random.key(0))
    assert max_rel_error(out.hidden, dense.hidden) <= RTOL


@pytest.mark.slow
def test_chipmunk_with_every_column_kept_equals_dense_at_every_step_kind(case, params):
    steps = range(6)
    attention_kinds = {AttentionStep(int(k)) for k in attention_schedule(case.chipmunk)[:6]}
    assert attention_kinds >= {AttentionStep.DENSE, AttentionStep.DENSE_COLSUM, AttentionStep.SPARSE}
    if case.chipmunk.mlp.enabled:
        assert {MLPStep(int(k)) for k in mlp_schedule(case.chipmunk)[:6]} >= {
            MLPStep.DENSE, MLPStep.SPARSE_SELECT, MLPStep.SPARSE_REUSE}
    dense_fn, chipmunk_fn = _dense_fn(case, params), _chipmunk_fn(case, params)
    cache = case.init_cache(key=jax.random.key(1))
    for step in steps:
        inputs = case.inputs(step)
        out = chipmunk_fn(inputs, cache, step_plan(case.chipmunk, jnp.int32(step)), jax.random.key(step))
        assert max_rel_error(out.sample, dense_fn(inputs).sample) <= RTOL, step
        cache = out.cache


def _sampler_inputs(case):
    inputs = case.inputs(0)
    cond = {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep")}
    if case.name == "flux":
        cond = flux.sampling_cond(case.config, encoder_hidden_states=inputs["encoder_hidden_states"],
                                  pooled_projections=inputs["pooled_projections"], grid=case.grid,
                                  guidance=inputs["guidance"][0])
    return jnp.asarray(inputs["hidden_states"]), cond


@pytest.mark.slow
def test_denoisers_run_dense_and_chipmunk_in_the_sampler(case, params):
    """Each model's Denoiser: dense (chipmunk=None) and Chipmunk with every column kept give the same latents
    through the one-jit sampler (timestep tables before the loop; float32 velocities from compute and head)."""
    latents, cond = _sampler_inputs(case)
    chipmunk = case.chipmunk.replace(num_steps=6, step_cache__enabled=True, step_cache__skip_step_schedule=(3,))
    sigmas = sampling.flow_sigmas(6, shift=3.0)
    results = []
    for model_chipmunk in (None, chipmunk):
        den = case.module.denoiser(case.config, model_chipmunk, grid=case.grid, dtype=jnp.float32,
                                   **({} if case.name != "hunyuan_video" else dict(text_length=7)))
        t = jax.tree.map(lambda x: x[0], den.timestep_tables(params, jnp.asarray(sigmas), cond))
        out = den.compute(params, latents, t, cond, None, None, None) if model_chipmunk is None else None
        if out is not None:
            assert isinstance(out, ModelOutput) and out.sample.dtype == jnp.float32
            assert den.head(params, out.hidden, t, cond).dtype == jnp.float32
        cache = None if model_chipmunk is None else case.init_cache(key=jax.random.key(1))
        step_cache = StepCache(hidden=jnp.zeros((1, case.num_tokens, case.config.inner_dim)), valid=jnp.bool_(False))
        run = sampling.make_sampler(den, chipmunk, sigmas)
        x, _, _ = run(params, jnp.copy(latents), cond, cache, step_cache, jax.random.key(0))
        results.append(np.asarray(x))
    chex.assert_tree_all_finite(results)
    assert max_rel_error(results[1], results[0]) <= 1e-4


def _equation_count(jaxpr) -> int:
    """Equations of a jaxpr, those of its sub-jaxprs (scan, cond, pjit bodies) included."""
    return sum(1 + sum(_equation_count(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
               for eqn in jaxpr.eqns)


def _deeper(config, extra: int):
    if isinstance(config, wan.WanConfig):
        return dataclasses.replace(config, num_layers=config.num_layers + extra)
    return dataclasses.replace(config, num_layers=config.num_layers + extra,
                               num_single_layers=config.num_single_layers + extra)


def test_traced_program_does_not_grow_with_depth(case):
    """Each block type is stacked and run as a scan (models/block_stack.py), so the program XLA compiles for a
    Chipmunk step (dense first layer, Chipmunk layers after it: several segments per stack) is the same size for
    a model three blocks deeper per stack: compile time does not scale with depth."""
    chipmunk = case.chipmunk.replace(attention__first_n_dense_layers=1, mlp__first_n_dense_layers=1)
    sizes = []
    for extra in (1, 4):  # at least two blocks per stack: the same segments (dense, Chipmunk) at both depths
        config = _deeper(case.config, extra)
        params = jax.eval_shape(lambda: case.module.init_params(config, jax.random.key(0), dtype=jnp.float32))
        cache = jax.eval_shape(lambda: case.module.init_cache(config, chipmunk, batch=1, grid=case.grid,
                                                              key=jax.random.key(1), dtype=jnp.float32,
                                                              **case.cache_kw))
        inputs = case.inputs(2)

        def fn(params, cache):
            return case.module.forward(params, config, **inputs, chipmunk=chipmunk, cache=cache,
                                       plan=step_plan(chipmunk, 2), key=jax.random.key(0), dtype=jnp.float32,
                                       **case.forward_kw)

        sizes.append(_equation_count(jax.make_jaxpr(fn)(params, cache).jaxpr))
    assert sizes[0] == sizes[1], sizes


def test_block_stacks_are_required(case):
    """A list of blocks (diffusers' ModuleList layout) is refused with the way out; stack_blocks makes the stack."""
    params = case.params(4)
    name = "blocks" if case.name == "wan" else "transformer_blocks"
    count = num_blocks(params[name])
    listed = dict(params, **{name: [block_at(params[name], i) for i in range(count)]})
    with pytest.raises(TypeError, match="is a list of blocks.*stack_blocks"):
        case.module.forward(listed, case.config, **case.inputs(0), dtype=jnp.float32)
    restacked = dict(params, **{name: stack_blocks(listed[name])})
    chex.assert_trees_all_equal(restacked, params)
    fewer = dict(params, **{name: jax.tree_util.tree_map(lambda x: x[:-1], params[name])})
    with pytest.raises(ValueError, match=f"must hold {count} blocks stacked on a leading axis"):
        case.module.forward(fewer, case.config, **case.inputs(0), dtype=jnp.float32)


def test_sparse_mlp_kernels_take_whole_stacks(case, monkeypatch):
    """Inside the block scan the MLP delta kernels get the stacked caches (and, with fc1 stored [F, C] as
    flux.prepare_params lays it out, the stacked weights) plus layer indices, not per-layer slices: a dynamic slice
    feeding a kernel is copied out (and the new cache copied back in) on every layer of every sparse step."""
    from chipmunk_jax.pallas_kernels import mlp as mlp_kernels

    chipmunk = case.chipmunk.replace(mlp__first_n_dense_layers=1)
    if not chipmunk.mlp.enabled:
        pytest.skip(f"{case.name} runs Chipmunk on attention only")
    config = _deeper(case.config, 2)
    params = jax.eval_shape(lambda: case.module.init_params(config, jax.random.key(0), dtype=jnp.float32))
    if case.name == "flux":
        params = jax.eval_shape(lambda p: flux.prepare_params(p, config, chipmunk), params)
    cache = jax.eval_shape(lambda: case.module.init_cache(config, chipmunk, batch=1, grid=case.grid,
                                                          dtype=jnp.float32, **case.cache_kw))
    calls = []
    original = mlp_kernels.sparse_mlp_delta

    def recording(x, w1, b1, w2, act_cache, out_cache, *args, **kw):
        calls.append((w1.ndim, act_cache.ndim, kw.get("weights_layer") is not None, kw.get("cache_layer") is not None))
        return original(x, w1, b1, w2, act_cache, out_cache, *args, **kw)

    monkeypatch.setattr(mlp_kernels, "sparse_mlp_delta", recording)
    plan = StepPlan(attention=AttentionStep.SPARSE, mlp=MLPStep.SPARSE_REUSE)
    jax.eval_shape(lambda p, c: case.module.forward(p, config, **case.inputs(2), chipmunk=chipmunk, cache=c,
                                                    plan=plan, dtype=jnp.float32, **case.forward_kw), params, cache)
    assert calls, "no sparse MLP kernel call traced"
    weights_stacked = case.name == "flux"  # Wan keeps fc1 [C, F]: its layer slice is transposed for the kernels
    assert all(call[1] == 4 and call[3] for call in calls), calls
    assert all((call[0] == 3) == weights_stacked and call[2] == weights_stacked for call in calls), calls
