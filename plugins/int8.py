"""8-bit formats: the numeric specification (PyTorch, CPU) for INT8 and FP8 (E4M3) W8A8.

* Weights: symmetric, one scale per output channel (row of W [N, K]).
* Activations: symmetric, one scale per token (row of x [M, K]), computed dynamically.
* INT8: ``scale = amax / 127``; ``q = clamp(round_half_even(x / scale), -127, 127)`` (-128 is
  never produced, so negation is closed).
* FP8: ``scale = amax / 448``; ``q = e4m3(clamp(x / scale, -448, 448))`` (round to nearest even).
* An all-zero row gets scale 1.0 (any positive value represents zeros; 1.0 avoids 0/0).
* All of it in FP32 with IEEE division (tensor / tensor: PyTorch's CUDA division by a Python
  scalar multiplies by the reciprocal instead); the GPU kernels use the same operations.
* Matmul: integer (or exact FP8 product) accumulation, then ``acc * sx[m] * sw[n]`` (+ bias).
  The reference accumulates in float64, which is exact for int8 products (|acc| <= 127^2 K, far
  below 2^53) and for E4M3 products (each product is exact in float64) up to the summation
  rounding of float64, far below the GPU's int32 / fp32 accumulation.
"""
from __future__ import annotations

import torch

from ditbake.plugins.nvfp4 import QuantFormatError

INT8_MAX = 127.0
FP8_MAX = 448.0
EIGHT_BIT_FORMATS = ("int8", "fp8")


def _check_float(x: torch.Tensor, what: str) -> None:
    if not x.dtype.is_floating_point or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise QuantFormatError(f"{what} must be a float16/bfloat16/float32 tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise QuantFormatError(f"{what} needs a non-empty last dimension, got shape {tuple(x.shape)}")


def _format_max(fmt: str) -> float:
    if fmt == "int8":
        return INT8_MAX
    if fmt == "fp8":
        return FP8_MAX
    raise QuantFormatError(f"unknown 8-bit format {fmt!r}; use one of {EIGHT_BIT_FORMATS}")


def row_scales(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """FP32 scale per row (last axis reduced), shape [..., 1]."""
    return scales_from_amax(x.detach().abs().amax(dim=-1, keepdim=True).to(torch.float32), fmt)


def scales_from_amax(amax: torch.Tensor, fmt: str) -> torch.Tensor:
    """FP32 scale per row from its max |x| (any shape): amax / format max, 1 where amax is 0."""
    # Divide by a tensor, not a Python scalar: CUDA turns division by a scalar into a multiply
    # by its reciprocal, which rounds differently; tensor / tensor is IEEE division everywhere.
    return torch.where(amax > 0, amax / torch.full_like(amax, _format_max(fmt)), torch.ones_like(amax))


def quantize_rows(x: torch.Tensor, fmt: str, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of ``x`` [..., K] -> (q [..., K], scale fp32 [..., 1]).

    q is int8 for ``fmt='int8'`` and float8_e4m3fn for ``fmt='fp8'``. ``amax`` [...] (fp32), when
    given, is each row's max |x| as a producer measured it (e.g. a GEMM epilogue, before rounding x
    to its dtype): the quantization is then one pass with no reduction; codes still clamp to the
    format's range, so an amax slightly below the rounded row's max only saturates.
    """
    _check_float(x, "8-bit quantization input")
    if amax is None:
        scale = row_scales(x, fmt)
    else:
        if amax.shape != x.shape[:-1]:
            raise QuantFormatError(f"amax must have one value per row {tuple(x.shape[:-1])}, got {tuple(amax.shape)}")
        scale = scales_from_amax(amax.to(torch.float32).unsqueeze(-1), fmt)
    y = x.detach().to(torch.float32) / scale
    if fmt == "int8":
        q = torch.round(y).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        q = y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_weight_per_channel(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q [N, K], scale fp32 [N]) with one scale per output channel."""
    if w.dim() != 2:
        raise QuantFormatError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    q, scale = quantize_rows(w, fmt)
    return q, scale.squeeze(-1)


def quantize_activation_per_token(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K], scale fp32 [...]) with one scale per token."""
    q, scale = quantize_rows(x, fmt)
    return q, scale.squeeze(-1)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale (scale per row, shape [...] or [..., 1])."""
    s = scale.to(torch.float32)
    if s.dim() == q.dim() - 1:
        s = s.unsqueeze(-1)
    return (q.to(torch.float32) * s).to(dtype)


def matmul_8bit_ref(
    qx: torch.Tensor,
    sx: torch.Tensor,
    qw: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference W8A8 matmul: qx [..., K] (int8 or e4m3), sx [...], qw [N, K], sw [N].

    Exact accumulation (float64 of integers / exact E4M3 products), then rescale in float64.
    """
    if qx.dtype != qw.dtype or qx.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise QuantFormatError(f"8-bit matmul needs both operands int8 or both float8_e4m3fn, got {qx.dtype}, {qw.dtype}")
    if qx.shape[-1] != qw.shape[-1]:
        raise QuantFormatError(f"8-bit matmul reduction mismatch: x K={qx.shape[-1]}, w K={qw.shape[-1]}")
    acc = qx.to(torch.float64) @ qw.to(torch.float64).T
    out = acc * sx.to(torch.float64).unsqueeze(-1) * sw.to(torch.float64)
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out.to(out_dtype)


def int8_matmul_ref(qx, sx, qw, sw, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """INT8 x INT8 with exact integer accumulation (what int32 accumulation computes)."""
    if qx.dtype != torch.int8 or qw.dtype != torch.int8:
        raise QuantFormatError(f"int8_matmul_ref needs int8 operands, got {qx.dtype}, {qw.dtype}")
    return matmul_8bit_ref(qx, sx, qw, sw, bias, out_dtype)


def fp8_matmul_ref(qx, sx, qw, sw, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """E4M3 x E4M3 with exact products and float64 accumulation."""
    if qx.dtype != torch.float8_e4m3fn or qw.dtype != torch.float8_e4m3fn:
        raise QuantFormatError(f"fp8_matmul_ref needs float8_e4m3fn operands, got {qx.dtype}, {qw.dtype}")
    return matmul_8bit_ref(qx, sx, qw, sw, bias, out_dtype)


def linear_8bit_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """Full W8A8 linear from float operands: per-channel weights, per-token dynamic activations."""
    qw, sw = quantize_weight_per_channel(w, fmt)
    qx, sx = quantize_activation_per_token(x, fmt)
    return matmul_8bit_ref(qx, sx, qw, sw, bias, torch.float32)
