"""Text-to-image, text-to-video and (Wan 2.2) image-to-video pipelines in the diffusers manner, with the JAX
transformer doing the sampling.

    from chipmunk_jax.pipelines import FluxPipeline, HunyuanVideoPipeline, WanA14BPipeline, WanPipeline, write_video

    pipe = FluxPipeline.from_pretrained("/path/to/FLUX.1-dev", chipmunk="flux")
    image = pipe("a photo of a cat", height=1024, width=1024, num_inference_steps=28, seed=0).images[0]

    pipe = WanPipeline.from_pretrained("/path/to/Wan2.1-T2V-1.3B-Diffusers", chipmunk="wan")
    video = pipe("a cat", negative_prompt="blurry", height=480, width=832, num_frames=81, seed=0).frames[0]
    write_video("cat.mp4", video, fps=16)

What runs where: the text encoders (CLIP, T5, UMT5, Llama), their tokenizers and the VAE are diffusers' / transformers'
own torch modules loaded from the same diffusers folder (on the GPU when torch sees one), so prompts are encoded and
latents decoded exactly as diffusers does; the transformer's whole sampling loop (Chipmunk or dense) is one
``jax.jit`` (``chipmunk_jax.sampling.make_sampler``). Why torch there: the encoders and the VAE run once per
generation (the transformer runs 50 times, twice per step with CFG), so they are a small share of the time; their
torch modules are the reference implementations, need no port, and load straight from the folder.

The application layer (docs/architecture.md §1): it imports models, ports and the core; nothing below imports it.
The names are loaded on first use, so importing this package pulls in neither torch nor a model.
"""

from __future__ import annotations

import importlib

__all__ = [
    "FluxPipeline",
    "WanPipeline",
    "WanA14BPipeline",
    "HunyuanVideoPipeline",
    "ImagePipelineOutput",
    "VideoPipelineOutput",
    "write_video",
    "default_weights_cache_dir",
]

_WHERE = {
    "FluxPipeline": "flux",
    "WanPipeline": "wan",
    "WanA14BPipeline": "wan",
    "HunyuanVideoPipeline": "hunyuan_video",
    "ImagePipelineOutput": "common",
    "VideoPipelineOutput": "common",
    "default_weights_cache_dir": "common",
    "write_video": "video",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
