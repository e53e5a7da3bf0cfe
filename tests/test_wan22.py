"""Wan 2.2: configs (A14B experts, TI2V-5B), per-token timesteps (TI2V) against diffusers' WanTransformer3DModel,
the A14B pipeline ports (transformer / transformer_2), and the two-expert sampler (models.wan_experts): diffusers'
expert choice, per-expert guidance, the Chipmunk refresh at the switch (attention and MLP), the one-jit sample
against a hand-rolled loop, and the two-segment sample (idle expert in host memory) against the one-jit one; the
image-to-video denoiser wrappers (models.wan_i2v) against the model's own forward on the inputs diffusers builds."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from chipmunk_jax import config as chipmunk_config  # noqa: E402
from chipmunk_jax import memory, sampling  # noqa: E402
from chipmunk_jax.models import wan, wan_experts, wan_i2v  # noqa: E402
from chipmunk_jax.ports import wan as wan_ports  # noqa: E402
from chipmunk_jax.schedule import (  # noqa: E402
    AttentionStep, MLPStep, ModelStep, attention_schedule, mlp_schedule, model_schedule, step_plan)

from helpers import max_rel_error, torch_forward  # noqa: E402
from test_wan_model import TEST_SUITE_CONFIG, make_inputs, make_torch_model  # noqa: E402

RTOL = 1e-5
# TI2V-5B-like: in == out channels (48 there), no image embedder
TI2V_CONFIG = dict(TEST_SUITE_CONFIG, in_channels=12, out_channels=12)
# the A14B experts: T2V (Wan2.1-T2V-14B-shaped) and I2V (36 = 16 + 16 + 4 channels there, no CLIP embedder)
A14B_CONFIGS = {"t2v_a14b": dict(TEST_SUITE_CONFIG), "i2v_a14b": dict(TEST_SUITE_CONFIG, in_channels=9)}


# ----------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("preset, fields", [
    ("t2v_a14b", dict(in_channels=16, out_channels=16, num_attention_heads=40, ffn_dim=13824, num_layers=40,
                      image_dim=None, added_kv_proj_dim=None)),
    ("i2v_a14b", dict(in_channels=36, out_channels=16, num_attention_heads=40, ffn_dim=13824, num_layers=40,
                      image_dim=None, added_kv_proj_dim=None)),
    ("ti2v_5b", dict(in_channels=48, out_channels=48, num_attention_heads=24, ffn_dim=14336, num_layers=30,
                     image_dim=None, added_kv_proj_dim=None)),
])
def test_wan22_presets(preset, fields):
    config = getattr(wan.WanConfig, preset)()
    assert {k: getattr(config, k) for k in fields} == fields
    shared = (config.attention_head_dim, config.text_dim, config.freq_dim, config.patch_size, config.eps)
    assert shared == (128, 4096, 256, (1, 2, 2), 1e-6)
    # diffusers builds the same structure (shapes only: no weights are materialised)
    with torch.device("meta"):
        model = diffusers.WanTransformer3DModel(**{k: v for k, v in config.to_diffusers().items()
                                                   if not k.startswith("_")})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert wan_ports.expected_diffusers_shapes(config) == shapes


# ----------------------------------------------------------------------------------------------
# Per-token timesteps (TI2V-5B, diffusers' expand_timesteps)


@pytest.fixture(scope="module")
def ti2v_model():
    return make_torch_model(TI2V_CONFIG, seed=21)


def _first_frame_timesteps(t, batch, grid):
    """diffusers' expand_timesteps: ``(first_frame_mask[:, ::2, ::2] * t).flatten()`` per sample, the first latent
    frame at 0."""
    f, h, w = grid
    mask = np.ones((f, h, w), np.float32)
    mask[0] = 0.0
    return np.stack([(mask * ti).reshape(-1) for ti in t]).astype(np.float32)


@pytest.mark.parametrize("timestep_kind", ["per_token", "per_sample"])
def test_ti2v_parity_per_token_and_per_sample_timesteps(ti2v_model, timestep_kind):
    rng = np.random.default_rng(30)
    config, params = wan_ports.from_diffusers(ti2v_model)
    assert config == wan.WanConfig(**TI2V_CONFIG)
    inputs = make_inputs(rng, config, batch=2, frames=3, height=8, width=12, text_len=7)
    grid = wan.token_grid(config, inputs["hidden_states"].shape)
    if timestep_kind == "per_token":
        inputs["timestep"] = _first_frame_timesteps(inputs["timestep"], 2, grid)
        assert inputs["timestep"].shape == (2, 3 * 4 * 6)
    expected = torch_forward(ti2v_model, inputs)
    out = wan.forward(params, config, **inputs, dtype=jnp.float32).sample
    assert max_rel_error(out, expected) <= RTOL
    if timestep_kind == "per_token":
        # the comparison can fail: the per-sample timestep (no t = 0 frame) is far from the per-token output
        flat = wan.forward(params, config, **dict(inputs, timestep=inputs["timestep"].max(axis=1)),
                           dtype=jnp.float32).sample
        assert max_rel_error(flat, expected) > 100 * RTOL
        # a constant per-token timestep equals the per-sample one
        t = np.asarray([300.0, 700.0], np.float32)
        const = wan.forward(params, config, **dict(inputs, timestep=np.repeat(t[:, None], 72, axis=1)),
                            dtype=jnp.float32).sample
        per_sample = wan.forward(params, config, **dict(inputs, timestep=t), dtype=jnp.float32).sample
        assert max_rel_error(const, per_sample) <= RTOL


@pytest.mark.slow
def test_per_token_timesteps_under_chipmunk_voxel_order_and_head():
    """Per-token modulation follows the tokens into Chipmunk's voxel order: with every key kept the Chipmunk
    forward equals the dense one, and head() on the stored hidden state equals the forward's sample."""
    from test_wan_model import all_keys_kept

    config = wan.WanConfig(**dict(TI2V_CONFIG, num_layers=1))
    params = wan.init_params(config, jax.random.key(3), dtype=jnp.float32)
    grid = (4, 6, 8)  # one whole voxel
    rng = np.random.default_rng(31)
    inputs = make_inputs(rng, config, batch=1, frames=4, height=12, width=16, text_len=5)
    inputs["timestep"] = _first_frame_timesteps([640.0], 1, grid)
    chipmunk = all_keys_kept().replace(mlp__enabled=False, attention__counts_multiple_of=16)
    dense = wan.forward(params, config, **inputs, dtype=jnp.float32)
    cache = wan.init_cache(config, chipmunk, batch=1, grid=grid, key=jax.random.key(0), dtype=jnp.float32)
    out = wan.forward(params, config, **inputs, chipmunk=chipmunk, cache=cache, plan=step_plan(chipmunk, 0),
                      dtype=jnp.float32)
    assert max_rel_error(out.sample, dense.sample) <= RTOL
    conditioning = wan.timestep_conditioning(params, config, timestep=inputs["timestep"])
    assert conditioning["timestep_proj"].shape == (1, 192, 6, config.inner_dim)
    head = wan.head(params, config, out.hidden, conditioning, grid=grid, chipmunk=chipmunk, dtype=jnp.float32)
    assert max_rel_error(head, dense.sample) <= RTOL
    with pytest.raises(ValueError, match="per-token timestep"):
        wan.forward(params, config, **dict(inputs, timestep=inputs["timestep"][:, :-1]), dtype=jnp.float32)


@pytest.mark.parametrize("preset", sorted(A14B_CONFIGS))
def test_a14b_expert_configs_parity(preset):
    """The A14B experts are Wan2.1-shaped (I2V: extra latent channels, no image embedder): fp32 parity."""
    model = make_torch_model(A14B_CONFIGS[preset], seed=22)
    config, params = wan_ports.from_diffusers(model)
    assert config.image_dim is None and config.added_kv_proj_dim is None
    inputs = make_inputs(np.random.default_rng(32), config, batch=1, frames=2, height=8, width=8, text_len=6)
    out = wan.forward(params, config, **inputs, dtype=jnp.float32).sample
    assert max_rel_error(out, torch_forward(model, inputs)) <= RTOL


# ----------------------------------------------------------------------------------------------
# Ports: A14B pipeline folders (transformer/ + transformer_2/)


def test_pipeline_folder_experts(tmp_path):
    high, low = make_torch_model(TEST_SUITE_CONFIG, seed=23), make_torch_model(TEST_SUITE_CONFIG, seed=24)
    pipe = tmp_path / "pipe"
    high.save_pretrained(pipe / "transformer", safe_serialization=True)
    low.save_pretrained(pipe / "transformer_2", safe_serialization=True, max_shard_size="20KB")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.875,
                                                        "transformer": ["diffusers", "WanTransformer3DModel"],
                                                        "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    (config_h, params_h), (config_l, params_l), ratio = wan_ports.load_experts(pipe)
    assert ratio == 0.875 and config_h == config_l == wan.WanConfig(**TEST_SUITE_CONFIG)
    for model, params in ((high, params_h), (low, params_l)):
        expected = wan_ports.from_diffusers(model)[1]
        flat, ref = wan_ports.flatten_params(params), wan_ports.flatten_params(expected)
        assert flat.keys() == ref.keys()
        for k in flat:
            np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(ref[k]), err_msg=k)
    # the experts differ: transformer_2 is really read
    assert not np.array_equal(params_h["proj_out"]["kernel"], params_l["proj_out"]["kernel"])
    np.testing.assert_array_equal(wan_ports.from_checkpoint(pipe, subfolder="transformer_2")[1]["proj_out"]["kernel"],
                                  params_l["proj_out"]["kernel"])
    assert wan_ports.pipeline_options(pipe) == {"boundary_ratio": 0.875, "expand_timesteps": False}

    # a one-expert pipeline (Wan 2.1 / TI2V-5B): a clear error for transformer_2
    one = tmp_path / "one"
    high.save_pretrained(one / "transformer", safe_serialization=True)
    (one / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "expand_timesteps": True}))
    with pytest.raises(FileNotFoundError, match="no low-noise expert"):
        wan_ports.from_checkpoint(one, subfolder="transformer_2")
    with pytest.raises(FileNotFoundError, match="transformer_2"):
        wan_ports.load_experts(one)
    assert wan_ports.pipeline_options(one) == {"boundary_ratio": None, "expand_timesteps": True}
    # transformer_2 without a boundary_ratio
    low.save_pretrained(one / "transformer_2", safe_serialization=True)
    with pytest.raises(ValueError, match="boundary_ratio"):
        wan_ports.load_experts(one)


# ----------------------------------------------------------------------------------------------
# The two-expert sampler


def diffusers_expert_choice(sigmas, boundary_ratio):
    """diffusers' rule on its own scheduler timesteps for the same sigmas: FlowMatchEulerDiscreteScheduler given
    the sampler's sigmas (shift 1: no re-shift), then ``t >= boundary_ratio * num_train_timesteps`` -> transformer."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=list(np.asarray(sigmas[:-1], np.float64)))
    np.testing.assert_allclose(scheduler.sigmas.numpy(), sigmas, atol=1e-7)
    boundary = boundary_ratio * scheduler.config.num_train_timesteps
    return [wan_experts.HIGH if t >= boundary else wan_experts.LOW for t in scheduler.timesteps]


def test_expert_choice_matches_diffusers_and_switch_refresh():
    for steps, shift, ratio in ((40, 12.0, 0.875), (40, 5.0, 0.9), (8, 5.0, 0.875), (50, 3.0, 0.9)):
        sigmas = sampling.flow_sigmas(steps, shift=shift)
        boundary = wan_experts.boundary_timestep(ratio)
        ours = wan_experts.expert_schedule(sigmas, boundary).tolist()
        assert ours == diffusers_expert_choice(sigmas, ratio), (steps, shift, ratio)
        assert 0 < ours.count(wan_experts.HIGH) < steps
    # recorded: 8 steps, shift 5, T2V boundary 875: t = 1000, 972.2, 937.5, 892.9 (high) | 833.3, 750, 625, 416.7
    sigmas = sampling.flow_sigmas(8, shift=5.0)
    assert wan_experts.expert_schedule(sigmas, 875.0).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert wan_experts.switch_step(sigmas, 875.0) == 4
    # the boundary itself goes to the high-noise expert (t >= boundary), as in diffusers
    assert wan_experts.expert_schedule(sigmas, 937.5).tolist()[2] == wan_experts.HIGH
    assert wan_experts.switch_step(sigmas, 0.0) is None and wan_experts.switch_step(sigmas, 1001.0) is None

    switch = wan_experts.switch_step(sigmas, 875.0)
    preset = chipmunk_config.wan().replace(num_steps=8, step_cache__skip_step_schedule=(3, 4, 5, 7))
    assert AttentionStep(int(attention_schedule(preset)[switch])) == AttentionStep.SPARSE  # without the refresh
    refreshed = wan_experts.switch_refresh(preset, switch)
    assert refreshed.attention.full_step_schedule == (0, 1, 4)
    # the switch step: a full step (dense + fresh column sets), never skipped by step caching
    assert AttentionStep(int(attention_schedule(refreshed)[switch])) == AttentionStep.DENSE_COLSUM
    assert ModelStep(int(model_schedule(refreshed)[switch])) == ModelStep.COMPUTE
    assert [int(k) for k in model_schedule(refreshed)] == [0, 0, 0, 1, 0, 1, 0, 1]
    # the other steps keep their kinds
    for s in (0, 1, 2, 3, 5, 6, 7):
        assert attention_schedule(refreshed)[s] == attention_schedule(preset)[s], s
    assert wan_experts.switch_refresh(preset, None) is preset
    # the MLP (off in the Wan preset) gets the switch as a full step too, whatever its full_step_every
    assert refreshed.mlp.full_step_schedule == (0, 4)
    for every in (3, 2):
        with_mlp = preset.replace(mlp__enabled=True, mlp__full_step_every=every, mlp__mask_cache_after_step=0)
        mlp = wan_experts.switch_refresh(with_mlp, switch)
        assert mlp.mlp.full_step_schedule == tuple(sorted(set(range(0, 8, every)) | {switch}))
        kinds = [MLPStep(int(k)) for k in mlp_schedule(mlp)]
        assert kinds[switch] == MLPStep.DENSE and kinds[0] == MLPStep.DENSE
        # the other steps keep their kinds
        before = [MLPStep(int(k)) for k in mlp_schedule(with_mlp)]
        assert [k for s, k in enumerate(kinds) if s != switch] == [k for s, k in enumerate(before) if s != switch]
        assert AttentionStep(int(attention_schedule(mlp)[switch])) == AttentionStep.DENSE_COLSUM
    assert MLPStep(int(mlp_schedule(preset.replace(mlp__enabled=True, mlp__full_step_every=3))[switch])) \
        == MLPStep.SPARSE_SELECT  # without the refresh
    # an explicit MLP schedule is kept and extended
    explicit = preset.replace(mlp__enabled=True, mlp__full_step_schedule=(0, 6))
    assert wan_experts.switch_refresh(explicit, switch).mlp.full_step_schedule == (0, 4, 6)
    with pytest.raises(ValueError, match=r"switch step 8 is not in \[1, num_steps=8\)"):
        wan_experts.switch_refresh(preset, 8)


def test_guidance_schedule_and_segments():
    sigmas = sampling.flow_sigmas(8, shift=5.0)  # high-noise steps 0-3, low-noise 4-7 at boundary 875
    table = wan_experts.guidance_schedule(sigmas, 875.0, 4.0, 3.0)
    assert table.dtype == np.float32 and table.tolist() == [4.0] * 4 + [3.0] * 4
    # one number when the experts share it (diffusers' default guidance_scale_2 = guidance_scale), None without CFG
    assert wan_experts.guidance_schedule(sigmas, 875.0, 4.0) == 4.0
    assert wan_experts.guidance_schedule(sigmas, 875.0, 4.0, 4.0) == 4.0
    assert wan_experts.guidance_schedule(sigmas, 875.0, None) is None
    with pytest.raises(ValueError, match="guidance_scale_2 without guidance_scale"):
        wan_experts.guidance_schedule(sigmas, 875.0, None, 3.0)
    with pytest.raises(ValueError, match="guidance_scale_2 must be finite"):
        wan_experts.guidance_schedule(sigmas, 875.0, 4.0, float("nan"))
    Segment = wan_experts.Segment
    assert wan_experts.expert_segments(sigmas, 875.0, 4.0, 3.0) == [Segment(0, 0, 4, 4.0), Segment(1, 4, 8, 3.0)]
    assert wan_experts.expert_segments(sigmas, 875.0) == [Segment(0, 0, 4, None), Segment(1, 4, 8, None)]
    # one expert all the way: one segment with that expert's scale
    assert wan_experts.expert_segments(sigmas, 0.0, 4.0, 3.0) == [Segment(0, 0, 8, 4.0)]
    assert wan_experts.expert_segments(sigmas, 1001.0, 4.0, 3.0) == [Segment(1, 0, 8, 3.0)]


# tiny latents: grid (4, 6, 8) = one whole voxel, 192 tokens
LATENT = (4, 12, 16)
GRID = (4, 6, 8)


def _expert_pair():
    config = wan.WanConfig(**dict(TEST_SUITE_CONFIG, num_layers=2))
    return config, (wan.init_params(config, jax.random.key(11), dtype=jnp.float32),
                    wan.init_params(config, jax.random.key(12), dtype=jnp.float32))


def _hand_rolled(params, config, sigmas, latents, cond, uncond, boundary, g, g2, chipmunk=None, cache=None, key=None):
    """The diffusers loop written out: per step the expert by ``t >= boundary``, its own guidance scale, one cache
    per CFG branch shared by both experts; Euler steps; returns (latents, experts used)."""
    rope = wan.pos_embed(config, GRID)

    @jax.jit
    def call(p, x, t, c, cache, plan, key):
        kw = {} if chipmunk is None else dict(chipmunk=chipmunk, cache=cache, plan=plan, key=key)
        return wan.forward(p, config, hidden_states=x, timestep=t, **c, rotary_emb=rope, dtype=jnp.float32, **kw)

    x, caches, used = jnp.asarray(latents), [cache, cache], []
    for step in range(len(sigmas) - 1):
        t = np.float32(sigmas[step]) * np.float32(1000.0)
        expert = 0 if t >= boundary else 1
        used.append(expert)
        scale = g if expert == 0 else g2
        plan = None if chipmunk is None else step_plan(chipmunk, step)
        step_key = None if key is None else jax.random.fold_in(key, step)
        v = []
        for branch, c in enumerate((cond, uncond)):
            out = call(params[expert], x, jnp.float32(t), c, caches[branch], plan, step_key)
            caches[branch] = out.cache
            v.append(out.sample)
        x = x + (sigmas[step + 1] - sigmas[step]) * (v[1] + scale * (v[0] - v[1]))
    return x, used


@pytest.mark.slow
def test_two_expert_sampler_matches_hand_rolled_loop_dense_and_chipmunk():
    config, params = _expert_pair()
    sigmas = sampling.flow_sigmas(5, shift=5.0)
    boundary = 900.0  # t = 1000, 952, 882 | ...: switch at step 2
    assert wan_experts.expert_schedule(sigmas, boundary).tolist() == [0, 0, 1, 1, 1]
    switch = wan_experts.switch_step(sigmas, boundary)
    rng = np.random.default_rng(40)
    latents = rng.standard_normal((1, config.in_channels) + LATENT).astype(np.float32)
    cond, uncond = ({"encoder_hidden_states": rng.standard_normal((1, 6, config.text_dim)).astype(np.float32)}
                    for _ in range(2))
    g, g2 = 4.0, 3.0
    rope = wan.pos_embed(config, GRID)
    expected, used = _hand_rolled(params, config, sigmas, latents, cond, uncond, boundary, g, g2)
    assert used == diffusers_expert_choice(sigmas, 0.9)

    # dense (no Chipmunk): the sampler's cache passes through untouched
    den = wan_experts.two_expert_denoiser(config, config, None, boundary_timestep=boundary, grid=GRID,
                                          rotary_emb=rope, dtype=jnp.float32)
    dense_chipmunk = chipmunk_config.ChipmunkConfig(num_steps=5)  # the sampler's schedules; no step caching
    out, _, _ = wan_experts.sample(den, dense_chipmunk, params, jnp.asarray(latents), cond, jnp.zeros(()),
                                   sigmas=sigmas, key=jax.random.key(0), hidden_shape=(1, 192, config.inner_dim),
                                   hidden_dtype=jnp.float32, boundary_timestep=boundary, guidance_scale=g,
                                   guidance_scale_2=g2, uncond=uncond)
    assert max_rel_error(out, expected) <= RTOL
    # the comparison can fail: one guidance scale for both experts moves the result
    one_scale, _ = _hand_rolled(params, config, sigmas, latents, cond, uncond, boundary, g, g)
    assert max_rel_error(one_scale, expected) > 100 * RTOL
    # ... and so does the other expert at the switch step
    late, _ = _hand_rolled(params, config, sigmas, latents, cond, uncond, 870.0, g, g2)
    assert max_rel_error(late, expected) > 100 * RTOL

    # Chipmunk with every key kept, refreshed at the switch, one cache set for both experts: equals dense
    from test_wan_model import all_keys_kept

    chipmunk = wan_experts.switch_refresh(
        all_keys_kept().replace(num_steps=5, attention__counts_multiple_of=16, attention__full_step_every=4,
                                mlp__enabled=False), switch)
    assert AttentionStep(int(attention_schedule(chipmunk)[switch])) == AttentionStep.DENSE_COLSUM
    assert {AttentionStep(int(k)) for k in attention_schedule(chipmunk)} >= {AttentionStep.SPARSE}
    den = wan_experts.two_expert_denoiser(config, config, chipmunk, boundary_timestep=boundary, grid=GRID,
                                          rotary_emb=rope, dtype=jnp.float32)
    cache = wan.init_cache(config, chipmunk, batch=1, grid=GRID, key=jax.random.key(1), dtype=jnp.float32)
    for static in (False, True):
        out, caches, _ = wan_experts.sample(den, chipmunk, params, jnp.asarray(latents), cond, cache, sigmas=sigmas,
                                            key=jax.random.key(2), hidden_shape=(1, 192, config.inner_dim),
                                            hidden_dtype=jnp.float32, boundary_timestep=boundary, guidance_scale=g,
                                            guidance_scale_2=g2, uncond=uncond, static_step_dispatch=static)
        assert max_rel_error(out, expected) <= RTOL, static
    assert len(caches) == 2 and caches[0].attention[0].lse.shape == cache.attention[0].lse.shape  # per CFG branch
    # the Chipmunk loop written out (same caches, plans and keys) agrees too
    hand, _ = _hand_rolled(params, config, sigmas, latents, cond, uncond, boundary, g, g2, chipmunk=chipmunk,
                           cache=cache, key=jax.random.key(2))
    assert max_rel_error(out, hand) <= RTOL


@pytest.mark.slow
def test_two_segments_with_host_resident_experts_equal_the_one_jit_sampler():
    """The offload path (``sample_segments``: high-noise steps, then low-noise steps, each expert's params moved in
    from pinned host memory for its segment) gives the one-jit two-expert sampler's latents and caches, with
    Chipmunk (attention and MLP refreshed at the switch) and step caching across the switch."""
    config, params = _expert_pair()
    sigmas = sampling.flow_sigmas(6, shift=5.0)
    boundary = 900.0
    switch = wan_experts.switch_step(sigmas, boundary)
    assert switch == 3  # t = 1000, 968, 923 | 857, ...
    rng = np.random.default_rng(41)
    latents = rng.standard_normal((1, config.in_channels) + LATENT).astype(np.float32)
    cond, uncond = ({"encoder_hidden_states": rng.standard_normal((1, 6, config.text_dim)).astype(np.float32)}
                    for _ in range(2))
    from test_wan_model import all_keys_kept

    chipmunk = wan_experts.switch_refresh(
        all_keys_kept().replace(num_steps=6, attention__counts_multiple_of=16, attention__full_step_every=4,
                                attention__first_n_dense_layers=1, mlp__enabled=True, mlp__full_step_every=4,
                                mlp__first_n_dense_layers=1, mlp__counts_multiple_of=16, mlp__block_size=64,
                                step_cache__enabled=True, step_cache__skip_step_schedule=(2, 3, 5)), switch)
    assert chipmunk.step_cache.skip_step_schedule == (2, 5)
    assert MLPStep(int(mlp_schedule(chipmunk)[switch])) == MLPStep.DENSE
    rope = wan.pos_embed(config, GRID)
    kw = dict(grid=GRID, rotary_emb=rope, dtype=jnp.float32)
    cache = wan.init_cache(config, chipmunk, batch=1, grid=GRID, key=jax.random.key(1), dtype=jnp.float32)
    call = dict(sigmas=sigmas, key=jax.random.key(2), hidden_shape=(1, 192, config.inner_dim),
                hidden_dtype=jnp.float32, boundary_timestep=boundary, guidance_scale=4.0, guidance_scale_2=3.0,
                uncond=uncond)
    one_jit = wan_experts.sample(wan_experts.two_expert_denoiser(config, config, chipmunk, boundary_timestep=boundary,
                                                                 **kw),
                                 chipmunk, params, jnp.asarray(latents), cond, cache, **call)
    host_params = memory.to_host(params)
    assert memory.on_host(host_params[0]) and memory.on_host(host_params[1])
    segments = wan_experts.sample_segments(wan_experts.expert_denoisers(config, config, chipmunk, **kw), chipmunk,
                                           host_params, jnp.asarray(latents), cond, cache, **call)
    assert max_rel_error(segments[0], one_jit[0]) <= RTOL
    for a, b in zip(jax.tree.leaves(segments[1:]), jax.tree.leaves(one_jit[1:])):
        assert a.shape == b.shape and max_rel_error(a, b) <= 1e-4
    assert memory.on_host(host_params)  # the caller's host copies stay where they are
    # the comparison can fail: one guidance scale for both experts moves the result
    other = wan_experts.sample_segments(wan_experts.expert_denoisers(config, config, chipmunk, **kw), chipmunk,
                                        host_params, jnp.asarray(latents), cond, cache,
                                        **dict(call, guidance_scale_2=4.0))
    assert max_rel_error(other[0], one_jit[0]) > 100 * RTOL


def test_two_expert_denoiser_validation():
    config, _ = _expert_pair()
    with pytest.raises(ValueError, match="share their shapes"):
        wan_experts.two_expert_denoiser(config, config.__class__(**dict(TEST_SUITE_CONFIG, num_layers=3)),
                                        boundary_timestep=875.0, grid=GRID)
    with pytest.raises(ValueError, match="share their shapes"):
        wan_experts.expert_denoisers(config, config.__class__(**dict(TEST_SUITE_CONFIG, num_layers=3)), grid=GRID)
    with pytest.raises(ValueError, match="boundary_timestep must be finite"):
        wan_experts.two_expert_denoiser(config, config, boundary_timestep=float("inf"), grid=GRID)
    with pytest.raises(ValueError, match="boundary_ratio"):
        wan_experts.boundary_timestep(1.5)
    assert wan_experts.boundary_timestep(wan_experts.BOUNDARY_RATIOS["t2v_a14b"]) == 875.0
    assert wan_experts.boundary_timestep(wan_experts.BOUNDARY_RATIOS["i2v_a14b"]) == 900.0


# ----------------------------------------------------------------------------------------------
# Image-to-video denoisers (models.wan_i2v); parity with diffusers' pipelines: tests/test_pipelines.py


def _i2v_case(config, seed):
    rng = np.random.default_rng(seed)
    params = wan.init_params(config, jax.random.key(seed), dtype=jnp.float32)
    latents = rng.standard_normal((1, config.output_channels, 3, 8, 12)).astype(np.float32)
    text = rng.standard_normal((1, 5, config.text_dim)).astype(np.float32)
    grid = wan.token_grid(config, latents.shape)
    sigmas = jnp.asarray([0.8, 0.3, 0.0], jnp.float32)
    return rng, params, jnp.asarray(latents), text, grid, sigmas


def test_first_frame_conditioned_denoiser_is_the_per_token_forward():
    """TI2V-5B with an image: every call sees the image latents as frame 0 with timestep 0 on its tokens (what
    diffusers' expand_timesteps passes); frame 0's velocity is 0, also from the final layer of a skipped step."""
    config = wan.WanConfig(**TI2V_CONFIG)
    rng, params, latents, text, grid, sigmas = _i2v_case(config, 40)
    condition = rng.standard_normal((1, config.in_channels, 1, 8, 12)).astype(np.float32)
    denoiser = wan_i2v.first_frame_conditioned(wan.denoiser(config, grid=grid, dtype=jnp.float32), config, grid)
    cond = {"encoder_hidden_states": text, wan_i2v.CONDITION: condition}
    t = jax.tree.map(lambda table: table[0], denoiser.timestep_tables(params, sigmas, cond))
    out = denoiser.compute(params, latents, t, cond, None, None, None)  # latents' own frame 0: replaced
    x = wan_i2v.with_first_frame(latents, condition)
    np.testing.assert_array_equal(x[:, :, 0:1], condition)
    np.testing.assert_array_equal(x[:, :, 1:], latents[:, :, 1:])
    timestep = _first_frame_timesteps([np.float32(0.8) * np.float32(1000.0)], 1, grid)
    expected = wan.forward(params, config, hidden_states=x, timestep=timestep, encoder_hidden_states=text,
                           dtype=jnp.float32).sample
    assert np.all(np.asarray(out.sample[:, :, 0]) == 0)
    assert max_rel_error(out.sample[:, :, 1:], expected[:, :, 1:]) <= RTOL
    head = denoiser.head(params, out.hidden, t, cond)
    assert max_rel_error(head, out.sample) <= RTOL and np.all(np.asarray(head[:, :, 0]) == 0)
    with pytest.raises(ValueError, match="the first-frame condition must be \\[1, 12, 1, 8, 12\\]"):
        denoiser.compute(params, latents, t, dict(cond, image_condition=condition[:, :, :, :4]), None, None, None)
    with pytest.raises(ValueError, match="needs cond\\['image_condition'\\]"):
        denoiser.timestep_tables(params, sigmas, {"encoder_hidden_states": text})
    with pytest.raises(ValueError, match="temporal patch size of 1"):
        wan_i2v.first_frame_conditioned(denoiser, wan.WanConfig(**dict(TI2V_CONFIG, patch_size=(2, 2, 2))), grid)


def test_channel_conditioned_denoiser_concatenates_the_condition():
    """I2V-A14B: every call takes [latents, frame mask, image latents] on the channel axis; the mask is diffusers'
    mask_lat_size layout (all temporal-factor channels 1 on latent frame 0, 0 after)."""
    config = wan.WanConfig(**dict(TEST_SUITE_CONFIG, in_channels=12))  # 4 latent + 4 mask + 4 image channels
    rng, params, latents, text, grid, sigmas = _i2v_case(config, 41)
    mask = wan_i2v.frame_mask(3, 8, 12, temporal=4)
    assert mask.shape == (1, 4, 3, 8, 12) and np.all(mask[:, :, 0] == 1) and np.all(mask[:, :, 1:] == 0)
    image_latents = rng.standard_normal((1, 4, 3, 8, 12)).astype(np.float32)
    condition = wan_i2v.channel_condition(image_latents, temporal=4)
    np.testing.assert_array_equal(condition, np.concatenate([mask, image_latents], axis=1))
    denoiser = wan_i2v.channel_conditioned(wan.denoiser(config, grid=grid, dtype=jnp.float32))
    cond = {"encoder_hidden_states": text, wan_i2v.CONDITION: condition}
    t = jax.tree.map(lambda table: table[1], denoiser.timestep_tables(params, sigmas, cond))
    out = denoiser.compute(params, latents, t, cond, None, None, None)
    expected = wan.forward(params, config, hidden_states=jnp.concatenate([latents, condition], axis=1),
                           timestep=np.float32(0.3) * np.float32(1000.0), encoder_hidden_states=text,
                           dtype=jnp.float32).sample
    assert out.sample.shape == latents.shape and max_rel_error(out.sample, expected) <= RTOL
    assert max_rel_error(denoiser.head(params, out.hidden, t, cond), expected) <= RTOL
    with pytest.raises(ValueError, match="the channel condition must be \\[1, channels, 3, 8, 12\\]"):
        denoiser.compute(params, latents, t, dict(cond, image_condition=condition[:, :, :2]), None, None, None)
