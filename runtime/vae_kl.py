"""diffusers AutoencoderKL's decoder (the image VAE of SD3 and Flux) in plain torch.

`decode(weights, config, latents)` equals `vae.decode(latents, return_dict=False)[0]` for latents already
normalized as the pipeline does before calling it (SD3/Flux: `z / scaling_factor + shift_factor`).
Weights are the VAE's state-dict names (`decoder.…`, `post_quant_conv.…`); config is the VAE's config.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ditbake.runtime.errors import ArtifactError, InputError
from ditbake.runtime.nn import Weights, dense

EPS = 1e-6  # diffusers builds every decoder norm with eps 1e-6


def latent_channels(config: dict) -> int:
    return int(config.get("latent_channels", 4))


def scale_factors(config: dict) -> tuple[int, int]:
    """(spatial, temporal) compression: one 2× upsample per block but the last; images have no time axis."""
    return 2 ** (len(config.get("block_out_channels", (64,))) - 1), 1


def _conv(x: torch.Tensor, w: Weights, name: str, padding: int = 1) -> torch.Tensor:
    return F.conv2d(x, w[name + ".weight"], w.get(name + ".bias"), padding=padding)


def _group_norm(x: torch.Tensor, w: Weights, name: str, groups: int) -> torch.Tensor:
    return F.group_norm(x, groups, w[name + ".weight"], w[name + ".bias"], EPS)


def _check_act(config: dict) -> None:
    name = config.get("act_fn", "silu")
    if name not in ("silu", "swish"):
        raise ArtifactError(f"AutoencoderKL act_fn {name!r} is not supported (silu); export a VAE with silu")


def _resnet(x: torch.Tensor, w: Weights, p: str, groups: int) -> torch.Tensor:
    """ResnetBlock2D without time embedding: norm, SiLU, conv, norm, SiLU, conv, (1×1 shortcut) + skip."""
    h = _conv(F.silu(_group_norm(x, w, p + "norm1", groups)), w, p + "conv1")
    h = _conv(F.silu(_group_norm(h, w, p + "norm2", groups)), w, p + "conv2")
    if p + "conv_shortcut.weight" in w:
        x = _conv(x, w, p + "conv_shortcut", padding=0)
    return x + h


def _attention(x: torch.Tensor, w: Weights, p: str, groups: int) -> torch.Tensor:
    """The mid block's single-head spatial self-attention with group norm and a residual."""
    b, c, hh, ww = x.shape
    h = _group_norm(x.view(b, c, hh * ww), w, p + "group_norm", groups).transpose(1, 2)
    q, k, v = (dense(h, w, p + name).unsqueeze(1) for name in ("to_q", "to_k", "to_v"))
    a = F.scaled_dot_product_attention(q, k, v).squeeze(1)
    a = dense(a, w, p + "to_out.0")
    return a.transpose(1, 2).reshape(b, c, hh, ww) + x


def decode(weights: Weights, config: dict, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] → images [B, out_channels, h·s, w·s] (unclamped, as diffusers returns them)."""
    w = weights
    if latents.dim() != 4 or latents.shape[1] != latent_channels(config):
        raise InputError(f"AutoencoderKL latents must be [B, {latent_channels(config)}, h, w], "
                         f"got {tuple(latents.shape)}")
    types = config.get("up_block_types", ("UpDecoderBlock2D",))
    if any(t != "UpDecoderBlock2D" for t in types):
        raise ArtifactError(f"AutoencoderKL up blocks {types} are not supported (UpDecoderBlock2D only)")
    _check_act(config)
    groups = int(config.get("norm_num_groups", 32))
    layers = int(config.get("layers_per_block", 1)) + 1
    x = latents.to(w["decoder.conv_in.weight"].dtype)
    if config.get("use_post_quant_conv", True) and "post_quant_conv.weight" in w:
        x = _conv(x, w, "post_quant_conv", padding=0)
    x = _conv(x, w, "decoder.conv_in")
    x = _resnet(x, w, "decoder.mid_block.resnets.0.", groups)
    if config.get("mid_block_add_attention", True):
        x = _attention(x, w, "decoder.mid_block.attentions.0.", groups)
    x = _resnet(x, w, "decoder.mid_block.resnets.1.", groups)
    for i in range(len(types)):
        p = f"decoder.up_blocks.{i}."
        for j in range(layers):
            x = _resnet(x, w, f"{p}resnets.{j}.", groups)
        if p + "upsamplers.0.conv.weight" in w:
            x = _conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, p + "upsamplers.0.conv")
    x = F.silu(_group_norm(x, w, "decoder.conv_norm_out", groups))
    return _conv(x, w, "decoder.conv_out")
