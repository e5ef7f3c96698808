"""W8A8 INT8 linear for compiled engines: INT8 weights stored per output channel, activations
quantized per token inside the graph with plain torch ops, then ditbake's Triton INT8 GEMM
(``ditbake::gemm_w8a8``, int32 accumulation, scales and bias in its epilogue).

Why INT8 beside FP8 (plugins/linear_fp8.py): accuracy. E4M3 keeps 3 mantissa bits whatever the
scale, so every element carries up to 2^-4 relative rounding error; INT8 with one scale per token
spends all 8 bits on the row's range, which for activations without extreme outliers is several
times more accurate (on the 16k test bed: FP8 linears 30.6 dB vs INT8 linears 36-39 dB, see
plugins/notes/linear_fp8.md). The price is the GEMM: Triton's INT8 tensor-core GEMM measured
7-18 % slower than FP8 at Wan's shapes (plugins/notes/linear_kernels.md); ``torch._int_mm`` is
slower still, so it is not used.

Numerics: the specification is ``linear_w8a8_ref(x, qw, sw, bias, "int8", False)`` — per-token
scale amax/127 (IEEE division), round half to even, clamp ±127, exact accumulation, then
``acc * sx * sw + bias`` in FP32; the GPU's int32 accumulation is exact, so only the FP32
epilogue and the final cast round.

Activations reach this function only where no producer kernel of ours wrote their codes (runtime.nn:
norms and GELU do): on the GPU they are quantized by ``producer_quant.row_quant`` (one pass, twice the
speed of Inductor's kernel for the same torch ops, which the specification ``quantize_rows`` is and
which the CPU path and ``ROW_QUANT_KERNEL = False`` keep).
"""
from __future__ import annotations

import torch

import ditbake.plugins.linear_8bit  # noqa: F401 - registers ditbake::linear_w8a8 and ditbake::gemm_w8a8
from ditbake.plugins.int8 import quantize_rows, quantize_weight_per_channel


# Quantize activations with producer_quant.row_quant rather than torch ops for Inductor to fuse. Layers
# whose producer is a norm or GELU get codes from that producer's kernel (runtime.nn); the inputs left
# here (attention outputs) have no fusible producer, and Inductor's kernel for the torch ops ran at half
# the speed of row_quant (bench_norm_quant.py).
ROW_QUANT_KERNEL = True


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] float -> (int8 [N, K], fp32 scale [N]); done once, at build time."""
    return quantize_weight_per_channel(w.detach().to(torch.float32), "int8")


def linear_int8(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias=None) -> torch.Tensor:
    """INT8 W8A8 linear; traceable (torch.export / Inductor fuse the activation quantization)."""
    if not x.is_cuda:  # the W8A8 op: the reference on CPU, and one node the ONNX exporter translates
        return torch.ops.ditbake.linear_w8a8(x, qw, w_scale, bias, "int8", False)
    lead, k, n = x.shape[:-1], x.shape[-1], qw.shape[0]
    if ROW_QUANT_KERNEL:  # producer_quant.row_quant: one pass at twice the speed of Inductor's fusion
        from ditbake.plugins.producer_quant import row_quant  # noqa: PLC0415

        qx, sx = row_quant(x.reshape(-1, k), "int8")
    else:  # torch ops: fused into the producer by Inductor
        qx, sx = quantize_rows(x.reshape(-1, k), "int8")
    out = torch.ops.ditbake.gemm_w8a8(qx, sx.reshape(-1), qw, w_scale, bias, x.dtype)
    return out.reshape(*lead, n)
