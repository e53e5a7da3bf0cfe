"""The three transformers as NNX modules, named as diffusers' classes (``TransformerModule`` does the work)."""

from __future__ import annotations

from chipmunk_jax.models import flux, hunyuan_video, wan
from chipmunk_jax.nnx.transformer import TransformerModule
from chipmunk_jax.ports import flux as flux_port
from chipmunk_jax.ports import hunyuan_video as hunyuan_video_port
from chipmunk_jax.ports import wan as wan_port

__all__ = ["FluxTransformer2DModel", "HunyuanVideoTransformer3DModel", "WanTransformer3DModel"]


class FluxTransformer2DModel(TransformerModule):
    """FLUX.1 (``models.flux``; config ``flux.FluxConfig``). Call keywords: hidden_states [B, N, in_channels]
    (packed latents, raster order), encoder_hidden_states [B, L, joint_attention_dim], pooled_projections
    [B, pooled_projection_dim], timestep [B] (sigma in [0, 1]), img_ids [N, 3], txt_ids [L, 3], guidance [B]
    (guidance_embeds models); extra: ``grid=(h, w)``."""

    _model = flux
    _port = flux_port
    _config = flux.FluxConfig


class HunyuanVideoTransformer3DModel(TransformerModule):
    """HunyuanVideo (``models.hunyuan_video``; config ``hunyuan_video.HunyuanVideoConfig``). Call keywords:
    hidden_states [B, C, F, H, W], timestep [B] (in [0, 1000]), encoder_hidden_states [B, L, text_embed_dim],
    encoder_attention_mask [B, L], pooled_projections [B, pooled_projection_dim], guidance [B] (guidance_embeds
    models); extra: ``text_length=`` (the static valid text length, for Chipmunk)."""

    _model = hunyuan_video
    _port = hunyuan_video_port
    _config = hunyuan_video.HunyuanVideoConfig


class WanTransformer3DModel(TransformerModule):
    """Wan 2.1 (``models.wan``; config ``wan.WanConfig``). Call keywords: hidden_states [B, C, F, H, W], timestep
    [B] (in [0, 1000]), encoder_hidden_states [B, L, text_dim], encoder_hidden_states_image [B, 257, image_dim]
    (I2V models)."""

    _model = wan
    _port = wan_port
    _config = wan.WanConfig
