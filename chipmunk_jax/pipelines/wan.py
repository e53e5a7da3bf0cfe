"""Wan text-to-video and Wan 2.2 image-to-video: diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline`` with the
JAX transformer (``chipmunk_jax.models.wan``) sampling.

    pipe = WanPipeline.from_pretrained("/path/to/Wan2.1-T2V-1.3B-Diffusers", chipmunk="wan")
    video = pipe("a cat", negative_prompt="blurry", height=480, width=832, num_frames=81).frames[0]  # uint8 [F,H,W,3]

    pipe = WanA14BPipeline.from_pretrained("/path/to/Wan2.2-T2V-A14B-Diffusers", offload_idle_expert=True)
    video = pipe("a cat", height=720, width=1280, guidance_scale=4.0, guidance_scale_2=3.0).frames[0]

    pipe = WanA14BPipeline.from_pretrained("/path/to/Wan2.2-I2V-A14B-Diffusers")
    video = pipe("a cat", image=PIL.Image.open("cat.png"), height=720, width=1280, guidance_scale=3.5).frames[0]

Follows diffusers' ``WanPipeline``: the prompt and the negative prompt go through its own ``encode_prompt`` (UMT5
hidden states, cleaned prompt, zero-padded to ``max_sequence_length``, torch); classifier-free guidance runs when
``guidance_scale > 1`` (two transformer calls per step, each CFG branch with its own Chipmunk cache; the
unconditional text is the negative prompt, "" when none is given); the latents are [1, z_dim, (F-1)/4 + 1,
H/s, W/s] for the VAE's spatial factor s (8; 16 for the Wan2.2 VAE of TI2V-5B, z_dim 48); they are un-normalised
with the VAE's ``latents_mean`` / ``latents_std`` and decoded by the folder's torch ``AutoencoderKLWan`` (in float32,
as diffusers' example loads it). The sampling loop is one ``jax.jit`` of Euler steps on the sigmas of the folder's
scheduler (``set_timesteps(N)``, as diffusers' WanPipeline calls it; ``common.scheduler_sigmas``): a
FlowMatchEulerDiscreteScheduler folder is followed exactly; the Wan diffusers folders ship
UniPCMultistepScheduler (flow sigmas, ``flow_shift``), a 2nd-order multistep solver, where our sampler takes
first-order Euler steps on its sigmas.

Which pipeline for which folder (docs/models.md §3.4):

* ``WanPipeline``: one transformer: Wan 2.1 T2V and Wan2.2-TI2V-5B, text-to-video or (TI2V-5B, ``image=``)
  image-to-video. TI2V-5B's ``expand_timesteps`` gives every token its own timestep: without an image every token
  has the step's timestep, which is the per-sample timestep, so the sampler passes that; with an image the image's
  VAE latents are latent frame 0 at every step, with timestep 0 on its tokens, as diffusers'
  ``WanImageToVideoPipeline`` runs a TI2V-5B folder (``models.wan_i2v.first_frame_conditioned``).
* ``WanA14BPipeline``: Wan2.2-T2V-A14B and Wan2.2-I2V-A14B: ``transformer/`` (high noise) and ``transformer_2/`` (low
  noise), switched at ``boundary_ratio`` (model_index.json) as diffusers does, each with its own guidance scale
  (``guidance_scale``, ``guidance_scale_2``); both experts in one jit (``models.wan_experts``), Chipmunk refreshed at
  the switch (attention and MLP full step, no step skipped there). ``offload_idle_expert=True`` keeps both experts in
  pinned host memory and runs the sampler as two jitted segments, moving each expert to the device for its steps:
  one expert (~28.6 GB in bf16) on the device instead of two, for one host-to-device copy per expert and generation.
  I2V-A14B (a ``WanImageToVideoPipeline`` folder, ``image=`` required): the VAE latents of the video [image, zeros,
  ...] and diffusers' frame mask join the latents as extra input channels of every transformer call (16 + 4 + 16 =
  36; ``models.wan_i2v.channel_conditioned``); no CLIP image encoder (Wan 2.2 has none).

Image input (``image=``): a PIL image (converted to RGB) or an array [H, W, 3] (uint8, taken as a PIL image; or
float in [0, 1]), resized to the call's height x width by diffusers' own ``VideoProcessor.preprocess`` (a plain
resize, no crop: PIL images with Lanczos, float arrays nearest-neighbour, as diffusers does; crop or pad it to the
aspect ratio beforehand to keep it), then encoded by the folder's VAE (its mode, normalised with ``latents_mean`` /
``latents_std``), once per call. Wan 2.1 image-to-video folders (CLIP image embeddings) are not run here.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import memory
from chipmunk_jax.cache import init_step_cache, split_branches
from chipmunk_jax.models import wan, wan_experts, wan_i2v
from chipmunk_jax.pipelines import common
from chipmunk_jax.pipelines.common import SamplerLoop, VideoPipelineOutput
from chipmunk_jax.ports import wan as wan_ports
from chipmunk_jax.validation import check_bool, check_number, positive_int

__all__ = ["WanPipeline", "WanA14BPipeline", "folder_variant"]


_I2V_CLASS = "WanImageToVideoPipeline"
# how an image conditions the transformer (``WanPipeline.image_conditioning``)
CHANNELS, FIRST_FRAME = "channels", "first_frame"


def _two_experts(index: dict) -> bool:
    """Whether a Wan model_index.json describes a Wan 2.2 A14B expert pair."""
    second = index.get("transformer_2")
    return index.get("boundary_ratio") is not None or (isinstance(second, list) and any(second))


def _check_not_wan21_i2v(path, index) -> None:
    if index.get("_class_name") == _I2V_CLASS and not _two_experts(index) and not index.get("expand_timesteps"):
        raise ValueError(f"{path!r} is a Wan 2.1 image-to-video pipeline (one transformer with CLIP image "
                         "embeddings): not supported (Wan 2.2 image-to-video: I2V-A14B with WanA14BPipeline, "
                         "TI2V-5B with WanPipeline)")


def _image_input(image):
    """``image=`` as diffusers' ``VideoProcessor.preprocess`` takes it: an RGB PIL image, or a float32 [1, H, W, 3]
    array in [0, 1] (a uint8 array becomes a PIL image, as diffusers' examples load images)."""
    from PIL import Image  # local: optional dependency (diffusers needs Pillow)

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if not hasattr(image, "__array__") or hasattr(image, "detach"):
        raise TypeError(f"image must be a PIL image or an array [H, W, 3] (uint8, or float in [0, 1]), got "
                        f"{type(image).__name__}")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or min(array.shape) == 0:
        raise ValueError(f"image must be [H, W, 3] (RGB), got shape {array.shape}")
    if array.dtype == np.uint8:
        return Image.fromarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"image must be uint8 or float in [0, 1], got {array.dtype}")
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
        raise ValueError("a float image must lie in [0, 1]")
    return array.astype(np.float32)[None]


def folder_variant(path) -> str:
    """Which Wan model a diffusers ``WanPipeline`` / ``WanImageToVideoPipeline`` folder holds: "t2v-a14b" or
    "i2v-a14b" (transformer_2 and boundary_ratio: ``WanA14BPipeline``), "ti2v-5b" (expand_timesteps) or "t2v"
    (Wan 2.1); other folders (Wan 2.1 image-to-video among them) raise as ``from_pretrained`` does."""
    path = os.fspath(path)
    index = common.read_model_index(path, WanPipeline._pipeline_classes(), ())
    _check_not_wan21_i2v(path, index)
    if _two_experts(index):
        return "i2v-a14b" if index.get("_class_name") == _I2V_CLASS else "t2v-a14b"
    return "ti2v-5b" if index.get("expand_timesteps") else "t2v"


class WanPipeline(common.Pipeline):
    """Wan 2.1 text-to-video and Wan2.2-TI2V-5B text- or image-to-video. Build with ``WanPipeline.from_pretrained``
    (its arguments: ``common.Pipeline.from_pretrained``; the VAE runs in float32 whatever ``torch_dtype`` says);
    call with a prompt (and, TI2V-5B, optionally ``image=``)."""

    _MODEL = "wan"
    _PIPELINE_CLASS = "WanPipeline"
    # TI2V-5B image-to-video runs as diffusers' WanImageToVideoPipeline; I2V-A14B folders are of that class
    _OTHER_PIPELINE_CLASSES = (_I2V_CLASS,)
    _PRESET = "wan"
    _COMPONENTS = ("vae", "scheduler", "text_encoder", "tokenizer")
    _PORT = wan_ports
    _TRANSFORMER_CLASS = "WanTransformer3DModel"

    @classmethod
    def _check_index(cls, path, index) -> None:
        _check_not_wan21_i2v(path, index)
        if _two_experts(index):
            raise ValueError(f"{path!r} is a Wan 2.2 A14B pipeline (transformer/ and transformer_2/ switched at "
                             f"boundary_ratio {index.get('boundary_ratio')}): load it with "
                             "chipmunk_jax.pipelines.WanA14BPipeline")

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
        z = self.latent_channels
        if z != self.config.output_channels:
            raise ValueError(f"the VAE has {z} latent channels; the transformer gives {self.config.output_channels}")
        extra = z + self.vae_scale_factor_temporal if self.image_conditioning == CHANNELS else 0
        if self.config.in_channels != z + extra:
            what = (f"{z} latent + {self.vae_scale_factor_temporal} mask + {z} image channels (image-to-video)"
                    if extra else f"the VAE's {z} latent channels")
            raise ValueError(f"the transformer takes {self.config.in_channels} input channels; this pipeline gives it "
                             f"{what}")

    @property
    def latent_channels(self) -> int:
        """The VAE's latent channels (the sampled latents' C; the transformer's output channels)."""
        return int(self.vae.config.z_dim)

    @property
    def image_conditioning(self) -> str | None:
        """How ``image=`` conditions this folder's model: "first_frame" (TI2V-5B, ``expand_timesteps``: optional),
        "channels" (a ``WanImageToVideoPipeline`` folder, I2V-A14B: required) or None (text-to-video only)."""
        if self.components.config.get("expand_timesteps"):
            return FIRST_FRAME
        return CHANNELS if type(self.components).__name__ == _I2V_CLASS else None

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
            text, negative = self._prompt_encoder.encode_prompt(
                prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=do_classifier_free_guidance,
                max_sequence_length=max_sequence_length)
        to_np = lambda t: None if t is None else t.float().cpu().numpy()  # noqa: E731
        return to_np(text), to_np(negative)

    @functools.cached_property
    def _prompt_encoder(self):
        """The diffusers pipeline whose ``encode_prompt`` runs: ``components``, or for a ``WanImageToVideoPipeline``
        a ``WanPipeline`` over its tokenizer and text encoder (the same modules). diffusers' I2V module copies
        WanPipeline's prompt code but calls ftfy without checking that it is installed; the two agree wherever
        the I2V one runs."""
        if type(self.components).__name__ != _I2V_CLASS:
            return self.components
        _, diffusers = common.import_torch_stack()
        c = self.components
        return diffusers.WanPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae,
                                     scheduler=c.scheduler)

    def _latent_stats(self, like):
        """(mean, 1 / std) of the VAE's latents, [1, C, 1, 1, 1] on ``like``'s device and dtype (diffusers')."""
        import torch  # local: optional dependency

        vae = self.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, inv_std

    def decode(self, latents) -> np.ndarray:
        """Latents [1, C, F', H/8, W/8] -> uint8 video [F, H, W, 3] (``latents * std + mean``, the torch VAE)."""
        import torch  # local: optional dependency

        vae = self.vae
        with torch.no_grad():
            z = torch.from_numpy(np.array(latents, np.float32)).to(self.torch_device, vae.dtype)
            mean, inv_std = self._latent_stats(z)
            video = vae.decode(z / inv_std + mean, return_dict=False)[0]  # [1, 3, F, H, W]
        return common.to_uint8(video[0].transpose(0, 1))  # [F, 3, H, W] -> [F, H, W, 3]

    def encode_image(self, image, *, height: int, width: int, num_frames: int) -> np.ndarray:
        """The transformer's image condition, float32 numpy, as diffusers' ``WanImageToVideoPipeline.prepare_latents``
        builds it: "first_frame" (TI2V-5B): the image's VAE latents [1, C, 1, H', W']; "channels" (I2V-A14B): the
        frame mask then the VAE latents of the video [image, zeros x (num_frames - 1)], [1, T + C, F', H', W'].
        ``image``: see the module docstring; the VAE's mode, normalised with ``latents_mean`` / ``latents_std``."""
        import torch  # local: optional dependency

        mode = self.image_conditioning
        if mode is None:
            raise ValueError("this is a text-to-video pipeline: no image conditions it")
        pixels = self.components.video_processor.preprocess(_image_input(image), height=height, width=width)
        video = pixels.to(self.torch_device, torch.float32).unsqueeze(2)  # [1, 3, 1, H, W] in [-1, 1]
        if mode == CHANNELS:
            video = torch.cat([video, video.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
        vae = self.vae
        with torch.no_grad():
            latents = vae.encode(video.to(vae.dtype)).latent_dist.mode().float()
            mean, inv_std = self._latent_stats(latents)
            latents = ((latents - mean) * inv_std).cpu().numpy()
        if mode == CHANNELS:
            return wan_i2v.channel_condition(latents, self.vae_scale_factor_temporal)
        return latents

    # ---- generation -----------------------------------------------------------------------------

    def __call__(self, prompt, *, image=None, negative_prompt=None, height: int = 480, width: int = 832,
                 num_frames: int = 81, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                 guidance_scale_2: float | None = None, seed: int = 0, max_sequence_length: int = 512,
                 shift: float | None = None, latents=None, output_type: str = "np",
                 progress: bool = True) -> VideoPipelineOutput:
        """One video per prompt.

        ``image``: the first frame of an image-to-video generation (one image for every prompt; a PIL image or an
        array [H, W, 3], see the module docstring): required for I2V-A14B folders, optional for TI2V-5B, refused by
        text-to-video-only folders (``image_conditioning``).

        ``prompt``: a str or a list of str (one generation each, the i-th with ``seed + i``). ``guidance_scale`` > 1
        runs classifier-free guidance against ``negative_prompt`` (str or one per prompt; "" when None); a
        ``negative_prompt`` with ``guidance_scale`` <= 1 is an error (diffusers ignores it). ``guidance_scale_2``:
        the low-noise expert's scale (``WanA14BPipeline`` only, default ``guidance_scale``). ``height`` /
        ``width``: pixels, multiples of 16 and of the VAE's spatial factor x 2 (32 for TI2V-5B); ``num_frames``:
        4k + 1 (the VAE's temporal factor). ``shift``: the flow shift (default: the scheduler's ``flow_shift`` /
        ``shift``; Wan suggests 3.0 at 480p, 5.0 at 720p). ``seed``: the JAX noise, or ``latents`` [1, C, F', H/s,
        W/s] (one prompt only; with a TI2V-5B image its frame 0 is replaced by the image's latents, as diffusers
        does). ``output_type``: "np" (uint8 [F, H, W, 3]), "pil" (a list of frames) or "latent" (see
        ``VideoPipelineOutput``).
        """
        self._check_image(image)
        prompts, negatives = common.check_prompts(prompt, negative_prompt)
        guidance_scale = check_number("guidance_scale", guidance_scale, minimum=0.0)
        do_cfg = guidance_scale > 1.0
        if negative_prompt is not None and not do_cfg:
            raise ValueError(f"negative_prompt needs classifier-free guidance: guidance_scale must be > 1, got "
                             f"{guidance_scale}")
        guidance_scale_2 = self._check_guidance_scale_2(guidance_scale_2, guidance_scale)
        height, width, num_frames, shape, grid, latents = common.video_request(
            height=height, width=width, num_frames=num_frames, spatial=self.vae_scale_factor_spatial,
            temporal=self.vae_scale_factor_temporal, patch_hw=self.config.patch_size[1:],
            latent_channels=self.latent_channels, token_grid=lambda shape: wan.token_grid(self.config, shape),
            latents=latents, num_prompts=len(prompts))
        steps = positive_int("num_inference_steps", num_inference_steps)
        max_sequence_length = positive_int("max_sequence_length", max_sequence_length)
        common.check_output_type(output_type, ("np", "pil", "latent"))
        seed = common.check_seed(seed)
        sigmas = common.scheduler_sigmas(self.scheduler, steps, shift=shift, pipeline_sigmas=False)
        model_chipmunk, sampler_config = self.step_configs(steps, sigmas)

        frames, timings, condition = [], {}, None
        if image is not None:
            t0 = time.perf_counter()
            condition = self.encode_image(image, height=height, width=width, num_frames=num_frames)
            common.add_timings(timings, encode_image=time.perf_counter() - t0)
        for i, (text_prompt, negative) in enumerate(zip(prompts, negatives)):
            t0 = time.perf_counter()
            text, uncond_text = self.encode_prompt(text_prompt, negative, do_classifier_free_guidance=do_cfg,
                                                   max_sequence_length=max_sequence_length)
            t_encode = time.perf_counter() - t0
            out, t_compile, t_sample = self._generate(
                text, uncond_text, shape=shape, grid=grid, cfg_scale=guidance_scale if do_cfg else None,
                cfg_scale_2=guidance_scale_2 if do_cfg else None, model_chipmunk=model_chipmunk,
                sampler_config=sampler_config, sigmas=sigmas, seed=seed + i, latents=latents, condition=condition,
                progress=progress)
            t0 = time.perf_counter()
            frames.append(common.video_frames(out, output_type, self.decode))
            common.add_timings(timings, encode_prompt=t_encode, compile=t_compile, sampling=t_sample,
                               decode=time.perf_counter() - t0)
        return VideoPipelineOutput(frames=frames, timings=timings)

    def _check_image(self, image) -> None:
        mode = self.image_conditioning
        if image is None and mode == CHANNELS:
            raise ValueError("image= is required: this is an image-to-video pipeline (Wan2.2-I2V-A14B: the image's "
                             "VAE latents join every transformer input)")
        if image is not None and mode is None:
            raise ValueError("image=: this is a text-to-video pipeline (image-to-video: a Wan2.2-I2V-A14B folder with "
                             "WanA14BPipeline, or a Wan2.2-TI2V-5B folder)")

    def _conditioned(self, denoiser, grid, conditioned: bool):
        """``denoiser`` wrapped to take the image condition from ``cond`` (``models.wan_i2v``), when ``conditioned``."""
        if not conditioned:
            return denoiser
        if self.image_conditioning == CHANNELS:
            return wan_i2v.channel_conditioned(denoiser)
        return wan_i2v.first_frame_conditioned(denoiser, self.config, grid)

    def _check_guidance_scale_2(self, guidance_scale_2, guidance_scale: float):
        if guidance_scale_2 is not None:
            raise ValueError("guidance_scale_2 is the low-noise expert's guidance scale of a Wan 2.2 A14B pipeline "
                             "(WanA14BPipeline); this pipeline runs one transformer")
        return None

    def _sampler_loops(self, *, grid, rope, model_chipmunk, sigmas, cfg_scale, cfg_scale_2,
                       conditioned: bool) -> list[SamplerLoop]:
        """The jitted sampling loops of one generation (``common.SamplerLoop``); ``conditioned``: an image
        conditions it (in ``cond``)."""
        make = lambda: self._conditioned(  # noqa: E731
            wan.denoiser(self.config, model_chipmunk, grid=grid, rotary_emb=rope, dtype=self.dtype), grid, conditioned)
        static = ("wan", grid, self.image_conditioning if conditioned else None)
        return [SamplerLoop(static=static, make_denoiser=make, params=self.params, guidance_scale=cfg_scale)]

    def _generate(self, text, uncond_text, *, shape, grid, cfg_scale, cfg_scale_2, model_chipmunk, sampler_config,
                  sigmas, seed, latents, condition, progress):
        noise_key, sample_key, cache_key = self._keys(seed)
        if latents is None:
            latents = jax.random.normal(noise_key, shape, jnp.float32)
        cond = {"encoder_hidden_states": jnp.asarray(text, self.dtype)}
        uncond = None if uncond_text is None else {"encoder_hidden_states": jnp.asarray(uncond_text, self.dtype)}
        if condition is not None:  # both CFG branches see the image
            condition = jnp.asarray(condition, jnp.float32)
            cond = cond | {wan_i2v.CONDITION: condition}
            uncond = None if uncond is None else uncond | {wan_i2v.CONDITION: condition}
            if self.image_conditioning == FIRST_FRAME:  # kept there by the sampler: the result's frame 0
                latents = wan_i2v.with_first_frame(jnp.asarray(latents), condition)
        rope = wan.pos_embed(self.config, grid)
        try:
            # CFG: both branches start from one cache (one static mask draw, as wan.init_branch_caches)
            cache = None if model_chipmunk is None else wan.init_cache(
                self.config, model_chipmunk, batch=1, grid=grid, key=cache_key, dtype=self.dtype)
            loops = self._sampler_loops(grid=grid, rope=rope, model_chipmunk=model_chipmunk, sigmas=sigmas,
                                        cfg_scale=cfg_scale, cfg_scale_2=cfg_scale_2, conditioned=condition is not None)
            for loop in loops:
                loop.make_denoiser()
        except (ValueError, TypeError) as e:
            raise ValueError(f"the Chipmunk config does not fit this model at token grid {grid}: {e}") from None
        step_cache = init_step_cache(batch=1, seq_len=int(np.prod(grid)), width=self.config.inner_dim,
                                     dtype=jnp.float32)
        if cfg_scale is not None:
            cache, step_cache = split_branches(cache, 2), split_branches(step_cache, 2)  # updated in place
        return self._sample_loops(loops, sampler_config=sampler_config, sigmas=sigmas, progress=progress,
                                  latents=latents, cond=cond, cache=cache, step_cache=step_cache, key=sample_key,
                                  uncond=uncond)


class WanA14BPipeline(WanPipeline):
    """Wan2.2-T2V-A14B text-to-video and Wan2.2-I2V-A14B image-to-video: two experts, ``transformer`` for the
    high-noise steps (scheduler timestep t >= ``boundary_ratio`` x num_train_timesteps) and ``transformer_2`` for the
    rest, as diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline`` run a folder with ``transformer_2`` (see the
    module docstring). Build with ``WanA14BPipeline.from_pretrained``; call as ``WanPipeline`` (``guidance_scale_2``:
    the low-noise expert's scale, default ``guidance_scale``; ``image=``: required by I2V-A14B folders).

    Attributes beyond ``common.Pipeline``'s: ``config_2`` (the low-noise expert's config; ``config`` is the
    high-noise one's), ``params`` = (high, low), ``boundary_ratio`` and ``offload_idle_expert``."""

    def __init__(self, *, config_2, offload_idle_expert: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.config_2 = config_2
        self._offload_idle_expert = check_bool("offload_idle_expert", offload_idle_expert)
        ratio = self.components.config.get("boundary_ratio")
        if ratio is None:
            raise ValueError("the diffusers WanPipeline components set no boundary_ratio: the expert switch is unknown")
        self.boundary_ratio = check_number("boundary_ratio", ratio, minimum=0.0, maximum=1.0)

    @property
    def offload_idle_expert(self) -> bool:
        """Whether the experts wait in pinned host memory (fixed at construction: it decides where ``params`` are)."""
        return self._offload_idle_expert

    @classmethod
    def from_pretrained(cls, path, *, chipmunk="default", transformer=None, transformer_2=None,
                        offload_idle_expert: bool = False, dtype=jnp.bfloat16, cache_weights: bool = True,
                        cache_dir=None, torch_device=None, torch_dtype=None, static_step_dispatch: bool = False):
        """As ``common.Pipeline.from_pretrained``, for both experts: ``transformer/`` and ``transformer_2/`` of the
        folder, or ``transformer=`` and ``transformer_2=`` (both) from elsewhere. ``offload_idle_expert``: keep both
        experts in pinned host memory, each moved to the device for its own steps (module docstring)."""
        path = os.fspath(path)
        cls._check_index(path, common.read_model_index(path, cls._pipeline_classes(), cls._COMPONENTS))
        if (transformer is None) != (transformer_2 is None):
            raise ValueError("pass both transformer= and transformer_2= (the high- and the low-noise expert), or "
                             "neither (the folder's transformer/ and transformer_2/)")
        model_chipmunk = common.resolve_chipmunk(cls._PRESET if chipmunk == "default" else chipmunk, cls._PRESET)
        loaded = [cls._load_weights(path, source, subfolder, cache_weights=cache_weights, cache_dir=cache_dir)
                  for source, subfolder in ((transformer, "transformer"), (transformer_2, "transformer_2"))]
        (config, params, weights_from), (config_2, params_2, weights_from_2) = loaded
        cls._check_experts(config, config_2)
        return cls._assemble(path, config, (params, params_2), f"{weights_from}; {weights_from_2}",
                             chipmunk=model_chipmunk, dtype=dtype, torch_device=torch_device, torch_dtype=torch_dtype,
                             static_step_dispatch=static_step_dispatch, config_2=config_2,
                             offload_idle_expert=offload_idle_expert)

    @classmethod
    def from_components(cls, components, config, params, *, chipmunk="default", offload_idle_expert: bool = False,
                        dtype=jnp.bfloat16, static_step_dispatch: bool = False,
                        weights_from: str = "in-memory params"):
        """As ``common.Pipeline.from_components`` with ``config`` = (high-noise config, low-noise config) and
        ``params`` = (high, low); ``components``: a diffusers ``WanPipeline`` built with ``transformer=None``,
        ``transformer_2=None`` and the ``boundary_ratio`` (a ``WanImageToVideoPipeline`` for I2V-A14B)."""
        cls._check_diffusers_components(components)
        if not (isinstance(config, tuple) and len(config) == 2 and isinstance(params, tuple) and len(params) == 2):
            raise TypeError("config and params must be (high-noise expert, low-noise expert) pairs")
        for one in config:
            cls._check_config(one, f"<{type(one).__name__}>")
        cls._check_experts(*config)
        model_chipmunk = common.resolve_chipmunk(cls._PRESET if chipmunk == "default" else chipmunk, cls._PRESET)
        return cls._finish(params, path=None, config=config[0], config_2=config[1], chipmunk=model_chipmunk,
                           dtype=jnp.dtype(dtype), components=components, weights_from=weights_from,
                           static_step_dispatch=static_step_dispatch, torch_device=components.device,
                           offload_idle_expert=offload_idle_expert)

    @staticmethod
    def _check_experts(config, config_2) -> None:
        try:
            wan_experts.check_expert_pair(config, config_2)
        except ValueError as e:
            raise ValueError(f"transformer/ and transformer_2/: {e}") from None

    @classmethod
    def _check_index(cls, path, index) -> None:
        _check_not_wan21_i2v(path, index)
        if not _two_experts(index):
            raise ValueError(f"{path!r} is a one-transformer Wan pipeline (Wan 2.1 or Wan2.2-TI2V-5B: no "
                             "transformer_2 and no boundary_ratio in model_index.json): load it with "
                             "chipmunk_jax.pipelines.WanPipeline")
        if index.get("boundary_ratio") is None:
            raise ValueError(f"{path!r} lists transformer_2 but its model_index.json sets no boundary_ratio: the "
                             "expert switch is unknown")
        if index.get("expand_timesteps"):
            raise ValueError(f"{path!r} sets expand_timesteps with two experts: no Wan 2.2 release does, and it is not "
                             "supported")

    @classmethod
    def _preloaded_components(cls, path, torch_dtype) -> dict:
        return dict(super()._preloaded_components(path, torch_dtype), transformer_2=None)

    def _place_params(self, params):
        if not self.offload_idle_expert:
            return super()._place_params(params)
        # numpy in the compute dtype straight to pinned host memory: no expert passes through the device here
        return memory.to_host(jax.tree_util.tree_map(lambda v: np.asarray(v).astype(self.dtype, copy=False), params))

    def _boundary_timestep(self) -> float:
        return wan_experts.boundary_timestep(self.boundary_ratio, int(self.scheduler.config.num_train_timesteps))

    def step_configs(self, num_inference_steps: int, sigmas=None):
        """As ``common.Pipeline.step_configs``, the Chipmunk config refreshed at the expert switch for ``sigmas``
        (default: the scheduler's; ``wan_experts.switch_refresh``: a full attention and MLP step, never skipped by
        step caching)."""
        model_chipmunk, sampler_config = super().step_configs(num_inference_steps)
        if model_chipmunk is None:
            return None, sampler_config
        if sigmas is None:
            sigmas = common.scheduler_sigmas(self.scheduler, num_inference_steps, pipeline_sigmas=False)
        refreshed = wan_experts.switch_refresh(model_chipmunk,
                                               wan_experts.switch_step(sigmas, self._boundary_timestep()))
        return refreshed, refreshed

    def _check_guidance_scale_2(self, guidance_scale_2, guidance_scale: float):
        if guidance_scale_2 is None:
            return guidance_scale
        guidance_scale_2 = check_number("guidance_scale_2", guidance_scale_2, minimum=0.0)
        if not guidance_scale > 1.0:
            raise ValueError(f"guidance_scale_2 needs classifier-free guidance: guidance_scale must be > 1, got "
                             f"{guidance_scale}")
        return guidance_scale_2

    def _sampler_loops(self, *, grid, rope, model_chipmunk, sigmas, cfg_scale, cfg_scale_2,
                       conditioned: bool) -> list[SamplerLoop]:
        boundary = self._boundary_timestep()
        kw = dict(grid=grid, rotary_emb=rope, dtype=self.dtype)
        static = ("wan2.2-a14b", grid, self.image_conditioning if conditioned else None)
        if not self.offload_idle_expert:
            make = lambda: self._conditioned(wan_experts.two_expert_denoiser(  # noqa: E731
                self.config, self.config_2, model_chipmunk, boundary_timestep=boundary, **kw), grid, conditioned)
            guidance = wan_experts.guidance_schedule(sigmas, boundary, cfg_scale, cfg_scale_2)
            return [SamplerLoop(static=static, make_denoiser=make, params=self.params, guidance_scale=guidance)]
        loops = []
        for segment in wan_experts.expert_segments(sigmas, boundary, cfg_scale, cfg_scale_2):
            make = lambda expert=segment.expert: self._conditioned(wan_experts.expert_denoisers(  # noqa: E731
                self.config, self.config_2, model_chipmunk, **kw)[expert], grid, conditioned)
            loops.append(SamplerLoop(static=(*static, segment.expert), make_denoiser=make,
                                     params=self.params[segment.expert], guidance_scale=segment.guidance_scale,
                                     steps=(segment.start, segment.stop)))
        return loops
