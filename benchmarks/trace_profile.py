"""Device-side kernel profiles for the benchmark scripts: run a jitted call under ``jax.profiler``, read
the perfetto trace back and sum device time per kernel and per category (GEMM, cuDNN attention, Pallas
kernels, XLA fusions, copies), beside the wall time per call (the gap = launches, host work, idle).
Each XLA fusion is named after its HLO instruction, so ``hlo_sources`` maps kernel names to the model source
lines the fusion came from (the compiled module's stack-frame tables): the "source" column of the tables.
Used by flux_profile.py and wan_e2e.py --profile."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time

import jax

__all__ = ["category", "device_events", "hlo_sources", "compiled_sources", "profile", "summarise"]

CATEGORIES = (  # first match wins; kernel names as the CUDA / XLA profilers report them
    ("ours (pallas, triton)", re.compile(r"chipmunk_|triton", re.I)),
    ("cudnn attention", re.compile(r"cudnn|fmha|flash|sm90_.*attn", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|cublas|sm90_xmma|nvjet|matmul|dot", re.I)),
    ("copy", re.compile(r"copy|memcpy|memset|transpose|dynamic.update.slice|bitcast", re.I)),
    ("fusion", re.compile(r"fusion|reduce|loop_|input_|elementwise|convert|add|multiply", re.I)),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def device_events(trace_dir: str):
    """(name, duration us) of every complete event on a device (GPU) process of the perfetto trace;
    on a CPU backend, of the XLA executor threads."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        raise RuntimeError(f"no perfetto trace under {trace_dir}")
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        events = json.load(f)["traceEvents"]
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu = {pid for pid, name in process.items() if "GPU" in name or "device" in name.lower()}
    # a GPU process has one line per CUDA stream (kernels) plus summary lines (XLA modules / ops) that
    # repeat the same time: keep the stream lines where the trace names them
    streams = {key for key, name in thread.items() if key[0] in gpu and "stream" in name.lower()}
    out = []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if gpu:
            key = (e["pid"], e.get("tid"))
            if e["pid"] in gpu and (key in streams if streams else "module" not in thread.get(key, "").lower()):
                out.append((e["name"], float(e["dur"])))
        elif "XLA" in thread.get((e["pid"], e.get("tid")), "") and "Eigen" not in thread.get((e["pid"], e.get("tid")), ""):
            out.append((e["name"], float(e["dur"])))
    return out


def profile(fn, calls: int, trace_dir: str):
    """Run fn once untimed, then ``calls`` times under the profiler; returns (wall ms per call, events)."""
    fn()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        wall_ms = (time.perf_counter() - t0) * 1e3 / calls
    return wall_ms, device_events(trace_dir)


_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*metadata=\{([^}]*)\}")


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """Kernel name -> "file:line function" of the innermost user stack frame of every instruction of a compiled
    HLO module's text that carries one (XLA names a fusion's GPU kernel after its instruction, '.' -> '_')."""
    tables, current = {}, None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
            continue
        row = _TABLE_ROW.match(line) if current is not None else None
        if row:
            current[int(row.group(1))] = row.group(2)
        elif line.strip():
            current = None
    if "StackFrames" not in tables:
        return {}

    def field(text, name):
        found = re.search(name + r"=(\d+)", text)
        return int(found.group(1)) if found else None

    def frame_text(frame_id):
        location_id = field(tables["StackFrames"].get(frame_id, ""), "file_location_id")
        loc = tables.get("FileLocations", {}).get(location_id, "")
        file = tables.get("FileNames", {}).get(field(loc, "file_name_id"), '"?"').strip('"')
        func = tables.get("FunctionNames", {}).get(field(loc, "function_name_id"), '"?"').strip('"')
        return f"{os.path.basename(file)}:{field(loc, 'line')} {func}"

    sources = {}
    for line in hlo_text.splitlines():
        found = _INSTRUCTION.match(line)
        frame_id = field(found.group(2), "stack_frame_id") if found else None
        if frame_id:
            sources[found.group(1)] = sources[found.group(1).replace(".", "_")] = frame_text(frame_id)
    return sources


def compiled_sources(jitted, *args) -> dict[str, str]:
    """``hlo_sources`` of ``jitted``'s executable for ``args`` (after a call: jax's compilation cache answers,
    nothing recompiles). Empty when the module cannot be lowered again (e.g. donated, deleted inputs)."""
    try:
        return hlo_sources(jitted.lower(*args).compile().as_text())
    except Exception:  # a missing source column must not cost the profile
        return {}


def summarise(label: str, wall_ms: float, events, calls: int, top: int, sources=None) -> list[str]:
    per_kernel = collections.defaultdict(lambda: [0, 0.0])
    for name, dur in events:
        per_kernel[name][0] += 1
        per_kernel[name][1] += dur
    device_ms = sum(d for _, d in events) / 1e3 / calls
    per_cat = collections.Counter()
    for name, (_, dur) in per_kernel.items():
        per_cat[category(name)] += dur / 1e3 / calls
    lines = [f"### {label}", "",
             f"wall {wall_ms:.2f} ms/call; device kernels {device_ms:.2f} ms/call "
             f"(gap {wall_ms - device_ms:.2f} ms: launches, host work, idle)", "",
             "| category | ms/call | % of device time |", "|---|---|---|"]
    for cat, ms in per_cat.most_common():
        lines.append(f"| {cat} | {ms:.2f} | {100 * ms / max(device_ms, 1e-9):.1f} |")
    sources = sources or {}
    lines += ["", f"Top {top} kernels:", "", "| kernel | category | launches/call | ms/call | source |",
              "|---|---|---|---|---|"]
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:top]
    for name, (count, dur) in ranked:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short}` | {category(name)} | {count / calls:g} | {dur / 1e3 / calls:.3f} | "
                     f"{sources.get(name, '')} |")
    return lines + [""]
