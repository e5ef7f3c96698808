"""Shared Triton pieces for the quantization kernels: availability checks and device-side
encode/decode helpers that mirror the references in ``nvfp4.py`` / ``int8.py`` operation for
operation (IEEE division via ``div_rn``, round-half-even via ``round_half_even``)."""
from __future__ import annotations

import os

import torch

try:  # Triton is optional: CPU machines run the references only.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False
    # Placeholders so that modules importing the device helpers still import; never called.
    e2m1_decode = e2m1_encode = round_half_even = None


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on CUDA and Triton is importable. Under TRITON_INTERPRET=1
    the kernels also run on CPU tensors (kernel-logic debugging only: the interpreter's FP8
    rounding is not exact)."""
    if not HAS_TRITON:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return all(t.is_cuda for t in tensors)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> contiguous [M, K]."""
    return x.reshape(-1, x.shape[-1]).contiguous()


if HAS_TRITON:

    @triton.jit
    def e2m1_decode(code):
        """4-bit code (int32, 0..15) -> fp32 value / 2**14.

        Bit trick: placing the sign at bit 15 and the 3 magnitude bits at bits 9..11 of an fp16
        makes exponent field = E2M1 exponent and top mantissa bit = E2M1 mantissa; E2M1 code 1
        (0.5) lands on an fp16 subnormal, which the fp16->fp32 conversion keeps exactly. The
        result is the E2M1 value times 2**-14; callers fold 2**14 into the block scale.
        """
        bits = ((code & 8) << 12) | ((code & 7) << 9)
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def round_half_even(v):
        """FP32 round-to-nearest-even for |v| < 2**22 (8-bit codes): adding 1.5 * 2**23 leaves no
        fraction bits, so the FP32 add itself rounds half to even; subtracting it back is exact.
        (Portable: the interpreter has no libdevice.rint.)"""
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def e2m1_encode(y):
        """fp32 -> 4-bit code (int32): nearest E2M1 magnitude, ties to even code, saturating at
        6; sign bit from the sign bit of y (so -0.0 -> 8). Same thresholds as the reference."""
        a = tl.abs(y)
        mag = (
            (a > 0.25).to(tl.int32)
            + (a >= 0.75).to(tl.int32)
            + (a > 1.25).to(tl.int32)
            + (a >= 1.75).to(tl.int32)
            + (a > 2.5).to(tl.int32)
            + (a >= 3.5).to(tl.int32)
            + (a > 5.0).to(tl.int32)
        )
        sign = (y.to(tl.int32, bitcast=True) < 0).to(tl.int32)
        return mag | (sign << 3)
