"""Tiny random diffusers pipelines saved with `save_pretrained`, as a user's checkpoint directory
would be laid out (model_index.json, text encoder, tokenizer trained offline with `tokenizers`,
VAE, scheduler, transformer). Shared by the end-to-end tests; each builder returns the directory.

The tokenizers are real (a Unigram model with T5's special tokens and `</s>` appended, trained on
the shipped default prompts), so prompt text goes through the same code paths as a checkpoint's."""
from __future__ import annotations

from pathlib import Path

import torch

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "exporter" / "prompts" / "default.txt"


def t5_tokenizer(vocab_size: int = 200, model_max_length: int = 512):
    """A T5-like fast tokenizer (pad 0, </s> 1, <unk> 2; '</s>' appended) trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(PROMPTS_FILE.read_text().splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def umt5_encoder(d_model: int = 32, vocab_size: int = 200, seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel  # noqa: PLC0415

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16,
                        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(config).eval()


def wan_pipeline(path: Path, *, flow_shift: float = 3.0, seed: int = 0) -> Path:
    """WanPipeline: tiny UMT5 (32-d) + trained tokenizer + AutoencoderKLWan (z_dim 16, ×8 spatial,
    ×4 temporal) + UniPC flow scheduler + a 2-block WanTransformer3DModel."""
    import diffusers  # noqa: PLC0415

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    torch.manual_seed(seed + 1)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  num_train_timesteps=1000, flow_shift=flow_shift)
    pipe = diffusers.WanPipeline(tokenizer=t5_tokenizer(), text_encoder=umt5_encoder(seed=seed + 2), vae=vae,
                                 scheduler=scheduler, transformer=transformer.eval())
    pipe.save_pretrained(path)
    return Path(path)


def t5_encoder(d_model: int = 32, vocab_size: int = 200, seed: int = 0):
    from transformers import T5Config, T5EncoderModel  # noqa: PLC0415

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def cogvideox_pipeline(path: Path, seed: int = 0) -> Path:
    """CogVideoXPipeline: tiny T5 (32-d) + trained tokenizer + AutoencoderKLCogVideoX (4 latent channels,
    ×8 spatial, ×4 temporal) + CogVideoX DDIM scheduler + a 2-block CogVideoXTransformer3DModel
    (text length 16, 16×16 pixels)."""
    import diffusers  # noqa: PLC0415

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    torch.manual_seed(seed + 1)
    transformer = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=32, num_layers=2, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16)
    scheduler = diffusers.CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
        set_alpha_to_one=True, clip_sample=False)
    pipe = diffusers.CogVideoXPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(seed=seed + 2), vae=vae,
                                       scheduler=scheduler, transformer=transformer.eval())
    pipe.save_pretrained(path)
    return Path(path)


def clip_tokenizer(vocab_size: int = 300):
    """A CLIP-like fast tokenizer (lower-cased BPE, <|startoftext|> … <|endoftext|>, padded with
    <|endoftext|>, 77 tokens) trained offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE(unk_token=eos))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(PROMPTS_FILE.read_text().splitlines(),
                            trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos],
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=eos,
                                   model_max_length=77)


def clip_encoder(tokenizer, projection: bool, hidden: int = 32, projection_dim: int = 16, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: PLC0415

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                            projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def image_vae(latent_channels: int, seed: int = 0):
    """AutoencoderKL with ×2 down-sampling and SD3/Flux-style scaling and shift factors."""
    import diffusers  # noqa: PLC0415

    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                   layers_per_block=1, latent_channels=latent_channels, norm_num_groups=2,
                                   use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                                   scaling_factor=1.5035)


def sd3_pipeline(path: Path, seed: int = 0) -> Path:
    """StableDiffusion3Pipeline: CLIP-L and CLIP-G stand-ins with projections (pooled 16 + 16 = 32-d),
    a 64-d T5, AutoencoderKL (×2), flow-match Euler, a 2-block SD3 transformer (joint 64, pooled 32)."""
    import diffusers  # noqa: PLC0415

    tok = clip_tokenizer()
    torch.manual_seed(seed + 1)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=16)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=image_vae(4, seed), text_encoder=clip_encoder(tok, True, seed=seed + 2), tokenizer=tok,
        text_encoder_2=clip_encoder(tok, True, seed=seed + 3), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(d_model=64, seed=seed + 4), tokenizer_3=t5_tokenizer())
    pipe.save_pretrained(path)
    return Path(path)


def flux_pipeline(path: Path, seed: int = 0, dynamic_shift: bool = True) -> Path:
    """FluxPipeline: CLIP-L stand-in (pooled 32-d), 32-d T5, AutoencoderKL (×2, 4 channels, packed 2×2 →
    16), flow-match Euler with resolution-dependent shift, a 1+1-block Flux transformer with the
    guidance embedding (as FLUX.1-dev)."""
    import diffusers  # noqa: PLC0415

    tok = clip_tokenizer()
    torch.manual_seed(seed + 1)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=dynamic_shift, base_shift=0.5, max_shift=1.15, base_image_seq_len=4,
        max_image_seq_len=64, shift=3.0)
    pipe = diffusers.FluxPipeline(transformer=transformer.eval(), scheduler=scheduler, vae=image_vae(4, seed),
                                  text_encoder=clip_encoder(tok, False, seed=seed + 2), tokenizer=tok,
                                  text_encoder_2=t5_encoder(seed=seed + 3), tokenizer_2=t5_tokenizer())
    pipe.save_pretrained(path)
    return Path(path)
