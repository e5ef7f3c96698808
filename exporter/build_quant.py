"""Weights of a quantized plan: NVFP4 for every block linear that any variant runs below bf16, the
16-bit weight only where some variant still runs the layer in bf16 (excluded layers, Purified
Delta Refresh), so weights are stored once whatever the number of variants.

Per layer ``blocks.{b}.{name}`` the artifact then holds (runtime/nn.py `quantizable_linear` reads them)::

    .nvfp4_packed        uint8 [N, K/2]      two E2M1 codes per byte (plugins/nvfp4.py order)
    .nvfp4_block_scales  float8_e4m3fn [N, K/16]
    .nvfp4_global_scale  float32 []
    .nvfp4_hadamard      uint8 [1]           present iff the block Hadamard is folded in
    .weight              (compute dtype)     only if some variant runs the layer in bf16
    .bias                                    unchanged

The Hadamard choice is the precision planner's measured one (`plan.predicted["precision"]["hadamard"]`).
"""
from __future__ import annotations

import logging

import torch

from ditbake.plugins.mixed_linear import prepare_nvfp4_weight
from ditbake.runtime.plan import Plan

log = logging.getLogger(__name__)


def layer_precisions(plan: Plan, block_prefix: str = "blocks.") -> dict[str, set[str]]:
    """Full layer name → the precisions it may run at. Baked: what the step table uses; adaptive:
    any compute variant may run on any block."""
    used: dict[str, set[str]] = {}
    if plan.mode == "adaptive":
        pairs = [(b, v) for b in range(plan.num_blocks) for v in plan.variants]
    else:
        pairs = [(b, plan.variants[vid]) for step in plan.steps for ids in step.values() for b, vid in enumerate(ids)]
    for b, v in pairs:
        if v.compute:
            prec = v.precision_map
            for name in plan.linear_layers:
                used.setdefault(f"{block_prefix}{b}.{name}", set()).add(prec.get(name, "bf16"))
    return used


def quantize_weights(source: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], plan: Plan,
                     block_prefix: str = "blocks.") -> dict[str, torch.Tensor]:
    """`weights` (already cast to the artifact dtype) with NVFP4 layers added and unused 16-bit
    weights dropped; quantized from `source` (the model's original-precision weights)."""
    hadamard = {f"{block_prefix}{b}.{name}" for b, name in (plan.predicted.get("precision") or {}).get("hadamard", ())}
    out = dict(weights)
    stored = dropped = 0
    for layer, precisions in sorted(layer_precisions(plan, block_prefix).items()):
        if precisions == {"bf16"}:
            continue
        had = layer in hadamard
        t = prepare_nvfp4_weight(source[layer + ".weight"].float(), hadamard=had)
        out[layer + ".nvfp4_packed"] = t.packed.contiguous()
        out[layer + ".nvfp4_block_scales"] = t.block_scales.contiguous()
        out[layer + ".nvfp4_global_scale"] = t.global_scale.reshape(()).to(torch.float32).contiguous()
        if had:
            out[layer + ".nvfp4_hadamard"] = torch.ones(1, dtype=torch.uint8)
        stored += 1
        if "bf16" not in precisions:
            del out[layer + ".weight"]
            dropped += 1
    if stored:
        log.info("NVFP4 weights for %d layers (%d with Hadamard); 16-bit weight dropped for %d", stored,
                 sum(1 for k in out if k.endswith(".nvfp4_hadamard")), dropped)
    return out


def weight_bytes(weights: dict[str, torch.Tensor], prefix: str = "") -> int:
    return sum(v.numel() * v.element_size() for k, v in weights.items() if k.startswith(prefix))
