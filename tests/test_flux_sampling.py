"""FLUX inside the one-jit sampler: equality with a plain Python Euler loop over the dense tiny model,
one trace per shape/config, skipped steps that run only the final layer, Chipmunk + step caching with the
latents in raster order throughout, static step dispatch, and the per-step conditioning computed before the loop."""

from __future__ import annotations

import chex
import numpy as np
import pytest

import jax
import jax.extend
import jax.numpy as jnp

from chipmunk_jax import config as C
from chipmunk_jax import sampling as SA
from chipmunk_jax.cache import StepCache, stack_branches
from chipmunk_jax.models import flux, mmdit
from chipmunk_jax.models.chipmunk_ops import token_permutation
from chipmunk_jax.outputs import ModelOutput
from chipmunk_jax.schedule import step_plan

from helpers import max_abs_error, max_rel_error

TINY = flux.FluxConfig(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                       joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
                       guidance_embeds=True)
GUIDANCE = 3.5
TEXT_LEN = 8


def _problem(grid, seed, config=TINY):
    keys = jax.random.split(jax.random.key(seed), 4)
    params = flux.init_params(config, keys[0], dtype=jnp.float32)
    latents = jax.random.normal(keys[1], (1, grid[0] * grid[1], config.in_channels), jnp.float32)
    text = jax.random.normal(keys[2], (1, TEXT_LEN, config.joint_attention_dim), jnp.float32)
    pooled = jax.random.normal(keys[3], (1, config.pooled_projection_dim), jnp.float32)
    return params, latents, text, pooled


def _model_inputs(text, pooled, grid):
    return dict(encoder_hidden_states=text, pooled_projections=pooled, img_ids=flux.image_ids(grid),
                txt_ids=np.zeros((TEXT_LEN, 3), np.float32), guidance=jnp.asarray([GUIDANCE]))


def _conditioning(params, timestep, pooled, guidance=GUIDANCE):
    return flux.timestep_conditioning(params, TINY, timestep=timestep, pooled_projections=pooled, guidance=guidance)


def _cond(text, pooled, grid, guidance=GUIDANCE):
    return flux.sampling_cond(TINY, encoder_hidden_states=text, pooled_projections=pooled, grid=grid,
                              guidance=guidance)


def _fresh_step_cache(latents, config=TINY):
    return StepCache(hidden=jnp.zeros(latents.shape[:2] + (config.inner_dim,), jnp.float32), valid=jnp.bool_(False))


def _python_euler(params, latents, text, pooled, grid, sigmas, skip=()):
    """Plain Python loop over the dense model; on ``skip`` steps only ``head`` on the last hidden state."""
    inputs, x, hidden = _model_inputs(text, pooled, grid), latents, None
    for i in range(len(sigmas) - 1):
        if i in skip:
            v = flux.head(params, TINY, hidden, _conditioning(params, sigmas[i], pooled), grid=grid, dtype=jnp.float32)
        else:
            out = flux.forward(params, TINY, hidden_states=x, timestep=sigmas[i], **inputs, dtype=jnp.float32)
            v, hidden = out.sample, out.hidden
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


@pytest.mark.slow
def test_head_of_hidden_is_forward_for_any_timestep_and_token_order():
    grid = (16, 16)
    params, latents, text, pooled = _problem(grid, seed=1)
    inputs = _model_inputs(text, pooled, grid)
    dense = flux.forward(params, TINY, hidden_states=latents, timestep=0.7, **inputs, dtype=jnp.float32)
    assert isinstance(dense, ModelOutput) and dense.cache is None
    chex.assert_shape(dense.hidden, (1, 256, TINY.inner_dim))
    head = lambda t, hidden=dense.hidden, **kw: flux.head(  # noqa: E731
        params, TINY, hidden, _conditioning(params, t, pooled), grid=grid, dtype=jnp.float32, **kw)
    assert max_abs_error(head(0.7), dense.sample) <= 1e-5
    assert max_abs_error(head(0.3), dense.sample) > 1e-3  # the current timestep really conditions the head
    # Chipmunk with tiles (every layer dense): the hidden state is in tile order; head permutes back like forward
    chipmunk = C.flux().replace(attention__first_n_dense_layers=9, mlp__first_n_dense_layers=9)
    out = flux.forward(params, TINY, hidden_states=latents, timestep=0.7, **inputs, chipmunk=chipmunk,
                       plan=step_plan(chipmunk, 0), grid=grid, dtype=jnp.float32)
    perm = token_permutation(chipmunk, grid)
    assert not np.array_equal(perm, np.arange(256))
    assert max_abs_error(out.hidden, np.asarray(dense.hidden)[:, perm]) <= 1e-5
    out_head = head(0.7, out.hidden, chipmunk=chipmunk)
    assert max_abs_error(out_head, out.sample) <= 1e-5 and max_abs_error(out.sample, dense.sample) <= 1e-5
    with pytest.raises(ValueError, match="grid"):
        flux.head(params, TINY, out.hidden, _conditioning(params, 0.7, pooled), grid=(8, 8), chipmunk=chipmunk)
    with pytest.raises(ValueError, match="hidden must be"):
        flux.head(params, TINY, latents, _conditioning(params, 0.7, pooled), grid=grid)
    with pytest.raises(ValueError, match="conditioning must come from flux.timestep_conditioning"):
        flux.head(params, TINY, dense.hidden, {"norm_out": 0}, grid=grid)
    with pytest.raises(ValueError, match="guidance is required"):
        _conditioning(params, 0.7, pooled, guidance=None)


def test_dense_sampler_equals_python_euler_loop_and_traces_once():
    grid = (4, 6)
    params, latents, text, pooled = _problem(grid, seed=2)
    sigmas = SA.flow_sigmas(5, mu=SA.flux_shift(grid[0] * grid[1]))
    traces = []
    den = flux.denoiser(TINY, None, grid=grid, dtype=jnp.float32)
    counted = SA.Denoiser(compute=lambda *a: (traces.append(1), den.compute(*a))[1], head=den.head,
                          timestep_tables=den.timestep_tables)
    run = SA.make_sampler(counted, C.ChipmunkConfig(num_steps=5), sigmas)
    out, cache, step_cache = run(params, jnp.copy(latents), _cond(text, pooled, grid), None,
                                 _fresh_step_cache(latents), jax.random.key(0))
    assert cache is None and bool(step_cache.valid)
    ref = _python_euler(params, latents, text, pooled, grid, sigmas)
    chex.assert_trees_all_close(out, ref, rtol=0, atol=1e-5)
    assert max_abs_error(out, latents) > 0.1
    params2, latents2, text2, pooled2 = _problem(grid, seed=3)
    run(params2, latents2, _cond(text2, pooled2, grid, guidance=1.5), None, _fresh_step_cache(latents2),
        jax.random.key(1))
    assert run._cache_size() == 1 and len(traces) == 1  # new values, same shapes: no retrace


def test_skipped_steps_run_only_the_final_layer(monkeypatch):
    grid = (4, 4)
    params, latents, text, pooled = _problem(grid, seed=4)
    calls = []

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            jax.debug.callback(lambda: calls.append(name), ordered=True)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(mmdit, "double_block", counting("double", mmdit.double_block))
    monkeypatch.setattr(mmdit, "single_block", counting("single", mmdit.single_block))
    monkeypatch.setattr(flux, "_final_layer", counting("final", flux._final_layer))
    sampler_config = C.ChipmunkConfig(num_steps=6, step_cache=C.StepCacheConfig(enabled=True,
                                                                                skip_step_schedule=(2, 3, 5)))
    sigmas = SA.flow_sigmas(6)
    finished = []
    run = SA.make_sampler(flux.denoiser(TINY, None, grid=grid, dtype=jnp.float32), sampler_config, sigmas,
                          on_step=finished.append)
    out, _, _ = run(params, jnp.copy(latents), _cond(text, pooled, grid), None, _fresh_step_cache(latents),
                    jax.random.key(0))
    jax.block_until_ready(out)
    assert finished == list(range(6))
    assert calls.count("double") == 3 * TINY.num_layers and calls.count("single") == 3 * TINY.num_single_layers
    assert calls.count("final") == 6  # every step ends with the final layer, skipped ones with it alone
    ref = _python_euler(params, latents, text, pooled, grid, sigmas, skip=(2, 3, 5))
    chex.assert_trees_all_close(out, ref, rtol=0, atol=1e-5)
    assert max_abs_error(out, _python_euler(params, latents, text, pooled, grid, sigmas)) > 1e-4


def _chipmunk_run(chipmunk, grid, params, latents, text, pooled, sigmas, guidance_scale=None,
                  static_step_dispatch=False):
    """The latents stay in raster order (the model runs its tile order inside); the sampler donates them."""
    cache = flux.init_cache(TINY, chipmunk, batch=1, grid=grid, num_text_tokens=TEXT_LEN, dtype=jnp.float32)
    step_cache = _fresh_step_cache(latents)
    cond, uncond = _cond(text, pooled, grid), None
    if guidance_scale is not None:
        cache, step_cache = stack_branches(cache, 2), stack_branches(step_cache, 2)
        uncond = dict(cond, encoder_hidden_states=jnp.zeros_like(text))
    run = SA.make_sampler(flux.denoiser(TINY, chipmunk, grid=grid, dtype=jnp.float32), chipmunk, sigmas,
                          guidance_scale=guidance_scale, static_step_dispatch=static_step_dispatch)
    out, cache, step_cache = run(params, jnp.copy(latents), cond, cache, step_cache, jax.random.key(0), uncond)
    return out, cache, step_cache, run


@pytest.mark.slow
def test_chipmunk_with_step_caching_under_one_jit():
    grid = (16, 16)  # 4 full 8x8 tiles: the tile order differs from raster
    params, latents, text, pooled = _problem(grid, seed=5)
    steps, skip = 7, (3, 5)
    sigmas = SA.flow_sigmas(steps, mu=SA.flux_shift(256))
    step_cache_config = C.StepCacheConfig(enabled=True, skip_step_schedule=skip)
    # every MLP column kept and attention dense at every step (its sparse steps normalise with the LSE of
    # the last full step, docs/algorithm.md §1.7, so they are not exact even with every column kept): the loop with
    # sparse-delta MLP steps, tile order and skipped steps equals the dense Python loop
    exact = C.flux().replace(num_steps=steps, step_cache=step_cache_config, attention__top_keys=1.0,
                             attention__first_n_dense_layers=0, attention__full_step_every=1, mlp__top_keys=1.0,
                             mlp__random_keys=0.0, mlp__first_n_dense_layers=0, mlp__full_step_every=4,
                             mlp__mask_cache_after_step=0)
    out, _, step_cache, _ = _chipmunk_run(exact, grid, params, latents, text, pooled, sigmas)
    ref = _python_euler(params, latents, text, pooled, grid, sigmas, skip=skip)
    assert bool(step_cache.valid)
    chex.assert_trees_all_close(out, ref, rtol=0, atol=1e-5)
    # the FLUX preset (really sparse): close to the dense step-cached trajectory, but not equal
    preset = C.flux().replace(num_steps=steps, step_cache=step_cache_config, attention__first_n_dense_layers=1,
                              mlp__first_n_dense_layers=1, attention__full_step_every=4, mlp__full_step_every=4)
    out, _, _, _ = _chipmunk_run(preset, grid, params, latents, text, pooled, sigmas)
    err = max_rel_error(out, ref)
    assert 1e-5 < err < 5e-2, err
    # ... and with CFG: one cache per branch, one trace
    out, cache, step_cache, run = _chipmunk_run(preset, grid, params, latents, text, pooled, sigmas,
                                                guidance_scale=2.0)
    chex.assert_tree_all_finite(out)
    chex.assert_shape(step_cache.valid, (2,))
    assert bool(step_cache.valid.all())
    assert cache.attention[1].lse.shape[:2] == (2, 1)  # (CFG branches, the single stack's one layer)
    assert not np.array_equal(cache.attention[1].lse[0], cache.attention[1].lse[1])
    assert run._cache_size() == 1


def _conditionals(run, *args):
    return run.lower(*args).compile().as_text().count(" conditional(")


@pytest.mark.slow
def test_static_step_dispatch_matches_traced_and_switches_once_per_step():
    """On the GPU every conditional costs a host sync (XLA copies the branch index to the host and waits for the
    stream), so the per-layer switches of traced dispatch idle the GPU ~10 ms per FLUX step
    (benchmarks/archive/RESULTS-2026-11-23-to-2026-12-03.md, "Calls 3 and 4"); static dispatch keeps one switch
    per step."""
    grid = (16, 16)
    params, latents, text, pooled = _problem(grid, seed=6)
    steps = 6
    sigmas = SA.flow_sigmas(steps, mu=SA.flux_shift(256))
    preset = C.flux().replace(num_steps=steps, attention__first_n_dense_layers=0, mlp__first_n_dense_layers=0,
                              attention__full_step_every=3, mlp__full_step_every=3)
    traced, *_, run_traced = _chipmunk_run(preset, grid, params, latents, text, pooled, sigmas)
    static, *_, run_static = _chipmunk_run(preset, grid, params, latents, text, pooled, sigmas,
                                           static_step_dispatch=True)
    assert max_rel_error(static, traced) <= 1e-5
    cache = flux.init_cache(TINY, preset, batch=1, grid=grid, num_text_tokens=TEXT_LEN, dtype=jnp.float32)
    args = (params, latents, _cond(text, pooled, grid), cache, _fresh_step_cache(latents), jax.random.key(0))
    layers = TINY.num_layers + TINY.num_single_layers
    assert _conditionals(run_traced, *args) >= 2 * layers  # an attention and an MLP switch in every layer
    assert _conditionals(run_static, *args) == 1


def _loop_dot_operand_shapes(jaxpr, steps):
    """Operand shapes (last two axes: a block stack's weights carry a layer axis) of every dot_general inside the
    sampler's step loop (fori_loop with static bounds is a scan of ``steps`` iterations; the scans over layers,
    inside or outside it, do not count as that loop)."""
    shapes = set()

    def walk(jaxpr, in_loop):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and in_loop:
                shapes.update(tuple(v.aval.shape[-2:]) for v in eqn.invars)
            step_loop = eqn.primitive.name == "while" or (eqn.primitive.name == "scan"
                                                          and eqn.params.get("length") == steps)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub, in_loop or step_loop)

    walk(jaxpr.jaxpr, False)
    return shapes


def _in_loop_denoiser(chipmunk, grid):
    """Reference: FLUX as a Denoiser without timestep tables, so every model call computes its own
    conditioning from the step's sigma inside the loop (what ``flux.denoiser`` avoids)."""
    chipmunk_kw = {} if chipmunk is None else dict(chipmunk=chipmunk, grid=grid)

    def compute(params, latents, sigma, cond, cache, plan, key):
        state = {} if chipmunk is None else dict(cache=cache, plan=plan, key=key)
        out = flux.forward(params, TINY, hidden_states=latents, timestep=sigma, **cond, **chipmunk_kw, **state,
                           dtype=jnp.float32)
        return out.replace(cache=cache if chipmunk is None else out.cache)

    def head(params, hidden, sigma, cond):
        conditioning = flux.timestep_conditioning(params, TINY, timestep=sigma,
                                                  pooled_projections=cond["pooled_projections"],
                                                  guidance=cond["guidance"])
        return flux.head(params, TINY, hidden, conditioning, grid=grid, chipmunk=chipmunk, dtype=jnp.float32)

    return SA.Denoiser(compute=compute, head=head)


@pytest.mark.parametrize("chipmunk,guidance_scale", [
    pytest.param(None, None), pytest.param("flux", None, marks=pytest.mark.slow),
    pytest.param(None, 2.0, marks=pytest.mark.slow)])
def test_timestep_conditioning_is_computed_before_the_loop(chipmunk, guidance_scale):
    """FLUX's modulation GEMVs read 6.5 GB of weights per step; ``flux.denoiser``'s timestep tables run them once
    per sampling run, batched over the steps, and the loop body holds none (same trajectory as a denoiser that
    computes them in the loop, to float32 rounding). With CFG each branch gets the tables of its own cond (the
    uncond pooled projections differ here)."""
    grid = (16, 16)
    params, latents, text, pooled = _problem(grid, seed=7)
    steps = 4
    sigmas = SA.flow_sigmas(steps, mu=SA.flux_shift(256))
    chip = None if chipmunk is None else C.flux().replace(
        num_steps=steps, step_cache=C.StepCacheConfig(enabled=True, skip_step_schedule=(2,)),
        attention__first_n_dense_layers=0, mlp__first_n_dense_layers=0)
    sampler_config = chip or C.ChipmunkConfig(num_steps=steps)
    cond = _cond(text, pooled, grid)
    uncond = None
    if guidance_scale is not None:
        uncond = dict(cond, encoder_hidden_states=jnp.zeros_like(text), pooled_projections=-pooled)
    outputs, dot_shapes = [], []
    for den in (flux.denoiser(TINY, chip, grid=grid, dtype=jnp.float32), _in_loop_denoiser(chip, grid)):
        run = SA.make_sampler(den, sampler_config, sigmas, guidance_scale=guidance_scale)
        cache = None if chip is None else flux.init_cache(TINY, chip, batch=1, grid=grid, num_text_tokens=TEXT_LEN,
                                                          dtype=jnp.float32)
        step_cache = _fresh_step_cache(latents)
        if guidance_scale is not None:
            step_cache = stack_branches(step_cache, 2)
        args = (params, jnp.copy(latents), cond, cache, step_cache, jax.random.key(0), uncond)
        dot_shapes.append(_loop_dot_operand_shapes(jax.make_jaxpr(run)(*args), steps))
        outputs.append(run(*args)[0])
    dim = TINY.inner_dim
    modulation_weights = {(dim, 6 * dim), (dim, 3 * dim), (dim, 2 * dim)}  # double, single blocks, norm_out
    assert not modulation_weights & dot_shapes[0]
    assert modulation_weights <= dot_shapes[1]  # the check sees them when they are in the loop
    assert max_rel_error(outputs[0], outputs[1]) <= 1e-5


def test_forward_takes_precomputed_conditioning():
    grid = (4, 4)
    params, latents, text, pooled = _problem(grid, seed=8)
    inputs = _model_inputs(text, pooled, grid)
    conditioning = _conditioning(params, 0.6, pooled, guidance=inputs["guidance"])
    out = flux.forward(params, TINY, hidden_states=latents, timestep=0.6, **inputs, dtype=jnp.float32).sample
    given = flux.forward(params, TINY, hidden_states=latents, timestep=0.6, **inputs, dtype=jnp.float32,
                         conditioning=conditioning).sample
    chex.assert_trees_all_equal(given, out)
    other = _conditioning(params, 0.2, pooled, guidance=inputs["guidance"])
    assert max_abs_error(flux.forward(params, TINY, hidden_states=latents, timestep=0.6, **inputs, dtype=jnp.float32,
                                      conditioning=other).sample, out) > 1e-3  # the blocks really read it
    with pytest.raises(ValueError, match="conditioning must come from flux.timestep_conditioning"):
        flux.forward(params, TINY, hidden_states=latents, timestep=0.6, **inputs, conditioning={"norm_out": 0})
    batch2 = _conditioning(params, 0.6, jnp.tile(pooled, (2, 1)))
    with pytest.raises(ValueError, match=r"batch 1\); conditioning\['transformer_blocks'\] has leading axes"):
        flux.forward(params, TINY, hidden_states=latents, timestep=0.6, **inputs, conditioning=batch2)
    with pytest.raises(ValueError, match="guidance is required"):
        _conditioning(params, 0.6, pooled, guidance=None)
    with pytest.raises(ValueError, match="pooled_projections must have 2"):
        _conditioning(params, 0.6, pooled[0])


def test_adapter_validates_arguments():
    with pytest.raises(ValueError, match="grid"):
        flux.denoiser(TINY, None, grid=(4,))
    with pytest.raises(TypeError, match="config must be a FluxConfig"):
        flux.denoiser({}, None, grid=(4, 4))
    with pytest.raises(ValueError, match="reorder.kind"):
        flux.denoiser(TINY, C.wan(), grid=(4, 4))
    text, pooled = jnp.zeros((1, TEXT_LEN, 32)), jnp.zeros((1, 32))
    with pytest.raises(ValueError, match="guidance is required"):
        _cond(text, pooled, (4, 4), guidance=None)
    with pytest.raises(ValueError, match="pooled_projections must have 2"):
        _cond(text, pooled[0], (4, 4), guidance=1.0)
