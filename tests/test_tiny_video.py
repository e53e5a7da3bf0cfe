"""The tiny Wan video model: deterministic moving-shapes dataset, label check, trainer, sampler, GIF demo."""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax.apps import images, training
from chipmunk_jax.apps.tiny_video import TOKEN_GRID, load_shipped, tiny_video_config
from chipmunk_jax.apps.tiny_video import dataset as D
from chipmunk_jax.apps.tiny_video import generate, train
from chipmunk_jax.apps.tiny_video import sampling as video_sampling
from chipmunk_jax.apps.tiny_video.label_check import VideoLabelCheck
from chipmunk_jax.models import wan
from chipmunk_jax.ports.wan import save_params
from chipmunk_jax.selection import static_video_mask

from helpers import check_deterministic_stream, max_rel_error, run_tiny_trainer


# ---- dataset


def test_dataset_is_deterministic_per_seed_and_index():
    a, labels_a = check_deterministic_stream(D.make_batch)
    assert a.shape == (4, D.FRAMES, D.FRAME_SIZE, D.FRAME_SIZE, 3)
    np.testing.assert_array_equal(a[1], D.make_video(3, 11, *labels_a[1]))
    # the shape moves
    assert np.abs(a[:, 0] - a[:, -1]).max() > 0.5


def test_dataset_renders_the_same_with_jax_numpy():
    # the trainer renders scene_batch on the accelerator with jax.numpy: the same videos as numpy's make_batch
    scene = D.scene_batch(5, 20, 4)
    videos, labels = D.make_batch(5, 20, 4)
    np.testing.assert_array_equal(np.stack([scene[k] for k in D.VOCABULARY.kinds], 1), labels)
    rendered = np.asarray(jax.jit(lambda s: D.render(s, jnp))(scene))
    np.testing.assert_allclose(rendered, videos, atol=1e-5)
    latents = D.to_latents(videos)
    assert latents.shape == (4, 3, D.FRAMES, D.FRAME_SIZE, D.FRAME_SIZE)
    np.testing.assert_array_equal(D.from_latents(latents), videos)
    assert wan.token_grid(tiny_video_config(), latents.shape) == TOKEN_GRID


def test_paths_stay_inside_the_frame():
    scene = D.scene_batch(0, 0, 400)
    offset = (D.FRAMES - 1) / 2
    for c, v in (("cy", "vy"), ("cx", "vx")):
        ends = np.stack([scene[c] - offset * scene[v], scene[c] + offset * scene[v]])
        assert (ends - scene["radius"] >= 1.0 - 1e-4).all()
        assert (ends + scene["radius"] <= D.FRAME_SIZE - 1 + 1e-4).all()
    np.testing.assert_allclose(np.hypot(D.direction_vectors()[:, 0], D.direction_vectors()[:, 1]), 1.0)
    np.testing.assert_allclose(D.direction_vectors()[D.DIRECTIONS.index("down")], [1.0, 0.0], atol=1e-12)


def test_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="direction"):
        D.make_video(0, 0, 0, 0, len(D.DIRECTIONS))
    with pytest.raises(ValueError, match="seed"):
        D.make_video(-1, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="batch"):
        D.make_batch(0, 0, 0)
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        D.make_batch(0, 0, 2, [[0, 0, 0]])
    with pytest.raises(ValueError, match="out of range"):
        D.text_embeddings([[0, 0, len(D.DIRECTIONS)]])
    with pytest.raises(ValueError, match="videos"):
        D.to_latents(np.zeros((2, 8, 32, 32)))


def test_text_embeddings_give_each_label_kind_its_tokens():
    text = D.text_embeddings([[0, 1, 2], [0, 1, 3]])
    assert text.shape == (2, D.NUM_TEXT_TOKENS, D.TEXT_DIM) and text.dtype == np.float32
    np.testing.assert_array_equal(text[0, :8], text[1, :8])  # same shape and colour tokens
    assert np.abs(text[0, 8:] - text[1, 8:]).min() > 0  # different direction tokens
    np.testing.assert_array_equal(D.VOCABULARY.parse("ring:blue:up", 2), [[3, 2, 6], [3, 2, 6]])
    with pytest.raises(ValueError, match="shape:colour:direction"):
        D.VOCABULARY.parse("ring:blue", 1)


# ---- label check


def test_label_check_is_exact_on_real_videos():
    check = VideoLabelCheck(bank_size=300)
    videos, labels = D.make_batch(123, 0, 160)  # held out: another seed than the bank's
    acc = check.accuracy(videos, labels)
    assert acc == {"shape": 1.0, "colour": 1.0, "direction": 1.0, "all": 1.0}, acc
    # every direction, chosen labels
    chosen = np.stack([np.arange(8) % 6, np.arange(8), np.arange(8)], 1)
    np.testing.assert_array_equal(check.predict(D.make_batch(5, 0, 8, chosen)[0]), chosen)


def test_label_check_on_a_frozen_shape_and_empty_frames():
    videos, labels = D.make_batch(1, 0, 2)
    still = np.repeat(videos[:, :1], D.FRAMES, axis=1)  # the first frame, held
    blank = np.full_like(videos, -1.0)
    assert (VideoLabelCheck.directions(blank) == 0).all()
    check = VideoLabelCheck(bank_size=100)
    np.testing.assert_array_equal(check.predict(still)[:, 1], labels[:, 1])
    with pytest.raises(ValueError, match="videos"):
        check.predict(videos[:, 0])


# ---- model and Chipmunk settings


def test_tiny_video_config_fits_chipmunk_voxels():
    config = tiny_video_config()
    params = jax.eval_shape(lambda: wan.init_params(config, jax.random.key(0), jnp.float32))
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    assert 2_000_000 <= count <= 5_000_000 and 4 * count <= 20 * 2**20
    chipmunk = video_sampling.tiny_video_chipmunk_config(50)
    voxel = chipmunk.reorder.voxel
    assert chipmunk.reorder.kind == "voxels" and math.prod(voxel) == chipmunk.attention.group_size
    assert all(g % v == 0 for g, v in zip(TOKEN_GRID, voxel))  # whole voxels: no raster tails
    mask, eligible = static_video_mask(TOKEN_GRID, 0, chipmunk.attention, voxel=voxel, key=jax.random.key(0))
    assert mask.shape == (math.prod(TOKEN_GRID) // chipmunk.attention.group_size, math.prod(TOKEN_GRID))
    assert bool(eligible[:-1].all())
    s = video_sampling.video_sparsity(chipmunk, config, 50)
    assert 0.5 < s["attention_sparse_step"] < 0.9 and 0 < s["attention"] <= 1 and s["skipped_steps"] > 0


def test_reference_settings_attend_the_full_presets_share_of_keys():
    """The Wan presets mapped to the tiny grid attend, per sparse step, the share of the keys the full-size preset
    attends at its own resolution (static window + static random keys + top-k); HunyuanVideo's maps as it is."""
    from chipmunk_jax import config as C

    settings = dict(video_sampling.video_reference_settings(50))
    assert set(settings) == {"Wan 720p density", "Wan 480p preset density", "HunyuanVideo preset"}

    def attended(chipmunk, grid=TOKEN_GRID):
        return video_sampling.static_key_share(chipmunk, grid) + chipmunk.attention.top_keys

    for name, preset, grid in (("Wan 720p density", C.wan(), video_sampling.WAN_720P_GRID),
                               ("Wan 480p preset density", C.wan_480p(), video_sampling.WAN_480P_GRID)):
        tiny = video_sampling.tiny_video_chipmunk_config(50, **settings[name])
        assert abs(attended(tiny) - attended(preset, grid)) < 2e-3, name
    assert attended(C.wan(), video_sampling.WAN_720P_GRID) > attended(C.wan_480p(), video_sampling.WAN_480P_GRID)
    hunyuan = video_sampling.tiny_video_chipmunk_config(50, **settings["HunyuanVideo preset"])
    assert hunyuan.attention.top_keys == C.hunyuan_video().attention.top_keys
    assert hunyuan.attention.full_step_schedule == C.hunyuan_video().attention.full_step_schedule
    short = dict(video_sampling.video_reference_settings(10))["HunyuanVideo preset"]
    assert short["attention__full_step_schedule"] == (0, 1, 2, 8)  # scaled to the steps, still a valid schedule
    video_sampling.tiny_video_chipmunk_config(10, **short)
    with pytest.raises(ValueError, match="num_steps"):
        video_sampling.video_reference_settings(0)


def _random_weights(config, seed=0):
    return wan.init_params(config, jax.random.key(seed), jnp.float32)


@pytest.mark.slow
def test_sampler_dense_equals_chipmunk_with_every_column_kept():
    config = tiny_video_config()
    params = _random_weights(config)
    labels = np.array([[0, 1, 2]], np.int32)
    noise = np.asarray(jax.random.normal(jax.random.key(3), (1, 3, D.FRAMES, D.FRAME_SIZE, D.FRAME_SIZE)))
    text = D.text_embeddings(labels)
    steps = 5
    dense, _ = video_sampling.sample_videos(params, config, text, noise, num_steps=steps)
    # compressed selection keeps a group's top-k only while static + top-k stays below N (eligibility), so "every
    # key" is top-k = N (0.995 x 1,024 rounds up to 1,024 in steps of 16) over an empty static mask; the voxel order,
    # the sparse steps (2 and 4: full steps every 3) and the dense first layer stay
    every = video_sampling.tiny_video_chipmunk_config(
        steps, attention__top_keys=0.995, attention__local_voxels=0, attention__random_keys=0.0,
        attention__full_step_every=3, step_cache__enabled=False)
    sparse, _ = video_sampling.sample_videos(params, config, text, noise, num_steps=steps, chipmunk=every)
    chex.assert_shape([dense, sparse], [noise.shape] * 2)
    assert max_rel_error(sparse, dense) <= 1e-5
    # the tiny preset (really sparse, with a skipped step): close to dense, not equal
    preset = video_sampling.tiny_video_chipmunk_config(steps, step_cache__skip_step_schedule=(3,))
    approx, _ = video_sampling.sample_videos(params, config, text, noise, num_steps=steps, chipmunk=preset)
    assert 1e-5 < max_rel_error(approx, dense) < 0.5


# ---- training


def _micro_config():
    return dataclasses.replace(tiny_video_config(), num_attention_heads=1, ffn_dim=64, num_layers=1, freq_dim=32)


@pytest.mark.slow
def test_train_step_runs_and_lowers_the_loss_at_a_micro_size():
    task = train.tiny_video_task(_micro_config())
    params = task.init_params(jax.random.key(0))
    optimizer = training.make_optimizer(0.0)
    step = training.make_train_step(task, optimizer, dtype=jnp.float32)
    batch = jax.tree.map(jnp.asarray, task.host_batch(0, 0, 2))
    state, ema = optimizer.init(params), params
    key = jax.random.key(1)  # the same noise and t every step: the loss of one fixed problem
    losses = []
    for _ in range(6):
        params, ema, state, loss = step(params, ema, state, batch, key, jnp.float32(3e-3), jnp.float32(0.5))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.9 * losses[0], losses
    # adaLN-zero: the untrained model predicts 0, so the first loss is E[(noise - x0)^2] ~ 1 + E[x0^2]
    assert 1.0 < losses[0] < 2.0


@pytest.mark.slow
def test_train_runs_and_saves_a_loadable_model(tmp_path):
    config, log = run_tiny_trainer(train.main, load_shipped, tmp_path, steps=2, batch=1)
    assert config == tiny_video_config()
    assert log["videos_seen"] == 2 and log["videos_per_step"] == 1


def test_load_shipped_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny_video.train"):
        load_shipped(tmp_path)


# ---- demo


def test_strip_and_video_metrics():
    videos, _ = D.make_batch(0, 0, 2)
    frames = generate.strip_frames(videos, videos, scale=1)
    assert frames.shape == (D.FRAMES, 2 * (D.FRAME_SIZE + 4), 3 * (D.FRAME_SIZE + 4), 3) and frames.dtype == np.uint8
    assert generate.video_psnr(videos, videos) > 100 and generate.video_ssim(videos, videos) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="frame count"):
        images.video_grid([videos, videos[:, :2]])


def test_cli_arguments_are_validated():
    with pytest.raises(SystemExit):
        generate._parse(["--videos", "0"])
    with pytest.raises(SystemExit):
        generate._parse(["--labels", "circle:red"])
    with pytest.raises(SystemExit):
        generate._parse(["--steps", "1"])
    np.testing.assert_array_equal(generate._parse(["--videos", "2", "--labels", "ring:blue:left"]).labels,
                                  [[3, 2, 4], [3, 2, 4]])


@pytest.mark.slow
def test_demo_writes_a_gif(tmp_path, capsys):
    from PIL import Image

    config = tiny_video_config()
    save_params(tmp_path / "weights", config, jax.tree.map(np.asarray, _random_weights(config, seed=2)))
    out = tmp_path / "strip.gif"
    assert generate.main(["--weights", str(tmp_path / "weights"), "--videos", "2", "--steps", "3",
                          "--out", str(out)]) == 0
    with Image.open(out) as gif:
        assert gif.n_frames == D.FRAMES
        assert gif.size == (3 * 3 * (D.FRAME_SIZE + 4), 3 * 2 * (D.FRAME_SIZE + 4))
    printed = capsys.readouterr().out
    assert "PSNR Chipmunk vs dense" in printed and "label check" in printed
