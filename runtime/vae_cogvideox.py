"""diffusers AutoencoderKLCogVideoX's decoder in plain torch.

`decode(weights, config, latents)` equals `vae.decode(latents, return_dict=False)[0]` for latents already
scaled as CogVideoXPipeline does (`z / scaling_factor`, frames on axis 2). As diffusers' `_decode`, the
latent frames are decoded in batches of two (the first batch takes the odd one: 3 frames), each causal
convolution carrying its last k−1 padded input frames to the next batch (the conv cache); without a
cache a causal conv repeats the first frame. Every norm is a spatial norm conditioned on the batch's
latents. The temporal upsampler keeps an odd batch's first frame single. No tiling.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ditbake.runtime.errors import ArtifactError, InputError
from ditbake.runtime.nn import Weights

FRAME_BATCH = 2  # diffusers' num_latent_frames_batch_size
EPS = 1e-6  # CogVideoXSpatialNorm3D's group norm eps


def latent_channels(config: dict) -> int:
    return int(config.get("latent_channels", 16))


def scale_factors(config: dict) -> tuple[int, int]:
    """(spatial, temporal): a video of 1 + t·k frames has 1 + k latent frames."""
    return 2 ** (len(config.get("block_out_channels", (128, 256, 256, 512))) - 1), \
        int(config.get("temporal_compression_ratio", 4))


def _causal_conv(x: torch.Tensor, w: Weights, name: str, cache: dict | None, pad_mode: str = "first") -> torch.Tensor:
    """CogVideoXCausalConv3d `name` (weights at `name.conv.…`): the past frames come from the cache, else the
    first frame is repeated; space is zero padded. Stores its cache entry under `name`."""
    weight, bias = w[name + ".conv.weight"], w.get(name + ".conv.bias")
    kt, kh, kw = weight.shape[2:]
    h_pad, w_pad = (kh - 1) // 2, (kw - 1) // 2
    if pad_mode == "replicate":
        x = F.pad(x, (w_pad, w_pad, h_pad, h_pad, kt - 1, 0), mode="replicate")
        return F.conv3d(x, weight, bias)
    if kt > 1:
        past = cache.get(name) if cache is not None else None
        x = torch.cat(([past] if past is not None else [x[:, :, :1]] * (kt - 1)) + [x], dim=2)
        if cache is not None:
            cache[name] = x[:, :, -kt + 1:].clone()
    # diffusers passes (0, width_pad, height_pad) as the conv's (T, H, W) padding
    return F.conv3d(x, weight, bias, padding=(0, w_pad, h_pad))


def _spatial_norm(f: torch.Tensor, zq: torch.Tensor, w: Weights, p: str, groups: int, cache: dict) -> torch.Tensor:
    """CogVideoXSpatialNorm3D: group norm of f, scaled and shifted by 1×1×1 convs of the resized latents."""
    t = f.shape[2]
    if t > 1 and t % 2 == 1:
        zq = torch.cat([F.interpolate(zq[:, :, :1], size=f[:, :, :1].shape[-3:]),
                        F.interpolate(zq[:, :, 1:], size=f[:, :, 1:].shape[-3:])], dim=2)
    else:
        zq = F.interpolate(zq, size=f.shape[-3:])
    y = _causal_conv(zq, w, p + "conv_y", cache)
    b = _causal_conv(zq, w, p + "conv_b", cache)
    return F.group_norm(f, groups, w[p + "norm_layer.weight"], w[p + "norm_layer.bias"], EPS) * y + b


def _resnet(x: torch.Tensor, zq: torch.Tensor, w: Weights, p: str, groups: int, cache: dict, pad_mode: str):
    h = F.silu(_spatial_norm(x, zq, w, p + "norm1.", groups, cache))
    h = _causal_conv(h, w, p + "conv1", cache, pad_mode)
    h = F.silu(_spatial_norm(h, zq, w, p + "norm2.", groups, cache))
    h = _causal_conv(h, w, p + "conv2", cache, pad_mode)
    if p + "conv_shortcut.weight" in w:  # CogVideoXSafeConv3d 1×1×1
        x = F.conv3d(x, w[p + "conv_shortcut.weight"], w.get(p + "conv_shortcut.bias"))
    elif p + "conv_shortcut.conv.weight" in w:
        x = _causal_conv(x, w, p + "conv_shortcut", cache, pad_mode)
    return h + x


def _upsample(x: torch.Tensor, w: Weights, p: str, compress_time: bool) -> torch.Tensor:
    """CogVideoXUpsample3D: nearest 2× in space (and in time for all frames but an odd batch's first)."""
    if compress_time:
        if x.shape[2] > 1 and x.shape[2] % 2 == 1:
            first = F.interpolate(x[:, :, 0], scale_factor=2.0)[:, :, None]
            x = torch.cat([first, F.interpolate(x[:, :, 1:], scale_factor=2.0)], dim=2)
        elif x.shape[2] > 1:
            x = F.interpolate(x, scale_factor=2.0)
        else:
            x = F.interpolate(x.squeeze(2), scale_factor=2.0)[:, :, None]
    else:
        b, c, t, h, ww = x.shape
        y = F.interpolate(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, ww), scale_factor=2.0)
        x = y.reshape(b, t, c, *y.shape[2:]).permute(0, 2, 1, 3, 4)
    b, c, t, h, ww = x.shape
    y = F.conv2d(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, ww), w[p + "conv.weight"], w[p + "conv.bias"],
                 padding=1)
    return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


def _decoder(z: torch.Tensor, w: Weights, config: dict, cache: dict) -> torch.Tensor:
    groups = int(config.get("norm_num_groups", 32))
    pad_mode = "first"  # the decoder's CogVideoXCausalConv3d default
    blocks = len(config.get("block_out_channels", (128, 256, 256, 512)))
    layers = int(config.get("layers_per_block", 3)) + 1
    compress_levels = int(math.log2(float(config.get("temporal_compression_ratio", 4))))
    x = _causal_conv(z, w, "decoder.conv_in", cache, pad_mode)
    for j in range(2):
        x = _resnet(x, z, w, f"decoder.mid_block.resnets.{j}.", groups, cache, pad_mode)
    for i in range(blocks):
        p = f"decoder.up_blocks.{i}."
        for j in range(layers):
            x = _resnet(x, z, w, f"{p}resnets.{j}.", groups, cache, pad_mode)
        if i != blocks - 1:
            x = _upsample(x, w, p + "upsamplers.0.", compress_time=i < compress_levels)
    x = F.silu(_spatial_norm(x, z, w, "decoder.norm_out.", groups, cache))
    return _causal_conv(x, w, "decoder.conv_out", cache, pad_mode)


def frame_batches(frames: int) -> list[tuple[int, int]]:
    """The [start, end) latent frame ranges diffusers' `_decode` runs the decoder on, in order."""
    batches = max(frames // FRAME_BATCH, 1)
    rest = frames % FRAME_BATCH
    return [(FRAME_BATCH * i + (0 if i == 0 else rest), FRAME_BATCH * (i + 1) + rest) for i in range(batches)]


def decode(weights: Weights, config: dict, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, frames, h, w] → video [B, 3, T, h·s, w·s] (unclamped, as diffusers returns it)."""
    w = weights
    if latents.dim() != 5 or latents.shape[1] != latent_channels(config):
        raise InputError(f"CogVideoX VAE latents must be [B, {latent_channels(config)}, frames, h, w], "
                         f"got {tuple(latents.shape)}")
    types = config.get("up_block_types", ("CogVideoXUpBlock3D",))
    if any(t != "CogVideoXUpBlock3D" for t in types):
        raise ArtifactError(f"CogVideoX VAE up blocks {types} are not supported (CogVideoXUpBlock3D only)")
    z = latents.to(w["decoder.conv_in.conv.weight"].dtype)
    cache: dict = {}
    out = []
    for start, end in frame_batches(z.shape[2]):
        chunk = z[:, :, start:end]
        if "post_quant_conv.weight" in w:
            chunk = F.conv3d(chunk, w["post_quant_conv.weight"], w.get("post_quant_conv.bias"))
        out.append(_decoder(chunk, w, config, cache))
    return torch.cat(out, dim=2)
