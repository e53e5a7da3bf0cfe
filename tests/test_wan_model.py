"""Wan 2.1 model: fp32 parity with diffusers' own WanTransformer3DModel (random weights, CPU) from the
diffusers and the original Wan-AI layouts, T2V and I2V, bf16/jit smoke tests, input validation, and the
Wan-specific parts of Chipmunk inside the model (voxel tails, CFG branch caches, the CFG denoiser against a
Python loop). What every model shares (ModelOutput, head, caches, step plans, token order, every key kept ==
dense on a grid of whole voxels) is in tests/test_model_contract.py."""

from __future__ import annotations

import chex
import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from chipmunk_jax import cache as chipmunk_cache  # noqa: E402
from chipmunk_jax import config as chipmunk_config  # noqa: E402
from chipmunk_jax.models import wan  # noqa: E402
from chipmunk_jax.ports import wan as wan_ports  # noqa: E402
from chipmunk_jax.schedule import AttentionStep, attention_schedule, step_plan  # noqa: E402

from helpers import max_rel_error, randomized_torch_model, torch_forward  # noqa: E402

RTOL = 1e-5

TEST_SUITE_CONFIG = dict(  # diffusers tests/models/transformers/test_models_transformer_wan.py
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
I2V_CONFIG = dict(TEST_SUITE_CONFIG, in_channels=12, image_dim=8, added_kv_proj_dim=24)
I2V_TEXT_LEN = 512  # diffusers' I2V processor hard-codes the text length


def make_torch_model(kwargs, seed):
    """diffusers model with every parameter (zero biases, unit norm scales, scale_shift_table) randomised."""
    return randomized_torch_model(diffusers.WanTransformer3DModel, kwargs, seed)


def make_inputs(rng, config: wan.WanConfig, *, batch, frames, height, width, text_len, image_len=257):
    inputs = dict(
        hidden_states=rng.standard_normal((batch, config.in_channels, frames, height, width)).astype(np.float32),
        timestep=rng.uniform(0.0, 1000.0, batch).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((batch, text_len, config.text_dim)).astype(np.float32),
    )
    if config.image_dim is not None:
        inputs["encoder_hidden_states_image"] = rng.standard_normal((batch, image_len, config.image_dim)).astype(
            np.float32)
    return inputs


def zero_params(config):
    """Zero params with init_params' structure, from abstract shapes (for checks that never use the values)."""
    abstract = jax.eval_shape(lambda key: wan.init_params(config, key, dtype=jnp.float32), jax.random.key(0))
    return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)


def diffusers_to_original(state):
    """The inverse of diffusers' convert_wan_to_diffusers, written out here independently of the port's
    tables (diffusers norm2 is the original norm3; norm_added_q has no original counterpart)."""
    top = {
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2",
        "condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2",
        "condition_embedder.time_proj": "time_projection.1",
        "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
        "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
        "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
        "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
        "proj_out": "head.head",
        "patch_embedding": "patch_embedding",
    }
    inner = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "norm_q": "norm_q", "norm_k": "norm_k",
             "add_k_proj": "k_img", "add_v_proj": "v_img", "norm_added_k": "norm_k_img"}
    block = {"norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
    out = {}
    for key, value in state.items():
        value = value.numpy() if hasattr(value, "numpy") else value
        if key == "scale_shift_table":
            out["head.modulation"] = value
            continue
        stem, _, kind = key.rpartition(".")
        if stem in top:
            out[f"{top[stem]}.{kind}"] = value
            continue
        _, index, rest = key.split(".", 2)
        if rest == "scale_shift_table":
            out[f"blocks.{index}.modulation"] = value
            continue
        stem, _, kind = rest.rpartition(".")
        if stem.startswith(("attn1.", "attn2.")):
            which = "self_attn" if stem.startswith("attn1.") else "cross_attn"
            out[f"blocks.{index}.{which}.{inner[stem[6:]]}.{kind}"] = value
        else:
            out[f"blocks.{index}.{block[stem]}.{kind}"] = value
    return out


@pytest.fixture(scope="module")
def t2v_model():
    return make_torch_model(TEST_SUITE_CONFIG, seed=0)


@pytest.fixture(scope="module")
def i2v_model():
    return make_torch_model(I2V_CONFIG, seed=1)


def _params(model, layout):
    config = wan.WanConfig.from_diffusers(dict(model.config))
    if layout == "diffusers":
        return wan_ports.from_diffusers(model)
    original = diffusers_to_original(model.state_dict())
    assert "blocks.0.norm3.weight" in original and "blocks.0.norm2.weight" not in original
    if layout == "original_prefixed":
        original = {"model.diffusion_model." + k: v for k, v in original.items()}
    return wan_ports.from_original(original, config)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_parity_diffusers_test_suite_config(t2v_model, layout):
    rng = np.random.default_rng(10)
    config, params = _params(t2v_model, layout)
    assert config == wan.WanConfig(**TEST_SUITE_CONFIG)
    inputs = make_inputs(rng, config, batch=1, frames=2, height=16, width=16, text_len=12)
    inputs["timestep"] = np.asarray([999], np.int64)  # the test suite's int timestep
    expected = torch_forward(t2v_model, inputs)
    out = wan.forward(params, config, **inputs, dtype=jnp.float32).sample
    chex.assert_shape([out, expected], (1, 4, 2, 16, 16))
    assert max_rel_error(out, expected) <= RTOL


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["diffusers", "original", "original_prefixed"])
def test_parity_i2v_batch2_non_square(i2v_model, layout):
    rng = np.random.default_rng(11)
    config, params = _params(i2v_model, layout)
    assert config.added_kv_proj_dim == 24 and config.image_dim == 8
    inputs = make_inputs(rng, config, batch=2, frames=3, height=8, width=12, text_len=I2V_TEXT_LEN)
    expected = torch_forward(i2v_model, inputs)
    out = wan.forward(params, config, **inputs, dtype=jnp.float32).sample
    chex.assert_shape([out, expected], (2, 4, 3, 8, 12))
    assert max_rel_error(out, expected) <= RTOL
    # the comparison can fail: dropping the image branch moves the output well past the tolerance
    blocks = params["blocks"]  # one stacked tree: drop the image keys of every block at once
    no_image = dict(params, blocks=dict(blocks, attn2={k: v for k, v in blocks["attn2"].items()
                                                       if k not in ("add_k_proj", "add_v_proj", "norm_added_k")}))
    moved = wan.forward(no_image, config.__class__(**{**I2V_CONFIG, "added_kv_proj_dim": None}),
                        **inputs, dtype=jnp.float32).sample
    assert max_rel_error(moved, expected) > 100 * RTOL


@pytest.mark.slow
def test_parity_non_square_frames_and_image_tokens_in_text_context():
    """T2V on a non-square, odd-sized token grid with patch (1, 2, 2) and batch 2; image_dim without
    added_kv_proj_dim (the I2V pipeline-test config), where the image tokens join the text context; FLF2V."""
    rng = np.random.default_rng(12)
    model = make_torch_model(dict(TEST_SUITE_CONFIG, num_layers=1, cross_attn_norm=False), seed=2)
    config, params = wan_ports.from_diffusers(model)
    assert not config.cross_attn_norm
    inputs = make_inputs(rng, config, batch=2, frames=5, height=6, width=14, text_len=7)
    out = wan.forward(params, config, **inputs, dtype=jnp.float32).sample
    assert max_rel_error(out, torch_forward(model, inputs)) <= RTOL

    model = make_torch_model(dict(TEST_SUITE_CONFIG, num_layers=1, in_channels=12, image_dim=4), seed=3)
    config, params = wan_ports.from_diffusers(model)
    inputs = make_inputs(rng, config, batch=1, frames=2, height=10, width=6, text_len=9, image_len=5)
    out = wan.forward(params, config, **inputs, dtype=jnp.float32).sample
    assert max_rel_error(out, torch_forward(model, inputs)) <= RTOL

    # FLF2V: pos_embed on the first- and last-frame CLIP states, which diffusers joins per sample
    model = make_torch_model(dict(I2V_CONFIG, num_layers=1, pos_embed_seq_len=6), seed=4)
    config, params = wan_ports.from_diffusers(model)
    inputs = make_inputs(rng, config, batch=1, frames=1, height=4, width=6, text_len=I2V_TEXT_LEN)
    inputs["encoder_hidden_states_image"] = rng.standard_normal((2, 3, config.image_dim)).astype(np.float32)
    out = wan.forward(params, config, **inputs, dtype=jnp.float32).sample
    assert max_rel_error(out, torch_forward(model, inputs)) <= RTOL


def test_jit_bf16_close_to_f32(t2v_model):
    rng = np.random.default_rng(13)
    config, params = wan_ports.from_diffusers(t2v_model)
    inputs = make_inputs(rng, config, batch=2, frames=2, height=8, width=8, text_len=6)
    rope = wan.pos_embed(config, wan.token_grid(config, inputs["hidden_states"].shape))

    @jax.jit
    def run(params, inputs, rope):
        return wan.forward(params, config, **inputs, rotary_emb=rope, dtype=jnp.bfloat16).sample

    out = run(params, inputs, rope)
    reference = wan.forward(params, config, **inputs, dtype=jnp.float32).sample
    chex.assert_type(out, jnp.float32)  # the input dtype
    chex.assert_tree_all_finite(out)
    assert max_rel_error(out, reference) < 5e-2


def test_init_params_matches_diffusers_structure():
    for kwargs in (TEST_SUITE_CONFIG, I2V_CONFIG, dict(I2V_CONFIG, pos_embed_seq_len=514, cross_attn_norm=False)):
        model = diffusers.WanTransformer3DModel(**kwargs)
        torch_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert wan_ports.expected_diffusers_shapes(wan.WanConfig(**kwargs)) == torch_shapes


@pytest.mark.parametrize("preset, tensors, count", [
    ("t2v_1_3b", None, 1_418_996_800),
    ("t2v_14b", 1095, 14_288_491_584),
    ("i2v_14b", 1303, 16_394_878_784),
])
def test_full_size_config_parameter_counts(preset, tensors, count):  # docs/models.md §3.2
    shapes = wan_ports.expected_diffusers_shapes(getattr(wan.WanConfig, preset)())
    assert tensors is None or len(shapes) == tensors
    assert sum(int(np.prod(s)) for s in shapes.values()) == count


def test_rope_dims_and_tables():
    assert wan.rope_dims(128) == (44, 42, 42)
    config = wan.WanConfig(**TEST_SUITE_CONFIG)
    cos, sin = wan.pos_embed(config, (2, 3, 4))
    torch_rope = diffusers.models.transformers.transformer_wan.WanRotaryPosEmbed(12, (1, 2, 2), 32)
    ref_cos, ref_sin = torch_rope(torch.zeros(1, 1, 2, 6, 8))
    np.testing.assert_allclose(cos, ref_cos[0, :, 0].numpy(), atol=1e-7)
    np.testing.assert_allclose(sin, ref_sin[0, :, 0].numpy(), atol=1e-7)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        wan.pos_embed(config, (2, 3, 33))


def test_config_validation():
    config = wan.WanConfig.from_diffusers({"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1",
                                           **TEST_SUITE_CONFIG, "patch_size": [1, 2, 2]})
    assert config == wan.WanConfig(**TEST_SUITE_CONFIG)
    assert wan.WanConfig.from_diffusers(config.to_diffusers()) == config
    with pytest.raises(ValueError, match="num_heads"):
        wan.WanConfig.from_diffusers({"num_heads": 3})
    with pytest.raises(TypeError, match="config"):
        wan.WanConfig.from_diffusers([("num_layers", 1)])
    with pytest.raises(ValueError, match="qk_norm"):
        wan.WanConfig(qk_norm="rms_norm")
    with pytest.raises(ValueError, match="added_kv_proj_dim"):
        wan.WanConfig(added_kv_proj_dim=5120)
    with pytest.raises(ValueError, match="added_kv_proj_dim"):
        wan.WanConfig(image_dim=1280, added_kv_proj_dim=1280)
    with pytest.raises(ValueError, match="patch_size"):
        wan.WanConfig(patch_size=(1, 2))
    with pytest.raises(ValueError, match="num_layers"):
        wan.WanConfig(num_layers=-1)


def test_forward_validates_inputs():
    config = wan.WanConfig(**I2V_CONFIG)
    params = {}  # inputs are checked before any parameter is read
    inputs = make_inputs(np.random.default_rng(14), config, batch=2, frames=1, height=4, width=6, text_len=5,
                         image_len=3)
    bad = {
        "hidden_states": (inputs["hidden_states"][:, :3], "channels"),
        "encoder_hidden_states": (inputs["encoder_hidden_states"][:1], "encoder_hidden_states"),
        "encoder_hidden_states_image": (inputs["encoder_hidden_states_image"][..., :5], "encoder_hidden_states_image"),
        "timestep": (np.zeros((2, 7), np.float32), "timestep"),
    }
    for name, (value, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            wan.forward(params, config, **{**inputs, name: value}, dtype=jnp.float32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        wan.forward(params, config, **{**inputs, "hidden_states": inputs["hidden_states"][..., :5]})
    with pytest.raises(ValueError, match="hidden_states must have 5 dimensions"):
        wan.forward(params, config, **{**inputs, "hidden_states": inputs["hidden_states"][:, :, 0]})
    with pytest.raises(ValueError, match="encoder_hidden_states_image is required"):
        wan.forward(params, config, **{k: v for k, v in inputs.items() if k != "encoder_hidden_states_image"})
    t2v = wan.WanConfig(**{**TEST_SUITE_CONFIG, "in_channels": 12})
    with pytest.raises(ValueError, match="no image_dim"):
        wan.forward(params, t2v, **inputs)
    with pytest.raises(TypeError, match="dtype"):
        wan.forward(params, config, **inputs, dtype=jnp.int32)
    with pytest.raises(TypeError, match="config"):
        wan.forward(params, dict(I2V_CONFIG), **inputs)
    with pytest.raises(TypeError, match="params"):
        wan.forward([params], config, **inputs)
    with pytest.raises(ValueError, match="rotary_emb"):
        wan.forward(params, config, **inputs, rotary_emb=wan.pos_embed(config, (1, 2, 2)))
    # the token grid of [B, C, F, H, W] latents (patch (1, 2, 2))
    assert wan.token_grid(config, inputs["hidden_states"].shape) == (1, 2, 3)
    assert wan.token_grid(config, inputs["hidden_states"]) == (1, 2, 3)
    with pytest.raises(ValueError, match="B, C, F, H, W"):
        wan.token_grid(config, (1, 4, 6))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        wan.token_grid(config, (1, 12, 1, 4, 5))
    # head: the final layer on a stored hidden state; checked before the parameters are used
    hidden = np.zeros((2, 6, config.inner_dim), np.float32)
    with pytest.raises(TypeError, match="config"):
        wan.head(params, dict(I2V_CONFIG), hidden, {}, grid=(1, 2, 3))
    with pytest.raises(ValueError, match="hidden must be"):
        wan.head(params, config, hidden[:, :-1], {}, grid=(1, 2, 3))
    with pytest.raises(ValueError, match="wan.timestep_conditioning"):
        wan.head(params, config, hidden, {"temb": hidden[:, 0]}, grid=(1, 2, 3))


# ----------------------------------------------------------------------------------------------
# Chipmunk inside Wan

# latents (5, 26, 32) -> tokens (5, 13, 16) = 1,040: four full (4, 6, 8) voxels (768 tokens) plus a frame
# tail (208) and a row tail (64), six 192-query groups, the last one ragged.
LATENT, GRID = (5, 26, 32), (5, 13, 16)
CHIPMUNK_CONFIG = dict(TEST_SUITE_CONFIG, num_layers=2)


def chipmunk_inputs(config, step, text_seed=20):
    rng = np.random.default_rng(text_seed)
    inputs = make_inputs(rng, config, batch=1, frames=LATENT[0], height=LATENT[1], width=LATENT[2], text_len=8)
    # a slowly moving trajectory, as in sampling: small but non-zero deltas between steps
    base = np.random.default_rng(0).standard_normal(inputs["hidden_states"].shape).astype(np.float32)
    drift = np.random.default_rng(1000 + step).standard_normal(base.shape).astype(np.float32)
    inputs["hidden_states"] = base + 0.05 * step * drift
    inputs["timestep"] = np.asarray([1000.0 - 100.0 * step], np.float32)
    return inputs


def all_keys_kept():
    # Compressed selection keeps a group's dynamic top-k only while static + top-k stays below N
    # (eligibility, docs/algorithm.md §1.6), so "every key" is top-k = N (0.995 * 1040 rounds up to 1040 in steps of 16)
    # over an empty static mask (no local window, no static random keys; the last group is dense anyway).
    return chipmunk_config.wan().replace(
        attention__top_keys=0.995, attention__counts_multiple_of=16, attention__local_voxels=0,
        attention__random_keys=0.0, attention__first_n_dense_layers=0, attention__full_step_every=3,
        mlp__enabled=True, mlp__top_keys=1.0, mlp__random_keys=0.0, mlp__first_n_dense_layers=0,
        mlp__full_step_every=3, mlp__mask_cache_after_step=0,
    )


@pytest.mark.slow
def test_chipmunk_all_keys_kept_equals_dense_with_voxel_tails():
    """Every step kind (attention and MLP) on a grid with a frame tail and a row tail outside the whole voxels
    and a ragged last query group: all equal the dense model (the contract test covers whole voxels only)."""
    config = wan.WanConfig(**CHIPMUNK_CONFIG)
    params = wan.init_params(config, jax.random.key(5), dtype=jnp.float32)
    chipmunk = all_keys_kept()
    assert chipmunk.reorder.kind == "voxels" and chipmunk.attention.compress_indices
    steps = range(5)
    kinds = {AttentionStep(int(attention_schedule(chipmunk)[s])) for s in steps}
    assert kinds >= {AttentionStep.DENSE, AttentionStep.DENSE_COLSUM, AttentionStep.SPARSE}
    rope = wan.pos_embed(config, GRID)
    dense_fn = jax.jit(lambda inputs: wan.forward(params, config, **inputs, rotary_emb=rope, dtype=jnp.float32))
    chipmunk_fn = jax.jit(lambda inputs, cache, plan, key: wan.forward(
        params, config, **inputs, chipmunk=chipmunk, cache=cache, plan=plan, key=key, rotary_emb=rope,
        dtype=jnp.float32))
    cache = wan.init_cache(config, chipmunk, batch=1, grid=GRID, key=jax.random.key(0), dtype=jnp.float32)
    for step in steps:
        inputs = chipmunk_inputs(config, step)
        out = chipmunk_fn(inputs, cache, step_plan(chipmunk, jnp.int32(step)), jax.random.key(step))
        assert max_rel_error(out.sample, dense_fn(inputs).sample) <= 1e-5, step
        cache = out.cache


def test_chipmunk_caches_and_input_validation():
    config = wan.WanConfig(**CHIPMUNK_CONFIG)
    assert wan.token_grid(config, (1, 4) + LATENT) == GRID
    chipmunk = all_keys_kept().replace(mlp__enabled=False)
    # MLP slots exist when the MLP is off (None), like the slots of always-dense layers
    cache = wan.init_cache(config, chipmunk, batch=1, grid=GRID, key=jax.random.key(0))
    assert cache.mlp == (None,) and cache.attention[0].lse.shape[:2] == (2, 1)  # one stack of both layers
    chex.assert_shape(cache.static_mask_bits, (6, 1040 // 8))  # six 192-query groups over 1040 keys, packed
    chex.assert_type([cache.static_mask_bits, cache.eligible], [jnp.uint8, jnp.bool_])
    params = zero_params(config)
    inputs = chipmunk_inputs(config, 0)
    plan = step_plan(chipmunk, 0)
    with pytest.raises(ValueError, match="reorder.kind"):
        wan.forward(params, config, **inputs, chipmunk=chipmunk.replace(reorder__kind="tiles"), plan=plan)
    preset = chipmunk_config.wan()
    with pytest.raises(ValueError, match="local_voxels"):
        wan.forward(params, config, **inputs, chipmunk=preset.replace(reorder__kind="none"), plan=plan)
    with pytest.raises(ValueError, match="key"):  # static random keys need a key
        wan.init_cache(config, preset.replace(attention__local_voxels=1), batch=1, grid=GRID)
    with pytest.raises(ValueError, match="group"):
        wan.init_cache(config, chipmunk, batch=1, grid=(1, 4, 4), key=jax.random.key(0))
    for stacked in (True, False):  # both CFG layouts name the fix
        branches = wan.init_branch_caches(config, chipmunk, batch=1, grid=GRID, key=jax.random.key(0), stacked=stacked)
        with pytest.raises((ValueError, TypeError), match="select_branch"):
            wan.forward(params, config, **inputs, chipmunk=chipmunk, cache=branches, plan=plan)
    assert isinstance(branches, chipmunk_cache.BranchCaches) and len(branches) == 2
    chex.assert_trees_all_equal(branches[0], branches[1])  # one static mask draw for both branches
    with pytest.raises(ValueError, match="offload"):
        wan.init_branch_caches(config, chipmunk, batch=1, grid=GRID, key=jax.random.key(0), offload=True, stacked=True)


@pytest.mark.slow
def test_chipmunk_cfg_branches_keep_separate_caches():
    """Wan preset (sparse steps from step 2), cond then uncond each step, one cache slot per branch: each
    branch's outputs equal a run of that branch alone, and sharing one cache between branches would not."""
    config = wan.WanConfig(**CHIPMUNK_CONFIG)
    params = wan.init_params(config, jax.random.key(7), dtype=jnp.float32)
    # a one-voxel window so the static mask leaves room for sparsity at this small size; layer 0 dense
    chipmunk = chipmunk_config.wan().replace(attention__local_voxels=1, attention__first_n_dense_layers=1)
    assert chipmunk.invocations_per_step == 2
    rope = wan.pos_embed(config, GRID)
    mask_key = jax.random.key(42)

    @jax.jit
    def call(inputs, cache, step, key):
        out = wan.forward(params, config, **inputs, chipmunk=chipmunk, cache=cache, plan=step_plan(chipmunk, step),
                          key=key, rotary_emb=rope, dtype=jnp.float32)
        return out.sample, out.cache

    dense_fn = jax.jit(lambda inputs: wan.forward(params, config, **inputs, rotary_emb=rope, dtype=jnp.float32).sample)

    def branch_inputs(step, branch):
        return chipmunk_inputs(config, step, text_seed=20 + branch)  # cond / uncond text

    caches = wan.init_branch_caches(config, chipmunk, batch=1, grid=GRID, key=mask_key, dtype=jnp.float32,
                                    stacked=True)
    assert caches.attention[0].lse.shape[:2] == (2, 1)  # (CFG branches, the stack's one sparse layer)
    alone = [wan.init_cache(config, chipmunk, batch=1, grid=GRID, key=mask_key, dtype=jnp.float32) for _ in range(2)]
    shared = wan.init_cache(config, chipmunk, batch=1, grid=GRID, key=mask_key, dtype=jnp.float32)
    for step in range(4):  # dense, dense + column sums, sparse, sparse
        key = jax.random.key(100 + step)
        for branch in range(2):
            inputs = branch_inputs(step, branch)
            out, new = call(inputs, chipmunk_cache.select_branch(caches, branch), jnp.int32(step), key)
            caches = chipmunk_cache.update_branch(caches, branch, new)
            out_alone, alone[branch] = call(inputs, alone[branch], jnp.int32(step), key)
            out_shared, shared = call(inputs, shared, jnp.int32(step), key)
            assert max_rel_error(out, out_alone) <= 1e-6, (step, branch)
            err = max_rel_error(out, dense_fn(inputs))
            if step < 2:
                assert err <= 1e-5, (step, branch, err)
            else:  # sparse: close to dense, yet not equal (something was skipped)
                assert 1e-5 < err < 5e-2, (step, branch, err)
        # the two branches hold different caches
        lse = caches.attention[0].lse
        assert not np.allclose(lse[0], lse[1])
        assert caches.attention[0].lse.shape[1] == 1  # the always-dense layer 0 keeps no cache
        np.testing.assert_array_equal(caches.static_mask_bits[0], caches.static_mask_bits[1])
    # sharing one cache mixes the branches: at a sparse step the cond output moves off its own run
    inputs = branch_inputs(3, 0)
    out_from_shared, _ = call(inputs, shared, jnp.int32(3), jax.random.key(103))
    out_own, _ = call(inputs, chipmunk_cache.select_branch(caches, 0), jnp.int32(3), jax.random.key(103))
    assert max_rel_error(out_from_shared, out_own) > 1e-4
    assert call._cache_size() == 1  # one compilation for every step kind


@pytest.mark.slow
def test_denoiser_in_the_jitted_cfg_sampler_matches_a_python_loop():
    """sampling.sample with CFG (two branch caches) and a skipped step equals the same steps written out
    with forward / head (timestep = 1000 sigma) and one cache per branch."""
    from chipmunk_jax import sampling

    config = wan.WanConfig(**CHIPMUNK_CONFIG)
    params = wan.init_params(config, jax.random.key(8), dtype=jnp.float32)
    chipmunk = chipmunk_config.wan().replace(attention__local_voxels=1, attention__first_n_dense_layers=1,
                                             step_cache__skip_step_schedule=(2,), num_steps=3)
    rope = wan.pos_embed(config, GRID)
    den = wan.denoiser(config, chipmunk, grid=GRID, rotary_emb=rope, dtype=jnp.float32)
    cond, uncond = ({"encoder_hidden_states": chipmunk_inputs(config, 0, text_seed=s)["encoder_hidden_states"]}
                    for s in (20, 21))
    latents = chipmunk_inputs(config, 0)["hidden_states"]
    sigmas = sampling.flow_sigmas(3, shift=5.0)
    mask_key, key = jax.random.key(3), jax.random.key(4)
    cache = wan.init_cache(config, chipmunk, batch=1, grid=GRID, key=mask_key, dtype=jnp.float32)
    out, _, step_cache = sampling.sample(den, chipmunk, params, jnp.asarray(latents), cond, cache, sigmas=sigmas,
                                         key=key, hidden_shape=(1, 1040, config.inner_dim),
                                         hidden_dtype=jnp.float32, guidance_scale=5.0, uncond=uncond)
    compute = jax.jit(lambda x, t, c, cache, plan, key: wan.forward(
        params, config, hidden_states=x, timestep=t, **c, chipmunk=chipmunk, cache=cache, plan=plan, key=key,
        rotary_emb=rope, dtype=jnp.float32))
    x = jnp.asarray(latents)
    caches = [cache, cache]
    hidden = [None, None]
    for step in range(3):
        t, step_key = sigmas[step] * 1000.0, jax.random.fold_in(key, step)
        v = []
        for branch, c in enumerate((cond, uncond)):
            if step == 2:  # skipped: the head on the branch's stored (voxel-order) hidden state
                conditioning = wan.timestep_conditioning(params, config, timestep=t, batch=1)
                v.append(wan.head(params, config, hidden[branch], conditioning, grid=GRID, chipmunk=chipmunk,
                                  dtype=jnp.float32))
            else:
                o = compute(x, t, c, caches[branch], step_plan(chipmunk, jnp.int32(step)), step_key)
                caches[branch], hidden[branch] = o.cache, o.hidden
                v.append(o.sample)
        x = x + (sigmas[step + 1] - sigmas[step]) * (v[1] + 5.0 * (v[0] - v[1]))
    assert max_rel_error(out, x) <= 1e-5
    for branch in range(2):
        assert max_rel_error(chipmunk_cache.select_branch(step_cache, branch).hidden, hidden[branch]) <= 1e-5, branch
    assert isinstance(step_cache, chipmunk_cache.BranchCaches)  # one device: the branches updated in place
    assert not np.allclose(step_cache[0].hidden, step_cache[1].hidden)
