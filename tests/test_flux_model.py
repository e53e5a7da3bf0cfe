"""FLUX.1 model: fp32 parity with diffusers' own FluxTransformer2DModel (random weights, CPU), the
BFL-layout port, bf16 and jit smoke tests, input validation, and Chipmunk inside the model."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from chipmunk_jax.models import flux  # noqa: E402
from chipmunk_jax.ports import flux as flux_ports  # noqa: E402

# The sinusoid of t*1000 (up to ~5000 with the guidance) is sensitive to one-ulp differences between
# torch's and XLA's float32 exp; that alone puts the floor near 5e-6 relative.
RTOL = 1e-5

TEST_SUITE_CONFIG = dict(  # diffusers tests/models/transformers/test_models_transformer_flux.py
    patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
)
DEV_CONFIG = dict(TEST_SUITE_CONFIG, num_layers=2, num_single_layers=2, guidance_embeds=True)


def max_rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def make_torch_model(kwargs, seed):
    """diffusers model with every parameter (zero biases, unit norm scales included) randomised."""
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def grid_ids(h, w):
    rows, cols = np.divmod(np.arange(h * w), w)
    return np.stack([np.zeros(h * w), rows, cols], axis=1).astype(np.float32)


def make_inputs(rng, config: flux.FluxConfig, *, batch, h, w, text_len, random_ids=False):
    n = h * w
    inputs = dict(
        hidden_states=rng.standard_normal((batch, n, config.in_channels)).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((batch, text_len, config.joint_attention_dim)).astype(np.float32),
        pooled_projections=rng.standard_normal((batch, config.pooled_projection_dim)).astype(np.float32),
        timestep=rng.uniform(0.0, 1.0, batch).astype(np.float32),
        img_ids=rng.standard_normal((n, 3)).astype(np.float32) if random_ids else grid_ids(h, w),
        txt_ids=rng.standard_normal((text_len, 3)).astype(np.float32) if random_ids
        else np.zeros((text_len, 3), np.float32),
    )
    if config.guidance_embeds:
        inputs["guidance"] = rng.uniform(1.0, 5.0, batch).astype(np.float32)
    return inputs


def torch_forward(model, inputs):
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=False)[0]
    return out.numpy()


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


@pytest.fixture(scope="module")
def schnell_model():
    return make_torch_model(TEST_SUITE_CONFIG, seed=0)


@pytest.fixture(scope="module")
def dev_model():
    return make_torch_model(DEV_CONFIG, seed=1)


def test_parity_diffusers_test_suite_config(schnell_model):
    rng = np.random.default_rng(10)
    config, params = flux_ports.from_diffusers(schnell_model)
    assert config == flux.FluxConfig(**{**TEST_SUITE_CONFIG, "axes_dims_rope": (4, 4, 8)})
    inputs = make_inputs(rng, config, batch=1, h=4, w=4, text_len=48, random_ids=True)
    expected = torch_forward(schnell_model, inputs)
    out = flux.forward(params, config, **inputs, dtype=jnp.float32)
    assert out.shape == expected.shape == (1, 16, 4)
    assert max_rel_err(out, expected) <= RTOL


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
    out = flux.forward(params, config, **inputs, dtype=jnp.float32)
    assert out.shape == (2, 24, 4)
    assert max_rel_err(out, expected) <= RTOL
    # the comparison can fail: a different timestep must move the output well past the tolerance
    moved = flux.forward(params, config, **{**inputs, "timestep": inputs["timestep"] * 0.5}, dtype=jnp.float32)
    assert max_rel_err(moved, expected) > 100 * RTOL


def test_jit_bf16_close_to_f32(dev_model):
    rng = np.random.default_rng(12)
    config, params = flux_ports.from_diffusers(dev_model)
    inputs = make_inputs(rng, config, batch=2, h=4, w=4, text_len=5)
    rope = flux.rotary_emb(config, inputs["txt_ids"], inputs["img_ids"])

    @jax.jit
    def run(params, inputs, rope):
        return flux.forward(params, config, **inputs, rotary_emb=rope, dtype=jnp.bfloat16)

    out = run(params, inputs, rope)
    reference = flux.forward(params, config, **inputs, dtype=jnp.float32)
    assert out.dtype == jnp.float32  # the input dtype
    assert np.all(np.isfinite(out))
    assert max_rel_err(out, reference) < 5e-2


def test_init_params_matches_diffusers_structure():
    config = flux.FluxConfig(**DEV_CONFIG)
    params = flux.init_params(config, jax.random.key(0), dtype=jnp.float32)
    model = diffusers.FluxTransformer2DModel(**DEV_CONFIG)
    torch_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in flux_ports.to_diffusers(params).items()} == torch_shapes


def test_full_size_config_parameter_count():
    shapes = flux_ports.expected_diffusers_shapes(flux.FluxConfig.dev())
    assert len(shapes) == 1160  # MODELS.md §1.2
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
    params = flux.init_params(config, jax.random.key(1), dtype=jnp.float32)
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
    with pytest.raises(ValueError, match="only used with chipmunk"):
        flux.forward(params, config, **inputs, step=0)


# ----------------------------------------------------------------------------------------------
# Chipmunk inside FLUX

from chipmunk_jax import config as chipmunk_config  # noqa: E402
from chipmunk_jax.schedule import AttentionStep, MLPStep, attention_schedule, mlp_schedule  # noqa: E402

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


def test_chipmunk_all_columns_kept_equals_dense_every_step_kind():
    config = flux.FluxConfig(**{**DEV_CONFIG, "num_layers": 1, "num_single_layers": 1})
    params = flux.init_params(config, jax.random.key(5), dtype=jnp.float32)
    chipmunk = all_columns_kept()
    steps = range(6)
    kinds = {AttentionStep(int(attention_schedule(chipmunk)[s])) for s in steps}
    kinds |= {MLPStep(int(mlp_schedule(chipmunk)[s])) for s in steps}
    assert kinds >= {AttentionStep.DENSE, AttentionStep.DENSE_COLSUM, AttentionStep.DENSE_REFRESH,
                     AttentionStep.SPARSE, MLPStep.DENSE, MLPStep.SPARSE_SELECT, MLPStep.SPARSE_REUSE}
    dense_fn = jax.jit(lambda inputs: flux.forward(params, config, **inputs, image_grid=GRID, dtype=jnp.float32))
    chipmunk_fn = jax.jit(lambda inputs, cache, step, key: flux.forward(
        params, config, **inputs, chipmunk=chipmunk, cache=cache, step=step, key=key, image_grid=GRID,
        dtype=jnp.float32))
    cache = flux.init_cache(config, chipmunk, batch=1, num_image_tokens=GRID[0] * GRID[1],
                            num_text_tokens=TEXT_LEN, dtype=jnp.float32)
    for step in steps:
        inputs = chipmunk_inputs(config, step)
        out, cache = chipmunk_fn(inputs, cache, jnp.int32(step), jax.random.key(step))
        assert max_rel_err(out, dense_fn(inputs)) <= 1e-5, step
    # the static-dispatch path (Python int step) agrees on a sparse step too
    static_fn = jax.jit(lambda inputs, cache: flux.forward(
        params, config, **inputs, chipmunk=chipmunk, cache=cache, step=5, image_grid=GRID, dtype=jnp.float32))
    out, _ = static_fn(inputs, cache)
    assert max_rel_err(out, dense_fn(inputs)) <= 1e-5


def test_chipmunk_reorder_is_invisible_at_io():
    """Tile order inside, raster order outside: with every column kept, reordering or not, and a
    caller that keeps tokens in tile order itself, all give the dense output (in their own order)."""
    from chipmunk_jax.reorder import inverse_permutation, tile_permutation

    config = flux.FluxConfig(**{**DEV_CONFIG, "num_layers": 1, "num_single_layers": 1})
    params = flux.init_params(config, jax.random.key(6), dtype=jnp.float32)
    inputs = chipmunk_inputs(config, 0)
    dense = np.asarray(flux.forward(params, config, **inputs, dtype=jnp.float32))
    chipmunk = all_columns_kept()
    perm = tile_permutation(*GRID)
    tiled = dict(inputs, hidden_states=inputs["hidden_states"][:, perm], img_ids=inputs["img_ids"][perm])
    out_tiled, _ = flux.forward(params, config, **tiled, chipmunk=chipmunk, step=0, tokens_in_tile_order=True,
                                dtype=jnp.float32)
    assert max_rel_err(np.asarray(out_tiled)[:, inverse_permutation(perm)], dense) <= 1e-5
    out_none, _ = flux.forward(params, config, **inputs, chipmunk=chipmunk.replace(reorder__kind="none"), step=0,
                               dtype=jnp.float32)
    assert max_rel_err(out_none, dense) <= 1e-5
    # a disabled MLP runs the model's dense MLP and hands its cache slots back untouched
    no_mlp = chipmunk.replace(mlp__enabled=False)
    cache = flux.init_cache(config, no_mlp, batch=1, num_image_tokens=256, num_text_tokens=TEXT_LEN,
                            dtype=jnp.float32)
    out_no_mlp, new_cache = flux.forward(params, config, **inputs, chipmunk=no_mlp, cache=cache, step=0,
                                         dtype=jnp.float32)
    assert max_rel_err(out_no_mlp, dense) <= 1e-5
    assert all(a is b for a, b in zip(new_cache["mlp"], cache["mlp"]))
    assert not np.array_equal(new_cache["attention"][0].lse, cache["attention"][0].lse)
    with pytest.raises(ValueError, match="image_grid"):
        flux.forward(params, config, **inputs, chipmunk=chipmunk, step=0, image_grid=(8, 8))
    with pytest.raises(ValueError, match="reorder.kind"):
        flux.forward(params, config, **inputs, chipmunk=chipmunk.replace(reorder__kind="voxels"), step=0)
    with pytest.raises(ValueError, match="step is required"):
        flux.forward(params, config, **inputs, chipmunk=chipmunk)


def test_chipmunk_flux_preset_step_by_step_under_jit():
    config = flux.FluxConfig(**{**DEV_CONFIG, "num_layers": 2, "num_single_layers": 2})
    params = flux.init_params(config, jax.random.key(7), dtype=jnp.float32)
    chipmunk = chipmunk_config.flux().replace(attention__full_step_every=4, mlp__full_step_every=4)
    inputs0 = chipmunk_inputs(config, 0)
    rope = flux.rotary_emb(config, inputs0["txt_ids"], inputs0["img_ids"])
    cache = flux.init_cache(config, chipmunk, batch=1, num_image_tokens=GRID[0] * GRID[1],
                            num_text_tokens=TEXT_LEN, dtype=jnp.float32)

    @jax.jit
    def step_fn(params, inputs, cache, step, key):
        return flux.forward(params, config, **inputs, chipmunk=chipmunk, cache=cache, step=step, key=key,
                            image_grid=GRID, rotary_emb=rope, dtype=jnp.float32)

    previous_cache = None
    for step in range(6):  # dense, colsum, sparse, sparse, refresh, sparse
        inputs = chipmunk_inputs(config, step)
        out, cache = step_fn(params, inputs, cache, jnp.int32(step), jax.random.key(step))
        dense = flux.forward(params, config, **inputs, dtype=jnp.float32)
        assert np.all(np.isfinite(out))
        err = max_rel_err(out, dense)
        # full steps are dense; sparse steps (2, 3, 5) only close (measured ~8e-3): a wrong or stale
        # cache would be far off, and an exact match would mean nothing was sparse
        if step in (0, 1, 4):
            assert err <= 1e-5, (step, err)
        else:
            assert 1e-5 < err < 5e-2, (step, err)
        if step >= 2:
            # sparse steps read the caches written before: the attention column sets stay fixed
            # (recompute_mask=False) and the layers below first_n_dense_layers stay untouched
            np.testing.assert_array_equal(cache["attention"][3].indices, previous_cache["attention"][3].indices)
            assert cache["attention"][0] is None and cache["mlp"][1] is None  # always-dense layers keep no cache
        previous_cache = cache
    assert step_fn._cache_size() == 1  # one compilation for every step kind


def test_prepare_params_same_outputs_dense_and_chipmunk():
    """prepare_params (fc1 stored [F, C], proj_out split) changes the layout, not the function: the dense
    forward and every Chipmunk step kind give the plain params' outputs; layers below
    first_n_dense_layers keep their plain layout."""
    config = flux.FluxConfig(**{**DEV_CONFIG, "num_layers": 2, "num_single_layers": 2})
    params = flux.init_params(config, jax.random.key(8), dtype=jnp.float32)
    chipmunk = chipmunk_config.flux().replace(attention__full_step_every=4, mlp__full_step_every=4,
                                              mlp__first_n_dense_layers=1)
    prepared = flux.prepare_params(params, config, chipmunk)
    first = prepared["transformer_blocks"][0]["ff"]["net"]["0"]["proj"]
    second = prepared["transformer_blocks"][1]["ff"]["net"]["0"]["proj"]
    assert "kernel" in first and "kernel_t" not in first  # dense-only layer 0 untouched
    np.testing.assert_array_equal(second["kernel_t"], params["transformer_blocks"][1]["ff"]["net"]["0"]["proj"]["kernel"].T)
    single = prepared["single_transformer_blocks"][0]
    assert set(single["proj_out"]) == {"kernel_attn", "kernel_mlp", "bias"} and "kernel_t" in single["proj_mlp"]
    inputs = chipmunk_inputs(config, 0)
    dense = flux.forward(params, config, **inputs, dtype=jnp.float32)
    assert max_rel_err(flux.forward(prepared, config, **inputs, dtype=jnp.float32), dense) <= 1e-6

    step_fn = jax.jit(lambda p, inputs, cache, step, key: flux.forward(
        p, config, **inputs, chipmunk=chipmunk, cache=cache, step=step, key=key, image_grid=GRID, dtype=jnp.float32))
    caches = [flux.init_cache(config, chipmunk, batch=1, num_image_tokens=GRID[0] * GRID[1],
                              num_text_tokens=TEXT_LEN, dtype=jnp.float32) for _ in range(2)]
    for step in range(6):
        inputs = chipmunk_inputs(config, step)
        out_plain, caches[0] = step_fn(params, inputs, caches[0], jnp.int32(step), jax.random.key(step))
        out_prep, caches[1] = step_fn(prepared, inputs, caches[1], jnp.int32(step), jax.random.key(step))
        assert max_rel_err(out_prep, out_plain) <= 1e-5, step
    with pytest.raises(TypeError, match="ChipmunkConfig"):
        flux.prepare_params(params, config, None)


# ----------------------------------------------------------------------------------------------
# MMDiT blocks as HunyuanVideo will use them: image-first order and a key mask for padded text

from chipmunk_jax.models import mmdit  # noqa: E402


def _block_inputs(seed, num_img=10, num_txt=6, dim=32, head_dim=16):
    config = flux.FluxConfig(**{**DEV_CONFIG, "num_layers": 1, "num_single_layers": 1})
    params = flux.init_params(config, jax.random.key(seed), dtype=jnp.float32)
    rng = np.random.default_rng(seed)
    img = jnp.asarray(rng.standard_normal((2, num_img, dim)), jnp.float32)
    txt = jnp.asarray(rng.standard_normal((2, num_txt, dim)), jnp.float32)
    temb = jnp.asarray(rng.standard_normal((2, dim)), jnp.float32)
    ids = rng.integers(0, 5, (num_txt + num_img, 3)).astype(np.float32)
    rope = flux.rotary_emb(config, ids[:num_txt], ids[num_txt:])  # text rows first
    return params, img, txt, temb, rope


def test_mmdit_blocks_image_first_order_matches_text_first():
    params, img, txt, temb, rope = _block_inputs(30)
    n_txt = txt.shape[1]
    kw = dict(head_dim=16, dtype=jnp.float32)
    txt_a, img_a, _ = mmdit.double_block(params["transformer_blocks"][0], img, txt, temb, rope, text_first=True, **kw)
    rope_image_first = tuple(jnp.concatenate([t[n_txt:], t[:n_txt]]) for t in rope)
    txt_b, img_b, _ = mmdit.double_block(params["transformer_blocks"][0], img, txt, temb, rope_image_first,
                                         text_first=False, **kw)
    assert max_rel_err(img_b, img_a) <= 1e-5 and max_rel_err(txt_b, txt_a) <= 1e-5
    joint_a, _ = mmdit.single_block(params["single_transformer_blocks"][0], jnp.concatenate([txt, img], 1), temb,
                                    rope, **kw)
    joint_b, _ = mmdit.single_block(params["single_transformer_blocks"][0], jnp.concatenate([img, txt], 1), temb,
                                    rope_image_first, **kw)
    assert max_rel_err(jnp.concatenate([joint_b[:, -n_txt:], joint_b[:, :-n_txt]], 1), joint_a) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mmdit_key_lengths_equal_dropping_padded_text(dtype):
    params, img, txt, temb, rope = _block_inputs(31)
    n_txt, keep = txt.shape[1], 4
    kw = dict(head_dim=16, dtype=dtype, text_first=False)
    rope_if = tuple(jnp.concatenate([t[n_txt:], t[:n_txt]]) for t in rope)
    lengths = jnp.full((2,), img.shape[1] + keep, jnp.int32)
    block = params["transformer_blocks"][0]
    if dtype == jnp.bfloat16:
        block = jax.tree_util.tree_map(lambda a: a.astype(dtype), block)
        img, txt = img.astype(dtype), txt.astype(dtype)
    _, img_masked, _ = mmdit.double_block(block, img, txt, temb, rope_if, key_lengths=lengths, **kw)
    rope_short = tuple(t[: img.shape[1] + keep] for t in rope_if)
    _, img_short, _ = mmdit.double_block(block, img, txt[:, :keep], temb, rope_short, **kw)
    masked_err = max_rel_err(img_masked, img_short)
    assert masked_err <= (1e-5 if dtype == jnp.float32 else 2e-2)
    _, img_unmasked, _ = mmdit.double_block(block, img, txt, temb, rope_if, **kw)
    assert max_rel_err(img_unmasked, img_short) > 3 * max(masked_err, 1e-4)  # the padding does matter
