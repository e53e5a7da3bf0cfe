"""Wan weight ports: diffusers folders (sharded, pipeline layout), single files in both layouts, config
inference, the convert CLI, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from chipmunk_jax.models import wan  # noqa: E402
from chipmunk_jax.ports import convert  # noqa: E402
from chipmunk_jax.ports import safetensors_io  # noqa: E402
from chipmunk_jax.ports import wan as wan_ports  # noqa: E402

from test_wan_model import I2V_CONFIG, diffusers_to_original, make_torch_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return make_torch_model(I2V_CONFIG, seed=3)


@pytest.fixture(scope="module")
def config(model):
    return wan.WanConfig.from_diffusers(dict(model.config))


def assert_same_params(a, b):
    fa, fb = wan_ports.flatten_params(a), wan_ports.flatten_params(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k], np.float32), np.asarray(fb[k], np.float32), err_msg=k)


def test_diffusers_folder_sharded_and_pipeline_layout(model, tmp_path):
    _, expected = wan_ports.from_diffusers(model)
    model.save_pretrained(tmp_path / "pipe" / "transformer", safe_serialization=True, max_shard_size="20KB")
    assert any(n.endswith(".safetensors.index.json") for n in os.listdir(tmp_path / "pipe" / "transformer"))
    for src in (tmp_path / "pipe" / "transformer", tmp_path / "pipe"):
        config, params = wan_ports.from_checkpoint(src)
        assert config.added_kv_proj_dim == 24 and config.num_layers == 2
        assert_same_params(params, expected)


def test_single_files_both_layouts_and_ignored_norm_added_q(model, config, tmp_path):
    _, expected = wan_ports.from_diffusers(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # some released I2V checkpoints carry an unused attn2.norm_added_q: dropped, as diffusers does
    state["blocks.1.attn2.norm_added_q.weight"] = torch.ones(24)
    diffusers_file = tmp_path / "wan_diffusers.safetensors"
    safetensors_torch.save_file(state, str(diffusers_file))
    assert_same_params(wan_ports.from_checkpoint(diffusers_file, config)[1], expected)
    original_file = tmp_path / "wan_original.safetensors"
    original = {"model.diffusion_model." + k: v for k, v in diffusers_to_original(model.state_dict()).items()}
    safetensors_io.write_safetensors(original_file, original)
    assert_same_params(wan_ports.from_checkpoint(original_file, config)[1], expected)


def test_infer_config_from_shapes():
    # head_dim is invisible in the weights: a 128-wide head (every released Wan) is inferred
    kwargs = dict(I2V_CONFIG, num_attention_heads=1, attention_head_dim=128, added_kv_proj_dim=128, ffn_dim=16,
                  num_layers=1, rope_max_seq_len=1024)  # not in the weights: the default is inferred
    model = make_torch_model(kwargs, seed=4)
    config = wan.WanConfig(**kwargs)
    assert wan_ports.infer_config(model.state_dict()) == config
    assert wan_ports.from_original(diffusers_to_original(model.state_dict()))[0] == config
    with pytest.raises(ValueError, match="pass config="):
        wan_ports.infer_config({"patch_embedding.weight": np.zeros((24, 4, 1, 2, 2), np.float32)})


def test_dtype_cast_and_to_diffusers_round_trip(model, config):
    _, params = wan_ports.from_diffusers(model, dtype=ml_dtypes.bfloat16)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in wan_ports.flatten_params(params).values())
    _, params = wan_ports.from_diffusers(model)
    assert params["patch_embedding"]["kernel"].shape == (2, 2, 1, 12, 24)  # torch weight, axes reversed
    state = wan_ports.to_diffusers(params)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)
    assert_same_params(wan_ports.from_diffusers(state, config)[1], params)


def _expect_error(fn, *needles):
    with pytest.raises(ValueError) as info:
        fn()
    for needle in needles:
        assert needle in str(info.value)


def test_bad_diffusers_checkpoints(model, config):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    load = lambda s: lambda: wan_ports.from_diffusers(s, config)  # noqa: E731
    missing = dict(state)
    del missing["blocks.1.attn2.add_k_proj.bias"]
    _expect_error(load(missing), "missing keys (1)", "blocks.1.attn2.add_k_proj.bias")
    extra = dict(state, **{"blocks.0.attn1.to_qkv.weight": torch.zeros(72, 24)})
    _expect_error(load(extra), "unexpected keys (1)", "blocks.0.attn1.to_qkv.weight")
    wrong = dict(state, **{"proj_out.weight": torch.zeros(5, 24)})
    _expect_error(load(wrong), "wrong shapes (1)", "proj_out.weight: got (5, 24), expected (16, 24)")
    conv = dict(state, **{"patch_embedding.weight": torch.zeros(24, 12, 1, 1, 4)})
    _expect_error(load(conv), "patch_embedding.weight: got (24, 12, 1, 1, 4), expected (24, 12, 1, 2, 2)")
    both = dict(extra)
    del both["scale_shift_table"]
    _expect_error(load(both), "missing keys", "scale_shift_table", "unexpected keys", "to_qkv")
    # a T2V checkpoint for an I2V config: every image key is reported at once
    t2v = {k: v for k, v in state.items() if "image_embedder" not in k and "add_" not in k and "added" not in k}
    _expect_error(load(t2v), "missing keys (18)", "condition_embedder.image_embedder.norm1.weight")
    _expect_error(lambda: wan_ports.from_diffusers(diffusers_to_original(model.state_dict()), config),
                  "from_original")
    with pytest.raises(TypeError, match="module_or_state_dict"):
        wan_ports.from_diffusers([1, 2], config)
    with pytest.raises(TypeError, match="config"):
        wan_ports.from_diffusers(state, dict(I2V_CONFIG))


def test_bad_original_checkpoints(model, config):
    original = diffusers_to_original(model.state_dict())
    _expect_error(lambda: wan_ports.from_original(dict(original, **{"blocks.0.self_attn.lora.weight": np.zeros(3)}),
                                                  config),
                  "unknown keys", "blocks.0.self_attn.lora.weight")
    no_norm3 = {k: v for k, v in original.items() if not k.startswith("blocks.1.norm3.")}
    _expect_error(lambda: wan_ports.from_original(no_norm3, config), "original Wan checkpoint", "missing keys (2)",
                  "blocks.1.norm2.bias")
    short = dict(original, **{"head.modulation": original["head.modulation"][:, :1]})
    _expect_error(lambda: wan_ports.from_original(short, config), "scale_shift_table: got (1, 1, 24)")
    with pytest.raises(TypeError, match="config"):
        wan_ports.from_original(original, dict(I2V_CONFIG))
    with pytest.raises(TypeError, match="state_dict"):
        wan_ports.from_original([("a", 1)], config)


def test_pickle_checkpoints_are_refused(model, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match="pickle"):
        wan_ports.from_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        wan_ports.from_checkpoint(tmp_path / "nothing_here")


def test_convert_cli_and_saved_params(model, config, tmp_path):
    src = tmp_path / "src"
    model.save_pretrained(src, safe_serialization=True)
    dst = tmp_path / "dst"
    assert convert.main(["--model", "wan", "--src", str(src), "--dst", str(dst), "--dtype", "bfloat16"]) == 0
    assert sorted(os.listdir(dst)) == ["config.json", "params.safetensors"]
    with open(dst / "config.json") as f:
        assert wan.WanConfig.from_diffusers(json.load(f)) == config
    loaded_config, params = wan_ports.load_params(dst)
    assert loaded_config == config
    assert_same_params(params, wan_ports.from_diffusers(model, dtype=ml_dtypes.bfloat16)[1])
    # an original-layout single file with an explicit config
    original_file = tmp_path / "original.safetensors"
    safetensors_io.write_safetensors(original_file, diffusers_to_original(model.state_dict()))
    dst2 = tmp_path / "dst2"
    assert convert.main(["--model", "wan", "--src", str(original_file), "--dst", str(dst2),
                         "--config", str(dst / "config.json")]) == 0
    assert_same_params(wan_ports.load_params(dst2)[1], wan_ports.from_diffusers(model)[1])
    # bad sources give an error status and write nothing
    assert convert.main(["--model", "wan", "--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "d3")]) == 1
    bad_file = tmp_path / "bad.safetensors"
    safetensors_io.write_safetensors(bad_file, {k: v for k, v in diffusers_to_original(model.state_dict()).items()
                                                if k != "head.head.bias"})
    assert convert.main(["--model", "wan", "--src", str(bad_file), "--dst", str(tmp_path / "d4"),
                         "--config", str(dst / "config.json")]) == 1
    assert not (tmp_path / "d3").exists() and not (tmp_path / "d4").exists()
    # a params folder that does not match its config
    wan_ports.save_params(tmp_path / "d5", config.__class__(**{**I2V_CONFIG, "num_layers": 3}), params)
    with pytest.raises(ValueError, match="missing keys"):
        wan_ports.load_params(tmp_path / "d5")
    with pytest.raises(TypeError, match="config"):
        wan_ports.save_params(tmp_path / "d6", dict(I2V_CONFIG), params)
