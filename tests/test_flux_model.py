"""FLUX.1 model: fp32 parity with diffusers' own FluxTransformer2DModel (random weights, CPU), the
BFL-layout port, bf16 and jit smoke tests, input validation, and the FLUX-specific parts of Chipmunk inside
the model (the preset step by step, prepare_params, a disabled MLP). What every model shares (ModelOutput,
head, caches, step plans, token order, every column kept == dense, the denoiser) is in
tests/test_model_contract.py."""

from __future__ import annotations

import chex
import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from chipmunk_jax import config as chipmunk_config  # noqa: E402
from chipmunk_jax.cache import ModelCache  # noqa: E402
from chipmunk_jax.models import flux, mmdit  # noqa: E402
from chipmunk_jax.models.block_stack import block_at  # noqa: E402
from chipmunk_jax.ports import flux as flux_ports  # noqa: E402
from chipmunk_jax.schedule import step_plan  # noqa: E402

from helpers import assert_raises_with, max_rel_error, randomized_torch_model, torch_forward  # noqa: E402

# The sinusoid of t*1000 (up to ~5000 with the guidance) is sensitive to one-ulp differences between
# torch's and XLA's float32 exp; that alone puts the floor near 5e-6 relative.
RTOL = 1e-5

TEST_SUITE_CONFIG = dict(  # diffusers tests/models/transformers/test_models_transformer_flux.py
    patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
)
DEV_CONFIG = dict(TEST_SUITE_CONFIG, num_layers=2, num_single_layers=2, guidance_embeds=True)


def make_inputs(rng, config: flux.FluxConfig, *, batch, h, w, text_len, random_ids=False):
    n = h * w
    inputs = dict(
        hidden_states=rng.standard_normal((batch, n, config.in_channels)).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((batch, text_len, config.joint_attention_dim)).astype(np.float32),
        pooled_projections=rng.standard_normal((batch, config.pooled_projection_dim)).astype(np.float32),
        timestep=rng.uniform(0.0, 1.0, batch).astype(np.float32),
        img_ids=rng.standard_normal((n, 3)).astype(np.float32) if random_ids else flux.image_ids((h, w)),
        txt_ids=rng.standard_normal((text_len, 3)).astype(np.float32) if random_ids
        else np.zeros((text_len, 3), np.float32),
    )
    if config.guidance_embeds:
        inputs["guidance"] = rng.uniform(1.0, 5.0, batch).astype(np.float32)
    return inputs


def diffusers_to_bfl(state):
    """The inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers, written out here
    independently of the port's tables (fused qkv, fused linear1, final modulation halves swapped)."""
    s = {k: v.numpy() for k, v in state.items()}
    out = {}
    top = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
           "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
    for src, dst in top.items():
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in s:
                out[f"{dst}.{kind}"] = s[f"{src}.{kind}"]
    for kind in ("weight", "bias"):
        scale, shift = np.split(s[f"norm_out.linear.{kind}"], 2)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = np.concatenate([shift, scale])
    i = 0
    while f"transformer_blocks.{i}.norm1.linear.weight" in s:
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}img_attn.qkv.{kind}"] = np.concatenate([s[f"{d}attn.to_{x}.{kind}"] for x in "qkv"])
            out[f"{b}txt_attn.qkv.{kind}"] = np.concatenate([s[f"{d}attn.add_{x}_proj.{kind}"] for x in "qkv"])
            for src, dst in (("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                             ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                             ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                             ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
                out[f"{b}{dst}.{kind}"] = s[f"{d}{src}.{kind}"]
        for src, dst in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                         ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[f"{b}{dst}.scale"] = s[f"{d}attn.{src}.weight"]
        i += 1
    i = 0
    while f"single_transformer_blocks.{i}.norm.linear.weight" in s:
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}linear1.{kind}"] = np.concatenate(
                [s[f"{d}attn.to_q.{kind}"], s[f"{d}attn.to_k.{kind}"], s[f"{d}attn.to_v.{kind}"], s[f"{d}proj_mlp.{kind}"]]
            )
            out[f"{b}linear2.{kind}"] = s[f"{d}proj_out.{kind}"]
            out[f"{b}modulation.lin.{kind}"] = s[f"{d}norm.linear.{kind}"]
        out[f"{b}norm.query_norm.scale"] = s[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = s[f"{d}attn.norm_k.weight"]
        i += 1
    return out


def numpy_params(config, seed=0):
    """Params with init_params' structure and distribution (torch's Linear init U(+-1/sqrt(fan_in)), unit
    RMSNorm scales), drawn in numpy: init_params' eager random ops take seconds to compile on CPU."""
    rng = np.random.default_rng(seed)

    def draw(tree):
        if isinstance(tree, list):
            return [draw(t) for t in tree]
        if "kernel" in tree:
            bound = 1.0 / np.sqrt(tree["kernel"].shape[0])
            return {k: rng.uniform(-bound, bound, v.shape).astype(np.float32) for k, v in tree.items()}
        if "scale" in tree:
            return {k: np.ones(v.shape, np.float32) for k, v in tree.items()}
        return {k: draw(v) for k, v in tree.items()}

    return draw(jax.eval_shape(lambda key: flux.init_params(config, key, dtype=jnp.float32), jax.random.key(0)))


@pytest.fixture(scope="module")
def schnell_model():
    return randomized_torch_model(diffusers.FluxTransformer2DModel, TEST_SUITE_CONFIG, seed=0)


@pytest.fixture(scope="module")
def dev_model():
    return randomized_torch_model(diffusers.FluxTransformer2DModel, DEV_CONFIG, seed=1)


@pytest.mark.slow
def test_parity_diffusers_test_suite_config(schnell_model):
    rng = np.random.default_rng(10)
    config, params = flux_ports.from_diffusers(schnell_model)
    assert config == flux.FluxConfig(**{**TEST_SUITE_CONFIG, "axes_dims_rope": (4, 4, 8)})
    inputs = make_inputs(rng, config, batch=1, h=4, w=4, text_len=48, random_ids=True)
    expected = torch_forward(schnell_model, inputs)
    out = flux.forward(params, config, **inputs, dtype=jnp.float32).sample
    chex.assert_shape([out, expected], (1, 16, 4))
    assert max_rel_error(out, expected) <= RTOL


@pytest.mark.parametrize("layout", ["diffusers", "bfl", "bfl_prefixed"])
def test_parity_dev_batch2_non_square(dev_model, layout):
    rng = np.random.default_rng(11)
    config = flux.FluxConfig.from_diffusers(dict(dev_model.config))
    if layout == "diffusers":
        config, params = flux_ports.from_diffusers(dev_model.state_dict(), config)
    else:
        bfl = diffusers_to_bfl(dev_model.state_dict())
        if layout == "bfl_prefixed":
            bfl = {"model.diffusion_model." + k: v for k, v in bfl.items()}
        config, params = flux_ports.from_original(bfl, config)
    assert config.guidance_embeds and config.num_layers == 2
    inputs = make_inputs(rng, config, batch=2, h=4, w=6, text_len=7)
    expected = torch_forward(dev_model, inputs)
    out = flux.forward(params, config, **inputs, dtype=jnp.float32).sample
    chex.assert_shape(out, (2, 24, 4))
    assert max_rel_error(out, expected) <= RTOL
    # the comparison can fail: a different timestep must move the output well past the tolerance
    moved = flux.forward(params, config, **{**inputs, "timestep": inputs["timestep"] * 0.5}, dtype=jnp.float32)
    assert max_rel_error(moved.sample, expected) > 100 * RTOL


def test_jit_bf16_close_to_f32(dev_model):
    rng = np.random.default_rng(12)
    config, params = flux_ports.from_diffusers(dev_model)
    inputs = make_inputs(rng, config, batch=2, h=4, w=4, text_len=5)
    rope = flux.pos_embed(config, inputs["txt_ids"], inputs["img_ids"])

    # traced ids and tables: the precomputed (float64) RoPE tables are passed in
    run = jax.jit(lambda params, inputs, rope, dtype: flux.forward(params, config, **inputs, rotary_emb=rope,
                                                                   dtype=dtype).sample, static_argnums=3)
    out = run(params, inputs, rope, jnp.bfloat16)
    reference = run(params, inputs, rope, jnp.float32)
    chex.assert_type(out, jnp.float32)  # the input dtype
    chex.assert_tree_all_finite(out)
    assert max_rel_error(out, reference) < 5e-2


def test_init_params_matches_diffusers_structure():
    config = flux.FluxConfig(**DEV_CONFIG)
    params = numpy_params(config)
    model = diffusers.FluxTransformer2DModel(**DEV_CONFIG)
    torch_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in flux_ports.to_diffusers(params).items()} == torch_shapes


def test_full_size_config_parameter_count():
    shapes = flux_ports.expected_diffusers_shapes(flux.FluxConfig.dev())
    assert len(shapes) == 1160  # docs/models.md §1.2
    assert sum(int(np.prod(s)) for s in shapes.values()) == 11_901_408_320


def test_config_from_diffusers_ignores_bookkeeping_and_rejects_unknown():
    config = flux.FluxConfig.from_diffusers(
        {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1", "guidance_embeds": True}
    )
    assert config == flux.FluxConfig.dev()
    assert flux.FluxConfig.from_diffusers(config.to_diffusers()) == config
    with pytest.raises(ValueError, match="num_heads"):
        flux.FluxConfig.from_diffusers({"num_heads": 3})
    with pytest.raises(ValueError, match="axes_dims_rope"):
        flux.FluxConfig(attention_head_dim=64)
    with pytest.raises(TypeError, match="config"):
        flux.FluxConfig.from_diffusers([("guidance_embeds", True)])


def test_forward_validates_inputs():
    config = flux.FluxConfig(**DEV_CONFIG)
    params = numpy_params(config)
    inputs = make_inputs(np.random.default_rng(13), config, batch=2, h=2, w=3, text_len=4)
    bad = {
        "hidden_states": (inputs["hidden_states"][..., :3], "channels"),
        "encoder_hidden_states": (inputs["encoder_hidden_states"][:1], "encoder_hidden_states"),
        "pooled_projections": (inputs["pooled_projections"][:, :5], "pooled_projections"),
        "img_ids": (inputs["img_ids"][:5], "img_ids"),
        "txt_ids": (inputs["txt_ids"][:, :2], "txt_ids"),
        "timestep": (np.zeros((3,), np.float32), "timestep"),
    }
    for name, (value, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            flux.forward(params, config, **{**inputs, name: value}, dtype=jnp.float32)
    with pytest.raises(ValueError, match="guidance is required"):
        flux.forward(params, config, **{k: v for k, v in inputs.items() if k != "guidance"})
    with pytest.raises(TypeError, match="dtype"):
        flux.forward(params, config, **inputs, dtype=jnp.int32)
    with pytest.raises(TypeError, match="config"):
        flux.forward(params, dict(DEV_CONFIG), **inputs)
    with pytest.raises(ValueError, match="rotary_emb"):
        flux.forward(params, config, **inputs, rotary_emb=flux.pos_embed(config, inputs["txt_ids"][:2],
                                                                         inputs["img_ids"]))
    assert_raises_with(lambda: flux.forward(params, config, **inputs, conditioning={"norm_out": 1}),
                       "flux.timestep_conditioning")


def test_image_ids_and_grid_from_ids():
    ids = flux.image_ids((3, 5))
    chex.assert_shape(ids, (15, 3))
    chex.assert_type(ids, np.float32)
    np.testing.assert_array_equal(ids[7], [0, 1, 2])  # row 1, column 2 of a 5-wide raster
    assert flux.grid_from_ids(ids) == (3, 5)
    assert_raises_with(lambda: flux.grid_from_ids(ids[::-1]), "not a raster", "grid=")
    with pytest.raises(ValueError, match="grid"):
        jax.jit(flux.grid_from_ids)(ids)


# ----------------------------------------------------------------------------------------------
# Chipmunk inside FLUX

# 16x16 image tokens (four 8x8 tiles) + 64 text tokens: 320 joint tokens, two 192-query groups (one
# ragged) and ragged 128-token MLP row blocks in the single blocks.
GRID, TEXT_LEN = (16, 16), 64


def chipmunk_inputs(config, step, rng_seed=20):
    rng = np.random.default_rng(rng_seed)
    inputs = make_inputs(rng, config, batch=1, h=GRID[0], w=GRID[1], text_len=TEXT_LEN)
    # a slowly moving trajectory, as in sampling: the deltas between steps are small but non-zero
    drift = np.random.default_rng(1000 + step)
    inputs["hidden_states"] = inputs["hidden_states"] + 0.05 * step * drift.standard_normal(
        inputs["hidden_states"].shape).astype(np.float32)
    inputs["timestep"] = np.asarray([1.0 - 0.1 * step], np.float32)
    return inputs


def all_columns_kept():
    return chipmunk_config.flux().replace(
        attention__top_keys=1.0, attention__first_n_dense_layers=0, attention__full_step_every=3,
        mlp__top_keys=1.0, mlp__random_keys=0.0, mlp__first_n_dense_layers=0, mlp__full_step_every=3,
        mlp__mask_cache_after_step=0,
    )


def init_cache(config, chipmunk):
    return flux.init_cache(config, chipmunk, batch=1, grid=GRID, num_text_tokens=TEXT_LEN, dtype=jnp.float32)


def test_chipmunk_disabled_mlp_runs_the_dense_mlp():
    """A disabled MLP runs the model's dense MLP and keeps no MLP cache (None slots, handed back as they
    are); the grid is read from raster img_ids when not given."""
    config = flux.FluxConfig(**{**DEV_CONFIG, "num_layers": 1, "num_single_layers": 1})
    params = numpy_params(config, 6)
    inputs = chipmunk_inputs(config, 0)
    dense = jax.jit(lambda x: flux.forward(params, config, **x, dtype=jnp.float32).sample)(inputs)
    no_mlp = all_columns_kept().replace(mlp__enabled=False)
    cache = init_cache(config, no_mlp)
    assert cache.mlp == (None, None) and all(slot is not None for slot in cache.attention)
    ids = inputs.pop("img_ids")  # concrete: forward reads the tile grid from them
    out = jax.jit(lambda x, c: flux.forward(params, config, **x, img_ids=ids, chipmunk=no_mlp, cache=c,
                                            plan=step_plan(no_mlp, 0), dtype=jnp.float32))(inputs, cache)
    assert max_rel_error(out.sample, dense) <= RTOL
    assert isinstance(out.cache, ModelCache) and out.cache.mlp == (None, None)
    assert not np.array_equal(out.cache.attention[0].lse, cache.attention[0].lse)


def test_chipmunk_input_validation():
    config = flux.FluxConfig(**{**DEV_CONFIG, "num_layers": 1, "num_single_layers": 1})
    params = numpy_params(config, 6)
    inputs = chipmunk_inputs(config, 0)
    chipmunk = all_columns_kept()
    plan = step_plan(chipmunk, 0)
    with pytest.raises(ValueError, match="grid"):
        flux.forward(params, config, **inputs, chipmunk=chipmunk, plan=plan, grid=(8, 8))
    with pytest.raises(ValueError, match="reorder.kind"):
        flux.forward(params, config, **inputs, chipmunk=chipmunk.replace(reorder__kind="voxels"), plan=plan)
    with pytest.raises(ValueError, match="grid="):  # tiles need the grid: random ids are not a raster
        flux.forward(params, config, **{**inputs, "img_ids": inputs["img_ids"][::-1]}, chipmunk=chipmunk, plan=plan)
    with pytest.raises(TypeError, match="chipmunk"):
        flux.init_cache(config, None, batch=1, grid=GRID, num_text_tokens=TEXT_LEN)
    with pytest.raises(TypeError, match="ChipmunkConfig"):
        flux.prepare_params(params, config, None)


@pytest.mark.slow
def test_chipmunk_flux_preset_step_by_step_under_jit():
    config = flux.FluxConfig(**{**DEV_CONFIG, "num_layers": 2, "num_single_layers": 2})
    params = flux.init_params(config, jax.random.key(7), dtype=jnp.float32)
    chipmunk = chipmunk_config.flux().replace(attention__full_step_every=4, mlp__full_step_every=4)
    inputs0 = chipmunk_inputs(config, 0)
    rope = flux.pos_embed(config, inputs0["txt_ids"], inputs0["img_ids"])
    cache = init_cache(config, chipmunk)

    @jax.jit
    def step_fn(params, inputs, cache, plan, key):
        return flux.forward(params, config, **inputs, chipmunk=chipmunk, cache=cache, plan=plan, key=key,
                            grid=GRID, rotary_emb=rope, dtype=jnp.float32)

    dense_fn = jax.jit(lambda params, inputs: flux.forward(params, config, **inputs, dtype=jnp.float32).sample)
    previous_cache = None
    for step in range(6):  # dense, colsum, sparse, sparse, refresh, sparse
        inputs = chipmunk_inputs(config, step)
        out = step_fn(params, inputs, cache, step_plan(chipmunk, jnp.int32(step)), jax.random.key(step))
        cache = out.cache
        chex.assert_tree_all_finite(out.sample)
        err = max_rel_error(out.sample, dense_fn(params, inputs))
        # full steps are dense; sparse steps (2, 3, 5) only close (measured ~8e-3): a wrong or stale
        # cache would be far off, and an exact match would mean nothing was sparse
        if step in (0, 1, 4):
            assert err <= 1e-5, (step, err)
        else:
            assert 1e-5 < err < 5e-2, (step, err)
        if step >= 2:
            # sparse steps read the caches written before: the attention column sets stay fixed
            # (recompute_mask=False) and the layers below first_n_dense_layers stay untouched
            np.testing.assert_array_equal(cache.attention[1].indices, previous_cache.attention[1].indices)
            # the always-dense layers 0, 1 (the double stack) keep no cache; the single stack holds layers 2, 3
            assert cache.attention[0] is None and cache.mlp[0] is None and cache.attention[1].lse.shape[0] == 2
        previous_cache = cache
    assert step_fn._cache_size() == 1  # one compilation for every step kind


@pytest.mark.slow
def test_prepare_params_same_outputs_dense_and_chipmunk():
    """prepare_params (fc1 stored [F, C], proj_out split) changes the layout, not the function: the dense
    forward and every Chipmunk step kind give the plain params' outputs; a block stack is prepared whole when
    any of its layers has a sparse MLP (its dense layers read the same layout), and a stack without one keeps
    its plain layout."""
    config = flux.FluxConfig(**{**DEV_CONFIG, "num_layers": 2, "num_single_layers": 2})
    params = flux.init_params(config, jax.random.key(8), dtype=jnp.float32)
    chipmunk = chipmunk_config.flux().replace(attention__full_step_every=4, mlp__full_step_every=4,
                                              mlp__first_n_dense_layers=1)
    prepared = flux.prepare_params(params, config, chipmunk)
    fc1 = prepared["transformer_blocks"]["ff"]["net"]["0"]["proj"]
    assert set(fc1) == {"kernel_t", "bias"}  # layer 1 is sparse: the stack (layer 0 too) is stored [L, F, C]
    plain_fc1 = params["transformer_blocks"]["ff"]["net"]["0"]["proj"]["kernel"]
    np.testing.assert_array_equal(fc1["kernel_t"], np.swapaxes(plain_fc1, 1, 2))
    single = prepared["single_transformer_blocks"]
    assert set(single["proj_out"]) == {"kernel_attn", "kernel_mlp", "bias"} and "kernel_t" in single["proj_mlp"]
    np.testing.assert_array_equal(np.concatenate([single["proj_out"]["kernel_attn"], single["proj_out"]["kernel_mlp"]],
                                                 axis=1), params["single_transformer_blocks"]["proj_out"]["kernel"])
    # a stack whose layers are all dense-MLP keeps the plain layout (shared, not copied)
    doubles_dense = flux.prepare_params(params, config, chipmunk.replace(mlp__first_n_dense_layers=2))
    assert doubles_dense["transformer_blocks"] is params["transformer_blocks"]
    assert "kernel_t" in doubles_dense["single_transformer_blocks"]["proj_mlp"]
    inputs = chipmunk_inputs(config, 0)
    dense = flux.forward(params, config, **inputs, dtype=jnp.float32).sample
    assert max_rel_error(flux.forward(prepared, config, **inputs, dtype=jnp.float32).sample, dense) <= 1e-6

    step_fn = jax.jit(lambda p, inputs, cache, plan, key: flux.forward(
        p, config, **inputs, chipmunk=chipmunk, cache=cache, plan=plan, key=key, grid=GRID, dtype=jnp.float32))
    caches = [init_cache(config, chipmunk) for _ in range(2)]
    for step in range(6):
        inputs = chipmunk_inputs(config, step)
        plan = step_plan(chipmunk, jnp.int32(step))
        out_plain = step_fn(params, inputs, caches[0], plan, jax.random.key(step))
        out_prep = step_fn(prepared, inputs, caches[1], plan, jax.random.key(step))
        caches = [out_plain.cache, out_prep.cache]
        assert max_rel_error(out_prep.sample, out_plain.sample) <= 1e-5, step


# ----------------------------------------------------------------------------------------------
# MMDiT blocks as HunyuanVideo uses them: image-first order and a key mask for padded text


def _block_inputs(seed, num_img=10, num_txt=6, dim=32, head_dim=16):
    config = flux.FluxConfig(**{**DEV_CONFIG, "num_layers": 1, "num_single_layers": 1})
    params = numpy_params(config, seed)
    rng = np.random.default_rng(seed)
    img = jnp.asarray(rng.standard_normal((2, num_img, dim)), jnp.float32)
    txt = jnp.asarray(rng.standard_normal((2, num_txt, dim)), jnp.float32)
    temb = jnp.asarray(rng.standard_normal((2, dim)), jnp.float32)
    ids = rng.integers(0, 5, (num_txt + num_img, 3)).astype(np.float32)
    rope = flux.pos_embed(config, ids[:num_txt], ids[num_txt:])  # text rows first
    return params, img, txt, temb, rope


def test_mmdit_blocks_image_first_order_matches_text_first():
    params, img, txt, temb, rope = _block_inputs(30)
    n_txt = txt.shape[1]
    kw = dict(head_dim=16, dtype=jnp.float32)
    double = block_at(params["transformer_blocks"], 0)
    txt_a, img_a, _ = mmdit.double_block(double, img, txt, temb, rope, text_first=True, **kw)
    rope_image_first = tuple(jnp.concatenate([t[n_txt:], t[:n_txt]]) for t in rope)
    txt_b, img_b, _ = mmdit.double_block(double, img, txt, temb, rope_image_first,
                                         text_first=False, **kw)
    assert max_rel_error(img_b, img_a) <= 1e-5 and max_rel_error(txt_b, txt_a) <= 1e-5
    single = block_at(params["single_transformer_blocks"], 0)
    joint_a, _ = mmdit.single_block(single, jnp.concatenate([txt, img], 1), temb,
                                    rope, **kw)
    joint_b, _ = mmdit.single_block(single, jnp.concatenate([img, txt], 1), temb,
                                    rope_image_first, **kw)
    assert max_rel_error(jnp.concatenate([joint_b[:, -n_txt:], joint_b[:, :-n_txt]], 1), joint_a) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mmdit_key_lengths_equal_dropping_padded_text(dtype):
    params, img, txt, temb, rope = _block_inputs(31)
    n_txt, keep = txt.shape[1], 4
    kw = dict(head_dim=16, dtype=dtype, text_first=False)
    rope_if = tuple(jnp.concatenate([t[n_txt:], t[:n_txt]]) for t in rope)
    lengths = jnp.full((2,), img.shape[1] + keep, jnp.int32)
    block = block_at(params["transformer_blocks"], 0)
    if dtype == jnp.bfloat16:
        block = jax.tree_util.tree_map(lambda a: a.astype(dtype), block)
        img, txt = img.astype(dtype), txt.astype(dtype)
    _, img_masked, _ = mmdit.double_block(block, img, txt, temb, rope_if, key_lengths=lengths, **kw)
    rope_short = tuple(t[: img.shape[1] + keep] for t in rope_if)
    _, img_short, _ = mmdit.double_block(block, img, txt[:, :keep], temb, rope_short, **kw)
    masked_err = max_rel_error(img_masked, img_short)
    assert masked_err <= (1e-5 if dtype == jnp.float32 else 2e-2)
    _, img_unmasked, _ = mmdit.double_block(block, img, txt, temb, rope_if, **kw)
    assert max_rel_error(img_unmasked, img_short) > 3 * max(masked_err, 1e-4)  # the padding does matter
