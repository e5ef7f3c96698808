"""WanTransformer3DModel (Wan 2.1 text-to-video) in plain torch over diffusers-named weights.

Token layout: the blocks carry visual tokens only ([B, F·H·W, D], frame-major); text enters
through cross-attention, so the self-attention that the plan compresses has no text range.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ditbake.runtime.nn import (Weights, dense, eight_bit_format, gelu_tanh_mlp, layer_norm, normed_input,
                                quantizable_linear, residual_normed_input, residual_update, rms_norm,
                                rotate_interleaved, timestep_embedding)
from ditbake.runtime.nn import heads, num_blocks  # noqa: F401 - part of the architecture interface

NAME = "wan"
BLOCK_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                 "ffn.net.0.proj", "ffn.net.2")
COMPRESSIBLE_ATTENTION = ("attn1",)


def latent_shape(config: dict, frames: int, height: int, width: int) -> tuple[int, ...]:
    """Shape of one sample's latents: [C, F, H, W]."""
    return (int(config["in_channels"]), frames, height, width)


def grid(config: dict, latent: tuple[int, ...]) -> tuple[int, int, int]:
    p_t, p_h, p_w = config["patch_size"]
    _, f, h, w = latent
    return f // p_t, h // p_h, w // p_w


def _rope_1d(dim: int, length: int, device=None, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device)[: dim // 2] / dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float64, device=device), freqs)
    return angles.cos().repeat_interleave(2, dim=1).float(), angles.sin().repeat_interleave(2, dim=1).float()


def rope(config: dict, latent: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    """3-axis rotary tables [1, S, 1, D] over (frame, height, width), as diffusers' WanRotaryPosEmbed.
    Computed on the device: built on the host they cost a 34 MB host-to-device copy per forward at
    480×832×81 (inside compiled engines too), and a host copy cannot be captured in a CUDA graph."""
    d = int(config["attention_head_dim"])
    h_dim = w_dim = 2 * (d // 6)
    t_dim = d - h_dim - w_dim
    f, h, w = grid(config, latent)
    cos_parts, sin_parts = [], []
    for axis, (dim, n) in enumerate(((t_dim, f), (h_dim, h), (w_dim, w))):
        c, s = _rope_1d(dim, n, device)
        shape = [1, 1, 1, dim]
        shape[axis] = n
        cos_parts.append(c.view(shape).expand(f, h, w, dim))
        sin_parts.append(s.view(shape).expand(f, h, w, dim))
    cos = torch.cat(cos_parts, dim=-1).reshape(1, f * h * w, 1, d)
    sin = torch.cat(sin_parts, dim=-1).reshape(1, f * h * w, 1, d)
    return cos, sin


def prologue(w: Weights, config: dict, latents: torch.Tensor, timestep: torch.Tensor,
             text: torch.Tensor, profile: dict) -> tuple[torch.Tensor, dict]:
    """Patchify + time and text embeddings. latents [B, C, F, H, W] → tokens [B, S, D]."""
    dtype = w["patch_embedding.weight"].dtype
    x = F.conv3d(latents.to(dtype), w["patch_embedding.weight"], w["patch_embedding.bias"],
                 stride=tuple(config["patch_size"]))
    x = x.flatten(2).transpose(1, 2).contiguous()
    t = timestep_embedding(timestep, int(config["freq_dim"]), flip_sin_to_cos=True, shift=0)
    t = t.to(w["condition_embedder.time_embedder.linear_1.weight"].dtype)
    temb = dense(F.silu(dense(t, w, "condition_embedder.time_embedder.linear_1")), w,
                 "condition_embedder.time_embedder.linear_2").to(dtype)
    timestep_proj = dense(F.silu(temb), w, "condition_embedder.time_proj").unflatten(1, (6, -1))
    ctx_text = dense(F.gelu(dense(text.to(dtype), w, "condition_embedder.text_embedder.linear_1"),
                            approximate="tanh"), w, "condition_embedder.text_embedder.linear_2")
    ctx = {"temb": temb, "timestep_proj": timestep_proj, "text": ctx_text,
           "rope": rope(config, tuple(latents.shape[1:]), latents.device), "latent": tuple(latents.shape)}
    return x, ctx


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.unflatten(2, (n, -1))  # [B, S, H, Dh]


def _normed_rotated_heads(x, weight, cos, sin, eps: float, n: int) -> torch.Tensor:
    """q / k of self-attention: RMS norm across heads, rotary embedding, [B, H, S, D]. On the GPU one
    kernel (plugins/rms_rope.py: Inductor's fusion of these ops ran at a quarter of the memory
    roofline); elsewhere the ops themselves (its specification; the ONNX exporter sees plain ops)."""
    if x.is_cuda:
        from ditbake.plugins.rms_rope import rms_rope  # noqa: PLC0415

        return rms_rope(x, weight, cos, sin, eps, n)
    return rotate_interleaved(_heads(rms_norm(x, weight, eps), n), cos, sin).transpose(1, 2)


def _residual_and_cross_attention_input(w: Weights, p: str, h: torch.Tensor, a: torch.Tensor, gate: torch.Tensor,
                                        eps: float, fmt: str | None):
    """The self-attention's gated residual and norm2 (affine layer norm) of it as the input of attn2.to_q
    (in one kernel when attn2.to_q reads 8-bit codes `fmt` on the GPU). Returns (h, input)."""
    weight, bias = w.get(p + "norm2.weight"), w.get(p + "norm2.bias")
    if weight is None or bias is None:
        h = residual_update(h, a, gate)
        return h, layer_norm(h, w, p + "norm2", eps).type_as(h)
    return residual_normed_input(h, a, gate, weight.float().reshape(1, 1, -1), bias.float().reshape(1, 1, -1), eps,
                                 fmt, float_of=lambda new: layer_norm(new, w, p + "norm2", eps).type_as(new))


def block(w: Weights, config: dict, index: int, h: torch.Tensor, ctx: dict, variant, attention,
          branch: str) -> torch.Tensor:
    """One WanTransformerBlock: modulated self-attention (rope), cross-attention to text, FFN."""
    p = f"blocks.{index}."
    prec = {k: v for k, v in variant.precision_map.items()}
    lin = lambda x, name: quantizable_linear(x, w, p + name, prec.get(name, "bf16"))  # noqa: E731
    reads_8bit = lambda name: eight_bit_format(w, p + name, prec.get(name, "bf16"))  # noqa: E731
    eps = float(config.get("eps", 1e-6))
    n = heads(config)
    mod = (w[p + "scale_shift_table"].float() + ctx["timestep_proj"].float()).chunk(6, dim=1)
    shift, scale, gate, c_shift, c_scale, c_gate = mod

    x = normed_input(h, 1 + scale, shift, eps)  # 8-bit q/k/v read codes its kernel writes
    cos, sin = ctx["rope"]
    q = _normed_rotated_heads(lin(x, "attn1.to_q"), w[p + "attn1.norm_q.weight"], cos, sin, eps, n)
    k = _normed_rotated_heads(lin(x, "attn1.to_k"), w[p + "attn1.norm_k.weight"], cos, sin, eps, n)
    v = _heads(lin(x, "attn1.to_v"), n).transpose(1, 2)
    a = attention((branch, index, "attn1"), q, k, v, variant.head_map.get("attn1"), (0, 0),
                  grid(config, ctx["latent"][1:]))
    a = lin(a.transpose(1, 2).flatten(2).type_as(h), "attn1.to_out.0")
    if config.get("cross_attn_norm", True):
        h, x = _residual_and_cross_attention_input(w, p, h, a, gate, eps, reads_8bit("attn2.to_q"))
    else:
        h = x = residual_update(h, a, gate)
    text = ctx["text"]
    q = rms_norm(lin(x, "attn2.to_q"), w[p + "attn2.norm_q.weight"], eps)
    k = rms_norm(lin(text, "attn2.to_k"), w[p + "attn2.norm_k.weight"], eps)
    v = lin(text, "attn2.to_v")
    a = F.scaled_dot_product_attention(_heads(q, n).transpose(1, 2), _heads(k, n).transpose(1, 2),
                                       _heads(v, n).transpose(1, 2))
    h, x = residual_normed_input(h, lin(a.transpose(1, 2).flatten(2).type_as(h), "attn2.to_out.0"), None,
                                 1 + c_scale, c_shift, eps, reads_8bit("ffn.net.0.proj"))
    ff = gelu_tanh_mlp(x, w, p + "ffn", {p + k_: v_ for k_, v_ in prec.items()})
    return (h.float() + ff.float() * c_gate).type_as(h)


def epilogue(w: Weights, config: dict, h: torch.Tensor, ctx: dict) -> torch.Tensor:
    """Modulated output norm, projection, unpatchify → [B, C, F, H, W]."""
    eps = float(config.get("eps", 1e-6))
    shift, scale = (w["scale_shift_table"].float() + ctx["temb"].float().unsqueeze(1)).chunk(2, dim=1)
    h = (layer_norm(h, None, None, eps) * (1 + scale) + shift).type_as(h)
    h = dense(h, w, "proj_out")
    b = h.shape[0]
    p_t, p_h, p_w = config["patch_size"]
    f, gh, gw = grid(config, ctx["latent"][1:])
    h = h.reshape(b, f, gh, gw, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return h.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def text_range(config: dict, ctx: dict) -> tuple[int, int]:
    return (0, 0)


BLOCK_PREFIX = "blocks."


def pack_ctx(ctx: dict) -> tuple[torch.Tensor, ...]:
    """The context's tensors in a fixed order (compiled engines take them positionally)."""
    return (ctx["temb"], ctx["timestep_proj"], ctx["text"], *ctx["rope"])


def unpack_ctx(tensors, latent: tuple[int, ...], text_len: int) -> dict:
    temb, timestep_proj, text, cos, sin = tensors
    return {"temb": temb, "timestep_proj": timestep_proj, "text": text, "rope": (cos, sin), "latent": latent}
