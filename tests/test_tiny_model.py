"""The tiny FLUX model: deterministic dataset, shipped weights load and sample, quality metrics."""

from __future__ import annotations

import chex
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from chipmunk_jax.apps import images, quality
from chipmunk_jax.apps.tiny import sampling as tiny_sampling
from chipmunk_jax.apps.tiny.label_check import NearestNeighbourCheck
from chipmunk_jax.apps.tiny import IMAGE_GRID, WEIGHTS_DIR, load_shipped, tiny_config
from chipmunk_jax.apps.tiny import dataset as D
from chipmunk_jax.apps.tiny import generate, train
from chipmunk_jax.models import flux

from helpers import check_deterministic_stream, max_rel_error, run_tiny_trainer


# ---- dataset


def test_dataset_is_deterministic_per_seed_and_index():
    a, _ = check_deterministic_stream(D.make_batch)
    assert a.shape == (4, 64, 64, 3)


def test_dataset_renders_the_same_with_jax_numpy():
    # the trainer renders scene_batch on the accelerator with jax.numpy: same images as numpy's make_batch
    scene = D.scene_batch(5, 20, 6)
    images, labels = D.make_batch(5, 20, 6)
    np.testing.assert_array_equal(np.stack([scene["shape"], scene["colour"]], 1), labels)
    rendered = np.asarray(jax.jit(lambda s: D.render(s, jnp))(scene))
    np.testing.assert_allclose(rendered, images, atol=1e-5)
    np.testing.assert_allclose(np.asarray(D.pack(jnp.asarray(images), jnp)), D.pack(images), atol=0)


def test_train_schedule_is_warmup_stable_decay():
    lr = lambda s: train.learning_rate(s, 100, peak=1.0, warmup=10, decay=0.2)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(9) == 1.0 and lr(50) == 1.0 and lr(79) == 1.0
    assert lr(80) == pytest.approx(1.0) and lr(90) == pytest.approx(0.5) and lr(99) == pytest.approx(0.05)


@pytest.mark.slow
def test_train_runs_and_saves_a_loadable_model(tmp_path):
    config, log = run_tiny_trainer(train.main, load_shipped, tmp_path, steps=3, batch=2)
    assert config == tiny_config()
    assert [h["step"] for h in log["history"]] == [2, 3] and log["images_seen"] == 6


def test_dataset_labels_control_shape_and_colour():
    labels = np.array([[0, 0], [1, 2]], np.int32)
    images, out_labels = D.make_batch(0, 0, 2, labels)
    np.testing.assert_array_equal(out_labels, labels)
    check = NearestNeighbourCheck(bank_size=300)
    np.testing.assert_array_equal(check.predict(images), labels)


def test_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        D.make_image(0, 0, len(D.SHAPES), 0)
    with pytest.raises(ValueError, match="seed"):
        D.make_image(-1, 0, 0, 0)
    with pytest.raises(ValueError, match="batch"):
        D.make_batch(0, 0, 0)
    with pytest.raises(ValueError, match="labels"):
        D.make_batch(0, 0, 2, [[0, 0]])
    with pytest.raises(ValueError, match="out of range"):
        D.text_embeddings([[0, len(D.COLOURS)]])


def test_pack_is_flux_patch_order_and_round_trips():
    images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    tokens = D.pack(images)
    assert tokens.shape == (2, 1024, 12)
    # token (row 0, col 1), channel order (c, ph, pw)
    np.testing.assert_array_equal(tokens[0, 1].reshape(3, 2, 2), images[0, 0:2, 2:4].transpose(2, 0, 1))
    np.testing.assert_array_equal(D.unpack(tokens), images)


def test_text_embeddings_are_fixed_and_label_dependent():
    text, pooled = D.text_embeddings([[0, 1], [0, 2]])
    assert text.shape == (2, D.NUM_TEXT_TOKENS, D.TEXT_DIM) and pooled.shape == (2, D.TEXT_DIM)
    np.testing.assert_array_equal(text[:, :4], D.text_embeddings([[0, 1], [0, 2]])[0][:, :4])
    np.testing.assert_array_equal(text[0, :4], text[1, :4])  # same shape tokens
    assert np.abs(text[0, 4:] - text[1, 4:]).max() > 0.1  # different colour tokens


# ---- metrics


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (2, 32, 32, 3))
    assert images.ssim(a, a) == pytest.approx(1.0)
    assert images.psnr(a, a) > 100
    b = np.clip(a + 0.02, -1, 1)  # 0.01 on [0, 1] -> 40 dB where unclipped
    assert 39 < images.psnr(b, a) < 41
    assert images.ssim(rng.uniform(-1, 1, a.shape), a) < 0.1
    with pytest.raises(ValueError, match="shape"):
        images.psnr(a, a[:1])
    with pytest.raises(ValueError, match="at least"):
        images.ssim(a[:, :8, :8], a[:, :8, :8])


def test_change_fractions():
    prev = np.zeros(10)
    cur = np.array([7.0, 2.0, 1.0] + [0.0] * 7)
    assert quality.change_fractions(prev, cur, (0.7, 0.9)) == [0.1, 0.2]
    assert quality.change_fractions(prev, prev) == [0.0, 0.0]
    uniform = np.ones(100)
    assert quality.change_fractions(np.zeros(100), uniform, (0.7,))[0] == pytest.approx(0.7)


def test_average_sparsity_counts_dense_steps_and_layers():
    model = tiny_config()
    dense_everywhere = tiny_sampling.tiny_chipmunk_config(10, attention__enabled=False, mlp__enabled=False)
    assert tiny_sampling.average_sparsity(dense_everywhere, model, 10, 1032)["attention"] == 0.0
    s = tiny_sampling.average_sparsity(tiny_sampling.tiny_chipmunk_config(50), model, 50, 1032)
    assert 0.5 < s["attention_sparse_step"] < 0.9 and 0 < s["attention"] < s["attention_sparse_step"]


def test_png_writer(tmp_path):
    image = np.zeros((3, 5, 3), np.uint8)
    image[1, 2] = (255, 0, 0)
    images.write_png(tmp_path / "x.png", image)
    data = (tmp_path / "x.png").read_bytes()
    assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82")
    with pytest.raises(ValueError):
        images.write_png(tmp_path / "y.png", np.zeros((3, 5), np.uint8))


# ---- shipped model


def _shipped_float32():
    config, params = load_shipped()
    return config, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


@pytest.mark.slow
def test_shipped_weights_load_and_sample_two_steps():
    assert (WEIGHTS_DIR / "params.safetensors").stat().st_size <= 20 * 2**20
    config, params = _shipped_float32()
    assert config == tiny_config()
    labels = np.array([[0, 0], [2, 3]], np.int32)
    text, pooled = D.text_embeddings(labels)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 1024, 12)))
    dense, _ = tiny_sampling.sample_images(params, config, text, pooled, noise, num_steps=2)
    sparse, _ = tiny_sampling.sample_images(params, config, text, pooled, noise, num_steps=2,
                                            chipmunk=tiny_sampling.tiny_chipmunk_config(2))
    chex.assert_shape([dense, sparse], [(2, 1024, 12)] * 2)
    chex.assert_tree_all_finite([dense, sparse])
    # step 0 is dense, step 1 runs the sparse MLP (10% of the features; MLP full steps: step % 10 == 0): close, not
    # equal (the one sparse step is half of this 2-step trajectory)
    assert 25.0 < images.psnr(D.unpack(sparse), D.unpack(dense)) < 100.0
    # the trained model moved the noise towards images: not the noise itself, within the data range
    assert np.abs(dense - noise).mean() > 0.3
    assert np.abs(dense).mean() < 1.5


@pytest.mark.slow
def test_cross_step_change_runs_on_the_shipped_model():
    config, params = _shipped_float32()
    text, pooled = D.text_embeddings(np.array([[1, 2]], np.int32))
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (1, 1024, 12)))
    change = quality.cross_step_change(params, config, text, pooled, noise, num_steps=3)
    for op in ("attention", "mlp"):
        fractions = np.asarray(change[op])
        chex.assert_shape(fractions, (config.num_sparse_layers, 2, 2))
        assert ((fractions > 0) & (fractions <= 1)).all() and (fractions[..., 0] <= fractions[..., 1]).all()


@pytest.mark.slow
def test_recording_forward_is_flux_forward():
    # the recording forward of cross_step_change re-runs FLUX's blocks: its velocity is flux.forward's sample
    # (keeps it in step with the model code)
    config, params = _shipped_float32()
    text, pooled = D.text_embeddings(np.array([[1, 2]], np.int32))
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (1, 1024, 12)))
    img_ids, txt_ids = flux.image_ids(IMAGE_GRID), np.zeros((D.NUM_TEXT_TOKENS, 3), np.float32)
    velocity, probs, hiddens = quality._recording_forward(config, IMAGE_GRID)(
        params, jnp.asarray(noise), 0.8, jnp.asarray(text), jnp.asarray(pooled),
        flux.pos_embed(config, txt_ids, img_ids))
    reference = flux.forward(params, config, hidden_states=noise, timestep=0.8, encoder_hidden_states=text,
                             pooled_projections=pooled, img_ids=img_ids, txt_ids=txt_ids, dtype=jnp.float32)
    assert max_rel_error(velocity, reference.sample) <= 1e-5
    assert len(probs) == len(hiddens) == config.num_sparse_layers


def test_load_shipped_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        load_shipped(tmp_path)


def test_cli_arguments_are_validated():
    with pytest.raises(SystemExit):
        generate._parse(["--images", "0"])
    with pytest.raises(SystemExit):
        generate._parse(["--labels", "blob:red"])
    with pytest.raises(SystemExit):
        train._parse(["--out", "x", "--steps", "10", "--warmup", "20"])
    with pytest.raises(SystemExit):
        train._parse(["--out", "x", "--time-budget", "0"])
    with pytest.raises(SystemExit):
        train._parse(["--out", "x", "--decay", "1.5"])
    with pytest.raises(ValueError, match="shape:colour"):
        generate.parse_labels("circle", 1)
    np.testing.assert_array_equal(generate.parse_labels("ring:blue", 2), [[3, 2], [3, 2]])


def test_tiny_config_is_big_enough_for_chipmunk_blocks():
    config = tiny_config()
    assert IMAGE_GRID[0] * IMAGE_GRID[1] >= 1024  # 192-query groups, 8x8 tiles, 128-token MLP blocks
    assert config.in_channels == 12 and config.output_channels == 12
