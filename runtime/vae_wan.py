"""diffusers AutoencoderKLWan's decoder (Wan 2.1; Wan 2.2's residual/patched variant too) in plain torch.

`decode(weights, config, latents)` equals `vae.decode(latents, return_dict=False)[0]` for latents already
de-normalized as WanPipeline does (`z / (1 / latents_std) + latents_mean`). Like diffusers, the decoder
runs one latent frame at a time: every causal 3-D convolution keeps the last two input frames of the
previous chunk (the feature cache) and prepends them instead of zero padding, and the temporal
upsampler skips its time convolution on the first chunk (one latent frame → one output frame, then
four per latent frame). No tiling. Weights are the VAE's state-dict names; config is the VAE's config.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ditbake.runtime.errors import InputError
from ditbake.runtime.nn import Weights

CACHE_T = 2  # frames each causal conv carries to the next chunk
_FIRST = "first"  # cache marker of a temporal upsampler that has seen only the first chunk


def latent_channels(config: dict) -> int:
    return int(config.get("z_dim", 16))


def scale_factors(config: dict) -> tuple[int, int]:
    """(spatial, temporal): one 2× spatial upsample per level (× the patch size), 2× in time where
    `temperal_downsample` says so; a video of 1 + t·k frames has 1 + k latent frames."""
    down = list(config.get("temperal_downsample", (False, True, True)))
    spatial = config.get("scale_factor_spatial") or 2 ** len(down) * int(config.get("patch_size") or 1)
    temporal = config.get("scale_factor_temporal") or 2 ** sum(bool(d) for d in down)
    return int(spatial), int(temporal)


def _rms(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """WanRMS_norm over channels (dim 1): unit L2 norm × √C × gamma, normalized in fp32 for 16-bit inputs."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    normalized = F.normalize(x.float() if half else x, dim=1).to(x.dtype)
    return normalized * (x.shape[1] ** 0.5) * gamma


def _causal_conv(x: torch.Tensor, w: Weights, name: str, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """WanCausalConv3d: zero padding in space, only in the past in time (or the cached past frames)."""
    weight = w[name + ".weight"]
    kt, kh, kw = weight.shape[2:]
    t_pad = kt - 1
    if cache_x is not None and t_pad > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        t_pad -= cache_x.shape[2]
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, t_pad, 0))
    return F.conv3d(x, weight, w.get(name + ".bias"))


def _cached_conv(x: torch.Tensor, w: Weights, name: str, cache: dict) -> torch.Tensor:
    """A causal conv that reads the previous chunk's last frames from `cache` and stores this chunk's."""
    prev = cache.get(name)
    keep = x[:, :, -CACHE_T:].clone()
    if keep.shape[2] < CACHE_T and prev is not None:
        keep = torch.cat([prev[:, :, -1:].to(keep.device), keep], dim=2)
    out = _causal_conv(x, w, name, prev)
    cache[name] = keep
    return out


def _resnet(x: torch.Tensor, w: Weights, p: str, cache: dict) -> torch.Tensor:
    h = _causal_conv(x, w, p + "conv_shortcut") if p + "conv_shortcut.weight" in w else x
    x = _cached_conv(F.silu(_rms(x, w[p + "norm1.gamma"])), w, p + "conv1", cache)
    x = _cached_conv(F.silu(_rms(x, w[p + "norm2.gamma"])), w, p + "conv2", cache)
    return x + h


def _attention(x: torch.Tensor, w: Weights, p: str) -> torch.Tensor:
    """Single-head spatial self-attention per frame, with a residual."""
    b, c, t, h, ww = x.shape
    y = _rms(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, ww), w[p + "norm.gamma"])
    qkv = F.conv2d(y, w[p + "to_qkv.weight"], w[p + "to_qkv.bias"])
    qkv = qkv.reshape(b * t, 1, c * 3, -1).permute(0, 1, 3, 2).contiguous()
    q, k, v = qkv.chunk(3, dim=-1)
    y = F.scaled_dot_product_attention(q, k, v).squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, ww)
    y = F.conv2d(y, w[p + "proj.weight"], w[p + "proj.bias"])
    return y.view(b, t, c, h, ww).permute(0, 2, 1, 3, 4) + x


def _upsample(x: torch.Tensor, w: Weights, p: str, temporal: bool, cache: dict) -> torch.Tensor:
    """WanResample 'upsample3d' (time ×2 via a causal conv to 2C channels, then space) or 'upsample2d'."""
    b, c, t, h, ww = x.shape
    if temporal:
        key = p + "time_conv"
        prev = cache.get(key)
        if prev is None:
            cache[key] = _FIRST  # first chunk: no time upsampling
        else:
            keep = x[:, :, -CACHE_T:].clone()
            if keep.shape[2] < CACHE_T:
                pad = torch.zeros_like(keep) if isinstance(prev, str) else prev[:, :, -1:].to(keep.device)
                keep = torch.cat([pad, keep], dim=2)
            x = _causal_conv(x, w, key, None if isinstance(prev, str) else prev)
            cache[key] = keep
            x = x.reshape(b, 2, c, t, h, ww)
            x = torch.stack((x[:, 0], x[:, 1]), 3).reshape(b, c, t * 2, h, ww)
    t = x.shape[2]
    x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, ww)
    x = F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(x)
    x = F.conv2d(x, w[p + "resample.1.weight"], w[p + "resample.1.bias"], padding=1)
    return x.view(b, t, x.size(1), x.size(2), x.size(3)).permute(0, 2, 1, 3, 4)


def _dup_up(x: torch.Tensor, out_channels: int, factor_t: int, first_chunk: bool) -> torch.Tensor:
    """DupUp3D, the parameter-free shortcut of Wan 2.2's residual up blocks: channels → space-time."""
    factor_s = 2
    repeats = out_channels * factor_t * factor_s * factor_s // x.shape[1]
    x = x.repeat_interleave(repeats, dim=1)
    b, _, t, h, ww = x.shape
    x = x.view(b, out_channels, factor_t, factor_s, factor_s, t, h, ww).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, out_channels, t * factor_t, h * factor_s, ww * factor_s)
    return x[:, :, factor_t - 1:] if first_chunk else x


def _levels(config: dict):
    """Per up level: (in_dim, out_dim, upsample mode or None); as WanDecoder3d builds them."""
    dim = int(config.get("decoder_base_dim") or config.get("base_dim", 96))
    mult = list(config.get("dim_mult", (1, 2, 4, 4)))
    up_time = list(config.get("temperal_downsample", (False, True, True)))[::-1]
    residual = bool(config.get("is_residual", False))
    dims = [dim * u for u in [mult[-1]] + mult[::-1]]
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0 and not residual:
            d_in //= 2  # the previous level's upsampler halved the channels
        mode = None if i == len(mult) - 1 else ("3d" if up_time[i] else "2d")
        yield i, d_in, d_out, mode


def _decoder(x: torch.Tensor, w: Weights, config: dict, cache: dict, first_chunk: bool) -> torch.Tensor:
    residual = bool(config.get("is_residual", False))
    blocks = int(config.get("num_res_blocks", 2)) + 1
    x = _cached_conv(x, w, "decoder.conv_in", cache)
    x = _resnet(x, w, "decoder.mid_block.resnets.0.", cache)
    x = _attention(x, w, "decoder.mid_block.attentions.0.")
    x = _resnet(x, w, "decoder.mid_block.resnets.1.", cache)
    for i, _, d_out, mode in _levels(config):
        p = f"decoder.up_blocks.{i}."
        skip = x
        for j in range(blocks):
            x = _resnet(x, w, f"{p}resnets.{j}.", cache)
        if mode is not None:
            x = _upsample(x, w, p + ("upsampler." if residual else "upsamplers.0."), mode == "3d", cache)
            if residual:
                x = x + _dup_up(skip, d_out, 2 if mode == "3d" else 1, first_chunk)
    x = F.silu(_rms(x, w["decoder.norm_out.gamma"]))
    return _cached_conv(x, w, "decoder.conv_out", cache)


def _unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    b, cp, f, h, ww = x.shape
    x = x.view(b, cp // (p * p), p, p, f, h, ww).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cp // (p * p), f, h * p, ww * p)


def decode(weights: Weights, config: dict, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, z_dim, 1 + k, h, w] → video [B, 3, 1 + t·k, h·s, w·s] in [-1, 1]."""
    w = weights
    if latents.dim() != 5 or latents.shape[1] != latent_channels(config):
        raise InputError(f"Wan VAE latents must be [B, {latent_channels(config)}, frames, h, w], "
                         f"got {tuple(latents.shape)}")
    x = _causal_conv(latents.to(w["post_quant_conv.weight"].dtype), w, "post_quant_conv")
    cache: dict = {}
    chunks = [_decoder(x[:, :, i:i + 1], w, config, cache, first_chunk=i == 0) for i in range(x.shape[2])]
    out = torch.cat(chunks, dim=2)
    if config.get("patch_size"):
        out = _unpatchify(out, int(config["patch_size"]))
    return torch.clamp(out, min=-1.0, max=1.0)
