"""HunyuanVideo text-to-video: diffusers' ``HunyuanVideoPipeline`` with the JAX transformer
(``chipmunk_jax.models.hunyuan_video``) sampling.

    pipe = HunyuanVideoPipeline.from_pretrained("/path/to/HunyuanVideo", chipmunk="hunyuan_video")
    pipe.vae.enable_tiling()                       # the torch VAE: 720p x 129 frames does not fit untiled
    video = pipe("a cat walks on the grass", height=720, width=1280, num_frames=129).frames[0]  # uint8 [F,H,W,3]

Follows diffusers' ``HunyuanVideoPipeline``: the prompt goes through its own ``encode_prompt`` (the Llama encoder's
third-to-last hidden states of the prompt in its template, the template's first ``crop_start`` tokens cropped, padded
to ``max_sequence_length`` with an attention mask; CLIP's pooled output; torch); the guidance is embedded
(``guidance_scale * 1000``; the released model is guidance-distilled); the sigmas are ``linspace(1, 1/N, N)`` shifted
by the scheduler's ``shift`` (7.0 in the released folder), Euler steps as diffusers' FlowMatchEulerDiscreteScheduler;
the latents are [1, C, (F-1)/4 + 1, H/8, W/8], divided by the VAE's ``scaling_factor`` and decoded by the folder's
torch ``AutoencoderKLHunyuanVideo``. Chipmunk runs on the image tokens plus the prompt's valid text tokens (a static
length per prompt: a prompt of another token count compiles another sampler). The sampling loop is one ``jax.jit``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.cache import init_step_cache
from chipmunk_jax.models import hunyuan_video as hv
from chipmunk_jax.pipelines import common
from chipmunk_jax.pipelines.common import VideoPipelineOutput
from chipmunk_jax.ports import hunyuan_video as hv_ports
from chipmunk_jax.validation import check_number, positive_int

__all__ = ["HunyuanVideoPipeline", "DEFAULT_PROMPT_TEMPLATE"]

# diffusers' pipeline_hunyuan_video.DEFAULT_PROMPT_TEMPLATE (copied, so that importing this module needs no diffusers)
DEFAULT_PROMPT_TEMPLATE = {
    "template": (
        "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
        "1. The main content and theme of the video."
        "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
        "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
        "4. background environment, light, style and atmosphere."
        "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    ),
    "crop_start": 95,
}


class HunyuanVideoPipeline(common.Pipeline):
    """HunyuanVideo text-to-video (T2V). Build with ``HunyuanVideoPipeline.from_pretrained`` (its arguments:
    ``common.Pipeline.from_pretrained``); call with a prompt."""

    _MODEL = "hunyuan_video"
    _PIPELINE_CLASS = "HunyuanVideoPipeline"
    _PRESET = "hunyuan_video"
    _COMPONENTS = ("vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    _PORT = hv_ports
    _TRANSFORMER_CLASS = "HunyuanVideoTransformer3DModel"

    @classmethod
    def _check_config(cls, config, source) -> None:
        if not isinstance(config, hv.HunyuanVideoConfig):
            raise ValueError(f"transformer {source!r} is not a HunyuanVideo transformer")
        if config.image_condition_type is not None:
            raise ValueError(f"transformer {source!r} is an image-to-video HunyuanVideo model (image_condition_type="
                             f"{config.image_condition_type!r}): HunyuanVideoPipeline is text-to-video only")

    def _check_components(self) -> None:
        latent = self.vae.config.latent_channels
        if latent != self.config.in_channels:
            raise ValueError(f"the VAE has {latent} latent channels; the transformer takes {self.config.in_channels}")

    @property
    def vae_scale_factor_temporal(self) -> int:
        return int(self.vae.temporal_compression_ratio)

    @property
    def vae_scale_factor_spatial(self) -> int:
        return int(self.vae.spatial_compression_ratio)

    # ---- the torch parts ------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, *, prompt_template=None, max_sequence_length: int = 256):
        """(prompt_embeds [1, L, text_embed_dim], pooled_prompt_embeds [1, pooled_projection_dim], attention mask
        [1, L]) float32 numpy: diffusers' ``HunyuanVideoPipeline.encode_prompt`` with ``prompt_template`` (default
        ``DEFAULT_PROMPT_TEMPLATE``)."""
        import torch  # local: optional dependency

        template = DEFAULT_PROMPT_TEMPLATE if prompt_template is None else prompt_template
        with torch.no_grad():
            text, pooled, mask = self.components.encode_prompt(prompt=prompt, prompt_template=template,
                                                               max_sequence_length=max_sequence_length)
        return text.float().cpu().numpy(), pooled.float().cpu().numpy(), mask.float().cpu().numpy()

    def decode(self, latents) -> np.ndarray:
        """Latents [1, C, F', H/8, W/8] -> uint8 video [F, H, W, 3] (``/ scaling_factor``, the torch VAE)."""
        import torch  # local: optional dependency

        vae = self.vae
        with torch.no_grad():
            z = torch.from_numpy(np.array(latents, np.float32)).to(self.torch_device, vae.dtype)
            video = vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]  # [1, 3, F, H, W]
        return common.to_uint8(video[0].transpose(0, 1))

    # ---- generation -----------------------------------------------------------------------------

    def __call__(self, prompt, *, negative_prompt=None, height: int = 720, width: int = 1280, num_frames: int = 129,
                 num_inference_steps: int = 50, guidance_scale: float = 6.0, seed: int = 0,
                 max_sequence_length: int = 256, prompt_template: dict | None = None, shift: float | None = None,
                 latents=None, output_type: str = "np", progress: bool = True) -> VideoPipelineOutput:
        """One video per prompt.

        ``prompt``: a str or a list of str (one generation each, the i-th with ``seed + i``). ``guidance_scale``: the
        embedded guidance (the released HunyuanVideo T2V is guidance-distilled). ``negative_prompt`` is refused:
        diffusers' true-CFG path (``true_cfg_scale``) is not supported here. ``height`` / ``width``: pixels,
        multiples of 16; ``num_frames``: 4k + 1. ``prompt_template``: ``{"template": "...{}...", "crop_start": int or
        None}`` as diffusers' (default ``DEFAULT_PROMPT_TEMPLATE``). ``shift``: overrides the scheduler's shift.
        ``seed``: the JAX noise, or ``latents`` [1, C, F', H/8, W/8] (one prompt only). ``output_type``: "np" (uint8
        [F, H, W, 3]), "pil" or "latent" (see ``VideoPipelineOutput``).
        """
        prompts, _ = common.check_prompts(prompt, None)
        if negative_prompt is not None:
            raise ValueError("negative_prompt: HunyuanVideo's guidance is embedded (guidance_scale; the model is "
                             "guidance-distilled) and true classifier-free guidance is not supported by this pipeline")
        guidance_scale = check_number("guidance_scale", guidance_scale, minimum=0.0)
        if prompt_template is not None and (not isinstance(prompt_template, dict) or
                                            not isinstance(prompt_template.get("template"), str)):
            raise ValueError("prompt_template must be a dict with a 'template' string holding '{}' (and 'crop_start')")
        height, width, num_frames, shape, grid, latents = common.video_request(
            height=height, width=width, num_frames=num_frames, spatial=self.vae_scale_factor_spatial,
            temporal=self.vae_scale_factor_temporal, patch_hw=(self.config.patch_size,) * 2,
            latent_channels=self.config.in_channels, token_grid=lambda shape: hv.token_grid(self.config, shape),
            latents=latents, num_prompts=len(prompts))
        steps = positive_int("num_inference_steps", num_inference_steps)
        max_sequence_length = positive_int("max_sequence_length", max_sequence_length)
        common.check_output_type(output_type, ("np", "pil", "latent"))
        seed = common.check_seed(seed)
        model_chipmunk, sampler_config = common.step_configs(self.chipmunk, steps)
        sigmas = common.scheduler_sigmas(self.scheduler, steps, shift=shift)

        frames, timings = [], {}
        for i, text_prompt in enumerate(prompts):
            t0 = time.perf_counter()
            text, pooled, mask = self.encode_prompt(text_prompt, prompt_template=prompt_template,
                                                    max_sequence_length=max_sequence_length)
            t_encode = time.perf_counter() - t0
            out, t_compile, t_sample = self._generate(
                text, pooled, mask, shape=shape, grid=grid, guidance=guidance_scale, model_chipmunk=model_chipmunk,
                sampler_config=sampler_config, sigmas=sigmas, seed=seed + i, latents=latents, progress=progress)
            t0 = time.perf_counter()
            frames.append(common.video_frames(out, output_type, self.decode))
            common.add_timings(timings, encode_prompt=t_encode, compile=t_compile, sampling=t_sample,
                               decode=time.perf_counter() - t0)
        return VideoPipelineOutput(frames=frames, timings=timings)

    def _generate(self, text, pooled, mask, *, shape, grid, guidance, model_chipmunk, sampler_config, sigmas, seed,
                  latents, progress):
        noise_key, sample_key, cache_key = self._keys(seed)
        if latents is None:
            latents = jax.random.normal(noise_key, shape, jnp.float32)
        try:
            text_length = hv.text_length_from_mask(mask)
        except ValueError as e:
            raise ValueError(f"the prompt's attention mask {mask.astype(int).tolist()}: {e}; HunyuanVideo takes "
                             "right-padded text (the folder's tokenizer must have padding_side='right')") from None
        cond = {"encoder_hidden_states": jnp.asarray(text, self.dtype),
                "encoder_attention_mask": jnp.asarray(mask, jnp.float32),
                "pooled_projections": jnp.asarray(pooled, self.dtype)}
        if self.config.guidance_embeds:
            cond["guidance"] = jnp.full((1,), guidance * 1000.0, jnp.float32)
        rope = hv.pos_embed(self.config, grid)
        try:
            cache = None if model_chipmunk is None else hv.init_cache(
                self.config, model_chipmunk, batch=1, grid=grid, text_length=text_length, key=cache_key,
                dtype=self.dtype)
            make_denoiser = lambda: hv.denoiser(self.config, model_chipmunk, grid=grid,  # noqa: E731
                                                text_length=text_length, rotary_emb=rope, dtype=self.dtype)
            make_denoiser()
        except (ValueError, TypeError) as e:
            raise ValueError(f"the Chipmunk config does not fit this model at token grid {grid} with {text_length} "
                             f"valid text tokens: {e}") from None
        step_cache = init_step_cache(batch=1, seq_len=int(np.prod(grid)), width=self.config.inner_dim,
                                     dtype=jnp.float32)
        # the valid text length is static (Chipmunk's prefix): one compiled sampler per length
        static = ("hunyuan_video", grid, None if model_chipmunk is None else text_length)
        return self._sample(static=static, make_denoiser=make_denoiser,
                            sampler_config=sampler_config, sigmas=sigmas, guidance_scale=None, progress=progress,
                            latents=latents, cond=cond, cache=cache, step_cache=step_cache, key=sample_key)
