"""Weights of a quantized plan, stored once per format the plan runs each layer in, whatever the
number of variants (DESIGN.md, artifact): NVFP4 for every block linear some variant runs at nvfp4,
8-bit weights (W8A8) for every one some variant runs at fp8 or int8, and the 16-bit weight only
where some variant still runs the layer in bf16 (excluded layers, Purified Delta Refresh).

Per layer ``blocks.{b}.{name}`` the artifact then holds (runtime/nn.py `quantizable_linear` reads them)::

    .nvfp4_packed        uint8 [N, K/2]      two E2M1 codes per byte (plugins/nvfp4.py order)
    .nvfp4_block_scales  float8_e4m3fn [N, K/16]
    .nvfp4_global_scale  float32 []
    .nvfp4_hadamard      uint8 [1]           present iff the block Hadamard is folded in
    .fp8_weight          float8_e4m3fn [N, K]   per output channel (plugins/linear_fp8.py)
    .fp8_scale           float32 [N]
    .int8_weight         int8 [N, K]            per output channel (plugins/int8.py)
    .int8_scale          float32 [N]
    .weight              (compute dtype)     only if some variant runs the layer in bf16
    .bias                                    unchanged

The Hadamard choice (NVFP4 layers) is the precision planner's measured one
(`plan.predicted["precision"]["hadamard"]`); 8-bit layers store the plain weight.
"""
from __future__ import annotations

import logging
from collections.abc import Collection

import torch

from ditbake.plugins.int8 import quantize_weight_per_channel
from ditbake.plugins.mixed_linear import prepare_nvfp4_weight
from ditbake.runtime.plan import Plan

log = logging.getLogger(__name__)


def layer_precisions(plan: Plan, block_prefix: str = "blocks.",
                     absent: Collection[tuple[int, str]] = frozenset()) -> dict[str, set[str]]:
    """Full layer name → the precisions it may run at. Baked: what the step table uses; adaptive:
    any compute variant may run on any block. `absent`: (block, layer) pairs the block does not
    have (their precision-map entries are ignored by the block, so nothing is stored for them)."""
    used: dict[str, set[str]] = {}
    for b, vid in plan.block_variant_ids():
        v = plan.variants[vid]
        if v.compute:
            prec = v.precision_map
            for name in plan.linear_layers:
                if (b, name) in absent:
                    continue
                used.setdefault(f"{block_prefix}{b}.{name}", set()).add(prec.get(name, "bf16"))
    return used


def quantize_weights(source: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], plan: Plan,
                     block_prefix: str = "blocks.",
                     absent: Collection[tuple[int, str]] = frozenset()) -> dict[str, torch.Tensor]:
    """`weights` (already cast to the artifact dtype) with NVFP4 layers added and unused 16-bit
    weights dropped; quantized from `source` (the model's original-precision weights)."""
    hadamard = {f"{block_prefix}{b}.{name}" for b, name in (plan.predicted.get("precision") or {}).get("hadamard", ())}
    out = dict(weights)
    stored = {"nvfp4": 0, "fp8": 0, "int8": 0}
    dropped = 0
    for layer, precisions in sorted(layer_precisions(plan, block_prefix, absent).items()):
        if precisions == {"bf16"}:
            continue
        source_weight = source[layer + ".weight"].float()
        if "nvfp4" in precisions:
            had = layer in hadamard
            t = prepare_nvfp4_weight(source_weight, hadamard=had)
            out[layer + ".nvfp4_packed"] = t.packed.contiguous()
            out[layer + ".nvfp4_block_scales"] = t.block_scales.contiguous()
            out[layer + ".nvfp4_global_scale"] = t.global_scale.reshape(()).to(torch.float32).contiguous()
            if had:
                out[layer + ".nvfp4_hadamard"] = torch.ones(1, dtype=torch.uint8)
        for fmt in ("fp8", "int8"):
            if fmt in precisions:
                q, scale = quantize_weight_per_channel(source_weight, fmt)
                out[f"{layer}.{fmt}_weight"] = q.contiguous()
                out[f"{layer}.{fmt}_scale"] = scale.contiguous()
        for fmt in stored:
            stored[fmt] += fmt in precisions
        if "bf16" not in precisions:
            del out[layer + ".weight"]
            dropped += 1
    if any(stored.values()):
        log.info("quantized weights stored: %s layers in NVFP4 (%d with Hadamard), %s in FP8, %s in INT8; "
                 "16-bit weight dropped for %d", stored["nvfp4"], sum(1 for k in out if k.endswith(".nvfp4_hadamard")),
                 stored["fp8"], stored["int8"], dropped)
    return out


def weight_bytes(weights: dict[str, torch.Tensor], prefix: str = "") -> int:
    return sum(v.numel() * v.element_size() for k, v in weights.items() if k.startswith(prefix))
