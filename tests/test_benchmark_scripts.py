"""The GPU benchmark scripts run end to end on CPU with --tiny, so a refactor cannot break them unseen."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow  # every test runs a benchmark script in a fresh interpreter (8-45 s each on CPU)


@pytest.mark.parametrize(
    "script, expected",
    [
        ("flux_e2e.py", "SPARSE + SPARSE_REUSE"),
        ("hunyuan_e2e.py", "SKIPPED"),
        ("wan_e2e.py", "SKIP (head)"),
        ("flux_sample.py", "chipmunk+cache"),
    ],
)
def test_benchmark_script_runs_tiny_on_cpu(tmp_path, script, expected):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-P", os.path.join(ROOT, "benchmarks", script), "--tiny"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout, proc.stdout[-3000:]
    assert not list(tmp_path.iterdir())  # nothing written without --results


def test_flux_profile_runs_tiny_on_cpu(tmp_path):
    """The profiler script parses its own perfetto trace (CPU thunks stand in for GPU kernels)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path / "profile.md"
    proc = subprocess.run(
        [sys.executable, "-P", os.path.join(ROOT, "benchmarks", "flux_profile.py"), "--tiny", "--calls", "1",
         "--dispatch", "static", "--kinds", "SPARSE+SPARSE_REUSE", "--trace-dir", str(tmp_path / "traces"),
         "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "### dense model" in text and "SPARSE+SPARSE_REUSE (step" in text and "| category | ms/call |" in text
    assert re.search(r"\| \w+\.py:\d+ \w+ \|", text)  # fusions attributed to model source lines


def test_wan_e2e_profile_runs_tiny_on_cpu(tmp_path):
    """wan_e2e --profile: the dense invocation and every Chipmunk step kind get a kernel table."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-P", os.path.join(ROOT, "benchmarks", "wan_e2e.py"), "--tiny", "--profile", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for heading in ("Device profiles", ": dense invocation", ": Chipmunk DENSE_COLSUM invocation",
                    ": Chipmunk SPARSE invocation", "| category | ms/call |"):
        assert heading in proc.stdout, (heading, proc.stdout[-3000:])
    assert re.search(r"\| \w+\.py:\d+ \w+ \|", proc.stdout)  # the source column


def test_mlp_benchmark_runs_tiny_on_cpu(tmp_path):
    """mlp.py --cpu-smoke: both kernel families' sweeps (interpreters), the full steps and the table."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path / "mlp.md"
    proc = subprocess.run(
        [sys.executable, "-P", os.path.join(ROOT, "benchmarks", "mlp.py"), "--cpu-smoke", "--quick",
         "--kernels", "pallas,triton", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for line in ("fc1 128x64 w4s3:", "triton fc1 128 tok w4s3:", "triton fc2 128x64 w4s5:",
                 "full sparse step, best Triton choices", "fastest full step:", "| flux_double |"):
        assert line in text, (line, text[-3000:])
    assert "ERROR" not in text and "FAILED" not in text
