"""The speed-vs-quality sweep (chipmunk_jax.apps.pareto): its report logic, its arguments, and short runs."""

import json

import pytest

from chipmunk_jax.apps import pareto


def _entry(method, name, compute, psnr):
    return {"method": method, "name": name, "compute": compute, "psnr": psnr}


def test_frontier_keeps_the_best_psnr_at_each_compute():
    xs, ys = pareto._frontier([(0.5, 30.0), (0.3, 25.0), (0.4, 24.0), (0.5, 31.0), (0.7, 29.0)])
    assert xs.tolist() == [0.3, 0.5] and ys.tolist() == [25.0, 31.0]


def test_equal_compute_comparison_names_where_chipmunk_is_not_higher():
    settings = [_entry("FirstBlockCache", "t1", 0.4, 20.0), _entry("FirstBlockCache", "t2", 0.8, 40.0),
                _entry("Chipmunk", "a", 0.6, 35.0),  # baseline at 0.6: 30 dB
                _entry("Chipmunk + step cache", "b", 0.5, 20.0),  # baseline at 0.5: 25 dB
                _entry("Chipmunk", "c", 0.2, 50.0),  # outside the baseline's range
                _entry("TeaCache", "t", 0.9, 10.0)]
    lines = pareto.equal_compute_comparison(settings)
    assert len(lines) == 2
    assert "vs FirstBlockCache" in lines[0] and "higher at 1 of 2 settings: Chipmunk / a (60%: 35.00 vs 30.00 dB)" \
        in lines[0]
    assert "Not higher: Chipmunk + step cache / b (50%: 20.00 vs 25.00 dB)" in lines[0]
    assert "1 Chipmunk settings outside" in lines[0]
    assert "vs TeaCache" in lines[1] and "no Chipmunk setting" in lines[1]


def test_report_marks_random_weights():
    results = {"run": {"model": "video", "weights": "random", "steps": 2, "images": 1, "seeds": [0], "quick": True,
                       "backend": "cpu"},
               "title": "tiny Wan", "dense": {"label_check": 0.0},
               "settings": [dict(_entry("Chipmunk", "preset", 0.5, 30.0), computed_steps=2, psnr_std=0.0,
                                 psnr_seeds=[30.0], ssim=0.9, label_check=0.0)]}
    text = pareto.markdown_report([results])
    assert "RANDOM WEIGHTS" in text
    assert "| Chipmunk | preset | 50.0% | 2 | 30.00 +- 0.00 | 30.00 | 0.9000 | 0% |" in text


def test_sweep_settings_cover_every_series():
    from chipmunk_jax.apps.tiny.sampling import tiny_chipmunk_config

    subject = pareto.Subject(**{f: None for f in pareto.Subject.__dataclass_fields__} | {
        "preset_name": "preset", "preset": tiny_chipmunk_config, "mlp_sparsity": True,
        "reference_settings": lambda num_steps: ()})
    methods = {s.method for s in pareto.sweep_settings(subject, 50)}
    assert methods == {"Chipmunk", "Chipmunk + step cache", "FirstBlockCache", "TeaCache", "MagCache",
                       "Chipmunk + FirstBlockCache", "Chipmunk + TeaCache", "Chipmunk + MagCache"}
    quick = pareto.sweep_settings(subject, 50, quick=True)
    assert len({s.method for s in quick}) == len(quick)
    keys = [s.key for s in pareto.sweep_settings(subject, 50)]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("argv, message", [(["--images", "0"], "--images"), (["--seeds", "1", "1"], "distinct"),
                                           (["--seeds", "10000"], "calibration"),
                                           (["--weights", "x", "--random-weights"], "exclude")])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        pareto._parse(argv)
    assert message in capsys.readouterr().err


def test_video_without_trained_weights_errors_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="--random-weights"):
        pareto.main(["--model", "video", "--weights", str(tmp_path), "--out", str(tmp_path / "out")])


def _run(tmp_path, *argv):
    out = tmp_path / "out"
    assert pareto.main([*argv, "--quick", "--steps", "3", "--images", "1", "--seeds", "0", "1",
                        "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_quick_image_sweep_writes_its_files(tmp_path):
    out = _run(tmp_path)
    results = json.loads((out / "pareto_image.json").read_text())
    assert len(results["settings"]) == len(pareto.sweep_settings(pareto.image_subject(), 3, quick=True))
    assert len(results["magnitude_ratios"]) == 3 and results["plots"] == ["pareto_image.png"]
    for entry in results["settings"]:
        assert 0 < entry["compute"] < 1.5 and len(entry["psnr_seeds"]) == 2 and 0 <= entry["label_check"] <= 1
    assert (out / "pareto_image.png").read_bytes().startswith(b"\x89PNG")
    text = (out / "pareto.md").read_text()
    assert "| Chipmunk | FLUX preset (tiny) |" in text and "RANDOM" not in text
    # --resume keeps an equal run's settings (nothing is sampled again)
    before = (out / "pareto_image.json").read_text()
    assert pareto.main(["--quick", "--steps", "3", "--images", "1", "--seeds", "0", "1", "--out", str(out),
                        "--resume"]) == 0
    assert json.loads((out / "pareto_image.json").read_text())["settings"] == json.loads(before)["settings"]


@pytest.mark.slow
def test_quick_video_sweep_with_random_weights(tmp_path):
    out = _run(tmp_path, "--model", "video", "--random-weights")
    results = json.loads((out / "pareto_video.json").read_text())
    assert results["run"]["weights"] == "random" and results["settings"]
    assert "RANDOM WEIGHTS" in (out / "pareto.md").read_text()
