"""FluxTransformer2DModel (FLUX.1, text-to-image) in plain torch over diffusers-named weights.

Token layout: the blocks carry one joint sequence [B, T + N, D] with the text tokens FIRST and the
image tokens after them, as diffusers' FluxAttnProcessor and FluxSingleTransformerBlock
concatenate them, so the uniform block signature has a single hidden tensor and every attention
site's text range is (0, T).

Blocks: Flux has `num_layers` double-stream blocks (`transformer_blocks.*`, separate text and image
weights, joint attention) followed by `num_single_layers` single-stream blocks
(`single_transformer_blocks.*`, one set of weights over the joint sequence, attention and MLP in
parallel). The runtime numbers them as ONE list of `num_layers + num_single_layers` blocks: block
i < num_layers is double block i, block i >= num_layers is single block i - num_layers. Because the
artifact, the engines and the quantizer address a block's weights as `{BLOCK_PREFIX}{i}.{name}`,
the runtime's weight dict renumbers the single blocks into that namespace
(`single_transformer_blocks.{j}.x` → `transformer_blocks.{num_layers + j}.x`, see `uniform_weights`);
every other name is the diffusers state-dict name.

Linear layers: the two block kinds have different linear sets (KIND_LINEARS: DOUBLE_BLOCK_LINEARS,
SINGLE_BLOCK_LINEARS). The plan's one `linear_layers` list is their union (BLOCK_LINEARS); each
block has the layers of its kind (`runtime.arch.block_linears`), and calibration, planning and the
quantizer skip the others. `block` reads a precision for every linear it runs from the precision
map (absent → bf16) and ignores entries for layers its kind lacks.

Latents: the runtime takes the VAE latents [B, C, H, W] and packs 2×2 patches into tokens
(diffusers FluxPipeline._pack_latents; the model's own patch_size must be 1), so in_channels is
4·C; the epilogue unpacks them again.

Pooled text and guidance: as for SD3, the pooled prompt vector (CLIP-L's pooled output, 768-d for
FLUX.1) is a prologue input; models recorded as `pooled_source: "token_mean"` may omit it.
Guidance-distilled models (guidance_embeds) take the distilled guidance scale as a further
prologue input [B] (FluxPipeline's `guidance_scale`, separate from CFG; default
config["guidance"], 3.5); the model embeds guidance · 1000 as it embeds timesteps.

Timesteps are on the scheduler's 0..1000 scale (diffusers' pipeline divides by 1000, the model
multiplies by 1000 again; the runtime does the same round trip so fp32 results are identical).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ditbake.runtime.arch_sd3 import pooled_dim, pooled_from_tokens, pooled_is_token_mean, resolve_pooled  # noqa: F401
from ditbake.plugins.rms_rope_heads import rms_rope_heads_ref
from ditbake.runtime.nn import (LinearInput, Weights, dense, gelu_tanh_mlp, int8_gelu_gemm, normed_input,
                                quantizable_linear, timestep_embedding)
from ditbake.runtime.nn import heads  # also part of the architecture interface

NAME = "flux"
DOUBLE_BLOCK_LINEARS = ("norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v",
                        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0",
                        "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                        "ff_context.net.2")
SINGLE_BLOCK_LINEARS = ("norm.linear", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
KIND_LINEARS = {"double": DOUBLE_BLOCK_LINEARS, "single": SINGLE_BLOCK_LINEARS}
# Every linear some block has (the plan's one list); a block has those of its kind.
BLOCK_LINEARS = DOUBLE_BLOCK_LINEARS + tuple(n for n in SINGLE_BLOCK_LINEARS if n not in DOUBLE_BLOCK_LINEARS)
COMPRESSIBLE_ATTENTION = ("attn",)
BLOCK_PREFIX = "transformer_blocks."
SINGLE_PREFIX = "single_transformer_blocks."
NORM_EPS = 1e-6
ROPE_THETA = 10000.0
DEFAULT_GUIDANCE = 3.5


def num_blocks(config: dict) -> int:
    """Double-stream then single-stream blocks, as one list."""
    return int(config["num_layers"]) + int(config["num_single_layers"])


def is_single(config: dict, index: int) -> bool:
    return index >= int(config["num_layers"])


def block_kind(config: dict, index: int) -> str:
    """Compiled engines differ per kind: the two kinds have different code and weights."""
    return "single" if is_single(config, index) else "double"


def extra_inputs(config: dict) -> tuple[str, ...]:
    """Prologue inputs beyond (latents, timestep, text), in the engines' positional order."""
    return ("pooled", "guidance") if config.get("guidance_embeds") else ("pooled",)


def uniform_weights(weights: Weights, config: dict) -> Weights:
    """Renumber the single blocks into the one block namespace (tensors shared, not copied)."""
    offset = int(config["num_layers"])
    out = {}
    for k, v in weights.items():
        if k.startswith(SINGLE_PREFIX):
            j, rest = k[len(SINGLE_PREFIX):].split(".", 1)
            k = f"{BLOCK_PREFIX}{offset + int(j)}.{rest}"
        out[k] = v
    return out


def latent_shape(config: dict, frames: int, height: int, width: int) -> tuple[int, ...]:
    """Shape of one sample's (unpacked) latents: [C, H, W] with C = in_channels / 4 (`frames` is ignored)."""
    return (int(config["in_channels"]) // 4, height, width)


def grid(config: dict, latent: tuple[int, ...]) -> tuple[int, int, int]:
    _, h, w = latent
    return 1, h // 2, w // 2


def text_dim(config: dict) -> int:
    return int(config["joint_attention_dim"])


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    # nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6), in fp32 for 16-bit inputs
    return F.layer_norm(x.float(), (x.shape[-1],), None, None, NORM_EPS).to(x.dtype)


def _modulated(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> LinearInput:
    """`layer_norm(x) * (1 + scale) + shift` (scale / shift [B, D]) as a linear input: the float path keeps
    diffusers' ops (the norm rounded to x's dtype, then the modulation in x's dtype); an 8-bit linear reads
    the codes of the norm producer kernel (plugins/producer_quant.norm_quant: the same modulation in fp32,
    rounded once, with the same 1 + scale), one pass over x. Inductor's fusion of these ops with the
    quantization ran at ≈ 0.65 TB/s on the H100 (9.1 ms per forward at 2048² for the single blocks alone)."""
    mul = 1 + scale[:, None]
    return normed_input(x, mul.float(), shift[:, None].float(), NORM_EPS,
                        make_float=lambda: _layer_norm(x) * mul + shift[:, None])


def rope(config: dict, text_len: int, gh: int, gw: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """FluxPosEmbed over [text ids (all zero); image ids (0, row, col)] → cos, sin [1, 1, T + N, Dh] (fp32)."""
    ids = torch.zeros(text_len + gh * gw, 3, dtype=torch.float64, device=device)
    rows = torch.arange(gh, dtype=torch.float64, device=device)[:, None].expand(gh, gw)
    cols = torch.arange(gw, dtype=torch.float64, device=device)[None, :].expand(gh, gw)
    ids[text_len:, 1] = rows.reshape(-1)
    ids[text_len:, 2] = cols.reshape(-1)
    cos, sin = [], []
    for axis, dim in enumerate(config.get("axes_dims_rope", (16, 56, 56))):
        dim = int(dim)
        freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
        angles = torch.outer(ids[:, axis], freqs)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, -1)[None, None], torch.cat(sin, -1)[None, None]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/2)(W/2), 4C] (diffusers FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """[B, gh·gw, 4C] → [B, C, 2gh, 2gw] (diffusers FluxPipeline._unpack_latents)."""
    b = x.shape[0]
    x = x.view(b, gh, gw, -1, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, -1, gh * 2, gw * 2)


def prologue(w: Weights, config: dict, latents: torch.Tensor, timestep: torch.Tensor,
             text: torch.Tensor, profile: dict, pooled: torch.Tensor | None = None,
             guidance: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Pack 2×2 + x_embedder, time (+ guidance) + pooled-text embedding, context_embedder, rotary table.
    latents [B, C, H, W] → joint tokens [B, T + N, D] (text first, image last)."""
    dtype = w["x_embedder.weight"].dtype
    b, _, h, wd = latents.shape
    gh, gw = h // 2, wd // 2
    x = dense(pack_latents(latents.to(dtype)), w, "x_embedder")
    t = (timestep / 1000).to(dtype) * 1000
    emb = dense(F.silu(dense(timestep_embedding(t, 256, flip_sin_to_cos=True, shift=0).to(dtype), w,
                             "time_text_embed.timestep_embedder.linear_1")), w,
                "time_text_embed.timestep_embedder.linear_2")
    if "time_text_embed.guidance_embedder.linear_1.weight" in w:
        if guidance is None:
            guidance = torch.full((b,), float(config.get("guidance", DEFAULT_GUIDANCE)), device=latents.device)
        g = guidance.to(dtype) * 1000  # the pipeline passes the scale itself; the model multiplies it by 1000
        gp = timestep_embedding(g, 256, flip_sin_to_cos=True, shift=0).to(dtype)
        emb = emb + dense(F.silu(dense(gp, w, "time_text_embed.guidance_embedder.linear_1")), w,
                          "time_text_embed.guidance_embedder.linear_2")
    pooled = resolve_pooled(config, text.to(dtype), pooled).to(dtype)
    text = text.to(dtype)
    temb = emb + dense(F.silu(dense(pooled, w, "time_text_embed.text_embedder.linear_1")), w,
                       "time_text_embed.text_embedder.linear_2")
    context = dense(text, w, "context_embedder")
    cos, sin = rope(config, context.shape[1], gh, gw, latents.device)
    joint = torch.cat([context, x], dim=1).contiguous()
    ctx = {"temb": temb, "rope_cos": cos, "rope_sin": sin, "text_len": context.shape[1],
           "latent": tuple(latents.shape)}
    return joint, ctx


def _normed_rotated_heads(x, w: Weights, name: str, ctx: dict, n: int, first=None, first_name=None):
    """q or k of the joint attention, [B, H, S, Dh]: per-head RMS norm (the text stream `first`, when
    given, with its own norm and first in the sequence), then the rotary embedding. On the GPU one
    kernel (plugins/rms_rope_heads.py: Inductor's two kernels for these ops ran at under half the
    memory roofline); elsewhere the ops themselves (its specification; the ONNX exporter sees plain ops)."""
    def weight(key):
        found = w.get(key + ".weight")
        return torch.ones(x.shape[-1] // n, dtype=x.dtype, device=x.device) if found is None else found

    first_weight = None if first is None else weight(first_name)
    args = (x, weight(name), ctx["rope_cos"], ctx["rope_sin"], NORM_EPS, n, first, first_weight)
    if x.is_cuda:
        from ditbake.plugins.rms_rope_heads import rms_rope_heads  # noqa: PLC0415

        return rms_rope_heads(*args)
    return rms_rope_heads_ref(*args)


def _attention_beside_gelu(a: torch.Tensor, h: torch.Tensor, h_amax: torch.Tensor, lead, dtype) -> LinearInput:
    """proj_out's input cat([attention, GELU(proj_mlp)]) of a single block whose MLP GELU and its rows'
    max |GELU| came from the INT8 GEMM's epilogue (runtime.nn.int8_gelu_gemm): the 8-bit codes in one
    streaming pass over both parts (plugins/producer_quant.cat_amax_quant) with each row's amax the larger
    of the attention's (a small reduction) and the GELU's, never writing the 15,360-wide concatenation.
    Inductor's fusion of cat + amax + codes over that width ran at about 1 TB/s (28 ms per forward at 2048²)."""
    from ditbake.plugins.producer_quant import cat_amax_quant  # noqa: PLC0415

    a2 = a.reshape(-1, a.shape[-1])

    def make_8bit(fmt):
        amax = torch.maximum(a2.abs().amax(-1).float(), h_amax)
        return (*cat_amax_quant(a2, h, amax, fmt), (lead, dtype))

    return LinearInput(lambda: torch.cat([a, h.reshape(*lead, h.shape[-1])], dim=2), make_8bit)


def _attention(q, k, v, ctx, attention, variant, branch, index, config):
    """q, k, v [B, H, S, Dh] after QK norm and rotary: the plan's attention with text range (0, T)."""
    a = attention((branch, index, "attn"), q, k, v, variant.head_map.get("attn"), (0, ctx["text_len"]),
                  grid(config, ctx["latent"][1:]))
    return a.transpose(1, 2).flatten(2)


def block(w: Weights, config: dict, index: int, h: torch.Tensor, ctx: dict, variant, attention,
          branch: str) -> torch.Tensor:
    """Runtime block `index` over the joint [text; image] sequence: a FluxTransformerBlock
    (double-stream) for index < num_layers, a FluxSingleTransformerBlock after that."""
    p = f"{BLOCK_PREFIX}{index}."
    prec = variant.precision_map
    lin = lambda x, name: quantizable_linear(x, w, p + name, prec.get(name, "bf16"))  # noqa: E731
    n = heads(config)
    t = ctx["text_len"]
    cond = F.silu(ctx["temb"])

    def split(x):
        return x.unflatten(2, (n, -1)).transpose(1, 2)  # [B, H, S, Dh]

    if is_single(config, index):
        shift, scale, gate = lin(cond, "norm.linear").chunk(3, dim=1)
        x = _modulated(h, scale, shift)
        up = int8_gelu_gemm(x, w, p + "proj_mlp", p + "proj_out", {p + k_: v_ for k_, v_ in prec.items()})
        mlp = F.gelu(lin(x, "proj_mlp"), approximate="tanh") if up is None else None
        q = _normed_rotated_heads(lin(x, "attn.to_q"), w, p + "attn.norm_q", ctx, n)
        k = _normed_rotated_heads(lin(x, "attn.to_k"), w, p + "attn.norm_k", ctx, n)
        v = split(lin(x, "attn.to_v"))
        a = _attention(q, k, v, ctx, attention, variant, branch, index, config).type_as(h)
        out_in = torch.cat([a, mlp], dim=2) if up is None else _attention_beside_gelu(a, *up)
        return h + gate[:, None] * lin(out_in, "proj_out")

    txt, img = h[:, :t], h[:, t:]
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = lin(cond, "norm1.linear").chunk(6, dim=1)
    c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = lin(cond, "norm1_context.linear").chunk(6, dim=1)
    x_img = _modulated(img, scale, shift)
    x_txt = _modulated(txt, c_scale, c_shift)
    q = _normed_rotated_heads(lin(x_img, "attn.to_q"), w, p + "attn.norm_q", ctx, n,
                              lin(x_txt, "attn.add_q_proj"), p + "attn.norm_added_q")
    k = _normed_rotated_heads(lin(x_img, "attn.to_k"), w, p + "attn.norm_k", ctx, n,
                              lin(x_txt, "attn.add_k_proj"), p + "attn.norm_added_k")
    v = torch.cat([split(lin(x_txt, "attn.add_v_proj")), split(lin(x_img, "attn.to_v"))], dim=2)
    a = _attention(q, k, v, ctx, attention, variant, branch, index, config).type_as(h)
    sub = {p + k_: v_ for k_, v_ in prec.items()}
    img = img + gate[:, None] * lin(a[:, t:], "attn.to_out.0")
    x = _modulated(img, scale_mlp, shift_mlp)
    img = img + gate_mlp[:, None] * gelu_tanh_mlp(x, w, p + "ff", sub)
    txt = txt + c_gate[:, None] * lin(a[:, :t], "attn.to_add_out")
    x = _modulated(txt, c_scale_mlp, c_shift_mlp)
    txt = txt + c_gate_mlp[:, None] * gelu_tanh_mlp(x, w, p + "ff_context", sub)
    return torch.cat([txt, img], dim=1)


def epilogue(w: Weights, config: dict, h: torch.Tensor, ctx: dict) -> torch.Tensor:
    """Drop the text, AdaLayerNormContinuous (scale, shift), projection, unpack 2×2 → [B, C, H, W]."""
    img = h[:, ctx["text_len"]:]
    scale, shift = dense(F.silu(ctx["temb"]), w, "norm_out.linear").chunk(2, dim=1)
    img = _layer_norm(img) * (1 + scale[:, None]) + shift[:, None]
    img = dense(img, w, "proj_out")
    _, gh, gw = grid(config, ctx["latent"][1:])
    return unpack_latents(img, gh, gw)


def text_range(config: dict, ctx: dict) -> tuple[int, int]:
    """Text is first."""
    return (0, ctx["text_len"])


def pack_ctx(ctx: dict) -> tuple[torch.Tensor, ...]:
    """The context's tensors in a fixed order (compiled engines take them positionally)."""
    return (ctx["temb"], ctx["rope_cos"], ctx["rope_sin"])


def unpack_ctx(tensors, latent: tuple[int, ...], text_len: int) -> dict:
    temb, cos, sin = tensors
    return {"temb": temb, "rope_cos": cos, "rope_sin": sin, "text_len": text_len, "latent": latent}
