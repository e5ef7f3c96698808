"""Persistent, TMA-fed 8-bit GEMM (INT8 with int32 accumulation, FP8 E4M3 with fp32) for GPUs with
the Tensor Memory Accelerator (sm90 Hopper and later), with an optional tanh-GELU epilogue that
also takes each row's amax.

Why: the pointer-loading Triton GEMM of ``linear_8bit`` reaches 840-1,170 INT8 TOPS at Wan's
shapes where cuBLASLt's FP8 kernel reaches 1,390-1,540 (plugins/notes/linear_int8.md), so INT8 —
the accurate 8-bit format on the test bed — bought almost no speed. Here one program per SM walks
the output tiles (no launch tail, the epilogue of one tile overlaps the next tile's loads), and the
operands come through TMA descriptors (bulk async copies, no address arithmetic in the main loop).

The GELU epilogue serves the FFN: ``up → tanh-GELU → down``. Writing GELU's output from the up
projection's epilogue, with the per-row amax the down projection's per-token quantization needs
(each tile's row max stored, reduced over the row's tiles after; or an atomic max), leaves that quantization a single streaming pass instead of
the separate GELU + amax + quantize kernel (plugins/producer_quant.py, two passes over 587 MB).

Numerics (the references below): ``acc * sx[m] * sw[n] (+ bias[n])`` in FP32, rounded to the output
dtype — bit-identical to ``linear_8bit``'s kernel. GELU: the float composition's order — linear
output rounded to the output dtype, tanh-GELU in FP32 (MUFU tanh, |error| ≈ 2^-11, below bf16
rounding), rounded again; the amax is taken of the rounded values, as ``quantize_rows`` would.

Ops: ``ditbake::gemm_w8a8`` (plugins/linear_8bit.py) dispatches here when ``tma_gemm_applies``;
``ditbake::gemm_w8a8_gelu(qx, sx, qw, w_scale, bias, out_dtype) -> (gelu_out, row_amax fp32)``.
A Blackwell path (tcgen05 / native block-scaled formats) would be another kernel behind the same ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from ditbake.plugins._triton_util import HAS_TRITON, tl, triton, use_triton
from ditbake.plugins.int8 import matmul_8bit_ref
from ditbake.plugins.nvfp4 import QuantFormatError

# Tile and pipeline by measurement (benchmarks/bench_gemm_8bit.py, results/gemm_8bit_*.json).
CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4,
              WARP_SPECIALIZE=False, FLATTEN=True, SUBTILE=False, ATOMIC_AMAX=False)
MIN_ROWS = 1024  # below this the tiles do not fill the SMs; linear_8bit's kernel keeps small M
# At Wan's 1536 x 1536 layers the pointer kernel measured faster (199 vs 216 µs, sweep1); at the FFN's
# 1536 x 8960 / 8960 x 1536 this one wins (858 vs 1,061 µs / 757 vs 831 µs)
MIN_WIDTH = 4096
ENABLED = True  # the switch benchmarks flip to race this kernel against linear_8bit's


def tma_gemm_applies(qx: torch.Tensor, qw: torch.Tensor) -> bool:
    """On CUDA with TMA (sm90+), both operands contiguous, 16-byte-aligned rows (K % 16 == 0 for
    8-bit codes: TMA's stride rule), M large enough to fill the GPU and K or N wide enough for this
    kernel to win (MIN_WIDTH)."""
    if not (ENABLED and HAS_TRITON and qx.is_cuda and qw.is_cuda):
        return False
    if torch.cuda.get_device_capability(qx.device)[0] < 9:
        return False
    m, k = qx.shape
    # storage offsets, not data_ptr(): this runs while Inductor traces with fake tensors; the
    # caching allocator aligns every base far beyond 16 bytes
    return (m >= MIN_ROWS and max(k, qw.shape[0]) >= MIN_WIDTH and k % 16 == 0 and qx.is_contiguous() and qw.is_contiguous()
            and qx.storage_offset() % 16 == 0 and qw.storage_offset() % 16 == 0)


def _ensure_scratch_allocator() -> None:
    """The kernel builds its TMA descriptors on the device (host-side descriptors do not survive
    torch.compile / AOTInductor tracing of a triton_op in torch 2.11), which needs Triton's
    global-scratch allocator for eager launches; compiled wrappers install their own."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


_ALLOCATOR_SET = False


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemm_8bit_persistent(qx, sx, qw, sw, bias, out_dtype: torch.dtype, gelu: bool = False,
                         config: dict | None = None):
    """out = qx @ qw.T * sx[:, None] * sw[None, :] (+ bias), GELU'd when ``gelu``; returns
    (out [M, N], row amax fp32 [M] of the output when ``gelu`` else None). Callers check
    :func:`tma_gemm_applies` first."""
    m, k = qx.shape
    n = qw.shape[0]
    cfg = dict(CONFIG, **(config or {}))
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    n_tiles = triton.cdiv(n, cfg["BLOCK_N"])
    # the row amax: one atomic max per (row, tile), or each tile's partial max stored and reduced after
    amax = torch.zeros(m if gelu else 1, n_tiles if gelu and not cfg["ATOMIC_AMAX"] else 1,
                       dtype=torch.float32, device=qx.device)
    _ensure_scratch_allocator()
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * n_tiles
    num_sms = _num_sms(qx.device)
    wrap_triton(_gemm_8bit_persistent_kernel)[(min(num_sms, tiles),)](
        qx, qw, sx, sw, bias if bias is not None else sx, out, amax, m, n, k,
        HAS_BIAS=bias is not None, IS_INT8=qx.dtype == torch.int8, GELU=gelu, NUM_SMS=num_sms, **cfg)
    return out, (amax.amax(dim=1) if gelu else None)


def _gelu_and_amax(lin: torch.Tensor):
    g = F.gelu(lin, approximate="tanh")
    return g, g.float().abs().amax(dim=-1)


def gemm_w8a8_gelu_ref(qx, sx, qw, w_scale, bias, out_dtype: torch.dtype):
    """The specification: the W8A8 GEMM rounded to out_dtype, tanh-GELU in out_dtype (FP32 inside,
    as PyTorch computes it), and the amax of each row of that result."""
    return _gelu_and_amax(matmul_8bit_ref(qx, sx, qw, w_scale, bias, torch.float32).to(out_dtype))


def check_gelu_gemm_args(qx, sx, qw, w_scale, bias) -> None:
    if qx.dim() != 2 or qw.dim() != 2 or qx.dtype != qw.dtype or qx.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise QuantFormatError(f"gemm_w8a8_gelu takes 2-D int8 or float8_e4m3fn codes of one dtype, got "
                               f"{qx.dtype} {tuple(qx.shape)} and {qw.dtype} {tuple(qw.shape)}")
    if qx.shape[1] != qw.shape[1]:
        raise QuantFormatError(f"gemm_w8a8_gelu reduction mismatch: x K={qx.shape[1]}, w K={qw.shape[1]}")
    if sx.shape != (qx.shape[0],) or w_scale.shape != (qw.shape[0],):
        raise QuantFormatError(f"gemm_w8a8_gelu scales must be [{qx.shape[0]}] and [{qw.shape[0]}], got "
                               f"{tuple(sx.shape)} and {tuple(w_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (qw.shape[0],):
        raise QuantFormatError(f"bias must be [{qw.shape[0]}], got {tuple(bias.shape)}")


@triton_op("ditbake::gemm_w8a8_gelu", mutates_args=())
def gemm_w8a8_gelu(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """tanh-GELU of the W8A8 GEMM and its row amax (module docstring): the persistent kernel's
    epilogue where it applies, else linear_8bit's GEMM then the composition; the reference on CPU."""
    if not use_triton(qx):
        return gemm_w8a8_gelu_ref(qx, sx, qw, w_scale, bias, out_dtype)
    if tma_gemm_applies(qx, qw):
        return gemm_8bit_persistent(qx, sx, qw, w_scale, bias, out_dtype, gelu=True)
    from ditbake.plugins.linear_8bit import gemm_8bit  # noqa: PLC0415 - linear_8bit imports this module

    return _gelu_and_amax(gemm_8bit(qx, sx, qw.contiguous(), w_scale, bias, out_dtype))


def gelu_gemm_8bit(qx, sx, qw, w_scale, bias, out_dtype: torch.dtype):
    """Validated entry point for :func:`gemm_w8a8_gelu`."""
    check_gelu_gemm_args(qx, sx, qw, w_scale, bias)
    return gemm_w8a8_gelu(qx, sx, qw, w_scale, bias, out_dtype)


if HAS_TRITON:
    from ditbake.plugins.producer_quant import _gelu_tanh

    @triton.jit
    def _grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
        """Tile index -> (row tile, column tile), GROUP_M row tiles sharing each weight tile in L2."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % rows, (tile % per_group) // rows

    @triton.jit
    def _epilogue(acc, rm, rn, sa, sb_ptr, bias_ptr, c_ptr, M, N,
                  HAS_BIAS: tl.constexpr, GELU: tl.constexpr):
        """Scale (+ bias) (+ GELU) and store one accumulator (sub)tile; returns its row max |out|
        (GELU only)."""
        row_ok = rm < M
        col_ok = rn < N
        out = acc.to(tl.float32) * sa[:, None] * tl.load(sb_ptr + rn, mask=col_ok, other=0.0)[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        rowmax = tl.zeros_like(sa)
        if GELU:  # the composition's roundings: linear output, then GELU output, in c's dtype
            out = _gelu_tanh(out.to(c_ptr.dtype.element_ty), c_ptr.dtype.element_ty)
            rowmax = tl.max(tl.where(mask, tl.abs(out), 0.0), axis=1)
        tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], out.to(c_ptr.dtype.element_ty), mask=mask)
        return rowmax

    @triton.jit
    def _gemm_8bit_persistent_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, amax_ptr, M, N, K,
                                     HAS_BIAS: tl.constexpr, IS_INT8: tl.constexpr, GELU: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                     GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
                                     WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr,
                                     SUBTILE: tl.constexpr, ATOMIC_AMAX: tl.constexpr):
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)  # TMA zero-fills the tail of K and of M
        acc_dtype: tl.constexpr = tl.int32 if IS_INT8 else tl.float32
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=FLATTEN,
                             warp_specialize=WARP_SPECIALIZE):
            pid_m, pid_n = _grouped_tile(tile, num_m, num_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
            for ki in range(k_tiles):
                a = a_desc.load([off_m, ki * BLOCK_K])
                b = b_desc.load([off_n, ki * BLOCK_K])
                acc = tl.dot(a, b.T, acc, out_dtype=acc_dtype)
            rm = off_m + tl.arange(0, BLOCK_M)
            row_ok = rm < M
            sa = tl.load(sa_ptr + rm, mask=row_ok, other=0.0)
            if SUBTILE:  # two halves of N: half the live registers in the epilogue (no spills)
                halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
                acc0, acc1 = tl.split(halves)
                rn0 = off_n + tl.arange(0, BLOCK_N // 2)
                rowmax = tl.maximum(
                    _epilogue(acc0, rm, rn0, sa, sb_ptr, bias_ptr, c_ptr, M, N, HAS_BIAS, GELU),
                    _epilogue(acc1, rm, rn0 + BLOCK_N // 2, sa, sb_ptr, bias_ptr, c_ptr, M, N, HAS_BIAS, GELU))
            else:
                rn = off_n + tl.arange(0, BLOCK_N)
                rowmax = _epilogue(acc, rm, rn, sa, sb_ptr, bias_ptr, c_ptr, M, N, HAS_BIAS, GELU)
            if GELU:
                if ATOMIC_AMAX:
                    tl.atomic_max(amax_ptr + rm, rowmax, mask=row_ok)
                else:
                    tl.store(amax_ptr + rm.to(tl.int64) * num_n + pid_n, rowmax, mask=row_ok)
