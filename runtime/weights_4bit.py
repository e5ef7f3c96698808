"""8-bit weights materialized at load from 4-bit storage.

An artifact built with `--weight-storage nvfp4` stores a layer the plan runs only in 8 bits (W8A8)
as NVFP4 (4.5 bits per weight: E2M1 codes + an E4M3 scale per 16) instead of 8-bit weights, and
records it in the manifest's ``"weights_8bit_from_nvfp4": {layer: "int8" | "fp8"}``. Loading
dequantizes each such layer (exact, FP32) and quantizes it per output channel to that format
(plugins/int8.py, the build's own 8-bit quantizer): the artifact ships 3.4-3.6× fewer weight bytes
than bf16, the GPU runs the W8A8 kernels at their speed. The second rounding adds a relative RMS of
≈ 0.2 % of the row amax (1/(127·√12) for int8), small next to the NVFP4 error it sits on (the same
conversion `mixed_linear`'s W4A8 path makes in-kernel at every call).

The build traces its engines with the same materialized weights (`materialize`), so an engine
reads `L.int8_weight` / `L.int8_scale` exactly as for an artifact that stores them.

`--weight-storage nvfp4-resident` keeps the NVFP4 tensors in GPU memory as well: such a layer carries
the marker `L.nvfp4_as_8bit` instead of a manifest entry, and `runtime/nn.py` makes its 8-bit weight
from them inside the graph at every call (`nvfp4_to_8bit`: the same numbers, recomputed), so resident
weights are 4.5 bits too, for a memory-bound conversion per layer call.
"""
from __future__ import annotations

import torch

from ditbake.runtime.errors import ArtifactError

MANIFEST_KEY = "weights_8bit_from_nvfp4"
NVFP4_SUFFIXES = ("nvfp4_packed", "nvfp4_block_scales", "nvfp4_global_scale")


def check(layers, weights: dict, planned: dict[str, set[str]] | None = None) -> dict[str, str]:
    """The manifest's entry as {layer: format}, checked against the stored tensors (and the plan's
    precisions per layer, when given): typed errors for anything the loader could not honour."""
    if layers is None:
        return {}
    from ditbake.plugins.int8 import EIGHT_BIT_FORMATS  # noqa: PLC0415 - the runtime loads plugins lazily

    if not isinstance(layers, dict):
        raise ArtifactError(f"manifest {MANIFEST_KEY} must be an object {{layer: format}}, got {type(layers).__name__}")
    for layer, fmt in layers.items():
        if fmt not in EIGHT_BIT_FORMATS:
            raise ArtifactError(f"manifest {MANIFEST_KEY}[{layer!r}] is {fmt!r}; expected one of {EIGHT_BIT_FORMATS}")
        missing = [s for s in NVFP4_SUFFIXES if f"{layer}.{s}" not in weights]
        if missing:
            raise ArtifactError(f"layer {layer} is to be loaded from NVFP4 but weights.safetensors has no "
                                f"{layer}.{missing[0]}; rebuild the artifact")
        clash = [f"{layer}.{n}" for n in ("nvfp4_hadamard", f"{fmt}_weight", f"{fmt}_scale") if f"{layer}.{n}" in weights]
        if clash:
            raise ArtifactError(f"layer {layer} is to be loaded from NVFP4 but the artifact also stores {clash[0]}; "
                                "rebuild the artifact")
        if planned is not None and planned.get(layer, {fmt}) != {fmt}:
            raise ArtifactError(f"layer {layer} is stored for {fmt} only but the plan runs it at "
                                f"{sorted(planned[layer])}; rebuild the artifact from this plan")
    return dict(layers)


def nvfp4_to_8bit(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                  fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit weight [N, K] and per-channel scale fp32 [N] of an NVFP4 weight: dequantized exactly
    (FP32) and quantized per output channel as the build quantizes 8-bit weights. Torch ops only, so
    `--weight-storage nvfp4-resident` engines trace it (the weight stays 4.5 bits in memory)."""
    from ditbake.plugins.int8 import quantize_weight_per_channel  # noqa: PLC0415
    from ditbake.plugins.nvfp4 import NVFP4Tensor, dequantize_nvfp4  # noqa: PLC0415

    n, k = packed.shape[0], packed.shape[1] * 2
    w = dequantize_nvfp4(NVFP4Tensor(packed, block_scales, global_scale.reshape(()), torch.Size((n, k))))
    return quantize_weight_per_channel(w, fmt)


def materialize(weights: dict[str, torch.Tensor], layers: dict[str, str]) -> dict[str, torch.Tensor]:
    """`weights` with each listed layer's NVFP4 tensors replaced by its 8-bit weight and per-channel
    scale, computed on the tensors' device (a new dict; `weights` is not changed)."""
    if not layers:
        return weights
    from ditbake.plugins.nvfp4 import check_nvfp4_weight  # noqa: PLC0415

    out = dict(weights)
    for layer, fmt in layers.items():
        packed, scales, global_scale = (out.pop(f"{layer}.{s}") for s in NVFP4_SUFFIXES)
        check_nvfp4_weight(packed, scales, global_scale)
        q, scale = nvfp4_to_8bit(packed, scales, global_scale, fmt)
        out[f"{layer}.{fmt}_weight"] = q.contiguous()
        out[f"{layer}.{fmt}_scale"] = scale.contiguous()
    return out
