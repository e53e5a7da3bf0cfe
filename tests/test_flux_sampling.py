"""FLUX inside the one-jit sampler: equality with a plain Python Euler loop over the dense tiny model,
one trace per shape/config, skipped steps that run only the final layer, Chipmunk + step caching."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.extend
import jax.numpy as jnp

from chipmunk_jax import config as C
from chipmunk_jax import sampling as SA
from chipmunk_jax.cache import StepCache, stack_branches
from chipmunk_jax.models import flux, mmdit

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


def _fresh_step_cache(latents, config=TINY):
    return StepCache(hidden=jnp.zeros(latents.shape[:2] + (config.inner_dim,), jnp.float32), valid=jnp.bool_(False))


def _python_euler(params, latents, text, pooled, grid, sigmas, skip=()):
    """Plain Python loop over the dense model; on ``skip`` steps only ``head`` on the last hidden state."""
    inputs, x, hidden = _model_inputs(text, pooled, grid), latents, None
    for i in range(len(sigmas) - 1):
        if i in skip:
            v = flux.head(params, TINY, hidden=hidden, timestep=sigmas[i], pooled_projections=pooled,
                          guidance=inputs["guidance"], dtype=jnp.float32)
        else:
            v, hidden = flux.forward(params, TINY, hidden_states=x, timestep=sigmas[i], **inputs, dtype=jnp.float32,
                                     return_hidden=True)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def max_abs(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


def test_head_of_hidden_is_forward_for_any_timestep_and_token_order():
    grid = (16, 16)
    params, latents, text, pooled = _problem(grid, seed=1)
    inputs = _model_inputs(text, pooled, grid)
    dense, hidden = flux.forward(params, TINY, hidden_states=latents, timestep=0.7, **inputs, dtype=jnp.float32,
                                 return_hidden=True)
    assert hidden.shape == (1, 256, TINY.inner_dim)
    assert max_abs(dense, flux.forward(params, TINY, hidden_states=latents, timestep=0.7, **inputs,
                                       dtype=jnp.float32)) == 0.0
    head = lambda t, **kw: flux.head(params, TINY, hidden=hidden, timestep=t, pooled_projections=pooled,  # noqa: E731
                                     guidance=inputs["guidance"], dtype=jnp.float32, **kw)
    assert max_abs(head(0.7), dense) <= 1e-5
    assert max_abs(head(0.3), dense) > 1e-3  # the current timestep really conditions the head
    # Chipmunk with tiles: the hidden state is in tile order; head permutes back like forward does
    chipmunk = C.flux().replace(attention__first_n_dense_layers=9, mlp__first_n_dense_layers=9)  # all dense
    out, tiled_hidden, _ = flux.forward(params, TINY, hidden_states=latents, timestep=0.7, **inputs, chipmunk=chipmunk,
                                        step=0, image_grid=grid, dtype=jnp.float32, return_hidden=True)
    perm = flux.sampling_permutation(chipmunk, grid)
    assert not np.array_equal(perm, np.arange(256))
    assert max_abs(tiled_hidden, hidden[:, perm]) <= 1e-5
    out_head = flux.head(params, TINY, hidden=tiled_hidden, timestep=0.7, pooled_projections=pooled,
                         guidance=inputs["guidance"], chipmunk=chipmunk, image_grid=grid, dtype=jnp.float32)
    assert max_abs(out_head, out) <= 1e-5 and max_abs(out, dense) <= 1e-5
    with pytest.raises(ValueError, match="image_grid"):
        flux.head(params, TINY, hidden=tiled_hidden, timestep=0.7, pooled_projections=pooled,
                  guidance=inputs["guidance"], chipmunk=chipmunk)
    with pytest.raises(ValueError, match="hidden must be"):
        flux.head(params, TINY, hidden=latents, timestep=0.7, pooled_projections=pooled, guidance=inputs["guidance"])
    with pytest.raises(ValueError, match="guidance is required"):
        flux.head(params, TINY, hidden=hidden, timestep=0.7, pooled_projections=pooled)


def test_dense_sampler_equals_python_euler_loop_and_traces_once():
    grid = (4, 6)
    params, latents, text, pooled = _problem(grid, seed=2)
    sigmas = SA.flow_sigmas(5, mu=SA.flux_shift(grid[0] * grid[1]))
    traces = []
    den = flux.denoiser(TINY, None, image_grid=grid, dtype=jnp.float32)
    counted = SA.Denoiser(compute=lambda *a: (traces.append(1), den.compute(*a))[1], head=den.head,
                          timestep_tables=den.timestep_tables)
    cond = flux.sampling_cond(TINY, None, encoder_hidden_states=text, pooled_projections=pooled, image_grid=grid,
                              guidance=GUIDANCE)
    run = SA.make_sampler(counted, C.ChipmunkConfig(num_steps=5), sigmas)
    out, cache, step_cache = run(params, jnp.copy(latents), cond, None, _fresh_step_cache(latents), jax.random.key(0))
    assert cache is None and bool(step_cache.valid)
    ref = _python_euler(params, latents, text, pooled, grid, sigmas)
    assert max_abs(out, ref) <= 1e-5
    assert max_abs(out, latents) > 0.1
    params2, latents2, text2, pooled2 = _problem(grid, seed=3)
    cond2 = flux.sampling_cond(TINY, None, encoder_hidden_states=text2, pooled_projections=pooled2, image_grid=grid,
                               guidance=1.5)
    run(params2, latents2, cond2, None, _fresh_step_cache(latents2), jax.random.key(1))
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
    cond = flux.sampling_cond(TINY, None, encoder_hidden_states=text, pooled_projections=pooled, image_grid=grid,
                              guidance=GUIDANCE)
    finished = []
    run = SA.make_sampler(flux.denoiser(TINY, None, image_grid=grid, dtype=jnp.float32), sampler_config, sigmas,
                          on_step=finished.append)
    out, _, _ = run(params, jnp.copy(latents), cond, None, _fresh_step_cache(latents), jax.random.key(0))
    jax.block_until_ready(out)
    assert finished == list(range(6))
    assert calls.count("double") == 3 * TINY.num_layers and calls.count("single") == 3 * TINY.num_single_layers
    assert calls.count("final") == 6  # every step ends with the final layer, skipped ones with it alone
    ref = _python_euler(params, latents, text, pooled, grid, sigmas, skip=(2, 3, 5))
    assert max_abs(out, ref) <= 1e-5
    assert max_abs(out, _python_euler(params, latents, text, pooled, grid, sigmas)) > 1e-4


def _chipmunk_run(chipmunk, grid, params, latents, text, pooled, sigmas, guidance_scale=None,
                  static_step_dispatch=False):
    """Latents in tile order for the whole loop, back to raster after it (the sampler donates them)."""
    perm = flux.sampling_permutation(chipmunk, grid)
    cond = flux.sampling_cond(TINY, chipmunk, encoder_hidden_states=text, pooled_projections=pooled,
                              image_grid=grid, guidance=GUIDANCE)
    cache = flux.init_cache(TINY, chipmunk, batch=1, num_image_tokens=grid[0] * grid[1], num_text_tokens=TEXT_LEN,
                            dtype=jnp.float32)
    step_cache = _fresh_step_cache(latents)
    uncond = None
    if guidance_scale is not None:
        cache, step_cache = stack_branches(cache, 2), stack_branches(step_cache, 2)
        uncond = dict(cond, encoder_hidden_states=jnp.zeros_like(text))
    run = SA.make_sampler(flux.denoiser(TINY, chipmunk, image_grid=grid, dtype=jnp.float32), chipmunk, sigmas,
                          guidance_scale=guidance_scale, static_step_dispatch=static_step_dispatch)
    out, cache, step_cache = run(params, latents[:, perm], cond, cache, step_cache, jax.random.key(0), uncond)
    return out[:, np.argsort(perm)], cache, step_cache, run


def test_chipmunk_with_step_caching_under_one_jit():
    grid = (16, 16)  # 4 full 8x8 tiles: the tile order differs from raster
    params, latents, text, pooled = _problem(grid, seed=5)
    steps, skip = 7, (3, 5)
    sigmas = SA.flow_sigmas(steps, mu=SA.flux_shift(256))
    step_cache_config = C.StepCacheConfig(enabled=True, skip_step_schedule=skip)
    # every MLP column kept and attention dense at every step (its sparse steps normalise with the LSE of
    # the last full step, SPEC §1.7, so they are not exact even with every column kept): the loop with
    # sparse-delta MLP steps, tile order and skipped steps equals the dense Python loop
    exact = C.flux().replace(num_steps=steps, step_cache=step_cache_config, attention__top_keys=1.0,
                             attention__first_n_dense_layers=0, attention__full_step_every=1, mlp__top_keys=1.0,
                             mlp__random_keys=0.0, mlp__first_n_dense_layers=0, mlp__full_step_every=4,
                             mlp__mask_cache_after_step=0)
    out, _, step_cache, _ = _chipmunk_run(exact, grid, params, latents, text, pooled, sigmas)
    ref = _python_euler(params, latents, text, pooled, grid, sigmas, skip=skip)
    assert bool(step_cache.valid)
    assert max_abs(out, ref) <= 1e-5
    # the FLUX preset (really sparse): close to the dense step-cached trajectory, but not equal
    preset = C.flux().replace(num_steps=steps, step_cache=step_cache_config, attention__first_n_dense_layers=1,
                              mlp__first_n_dense_layers=1, attention__full_step_every=4, mlp__full_step_every=4)
    out, _, _, _ = _chipmunk_run(preset, grid, params, latents, text, pooled, sigmas)
    err = max_abs(out, ref) / float(jnp.max(jnp.abs(ref)))
    assert 1e-5 < err < 5e-2, err
    # ... and with CFG: one cache per branch, one trace
    out, cache, step_cache, run = _chipmunk_run(preset, grid, params, latents, text, pooled, sigmas,
                                                guidance_scale=2.0)
    assert np.all(np.isfinite(out)) and step_cache.valid.shape == (2,) and bool(step_cache.valid.all())
    assert cache["attention"][1].lse.shape[0] == 2
    assert not np.array_equal(cache["attention"][1].lse[0], cache["attention"][1].lse[1])
    assert run._cache_size() == 1


def _conditionals(run, *args):
    return run.lower(*args).compile().as_text().count(" conditional(")


def test_static_step_dispatch_matches_traced_and_switches_once_per_step():
    """On the GPU every conditional costs a host sync (XLA copies the branch index to the host and waits for the
    stream), so the per-layer switches of traced dispatch idle the GPU ~10 ms per FLUX step (RESULTS.md, session 7);
    static dispatch keeps one switch per step."""
    grid = (16, 16)
    params, latents, text, pooled = _problem(grid, seed=6)
    steps = 6
    sigmas = SA.flow_sigmas(steps, mu=SA.flux_shift(256))
    preset = C.flux().replace(num_steps=steps, attention__first_n_dense_layers=0, mlp__first_n_dense_layers=0,
                              attention__full_step_every=3, mlp__full_step_every=3)
    traced, *_, run_traced = _chipmunk_run(preset, grid, params, latents, text, pooled, sigmas)
    static, *_, run_static = _chipmunk_run(preset, grid, params, latents, text, pooled, sigmas,
                                           static_step_dispatch=True)
    assert max_abs(static, traced) <= 1e-5 * float(jnp.max(jnp.abs(traced)))
    perm = flux.sampling_permutation(preset, grid)
    cond = flux.sampling_cond(TINY, preset, encoder_hidden_states=text, pooled_projections=pooled, image_grid=grid,
                              guidance=GUIDANCE)
    cache = flux.init_cache(TINY, preset, batch=1, num_image_tokens=grid[0] * grid[1], num_text_tokens=TEXT_LEN,
                            dtype=jnp.float32)
    args = (params, latents[:, perm], cond, cache, _fresh_step_cache(latents), jax.random.key(0))
    layers = TINY.num_layers + TINY.num_single_layers
    assert _conditionals(run_traced, *args) >= 2 * layers  # an attention and an MLP switch in every layer
    assert _conditionals(run_static, *args) == 1


def _loop_dot_operand_shapes(jaxpr):
    """Operand shapes of every dot_general inside the loops of a jaxpr (fori_loop with static bounds is a scan)."""
    shapes = set()

    def walk(jaxpr, in_loop):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and in_loop:
                shapes.update(tuple(v.aval.shape) for v in eqn.invars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub, in_loop or eqn.primitive.name in ("while", "scan"))

    walk(jaxpr.jaxpr, False)
    return shapes


@pytest.mark.parametrize("chipmunk,guidance_scale", [(None, None), ("flux", None), (None, 2.0)])
def test_modulation_is_computed_before_the_loop(chipmunk, guidance_scale):
    """FLUX's modulation GEMVs read 6.5 GB of weights per step; with precompute_modulation they run once per
    sampling run, batched over the steps, and the loop body holds none (same trajectory, float32 rounding).
    With CFG each branch gets the tables of its own cond (the uncond pooled projections differ here)."""
    grid = (16, 16)
    params, latents, text, pooled = _problem(grid, seed=7)
    steps = 4
    sigmas = SA.flow_sigmas(steps, mu=SA.flux_shift(256))
    chip = None if chipmunk is None else C.flux().replace(
        num_steps=steps, step_cache=C.StepCacheConfig(enabled=True, skip_step_schedule=(2,)),
        attention__first_n_dense_layers=0, mlp__first_n_dense_layers=0)
    sampler_config = chip or C.ChipmunkConfig(num_steps=steps)
    cond = flux.sampling_cond(TINY, chip, encoder_hidden_states=text, pooled_projections=pooled, image_grid=grid,
                              guidance=GUIDANCE)
    uncond = None
    if guidance_scale is not None:
        uncond = dict(cond, encoder_hidden_states=jnp.zeros_like(text), pooled_projections=-pooled)
    outputs, dot_shapes = [], []
    for precompute in (True, False):
        den = flux.denoiser(TINY, chip, image_grid=grid, dtype=jnp.float32, precompute_modulation=precompute)
        run = SA.make_sampler(den, sampler_config, sigmas, guidance_scale=guidance_scale)
        cache = None if chip is None else flux.init_cache(TINY, chip, batch=1, num_image_tokens=256,
                                                          num_text_tokens=TEXT_LEN, dtype=jnp.float32)
        step_cache = _fresh_step_cache(latents)
        if guidance_scale is not None:
            step_cache = stack_branches(step_cache, 2)
        args = (params, jnp.copy(latents), cond, cache, step_cache, jax.random.key(0), uncond)
        dot_shapes.append(_loop_dot_operand_shapes(jax.make_jaxpr(run)(*args)))
        outputs.append(run(*args)[0])
    dim = TINY.inner_dim
    modulation_weights = {(dim, 6 * dim), (dim, 3 * dim), (dim, 2 * dim)}  # double, single blocks, norm_out
    assert not modulation_weights & dot_shapes[0]
    assert modulation_weights <= dot_shapes[1]  # the check sees them when they are in the loop
    assert max_abs(outputs[0], outputs[1]) <= 1e-5 * float(jnp.max(jnp.abs(outputs[1])))


def test_forward_takes_precomputed_modulation():
    grid = (4, 4)
    params, latents, text, pooled = _problem(grid, seed=8)
    inputs = _model_inputs(text, pooled, grid)
    mod = flux.modulation(params, TINY, timestep=0.6, pooled_projections=pooled, guidance=inputs["guidance"])
    out = flux.forward(params, TINY, hidden_states=latents, timestep=0.6, **inputs, dtype=jnp.float32)
    assert max_abs(flux.forward(params, TINY, hidden_states=latents, timestep=0.6, **inputs, dtype=jnp.float32,
                                modulation=mod), out) == 0.0
    other = flux.modulation(params, TINY, timestep=0.2, pooled_projections=pooled, guidance=inputs["guidance"])
    assert max_abs(flux.forward(params, TINY, hidden_states=latents, timestep=0.6, **inputs, dtype=jnp.float32,
                                modulation=other), out) > 1e-3  # the blocks really read it
    with pytest.raises(ValueError, match="modulation must come from flux.modulation"):
        flux.forward(params, TINY, hidden_states=latents, timestep=0.6, **inputs, modulation={"norm_out": 0})
    batch2 = flux.modulation(params, TINY, timestep=0.6, pooled_projections=jnp.tile(pooled, (2, 1)), guidance=3.5)
    with pytest.raises(ValueError, match=r"modulation\['norm_out'\] must be \[1, "):
        flux.forward(params, TINY, hidden_states=latents, timestep=0.6, **inputs, modulation=batch2)
    with pytest.raises(ValueError, match="guidance is required"):
        flux.modulation(params, TINY, timestep=0.6, pooled_projections=pooled)
    with pytest.raises(ValueError, match="pooled_projections must have 2"):
        flux.modulation(params, TINY, timestep=0.6, pooled_projections=pooled[0], guidance=3.5)


def test_adapter_validates_arguments():
    with pytest.raises(ValueError, match="image_grid"):
        flux.denoiser(TINY, None, image_grid=(4,))
    with pytest.raises(TypeError, match="config must be a FluxConfig"):
        flux.denoiser({}, None, image_grid=(4, 4))
    with pytest.raises(ValueError, match="reorder.kind"):
        flux.denoiser(TINY, C.wan(), image_grid=(4, 4))
    text, pooled = jnp.zeros((1, TEXT_LEN, 32)), jnp.zeros((1, 32))
    with pytest.raises(ValueError, match="guidance is required"):
        flux.sampling_cond(TINY, None, encoder_hidden_states=text, pooled_projections=pooled, image_grid=(4, 4))
    with pytest.raises(ValueError, match="pooled_projections must have 2"):
        flux.sampling_cond(TINY, None, encoder_hidden_states=text, pooled_projections=pooled[0], image_grid=(4, 4),
                           guidance=1.0)
