"""``chipmunk-jax generate`` end to end on CPU: a tiny random diffusers FLUX transformer + AutoencoderKL
saved as a pipeline folder -> PNG; converted params without a VAE -> .npy latents; tiny Wan 2.1, Wan 2.2 (T2V-A14B,
TI2V-5B) and HunyuanVideo pipeline folders (tests/pipeline_folders.py) -> MP4 / latents, dense and Chipmunk; bad
arguments.

Every test gets its own XDG_CACHE_HOME (the default --compile-cache and weights-cache folders) and JAX's
persistent-cache settings back afterwards (the CLI runs in this process)."""

from __future__ import annotations

import os
import re
import warnings

import chex
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jax.experimental.compilation_cache import compilation_cache as jax_cache  # noqa: E402

from chipmunk_jax.apps import cli  # noqa: E402
from chipmunk_jax import config as C  # noqa: E402
from chipmunk_jax.ports import flux as flux_ports  # noqa: E402

LATENT_CHANNELS = 4  # packed 2x2 -> the transformer's in_channels = 16
TRANSFORMER = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1,
                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   axes_dims_rope=[4, 4, 8], guidance_embeds=True)
TEXT_LEN = 8
PROMPT = "a cat on the grass"  # words of tests/pipeline_folders.py's tiny tokenizers
_CACHE_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                   "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(autouse=True)
def own_compile_cache(tmp_path, monkeypatch):
    """The default --compile-cache folder in tmp_path, never ~/.cache; JAX's cache settings restored."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    saved = {name: getattr(jax.config, name) for name in _CACHE_SETTINGS}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A pipeline-like folder (transformer/ + vae/), its converted params, prompt embeddings."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(**TRANSFORMER).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    # 4 blocks: VAE factor 8 as FLUX's, so 16 pixels per packed token; FLUX's scaling and shift
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    pipeline = root / "pipeline"
    transformer.save_pretrained(pipeline / "transformer", safe_serialization=True)
    vae.save_pretrained(pipeline / "vae", safe_serialization=True)
    weights = root / "weights"
    flux_ports.save_params(weights, *flux_ports.from_checkpoint(pipeline / "transformer"))
    rng = np.random.default_rng(1)
    embeds = root / "prompt.npz"
    np.savez(embeds, prompt_embeds=rng.standard_normal((1, TEXT_LEN, 32)).astype(np.float32),
             pooled_prompt_embeds=rng.standard_normal((1, 32)).astype(np.float32))
    chipmunk = root / "chipmunk.yaml"
    C.flux().replace(attention__first_n_dense_layers=1, mlp__first_n_dense_layers=1, attention__full_step_every=3,
                     mlp__full_step_every=3, step_cache__skip_step_schedule=(2,)).save(chipmunk)
    return dict(root=root, pipeline=str(pipeline), weights=str(weights), embeds=str(embeds), chipmunk=str(chipmunk))


def _generate(*args):
    return cli.main(["generate", "--no-progress", "--dtype", "float32", *map(str, args)])


def test_pipeline_folder_to_png_with_chipmunk_and_step_caching(files, tmp_path, capsys):
    from PIL import Image

    out = files["root"] / "image.png"
    code = _generate("--diffusers", files["pipeline"], "--prompt-embeds", files["embeds"], "--height", 256,
                     "--width", 256, "--steps", 4, "--chipmunk", files["chipmunk"], "--step-cache", "--out", out)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    image = Image.open(out)
    image.load()
    assert image.format == "PNG" and image.size == (256, 256) and image.mode == "RGB"
    assert np.asarray(image).std() > 0
    # per step kind: step 0 dense, 1 colsum, 2 skipped, 3 a full (refresh) step
    assert "skipped (final layer only)" in captured.out and "attention dense_colsum" in captured.out
    assert "total sampling wall time" in captured.out
    default_cache = tmp_path / "xdg" / "chipmunk-jax" / "xla"  # $XDG_CACHE_HOME/chipmunk-jax/xla
    assert "compiled in" in captured.err and f"(persistent cache: {default_cache}, written)" in captured.err


def test_converted_weights_without_vae_write_latents(files, tmp_path, capsys):
    out_weights, out_diffusers = files["root"] / "w.npy", files["root"] / "d.npy"
    common = ("--prompt-embeds", files["embeds"], "--height", 64, "--width", 48, "--steps", 3, "--dense",
              "--seed", 7, "--guidance", 2.0, "--compile-cache", tmp_path / "xla")
    assert _generate("--weights", files["weights"], *common, "--out", out_weights) == 0
    first = capsys.readouterr()
    assert _generate("--diffusers", files["pipeline"] + "/transformer", *common, "--out", out_diffusers) == 0
    second = capsys.readouterr()
    latents = np.load(out_weights)
    chex.assert_shape(latents, (1, LATENT_CHANNELS, 8, 6))
    chex.assert_tree_all_finite(latents)
    np.testing.assert_allclose(np.load(out_diffusers), latents, rtol=0, atol=1e-6)  # on-the-fly == converted
    assert "dense" in first.out and "dense" in second.out
    # the same sampling loop: the second run loads it from the persistent cache
    assert "compiled in" in first.err and f"(persistent cache: {tmp_path / 'xla'}, written)" in first.err
    assert f"(persistent cache: {tmp_path / 'xla'}, hit)" in second.err, second.err


@pytest.mark.slow
def test_mesh_runs_sequence_parallel_and_matches_one_device(files, tmp_path, capsys):
    """--mesh sequence=2 (fake CPU devices, tests/conftest.py) writes the latents of --mesh none; a mesh the size
    does not split, or a cfg axis for FLUX, is a usage error naming the problem."""
    outs = {m: files["root"] / f"mesh_{m.replace('=', '')}.npy" for m in ("none", "sequence=2")}
    attention_only = tmp_path / "attention.yaml"  # 256 + 8 tokens split in two, not in 128-token MLP blocks
    C.flux().replace(attention__first_n_dense_layers=1, attention__full_step_every=2, mlp__enabled=False).save(
        attention_only)
    common = ("--weights", files["weights"], "--prompt-embeds", files["embeds"], "--height", 256, "--width", 256,
              "--steps", 3, "--chipmunk", attention_only, "--compile-cache", "none")
    for mesh, out in outs.items():
        assert _generate(*common, "--mesh", mesh, "--out", out) == 0
    assert "sequence-parallel over 2 devices" in capsys.readouterr().err
    np.testing.assert_allclose(np.load(outs["sequence=2"]), np.load(outs["none"]), rtol=0, atol=1e-5)
    dense = {m: files["root"] / f"dense_mesh_{m.replace('=', '')}.npy" for m in ("none", "sequence=2")}
    for mesh, out in dense.items():  # the dense sampler on a mesh too (it carries no Chipmunk cache)
        assert _generate(*common[:-4], "--dense", "--compile-cache", "none", "--mesh", mesh, "--out", out) == 0
    np.testing.assert_allclose(np.load(dense["sequence=2"]), np.load(dense["none"]), rtol=0, atol=1e-5)
    assert _generate(*common, "--mesh", "sequence=3", "--out", outs["none"]) == 1
    assert "--mesh sequence=3: FLUX has" in capsys.readouterr().err
    assert _generate(*common, "--mesh", "sequence=2,cfg=2", "--out", outs["none"]) == 1
    assert "use cfg=1" in capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (("--weights", "W", "--mesh", "sequence=two"), "--mesh: expected sequence=P[,cfg=C]"),
    (("--weights", "W", "--mesh", "sequence=0"), "--mesh: sequence must be >= 1"),
    (("--weights", "W", "--diffusers", "D"), "not allowed with argument"),
    (("--weights", "W", "--height", 100), "--height must be a positive multiple of 16"),
    (("--weights", "W", "--steps", 0), "--steps must be >= 1"),
    (("--weights", "W", "--out", "x.jpg"), "--out must end in .png or .npy"),
    (("--weights", "W", "--dense", "--chipmunk", "flux"), "not allowed with argument"),
])
def test_bad_arguments_exit_2(args, needle, capsys):
    base = {"--prompt-embeds": "p.npz", "--out": "x.npy"}
    extra = [str(a) for k, v in base.items() if k not in args for a in (k, v)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", *map(str, args), *extra])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_version_defaults_in_help_and_convert(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help to the terminal: one line per option
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("chipmunk-jax 0.")
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = capsys.readouterr().out
    for default in ("the transformer (default: flux)",
                    "(default: 1024 flux, 720 hunyuan-video, 480 wan, 720 wan2.2-t2v-a14b, 720 wan2.2-i2v-a14b, "
                    "704 wan2.2-ti2v-5b)",
                    "(default: 1024 flux, 1280 hunyuan-video, 832 wan, 1280 wan2.2-t2v-a14b",
                    "(default: 129 hunyuan-video, 81 wan, 81 wan2.2-t2v-a14b, 81 wan2.2-i2v-a14b, 121 wan2.2-ti2v-5b)",
                    "(default: 24 hunyuan-video, 16 wan, 16 wan2.2-t2v-a14b, 16 wan2.2-i2v-a14b, 24 wan2.2-ti2v-5b)",
                    "(default: 3.5 flux, 6.0 hunyuan-video, 5.0 wan, 4.0 wan2.2-t2v-a14b",
                    "(default: 3.0 wan2.2-t2v-a14b, 3.5 wan2.2-i2v-a14b)",
                    "sampling steps (default: 50)", "(default: the model's preset: flux, hunyuan_video, wan)"):
        assert default in text, default
    assert "(default: None)" not in text
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "--help"])
    assert exit_info.value.code == 0 and "--src" in capsys.readouterr().out


def test_a_schedule_past_steps_is_a_usage_error(capsys):
    """The HunyuanVideo preset's full step 40 does not fit 30 steps: a message, not a traceback."""
    code = cli.main(["generate", "--weights", "W", "--prompt-embeds", "p.npz", "--out", "x.npy", "--chipmunk",
                     "hunyuan_video", "--steps", "30"])
    assert code == 1 and "--steps 30" in capsys.readouterr().err


def test_bad_files_exit_1(files, tmp_path, capsys):
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, prompt_embeds=np.zeros((1, TEXT_LEN, 32), np.float32))
    wrong_width = tmp_path / "wrong.npz"
    np.savez(wrong_width, prompt_embeds=np.zeros((1, TEXT_LEN, 31), np.float32),
             pooled_prompt_embeds=np.zeros((1, 32), np.float32))
    npy = str(tmp_path / "x.npy")
    cases = [
        (("--weights", tmp_path / "missing", "--prompt-embeds", files["embeds"], "--out", npy), "no such folder"),
        (("--weights", files["weights"], "--prompt-embeds", tmp_path / "none.npz", "--out", npy), "no such file"),
        (("--weights", files["weights"], "--prompt-embeds", bad_npz, "--out", npy), "lacks ['pooled_prompt_embeds']"),
        (("--weights", files["weights"], "--prompt-embeds", wrong_width, "--out", npy), "must be [1, L, 32]"),
        (("--weights", files["weights"], "--prompt-embeds", files["embeds"], "--chipmunk", "nope", "--out", npy),
         "unknown preset 'nope'"),
        (("--weights", files["weights"], "--prompt-embeds", files["embeds"], "--out", tmp_path / "x.png"),
         "needs a VAE"),
        (("--weights", files["weights"], "--prompt-embeds", files["embeds"], "--out", tmp_path / "no" / "x.npy"),
         "does not exist"),
        (("--weights", files["pipeline"], "--prompt-embeds", files["embeds"], "--out", npy), "--weights"),
        # the FLUX preset needs >= 192 joint tokens (one query group): 4x4 tokens + 8 text are too few
        (("--weights", files["weights"], "--prompt-embeds", files["embeds"], "--height", 64, "--width", 64,
          "--out", npy), "shorter than one query group"),
        (("--weights", files["weights"], "--prompt", "a cat", "--out", npy), "--prompt needs"),
    ]
    for args, needle in cases:
        assert _generate(*args) == 1, args
        err = capsys.readouterr().err
        assert needle in err, (needle, err)


# ----------------------------------------------------------------------------------------------
# Video models: tiny Wan 2.1 / HunyuanVideo pipeline folders -> MP4


@pytest.fixture(scope="module")
def video_files(tmp_path_factory):
    """Tiny Wan and HunyuanVideo pipeline folders and Chipmunk configs that fit their few tokens."""
    folders = pytest.importorskip("pipeline_folders")  # tests/pipeline_folders.py: needs transformers too
    root = tmp_path_factory.mktemp("cli_video")
    for name in ("wan", "hunyuan", "a14b", "i2v", "ti2v"):
        (root / name).mkdir()
    wan, hunyuan = folders.build_wan_folder(root / "wan"), folders.build_hunyuan_folder(root / "hunyuan")
    a14b, ti2v = folders.build_wan_a14b_folder(root / "a14b"), folders.build_wan_ti2v_folder(root / "ti2v")
    i2v = folders.build_wan_i2v_a14b_folder(root / "i2v")
    image = root / "first_frame.png"
    folders.tiny_image().save(image)
    # 2 x 8 x 12 = 192 Wan tokens at 128x192x5 (one query group); every key kept at the sparse steps
    wan_chipmunk = root / "wan.yaml"
    C.wan().replace(attention__top_keys=0.995, attention__counts_multiple_of=16, attention__local_voxels=0,
                    attention__random_keys=0.0, attention__first_n_dense_layers=1, attention__full_step_every=3,
                    step_cache__skip_step_schedule=(3,)).save(wan_chipmunk)
    hunyuan_chipmunk = root / "hunyuan.yaml"
    C.hunyuan_video().replace(attention__random_keys=1.0, attention__first_n_dense_layers=1,
                              attention__full_step_schedule=(0, 1), step_cache__skip_step_schedule=(3,)).save(
        hunyuan_chipmunk)
    return dict(root=root, wan=wan["path"], hunyuan=hunyuan["path"], a14b=a14b["path"], ti2v=ti2v["path"],
                i2v=i2v["path"], image=str(image), wan_chipmunk=str(wan_chipmunk),
                hunyuan_chipmunk=str(hunyuan_chipmunk))


def _read_video(path):
    """[F, H, W, 3] uint8 frames of a video file, read back through imageio's ffmpeg plugin."""
    import imageio

    with warnings.catch_warnings():  # imageio-ffmpeg starts ffmpeg (fork + exec), which JAX's os.fork warning flags
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        with imageio.get_reader(path, format="FFMPEG") as reader:
            return np.stack(list(reader.iter_data()))


def _check_mp4(path, frames: int, height: int, width: int):
    with open(path, "rb") as f:
        assert f.read(12)[4:8] == b"ftyp"  # an MP4 container
    video = _read_video(path)
    assert video.shape == (frames, height, width, 3) and video.std() > 0


@pytest.mark.slow
def test_wan_dense_cfg_to_mp4_then_latents_from_the_compile_cache(video_files, tmp_path, capsys):
    pytest.importorskip("imageio_ffmpeg")
    out = tmp_path / "wan.mp4"
    common = ("--model", "wan", "--diffusers", video_files["wan"], "--prompt", PROMPT, "--negative-prompt",
              "blue dog", "--height", 32, "--width", 32, "--num-frames", 5, "--steps", 3, "--dense", "--fps", 8)
    assert _generate(*common, "--out", out) == 0
    captured = capsys.readouterr()
    _check_mp4(out, 5, 32, 32)
    # progress: loading, compiling, sampling, decoding, writing; the per-step and the pipeline's timings
    for words in ("loading the Wan 2.1 pipeline from", "Wan 2.1, 5 frames x 32x32, 3 steps, dense, float32, loaded in",
                  "encoding the prompt ...", "compiling the sampling loop ...", "sampling loop compiled in",
                  "(persistent cache: ", "written)", "sampling 3 steps ...", "decoding with the VAE ...",
                  f"writing {out} ...", "written in"):
        assert words in captured.err, words
    for words in ("dense ", "total sampling wall time", "2 transformer calls per step",
                  "pipeline timings: encode_prompt", "compile", "decode", f"wrote {out} (5 frames of 32x32, 8 fps)"):
        assert words in captured.out, words
    assert _generate(*common, "--out", tmp_path / "wan.npy") == 0
    assert "hit)" in capsys.readouterr().err  # the same sampling loop, from the persistent cache
    latents = np.load(tmp_path / "wan.npy")
    chex.assert_shape(latents, (1, 4, 2, 4, 4))  # [1, C, (F-1)/4 + 1, H/8, W/8]
    chex.assert_tree_all_finite(latents)


@pytest.mark.slow
def test_wan_chipmunk_cfg_step_cache_to_mp4(video_files, tmp_path, capsys):
    pytest.importorskip("imageio_ffmpeg")
    out = tmp_path / "wan_chipmunk.mp4"
    code = _generate("--model", "wan", "--diffusers", video_files["wan"], "--prompt", PROMPT, "--height", 128,
                     "--width", 192, "--num-frames", 5, "--steps", 4, "--chipmunk", video_files["wan_chipmunk"],
                     "--step-cache", "--compile-cache", "none", "--out", out)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    _check_mp4(out, 5, 128, 192)
    # step 0 dense, 1 column sums, 2 sparse, 3 skipped (step caching)
    for kind in ("attention dense_colsum", "attention sparse", "skipped (final layer only)"):
        assert kind in captured.out, kind
    assert "+ step caching" in captured.err and "(persistent cache: off)" in captured.err


@pytest.mark.slow
@pytest.mark.parametrize("chipmunk", ["dense", "chipmunk"])
def test_hunyuan_video_to_mp4(video_files, tmp_path, capsys, chipmunk):
    pytest.importorskip("imageio_ffmpeg")
    out = tmp_path / "hunyuan.mp4"
    sparsity = ("--dense",) if chipmunk == "dense" else ("--chipmunk", video_files["hunyuan_chipmunk"],
                                                         "--step-cache")
    code = _generate("--model", "hunyuan-video", "--diffusers", video_files["hunyuan"], "--prompt", PROMPT,
                     "--height", 64, "--width", 96, "--num-frames", 5, "--steps", 4, *sparsity, "--out", out)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    _check_mp4(out, 5, 64, 96)
    assert f"wrote {out} (5 frames of 64x96, 24 fps)" in captured.out  # HunyuanVideo's default fps
    if chipmunk == "chipmunk":
        assert "skipped (final layer only)" in captured.out and "attention sparse" in captured.out


@pytest.mark.slow
def test_wan22_a14b_offloaded_chipmunk_step_cache_to_mp4(video_files, tmp_path, capsys):
    """Two experts (switch at step 2 of 4), the idle one in host memory, Chipmunk + step caching: the switch step
    is a full step in the per-step report, step 3 skipped."""
    pytest.importorskip("imageio_ffmpeg")
    out = tmp_path / "a14b.mp4"
    code = _generate("--model", "wan2.2-t2v-a14b", "--diffusers", video_files["a14b"], "--prompt", PROMPT,
                     "--negative-prompt", "blue dog", "--height", 128, "--width", 192, "--num-frames", 5, "--steps", 4,
                     "--chipmunk", video_files["wan_chipmunk"], "--step-cache", "--offload-idle-expert",
                     "--compile-cache", "none", "--out", out)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    _check_mp4(out, 5, 128, 192)
    assert ("Wan 2.2 T2V-A14B, 5 frames x 128x192, 4 steps, Chipmunk" in captured.err
            and "two experts switched at boundary_ratio 0.875, the idle one in host memory" in captured.err)
    assert captured.err.count("sampling loop compiled in") == 2  # one jit per expert
    # steps 0 dense, 1 column sums, 2 (the switch) column sums again, 3 skipped
    assert re.search(r"^attention dense_colsum \+ mlp always_dense +2 ", captured.out, re.MULTILINE)
    assert "skipped (final layer only)" in captured.out and "attention sparse" not in captured.out
    assert "2 transformer calls per step" in captured.out


@pytest.mark.slow
def test_wan22_ti2v_and_a14b_dense_latents(video_files, tmp_path, capsys):
    common = ("--prompt", PROMPT, "--num-frames", 5, "--steps", 2, "--dense", "--compile-cache", "none")
    assert _generate("--model", "wan2.2-ti2v-5b", "--diffusers", video_files["ti2v"], "--height", 64, "--width", 64,
                     *common, "--out", tmp_path / "ti2v.npy") == 0
    assert "Wan 2.2 TI2V-5B, 5 frames x 64x64, 2 steps, dense" in capsys.readouterr().err
    latents = np.load(tmp_path / "ti2v.npy")
    chex.assert_shape(latents, (1, 8, 2, 4, 4))  # z_dim 8, spatial factor 16
    chex.assert_tree_all_finite(latents)
    assert _generate("--model", "wan2.2-t2v-a14b", "--diffusers", video_files["a14b"], "--height", 32, "--width",
                     32, "--guidance-2", 2.0, *common, "--out", tmp_path / "a14b.npy") == 0
    assert "two experts switched at boundary_ratio 0.875, loaded" in capsys.readouterr().err
    chex.assert_shape(np.load(tmp_path / "a14b.npy"), (1, 4, 2, 4, 4))


@pytest.mark.slow
def test_wan22_image_to_video_latents(video_files, tmp_path, capsys):
    """--image: I2V-A14B (two experts, the image as extra input channels) and TI2V-5B (the image as latent frame
    0), dense, to latents."""
    common = ("--prompt", PROMPT, "--image", video_files["image"], "--num-frames", 5, "--steps", 2, "--dense",
              "--compile-cache", "none")
    assert _generate("--model", "wan2.2-i2v-a14b", "--diffusers", video_files["i2v"], "--height", 32, "--width", 32,
                     *common, "--out", tmp_path / "i2v.npy") == 0
    captured = capsys.readouterr()
    assert (f"Wan 2.2 I2V-A14B, 5 frames x 32x32 from the first frame {video_files['image']} (56x40), 2 steps, dense"
            in captured.err and "two experts switched at boundary_ratio 0.9" in captured.err)
    assert "encode_image" in captured.out
    chex.assert_shape(np.load(tmp_path / "i2v.npy"), (1, 4, 2, 4, 4))  # the latents: no mask / image channels
    assert _generate("--model", "wan2.2-ti2v-5b", "--diffusers", video_files["ti2v"], "--height", 64, "--width", 64,
                     *common, "--out", tmp_path / "ti2v.npy") == 0
    assert "Wan 2.2 TI2V-5B, 5 frames x 64x64 from the first frame" in capsys.readouterr().err
    latents = np.load(tmp_path / "ti2v.npy")
    chex.assert_shape(latents, (1, 8, 2, 4, 4))
    chex.assert_tree_all_finite(latents)


def test_video_folder_and_config_errors_exit_1(video_files, tmp_path, capsys):
    mp4 = str(tmp_path / "x.mp4")
    cases = [
        (("--model", "wan", "--diffusers", video_files["hunyuan"]),
         "holds a diffusers HunyuanVideoPipeline pipeline, not a WanPipeline"),
        (("--model", "wan", "--diffusers", tmp_path / "missing"), "no such pipeline folder"),
        (("--model", "hunyuan-video", "--diffusers", os.path.join(video_files["hunyuan"], "transformer")),
         "not a pipeline folder"),
        (("--model", "wan", "--diffusers", video_files["wan"], "--chipmunk", "nope"), "unknown preset 'nope'"),
        # the HunyuanVideo preset's full step 40 does not fit 30 steps
        (("--model", "hunyuan-video", "--diffusers", video_files["hunyuan"], "--steps", 30), "--steps 30"),
        # a Wan folder of another Wan model: the --model that runs it
        (("--model", "wan", "--diffusers", video_files["a14b"]),
         "is a Wan 2.2 T2V-A14B pipeline folder, not Wan 2.1: run it with --model wan2.2-t2v-a14b"),
        (("--model", "wan2.2-ti2v-5b", "--diffusers", video_files["wan"]),
         "is a Wan 2.1 pipeline folder, not Wan 2.2 TI2V-5B: run it with --model wan"),
        (("--model", "wan2.2-t2v-a14b", "--diffusers", video_files["ti2v"]), "run it with --model wan2.2-ti2v-5b"),
        (("--model", "wan2.2-t2v-a14b", "--diffusers", video_files["hunyuan"]),
         "holds a diffusers HunyuanVideoPipeline pipeline, not a WanPipeline"),
        (("--model", "wan2.2-i2v-a14b", "--diffusers", video_files["a14b"], "--image", video_files["image"]),
         "is a Wan 2.2 T2V-A14B pipeline folder, not Wan 2.2 I2V-A14B: run it with --model wan2.2-t2v-a14b"),
        (("--model", "wan2.2-t2v-a14b", "--diffusers", video_files["i2v"]), "run it with --model wan2.2-i2v-a14b"),
        (("--model", "wan2.2-i2v-a14b", "--diffusers", video_files["i2v"], "--image", tmp_path / "missing.png"),
         f"--image '{tmp_path / 'missing.png'}': "),
        (("--model", "wan2.2-ti2v-5b", "--diffusers", video_files["ti2v"], "--image", video_files["wan_chipmunk"]),
         "cannot identify image file"),
        # TI2V-5B: VAE factor 16 x patch 2
        (("--model", "wan2.2-ti2v-5b", "--diffusers", video_files["ti2v"], "--height", 48, "--width", 64,
          "--num-frames", 5, "--steps", 2), "height must be a multiple of 32"),
    ]
    for args, needle in cases:
        assert _generate(*args, "--prompt", PROMPT, "--out", mp4) == 1, args
        err = capsys.readouterr().err
        assert needle in err, (needle, err)
    assert _generate("--model", "wan", "--diffusers", video_files["wan"], "--prompt", PROMPT,
                     "--out", tmp_path / "no" / "x.mp4") == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (("--model", "flux", "--negative-prompt", "blurry"),
     "--negative-prompt is for --model wan / wan2.2-t2v-a14b / wan2.2-i2v-a14b / wan2.2-ti2v-5b, not --model flux"),
    (("--model", "flux", "--num-frames", 5), "--num-frames is for the video models"),
    (("--model", "flux", "--fps", 8), "--fps is for the video models"),
    (("--model", "flux", "--out", "x.mp4"), "--out must end in .png or .npy (--model flux makes an image)"),
    (("--out", "x.png",), "--out must end in .mp4, .gif, .webp or .npy (--model wan makes a video)"),
    (("--prompt-embeds", "p.npz"), "--prompt-embeds is for --model flux"),
    (("--num-frames", 6), "--num-frames must be 4k + 1"),
    (("--num-frames", 0), "--num-frames must be 4k + 1"),
    (("--fps", 0), "--fps must be > 0"),
    (("--width", 100), "--width must be a positive multiple of 16"),
    (("--model", "hunyuan-video", "--negative-prompt", "blurry"), "--negative-prompt is for --model wan"),
    (("--model", "hunyuan_video", "--negative-prompt", "blurry"), "--negative-prompt is for --model wan"),
    (("--negative-prompt", "blurry", "--guidance", 1.0), "--negative-prompt needs classifier-free guidance"),
    (("--mesh", "sequence=2"), "--mesh sequence=2: sequence parallel runs for --model flux only"),
    (("--weights", "W"), "--model wan needs its diffusers pipeline folder"),
    (("--dense", "--step-cache"), "--step-cache with --dense runs for --model flux only"),
    (("--model", "sdxl"), "invalid choice: 'sdxl'"),
    (("--guidance-2", 3.0), "--guidance-2 is for the two-expert --model wan2.2-t2v-a14b / wan2.2-i2v-a14b, not "
                            "--model wan"),
    (("--model", "wan2.2-ti2v-5b", "--offload-idle-expert"), "--offload-idle-expert is for the two-expert"),
    (("--model", "wan2.2-t2v-a14b", "--image", "x.png"), "--image is for --model wan2.2-i2v-a14b / wan2.2-ti2v-5b "
                                                          "(image-to-video), not --model wan2.2-t2v-a14b"),
    (("--model", "flux", "--image", "x.png"), "--image is for --model wan2.2-i2v-a14b / wan2.2-ti2v-5b"),
    (("--image", "x.png"), "--image is for --model wan2.2-i2v-a14b / wan2.2-ti2v-5b (image-to-video), not --model wan"),
    (("--model", "wan2.2-i2v-a14b",), "--model wan2.2-i2v-a14b needs --image PATH (the first frame of the video)"),
    (("--model", "wan2.2-i2v-a14b", "--image", "x.png", "--offload-idle-expert", "--weights", "W", "--pipeline",
      "P"), "--model wan2.2-i2v-a14b takes its two experts from the pipeline folder"),
    (("--model", "wan2.2-t2v-a14b", "--weights", "W", "--pipeline", "P"),
     "--model wan2.2-t2v-a14b takes its two experts from the pipeline folder: --diffusers PIPELINE_DIR"),
    (("--model", "wan2.2-t2v-a14b", "--guidance", 1.0, "--guidance-2", 3.0),
     "--guidance-2 needs classifier-free guidance: --guidance must be > 1"),
    (("--model", "wan2.2-t2v-a14b", "--guidance-2", -1.0), "--guidance-2 must be >= 0"),
    (("--model", "wan2.2_ti2v_5b", "--negative-prompt", "blurry", "--guidance", 1.0),
     "--negative-prompt needs classifier-free guidance"),
])
def test_bad_video_arguments_exit_2(args, needle, capsys):
    base = {"--model": "wan", "--diffusers": "D", "--prompt": "a cat", "--out": "x.mp4"}
    given = set(args)
    if "--prompt-embeds" in given:
        base.pop("--prompt")
    if "--weights" in given:
        base.pop("--diffusers")
    extra = [str(a) for k, v in base.items() if k not in given for a in (k, v)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", *map(str, args), *extra])
    assert exit_info.value.code == 2
    assert needle in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
@pytest.mark.parametrize("sparsity", ["--dense", "chipmunk"])
def test_flux_prompt_to_png_through_the_pipeline_folder(tmp_path_factory, tmp_path, capsys, sparsity):
    """--prompt encoded by the folder's own CLIP + T5 (tiny, built locally), the JAX sampler, the folder's VAE: a PNG,
    dense and Chipmunk (the preset with every layer past the first sparse, sized to the tiny model's 264 tokens)."""
    from PIL import Image

    folders = pytest.importorskip("pipeline_folders")
    folder = folders.build_flux_folder(tmp_path_factory.mktemp("flux_prompt"))["path"]
    if sparsity == "chipmunk":
        chipmunk = tmp_path / "flux.yaml"
        C.flux().replace(attention__first_n_dense_layers=1, mlp__first_n_dense_layers=1, attention__full_step_every=2,
                         mlp__full_step_every=2).save(chipmunk)
        sparsity_args = ("--chipmunk", chipmunk)
    else:
        sparsity_args = ("--dense",)
    out = tmp_path / "cat.png"
    code = _generate("--model", "flux", "--diffusers", folder, "--prompt", folders.PROMPT, "--height", 256,
                     "--width", 256, "--steps", 3, *sparsity_args, "--compile-cache", "none", "--out", out)
    assert code == 0, capsys.readouterr().err
    image = Image.open(out)
    image.load()
    assert image.size == (256, 256) and np.asarray(image).std() > 0


def test_weights_take_an_orbax_checkpoint_of_an_nnx_state(files, tmp_path, capsys):
    """--weights reads an orbax checkpoint of a chipmunk_jax.nnx module's state as README "Flax NNX modules" saves
    it (the config from --pipeline's transformer/ or a config.json in the checkpoint): the latents of the converted
    folder it came from; a checkpoint without a config that fits, or a folder that is neither form, exits 1 naming
    what --weights takes."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from chipmunk_jax.nnx import FluxTransformer2DModel

    config, params = flux_ports.load_params(files["weights"])
    model = FluxTransformer2DModel.from_params(params, config)
    checkpoint, with_config = tmp_path / "flux_ckpt", tmp_path / "flux_ckpt_config"
    checkpointer = ocp.StandardCheckpointer()
    for folder in (checkpoint, with_config):
        checkpointer.save(folder, nnx.state(model))
        checkpointer.wait_until_finished()
    with open(os.path.join(files["weights"], "config.json")) as f:
        (with_config / "config.json").write_text(f.read())  # the converted folder's (diffusers) config
    common = ("--prompt-embeds", files["embeds"], "--height", 64, "--width", 48, "--steps", 2, "--dense",
              "--compile-cache", "none")
    outs = {name: tmp_path / f"{name}.npy" for name in ("converted", "pipeline", "config")}
    assert _generate("--weights", files["weights"], *common, "--out", outs["converted"]) == 0
    assert _generate("--weights", checkpoint, "--pipeline", files["pipeline"], *common, "--out", outs["pipeline"]) == 0
    assert "config from --pipeline's transformer/config.json" in capsys.readouterr().err
    assert _generate("--weights", with_config, *common, "--out", outs["config"]) == 0
    assert "config from its config.json" in capsys.readouterr().err
    for name in ("pipeline", "config"):
        np.testing.assert_array_equal(np.load(outs[name]), np.load(outs["converted"]))
    assert _generate("--weights", checkpoint, *common, "--out", outs["pipeline"]) == 1
    err = capsys.readouterr().err
    assert "match none of the FLUX configs tried" in err and "FLUX.1-dev: wrong shapes (" in err and "wrong shapes" in err, err
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "notes.txt").write_text("")
    assert _generate("--weights", tmp_path / "neither", *common, "--out", outs["pipeline"]) == 1
    err = capsys.readouterr().err
    assert "is neither a converted params folder" in err and "orbax checkpoint of an NNX module's state" in err
    assert "it holds notes.txt" in err, err
