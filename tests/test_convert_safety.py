"""Safety of the checkpoint converter (``python -m chipmunk_jax.ports.convert``) and of the files it writes
(issue 27): --dst refused when it exists non-empty (unless --overwrite), is --src or inside it, or is a file;
temp files removed on every exit Python controls and stale ones (a killed run's) on the next run; the umask's
permissions; truncated safetensors named as such; CLI messages naming CLI flags; --prompt-embeds never unpickling.

Every test is fast: a tiny FLUX checkpoint (zeros in the diffusers layout, shapes from eval_shape) and no torch.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

from chipmunk_jax import config as chipmunk_config
from chipmunk_jax.apps import cli
from chipmunk_jax.models import flux
from chipmunk_jax.ports import common, convert, safetensors_io
from chipmunk_jax.ports import flux as flux_ports

TINY = flux.FluxConfig(in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))


def _state(config=TINY):
    return {k: np.zeros(shape, np.float32) for k, shape in flux_ports.expected_diffusers_shapes(config).items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny FLUX diffusers folder (config.json + one safetensors file) and the same weights as a single file."""
    root = tmp_path_factory.mktemp("ckpt")
    folder = root / "diffusers"
    folder.mkdir()
    state = _state()
    safetensors_io.write_safetensors(folder / "diffusion_pytorch_model.safetensors", state)
    (folder / "config.json").write_text(json.dumps(TINY.to_diffusers()))
    single = root / "single.safetensors"  # head_dim 16: a single file needs --config
    safetensors_io.write_safetensors(single, state)
    return {"folder": folder, "single": single, "config": folder / "config.json"}


def _convert(*args) -> int:
    return convert.main(["--model", "flux", *map(str, args)])


def _exit_code(*args) -> int:
    with pytest.raises(SystemExit) as info:
        _convert(*args)
    return info.value.code


def _temp_files(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith(safetensors_io.TEMP_PREFIX))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---- row 1: an existing non-empty --dst ------------------------------------------------------------------------


def test_existing_non_empty_dst_is_refused_without_overwrite(checkpoint, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    assert _exit_code("--src", checkpoint["folder"], "--dst", dst) == 2
    err = capsys.readouterr().err
    assert "--dst" in err and "not empty" in err and "--overwrite" in err
    assert sorted(os.listdir(dst)) == ["notes.txt"]  # untouched
    # --overwrite replaces the params and config, and leaves the other files alone
    assert _convert("--src", checkpoint["folder"], "--dst", dst, "--overwrite") == 0
    assert sorted(os.listdir(dst)) == ["config.json", "notes.txt", "params.safetensors"]
    # a second conversion into the now-full folder needs --overwrite again
    assert _exit_code("--src", checkpoint["folder"], "--dst", dst) == 2
    assert _convert("--src", checkpoint["folder"], "--dst", dst, "--overwrite") == 0
    loaded_config, _ = flux_ports.load_params(dst)
    assert loaded_config == TINY


def test_new_or_empty_dst_needs_no_overwrite(checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _convert("--src", checkpoint["folder"], "--dst", empty) == 0
    assert _convert("--src", checkpoint["single"], "--dst", tmp_path / "new" / "nested",
                    "--config", checkpoint["config"]) == 0


# ---- row 2: --dst is --src or inside it ------------------------------------------------------------------------


def test_dst_equal_to_or_inside_src_is_refused(checkpoint, tmp_path, capsys):
    folder, single = checkpoint["folder"], checkpoint["single"]
    for src, dst in ((folder, folder), (folder, folder / "converted"), (single, single),
                     (folder, os.path.join(folder, "..", folder.name, "sub"))):
        assert _exit_code("--src", src, "--dst", dst, "--overwrite") == 2
        err = capsys.readouterr().err
        assert "--dst" in err and "--src" in err and "inside it" in err
    assert sorted(os.listdir(checkpoint["folder"])) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_src_that_is_an_output_file_of_dst_is_refused(checkpoint, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    src = dst / "params.safetensors"
    src.write_bytes(checkpoint["single"].read_bytes())
    assert _exit_code("--src", src, "--dst", dst, "--overwrite") == 2
    assert "--src" in (err := capsys.readouterr().err) and "is one of the files the conversion writes" in err


# ---- row 3: --dst is a file -------------------------------------------------------------------------------------


def test_dst_that_is_a_file_is_a_clear_error(checkpoint, tmp_path, capsys):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"keep me")
    for extra in ((), ("--overwrite",)):
        assert _exit_code("--src", checkpoint["folder"], "--dst", dst, *extra) == 2
        err = capsys.readouterr().err
        assert "--dst" in err and "is an existing file" in err and "Traceback" not in err
    assert dst.read_bytes() == b"keep me"


# ---- row 4: temp files ------------------------------------------------------------------------------------------


_ATOMIC_WRITE = safetensors_io.atomic_write


def _interrupt_while_writing(monkeypatch, interrupt):
    """atomic_write that calls ``interrupt()`` half-way through writing its temp file (the file exists then)."""
    original = _ATOMIC_WRITE
    seen = []

    def interrupted(path, write, **kwargs):
        def write_then_interrupt(f):
            f.write(b"partial")
            f.flush()
            seen.extend(_temp_files(os.path.dirname(os.path.abspath(path))))
            interrupt()
            write(f)

        return original(path, write_then_interrupt, **kwargs)

    monkeypatch.setattr(safetensors_io, "atomic_write", interrupted)
    return seen


def test_sigterm_during_a_conversion_removes_the_temp_file(checkpoint, tmp_path, monkeypatch, capsys):
    seen = _interrupt_while_writing(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    dst = tmp_path / "out"
    assert _convert("--src", checkpoint["folder"], "--dst", dst) == 128 + signal.SIGTERM
    assert "SIGTERM" in capsys.readouterr().err
    assert len(seen) == 1 and seen[0].startswith(f"{safetensors_io.TEMP_PREFIX}{os.getpid()}-")
    assert os.listdir(dst) == []  # the temp file is gone, and no params or config were written
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI's handler is uninstalled


def test_keyboard_interrupt_and_errors_remove_the_temp_file(checkpoint, tmp_path, monkeypatch, capsys):
    def ctrl_c():
        raise KeyboardInterrupt

    seen = _interrupt_while_writing(monkeypatch, ctrl_c)
    assert _convert("--src", checkpoint["folder"], "--dst", tmp_path / "a") == 130
    assert "interrupted" in capsys.readouterr().err
    assert seen and os.listdir(tmp_path / "a") == []

    def disk_full():
        raise OSError(28, "No space left on device")

    seen = _interrupt_while_writing(monkeypatch, disk_full)
    assert _convert("--src", checkpoint["folder"], "--dst", tmp_path / "b") == 1
    assert "No space left" in capsys.readouterr().err
    assert seen and os.listdir(tmp_path / "b") == []


def test_a_later_run_removes_stale_temp_files_but_not_live_ones(checkpoint, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    stale = dst / f"{safetensors_io.TEMP_PREFIX}{_dead_pid()}-0123abcd.safetensors"
    stale.write_bytes(b"x" * 100)
    assert _convert("--src", checkpoint["folder"], "--dst", dst) == 0  # only stale temp files: counts as empty
    assert sorted(os.listdir(dst)) == ["config.json", "params.safetensors"]
    # a live process's temp file (a concurrent conversion: here the parent process) is kept
    live = dst / f"{safetensors_io.TEMP_PREFIX}{os.getppid()}-4567cdef.safetensors"
    live.write_bytes(b"y")
    stale.write_bytes(b"x")
    assert _convert("--src", checkpoint["folder"], "--dst", dst, "--overwrite") == 0
    assert _temp_files(dst) == [live.name]
    # the Python API's writers clean up too
    stale.write_bytes(b"x")
    safetensors_io.write_safetensors(dst / "other.safetensors", {"a": np.zeros(2, np.float32)})
    assert _temp_files(dst) == [live.name]


# ---- row 5: permissions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(checkpoint, tmp_path, umask):
    old = os.umask(umask)
    try:
        dst = tmp_path / "out"
        assert _convert("--src", checkpoint["folder"], "--dst", dst) == 0
        cfg = tmp_path / "chipmunk.yaml"
        chipmunk_config.flux().save(cfg)
        cfg_json = tmp_path / "chipmunk.json"
        chipmunk_config.flux().save(cfg_json)
    finally:
        os.umask(old)
    for path in (dst / "params.safetensors", dst / "config.json", cfg, cfg_json):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, path


# ---- row 6: truncated safetensors -------------------------------------------------------------------------------


def test_truncated_safetensors_says_truncated(tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors_io.write_safetensors(path, {"a": np.zeros((4, 8), np.float32), "b": np.ones(16, np.float32)})
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[:header_end + 50])
    with pytest.raises(ValueError, match=r"is truncated: the header promises 192 bytes of data, the file holds 50"):
        safetensors_io.read_safetensors(path)
    path.write_bytes(data[:header_end])
    with pytest.raises(ValueError, match="the file holds 0"):
        safetensors_io.read_safetensors(path)
    path.write_bytes(data[:20])
    with pytest.raises(ValueError, match="is truncated"):
        safetensors_io.read_safetensors(path)


def test_truncated_checkpoint_through_the_cli(checkpoint, tmp_path, capsys):
    src = tmp_path / "cut.safetensors"
    src.write_bytes(checkpoint["single"].read_bytes()[:-10])
    assert _convert("--src", src, "--dst", tmp_path / "out", "--config", checkpoint["config"]) == 1
    assert "is truncated" in capsys.readouterr().err


# ---- row 7: CLI messages name CLI flags ------------------------------------------------------------------------


def test_single_file_without_config_names_the_cli_flag(checkpoint, tmp_path, capsys):
    src = checkpoint["single"]  # head_dim 16: axes_dims_rope cannot be inferred
    assert _convert("--src", src, "--dst", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "pass --config" in err and "config=" not in err
    # the Python API keeps naming its keyword
    with pytest.raises(ValueError, match="pass config="):
        flux_ports.from_checkpoint(src)
    # and --config makes it work
    assert _convert("--src", src, "--dst", tmp_path / "out", "--config", checkpoint["config"]) == 0


# ---- row 8: --prompt-embeds never unpickles --------------------------------------------------------------------


def test_prompt_embeds_must_be_an_npz_and_pickles_are_never_loaded(tmp_path):
    config = TINY
    json_file = tmp_path / "embeds.json"
    json_file.write_text(json.dumps({"prompt_embeds": [[0.0]]}))
    npy_file = tmp_path / "embeds.npy"
    np.save(npy_file, np.zeros((1, 3, 32), np.float32))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, prompt_embeds=np.array([{"a": 1}], dtype=object),
             pooled_prompt_embeds=np.zeros((1, 32), np.float32))
    for path, words in ((json_file, "is not an .npz archive"), (npy_file, "is not an .npz archive"),
                        (pickled, "object array")):
        with pytest.raises(cli.UsageError) as info:
            cli._load_prompt_embeds(str(path), config)
        message = str(info.value)
        assert message.startswith("--prompt-embeds must be an .npz file written by numpy.savez"), message
        assert words in message and "allow_pickle" not in message
    good = tmp_path / "good.npz"
    np.savez(good, prompt_embeds=np.zeros((1, 3, 32), np.float32), pooled_prompt_embeds=np.zeros((1, 32), np.float32))
    text, pooled = cli._load_prompt_embeds(str(good), config)
    assert text.shape == (1, 3, 32) and pooled.shape == (1, 32)


def test_params_folder_round_trip_leaves_no_temp_files(tmp_path):
    params = common.unflatten_params({"a.kernel": np.ones((2, 3), np.float32)})
    common.write_params_folder(tmp_path / "p", {"x": 1}, params, "test")
    assert sorted(os.listdir(tmp_path / "p")) == ["config.json", "params.safetensors"]
