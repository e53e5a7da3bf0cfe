"""The persistent compilation cache of the applications (``chipmunk_jax.apps.compile_cache``, the CLI's
``--compile-cache``): a fresh process loads a compiled executable another process wrote, "none" writes nothing,
bad folders are a ValueError naming the path, and the CLI's option and its default.

The cache tests run their compiles in subprocesses (JAX's cache state is per process); the in-process tests restore
JAX's cache settings afterwards (``restore_jax_cache_config``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from chipmunk_jax.apps import cli
from chipmunk_jax.apps import compile_cache as cc

ROOT = Path(__file__).resolve().parent.parent
TINY_WEIGHTS = ROOT / "chipmunk_jax" / "apps" / "tiny" / "weights"
_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")

# compile one small jitted function after enable_compile_cache(argv[1]); print what the persistent cache did
_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from chipmunk_jax.apps.compile_cache import enable_compile_cache, watch_compile_cache

    path = enable_compile_cache(sys.argv[1])
    x = np.ones((8, 8), np.float32)
    with watch_compile_cache() as events:  # one executable
        jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0).lower(x).compile()
    print(json.dumps(dict(path=path, hits=events.hits, writes=events.writes,
                          jax_dir=jax.config.jax_compilation_cache_dir)))
""")


@pytest.fixture
def restore_jax_cache_config():
    """Put JAX's persistent-cache settings (and its per-process cache state) back after an in-process test."""
    saved = {name: getattr(jax.config, name) for name in _SETTINGS}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()


def _clean_env(tmp_path) -> dict[str, str]:
    """The test's environment without JAX cache settings; XDG_CACHE_HOME in tmp_path (the default folder)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    return env


def _compile_in_subprocess(tmp_path, cache_arg: str) -> dict:
    script = tmp_path / "compile_once.py"
    script.write_text(_SCRIPT)
    done = subprocess.run([sys.executable, str(script), cache_arg], env=_clean_env(tmp_path), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.mark.slow
def test_a_fresh_process_loads_the_executable_another_wrote(tmp_path):
    folder = tmp_path / "cache"  # does not exist yet: created
    first = _compile_in_subprocess(tmp_path, str(folder))
    assert first["path"] == first["jax_dir"] == str(folder)
    assert first == dict(first, hits=0, writes=1)
    entries = _files(folder)
    assert entries and all(p.name.endswith("-cache") for p in entries)
    second = _compile_in_subprocess(tmp_path, str(folder))
    assert second == dict(second, hits=1, writes=0)  # loaded from disk, not compiled
    assert sorted(_files(folder)) == sorted(entries)


@pytest.mark.slow
def test_none_writes_nothing(tmp_path):
    for arg in ("none", "None"):
        result = _compile_in_subprocess(tmp_path, arg)
        assert result == dict(path=None, hits=0, writes=0, jax_dir=None)
    assert _files(tmp_path / "xdg") == [] and not (tmp_path / "none").exists()


def test_none_leaves_jax_settings_alone(restore_jax_cache_config):
    before = {name: getattr(jax.config, name) for name in _SETTINGS}
    assert cc.enable_compile_cache(None) is None and cc.enable_compile_cache("none") is None
    assert {name: getattr(jax.config, name) for name in _SETTINGS} == before


def test_enable_sets_jax_settings(tmp_path, monkeypatch, restore_jax_cache_config):
    monkeypatch.chdir(tmp_path)
    path = cc.enable_compile_cache("rel/xla")  # relative: made absolute, parents created
    assert path == str(tmp_path / "rel" / "xla") and os.path.isdir(path)
    assert jax.config.jax_compilation_cache_dir == path
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1


def test_a_file_or_a_file_parent_is_a_value_error(tmp_path, restore_jax_cache_config):
    before = jax.config.jax_compilation_cache_dir
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(ValueError, match="a_file' exists and is not a folder"):
        cc.enable_compile_cache(str(a_file))
    with pytest.raises(ValueError, match="cannot create .*a_file/xla"):
        cc.enable_compile_cache(str(a_file / "xla"))
    with pytest.raises(ValueError, match="empty path"):
        cc.enable_compile_cache("")
    assert jax.config.jax_compilation_cache_dir == before and a_file.read_text() == "not a folder"


def test_default_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cc.default_compile_cache_dir() == str(tmp_path / "chipmunk-jax" / "xla")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for xdg in ("", "relative/cache"):  # empty or relative: ignored (XDG base directory spec)
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert cc.default_compile_cache_dir() == str(tmp_path / "home" / ".cache" / "chipmunk-jax" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cc.default_compile_cache_dir() == str(tmp_path / "home" / ".cache" / "chipmunk-jax" / "xla")
    assert not (tmp_path / "home").exists()  # asking creates nothing


def test_watch_counts_nothing_without_a_cache(restore_jax_cache_config):
    jax.config.update("jax_compilation_cache_dir", None)
    jax_cache.reset_cache()
    with cc.watch_compile_cache() as events:
        jax.jit(lambda x: x * 3.0 - 1.0).lower(np.ones(5, np.float32)).compile()
    assert (events.hits, events.writes, events.describe()) == (0, 0, "not used")
    assert cc.CacheEvents(hits=1).describe() == "hit" and cc.CacheEvents(writes=1).describe() == "written"


def test_cli_option_and_its_default_in_help(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    base = ["generate", "--weights", "W", "--prompt-embeds", "p.npz", "--out", "x.npy"]
    assert cli._parser().parse_args(base).compile_cache == str(tmp_path / "chipmunk-jax" / "xla")
    assert cli._parser().parse_args([*base, "--compile-cache", "none"]).compile_cache == "none"
    assert cli._parser().parse_args([*base, "--compile-cache", "/x/y"]).compile_cache == "/x/y"
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps long paths, also at hyphens
    assert "--compile-cacheDIR|none" in help_text
    assert f"(default:{tmp_path / 'chipmunk-jax' / 'xla'})" in help_text


def test_cli_refuses_a_file_as_cache_folder(tmp_path, capsys, restore_jax_cache_config):
    a_file = tmp_path / "cache_file"
    a_file.write_text("")
    code = cli.main(["generate", "--weights", str(TINY_WEIGHTS), "--prompt-embeds", "p.npz", "--out",
                     str(tmp_path / "x.npy"), "--compile-cache", str(a_file)])
    assert code == 1
    assert f"--compile-cache: compile cache folder '{a_file}' exists and is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_second_run_compiles_from_disk(tmp_path):
    """The shipped tiny FLUX model on CPU, two ``chipmunk-jax generate`` processes with the same shapes."""
    rng = np.random.default_rng(0)
    embeds = tmp_path / "prompt.npz"
    np.savez(embeds, prompt_embeds=rng.standard_normal((1, 4, 64)).astype(np.float32),
             pooled_prompt_embeds=rng.standard_normal((1, 64)).astype(np.float32))
    folder = tmp_path / "xla"
    errs = []
    for run in ("a", "b"):
        done = subprocess.run(
            [sys.executable, "-m", "chipmunk_jax.apps.cli", "generate", "--weights", str(TINY_WEIGHTS),
             "--prompt-embeds", str(embeds), "--height", "64", "--width", "64", "--steps", "2", "--dense",
             "--no-progress", "--compile-cache", str(folder), "--out", str(tmp_path / f"{run}.npy")],
            env=_clean_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        errs.append(done.stderr)
    assert "compiled in" in errs[0] and f"(persistent cache: {folder}, written)" in errs[0], errs[0]
    assert f"(persistent cache: {folder}, hit)" in errs[1], errs[1]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert _files(tmp_path / "xdg") == []  # the default folder is not touched
