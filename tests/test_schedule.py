import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax import config as C
from chipmunk_jax.schedule import (
    AttentionStep as A,
    MLPStep as M,
    ModelStep,
    attention_schedule,
    attention_step_kind,
    mlp_schedule,
    mlp_step_kind,
    model_schedule,
)


def _steps(table, kind):
    return [s for s, k in enumerate(table) if k == kind]


def test_flux_attention_schedule():
    table = attention_schedule(C.flux())
    assert table[0] == A.DENSE and table[1] == A.DENSE_COLSUM
    # recompute_mask=False: later full steps reuse the step-1 column sets
    assert _steps(table, A.DENSE_REFRESH) == [10, 20, 30, 40]
    assert _steps(table, A.DENSE_COLSUM) == [1]
    assert len(_steps(table, A.SPARSE)) == 44


def test_flux_mlp_schedule_follows_block_mask_cache():
    table = mlp_schedule(C.flux())
    assert _steps(table, M.DENSE) == [0, 10, 20, 30, 40]
    assert _steps(table, M.SPARSE_SELECT)[:9] == list(range(1, 10))
    # from step 10 on, only even sparse steps re-select
    assert [s for s in _steps(table, M.SPARSE_REUSE)] == [s for s in range(11, 50, 2)]
    assert all(s % 2 == 0 for s in _steps(table, M.SPARSE_SELECT) if s >= 10)


def test_explicit_mlp_full_step_schedule():
    """mlp.full_step_schedule replaces the full_step_every rule (as attention's does); a YAML round trip keeps it."""
    explicit = C.flux().replace(num_steps=20, mlp__full_step_schedule=(0, 7, 10))
    table = mlp_schedule(explicit)
    assert _steps(table, M.DENSE) == [0, 7, 10]
    implied = mlp_schedule(C.flux().replace(num_steps=20, mlp__full_step_schedule=(0, 10)))
    assert (implied == mlp_schedule(C.flux().replace(num_steps=20))).all()  # the schedule full_step_every implies
    # after full step 10 only even sparse steps re-select, as with the rule
    assert _steps(table, M.SPARSE_REUSE) == [11, 13, 15, 17, 19]
    assert (mlp_step_kind(explicit, jnp.int32(7), 5) == M.DENSE) and mlp_step_kind(explicit, 7, 5) == M.DENSE
    assert C.ChipmunkConfig.from_dict(explicit.to_dict()) == explicit


def test_hunyuan_schedule_with_step_caching():
    cfg = C.hunyuan_video()
    attn = attention_schedule(cfg)
    assert _steps(attn, A.DENSE) == [0]
    assert _steps(attn, A.DENSE_COLSUM) == [1, 10, 40]
    skip = model_schedule(cfg)
    computed = [s for s in range(50) if skip[s] == ModelStep.COMPUTE]
    sparse_computed = [s for s in computed if attn[s] == A.SPARSE]
    expected = [2, 3, 4, 5, 6, 8, 9, 12, 16, 20, 24, 28, 30, 32, 36, 44, 45, 46, 47, 48, 49]
    assert sparse_computed == expected  # docs/algorithm.md §4.3: 21 sparse + 4 full computed steps
    assert len(computed) - len(sparse_computed) == 4
    assert (mlp_schedule(cfg) == M.ALWAYS_DENSE).all()


def test_wan_schedule_with_step_caching():
    cfg = C.wan()
    attn = attention_schedule(cfg)
    assert _steps(attn, A.DENSE_COLSUM) == [1, 10, 20, 30, 40]
    computed = [s for s in range(50) if model_schedule(cfg)[s] == ModelStep.COMPUTE]
    assert len([s for s in computed if attn[s] == A.SPARSE]) == 19
    assert len([s for s in computed if attn[s] != A.SPARSE]) == 6


def test_first_n_dense_layers_by_layer_index():
    cfg = C.flux()
    assert attention_step_kind(cfg, 5, 0) == A.ALWAYS_DENSE
    assert attention_step_kind(cfg, 5, 1) == A.ALWAYS_DENSE
    assert attention_step_kind(cfg, 5, 2) == A.SPARSE
    assert mlp_step_kind(cfg, 5, 1) == M.ALWAYS_DENSE
    assert mlp_step_kind(cfg, 5, 2) == M.SPARSE_SELECT


def test_disabled_sections_are_always_dense():
    cfg = C.flux().replace(attention__enabled=False, mlp__enabled=False)
    assert (attention_schedule(cfg) == A.ALWAYS_DENSE).all()
    assert (mlp_schedule(cfg) == M.ALWAYS_DENSE).all()
    assert (model_schedule(C.flux()) == ModelStep.COMPUTE).all()


@pytest.mark.parametrize("preset", sorted(C.PRESETS))
def test_traced_step_matches_python_step(preset):
    cfg = C.PRESETS[preset]()
    attn = jax.jit(lambda s, l: attention_step_kind(cfg, s, l))
    mlp = jax.jit(lambda s, l: mlp_step_kind(cfg, s, l))
    for step in range(cfg.num_steps):
        for layer in (0, 3):
            assert int(attn(jnp.int32(step), jnp.int32(layer))) == attention_step_kind(cfg, step, layer)
            assert int(mlp(jnp.int32(step), jnp.int32(layer))) == mlp_step_kind(cfg, step, layer)


def test_out_of_range_step_raises():
    with pytest.raises(ValueError, match="step must be in"):
        attention_step_kind(C.flux(), 50, 3)
    with pytest.raises(ValueError, match="layer must be"):
        mlp_step_kind(C.flux(), 3, -1)
    assert isinstance(attention_schedule(C.flux()), np.ndarray)
