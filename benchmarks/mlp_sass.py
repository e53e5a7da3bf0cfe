"""Offline resource report of the Triton MLP kernels (pallas_kernels/mlp_triton.py) for sm_90, no GPU needed.

Compiles every production configuration at a model shape with the installed triton and reads the cubin with the
cuobjdump that ships in triton's wheel: registers, stack (spills), shared memory, and SASS instruction counts that
say whether the K loop is what we meant (HGMMA = wgmma, LDGSTS = cp.async gathers, UTMALDG = TMA loads,
LDL/STL = local-memory spills). Use the device's triton version to see what the device will compile:

    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36 .venv/bin/python -P benchmarks/mlp_sass.py --shape flux_double
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import jax.numpy as jnp
import triton

from chipmunk_jax.pallas_kernels import mlp_triton as mt

SHAPES = {  # (N, C, F, C_out)
    "flux_double": (4096, 3072, 12288, 3072),
    "flux_single": (4608, 3072, 12288, 3072),
    "wan14b": (32_760, 5120, 13_824, 5120),
}
OPS = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDG", "STG", "LDL", "STL", "BAR.SYNC", "MUFU.EX2", "WARPGROUP.DEPBAR")


def sass_report(compiled):
    cubin = compiled.asm["cubin"]
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(cubin)
    try:
        res = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", fh.name], capture_output=True,
                             text=True).stdout
        sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", fh.name], capture_output=True,
                              text=True).stdout
    finally:
        os.unlink(fh.name)
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    counts = {}
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            name = m.group(1)
            for op in OPS:
                if name == op or name.startswith(op + "."):
                    counts[op] = counts.get(op, 0) + 1
    return dict(regs=int(regs.group(1)) if regs else -1, stack=int(stack.group(1)) if stack else -1,
                shared=compiled.metadata.shared, warps=compiled.metadata.num_warps, **counts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="flux_double", choices=sorted(SHAPES))
    args = ap.parse_args()
    n, c, f, c_out = SHAPES[args.shape]
    print(f"triton {triton.__version__}, {args.shape}: N={n} C={c} F={f} C_out={c_out}, bf16, block 128")
    print("| kernel | config | regs | stack B | shared B | " + " | ".join(OPS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(OPS))
    for config in mt.PRODUCTION_CONFIGS:
        fc1, fc2 = mt.compile_for_sm90((1, n, c), f, c_out, 128, jnp.bfloat16, config=config)
        for name, compiled, tiles in (
            ("fc1", fc1, f"{config.fc1_features}x{config.fc1_k} w{config.fc1_warps}s{config.fc1_stages} "
                         f"{'tokens-M' if config.fc1_tokens_major else 'features-M'}"),
            ("fc2", fc2, f"{config.fc2_cols}x{config.fc2_k} w{config.fc2_warps}s{config.fc2_stages}"),
        ):
            r = sass_report(compiled)
            print(f"| {name} | {tiles} | {r['regs']} | {r['stack']} | {r['shared']} | "
                  + " | ".join(str(r.get(op, 0)) for op in OPS) + " |", flush=True)


if __name__ == "__main__":
    main()
