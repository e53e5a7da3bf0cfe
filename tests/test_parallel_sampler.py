"""The one-jit sampler on a device mesh (8 fake CPU devices, tests/conftest.py): for each model, the sharded
sampler (sequence parallel, and CFG parallel for Wan) equals the single-device sampler over dense, full + column
sum, sparse and skipped steps; the carried caches keep their documented shardings at 1/P of the bytes per device;
the compiled program trades tokens for heads with all-to-alls and gathers nothing (chipmunk_jax/parallel.py).

Random keys and features are off: on a mesh each device draws its own heads' / tokens' random columns, which
differ from one device's draws over all heads (docs/architecture.md §6)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from chipmunk_jax import config as chipmunk_config
from chipmunk_jax import parallel, sampling
from chipmunk_jax.cache import init_step_cache, split_branches, stack_branches

from helpers import max_rel_error

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)")

NO_RANDOM = dict(attention__random_keys=0.0, attention__dynamic_random_keys=0.0, mlp__random_keys=0.0)


def _mesh_split(mesh, sharding) -> int:
    """How many ways ``sharding`` splits an array over ``mesh`` (the product of its named axes' sizes)."""
    names = [n for entry in sharding.spec if entry is not None for n in (entry if isinstance(entry, tuple) else
                                                                          (entry,))]
    return math.prod(mesh.shape[n] for n in names)


def _assert_documented_shardings(cache, step_cache, mesh, *, branches, sparse_split):
    """Every leaf carries ``parallel.sampler_cache_shardings`` and holds total / (its axes' sizes) bytes per
    device; the attention and MLP caches are split ``sparse_split`` ways."""
    expected = parallel.sampler_cache_shardings(cache, step_cache, mesh, branches=branches)
    for leaf, sharding in zip(jax.tree.leaves((cache, step_cache)), jax.tree.leaves(expected)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.shape, leaf.sharding, sharding)
        assert parallel.per_device_bytes(leaf) * _mesh_split(mesh, sharding) == leaf.nbytes, leaf.shape
    for slot in [*cache.attention, *cache.mlp]:
        for leaf in jax.tree.leaves(slot):
            assert parallel.per_device_bytes(leaf) * sparse_split == leaf.nbytes, leaf.shape


def _assert_spec(x, mesh, spec):
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (x.shape, x.sharding, spec)


def _sample_both(module, config, chipmunk, mesh, *, den_kw, params, latents, cond, cache, step_cache,
                 guidance_scale=None, uncond=None, static_step_dispatch=False):
    """(single-device result, sharded result, the sharded program's HLO) of one sampler over 6 steps."""
    sigmas = sampling.flow_sigmas(chipmunk.num_steps, shift=3.0)
    results = []
    for m in (None, mesh):
        den = module.denoiser(config, chipmunk, dtype=jnp.float32, mesh=m, **den_kw)
        run = sampling.make_sampler(den, chipmunk, sigmas, guidance_scale=guidance_scale,
                                    static_step_dispatch=static_step_dispatch)
        args = (params, jnp.copy(latents), cond, jax.tree.map(jnp.copy, cache), jax.tree.map(jnp.copy, step_cache),
                jax.random.key(7), uncond)
        compiled = run.lower(*args).compile()
        results.append(compiled(*args))
    return results[0], results[1], compiled.as_text()


def _assert_equal_and_gathers_nothing(one, many, hlo, num_tokens):
    assert max_rel_error(many[0], one[0]) <= 1e-5, max_rel_error(many[0], one[0])
    for a, b in zip(jax.tree.leaves(many[1:]), jax.tree.leaves(one[1:])):
        if jnp.issubdtype(a.dtype, jnp.floating):
            assert max_rel_error(a, b) <= 1e-5, a.shape
        else:  # selected indices: the same set (near-tied scores may leave them in another order)
            np.testing.assert_array_equal(np.sort(np.atleast_1d(a), -1), np.sort(np.atleast_1d(b), -1))
    assert "all-to-all" in hlo
    # nothing of sequence length is ever gathered (K/V, caches, tables): at most a few text-mask flags
    gathered = [math.prod(int(d) for d in dims.split(",") if d) for dims in
                re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo)]
    assert max(gathered, default=0) < num_tokens, gathered


@pytest.mark.slow
@pytest.mark.parametrize("sequence", [2, 4])
def test_flux_sequence_parallel_sampler_equals_one_device(sequence):
    from chipmunk_jax.models import flux

    config = flux.FluxConfig(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                             num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                             axes_dims_rope=(4, 4, 8), guidance_embeds=True)
    grid, text = (16, 32), 512  # whole 128-token MLP blocks per device, image and joint sequence alike
    chipmunk = chipmunk_config.flux().replace(
        attention__first_n_dense_layers=1, mlp__first_n_dense_layers=1, attention__full_step_every=3,
        mlp__full_step_every=3, num_steps=6, step_cache__enabled=True, step_cache__skip_step_schedule=(4,),
        **NO_RANDOM)
    rng = np.random.default_rng(sequence)
    params = flux.init_params(config, jax.random.key(0), dtype=jnp.float32)
    cond = flux.sampling_cond(config, encoder_hidden_states=rng.standard_normal((1, text, 32)).astype(np.float32),
                              pooled_projections=rng.standard_normal((1, 32)).astype(np.float32), grid=grid,
                              guidance=3.5)
    cache = flux.init_cache(config, chipmunk, batch=1, grid=grid, num_text_tokens=text, dtype=jnp.float32)
    step_cache = init_step_cache(batch=1, seq_len=512, width=config.inner_dim, dtype=jnp.float32)
    mesh = parallel.make_mesh(sequence=sequence, devices=jax.devices()[:sequence])
    one, many, hlo = _sample_both(
        flux, config, chipmunk, mesh, den_kw=dict(grid=grid), params=params,
        latents=jnp.asarray(rng.standard_normal((1, 512, 4)), jnp.float32), cond=cond, cache=cache,
        step_cache=step_cache, static_step_dispatch=sequence == 4)
    _assert_equal_and_gathers_nothing(one, many, hlo, num_tokens=512)
    _assert_documented_shardings(*many[1:], mesh, branches=False, sparse_split=sequence)
    _assert_spec(many[1].attention[1].out_cache, mesh, P(None, None, None, "sequence", None))  # [L, B, N, H, D]
    _assert_spec(many[1].mlp[1].act_cache, mesh, P(None, None, None, "sequence"))  # [L, B, F, N]


@pytest.mark.slow
def test_hunyuan_video_sampler_pads_the_text_to_split_the_joint_sequence():
    """768 image + 10 text tokens (7 valid) on 4 devices: 2 masked text tokens are appended on the mesh."""
    from chipmunk_jax.models import hunyuan_video as hv

    config = hv.HunyuanVideoConfig(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=10,
                                   num_layers=1, num_single_layers=2, num_refiner_layers=1, patch_size=1,
                                   patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                                   rope_axes_dim=(2, 4, 4))
    grid, text, valid = (4, 12, 16), 10, 7
    assert (math.prod(grid) + text) % 4
    chipmunk = chipmunk_config.hunyuan_video().replace(
        attention__first_n_dense_layers=1, attention__full_step_schedule=(0, 1, 3), num_steps=6,
        step_cache__enabled=True, step_cache__skip_step_schedule=(5,), **NO_RANDOM)
    rng = np.random.default_rng(5)
    params = hv.init_params(config, jax.random.key(0), dtype=jnp.float32)
    cond = dict(encoder_hidden_states=jnp.asarray(rng.standard_normal((1, text, 16)), jnp.float32),
                encoder_attention_mask=jnp.asarray((np.arange(text) < valid)[None], jnp.float32),
                pooled_projections=jnp.asarray(rng.standard_normal((1, 8)), jnp.float32),
                guidance=jnp.asarray([6000.0], jnp.float32))
    cache = hv.init_cache(config, chipmunk, batch=1, grid=grid, text_length=valid, key=jax.random.key(2),
                          dtype=jnp.float32)
    step_cache = init_step_cache(batch=1, seq_len=math.prod(grid), width=config.inner_dim, dtype=jnp.float32)
    mesh = parallel.make_mesh(sequence=4, devices=jax.devices()[:4])
    one, many, hlo = _sample_both(
        hv, config, chipmunk, mesh, den_kw=dict(grid=grid, text_length=valid, rotary_emb=hv.pos_embed(config, grid)),
        params=params, latents=jnp.asarray(rng.standard_normal((1, 4, 4, 12, 16)), jnp.float32), cond=cond,
        cache=cache, step_cache=step_cache)
    _assert_equal_and_gathers_nothing(one, many, hlo, num_tokens=math.prod(grid))
    _assert_documented_shardings(*many[1:], mesh, branches=False, sparse_split=4)


@pytest.mark.slow
def test_wan_cfg_and_sequence_parallel_sampler_equals_one_device():
    """cfg=2 x sequence=4: each CFG branch on its own 4 devices, caches split 8 ways, one exchange per step."""
    from chipmunk_jax.models import wan

    config = wan.WanConfig(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=4,
                           out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=3, rope_max_seq_len=32)
    grid = (4, 8, 16)  # 512 tokens: one 128-token MLP block per device of a branch
    chipmunk = chipmunk_config.wan().replace(
        attention__first_n_dense_layers=1, attention__local_voxels=1, attention__full_step_every=3,
        mlp__enabled=True, mlp__first_n_dense_layers=1, mlp__full_step_every=3, num_steps=6,
        step_cache__enabled=True, step_cache__skip_step_schedule=(4,), **NO_RANDOM)
    rng = np.random.default_rng(6)
    params = wan.init_params(config, jax.random.key(1), dtype=jnp.float32)
    cond, uncond = ({"encoder_hidden_states": jnp.asarray(rng.standard_normal((1, 6, 16)), jnp.float32)}
                    for _ in range(2))
    cache = stack_branches(wan.init_cache(config, chipmunk, batch=1, grid=grid, key=jax.random.key(2),
                                          dtype=jnp.float32), 2)
    step_cache = stack_branches(init_step_cache(batch=1, seq_len=512, width=config.inner_dim, dtype=jnp.float32), 2)
    mesh = parallel.make_mesh(sequence=4, cfg=2)
    one, many, hlo = _sample_both(
        wan, config, chipmunk, mesh, den_kw=dict(grid=grid, rotary_emb=wan.pos_embed(config, grid)), params=params,
        latents=jnp.asarray(rng.standard_normal((1, 4, 4, 16, 32)), jnp.float32), cond=cond, cache=cache,
        step_cache=step_cache, guidance_scale=5.0, uncond=uncond, static_step_dispatch=True)
    _assert_equal_and_gathers_nothing(one, many, hlo, num_tokens=512)
    _assert_documented_shardings(*many[1:], mesh, branches=True, sparse_split=8)
    _assert_spec(many[1].attention[0].out_cache, mesh, P("cfg", None, None, None, "sequence", None))
    _assert_spec(many[1].mlp[0].counts, mesh, P("cfg", None, None, "sequence"))  # [2, L, B, NB]
    _assert_spec(many[1].static_mask_bits, mesh, P("cfg"))
    assert not np.allclose(many[2].hidden[0], many[2].hidden[1])  # each branch kept its own step cache


def test_sampler_mesh_errors_name_the_problem():
    from chipmunk_jax.models import wan

    config = wan.WanConfig(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=4,
                           out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    grid, chipmunk = (2, 4, 8), chipmunk_config.wan().replace(num_steps=3)
    sigmas = sampling.flow_sigmas(3)
    cfg_mesh = parallel.make_mesh(sequence=4, cfg=2)
    den = wan.denoiser(config, chipmunk, grid=grid, dtype=jnp.float32, mesh=cfg_mesh)
    with pytest.raises(ValueError, match="cfg axis of 2 but no guidance_scale"):
        sampling.make_sampler(den, chipmunk, sigmas)
    with pytest.raises(ValueError, match="not the denoiser's"):
        sampling.make_sampler(den, chipmunk, sigmas, guidance_scale=5.0, mesh=parallel.make_mesh(sequence=8))
    wide = parallel.make_mesh(sequence=2, cfg=4)
    with pytest.raises(ValueError, match="cfg axis is 4: classifier-free guidance has 2 branches"):
        sampling.make_sampler(wan.denoiser(config, chipmunk, grid=grid, mesh=wide), chipmunk, sigmas,
                              guidance_scale=5.0)
    run = sampling.make_sampler(den, chipmunk, sigmas, guidance_scale=5.0)
    params = wan.init_params(config, jax.random.key(0), dtype=jnp.float32)
    branch = wan.init_cache(config, chipmunk, batch=1, grid=grid, key=jax.random.key(2), dtype=jnp.float32)
    step_cache = stack_branches(init_step_cache(batch=1, seq_len=64, width=config.inner_dim), 2)
    cond = {"encoder_hidden_states": jnp.zeros((1, 6, 16))}
    with pytest.raises(ValueError, match="BranchCaches .* are for one device"):
        run(params, jnp.zeros((1, 4, 2, 8, 16)), cond, split_branches(branch, 2), step_cache, jax.random.key(0),
            cond)
    with pytest.raises(ValueError, match="cond and uncond must have the same structure and shapes"):
        run(params, jnp.zeros((1, 4, 2, 8, 16)), cond, stack_branches(branch, 2), step_cache, jax.random.key(0),
            {"encoder_hidden_states": jnp.zeros((1, 7, 16))})
    host = jax.device_put(stack_branches(branch, 2), NamedSharding(cfg_mesh, P(), memory_kind="pinned_host"))
    with pytest.raises(ValueError, match="host-resident layers"):
        run(params, jnp.zeros((1, 4, 2, 8, 16)), cond, host, step_cache, jax.random.key(0), cond)
