"""W8A8 FP8 linear for compiled engines: FP8 (E4M3) weights stored per output channel, activations
quantized per token inside the graph with plain torch ops, then cuBLASLt's FP8 GEMM
(``torch._scaled_mm`` with row-wise scales).

Why plain torch ops and not a custom op: the per-token quantization (|x| amax over the row, a
divide, a clamp, a cast) is a reduction plus pointwise work on the tensor that the previous
kernel (layer norm + modulation, GELU, the attention output's transpose) just wrote. Written as
torch ops, Inductor fuses it into that producing kernel, so the 8-bit activations cost no extra
pass over memory — the ``ditbake::linear_w8a8`` op (a separate Triton quantize kernel) cannot be
fused and spent what FP8 saved (plugins/notes/linear_kernels.md). The GEMM stays cuBLASLt's:
measured 1.31-1.43x bf16 at M = 32,760 on the H100, faster than our Triton 8-bit GEMM.

Numerics (the specification is ``linear_fp8_ref`` = plugins/int8.py's per-row E4M3 quantizers and
``matmul_8bit_ref``): weight ``qw`` e4m3 [N, K] with fp32 scale [N] (amax/448 per row); x per
token: scale = amax/448 (IEEE division), q = e4m3(clamp(x/scale, ±448)); out = Σ qx·qw · sx · sw
+ bias. The GPU accumulates in fp32 (cuBLASLt), the reference exactly (float64).

INT8 is not offered through this path: ``torch._int_mm`` measured 5x slower than bf16 on the
H100 (DESIGN.md); INT8 W8A8 goes through ``ditbake::linear_w8a8`` where a target wants it.
"""
from __future__ import annotations

import torch

from ditbake.plugins.int8 import matmul_8bit_ref, quantize_rows, quantize_weight_per_channel
from ditbake.plugins.nvfp4 import QuantFormatError


# cuBLASLt fast accumulation for the FP8 GEMMs: measured on the H200 (linear_8bit_profile_h200.json,
# M = 32,760) 1.27x / 1.22x / 1.12x faster at Wan's three shapes with the same error vs float64 as
# promoted accumulation (2.7e-2 / 2.7e-2 / 2.0e-2: the E4M3 rounding of the operands dominates)
FAST_ACCUM = True


def quantize_weight_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] float -> (e4m3 [N, K], fp32 scale [N]); done once, at build time."""
    return quantize_weight_per_channel(w.detach().to(torch.float32), "fp8")


def check_fp8_linear_args(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias) -> None:
    if qw.dtype != torch.float8_e4m3fn or qw.dim() != 2:
        raise QuantFormatError(f"fp8 weight must be float8_e4m3fn [N, K], got {qw.dtype} {tuple(qw.shape)}")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (qw.shape[0],):
        raise QuantFormatError(f"fp8 weight scale must be float32 [{qw.shape[0]}], got {w_scale.dtype} "
                               f"{tuple(w_scale.shape)}")
    if x.shape[-1] != qw.shape[1]:
        raise QuantFormatError(f"x has K={x.shape[-1]} but the fp8 weight has K={qw.shape[1]}")
    if bias is not None and tuple(bias.shape) != (qw.shape[0],):
        raise QuantFormatError(f"bias must be [{qw.shape[0]}], got {tuple(bias.shape)}")


def linear_fp8_ref(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias=None) -> torch.Tensor:
    """The specification: per-token E4M3 activations, exact accumulation, output in x.dtype."""
    qx, sx = quantize_rows(x.reshape(-1, x.shape[-1]), "fp8")
    out = matmul_8bit_ref(qx, sx.squeeze(-1), qw, w_scale, bias, torch.float32)
    return out.to(x.dtype).reshape(*x.shape[:-1], qw.shape[0])


def linear_fp8(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias=None,
               fast_accum: bool = FAST_ACCUM) -> torch.Tensor:
    """FP8 W8A8 linear; traceable (torch.export / Inductor fuse the activation quantization).

    `fast_accum` lets cuBLASLt keep Hopper's FP8 tensor-core accumulator (fewer than fp32's
    mantissa bits) instead of promoting partial sums to fp32: faster, less accurate at large K;
    torchao's FP8 inference default. Measured per shape in benchmarks/bench_linear_fp8.py."""
    if not x.is_cuda:  # the W8A8 op: same numerics on CPU, and one node the ONNX exporter translates
        import ditbake.plugins.linear_8bit  # noqa: F401, PLC0415 - registers ditbake::linear_w8a8

        return torch.ops.ditbake.linear_w8a8(x, qw, w_scale, bias, "fp8", False)
    lead, k, n = x.shape[:-1], x.shape[-1], qw.shape[0]
    qx, sx = quantize_rows(x.reshape(-1, k), "fp8")  # torch ops: fused into the producer by Inductor
    return gemm_fp8(qx, sx, qw, w_scale, bias, x.dtype, fast_accum).reshape(*lead, n)


def gemm_fp8(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias,
             out_dtype: torch.dtype, fast_accum: bool = FAST_ACCUM) -> torch.Tensor:
    """The FP8 GEMM alone on activations a producer kernel already quantized: qx e4m3 [M, K],
    sx fp32 [M] (plugins/producer_quant.py) -> [M, N] out_dtype."""
    if not qx.is_cuda:  # the numeric specification (cuBLASLt has no CPU FP8 GEMM)
        return matmul_8bit_ref(qx, sx, qw, w_scale, bias, torch.float32).to(out_dtype)
    out = torch._scaled_mm(qx, qw.t(), scale_a=sx.reshape(-1, 1), scale_b=w_scale.reshape(1, -1),
                           bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16,
                           use_fast_accum=fast_accum)
    return out.to(out_dtype)
