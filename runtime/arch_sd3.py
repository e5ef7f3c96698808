"""SD3Transformer2DModel (Stable Diffusion 3 MMDiT, text-to-image) in plain torch over diffusers-named weights.

Token layout: the blocks carry one joint sequence [B, N + T, D] with the image tokens first and the
text tokens LAST, as diffusers' JointAttnProcessor2_0 concatenates them, so the uniform block
signature has a single hidden tensor and the joint attention's text range is (N, N + T).

Pooled text: SD3 takes a pooled prompt vector (CLIP-L ⊕ CLIP-G pooled outputs, 2048-d for SD3)
beside the token embeddings: a prologue input (`extra_inputs`). Models whose config records
`pooled_source: "token_mean"` (the shipped test bed, trained with pooled = masked mean of its
MiniLM tokens; pooled_projection_dim == joint_attention_dim) may omit it: it is then derived from
the tokens as the mean of the prompt's rows (rows past the prompt are all zero).

Not implemented (the adapter refuses them): SD3.5 dual-attention layers, qk_norm other than
None / "rms_norm".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ditbake.runtime.nn import Weights, dense, gelu_tanh_mlp, quantizable_linear, timestep_embedding
from ditbake.runtime.nn import heads, num_blocks  # noqa: F401 - part of the architecture interface

NAME = "sd3"
# Every block linear; the last block is context_pre_only and lacks the text stream's output
# projection and MLP (KIND_LINEARS, `runtime.arch.block_linears`).
PRE_ONLY_LINEARS = ("norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0",
                    "ff.net.0.proj", "ff.net.2")
BLOCK_LINEARS = PRE_ONLY_LINEARS + ("attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2")
KIND_LINEARS = {"joint": BLOCK_LINEARS, "joint_pre_only": PRE_ONLY_LINEARS}
COMPRESSIBLE_ATTENTION = ("attn",)
BLOCK_PREFIX = "transformer_blocks."
NORM_EPS = 1e-6


def latent_shape(config: dict, frames: int, height: int, width: int) -> tuple[int, ...]:
    """Shape of one sample's latents: [C, H, W] (an image: `frames` is ignored)."""
    return (int(config["in_channels"]), height, width)


def grid(config: dict, latent: tuple[int, ...]) -> tuple[int, int, int]:
    p = int(config["patch_size"])
    _, h, w = latent
    return 1, h // p, w // p


def text_dim(config: dict) -> int:
    return int(config["joint_attention_dim"])


def block_kind(config: dict, index: int) -> str:
    """The last block is context_pre_only (diffusers builds it so): other weights, other code."""
    return "joint_pre_only" if index == num_blocks(config) - 1 else "joint"


def extra_inputs(config: dict) -> tuple[str, ...]:
    """Prologue inputs beyond (latents, timestep, text), in the engines' positional order."""
    return ("pooled",)


def pooled_dim(config: dict) -> int:
    return int(config["pooled_projection_dim"])


def pooled_is_token_mean(config: dict) -> bool:
    """True when the model was trained with pooled = masked token mean, so the vector may be derived."""
    source = config.get("pooled_source")
    if source is None:  # artifacts built before the pooled input existed derived it whenever the dims allowed
        return int(config["pooled_projection_dim"]) == int(config["joint_attention_dim"])
    return source == "token_mean"


def resolve_pooled(config: dict, text: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    if pooled is not None:
        return pooled
    if pooled_is_token_mean(config):
        return pooled_from_tokens(text)
    from ditbake.runtime.errors import InputError  # noqa: PLC0415

    raise InputError(f"this model takes a pooled text vector of {pooled_dim(config)} (its CLIP encoders' pooled "
                     "output); pass pooled_embeds (and negative_pooled_embeds with guidance)")


def pooled_from_tokens(text: torch.Tensor) -> torch.Tensor:
    """Mean of the non-zero token rows of [B, L, D] (the test bed's pooled vector); all-zero → zeros."""
    mask = (text != 0).any(dim=-1, keepdim=True).to(text.dtype)
    return (text * mask).sum(1) / mask.sum(1).clamp_min(1)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    # nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6), in fp32 for 16-bit inputs
    return F.layer_norm(x.float(), (x.shape[-1],), None, None, NORM_EPS).to(x.dtype)


def _cropped_pos_embed(w: Weights, config: dict, gh: int, gw: int) -> torch.Tensor:
    """diffusers PatchEmbed.cropped_pos_embed: the centre gh × gw of the max-size sin-cos table."""
    table = w["pos_embed.pos_embed"]
    size = int(config["pos_embed_max_size"])
    if gh > size or gw > size:
        from ditbake.runtime.errors import InputError  # noqa: PLC0415

        raise InputError(f"latent grid {gh}x{gw} exceeds pos_embed_max_size {size}; use a smaller image")
    top, left = (size - gh) // 2, (size - gw) // 2
    return table.reshape(1, size, size, -1)[:, top:top + gh, left:left + gw].reshape(1, gh * gw, -1)


def prologue(w: Weights, config: dict, latents: torch.Tensor, timestep: torch.Tensor,
             text: torch.Tensor, profile: dict, pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Patchify + cropped sin-cos positions, time + pooled-text embedding, caption projection.
    latents [B, C, H, W] → joint tokens [B, N + T, D] (image first, text last)."""
    dtype = w["pos_embed.proj.weight"].dtype
    p = int(config["patch_size"])
    x = F.conv2d(latents.to(dtype), w["pos_embed.proj.weight"], w.get("pos_embed.proj.bias"), stride=p)
    gh, gw = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    x = (x + _cropped_pos_embed(w, config, gh, gw).to(x.dtype)).to(dtype)
    t = timestep_embedding(timestep, 256, flip_sin_to_cos=True, shift=0)
    pooled = resolve_pooled(config, text.to(dtype), pooled).to(dtype)
    text = text.to(dtype)
    temb = dense(F.silu(dense(t.to(dtype), w, "time_text_embed.timestep_embedder.linear_1")), w,
                 "time_text_embed.timestep_embedder.linear_2")
    temb = temb + dense(F.silu(dense(pooled, w, "time_text_embed.text_embedder.linear_1")), w,
                        "time_text_embed.text_embedder.linear_2")
    context = dense(text, w, "context_embedder")
    joint = torch.cat([x, context], dim=1).contiguous()
    ctx = {"temb": temb, "text_len": context.shape[1], "latent": tuple(latents.shape)}
    return joint, ctx


def _qk_norm(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    weight = w.get(name + ".weight")
    if weight is None:
        return x
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), NORM_EPS).to(x.dtype)


def block(w: Weights, config: dict, index: int, h: torch.Tensor, ctx: dict, variant, attention,
          branch: str) -> torch.Tensor:
    """One JointTransformerBlock over the joint [image; text] sequence. The last block is
    context_pre_only: its text stream is only read by attention, so the text tokens pass through."""
    p = f"{BLOCK_PREFIX}{index}."
    prec = variant.precision_map
    lin = lambda x, name: quantizable_linear(x, w, p + name, prec.get(name, "bf16"))  # noqa: E731
    n = heads(config)
    t = ctx["text_len"]
    img, txt = h[:, :-t], h[:, -t:]
    pre_only = block_kind(config, index) == "joint_pre_only"
    cond = F.silu(ctx["temb"])

    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = lin(cond, "norm1.linear").chunk(6, dim=1)
    x_img = _layer_norm(img) * (1 + scale[:, None]) + shift[:, None]
    if pre_only:  # AdaLayerNormContinuous: (scale, shift), in that order
        c_scale, c_shift = lin(cond, "norm1_context.linear").chunk(2, dim=1)
        x_txt = _layer_norm(txt) * (1 + c_scale[:, None]) + c_shift[:, None]
    else:
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = lin(cond, "norm1_context.linear").chunk(6, dim=1)
        x_txt = _layer_norm(txt) * (1 + c_scale[:, None]) + c_shift[:, None]

    def split(x):
        return x.unflatten(2, (n, -1)).transpose(1, 2)  # [B, H, S, Dh]

    q = torch.cat([_qk_norm(split(lin(x_img, "attn.to_q")), w, p + "attn.norm_q"),
                   _qk_norm(split(lin(x_txt, "attn.add_q_proj")), w, p + "attn.norm_added_q")], dim=2)
    k = torch.cat([_qk_norm(split(lin(x_img, "attn.to_k")), w, p + "attn.norm_k"),
                   _qk_norm(split(lin(x_txt, "attn.add_k_proj")), w, p + "attn.norm_added_k")], dim=2)
    v = torch.cat([split(lin(x_img, "attn.to_v")), split(lin(x_txt, "attn.add_v_proj"))], dim=2)
    s = q.shape[2]
    a = attention((branch, index, "attn"), q, k, v, variant.head_map.get("attn"), (s - t, s),
                  grid(config, ctx["latent"][1:]))
    a = a.transpose(1, 2).flatten(2).type_as(h)
    img = img + gate[:, None] * lin(a[:, :-t], "attn.to_out.0")
    x = _layer_norm(img) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    sub = {p + k_: v_ for k_, v_ in prec.items()}
    img = img + gate_mlp[:, None] * gelu_tanh_mlp(x, w, p + "ff", sub)
    if not pre_only:
        txt = txt + c_gate[:, None] * lin(a[:, -t:], "attn.to_add_out")
        x = _layer_norm(txt) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        txt = txt + c_gate_mlp[:, None] * gelu_tanh_mlp(x, w, p + "ff_context", sub)
    return torch.cat([img, txt], dim=1)


def epilogue(w: Weights, config: dict, h: torch.Tensor, ctx: dict) -> torch.Tensor:
    """Drop the text, AdaLayerNormContinuous (scale, shift), projection, unpatchify → [B, C, H, W]."""
    img = h[:, :-ctx["text_len"]]
    scale, shift = dense(F.silu(ctx["temb"]), w, "norm_out.linear").chunk(2, dim=1)
    img = _layer_norm(img) * (1 + scale[:, None]) + shift[:, None]
    img = dense(img, w, "proj_out")
    b = img.shape[0]
    p = int(config["patch_size"])
    _, gh, gw = grid(config, ctx["latent"][1:])
    img = img.reshape(b, gh, gw, p, p, -1).permute(0, 5, 1, 3, 2, 4)
    return img.reshape(b, -1, gh * p, gw * p)


def text_range(config: dict, ctx: dict) -> tuple[int, int]:
    """Text is last; the joint length is not in ctx, so the range is given relative to the end."""
    n = grid(config, ctx["latent"][1:])
    visual = n[1] * n[2]
    return (visual, visual + ctx["text_len"])


def pack_ctx(ctx: dict) -> tuple[torch.Tensor, ...]:
    """The context's tensors in a fixed order (compiled engines take them positionally)."""
    return (ctx["temb"],)


def unpack_ctx(tensors, latent: tuple[int, ...], text_len: int) -> dict:
    (temb,) = tensors
    return {"temb": temb, "text_len": text_len, "latent": latent}
