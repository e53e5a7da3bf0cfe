"""HunyuanVideo weight ports: diffusers folders (sharded, pipeline layout), single files in both layouts,
save/load of converted params, the convert CLI, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from chipmunk_jax.models import hunyuan_video as hv  # noqa: E402
from chipmunk_jax.ports import convert  # noqa: E402
from chipmunk_jax.ports import hunyuan_video as hv_ports  # noqa: E402
from chipmunk_jax.ports import safetensors_io  # noqa: E402

from test_hunyuan_model import P2_CONFIG, diffusers_to_tencent, make_torch_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return make_torch_model(P2_CONFIG, seed=3)


@pytest.fixture(scope="module")
def config(model):
    return hv.HunyuanVideoConfig.from_diffusers(dict(model.config))


def assert_same_params(a, b):
    fa, fb = hv_ports.flatten_params(a), hv_ports.flatten_params(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k], np.float32), np.asarray(fb[k], np.float32), err_msg=k)


def test_tree_layout_and_infer_config(model, config):
    _, params = hv_ports.from_diffusers(model)
    refiner = params["context_embedder"]["token_refiner"]["refiner_blocks"]
    # every block stack is one tree with a leading layer axis (the model scans over it)
    assert refiner["norm1"]["scale"].shape == (2, 20)
    assert params["transformer_blocks"]["attn"]["to_q"]["kernel"].shape == (config.num_layers, 20, 20)
    assert params["single_transformer_blocks"]["proj_out"]["kernel"].shape[0] == config.num_single_layers
    assert params["x_embedder"]["proj"]["kernel"].shape == (4 * 1 * 2 * 2, 20)
    # the released sizes are inferred from shapes alone (abstract arrays: nothing allocated)
    for full in (hv.HunyuanVideoConfig(), hv.HunyuanVideoConfig(in_channels=33, guidance_embeds=False,
                                                                 image_condition_type=None)):
        shapes = {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in hv_ports.expected_diffusers_shapes(full).items()}
        assert hv_ports.infer_config(shapes) == full
    with pytest.raises(ValueError, match="rope_axes_dim is unknown"):
        hv_ports.infer_config(model.state_dict())


def test_diffusers_folder_sharded_and_pipeline_layout(model, tmp_path):
    _, expected = hv_ports.from_diffusers(model)
    model.save_pretrained(tmp_path / "pipe" / "transformer", safe_serialization=True, max_shard_size="40KB")
    assert any(n.endswith(".safetensors.index.json") for n in os.listdir(tmp_path / "pipe" / "transformer"))
    for src in (tmp_path / "pipe" / "transformer", tmp_path / "pipe"):
        config, params = hv_ports.from_checkpoint(src)
        assert config.guidance_embeds and config.num_layers == 2 and config.patch_size == 2
        assert_same_params(params, expected)


def test_single_files_both_layouts(model, config, tmp_path):
    _, expected = hv_ports.from_diffusers(model)
    diffusers_file = tmp_path / "hunyuan_diffusers.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(diffusers_file))
    assert_same_params(hv_ports.from_checkpoint(diffusers_file, config)[1], expected)
    tencent_file = tmp_path / "hunyuan_video_tiny.safetensors"
    original = {"model.diffusion_model." + k: v for k, v in diffusers_to_tencent(model.state_dict()).items()}
    safetensors_io.write_safetensors(tencent_file, original)
    assert_same_params(hv_ports.from_checkpoint(tencent_file, config)[1], expected)


def test_dtype_cast_and_to_diffusers_round_trip(model, config):
    _, params = hv_ports.from_diffusers(model, dtype=ml_dtypes.bfloat16)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in hv_ports.flatten_params(params).values())
    _, params = hv_ports.from_diffusers(model)
    state = hv_ports.to_diffusers(params, config)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)
    assert_same_params(hv_ports.from_diffusers(state, config)[1], params)


def _expect_error(state, config, *needles):
    with pytest.raises(ValueError) as info:
        hv_ports.from_diffusers(state, config)
    for needle in needles:
        assert needle in str(info.value)


def test_bad_diffusers_checkpoints(model, config):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    missing = dict(state)
    del missing["context_embedder.token_refiner.refiner_blocks.1.attn.to_k.bias"]
    _expect_error(missing, config, "missing keys (1)", "refiner_blocks.1.attn.to_k.bias")
    extra = dict(state, **{"transformer_blocks.0.attn.to_qkv.weight": torch.zeros(60, 20)})
    _expect_error(extra, config, "unexpected keys (1)", "transformer_blocks.0.attn.to_qkv.weight")
    wrong = dict(state, **{"x_embedder.proj.weight": torch.zeros(20, 4, 1, 1, 1)})
    _expect_error(wrong, config, "wrong shapes (1)", "x_embedder.proj.weight: got (20, 4, 1, 1, 1), expected "
                  "(20, 4, 1, 2, 2)")
    _expect_error({k: v for k, v in state.items() if "single_transformer_blocks.1." not in k}, config,
                  "single_transformer_blocks.1.proj_out.weight")
    with pytest.raises(ValueError, match="from_original"):
        hv_ports.from_diffusers(diffusers_to_tencent(model.state_dict()), config)
    with pytest.raises(ValueError, match="cannot infer"):
        hv_ports.from_diffusers({"proj_out.weight": np.zeros((4, 20))})
    with pytest.raises(TypeError, match="module_or_state_dict"):
        hv_ports.from_diffusers([1, 2], config)
    with pytest.raises(TypeError, match="config"):
        hv_ports.from_diffusers(state, dict(P2_CONFIG))


def test_bad_tencent_checkpoints(model, config):
    original = diffusers_to_tencent(model.state_dict())
    with pytest.raises(ValueError, match=r"unknown or malformed keys .*double_blocks\.0\.img_attn\.lora\.weight"):
        hv_ports.from_original(dict(original, **{"double_blocks.0.img_attn.lora.weight": np.zeros(3)}), config)
    truncated = dict(original, **{"single_blocks.0.linear1.weight": original["single_blocks.0.linear1.weight"][:-1]})
    with pytest.raises(ValueError, match="single_blocks.0.linear1.weight"):
        hv_ports.from_original(truncated, config)
    bad_refiner = dict(original)
    qkv = "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight"
    bad_refiner[qkv] = original[qkv][:30]
    with pytest.raises(ValueError, match="self_attn_qkv"):
        hv_ports.from_original(bad_refiner, config)
    no_guidance = {k: v for k, v in original.items() if not k.startswith("guidance_in.")}
    with pytest.raises(ValueError, match="missing keys.*guidance_embedder"):
        hv_ports.from_original(no_guidance, config)
    with pytest.raises(ValueError, match="Tencent checkpoint"):
        hv_ports.from_original(original)  # the default is the full-size model: every shape is wrong
    with pytest.raises(TypeError, match="config"):
        hv_ports.from_original(original, dict(P2_CONFIG))
    with pytest.raises(TypeError, match="state_dict"):
        hv_ports.from_original([("a", 1)], config)


def test_folder_without_safetensors_is_refused(model, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match="pickle"):
        hv_ports.from_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        hv_ports.from_checkpoint(tmp_path / "nothing_here")


def test_convert_cli_and_load_params(model, config, tmp_path):
    src = tmp_path / "src"
    model.save_pretrained(src, safe_serialization=True)
    dst = tmp_path / "dst"
    assert convert.main(["--model", "hunyuan_video", "--src", str(src), "--dst", str(dst), "--dtype", "bfloat16"]) == 0
    assert sorted(os.listdir(dst)) == ["config.json", "params.safetensors"]
    with open(dst / "config.json") as f:
        assert hv.HunyuanVideoConfig.from_diffusers(json.load(f)) == config
    loaded_config, params = hv_ports.load_params(dst)
    assert loaded_config == config
    assert_same_params(params, hv_ports.from_diffusers(model, dtype=ml_dtypes.bfloat16)[1])
    # a Tencent single file with an explicit config
    tencent_file = tmp_path / "tencent.safetensors"
    safetensors_io.write_safetensors(tencent_file, diffusers_to_tencent(model.state_dict()))
    assert convert.main(["--model", "hunyuan_video", "--src", str(tencent_file), "--dst", str(tmp_path / "dst2"),
                         "--config", str(dst / "config.json")]) == 0
    assert_same_params(hv_ports.load_params(tmp_path / "dst2")[1], hv_ports.from_diffusers(model)[1])
    # bad sources: an error status, nothing written
    assert convert.main(["--model", "hunyuan_video", "--src", str(tmp_path / "missing"),
                         "--dst", str(tmp_path / "d3")]) == 1
    assert convert.main(["--model", "hunyuan_video", "--src", str(tencent_file), "--dst", str(tmp_path / "d4")]) == 1
    assert not (tmp_path / "d3").exists() and not (tmp_path / "d4").exists()
    # a params folder whose tensors do not match its config
    os.remove(dst / "params.safetensors")
    safetensors_io.write_safetensors(dst / "params.safetensors", {"proj_out.kernel": np.zeros((20, 16), np.float32)})
    with pytest.raises(ValueError, match="missing keys"):
        hv_ports.load_params(dst)
