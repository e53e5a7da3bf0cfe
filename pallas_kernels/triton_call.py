"""Run a kernel written in the `triton` package (not Pallas) inside ``jax.jit``.

Why this exists: Pallas-Triton on jax 0.11.2 emits pointer loads only. Kernels that need Hopper TMA tensor
descriptors (``tl.make_tensor_descriptor``) are written in Triton directly, compiled here with the installed
``triton`` for the GPU's compute capability, and launched through jaxlib's own Triton custom call
(``triton_kernel_call_ffi``, the target jax-triton uses). benchmarks/NOTES_triton.md has the
derivation and the H100 checks of this path.

The ``triton`` package (and torch, which its interpreter needs) are optional dependencies: CPU-only installs may
lack them, so they are imported inside the functions that use them, never at module import.

On CPU the same kernels run in Triton's interpreter through ``jax.pure_callback`` (tests only: slow, float32).
"""

from __future__ import annotations

import atexit
import functools
import importlib
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

# Triton type names of the array dtypes our kernels take.
_POINTER_TYPES = {
    jnp.dtype(jnp.bfloat16): "*bf16",
    jnp.dtype(jnp.float16): "*fp16",
    jnp.dtype(jnp.float32): "*fp32",
    jnp.dtype(jnp.int32): "*i32",
}
MAX_SHARED_BYTES = 232_448  # H100 opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (local: this is the probe for the optional dependency)
    except ImportError:
        return False
    return True


def gpu_capability() -> int | None:
    """Compute capability of the default GPU as an int (90 for the H100), or None without a CUDA GPU."""
    if jax.default_backend() != "gpu":
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    if not cc:
        return None
    major, minor = str(cc).split(".")
    return 10 * int(major) + int(minor)


def platform_unsupported(interpret: bool) -> str | None:
    """Why kernels launched by triton_call cannot run here (None: they can): the triton package for both modes,
    and for compiled launches a Hopper GPU or newer (TMA)."""
    if not triton_available():
        return "the triton package is not installed"
    if not interpret:
        cc = gpu_capability()
        if cc is None or cc < 90:
            return f"it needs a Hopper GPU or newer (TMA), found compute capability {cc}"
    return None


@functools.lru_cache(maxsize=128)
def compile_kernel(kernel, pointer_types: tuple[str, ...], constexprs: tuple, num_warps: int, num_stages: int,
                   capability: int):
    """triton.compile for one specialisation; pointers are declared 16-byte aligned (XLA buffers are)."""
    import triton  # local: an optional dependency (module docstring)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = dict(zip(names, pointer_types))
    signature.update({name: "constexpr" for name, _ in constexprs})
    missing = [n for n in names if n not in signature]
    if missing:
        raise ValueError(f"{kernel.__name__}: no value for kernel arguments {missing}")
    source = ASTSource(kernel, signature, dict(constexprs),
                       attrs={(i,): [["tt.divisibility", 16]] for i in range(len(pointer_types))})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def launch_layout(num_arrays: int, out_shapes, zeroed_outputs, grid, num_ctas: int, scratch_bytes: int,
                  scratch_align: int):
    """(outputs of the custom call, [(bytes to zero, pointer divisibility)] per kernel pointer parameter).

    No global scratch for the plugin: it would cuMemAllocAsync it on every launch, and a stream-ordered allocation
    cannot sit in the CUDA graphs XLA builds from command-buffer-compatible custom calls like this one ("Failed to
    create a child graph node ... CUDA_ERROR_NOT_SUPPORTED", H200, 2026-12-03). A kernel that needs scratch
    (in-kernel TMA descriptors) gets it as one more output, passed in the kernel's hidden global-scratch parameter
    slot: Triton kernels end with (global_scratch, profile_scratch) pointers, and the plugin's own two trailing
    pointers (both null now) shift into profile_scratch and past the last parameter, which cuLaunchKernel ignores
    (it reads the kernel's own parameter count). The plugin checks the alignment the kernel asks for."""
    outs = tuple(out_shapes)
    params = [(0, 16)] * num_arrays + [
        (int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize if i in zeroed_outputs else 0, 16)
        for i, s in enumerate(out_shapes)]
    if scratch_bytes:
        programs = grid[0] * grid[1] * grid[2] * num_ctas
        outs += (jax.ShapeDtypeStruct((programs * scratch_bytes,), jnp.uint8),)
        params.append((0, max(16, scratch_align)))
    return outs, params


def triton_call(kernel, *arrays, out_shapes, grid, constexprs: dict, num_warps: int, num_stages: int,
                zeroed_outputs: tuple[int, ...] = (), input_output_aliases: dict[int, int] | None = None,
                interpret: bool = False):
    """Launch ``kernel(*arrays, *outputs, **constexprs)`` on ``grid``; returns the outputs.

    ``out_shapes``: jax.ShapeDtypeStruct per output, in the kernel's argument order after the inputs.
    ``zeroed_outputs``: output positions filled with zeros before the launch (for atomic accumulation).
    ``input_output_aliases``: {input position: output position} updated in place (as jax.ffi.ffi_call; the
    kernel still takes both pointers); the interpreter starts such outputs as copies of their inputs.
    """
    constexpr_items = tuple(sorted(constexprs.items()))
    aliases = dict(input_output_aliases or {})
    if interpret:
        host = functools.partial(_interpret_on_host, kernel, grid, constexpr_items, tuple(out_shapes),
                                 tuple(sorted(aliases.items())))
        return jax.pure_callback(host, tuple(out_shapes), *arrays)
    capability = gpu_capability()
    if capability is None:
        raise RuntimeError("triton_call needs a CUDA GPU (use interpret=True on CPU)")
    # local: jaxlib's Triton launcher (the CUDA plugin's _triton module) is private API that only compiled GPU
    # launches need; a jax version without it then fails here, not at import of every kernel module
    from jax._src.lib import gpu_triton

    pointer_types = tuple(_POINTER_TYPES[jnp.dtype(x.dtype)] for x in (*arrays, *out_shapes))
    compiled = compile_kernel(kernel, pointer_types, constexpr_items, num_warps, num_stages, capability)
    md = compiled.metadata
    if md.shared > MAX_SHARED_BYTES:
        raise ValueError(f"{kernel.__name__}: {md.shared} B of shared memory exceeds the {MAX_SHARED_BYTES} B limit; "
                         f"use fewer stages or smaller blocks")
    # the kernel's scratch is an XLA output, not the plugin's (see launch_layout)
    outs, array_params = launch_layout(len(arrays), out_shapes, zeroed_outputs, grid, md.num_ctas,
                                       md.global_scratch_size or 0, md.global_scratch_align or 16)
    launched = gpu_triton.TritonKernel(md.name, md.num_warps, md.num_ctas, md.shared, compiled.asm["ptx"],
                                       compiled.asm["ttir"], capability, None, None)
    params = [gpu_triton.create_array_parameter(zero, divisible) for zero, divisible in array_params]
    call = gpu_triton.TritonKernelCall(launched, *grid, params)
    opaque = zlib.compress(call.to_proto(md.name, b""))
    results = jax.ffi.ffi_call("triton_kernel_call_ffi", outs, input_output_aliases=aliases or None)(
        *arrays, opaque=opaque)
    return tuple(results[:len(out_shapes)])


@functools.lru_cache(maxsize=1)
def _interpreter_process():
    """One spawned worker with TRITON_INTERPRET=1 in its environment from the start (before it re-imports the
    main module, which may import triton): the interpreter needs every @triton.jit function, triton.language's
    own included, created in interpreter mode, and it patches triton.language while it runs, so it cannot
    share a process with compiles."""
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pool.submit(int).result()  # starts the worker now, with the variable set
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    atexit.register(pool.shutdown)
    return pool


def _interpret_on_host(kernel, grid, constexpr_items, out_shapes, aliases, *arrays):
    specs = tuple((tuple(s.shape), jnp.dtype(s.dtype).name) for s in out_shapes)
    job = _interpreter_process().submit(_run_interpreted, kernel.fn.__module__, kernel.fn.__name__, grid,
                                        constexpr_items, specs, aliases, tuple(np.asarray(x) for x in arrays))
    return job.result()


def _run_interpreted(module_name, kernel_name, grid, constexpr_items, specs, aliases, arrays):
    import torch  # local: optional dependencies (module docstring)
    import triton

    kernel = getattr(importlib.import_module(module_name), kernel_name)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    outputs = [torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in specs]
    for i, o in aliases:
        outputs[o] = _to_torch(arrays[i])
    with np.errstate(all="ignore"):  # rows past N compute log2(0); they are never stored
        kernel[grid](*(_to_torch(x) for x in arrays), *outputs, **dict(constexpr_items))
    return tuple(_to_numpy(o) for o in outputs)


def _to_torch(x):
    """A writable torch copy; numpy has no bfloat16 of its own (ml_dtypes'), so those travel as 16-bit words."""
    import torch  # local: an optional dependency

    x = np.array(x)
    if x.dtype == jnp.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def _to_numpy(t):
    import torch  # local: an optional dependency

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy()
