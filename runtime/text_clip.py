"""CLIP text encoder (transformers' CLIPTextModel, CLIPTextModelWithProjection) in plain torch.

Weights are the module's state-dict names, with or without the `text_model.` prefix (transformers 5
stores CLIPTextModel's layers at the top level, CLIPTextModelWithProjection under `text_model.`);
config is the module's `config.to_dict()`. Pre-norm layers with a causal mask, the final layer norm
on the last state only, the pooled vector read at the end-of-text token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ditbake.runtime.errors import ArtifactError, InputError
from ditbake.runtime.nn import Weights, dense


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    raise ArtifactError(f"CLIP activation {name!r} is not supported (quick_gelu, gelu, gelu_new); "
                        "export a CLIP text encoder with one of these")


def _strip_prefix(weights: Weights) -> Weights:
    if "text_model.embeddings.token_embedding.weight" in weights:
        return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in weights.items()}
    return weights


def _layer_norm(x: torch.Tensor, w: Weights, name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w[name + ".weight"], w[name + ".bias"], eps)


def _attention(x: torch.Tensor, w: Weights, p: str, heads: int, mask: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    q, k, v = (dense(x, w, p + name).view(b, n, heads, -1).transpose(1, 2) for name in ("q_proj", "k_proj", "v_proj"))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return dense(a.transpose(1, 2).reshape(b, n, d), w, p + "out_proj")


def pooled_positions(config: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """Index of the end-of-text token per row, by transformers' rule: the first `eos_token_id`, or for
    configs with the legacy `eos_token_id` 2 the highest id (the original CLIP vocabulary's last entry)."""
    eos = config.get("eos_token_id", 2)
    ids = input_ids.to(torch.int)
    if eos == 2:
        return ids.argmax(dim=-1)
    return (ids == int(eos)).int().argmax(dim=-1)


def encode(weights: Weights, config: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           hidden_state_index: int | None = None) -> dict:
    """Run the text model on token ids [B, L].

    Returns `last_hidden_state` [B, L, D] (after the final layer norm), `pooled` [B, D] (pooler_output),
    `text_embeds` [B, P] when the weights hold `text_projection`, and, when `hidden_state_index` is given,
    `hidden_states`: that entry of transformers' `hidden_states` tuple (index 0 = embeddings, i = output
    of layer i, before the final norm; -2 = the penultimate layer that SD3 conditions on).
    """
    w = _strip_prefix(weights)
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    b, n = input_ids.shape
    positions = w["embeddings.position_embedding.weight"]
    if n > positions.shape[0]:
        raise InputError(f"{n} tokens exceed the CLIP encoder's {positions.shape[0]} positions; "
                         "tokenize with max_length <= that")
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    eps = float(config.get("layer_norm_eps", 1e-5))
    act = _activation(str(config.get("hidden_act", "quick_gelu")))
    if hidden_state_index is not None and not -(layers + 1) <= hidden_state_index <= layers:
        raise InputError(f"hidden_state_index {hidden_state_index} is outside the {layers + 1} hidden states")

    h = F.embedding(input_ids, w["embeddings.token_embedding.weight"]) + positions[:n]
    keep = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()[None, None]
    if attention_mask is not None:
        keep = keep & attention_mask.to(torch.bool)[:, None, None, :]
    # additive mask with the dtype's most negative value (as transformers' eager mask): a fully
    # masked row stays finite
    mask = torch.zeros(keep.shape, dtype=h.dtype, device=h.device).masked_fill(~keep, torch.finfo(h.dtype).min)
    wanted = None if hidden_state_index is None else hidden_state_index % (layers + 1)
    selected = h if wanted == 0 else None
    for i in range(layers):
        p = f"encoder.layers.{i}."
        h = h + _attention(_layer_norm(h, w, p + "layer_norm1", eps), w, p + "self_attn.", heads, mask)
        x = _layer_norm(h, w, p + "layer_norm2", eps)
        h = h + dense(act(dense(x, w, p + "mlp.fc1")), w, p + "mlp.fc2")
        if wanted == i + 1:
            selected = h
    last = _layer_norm(h, w, "final_layer_norm", eps)
    pooled = last[torch.arange(b, device=last.device), pooled_positions(config, input_ids).to(last.device)]
    out = {"last_hidden_state": last, "pooled": pooled}
    if selected is not None:
        out["hidden_states"] = selected
    if "text_projection.weight" in w:
        out["text_embeds"] = F.linear(pooled, w["text_projection.weight"])
    return out
