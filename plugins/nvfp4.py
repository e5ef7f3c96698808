"""NVFP4: the numeric specification (PyTorch, runs on CPU; GPU kernels must match it).

Format
------
* Element: E2M1 (1 sign, 2 exponent, 1 mantissa bit), magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}.
  Code = sign << 3 | magnitude index, so codes 0..7 are +{0..6} and 8..15 are -{0..6}
  (code 8 is -0.0).
* Blocks of 16 consecutive elements along the last (reduction) axis share one E4M3 scale
  (``torch.float8_e4m3fn``, max 448).
* One FP32 global scale per tensor: ``amax / (6 * 448)``, so the largest block scale lands at
  448 and the largest element at 6. An all-zero tensor gets global scale 1.0 (any positive value
  represents zeros; 1.0 avoids 0/0). Dynamic activations may use one global scale per row
  (shape ``[..., 1]``, see :func:`per_row_global_scale`) so that a one-pass kernel needs no
  cross-row reduction; everything below broadcasts over such a scale.

Quantization, exactly (every step in FP32, IEEE round-to-nearest-even, true division):
  1. ``block_scale = e4m3(min(amax_block / (6 * global), 448))``  (saturates, never NaN)
  2. ``denom = float32(block_scale) * global``
  3. ``y = x / denom`` (0 where ``denom == 0``: zero blocks and scales that underflow E4M3)
  4. ``code = E2M1 round-to-nearest-even of |y|``, saturating at 6; the sign bit is the sign bit
     of x (so -0.0 and small negatives give code 8).
Dequantization: ``e2m1(code) * float32(block_scale) * global`` (the first product is exact
in FP32 and in BF16: at most 2 x 4 significant bits).

Packing (documented nibble order)
---------------------------------
Two codes per byte along the last axis: element ``2i`` in the LOW nibble (bits 0-3) and element
``2i + 1`` in the HIGH nibble (bits 4-7); within a nibble bit 3 is the sign. Example: codes
``[1, 7]`` (0.5, 6.0) pack to byte ``0x71``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK_SIZE = 16
# Magnitudes of E2M1 codes 0..7; codes 8..15 are the same with the sign bit set.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class QuantFormatError(ValueError):
    """Input that a quantization format cannot represent (shape, dtype, non-finite values)."""


@dataclass(frozen=True)
class NVFP4Tensor:
    """A quantized tensor: ``packed`` uint8 [..., K/2], ``block_scales`` e4m3 [..., K/16],
    ``global_scale`` fp32 (scalar, or [..., 1] per row), ``shape`` the original shape."""

    packed: torch.Tensor
    block_scales: torch.Tensor
    global_scale: torch.Tensor
    shape: torch.Size


def _e2m1_table(device: torch.device) -> torch.Tensor:
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def e2m1_round_magnitude(a: torch.Tensor) -> torch.Tensor:
    """Magnitude code (0..7, uint8) of non-negative FP32 ``a``: nearest E2M1 value, ties to the
    even code, saturating at 6.

    The code is the number of decision thresholds passed. Each threshold is a midpoint between
    two neighbours; at an exact tie the comparison is strict where the lower neighbour has the
    even code (0.25, 1.25, 2.5, 5.0) and inclusive where the upper one has (0.75, 1.75, 3.5).
    """
    code = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75).to(torch.uint8)
        + (a > 1.25).to(torch.uint8)
        + (a >= 1.75).to(torch.uint8)
        + (a > 2.5).to(torch.uint8)
        + (a >= 3.5).to(torch.uint8)
        + (a > 5.0).to(torch.uint8)
    )
    return code


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (uint8 in 0..15, last dim even) two per byte: element 2i low nibble,
    element 2i+1 high nibble."""
    if codes.dtype != torch.uint8:
        raise QuantFormatError(f"pack_e2m1 needs uint8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise QuantFormatError(f"pack_e2m1 needs an even last dimension, got {codes.shape[-1]}")
    if codes.numel() and int(codes.max()) > 15:
        raise QuantFormatError("pack_e2m1 codes must be in 0..15")
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_e2m1`: uint8 [..., K/2] -> codes uint8 [..., K]."""
    if packed.dtype != torch.uint8:
        raise QuantFormatError(f"unpack_e2m1 needs uint8, got {packed.dtype}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """FP32 values of 4-bit codes (code 8 gives -0.0)."""
    return _e2m1_table(codes.device)[codes.long()]


def _ieee_div(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """t / divisor as an IEEE division on every device (PyTorch's CUDA division by a Python
    scalar multiplies by the reciprocal, which can differ in the last bit)."""
    return t / torch.full_like(t, divisor)


def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP32 global scale amax / (6 * 448); 1.0 for an all-zero tensor."""
    amax = x.detach().abs().amax().to(torch.float32)
    return torch.where(amax > 0, _ieee_div(amax, E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


def per_row_global_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-row ([..., 1]) FP32 global scale, for dynamic activations quantized in one pass."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).to(torch.float32)
    return torch.where(amax > 0, _ieee_div(amax, E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


def _check_quantizable(x: torch.Tensor) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise QuantFormatError(f"NVFP4 quantizes floating tensors, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % BLOCK_SIZE:
        raise QuantFormatError(
            f"NVFP4 needs the last dimension to be a multiple of {BLOCK_SIZE}, got shape {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise QuantFormatError("NVFP4 input has NaN or Inf values; clean the tensor first")


def compute_block_scales(blocks_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales from FP32 block amax: e4m3(min(amax / (6 * global), 448))."""
    wanted = blocks_amax / (E2M1_MAX * global_scale)
    # Clamp before the cast: float8_e4m3fn has no infinity and overflow would become NaN.
    return wanted.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | float | None = None) -> NVFP4Tensor:
    """Quantize ``x`` [..., K] (K % 16 == 0) to NVFP4 as specified in the module docstring.

    ``global_scale``: None -> per-tensor ``amax / 2688``; a float / scalar tensor, or a tensor of
    shape [..., 1] (one scale per row) is used as given (it must be positive and finite).
    Validates its input (host synchronisation); traced code calls :func:`quantize_nvfp4_unchecked`.
    """
    _check_quantizable(x)
    if global_scale is not None:
        gs = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
        if not bool(torch.isfinite(gs).all()) or bool((gs <= 0).any()):
            raise QuantFormatError("NVFP4 global scale must be positive and finite")
        if gs.dim() > 0 and gs.shape[-1] != 1:
            raise QuantFormatError(f"NVFP4 global scale must be a scalar or [..., 1], got {tuple(gs.shape)}")
        global_scale = gs
    return quantize_nvfp4_unchecked(x, global_scale)


def quantize_nvfp4_unchecked(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> NVFP4Tensor:
    """The quantizer without validation: no host synchronisation, so torch.export can trace it."""
    xf = x.detach().to(torch.float32)
    gs = nvfp4_global_scale(xf) if global_scale is None else global_scale.to(torch.float32)
    gs_b = gs.unsqueeze(-1) if gs.dim() > 0 else gs  # broadcast over [..., K/16, 16]
    blocks = xf.reshape(*xf.shape[:-1], xf.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    scales = compute_block_scales(blocks.abs().amax(dim=-1), gs)
    denom = scales.to(torch.float32).unsqueeze(-1) * gs_b
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    y = torch.where(denom > 0, blocks / safe, torch.zeros_like(blocks))
    magnitude = e2m1_round_magnitude(y.abs())
    sign = torch.signbit(blocks).to(torch.uint8) << 3
    codes = (magnitude | sign).reshape(xf.shape)
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    packed = pairs[..., 0] | (pairs[..., 1] << 4)
    return NVFP4Tensor(packed, scales, gs, x.shape)


def dequantize_nvfp4(t: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of an :class:`NVFP4Tensor`: e2m1 * block_scale * global, computed in FP32."""
    codes = unpack_e2m1(t.packed)
    values = e2m1_to_float(codes)
    blocks = values.reshape(*values.shape[:-1], values.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    gs = t.global_scale.to(torch.float32)
    gs_b = gs.unsqueeze(-1) if gs.dim() > 0 else gs
    out = blocks * t.block_scales.to(torch.float32).unsqueeze(-1) * gs_b
    return out.reshape(t.shape).to(dtype)


def fake_quantize_nvfp4(x: torch.Tensor, global_scale=None) -> torch.Tensor:
    """dequantize(quantize(x)) in FP32."""
    return dequantize_nvfp4(quantize_nvfp4(x, global_scale), torch.float32)


def check_nvfp4_weight(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor) -> tuple[int, int]:
    """Validate stored NVFP4 weight tensors and return (N, K)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise QuantFormatError(f"NVFP4 packed weight must be uint8 [N, K/2], got {packed.dtype} {tuple(packed.shape)}")
    n, k = packed.shape[0], packed.shape[1] * 2
    if block_scales.dtype != torch.float8_e4m3fn or tuple(block_scales.shape) != (n, k // BLOCK_SIZE):
        raise QuantFormatError(
            f"NVFP4 block scales must be float8_e4m3fn [{n}, {k // BLOCK_SIZE}], got {block_scales.dtype} {tuple(block_scales.shape)}"
        )
    if k % BLOCK_SIZE:
        raise QuantFormatError(f"NVFP4 K must be a multiple of {BLOCK_SIZE}, got {k}")
    if global_scale.dtype != torch.float32 or global_scale.numel() != 1:
        raise QuantFormatError(f"NVFP4 global scale must be one float32 value, got {global_scale.dtype} {tuple(global_scale.shape)}")
    return n, k
