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

`--weight-storage nvfp4` stores a layer run only in 8 bits as its plain NVFP4 tensors instead
(no Hadamard), listed in the manifest for the loader to materialize (runtime/weights_4bit.py);
with calibration Hessians those, like every plain NVFP4 layer, are rounded by GPTQ (exporter/gptq.py).
"""
from __future__ import annotations

import logging
from collections.abc import Collection

import torch

from ditbake.plugins.int8 import EIGHT_BIT_FORMATS, quantize_weight_per_channel
from ditbake.plugins.mixed_linear import prepare_nvfp4_weight
from ditbake.runtime.plan import Plan

log = logging.getLogger(__name__)

def nvfp4_stored_8bit_layers(plan: Plan, block_prefix: str = "blocks.",
                             absent: Collection[tuple[int, str]] = frozenset()) -> dict[str, str]:
    """Layers `--weight-storage nvfp4` stores in NVFP4 and the loader materializes in 8 bits: those
    the plan runs in exactly one 8-bit format (int8 or fp8) and nothing else."""
    return {layer: next(iter(p)) for layer, p in sorted(plan.layer_precisions(block_prefix, absent).items())
            if len(p) == 1 and next(iter(p)) in EIGHT_BIT_FORMATS}


def quantize_weights(source: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], plan: Plan,
                     block_prefix: str = "blocks.",
                     absent: Collection[tuple[int, str]] = frozenset(), *,
                     nvfp4_8bit: Collection[str] = frozenset(),
                     hessians: dict[str, torch.Tensor] | None = None,
                     gptq_device: str | torch.device = "cpu", resident: bool = False) -> dict[str, torch.Tensor]:
    """`weights` (already cast to the artifact dtype) with NVFP4 layers added and unused 16-bit
    weights dropped; quantized from `source` (the model's original-precision weights).
    `nvfp4_8bit`: layers run in 8 bits that are stored in NVFP4 instead (`nvfp4_stored_8bit_layers`;
    runtime/weights_4bit.py materializes them at load). `hessians`: layer → input second moment
    (exporter/gptq.py); an NVFP4 layer without a Hadamard that has one is rounded by GPTQ, the
    others to nearest, on `gptq_device` (a CUDA device rounds the 1.3B's 300 layers in about a minute;
    the CPU takes many). `resident`: mark the `nvfp4_8bit` layers `L.nvfp4_as_8bit` so the runtime
    converts them per call instead of at load (`--weight-storage nvfp4-resident`)."""
    hadamard = {f"{block_prefix}{b}.{name}" for b, name in (plan.predicted.get("precision") or {}).get("hadamard", ())}
    hessians = hessians or {}
    out = dict(weights)
    stored = {"nvfp4": 0, "fp8": 0, "int8": 0}
    dropped = gptq = 0
    for layer, precisions in sorted(plan.layer_precisions(block_prefix, absent).items()):
        if precisions == {"bf16"}:
            continue
        source_weight = source[layer + ".weight"].float()
        as_nvfp4 = layer in nvfp4_8bit
        if "nvfp4" in precisions or as_nvfp4:
            had = layer in hadamard and not as_nvfp4  # a materialized layer runs the plain weight
            if not had and layer in hessians:
                from ditbake.exporter.gptq import gptq_nvfp4  # noqa: PLC0415

                t = gptq_nvfp4(source_weight.to(gptq_device), hessians[layer].to(gptq_device))
                t = type(t)(t.packed.cpu(), t.block_scales.cpu(), t.global_scale.cpu(), t.shape)
                gptq += 1
            else:
                t = prepare_nvfp4_weight(source_weight, hadamard=had)
            out[layer + ".nvfp4_packed"] = t.packed.contiguous()
            out[layer + ".nvfp4_block_scales"] = t.block_scales.contiguous()
            out[layer + ".nvfp4_global_scale"] = t.global_scale.reshape(()).to(torch.float32).contiguous()
            if had:
                out[layer + ".nvfp4_hadamard"] = torch.ones(1, dtype=torch.uint8)
            if as_nvfp4 and resident:
                out[layer + ".nvfp4_as_8bit"] = torch.ones(1, dtype=torch.uint8)
        for fmt in EIGHT_BIT_FORMATS:
            if fmt in precisions and not as_nvfp4:
                q, scale = quantize_weight_per_channel(source_weight, fmt)
                out[f"{layer}.{fmt}_weight"] = q.contiguous()
                out[f"{layer}.{fmt}_scale"] = scale.contiguous()
        for fmt in stored:
            stored[fmt] += (fmt == "nvfp4") if as_nvfp4 else (fmt in precisions)
        if "bf16" not in precisions:
            del out[layer + ".weight"]
            dropped += 1
    if hessians and not gptq:
        log.warning("GPTQ statistics were given but no layer is stored in plain NVFP4 (the plan runs none below 8 "
                    "bits and --weight-storage is 8bit): every weight is stored as without them")
    if any(stored.values()):
        log.info("quantized weights stored: %s layers in NVFP4 (%d with Hadamard, %d rounded by GPTQ, %d loaded as "
                 "8-bit), %s in FP8, %s in INT8; 16-bit weight dropped for %d", stored["nvfp4"],
                 sum(1 for k in out if k.endswith(".nvfp4_hadamard")), gptq, len(nvfp4_8bit), stored["fp8"],
                 stored["int8"], dropped)
    return out


def weight_bytes(weights: dict[str, torch.Tensor], prefix: str = "") -> int:
    return sum(v.numel() * v.element_size() for k, v in weights.items() if k.startswith(prefix))
