"""Speed-vs-quality (Pareto) sweep of the tiny models: PSNR / SSIM vs dense against the executed-compute fraction.

    python -m chipmunk_jax.apps.pareto [--model image|video] [--images 4] [--seeds 0 1] [--steps 50] [--quick]
                                       [--out benchmarks/quality] [--weights DIR] [--random-weights] [--resume]

For one tiny model (image: the shipped tiny FLUX; video: the shipped tiny Wan; ``--random-weights`` for a smoke test
whose numbers say nothing about quality), from the same noise as the dense run on every seed: Chipmunk at the
model's preset, at the full-size presets mapped to the tiny grid (video: ``tiny_video.sampling.
video_reference_settings``) and swept around it (attention / MLP top-k, full-step interval),
Chipmunk + its static step caching, the step-caching baselines (FirstBlockCache, TeaCache, MagCache;
docs/algorithm.md §4.5) over a range of thresholds, and Chipmunk with a baseline policy. The executed compute of
each setting is ``apps.compute.executed_flops`` (schedule, densities, and the policy run's ``computed`` mask) as a
fraction of the dense sampler's. MagCache's magnitude ratios are calibrated once
(``sampling.calibrate_magnitude_ratios``) on a dense run of held-out noise (seed 10,000), as the paper calibrates
one table per schedule and reuses it for every prompt.

Writes to ``--out``: ``pareto_<model>.json`` (after every setting; ``--resume`` keeps the settings already measured by
a run of the same model, weights, preset, steps, samples, seeds and backend), ``pareto_<model>.png`` (PSNR vs
compute, one series per method) and ``pareto.md`` (a table per model json present in ``--out`` and the
equal-compute comparison of Chipmunk with each baseline).

Metrics per sample against the dense sample of the same noise: PSNR (``apps.images.psnr``; per video one MSE over
all frames), SSIM (per frame), and the label check (the fraction of samples whose every label is recognised).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.apps import compute
from chipmunk_jax.apps.images import psnr, ssim
from chipmunk_jax.apps.quality import COLOURS, write_charts
from chipmunk_jax.apps.tiny.sampling import SamplerSetup, calibrate_magnitudes, timed_sample
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.step_policies import FirstBlockCache, MagCache, StepPolicy, TeaCache

__all__ = ["Subject", "Setting", "image_subject", "video_subject", "sweep_settings", "equal_compute_comparison",
           "markdown_report", "main"]

POLICIES: dict[str, type[StepPolicy]] = {"FirstBlockCache": FirstBlockCache, "TeaCache": TeaCache,
                                         "MagCache": MagCache}
CALIBRATION_SEED = 10_000


@dataclasses.dataclass(frozen=True)
class Subject:
    """A tiny model under test: its Chipmunk preset, how to condition, sample, decode, score and count it."""

    name: str  # "image" | "video": the output files' suffix
    title: str
    preset_name: str
    preset: Callable[..., ChipmunkConfig]  # (num_steps, **changes) -> the model's tiny preset
    labels: Callable[[int, int], np.ndarray]  # (seed, count) -> [count, kinds] label ids
    noise: Callable[[int, int], np.ndarray]  # (seed, count) -> noise in the sampler's layout
    setup: Callable[[Any, Any, ChipmunkConfig | None, int], SamplerSetup]  # (labels, noise shape, chipmunk, steps)
    frames: Callable[[np.ndarray], np.ndarray]  # samples -> [B, H, W, 3] images or [B, F, H, W, 3] videos in [-1, 1]
    psnr: Callable[[np.ndarray, np.ndarray], float]
    ssim: Callable[[np.ndarray, np.ndarray], float]
    label_check: Callable[[np.ndarray, np.ndarray], dict]  # (frames, labels) -> {kind: accuracy, ..., all_key: ...}
    all_key: str  # the label check's "every label right" entry
    cost: compute.ModelCost
    static_keys: Callable[[ChipmunkConfig], float]  # the static mask's key share (apps.compute.executed_flops)
    mlp_sparsity: bool  # whether the preset runs Chipmunk's MLP (and the sweep varies its top-k)
    reference_settings: Callable[[int], tuple]  # num_steps -> ((name, preset changes), ...): more Chipmunk rows
    params: Any
    weights: str  # where the params came from ("random" for --random-weights)


def image_subject(weights=None, *, random_weights: bool = False) -> Subject:
    """The tiny FLUX model (``apps.tiny``)."""
    from chipmunk_jax.apps.tiny import IMAGE_GRID, WEIGHTS_DIR, load_shipped, tiny_config
    from chipmunk_jax.apps.tiny import dataset as D
    from chipmunk_jax.apps.tiny.label_check import NearestNeighbourCheck
    from chipmunk_jax.apps.tiny.sampling import image_setup, tiny_chipmunk_config
    from chipmunk_jax.models import flux

    if random_weights:
        model = tiny_config()
        params = flux.init_params(model, jax.random.PRNGKey(0), jnp.float32)
    else:
        model, params = load_shipped(weights)
    checker = NearestNeighbourCheck()
    num_tokens = IMAGE_GRID[0] * IMAGE_GRID[1]

    def setup(labels, noise_shape, chipmunk, num_steps):
        text, pooled = D.text_embeddings(labels)
        return image_setup(model, text, pooled, batch=noise_shape[0], num_steps=num_steps, chipmunk=chipmunk)

    return Subject(
        name="image", title="tiny FLUX (64x64 images, 1,024 image + 8 text tokens)", preset_name="FLUX preset (tiny)",
        preset=tiny_chipmunk_config, labels=lambda seed, n: D.VOCABULARY.stream(seed, 0, n),
        noise=lambda seed, n: np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n, num_tokens, 12))),
        setup=setup, frames=D.unpack, psnr=psnr, ssim=ssim, label_check=checker.accuracy, all_key="both",
        cost=compute.model_cost(model, num_tokens=num_tokens, num_text_tokens=D.NUM_TEXT_TOKENS),
        static_keys=lambda chipmunk: 0.0, mlp_sparsity=True,
        reference_settings=lambda num_steps: (("FLUX densities, first block dense", {
            "attention__first_n_dense_layers": 1, "attention__top_keys": 0.165, "attention__full_step_every": 10,
            "mlp__top_keys": 0.3, "mlp__random_keys": 0.05}),),
        params=jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params),
        weights="random" if random_weights else os.fspath(weights or WEIGHTS_DIR))


def video_subject(weights=None, *, random_weights: bool = False) -> Subject:
    """The tiny Wan video model (``apps.tiny_video``); without trained weights only with ``random_weights``."""
    from chipmunk_jax.apps.tiny_video import TOKEN_GRID, WEIGHTS_DIR, load_shipped, tiny_video_config
    from chipmunk_jax.apps.tiny_video import dataset as D
    from chipmunk_jax.apps.tiny_video.generate import video_psnr, video_ssim
    from chipmunk_jax.apps.tiny_video.label_check import VideoLabelCheck
    from chipmunk_jax.apps.tiny_video.sampling import (static_key_share, tiny_video_chipmunk_config, video_reference_settings,
                                                       video_setup)
    from chipmunk_jax.models import wan

    if random_weights:
        model = tiny_video_config()
        params = wan.init_params(model, jax.random.PRNGKey(0), jnp.float32)
    else:
        try:
            model, params = load_shipped(weights)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; or pass --random-weights for a smoke test of the harness (its numbers say "
                                    "nothing about quality)") from None
    checker = VideoLabelCheck(bank_size=500)

    def setup(labels, noise_shape, chipmunk, num_steps):
        return video_setup(model, D.text_embeddings(labels), noise_shape, num_steps=num_steps, chipmunk=chipmunk)

    return Subject(
        name="video", title="tiny Wan (8 frames of 32x32, 1,024 video + 12 text tokens)",
        preset_name="Wan preset (tiny)", preset=tiny_video_chipmunk_config,
        labels=lambda seed, n: D.VOCABULARY.stream(seed, 0, n),
        noise=lambda seed, n: np.asarray(jax.random.normal(
            jax.random.PRNGKey(seed), (n, 3, D.FRAMES, D.FRAME_SIZE, D.FRAME_SIZE))),
        setup=setup, frames=D.from_latents, psnr=video_psnr, ssim=video_ssim, label_check=checker.accuracy,
        all_key="all", cost=compute.model_cost(model, num_tokens=int(np.prod(TOKEN_GRID)),
                                               num_text_tokens=D.NUM_TEXT_TOKENS),
        static_keys=lambda chipmunk: static_key_share(chipmunk) if chipmunk.attention.enabled else 0.0,
        mlp_sparsity=False, reference_settings=video_reference_settings, params=jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params),
        weights="random" if random_weights else os.fspath(weights or WEIGHTS_DIR))


# ----------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the sweep: ``chipmunk`` = ``ChipmunkConfig.replace`` changes on the model's preset (None: the
    dense model), ``policy`` = a ``POLICIES`` name with its keyword arguments (MagCache's ratios are added)."""

    method: str  # the plotted series
    name: str
    chipmunk: dict | None = None
    policy: str | None = None
    policy_args: dict = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.method} | {self.name}"

    def fingerprint(self) -> str:
        """Everything that defines the setting, as the results json holds it (--resume matches on it)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def sweep_settings(subject: Subject, num_steps: int, *, quick: bool = False) -> list[Setting]:
    """The sweep: Chipmunk (static step cache off) at the preset and around it, Chipmunk + the static step cache, the
    three baselines at a range of thresholds, Chipmunk + a baseline policy. ``quick``: one setting per series."""
    off, on = {"step_cache__enabled": False}, {"step_cache__enabled": True}
    retention = max(1, round(0.2 * num_steps))  # MagCache's first 20% of the steps always computed (the paper's)

    def magcache(threshold):
        return {"threshold": threshold, "max_skips": 3, "warmup": retention}

    if quick:
        return [Setting("Chipmunk", subject.preset_name, off),
                Setting("Chipmunk + step cache", subject.preset_name, on),
                Setting("FirstBlockCache", "threshold 0.08", policy="FirstBlockCache", policy_args={"threshold": 0.08}),
                Setting("TeaCache", "threshold 0.15", policy="TeaCache", policy_args={"threshold": 0.15}),
                Setting("MagCache", "threshold 0.1", policy="MagCache", policy_args=magcache(0.1)),
                Setting("Chipmunk + FirstBlockCache", "threshold 0.08", off, "FirstBlockCache", {"threshold": 0.08})]
    chipmunk = [Setting("Chipmunk", subject.preset_name, off)]
    chipmunk += [Setting("Chipmunk", name, {**off, **changes}) for name, changes in subject.reference_settings(num_steps)]
    chipmunk += [Setting("Chipmunk", f"attention top-k {v}", {**off, "attention__top_keys": v})
                 for v in (0.05, 0.1, 0.5)]
    if subject.mlp_sparsity:
        chipmunk += [Setting("Chipmunk", f"MLP top-k {v}", {**off, "mlp__top_keys": v}) for v in (0.05, 0.3)]
    every = subject.preset(num_steps).attention.full_step_every
    chipmunk += [Setting("Chipmunk", f"attention full step every {v}", {**off, "attention__full_step_every": v})
                 for v in (max(2, every // 2), 2 * every)]
    cached = [Setting("Chipmunk + step cache", subject.preset_name, on),
              Setting("Chipmunk + step cache", "attention top-k 0.3", {**on, "attention__top_keys": 0.3})]
    baselines = [Setting("FirstBlockCache", f"threshold {t}", policy="FirstBlockCache", policy_args={"threshold": t})
                 for t in (0.03, 0.08, 0.15, 0.3)]
    baselines += [Setting("TeaCache", f"threshold {t}", policy="TeaCache", policy_args={"threshold": t})
                  for t in (0.05, 0.15, 0.4, 1.0)]
    baselines += [Setting("MagCache", f"threshold {t}", policy="MagCache", policy_args=magcache(t))
                  for t in (0.03, 0.1, 0.3, 1.0)]
    # at a large threshold max_skips binds: more skips in a row reach below the 40% of compute that 3 allow
    baselines += [Setting("MagCache", "threshold 1.0, max skips 6", policy="MagCache",
                          policy_args={**magcache(1.0), "max_skips": 6})]
    combined = [Setting("Chipmunk + FirstBlockCache", "threshold 0.08", off, "FirstBlockCache", {"threshold": 0.08}),
                Setting("Chipmunk + TeaCache", "threshold 0.15", off, "TeaCache", {"threshold": 0.15}),
                Setting("Chipmunk + MagCache", "threshold 0.1", off, "MagCache", magcache(0.1))]
    return chipmunk + cached + baselines + combined


def _policy(setting: Setting, ratios) -> StepPolicy | None:
    if setting.policy is None:
        return None
    args = dict(setting.policy_args)
    if setting.policy == "MagCache":
        args["magnitude_ratios"] = tuple(ratios)
    return POLICIES[setting.policy](**args)


# ----------------------------------------------------------------------------------------------
# Measuring


@dataclasses.dataclass(frozen=True)
class _Batch:
    """Every seed's samples side by side: labels and noise of ``seeds[i]`` are rows ``i * images .. + images``."""

    seeds: tuple[int, ...]
    images: int
    labels: np.ndarray
    noise: np.ndarray

    def per_seed(self, values: np.ndarray) -> list:
        return [values[i * self.images:(i + 1) * self.images] for i in range(len(self.seeds))]


def _scores(subject: Subject, frames, dense, labels, batch: _Batch) -> dict:
    per_sample = np.array([subject.psnr(frames[i:i + 1], dense[i:i + 1]) for i in range(len(frames))])
    seed_ssim = [subject.ssim(f, d) for f, d in zip(batch.per_seed(frames), batch.per_seed(dense))]
    check = subject.label_check(frames, labels)
    return {"psnr": float(per_sample.mean()), "psnr_std": float(per_sample.std()),
            "psnr_seeds": [float(v.mean()) for v in batch.per_seed(per_sample)],
            "psnr_range": [float(per_sample.min()), float(per_sample.max())],
            "ssim": float(np.mean(seed_ssim)), "ssim_seeds": [float(v) for v in seed_ssim],
            "label_check": float(check[subject.all_key]), "label_check_detail": check}


def _measure(subject: Subject, setting: Setting, batch: _Batch, dense, num_steps: int, ratios) -> dict:
    chipmunk = None if setting.chipmunk is None else subject.preset(num_steps, **setting.chipmunk)
    policy = _policy(setting, ratios)
    start = time.perf_counter()
    run = timed_sample(subject.setup(batch.labels, batch.noise.shape, chipmunk, num_steps), subject.params,
                       batch.noise, step_policy=policy, warm=False)
    seconds = time.perf_counter() - start
    count = compute.executed_flops(
        subject.cost, num_steps, chipmunk=chipmunk, computed=None if policy is None else run.computed,
        probe=None if policy is None else policy.probe_kind,
        static_keys=0.0 if chipmunk is None else subject.static_keys(chipmunk))
    entry = {"method": setting.method, "name": setting.name, "key": setting.key,
             "setting": json.loads(setting.fingerprint()), "compute": count.fraction,
             "compute_parts": {k: v / count.dense for k, v in count.parts.items()},
             "computed_steps": count.computed_steps, "seconds_with_compile": seconds}
    entry.update(_scores(subject, subject.frames(run.samples), dense, batch.labels, batch))
    return entry


def _write_json(path: Path, results: dict) -> None:
    """Atomically (a killed run leaves the previous file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def run_sweep(subject: Subject, *, seeds, images: int, num_steps: int, out: Path, quick: bool = False,
              resume: bool = False) -> dict:
    """Measures every ``sweep_settings`` point (see the module docstring) into ``out/pareto_<model>.json``."""
    path = out / f"pareto_{subject.name}.json"
    run = {"model": subject.name, "weights": subject.weights, "steps": num_steps, "images": images,
           "seeds": list(seeds), "quick": quick, "backend": jax.default_backend(),
           "preset": subject.preset(num_steps).to_dict()}
    results = {"run": run, "title": subject.title, "dense": None, "magnitude_ratios": None, "settings": []}
    if resume and path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("run") == run:
            results = previous
        else:
            print(f"--resume: {path} is of another run ({previous.get('run')}): starting over", flush=True)
    settings = sweep_settings(subject, num_steps, quick=quick)
    wanted = {s.fingerprint() for s in settings}
    # settings the sweep no longer holds are dropped, the ones already measured kept
    results["settings"] = [e for e in results["settings"] if json.dumps(e["setting"], sort_keys=True) in wanted]
    done = {json.dumps(entry["setting"], sort_keys=True) for entry in results["settings"]}
    todo = [s for s in settings if s.fingerprint() not in done]
    if not todo and results["dense"] is not None:
        return results
    labels = np.concatenate([subject.labels(seed, images) for seed in seeds])
    batch = _Batch(tuple(seeds), images, labels, np.concatenate([subject.noise(seed, images) for seed in seeds]))
    print(f"{subject.title}: dense, {len(labels)} samples ({len(seeds)} seeds) x {num_steps} steps ...", flush=True)
    dense_setup = subject.setup(labels, batch.noise.shape, None, num_steps)
    dense = subject.frames(timed_sample(dense_setup, subject.params, batch.noise, warm=False).samples)
    check = subject.label_check(dense, labels)
    results["dense"] = {"label_check": float(check[subject.all_key]), "label_check_detail": check}
    if results["magnitude_ratios"] is None and any(s.policy == "MagCache" for s in todo):
        noise = subject.noise(CALIBRATION_SEED, images)
        calibration = subject.setup(subject.labels(CALIBRATION_SEED, images), noise.shape, None, num_steps)
        results["magnitude_ratios"] = calibrate_magnitudes(calibration, subject.params, noise).tolist()
    out.mkdir(parents=True, exist_ok=True)
    for setting in todo:
        entry = _measure(subject, setting, batch, dense, num_steps, results["magnitude_ratios"])
        results["settings"].append(entry)
        _write_json(path, results)
        print(f"{setting.key:52s} compute {100 * entry['compute']:5.1f}%  PSNR {entry['psnr']:6.2f} "
              f"+- {entry['psnr_std']:.2f} dB  SSIM {entry['ssim']:.4f}  labels {100 * entry['label_check']:.0f}%  "
              f"({entry['seconds_with_compile']:.0f} s)", flush=True)
    _write_json(path, results)
    return results


# ----------------------------------------------------------------------------------------------
# Report


BASELINES = tuple(POLICIES)


def _frontier(points) -> tuple[np.ndarray, np.ndarray]:
    """The upper-left frontier of (compute, PSNR) points: sorted by compute, each point kept only when its PSNR
    beats every cheaper one's (a baseline's best at each compute)."""
    xs, ys = [], []
    for x, y in sorted(points):
        if not ys or y > ys[-1]:
            if xs and x == xs[-1]:
                xs.pop(), ys.pop()
            xs.append(x)
            ys.append(y)
    return np.asarray(xs), np.asarray(ys)


def equal_compute_comparison(settings: list[dict]) -> list[str]:
    """One line per baseline: at the compute of each Chipmunk setting (with or without step caching or a policy)
    inside the baseline's measured compute range, Chipmunk's PSNR against the baseline's PSNR interpolated
    linearly along its frontier (its best PSNR at each compute); the settings where Chipmunk is not higher named."""
    ours = [s for s in settings if s["method"].startswith("Chipmunk")]
    lines = []
    for baseline in BASELINES:
        points = [(s["compute"], s["psnr"]) for s in settings if s["method"] == baseline]
        if not points:
            continue
        xs, ys = _frontier(points)
        inside = [s for s in ours if xs[0] <= s["compute"] <= xs[-1]]
        if not inside:
            lines.append(f"- **vs {baseline}** (compute {100 * xs[0]:.0f}-{100 * xs[-1]:.0f}%): no Chipmunk setting in "
                         "this compute range.")
            continue
        deltas = [(s, s["psnr"] - float(np.interp(s["compute"], xs, ys))) for s in inside]
        show = lambda s, d: (f"{s['method']} / {s['name']} ({100 * s['compute']:.0f}%: "  # noqa: E731
                             f"{s['psnr']:.2f} vs {s['psnr'] - d:.2f} dB)")
        higher = [show(s, d) for s, d in deltas if d > 0]
        lower = [show(s, d) for s, d in deltas if d <= 0]
        lines.append(f"- **vs {baseline}** (its frontier spans compute {100 * xs[0]:.0f}-{100 * xs[-1]:.0f}%; "
                     f"{len(ours) - len(inside)} Chipmunk settings outside it): Chipmunk higher at {len(higher)} of "
                     f"{len(deltas)} settings" + (f": {'; '.join(higher)}" if higher else "")
                     + (f". Not higher: {'; '.join(lower)}." if lower else "."))
    return lines


def _model_section(results: dict) -> list[str]:
    run = results["run"]
    lines = [f"## {run['model']}: {results['title']}", ""]
    if run["weights"] == "random":
        lines += ["**RANDOM WEIGHTS: a smoke test of the harness; these numbers say nothing about quality.**", ""]
    lines += [f"{run['images']} samples x {len(run['seeds'])} seeds ({', '.join(map(str, run['seeds']))}), "
              f"{run['steps']} Euler steps, float32 on {run['backend']}, each against the dense sample of the "
              f"same noise. Compute = executed matmul FLOPs / the dense sampler's (`apps.compute`). PSNR: mean +- std "
              "over all samples, then the per-seed means; SSIM: mean of the per-seed SSIMs; label check: samples with "
              "every label recognised. Chipmunk settings change the preset's config (static step cache off unless "
              "named); MagCache's ratios are calibrated on a dense run of held-out noise; with Chipmunk a policy never "
              "skips Chipmunk's refresh steps (docs/algorithm.md §4.5). Every policy's probe is counted on every "
              "step, as this code runs it: FirstBlockCache's probe is the first block, run again by a computed step "
              "(an implementation that continued from the probe's output would save one block of each computed "
              "step: 1/6 of a step on the tiny FLUX, 1/8 on the tiny Wan, ~2% on FLUX.1's 57 blocks).", "",
              "| method | setting | compute | steps run | PSNR (dB) | PSNR per seed | SSIM | label check |",
              "|---|---|---|---|---|---|---|---|"]
    if results["dense"] is not None:
        lines.append(f"| dense | - | 100% | {run['steps']} | inf | - | 1.0000 | "
                     f"{100 * results['dense']['label_check']:.0f}% |")
    order = {m: i for i, m in enumerate(dict.fromkeys(s["method"] for s in results["settings"]))}
    for s in sorted(results["settings"], key=lambda s: (order[s["method"]], -s["compute"])):
        seeds = " / ".join(f"{v:.2f}" for v in s["psnr_seeds"])
        lines.append(f"| {s['method']} | {s['name']} | {100 * s['compute']:.1f}% | {s['computed_steps']} | "
                     f"{s['psnr']:.2f} +- {s['psnr_std']:.2f} | {seeds} | {s['ssim']:.4f} | "
                     f"{100 * s['label_check']:.0f}% |")
    comparison = equal_compute_comparison(results["settings"])
    if comparison:
        lines += ["", "At equal executed compute (each baseline's PSNR interpolated along its frontier):", "",
                  *comparison]
    lines += ["", f"![PSNR vs compute](pareto_{run['model']}.png)", ""]
    return lines


def markdown_report(all_results: list[dict]) -> str:
    lines = ["# Speed vs quality: Chipmunk and step-caching baselines on the tiny models", "",
             "Written by `python -m chipmunk_jax.apps.pareto` (one section per model json in this folder).", ""]
    for results in all_results:
        lines += _model_section(results)
    return "\n".join(lines)


def _plot(out: Path, results: dict) -> list[str]:
    """pareto_<model>.png: PSNR against compute, a baseline's thresholds joined by a line, Chipmunk's settings (not
    one knob) as points."""
    by_method: dict[str, list] = {}
    for s in results["settings"]:
        by_method.setdefault(s["method"], []).append((100 * s["compute"], s["psnr"]))
    series = []
    for i, (method, points) in enumerate(by_method.items()):
        xs, ys = zip(*sorted(points))
        series.append((method, list(xs), list(ys), COLOURS[i % len(COLOURS)], method not in BASELINES))
    name = f"pareto_{results['run']['model']}.png"
    return write_charts(out, {name: (f"{results['title']}: PSNR vs dense against executed compute", series,
                                     "executed compute (% of dense FLOPs)", "PSNR vs dense (dB)")})


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("image", "video"), default="image")
    p.add_argument("--images", type=int, default=4, help="samples per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="noise and label seeds")
    p.add_argument("--steps", type=int, default=50, help="Euler steps (the presets' schedules are for 50)")
    p.add_argument("--weights", default=None, help="model folder (default: the shipped weights)")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights instead of trained ones: a smoke test of the harness, not a quality result")
    p.add_argument("--out", default="benchmarks/quality")
    p.add_argument("--quick", action="store_true", help="one setting per series (smoke test)")
    p.add_argument("--resume", action="store_true",
                   help="keep the settings already in pareto_<model>.json when it is of the same run")
    args = p.parse_args(argv)
    for name in ("images", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    if CALIBRATION_SEED in args.seeds:
        p.error(f"seed {CALIBRATION_SEED} is MagCache's calibration noise: pick another")
    if args.random_weights and args.weights:
        p.error("--weights and --random-weights exclude each other")
    return args


def main(argv=None):
    args = _parse(argv)
    out = Path(args.out)
    make = image_subject if args.model == "image" else video_subject
    subject = make(args.weights, random_weights=args.random_weights)
    results = run_sweep(subject, seeds=args.seeds, images=args.images, num_steps=args.steps, out=out,
                        quick=args.quick, resume=args.resume)
    results["plots"] = _plot(out, results)
    _write_json(out / f"pareto_{subject.name}.json", results)
    all_results = [json.loads(path.read_text()) for path in sorted(out.glob("pareto_*.json"))]
    (out / "pareto.md").write_text(markdown_report(all_results))
    print("\n".join(_model_section(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
