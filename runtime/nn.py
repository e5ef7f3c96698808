"""Functional building blocks shared by the architectures the runtime implements.

The runtime re-implements each supported architecture in plain torch over a flat weight dict
keyed by the diffusers state-dict names, so production never needs diffusers. The exporter's
tests hold these functions to the diffusers modules' outputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ditbake.runtime.errors import ArtifactError, BackendError

Weights = dict[str, torch.Tensor]


def num_blocks(config: dict) -> int:
    """Transformer blocks of a diffusers DiT config (both supported families name it num_layers)."""
    return int(config["num_layers"])


def heads(config: dict) -> int:
    return int(config["num_attention_heads"])


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a 1-D tensor of timesteps, as diffusers' Timesteps (fp32)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - shift))
    angles = t[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def dense(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    """A plain linear layer `name` (weights `name.weight`, optional `name.bias`)."""
    return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))


def quantizable_linear(x: torch.Tensor, w: Weights, name: str, precision: str) -> torch.Tensor:
    """A linear layer the plan may run at reduced precision.

    `bf16` runs the stored 16-bit weight. `nvfp4`/`int8`/`fp8` run the mixed-precision linear op
    of ditbake.plugins on the NVFP4 weight the artifact stores as `name.nvfp4_packed`,
    `name.nvfp4_block_scales`, `name.nvfp4_global_scale` (Hadamard folded in when
    `name.nvfp4_hadamard` is present).
    """
    if precision == "bf16":
        return dense(x, w, name)
    packed = w.get(name + ".nvfp4_packed")
    if packed is None:
        raise ArtifactError(f"layer {name} is planned at {precision} but the artifact stores no NVFP4 weight "
                            "for it; rebuild the artifact from this plan")
    try:
        from ditbake.plugins.mixed_linear import mixed_linear  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the plugins build
        raise BackendError(f"precision {precision!r} for {name} needs ditbake.plugins.mixed_linear ({exc}); "
                           "rebuild the plan with bf16") from exc
    return mixed_linear(x, packed, w[name + ".nvfp4_block_scales"], w[name + ".nvfp4_global_scale"],
                        w.get(name + ".bias"), precision, (name + ".nvfp4_hadamard") in w)


def layer_norm(x: torch.Tensor, w: Weights | None, name: str | None, eps: float) -> torch.Tensor:
    """LayerNorm in fp32 (as diffusers' FP32LayerNorm), affine when the weights exist."""
    weight = bias = None
    if w is not None and name is not None:
        weight = w.get(name + ".weight")
        bias = w.get(name + ".bias")
        weight = weight.float() if weight is not None else None
        bias = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def gelu_tanh_mlp(x: torch.Tensor, w: Weights, name: str, precisions: dict[str, str]) -> torch.Tensor:
    """diffusers FeedForward with activation 'gelu-approximate': proj → tanh-GELU → out."""
    up, down = name + ".net.0.proj", name + ".net.2"
    h = quantizable_linear(x, w, up, precisions.get(up, "bf16"))
    h = F.gelu(h, approximate="tanh")
    return quantizable_linear(h, w, down, precisions.get(down, "bf16"))


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs (x[2i], x[2i+1]); x is [B, S, H, D], cos/sin [1, S, 1, D]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.type_as(x)
