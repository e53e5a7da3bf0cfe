import chex
import jax
import jax.numpy as jnp
import pytest

from chipmunk_jax import cache as CA
from chipmunk_jax import config as C
from chipmunk_jax.apps import demo


@pytest.mark.slow
def test_demo_runs_and_all_columns_kept_matches_dense(capsys):
    demo.main(["--steps", "3", "--layers", "2", "--tokens", "256", "--width", "32", "--heads", "2",
               "--attn-top-keys", "1", "--mlp-top-keys", "1"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:4].strip().isdigit()]
    assert [r[1] for r in rows] == ["dense", "dense_colsum", "sparse"]
    assert all(float(r[3]) <= 1e-5 for r in rows)


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        demo.main(["--tokens", "100"])
    with pytest.raises(SystemExit):
        demo.main(["--width", "33", "--heads", "2"])


def test_cfg_branches_keep_separate_caches():
    cfg = C.wan()
    one = CA.init_attention_cache(cfg, batch=1, seq_len=192, heads=2, head_dim=8, dtype=jnp.float32)
    both = CA.stack_branches(one, 2)
    chex.assert_shape(both.out_cache, (2, 1, 192, 2, 8))
    changed = CA.select_branch(both, 1).replace(out_cache=jnp.ones((1, 192, 2, 8)))
    both = CA.update_branch(both, 1, changed)
    assert (CA.select_branch(both, 1).out_cache == 1).all()
    assert (CA.select_branch(both, 0).out_cache == 0).all()
    assert CA.cache_bytes(both) == 2 * CA.cache_bytes(one)
    with pytest.raises(ValueError, match="num_branches"):
        CA.stack_branches(one, 0)


def test_step_cache_init():
    sc = CA.init_step_cache(batch=1, seq_len=10, width=4)
    chex.assert_shape(sc.hidden, (1, 10, 4))
    assert not bool(sc.valid)
    with pytest.raises(ValueError, match="width"):
        CA.init_step_cache(batch=1, seq_len=10, width=0)
    assert jax.tree_util.tree_structure(sc).num_leaves == 2
