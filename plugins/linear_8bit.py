"""W8A8 linear: weights 8-bit per output channel (prepared offline), activations quantized per
token dynamically inside the op (optionally after the block Hadamard). INT8 and FP8 (E4M3).

Op ``ditbake::linear_w8a8(x, qw, w_scale, bias, fmt, hadamard) -> Tensor`` (x.dtype):
``x`` [..., K] float, ``qw`` [N, K] int8 / float8_e4m3fn, ``w_scale`` fp32 [N].

Reference: ``act_quant_ref`` then ``int8.matmul_8bit_ref`` (exact accumulation in float64).
GPU: ``act_quant`` kernel, then a Triton GEMM on the 8-bit tensor cores (int32 accumulation for
INT8, fp32 for FP8) whose epilogue applies ``acc * sx[m] * sw[n] + bias`` in FP32 — this module's
kernel, or at large shapes on sm90+ the persistent TMA kernel (plugins/gemm_8bit_persistent.py), or for
INT8 on sm90 with the ``cutlass`` extra CUTLASS's kernels (plugins/gemm_w8a8_cutlass.py). For FP8 the
GEMM can instead go to cuBLAS through ``torch._scaled_mm`` with row-wise scales
(``FP8_GEMM_BACKEND``), chosen by measurement (see plugins/notes/linear_kernels.md).
"""
from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from ditbake.plugins._triton_util import HAS_TRITON, tl, triton, use_triton
from ditbake.plugins.act_quant import act_quant, act_quant_ref, check_act_quant_args
from ditbake.plugins.gemm_8bit_persistent import OUT_DTYPES, dtype_name, persistent_gemm_applies
from ditbake.plugins.gemm_w8a8_cutlass import cutlass_gemm_applies
from ditbake.plugins.int8 import EIGHT_BIT_FORMATS, matmul_8bit_ref
from ditbake.plugins.linear_fp8 import gemm_fp8
from ditbake.plugins.nvfp4 import QuantFormatError

# "triton" or "scaled_mm" (cuBLAS FP8 with row-wise scales); set from the benchmark.
FP8_GEMM_BACKEND = "triton"

_Q_DTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def check_w8a8_args(x, qw, w_scale, bias, fmt, hadamard) -> None:
    if fmt not in EIGHT_BIT_FORMATS:
        raise QuantFormatError(f"unknown 8-bit format {fmt!r}; use one of {EIGHT_BIT_FORMATS}")
    if qw.dim() != 2 or qw.dtype != _Q_DTYPE[fmt]:
        raise QuantFormatError(f"{fmt} weight must be {_Q_DTYPE[fmt]} [N, K], got {qw.dtype} {tuple(qw.shape)}")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (qw.shape[0],):
        raise QuantFormatError(f"weight scale must be float32 [{qw.shape[0]}], got {w_scale.dtype} {tuple(w_scale.shape)}")
    if x.shape[-1] != qw.shape[1]:
        raise QuantFormatError(f"x has K={x.shape[-1]} but the weight has K={qw.shape[1]}")
    if bias is not None and tuple(bias.shape) != (qw.shape[0],):
        raise QuantFormatError(f"bias must be [{qw.shape[0]}], got {tuple(bias.shape)}")
    check_act_quant_args(x, fmt, hadamard)


def linear_w8a8_ref(x, qw, w_scale, bias, fmt: str, hadamard: bool) -> torch.Tensor:
    qx, sx, _ = act_quant_ref(x, fmt, hadamard)
    return matmul_8bit_ref(qx, sx, qw, w_scale, bias, torch.float32).to(x.dtype)


def _gemm_config(m: int, n: int) -> dict:
    """Tile shapes by size: large M fills the chip with 128x256 tiles (the shape that keeps the
    8-bit tensor cores busy); small M uses narrow N tiles so that enough programs exist."""
    if m >= 1024:
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)


def gemm_8bit(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """out[m, n] = sum_k qx[m, k] qw[n, k] * sx[m] * sw[n] + bias[n] on CUDA.
    qx [M, K], qw [N, K] contiguous, same 8-bit dtype."""
    m, k = qx.shape
    n = qw.shape[0]
    if qx.dtype == torch.float8_e4m3fn and FP8_GEMM_BACKEND == "scaled_mm" and config is None:
        # cuBLASLt with promoted accumulation: the setting bench_linear.py measured this switch with
        return gemm_fp8(qx, sx, qw, sw, bias, out_dtype, fast_accum=False)
    if config is None and cutlass_gemm_applies(qx, qw, out_dtype, bias):
        # INT8 on sm90 with the cutlass extra built: CUTLASS's warp-specialized kernels (C++ op)
        return torch.ops.ditbake.gemm_w8a8_cutlass(qx, sx, qw, sw, bias, 0)
    if config is None and persistent_gemm_applies(qx, qw) and out_dtype in OUT_DTYPES.values():
        # sm90+, large M and K or N: the persistent kernel, through its opaque op
        return torch.ops.ditbake.gemm_w8a8_persistent(qx, sx, qw, sw, bias, dtype_name(out_dtype))
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    cfg = dict(config or _gemm_config(m, n))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    wrap_triton(_gemm_8bit_kernel)[grid](
        qx, qw, sx, sw, bias if bias is not None else sx, out, m, n, k,
        qx.stride(0), qw.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, IS_INT8=qx.dtype == torch.int8,
        EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg,
    )
    return out


@triton_op("ditbake::linear_w8a8", mutates_args=())
def linear_w8a8(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                fmt: str, hadamard: bool) -> torch.Tensor:
    """W8A8 linear with per-token dynamic activation quantization (see module docstring)."""
    if not use_triton(x):
        return linear_w8a8_ref(x, qw, w_scale, bias, fmt, hadamard)
    lead = x.shape[:-1]
    qx, sx, _ = act_quant(x.reshape(-1, x.shape[-1]), fmt, hadamard)
    out = gemm_8bit(qx, sx, qw.contiguous(), w_scale, bias, x.dtype)
    return out.reshape(*lead, qw.shape[0])


@triton_op("ditbake::gemm_w8a8", mutates_args=())
def gemm_w8a8(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The GEMM alone, for callers that quantize the activations themselves (plugins/linear_int8.py
    writes the quantization in torch ops so that Inductor fuses it into the producing kernel):
    qx [M, K] and qw [N, K] of one 8-bit dtype, sx fp32 [M], w_scale fp32 [N]."""
    if not use_triton(qx):
        return matmul_8bit_ref(qx, sx, qw, w_scale, bias, torch.float32).to(out_dtype)
    return gemm_8bit(qx, sx, qw, w_scale, bias, out_dtype)


def linear_8bit(x, qw, w_scale, bias=None, fmt: str = "int8", hadamard: bool = False) -> torch.Tensor:
    """Validated entry point for :func:`linear_w8a8`."""
    check_w8a8_args(x, qw, w_scale, bias, fmt, hadamard)
    return linear_w8a8(x, qw, w_scale, bias, fmt, hadamard)


if HAS_TRITON:

    @triton.jit
    def _gemm_8bit_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K,
                          stride_am, stride_bn, stride_cm,
                          HAS_BIAS: tl.constexpr, IS_INT8: tl.constexpr, EVEN_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # Grouped order: GROUP_M row-tiles share each weight tile while it is in L2.
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Wrap out-of-range rows/cols onto valid ones for the loads; the store is masked.
        rm_load = (rm % M).to(tl.int64)
        rn_load = (rn % N).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm_load[:, None] * stride_am + rk[None, :]
        b_ptrs = b_ptr + rn_load[None, :] * stride_bn + rk[:, None]  # [BLOCK_K, BLOCK_N], K-major
        if IS_INT8:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                kmask = (k0 + rk) < K
                a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)  # 0.0: an int 0 cannot cast to fp8
                b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
            if IS_INT8:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        sa = tl.load(sa_ptr + rm_load)
        sb = tl.load(sb_ptr + rn_load)
        out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn_load).to(tl.float32)[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], out.to(c_ptr.dtype.element_ty), mask=mask)
