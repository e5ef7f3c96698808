"""Producer kernels that write 8-bit activations directly: the layer that makes a linear's input
(layer norm with modulation / affine, tanh-GELU) also takes each token's amax and emits the
per-token INT8 or FP8 codes and scales the W8A8 GEMM reads, in one pass over memory.

Why a kernel of our own: written as torch ops, Inductor fuses the quantization into the
producer, but the kernels it generates were measured far from the memory roofline on the H200
(benchmarks/results/linear_8bit_profile_h200.json, M = 32,760): layer norm + modulation + amax +
cast 218 µs for 100 MB in / 50 MB out (≈ 0.7 TB/s), tanh-GELU + amax + cast over the 8,960-wide
FFN activation 1,227 µs — twice its bf16 GELU alone (624 µs). Those passes cost more than the
8-bit GEMMs saved (plugins/notes/producer_quant.md).

Ops (``fmt`` is ``int8`` or ``fp8``; outputs are 2-D, one row per token):

* ``ditbake::norm_quant(x, mul, add, eps, fmt) -> (q [M, D], scale fp32 [M])`` with
  ``y = (layer_norm(x.float(), eps) * mul + add).to(x.dtype)``; x [B, S, D], mul / add fp32
  [R, D] with R = 1 (shared) or R = B (per sample: Wan's modulation ``1 + scale`` / ``shift``;
  an affine norm passes its weight / bias).
* ``ditbake::residual_norm_quant(x, a, gate, mul, add, eps, fmt) -> (h [B, S, D], q, scale)``: the residual
  update that precedes a norm, ``h = (x.float() + a.float() * gate).to(x.dtype)`` (gate fp32 [R, D] or None:
  a plain add), written once and normalized from registers: Wan's attention residuals and the norms after
  them, without reading h back (Inductor's pointwise kernel for the update alone ran at ≈ 2.4 TB/s).
* ``ditbake::gelu_quant(h, fmt) -> (q [M, K], scale fp32 [M])`` with
  ``y = gelu(h, approximate="tanh")`` in h's dtype.

* ``ditbake::row_quant(h, fmt) -> (q [M, K], scale fp32 [M])``: ``y = h`` with the amax taken here
  (inputs no producer of ours writes: Inductor's fusion of the same torch ops ran at half this speed).

* ``ditbake::amax_quant(h, amax, fmt) -> (q [M, K], scale fp32 [M])``: ``y = h`` with each row's
  max |y| already measured by its producer (the CUTLASS GELU GEMM's epilogue,
  plugins/gemm_w8a8_cutlass.py): a streaming pass with no reduction, 2-D tiles, INT8 codes by a
  multiply with each row's reciprocal scale (AMAX_RECIPROCAL). Inductor's kernel for the same torch
  ops ran at 2.3 TB/s on the H200 (383 µs), this one 225 µs (gemm_8bit_cutlass_newton_h200.json).

* ``ditbake::cat_amax_quant(a, h, amax, fmt) -> (q [M, Ka + Kh], scale fp32 [M])``: ``y = cat([a, h], -1)``
  with the rows' amax given, the same streaming pass reading each tile from a or h: Flux's single
  blocks (attention output beside the MLP's GELU) without writing the concatenation.

Then y is quantized per token exactly as ``int8.quantize_rows`` (the specification): the
references below are literally that composition. The kernels compute y in FP32, round it to
x's dtype as the composition does, and quantize with act_quant's device helpers (IEEE division,
round half to even, saturating E4M3). Layer norm's FP32 sums and tanh differ from PyTorch's in
order / last bits (tanh is the MUFU approximation, |error| ≈ 2^-11, below bf16 rounding), so a
code may differ where y sits within rounding of a decision boundary.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from ditbake.plugins._triton_util import HAS_TRITON, tl, triton, use_triton
from ditbake.plugins.int8 import EIGHT_BIT_FORMATS, quantize_rows
from ditbake.plugins.nvfp4 import QuantFormatError

_MODE = {"int8": 0, "fp8": 1}
_Q_DTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
MAX_NORM_WIDTH = 8192  # one pass with whole rows in registers up to this width
_GELU_CHUNK = 512
# Launch parameters, module-level so that benchmarks/bench_linear_fp8.py can sweep them. Measured on
# the H200 at Wan's sizes (linear_8bit_profile_h200.json, eager sweep incl. launch overhead): norm
# 1 row x 2 warps fastest (0.306 ms vs 0.389 for 2 x 4); GELU two passes 0.594 ms vs 1.14 for the
# best one-pass (whole 16,384-padded rows in registers: one program per SM, latency-bound).
# NORM_STEPS blocks of NORM_ROWS rows per program in Triton's software pipeline (NORM_STAGES: the next blocks
# copied to shared memory while one is computed; 1 = no pipeline). H100, profiled device time
# (norm_quant_{wan,flux}_h100.json): at Wan's 32,760 x 1,536 the manual one-block look-ahead of session 11
# (2 rows x 4 warps x 4 blocks) took 96 µs, 1 x 4 x 16 pipelined over 3 stages 92.5 µs; at Flux's 16,896 x
# 3,072 102 vs 91 µs (8 warps and 2-stage pipelines were slower; registers: 72 / 128 at 2,048 / 4,096
# padded columns, ptxas for sm_90a). The kernel is issue-bound, not memory-bound (≈ 30 instructions per
# element, 25 % of them on padding at these widths); copies of the same bytes take 58-60 µs.
NORM_STEPS = 16
NORM_ROWS = 1
NORM_WARPS = 4
NORM_STAGES = 3
GELU_ROW_WARPS = None
GELU_TWO_PASS = True
GELU_ROWS = 8  # two-pass kernel: rows per program (their second pass should hit L2), warps
GELU_WARPS = 8
AMAX_ROWS, AMAX_COLS, AMAX_WARPS = 16, 512, 8  # amax_quant's tile: 16 KB of bf16 in, 8 KB out per program
# amax_quant multiplies each value by its row's reciprocal scale and corrects the quotient with one FMA
# Newton step instead of IEEE division (div.rn's range checks and slow path made the kernel
# compute-bound). Measured on the H200 at Wan's FFN (32,760 x 8,960): with the Newton step 225 µs vs
# 315 µs for division and 0 of 293.5 M codes differing (gemm_8bit_cutlass_newton_h200.json); the plain
# reciprocal took 230 µs with 93 codes differing (gemm_8bit_cutlass_h200.json) and broke exact .5 ties
# (6e-4 of codes when amax is one of h's own bf16 values).
AMAX_RECIPROCAL = True
# The same reciprocal + Newton step in norm_quant's INT8 store (bench_norm_quant.py measures both).
NORM_RECIPROCAL = True
ROW_ROWS, ROW_WARPS = 2, 2  # row_quant: rows per program, warps (bench_norm_quant.py)
MAX_GELU_ROW = 16384  # Wan's 8,960-wide FFN rows pad to 16,384: 32 fp32 per thread at 16 warps


def check_producer_args(x: torch.Tensor, fmt: str, mul: torch.Tensor | None = None,
                        add: torch.Tensor | None = None) -> None:
    if fmt not in EIGHT_BIT_FORMATS:
        raise QuantFormatError(f"unknown 8-bit format {fmt!r}; use one of {EIGHT_BIT_FORMATS}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() < 2 or x.shape[-1] == 0:
        raise QuantFormatError(f"producer input must be a float tensor [..., K] with K > 0, got {x.dtype} "
                               f"{tuple(x.shape)}")
    if mul is None:
        return
    if x.dim() != 3:
        raise QuantFormatError(f"norm_quant takes x [B, S, D], got {tuple(x.shape)}")
    b, _, d = x.shape
    for name, t in (("mul", mul), ("add", add)):
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != d or t.shape[0] not in (1, b):
            raise QuantFormatError(f"norm_quant {name} must be float32 [1 or {b}, {d}], got {t.dtype} "
                                   f"{tuple(t.shape)}")


def norm_quant_ref(x, mul, add, eps: float, fmt: str):
    """The specification: the runtime's composition, then per-token quantization."""
    d = x.shape[-1]
    y = F.layer_norm(x.float(), (d,), None, None, eps) * mul[:, None, :] + add[:, None, :]
    q, scale = quantize_rows(y.to(x.dtype).reshape(-1, d), fmt)
    return q, scale.reshape(-1)


def residual_norm_quant_ref(x, a, gate, mul, add, eps: float, fmt: str):
    """The specification of the fused residual: ``(x.float() + a.float() * gate).to(x.dtype)`` (gate fp32
    [R, D] broadcast over tokens; without a gate a plain add in x's dtype), then norm_quant_ref of it."""
    h = x.float() + (a.float() if gate is None else a.float() * gate[:, None, :])
    h = h.to(x.dtype)
    return (h, *norm_quant_ref(h, mul, add, eps, fmt))


def gelu_quant_ref(h, fmt: str):
    k = h.shape[-1]
    q, scale = quantize_rows(F.gelu(h, approximate="tanh").reshape(-1, k), fmt)
    return q, scale.reshape(-1)


def _buffers(m: int, k: int, fmt: str, device):
    return (torch.empty(m, k, dtype=_Q_DTYPE[fmt], device=device),
            torch.empty(m, dtype=torch.float32, device=device))


@triton_op("ditbake::norm_quant", mutates_args=())
def norm_quant(x: torch.Tensor, mul: torch.Tensor, add: torch.Tensor, eps: float,
               fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer norm × mul + add, rounded to x.dtype, quantized per token (module docstring)."""
    if not _norm_kernel_runs(x):
        return norm_quant_ref(x, mul, add, eps, fmt)
    return _launch_norm_quant(x, None, None, mul, add, eps, fmt)[1:]


@triton_op("ditbake::residual_norm_quant", mutates_args=())
def residual_norm_quant(x: torch.Tensor, a: torch.Tensor, gate: Optional[torch.Tensor], mul: torch.Tensor,
                        add: torch.Tensor, eps: float, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A residual update and the next layer norm's codes in one pass: h = x + a (· gate), rounded to x.dtype,
    then ``norm_quant(h, mul, add, eps, fmt)``; returns (h, codes, scales) (module docstring)."""
    if not _norm_kernel_runs(x):
        return residual_norm_quant_ref(x, a, gate, mul, add, eps, fmt)
    return _launch_norm_quant(x, a, gate, mul, add, eps, fmt)


def _norm_kernel_runs(x: torch.Tensor) -> bool:
    return use_triton(x) and triton.next_power_of_2(x.shape[-1]) <= MAX_NORM_WIDTH


def _launch_norm_quant(x, a, gate, mul, add, eps: float, fmt: str):
    """(h or None, codes, scales) of the norm kernel, with the residual x + a (· gate) first when a is given."""
    b, s, d = x.shape
    dp = triton.next_power_of_2(d)
    x2 = x.reshape(b * s, d).contiguous()
    q, scale = _buffers(b * s, d, fmt, x.device)
    residual = 0 if a is None else (1 if gate is None else 2)
    a2 = x2 if a is None else a.reshape(b * s, d).contiguous()
    h = torch.empty_like(x2) if residual else None
    gate2 = mul if gate is None else gate.contiguous()
    # grid (row blocks of one sample, samples): a program's rows share one mul / add row, loaded once
    # (first version reloaded them per row: 16 KB of L2 traffic per 6 KB of x, 215 µs at Wan's size)
    wrap_triton(_norm_quant_kernel)[(triton.cdiv(s, NORM_ROWS * NORM_STEPS), b)](
        x2, a2, gate2, x2 if h is None else h, mul.contiguous(), add.contiguous(), q, scale, s, d, eps,
        PER_SAMPLE=mul.shape[0] > 1, GATE_PER_SAMPLE=gate2.shape[0] > 1, RESIDUAL=residual, MODE=_MODE[fmt],
        DP=dp, BLOCK_M=NORM_ROWS, STEPS=NORM_STEPS, RECIPROCAL=NORM_RECIPROCAL, STAGES=NORM_STAGES,
        num_warps=NORM_WARPS)
    return (None if h is None else h.reshape(b, s, d)), q, scale


@triton_op("ditbake::gelu_quant", mutates_args=())
def gelu_quant(h: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """tanh-GELU in h.dtype, quantized per token (module docstring)."""
    if not use_triton(h):
        return gelu_quant_ref(h, fmt)
    k = h.shape[-1]
    h2 = h.reshape(-1, k).contiguous()
    m = h2.shape[0]
    q, scale = _buffers(m, k, fmt, h.device)
    kp = triton.next_power_of_2(k)
    if kp <= MAX_GELU_ROW and not GELU_TWO_PASS:  # one pass, whole rows in registers: GELU computed once per element
        block_m = max(1, 8192 // kp)
        wrap_triton(_gelu_quant_row_kernel)[(triton.cdiv(m, block_m),)](
            h2, q, scale, m, k, MODE=_MODE[fmt], KP=kp, BLOCK_M=block_m,
            num_warps=GELU_ROW_WARPS or (16 if kp >= 8192 else 8))
    else:  # two passes over chunks: GELU + amax, then GELU again (rows now in L2) + quantize
        wrap_triton(_gelu_quant_kernel)[(triton.cdiv(m, GELU_ROWS),)](
            h2, q, scale, m, k, MODE=_MODE[fmt], CHUNK=_GELU_CHUNK, BLOCK_M=GELU_ROWS, num_warps=GELU_WARPS)
    return q, scale


@triton_op("ditbake::amax_quant", mutates_args=())
def amax_quant(h: torch.Tensor, amax: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """h [M, K] quantized per row with the given fp32 amax [M] (``quantize_rows(h, fmt, amax)``)."""
    if not use_triton(h):
        q, scale = quantize_rows(h, fmt, amax)
        return q, scale.reshape(-1)
    return _launch_amax_quant(None, h, amax, fmt)


@triton_op("ditbake::cat_amax_quant", mutates_args=())
def cat_amax_quant(a: torch.Tensor, h: torch.Tensor, amax: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cat([a, h], -1) (a [M, Ka], h [M, Kh]) quantized per row with the given fp32 amax [M] of the
    concatenated rows, without materializing the concatenation: Flux's single blocks feed proj_out
    the attention output beside the MLP's GELU, whose amax the CUTLASS GEMM's epilogue measured."""
    if not use_triton(h):
        q, scale = quantize_rows(torch.cat([a, h], -1), fmt, amax)
        return q, scale.reshape(-1)
    return _launch_amax_quant(a, h, amax, fmt)


def _launch_amax_quant(a: torch.Tensor | None, h: torch.Tensor, amax: torch.Tensor, fmt: str):
    """The streaming codes pass of amax_quant (a None) and cat_amax_quant (rows cat([a, h]))."""
    h2 = h.contiguous()
    a2 = h2 if a is None else a.contiguous()
    m, ka = h.shape[0], 0 if a is None else a.shape[1]
    k = ka + h.shape[1]
    q, scale = _buffers(m, k, fmt, h.device)
    wrap_triton(_amax_quant_kernel)[(triton.cdiv(m, AMAX_ROWS), triton.cdiv(k, AMAX_COLS))](
        a2, h2, amax.contiguous(), q, scale, m, ka, k, MODE=_MODE[fmt], BLOCK_M=AMAX_ROWS, BLOCK_K=AMAX_COLS,
        RECIPROCAL=AMAX_RECIPROCAL, HAS_LEFT=a is not None, num_warps=AMAX_WARPS)
    return q, scale


@triton_op("ditbake::row_quant", mutates_args=())
def row_quant(h: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """h [M, K] quantized per row (``quantize_rows(h, fmt)``) in one pass, whole rows in registers: for
    linear inputs no producer of ours writes (an attention output)."""
    m, k = h.shape
    kp = triton.next_power_of_2(k) if HAS_TRITON else k
    if not use_triton(h) or kp > MAX_NORM_WIDTH:
        q, scale = quantize_rows(h, fmt)
        return q, scale.reshape(-1)
    h2 = h.contiguous()
    q, scale = _buffers(m, k, fmt, h.device)
    wrap_triton(_row_quant_kernel)[(triton.cdiv(m, ROW_ROWS),)](
        h2, q, scale, m, k, MODE=_MODE[fmt], KP=kp, BLOCK_M=ROW_ROWS, num_warps=ROW_WARPS)
    return q, scale


def quantize_with_amax(h, amax, fmt: str):
    """Validated entry point for :func:`amax_quant`."""
    check_producer_args(h, fmt)
    if h.dim() != 2 or amax.dtype != torch.float32 or tuple(amax.shape) != (h.shape[0],):
        raise QuantFormatError(f"amax_quant takes h [M, K] and fp32 amax [M], got {tuple(h.shape)} and "
                               f"{amax.dtype} {tuple(amax.shape)}")
    return amax_quant(h, amax, fmt)


def quantize_cat_with_amax(a, h, amax, fmt: str):
    """Validated entry point for :func:`cat_amax_quant`."""
    check_producer_args(h, fmt)
    if (a.dim() != 2 or h.dim() != 2 or a.shape[0] != h.shape[0] or a.dtype != h.dtype
            or amax.dtype != torch.float32 or tuple(amax.shape) != (h.shape[0],)):
        raise QuantFormatError(f"cat_amax_quant takes a [M, Ka] and h [M, Kh] of one dtype and fp32 amax [M], got "
                               f"{a.dtype} {tuple(a.shape)}, {h.dtype} {tuple(h.shape)} and {amax.dtype} "
                               f"{tuple(amax.shape)}")
    return cat_amax_quant(a, h, amax, fmt)


def quantize_norm_output(x, mul, add, eps: float, fmt: str):
    """Validated entry point for :func:`norm_quant`."""
    check_producer_args(x, fmt, mul, add)
    return norm_quant(x, mul, add, eps, fmt)


def quantize_residual_norm_output(x, a, gate, mul, add, eps: float, fmt: str):
    """Validated entry point for :func:`residual_norm_quant`."""
    check_producer_args(x, fmt, mul, add)
    if a.shape != x.shape or a.dtype != x.dtype:
        raise QuantFormatError(f"residual_norm_quant: a must match x {x.dtype} {tuple(x.shape)}, got {a.dtype} "
                               f"{tuple(a.shape)}")
    b, _, d = x.shape
    if gate is not None and (gate.dtype != torch.float32 or gate.dim() != 2 or gate.shape[1] != d
                             or gate.shape[0] not in (1, b)):
        raise QuantFormatError(f"residual_norm_quant gate must be float32 [1 or {b}, {d}] or None, got {gate.dtype} "
                               f"{tuple(gate.shape)}")
    return residual_norm_quant(x, a, gate, mul, add, eps, fmt)


def quantize_gelu_output(h, fmt: str):
    """Validated entry point for :func:`gelu_quant`."""
    check_producer_args(h, fmt)
    return gelu_quant(h, fmt)


if HAS_TRITON:
    from ditbake.plugins._triton_util import round_half_even
    from ditbake.plugins.act_quant import _quantize_store, _row_scale

    @triton.jit
    def _tanh_approx(x):
        """MUFU tanh (sm_75+): |error| ~ 2^-11, below the bf16 rounding of the GELU output."""
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _gelu_tanh(v, OUT_DTYPE: tl.constexpr):
        x = v.to(tl.float32)
        t = _tanh_approx(0.7978845608028654 * (x + 0.044715 * x * x * x))  # sqrt(2/pi) (x + 0.044715 x^3)
        return (0.5 * x * (1.0 + t)).to(OUT_DTYPE).to(tl.float32)  # the composition's cast

    @triton.jit
    def _store_int8_reciprocal(v, scale, ptrs, mask):
        """INT8 codes of v / scale[:, None] by a multiply with the reciprocal and one Newton step on the
        exact remainder (FMA): the quotient rounded as IEEE division does in the normal range, so exact
        .5 ties (common when amax is one of the row's own bf16 values) round to even like the
        specification instead of falling either side."""
        inv = tl.div_rn(1.0, scale)[:, None]
        y = v * inv
        y = tl.fma(tl.fma(-y, scale[:, None], v), inv, y)
        qv = tl.minimum(tl.maximum(round_half_even(y), -127.0), 127.0)
        tl.store(ptrs, qv.to(tl.int8), mask=mask)

    @triton.jit
    def _store_row_codes(y, rows64, row_mask, q_ptr, scale_ptr, K, MODE: tl.constexpr, KP: tl.constexpr,
                         BLOCK_M: tl.constexpr, RECIPROCAL: tl.constexpr):
        """Whole rows y [BLOCK_M, KP] (columns past K zero): each row's scale from its amax, stored,
        then its codes (INT8 by the reciprocal + Newton step when RECIPROCAL)."""
        scale = _row_scale(tl.max(tl.abs(y), axis=1), MODE)
        tl.store(scale_ptr + rows64, scale, mask=row_mask)
        if RECIPROCAL and MODE == 0:
            cols = tl.arange(0, KP)
            _store_int8_reciprocal(y, scale, q_ptr + rows64[:, None] * K + cols[None, :],
                                   row_mask[:, None] & (cols[None, :] < K))
        else:
            _quantize_store(y, scale, q_ptr, q_ptr, rows64, row_mask, 0, K, MODE, KP, BLOCK_M)

    @triton.jit
    def _norm_quant_kernel(x_ptr, a_ptr, gate_ptr, h_ptr, mul_ptr, add_ptr, q_ptr, scale_ptr, S, D, eps,
                           PER_SAMPLE: tl.constexpr, GATE_PER_SAMPLE: tl.constexpr, RESIDUAL: tl.constexpr,
                           MODE: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, STEPS: tl.constexpr,
                           RECIPROCAL: tl.constexpr, STAGES: tl.constexpr):
        """STEPS blocks of BLOCK_M whole rows of one sample, each in registers: (RESIDUAL 1: x + a, 2: x + a ·
        gate, rounded to x's dtype and stored to h) statistics, normalize, modulate, round, quantize. mul / add
        (and gate) are loaded once per program; Triton's software pipeline copies the next STAGES - 1 row
        blocks to shared memory (cp.async) while the current one is reduced and stored."""
        sample = tl.program_id(1)
        cols = tl.arange(0, DP)
        col_mask = cols < D
        # mul / add loaded in the row block's own shape [BLOCK_M, DP] (each row's copy from L1): loaded as
        # [DP] they took a layout conversion through shared memory per block (40 barriers per row at 2 warps).
        # Zero past D, so y is exactly 0 there: no select before the row's amax.
        block_cols = cols[None, :] + tl.zeros([BLOCK_M, DP], tl.int32)
        mod_row = sample * D if PER_SAMPLE else 0
        mul = tl.load(mul_ptr + mod_row + block_cols, mask=block_cols < D, other=0.0)
        add = tl.load(add_ptr + mod_row + block_cols, mask=block_cols < D, other=0.0)
        if RESIDUAL == 2:
            gate = tl.load(gate_ptr + (sample * D if GATE_PER_SAMPLE else 0) + block_cols, mask=block_cols < D,
                           other=0.0)
        sample_row = sample.to(tl.int64) * S
        for i in tl.range(0, STEPS, num_stages=STAGES):
            local = (tl.program_id(0) * STEPS + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = local < S
            rows64 = sample_row + local
            mask = row_mask[:, None] & col_mask[None, :]
            offs = rows64[:, None] * D + cols[None, :]
            vf = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if RESIDUAL > 0:
                af = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if RESIDUAL == 2:
                    vf = vf + af * gate
                else:
                    vf = vf + af
                v = vf.to(h_ptr.dtype.element_ty)
                tl.store(h_ptr + offs, v, mask=mask)
                vf = v.to(tl.float32)
            mean = tl.sum(vf, axis=1) / D
            centered = vf - mean[:, None]
            # the DP - D padded columns hold 0 (centered -mean): their squares come off once per row, not
            # by a select per element
            var = (tl.sum(centered * centered, axis=1) - (DP - D) * mean * mean) / D
            normed = centered * tl.rsqrt(var + eps)[:, None]
            y = (normed * mul + add).to(x_ptr.dtype.element_ty).to(tl.float32)
            _store_row_codes(y, rows64, row_mask, q_ptr, scale_ptr, D, MODE, DP, BLOCK_M, RECIPROCAL)

    @triton.jit
    def _row_quant_kernel(h_ptr, q_ptr, scale_ptr, M, K, MODE: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr):
        """BLOCK_M whole rows: amax, scale, codes (INT8 by the reciprocal + Newton step)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, KP)
        mask = row_mask[:, None] & (cols[None, :] < K)
        v = tl.load(h_ptr + rows64[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        _store_row_codes(v, rows64, row_mask, q_ptr, scale_ptr, K, MODE, KP, BLOCK_M, True)

    @triton.jit
    def _gelu_chunk(h_ptr, rows64, row_mask, k0, K, CHUNK: tl.constexpr):
        cols = k0 + tl.arange(0, CHUNK)
        mask = row_mask[:, None] & (cols[None, :] < K)
        v = tl.load(h_ptr + rows64[:, None] * K + cols[None, :], mask=mask, other=0.0)
        return tl.where(mask, _gelu_tanh(v, h_ptr.dtype.element_ty), 0.0)

    @triton.jit
    def _gelu_quant_row_kernel(h_ptr, q_ptr, scale_ptr, M, K, MODE: tl.constexpr, KP: tl.constexpr,
                               BLOCK_M: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        y = _gelu_chunk(h_ptr, rows64, row_mask, 0, K, KP)  # the whole (padded) row as one chunk
        _store_row_codes(y, rows64, row_mask, q_ptr, scale_ptr, K, MODE, KP, BLOCK_M, False)

    @triton.jit
    def _gelu_quant_kernel(h_ptr, q_ptr, scale_ptr, M, K, MODE: tl.constexpr, CHUNK: tl.constexpr,
                           BLOCK_M: tl.constexpr):
        """Two passes over BLOCK_M rows: GELU + amax, then GELU again (rows now in L2) + quantize."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, CHUNK):
            amax = tl.maximum(amax, tl.max(tl.abs(_gelu_chunk(h_ptr, rows64, row_mask, k0, K, CHUNK)), axis=1))
        scale = _row_scale(amax, MODE)
        tl.store(scale_ptr + rows64, scale, mask=row_mask)
        for k0 in range(0, K, CHUNK):
            y = _gelu_chunk(h_ptr, rows64, row_mask, k0, K, CHUNK)
            _quantize_store(y, scale, q_ptr, q_ptr, rows64, row_mask, k0, K, MODE, CHUNK, BLOCK_M)

    @triton.jit
    def _amax_quant_kernel(a_ptr, h_ptr, amax_ptr, q_ptr, scale_ptr, M, KA, K, MODE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RECIPROCAL: tl.constexpr,
                           HAS_LEFT: tl.constexpr):
        """One [BLOCK_M, BLOCK_K] tile of the rows' codes: the scales from their given amax, then codes.
        K is the codes' width; with HAS_LEFT the row is cat([a (KA wide), h (K - KA wide)]), else h."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        k0 = tl.program_id(1) * BLOCK_K
        scale = _row_scale(tl.load(amax_ptr + rows64, mask=row_mask, other=0.0), MODE)
        if tl.program_id(1) == 0:
            tl.store(scale_ptr + rows64, scale, mask=row_mask)
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols[None, :] < K)
        if HAS_LEFT:
            left = cols[None, :] < KA
            v = tl.load(a_ptr + rows64[:, None] * KA + cols[None, :], mask=mask & left, other=0.0).to(tl.float32)
            w = tl.load(h_ptr + rows64[:, None] * (K - KA) + (cols[None, :] - KA), mask=mask & (~left),
                        other=0.0).to(tl.float32)
            v = tl.where(left, v, w)
        else:
            v = tl.load(h_ptr + rows64[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if RECIPROCAL and MODE == 0:
            _store_int8_reciprocal(v, scale, q_ptr + rows64[:, None] * K + cols[None, :], mask)
        else:
            _quantize_store(v, scale, q_ptr, q_ptr, rows64, row_mask, k0, K, MODE, BLOCK_K, BLOCK_M)
