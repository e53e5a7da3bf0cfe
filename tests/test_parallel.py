"""Sequence parallelism on 8 fake CPU devices (tests/conftest.py): the Ulysses attention op equals the
single-device op at every step kind with its cache carried, its cache stays head-sharded, and the compiled
program trades tokens for heads with all-to-alls instead of gathering the sequence (chipmunk_jax/parallel.py)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from chipmunk_jax import config as chipmunk_config
from chipmunk_jax import parallel
from chipmunk_jax.attention import init_attention_cache, sparse_delta_attention
from chipmunk_jax.schedule import AttentionStep, step_plan

from helpers import max_rel_error

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)")


def test_make_mesh_and_its_errors():
    mesh = parallel.make_mesh(sequence=4, cfg=2, devices=jax.devices()[:8])
    assert dict(mesh.shape) == {"cfg": 2, "sequence": 4}
    with pytest.raises(ValueError, match="needs 8 devices, got 4"):
        parallel.make_mesh(sequence=4, cfg=2, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="sequence must be a positive integer"):
        parallel.make_mesh(sequence=0)
    with pytest.raises(ValueError, match="HunyuanVideo has 24 attention heads, not divisible by .* size 5"):
        parallel.check_heads("HunyuanVideo", 24, parallel.make_mesh(sequence=5, devices=jax.devices()[:5]))
    with pytest.raises(ValueError, match="4 x 128-token blocks"):
        parallel.check_tokens("the MLP tokens", 4096 + 512 + 128, mesh, multiple=128)
    parallel.check_tokens("the MLP tokens", 4096, mesh, multiple=128)
    with pytest.raises(TypeError, match="make_mesh"):
        parallel.check_heads("FLUX", 24, mesh=None)


@pytest.mark.parametrize("sequence", [2, 4])
def test_ulysses_attention_equals_one_device_at_every_step_kind(sequence):
    mesh = parallel.make_mesh(sequence=sequence, devices=jax.devices()[:sequence])
    chipmunk = chipmunk_config.flux().replace(attention__top_keys=0.3, attention__random_keys=0.0)
    b, n, h, d = 1, 384 + 96 * sequence, 4, 32  # two query groups and a ragged tail
    keys = jax.random.split(jax.random.key(sequence), 3)
    tokens = NamedSharding(mesh, parallel.token_spec(4))

    def qkv(step):
        return [jax.random.normal(jax.random.fold_in(k, step), (b, n, h, d), jnp.float32) for k in keys]

    one = init_attention_cache(chipmunk, batch=b, seq_len=n, heads=h, head_dim=d, dtype=jnp.float32)
    spec = parallel.attention_cache_spec(one)
    many = jax.device_put(one, jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), spec,
                                                      is_leaf=lambda s: isinstance(s, P)))
    for step, kind in enumerate((AttentionStep.DENSE, AttentionStep.DENSE_COLSUM, AttentionStep.SPARSE,
                                 AttentionStep.DENSE_REFRESH, AttentionStep.SPARSE)):
        q, k, v = qkv(step)
        op = lambda q, k, v, c, kind=kind: sparse_delta_attention(q, k, v, c, kind, chipmunk)  # noqa: E731
        out_one, one = jax.jit(op)(q, k, v, one)
        sharded_op = jax.jit(parallel.ulysses_attention(op, mesh, one))
        args = [jax.device_put(x, tokens) for x in (q, k, v)]
        out_many, many = sharded_op(*args, many)
        assert max_rel_error(out_many, out_one) <= 1e-5, (kind, max_rel_error(out_many, out_one))
        chex.assert_trees_all_close(jax.device_get(many), jax.device_get(one), rtol=1e-5, atol=1e-5)
        # the cache stays head-sharded: each device holds 1/P of every field
        assert many.out_cache.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "sequence", None)), 4)
        assert parallel.per_device_bytes(many.lse) * sequence == one.lse.size * one.lse.dtype.itemsize
    hlo = sharded_op.lower(*args, many).compile().as_text()
    assert "all-to-all" in hlo and "all-gather" not in hlo


def _flux_problem(text_len):
    from chipmunk_jax.models import flux

    config = flux.FluxConfig(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                             num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                             axes_dims_rope=(4, 4, 8), guidance_embeds=True)
    grid = (16, 32)  # 512 image tokens: whole 128-token MLP blocks on up to 4 devices

    def inputs(step):
        rng = np.random.default_rng(3)
        return dict(hidden_states=rng.standard_normal((1, 512, 4)).astype(np.float32) * (1 + 0.05 * step),
                    encoder_hidden_states=np.ones((1, text_len, 32), np.float32) * 0.1,
                    pooled_projections=np.full((1, 32), 0.2, np.float32),
                    timestep=np.asarray([1.0 - 0.1 * step], np.float32), guidance=np.asarray([3.5], np.float32),
                    img_ids=flux.image_ids(grid), txt_ids=np.zeros((text_len, 3), np.float32))

    params = flux.init_params(config, jax.random.key(0), dtype=jnp.float32)
    return flux, config, grid, params, inputs


@pytest.mark.slow
@pytest.mark.parametrize("sequence", [2, 4])
def test_flux_sequence_parallel_forward_equals_one_device(sequence):
    """FLUX with Chipmunk (tiles, attention and MLP sparse, random keys/features off so both runs draw the same)
    over dense, dense + column-sum and sparse steps: the sequence-parallel forward on a mesh equals the
    single-device forward, and the carried cache keeps its documented sharding."""
    flux, config, grid, params, inputs = _flux_problem(text_len=512)
    mesh = parallel.make_mesh(sequence=sequence, devices=jax.devices()[:sequence])
    chipmunk = chipmunk_config.flux().replace(attention__first_n_dense_layers=1, mlp__first_n_dense_layers=1,
                                              attention__full_step_every=3, mlp__full_step_every=3,
                                              mlp__random_keys=0.0, attention__random_keys=0.0)
    rope = flux.pos_embed(config, inputs(0)["txt_ids"], inputs(0)["img_ids"])

    def call(mesh):
        return jax.jit(lambda params, x, cache, plan: flux.forward(
            params, config, **x, chipmunk=chipmunk, cache=cache, plan=plan, key=jax.random.key(1), grid=grid,
            rotary_emb=rope, dtype=jnp.float32, mesh=mesh))

    one_cache = flux.init_cache(config, chipmunk, batch=1, grid=grid, num_text_tokens=512, dtype=jnp.float32)
    many_cache = jax.device_put(one_cache, parallel.cache_shardings(one_cache, mesh))
    single, sharded = call(None), call(mesh)
    dense = jax.jit(lambda params, x: flux.forward(params, config, **x, rotary_emb=rope, dtype=jnp.float32,
                                                   mesh=mesh).sample)
    for step in range(4):  # dense, dense + column sums, sparse, full (mlp dense) step
        x = inputs(step)
        plan = step_plan(chipmunk, step)
        one = single(params, x, one_cache, plan)
        many = sharded(params, x, many_cache, plan)
        one_cache, many_cache = one.cache, many.cache
        assert max_rel_error(many.sample, one.sample) <= 1e-5, (step, max_rel_error(many.sample, one.sample))
        stack = many_cache.attention[1]
        assert stack.out_cache.sharding.is_equivalent_to(
            NamedSharding(mesh, P(None, None, None, "sequence", None)), 5)
        assert parallel.per_device_bytes(stack.out_cache) * sequence == stack.out_cache.nbytes
        mlp = many_cache.mlp[1]
        assert parallel.per_device_bytes(mlp.act_cache) * sequence == mlp.act_cache.nbytes
    reference = flux.forward(params, config, **inputs(0), rotary_emb=rope, dtype=jnp.float32).sample
    assert max_rel_error(dense(params, inputs(0)), reference) <= 1e-5  # the dense model on the mesh too
    hlo = sharded.lower(params, inputs(2), many_cache, step_plan(chipmunk, 2)).compile().as_text()
    assert "all-to-all" in hlo


def test_flux_mesh_errors_name_the_problem():
    flux, config, grid, params, inputs = _flux_problem(text_len=12)
    mesh = parallel.make_mesh(sequence=8)
    with pytest.raises(ValueError, match="FLUX has 4 attention heads, not divisible by .* size 8"):
        flux.forward(params, config, **inputs(0), dtype=jnp.float32, mesh=mesh)
    config = dataclasses.replace(config, num_attention_heads=8)
    params = flux.init_params(config, jax.random.key(0), dtype=jnp.float32)
    mesh = parallel.make_mesh(sequence=8)
    chipmunk = chipmunk_config.flux()
    with pytest.raises(ValueError, match="joint sequence \\(text \\+ image\\): 524 tokens do not split into 8 shards"):
        flux.forward(params, config, **inputs(0), dtype=jnp.float32, mesh=mesh, chipmunk=chipmunk,
                     plan=step_plan(chipmunk, 0), grid=grid)
    mesh = parallel.make_mesh(sequence=4, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="single blocks' sparse MLP\\): 524 tokens do not split into 4 x 128"):
        flux.forward(params, config, **inputs(0), dtype=jnp.float32, mesh=mesh, chipmunk=chipmunk,
                     plan=step_plan(chipmunk, 0), grid=grid)


@pytest.mark.slow
def test_video_models_sequence_parallel_forward_equals_one_device():
    """The same contract for HunyuanVideo (joint image + padded text, Chipmunk on the valid prefix, dense path with
    key lengths) and Wan (self-attention sharded, cross-attention per token): sharded over 2 devices, a dense step
    and a column-sum step equal one device."""
    from chipmunk_jax.models import hunyuan_video as hv
    from chipmunk_jax.models import wan

    mesh = parallel.make_mesh(sequence=2, devices=jax.devices()[:2])
    rng = np.random.default_rng(5)
    hv_config = hv.HunyuanVideoConfig(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                      num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                      patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                      pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
    text, valid = 10, 7  # 768 image + 10 text tokens: an even joint sequence, a ragged valid prefix
    hv_inputs = dict(hidden_states=rng.standard_normal((1, 4, 4, 12, 16)).astype(np.float32),
                     timestep=np.asarray([900.0], np.float32),
                     encoder_hidden_states=rng.standard_normal((1, text, 16)).astype(np.float32),
                     encoder_attention_mask=(np.arange(text) < valid)[None].astype(np.float32),
                     pooled_projections=rng.standard_normal((1, 8)).astype(np.float32),
                     guidance=np.asarray([6000.0], np.float32))
    hv_chipmunk = chipmunk_config.hunyuan_video().replace(attention__first_n_dense_layers=1,
                                                         attention__random_keys=0.0, step_cache__enabled=False)
    hv_params = hv.init_params(hv_config, jax.random.key(0), dtype=jnp.float32)
    wan_config = wan.WanConfig(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                               out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                               rope_max_seq_len=32)
    wan_inputs = dict(hidden_states=rng.standard_normal((1, 4, 4, 12, 32)).astype(np.float32),
                      timestep=np.asarray([900.0], np.float32),
                      encoder_hidden_states=rng.standard_normal((1, 6, 16)).astype(np.float32))
    wan_chipmunk = chipmunk_config.wan().replace(attention__first_n_dense_layers=1, attention__local_voxels=1,
                                                 attention__random_keys=0.0, mlp__enabled=False)
    wan_params = wan.init_params(wan_config, jax.random.key(1), dtype=jnp.float32)
    cases = [
        (hv, hv_config, hv_params, hv_inputs, hv_chipmunk, dict(text_length=valid),
         lambda c: hv.init_cache(hv_config, c, batch=1, grid=(4, 12, 16), text_length=valid,
                                 key=jax.random.key(2), dtype=jnp.float32)),
        (wan, wan_config, wan_params, wan_inputs, wan_chipmunk, {},
         lambda c: wan.init_cache(wan_config, c, batch=1, grid=(4, 6, 16), key=jax.random.key(2),
                                  dtype=jnp.float32)),
    ]
    for module, config, params, inputs, chipmunk, extra, init in cases:
        dense = module.forward(params, config, **inputs, dtype=jnp.float32).sample
        dense_many = jax.jit(lambda p, x: module.forward(p, config, **x, dtype=jnp.float32, mesh=mesh).sample)
        assert max_rel_error(dense_many(params, inputs), dense) <= 1e-5, module.__name__
        one_cache = init(chipmunk)
        many_cache = jax.device_put(one_cache, parallel.cache_shardings(one_cache, mesh))
        for step in range(2):
            def call(cache, mesh):
                return module.forward(params, config, **inputs, chipmunk=chipmunk, cache=cache,
                                      plan=step_plan(chipmunk, step), key=jax.random.key(3), dtype=jnp.float32,
                                      mesh=mesh, **extra)

            one = jax.jit(lambda c: call(c, None))(one_cache)
            many = jax.jit(lambda c: call(c, mesh))(many_cache)
            one_cache, many_cache = one.cache, many.cache
            assert max_rel_error(many.sample, one.sample) <= 1e-5, (module.__name__, step)
