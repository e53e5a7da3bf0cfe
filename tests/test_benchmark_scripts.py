"""The GPU benchmark scripts run end to end on CPU with --tiny, so a refactor cannot break them unseen."""

import json
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
        ("flux_nnx.py", "nnx / functional: compile"),
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


def test_flux_pipeline_e2e_runs_tiny_on_cpu(tmp_path):
    """flux_pipeline_e2e.py --tiny: the in-memory FluxPipeline end to end for every variant, each row's parts adding
    up to its total (shares to 100%), the section written to --results."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")  # compiling dominates on a CPU
    results = tmp_path / "pipeline.md"
    proc = subprocess.run(
        [sys.executable, "-P", os.path.join(ROOT, "benchmarks", "flux_pipeline_e2e.py"), "--tiny", "--results",
         str(results)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    assert text.strip() in proc.stdout and "FAILED" not in text
    assert "## FLUX.1-dev pipeline end to end" in text and "T5 1.0 M params" in text
    rows = {r[0]: r for r in (line.strip("| ").split(" | ") for line in text.splitlines())
            if r[0] in ("dense", "chipmunk", "chipmunk+cache")}
    assert [rows[v][1] for v in ("dense", "chipmunk", "chipmunk+cache")] == ["4/4", "4/4", "3/4"], text
    for row in rows.values():
        parts = [re.fullmatch(r"([\d.]+) \(([\d.]+)%\)", cell) for cell in row[2:6]]  # encode, sampling, decode, other
        assert all(parts), row
        assert abs(sum(float(m[2]) for m in parts) - 100) < 0.5, row
        assert abs(sum(float(m[1]) for m in parts) - float(row[6])) < 0.01, row
        assert float(row[10]) > 0 and row[-1] == "1", row  # the warm-up's compile seconds; one timed call


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


@pytest.mark.parametrize("script, headings, source_column", [
    ("wan_e2e.py", (": dense invocation", ": Chipmunk DENSE_COLSUM invocation", ": Chipmunk SPARSE invocation"), True),
    ("hunyuan_e2e.py", ("### dense step", "### Chipmunk DENSE_COLSUM step", "### Chipmunk SPARSE step"), False),
])
def test_video_e2e_profile_runs_tiny_on_cpu(tmp_path, script, headings, source_column):
    """--profile: the dense call and every Chipmunk step kind get a kernel table."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-P", os.path.join(ROOT, "benchmarks", script), "--tiny", "--profile", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for heading in ("Device profiles", *headings, "| category | ms/call |"):
        assert heading in proc.stdout, (heading, proc.stdout[-3000:])
    if source_column:
        assert re.search(r"\| \w+\.py:\d+ \w+ \|", proc.stdout)  # the source column


def test_wan_e2e_a14b_composes_the_expert_switch(tmp_path):
    """wan_e2e --model wan2.2-t2v-a14b: the 50 steps composed with the expert switch made a full step, one more
    refresh (DENSE_COLSUM) than Wan 2.1's schedule, the switch's step from the release's shift and boundary."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    counts = {}
    for model in ("wan2.1-t2v-14b", "wan2.2-t2v-a14b"):
        proc = subprocess.run(
            [sys.executable, "-P", os.path.join(ROOT, "benchmarks", "wan_e2e.py"), "--tiny", "--model", model],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts[model] = re.search(r"- DENSE_COLSUM: [\d.]+ ms x (\d+) / (\d+)", proc.stdout).groups()
        if model == "wan2.2-t2v-a14b":
            assert "switch at step 32 of 50 (flow shift 12" in proc.stdout, proc.stdout[-3000:]
    assert [int(c) + 1 for c in counts["wan2.1-t2v-14b"]] == [int(c) for c in counts["wan2.2-t2v-a14b"]]


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


def test_multi_gpu_runs_tiny_on_fake_devices(tmp_path):
    """multi_gpu.py on 8 fake CPU devices: P = 1, 2, 4 of both models and modes (HunyuanVideo sequence parallel, Wan
    cfg 2 x sequence P/2), a P over the device count as a skipped row, collectives only where a mesh is, the JSON."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1")  # as tests/conftest.py: compiling dominates on a CPU
    results, rows_file = tmp_path / "multi_gpu.md", tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-P", os.path.join(ROOT, "benchmarks", "multi_gpu.py"), "--tiny", "--devices", "1,2,4,16",
         "--results", str(results), "--json", str(rows_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    assert text.strip() in proc.stdout
    assert "### HunyuanVideo:" in text and "### Wan2.1-T2V-14B, CFG:" in text
    rows = [line.split(" | ") for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 2 * 4 * 2, text  # models x P x modes
    meshes = {(r[0].strip("| "), r[1]) for r in rows}
    assert {("2", "cfg 1 x sequence 2"), ("4", "cfg 1 x sequence 4"), ("2", "cfg 2 x sequence 1"),
            ("4", "cfg 2 x sequence 2"), ("1", "one device")} <= meshes
    for r in rows:
        if r[0].strip("| ") == "16":
            assert r[3] == "skipped: only 8 device(s)", r
            continue
        assert not r[3].startswith("skipped"), r
        kinds = ["dense model"] if r[2] == "dense" else ["DENSE", "DENSE_COLSUM", "SPARSE", "SKIPPED"]
        assert [k.rsplit(" ", 1)[0] for k in r[3].split(", ")] == kinds, r
        assert float(r[4]) > 0 and r[8] == "n/a"  # 50-step seconds; no memory stats on the CPU backend
        moved = [float(k.rsplit(" ", 1)[1]) for k in r[9].strip(" |").split(", ")]
        assert (max(moved) > 0) == (r[0].strip("| ") != "1"), r  # collectives only on a mesh
        if r[0].strip("| ") == "1":
            assert r[6:8] == ["1.00x", "1.00"], r  # its own baseline
    saved = json.loads(rows_file.read_text())["rows"]
    assert len(saved) == 16 and sum("error" in r for r in saved) == 4
