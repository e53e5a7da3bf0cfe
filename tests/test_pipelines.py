"""``chipmunk_jax.pipelines`` end to end on CPU: tiny diffusers pipeline folders for FLUX, Wan 2.1, Wan 2.2 (T2V-A14B
and I2V-A14B with two experts, TI2V-5B with the Wan2.2 VAE, text- and image-to-video) and HunyuanVideo (built by
tests/pipeline_folders.py: tiny random transformers, text encoders, VAEs; tokenizers made from a word list with BPE
merges; nothing downloaded) are run from ``pipe(prompt=...)`` to images / frames, dense and Chipmunk.
The dense runs are checked against diffusers' own pipelines on the same components and the same initial noise
(float32): the final latents agree to <= 1e-5 relative, the decoded pixels to one level in 255. Also: the weights
cache, the scheduler's sigmas against diffusers' schedulers, write_video, and the errors for bad folders and
arguments.

Every test gets its own XDG_CACHE_HOME (the default weights cache); the module fixtures write theirs under a
tmp_path_factory folder."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from chipmunk_jax import config as C  # noqa: E402
from chipmunk_jax import memory, sampling  # noqa: E402
from chipmunk_jax.models import flux as flux_model  # noqa: E402
from chipmunk_jax.pipelines import (  # noqa: E402
    FluxPipeline, HunyuanVideoPipeline, WanA14BPipeline, WanPipeline, write_video)
from chipmunk_jax.pipelines import common  # noqa: E402
from chipmunk_jax.ports import flux as flux_ports  # noqa: E402
from chipmunk_jax.ports import wan as wan_ports  # noqa: E402
from chipmunk_jax.schedule import (  # noqa: E402
    AttentionStep, MLPStep, ModelStep, attention_schedule, mlp_schedule, model_schedule)
from pipeline_folders import (  # noqa: E402
    HUNYUAN_TEMPLATE, PROMPT, build_flux_folder, build_hunyuan_folder, build_wan_a14b_folder, build_wan_folder,
    build_wan_i2v_a14b_folder, build_wan_ti2v_folder, tiny_image)

F32 = jnp.float32


@pytest.fixture(autouse=True)
def own_weights_cache(tmp_path, monkeypatch):
    """The default weights cache folder in tmp_path, never ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


# ----------------------------------------------------------------------------------------------
# Tiny pipeline folders (tests/pipeline_folders.py)


def _folder_fixture(build, name: str):
    """A module-scoped fixture: the tiny pipeline folder ``build`` writes under a fresh ``name`` folder."""
    @pytest.fixture(scope="module")
    def folder(tmp_path_factory):
        return build(tmp_path_factory.mktemp(name))

    return folder


flux_folder = _folder_fixture(build_flux_folder, "flux")
wan_folder = _folder_fixture(build_wan_folder, "wan")
wan_a14b_folder = _folder_fixture(build_wan_a14b_folder, "wan_a14b")
wan_ti2v_folder = _folder_fixture(build_wan_ti2v_folder, "wan_ti2v")
wan_i2v_a14b_folder = _folder_fixture(build_wan_i2v_a14b_folder, "wan_i2v_a14b")
hunyuan_folder = _folder_fixture(build_hunyuan_folder, "hunyuan")


def _load(cls, folder, chipmunk=None, **kw):
    return cls.from_pretrained(folder["path"], chipmunk=chipmunk, dtype=F32, cache_dir=folder["root"] / "weights",
                               **kw)


@pytest.fixture(scope="module")
def flux_dense(flux_folder):
    return _load(FluxPipeline, flux_folder)


@pytest.fixture(scope="module")
def wan_dense(wan_folder):
    return _load(WanPipeline, wan_folder)


@pytest.fixture(scope="module")
def hunyuan_dense(hunyuan_folder):
    return _load(HunyuanVideoPipeline, hunyuan_folder)


def _noise(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.all(np.isfinite(x))
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def _pixels_match(ours_uint8, reference_float):
    """Our uint8 pixels against diffusers' float [0, 1] ones: at most one level apart (rounding)."""
    reference = (np.asarray(reference_float, np.float64) * 255).round()
    assert ours_uint8.dtype == np.uint8 and ours_uint8.shape == reference.shape
    assert np.abs(ours_uint8.astype(np.float64) - reference).max() <= 1
    assert ours_uint8.std() > 0


# ----------------------------------------------------------------------------------------------
# FLUX


FLUX_CALL = dict(height=64, width=64, num_inference_steps=3, max_sequence_length=8, guidance_scale=2.5)


def test_flux_dense_matches_diffusers(flux_folder, flux_dense):
    reference = flux_folder["reference"]
    noise = _noise((1, 16, 16))
    ours = flux_dense(PROMPT, **FLUX_CALL, latents=noise, output_type="np", progress=False)
    with torch.no_grad():
        theirs = reference(PROMPT, **FLUX_CALL, latents=torch.from_numpy(noise), output_type="latent").images
        theirs = reference._unpack_latents(theirs, 64, 64, reference.vae_scale_factor).numpy()
        image = reference(PROMPT, **FLUX_CALL, latents=torch.from_numpy(noise), output_type="np").images[0]
    latent = flux_dense(PROMPT, **FLUX_CALL, latents=noise, output_type="latent", progress=False)
    assert latent.timings["compile"] == 0.0  # the first call's compiled sampler, reused
    assert _rel(latent.images[0], theirs[0]) <= 1e-5
    _pixels_match(ours.images[0], image)
    assert set(ours.timings) == {"encode_prompt", "compile", "sampling", "decode"}


def test_flux_true_cfg_matches_diffusers(flux_folder, flux_dense):
    reference = flux_folder["reference"]
    noise = _noise((1, 16, 16), seed=3)
    call = dict(FLUX_CALL, negative_prompt="blue dog", true_cfg_scale=3.0)
    ours = flux_dense(PROMPT, **call, latents=noise, output_type="latent", progress=False)
    with torch.no_grad():
        theirs = reference(PROMPT, **call, latents=torch.from_numpy(noise), output_type="latent").images
    theirs = reference._unpack_latents(theirs, 64, 64, reference.vae_scale_factor).numpy()
    assert _rel(ours.images[0], theirs[0]) <= 1e-5


def test_flux_chipmunk_pil_images_with_step_caching(flux_folder):
    chipmunk = C.flux().replace(attention__first_n_dense_layers=1, mlp__first_n_dense_layers=1,
                                attention__full_step_every=3, mlp__full_step_every=3, step_cache__enabled=True,
                                step_cache__skip_step_schedule=(2,))
    pipe = _load(FluxPipeline, flux_folder, chipmunk=chipmunk)
    assert pipe.chipmunk is chipmunk
    out = pipe([PROMPT, "a red dog"], height=256, width=256, num_inference_steps=4, max_sequence_length=8,
               seed=5, progress=False)
    assert len(out.images) == 2
    for image in out.images:
        assert image.size == (256, 256) and image.mode == "RGB" and np.asarray(image).std() > 0
    assert np.abs(np.asarray(out.images[0], float) - np.asarray(out.images[1], float)).mean() > 0
    again = pipe(PROMPT, height=256, width=256, num_inference_steps=4, max_sequence_length=8, seed=5,
                 output_type="np", progress=False)
    assert again.timings["compile"] == 0.0
    np.testing.assert_array_equal(again.images[0], np.asarray(out.images[0]))  # same seed, same image


def test_flux_bad_arguments(flux_dense):
    pipe = flux_dense
    cases = [
        (dict(height=72), ValueError, "height must be a multiple of 16"),
        (dict(width=0), ValueError, "width"),
        (dict(negative_prompt="blurry"), ValueError, "negative_prompt needs true_cfg_scale > 1"),
        (dict(true_cfg_scale=4.0), ValueError, "needs a negative_prompt"),
        (dict(guidance_scale=-1.0), ValueError, "guidance_scale"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(output_type="tensor"), ValueError, "output_type must be one of"),
        (dict(max_sequence_length=513), ValueError, "cannot be greater than 512"),
        (dict(latents=np.zeros((1, 5, 16), np.float32)), ValueError, r"latents must have shape \(1, 16, 16\)"),
        (dict(seed=-1), ValueError, "seed"),
    ]
    for kwargs, error, words in cases:
        call = dict(height=64, width=64, num_inference_steps=2, progress=False)
        call.update(kwargs)
        with pytest.raises(error, match=words):
            pipe(PROMPT, **call)
    with pytest.raises(TypeError, match="prompt must be a str"):
        pipe(3, height=64, width=64)
    with pytest.raises(ValueError, match="latents= is for one prompt"):
        pipe([PROMPT, PROMPT], height=64, width=64, latents=np.zeros((1, 16, 16), np.float32))


def test_flux_from_components_in_memory(flux_folder, flux_dense, tmp_path):
    """from_components: from_pretrained's pipeline from parts already in memory (nothing written: no weights cache),
    the params cast to the dtype and laid out for Chipmunk once (params prepared ahead are used as they are, not
    copied: several pipelines can share them), and its argument errors."""
    parts = {k: v for k, v in flux_folder["reference"].components.items() if k != "transformer"}
    components = diffusers.FluxPipeline(**parts, transformer=None)
    config, params = flux_ports.from_checkpoint(os.path.join(flux_folder["path"], "transformer"))  # numpy
    pipe = FluxPipeline.from_components(components, config, params, chipmunk=None, dtype=F32)
    assert pipe.components is components and pipe.torch_device == torch.device("cpu") and pipe.chipmunk is None
    assert pipe.path is None and pipe.weights_from == "in-memory params" and "in-memory params" in repr(pipe)
    noise = _noise((1, 16, 16), seed=7)
    ours = pipe(PROMPT, **FLUX_CALL, latents=noise, output_type="latent", progress=False)
    theirs = flux_dense(PROMPT, **FLUX_CALL, latents=noise, output_type="latent", progress=False)
    np.testing.assert_allclose(ours.images[0], theirs.images[0], rtol=0, atol=1e-6)
    assert set(ours.timings) == {"encode_prompt", "compile", "sampling", "decode"}
    assert not (tmp_path / "xdg").exists()  # the default weights cache folder was never made

    assert FluxPipeline.from_components(components, config, params).chipmunk == C.flux()  # "default": the preset
    chipmunk = C.flux().replace(mlp__first_n_dense_layers=0)  # the tiny 1+1-block model's MLPs sparse
    bf16 = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.bfloat16), params)
    prepared = flux_model.prepare_params(bf16, config, chipmunk)
    first = FluxPipeline.from_components(components, config, prepared, chipmunk=chipmunk)
    second = FluxPipeline.from_components(components, config, prepared, chipmunk=chipmunk.replace(
        step_cache__enabled=True), static_step_dispatch=True)
    kernel_t = prepared["single_transformer_blocks"]["proj_mlp"]["kernel_t"]
    assert first.params["single_transformer_blocks"]["proj_mlp"]["kernel_t"] is kernel_t
    assert second.params["single_transformer_blocks"]["proj_mlp"]["kernel_t"] is kernel_t
    assert second.static_step_dispatch and first.dtype == jnp.bfloat16
    laid_out = FluxPipeline.from_components(components, config, params, chipmunk=chipmunk).params  # plain: prepared
    assert "kernel_t" in laid_out["transformer_blocks"]["ff"]["net"]["0"]["proj"]

    with pytest.raises(TypeError, match="components must be a diffusers FluxPipeline"):
        FluxPipeline.from_components(parts, config, params)
    with pytest.raises(ValueError, match=r"components: the FluxPipeline lacks \['tokenizer_2'\]"):
        FluxPipeline.from_components(diffusers.FluxPipeline(**dict(parts, tokenizer_2=None), transformer=None),
                                     config, params)
    with pytest.raises(ValueError, match="is not a FLUX transformer"):
        FluxPipeline.from_components(components, object(), params)
    with pytest.raises(ValueError, match="unknown preset 'fluxx'"):
        FluxPipeline.from_components(components, config, params, chipmunk="fluxx")
    with pytest.raises(ValueError, match="the VAE has 4 latent channels"):
        FluxPipeline.from_components(components, dataclasses.replace(config, in_channels=32), params,
                                     chipmunk=None)


# ----------------------------------------------------------------------------------------------
# Wan 2.1


WAN_CALL = dict(height=32, width=32, num_frames=5, num_inference_steps=3, max_sequence_length=12,
                guidance_scale=4.0, negative_prompt="blue dog")


def test_wan_dense_cfg_matches_diffusers(wan_folder, wan_dense):
    reference = wan_folder["reference"]
    noise = _noise((1, 4, 2, 4, 4))
    ours = wan_dense(PROMPT, **WAN_CALL, latents=noise, progress=False)
    latent = wan_dense(PROMPT, **WAN_CALL, latents=noise, output_type="latent", progress=False)
    with torch.no_grad():
        theirs = reference(PROMPT, **WAN_CALL, latents=torch.from_numpy(noise), output_type="latent").frames
        video = reference(PROMPT, **WAN_CALL, latents=torch.from_numpy(noise), output_type="np").frames[0]
    assert _rel(latent.frames[0], theirs[0].numpy()) <= 1e-5
    assert ours.frames[0].shape == (5, 32, 32, 3)
    _pixels_match(ours.frames[0], video)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # imageio-ffmpeg starts ffmpeg
def test_wan_chipmunk_cfg_frames_and_video_file(wan_folder, tmp_path):
    # two (4, 6, 8) voxels of tokens: a real voxel order; every key kept at the sparse steps (top-k = N over an
    # empty static mask), so the result stays near the dense one
    chipmunk = C.wan().replace(attention__top_keys=0.995, attention__counts_multiple_of=16,
                               attention__local_voxels=0, attention__random_keys=0.0,
                               attention__first_n_dense_layers=1, attention__full_step_every=3,
                               step_cache__skip_step_schedule=(3,))
    pipe = _load(WanPipeline, wan_folder, chipmunk=chipmunk)
    call = dict(height=96, width=256, num_frames=13, num_inference_steps=4, max_sequence_length=8,
                guidance_scale=4.0, seed=0, progress=False)
    out = pipe(PROMPT, **call)
    video = out.frames[0]
    assert video.shape == (13, 96, 256, 3) and video.dtype == np.uint8 and video.std() > 0
    dense = _load(WanPipeline, wan_folder)(PROMPT, **call, output_type="latent")
    sparse = pipe(PROMPT, **call, output_type="latent")
    assert sparse.timings["compile"] == 0.0
    assert 0 < _rel(sparse.frames[0], dense.frames[0]) < 0.02  # 0.0022 when written
    path = write_video(tmp_path / "video.mp4", video, fps=8)
    assert path == str(tmp_path / "video.mp4") and os.path.getsize(path) > 0


def test_progress_log_and_on_step(wan_dense, caplog):
    """The sampler events on the ``chipmunk_jax.pipelines`` logger and the per-step host callback (the CLI's
    progress lines and per-step times)."""
    steps = []
    wan_dense.on_step = steps.append
    try:
        with caplog.at_level(logging.INFO, logger="chipmunk_jax.pipelines"):
            wan_dense(PROMPT, height=32, width=32, num_frames=5, num_inference_steps=2, output_type="latent",
                      progress=False)
    finally:
        wan_dense.on_step = None
    assert steps == [0, 1]
    records = [r for r in caplog.records if r.name == "chipmunk_jax.pipelines"]
    assert [r.event for r in records] == ["compile", "compiled", "sampling", "sampled"]
    assert records[1].seconds > 0 and records[2].steps == 2


def test_wan_bad_arguments(wan_dense):
    call = dict(height=32, width=32, num_frames=5, num_inference_steps=2, progress=False)
    cases = [
        (dict(num_frames=6), "num_frames must be 4k \\+ 1"),
        (dict(num_frames=0), "num_frames"),
        (dict(height=40), "height must be a multiple of 16"),
        (dict(negative_prompt="blurry", guidance_scale=1.0), "negative_prompt needs classifier-free guidance"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(shift=0.0), "shift"),
        (dict(output_type="pt"), "output_type"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ValueError, match=words):
            wan_dense(PROMPT, **dict(call, **kwargs))
    with pytest.raises(ValueError, match="negative_prompt has 2 entries for 1 prompts"):
        wan_dense(PROMPT, **call, negative_prompt=["x", "y"])


# ----------------------------------------------------------------------------------------------
# Wan 2.2: T2V-A14B (two experts), TI2V-5B (Wan2.2 VAE)


# 4 Euler steps at shift 5: t = 1000, 910 (transformer/) | 717, 24 (transformer_2/)
A14B_CALL = dict(height=32, width=32, num_frames=5, num_inference_steps=4, max_sequence_length=12,
                 guidance_scale=4.0, guidance_scale_2=3.0, negative_prompt="blue dog")


def _a14b_reference(folder, noise, **changes):
    with torch.no_grad():
        return folder["reference"](PROMPT, **dict(A14B_CALL, **changes), latents=torch.from_numpy(noise)).frames[0]


def test_wan_a14b_dense_matches_diffusers(wan_a14b_folder):
    noise = _noise((1, 4, 2, 4, 4), seed=5)
    theirs = _a14b_reference(wan_a14b_folder, noise, output_type="latent").numpy()
    pipe = _load(WanA14BPipeline, wan_a14b_folder)
    assert pipe.boundary_ratio == 0.875 and not pipe.offload_idle_expert and pipe.config == pipe.config_2
    assert "transformer_2" in pipe.weights_from
    ours = pipe(PROMPT, **A14B_CALL, latents=noise, output_type="latent", progress=False)
    assert _rel(ours.frames[0], theirs) <= 1e-5
    # the comparison can fail: the low-noise expert's own guidance scale moves the result
    one_scale = _a14b_reference(wan_a14b_folder, noise, guidance_scale_2=None, output_type="latent").numpy()
    assert _rel(one_scale, theirs) > 1e-3


@pytest.mark.slow
def test_wan_a14b_offloaded_experts_default_scale_and_frames(wan_a14b_folder):
    noise = _noise((1, 4, 2, 4, 4), seed=5)
    theirs = _a14b_reference(wan_a14b_folder, noise, output_type="latent").numpy()
    # the idle expert in pinned host memory: two jitted segments, the same latents
    offloaded = _load(WanA14BPipeline, wan_a14b_folder, offload_idle_expert=True)
    assert memory.on_host(offloaded.params[0]) and memory.on_host(offloaded.params[1])
    out = offloaded(PROMPT, **A14B_CALL, latents=noise, output_type="latent", progress=False)
    assert _rel(out.frames[0], theirs) <= 1e-5
    assert memory.on_host(offloaded.params)  # still on the host after the generation
    # guidance_scale_2 defaults to guidance_scale (diffusers' rule)
    one_scale = _a14b_reference(wan_a14b_folder, noise, guidance_scale_2=None, output_type="latent").numpy()
    default = offloaded(PROMPT, **dict(A14B_CALL, guidance_scale_2=None), latents=noise, output_type="latent",
                        progress=False)
    assert _rel(default.frames[0], one_scale) <= 1e-5
    _pixels_match(offloaded(PROMPT, **A14B_CALL, latents=noise, progress=False).frames[0],
                  _a14b_reference(wan_a14b_folder, noise, output_type="np"))
    # from parts in memory: diffusers' pipeline (its boundary_ratio) and both experts' (config, params)
    reference = wan_a14b_folder["reference"]
    (config, params), (config_2, params_2) = (wan_ports.from_diffusers(m)
                                              for m in (reference.transformer, reference.transformer_2))
    in_memory = WanA14BPipeline.from_components(reference, (config, config_2), (params, params_2), chipmunk=None,
                                                dtype=F32, offload_idle_expert=True)
    assert in_memory.boundary_ratio == 0.875 and memory.on_host(in_memory.params)
    out = in_memory(PROMPT, **A14B_CALL, latents=noise, output_type="latent", progress=False)
    assert _rel(out.frames[0], theirs) <= 1e-5
    with pytest.raises(TypeError, match="must be \\(high-noise expert, low-noise expert\\) pairs"):
        WanA14BPipeline.from_components(reference, config, params, chipmunk=None)


@pytest.mark.slow
def test_wan_a14b_chipmunk_refresh_at_the_switch_and_offload(wan_a14b_folder):
    """Chipmunk with step caching on both experts: the switch step (2) is a full attention + MLP step and never
    skipped; the offloaded segments give the one-jit latents."""
    # 2 x 8 x 12 = 192 tokens at 128x192x5 (one query group); every key kept at the sparse steps
    chipmunk = C.wan().replace(attention__top_keys=0.995, attention__counts_multiple_of=16,
                               attention__local_voxels=0, attention__random_keys=0.0,
                               attention__first_n_dense_layers=1, attention__full_step_every=3,
                               mlp__enabled=True, mlp__first_n_dense_layers=1, mlp__full_step_every=3,
                               mlp__counts_multiple_of=16, mlp__block_size=64,
                               step_cache__skip_step_schedule=(2, 3))
    call = dict(A14B_CALL, height=128, width=192, seed=0, output_type="latent", progress=False)
    pipe = _load(WanA14BPipeline, wan_a14b_folder, chipmunk=chipmunk)
    model_chipmunk, sampler_config = pipe.step_configs(4)
    assert model_chipmunk is sampler_config and model_chipmunk.attention.full_step_schedule == (0, 1, 2, 3)
    assert model_chipmunk.mlp.full_step_schedule == (0, 2, 3)
    assert model_chipmunk.step_cache.skip_step_schedule == (3,)
    assert pipe.step_configs(4)[0].replace(attention__full_step_schedule=None, mlp__full_step_schedule=None,
                                           step_cache__skip_step_schedule=(2, 3)) == chipmunk.replace(num_steps=4)
    assert AttentionStep(int(attention_schedule(model_chipmunk)[2])) == AttentionStep.DENSE_COLSUM
    assert MLPStep(int(mlp_schedule(model_chipmunk)[2])) == MLPStep.DENSE
    assert [ModelStep(int(k)) for k in model_schedule(model_chipmunk)] == [ModelStep.COMPUTE] * 3 + [ModelStep.SKIP]
    sparse = pipe(PROMPT, **call)
    dense = _load(WanA14BPipeline, wan_a14b_folder)(PROMPT, **call)
    assert 0 < _rel(sparse.frames[0], dense.frames[0]) < 0.05
    offloaded = _load(WanA14BPipeline, wan_a14b_folder, chipmunk=chipmunk, offload_idle_expert=True)(PROMPT, **call)
    assert _rel(offloaded.frames[0], sparse.frames[0]) <= 1e-5
    assert offloaded.timings["compile"] > 0 and sparse.timings["sampling"] > 0


def test_wan_ti2v_dense_matches_diffusers(wan_ti2v_folder):
    """TI2V-5B text-to-video: diffusers' expand_timesteps (a timestep per token, all equal without an image) and
    the Wan2.2 VAE's latents (z_dim 8 here, spatial factor 16)."""
    reference = wan_ti2v_folder["reference"]
    call = dict(height=64, width=64, num_frames=5, num_inference_steps=3, max_sequence_length=12,
                guidance_scale=4.0, negative_prompt="blue dog")
    noise = _noise((1, 8, 2, 4, 4), seed=6)
    with torch.no_grad():
        theirs = reference(PROMPT, **call, latents=torch.from_numpy(noise), output_type="latent").frames[0]
        video = reference(PROMPT, **call, latents=torch.from_numpy(noise), output_type="np").frames[0]
    pipe = _load(WanPipeline, wan_ti2v_folder)
    assert pipe.config.in_channels == 8 and pipe.vae_scale_factor_spatial == 16
    latent = pipe(PROMPT, **call, latents=noise, output_type="latent", progress=False)
    assert _rel(latent.frames[0], theirs.numpy()) <= 1e-5
    frames = pipe(PROMPT, **call, latents=noise, progress=False).frames[0]
    assert frames.shape == (5, 64, 64, 3)
    _pixels_match(frames, video)
    with pytest.raises(ValueError, match="height must be a multiple of 32"):  # VAE factor 16 x patch 2
        pipe(PROMPT, **dict(call, height=48), progress=False)


# ----------------------------------------------------------------------------------------------
# Wan 2.2 image-to-video: I2V-A14B (extra input channels), TI2V-5B (the image as latent frame 0)


def _i2v_reference(reference, text_folder, image, call, noise, output_type="latent"):
    """diffusers' WanImageToVideoPipeline on ``image``. The prompts go in as embeddings from diffusers'
    WanPipeline.encode_prompt on the same text encoder: the I2V module's copy of that code calls ftfy without
    checking that it is installed (the pipeline under test does the same, see WanPipeline._prompt_encoder)."""
    call = dict(call)
    prompt, negative, length = PROMPT, call.pop("negative_prompt"), call.pop("max_sequence_length")
    with torch.no_grad():
        embeds, negative_embeds = text_folder.encode_prompt(prompt=prompt, negative_prompt=negative,
                                                            do_classifier_free_guidance=True,
                                                            max_sequence_length=length)
        return reference(image=image, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, **call,
                         latents=torch.from_numpy(noise), output_type=output_type).frames[0]


def _text_encoding(reference):
    """diffusers' WanPipeline over ``reference``'s tokenizer and text encoder (prompt encoding only)."""
    return diffusers.WanPipeline(tokenizer=reference.tokenizer, text_encoder=reference.text_encoder,
                                 vae=reference.vae, scheduler=reference.scheduler)


def test_wan_i2v_a14b_dense_matches_diffusers(wan_i2v_a14b_folder):
    """I2V-A14B: the image's VAE latents and diffusers' frame mask as extra input channels of both experts (12 =
    4 + 4 + 4 here), no CLIP image encoder; the condition equals diffusers' prepare_latents'. A14B_CALL's 4 steps
    switch experts at step 2 here too (t = 1000, 910 >= 900 | 717, 24)."""
    reference, image = wan_i2v_a14b_folder["reference"], tiny_image()
    noise = _noise((1, 4, 2, 4, 4), seed=7)
    theirs = _i2v_reference(reference, _text_encoding(reference), image, A14B_CALL, noise).numpy()
    pipe = _load(WanA14BPipeline, wan_i2v_a14b_folder)
    assert pipe.image_conditioning == "channels" and pipe.boundary_ratio == 0.9
    assert (pipe.config.in_channels, pipe.latent_channels) == (12, 4)
    condition = pipe.encode_image(image, height=32, width=32, num_frames=5)
    with torch.no_grad():
        pixels = reference.video_processor.preprocess(image, height=32, width=32).float()
        _, expected = reference.prepare_latents(pixels, 1, 4, 32, 32, 5, torch.float32, torch.device("cpu"),
                                                latents=torch.from_numpy(noise))
    assert condition.shape == (1, 8, 2, 4, 4)
    np.testing.assert_allclose(condition, expected.numpy(), rtol=0, atol=1e-6)
    ours = pipe(PROMPT, image=image, **A14B_CALL, latents=noise, output_type="latent", progress=False)
    assert _rel(ours.frames[0], theirs) <= 1e-5 and ours.timings["encode_image"] > 0
    # the comparison can fail: another image moves the result
    other = pipe(PROMPT, image=tiny_image(seed=1), **A14B_CALL, latents=noise, output_type="latent", progress=False)
    assert _rel(other.frames[0], theirs) > 1e-3
    # a uint8 array is taken as the PIL image it holds
    as_array = pipe(PROMPT, image=np.asarray(image), **A14B_CALL, latents=noise, output_type="latent", progress=False)
    np.testing.assert_array_equal(as_array.frames[0], ours.frames[0])
    frames = pipe(PROMPT, image=image, **A14B_CALL, latents=noise, progress=False).frames[0]
    _pixels_match(frames, _i2v_reference(reference, _text_encoding(reference), image, A14B_CALL, noise, "np"))


def test_wan_ti2v_image_to_video_matches_diffusers(wan_ti2v_folder):
    """TI2V-5B with an image, as diffusers' WanImageToVideoPipeline runs the folder (expand_timesteps): the image's
    latents are frame 0 of every model input and of the result, at timestep 0 on their tokens."""
    reference = wan_ti2v_folder["reference"]
    call = dict(height=64, width=64, num_frames=5, num_inference_steps=3, max_sequence_length=12,
                guidance_scale=4.0, negative_prompt="blue dog")
    image, noise = tiny_image(seed=2), _noise((1, 8, 2, 4, 4), seed=8)
    theirs = _i2v_reference(wan_ti2v_folder["reference_i2v"], reference, image, call, noise).numpy()
    pipe = _load(WanPipeline, wan_ti2v_folder)
    assert pipe.image_conditioning == "first_frame"
    ours = pipe(PROMPT, image=image, **call, latents=noise, output_type="latent", progress=False).frames[0]
    assert _rel(ours, theirs) <= 1e-5
    condition = pipe.encode_image(image, height=64, width=64, num_frames=5)
    assert condition.shape == (1, 8, 1, 4, 4)
    np.testing.assert_array_equal(ours[:, :1], condition[0])  # frame 0 is the image's latents, never moved
    np.testing.assert_allclose(ours[:, :1], theirs[:, :1], rtol=0, atol=1e-6)
    # the comparison can fail: another image moves the result
    other = pipe(PROMPT, image=tiny_image(seed=1), **call, latents=noise, output_type="latent", progress=False)
    assert _rel(other.frames[0], theirs) > 1e-3
    frames = pipe(PROMPT, image=image, **call, latents=noise, progress=False).frames[0]
    _pixels_match(frames, _i2v_reference(wan_ti2v_folder["reference_i2v"], reference, image, call, noise, "np"))


@pytest.mark.slow
def test_wan_image_to_video_chipmunk_step_cache_and_offload(wan_i2v_a14b_folder, wan_ti2v_folder):
    """Chipmunk + step caching with an image: I2V-A14B one jit against its offloaded segments (the same latents)
    and near the dense result; TI2V-5B near the dense result, frame 0 still the image's latents (skipped steps run
    the final layer only, with the per-token conditioning)."""
    chipmunk = C.wan().replace(attention__top_keys=0.995, attention__counts_multiple_of=16,
                               attention__local_voxels=0, attention__random_keys=0.0,
                               attention__first_n_dense_layers=1, attention__full_step_every=3,
                               step_cache__skip_step_schedule=(3,))
    image = tiny_image(seed=3)
    call = dict(A14B_CALL, height=128, width=192, seed=0, output_type="latent", progress=False)
    sparse = _load(WanA14BPipeline, wan_i2v_a14b_folder, chipmunk=chipmunk)(PROMPT, image=image, **call)
    dense = _load(WanA14BPipeline, wan_i2v_a14b_folder)(PROMPT, image=image, **call)
    assert 0 < _rel(sparse.frames[0], dense.frames[0]) < 0.05
    offloaded = _load(WanA14BPipeline, wan_i2v_a14b_folder, chipmunk=chipmunk, offload_idle_expert=True)
    assert _rel(offloaded(PROMPT, image=image, **call).frames[0], sparse.frames[0]) <= 1e-5
    # TI2V-5B: 2 x 8 x 12 = 192 tokens at 256x384 (spatial factor 16, patch 2; one query group)
    call = dict(height=256, width=384, num_frames=5, num_inference_steps=4, max_sequence_length=12,
                guidance_scale=4.0, seed=0, output_type="latent", progress=False)
    pipe = _load(WanPipeline, wan_ti2v_folder, chipmunk=chipmunk)
    sparse = pipe(PROMPT, image=image, **call).frames[0]
    dense = _load(WanPipeline, wan_ti2v_folder)(PROMPT, image=image, **call).frames[0]
    assert 0 < _rel(sparse, dense) < 0.05
    np.testing.assert_array_equal(sparse[:, :1], pipe.encode_image(image, height=256, width=384, num_frames=5)[0])


def test_wan_image_to_video_errors(wan_folder, wan_i2v_a14b_folder, wan_dense, tmp_path):
    call = dict(height=32, width=32, num_frames=5, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="image=: this is a text-to-video pipeline"):
        wan_dense(PROMPT, image=tiny_image(), **call)
    pipe = _load(WanA14BPipeline, wan_i2v_a14b_folder)
    with pytest.raises(ValueError, match="image= is required: this is an image-to-video pipeline"):
        pipe(PROMPT, **call)
    for image, error, words in (
            ("cat.png", TypeError, "image must be a PIL image or an array \\[H, W, 3\\]"),
            (torch.zeros(8, 8, 3), TypeError, "got Tensor"),
            (np.zeros((8, 8), np.uint8), ValueError, "image must be \\[H, W, 3\\] \\(RGB\\)"),
            (np.full((8, 8, 3), 2.0, np.float32), ValueError, "a float image must lie in \\[0, 1\\]"),
            (np.zeros((8, 8, 3), np.int32), ValueError, "image must be uint8 or float")):
        with pytest.raises(error, match=words):
            pipe(PROMPT, image=image, **call)
    with pytest.raises(ValueError, match="is a Wan 2.2 A14B pipeline .* load it with "
                                         "chipmunk_jax.pipelines.WanA14BPipeline"):
        _load(WanPipeline, wan_i2v_a14b_folder)
    # a Wan 2.1 image-to-video folder (one transformer, CLIP image embeddings)
    wan21_i2v = tmp_path / "wan21_i2v"
    shutil.copytree(wan_folder["path"], wan21_i2v)
    index = json.loads((wan21_i2v / "model_index.json").read_text())
    (wan21_i2v / "model_index.json").write_text(json.dumps(dict(index, _class_name="WanImageToVideoPipeline")))
    for cls in (WanPipeline, WanA14BPipeline):
        with pytest.raises(ValueError, match="is a Wan 2.1 image-to-video pipeline .* not supported"):
            cls.from_pretrained(wan21_i2v, chipmunk=None)
    with pytest.raises(ValueError, match="holds a diffusers WanImageToVideoPipeline pipeline, not a FluxPipeline: "
                                         "load it with chipmunk_jax.pipelines.WanA14BPipeline"):
        FluxPipeline.from_pretrained(wan_i2v_a14b_folder["path"])


def test_wan22_folder_and_argument_errors(wan_folder, wan_a14b_folder, wan_dense, tmp_path):
    with pytest.raises(ValueError, match="is a Wan 2.2 A14B pipeline .* load it with "
                                         "chipmunk_jax.pipelines.WanA14BPipeline"):
        _load(WanPipeline, wan_a14b_folder)
    with pytest.raises(ValueError, match="is a one-transformer Wan pipeline .* load it with "
                                         "chipmunk_jax.pipelines.WanPipeline"):
        _load(WanA14BPipeline, wan_folder)
    with pytest.raises(ValueError, match="pass both transformer= and transformer_2="):
        _load(WanA14BPipeline, wan_a14b_folder, transformer=os.path.join(wan_a14b_folder["path"], "transformer"))
    with pytest.raises(ValueError, match="guidance_scale_2 is the low-noise expert's"):
        wan_dense(PROMPT, height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale_2=3.0)
    broken = tmp_path / "no_ratio"
    shutil.copytree(wan_a14b_folder["path"], broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps(dict(index, boundary_ratio=None)))
    with pytest.raises(ValueError, match="lists transformer_2 but its model_index.json sets no boundary_ratio"):
        WanA14BPipeline.from_pretrained(broken, chipmunk=None)
    pipe = _load(WanA14BPipeline, wan_a14b_folder)
    call = dict(height=32, width=32, num_frames=5, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="guidance_scale_2 needs classifier-free guidance"):
        pipe(PROMPT, **call, guidance_scale=1.0, guidance_scale_2=3.0)
    with pytest.raises(TypeError, match="guidance_scale_2"):
        pipe(PROMPT, **call, guidance_scale_2="3")


# ----------------------------------------------------------------------------------------------
# HunyuanVideo


HUNYUAN_CALL = dict(height=64, width=96, num_frames=5, num_inference_steps=3, max_sequence_length=12,
                    guidance_scale=6.0, prompt_template=HUNYUAN_TEMPLATE)


def test_hunyuan_dense_matches_diffusers(hunyuan_folder, hunyuan_dense):
    reference = hunyuan_folder["reference"]
    noise = _noise((1, 4, 2, 8, 12))
    text, _, mask = hunyuan_dense.encode_prompt(PROMPT, prompt_template=HUNYUAN_TEMPLATE, max_sequence_length=12)
    assert 0 < mask.sum() < 12 and text.shape == (1, 12, 16)  # padded: the mask is exercised
    ours = hunyuan_dense(PROMPT, **HUNYUAN_CALL, latents=noise, progress=False)
    latent = hunyuan_dense(PROMPT, **HUNYUAN_CALL, latents=noise, output_type="latent", progress=False)
    with torch.no_grad():
        theirs = reference(PROMPT, **HUNYUAN_CALL, latents=torch.from_numpy(noise), output_type="latent").frames
        video = reference(PROMPT, **HUNYUAN_CALL, latents=torch.from_numpy(noise), output_type="np").frames[0]
    assert _rel(latent.frames[0], theirs[0].numpy()) <= 1e-5
    _pixels_match(ours.frames[0], video)


def test_hunyuan_chipmunk_frames(hunyuan_folder):
    chipmunk = C.hunyuan_video().replace(attention__random_keys=1.0, attention__first_n_dense_layers=1,
                                         attention__full_step_schedule=(0, 1), step_cache__skip_step_schedule=(3,))
    pipe = _load(HunyuanVideoPipeline, hunyuan_folder, chipmunk=chipmunk)
    out = pipe(PROMPT, **dict(HUNYUAN_CALL, num_inference_steps=4), seed=1, output_type="pil", progress=False)
    frames = out.frames[0]
    assert len(frames) == 5 and frames[0].size == (96, 64) and np.asarray(frames[2]).std() > 0


def test_hunyuan_default_prompt_template_is_diffusers():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    from chipmunk_jax.pipelines import hunyuan_video

    assert hunyuan_video.DEFAULT_PROMPT_TEMPLATE == DEFAULT_PROMPT_TEMPLATE


def test_hunyuan_bad_arguments(hunyuan_dense):
    call = dict(height=64, width=96, num_frames=5, num_inference_steps=2, progress=False)
    cases = [
        (dict(negative_prompt="blurry"), "negative_prompt: HunyuanVideo's guidance is embedded"),
        (dict(num_frames=4), "num_frames must be 4k \\+ 1"),
        (dict(width=100), "width must be a multiple of 16"),
        (dict(prompt_template={"crop_start": 0}), "prompt_template must be a dict with a 'template'"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ValueError, match=words):
            hunyuan_dense(PROMPT, **dict(call, **kwargs))


# ----------------------------------------------------------------------------------------------
# Folders, weights and the weights cache


def test_folder_layout_errors(flux_folder, wan_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such pipeline folder"):
        FluxPipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="is a diffusers FluxTransformer2DModel model folder, not a pipeline"):
        FluxPipeline.from_pretrained(os.path.join(flux_folder["path"], "transformer"))
    with pytest.raises(ValueError, match="holds a diffusers WanPipeline pipeline, not a FluxPipeline: load it with "
                                         "chipmunk_jax.pipelines.WanPipeline"):
        FluxPipeline.from_pretrained(wan_folder["path"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers pipeline folder: no model_index.json"):
        WanPipeline.from_pretrained(tmp_path / "empty")
    converted = tmp_path / "converted"
    flux_ports.save_params(converted, *flux_ports.from_checkpoint(os.path.join(flux_folder["path"], "transformer")))
    with pytest.raises(ValueError, match="converted chipmunk-jax transformer folder .* as transformer="):
        FluxPipeline.from_pretrained(converted)
    broken = tmp_path / "broken"
    shutil.copytree(flux_folder["path"], broken, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(ValueError, match=r"lacks the subfolders \['vae'\]"):
        FluxPipeline.from_pretrained(broken)
    with pytest.raises(ValueError, match="holds a FluxTransformer2DModel, not a WanTransformer3DModel"):
        WanPipeline.from_pretrained(wan_folder["path"], transformer=converted)
    with pytest.raises(ValueError, match="unknown preset 'fluxx'"):
        FluxPipeline.from_pretrained(flux_folder["path"], chipmunk="fluxx")
    with pytest.raises(TypeError, match="chipmunk must be"):
        FluxPipeline.from_pretrained(flux_folder["path"], chipmunk=3)
    with pytest.raises(FileNotFoundError, match="no such config file"):
        FluxPipeline.from_pretrained(flux_folder["path"], chipmunk=str(tmp_path / "none.yaml"))
    with pytest.raises(ValueError, match="torch_dtype: unknown torch dtype 'float33'"):
        FluxPipeline.from_pretrained(flux_folder["path"], chipmunk=None, cache_weights=False, torch_dtype="float33")
    with pytest.raises(ValueError, match="torch_device"):
        FluxPipeline.from_pretrained(flux_folder["path"], chipmunk=None, cache_weights=False, torch_device="gpu:x")


def test_weights_cache_and_converted_folders(flux_folder, tmp_path):
    default = tmp_path / "xdg" / "chipmunk-jax" / "weights"
    assert common.default_weights_cache_dir() == str(default)
    first = FluxPipeline.from_pretrained(flux_folder["path"], chipmunk=None, dtype=F32)
    entries = os.listdir(default)
    assert len(entries) == 1 and f"cached in {default / entries[0]}" in first.weights_from
    with open(default / entries[0] / common.SOURCE_FILE) as f:
        assert json.load(f)["source"] == os.path.realpath(os.path.join(flux_folder["path"], "transformer"))
    second = FluxPipeline.from_pretrained(flux_folder["path"], chipmunk=None, dtype=F32)
    assert second.weights_from.startswith(f"cached conversion {default / entries[0]}")
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)),
                                                         first.params, second.params))
    # a changed checkpoint (here its mtime) is a new key: converted again, never the stale entry
    copy = tmp_path / "pipeline"
    shutil.copytree(flux_folder["path"], copy)
    FluxPipeline.from_pretrained(copy, chipmunk=None, dtype=F32)
    config = copy / "transformer" / "config.json"
    os.utime(config, ns=(os.stat(config).st_atime_ns, os.stat(config).st_mtime_ns + 10**9))
    FluxPipeline.from_pretrained(copy, chipmunk=None, dtype=F32)
    assert len(os.listdir(default)) == 3
    # no cache: nothing written; a converted folder (transformer/ or transformer=) is read as it is
    own = tmp_path / "own"
    pipe = FluxPipeline.from_pretrained(flux_folder["path"], chipmunk=None, dtype=F32, cache_weights=False,
                                        cache_dir=own)
    assert "not cached" in pipe.weights_from and not own.exists()
    converted = tmp_path / "converted"
    flux_ports.save_params(converted, *flux_ports.from_checkpoint(os.path.join(flux_folder["path"], "transformer")))
    pipe = FluxPipeline.from_pretrained(flux_folder["path"], chipmunk=None, dtype=F32, transformer=converted)
    assert pipe.weights_from == f"converted params {converted}"
    shutil.rmtree(copy / "transformer")
    shutil.copytree(converted, copy / "transformer")
    pipe = FluxPipeline.from_pretrained(copy, chipmunk=None, dtype=F32)
    assert pipe.weights_from == f"converted params {copy / 'transformer'}"
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)),
                                                         first.params, pipe.params))
    assert len(os.listdir(default)) == 3


# ----------------------------------------------------------------------------------------------
# Scheduler sigmas


def test_sigmas_follow_diffusers_schedulers():
    flux = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    for steps, seq_len in ((28, 4096), (4, 256), (7, 1024)):
        mu = sampling.flux_shift(seq_len)
        flux.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        np.testing.assert_allclose(common.scheduler_sigmas(flux, steps, image_seq_len=seq_len), flux.sigmas.numpy(),
                                   rtol=1e-6, atol=1e-6)
    hunyuan = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    hunyuan.set_timesteps(sigmas=np.linspace(1.0, 0.0, 31)[:-1])
    np.testing.assert_allclose(common.scheduler_sigmas(hunyuan, 30), hunyuan.sigmas.numpy(), rtol=1e-6, atol=1e-6)
    # Wan: diffusers' WanPipeline calls set_timesteps(N) and the scheduler picks its own grid
    for scheduler, override in ((diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), dict(shift=5.0)),
                                (diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                   use_flow_sigmas=True, flow_shift=3.0),
                                 dict(flow_shift=5.0))):
        for shift, config in ((None, {}), (5.0, override)):
            expected = type(scheduler).from_config(dict(scheduler.config, **config))
            expected.set_timesteps(10)
            ours = common.scheduler_sigmas(scheduler, 10, shift=shift, pipeline_sigmas=False)
            np.testing.assert_allclose(ours, expected.sigmas.numpy(), rtol=1e-6)
            assert ours.shape == (11,) and ours[0] <= 1 and ours[-1] == 0
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        common.scheduler_sigmas(diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), 4)
    with pytest.raises(ValueError, match="shifts by resolution"):
        common.scheduler_sigmas(flux, 4, image_seq_len=256, shift=2.0)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        common.scheduler_sigmas(flux, 4, pipeline_sigmas=False)
    with pytest.raises(ValueError, match="DDIMScheduler is not supported"):
        common.scheduler_sigmas(diffusers.DDIMScheduler(), 4, pipeline_sigmas=False)
    with pytest.raises(ValueError, match="UniPCMultistepScheduler is not supported"):  # FLUX / HunyuanVideo
        common.scheduler_sigmas(unipc_flow(), 4)


def unipc_flow():
    return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


# ----------------------------------------------------------------------------------------------
# write_video


def _frames(f=4, h=10, w=14):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (f, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_write_video_animated_images(tmp_path, suffix):
    from PIL import Image

    path = write_video(tmp_path / f"v{suffix}", _frames(), fps=8)
    with Image.open(path) as image:
        assert image.n_frames == 4 and image.size == (14, 10)
        if suffix == ".webp":  # lossless
            image.seek(2)
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), _frames()[2])


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # imageio-ffmpeg starts ffmpeg
def test_write_video_mp4_or_gif_fallback(tmp_path, monkeypatch):
    pytest.importorskip("imageio_ffmpeg")
    path = write_video(tmp_path / "v.mp4", _frames(h=9, w=15).astype(np.float32) / 255.0, fps=8)
    with open(path, "rb") as f:
        assert f.read(12)[4:8] == b"ftyp"  # an MP4 container
    import imageio_ffmpeg

    assert imageio_ffmpeg.count_frames_and_secs(path)[0] == 4
    monkeypatch.setitem(__import__("sys").modules, "imageio_ffmpeg", None)  # as if not installed
    with pytest.warns(UserWarning, match="needs imageio and imageio-ffmpeg"):
        path = write_video(tmp_path / "w.mp4", _frames(), fps=8)
    assert path == str(tmp_path / "w.gif") and os.path.isfile(path)


def test_write_video_bad_input(tmp_path):
    with pytest.raises(ValueError, match="must end in"):
        write_video(tmp_path / "v.avi", _frames())
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        write_video(tmp_path / "v.gif", _frames()[0])
    with pytest.raises(ValueError, match=r"float frames must lie in \[0, 1\]"):
        write_video(tmp_path / "v.gif", _frames().astype(np.float32))
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "v.gif", _frames(), fps=0)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        write_video(tmp_path / "missing" / "v.gif", _frames())
