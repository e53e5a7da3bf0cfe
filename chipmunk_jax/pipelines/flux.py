"""FLUX.1 text-to-image: diffusers' ``FluxPipeline`` with the JAX transformer (``chipmunk_jax.models.flux``) sampling.

    pipe = FluxPipeline.from_pretrained("/path/to/FLUX.1-dev", chipmunk="flux")   # or chipmunk=None: dense
    image = pipe("a photo of a cat", height=1024, width=1024, num_inference_steps=28, guidance_scale=3.5).images[0]

Follows diffusers' ``FluxPipeline`` step by step: the prompt goes through its own ``encode_prompt`` (CLIP's pooled
output + T5's hidden states, torch), the noise is packed 2x2 into [1, (H/16)(W/16), 4C] raster-order tokens, the
sigmas are ``linspace(1, 1/N, N)`` with the scheduler's resolution-dependent shift (``flux_shift``), FLUX.1-dev's
guidance is embedded (``guidance_scale``), ``negative_prompt`` with ``true_cfg_scale > 1`` runs true
classifier-free guidance, and the latents are unpacked, un-scaled (``/ scaling_factor + shift_factor``) and decoded by
the folder's torch ``AutoencoderKL``. The sampling loop (Euler, as diffusers' FlowMatchEulerDiscreteScheduler) is one
``jax.jit``. The initial noise of a seed is the CLI's (``chipmunk-jax generate``): JAX's, not torch's.

Note for the CLI (chipmunk_jax/apps/cli.py, not touched here): its ``_encode_prompt`` / ``_load_vae`` / ``_decode``
could later call :meth:`FluxPipeline.encode_prompt` / :meth:`FluxPipeline.decode` and its ``--diffusers`` loading
``pipelines.common.load_transformer`` (the weights cache).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.cache import init_step_cache, split_branches
from chipmunk_jax.models import flux
from chipmunk_jax.pipelines import common
from chipmunk_jax.pipelines.common import ImagePipelineOutput
from chipmunk_jax.ports import flux as flux_ports
from chipmunk_jax.validation import check_number, positive_int

__all__ = ["FluxPipeline"]


class FluxPipeline(common.Pipeline):
    """FLUX.1 (dev: guidance embedded; schnell) text-to-image. Build with ``FluxPipeline.from_pretrained`` (its
    arguments: ``common.Pipeline.from_pretrained``); call with a prompt."""

    _MODEL = "flux"
    _PIPELINE_CLASS = "FluxPipeline"
    _PRESET = "flux"
    _COMPONENTS = ("vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    _PORT = flux_ports
    _TRANSFORMER_CLASS = "FluxTransformer2DModel"

    @classmethod
    def _check_config(cls, config, source) -> None:
        if not isinstance(config, flux.FluxConfig):
            raise ValueError(f"transformer {source!r} is not a FLUX transformer")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _check_components(self) -> None:
        latent = self.vae.config.latent_channels
        if 4 * latent != self.config.in_channels:
            raise ValueError(f"the VAE has {latent} latent channels; the transformer takes {self.config.in_channels} = "
                             f"4 x {self.config.in_channels // 4} packed channels")

    def _prepare_params(self, params):
        if self.chipmunk is None:
            return params
        try:  # the sparse MLP layers' layout, made once (flux.prepare_params)
            return flux.prepare_params(params, self.config, self.chipmunk)
        except (ValueError, TypeError) as e:
            raise ValueError(f"the Chipmunk config does not fit this FLUX model: {e}") from None

    # ---- the torch parts ------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, max_sequence_length: int = 512):
        """(prompt_embeds [1, L, joint_attention_dim], pooled_prompt_embeds [1, pooled_projection_dim]) float32
        numpy: diffusers' ``FluxPipeline.encode_prompt`` (T5 hidden states padded to ``max_sequence_length``, CLIP's
        pooled output)."""
        import torch  # local: optional dependency

        with torch.no_grad():
            text, pooled, _ = self.components.encode_prompt(prompt=prompt, prompt_2=None,
                                                            max_sequence_length=max_sequence_length)
        return text.float().cpu().numpy(), pooled.float().cpu().numpy()

    def unpack(self, latents, grid):
        """Packed [1, h*w, 4C] (features c, ph, pw) -> VAE latents [1, C, 2h, 2w] (diffusers ``_unpack_latents``)."""
        h, w = grid
        c = self.config.in_channels // 4
        return latents.reshape(1, h, w, c, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(1, c, 2 * h, 2 * w)

    def decode(self, latents) -> np.ndarray:
        """VAE latents [1, C, H/8, W/8] -> uint8 image [H, W, 3] (``/ scaling_factor + shift_factor``, the torch VAE,
        diffusers' postprocessing)."""
        import torch  # local: optional dependency

        vae = self.vae
        with torch.no_grad():
            z = torch.from_numpy(np.array(latents, np.float32)).to(self.torch_device, vae.dtype)
            z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
            image = vae.decode(z, return_dict=False)[0]
        return common.to_uint8(image)[0]

    # ---- generation -----------------------------------------------------------------------------

    def __call__(self, prompt, *, negative_prompt=None, true_cfg_scale: float = 1.0, height: int = 1024,
                 width: int = 1024, num_inference_steps: int = 28, guidance_scale: float | None = None, seed: int = 0,
                 max_sequence_length: int = 512, latents=None, output_type: str = "pil",
                 progress: bool = True) -> ImagePipelineOutput:
        """One image per prompt.

        ``prompt``: a str or a list of str (one generation each, the i-th with ``seed + i``). ``negative_prompt``
        (str or one per prompt) runs true classifier-free guidance with ``true_cfg_scale`` > 1 (two transformer calls
        per step, as diffusers); either without the other is an error. ``height`` / ``width``: pixels, multiples of
        16 (the VAE factor x the 2x2 packing). ``guidance_scale``: the embedded guidance of FLUX.1-dev models (None:
        3.5, diffusers' default); a model without guidance embedding (schnell) takes None or 0. ``seed``: the JAX
        noise, or ``latents`` (packed [1, (H/16)(W/16), 4C], one prompt only) as diffusers' ``latents=``.
        ``output_type``: "pil", "np" (uint8 [H, W, 3]) or "latent" (see ``ImagePipelineOutput``). ``progress``: a
        tqdm bar over the steps.
        """
        prompts, negatives = common.check_prompts(prompt, negative_prompt)
        true_cfg_scale = check_number("true_cfg_scale", true_cfg_scale, minimum=0.0)
        do_cfg = negative_prompt is not None and true_cfg_scale > 1
        if negative_prompt is not None and not do_cfg:
            raise ValueError(f"negative_prompt needs true_cfg_scale > 1 (true classifier-free guidance), got "
                             f"true_cfg_scale={true_cfg_scale}: FLUX.1's guidance_scale is embedded, not CFG")
        if true_cfg_scale > 1 and negative_prompt is None:
            raise ValueError(f"true_cfg_scale={true_cfg_scale} needs a negative_prompt (classifier-free guidance)")
        multiple = 2 * self.vae_scale_factor
        height = common.check_size("height", height, multiple)
        width = common.check_size("width", width, multiple)
        steps = positive_int("num_inference_steps", num_inference_steps)
        max_sequence_length = positive_int("max_sequence_length", max_sequence_length)
        if max_sequence_length > 512:
            raise ValueError(f"max_sequence_length cannot be greater than 512, got {max_sequence_length}")
        if self.config.guidance_embeds:
            guidance = check_number("guidance_scale", 3.5 if guidance_scale is None else guidance_scale, minimum=0.0)
        else:
            if guidance_scale not in (None, 0, 0.0):
                raise ValueError(f"guidance_scale={guidance_scale}: this FLUX model has no guidance embedding "
                                 "(FLUX.1-schnell style); pass guidance_scale=None (or 0)")
            guidance = None
        common.check_output_type(output_type, ("pil", "np", "latent"))
        seed = common.check_seed(seed)
        grid = (height // multiple, width // multiple)
        num_img = grid[0] * grid[1]
        if latents is not None:
            if len(prompts) > 1:
                raise ValueError("latents= is for one prompt; pass a str prompt")
            latents = common.check_latents(latents, (1, num_img, self.config.in_channels))
        model_chipmunk, sampler_config = common.step_configs(self.chipmunk, steps)
        sigmas = common.scheduler_sigmas(self.scheduler, steps, image_seq_len=num_img)

        images, timings = [], {}
        for i, (text_prompt, negative) in enumerate(zip(prompts, negatives)):
            # The timings wait for the device: encode_prompt and decode return numpy through blocking
            # device-to-host copies (``.cpu()`` waits for the torch stream's queued work, so no extra
            # torch.cuda.synchronize is needed) and _sample blocks on the sampled latents (jax.block_until_ready).
            t0 = time.perf_counter()
            text, pooled = self.encode_prompt(text_prompt, max_sequence_length)
            uncond_text = self.encode_prompt(negative, max_sequence_length) if do_cfg else None
            t_encode = time.perf_counter() - t0
            out, t_compile, t_sample = self._generate(
                text, pooled, uncond_text, grid=grid, guidance=guidance, cfg_scale=true_cfg_scale if do_cfg else None,
                model_chipmunk=model_chipmunk, sampler_config=sampler_config, sigmas=sigmas, seed=seed + i,
                latents=latents, progress=progress)
            t0 = time.perf_counter()
            vae_latents = self.unpack(out, grid)
            if output_type == "latent":
                images.append(vae_latents[0])
            else:
                image = self.decode(vae_latents)
                images.append(image if output_type == "np" else _to_pil(image))
            common.add_timings(timings, encode_prompt=t_encode, compile=t_compile, sampling=t_sample,
                               decode=time.perf_counter() - t0)
        return ImagePipelineOutput(images=images, timings=timings)

    def _generate(self, text, pooled, uncond_text, *, grid, guidance, cfg_scale, model_chipmunk, sampler_config,
                  sigmas, seed, latents, progress):
        noise_key, sample_key, _ = self._keys(seed)
        num_img, num_txt = grid[0] * grid[1], text.shape[1]
        if latents is None:
            latents = jax.random.normal(noise_key, (1, num_img, self.config.in_channels), jnp.float32)

        def cond_of(embeds, pooled_embeds):
            return flux.sampling_cond(self.config, encoder_hidden_states=jnp.asarray(embeds, self.dtype),
                                      pooled_projections=jnp.asarray(pooled_embeds, self.dtype), grid=grid,
                                      guidance=guidance)

        cond = cond_of(text, pooled)
        uncond = None if uncond_text is None else cond_of(*uncond_text)

        def make_denoiser():
            return flux.denoiser(self.config, model_chipmunk, grid=grid, dtype=self.dtype)

        try:
            cache = None if model_chipmunk is None else flux.init_cache(
                self.config, model_chipmunk, batch=1, grid=grid, num_text_tokens=num_txt, dtype=self.dtype)
            make_denoiser()  # checks the config against the model before anything compiles
        except (ValueError, TypeError) as e:
            raise ValueError(f"the Chipmunk config does not fit this model at {grid[0] * 2 * self.vae_scale_factor}x"
                             f"{grid[1] * 2 * self.vae_scale_factor} "
                             f"({num_img} image + {num_txt} text tokens): {e}") from None
        step_cache = init_step_cache(batch=1, seq_len=num_img, width=self.config.inner_dim, dtype=jnp.float32)
        if cfg_scale is not None:
            cache, step_cache = split_branches(cache, 2), split_branches(step_cache, 2)  # updated in place
        return self._sample(static=("flux", grid), make_denoiser=make_denoiser, sampler_config=sampler_config,
                            sigmas=sigmas, guidance_scale=cfg_scale, progress=progress, latents=latents, cond=cond,
                            cache=cache, step_cache=step_cache, key=sample_key, uncond=uncond)


def _to_pil(image):
    from PIL import Image  # local: optional dependency (diffusers needs Pillow)

    return Image.fromarray(image)
