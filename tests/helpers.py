"""Helpers shared by the test modules: ``from helpers import rel_error`` (tests/ has no __init__.py; pytest's
default ``prepend`` import mode puts tests/ on sys.path).

Error measures (both in float64, both assert that the tested output ``x`` is finite first):
  rel_error(x, y)      relative Frobenius error ||x - y|| / ||y||
  max_rel_error(x, y)  relative max-abs error max|x - y| / max|y|
Random inputs: fresh_key, random_qkv, mlp_problem, random_feature_sets, mlp_weights, drifting_x.
CUDA lowering on CPU: H100, lower_for_h100.
Fast/slow split: slow_beyond.
The tiny models: check_deterministic_stream, run_tiny_trainer.
Model / port tests (torch imported lazily): randomized_torch_model, torch_forward, assert_same_params,
assert_raises_with, max_abs_error.
"""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

HIGHEST = jax.lax.Precision.HIGHEST


# ---- error measures ------------------------------------------------------------------------------------------


def _f64(a):
    """float64 numpy copy of an array (bf16 / f16 / jax arrays included)."""
    return np.asarray(np.asarray(a), np.float64)


def rel_error(x, y):
    """Relative Frobenius error ||x - y|| / ||y|| in float64 (a zero reference counts as 1e-30).

    Asserts that ``x`` (the tested output) is finite: NaN/inf fail with their own message, not as a huge error.
    """
    x, y = _f64(x), _f64(y)
    assert np.all(np.isfinite(x)), "NaN/inf in output"
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def max_rel_error(x, y):
    """Relative max-abs error max|x - y| / max|y| in float64 (a zero reference counts as 1e-30).

    Asserts that ``x`` (the tested output) is finite."""
    x, y = _f64(x), _f64(y)
    assert np.all(np.isfinite(x)), "NaN/inf in output"
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


def max_abs_error(x, y):
    """max|x - y| (float64)."""
    return float(np.max(np.abs(_f64(x) - _f64(y))))


# ---- random inputs -------------------------------------------------------------------------------------------

_SEED = itertools.count()


def fresh_key():
    """A new PRNG key per call, from OS entropy: every run draws different inputs (failures print no seed, so
    tests that use it must check properties that hold for any input)."""
    return jax.random.key(np.random.SeedSequence().entropy % (2**31) + next(_SEED))


def random_qkv(b, n, h, d, dtype=jnp.float32, *, nk=None, key=None):
    """Standard-normal q [b, n, h, d] and k, v [b, nk, h, d] (nk defaults to n), drawn in float32 and cast to
    ``dtype``; ``key`` defaults to fresh_key()."""
    ks = jax.random.split(fresh_key() if key is None else key, 3)
    nk = n if nk is None else nk
    q = jax.random.normal(ks[0], (b, n, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, nk, h, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, nk, h, d), jnp.float32).astype(dtype)
    return q, k, v


MLP_PROBLEM_FIELDS = ("x", "w1", "b1", "w2", "b2", "act", "out")


def mlp_problem(seed, *, b=1, n=200, c=64, f=256, c_out=64, dtype=jnp.float32):
    """A consistent sparse-delta MLP problem: dict x [b, n, c], w1 [c, f], b1 [f], w2 [f, c_out], b2 [c_out],
    act = gelu_tanh(noise) [b, f, n] and out = act W2 + b2 [b, n, c_out], all cast to ``dtype`` (dict order is
    MLP_PROBLEM_FIELDS, so ``x, w1, b1, w2, b2, act, out = mlp_problem(...).values()`` unpacks it)."""
    from chipmunk_jax.pallas_kernels import mlp_reference as ref

    ks = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(ks[0], (b, n, c), jnp.float32)
    w1 = jax.random.normal(ks[1], (c, f), jnp.float32) / np.sqrt(c)
    b1 = 0.5 * jax.random.normal(ks[2], (f,), jnp.float32)
    w2 = jax.random.normal(ks[3], (f, c_out), jnp.float32) / np.sqrt(f)
    b2 = 0.5 * jax.random.normal(ks[4], (c_out,), jnp.float32)
    act = ref.gelu_tanh(jax.random.normal(ks[5], (b, f, n), jnp.float32))
    out = jnp.einsum("bfn,fc->bnc", act, w2, precision=HIGHEST) + b2
    return dict(zip(MLP_PROBLEM_FIELDS, (a.astype(dtype) for a in (x, w1, b1, w2, b2, act, out))))


def random_feature_sets(seed, b, nb, f, counts, k=None):
    """Random distinct features per row block (a permutation prefix of length k, default f): indices [b, nb, k]
    int32 and the given counts [b, nb] int32."""
    k = f if k is None else k
    keys = jax.random.split(jax.random.key(seed), b * nb)
    perms = jnp.stack([jax.random.permutation(kk, f)[:k] for kk in keys]).reshape(b, nb, k)
    return perms.astype(jnp.int32), jnp.asarray(counts, jnp.int32).reshape(b, nb)


def mlp_weights(seed, c_in, f, c_out, *, bias2=True):
    """Small random chipmunk_jax.mlp.MLPWeights (w1 [c_in, f] / 4, w2 [f, c_out] / 16, biases 0.1 N(0, 1))."""
    from chipmunk_jax.mlp import MLPWeights

    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return MLPWeights(
        w1=jax.random.normal(ks[0], (c_in, f)) / 4,
        b1=0.1 * jax.random.normal(ks[1], (f,)),
        w2=jax.random.normal(ks[2], (f, c_out)) / 16,
        b2=0.1 * jax.random.normal(ks[3], (c_out,)) if bias2 else None,
    )


def drifting_x(step, shape, seed=0):
    """A fixed random input (PRNGKey(seed)) plus 0.05 * step of fresh noise: a slowly changing activation."""
    x0 = jax.random.normal(jax.random.PRNGKey(seed), shape)
    return x0 + 0.05 * step * jax.random.normal(jax.random.PRNGKey(1000 + step), x0.shape)


# ---- fast / slow suites ---------------------------------------------------------------------------------------


def slow_beyond(values, keep=1):
    """Values for a one-name ``pytest.mark.parametrize``: the first ``keep`` stay in the fast suite
    (``-m "not slow"``), the others carry ``pytest.mark.slow`` (the ids are unchanged)."""
    return [v if i < keep else pytest.param(v, marks=pytest.mark.slow) for i, v in enumerate(values)]


# ---- CUDA lowering on CPU ------------------------------------------------------------------------------------

H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)


def lower_for_h100(f, *specs, donate=()):
    """HLO text of ``jax.jit(f, donate_argnums=donate)`` traced at ``specs`` and lowered for an H100 (runs on a
    CPU-only machine: reproduces GPU-only Pallas/Triton lowering errors)."""
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=H100)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(f, donate_argnums=donate).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()


# ---- model and checkpoint-port tests -------------------------------------------------------------------------


def randomized_torch_model(model_cls, kwargs, seed, scale=0.1):
    """``model_cls(**kwargs).eval()`` (a diffusers model) with ``scale * randn`` added to every parameter (zero
    biases and unit norm scales included), under torch.manual_seed(seed)."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def torch_forward(model, inputs):
    """``model(**inputs, return_dict=False)[0]`` under no_grad, numpy in and out."""
    import torch

    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=False)[0]
    return out.numpy()


def assert_same_params(a, b, flatten):
    """Two parameter trees hold the same names and bit-identical values (compared in float32); ``flatten``
    maps a tree to {name: array} (e.g. flux_ports.flatten_params)."""
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k], np.float32), np.asarray(fb[k], np.float32), err_msg=k)


def assert_raises_with(fn, *needles, error=ValueError):
    """``fn()`` raises ``error`` whose message contains every needle (plain substrings, not regexes)."""
    with pytest.raises(error) as info:
        fn()
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


# ---- procedural datasets -------------------------------------------------------------------------------------


def check_deterministic_stream(make_batch):
    """A tiny model's ``make_batch(seed, start, batch, labels=None)`` -> (items, labels): item i of a seed is the same
    whatever batch it is drawn in, another seed draws other items for the same labels, values are float32 in
    [-1, 1]. Returns the batch of items 10..13 of seed 3 (items, labels)."""
    a, labels_a = make_batch(3, 10, 4)
    b, labels_b = make_batch(3, 10, 4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(labels_a, labels_b)
    c, _ = make_batch(3, 12, 2)
    np.testing.assert_array_equal(a[2:], c)
    other, _ = make_batch(4, 10, 4, labels_a)
    assert np.abs(other - a).max() > 0.1
    assert a.dtype == np.float32 and a.min() >= -1.0 and a.max() <= 1.0
    return a, labels_a


def run_tiny_trainer(main, load_shipped, folder, *, steps: int, batch: int):
    """Runs a tiny model's trainer ``main`` (``apps.training``'s command line) for ``steps`` steps of ``batch`` items
    into ``folder``, checks that the EMA and raw weights load with one structure and the log counts the steps, and
    returns (the saved config, the train log)."""
    assert main(["--out", str(folder), "--steps", str(steps), "--warmup", "1", "--batch", str(batch),
                 "--log-every", "1"]) == 0
    config, params = load_shipped(folder)
    _, raw = load_shipped(folder / "raw")
    assert jax.tree.structure(params) == jax.tree.structure(raw)
    log = json.loads((folder / "train_log.json").read_text())
    assert log["steps_done"] == steps and np.isfinite(log["final_loss"])
    return config, log
