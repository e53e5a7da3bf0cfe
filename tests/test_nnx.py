"""The Flax NNX modules (``chipmunk_jax.nnx``) at the three models' tiny contract configs
(tests/test_model_contract.py), float32 on the CPU: ``nnx.state`` is the functional param tree itself (same paths,
same arrays); a call equals the functional ``forward`` bit for bit, dense and with Chipmunk; ``nnx.split`` /
``nnx.merge`` and an orbax save / restore round-trip; ``from_pretrained`` on diffusers' own saved model (and on
pipeline, single-file and converted layouts) keeps diffusers parity <= 1e-5; the one-jit sampler takes the module's
denoiser with the params as a tree, an ``nnx.State`` or the module; bad input fails with clear messages."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from chipmunk_jax import sampling
from chipmunk_jax.cache import StepCache
from chipmunk_jax.models import wan
from chipmunk_jax.nnx import (FluxTransformer2DModel, HunyuanVideoTransformer3DModel, TransformerModule,
                              WanTransformer3DModel, param_tree)
from chipmunk_jax.outputs import ModelOutput
from chipmunk_jax.ports import flux as flux_port
from chipmunk_jax.ports import hunyuan_video as hunyuan_video_port
from chipmunk_jax.ports import wan as wan_port
from chipmunk_jax.schedule import step_plan

from helpers import assert_raises_with, max_rel_error, randomized_torch_model, torch_forward
from test_model_contract import CASES, _sampler_inputs

MODULES = {"flux": FluxTransformer2DModel, "hunyuan_video": HunyuanVideoTransformer3DModel,
           "wan": WanTransformer3DModel}
PORTS = {"flux": flux_port, "hunyuan_video": hunyuan_video_port, "wan": wan_port}
RTOL = 1e-5


def random_params(case, seed=0):
    """Params with init_params' structure, drawn in numpy (init_params' eager random ops take seconds on CPU):
    small normal values, norm scales around 1."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: case.module.init_params(case.config, jax.random.key(0), dtype=jnp.float32))
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(0.05 * rng.standard_normal(a.shape, np.float32)
                                    + (1.0 if path[-1].key == "scale" else 0.0)), abstract)


def leaves_with_paths(tree):
    """[(path of dict keys, leaf)] of a plain param tree."""
    return [(tuple(k.key for k in path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_same_arrays(tree, reference):
    """Same paths and the very same array objects (no copy)."""
    got, want = leaves_with_paths(tree), leaves_with_paths(reference)
    assert [p for p, _ in got] == [p for p, _ in want]
    assert all(a is b for (_, a), (_, b) in zip(got, want))


def assert_outputs_equal(a: ModelOutput, b: ModelOutput):
    assert isinstance(a, ModelOutput)
    np.testing.assert_array_equal(a.sample, b.sample)
    np.testing.assert_array_equal(a.hidden, b.hidden)
    assert jax.tree.structure(a.cache) == jax.tree.structure(b.cache)
    for x, y in zip(jax.tree.leaves(a.cache), jax.tree.leaves(b.cache)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    return CASES[request.param]()


@pytest.fixture(scope="module")
def params(case):
    return random_params(case)


@pytest.fixture(scope="module")
def module(case, params):
    return MODULES[case.name].from_params(params, case.config)


@pytest.fixture(scope="module")
def call(case):
    """One jitted dense call per model; modules with equal config and dtype share its compiled program."""
    return jax.jit(lambda module, inputs: module(**inputs))


# ---- the state is the functional param tree ---------------------------------------------------------------------


def test_state_is_the_functional_param_tree(case, module, params):
    assert module.config == case.config and module.dtype == jnp.float32  # the params' own dtype
    state = nnx.state(module, nnx.Param)
    flat = list(nnx.to_flat_state(state))
    assert [path for path, _ in nnx.to_flat_state(nnx.state(module))] == [path for path, _ in flat]  # only params
    want = leaves_with_paths(params)
    assert sorted(path for path, _ in flat) == sorted(path for path, _ in want)
    by_path = dict(want)
    assert all(isinstance(v, nnx.Param) and v.get_value() is by_path[path] for path, v in flat)
    assert_same_arrays(module.params_tree(), params)
    assert_same_arrays(nnx.to_pure_dict(state), params)
    assert_same_arrays(param_tree(state), params)
    leaf = params["proj_out"]["kernel"]
    assert module.proj_out["kernel"].get_value().unsafe_buffer_pointer() == leaf.unsafe_buffer_pointer()
    # a module built from another's state shares its arrays, not its variables
    moved = MODULES[case.name].from_params(nnx.state(module), case.config)
    assert_same_arrays(moved.params_tree(), params)
    moved.proj_out["kernel"].set_value(jnp.zeros_like(leaf))
    assert not np.any(moved.params_tree()["proj_out"]["kernel"]) and module.params_tree()["proj_out"]["kernel"] is leaf
    # numpy params (the ports' output) are put on the device once
    on_host = MODULES[case.name].from_params(jax.tree.map(np.asarray, params), case.config)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(on_host.params_tree()))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(on_host.params_tree()), jax.tree.leaves(params)))


def test_constructor_builds_init_params_tree(case):
    cls = MODULES[case.name]
    abstract = nnx.eval_shape(lambda: cls(case.config, rngs=nnx.Rngs(0)))  # traced only: nothing is drawn
    assert isinstance(abstract, cls) and abstract.dtype == jnp.bfloat16  # bfloat16 by default, as init_params
    want = jax.eval_shape(lambda: case.module.init_params(case.config, jax.random.key(0)))
    got = abstract.params_tree()
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(got)] == [(x.shape, x.dtype) for x in jax.tree.leaves(want)]


@pytest.mark.slow
def test_constructor_draws_init_params():
    case = CASES["wan"]()
    module = WanTransformer3DModel(case.config, rngs=nnx.Rngs(3), dtype=jnp.float32)
    want = wan.init_params(case.config, nnx.Rngs(3).params(), dtype=jnp.float32)
    assert jax.tree.structure(module.params_tree()) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(module.params_tree()), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


# ---- calls equal the functional model -----------------------------------------------------------------------------


def test_call_equals_functional_forward_dense(case, module, params, call):
    inputs = case.inputs(0)
    out = call(module, inputs)
    ref = jax.jit(lambda p, x: case.module.forward(p, case.config, **x, dtype=jnp.float32))(params, inputs)
    assert out.cache is None
    assert_outputs_equal(out, ref)


def test_call_equals_functional_forward_chipmunk(case, module, params):
    """Chipmunk's first step (token reorder, dense attention keeping its LSE and output, the MLP caches filled) on a
    cache from the module's ``init_cache``, with the step's static plan (one branch compiled per op). The sampler
    test below runs every step kind (column sums, sparse, skipped) through the module."""
    chipmunk, kw = case.chipmunk, case.forward_kw
    plan, key = step_plan(chipmunk, 0), jax.random.key(1)
    cache = module.init_cache(chipmunk, batch=1, grid=case.grid, key=jax.random.key(1), **case.cache_kw)
    inputs = case.inputs(0)
    out = jax.jit(lambda m, x, c: m(**x, chipmunk=chipmunk, cache=c, plan=plan, key=key, **kw))(module, inputs, cache)
    ref = jax.jit(lambda p, x, c: case.module.forward(p, case.config, **x, chipmunk=chipmunk, cache=c, plan=plan,
                                                      key=key, dtype=jnp.float32, **kw))(params, inputs, cache)
    assert out.cache is not None
    assert_outputs_equal(out, ref)


def test_split_merge_round_trip(case, module, params, call):
    graphdef, state = nnx.split(module)
    merged = nnx.merge(graphdef, state)
    assert type(merged) is type(module) and merged.config == module.config and merged.dtype == module.dtype
    assert_same_arrays(merged.params_tree(), params)
    inputs = case.inputs(1)
    assert_outputs_equal(call(merged, inputs), call(module, inputs))
    # a jitted function of the split state, merged back inside
    by_state = jax.jit(lambda state, x: nnx.merge(graphdef, state)(**x))
    assert_outputs_equal(by_state(state, inputs), call(module, inputs))


def test_orbax_save_restore_round_trip(case, module, call, tmp_path):
    cls = MODULES[case.name]
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "checkpoint", nnx.state(module))
    checkpointer.wait_until_finished()
    abstract = nnx.eval_shape(lambda: cls(case.config, rngs=nnx.Rngs(0), dtype=jnp.float32))
    graphdef, abstract_state = nnx.split(abstract)
    restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "checkpoint", abstract_state))
    assert isinstance(restored, cls) and restored.config == case.config and restored.dtype == jnp.float32
    assert jax.tree.structure(restored.params_tree()) == jax.tree.structure(module.params_tree())
    for a, b in zip(jax.tree.leaves(restored.params_tree()), jax.tree.leaves(module.params_tree())):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    inputs = case.inputs(0)
    assert_outputs_equal(call(restored, inputs), call(module, inputs))


# ---- from_pretrained ----------------------------------------------------------------------------------------------


def test_from_pretrained_keeps_diffusers_parity(case, call, tmp_path):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    cls, port = MODULES[case.name], PORTS[case.name]
    kwargs = {k: v for k, v in case.config.to_diffusers().items() if not k.startswith("_")}
    model = randomized_torch_model(getattr(diffusers, cls.__name__), kwargs, seed=0)
    folder = tmp_path / "pipe" / "transformer"
    model.save_pretrained(folder, safe_serialization=True)
    module = cls.from_pretrained(tmp_path / "pipe", dtype=jnp.float32)  # a pipeline folder: its transformer/
    assert isinstance(module, cls) and module.config == case.config
    inputs = case.inputs(0)
    if "guidance" in inputs:
        # FLUX.1-dev's 3.5 (x1000 inside FLUX): the sinusoid embedding of a large guidance magnifies the one-ulp
        # differences between torch's and XLA's float32 exp (HunyuanVideo at 6000: 1.8e-5 for one seed)
        inputs["guidance"] = np.asarray([3.5 if case.name == "flux" else 3500.0], np.float32)
    out = call(module, inputs)
    assert max_rel_error(out.sample, torch_forward(model, inputs)) <= RTOL
    # the other layouts load the same params: the model folder, its one .safetensors file, a converted folder
    port.save_params(tmp_path / "converted", module.config, module.params_tree())
    for source, config in ((folder, None), (folder / "diffusion_pytorch_model.safetensors", case.config),
                           (tmp_path / "converted", None)):
        again = cls.from_pretrained(source, dtype=jnp.float32, config=config)
        assert again.config == case.config
        assert_outputs_equal(call(again, inputs), out)
    default = cls.from_pretrained(tmp_path / "converted")  # bfloat16 params and compute by default
    assert default.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(default.params_tree())} == {jnp.dtype(jnp.bfloat16)}


def test_from_pretrained_errors(tmp_path):
    case = CASES["wan"]()
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        FluxTransformer2DModel.from_pretrained(tmp_path / "nothing_here")
    wan_port.save_params(tmp_path / "wan", case.config, random_params(case))
    assert_raises_with(lambda: FluxTransformer2DModel.from_pretrained(tmp_path / "wan"),
                       "holds a WanTransformer3DModel, not a FluxTransformer2DModel")
    other = dataclasses.replace(case.config, num_layers=1)
    assert_raises_with(lambda: WanTransformer3DModel.from_pretrained(tmp_path / "wan", config=other),
                       "config= differs")
    (tmp_path / "empty").mkdir()
    assert_raises_with(lambda: WanTransformer3DModel.from_pretrained(tmp_path / "empty"),
                       "WanTransformer3DModel.from_pretrained(", "empty")
    (tmp_path / "mislabelled").mkdir()
    (tmp_path / "mislabelled" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    assert_raises_with(lambda: WanTransformer3DModel.from_pretrained(tmp_path / "mislabelled"),
                       "holds a FluxTransformer2DModel, not a WanTransformer3DModel")


# ---- the sampler -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sampler_with_module_denoiser_equals_functional_sampler(case, module, params):
    """Chipmunk (every column kept) with a skipped step: the module's denoiser in the one-jit sampler gives the
    functional sampler's latents bit for bit, with the params in each form the denoiser takes (one per model, each
    form compiles its own program): the module itself, its ``nnx.split`` state, its plain tree."""
    latents, cond = _sampler_inputs(case)
    chipmunk = case.chipmunk.replace(num_steps=6, step_cache__enabled=True, step_cache__skip_step_schedule=(3,))
    sigmas = sampling.flow_sigmas(6, shift=3.0)
    kw = dict(text_length=7) if case.name == "hunyuan_video" else {}
    functional = sampling.make_sampler(case.module.denoiser(case.config, chipmunk, grid=case.grid, dtype=jnp.float32,
                                                            **kw), chipmunk, sigmas)
    by_module = sampling.make_sampler(module.denoiser(chipmunk, grid=case.grid, **kw), chipmunk, sigmas)
    form = {"flux": lambda: module, "hunyuan_video": lambda: nnx.split(module)[1], "wan": module.params_tree}
    results = []
    for run, given in ((functional, params), (by_module, form[case.name]())):
        cache = module.init_cache(chipmunk, batch=1, grid=case.grid, key=jax.random.key(1), **case.cache_kw)
        step_cache = StepCache(hidden=jnp.zeros((1, case.num_tokens, case.config.inner_dim)), valid=jnp.bool_(False))
        x, _, _ = run(given, jnp.copy(latents), cond, cache, step_cache, jax.random.key(0))
        results.append(np.asarray(x))
    assert np.all(np.isfinite(results[0]))
    np.testing.assert_array_equal(results[1], results[0])


def test_denoiser_takes_the_params_in_every_form(case, module, params):
    """The module's denoiser functions (dense) read the params as the plain tree, an ``nnx.State`` or the module:
    the same arrays reach the functional model, so the tables are the very same values."""
    _, cond = _sampler_inputs(case)
    kw = dict(text_length=7) if case.name == "hunyuan_video" else {}
    den = module.denoiser(grid=case.grid, **kw)
    sigmas = jnp.asarray(sampling.flow_sigmas(2, shift=3.0))
    want = case.module.denoiser(case.config, grid=case.grid, dtype=jnp.float32, **kw).timestep_tables(
        params, sigmas, cond)
    for form in (params, nnx.state(module), module):
        got = den.timestep_tables(form, sigmas, cond)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_bad_input(case, module, params):
    cls = MODULES[case.name]
    other = next(c for name, c in MODULES.items() if name != case.name)
    assert_raises_with(lambda: cls(CASES[next(n for n in CASES if n != case.name)]().config, rngs=nnx.Rngs(0)),
                       f"config must be a {type(case.config).__name__}", error=TypeError)
    assert_raises_with(lambda: other.from_params(params, case.config), "config must be a", error=TypeError)
    assert_raises_with(lambda: cls(case.config), "pass rngs=nnx.Rngs(seed)", error=TypeError)
    assert_raises_with(lambda: cls(case.config, rngs=nnx.Rngs(0), params=params), "pass rngs", error=TypeError)
    assert_raises_with(lambda: cls(case.config, rngs=0), "rngs must be an nnx.Rngs", error=TypeError)
    # params that do not match the config: every missing / unexpected path and wrong shape is named
    stack = "blocks" if case.name == "wan" else "transformer_blocks"
    fewer = dict(params, **{stack: jax.tree.map(lambda x: x[:-1], params[stack])})
    assert_raises_with(lambda: cls.from_params(fewer, case.config), "params do not match", "wrong shapes",
                       f"{stack}.")
    missing = {k: v for k, v in params.items() if k != "proj_out"}
    assert_raises_with(lambda: cls.from_params(missing, case.config), "missing (2)", "proj_out.bias",
                       "proj_out.kernel")
    extra = dict(params, extra={"kernel": jnp.zeros(2)})
    assert_raises_with(lambda: cls.from_params(extra, case.config), "unexpected (1)", "extra.kernel")
    listed = dict(params, **{stack: [params[stack]]})
    assert_raises_with(lambda: cls.from_params(listed, case.config), "is a list", "stack_blocks", error=TypeError)
    not_array = dict(params, proj_out={**params["proj_out"], "bias": 1.0})
    assert_raises_with(lambda: cls.from_params(not_array, case.config), "proj_out.bias", "must be an array",
                       error=TypeError)
    mixed = dict(params, proj_out={**params["proj_out"], "bias": params["proj_out"]["bias"].astype(jnp.bfloat16)})
    assert_raises_with(lambda: cls.from_params(mixed, case.config), "several dtypes", "pass dtype=")
    assert cls.from_params(mixed, case.config, dtype=jnp.float32).dtype == jnp.float32
    assert_raises_with(lambda: param_tree(42), "params must be a param tree", error=TypeError)
    assert_raises_with(lambda: param_tree(module.proj_out["kernel"]), "got Param", error=TypeError)
    assert isinstance(module, TransformerModule)
    # the functional model's own input checks still speak for the call
    with pytest.raises(TypeError, match="unexpected keyword"):
        module(**case.inputs(0), return_dict=False)
