"""Mixed-precision linear: weights stored NVFP4 (optionally with the block Hadamard folded in),
activations in one of four formats chosen per layer and step by the plan.

Op ``ditbake::mixed_linear(x, packed, block_scales, global_scale, bias, act_format, hadamard)``:
``x`` [..., K] float; ``packed`` uint8 [N, K/2]; ``block_scales`` e4m3 [N, K/16];
``global_scale`` fp32 [] (or [1]); ``bias`` [N] or None; returns [..., N] in x.dtype.
When ``hadamard`` is true the weight was quantized from ``W H`` (``fold_hadamard_into_weight``)
and the op rotates ``x`` online.

act_format (string; ``ACT_FORMAT_CODES`` gives the integer codes used in plans):
* ``nvfp4`` (W4A4): x quantized to NVFP4 per 16-block with a per-token global scale.
* ``int8``  (W4A8): x per-token INT8; the weight dequantized from NVFP4 (FP32, exact) and
  re-quantized per output channel to INT8 (``scale = amax_row / 127``, round half even). This
  conversion adds a second rounding: |error| <= scale/2 per element, i.e. a relative RMS of
  about 1/(127*sqrt(12)) ~ 0.2 % of the row amax, small next to the NVFP4 error (~10 %).
* ``fp8``   (W4A8): the same with E4M3 (per-token activations, per-channel re-quantized weight;
  E4M3 keeps 3 mantissa bits, so the re-quantization error is up to 1/16 relative per element).
* ``bf16``  (W4A16): x rounded to bf16, weight dequantized.

Reference (CPU; the specification): fake quantization in FP32 with exact dequantized operands,
FP32 matmul for nvfp4/bf16, exact 8-bit accumulation (float64) for int8/fp8.

GPU dispatch (Hopper has no FP4 tensor cores; NVFP4 is a storage format there):
* bf16: a Triton kernel dequantizes W to bf16 (e2m1 x scale x global, rounded once to bf16,
  like any bf16 weight) and cuBLAS runs the matmul. For M <= W4A16_FUSED_MAX_M (0 by default:
  measured slower, see below) one Triton GEMM decodes the NVFP4 tile in registers instead
  (e2m1 x e4m3 is exact in bf16; bf16 tensor-core dot; global scale in the epilogue).
* int8 / fp8: act_quant kernel (Hadamard + per-token quantization), a Triton kernel converts
  the weight NVFP4 -> 8-bit per channel (memory-bound, ~1 % of the GEMM at M=32760), then the
  W8A8 GEMM from ``linear_8bit``.
* nvfp4 on sm_90: act_quant writes the dequantized NVFP4 activations (exact values times the
  per-token global scale, rounded to x.dtype), then the W4A16 path: numerics of W4A4, speed of
  W4A16. On sm_100+ a native FP4 path through ``tl.dot_scaled`` is written to the Triton
  documentation but UNTESTED (no Blackwell GPU here); set DITBAKE_NATIVE_FP4=0 to disable it.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.library import triton_op, wrap_triton

from ditbake.plugins._triton_util import HAS_TRITON, cuda_capability, e2m1_decode, round_half_even, tl, triton, use_triton
from ditbake.plugins.act_quant import act_quant, act_quant_ref
from ditbake.plugins.hadamard import apply_hadamard, fold_hadamard_into_weight, hadamard_block_size
from ditbake.plugins.int8 import matmul_8bit_ref, quantize_weight_per_channel
from ditbake.plugins.linear_8bit import gemm_8bit
from ditbake.plugins.nvfp4 import (
    NVFP4Tensor,
    QuantFormatError,
    check_nvfp4_weight,
    dequantize_nvfp4,
    per_row_global_scale,
    quantize_nvfp4,
    quantize_nvfp4_unchecked,
)

ACT_FORMATS = ("nvfp4", "int8", "bf16", "fp8")
ACT_FORMAT_CODES = {"nvfp4": 0, "int8": 1, "bf16": 2, "fp8": 3}
# Largest M for the fused decode-in-GEMM W4A16 kernel; above it, dequantize + cuBLAS.
# Measured on H100 (CUDA-graph replay, M=128): dequantize + cuBLAS 0.009/0.021/0.026 ms vs the
# fused kernel 0.012/0.051/0.058 ms (best variant), so the fused kernel is off by default (0)
# until its decode is cheaper; it stays tested and selectable (w4a16_gemm(fused=True)).
W4A16_FUSED_MAX_M = 0
# How kernels expand packed nibbles and block scales to a tile (see _decode_weight_tile);
# both variants are tested. Measured on H100 (notes/linear_kernels.md): the gather variant made
# the fused GEMM 2.2x slower at M=128 and 7x at M=32760, so the join variant is the default.
DECODE_GATHER = False


def _tile_k(k: int, cap: int) -> int:
    """Largest power of two <= cap dividing k (k % 16 == 0, so at least 16): K tiles never
    straddle the end of a row, and a tile always covers whole 16-element scale blocks."""
    return min(cap, k & -k)


def act_format_name(act_format: str | int) -> str:
    """Accept a name or an integer code; return the name."""
    if isinstance(act_format, int):
        for name, code in ACT_FORMAT_CODES.items():
            if code == act_format:
                return name
        raise QuantFormatError(f"unknown activation format code {act_format}; use one of {ACT_FORMAT_CODES}")
    if act_format not in ACT_FORMATS:
        raise QuantFormatError(f"unknown activation format {act_format!r}; use one of {ACT_FORMATS}")
    return act_format


def check_mixed_linear_args(x, packed, block_scales, global_scale, bias, act_format, hadamard) -> None:
    n, k = check_nvfp4_weight(packed, block_scales, global_scale)
    act_format_name(act_format)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise QuantFormatError(f"x must be float32/float16/bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise QuantFormatError(f"x has last dimension {x.shape[-1] if x.dim() else None} but the weight has K={k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise QuantFormatError(f"bias must be [{n}], got {tuple(bias.shape)}")
    if hadamard:
        hadamard_block_size(k)


def _weight_tensor(packed, block_scales, global_scale) -> NVFP4Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    return NVFP4Tensor(packed, block_scales, global_scale.reshape(()).to(torch.float32), torch.Size((n, k)))


def nvfp4_weight_to_8bit_ref(packed, block_scales, global_scale, fmt: str):
    """The W4A8 weight conversion: dequantize NVFP4 (FP32), re-quantize per output channel."""
    w = dequantize_nvfp4(_weight_tensor(packed, block_scales, global_scale), torch.float32)
    return quantize_weight_per_channel(w, fmt)


def mixed_linear_ref(x, packed, block_scales, global_scale, bias, act_format: str, hadamard: bool) -> torch.Tensor:
    """The specification (fake quantization; see module docstring)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if act_format in ("int8", "fp8"):
        qw, sw = nvfp4_weight_to_8bit_ref(packed, block_scales, global_scale, act_format)
        qx, sx, _ = act_quant_ref(x2, act_format, hadamard)
        out = matmul_8bit_ref(qx, sx, qw, sw, bias, torch.float32)
    else:
        w = dequantize_nvfp4(_weight_tensor(packed, block_scales, global_scale), torch.float32)
        if act_format == "nvfp4":
            xa = nvfp4_fake_activation(x2, hadamard)
        else:
            xa = apply_hadamard(x2) if hadamard else x2.to(torch.float32)
            xa = xa.to(torch.bfloat16).to(torch.float32)
        out = xa @ w.T
        if bias is not None:
            out = out + bias.to(torch.float32)
    return out.to(x.dtype).reshape(*lead, packed.shape[0])


def nvfp4_fake_activation(x2: torch.Tensor, hadamard: bool) -> torch.Tensor:
    """FP32 fake-quantized NVFP4 activations (exact values, not rounded to x.dtype)."""
    xf = apply_hadamard(x2) if hadamard else x2.to(torch.float32)
    return dequantize_nvfp4(quantize_nvfp4_unchecked(xf, per_row_global_scale(xf)), torch.float32)


@triton_op("ditbake::mixed_linear", mutates_args=())
def mixed_linear(x: torch.Tensor, packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                 bias: torch.Tensor | None, act_format: str, hadamard: bool) -> torch.Tensor:
    """NVFP4-weight linear; see the module docstring."""
    if not use_triton(x):
        return mixed_linear_ref(x, packed, block_scales, global_scale, bias, act_format, hadamard)
    lead = x.shape[:-1]
    n, k = packed.shape[0], packed.shape[1] * 2
    x2 = x.reshape(-1, k).contiguous()
    gs = global_scale.reshape(1).to(torch.float32)
    if act_format in ("int8", "fp8"):
        qx, sx, _ = act_quant(x2, act_format, hadamard)
        qw, sw = nvfp4_weight_to_8bit(packed, block_scales, gs, act_format)
        out = gemm_8bit(qx, sx, qw, sw, bias, x.dtype)
    elif act_format == "nvfp4" and native_fp4_available(x):
        qx, sx, bsx = act_quant(x2, "nvfp4", hadamard)
        out = _w4a4_native(qx, bsx, sx, packed, block_scales, gs, bias, x.dtype)
    else:
        if act_format == "nvfp4":
            a = act_quant(x2, "nvfp4_dequant", hadamard)[0]
        elif hadamard:
            a = act_quant(x2, "none", hadamard)[0]
        else:
            a = x2
        out = w4a16_gemm(a.to(torch.bfloat16), packed, block_scales, gs, bias).to(x.dtype)
    return out.reshape(*lead, n)


def nvfp4_linear(x, packed, block_scales, global_scale, bias=None, act_format: str | int = "bf16",
                 hadamard: bool = False) -> torch.Tensor:
    """Validated entry point for :func:`mixed_linear` (accepts integer format codes)."""
    check_mixed_linear_args(x, packed, block_scales, global_scale, bias, act_format, hadamard)
    return mixed_linear(x, packed, block_scales, global_scale, bias, act_format_name(act_format), hadamard)


# ----------------------------------------------------------------------------- preparation
def prepare_nvfp4_weight(weight: torch.Tensor, hadamard: bool = False) -> NVFP4Tensor:
    """Quantize a float weight [N, K] for :func:`mixed_linear` (folding the Hadamard if asked)."""
    if weight.dim() != 2:
        raise QuantFormatError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if hadamard:
        w = fold_hadamard_into_weight(w)
    return quantize_nvfp4(w)


def prepare_nvfp4_linear(linear: nn.Linear, hadamard: bool = False) -> dict[str, torch.Tensor | None]:
    """Tensors for :func:`mixed_linear` from an ``nn.Linear``: packed, block_scales,
    global_scale (fp32 []), bias (or None)."""
    t = prepare_nvfp4_weight(linear.weight, hadamard)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return {"packed": t.packed, "block_scales": t.block_scales, "global_scale": t.global_scale, "bias": bias}


class NVFP4Linear(nn.Module):
    """An ``nn.Linear`` replacement holding NVFP4 weights; ``act_format`` may change per call."""

    def __init__(self, packed, block_scales, global_scale, bias=None, act_format: str = "bf16", hadamard: bool = False):
        super().__init__()
        check_nvfp4_weight(packed, block_scales, global_scale)
        self.register_buffer("packed", packed)
        self.register_buffer("block_scales", block_scales)
        self.register_buffer("global_scale", global_scale)
        self.register_buffer("bias", bias)
        self.act_format = act_format_name(act_format)
        self.hadamard = hadamard

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_format: str = "bf16", hadamard: bool = False) -> "NVFP4Linear":
        return cls(**prepare_nvfp4_linear(linear, hadamard), act_format=act_format, hadamard=hadamard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mixed_linear(x, self.packed, self.block_scales, self.global_scale, self.bias, self.act_format, self.hadamard)


# ----------------------------------------------------------------------------- GPU pieces
def native_fp4_available(x: torch.Tensor) -> bool:
    """Blackwell (sm_100+) native FP4 MMA; UNTESTED, so it can be switched off."""
    if os.environ.get("DITBAKE_NATIVE_FP4", "1") == "0" or not (x.is_cuda and use_triton(x)):
        return False
    return cuda_capability(x.device)[0] >= 10


def dequantize_weight_bf16(packed, block_scales, gs, gather: bool | None = None) -> torch.Tensor:
    """bf16 W [N, K] = round_bf16(e2m1 * block_scale * global) on CUDA."""
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(n, k, dtype=torch.bfloat16, device=packed.device)
    block_k = _tile_k(k, 256)
    grid = (triton.cdiv(n, 16), k // block_k)
    wrap_triton(_dequant_kernel)[grid](packed, block_scales, gs, out, n, k, BLOCK_N=16, BLOCK_K=block_k,
                                       GATHER=DECODE_GATHER if gather is None else gather, num_warps=4)
    return out


def nvfp4_weight_to_8bit(packed, block_scales, gs, fmt: str, gather: bool | None = None):
    """CUDA version of :func:`nvfp4_weight_to_8bit_ref` (bit-exact: same FP32 operations)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    q = torch.empty(n, k, dtype=torch.int8 if fmt == "int8" else torch.float8_e4m3fn, device=packed.device)
    scale = torch.empty(n, dtype=torch.float32, device=packed.device)
    # 8 rows per program: N=1536 still gives 192 programs (16 rows gave 96: a third of the SMs idle).
    grid = (triton.cdiv(n, 8),)
    wrap_triton(_to_8bit_kernel)[grid](packed, block_scales, gs, q, scale, n, k, IS_INT8=fmt == "int8",
                                       BLOCK_N=8, CHUNK=_tile_k(k, 256),
                                       GATHER=DECODE_GATHER if gather is None else gather, num_warps=4)
    return q, scale


def _w4a16_config(m: int, n: int) -> dict:
    # Memory-bound regime: narrow N tiles so that N=1536 still spreads over the 132 SMs.
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=4, GROUP_M=1)
    if m <= W4A16_FUSED_MAX_M:
        block_m = 64 if m <= 64 else 128
        return dict(BLOCK_M=block_m, BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=4, GROUP_M=1)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, GROUP_M=8)


def w4a16_gemm(a: torch.Tensor, packed, block_scales, gs, bias, fused: bool | None = None,
               config: dict | None = None, gather: bool | None = None) -> torch.Tensor:
    """bf16 a [M, K] x NVFP4 W [N, K]^T -> bf16 [M, N] (+bias)."""
    m, k = a.shape
    n = packed.shape[0]
    if fused is None:
        fused = m <= W4A16_FUSED_MAX_M
    if not fused:
        w = dequantize_weight_bf16(packed, block_scales, gs, gather)
        if bias is None:
            return torch.mm(a, w.t())
        return torch.addmm(bias.to(torch.bfloat16), a, w.t())
    out = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    cfg = dict(config or _w4a16_config(m, n))
    cfg["BLOCK_K"] = _tile_k(k, cfg["BLOCK_K"])
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    wrap_triton(_w4a16_kernel)[grid](
        a, packed, block_scales, gs, bias if bias is not None else gs, out, m, n, k, a.stride(0),
        HAS_BIAS=bias is not None, GATHER=DECODE_GATHER if gather is None else gather, **cfg,
    )
    return out


def _w4a4_native(qx, bsx, sx, packed, block_scales, gs, bias, out_dtype):
    """UNTESTED Blackwell path: tl.dot_scaled with e2m1 operands and e4m3 scales per 16."""
    m, n, k = qx.shape[0], packed.shape[0], packed.shape[1] * 2
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    bm, bn, bk = 128, 128, _tile_k(k, 128)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    wrap_triton(_w4a4_dot_scaled_kernel)[grid](
        qx, bsx, sx, packed, block_scales, gs, bias if bias is not None else gs, out, m, n, k,
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=8, num_stages=3,
    )
    return out


if HAS_TRITON:

    @triton.jit
    def _decode_weight_tile(packed_ptr, bs_ptr, rn, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GATHER: tl.constexpr):
        """[BLOCK_N, BLOCK_K] fp32 tile of e2m1 * block_scale (exact; global scale not applied).
        rn: int64 row indices already inside [0, N)."""
        if GATHER:
            return _decode_weight_tile_gather(packed_ptr, bs_ptr, rn, k0, K, BLOCK_K)
        else:
            return _decode_weight_tile_join(packed_ptr, bs_ptr, rn, k0, K, BLOCK_N, BLOCK_K)

    @triton.jit
    def _decode_weight_tile_gather(packed_ptr, bs_ptr, rn, k0, K, BLOCK_K: tl.constexpr):
        """Each element loads its own byte and scale (repeated addresses hit L1): no join or
        reshape, so no register-layout shuffles."""
        ks = k0 + tl.arange(0, BLOCK_K)
        byte = tl.load(packed_ptr + rn[:, None] * (K // 2) + (ks // 2)[None, :]).to(tl.int32)
        code = (byte >> ((ks & 1) * 4)[None, :]) & 15
        s = tl.load(bs_ptr + rn[:, None] * (K // 16) + (ks // 16)[None, :]).to(tl.float32) * 16384.0
        return e2m1_decode(code) * s

    @triton.jit
    def _decode_weight_tile_join(packed_ptr, bs_ptr, rn, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Loads each byte and scale once, then interleaves nibbles (join) and broadcasts scales
        (reshape); the shuffles go through shared memory."""
        pk = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        p = tl.load(packed_ptr + rn[:, None] * (K // 2) + pk[None, :]).to(tl.int32)
        lo = e2m1_decode(p & 15)
        hi = e2m1_decode(p >> 4)
        w = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])  # element 2i = low nibble
        sk = k0 // 16 + tl.arange(0, BLOCK_K // 16)
        s = tl.load(bs_ptr + rn[:, None] * (K // 16) + sk[None, :]).to(tl.float32) * 16384.0
        w = tl.reshape(w, [BLOCK_N, BLOCK_K // 16, 16]) * s[:, :, None]
        return tl.reshape(w, [BLOCK_N, BLOCK_K])

    @triton.jit
    def _dequant_kernel(packed_ptr, bs_ptr, gs_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATHER: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        rn_load = (rn % N).to(tl.int64)
        w = _decode_weight_tile(packed_ptr, bs_ptr, rn_load, k0, K, BLOCK_N, BLOCK_K, GATHER)
        gs = tl.load(gs_ptr)
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = (rn[:, None] < N) & (cols[None, :] < K)
        tl.store(out_ptr + rn_load[:, None] * K + cols[None, :], (w * gs).to(tl.bfloat16), mask=mask)

    @triton.jit
    def _to_8bit_kernel(packed_ptr, bs_ptr, gs_ptr, q_ptr, scale_ptr, N, K, IS_INT8: tl.constexpr,
                        BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, GATHER: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rn < N
        rn_load = (rn % N).to(tl.int64)
        gs = tl.load(gs_ptr)
        amax = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, CHUNK):
            w = _decode_weight_tile(packed_ptr, bs_ptr, rn_load, k0, K, BLOCK_N, CHUNK, GATHER) * gs
            amax = tl.maximum(amax, tl.max(tl.abs(w), axis=1))
        if IS_INT8:
            scale = tl.div_rn(amax, 127.0)
        else:
            scale = tl.div_rn(amax, 448.0)
        scale = tl.where(amax > 0, scale, 1.0)
        tl.store(scale_ptr + rn_load, scale, mask=row_mask)
        for k0 in range(0, K, CHUNK):
            w = _decode_weight_tile(packed_ptr, bs_ptr, rn_load, k0, K, BLOCK_N, CHUNK, GATHER) * gs
            y = tl.div_rn(w, scale[:, None])
            cols = k0 + tl.arange(0, CHUNK)
            mask = row_mask[:, None] & (cols[None, :] < K)
            if IS_INT8:
                qv = tl.minimum(tl.maximum(round_half_even(y), -127.0), 127.0).to(tl.int8)
            else:
                qv = tl.minimum(tl.maximum(y, -448.0), 448.0).to(tl.float8e4nv)
            tl.store(q_ptr + rn_load[:, None] * K + cols[None, :], qv, mask=mask)

    @triton.jit
    def _w4a16_kernel(a_ptr, packed_ptr, bs_ptr, gs_ptr, bias_ptr, c_ptr, M, N, K, stride_am,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, GATHER: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm_load = (rm % M).to(tl.int64)
        rn_load = (rn % N).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + rm_load[:, None] * stride_am + (k0 + rk)[None, :])
            w = _decode_weight_tile(packed_ptr, bs_ptr, rn_load, k0, K, BLOCK_N, BLOCK_K, GATHER).to(a.dtype)
            acc = tl.dot(a, tl.trans(w), acc)
        out = acc * tl.load(gs_ptr)
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn_load).to(tl.float32)[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], out.to(tl.bfloat16), mask=mask)

    @triton.jit
    def _w4a4_dot_scaled_kernel(a_ptr, as_ptr, ags_ptr, b_ptr, bs_ptr, gs_ptr, bias_ptr, c_ptr, M, N, K,
                                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
        # UNTESTED (needs sm_100+). Written to the tl.dot_scaled documentation: fp4 operands
        # packed two per uint8 along K, first element in the low bits (our nibble order);
        # NVFP4 scales are e4m3, one per 16 elements.
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        pid_m = pid // num_n
        pid_n = pid % num_n
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm_load = (rm % M).to(tl.int64)
        rn_load = (rn % N).to(tl.int64)
        rkp = tl.arange(0, BLOCK_K // 2)
        rks = tl.arange(0, BLOCK_K // 16)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + rm_load[:, None] * (K // 2) + (k0 // 2 + rkp)[None, :])
            b = tl.load(b_ptr + rn_load[None, :] * (K // 2) + (k0 // 2 + rkp)[:, None])  # [BK/2, BN]
            a_s = tl.load(as_ptr + rm_load[:, None] * (K // 16) + (k0 // 16 + rks)[None, :])
            b_s = tl.load(bs_ptr + rn_load[:, None] * (K // 16) + (k0 // 16 + rks)[None, :])
            acc = tl.dot_scaled(a, a_s, "e2m1", b, b_s, "e2m1", acc)
        out = acc * tl.load(ags_ptr + rm_load)[:, None] * tl.load(gs_ptr)
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn_load).to(tl.float32)[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], out.to(c_ptr.dtype.element_ty), mask=mask)
