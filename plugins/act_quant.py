"""Activation quantization in one kernel: optional block Hadamard (128) + per-token INT8 / FP8
or per-16-block NVFP4 (with a per-token FP32 global scale).

Op ``ditbake::act_quant(x, fmt, hadamard) -> (q, scale, block_scales)``:

| fmt              | q                        | scale (fp32)           | block_scales          |
|------------------|--------------------------|------------------------|-----------------------|
| ``int8``         | int8 [..., K]            | per token [...]        | empty [..., 0] e4m3   |
| ``fp8``          | float8_e4m3fn [..., K]   | per token [...]        | empty [..., 0] e4m3   |
| ``nvfp4``        | packed uint8 [..., K/2]  | per-token global [...] | e4m3 [..., K/16]      |
| ``nvfp4_dequant``| x.dtype [..., K]: dequantized NVFP4 values (W4A4 emulation on Hopper)      |||
| ``none``         | x.dtype [..., K]: the Hadamard rotation only                                |||

NVFP4 activations use one global scale per token (``per_row_global_scale``), not per tensor, so
the kernel needs no grid-wide reduction; everything else is the NVFP4 spec in ``nvfp4.py``.

The reference composes ``hadamard.apply_hadamard`` with the ``int8`` / ``nvfp4`` quantizers.
Triton kernels: a one-pass kernel holds whole rows in registers (K padded to a power of two,
at most 16384; read x once, write the codes once); a two-pass kernel (any K; chosen for large
M with K > 2048, where it measured faster, see ROW_IN_REGISTERS below) finds the row amax of the rotated values first, then recomputes the rotation and writes
the codes. The rotation is a tensor-core dot with the exact ±1 matrix, then one multiply by
1/sqrt(128), as in the reference; FP32 summation order differs, so a code can differ from the
reference only where a value sits within rounding of a decision boundary.
"""
from __future__ import annotations

import math

import torch
from torch.library import triton_op, wrap_triton

from ditbake.plugins._triton_util import HAS_TRITON, e2m1_decode, e2m1_encode, round_half_even, tl, triton, use_triton
from ditbake.plugins.hadamard import apply_hadamard, hadamard_block_size, hadamard_sign_matrix
from ditbake.plugins.int8 import quantize_activation_per_token
from ditbake.plugins.nvfp4 import (
    BLOCK_SIZE,
    QuantFormatError,
    dequantize_nvfp4,
    per_row_global_scale,
    quantize_nvfp4_unchecked,
)

# Kernel choice (both kernels are tested). Measured on H100 (notes/linear_kernels.md):
# * the one-pass kernel (whole rows in registers, K padded to a power of two) wins at small M:
#   M=128 W8A8 0.013 vs 0.025 ms (K=1536) and 0.031 vs 0.131 ms (K=8960), because the two-pass
#   kernel's 32-row programs leave most SMs idle;
# * at M=32760 they tie at K=1536 (0.116 vs 0.113 ms) and the one-pass kernel is 1.8x slower at
#   K=8960 (1.08 vs 0.59 ms; 16384-wide padded rows, one row per program).
# So: one pass when K <= 2048 or M < ROW_KERNEL_MAX_M_LARGE_K (a threshold between the two
# measured M, not tuned), two passes otherwise or when ROW_IN_REGISTERS is off.
ROW_IN_REGISTERS = True
ROW_KERNEL_MAX_M_LARGE_K = 8192
_MAX_ROW_IN_REGISTERS = 16384
ACT_FORMATS = ("int8", "fp8", "nvfp4", "nvfp4_dequant", "none")
_MODE = {"int8": 0, "fp8": 1, "nvfp4": 2, "nvfp4_dequant": 3, "none": 4}
# Two-pass kernel rows per program: enough rows for a tensor-core dot (>= 16). At M=32760 all
# 1024 programs are resident at once (~590 MB of rows at K=8960 > 50 MB L2), so the second
# pass mostly re-reads x from DRAM: 5 bytes moved per element instead of 3.
_BLOCK_M = 32
_CHUNK_NO_HADAMARD = 256  # wider loads when no 128-block rotation constrains the chunk


def check_act_quant_args(x: torch.Tensor, fmt: str, hadamard: bool) -> None:
    if fmt not in ACT_FORMATS:
        raise QuantFormatError(f"unknown activation format {fmt!r}; use one of {ACT_FORMATS}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise QuantFormatError(f"activations must be float32/float16/bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise QuantFormatError(f"activations need a non-empty last dimension, got {tuple(x.shape)}")
    k = x.shape[-1]
    if fmt.startswith("nvfp4") and k % BLOCK_SIZE:
        raise QuantFormatError(f"NVFP4 activations need K % {BLOCK_SIZE} == 0, got K={k}")
    if hadamard:
        hadamard_block_size(k)  # raises for K without a power-of-two factor


def act_quant_ref(x: torch.Tensor, fmt: str, hadamard: bool):
    """The specification: rotate (FP32), then quantize with the reference quantizers."""
    lead = x.shape[:-1]
    k = x.shape[-1]
    xf = apply_hadamard(x) if hadamard else x.to(torch.float32)
    empty_scales = torch.empty(*lead, 0, dtype=torch.float8_e4m3fn, device=x.device)
    if fmt in ("int8", "fp8"):
        q, scale = quantize_activation_per_token(xf, fmt)
        return q, scale, empty_scales
    if fmt == "none":
        return xf.to(x.dtype), torch.ones(lead, dtype=torch.float32, device=x.device), empty_scales
    t = quantize_nvfp4_unchecked(xf, per_row_global_scale(xf))
    gs = t.global_scale.reshape(lead)
    if fmt == "nvfp4":
        return t.packed, gs, t.block_scales
    return dequantize_nvfp4(t, x.dtype), gs, t.block_scales


_SIGN_MATRICES: dict = {}


def _kernel_sign_matrix(size: int, x2: torch.Tensor) -> torch.Tensor:
    """The ±1 matrix on x2's device. Building it takes ~20 tiny kernels (measured ~40 us per
    call at M=128), so eager calls reuse a cached copy; while tracing (fake or functional
    tensors: torch.compile, export, fake-mode checks) it is built in the graph instead, since
    a cached real tensor cannot enter a traced graph."""
    from torch._guards import detect_fake_mode

    if type(x2) is not torch.Tensor or detect_fake_mode() is not None:
        return hadamard_sign_matrix(size, dtype=x2.dtype, device=x2.device)
    key = (size, x2.dtype, x2.device)
    if key not in _SIGN_MATRICES:
        _SIGN_MATRICES[key] = hadamard_sign_matrix(size, dtype=x2.dtype, device=x2.device)
    return _SIGN_MATRICES[key]


def _output_buffers(x2: torch.Tensor, fmt: str):
    m, k = x2.shape
    dev = x2.device
    q_dtype = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "nvfp4": torch.uint8}.get(fmt, x2.dtype)
    q = torch.empty(m, k // 2 if fmt == "nvfp4" else k, dtype=q_dtype, device=dev)
    scale = torch.empty(m, dtype=torch.float32, device=dev)
    nb = k // BLOCK_SIZE if fmt.startswith("nvfp4") else 0
    block_scales = torch.empty(m, nb, dtype=torch.float8_e4m3fn, device=dev)
    return q, scale, block_scales


@triton_op("ditbake::act_quant", mutates_args=())
def act_quant(x: torch.Tensor, fmt: str, hadamard: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize activations ``x`` [..., K]; see the module docstring for outputs."""
    if not use_triton(x):
        return act_quant_ref(x, fmt, hadamard)
    lead = x.shape[:-1]
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    q, scale, block_scales = _output_buffers(x2, fmt)
    hb = hadamard_block_size(k) if hadamard else _CHUNK_NO_HADAMARD
    if hadamard and hb < 16:  # below the tensor-core dot's minimum: rotate (FP32) with torch first
        x2 = apply_hadamard(x2)
        hadamard, hb = False, _CHUNK_NO_HADAMARD
    signs = _kernel_sign_matrix(hb, x2) if hadamard else x2
    m = x2.shape[0]
    k_pow2 = triton.next_power_of_2(k)
    common = dict(MODE=_MODE[fmt], HADAMARD=hadamard, FP32_IN=x2.dtype == torch.float32)
    use_rows = k_pow2 <= 2048 or m < ROW_KERNEL_MAX_M_LARGE_K
    if ROW_IN_REGISTERS and k_pow2 <= _MAX_ROW_IN_REGISTERS and use_rows:
        # One pass: whole rows in registers (K padded to a power of two, padding never loaded).
        block_m = max(1, min(64, 8192 // k_pow2))
        wrap_triton(_act_quant_row_kernel)[(triton.cdiv(m, block_m),)](
            x2, signs, q, scale, block_scales, m, k, x2.stride(0), 1.0 / math.sqrt(hb),
            HB=hb, KP=k_pow2, BLOCK_M=block_m, num_warps=8 if block_m * k_pow2 >= 8192 else 4, **common,
        )
    else:
        wrap_triton(_act_quant_kernel)[(triton.cdiv(m, _BLOCK_M),)](
            x2, signs, q, scale, block_scales, m, k, x2.stride(0), 1.0 / math.sqrt(hb),
            CHUNK=hb, BLOCK_M=_BLOCK_M, num_warps=4, **common,
        )
    return q.reshape(*lead, q.shape[-1]), scale.reshape(lead), block_scales.reshape(*lead, block_scales.shape[-1])


def quantize_activations(x: torch.Tensor, fmt: str, hadamard: bool = False):
    """Validated entry point (the op itself does not validate, so that it stays traceable)."""
    check_act_quant_args(x, fmt, hadamard)
    return act_quant(x, fmt, hadamard)


if HAS_TRITON:

    @triton.jit
    def _rotated_chunk(x_ptr, signs, rows, row_mask, k0, K, stride_xm, inv_sqrt,
                       HADAMARD: tl.constexpr, CHUNK: tl.constexpr, FP32_IN: tl.constexpr):
        """[BLOCK_M, CHUNK] fp32 slice of x (rotated when HADAMARD), zeros outside K."""
        cols = k0 + tl.arange(0, CHUNK)
        mask = row_mask[:, None] & (cols[None, :] < K)
        tile = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        if HADAMARD:
            if FP32_IN:
                rotated = tl.dot(tile, signs, input_precision="ieee")
            else:
                rotated = tl.dot(tile, signs)  # bf16/fp16 x ±1: exact products, fp32 sums
            return rotated * inv_sqrt
        else:
            return tile.to(tl.float32)

    @triton.jit
    def _row_scale(amax, MODE: tl.constexpr):
        if MODE == 0:
            scale = tl.div_rn(amax, 127.0)
        elif MODE == 1:
            scale = tl.div_rn(amax, 448.0)
        else:
            scale = tl.div_rn(amax, 2688.0)  # 6 * 448: per-token NVFP4 global scale
        return tl.where(amax > 0, scale, 1.0)

    @triton.jit
    def _store_scale(scale_ptr, scale, rows64, row_mask, MODE: tl.constexpr, BLOCK_M: tl.constexpr):
        if MODE == 4:
            tl.store(scale_ptr + rows64, tl.full([BLOCK_M], 1.0, tl.float32), mask=row_mask)
        else:
            tl.store(scale_ptr + rows64, scale, mask=row_mask)

    @triton.jit
    def _quantize_store(v, scale, q_ptr, bs_ptr, rows64, row_mask, k0, K,
                        MODE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr):
        """Quantize the fp32 chunk v [BLOCK_M, CHUNK] (columns k0..k0+CHUNK) and store it."""
        cols = k0 + tl.arange(0, CHUNK)
        mask = row_mask[:, None] & (cols[None, :] < K)
        if MODE == 0:
            qv = round_half_even(tl.div_rn(v, scale[:, None]))
            qv = tl.minimum(tl.maximum(qv, -127.0), 127.0)
            tl.store(q_ptr + rows64[:, None] * K + cols[None, :], qv.to(tl.int8), mask=mask)
        elif MODE == 1:
            qv = tl.div_rn(v, scale[:, None])
            qv = tl.minimum(tl.maximum(qv, -448.0), 448.0)
            tl.store(q_ptr + rows64[:, None] * K + cols[None, :], qv.to(tl.float8e4nv), mask=mask)
        elif MODE == 4:
            tl.store(q_ptr + rows64[:, None] * K + cols[None, :], v.to(q_ptr.dtype.element_ty), mask=mask)
        else:
            NB: tl.constexpr = CHUNK // 16
            v3 = tl.reshape(v, [BLOCK_M, NB, 16])
            bamax = tl.max(tl.abs(v3), axis=2)
            bs = tl.minimum(tl.div_rn(bamax, 6.0 * scale[:, None]), 448.0).to(tl.float8e4nv)
            bsf = bs.to(tl.float32)
            denom = bsf * scale[:, None]
            # v * 0.0 keeps the sign of v: zero-scale blocks give codes 0 / 8 as the reference.
            y = tl.where(denom[:, :, None] > 0, tl.div_rn(v3, denom[:, :, None]), v3 * 0.0)
            codes = e2m1_encode(y)
            bcols = k0 // 16 + tl.arange(0, NB)
            bmask = row_mask[:, None] & (bcols[None, :] < K // 16)
            tl.store(bs_ptr + rows64[:, None] * (K // 16) + bcols[None, :], bs, mask=bmask)
            if MODE == 2:
                lo, hi = tl.split(tl.reshape(codes, [BLOCK_M, CHUNK // 2, 2]))
                byte = (lo | (hi << 4)).to(tl.uint8)
                pcols = k0 // 2 + tl.arange(0, CHUNK // 2)
                pmask = row_mask[:, None] & (pcols[None, :] < K // 2)
                tl.store(q_ptr + rows64[:, None] * (K // 2) + pcols[None, :], byte, mask=pmask)
            else:
                vals = e2m1_decode(codes) * (bsf * 16384.0)[:, :, None] * scale[:, None, None]
                vals = tl.reshape(vals, [BLOCK_M, CHUNK])
                tl.store(q_ptr + rows64[:, None] * K + cols[None, :], vals.to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _act_quant_row_kernel(x_ptr, signs_ptr, q_ptr, scale_ptr, bs_ptr, M, K, stride_xm, inv_sqrt,
                              MODE: tl.constexpr, HADAMARD: tl.constexpr, HB: tl.constexpr, KP: tl.constexpr,
                              BLOCK_M: tl.constexpr, FP32_IN: tl.constexpr):
        """One pass: BLOCK_M whole rows (K padded to KP) in registers."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, KP)
        mask = row_mask[:, None] & (cols[None, :] < K)
        tile = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        if HADAMARD:
            hr = tl.arange(0, HB)
            signs = tl.load(signs_ptr + hr[:, None] * HB + hr[None, :])
            blocks = tl.reshape(tile, [BLOCK_M * (KP // HB), HB])
            if FP32_IN:
                rotated = tl.dot(blocks, signs, input_precision="ieee")
            else:
                rotated = tl.dot(blocks, signs)  # bf16/fp16 x ±1: exact products, fp32 sums
            v = tl.reshape(rotated * inv_sqrt, [BLOCK_M, KP])
        else:
            v = tile.to(tl.float32)
        scale = _row_scale(tl.max(tl.abs(v), axis=1), MODE)
        _store_scale(scale_ptr, scale, rows64, row_mask, MODE, BLOCK_M)
        _quantize_store(v, scale, q_ptr, bs_ptr, rows64, row_mask, 0, K, MODE, KP, BLOCK_M)

    @triton.jit
    def _act_quant_kernel(x_ptr, signs_ptr, q_ptr, scale_ptr, bs_ptr, M, K, stride_xm, inv_sqrt,
                          MODE: tl.constexpr, HADAMARD: tl.constexpr, CHUNK: tl.constexpr,
                          BLOCK_M: tl.constexpr, FP32_IN: tl.constexpr):
        """Two passes over K in chunks (any K): amax first, then recompute and quantize."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        # The ±1 matrix is loaded once per program (first run: reloading it per chunk moved
        # 4x the bytes of x and made the Hadamard pass 3x slower than the plain one).
        if HADAMARD:
            hr = tl.arange(0, CHUNK)
            signs = tl.load(signs_ptr + hr[:, None] * CHUNK + hr[None, :])
        else:
            signs = 0.0
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, CHUNK):
            v = _rotated_chunk(x_ptr, signs, rows64, row_mask, k0, K, stride_xm, inv_sqrt,
                               HADAMARD, CHUNK, FP32_IN)
            amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
        scale = _row_scale(amax, MODE)
        _store_scale(scale_ptr, scale, rows64, row_mask, MODE, BLOCK_M)
        for k0 in range(0, K, CHUNK):
            v = _rotated_chunk(x_ptr, signs, rows64, row_mask, k0, K, stride_xm, inv_sqrt,
                               HADAMARD, CHUNK, FP32_IN)
            _quantize_store(v, scale, q_ptr, bs_ptr, rows64, row_mask, k0, K, MODE, CHUNK, BLOCK_M)
