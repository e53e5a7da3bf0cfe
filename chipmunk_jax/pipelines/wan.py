"""Wan 2.1 text-to-video: diffusers' ``WanPipeline`` with the JAX transformer (``chipmunk_jax.models.wan``) sampling.

    pipe = WanPipeline.from_pretrained("/path/to/Wan2.1-T2V-1.3B-Diffusers", chipmunk="wan")
    video = pipe("a cat", negative_prompt="blurry", height=480, width=832, num_frames=81).frames[0]  # uint8 [F,H,W,3]

Follows diffusers' ``WanPipeline``: the prompt and the negative prompt go through its own ``encode_prompt`` (UMT5
hidden states, cleaned prompt, zero-padded to ``max_sequence_length``, torch); classifier-free guidance runs when
``guidance_scale > 1`` (two transformer calls per step, each CFG branch with its own Chipmunk cache; the
unconditional text is the negative prompt, "" when none is given); the latents are [1, z_dim, (F-1)/4 + 1, H/8,
W/8]; they are un-normalised with the VAE's ``latents_mean`` / ``latents_std`` and decoded by the folder's torch
``AutoencoderKLWan`` (in float32, as diffusers' example loads it). The sampling loop is one ``jax.jit`` of Euler
steps on the sigmas of the folder's scheduler (``set_timesteps(N)``, as diffusers' WanPipeline calls it;
``common.scheduler_sigmas``): a FlowMatchEulerDiscreteScheduler folder is followed exactly; the Wan 2.1 diffusers
folders ship UniPCMultistepScheduler (flow sigmas, ``flow_shift``), a 2nd-order multistep solver, where our
sampler takes first-order Euler steps on its sigmas.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.cache import init_step_cache, stack_branches
from chipmunk_jax.models import wan
from chipmunk_jax.pipelines import common
from chipmunk_jax.pipelines.common import VideoPipelineOutput
from chipmunk_jax.ports import wan as wan_ports
from chipmunk_jax.validation import check_number, positive_int

__all__ = ["WanPipeline"]


class WanPipeline(common.Pipeline):
    """Wan 2.1 text-to-video (T2V). Build with ``WanPipeline.from_pretrained`` (its arguments:
    ``common.Pipeline.from_pretrained``; the VAE runs in float32 whatever ``torch_dtype`` says); call with a prompt."""

    _MODEL = "wan"
    _PIPELINE_CLASS = "WanPipeline"
    _PRESET = "wan"
    _COMPONENTS = ("vae", "scheduler", "text_encoder", "tokenizer")
    _PORT = wan_ports
    _TRANSFORMER_CLASS = "WanTransformer3DModel"

    @classmethod
    def _check_config(cls, config, source) -> None:
        if not isinstance(config, wan.WanConfig):
            raise ValueError(f"transformer {source!r} is not a Wan transformer")
        if config.image_dim is not None or config.added_kv_proj_dim is not None:
            raise ValueError(f"transformer {source!r} is an image-to-video Wan model (image_dim set): WanPipeline is "
                             "text-to-video only")

    @classmethod
    def _preloaded_components(cls, path, torch_dtype) -> dict:
        import torch  # local: optional dependencies
        from diffusers import AutoencoderKLWan

        # diffusers' Wan example loads the VAE in float32 whatever the rest is in
        return {"vae": AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.float32)}

    def _check_components(self) -> None:
        z = self.vae.config.z_dim
        if z != self.config.in_channels:
            raise ValueError(f"the VAE has {z} latent channels; the transformer takes {self.config.in_channels}")

    @property
    def vae_scale_factor_temporal(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    @property
    def vae_scale_factor_spatial(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    # ---- the torch parts ------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, negative_prompt: str | None = None, *, do_classifier_free_guidance: bool,
                      max_sequence_length: int = 512):
        """(prompt_embeds, negative_prompt_embeds or None) float32 numpy [1, max_sequence_length, text_dim]:
        diffusers' ``WanPipeline.encode_prompt``."""
        import torch  # local: optional dependency

        with torch.no_grad():
            text, negative = self.components.encode_prompt(
                prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=do_classifier_free_guidance,
                max_sequence_length=max_sequence_length)
        to_np = lambda t: None if t is None else t.float().cpu().numpy()  # noqa: E731
        return to_np(text), to_np(negative)

    def decode(self, latents) -> np.ndarray:
        """Latents [1, C, F', H/8, W/8] -> uint8 video [F, H, W, 3] (``latents * std + mean``, the torch VAE)."""
        import torch  # local: optional dependency

        vae = self.vae
        with torch.no_grad():
            z = torch.from_numpy(np.array(latents, np.float32)).to(self.torch_device, vae.dtype)
            shape = (1, vae.config.z_dim, 1, 1, 1)
            mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
            inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
            video = vae.decode(z / inv_std + mean, return_dict=False)[0]  # [1, 3, F, H, W]
        return common.to_uint8(video[0].transpose(0, 1))  # [F, 3, H, W] -> [F, H, W, 3]

    # ---- generation -----------------------------------------------------------------------------

    def __call__(self, prompt, *, negative_prompt=None, height: int = 480, width: int = 832, num_frames: int = 81,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0, seed: int = 0,
                 max_sequence_length: int = 512, shift: float | None = None, latents=None, output_type: str = "np",
                 progress: bool = True) -> VideoPipelineOutput:
        """One video per prompt.

        ``prompt``: a str or a list of str (one generation each, the i-th with ``seed + i``). ``guidance_scale`` > 1
        runs classifier-free guidance against ``negative_prompt`` (str or one per prompt; "" when None); a
        ``negative_prompt`` with ``guidance_scale`` <= 1 is an error (diffusers ignores it). ``height`` / ``width``:
        pixels, multiples of 16; ``num_frames``: 4k + 1 (the VAE's temporal factor). ``shift``: the flow shift
        (default: the scheduler's ``flow_shift`` / ``shift``; Wan suggests 3.0 at 480p, 5.0 at 720p). ``seed``: the
        JAX noise, or ``latents`` [1, C, F', H/8, W/8] (one prompt only). ``output_type``: "np" (uint8
        [F, H, W, 3]), "pil" (a list of frames) or "latent" (see ``VideoPipelineOutput``).
        """
        prompts, negatives = common.check_prompts(prompt, negative_prompt)
        guidance_scale = check_number("guidance_scale", guidance_scale, minimum=0.0)
        do_cfg = guidance_scale > 1.0
        if negative_prompt is not None and not do_cfg:
            raise ValueError(f"negative_prompt needs classifier-free guidance: guidance_scale must be > 1, got "
                             f"{guidance_scale}")
        height, width, num_frames, shape, grid, latents = common.video_request(
            height=height, width=width, num_frames=num_frames, spatial=self.vae_scale_factor_spatial,
            temporal=self.vae_scale_factor_temporal, patch_hw=self.config.patch_size[1:],
            in_channels=self.config.in_channels, token_grid=lambda shape: wan.token_grid(self.config, shape),
            latents=latents, num_prompts=len(prompts))
        steps = positive_int("num_inference_steps", num_inference_steps)
        max_sequence_length = positive_int("max_sequence_length", max_sequence_length)
        common.check_output_type(output_type, ("np", "pil", "latent"))
        seed = common.check_seed(seed)
        model_chipmunk, sampler_config = common.step_configs(self.chipmunk, steps)
        sigmas = common.scheduler_sigmas(self.scheduler, steps, shift=shift, pipeline_sigmas=False)

        frames, timings = [], {}
        for i, (text_prompt, negative) in enumerate(zip(prompts, negatives)):
            t0 = time.perf_counter()
            text, uncond_text = self.encode_prompt(text_prompt, negative, do_classifier_free_guidance=do_cfg,
                                                   max_sequence_length=max_sequence_length)
            t_encode = time.perf_counter() - t0
            out, t_compile, t_sample = self._generate(
                text, uncond_text, shape=shape, grid=grid, cfg_scale=guidance_scale if do_cfg else None,
                model_chipmunk=model_chipmunk, sampler_config=sampler_config, sigmas=sigmas, seed=seed + i,
                latents=latents, progress=progress)
            t0 = time.perf_counter()
            frames.append(common.video_frames(out, output_type, self.decode))
            common.add_timings(timings, encode_prompt=t_encode, compile=t_compile, sampling=t_sample,
                               decode=time.perf_counter() - t0)
        return VideoPipelineOutput(frames=frames, timings=timings)

    def _generate(self, text, uncond_text, *, shape, grid, cfg_scale, model_chipmunk, sampler_config, sigmas, seed,
                  latents, progress):
        noise_key, sample_key, cache_key = self._keys(seed)
        if latents is None:
            latents = jax.random.normal(noise_key, shape, jnp.float32)
        cond = {"encoder_hidden_states": jnp.asarray(text, self.dtype)}
        uncond = None if uncond_text is None else {"encoder_hidden_states": jnp.asarray(uncond_text, self.dtype)}
        rope = wan.pos_embed(self.config, grid)
        try:
            # CFG: both branches start from one cache (one static mask draw, as wan.init_branch_caches)
            cache = None if model_chipmunk is None else wan.init_cache(
                self.config, model_chipmunk, batch=1, grid=grid, key=cache_key, dtype=self.dtype)
            make_denoiser = lambda: wan.denoiser(self.config, model_chipmunk, grid=grid, rotary_emb=rope,  # noqa: E731
                                                 dtype=self.dtype)
            make_denoiser()
        except (ValueError, TypeError) as e:
            raise ValueError(f"the Chipmunk config does not fit this model at token grid {grid}: {e}") from None
        step_cache = init_step_cache(batch=1, seq_len=int(np.prod(grid)), width=self.config.inner_dim,
                                     dtype=jnp.float32)
        if cfg_scale is not None:
            cache, step_cache = stack_branches(cache, 2), stack_branches(step_cache, 2)
        return self._sample(static=("wan", grid), make_denoiser=make_denoiser, sampler_config=sampler_config,
                            sigmas=sigmas, guidance_scale=cfg_scale, progress=progress, latents=latents, cond=cond,
                            cache=cache, step_cache=step_cache, key=sample_key, uncond=uncond)
