import dataclasses
import math
import warnings

import numpy as np
import pytest

from chipmunk_jax import config as C


def test_presets_match_spec_section_5():
    flux = C.flux()
    assert flux.attention.top_keys == 0.165 and not flux.attention.recompute_mask
    assert not flux.attention.compress_indices and flux.attention.counts_multiple_of == 112
    assert flux.mlp.enabled and flux.mlp.top_keys == 0.3 and flux.mlp.random_keys == 0.05
    assert flux.reorder.kind == "tiles" and not flux.step_cache.enabled
    hy = C.hunyuan_video()
    assert hy.attention.full_step_schedule == (0, 1, 10, 40) and hy.attention.top_keys == 0.05
    assert hy.attention.compress_indices and not hy.mlp.enabled and hy.step_cache.enabled
    assert hy.reorder.kind == "voxels" and hy.reorder.voxel == (4, 6, 8)
    wan = C.wan()
    assert wan.attention.local_voxels == 5 and wan.attention.top_keys == 0.10
    assert wan.invocations_per_step == 2 and wan.step_cache.enabled
    assert len(C.DEFAULT_SKIP_STEP_SCHEDULE) == 25


@pytest.mark.parametrize("preset", sorted(C.PRESETS))
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_load_round_trip(tmp_path, preset, suffix):
    cfg = C.PRESETS[preset]()
    path = tmp_path / f"cfg{suffix}"
    cfg.save(path)
    assert C.ChipmunkConfig.load(path) == cfg
    assert hash(C.ChipmunkConfig.load(path)) == hash(cfg)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_replace_nested():
    cfg = C.flux().replace(attention__top_keys=1.0, mlp__top_keys=1.0, num_steps=10)
    assert cfg.attention.top_keys == 1.0 and cfg.mlp.top_keys == 1.0 and cfg.num_steps == 10
    assert cfg.attention.counts_multiple_of == 112


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: C.ChipmunkConfig(attention=C.AttentionConfig(top_keys=1.5)), "attention.top_keys"),
        (lambda: C.ChipmunkConfig(attention=C.AttentionConfig(random_keys=-0.1)), "attention.random_keys"),
        (lambda: C.ChipmunkConfig(attention=C.AttentionConfig(group_size=100)), "group_size must be a multiple of 64"),
        (lambda: C.ChipmunkConfig(attention=C.AttentionConfig(full_step_schedule=(0, 10, 40))), "must contain steps 0 and 1"),
        (lambda: C.ChipmunkConfig(attention=C.AttentionConfig(full_step_schedule=(1, 0))), "sorted"),
        (lambda: C.ChipmunkConfig(attention=C.AttentionConfig(full_step_every=0)), "full_step_every"),
        (lambda: C.ChipmunkConfig(mlp=C.MLPConfig(top_keys=2.0)), "mlp.top_keys"),
        (lambda: C.ChipmunkConfig(mlp=C.MLPConfig(block_size=96)), "block_size must be a multiple of 64"),
        (lambda: C.ChipmunkConfig(mlp=C.MLPConfig(counts_multiple_of=0)), "counts_multiple_of"),
        (lambda: C.ChipmunkConfig(mlp=C.MLPConfig(full_step_schedule=(1, 10))), "mlp.full_step_schedule must contain "
                                                                               "step 0"),
        (lambda: C.ChipmunkConfig(mlp=C.MLPConfig(full_step_schedule=(0, 10, 10))), "sorted and free of duplicates"),
        (lambda: C.ChipmunkConfig(step_cache=C.StepCacheConfig(skip_step_schedule=(0, 3))), "cannot skip step 0"),
        (lambda: C.ChipmunkConfig(reorder=C.ReorderConfig(kind="spiral")), "reorder.kind"),
        (lambda: C.ChipmunkConfig(reorder=C.ReorderConfig(tile=8, subtile=3)), "multiple of reorder.subtile"),
        (lambda: C.ChipmunkConfig(num_steps=0), "num_steps"),
    ],
)
def test_invalid_values_raise_naming_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_section_type_and_unknown_keys():
    with pytest.raises(TypeError, match="attention must be a AttentionConfig"):
        C.ChipmunkConfig(attention={"top_keys": 0.1})
    with pytest.raises(ValueError, match="unknown config keys"):
        C.ChipmunkConfig.from_dict({"atention": {}})
    with pytest.raises(ValueError, match="unknown keys in config section 'mlp'"):
        C.ChipmunkConfig.from_dict({"mlp": {"topkeys": 0.1}})
    with pytest.raises(ValueError, match="must end in"):
        C.flux().save("/tmp/cfg.txt")


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        C.flux().num_steps = 3


# ---- issue 27: booleans only from booleans; schedules must fit num_steps ------------------------------------------


@pytest.mark.parametrize("text", ['{"mlp": {"enabled": "no"}}', 'mlp:\n  enabled: "no"\n', 'mlp:\n  enabled: 0\n'],
                         ids=["json-string", "yaml-quoted-string", "yaml-int"])
def test_booleans_only_from_booleans(tmp_path, text):
    path = tmp_path / ("cfg.json" if text.startswith("{") else "cfg.yaml")
    path.write_text(text)
    with pytest.raises(TypeError, match="mlp.enabled must be a bool"):
        C.ChipmunkConfig.load(path)
    (tmp_path / "ok.yaml").write_text("mlp:\n  enabled: no\n")  # YAML's unquoted no is the boolean False
    assert C.ChipmunkConfig.load(tmp_path / "ok.yaml").mlp.enabled is False


@pytest.mark.parametrize("make, match", [
    (lambda: C.ChipmunkConfig(num_steps=20, step_cache=C.StepCacheConfig(skip_step_schedule=(3, 19, 20, 25))),
     r"step_cache.skip_step_schedule entry 20 is past the last step: num_steps=20 runs steps 0..19 "
     r"\(entries past it: \[20, 25\]\)"),
    (lambda: C.ChipmunkConfig(num_steps=8, attention=C.AttentionConfig(full_step_schedule=(0, 1, 4, 8))),
     r"attention.full_step_schedule entry 8 is past the last step: num_steps=8"),
    (lambda: C.hunyuan_video().replace(num_steps=30), r"attention.full_step_schedule entry 40 .*num_steps=30"),
    (lambda: C.flux().replace(num_steps=8, mlp__full_step_schedule=(0, 4, 9)),
     r"mlp.full_step_schedule entry 9 is past the last step: num_steps=8"),
    (lambda: C.flux().replace(num_steps=10, step_cache__skip_step_schedule=(3, 12)),
     r"skip_step_schedule entry 12 .*num_steps=10"),
    (lambda: C.ChipmunkConfig.from_dict({"num_steps": 4, "step_cache": {"skip_step_schedule": [2, 7]}}),
     r"skip_step_schedule entry 7"),
], ids=["skip-schedule", "full-step-schedule", "hunyuan-preset-30-steps", "mlp-full-step-schedule", "replace",
        "from-dict"])
def test_schedule_entries_past_num_steps_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_default_skip_schedule_is_clipped_to_num_steps(tmp_path):
    for preset in C.PRESETS.values():  # the presets construct, with the full default schedule at 50 steps
        assert preset().step_cache.skip_step_schedule == C.DEFAULT_SKIP_STEP_SCHEDULE
    short = C.flux().replace(num_steps=8)
    assert short.step_cache.skip_step_schedule == (7,)
    assert C.ChipmunkConfig(num_steps=6).step_cache.skip_step_schedule == ()
    assert C.ChipmunkConfig(num_steps=20, step_cache=C.StepCacheConfig(
        skip_step_schedule=C.DEFAULT_SKIP_STEP_SCHEDULE)).step_cache.skip_step_schedule == (7, 11, 13, 14, 15, 17, 18, 19)
    assert short.replace(num_steps=50) == C.flux()  # widening gives the full default back
    assert short.replace(num_steps=12).step_cache.skip_step_schedule == (7, 11)
    explicit = C.flux().replace(num_steps=30, step_cache__skip_step_schedule=(4, 9))
    assert explicit.replace(num_steps=40).step_cache.skip_step_schedule == (4, 9)  # an explicit schedule stays
    path = tmp_path / "short.yaml"
    short.save(path)
    assert C.ChipmunkConfig.load(path) == short


def _static_window_share(preset, latent_hw):
    """Share of the image keys the preset's static voxel window keeps, at a Wan2.1 81-frame latent size."""
    from chipmunk_jax.selection import static_video_mask

    cfg = C.PRESETS[preset]()
    grid = (21, latent_hw[0] // 2, latent_hw[1] // 2)  # Wan's (1, 2, 2) patches over the VAE latent
    voxel = cfg.reorder.voxel
    attention = dataclasses.replace(cfg.attention, random_keys=0.0)  # the static window alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask, _ = static_video_mask(grid, 0, attention, voxel=voxel)
    groups = math.prod(g // v for g, v in zip(grid, voxel))
    return float(np.asarray(mask)[:groups, :math.prod(grid)].mean())


def test_wan_480p_preset_sizes_its_window_to_the_480p_voxel_grid():
    """The 720p window of 5 voxels is ~1/3 of the keys at 720p (as the original's), 73% at 480p; the 480p preset's
    window of 3 brings 480p back under 1/3."""
    assert 0.30 < _static_window_share("wan", (90, 160)) < 0.40
    assert _static_window_share("wan", (60, 104)) > 0.7
    assert _static_window_share("wan_480p", (60, 104)) < 1 / 3
    assert C.wan_480p().replace(attention__local_voxels=5) == C.wan()
