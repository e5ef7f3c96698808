"""The peers' FP8: torchao's dynamic row-wise FP8 on every linear of a diffusers transformer's blocks
(`quantize_` with `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`, what torchao
documents for diffusion transformers on H100): E4M3 weights with one scale per output row, and each
activation row quantized to E4M3 with its own scale at run time, the GEMM `torch._scaled_mm`.

torchao refuses this config without a GPU of compute capability ≥ 8.9. On the CPU (smoke runs) its
check is bypassed: the same tensor subclass and the same quantizers run, the GEMM is torch's CPU
`_scaled_mm`; the note returned says so, and the JSON records it.
"""
from __future__ import annotations

import contextlib

import torch


class Fp8Unavailable(RuntimeError):
    """torchao (or this version's config) is missing: the FP8 rows are skipped with this reason."""


def quantize_blocks(model: torch.nn.Module, device: torch.device) -> str:
    """Every nn.Linear under `model.blocks` to torchao FP8 dynamic row-wise, in place (before any
    torch.compile: torchao's subclass is what the compiler then traces). Returns how the FP8 runs."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise Fp8Unavailable(f"torchao is not installed ({exc}): pip install torchao") from None
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    if device.type == "cuda":
        quantize_(model.blocks, config)
        return "torchao FP8 dynamic row-wise (E4M3 weights and activations, per-row scales), CUDA _scaled_mm"
    with _capability_check_off():
        quantize_(model.blocks, config)
    return ("torchao FP8 dynamic row-wise on the CPU: torchao's GPU-capability check bypassed, same quantizers, "
            "torch's CPU _scaled_mm")


@contextlib.contextmanager
def _capability_check_off():
    from torchao.quantization import quant_api

    if not hasattr(quant_api, "_check_hardware_support"):  # another torchao: no known way to run it here
        raise Fp8Unavailable("this torchao has no _check_hardware_support to bypass: FP8 rows need a GPU with "
                             "compute capability >= 8.9")
    saved = quant_api._check_hardware_support
    quant_api._check_hardware_support = lambda *_a, **_k: None
    try:
        yield
    finally:
        quant_api._check_hardware_support = saved


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's Float8Tensor: FP8 data + scales) counts its
    inner tensors, not the high-precision dtype it reports."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(tensor_bytes(p) for p in model.parameters())
