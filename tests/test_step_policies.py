"""Step-caching baselines as sampler policies (docs/algorithm.md §4.5): First Block Cache, TeaCache and MagCache.

On a toy denoiser with a probe: each policy's decisions equal a plain Python loop written from the paper's (and the
reference implementation's) rule, at thresholds that skip some steps and not others; threshold 0 never skips; CFG
branches decide together; static dispatch and step ranges; the default path's program is unchanged; calibration;
bad arguments. On the tiny FLUX model (``apps.tiny.tiny_config``, random weights) and the tiny HunyuanVideo and Wan
models of the contract tests: the probes equal block 0 computed by hand, in Chipmunk's token order; threshold 0
equals the dense sampler; a huge threshold equals a hand-written residual-reuse loop; Chipmunk and a policy run
under one jit; the computed-step mask is right."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax import config as C
from chipmunk_jax import sampling as SA
from chipmunk_jax.apps.tiny import tiny_config
from chipmunk_jax.cache import StepCache, stack_branches
from chipmunk_jax.models import flux, hunyuan_video
from chipmunk_jax.models.chipmunk_ops import token_permutation
from chipmunk_jax.outputs import ModelOutput
from chipmunk_jax.step_policies import (
    FirstBlockCache,
    MagCache,
    PolicyState,
    Probe,
    StepPolicy,
    TeaCache,
    init_policy_state,
)

from helpers import max_rel_error, slow_beyond
from test_model_contract import CASES, Case, _sampler_inputs

B, N, D = 1, 16, 8
STEPS = 10
HUGE = 1e9


# ---- a toy denoiser with a probe -------------------------------------------------------------------------------


def _toy(calls=None):
    """embedding h0 = x E; first block h1 = h0 + tanh(h0 F + sigma) + cond; hidden = h1 + tanh(h1 W + sigma);
    velocity = (hidden V)(1 + sigma). Its cache counts the computed calls; ``calls`` records the model calls."""
    def record(name):
        if calls is not None:
            jax.debug.callback(lambda: calls.append(name), ordered=True)

    def embed(params, x):
        return x @ params["e"]

    def first(params, x, sigma, cond):
        h0 = embed(params, x)
        return h0 + jnp.tanh(h0 @ params["f"] + sigma) + cond

    def compute(params, x, sigma, cond, cache, plan, key):
        record("compute")
        h1 = first(params, x, sigma, cond)
        hidden = h1 + jnp.tanh(h1 @ params["w"] + sigma)
        return ModelOutput(sample=(hidden @ params["v"]) * (1.0 + sigma), hidden=hidden, cache=cache + 1)

    def head(params, hidden, sigma, cond):
        record("head")
        return (hidden @ params["v"]) * (1.0 + sigma)

    def probe(params, x, sigma, cond, kind):
        h0 = embed(params, x)
        if kind == "modulated_input":
            return Probe(signal=h0 * (1.0 + sigma) + 0.1 * sigma, base=h0)
        h1 = first(params, x, sigma, cond)
        return Probe(signal=h1 - h0, base=h1)

    return SA.Denoiser(compute=compute, head=head, probe=probe)


def _params():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    return {name: jax.random.normal(k, (D, D)) / 3 for name, k in zip("efwv", keys)}


def _x(seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, N, D))


def _cond(value=0.1):
    return jnp.full((B, N, D), value)


def _rel_l1(a, b):
    return float(np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) /
                 np.mean(np.abs(np.asarray(b, np.float64))))


class _Reference:
    """A policy's rule as a plain Python loop over the steps, as the reference implementations write it
    (ParaAttention's FBCache, TeaCache4FLUX, MagCache4Wan), with warmup and a computed last step."""

    def __init__(self, policy, num_steps):
        self.policy, self.num_steps = policy, num_steps
        self.reference = None
        self.accumulated, self.ratio, self.skips = 0.0, 1.0, 0

    def skip(self, step, signal) -> bool:
        p, edge = self.policy, step < self.policy.warmup or step == self.num_steps - 1
        if isinstance(p, FirstBlockCache):  # the first block's residual of the last computed step
            skip = not edge and _rel_l1(signal, self.reference) < p.threshold
            if not skip:
                self.reference = signal
            return skip
        if isinstance(p, TeaCache):  # the modulated input of the previous step
            skip = False
            if edge:
                self.accumulated = 0.0
            else:
                self.accumulated += float(np.polyval(p.coefficients, _rel_l1(signal, self.reference)))
                skip = self.accumulated < p.threshold
                if not skip:
                    self.accumulated = 0.0
            self.reference = signal
            return skip
        if edge:  # MagCache
            return False
        self.ratio *= p.magnitude_ratios[step]
        self.accumulated += abs(1.0 - self.ratio)
        self.skips += 1
        if self.accumulated < p.threshold and self.skips <= p.max_skips:
            return True
        self.accumulated, self.ratio, self.skips = 0.0, 1.0, 0
        return False


def _reference_loop(den, params, x, cond, sigmas, policy, *, tables=None, guidance=None, uncond=None, cache=0):
    """The sampler with ``policy`` as a Python loop: (latents, computed mask). Every branch is probed; the cond
    branch decides; a computed step stores hidden - base per branch, a skipped one runs the head on base + that."""
    num_steps = len(sigmas) - 1
    rule = _Reference(policy, num_steps)
    branches = [cond] if guidance is None else [cond, uncond]
    residual, computed = [None] * len(branches), []
    for i in range(num_steps):
        t = [sigmas[i] if table is None else jax.tree.map(lambda a: a[i], table)
             for table in (tables or [None] * len(branches))]
        probes = [den.probe(params, x, t[b], c, policy.probe_kind) for b, c in enumerate(branches)]
        skip = rule.skip(i, probes[0].signal)
        computed.append(not skip)
        v = []
        for b, c in enumerate(branches):
            if skip:
                v.append(den.head(params, probes[b].base + residual[b], t[b], c))
            else:
                out = den.compute(params, x, t[b], c, cache, None, None)
                residual[b] = out.hidden - probes[b].base
                v.append(out.sample)
        v = v[0] if guidance is None else v[1] + guidance * (v[0] - v[1])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x, np.array(computed)


def _toy_run(policy, *, sigmas=None, guidance=None, static=False, config=None, denoiser=None, **kw):
    sigmas = SA.flow_sigmas(STEPS, shift=3.0) if sigmas is None else sigmas
    config = config or C.ChipmunkConfig(num_steps=len(sigmas) - 1)
    uncond = _cond(-0.3) if guidance is not None else None
    return SA.sample(denoiser or _toy(), config, _params(), _x(), _cond(), jnp.int32(0), sigmas=sigmas, key=jax.random.PRNGKey(0),
                     hidden_shape=(B, N, D), hidden_dtype=jnp.float32, guidance_scale=guidance, uncond=uncond,
                     static_step_dispatch=static, step_policy=policy, **kw)


def _toy_magnitudes():
    return SA.calibrate_magnitude_ratios(_toy(), C.ChipmunkConfig(num_steps=STEPS), _params(), _x(), _cond(),
                                         jnp.int32(0), sigmas=SA.flow_sigmas(STEPS, shift=3.0),
                                         key=jax.random.PRNGKey(0), hidden_shape=(B, N, D))


def _toy_policies():
    """Per policy: thresholds that skip some steps and compute others (checked by the test)."""
    ratios = tuple(_toy_magnitudes())
    return [FirstBlockCache(0.05), FirstBlockCache(0.15), TeaCache(0.3), TeaCache(0.6),
            TeaCache(0.5, coefficients=(2.0, 1.0, 0.0), warmup=2),
            MagCache(0.05, max_skips=2, magnitude_ratios=ratios), MagCache(0.2, max_skips=3, magnitude_ratios=ratios)]


# ---- the sampler with a policy, on the toy --------------------------------------------------------------------


def test_decisions_follow_each_papers_rule():
    """At thresholds between the toy's per-step changes, each policy skips exactly the steps its reference rule
    skips, and the latents equal the Python loop's; the state reports the computed steps."""
    sigmas = SA.flow_sigmas(STEPS, shift=3.0)
    for policy in _toy_policies():
        x, cache, state = _toy_run(policy)
        ref, computed = _reference_loop(_toy(), _params(), _x(), _cond(), sigmas, policy)
        assert isinstance(state, PolicyState)
        np.testing.assert_array_equal(np.asarray(state.computed), computed, err_msg=str(policy))
        # some steps skipped, some computed after the warmup (besides the last): the criterion decided
        assert not computed[policy.warmup:-1].all() and computed[policy.warmup:-1].any(), (policy, computed)
        assert computed[:policy.warmup].all() and computed[-1]
        assert int(cache) == computed.sum()  # the model ran on exactly the computed steps
        chex.assert_trees_all_close(x, ref, rtol=0, atol=1e-5)


def test_magcache_never_skips_more_than_max_skips_in_a_row():
    ratios = tuple(_toy_magnitudes())
    _, _, state = _toy_run(MagCache(HUGE, max_skips=2, magnitude_ratios=ratios, warmup=1))
    np.testing.assert_array_equal(np.asarray(state.computed), [1, 0, 0, 1, 0, 0, 1, 0, 0, 1])


def test_a_chipmunk_model_computes_every_refresh_step():
    """With a Chipmunk denoiser (``sparse``) a policy never skips the config's refresh steps (dense attention, a
    dense MLP step), whose column / feature sets the next sparse steps use; a dense denoiser with the same config
    skips them."""
    config = C.ChipmunkConfig(num_steps=STEPS).replace(attention__full_step_every=4)  # refreshes at 0, 1, 4, 8
    policy = FirstBlockCache(HUGE)
    for sparse, expected in ((True, [1, 1, 0, 0, 1, 0, 0, 0, 1, 1]), (False, [1, 0, 0, 0, 0, 0, 0, 0, 0, 1])):
        _, _, state = _toy_run(policy, config=config, denoiser=dataclasses.replace(_toy(), sparse=sparse))
        np.testing.assert_array_equal(np.asarray(state.computed), np.array(expected, bool), err_msg=f"{sparse=}")


def test_zero_threshold_never_skips_and_equals_the_plain_sampler():
    config = C.ChipmunkConfig(num_steps=STEPS)
    plain, plain_cache, _ = SA.sample(_toy(), config, _params(), _x(), _cond(), jnp.int32(0),
                                      sigmas=SA.flow_sigmas(STEPS, shift=3.0), key=jax.random.PRNGKey(0),
                                      hidden_shape=(B, N, D), hidden_dtype=jnp.float32)
    for policy in (FirstBlockCache(0.0), TeaCache(0.0),
                   MagCache(0.0, max_skips=5, magnitude_ratios=(1.0,) * STEPS)):
        x, cache, state = _toy_run(policy)
        assert np.asarray(state.computed).all() and int(cache) == int(plain_cache) == STEPS
        chex.assert_trees_all_close(x, plain, rtol=0, atol=1e-6)


def test_huge_threshold_skips_every_allowed_step_and_calls_only_the_head():
    calls = []
    run = SA.make_sampler(_toy(calls), C.ChipmunkConfig(num_steps=STEPS), SA.flow_sigmas(STEPS),
                          step_policy=TeaCache(HUGE, warmup=3))
    state = init_policy_state(TeaCache(HUGE), num_steps=STEPS, hidden_shape=(B, N, D))
    x, cache, state = run(_params(), _x(), _cond(), jnp.int32(0), state, jax.random.PRNGKey(0))
    jax.block_until_ready(x)
    expected = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 1], bool)
    np.testing.assert_array_equal(np.asarray(state.computed), expected)
    assert calls.count("compute") == 4 and calls.count("head") == 6  # a computed step's head is inside compute
    ref, _ = _reference_loop(_toy(), _params(), _x(), _cond(), SA.flow_sigmas(STEPS), TeaCache(HUGE, warmup=3))
    chex.assert_trees_all_close(x, ref, rtol=0, atol=1e-5)
    run(_params(), _x(2), _cond(), jnp.int32(0),
        init_policy_state(TeaCache(HUGE), num_steps=STEPS, hidden_shape=(B, N, D)), jax.random.PRNGKey(1))
    assert run._cache_size() == 1


def test_cfg_branches_decide_together_from_the_cond_branch():
    """Both branches are probed and keep their own residual; the cond branch's signal decides for both."""
    sigmas = SA.flow_sigmas(STEPS, shift=3.0)
    policy = FirstBlockCache(0.1)
    x, cache, state = _toy_run(policy, guidance=4.0)
    ref, computed = _reference_loop(_toy(), _params(), _x(), _cond(), sigmas, policy, guidance=4.0,
                                    uncond=_cond(-0.3))
    chex.assert_shape(state.computed, (2, STEPS))
    np.testing.assert_array_equal(np.asarray(state.computed), [computed, computed])
    assert not computed.all()
    np.testing.assert_array_equal(np.asarray(cache), [computed.sum()] * 2)
    chex.assert_trees_all_close(x, ref, rtol=0, atol=1e-5)
    # the residuals differ between the branches (the uncond branch stored its own)
    assert float(jnp.abs(state.residual[0] - state.residual[1]).max()) > 1e-3


@pytest.mark.parametrize("policy_index", [0, 3])
def test_static_dispatch_and_step_ranges_equal_the_one_loop(policy_index):
    """Static step dispatch (one lax.switch over skip + the distinct plans) and a run split into step ranges (the
    policy state handed on) give the one traced loop's result and decisions."""
    policy = _toy_policies()[policy_index]
    config = C.flux().replace(num_steps=STEPS)
    sigmas = SA.flow_sigmas(STEPS, shift=3.0)
    whole, whole_cache, whole_state = _toy_run(policy, config=config)
    static, _, static_state = _toy_run(policy, config=config, static=True)
    chex.assert_trees_all_close((static, static_state), (whole, whole_state), rtol=0, atol=1e-6)
    x, cache = _x(), jnp.int32(0)
    state = init_policy_state(policy, num_steps=STEPS, hidden_shape=(B, N, D))
    for start, stop in ((0, 4), (4, STEPS)):
        run = SA.make_sampler(_toy(), config, sigmas, steps=(start, stop), step_policy=policy)
        x, cache, state = run(_params(), x, _cond(), cache, state, jax.random.PRNGKey(0))
    chex.assert_trees_all_close((x, cache, state), (whole, whole_cache, whole_state), rtol=0, atol=1e-6)


def test_the_default_path_compiles_to_the_same_program():
    """Without a policy the sampler's program is the one it was before policies existed: a denoiser with a probe
    lowers to the same text as one without, traced and statically dispatched, with and without CFG."""
    sigmas = SA.flow_sigmas(6)
    config = C.flux().replace(num_steps=6, step_cache__enabled=True, step_cache__skip_step_schedule=(3,))
    with_probe = _toy()
    without = dataclasses.replace(with_probe, probe=None)
    for guidance, static in ((None, False), (None, True), (3.0, False)):
        cache = jnp.int32(0) if guidance is None else jnp.zeros((2,), jnp.int32)
        step_cache = StepCache(hidden=jnp.zeros((B, N, D)), valid=jnp.bool_(False))
        if guidance is not None:
            step_cache = stack_branches(step_cache, 2)
        args = (_params(), _x(), _cond(), cache, step_cache, jax.random.PRNGKey(0), _cond(-0.3))
        texts = [SA.make_sampler(den, config, sigmas, guidance_scale=guidance, static_step_dispatch=static,
                                 **kw).lower(*args).as_text()
                 for den, kw in ((with_probe, {}), (without, {}), (with_probe, dict(step_policy=None)))]
        assert texts[0] == texts[1] == texts[2]


def test_calibrate_magnitude_ratios():
    """MagCache's table: at each step the mean over tokens of ||r_t|| / ||r_t-1||, r = hidden - embedding, from a
    run that computes every step (the dense trajectory); 1 at step 0; the cond branch's under CFG."""
    ratios = _toy_magnitudes()
    den, params, sigmas, x = _toy(), _params(), SA.flow_sigmas(STEPS, shift=3.0), _x()
    residuals = []
    for i in range(STEPS):
        out = den.compute(params, x, sigmas[i], _cond(), 0, None, None)
        residuals.append(np.linalg.norm(np.asarray(out.hidden - den.probe(params, x, sigmas[i], _cond(),
                                                                            "modulated_input").base), axis=-1))
        x = x + (sigmas[i + 1] - sigmas[i]) * out.sample
    expected = [1.0] + [float(np.mean(residuals[i] / residuals[i - 1])) for i in range(1, STEPS)]
    assert ratios.shape == (STEPS,)
    np.testing.assert_allclose(ratios, expected, rtol=1e-5)
    with_cfg = SA.calibrate_magnitude_ratios(den, C.ChipmunkConfig(num_steps=STEPS), params, _x(), _cond(),
                                             jnp.zeros((2,), jnp.int32), sigmas=sigmas, key=jax.random.PRNGKey(0),
                                             hidden_shape=(B, N, D), guidance_scale=1.0, uncond=_cond(-0.3))
    np.testing.assert_allclose(with_cfg, ratios, rtol=1e-5)  # guidance 1: the cond trajectory


# ---- bad arguments --------------------------------------------------------------------------------------------


def test_policies_validate_their_arguments():
    for bad, error, words in (
        (lambda: FirstBlockCache(-0.1), ValueError, r"FirstBlockCache.threshold must be a number >= 0"),
        (lambda: FirstBlockCache(float("nan")), ValueError, "threshold"),
        (lambda: TeaCache("0.1"), TypeError, r"TeaCache.threshold must be a number"),
        (lambda: TeaCache(True), TypeError, "threshold"),
        (lambda: FirstBlockCache(0.1, warmup=0), ValueError, "FirstBlockCache.warmup must be a positive integer"),
        (lambda: TeaCache(0.1, warmup=1.5), TypeError, "TeaCache.warmup"),
        (lambda: TeaCache(0.1, coefficients=()), TypeError, "TeaCache.coefficients must be a non-empty sequence"),
        (lambda: TeaCache(0.1, coefficients=(1.0, float("inf"))), ValueError, "TeaCache.coefficients must hold"),
        (lambda: TeaCache(0.1, coefficients="1, 0"), TypeError, "TeaCache.coefficients"),
        (lambda: MagCache(0.1), ValueError, "MagCache needs magnitude_ratios.*calibrate_magnitude_ratios"),
        (lambda: MagCache(0.1, magnitude_ratios=(1.0, -0.5)), ValueError, "positive finite"),
        (lambda: MagCache(0.1, max_skips=0, magnitude_ratios=(1.0,)), ValueError, "MagCache.max_skips"),
    ):
        with pytest.raises(error, match=words):
            bad()
    assert TeaCache(0.1, coefficients=np.array([3, 0.5])).coefficients == (3.0, 0.5)
    assert MagCache(0.1, magnitude_ratios=[1, 0.9]).magnitude_ratios == (1.0, 0.9)
    with pytest.raises(TypeError, match="StepPolicy is the base class"):
        StepPolicy(0.1)
    with pytest.raises(TypeError, match="a step policy"):
        init_policy_state("teacache", num_steps=4, hidden_shape=(B, N, D))
    with pytest.raises(ValueError, match=r"hidden_shape must be \[B, N, D\]"):
        init_policy_state(TeaCache(0.1), num_steps=4, hidden_shape=(N, D))


def test_sampler_refuses_what_does_not_fit_a_policy():
    sigmas = SA.flow_sigmas(4)
    config = C.ChipmunkConfig(num_steps=4)
    with pytest.raises(TypeError, match="step_policy must be a step_policies.StepPolicy"):
        SA.make_sampler(_toy(), config, sigmas, step_policy="teacache")
    with pytest.raises(ValueError, match="needs a denoiser with a probe"):
        SA.make_sampler(dataclasses.replace(_toy(), probe=None), config, sigmas, step_policy=TeaCache(0.1))
    with pytest.raises(ValueError, match=r"config.step_cache.*use one of them.*step_cache__enabled=False"):
        SA.make_sampler(_toy(), config.replace(step_cache__enabled=True), sigmas, step_policy=TeaCache(0.1))
    with pytest.raises(ValueError, match=r"holds 3 ratios, one per sampling step is needed \(4\)"):
        SA.make_sampler(_toy(), config, sigmas, step_policy=MagCache(0.1, magnitude_ratios=(1.0,) * 3))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("cfg", "sequence"))
    with pytest.raises(ValueError, match="one device"):
        SA.make_sampler(dataclasses.replace(_toy(), mesh=mesh), config, sigmas, step_policy=TeaCache(0.1))
    args = (_params(), _x(), _cond(), jnp.int32(0))
    run = SA.make_sampler(_toy(), config, sigmas, step_policy=TeaCache(0.1))
    with pytest.raises(TypeError, match="step_cache slot holds the policy's state"):
        run(*args, StepCache(hidden=jnp.zeros((B, N, D)), valid=jnp.bool_(False)), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="not a state of this policy over 4 steps"):
        run(*args, init_policy_state(TeaCache(0.1), num_steps=5, hidden_shape=(B, N, D)), jax.random.PRNGKey(0))
    magcache_state = init_policy_state(MagCache(0.1, magnitude_ratios=(1.0,) * 4), num_steps=4, hidden_shape=(B, N, D))
    with pytest.raises(ValueError, match="not a state of this policy"):  # MagCache keeps no signal reference
        run(*args, magcache_state, jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="PolicyState but the sampler has no step_policy"):
        SA.make_sampler(_toy(), config, sigmas)(*args, magcache_state, jax.random.PRNGKey(0))
    cfg_run = SA.make_sampler(_toy(), config, sigmas, guidance_scale=2.0, step_policy=TeaCache(0.1))
    with pytest.raises(ValueError, match="with 2 CFG branches"):
        cfg_run(_params(), _x(), _cond(), jnp.zeros((2,), jnp.int32),
                init_policy_state(TeaCache(0.1), num_steps=4, hidden_shape=(B, N, D)), jax.random.PRNGKey(0), _cond())


# ---- the models ------------------------------------------------------------------------------------------------


def _tiny_flux_case() -> Case:
    """The tiny FLUX model's architecture (``apps.tiny.tiny_config``: 2 double + 4 single blocks, width 128) on a
    16 x 16 token grid with 8 text tokens, random weights; Chipmunk as the contract's FLUX case (every column
    kept, so every step kind equals dense)."""
    grid, text = (16, 16), 8
    config = tiny_config()

    def inputs(step):
        rng = np.random.default_rng(20)
        latents = rng.standard_normal((1, 256, config.in_channels)).astype(np.float32)
        drift = np.random.default_rng(1000 + step).standard_normal(latents.shape).astype(np.float32)
        return dict(hidden_states=latents + 0.05 * step * drift,
                    encoder_hidden_states=rng.standard_normal((1, text, config.joint_attention_dim)).astype(np.float32),
                    pooled_projections=rng.standard_normal((1, config.pooled_projection_dim)).astype(np.float32),
                    timestep=np.asarray([1.0 - 0.1 * step], np.float32), img_ids=flux.image_ids(grid),
                    txt_ids=np.zeros((text, 3), np.float32))

    return dataclasses.replace(
        CASES["flux"](), config=config, inputs=inputs, sample_shape=(1, 256, config.in_channels),
        conditioning=lambda x: dict(timestep=x["timestep"], pooled_projections=x["pooled_projections"]))


MODELS = {"flux": _tiny_flux_case, "hunyuan_video": CASES["hunyuan_video"], "wan": CASES["wan"]}


@pytest.fixture(params=slow_beyond(["wan", "flux", "hunyuan_video"]), scope="module")
def model(request) -> Case:
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def model_params(model):
    return model.params()


def _embedding_by_hand(case: Case, params, inputs) -> np.ndarray:
    """The input embedding (image tokens, raster order) from the params, float64."""
    x = np.asarray(inputs["hidden_states"], np.float64)
    if case.name == "flux":
        layer = params["x_embedder"]
    elif case.name == "hunyuan_video":
        x, layer = np.asarray(hunyuan_video.patchify(x, case.config.patch_size_t, case.config.patch_size)), \
            params["x_embedder"]["proj"]
    else:  # Wan's patch Conv3d: kernel [pw, ph, pt, C, D], tokens in raster (f, h, w) order
        b, c, f, h, w = x.shape
        pt, ph, pw = case.config.patch_size
        patches = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
        kernel = np.asarray(params["patch_embedding"]["kernel"], np.float64)
        tokens = np.einsum("bcfihjwk,kjicd->bfhwd", patches, kernel).reshape(b, -1, kernel.shape[-1])
        return tokens + np.asarray(params["patch_embedding"]["bias"], np.float64)
    return x @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)


def _block0_shift_scale(case: Case, params, conditioning):
    """Block 0's self-attention shift and scale ([B, 1, D]) from the params and the step's conditioning."""
    if case.name == "flux":  # AdaLayerNormZero: silu(temb) @ norm1 (precomputed per step), chunks shift, scale, ...
        modulation = np.asarray(conditioning["transformer_blocks"]["norm1"][0], np.float64)
    elif case.name == "hunyuan_video":
        norm1 = params["transformer_blocks"]["norm1"]["linear"]
        temb = np.asarray(conditioning["temb"], np.float64)
        silu = temb / (1.0 + np.exp(-temb))
        modulation = silu @ np.asarray(norm1["kernel"][0], np.float64) + np.asarray(norm1["bias"][0], np.float64)
    else:  # Wan: scale_shift_table + timestep_proj, rows shift, scale, gate, ...
        modulation = (np.asarray(params["blocks"]["scale_shift_table"][0], np.float64)
                      + np.asarray(conditioning["timestep_proj"], np.float64)).reshape(1, -1)
    dim = case.config.inner_dim
    return modulation[:, None, :dim], modulation[:, None, dim:2 * dim]


def _first_block_only(case: Case, params):
    """(config, params) of the model cut to its first block: its ``forward(...).hidden`` is block 0's output."""
    first = lambda stack, count: jax.tree.map(lambda a: a[:count], stack)  # noqa: E731
    if case.name == "wan":
        return dataclasses.replace(case.config, num_layers=1), dict(params, blocks=first(params["blocks"], 1))
    return (dataclasses.replace(case.config, num_layers=1, num_single_layers=0),
            dict(params, transformer_blocks=first(params["transformer_blocks"], 1),
                 single_transformer_blocks=first(params["single_transformer_blocks"], 0)))


def test_probes_are_block_0_by_hand(model, model_params):
    """modulated_input: base = the input embedding, signal = LayerNorm(embedding) * (1 + scale) + shift of block 0;
    first_block: base = block 0's output (the model cut to one block), signal = that minus the embedding; with
    Chipmunk's token reordering both come in Chipmunk's order (the space of ``hidden``)."""
    case, params = model, model_params
    inputs = case.inputs(1)
    cond = case.module.timestep_conditioning(params, case.config, **case.conditioning(inputs))
    probe = jax.jit(lambda inputs, kind, chipmunk=None: case.module.forward(
        params, case.config, **inputs, probe=kind, chipmunk=chipmunk, dtype=jnp.float32,
        **({} if chipmunk is None else case.forward_kw)), static_argnums=(1, 2))
    embedding = _embedding_by_hand(case, params, inputs)
    shift, scale = _block0_shift_scale(case, params, cond)
    mean = embedding.mean(-1, keepdims=True)
    normed = (embedding - mean) / np.sqrt(((embedding - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
    modulated = probe(inputs, "modulated_input")
    assert isinstance(modulated, Probe) and modulated.signal.dtype == modulated.base.dtype == jnp.float32
    assert max_rel_error(modulated.base, embedding) <= 1e-5
    assert max_rel_error(modulated.signal, normed * (1.0 + scale) + shift) <= 1e-5
    one_config, one_params = _first_block_only(case, params)
    block0 = np.asarray(case.module.forward(one_params, one_config, **inputs, dtype=jnp.float32).hidden, np.float64)
    first = probe(inputs, "first_block")
    assert max_rel_error(first.base, block0) <= 1e-5
    assert max_rel_error(first.signal, block0 - embedding) <= 1e-5
    perm = token_permutation(case.chipmunk, case.grid)
    assert perm is not None and not np.array_equal(perm, np.arange(perm.size))
    for kind, dense in (("modulated_input", modulated), ("first_block", first)):
        reordered = probe(inputs, kind, case.chipmunk)
        chex.assert_trees_all_close(reordered, jax.tree.map(lambda a: a[:, perm], dense), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="probe must be 'first_block' or 'modulated_input'"):
        case.module.forward(params, case.config, **inputs, probe="last_block", dtype=jnp.float32)


def _model_inputs(case: Case):
    """(latents, cond) of the sampler for the case's step-0 inputs."""
    if case.name != "flux":
        return _sampler_inputs(case)
    inputs = case.inputs(0)
    return jnp.asarray(inputs["hidden_states"]), flux.sampling_cond(
        case.config, encoder_hidden_states=inputs["encoder_hidden_states"],
        pooled_projections=inputs["pooled_projections"], grid=case.grid)


def _denoiser(case: Case, chipmunk=None):
    return case.module.denoiser(case.config, chipmunk, grid=case.grid, dtype=jnp.float32,
                                **({} if case.name != "hunyuan_video" else dict(text_length=7)))


def _model_run(case, params, policy, *, chipmunk=None, guidance=None, steps=6, static=False, keep_refreshes=False):
    """``keep_refreshes``: the dense model keeps the config's Chipmunk refresh steps as a Chipmunk model does."""
    latents, cond = _model_inputs(case)
    config = (chipmunk or case.chipmunk).replace(num_steps=steps, step_cache__enabled=False)
    cache = None if chipmunk is None else case.init_cache(key=jax.random.key(1))
    denoiser = _denoiser(case, chipmunk)
    if keep_refreshes:
        denoiser = dataclasses.replace(denoiser, sparse=True)
    run = lambda: SA.sample(  # noqa: E731
        denoiser, config, params, jnp.copy(latents), cond, cache,
        sigmas=SA.flow_sigmas(steps, shift=3.0), key=jax.random.key(0),
        hidden_shape=(1, case.num_tokens, case.config.inner_dim), hidden_dtype=jnp.float32,
        guidance_scale=guidance, uncond=None if guidance is None else cond, static_step_dispatch=static,
        step_policy=policy)
    return run()


@pytest.mark.slow
@pytest.mark.parametrize("policy_kind", [FirstBlockCache, TeaCache])
def test_model_threshold_zero_is_dense_and_huge_is_residual_reuse(model, model_params, policy_kind):
    """Threshold 0 computes every step: the dense sampler's latents (<= 1e-5). A huge threshold skips every step
    after the warmup but the last: a hand-written loop of the model's probe, compute and head (residual reuse)."""
    case, params = model, model_params
    dense, _, _ = _model_run(case, params, None)
    x, _, state = _model_run(case, params, policy_kind(0.0))
    assert np.asarray(state.computed).all()
    assert max_rel_error(x, dense) <= 1e-5
    policy = policy_kind(HUGE, warmup=2)
    x, _, state = _model_run(case, params, policy)
    np.testing.assert_array_equal(np.asarray(state.computed), [1, 1, 0, 0, 0, 1])
    den = _denoiser(case)
    den = dataclasses.replace(den, compute=jax.jit(den.compute), head=jax.jit(den.head),
                              probe=jax.jit(den.probe, static_argnums=4))
    latents, cond = _model_inputs(case)
    sigmas = SA.flow_sigmas(6, shift=3.0)
    ref, computed = _reference_loop(den, params, latents, cond, sigmas, policy, cache=None,
                                    tables=[den.timestep_tables(params, jnp.asarray(sigmas[:-1]), cond)])
    np.testing.assert_array_equal(computed, np.asarray(state.computed))
    assert max_rel_error(x, ref) <= 1e-5
    assert max_rel_error(x, dense) > 1e-4  # the skipped steps did reuse the residual


@pytest.mark.slow
def test_wan_cfg_with_a_policy_follows_the_reference_loop():
    """Wan with classifier-free guidance: both branches probed, the cond branch decides, each reuses its own
    residual."""
    case = MODELS["wan"]()
    params = case.params()
    latents, cond = _model_inputs(case)
    uncond = dict(cond, encoder_hidden_states=jnp.zeros_like(cond["encoder_hidden_states"]))
    sigmas = SA.flow_sigmas(6, shift=3.0)
    policy = TeaCache(HUGE, warmup=2)
    den = _denoiser(case)
    hidden = (1, case.num_tokens, case.config.inner_dim)
    x, _, state = SA.sample(den, case.chipmunk.replace(num_steps=6, step_cache__enabled=False), params,
                            jnp.copy(latents), cond, None, sigmas=sigmas, key=jax.random.key(0), hidden_shape=hidden,
                            hidden_dtype=jnp.float32, guidance_scale=5.0, uncond=uncond, step_policy=policy)
    np.testing.assert_array_equal(np.asarray(state.computed), [[1, 1, 0, 0, 0, 1]] * 2)
    tables = [den.timestep_tables(params, jnp.asarray(sigmas[:-1]), c) for c in (cond, uncond)]
    ref, _ = _reference_loop(den, params, latents, cond, sigmas, policy, cache=None, tables=tables, guidance=5.0,
                             uncond=uncond)
    assert max_rel_error(x, ref) <= 1e-5


@pytest.mark.slow
def test_chipmunk_and_a_policy_run_under_one_jit(model, model_params):
    """Chipmunk (every column kept: each step kind equals dense) with a policy: the computed steps run their
    Chipmunk plans inside the policy's lax.cond, one compiled loop (traced or statically dispatched plans), the
    dense policy run's latents and computed steps once that run keeps the same refresh steps; a plain dense run
    skips a refresh step the Chipmunk run computes."""
    case, params = model, model_params
    policy = FirstBlockCache(HUGE, warmup=2)
    dense, _, dense_state = _model_run(case, params, policy, keep_refreshes=True)
    _, _, plain_state = _model_run(case, params, policy)
    assert np.asarray(dense_state.computed).sum() > np.asarray(plain_state.computed).sum()
    for static in (False, True):
        x, cache, state = _model_run(case, params, policy, chipmunk=case.chipmunk, static=static)
        np.testing.assert_array_equal(np.asarray(state.computed), np.asarray(dense_state.computed))
        assert max_rel_error(x, dense) <= 1e-4
        chex.assert_trees_all_equal_shapes_and_dtypes(cache, case.init_cache(key=jax.random.key(1)))
    latents, cond = _model_inputs(case)
    chipmunk = case.chipmunk.replace(num_steps=6, step_cache__enabled=False)
    run = SA.make_sampler(_denoiser(case, case.chipmunk), chipmunk, SA.flow_sigmas(6, shift=3.0), step_policy=policy)
    for seed in (0, 1):
        state = init_policy_state(policy, num_steps=6, hidden_shape=(1, case.num_tokens, case.config.inner_dim))
        run(params, jnp.copy(latents), cond, case.init_cache(key=jax.random.key(1)), state, jax.random.key(seed))
    assert run._cache_size() == 1
