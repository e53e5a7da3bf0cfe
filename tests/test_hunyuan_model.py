"""HunyuanVideo model: fp32 parity with diffusers' own HunyuanVideoTransformer3DModel (random weights, CPU)
from the diffusers and the original Tencent layouts, patchify/RoPE orders, input validation, and the
HunyuanVideo-specific parts of Chipmunk inside the model (voxel tails, the padded text prefix, I2V token
replace, the static mask, the preset under jit, the denoiser against a Python loop). What every model shares
(ModelOutput, head, caches, step plans, token order, every key kept == dense on the 4x12x16 grid) is in
tests/test_model_contract.py."""

from __future__ import annotations

import dataclasses

import chex
import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from chipmunk_jax import config as chipmunk_config  # noqa: E402
from chipmunk_jax.models import hunyuan_video as hv  # noqa: E402
from chipmunk_jax.ports import hunyuan_video as hv_ports  # noqa: E402
from chipmunk_jax.reorder import inverse_permutation, voxel_permutation  # noqa: E402
from chipmunk_jax.schedule import AttentionStep, attention_schedule, step_plan  # noqa: E402
from chipmunk_jax.selection import static_video_mask, unpack_mask  # noqa: E402

from helpers import max_rel_error, randomized_torch_model, torch_forward  # noqa: E402

RTOL = 1e-5

TEST_SUITE_CONFIG = dict(  # diffusers tests/models/transformers/test_models_transformer_hunyuan_video.py
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
    num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
    text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None,
)
# patch 2, two blocks of each kind, two refiner blocks
P2_CONFIG = dict(TEST_SUITE_CONFIG, patch_size=2, num_layers=2, num_single_layers=2, num_refiner_layers=2)
NO_GUIDANCE_CONFIG = dict(P2_CONFIG, guidance_embeds=False, in_channels=9, image_condition_type="latent_concat")
TOKEN_REPLACE_CONFIG = dict(P2_CONFIG, image_condition_type="token_replace")


def make_torch_model(kwargs, seed):
    return randomized_torch_model(diffusers.HunyuanVideoTransformer3DModel, kwargs, seed)


def make_inputs(rng, config: hv.HunyuanVideoConfig, *, batch, frames, height, width, text_len, valid=None):
    """Random inputs; ``valid`` lists the valid text length per sample (right padding), default all."""
    valid = [text_len] * batch if valid is None else valid
    mask = (np.arange(text_len)[None, :] < np.asarray(valid)[:, None]).astype(np.float32)
    inputs = dict(
        hidden_states=rng.standard_normal((batch, config.in_channels, frames, height, width)).astype(np.float32),
        timestep=rng.uniform(0.0, 1000.0, batch).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((batch, text_len, config.text_embed_dim)).astype(np.float32),
        encoder_attention_mask=mask,
        pooled_projections=rng.standard_normal((batch, config.pooled_projection_dim)).astype(np.float32),
    )
    if config.guidance_embeds:
        inputs["guidance"] = rng.uniform(1000.0, 8000.0, batch).astype(np.float32)
    return inputs


def dense_forward(params, config, inputs):
    """The dense model's sample under one jit (eager dispatch of the many small ops is several times slower
    on CPU)."""
    fn = _DENSE_FNS.setdefault(config, jax.jit(lambda p, x: hv.forward(p, config, **x, dtype=jnp.float32).sample))
    return fn(params, inputs)


_DENSE_FNS: dict = {}


def random_params(config, seed):
    """Random f32 params with the model's structure, drawn in numpy (compiling init_params' thousands of
    random ops takes seconds on CPU)."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda key: hv.init_params(config, key, dtype=jnp.float32), jax.random.key(0))
    return jax.tree_util.tree_map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(np.float32), abstract)


def diffusers_to_tencent(state):
    """The inverse of diffusers' convert_hunyuan_video_to_diffusers, written out here independently of
    the port's tables (fused qkv, fused linear1, refiner names, final modulation halves swapped)."""
    s = {k: v.numpy() for k, v in state.items()}
    out = {}
    top = {"x_embedder.proj": "img_in.proj", "proj_out": "final_layer.linear",
           "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "context_embedder.proj_in": "txt_in.input_embedder",
           "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
           "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
           "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
           "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2"}
    for src, dst in top.items():
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in s:
                out[f"{dst}.{kind}"] = s[f"{src}.{kind}"]
    for kind in ("weight", "bias"):
        scale, shift = np.split(s[f"norm_out.linear.{kind}"], 2)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = np.concatenate([shift, scale])
    i = 0
    while f"context_embedder.token_refiner.refiner_blocks.{i}.norm1.weight" in s:
        d, b = f"context_embedder.token_refiner.refiner_blocks.{i}.", f"txt_in.individual_token_refiner.blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}self_attn_qkv.{kind}"] = np.concatenate([s[f"{d}attn.to_{x}.{kind}"] for x in "qkv"])
            for src, dst in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.to_out.0", "self_attn_proj"),
                             ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2"),
                             ("norm_out.linear", "adaLN_modulation.1")):
                out[f"{b}{dst}.{kind}"] = s[f"{d}{src}.{kind}"]
        i += 1
    i = 0
    while f"transformer_blocks.{i}.norm1.linear.weight" in s:
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}img_attn_qkv.{kind}"] = np.concatenate([s[f"{d}attn.to_{x}.{kind}"] for x in "qkv"])
            out[f"{b}txt_attn_qkv.{kind}"] = np.concatenate([s[f"{d}attn.add_{x}_proj.{kind}"] for x in "qkv"])
            for src, dst in (("norm1.linear", "img_mod.linear"), ("norm1_context.linear", "txt_mod.linear"),
                             ("attn.to_out.0", "img_attn_proj"), ("attn.to_add_out", "txt_attn_proj"),
                             ("ff.net.0.proj", "img_mlp.fc1"), ("ff.net.2", "img_mlp.fc2"),
                             ("ff_context.net.0.proj", "txt_mlp.fc1"), ("ff_context.net.2", "txt_mlp.fc2")):
                out[f"{b}{dst}.{kind}"] = s[f"{d}{src}.{kind}"]
        for src, dst in (("norm_q", "img_attn_q_norm"), ("norm_k", "img_attn_k_norm"),
                         ("norm_added_q", "txt_attn_q_norm"), ("norm_added_k", "txt_attn_k_norm")):
            out[f"{b}{dst}.weight"] = s[f"{d}attn.{src}.weight"]
        i += 1
    i = 0
    while f"single_transformer_blocks.{i}.norm.linear.weight" in s:
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}linear1.{kind}"] = np.concatenate(
                [s[f"{d}attn.to_q.{kind}"], s[f"{d}attn.to_k.{kind}"], s[f"{d}attn.to_v.{kind}"], s[f"{d}proj_mlp.{kind}"]]
            )
            out[f"{b}linear2.{kind}"] = s[f"{d}proj_out.{kind}"]
            out[f"{b}modulation.linear.{kind}"] = s[f"{d}norm.linear.{kind}"]
        out[f"{b}q_norm.weight"] = s[f"{d}attn.norm_q.weight"]
        out[f"{b}k_norm.weight"] = s[f"{d}attn.norm_k.weight"]
        i += 1
    return out


@pytest.fixture(scope="module")
def suite_model():
    return make_torch_model(TEST_SUITE_CONFIG, seed=0)


@pytest.fixture(scope="module")
def p2_model():
    return make_torch_model(P2_CONFIG, seed=1)


def test_parity_diffusers_test_suite_config(suite_model):
    rng = np.random.default_rng(10)
    config, params = hv_ports.from_diffusers(suite_model)
    assert config == hv.HunyuanVideoConfig(**{**TEST_SUITE_CONFIG, "rope_axes_dim": (2, 4, 4)})
    inputs = make_inputs(rng, config, batch=1, frames=1, height=16, width=16, text_len=12)
    expected = torch_forward(suite_model, inputs)
    out = dense_forward(params, config, inputs)
    chex.assert_shape([out, expected], (1, 4, 1, 16, 16))
    assert max_rel_error(out, expected) <= RTOL


@pytest.mark.parametrize("layout", ["diffusers", "tencent", "tencent_prefixed"])
def test_parity_patch2_three_frames_padded_text(p2_model, layout):
    rng = np.random.default_rng(11)
    config = hv.HunyuanVideoConfig.from_diffusers(dict(p2_model.config))
    if layout == "diffusers":
        config, params = hv_ports.from_diffusers(p2_model.state_dict(), config)
    else:
        original = diffusers_to_tencent(p2_model.state_dict())
        if layout == "tencent_prefixed":
            original = {"model.diffusion_model." + k: v for k, v in original.items()}
        config, params = hv_ports.from_original(original, config)
    # batch 2 with different valid text lengths (the dense model takes them; Chipmunk does not)
    inputs = make_inputs(rng, config, batch=2, frames=3, height=8, width=12, text_len=12, valid=[7, 12])
    expected = torch_forward(p2_model, inputs)
    out = dense_forward(params, config, inputs)
    chex.assert_shape(out, (2, 4, 3, 8, 12))
    assert max_rel_error(out, expected) <= RTOL
    # the comparison can fail: a different timestep or text padding moves the output far past the tolerance
    moved = dense_forward(params, config, {**inputs, "timestep": inputs["timestep"] * 0.5})
    assert max_rel_error(moved, expected) > 100 * RTOL
    unmasked = dense_forward(params, config, {**inputs, "encoder_attention_mask": np.ones((2, 12), np.float32)})
    assert max_rel_error(unmasked[0], expected[0]) > 100 * RTOL


def test_parity_no_guidance_latent_concat():
    model = make_torch_model(NO_GUIDANCE_CONFIG, seed=2)
    config, params = hv_ports.from_diffusers(model)
    assert not config.guidance_embeds and config.image_condition_type == "latent_concat"
    inputs = make_inputs(np.random.default_rng(12), config, batch=1, frames=2, height=6, width=4, text_len=5,
                         valid=[3])
    expected = torch_forward(model, inputs)
    out = dense_forward(params, config, inputs)
    assert max_rel_error(out, expected) <= RTOL


@pytest.mark.parametrize("layout", ["diffusers", "tencent"])
def test_parity_token_replace_i2v(layout):
    """I2V token replace (HunyuanVideo-I2V): the first latent frame's tokens take the timestep-0 modulation in
    every block; batch 2, 3 frames, padded text, a non-square frame."""
    model = make_torch_model(TOKEN_REPLACE_CONFIG, seed=3)
    config = hv.HunyuanVideoConfig.from_diffusers(dict(model.config))
    assert config.image_condition_type == "token_replace"
    if layout == "diffusers":
        config, params = hv_ports.from_diffusers(model.state_dict(), config)
    else:
        config, params = hv_ports.from_original(diffusers_to_tencent(model.state_dict()), config)
    inputs = make_inputs(np.random.default_rng(11), config, batch=2, frames=3, height=8, width=12, text_len=12,
                         valid=[7, 12])
    expected = torch_forward(model, inputs)
    out = dense_forward(params, config, inputs)
    assert max_rel_error(out, expected) <= RTOL
    # the replaced modulation matters: the same weights without it are far off
    plain = dataclasses.replace(config, image_condition_type=None)
    assert max_rel_error(dense_forward(params, plain, inputs), expected) > 100 * RTOL


@pytest.mark.slow
def test_chipmunk_token_replace_all_keys_kept_equals_dense():
    """Under Chipmunk the image tokens are in voxel order: the first-frame mask travels with them."""
    config = hv.HunyuanVideoConfig(**dict(SMALL_CONFIG, image_condition_type="token_replace"))
    params = random_params(config, 8)
    chipmunk = all_keys_kept()
    step_fn = chipmunk_step_fn(config, chipmunk)
    cache = hv.init_cache(config, chipmunk, batch=1, grid=LATENT, text_length=VALID, key=jax.random.key(9),
                          dtype=jnp.float32)
    for step in range(3):
        inputs = trajectory_inputs(config, step)
        out = step_fn(params, inputs, cache, step_plan(chipmunk, jnp.int32(step)), jax.random.key(step))
        assert max_rel_error(out.sample, dense_forward(params, config, inputs)) <= RTOL, step
        cache = out.cache


@pytest.mark.slow
def test_jit_bf16_close_to_f32(p2_model):
    config, params = hv_ports.from_diffusers(p2_model)
    inputs = make_inputs(np.random.default_rng(13), config, batch=1, frames=2, height=4, width=4, text_len=6,
                         valid=[4])
    run = jax.jit(lambda params, inputs: hv.forward(params, config, **inputs, dtype=jnp.bfloat16).sample)
    out = run(params, inputs)
    reference = dense_forward(params, config, inputs)
    chex.assert_type(out, jnp.float32)  # the input dtype
    chex.assert_tree_all_finite(out)
    assert max_rel_error(out, reference) < 5e-2


def test_patchify_matches_conv3d_and_unpatchify_inverts():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 3, 4, 6, 8)).astype(np.float32)
    conv = torch.nn.Conv3d(3, 5, kernel_size=(2, 2, 2), stride=(2, 2, 2))
    with torch.no_grad():
        expected = conv(torch.from_numpy(x)).flatten(2).transpose(1, 2).numpy()
    kernel = conv.weight.detach().numpy().reshape(5, -1).T
    ours = hv.patchify(jnp.asarray(x), 2, 2) @ kernel + conv.bias.detach().numpy()
    assert max_rel_error(ours, expected) <= 1e-6
    np.testing.assert_array_equal(hv.unpatchify(hv.patchify(jnp.asarray(x), 2, 2), (2, 3, 4), 2, 2), x)


def test_rotary_tables_match_diffusers():
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoRotaryPosEmbed

    config = hv.HunyuanVideoConfig(**P2_CONFIG)
    rope = HunyuanVideoRotaryPosEmbed(2, 1, list(config.rope_axes_dim), 256.0)
    cos, sin = rope(torch.zeros(1, 4, 3, 10, 14))
    ours = hv.pos_embed(config, (3, 5, 7))
    np.testing.assert_allclose(ours[0], cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours[1], sin.numpy(), atol=1e-6)


def test_init_params_matches_diffusers_structure():
    config = hv.HunyuanVideoConfig(**P2_CONFIG)
    model = diffusers.HunyuanVideoTransformer3DModel(**P2_CONFIG)
    torch_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert hv_ports.expected_diffusers_shapes(config) == torch_shapes


def test_full_size_config_parameter_count():
    shapes = hv_ports.expected_diffusers_shapes(hv.HunyuanVideoConfig())
    assert len(shapes) == 1264  # docs/models.md §2.2
    assert sum(int(np.prod(s)) for s in shapes.values()) == 12_821_012_544


def test_config_validation():
    config = hv.HunyuanVideoConfig.from_diffusers(
        {"_class_name": "HunyuanVideoTransformer3DModel", "_diffusers_version": "0.42.1", "guidance_embeds": True})
    assert config == hv.HunyuanVideoConfig()
    assert hv.HunyuanVideoConfig.from_diffusers(config.to_diffusers()) == config
    with pytest.raises(ValueError, match="num_heads"):
        hv.HunyuanVideoConfig.from_diffusers({"num_heads": 3})
    with pytest.raises(ValueError, match="rope_axes_dim"):
        hv.HunyuanVideoConfig(attention_head_dim=64)
    with pytest.raises(ValueError, match="image_condition_type"):
        hv.HunyuanVideoConfig(image_condition_type="token_concat")
    with pytest.raises(ValueError, match="qk_norm"):
        hv.HunyuanVideoConfig(qk_norm="layer_norm")
    with pytest.raises(TypeError, match="config"):
        hv.HunyuanVideoConfig.from_diffusers([("guidance_embeds", True)])


def test_forward_validates_inputs():
    config = hv.HunyuanVideoConfig(**TEST_SUITE_CONFIG)
    params = random_params(config, 1)
    inputs = make_inputs(np.random.default_rng(15), config, batch=2, frames=1, height=2, width=3, text_len=4)
    bad = {
        "hidden_states": (inputs["hidden_states"][:, :3], "channels"),
        "encoder_hidden_states": (inputs["encoder_hidden_states"][:1], "encoder_hidden_states"),
        "encoder_attention_mask": (inputs["encoder_attention_mask"][:, :3], "encoder_attention_mask"),
        "pooled_projections": (inputs["pooled_projections"][:, :5], "pooled_projections"),
        "timestep": (np.zeros((3,), np.float32), "timestep"),
        "guidance": (np.zeros((2, 2), np.float32), "guidance"),
    }
    for name, (value, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            hv.forward(params, config, **{**inputs, name: value}, dtype=jnp.float32)
    with pytest.raises(ValueError, match="hidden_states must have 5"):
        hv.forward(params, config, **{**inputs, "hidden_states": inputs["hidden_states"][:, :, 0]})
    p2 = hv.HunyuanVideoConfig(**P2_CONFIG)
    with pytest.raises(ValueError, match="divide by the patch"):
        hv.forward(random_params(p2, 1), p2, **inputs)
    with pytest.raises(ValueError, match="guidance is required"):
        hv.forward(params, config, **{k: v for k, v in inputs.items() if k != "guidance"})
    with pytest.raises(TypeError, match="dtype"):
        hv.forward(params, config, **inputs, dtype=jnp.int32)
    with pytest.raises(TypeError, match="config"):
        hv.forward(params, dict(TEST_SUITE_CONFIG), **inputs)
    with pytest.raises(TypeError, match="params"):
        hv.forward([params], config, **inputs)
    with pytest.raises(ValueError, match="rotary_emb"):
        hv.forward(params, config, **inputs, rotary_emb=hv.pos_embed(config, (1, 2, 2)))
    with pytest.raises(ValueError, match="hunyuan_video.timestep_conditioning"):
        hv.forward(params, config, **inputs, conditioning={"temb": np.zeros((2, 20), np.float32), "x": 0})
    cond = hv.timestep_conditioning(params, config, timestep=inputs["timestep"],
                                    pooled_projections=inputs["pooled_projections"], guidance=inputs["guidance"])
    chex.assert_shape(cond["temb"], (2, config.inner_dim))
    with pytest.raises(ValueError, match="guidance is required"):
        hv.timestep_conditioning(params, config, timestep=inputs["timestep"],
                                 pooled_projections=inputs["pooled_projections"])
    with pytest.raises(ValueError, match="hidden must be"):
        hv.head(params, config, np.zeros((2, 5, 20), np.float32), cond, grid=(1, 2, 3))
    with pytest.raises(ValueError, match="grid"):
        hv.head(params, config, np.zeros((2, 6, 20), np.float32), cond, grid=(2, 3))


# ----------------------------------------------------------------------------------------------
# Chipmunk inside HunyuanVideo

# Latent 4x12x16 with patch 1: 768 image tokens = four (4, 6, 8) voxels = four 192-query groups; 12 text
# tokens of which 7 are valid, so Chipmunk runs on a 775-token prefix (a fifth, ragged group).
LATENT, TEXT_LEN, VALID = (4, 12, 16), 12, 7
SMALL_CONFIG = dict(TEST_SUITE_CONFIG)  # 1 double + 1 single block


def all_keys_kept(**changes):
    # static random keys with probability 1: every group's static mask is every key
    return chipmunk_config.hunyuan_video().replace(**{
        "attention__random_keys": 1.0, "attention__first_n_dense_layers": 0, "attention__full_step_schedule": (0, 1, 4),
        **changes})


def trajectory_inputs(config, step, latent=LATENT, seed=20):
    rng = np.random.default_rng(seed)
    inputs = make_inputs(rng, config, batch=1, frames=latent[0], height=latent[1], width=latent[2],
                         text_len=TEXT_LEN, valid=[VALID])
    drift = np.random.default_rng(1000 + step).standard_normal(inputs["hidden_states"].shape).astype(np.float32)
    inputs["hidden_states"] = inputs["hidden_states"] + 0.05 * step * drift
    inputs["timestep"] = np.asarray([1000.0 - 100.0 * step], np.float32)
    return inputs


def chipmunk_step_fn(config, chipmunk):
    """forward with Chipmunk under one jit: (params, inputs, cache, plan, key) -> ModelOutput."""
    return jax.jit(lambda params, inputs, cache, plan, key: hv.forward(
        params, config, **inputs, chipmunk=chipmunk, cache=cache, plan=plan, key=key, text_length=VALID,
        dtype=jnp.float32))


@pytest.mark.slow
def test_chipmunk_all_keys_kept_equals_dense_with_voxel_tails():
    """Every step kind on the sparse-capable layers with voxel reorder on a 5x7x9 grid (one main voxel + 123
    tail tokens in raster order) and RoPE permuted with the tokens: all equal the dense model (the contract
    test covers a grid of whole voxels)."""
    latent = (5, 7, 9)
    config = hv.HunyuanVideoConfig(**SMALL_CONFIG)
    params = random_params(config, 5)
    chipmunk = all_keys_kept()
    kinds = {AttentionStep(int(k)) for k in attention_schedule(chipmunk)[:6]}
    assert kinds == {AttentionStep.DENSE, AttentionStep.DENSE_COLSUM, AttentionStep.SPARSE}
    step_fn = chipmunk_step_fn(config, chipmunk)
    grid = hv.token_grid(config, (1, config.in_channels) + latent)
    cache = hv.init_cache(config, chipmunk, batch=1, grid=grid, text_length=VALID, key=jax.random.key(9),
                          dtype=jnp.float32)
    for step in range(6):
        inputs = trajectory_inputs(config, step, latent)
        out = step_fn(params, inputs, cache, step_plan(chipmunk, jnp.int32(step)), jax.random.key(step))
        assert max_rel_error(out.sample, dense_forward(params, config, inputs)) <= RTOL, step
        cache = out.cache


def test_voxel_reorder_with_tails_is_exact():
    config = hv.HunyuanVideoConfig(**SMALL_CONFIG)
    x = np.random.default_rng(21).standard_normal((2, 4, 5, 7, 9)).astype(np.float32)
    tokens = hv.patchify(jnp.asarray(x), 1, 1)
    perm = voxel_permutation(5, 7, 9)
    assert sorted(perm.tolist()) == list(range(315)) and perm[0] == 0 and perm[192] != 192
    back = hv.unpatchify(jnp.take(jnp.take(tokens, perm, axis=1), inverse_permutation(perm), axis=1), (5, 7, 9), 1, 1)
    np.testing.assert_array_equal(back, x)
    # the RoPE rows travel with their tokens
    cos, _ = hv.pos_embed(config, (5, 7, 9))
    np.testing.assert_array_equal(np.asarray(cos)[perm][:192], np.asarray(hv.pos_embed(config, (4, 6, 8))[0]))


def test_chipmunk_static_mask_in_cache_matches_spec():
    config = hv.HunyuanVideoConfig(**SMALL_CONFIG)
    # first_n_dense_layers=0: the two blocks of this small model both keep a cache
    chipmunk = chipmunk_config.hunyuan_video().replace(attention__random_keys=0.1, attention__first_n_dense_layers=0)
    grid, n_img = LATENT, 768
    cache = hv.init_cache(config, chipmunk, batch=1, grid=grid, text_length=VALID, key=jax.random.key(3),
                          dtype=jnp.float32)
    prefix = n_img + VALID  # the padded text tail is not part of Chipmunk's sequence
    chex.assert_shape(cache.static_mask_bits, (5, -(-prefix // 8)))
    chex.assert_type(cache.static_mask_bits, jnp.uint8)
    assert cache.mlp == (None, None)  # attention only
    mask = np.asarray(unpack_mask(cache.static_mask_bits, prefix))
    # one double and one single block: two stacks of one sparse layer each
    chex.assert_shape([c.lse for c in cache.attention], (1, 1, 2, prefix))
    expected, eligible = static_video_mask(grid, VALID, chipmunk.attention, key=jax.random.key(3))
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(cache.eligible, eligible)
    assert mask[:, n_img:].all()  # every group sees the valid text keys
    assert mask[-1].all() and not eligible[-1]  # the group holding the text queries is dense
    assert eligible[:-1].all()
    density = mask[:-1, :n_img].mean()  # static random keys, shared over heads and layers
    assert 0.05 < density < 0.15
    with pytest.raises(ValueError, match="key"):
        hv.init_cache(config, chipmunk, batch=1, grid=grid, text_length=VALID)


@pytest.mark.slow
def test_chipmunk_preset_step_by_step_under_jit():
    config = hv.HunyuanVideoConfig(**{**SMALL_CONFIG, "num_layers": 2})
    params = random_params(config, 7)
    chipmunk = chipmunk_config.hunyuan_video()
    assert chipmunk.attention.first_n_dense_layers == 2 and chipmunk.attention.full_step_schedule == (0, 1, 10, 40)
    assert not chipmunk.mlp.enabled and chipmunk.reorder.kind == "voxels"
    step_fn = chipmunk_step_fn(config, chipmunk)
    cache = hv.init_cache(config, chipmunk, batch=1, grid=LATENT, text_length=VALID, key=jax.random.key(1),
                          dtype=jnp.float32)
    previous = None
    for step in range(4):  # dense, colsum, sparse, sparse
        inputs = trajectory_inputs(config, step)
        out = step_fn(params, inputs, cache, step_plan(chipmunk, jnp.int32(step)), jax.random.key(step))
        cache = out.cache
        chex.assert_tree_all_finite(out.sample)
        err = max_rel_error(out.sample, dense_forward(params, config, inputs))
        # full steps are dense; sparse steps keep ~1/6 of the keys at this size (measured 3e-2 to 5e-2)
        if step < 2:
            assert err <= RTOL, (step, err)
        else:
            assert 1e-4 < err < 0.2, (step, err)
            np.testing.assert_array_equal(cache.attention[1].mask_bits, previous.attention[1].mask_bits)
        # the always-dense layers (0, 1: the double stack) keep no cache; the single stack holds layer 2
        assert cache.attention[0] is None and cache.attention[1].lse.shape[0] == 1
        previous = cache
    assert step_fn._cache_size() == 1  # one compilation for every step kind


def test_chipmunk_input_validation():
    config = hv.HunyuanVideoConfig(**SMALL_CONFIG)
    params = random_params(config, 8)
    chipmunk = all_keys_kept()
    inputs = trajectory_inputs(config, 0)
    two = make_inputs(np.random.default_rng(2), config, batch=2, frames=4, height=12, width=16, text_len=TEXT_LEN,
                      valid=[5, 7])
    plan = step_plan(chipmunk, 0)
    with pytest.raises(ValueError, match="one valid text length"):
        hv.forward(params, config, **two, chipmunk=chipmunk, plan=plan, key=jax.random.key(0))
    with pytest.raises(ValueError, match="right-padded"):
        hv.text_length_from_mask(np.asarray([[0, 1, 1]]))
    with pytest.raises(ValueError, match="does not match"):
        hv.forward(params, config, **inputs, chipmunk=chipmunk, plan=plan, text_length=VALID + 1)
    with pytest.raises(ValueError, match="text_length"):
        hv.forward(params, config, **inputs, chipmunk=chipmunk, plan=plan, text_length=TEXT_LEN + 1)
    with pytest.raises(ValueError, match="text_length"):
        jax.jit(lambda x: hv.forward(params, config, **x, chipmunk=chipmunk, plan=plan))(inputs)
    with pytest.raises(ValueError, match="reorder.kind"):
        hv.forward(params, config, **inputs, chipmunk=chipmunk.replace(reorder__kind="tiles"), plan=plan)
    with pytest.raises(ValueError, match="mlp.enabled"):
        hv.forward(params, config, **inputs, chipmunk=chipmunk.replace(mlp__enabled=True), plan=plan)
    with pytest.raises(TypeError, match="chipmunk"):
        hv.init_cache(config, {"attention": 1}, batch=1, grid=LATENT, text_length=VALID)
    with pytest.raises(ValueError, match="grid"):
        hv.init_cache(config, chipmunk, batch=1, grid=(4, 12), text_length=VALID)
    small = make_inputs(np.random.default_rng(3), config, batch=1, frames=1, height=8, width=8, text_len=4)
    with pytest.raises(ValueError, match="group_size"):
        hv.forward(params, config, **small, chipmunk=chipmunk, plan=plan, key=jax.random.key(0))


def test_cache_bytes_per_layer_at_720p():
    sizes = hv.cache_bytes_per_layer(hv.HunyuanVideoConfig(), chipmunk_config.hunyuan_video(), grid=(33, 45, 80),
                                     text_length=256)
    n, g = 118_800 + 256, -(-(118_800 + 256) // 192)
    assert sizes["out_cache"] == 24 * n * 128 * 2  # bf16
    assert sizes["mask_bits"] == 24 * g * -(-n // 8)  # bit-packed column sets
    assert sizes["lse"] == 24 * n * 4 and sizes["counts"] == 24 * g * 4
    assert sizes["total"] == 964_770_384  # the module docstring's 964.8 MB


@pytest.mark.slow
@pytest.mark.parametrize("latent_dtype", [jnp.float32, jnp.bfloat16])
def test_denoiser_in_the_jitted_sampler_matches_a_python_loop(latent_dtype):
    """sampling.sample with the HunyuanVideo denoiser (Chipmunk, one skipped step) equals the same steps written
    out with forward / head (timestep = 1000 sigma, the conditioning of each step); bf16 latents keep their
    dtype through the skip / compute branches (the velocities are float32)."""
    from chipmunk_jax import sampling

    config = hv.HunyuanVideoConfig(**SMALL_CONFIG)
    params = random_params(config, 11)
    chipmunk = all_keys_kept(num_steps=4, step_cache__skip_step_schedule=(3,), attention__full_step_schedule=(0, 1))
    grid = hv.token_grid(config, (1, config.in_channels) + LATENT)
    rope = hv.pos_embed(config, grid)
    den = hv.denoiser(config, chipmunk, grid=grid, text_length=VALID, rotary_emb=rope, dtype=jnp.float32)
    inputs = trajectory_inputs(config, 0)
    cond = {k: jnp.asarray(inputs[k]) for k in ("encoder_hidden_states", "encoder_attention_mask",
                                                  "pooled_projections", "guidance")}
    latents = jnp.asarray(inputs["hidden_states"], latent_dtype)
    sigmas = sampling.flow_sigmas(4, shift=7.0)
    mask_key, key = jax.random.key(3), jax.random.key(4)
    cache = hv.init_cache(config, chipmunk, batch=1, grid=grid, text_length=VALID, key=mask_key, dtype=jnp.float32)
    out, _, step_cache = sampling.sample(den, chipmunk, params, latents, cond, cache, sigmas=sigmas, key=key,
                                         hidden_shape=(1, 768, config.inner_dim), hidden_dtype=jnp.float32)
    chex.assert_type(out, latent_dtype)
    assert bool(step_cache.valid)
    if latent_dtype != jnp.float32:
        return
    step_fn = chipmunk_step_fn(config, chipmunk)
    # the sampler donated its latents and cache: the loop starts from fresh copies (same draw of the mask key)
    cache = hv.init_cache(config, chipmunk, batch=1, grid=grid, text_length=VALID, key=mask_key, dtype=jnp.float32)
    x, hidden = jnp.asarray(inputs["hidden_states"]), None
    for step in range(4):
        t = np.asarray([sigmas[step] * 1000.0], np.float32)
        if step == 3:
            conditioning = hv.timestep_conditioning(params, config, timestep=t,
                                                    pooled_projections=cond["pooled_projections"],
                                                    guidance=cond["guidance"])
            v = hv.head(params, config, hidden, conditioning, grid=grid, chipmunk=chipmunk, dtype=jnp.float32)
        else:
            o = step_fn(params, dict(cond, hidden_states=x, timestep=t), cache, step_plan(chipmunk, jnp.int32(step)),
                        jax.random.fold_in(key, step))
            v, hidden, cache = o.sample, o.hidden, o.cache
        x = x + (sigmas[step + 1] - sigmas[step]) * v
    assert max_rel_error(out, x) <= 1e-5
    assert max_rel_error(step_cache.hidden, hidden) <= 1e-5
