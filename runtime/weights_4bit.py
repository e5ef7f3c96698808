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
"""
from __future__ import annotations

import torch

from ditbake.runtime.errors import ArtifactError

MANIFEST_KEY = "weights_8bit_from_nvfp4"
FORMATS = ("int8", "fp8")
NVFP4_SUFFIXES = ("nvfp4_packed", "nvfp4_block_scales", "nvfp4_global_scale")


def check(layers, weights: dict, planned: dict[str, set[str]] | None = None) -> dict[str, str]:
    """The manifest's entry as {layer: format}, checked against the stored tensors (and the plan's
    precisions per layer, when given): typed errors for anything the loader could not honour."""
    if layers is None:
        return {}
    if not isinstance(layers, dict):
        raise ArtifactError(f"manifest {MANIFEST_KEY} must be an object {{layer: format}}, got {type(layers).__name__}")
    for layer, fmt in layers.items():
        if fmt not in FORMATS:
            raise ArtifactError(f"manifest {MANIFEST_KEY}[{layer!r}] is {fmt!r}; expected one of {FORMATS}")
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


def materialize(weights: dict[str, torch.Tensor], layers: dict[str, str]) -> dict[str, torch.Tensor]:
    """`weights` with each listed layer's NVFP4 tensors replaced by its 8-bit weight and per-channel
    scale, computed on the tensors' device (a new dict; `weights` is not changed)."""
    if not layers:
        return weights
    from ditbake.plugins.int8 import quantize_weight_per_channel  # noqa: PLC0415
    from ditbake.plugins.nvfp4 import NVFP4Tensor, check_nvfp4_weight, dequantize_nvfp4  # noqa: PLC0415

    out = dict(weights)
    for layer, fmt in layers.items():
        packed, scales, global_scale = (out.pop(f"{layer}.{s}") for s in NVFP4_SUFFIXES)
        n, k = check_nvfp4_weight(packed, scales, global_scale)
        w = dequantize_nvfp4(NVFP4Tensor(packed, scales, global_scale.reshape(()), torch.Size((n, k))))
        q, scale = quantize_weight_per_channel(w, fmt)
        out[f"{layer}.{fmt}_weight"] = q.contiguous()
        out[f"{layer}.{fmt}_scale"] = scale.contiguous()
    return out
