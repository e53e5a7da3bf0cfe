"""Tiny diffusers pipeline folders for FLUX, Wan 2.1, Wan 2.2 (T2V-A14B, I2V-A14B, TI2V-5B) and HunyuanVideo, built on
the CPU with nothing downloaded (tiny random transformers, text encoders and VAEs; tokenizers made from a word list
with BPE merges written here; saved with diffusers' ``save_pretrained``). Shared by tests/test_pipelines.py and
tests/test_cli.py: ``from pipeline_folders import build_wan_folder`` (pytest's default ``prepend`` import mode puts
tests/ on sys.path).

Each ``build_*_folder(root)`` writes ``root/pipeline`` and returns dict(root=, path=, reference=), where
``reference`` is diffusers' own pipeline on the same components (for parity checks; the TI2V-5B folder's also has
``reference_i2v``, diffusers' ``WanImageToVideoPipeline`` on them, its image-to-video path). Importing this module
imports torch, diffusers and transformers: call ``pytest.importorskip`` on them first.
"""

from __future__ import annotations

import diffusers
import torch
import transformers

__all__ = ["WORDS", "PROMPT", "HUNYUAN_TEMPLATE", "bpe", "clip_parts", "t5_tokenizer", "t5_config", "perturbed",
           "wan_transformer", "build_flux_folder", "build_wan_folder", "build_wan_a14b_folder",
           "build_wan_i2v_a14b_folder", "build_wan_ti2v_folder", "build_hunyuan_folder", "tiny_image"]

WORDS = "a cat dog on the grass red blue photo of describe video".split()
PROMPT = "a cat on the grass"
# a short template for the tiny Llama (diffusers' default has a 95-token system prompt)
HUNYUAN_TEMPLATE = {"template": "describe the video: {}", "crop_start": None}


# ----------------------------------------------------------------------------------------------
# Tiny components (tokenizers from a word list: every word one token, through real BPE merges)


def bpe(special, *, prefix="", suffix=""):
    """(vocab, merges) of a BPE model whose merges build every word of WORDS from its characters (``prefix``: the
    word-start marker, Llama's "▁"; ``suffix``: the word-end marker, CLIP's "</w>")."""
    vocab = {t: i for i, t in enumerate(special)}
    chars = sorted(set("".join(WORDS)))
    for c in chars + ([prefix] if prefix else []):
        vocab.setdefault(c, len(vocab))
    for c in chars if suffix else ():
        vocab.setdefault(c + suffix, len(vocab))
    merges = []
    for word in WORDS:
        pieces = ([prefix] if prefix else []) + list(word[:-1]) + [word[-1] + suffix]
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in merges:
                merges.append((current, piece))
            current += piece
            vocab.setdefault(current, len(vocab))
    return vocab, merges


def clip_parts(hidden: int, max_length: int):
    vocab, merges = bpe(["<|startoftext|>", "<|endoftext|>"], suffix="</w>")
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=max_length, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()
    return tokenizer, encoder


def t5_tokenizer():
    """A T5 (Unigram) tokenizer: one piece per word plus single characters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in sorted(set("".join(WORDS)))] + [("▁", -3.0)]
    return transformers.T5TokenizerFast(vocab=vocab, extra_ids=0)


def t5_config(cls, tokenizer, d_model: int):
    return cls(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
               relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def perturbed(module, scale=0.1):
    """Random non-zero values everywhere (diffusers zero-inits some output layers)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module.eval()


# ----------------------------------------------------------------------------------------------
# Tiny pipeline folders


def build_flux_folder(root):
    torch.manual_seed(0)
    tokenizer, clip = clip_parts(hidden=16, max_length=8)
    tokenizer_2 = t5_tokenizer()
    t5 = transformers.T5EncoderModel(t5_config(transformers.T5Config, tokenizer_2, 16)).eval()
    transformer = perturbed(diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[4, 4, 8], guidance_embeds=True))
    vae = diffusers.AutoencoderKL(  # 4 blocks: factor 8, as FLUX's; FLUX's scaling and shift
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8] * 4, layers_per_block=1, latent_channels=4,
        norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    reference = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                                       text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer)
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(root / "pipeline")
    return dict(root=root, path=str(root / "pipeline"), reference=reference)


def wan_transformer(channels: int = 4, in_channels: int | None = None):
    """A tiny random diffusers WanTransformer3DModel (2 layers, 2 heads of 12) with ``channels`` latent channels
    (output; input too unless ``in_channels`` says otherwise)."""
    return perturbed(diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=channels if in_channels is None else in_channels, out_channels=channels, text_dim=16,
        freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32))


def tiny_image(height: int = 40, width: int = 56, seed: int = 0):
    """A random RGB PIL image (not at any pipeline size: the pipelines resize it)."""
    from PIL import Image

    rng = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=rng, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels)



def _wan_vae():
    """A tiny Wan 2.1 VAE (z_dim 4, spatial factor 8)."""
    return diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                      latents_std=[1.5, 0.8, 1.2, 2.0]).eval()


def _wan_pipeline_folder(root, *, make_transformers, vae, scheduler, pipeline=diffusers.WanPipeline, **options):
    """diffusers' ``pipeline`` (WanPipeline or WanImageToVideoPipeline) on the tiny UMT5 text encoder, saved to
    ``root/pipeline`` (``make_transformers()``: its transformer(s), built after the text encoder; ``options``:
    boundary_ratio / expand_timesteps)."""
    tokenizer = t5_tokenizer()
    encoder = transformers.UMT5EncoderModel(t5_config(transformers.UMT5Config, tokenizer, 16)).eval()
    models = make_transformers()
    reference = pipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae(), scheduler=scheduler, **models,
                         **options)
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(root / "pipeline")
    return dict(root=root, path=str(root / "pipeline"), reference=reference)


def build_wan_folder(root):
    torch.manual_seed(1)
    # the released Wan 2.1 folders ship UniPC; this one Euler, so that diffusers' pipeline steps as ours does
    return _wan_pipeline_folder(root, make_transformers=lambda: {"transformer": wan_transformer()}, vae=_wan_vae,
                                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))


def build_wan_a14b_folder(root):
    """A Wan2.2-T2V-A14B-like folder: two different experts (transformer/, transformer_2/) and the T2V-A14B
    boundary_ratio 0.875; Euler with shift 5, so that 4 steps switch at step 2 (t = 1000, 910 | 717, 24)."""
    torch.manual_seed(3)
    return _wan_pipeline_folder(
        root, make_transformers=lambda: {"transformer": wan_transformer(), "transformer_2": wan_transformer()},
        vae=_wan_vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0), boundary_ratio=0.875)


def build_wan_i2v_a14b_folder(root):
    """A Wan2.2-I2V-A14B-like folder: diffusers' WanImageToVideoPipeline with two different experts taking 4 + 4 + 4
    input channels (noise, mask, image latents; 16 + 4 + 16 in the release), no CLIP image encoder, and the I2V-A14B
    boundary_ratio 0.9; Euler with shift 5, so that 4 steps switch at step 2 (t = 1000, 910 | 717, 24)."""
    torch.manual_seed(7)
    def experts():
        return {name: wan_transformer(4, in_channels=12) for name in ("transformer", "transformer_2")}

    return _wan_pipeline_folder(root, make_transformers=experts, vae=_wan_vae,
                                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0),
                                pipeline=diffusers.WanImageToVideoPipeline, boundary_ratio=0.9)


def build_wan_ti2v_folder(root):
    """A Wan2.2-TI2V-5B-like folder: one transformer on the latents of a tiny Wan2.2 VAE (residual, patch 2,
    spatial factor 16; z_dim 8 here, 48 in the release) and ``expand_timesteps``."""
    torch.manual_seed(4)
    vae = lambda: diffusers.AutoencoderKLWan(  # noqa: E731
        base_dim=4, decoder_base_dim=4, z_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, latents_mean=[0.1, -0.2, 0.3, 0.0] * 2, latents_std=[1.5, 0.8, 1.2, 2.0] * 2).eval()
    folder = _wan_pipeline_folder(root, make_transformers=lambda: {"transformer": wan_transformer(8)}, vae=vae,
                                  scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                  expand_timesteps=True)
    # diffusers runs TI2V-5B image-to-video with WanImageToVideoPipeline on the same folder
    components = {k: v for k, v in folder["reference"].components.items() if k != "transformer_2"}
    folder["reference_i2v"] = diffusers.WanImageToVideoPipeline(**components, expand_timesteps=True)
    folder["reference_i2v"].set_progress_bar_config(disable=True)
    return folder


def build_hunyuan_folder(root):
    torch.manual_seed(2)
    vocab, merges = bpe(["<unk>", "<s>", "</s>", "<pad>"], prefix="▁")
    tokenizer = transformers.LlamaTokenizerFast(vocab=vocab, merges=merges, pad_token="<pad>", padding_side="right")
    llama = transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=1,
        eos_token_id=2)).eval()
    tokenizer_2, clip = clip_parts(hidden=8, max_length=77)  # diffusers' HunyuanVideo pads CLIP to 77 tokens
    transformer = perturbed(diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)))
    vae = diffusers.AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    reference = diffusers.HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, transformer=transformer,
                                               vae=vae, scheduler=scheduler, text_encoder_2=clip,
                                               tokenizer_2=tokenizer_2)
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(root / "pipeline")
    return dict(root=root, path=str(root / "pipeline"), reference=reference)
