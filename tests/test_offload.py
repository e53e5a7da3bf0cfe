"""Host-resident layer caches (chipmunk_jax.memory): the ops fetch a host cache to the device, run, and put the
new cache back on the host; results equal the device-resident run. On the CPU both memory kinds are the same
RAM, so these tests check placement bookkeeping and numerics; the GPU test measures what it saves."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax import config as chipmunk_config
from chipmunk_jax import memory
from chipmunk_jax.attention import init_attention_cache, sparse_delta_attention
from chipmunk_jax.cache import offload_layer_caches
from chipmunk_jax.models import hunyuan_video as hv
from chipmunk_jax.schedule import AttentionStep, attention_step_kind, step_plan

HOST = "pinned_host"


def _kinds(tree):
    return {x.sharding.memory_kind for x in jax.tree_util.tree_leaves(tree)}


_TINY_FLUX = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=True)


def _tiny_flux_sampling(seed, steps, **chipmunk_changes):
    """A 1+1-block FLUX on a 16x16 grid with 8 text tokens, the FLUX preset (first layer dense, full step
    every 3): (config, params, noise (raster order), cond, chipmunk, sigmas)."""
    from chipmunk_jax import sampling
    from chipmunk_jax.models import flux

    config = flux.FluxConfig(**_TINY_FLUX)
    keys = jax.random.split(jax.random.key(seed), 4)
    params = flux.init_params(config, keys[0], dtype=jnp.float32)
    noise = jax.random.normal(keys[1], (1, 256, 16), jnp.float32)
    text = jax.random.normal(keys[2], (1, 8, 32), jnp.float32)
    pooled = jax.random.normal(keys[3], (1, 32), jnp.float32)
    chipmunk = chipmunk_config.flux().replace(num_steps=steps, attention__first_n_dense_layers=1,
                                              mlp__first_n_dense_layers=1, attention__full_step_every=3,
                                              mlp__full_step_every=3, **chipmunk_changes)
    cond = flux.sampling_cond(config, encoder_hidden_states=text, pooled_projections=pooled, grid=(16, 16),
                              guidance=3.5)
    sigmas = sampling.flow_sigmas(steps, mu=sampling.flux_shift(256))
    return config, params, noise, cond, chipmunk, sigmas


def test_attention_op_host_cache_every_step_kind_under_jit():
    cfg = chipmunk_config.hunyuan_video().replace(attention__first_n_dense_layers=0,
                                                  attention__full_step_schedule=(0, 1, 3))
    b, n, h, d = 1, 400, 2, 16
    keys = jax.random.split(jax.random.key(np.random.SeedSequence().entropy % 2**31), 3)
    device_cache = init_attention_cache(cfg, batch=b, seq_len=n, heads=h, head_dim=d, dtype=jnp.float32)
    host_cache = memory.to_host(device_cache)
    assert _kinds(host_cache) == {HOST} and memory.on_host(host_cache) and not memory.on_host(device_cache)

    @jax.jit
    def step(q, k, v, cache, s):
        return sparse_delta_attention(q, k, v, cache, attention_step_kind(cfg, s, 0), cfg, key=jax.random.key(1))

    seen = set()
    for s in range(5):
        q, k, v = (jax.random.normal(jax.random.fold_in(kk, s), (b, n, h, d)) for kk in keys)
        seen.add(AttentionStep(int(attention_step_kind(cfg, s, 0))))
        o_dev, device_cache = step(q, k, v, device_cache, jnp.int32(s))
        o_host, host_cache = step(q, k, v, host_cache, jnp.int32(s))
        np.testing.assert_array_equal(np.asarray(o_host), np.asarray(o_dev))
        assert _kinds(host_cache) == {HOST}, s
        chex.assert_trees_all_equal(host_cache, device_cache)
    assert seen == {AttentionStep.DENSE, AttentionStep.DENSE_COLSUM, AttentionStep.SPARSE}


@pytest.mark.slow
def test_hunyuan_offloaded_layer_caches_match_device_caches():
    config = hv.HunyuanVideoConfig(num_layers=1, num_single_layers=1, num_refiner_layers=1, num_attention_heads=2,
                                   attention_head_dim=10, text_embed_dim=16, pooled_projection_dim=8, in_channels=4,
                                   out_channels=4, rope_axes_dim=(2, 4, 4))
    params = hv.init_params(config, jax.random.key(2), dtype=jnp.float32)
    chipmunk = chipmunk_config.hunyuan_video().replace(attention__first_n_dense_layers=1)
    latent, text_len = (1, 4, 4, 12, 16), 7
    grid = hv.token_grid(config, latent)
    cache = hv.init_cache(config, chipmunk, batch=1, grid=grid, text_length=text_len, key=jax.random.key(3),
                          dtype=jnp.float32)
    offloaded = offload_layer_caches(cache)
    assert offloaded.attention[0] is None and _kinds(offloaded.attention[1]) == {HOST}
    assert _kinds(offloaded.static_mask_bits) != {HOST}  # shared masks stay on the device
    rng = np.random.default_rng(4)
    step_fn = jax.jit(lambda c, x, s: hv.forward(
        params, config, hidden_states=x, timestep=jnp.asarray([900.0]), encoder_hidden_states=jnp.ones((1, 9, 16)),
        encoder_attention_mask=jnp.asarray([[1.0] * text_len + [0.0] * 2]), pooled_projections=jnp.ones((1, 8)),
        guidance=jnp.asarray([6000.0]), chipmunk=chipmunk, cache=c, plan=step_plan(chipmunk, s),
        key=jax.random.key(0), text_length=text_len, dtype=jnp.float32))
    for s in range(3):  # dense, colsum, sparse
        x = jnp.asarray(rng.standard_normal(latent), jnp.float32)
        dev = step_fn(cache, x, jnp.int32(s))
        host = step_fn(offloaded, x, jnp.int32(s))
        cache, offloaded = dev.cache, host.cache
        chex.assert_trees_all_equal(host.sample, dev.sample)
        assert _kinds(offloaded.attention[1]) == {HOST}


def test_offload_layer_caches_rejects_other_trees():
    with pytest.raises(TypeError, match="model cache"):
        offload_layer_caches([jnp.zeros(3)])


def test_with_device_params_copies_host_params_in_for_the_call():
    """Host-resident params (a Wan 2.2 expert waiting in host memory) reach ``fn`` on the device and stay on the
    host; device params go through as they are."""
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    host = memory.to_host(params)
    seen = []

    @jax.jit
    def fn_jit(p, x):
        return x @ p["w"].T + p["b"][:2]

    def fn(p):
        seen.append(_kinds(p))
        return fn_jit(p, jnp.ones((4, 3)))

    out = memory.with_device_params(fn, host)
    assert seen[-1] == {"device"} and _kinds(host) == {HOST}
    np.testing.assert_array_equal(np.asarray(out), np.asarray(fn_jit(params, jnp.ones((4, 3)))))
    memory.with_device_params(lambda p: seen.append(p), params)
    assert seen[-1] is params


@pytest.mark.slow
def test_one_jit_sampler_carries_host_caches():
    """The sampler's fori_loop carries host-resident layer caches (FLUX tiny, the FLUX preset, step caching):
    same final latents as device caches, and the returned caches are still on the host."""
    from chipmunk_jax import sampling
    from chipmunk_jax.cache import StepCache
    from chipmunk_jax.models import flux

    config, params, noise, cond, chipmunk, sigmas = _tiny_flux_sampling(11, 6, step_cache__skip_step_schedule=(4,))
    run = sampling.make_sampler(flux.denoiser(config, chipmunk, grid=(16, 16), dtype=jnp.float32), chipmunk, sigmas)
    results = []
    for offload in (False, True):
        cache = flux.init_cache(config, chipmunk, batch=1, grid=(16, 16), num_text_tokens=8, dtype=jnp.float32)
        if offload:
            cache = offload_layer_caches(cache)
        step_cache = StepCache(hidden=jnp.zeros((1, 256, config.inner_dim)), valid=jnp.bool_(False))
        out, cache, _ = run(params, jnp.copy(noise), cond, cache, step_cache, jax.random.key(0))  # donated
        results.append((np.asarray(out), cache))
    np.testing.assert_array_equal(results[1][0], results[0][0])
    assert _kinds(results[1][1].attention[1]) == {HOST} and _kinds(results[1][1].mlp[1]) == {HOST}


@pytest.mark.gpu
def test_host_cache_on_gpu_pallas_path():
    """On the GPU the host cache really lives in pinned host memory and the Pallas path gives the device
    cache's results (bf16, Hunyuan-like compressed selection, every step kind)."""
    cfg = chipmunk_config.hunyuan_video().replace(attention__first_n_dense_layers=0,
                                                  attention__full_step_schedule=(0, 1, 3))
    b, n, h, d = 1, 4_000, 4, 128
    keys = jax.random.split(jax.random.key(5), 3)
    device_cache = init_attention_cache(cfg, batch=b, seq_len=n, heads=h, head_dim=d)
    host_cache = memory.to_host(device_cache)
    step = jax.jit(lambda q, k, v, c, s: sparse_delta_attention(q, k, v, c, attention_step_kind(cfg, s, 0), cfg,
                                                                 key=jax.random.key(1)))
    for s in range(5):
        q, k, v = (jax.random.normal(jax.random.fold_in(kk, s), (b, n, h, d), jnp.bfloat16) for kk in keys)
        o_dev, device_cache = step(q, k, v, device_cache, jnp.int32(s))
        o_host, host_cache = step(q, k, v, host_cache, jnp.int32(s))
        np.testing.assert_array_equal(np.asarray(o_host, np.float32), np.asarray(o_dev, np.float32))
        assert _kinds(host_cache) == {HOST}


@pytest.mark.slow
def test_cfg_branch_caches_split_and_offloaded_match_stacked():
    """CFG with one cache per branch: stacked (leading axis), split (BranchCaches) and split + offloaded to the
    host give the same latents; the split caches stay separate pytrees on the host."""
    from chipmunk_jax import sampling
    from chipmunk_jax.cache import BranchCaches, StepCache, select_branch, split_branches, stack_branches, update_branch
    from chipmunk_jax.models import flux

    config, params, noise, cond, chipmunk, sigmas = _tiny_flux_sampling(12, 5, step_cache__enabled=False)
    uncond = dict(cond, encoder_hidden_states=jnp.zeros_like(cond["encoder_hidden_states"]))
    run = sampling.make_sampler(flux.denoiser(config, chipmunk, grid=(16, 16), dtype=jnp.float32), chipmunk,
                                sigmas, guidance_scale=2.0)
    outs = {}
    for layout in ("stacked", "split", "offloaded"):
        cache = flux.init_cache(config, chipmunk, batch=1, grid=(16, 16), num_text_tokens=8, dtype=jnp.float32)
        cache = stack_branches(cache, 2) if layout == "stacked" else split_branches(cache, 2)
        if layout == "offloaded":
            cache = offload_layer_caches(cache)
        step_cache = stack_branches(StepCache(hidden=jnp.zeros((1, 256, config.inner_dim)), valid=jnp.bool_(False)), 2)
        out, cache, _ = run(params, jnp.copy(noise), cond, cache, step_cache, jax.random.key(0), uncond)
        outs[layout] = (np.asarray(out), cache)
    np.testing.assert_allclose(outs["split"][0], outs["stacked"][0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(outs["offloaded"][0], outs["split"][0])
    split_cache, offloaded_cache = outs["split"][1], outs["offloaded"][1]
    assert isinstance(offloaded_cache, BranchCaches) and len(offloaded_cache) == 2
    assert _kinds(offloaded_cache[0].attention[1]) == {HOST} and _kinds(offloaded_cache[1].mlp[1]) == {HOST}
    assert not np.array_equal(split_cache[0].attention[1].lse, split_cache[1].attention[1].lse)
    # the split layout's branch helpers take Python ints
    assert select_branch(split_cache, 1) is split_cache[1]
    assert update_branch(split_cache, 0, split_cache[1])[0] is split_cache[1]
    with pytest.raises(ValueError, match="Python int"):
        select_branch(split_cache, jnp.int32(0))
    with pytest.raises(ValueError, match="positive integer"):
        split_branches(split_cache[0], 0)


@pytest.mark.slow
def test_wan_branch_caches_offloaded():
    """wan.init_branch_caches(offload=True): per-branch caches, layer caches on the host, the shared static
    mask on the device; a CFG branch's forward equals the stacked layout's."""
    from chipmunk_jax.cache import BranchCaches, select_branch
    from chipmunk_jax.models import wan

    config = wan.WanConfig(num_attention_heads=2, attention_head_dim=24, text_dim=64, ffn_dim=96, num_layers=2)
    chipmunk = chipmunk_config.wan().replace(attention__first_n_dense_layers=1)
    latent = (4, 12, 16)  # 4 x 6 x 8 tokens = one voxel group
    grid = wan.token_grid(config, (1, config.in_channels) + latent)
    params = wan.init_params(config, jax.random.key(3), dtype=jnp.float32)
    stacked = wan.init_branch_caches(config, chipmunk, batch=1, grid=grid, key=jax.random.key(4), dtype=jnp.float32,
                                     stacked=True)
    split = wan.init_branch_caches(config, chipmunk, batch=1, grid=grid, key=jax.random.key(4), dtype=jnp.float32,
                                   offload=True)
    assert isinstance(split, BranchCaches) and len(split) == 2
    assert _kinds(split[1].attention[0]) == {HOST} and HOST not in _kinds(split[1].static_mask_bits)
    keys = jax.random.split(jax.random.key(5), 2)
    inputs = dict(hidden_states=jax.random.normal(keys[0], (1, config.in_channels, *latent)),
                  timestep=jnp.asarray([900.0]), encoder_hidden_states=jax.random.normal(keys[1], (1, 16, 64)))
    call = jax.jit(lambda c: wan.forward(params, config, **inputs, chipmunk=chipmunk, cache=c,
                                         plan=step_plan(chipmunk, 0), key=jax.random.key(0), dtype=jnp.float32))
    out_stacked = call(select_branch(stacked, 1))
    out_split = call(select_branch(split, 1))
    chex.assert_trees_all_equal(out_split.sample, out_stacked.sample)
    assert _kinds(out_split.cache.attention[0]) == {HOST}
