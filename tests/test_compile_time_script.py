"""benchmarks/compile_time.py runs on CPU with --tiny: every requested (model, mode, dispatch) row compiles its sampler
from abstract inputs and lands in the --json rows with its timings and memory figures."""

import itertools
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# FLUX (one invocation per step, prepare_params) and Wan (CFG: two branches, stacked caches, RoPE in cond); static
# dispatch only, to stay near a minute on a 2-core CPU (the traced rows and HunyuanVideo take the same code paths).
MODELS, MODES, DISPATCH = ("flux", "wan"), ("dense", "chipmunk"), ("static",)


@pytest.mark.slow
def test_compile_time_script_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    # XLA's optimisation passes off (as tests/conftest.py does in-process): this checks the script, not the seconds
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    proc = subprocess.run(
        [sys.executable, "-P", os.path.join(ROOT, "benchmarks", "compile_time.py"), "--tiny", "--steps", "4",
         "--models", ",".join(MODELS), "--modes", ",".join(MODES), "--dispatch", ",".join(DISPATCH),
         "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| model | mode | dispatch |" in proc.stdout, proc.stdout[-3000:]
    data = json.loads(out.read_text())
    assert data["tiny"] and data["steps"] == 4 and data["backend"] == "cpu"
    rows = data["rows"]
    assert [(r["model"], r["mode"], r["dispatch"]) for r in rows] == list(itertools.product(MODELS, MODES, DISPATCH))
    for r in rows:
        assert "error" not in r, r
        assert r["compile_s"] > 0 and r["lower_s"] > 0, r
        assert r["weights_gib"] > 0 and r["caches_gib"] > 0, r  # the step cache is carried in every mode
        assert math.isclose(r["budget_gib"], r["weights_gib"] + r["caches_gib"] + 3.0)
        if r["peak_gib"] is not None:  # memory_analysis() may leave fields out on some backends
            assert r["peak_gib"] > 0 and r["fits"] is True, r
        assert r["cfg"] == (r["model"] == "wan")
        assert r["bodies"] == (1 if r["mode"] == "dense" else 3), r  # steps 0-3: dense, dense+colsum, sparse
    by_mode = {(r["model"], r["mode"]): r for r in rows}
    for model in MODELS:  # Chipmunk adds caches and the prepared/sparse paths
        assert by_mode[model, "chipmunk"]["caches_gib"] > by_mode[model, "dense"]["caches_gib"]
    assert not [p for p in tmp_path.iterdir() if p != out]  # nothing else written
