"""CogVideoXTransformer3DModel (2B/5B text-to-video, no rotary, no temporal patch) in plain torch.

Token layout: the blocks carry one joint sequence [B, T + F·H·W, D] with the text first, so the
uniform block signature has a single hidden tensor and the cached residual Δ covers both streams.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ditbake.runtime.nn import Weights, dense, gelu_tanh_mlp, quantizable_linear, timestep_embedding
from ditbake.runtime.nn import heads, num_blocks  # noqa: F401 - part of the architecture interface

NAME = "cogvideox"
BLOCK_LINEARS = ("norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "norm2.linear", "ff.net.0.proj", "ff.net.2")
COMPRESSIBLE_ATTENTION = ("attn1",)


def latent_shape(config: dict, frames: int, height: int, width: int) -> tuple[int, ...]:
    """Shape of one sample's latents: [F, C, H, W] (CogVideoX puts frames before channels)."""
    return (frames, int(config["in_channels"]), height, width)


def grid(config: dict, latent: tuple[int, ...]) -> tuple[int, int, int]:
    p = int(config["patch_size"])
    f, _, h, w = latent
    return f, h // p, w // p


def _native_layer_norm(x: torch.Tensor, w: Weights, name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w.get(name + ".weight"), w.get(name + ".bias"), eps)


def prologue(w: Weights, config: dict, latents: torch.Tensor, timestep: torch.Tensor,
             text: torch.Tensor, profile: dict) -> tuple[torch.Tensor, dict]:
    """Time embedding, text projection, 2-D patchify per frame, baked 3-D sin-cos positions."""
    dtype = w["patch_embed.proj.weight"].dtype
    t = timestep_embedding(timestep, int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
                           bool(config.get("flip_sin_to_cos", True)), float(config.get("freq_shift", 0)))
    act = F.silu if config.get("timestep_activation_fn", "silu") == "silu" else None
    emb = dense(act(dense(t.to(dtype), w, "time_embedding.linear_1")), w, "time_embedding.linear_2")
    text_tokens = dense(text.to(dtype), w, "patch_embed.text_proj")
    b, f, c, hh, ww = latents.shape
    x = F.conv2d(latents.reshape(-1, c, hh, ww).to(dtype), w["patch_embed.proj.weight"],
                 w.get("patch_embed.proj.bias"), stride=int(config["patch_size"]))
    x = x.view(b, f, *x.shape[1:]).flatten(3).transpose(2, 3).flatten(1, 2)
    joint = torch.cat([text_tokens, x], dim=1).contiguous()
    pos_key = f"profile.{profile['name']}.pos_embedding"
    if pos_key in w:
        joint = joint + w[pos_key].to(joint.dtype)
    ctx = {"emb": emb, "text_len": text_tokens.shape[1], "latent": tuple(latents.shape)}
    return joint, ctx


def _modulate(x: torch.Tensor, t: int, shift, scale, e_shift, e_scale) -> torch.Tensor:
    text = x[:, :t] * (1 + e_scale)[:, None] + e_shift[:, None]
    vis = x[:, t:] * (1 + scale)[:, None] + shift[:, None]
    return torch.cat([text, vis], dim=1)


def _gate(t: int, s: int, gate, e_gate) -> torch.Tensor:
    return torch.cat([e_gate[:, None].expand(-1, t, -1), gate[:, None].expand(-1, s - t, -1)], dim=1)


def block(w: Weights, config: dict, index: int, h: torch.Tensor, ctx: dict, variant, attention,
          branch: str) -> torch.Tensor:
    """One CogVideoXBlock over the joint sequence: zero-init AdaLN, joint attention, joint FFN."""
    p = f"transformer_blocks.{index}."
    prec = variant.precision_map
    lin = lambda x, name: quantizable_linear(x, w, p + name, prec.get(name, "bf16"))  # noqa: E731
    eps = float(config.get("norm_eps", 1e-5))
    t, s = ctx["text_len"], h.shape[1]
    n = heads(config)
    cond = F.silu(ctx["emb"])

    shift, scale, gate, e_shift, e_scale, e_gate = lin(cond, "norm1.linear").chunk(6, dim=1)
    x = _modulate(_native_layer_norm(h, w, p + "norm1.norm", eps), t, shift, scale, e_shift, e_scale)
    q, k, v = (lin(x, f"attn1.to_{c}").unflatten(2, (n, -1)).transpose(1, 2) for c in "qkv")
    if config.get("attention_head_dim") and (p + "attn1.norm_q.weight") in w:
        q = _native_layer_norm(q, w, p + "attn1.norm_q", 1e-6)
        k = _native_layer_norm(k, w, p + "attn1.norm_k", 1e-6)
    a = attention((branch, index, "attn1"), q, k, v, variant.head_map.get("attn1"), (0, t))
    a = lin(a.transpose(1, 2).flatten(2).type_as(h), "attn1.to_out.0")
    h = h + _gate(t, s, gate, e_gate) * a

    shift, scale, gate, e_shift, e_scale, e_gate = lin(cond, "norm2.linear").chunk(6, dim=1)
    x = _modulate(_native_layer_norm(h, w, p + "norm2.norm", eps), t, shift, scale, e_shift, e_scale)
    ff = gelu_tanh_mlp(x, w, p + "ff", {p + k_: v_ for k_, v_ in prec.items()})
    return h + _gate(t, s, gate, e_gate) * ff


def epilogue(w: Weights, config: dict, h: torch.Tensor, ctx: dict) -> torch.Tensor:
    """Final norm, AdaLN (shift, scale), projection, unpatchify → [B, F, C, H, W]."""
    eps = float(config.get("norm_eps", 1e-5))
    h = _native_layer_norm(h[:, ctx["text_len"]:], w, "norm_final", eps)
    shift, scale = dense(F.silu(ctx["emb"]), w, "norm_out.linear").chunk(2, dim=1)
    h = _native_layer_norm(h, w, "norm_out.norm", eps) * (1 + scale[:, None]) + shift[:, None]
    h = dense(h, w, "proj_out")
    b = h.shape[0]
    p = int(config["patch_size"])
    f, gh, gw = grid(config, ctx["latent"][1:])
    h = h.reshape(b, f, gh, gw, -1, p, p).permute(0, 1, 4, 2, 5, 3, 6)
    return h.flatten(5, 6).flatten(3, 4)


def text_range(config: dict, ctx: dict) -> tuple[int, int]:
    return (0, ctx["text_len"])


BLOCK_PREFIX = "transformer_blocks."


def pack_ctx(ctx: dict) -> tuple[torch.Tensor, ...]:
    """The context's tensors in a fixed order (compiled engines take them positionally)."""
    return (ctx["emb"],)


def unpack_ctx(tensors, latent: tuple[int, ...], text_len: int) -> dict:
    (emb,) = tensors
    return {"emb": emb, "text_len": text_len, "latent": latent}
