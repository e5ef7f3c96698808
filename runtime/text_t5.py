"""T5 / UMT5 text encoders (transformers' T5EncoderModel, UMT5EncoderModel) in plain torch.

Weights are the module's own state-dict names (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`,
…); config is the module's `config.to_dict()`. The two differ in one point: T5 computes the relative
position bias in layer 0 and shares it, UMT5 gives every layer its own bias table. Both keep the
attention unscaled (the scale is folded into the weights), use RMS norms without mean subtraction, and
run the FFN's output projection `wo` in its own dtype (transformers keeps `wo` in fp32 when the rest is
loaded in 16 bits), so the residual stream turns fp32 from the first FFN on — as in transformers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ditbake.runtime.errors import ArtifactError, InputError
from ditbake.runtime.nn import Weights


def _t5_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5LayerNorm: RMS in fp32, cast back to a 16-bit weight's dtype, then scaled."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    return weight * x


def _activation(name: str):
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    if name in ("silu", "swish"):
        return F.silu
    raise ArtifactError(f"T5 activation {name!r} is not supported (gelu_new, gelu, relu, silu); "
                        "export a T5 encoder with one of these")


def _ffn_kind(config: dict) -> tuple[bool, str]:
    """(gated, activation) from `feed_forward_proj` ('relu', 'gated-gelu', …), parsed as T5Config does."""
    proj = str(config.get("feed_forward_proj", "relu"))
    parts = proj.split("-")
    if proj == "gated-gelu":
        return True, "gelu_new"  # T5Config maps gated-gelu to the tanh approximation
    return parts[0] == "gated", parts[-1]


def _bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional relative-position bucket (the encoder's rule, from Mesh TensorFlow)."""
    num_buckets //= 2
    buckets = (relative > 0).long() * num_buckets
    relative = relative.abs()
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    large = max_exact + (torch.log(relative.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative, large)


def position_bias(table: torch.Tensor, config: dict, length: int) -> torch.Tensor:
    """[1, heads, L, L] bias from a relative_attention_bias table [buckets, heads]."""
    pos = torch.arange(length, device=table.device)
    bucket = _bucket(pos[None, :] - pos[:, None], int(config.get("relative_attention_num_buckets", 32)),
                     int(config.get("relative_attention_max_distance", 128)))
    return F.embedding(bucket, table).permute(2, 0, 1).unsqueeze(0)


def _attention(x: torch.Tensor, w: Weights, p: str, heads: int, bias: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    q, k, v = (F.linear(x, w[p + name + ".weight"]).view(b, n, heads, -1).transpose(1, 2) for name in "qkv")
    scores = torch.matmul(q, k.transpose(2, 3)) + bias  # T5 attention is unscaled
    a = torch.matmul(F.softmax(scores.float(), dim=-1).type_as(scores), v)
    return F.linear(a.transpose(1, 2).reshape(b, n, -1), w[p + "o.weight"])


def _ffn(x: torch.Tensor, w: Weights, p: str, gated: bool, act) -> torch.Tensor:
    if gated:
        h = act(F.linear(x, w[p + "wi_0.weight"])) * F.linear(x, w[p + "wi_1.weight"])
    else:
        h = act(F.linear(x, w[p + "wi.weight"]))
    wo = w[p + "wo.weight"]
    if h.dtype != wo.dtype and wo.dtype != torch.int8:
        h = h.to(wo.dtype)
    return F.linear(h, wo)


def is_umt5(weights: Weights, config: dict) -> bool:
    """UMT5 has a bias table in every layer; T5 only in layer 0."""
    if "model_type" in config:
        return config["model_type"] == "umt5"
    return "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in weights


def encode(weights: Weights, config: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The encoder's `last_hidden_state` [B, L, d_model] for token ids [B, L] and a 0/1 mask [B, L]."""
    w = weights
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    embed = w.get("encoder.embed_tokens.weight", w.get("shared.weight"))
    if embed is None:
        raise ArtifactError("T5 weights hold no token embedding (shared.weight); re-export the text encoder")
    eps = float(config.get("layer_norm_epsilon", 1e-6))
    heads = int(config["num_heads"])
    gated, act_name = _ffn_kind(config)
    act = _activation(act_name)
    per_layer_bias = is_umt5(w, config)

    h = F.embedding(input_ids, embed)
    length = input_ids.shape[1]
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    # additive key mask with the dtype's most negative value, as transformers builds it
    additive = (1.0 - mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
    bias = None
    for i in range(int(config["num_layers"])):
        p = f"encoder.block.{i}.layer."
        if per_layer_bias or bias is None:
            table = w[p + "0.SelfAttention.relative_attention_bias.weight"]
            bias = position_bias(table, config, length)
        x = _t5_norm(h, w[p + "0.layer_norm.weight"], eps)
        h = h + _attention(x, w, p + "0.SelfAttention.", heads, (bias + additive).to(x.dtype))
        h = _clamp_fp16(h)
        x = _t5_norm(h, w[p + "1.layer_norm.weight"], eps)
        h = _clamp_fp16(h + _ffn(x, w, p + "1.DenseReluDense.", gated, act))
    return _t5_norm(h, w["encoder.final_layer_norm.weight"], eps)


def _clamp_fp16(h: torch.Tensor) -> torch.Tensor:
    """fp16 overflow guard exactly as transformers applies it after each sub-layer."""
    if h.dtype != torch.float16:
        return h
    big = torch.finfo(h.dtype).max
    # a tensor condition, not a Python branch: the compiled (aoti) encoder keeps the data-dependent choice
    limit = torch.where(torch.isinf(h).any(), big - 1000, big).to(h.dtype)
    return torch.clamp(h, min=-limit, max=limit)
