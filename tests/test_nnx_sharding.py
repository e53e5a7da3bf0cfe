"""Sharding annotations of the NNX modules (``chipmunk_jax.nnx``) on 8 fake CPU devices (tests/conftest.py): every
``nnx.Param`` of the three transformers is annotated replicated in the axis names of ``parallel.make_mesh`` meshes
(docs/architecture.md §6: params whole on every device), ``model.shard(mesh)`` places the state there without
touching the values, the sequence-parallel sampler runs on the placed state and equals one device (f32, <= 1e-5),
and ``from_orbax`` restores a saved ``nnx.state`` (onto a mesh too)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from chipmunk_jax import config as chipmunk_config
from chipmunk_jax import parallel, sampling
from chipmunk_jax.cache import init_step_cache
from chipmunk_jax.models import flux
from chipmunk_jax.nnx import FluxTransformer2DModel, is_orbax_checkpoint, param_partition

from helpers import assert_raises_with, max_rel_error
from test_nnx import MODULES, assert_same_arrays, random_params
from test_model_contract import CASES

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)")

NO_RANDOM = dict(attention__random_keys=0.0, attention__dynamic_random_keys=0.0, mlp__random_keys=0.0)


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    return CASES[request.param]()


@pytest.fixture(scope="module")
def params(case):
    return random_params(case)


def _flat_specs(model):
    return [(path, spec.get_value()) for path, spec in nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model)))]


def test_every_param_is_annotated_replicated_in_the_mesh_axes(case, params):
    model = MODULES[case.name].from_params(params, case.config)
    flat = list(nnx.to_flat_state(nnx.state(model)))
    specs = dict(_flat_specs(model))
    assert sorted(specs) == sorted(path for path, _ in flat)
    mesh = parallel.make_mesh(sequence=4, cfg=2)
    for path, param in flat:
        assert param.get_metadata()["out_sharding"] == param_partition(param.shape) == (None,) * param.ndim, path
        spec = specs[path]
        assert isinstance(spec, P) and spec == P(*[None] * param.ndim), (path, spec)
        assert NamedSharding(mesh, spec).is_equivalent_to(NamedSharding(mesh, P()), param.ndim)  # = P()
        assert set(spec) <= {None, *mesh.axis_names}
    named = nnx.to_flat_state(model.shardings(mesh))
    assert all(s.get_value().is_fully_replicated and s.get_value().mesh is mesh for _, s in named)
    # the annotation is metadata only: under a mesh context the module still holds the very arrays (no copy)
    with jax.set_mesh(mesh):
        again = MODULES[case.name].from_params(params, case.config)
    assert_same_arrays(again.params_tree(), params)
    assert_same_arrays(model.params_tree(), params)
    # split / merge and nnx.eval_shape keep the annotations
    graphdef, state = nnx.split(model)
    assert _flat_specs(nnx.merge(graphdef, state)) == _flat_specs(model)
    abstract = nnx.eval_shape(lambda: MODULES[case.name](case.config, rngs=nnx.Rngs(0)))
    assert _flat_specs(abstract) == _flat_specs(model)


def test_shard_places_the_state_replicated_on_a_mesh(case, params):
    model = MODULES[case.name].from_params(params, case.config)
    mesh = parallel.make_mesh(sequence=4, devices=jax.devices()[:4])
    assert model.shard(mesh) is model
    tree = model.params_tree()
    assert jax.tree.structure(tree) == jax.tree.structure(params)
    for placed, given in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
        assert placed.sharding.is_equivalent_to(NamedSharding(mesh, P()), placed.ndim)
        assert placed.sharding.device_set == set(mesh.devices.flat)
        assert parallel.per_device_bytes(placed) == placed.nbytes  # whole on every device
        np.testing.assert_array_equal(placed, given)
    assert_same_arrays(nnx.to_pure_dict(nnx.state(model)), tree)  # the state is still the module's param tree
    assert_raises_with(lambda: model.shard(None), "mesh must be a jax.sharding.Mesh", error=TypeError)


@pytest.mark.slow  # 7-13 s each on 2 CPU cores (compiling both samplers)
@pytest.mark.parametrize("kind", ["dense", "chipmunk"])
def test_sharded_sampler_runs_on_the_module_state_placed_on_a_mesh(kind):
    """Tiny FLUX, sequence=4: the module's state placed by ``shard`` (its ``nnx.split`` state) in the
    sequence-parallel sampler equals the one-device functional sampler on the plain tree. ``dense``: 3 steps, 64 + 16
    tokens; ``chipmunk``: static dispatch over dense, column-sum, sparse and skipped steps, 256 + 16 tokens (attention
    sparsity only: MLP blocks need 128 tokens per device)."""
    config = flux.FluxConfig(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
                             num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                             axes_dims_rope=(4, 4, 8), guidance_embeds=True)
    text = 16
    if kind == "dense":
        grid, chipmunk, sampler_config = (8, 8), None, chipmunk_config.flux().replace(num_steps=3)
    else:
        grid = (16, 16)  # 272 tokens, 68 per device
        chipmunk = sampler_config = chipmunk_config.flux().replace(
            attention__first_n_dense_layers=1, attention__full_step_every=3, mlp__enabled=False, num_steps=5,
            step_cache__enabled=True, step_cache__skip_step_schedule=(4,), **NO_RANDOM)
    rng = np.random.default_rng(3)
    params = flux.init_params(config, jax.random.key(0), dtype=jnp.float32)
    cond = flux.sampling_cond(config, encoder_hidden_states=rng.standard_normal((1, text, 32)).astype(np.float32),
                              pooled_projections=rng.standard_normal((1, 32)).astype(np.float32), grid=grid,
                              guidance=3.5)
    latents = jnp.asarray(rng.standard_normal((1, grid[0] * grid[1], 4)), jnp.float32)
    mesh = parallel.make_mesh(sequence=4, devices=jax.devices()[:4])
    model = FluxTransformer2DModel.from_params(jax.tree.map(jnp.copy, params), config).shard(mesh)
    sigmas = sampling.flow_sigmas(sampler_config.num_steps, shift=3.0)
    results = []
    for m, given in ((None, params), (mesh, nnx.split(model)[1])):
        den = (flux.denoiser(config, chipmunk, grid=grid, dtype=jnp.float32) if m is None
               else model.denoiser(chipmunk, grid=grid, mesh=m))
        run = sampling.make_sampler(den, sampler_config, sigmas, static_step_dispatch=chipmunk is not None)
        cache = None if chipmunk is None else flux.init_cache(config, chipmunk, batch=1, grid=grid,
                                                              num_text_tokens=text, dtype=jnp.float32)
        step_cache = init_step_cache(batch=1, seq_len=grid[0] * grid[1], width=config.inner_dim, dtype=jnp.float32)
        if m is not None and cache is not None:
            cache = jax.device_put(cache, parallel.cache_shardings(cache, m))
        results.append(run(given, jnp.copy(latents), cond, cache, step_cache, jax.random.key(7)))
    one, many = results
    assert np.all(np.isfinite(np.asarray(one[0])))
    assert max_rel_error(many[0], one[0]) <= 1e-5, max_rel_error(many[0], one[0])
    assert many[0].sharding.device_set == set(mesh.devices.flat)


def test_from_orbax_restores_a_saved_state(tmp_path):
    case = CASES["flux"]()
    params = random_params(case)
    model = FluxTransformer2DModel.from_params(params, case.config)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", nnx.state(model))  # as README "Flax NNX modules" saves it
    checkpointer.save(tmp_path / "tree", model.params_tree())  # a plain param tree reads the same
    checkpointer.wait_until_finished()
    assert is_orbax_checkpoint(tmp_path / "state") and not is_orbax_checkpoint(tmp_path)
    for name in ("state", "tree"):
        restored = FluxTransformer2DModel.from_orbax(tmp_path / name, case.config)
        assert restored.config == case.config and restored.dtype == jnp.float32
        assert _flat_specs(restored) == _flat_specs(model)
        for a, b in zip(jax.tree.leaves(restored.params_tree()), jax.tree.leaves(params)):
            np.testing.assert_array_equal(a, b)
    mesh = parallel.make_mesh(sequence=2, devices=jax.devices()[:2])
    onto = FluxTransformer2DModel.from_orbax(tmp_path / "state", case.config, dtype=jnp.bfloat16, mesh=mesh)
    assert onto.dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(onto.params_tree()), jax.tree.leaves(params)):
        assert a.dtype == jnp.bfloat16 and a.sharding.is_equivalent_to(NamedSharding(mesh, P()), a.ndim)
        np.testing.assert_array_equal(a, b.astype(jnp.bfloat16))
    # errors name the problem before anything is read
    assert_raises_with(lambda: FluxTransformer2DModel.from_orbax(tmp_path, case.config), "not an orbax checkpoint")
    other = dataclasses.replace(case.config, num_single_layers=case.config.num_single_layers + 1)
    assert_raises_with(lambda: FluxTransformer2DModel.from_orbax(tmp_path / "state", other), "from_orbax(",
                       "params do not match", "wrong shapes", "single_transformer_blocks.")
    assert_raises_with(lambda: FluxTransformer2DModel.from_orbax(tmp_path / "state", CASES["wan"]().config),
                       "config must be a FluxConfig", error=TypeError)
