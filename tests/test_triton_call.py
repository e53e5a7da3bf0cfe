"""triton_call's launch layout on CPU: outputs, per-parameter zeroing / alignment, and the kernel scratch passed as
an XLA output in the compiled kernels' hidden global-scratch parameter (what keeps them launchable inside XLA's
command buffers; the GPU tests named *command_buffer* run it)."""

import re

import jax
import jax.numpy as jnp
import pytest

from chipmunk_jax.pallas_kernels import attention_triton as at
from chipmunk_jax.pallas_kernels import mlp_triton as mt
from chipmunk_jax.pallas_kernels import triton_call as tc


def test_layout_without_scratch_keeps_the_outputs_and_zeroes_what_is_asked():
    outs = (jax.ShapeDtypeStruct((4, 8), jnp.float32), jax.ShapeDtypeStruct((3,), jnp.bfloat16))
    got, params = tc.launch_layout(2, outs, (0,), (5, 2, 1), 1, 0, 128)
    assert got == outs
    assert params == [(0, 16), (0, 16), (4 * 8 * 4, 16), (0, 16)]


def test_layout_with_scratch_appends_one_aligned_buffer_per_program():
    outs = (jax.ShapeDtypeStruct((4,), jnp.float32),)
    got, params = tc.launch_layout(3, outs, (), (7, 3, 2), 1, 384, 128)
    assert got[:1] == outs and got[1] == jax.ShapeDtypeStruct((7 * 3 * 2 * 384,), jnp.uint8)
    assert params == [(0, 16)] * 4 + [(0, 128)]


def _entry_params(ptx):
    return re.search(r"\.entry\s+\w+\(([^)]*)\)", ptx, re.S).group(1).count(".param")


@pytest.mark.parametrize("which", ["fc1", "fc2", "colsum"])
def test_scratch_output_lands_in_the_kernels_global_scratch_slot(which):
    """The PTX of each kernel takes its arrays, then global_scratch, then profile_scratch: our extra output is the
    parameter right after the arrays, and the plugin's two trailing pointers cover profile_scratch and one past."""
    if which == "colsum":
        compiled = at.compile_for_sm90((1, 4608, 24, 128), (1, 4608, 24, 128), jnp.bfloat16, colsum=True)
        num_arrays = 7  # q, k, v, prev_lse, o, lse, colsum
    else:
        fc1, fc2 = mt.compile_for_sm90((1, 4096, 3072), 12288, 3072, 128, jnp.bfloat16)
        # + the [weights layer, cache layer] index pair in front (stacked-layer operands)
        compiled, num_arrays = (fc1, 9) if which == "fc1" else (fc2, 7)
    md = compiled.metadata
    assert md.global_scratch_size > 0  # in-kernel TMA descriptors
    _, params = tc.launch_layout(num_arrays, (), (), (3, 2, 1), md.num_ctas, md.global_scratch_size,
                                 md.global_scratch_align)
    assert len(params) == num_arrays + 1  # arrays, then our scratch
    assert _entry_params(compiled.asm["ptx"]) == num_arrays + 2  # arrays, global_scratch, profile_scratch
    assert params[-1][1] == md.global_scratch_align
