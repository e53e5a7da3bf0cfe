"""What every model's ``forward`` returns (the one model contract, docs/architecture.md §4)."""

from __future__ import annotations

import jax
from flax import struct

__all__ = ["ModelOutput"]


@struct.dataclass
class ModelOutput:
    """The result of one model call, the same for FLUX, HunyuanVideo and Wan.

    sample: the model output in the input's layout (FLUX: [B, N, C] packed latents; video: [B, C, F, H, W]),
      in the input's dtype.
    hidden: the pre-head hidden state [B, N, D] (float32) in the token order the blocks ran in: Chipmunk's
      order (2-D tiles for FLUX, 3-D voxels for video) when Chipmunk reorders tokens, else raster order.
      The model's ``head`` turns it into ``sample`` for any timestep (step caching).
    cache: the new Chipmunk ``ModelCache`` (None for a dense call).
    """

    sample: jax.Array
    hidden: jax.Array
    cache: object = None
