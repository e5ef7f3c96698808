"""Conditioning beyond the token embeddings: the prologue's extra inputs, validated.

SD3 and Flux take the pooled text vector [B, P] (their CLIP encoders' pooled output); guidance-
distilled Flux also takes its distilled guidance scale [B]. `runtime.arch.extra_inputs` names them
in the engines' positional order; this module turns a request's values into those tensors.
"""
from __future__ import annotations

import math

import torch

from ditbake.runtime import arch as runtime_arch
from ditbake.runtime.errors import InputError


def prologue_extras(arch, config: dict, text: torch.Tensor, pooled, guidance, what: str, *,
                    zero_pooled: bool = False, device=None, dtype=None) -> tuple[torch.Tensor, ...]:
    """The extra prologue inputs for one CFG branch. `text` is that branch's [B, L, D] embeddings.
    pooled None: derived as the token mean where the model was trained so (pooled_source
    "token_mean"), zeros when `zero_pooled` (no negative prompt at all), else an InputError.
    guidance None: the model config's default (3.5)."""
    device = device or text.device
    dtype = dtype or text.dtype
    out = []
    for name in runtime_arch.extra_inputs(arch, config):
        if name == "pooled":
            out.append(_pooled(arch, config, text, pooled, what, zero_pooled, device, dtype))
        elif name == "guidance":
            g = float(config.get("guidance", 3.5)) if guidance is None else guidance
            if not isinstance(g, (int, float)) or not math.isfinite(g):
                raise InputError(f"guidance must be a finite number, got {guidance!r}")
            out.append(torch.full((text.shape[0],), float(g), device=device, dtype=torch.float32))
        else:
            raise InputError(f"the model takes a {name!r} input this runtime does not know; upgrade ditbake")
    return tuple(out)


def _pooled(arch, config: dict, text: torch.Tensor, pooled, what: str, zero: bool, device, dtype) -> torch.Tensor:
    dim = arch.pooled_dim(config)
    if pooled is None:
        if arch.pooled_is_token_mean(config):
            return arch.pooled_from_tokens(text)
        if zero:
            return torch.zeros(text.shape[0], dim, device=device, dtype=dtype)
        raise InputError(f"this model takes a pooled text vector ({dim}-d, its CLIP encoders' pooled output): "
                         f"pass {what} [batch, {dim}]")
    if not isinstance(pooled, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor, got {type(pooled).__name__}")
    if pooled.ndim == 1:
        pooled = pooled[None]
    if tuple(pooled.shape) != (text.shape[0], dim):
        raise InputError(f"{what} has shape {list(pooled.shape)}; this model expects [{text.shape[0]}, {dim}]")
    if not torch.isfinite(pooled).all():
        raise InputError(f"{what} contains NaN or Inf; pass finite values")
    return pooled.to(device, dtype)
