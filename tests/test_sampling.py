"""The model-agnostic one-jit sampler on a toy denoiser: equality with a plain Python Euler loop, CFG branches
with their own caches, a guidance scale per step, skipped steps that call only the head, static step dispatch over
the distinct ``StepPlan``s, a run split into step ranges, the progress bar and bad arguments."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax import config as C
from chipmunk_jax import sampling as SA
from chipmunk_jax.cache import BranchCaches, StepCache
from chipmunk_jax.outputs import ModelOutput
from chipmunk_jax.schedule import ModelStep, StepPlan, model_schedule, step_plan

B, N, D = 1, 16, 8


def _toy(calls=None):
    """A tiny 'model': hidden = tanh(x W + sigma), velocity = (hidden @ V) * (1 + sigma) + cond.
    Its cache counts the computed calls, so carrying it through the loop is checked too. ``calls`` records
    ("compute", sigma) and ("head",) as the compiled loop runs them."""
    def compute(params, x, sigma, cond, cache, plan, key):
        if calls is not None:
            jax.debug.callback(lambda s: calls.append(("compute", float(s))), sigma, ordered=True)
        hidden = jnp.tanh(x @ params["w"] + sigma)
        return ModelOutput(sample=head(params, hidden, sigma, cond), hidden=hidden, cache=cache + 1)

    def head(params, hidden, sigma, cond):
        if calls is not None:
            jax.debug.callback(lambda: calls.append(("head",)), ordered=True)
        return (hidden @ params["v"]) * (1.0 + sigma) + cond

    return SA.Denoiser(compute=compute, head=head)


def _params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"w": jax.random.normal(k1, (D, D)) / 3, "v": jax.random.normal(k2, (D, D)) / 3}


def _python_euler(params, x, cond, sigmas, guidance=None, uncond=None):
    den = _toy()
    for i in range(len(sigmas) - 1):
        v = den.compute(params, x, sigmas[i], cond, 0, None, None).sample
        if guidance is not None:
            vu = den.compute(params, x, sigmas[i], uncond, 0, None, None).sample
            v = vu + (guidance if np.ndim(guidance) == 0 else guidance[i]) * (v - vu)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def _x(seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, N, D))


def test_sigmas():
    s = SA.flow_sigmas(4)
    np.testing.assert_allclose(s, [1.0, 0.75, 0.5, 0.25, 0.0])
    shifted = SA.flow_sigmas(4, shift=7.0)
    np.testing.assert_allclose(shifted[1], 7 * 0.75 / (1 + 6 * 0.75), rtol=1e-6)
    mu = SA.flux_shift(4096)
    np.testing.assert_allclose(mu, 1.15, rtol=1e-6)
    np.testing.assert_allclose(SA.flow_sigmas(4, mu=mu)[2], np.exp(mu) / (np.exp(mu) + 1.0), rtol=1e-6)
    with pytest.raises(ValueError, match="num_steps"):
        SA.flow_sigmas(0)
    with pytest.raises(ValueError, match="either shift or mu"):
        SA.flow_sigmas(4, shift=3.0, mu=1.0)


def test_sampler_equals_python_euler_loop_without_step_caching():
    cfg = C.ChipmunkConfig(num_steps=6)
    sigmas = SA.flow_sigmas(6, shift=3.0)
    params, x, cond = _params(), _x(), jnp.full((B, N, D), 0.1)
    out, cache, _ = SA.sample(_toy(), cfg, params, x, cond, jnp.int32(0), sigmas=sigmas,
                              key=jax.random.PRNGKey(0), hidden_shape=(B, N, D), hidden_dtype=jnp.float32)
    ref = _python_euler(params, _x(), cond, sigmas)
    chex.assert_trees_all_close(out, ref, rtol=0, atol=1e-5)
    assert int(cache) == 6


def test_cfg_branches_each_carry_their_own_cache():
    cfg = C.ChipmunkConfig(num_steps=5)
    sigmas = SA.flow_sigmas(5)
    params, cond, uncond = _params(), jnp.full((B, N, D), 0.2), jnp.full((B, N, D), -0.1)
    out, cache, _ = SA.sample(_toy(), cfg, params, _x(), cond, jnp.int32(0), sigmas=sigmas, key=jax.random.PRNGKey(0),
                              hidden_shape=(B, N, D), hidden_dtype=jnp.float32, guidance_scale=4.0, uncond=uncond)
    ref = _python_euler(params, _x(), cond, sigmas, guidance=4.0, uncond=uncond)
    chex.assert_trees_all_close(out, ref, rtol=0, atol=1e-5)
    assert isinstance(cache, BranchCaches) and len(cache) == 2  # one device: separate branch pytrees
    assert [int(c) for c in cache] == [5, 5]


def test_guidance_scale_per_step():
    """A table of one scale per step is read at the step inside the loop; a table of equal entries compiles as its
    one number (the same program, the same result)."""
    cfg = C.ChipmunkConfig(num_steps=5)
    sigmas = SA.flow_sigmas(5)
    params, cond, uncond = _params(), jnp.full((B, N, D), 0.2), jnp.full((B, N, D), -0.1)
    kw = dict(sigmas=sigmas, key=jax.random.PRNGKey(0), hidden_shape=(B, N, D), hidden_dtype=jnp.float32,
              uncond=uncond)
    table = np.array([4.0, 4.0, 3.0, 1.0, 6.5], np.float32)
    out, cache, _ = SA.sample(_toy(), cfg, params, _x(), cond, jnp.int32(0), guidance_scale=table, **kw)
    chex.assert_trees_all_close(out, _python_euler(params, _x(), cond, sigmas, guidance=table, uncond=uncond),
                                rtol=0, atol=1e-5)
    assert [int(c) for c in cache] == [5, 5]
    # the comparison can fail: the first scale for every step is another result
    one, _, _ = SA.sample(_toy(), cfg, params, _x(), cond, jnp.int32(0), guidance_scale=4.0, **kw)
    assert float(jnp.abs(one - out).max()) > 1e-3
    for equal in ([4.0] * 5, np.full(5, 4.0), jnp.full((5,), 4.0)):
        same, _, _ = SA.sample(_toy(), cfg, params, _x(), cond, jnp.int32(0), guidance_scale=equal, **kw)
        np.testing.assert_array_equal(np.asarray(same), np.asarray(one))
    run = SA.make_sampler(_toy(), cfg, sigmas, guidance_scale=[4.0] * 5)
    text = run.lower(params, _x(), cond, jnp.zeros((2,), jnp.int32),
                     StepCache(hidden=jnp.zeros((2, B, N, D)), valid=jnp.zeros((2,), bool)), jax.random.PRNGKey(0),
                     uncond).as_text()
    plain = SA.make_sampler(_toy(), cfg, sigmas, guidance_scale=4.0).lower(
        params, _x(), cond, jnp.zeros((2,), jnp.int32),
        StepCache(hidden=jnp.zeros((2, B, N, D)), valid=jnp.zeros((2,), bool)), jax.random.PRNGKey(0),
        uncond).as_text()
    assert text == plain
    for bad, error, words in (([4.0] * 4, ValueError, r"one per sampling step \(5\), got shape \(4,\)"),
                              (np.ones((5, 1)), ValueError, "got shape"),
                              ([4.0, np.nan, 4.0, 4.0, 4.0], ValueError, "finite"),
                              (True, TypeError, "a number or one number per step"),
                              ("4", TypeError, "a number or one number per step")):
        with pytest.raises(error, match=words):
            SA.make_sampler(_toy(), cfg, sigmas, guidance_scale=bad)


@pytest.mark.parametrize("static", [False, True])
def test_step_ranges_run_in_turn_equal_the_whole_loop(static):
    """steps=(start, stop): segments run one after the other (caches and step cache handed on) give the whole
    run's result, with the whole run's step indices (schedules, per-step guidance, keys, on_step)."""
    cfg = C.flux().replace(num_steps=8, step_cache=C.StepCacheConfig(enabled=True, skip_step_schedule=(3, 6)))
    sigmas = SA.flow_sigmas(8)
    params, cond, uncond = _params(), jnp.full((B, N, D), 0.2), jnp.full((B, N, D), -0.1)
    table = np.linspace(2.0, 5.0, 8).astype(np.float32)

    def fresh():
        return (jnp.zeros((2,), jnp.int32),
                StepCache(hidden=jnp.zeros((2, B, N, D)), valid=jnp.zeros((2,), bool)))

    key = jax.random.PRNGKey(3)
    whole, whole_cache, whole_sc = SA.make_sampler(_toy(), cfg, sigmas, guidance_scale=table,
                                                   static_step_dispatch=static)(params, _x(), cond, *fresh(), key,
                                                                                uncond)
    steps = []
    x, (cache, sc) = _x(), fresh()
    for start, stop in ((0, 3), (3, 4), (4, 8)):
        run = SA.make_sampler(_toy(), cfg, sigmas, guidance_scale=table, static_step_dispatch=static,
                              steps=(start, stop), on_step=steps.append)
        x, cache, sc = run(params, x, cond, cache, sc, key, uncond)
    jax.block_until_ready(x)
    assert steps == list(range(8))
    chex.assert_trees_all_close((x, cache, sc), (whole, whole_cache, whole_sc), rtol=0, atol=1e-6)
    assert (cache == 6).all()  # steps 3 and 6 skipped, across the segments
    for bad in ((0, 9), (4, 4), (-1, 2)):
        with pytest.raises(ValueError, match="0 <= start < stop <= 8"):
            SA.make_sampler(_toy(), cfg, sigmas, steps=bad)
    with pytest.raises(TypeError, match="a \\(start, stop\\) pair of ints"):
        SA.make_sampler(_toy(), cfg, sigmas, steps=(0.0, 2))


def test_skipped_steps_call_only_the_head_and_trace_once():
    cfg = C.ChipmunkConfig(num_steps=8, step_cache=C.StepCacheConfig(enabled=True, skip_step_schedule=(2, 3, 6)))
    calls = []
    sigmas = SA.flow_sigmas(8)
    run = SA.make_sampler(_toy(calls), cfg, sigmas)
    params = _params()

    def fresh():
        return StepCache(hidden=jnp.zeros((B, N, D)), valid=jnp.bool_(False))

    out, cache, sc = run(params, _x(), jnp.zeros((B, N, D)), jnp.int32(0), fresh(), jax.random.PRNGKey(0))
    jax.block_until_ready(out)
    computed = [c[1] for c in calls if c[0] == "compute"]  # the sigma of each computed step
    np.testing.assert_array_equal(computed, sigmas[[0, 1, 4, 5, 7]])
    assert len([c for c in calls if c[0] == "head"]) == 8  # every step runs the head once
    assert int(cache) == 5 and bool(sc.valid)
    assert list(model_schedule(cfg)) == [ModelStep.SKIP if s in (2, 3, 6) else ModelStep.COMPUTE for s in range(8)]
    # expected: on skipped steps the head sees the hidden state of the last computed step
    den, x, hidden = _toy(), _x(), None
    for i in range(8):
        if i in (2, 3, 6):
            v = den.head(params, hidden, sigmas[i], 0.0)
        else:
            out_i = den.compute(params, x, sigmas[i], 0.0, 0, None, None)
            v, hidden = out_i.sample, out_i.hidden
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    chex.assert_trees_all_close(out, x, rtol=0, atol=1e-5)
    run(params, _x(2), jnp.zeros((B, N, D)), jnp.int32(0), fresh(), jax.random.PRNGKey(1))
    assert run._cache_size() == 1  # one trace per shape and config


def test_bad_arguments():
    cfg = C.ChipmunkConfig(num_steps=3)
    with pytest.raises(ValueError, match="exceed config.num_steps"):
        SA.make_sampler(_toy(), cfg, SA.flow_sigmas(5))
    with pytest.raises(ValueError, match="at least two noise levels"):
        SA.make_sampler(_toy(), cfg, [1.0])
    run = SA.make_sampler(_toy(), cfg, SA.flow_sigmas(3), guidance_scale=2.0)
    with pytest.raises(ValueError, match="uncond is required"):
        run(_params(), _x(), jnp.zeros((B, N, D)), jnp.zeros((2,), jnp.int32),
            StepCache(hidden=jnp.zeros((2, B, N, D)), valid=jnp.zeros((2,), bool)), jax.random.PRNGKey(0))


def test_progress_bar_from_inside_the_jitted_loop(capsys):
    cfg = C.ChipmunkConfig(num_steps=3)
    out, _, _ = SA.sample(_toy(), cfg, _params(), _x(), jnp.zeros((B, N, D)), jnp.int32(0), sigmas=SA.flow_sigmas(3),
                          key=jax.random.PRNGKey(0), hidden_shape=(B, N, D), hidden_dtype=jnp.float32, progress=True)
    jax.block_until_ready(out)
    assert "3/3" in capsys.readouterr().err


def test_static_step_dispatch_calls_the_model_with_python_int_plans():
    cfg = C.flux().replace(num_steps=12, step_cache=C.StepCacheConfig(enabled=True, skip_step_schedule=(7,)))
    seen = []
    base = _toy()

    def compute(params, x, sigma, cond, cache, plan, key):
        seen.append(plan)  # runs at trace time: one entry per compiled branch
        return base.compute(params, x, sigma, cond, cache, plan, key)

    den = SA.Denoiser(compute=compute, head=base.head)
    sigmas = SA.flow_sigmas(12)
    params, cond = _params(), jnp.full((B, N, D), 0.1)
    out, cache, _ = SA.sample(den, cfg, params, _x(), cond, jnp.int32(0), sigmas=sigmas, key=jax.random.PRNGKey(0),
                              hidden_shape=(B, N, D), hidden_dtype=jnp.float32, static_step_dispatch=True)
    assert all(isinstance(p, StepPlan) and isinstance(p.attention, int) and isinstance(p.mlp, int) for p in seen)
    # one branch per distinct plan of the schedule: (dense,dense) (colsum,select) (sparse,select) (refresh,dense)
    # (sparse,reuse) for the FLUX schedule over 12 steps
    assert len(seen) == 5 and set(seen) == {step_plan(cfg, s) for s in range(12)}
    # traced dispatch: the model gets the step's plan with traced kinds
    traced_seen = []

    def traced_compute(params, x, sigma, cond, cache, plan, key):
        traced_seen.append(plan)
        return base.compute(params, x, sigma, cond, cache, plan, key)

    ref, _, _ = SA.sample(SA.Denoiser(compute=traced_compute, head=base.head), cfg, params, _x(), cond, jnp.int32(0),
                          sigmas=sigmas, key=jax.random.PRNGKey(0), hidden_shape=(B, N, D), hidden_dtype=jnp.float32)
    assert len(traced_seen) == 1 and all(isinstance(k, jax.core.Tracer) for k in traced_seen[0])
    chex.assert_trees_all_close(out, ref, rtol=0, atol=1e-6)
    assert int(cache) == 11  # step 7 skipped
