"""FLUX weight ports: safetensors I/O, diffusers folders (sharded), single files in both layouts, the
convert CLI, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from chipmunk_jax.apps import cli  # noqa: E402
from chipmunk_jax.models import flux  # noqa: E402
from chipmunk_jax.ports import convert  # noqa: E402
from chipmunk_jax.ports import flux as flux_ports  # noqa: E402
from chipmunk_jax.ports import safetensors_io  # noqa: E402

from helpers import randomized_torch_model  # noqa: E402
from test_flux_model import DEV_CONFIG, diffusers_to_bfl  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return randomized_torch_model(diffusers.FluxTransformer2DModel, DEV_CONFIG, seed=3)


@pytest.fixture(scope="module")
def config(model):
    return flux.FluxConfig.from_diffusers(dict(model.config))


def assert_same_params(a, b):
    fa, fb = flux_ports.flatten_params(a), flux_ports.flatten_params(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k], np.float32), np.asarray(fb[k], np.float32), err_msg=k)


def test_safetensors_round_trip_and_interop(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.bf16": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
        "b.f32": rng.standard_normal((7,)).astype(np.float32),
        "c.i32": rng.integers(0, 9, (2, 2, 2)).astype(np.int32),
        "d.scalar": np.float32(2.5).reshape(()),
        "e.empty": np.zeros((0, 4), np.float16),
    }
    path = tmp_path / "x.safetensors"
    safetensors_io.write_safetensors(path, tensors, metadata={"k": "v"})
    assert os.listdir(tmp_path) == ["x.safetensors"]  # no temp file left behind
    back = safetensors_io.read_safetensors(path)
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    # the reference implementation reads our file, and we read its files
    theirs = safetensors_torch.load_file(str(path))
    np.testing.assert_array_equal(theirs["a.bf16"].float().numpy(), tensors["a.bf16"].astype(np.float32))
    safetensors_torch.save_file({"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)}, str(tmp_path / "t.safetensors"))
    ours = safetensors_io.read_safetensors(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(ours["w"].astype(np.float32), np.arange(6).reshape(2, 3))


def test_safetensors_rejects_bad_files(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="pickle"):
        safetensors_io.read_safetensors(tmp_path / "model.bin")
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a safetensors file"):
        safetensors_io.read_safetensors(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes((5).to_bytes(8, "little") + b"{nope")
    with pytest.raises(ValueError, match="bad JSON header"):
        safetensors_io.read_safetensors(tmp_path / "junk.safetensors")
    with pytest.raises(TypeError, match="dtype"):
        safetensors_io.write_safetensors(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex64)})


def test_diffusers_folder_sharded_and_pipeline_layout(model, tmp_path):
    _, expected = flux_ports.from_diffusers(model)
    model.save_pretrained(tmp_path / "pipe" / "transformer", safe_serialization=True, max_shard_size="40KB")
    names = os.listdir(tmp_path / "pipe" / "transformer")
    assert any(n.endswith(".safetensors.index.json") for n in names)
    for src in (tmp_path / "pipe" / "transformer", tmp_path / "pipe"):
        config, params = flux_ports.from_checkpoint(src)
        assert config.guidance_embeds and config.num_layers == 2
        assert_same_params(params, expected)


def test_single_files_both_layouts(model, config, tmp_path):
    _, expected = flux_ports.from_diffusers(model)
    diffusers_file = tmp_path / "flux_diffusers.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(diffusers_file))
    assert_same_params(flux_ports.from_checkpoint(diffusers_file, config)[1], expected)
    bfl_file = tmp_path / "flux1-tiny.safetensors"
    bfl = {"model.diffusion_model." + k: v for k, v in diffusers_to_bfl(model.state_dict()).items()}
    safetensors_io.write_safetensors(bfl_file, bfl)
    assert_same_params(flux_ports.from_checkpoint(bfl_file, config)[1], expected)


def test_dtype_cast_and_to_diffusers_round_trip(model, config):
    _, params = flux_ports.from_diffusers(model, dtype=ml_dtypes.bfloat16)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in flux_ports.flatten_params(params).values())
    _, params = flux_ports.from_diffusers(model)
    state = flux_ports.to_diffusers(params)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)
    assert_same_params(flux_ports.from_diffusers(state, config)[1], params)


def _expect_error(state, config, *needles):
    with pytest.raises(ValueError) as info:
        flux_ports.from_diffusers(state, config)
    for needle in needles:
        assert needle in str(info.value)


def test_bad_diffusers_checkpoints(model, config):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    missing = dict(state)
    del missing["transformer_blocks.1.attn.to_k.bias"]
    _expect_error(missing, config, "missing keys (1)", "transformer_blocks.1.attn.to_k.bias")
    extra = dict(state, **{"transformer_blocks.0.attn.to_qkv.weight": torch.zeros(96, 32)})
    _expect_error(extra, config, "unexpected keys (1)", "transformer_blocks.0.attn.to_qkv.weight")
    wrong = dict(state, **{"proj_out.weight": torch.zeros(5, 32)})
    _expect_error(wrong, config, "wrong shapes (1)", "proj_out.weight: got (5, 32), expected (4, 32)")
    both = dict(extra)
    del both["x_embedder.bias"]
    _expect_error(both, config, "missing keys", "x_embedder.bias", "unexpected keys", "to_qkv")
    # a model with fewer blocks than the config
    _expect_error({k: v for k, v in state.items() if "single_transformer_blocks.1." not in k}, config,
                  "single_transformer_blocks.1.proj_out.weight")
    with pytest.raises(ValueError, match="from_original"):
        flux_ports.from_diffusers(diffusers_to_bfl(model.state_dict()), config)
    with pytest.raises(TypeError, match="module_or_state_dict"):
        flux_ports.from_diffusers([1, 2], config)
    with pytest.raises(TypeError, match="config"):
        flux_ports.from_diffusers(state, dict(DEV_CONFIG))


def test_bad_bfl_checkpoints(model, config):
    bfl = diffusers_to_bfl(model.state_dict())
    with pytest.raises(ValueError, match=r"unknown or malformed keys .*double_blocks\.0\.img_attn\.lora\.weight"):
        flux_ports.from_original(dict(bfl, **{"double_blocks.0.img_attn.lora.weight": np.zeros(3)}), config)
    truncated = dict(bfl, **{"single_blocks.0.linear1.weight": bfl["single_blocks.0.linear1.weight"][:-1]})
    with pytest.raises(ValueError, match="single_blocks.0.linear1.weight"):
        flux_ports.from_original(truncated, config)
    no_guidance = {k: v for k, v in bfl.items() if not k.startswith("guidance_in.")}
    with pytest.raises(ValueError, match="missing keys.*guidance_embedder"):
        flux_ports.from_original(no_guidance, config)
    with pytest.raises(TypeError, match="config"):
        flux_ports.from_original(bfl, None)


def test_folder_without_safetensors_is_refused(model, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match="pickle"):
        flux_ports.from_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        flux_ports.from_checkpoint(tmp_path / "nothing_here")


def test_convert_cli(model, config, tmp_path):
    src = tmp_path / "src"
    model.save_pretrained(src, safe_serialization=True)
    dst = tmp_path / "dst"
    assert convert.main(["--model", "flux", "--src", str(src), "--dst", str(dst), "--dtype", "bfloat16"]) == 0
    assert sorted(os.listdir(dst)) == ["config.json", "params.safetensors"]
    with open(dst / "config.json") as f:
        assert flux.FluxConfig.from_diffusers(json.load(f)) == config
    loaded_config, params = flux_ports.load_params(dst)
    assert loaded_config == config
    _, expected = flux_ports.from_diffusers(model, dtype=ml_dtypes.bfloat16)
    assert_same_params(params, expected)
    # the module entry point, in a fresh interpreter, on a BFL single file with an explicit config
    bfl_file = tmp_path / "bfl.safetensors"
    safetensors_io.write_safetensors(bfl_file, diffusers_to_bfl(model.state_dict()))
    result = subprocess.run(
        [sys.executable, "-m", "chipmunk_jax.ports.convert", "--model", "flux", "--src", str(bfl_file),
         "--dst", str(tmp_path / "dst2"), "--config", str(dst / "config.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "converted FLUX" in result.stdout
    assert_same_params(flux_ports.load_params(tmp_path / "dst2")[1], flux_ports.from_diffusers(model)[1])
    # a bad source gives an error message and a non-zero status, and writes nothing
    assert convert.main(["--model", "flux", "--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "d3")]) == 1
    assert not (tmp_path / "d3").exists()
    # the same converter as a subcommand of the chipmunk-jax command
    assert cli.main(["convert", "--model", "flux", "--src", str(src), "--dst", str(tmp_path / "d4")]) == 0
    assert_same_params(flux_ports.load_params(tmp_path / "d4")[1], flux_ports.from_diffusers(model)[1])
