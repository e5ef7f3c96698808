"""8-bit head-wise attention (SageAttention-style numerics) with the head schemes of head_attention.

One module holds:
  * the PyTorch reference ``attention_8bit_ref`` -- the numeric specification (fp32 quantization,
    fp64 attention over the quantized values; runs anywhere);
  * the Triton "prepare" kernels (K smoothing statistics, V channel maxima, quantization of q, k, v)
    and the attention kernel: one launch per call whatever the per-head mix, with the same per-head
    scheme table [H, 3] = (kind, w_left, w_right) and block skipping as ``head_attention``;
  * the ``ditbake::attention_8bit`` op (``torch.library.triton_op``; off CUDA it calls the reference
    through the opaque ``ditbake::attention_8bit_reference`` op);
  * ``attention_8bit_error``: per-head relative squared error against fp32 attention (calibration).

Numerics (the specification; all quantization arithmetic in IEEE fp32):
  0. Rotation (head dims that are powers of two): q and k are multiplied by the +-1 Sylvester
     Hadamard matrix H (H H^T = D I; sums exact in fp64, rounded once to fp32). Scores are
     unchanged, (qH)(kH)^T / D = q k^T, but outlier channels are spread over all channels: with
     q and k sharing a few x10 channels, the INT8 QK error drops from 5.1% to 1.4% (notes).
  1. K smoothing: k' = kH - mean over the tokens of kH, per (batch, head, channel). Exact for
     softmax: it adds the same constant to every score of a query row, and masks keep it per row.
     V smoothing: v' = v - mean over the tokens of v, per (batch, head, channel), added back to the
     output (the softmax weights sum to 1); only v' is rounded, so an offset passes exactly.
  2. Q and K' are quantized symmetrically per (batch, head, block of QUANT_BLOCK_Q query tokens /
     QUANT_BLOCK_K key tokens): amax over the block (floored at AMAX_FLOOR), code =
     clamp(round_half_even(x * (QMAX / amax)), -QMAX, QMAX), scale = amax / QMAX, with QMAX = 127
     for INT8 and 448 for FP8 E4M3 (round to nearest even by the cast). Q's scale also carries the
     softmax scale, log2(e) and the rotation's 1/D: q_scale = (amax / QMAX) * (scale * log2 e / D).
  3. Scores in the log2 domain: s = (q8 . k8) * q_scale * k_scale (integer-exact dot for INT8).
  4. Softmax in fp32 on exp2: p = exp2(s - m + log2 448) = 448 * exp2(s - m) in [0, 448], m the row
     max over allowed keys; P is rounded to FP8 E4M3 (fixed scale 448: the full E4M3 range);
     v' is quantized to E4M3 per (batch, head, channel) with scale amax over tokens of |v'| / 448.
  5. out = (sum_j fp8(p_j) v8_j) * (v_amax / 448) / l + v_mean, with l = sum_j p_j over the fp32
     p, not the rounded one: free in the kernel (the sum runs on the fp32 values already in
     registers; summing the FP8 values would cost a conversion back per element); RTNE rounding
     of p is unbiased, so its errors average out in the numerator, and V smoothing passes the
     coherent part of the output exactly whichever l is used (measured in the notes).
The kernel computes step 4 online (running max, as FlashAttention), so it rounds
448 * exp2(s - m_running) instead of 448 * exp2(s - m): the same format and scale, different
rounding points; and its INT8 score leaves the integer domain through one FMA (<= 0.75 code units
of rounding). Tests compare kernel and reference within that FP8 slack.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from ditbake.plugins.hadamard import hadamard_sign_matrix
from ditbake.plugins.head_attention import (HeadAttentionError, HeadKind, SchemesLike, _check_qkv,
                                            _visual_range, arrow_allowed, head_attention_ref,
                                            normalize_text_range, schemes_to_tensor)

try:  # Triton is optional: CPU machines (and CI) run the reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    HAS_TRITON = False

QK_FORMATS = ("int8", "fp8")
QUANT_BLOCK_Q = 128   # query tokens per Q scale (SageAttention: per thread block of queries)
# key tokens per K scale: 128 lets the dense kernel (attention_8bit_dense) read one K scale per
# 128-key tile and rescale its accumulator once per 128 keys (8.1 vs 8.9 ms at Wan's shape on the H200);
# the error is unchanged (3.07e-2 vs 3.06e-2 on the peaky benchmark inputs, attention_8bit_dense_h200.json)
QUANT_BLOCK_K = 128
FP8_MAX = 448.0       # largest finite E4M3 value
LOG2E = 1.4426950408889634
LOG2_FP8_MAX = math.log2(FP8_MAX)
AMAX_FLOOR = 1e-12    # an all-zero block gets a tiny positive scale instead of 0/0
SEQ_PAD = 128         # quantized buffers are zero-padded to a multiple of this, plus one block more
_QMAX = {"int8": 127.0, "fp8": FP8_MAX}
_QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


class Quantized(NamedTuple):
    """q/k/v after the prepare step. Shapes: q8, k8 [B, H, S, D]; q_scale [B, H, ceil(S/128)]
    (softmax scale * log2 e included); k_scale [B, H, ceil(S/128)]; v8 [B, H, S, D] E4M3;
    v_amax [B, H, D] (amax of |v - v_mean|; V's scale is v_amax / 448); v_mean, k_mean [B, H, D]
    (k_mean of the rotated k). The GPU buffers hold
    padded_len(S) tokens, zeros past S."""
    q8: torch.Tensor
    q_scale: torch.Tensor
    k8: torch.Tensor
    k_scale: torch.Tensor
    v8: torch.Tensor
    v_amax: torch.Tensor
    v_mean: torch.Tensor
    k_mean: torch.Tensor


def _check_format(qk_format: str) -> None:
    if qk_format not in QK_FORMATS:
        raise HeadAttentionError(f"unknown qk_format {qk_format!r}; use one of {QK_FORMATS}")


def _resolve_scale(scale: Optional[float], head_dim: int) -> float:
    if scale is not None and not scale > 0:
        raise HeadAttentionError(f"scale must be a positive float, got {scale}")
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


# --------------------------------------------------------------------------------------------
# Reference (the specification)
# --------------------------------------------------------------------------------------------

def _quantize_blocks(x: torch.Tensor, block: int, qk_format: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """x fp32 [B, H, S, D] -> (codes [B, H, S, D], amax / QMAX [B, H, nblocks]) per token block."""
    batch, heads, seq_len, head_dim = x.shape
    nblocks = -(-seq_len // block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, nblocks * block - seq_len))
    amax = padded.abs().reshape(batch, heads, nblocks, block * head_dim).amax(-1).clamp_min(AMAX_FLOOR)
    qmax = _QMAX[qk_format]
    inv = (qmax / amax).repeat_interleave(block, dim=-1)[..., :seq_len, None]
    y = x * inv
    if qk_format == "int8":
        codes = torch.round(y).clamp(-127, 127).to(torch.int8)
    else:
        codes = y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, amax / qmax


def rotates(head_dim: int) -> bool:
    """Whether q and k are Hadamard-rotated before quantization (step 0): D a power of two."""
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0


def rotate_ref(x: torch.Tensor) -> torch.Tensor:
    """x @ H with the +-1 Sylvester matrix: sums exact in fp64, rounded once to fp32."""
    return (x.double() @ hadamard_sign_matrix(x.shape[-1], torch.float64, x.device)).float()


def quantize_qkv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                     qk_format: str = "int8") -> Quantized:
    """Steps 0-2 of the specification and V's channel quantization, in fp32. ``k_mean`` is the
    mean of the rotated k."""
    _check_format(qk_format)
    head_dim = q.shape[-1]
    scale = _resolve_scale(scale, head_dim)
    rotate = rotates(head_dim)
    qf, kf = (rotate_ref(q), rotate_ref(k)) if rotate else (q.float(), k.float())
    vf = v.float()
    k_mean = kf.mean(dim=2)
    q8, q_amax = _quantize_blocks(qf, QUANT_BLOCK_Q, qk_format)
    k8, k_scale = _quantize_blocks(kf - k_mean[:, :, None], QUANT_BLOCK_K, qk_format)
    q_scale = q_amax * torch.tensor(scale * LOG2E / (head_dim if rotate else 1), dtype=torch.float32)
    v_mean = vf.mean(dim=2)
    vs = vf - v_mean[:, :, None]
    v_amax = vs.abs().amax(dim=2).clamp_min(AMAX_FLOOR)
    v8 = (vs * (FP8_MAX / v_amax)[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Quantized(q8, q_scale, k8, k_scale, v8, v_amax, v_mean, k_mean)


def attention_8bit_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schemes: SchemesLike,
                       text_range: Tuple[int, int], cached: Optional[torch.Tensor] = None,
                       scale: Optional[float] = None, qk_format: str = "int8",
                       query_chunk: int = 1024) -> torch.Tensor:
    """8-bit head-wise attention, the numeric specification. q, k, v: [B, H, S, D] -> [B, H, S, D]
    in q's dtype. Masks and head kinds as ``head_attention_ref``; numerics in the module docstring."""
    table = schemes_to_tensor(schemes)
    _check_qkv(q, k, v, table.shape[0], cached)
    _check_format(qk_format)
    seq_len = q.shape[2]
    text_start, text_end = normalize_text_range(text_range, seq_len)
    if HeadKind.CACHED in table[:, 0].tolist() and cached is None:
        raise HeadAttentionError("a head is CACHED but no cached output was given; pass cached=[B, H, S, D]")
    qz = quantize_qkv_ref(q, k, v, scale, qk_format)
    q_scale = qz.q_scale.double().repeat_interleave(QUANT_BLOCK_Q, dim=-1)[..., :seq_len]
    k_scale = qz.k_scale.double().repeat_interleave(QUANT_BLOCK_K, dim=-1)[..., :seq_len]
    out = torch.empty_like(q)
    key_idx = torch.arange(seq_len, device=q.device)
    for h, (kind, w_left, w_right) in enumerate(table.tolist()):
        if kind == HeadKind.CACHED:
            out[:, h] = cached[:, h]
            continue
        # 8-bit codes are exact in fp64 and so are their dot products (<= 2**53).
        q8, k8t, v8 = qz.q8[:, h].double(), qz.k8[:, h].double().transpose(-1, -2), qz.v8[:, h].double()
        for row0 in range(0, seq_len, query_chunk):
            row1 = min(row0 + query_chunk, seq_len)
            s = (q8[:, row0:row1] @ k8t) * q_scale[:, h, row0:row1, None] * k_scale[:, h, None, :]
            if kind == HeadKind.ARROW:
                query_idx = torch.arange(row0, row1, device=q.device)[:, None]
                allowed = arrow_allowed(query_idx, key_idx[None, :], w_left, w_right, text_start, text_end)
                s = s.masked_fill(~allowed, float("-inf"))
            m = s.amax(dim=-1, keepdim=True)
            p = torch.exp2(s - m + LOG2_FP8_MAX).float()          # fp32 P~ * 448, in [0, 448]
            p8 = p.to(torch.float8_e4m3fn).double()
            l = p.double().sum(dim=-1, keepdim=True)
            o = (p8 @ v8) * (qz.v_amax[:, h, None, :] / FP8_MAX).double() / l + qz.v_mean[:, h, None, :].double()
            out[:, h, row0:row1] = o.to(q.dtype)
    return out


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

# Launch parameters of the attention kernel per head dim. BLOCK_M must divide QUANT_BLOCK_Q (one
# q scale per program) and BLOCK_N must divide SEQ_PAD; K scales are read per key column, so
# BLOCK_N need not match QUANT_BLOCK_K. 4 warps at BLOCK_M=128, D=128 spill registers (sm_90
# compile, benchmarks/compile_attention_8bit.py). Defaults until bench_attention_8bit.py picks.
KERNEL_CONFIGS = {
    32: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),  # the 16k test bed (untuned)
    64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    # measured best at Wan's 1 x 12 x 32,760 x 128 (attention_8bit_h100.log, 64 keys per K scale): 12.7 ms vs
    # 14.4 at N=64, s=3; 12.8-13.0 ms with 128 keys per K scale (attention_8bit_dense_*_h200.json, "plain").
    # Full heads run attention_8bit_dense instead (8.3 ms).
    128: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4),
}
# The V layout for the FP8 P.V dot: Hopper's FP8 wgmma wants its B operand K-major (tokens
# contiguous), so the prepare kernel can write V as [B, H, D, S_pad]. Picked by the benchmark.
V_TRANSPOSED = True
# Launch shape of the prepare kernels (statistics: tokens per program, rows per load, warps, k and v
# in separate programs, element-wise accumulation reduced once; quantization: q, k and v in separate
# programs, warps). They move 0.65 GB per call at Wan's shape; measured on the H200
# (prepare_8bit_h200.json): 285 us for this shape (statistics 73 us, quantization 199 us) vs 497 us for
# the first one (512 tokens x 64 rows per-tile reductions, 8-warp unsplit quantization); a copy of the
# same bytes takes 162 us.
PREPARE_CONFIG = dict(stats_chunk=256, stats_rows=16, stats_warps=2, stats_split=True, stats_reduce_once=True,
                      quant_split=True, quant_warps=4)

if HAS_TRITON:
    from ditbake.plugins._triton_util import round_half_even

    @triton.jit
    def _kv_stats_kernel(K, V, PSUM, PVSUM, PVMAX, PVMIN,
                         stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                         num_heads, seq_len, num_chunks,
                         HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
                         REDUCE_ONCE: tl.constexpr):
        """Partial per-channel sums of k and v and max/min of v over CHUNK tokens -> [B*H, chunks, D].
        SPLIT: k and v in separate programs (grid axis 2), twice the programs in flight. REDUCE_ONCE:
        accumulate [ROWS, D] tiles element-wise and reduce across rows once at the end, instead of a
        cross-thread reduction per tile (the reductions, not the loads, bounded the per-tile form)."""
        chunk = tl.program_id(0)
        pid_bh = tl.program_id(1)
        part = tl.program_id(2)
        batch = (pid_bh // num_heads).to(tl.int64)
        head = (pid_bh % num_heads).to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM)
        out = pid_bh.to(tl.int64) * num_chunks * HEAD_DIM + chunk * HEAD_DIM + offs_d
        if (part == 0) | (not SPLIT):
            k_base = K + batch * stride_kb + head * stride_kh
            if REDUCE_ONCE:
                kacc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
            else:
                ksum = tl.zeros([HEAD_DIM], dtype=tl.float32)
            for r in tl.static_range(0, CHUNK, ROWS):
                rows = chunk * CHUNK + r + tl.arange(0, ROWS)
                ok = (rows < seq_len)[:, None]
                kt = tl.load(k_base + rows[:, None] * stride_ks + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
                if REDUCE_ONCE:
                    kacc += kt
                else:
                    ksum += tl.sum(kt, 0)
            if REDUCE_ONCE:
                ksum = tl.sum(kacc, 0)
            tl.store(PSUM + out, ksum)
        if (part == 1) | (not SPLIT):
            v_base = V + batch * stride_vb + head * stride_vh
            if REDUCE_ONCE:
                vacc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
                vmax_acc = tl.full([ROWS, HEAD_DIM], float("-inf"), dtype=tl.float32)
                vmin_acc = tl.full([ROWS, HEAD_DIM], float("inf"), dtype=tl.float32)
            else:
                vsum = tl.zeros([HEAD_DIM], dtype=tl.float32)
                vmax = tl.full([HEAD_DIM], float("-inf"), dtype=tl.float32)
                vmin = tl.full([HEAD_DIM], float("inf"), dtype=tl.float32)
            for r in tl.static_range(0, CHUNK, ROWS):
                rows = chunk * CHUNK + r + tl.arange(0, ROWS)
                ok = (rows < seq_len)[:, None]
                vt = tl.load(v_base + rows[:, None] * stride_vs + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
                if REDUCE_ONCE:
                    vacc += vt
                    vmax_acc = tl.maximum(vmax_acc, tl.where(ok, vt, float("-inf")))
                    vmin_acc = tl.minimum(vmin_acc, tl.where(ok, vt, float("inf")))
                else:
                    vsum += tl.sum(vt, 0)
                    vmax = tl.maximum(vmax, tl.max(tl.where(ok, vt, float("-inf")), 0))
                    vmin = tl.minimum(vmin, tl.min(tl.where(ok, vt, float("inf")), 0))
            if REDUCE_ONCE:
                vsum = tl.sum(vacc, 0)
                vmax = tl.max(vmax_acc, 0)
                vmin = tl.min(vmin_acc, 0)
            tl.store(PVSUM + out, vsum)
            tl.store(PVMAX + out, vmax)
            tl.store(PVMIN + out, vmin)

    @triton.jit
    def _hadamard_signs(HEAD_DIM: tl.constexpr):
        """The +-1 Sylvester matrix [D, D] in fp32: H[i, j] = (-1)^popcount(i & j)."""
        both = tl.arange(0, HEAD_DIM)[:, None] & tl.arange(0, HEAD_DIM)[None, :]
        parity = both ^ (both >> 8)  # D <= 256: fold 9 bits down to 1
        parity = parity ^ (parity >> 4)
        parity = parity ^ (parity >> 2)
        parity = parity ^ (parity >> 1)
        return 1.0 - 2.0 * (parity & 1).to(tl.float32)

    @triton.jit
    def _rotate(x, signs):
        """x @ H on the tensor cores: the +-1 entries are exact in x's dtype, sums in fp32."""
        if x.dtype == tl.float32:  # tests and the interpreter; never tf32, which would round x
            y = tl.dot(x, signs, input_precision="ieee")
        else:
            y = tl.dot(x, signs.to(x.dtype))
        return y

    @triton.jit
    def _kv_finalize_kernel(PSUM, PVSUM, PVMAX, PVMIN, KMEAN, VMEAN, VAMAX, seq_len, num_chunks,
                            HEAD_DIM: tl.constexpr, CHUNKS_P2: tl.constexpr, ROTATE: tl.constexpr):
        """Means of (rotated) k and of v, and max |v - mean| (floored), per (batch*head, channel),
        from the partials: mean(k H) = mean(k) H, so the statistics pass sums unrotated k; and
        max |v - mean| = max(vmax - mean, mean - vmin), the same fp32 subtraction as per element."""
        pid_bh = tl.program_id(0).to(tl.int64)
        offs_c = tl.arange(0, CHUNKS_P2)
        offs_d = tl.arange(0, HEAD_DIM)
        ptrs = pid_bh * num_chunks * HEAD_DIM + offs_c[:, None] * HEAD_DIM + offs_d[None, :]
        ok = (offs_c < num_chunks)[:, None]
        ksum = tl.sum(tl.load(PSUM + ptrs, mask=ok, other=0.0), 0)
        v_mean = tl.sum(tl.load(PVSUM + ptrs, mask=ok, other=0.0), 0) / seq_len
        vmax = tl.max(tl.load(PVMAX + ptrs, mask=ok, other=float("-inf")), 0)
        vmin = tl.min(tl.load(PVMIN + ptrs, mask=ok, other=float("inf")), 0)
        k_mean = ksum / seq_len
        if ROTATE:
            k_mean = tl.sum(k_mean[:, None] * _hadamard_signs(HEAD_DIM), 0)
        tl.store(KMEAN + pid_bh * HEAD_DIM + offs_d, k_mean)
        tl.store(VMEAN + pid_bh * HEAD_DIM + offs_d, v_mean)
        tl.store(VAMAX + pid_bh * HEAD_DIM + offs_d, tl.maximum(tl.maximum(vmax - v_mean, v_mean - vmin), 1e-12))

    @triton.jit
    def _quantize_tile(x, QMAX: tl.constexpr, IS_INT8: tl.constexpr):
        """Symmetric quantization of one tile: (codes, amax / QMAX)."""
        amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-12)
        y = x * tl.math.div_rn(amax * 0.0 + QMAX, amax)  # IEEE division, as the reference
        if IS_INT8:
            codes = tl.minimum(tl.maximum(round_half_even(y), -127.0), 127.0).to(tl.int8)
        else:
            codes = tl.minimum(tl.maximum(y, -448.0), 448.0).to(tl.float8e4nv)
        return codes, tl.math.div_rn(amax, amax * 0.0 + QMAX)

    @triton.jit
    def _quantize_kernel(Q, K, V, KMEAN, VMEAN, VAMAX, Q8, K8, V8, QS, KS,
                         stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                         stride_vb, stride_vh, stride_vs,
                         stride_v8h, stride_v8s, stride_v8d,
                         num_heads, seq_len, seq_pad, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                         IS_INT8: tl.constexpr, QMAX: tl.constexpr, ROTATE: tl.constexpr, SPLIT: tl.constexpr):
        """One BLOCK_Q-token block of one (batch, head): rotated q, rotated smoothed k and v to 8
        bits, zeros past the sequence. Q8/K8 are [B*H, seq_pad, D]; V8 has strides (head, token,
        channel). SPLIT: q, k and v in separate programs (grid axis 2)."""
        blk = tl.program_id(0)
        pid_bh = tl.program_id(1)
        part = tl.program_id(2)
        batch = (pid_bh // num_heads).to(tl.int64)
        head = (pid_bh % num_heads).to(tl.int64)
        bh = pid_bh.to(tl.int64)
        qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
        offs_d = tl.arange(0, HEAD_DIM)
        rows = blk * BLOCK_Q + tl.arange(0, BLOCK_Q)
        ok = (rows < seq_len)[:, None]

        if (part == 0) | (not SPLIT):
            q = tl.load(Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                        mask=ok, other=0.0)
            if ROTATE:
                q = _rotate(q, _hadamard_signs(HEAD_DIM))
            else:
                q = q.to(tl.float32)
            q8, q_amax_scaled = _quantize_tile(q, QMAX, IS_INT8)
            tl.store(Q8 + bh * seq_pad * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :], q8)
            tl.store(QS + bh * (seq_pad // BLOCK_Q) + blk, q_amax_scaled * qk_scale)

        if (part == 1) | (not SPLIT):
            k_mean = tl.load(KMEAN + bh * HEAD_DIM + offs_d)
            for sub in tl.static_range(0, BLOCK_Q, BLOCK_K):
                krows = blk * BLOCK_Q + sub + tl.arange(0, BLOCK_K)
                kok = (krows < seq_len)[:, None]
                kt = tl.load(K + batch * stride_kb + head * stride_kh + krows[:, None] * stride_ks + offs_d[None, :],
                             mask=kok, other=0.0)
                if ROTATE:
                    kt = _rotate(kt, _hadamard_signs(HEAD_DIM))
                else:
                    kt = kt.to(tl.float32)
                kt = tl.where(kok, kt - k_mean[None, :], 0.0)
                k8, k_scale = _quantize_tile(kt, QMAX, IS_INT8)
                tl.store(K8 + bh * seq_pad * HEAD_DIM + krows[:, None] * HEAD_DIM + offs_d[None, :], k8)
                tl.store(KS + bh * (seq_pad // BLOCK_K) + (blk * BLOCK_Q + sub) // BLOCK_K, k_scale)

        if (part == 2) | (not SPLIT):
            v = tl.load(V + batch * stride_vb + head * stride_vh + rows[:, None] * stride_vs + offs_d[None, :],
                        mask=ok, other=0.0).to(tl.float32)
            v_amax = tl.load(VAMAX + bh * HEAD_DIM + offs_d)
            v_inv = tl.math.div_rn(tl.full([HEAD_DIM], 448.0, tl.float32), v_amax)
            v = tl.where(ok, v - tl.load(VMEAN + bh * HEAD_DIM + offs_d)[None, :], 0.0)
            v8 = tl.minimum(tl.maximum(v * v_inv[None, :], -448.0), 448.0).to(tl.float8e4nv)
            tl.store(V8 + bh * stride_v8h + rows[:, None] * stride_v8s + offs_d[None, :] * stride_v8d, v8)

    @triton.jit
    def _attend_block_8bit(acc, m_i, l_i, q, q_scale, k_base, ks_base, v_base, stride_vs, stride_vd, start_n,
                           offs_m, offs_n, offs_d, seq_len, text_start, text_end, vis_start, vis_end,
                           w_left, w_right, MASK: tl.constexpr, IS_INT8: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        cols = start_n + offs_n
        # Buffers are zero-padded to SEQ_PAD tokens: no load masks; scores past seq_len are masked.
        k = tl.load(k_base + cols[:, None] * HEAD_DIM + offs_d[None, :])
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd)
        # One scale per key column: the block's q scale (uniform: BLOCK_M divides BLOCK_Q) times the
        # key's block scale; the score in the log2 domain is then one multiply(-add) per element.
        col_scale = tl.load(ks_base + cols // BLOCK_K) * q_scale
        if IS_INT8:
            qk_i = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
            # int32 -> fp32 without the slow I2F (a quarter-rate conversion unit): |qk| <= D * 127**2
            # < 2**22 for D <= 256, so adding the bits of 1.5 * 2**23 gives the fp32 1.5 * 2**23 + qk
            # exactly; the offset comes off in the same FMA as the scale (within 1 ulp of 2**23 * scale,
            # far below one code step of the scores).
            qk = tl.fma((qk_i + 0x4B400000).to(tl.float32, bitcast=True), col_scale[None, :],
                        -(12582912.0 * col_scale)[None, :])
        else:
            qk = tl.dot(q, tl.trans(k)) * col_scale[None, :]
        if MASK == 1:
            key_text = (cols >= text_start) & (cols < text_end)
            qk = tl.where(key_text[None, :], qk, float("-inf"))
        elif MASK == 2:
            offset = cols[None, :] - offs_m[:, None]
            key_visual = (cols >= vis_start) & (cols < vis_end)
            allowed = (offset >= -w_left) & (offset <= w_right) & key_visual[None, :]
            qk = tl.where(allowed, qk, float("-inf"))
        elif MASK == 3:
            offset = cols[None, :] - offs_m[:, None]
            row_text = (offs_m >= text_start) & (offs_m < text_end)
            key_text = (cols >= text_start) & (cols < text_end)
            allowed = (offset >= -w_left) & (offset <= w_right)
            allowed = (allowed | row_text[:, None] | key_text[None, :]) & (cols < seq_len)[None, :]
            qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # p = 448 * exp2(s - m): log2(448) folded into the per-row offset (P's fixed FP8 scale).
        p = tl.math.exp2(qk - (m_new - 8.807354922057604)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        # The FP8 wgmma adds with ~14-bit alignment inside its accumulator, but this dot starts from
        # zero each block (acc * alpha + P.V is fp32 FMAs, checked in the TTGIR): the imprecise
        # part spans only BLOCK_N keys.
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v)
        return acc, m_new, l_i

    @triton.jit
    def _attention_8bit_kernel(Q8, K8, V8, QS, KS, VA, VM, C, O, SCHEMES,
                               stride_v8h, stride_v8s, stride_v8d, stride_cb, stride_ch, stride_cs,
                               stride_ob, stride_oh, stride_os,
                               num_heads, seq_len, seq_pad, text_start, text_end, vis_start, vis_end,
                               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, IS_INT8: tl.constexpr,
                               HAS_CACHE: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        batch = (pid_bh // num_heads).to(tl.int64)
        head = pid_bh % num_heads
        bh = pid_bh.to(tl.int64)
        kind = tl.load(SCHEMES + head * 3)
        if not HAS_CACHE:
            kind = tl.where(kind == 2, 0, kind)  # no cache given: compute the head in full
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < seq_len
        o_ptrs = O + batch * stride_ob + head.to(tl.int64) * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]

        if kind == 2:
            c_ptrs = (C + batch * stride_cb + head.to(tl.int64) * stride_ch + offs_m[:, None] * stride_cs
                      + offs_d[None, :])
            tl.store(o_ptrs, tl.load(c_ptrs, mask=row_ok[:, None]), mask=row_ok[:, None])
        else:
            # Block ranges exactly as in head_attention's kernel (see its comments).
            is_arrow = kind == 1
            w_left = tl.where(is_arrow, tl.minimum(tl.maximum(tl.load(SCHEMES + head * 3 + 1), 0), seq_len), seq_len)
            w_right = tl.where(is_arrow, tl.minimum(tl.maximum(tl.load(SCHEMES + head * 3 + 2), 0), seq_len), seq_len)
            row_lo = pid_m * BLOCK_M
            row_hi = tl.minimum(row_lo + BLOCK_M, seq_len) - 1
            rows_visual = (row_lo >= text_end) | (row_hi < text_start)
            rows_text = (row_lo >= text_start) & (row_hi < text_end)
            banded = is_arrow & rows_visual
            full_rows = (kind != 1) | rows_text
            mixed_rows = is_arrow & (rows_visual == 0) & (rows_text == 0)

            # Unlike head_attention, the band's blocks start on multiples of BLOCK_N (the lead block
            # masks what lies before the band): the compiler then proves the loads of the
            # token-contiguous V 16-byte aligned and vectorizes/pipelines them. (The text loops start
            # at text_start: aligned when it is a multiple of 16, as Triton specializes such ints.)
            band_lo = (tl.maximum(vis_start, row_lo - w_left) // BLOCK_N) * BLOCK_N
            band_hi = tl.maximum(tl.minimum(vis_end, row_hi + w_right + 1), band_lo)
            num_band_blocks = (band_hi - band_lo + BLOCK_N - 1) // BLOCK_N
            interior_lo = tl.maximum(row_hi - w_left, vis_start)
            first_interior = tl.minimum((tl.maximum(interior_lo - band_lo, 0) + BLOCK_N - 1) // BLOCK_N,
                                        num_band_blocks)
            end_interior = tl.maximum(tl.minimum(row_lo + w_right + 1, vis_end) - band_lo, 0) // BLOCK_N
            end_interior = tl.minimum(tl.maximum(end_interior, first_interior), num_band_blocks)

            seq_floor = (seq_len // BLOCK_N) * BLOCK_N
            text_floor = text_start + ((text_end - text_start) // BLOCK_N) * BLOCK_N
            text_plain_hi = tl.where(banded, text_floor, text_start)
            text_tail_hi = tl.where(banded, text_end, text_floor)
            lead_hi = tl.where(banded, band_lo + first_interior * BLOCK_N, band_lo)
            plain_lo = tl.where(banded, band_lo + first_interior * BLOCK_N, 0)
            plain_hi = tl.where(banded, band_lo + end_interior * BLOCK_N, tl.where(full_rows, seq_floor, 0))
            trail_lo = band_lo + end_interior * BLOCK_N
            trail_hi = tl.where(banded, band_hi, trail_lo)
            rule_lo = tl.where(mixed_rows, 0, seq_floor)
            rule_hi = tl.where(banded, rule_lo, seq_len)

            q = tl.load(Q8 + bh * seq_pad * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
            q_scale = tl.load(QS + bh * (seq_pad // BLOCK_Q) + (pid_m * BLOCK_M) // BLOCK_Q)
            k_base = K8 + bh * seq_pad * HEAD_DIM
            ks_base = KS + bh * (seq_pad // BLOCK_K)
            v_base = V8 + bh * stride_v8h
            m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

            for start_n in range(text_start, text_plain_hi, BLOCK_N):
                acc, m_i, l_i = _attend_block_8bit(acc, m_i, l_i, q, q_scale, k_base, ks_base, v_base,
                                                   stride_v8s, stride_v8d, start_n, offs_m, offs_n, offs_d,
                                                   seq_len, text_start, text_end, vis_start, vis_end,
                                                   w_left, w_right, 0, IS_INT8, HEAD_DIM, BLOCK_K)
            for start_n in range(text_floor, text_tail_hi, BLOCK_N):
                acc, m_i, l_i = _attend_block_8bit(acc, m_i, l_i, q, q_scale, k_base, ks_base, v_base,
                                                   stride_v8s, stride_v8d, start_n, offs_m, offs_n, offs_d,
                                                   seq_len, text_start, text_end, vis_start, vis_end,
                                                   w_left, w_right, 1, IS_INT8, HEAD_DIM, BLOCK_K)
            for start_n in range(band_lo, lead_hi, BLOCK_N):
                acc, m_i, l_i = _attend_block_8bit(acc, m_i, l_i, q, q_scale, k_base, ks_base, v_base,
                                                   stride_v8s, stride_v8d, start_n, offs_m, offs_n, offs_d,
                                                   seq_len, text_start, text_end, vis_start, vis_end,
                                                   w_left, w_right, 2, IS_INT8, HEAD_DIM, BLOCK_K)
            for start_n in range(plain_lo, plain_hi, BLOCK_N):
                acc, m_i, l_i = _attend_block_8bit(acc, m_i, l_i, q, q_scale, k_base, ks_base, v_base,
                                                   stride_v8s, stride_v8d, start_n, offs_m, offs_n, offs_d,
                                                   seq_len, text_start, text_end, vis_start, vis_end,
                                                   w_left, w_right, 0, IS_INT8, HEAD_DIM, BLOCK_K)
            for start_n in range(trail_lo, trail_hi, BLOCK_N):
                acc, m_i, l_i = _attend_block_8bit(acc, m_i, l_i, q, q_scale, k_base, ks_base, v_base,
                                                   stride_v8s, stride_v8d, start_n, offs_m, offs_n, offs_d,
                                                   seq_len, text_start, text_end, vis_start, vis_end,
                                                   w_left, w_right, 2, IS_INT8, HEAD_DIM, BLOCK_K)
            for start_n in range(rule_lo, rule_hi, BLOCK_N):
                acc, m_i, l_i = _attend_block_8bit(acc, m_i, l_i, q, q_scale, k_base, ks_base, v_base,
                                                   stride_v8s, stride_v8d, start_n, offs_m, offs_n, offs_d,
                                                   seq_len, text_start, text_end, vis_start, vis_end,
                                                   w_left, w_right, 3, IS_INT8, HEAD_DIM, BLOCK_K)

            l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows past the sequence end
            v_scale = tl.load(VA + bh * HEAD_DIM + offs_d) * (1.0 / 448.0)
            out = acc * v_scale[None, :] / l_i[:, None] + tl.load(VM + bh * HEAD_DIM + offs_d)[None, :]
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


def padded_len(seq_len: int) -> int:
    """Tokens in the quantized buffers: a multiple of SEQ_PAD, with at least one block of zeros
    past the sequence so that key blocks starting anywhere before seq_len load without masks."""
    return (-(-seq_len // SEQ_PAD) + 1) * SEQ_PAD


def prepare_8bit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float], qk_format: str,
                 v_transposed: Optional[bool] = None, runner=None, config: Optional[dict] = None) -> Quantized:
    """Run the prepare kernels: returns padded buffers (q8, k8 [B, H, S_pad, D]; v8 [B, H, S_pad, D]
    as a view, stored [B, H, D, S_pad] when ``v_transposed``; scales as in ``Quantized``, padded).
    ``config`` overrides keys of PREPARE_CONFIG: the split options and the quantization's warps give the
    same bits; the statistics' chunk, rows and warps sum the means in another fp32 order (ulps)."""
    unknown = set(config or {}) - set(PREPARE_CONFIG)
    if unknown:
        raise HeadAttentionError(f"unknown prepare config keys {sorted(unknown)}; expected {sorted(PREPARE_CONFIG)}")
    cfg = {**PREPARE_CONFIG, **(config or {})}
    batch, heads, seq_len, head_dim = q.shape
    v_transposed = V_TRANSPOSED if v_transposed is None else v_transposed
    scale = _resolve_scale(scale, head_dim)
    rotate = rotates(head_dim)
    run = runner or (lambda kernel: kernel)
    seq_pad = padded_len(seq_len)
    dev = q.device
    num_chunks = triton.cdiv(seq_len, cfg["stats_chunk"])
    psum = torch.empty(batch * heads, num_chunks, head_dim, dtype=torch.float32, device=dev)
    pvsum, pvmax, pvmin = (torch.empty_like(psum) for _ in range(3))
    k_mean = torch.empty(batch, heads, head_dim, dtype=torch.float32, device=dev)
    v_amax, v_mean = torch.empty_like(k_mean), torch.empty_like(k_mean)
    run(_kv_stats_kernel)[(num_chunks, batch * heads, 2 if cfg["stats_split"] else 1)](
        k, v, psum, pvsum, pvmax, pvmin, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        heads, seq_len, num_chunks, HEAD_DIM=head_dim, CHUNK=cfg["stats_chunk"], ROWS=cfg["stats_rows"],
        SPLIT=cfg["stats_split"], REDUCE_ONCE=cfg["stats_reduce_once"], num_warps=cfg["stats_warps"])
    run(_kv_finalize_kernel)[(batch * heads,)](
        psum, pvsum, pvmax, pvmin, k_mean, v_mean, v_amax, seq_len, num_chunks, HEAD_DIM=head_dim,
        CHUNKS_P2=triton.next_power_of_2(num_chunks), ROTATE=rotate, num_warps=4)
    qdtype = _QDTYPE[qk_format]
    q8 = torch.empty(batch, heads, seq_pad, head_dim, dtype=qdtype, device=dev)
    k8 = torch.empty_like(q8)
    if v_transposed:
        v8 = torch.empty(batch, heads, head_dim, seq_pad, dtype=torch.float8_e4m3fn, device=dev).transpose(2, 3)
    else:
        v8 = torch.empty(batch, heads, seq_pad, head_dim, dtype=torch.float8_e4m3fn, device=dev)
    q_scale = torch.empty(batch, heads, seq_pad // QUANT_BLOCK_Q, dtype=torch.float32, device=dev)
    k_scale = torch.empty(batch, heads, seq_pad // QUANT_BLOCK_K, dtype=torch.float32, device=dev)
    run(_quantize_kernel)[(seq_pad // QUANT_BLOCK_Q, batch * heads, 3 if cfg["quant_split"] else 1)](
        q, k, v, k_mean, v_mean, v_amax, q8, k8, _v8_storage(v8), q_scale, k_scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), v8.stride(1), v8.stride(2), v8.stride(3),
        heads, seq_len, seq_pad, scale * LOG2E / (head_dim if rotate else 1),
        HEAD_DIM=head_dim, BLOCK_Q=QUANT_BLOCK_Q, BLOCK_K=QUANT_BLOCK_K,
        IS_INT8=qk_format == "int8", QMAX=_QMAX[qk_format], ROTATE=rotate, SPLIT=cfg["quant_split"],
        num_warps=cfg["quant_warps"])
    return Quantized(q8, q_scale, k8, k_scale, v8, v_amax, v_mean, k_mean)


def _v8_storage(v8: torch.Tensor) -> torch.Tensor:
    """The contiguous tensor behind the [B, H, S, D] view of V's codes (the kernels take it with
    explicit strides: user Triton kernels inside compiled graphs get no transposed views)."""
    return v8 if v8.is_contiguous() else v8.transpose(2, 3)


def launch_attention_8bit(qz: Quantized, schemes: torch.Tensor, seq_len: int, text_start: int, text_end: int,
                          cached: Optional[torch.Tensor], out: torch.Tensor, config: Optional[dict] = None,
                          runner=None) -> torch.Tensor:
    """Launch the attention kernel on prepared buffers into ``out`` [B, H, S, D]."""
    batch, heads, seq_pad, head_dim = qz.q8.shape
    cfg = dict(config or KERNEL_CONFIGS[head_dim])
    block_m = cfg.pop("BLOCK_M")
    if QUANT_BLOCK_Q % block_m or SEQ_PAD % cfg["BLOCK_N"]:
        raise HeadAttentionError(f"BLOCK_M must divide {QUANT_BLOCK_Q} and BLOCK_N {SEQ_PAD}, "
                                 f"got {block_m}, {cfg['BLOCK_N']}")
    text_start, text_end = (0, 0) if text_end <= text_start else (text_start, text_end)
    vis_start, vis_end = _visual_range(text_start, text_end, seq_len)
    has_cache = cached is not None
    cache = cached if has_cache else out
    kernel = runner(_attention_8bit_kernel) if runner is not None else _attention_8bit_kernel
    grid = (triton.cdiv(seq_len, block_m), batch * heads)
    kernel[grid](qz.q8, qz.k8, _v8_storage(qz.v8), qz.q_scale, qz.k_scale, qz.v_amax, qz.v_mean, cache, out, schemes,
                 qz.v8.stride(1), qz.v8.stride(2), qz.v8.stride(3), cache.stride(0), cache.stride(1), cache.stride(2),
                 out.stride(0), out.stride(1), out.stride(2),
                 heads, seq_len, seq_pad, text_start, text_end, vis_start, vis_end,
                 HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_Q=QUANT_BLOCK_Q, BLOCK_K=QUANT_BLOCK_K,
                 IS_INT8=qz.q8.dtype == torch.int8, HAS_CACHE=has_cache, **cfg)
    return out


def attention_8bit_triton(q, k, v, schemes, text_start, text_end, cached, scale, qk_format, out,
                          config=None, v_transposed=None, runner=None) -> torch.Tensor:
    """Prepare + attention kernels (CUDA, or CPU under TRITON_INTERPRET=1); ``schemes`` on q's device."""
    qz = prepare_8bit(q, k, v, scale, qk_format, v_transposed, runner)
    return launch_attention_8bit(qz, schemes, q.shape[2], text_start, text_end, cached, out, config, runner)


# --------------------------------------------------------------------------------------------
# torch.library op
# --------------------------------------------------------------------------------------------

SUPPORTED_HEAD_DIMS = tuple(KERNEL_CONFIGS)


def _check_op_inputs(q, k, v, schemes, cached, scale, qk_format) -> None:
    if not isinstance(schemes, torch.Tensor) or schemes.dim() != 2 or schemes.shape[1] != 3 \
            or schemes.dtype != torch.int32:
        raise HeadAttentionError("schemes must be an int32 tensor [H, 3]; build it with schemes_to_tensor")
    _check_qkv(q, k, v, schemes.shape[0], cached)
    _check_format(qk_format)
    if scale is not None and not scale > 0:
        raise HeadAttentionError(f"scale must be a positive float, got {scale}")


@torch.library.custom_op("ditbake::attention_8bit_reference", mutates_args=())
def attention_8bit_reference_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schemes: torch.Tensor,
                                text_start: int, text_end: int, cached: Optional[torch.Tensor] = None,
                                scale: Optional[float] = None, qk_format: str = "int8") -> torch.Tensor:
    """The reference as an opaque op: ditbake::attention_8bit runs it off the CUDA kernel. torch.compile
    and AOTInductor inline a triton_op's body, not its device kernels, and the reference reads the
    table on the host, which fake tensors cannot: an opaque op stays one fallback call in the graph."""
    return attention_8bit_ref(q, k, v, schemes, (text_start, text_end), cached, scale, qk_format).contiguous()


@attention_8bit_reference_op.register_fake
def _attention_8bit_reference_fake(q, k, v, schemes, text_start, text_end, cached=None, scale=None, qk_format="int8"):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.triton_op("ditbake::attention_8bit", mutates_args=())
def attention_8bit_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schemes: torch.Tensor,
                      text_start: int, text_end: int, cached: Optional[torch.Tensor] = None,
                      scale: Optional[float] = None, qk_format: str = "int8") -> torch.Tensor:
    # This body is the CUDA kernel, the other devices' kernel and, traced with fake tensors, the meta
    # implementation; compiled graphs inline it, so the reference must be an op here, not a kernel
    # registered beside it (that one would be bypassed and the graph would return uninitialized memory).
    _check_op_inputs(q, k, v, schemes, cached, scale, qk_format)
    if not HAS_TRITON or q.device.type != "cuda":
        return torch.ops.ditbake.attention_8bit_reference(q, k, v, schemes, text_start, text_end, cached, scale,
                                                          qk_format)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise HeadAttentionError(f"the GPU kernel supports head dim {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise HeadAttentionError(f"the GPU kernel takes bf16 or fp16, got {q.dtype}; cast q, k, v first")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if cached is not None and cached.stride(-1) != 1:
        cached = cached.contiguous()
    schemes = schemes.to(q.device).contiguous()
    return attention_8bit_triton(q, k, v, schemes, text_start, text_end, cached, scale, qk_format, out,
                                 runner=torch.library.wrap_triton)


def attention_8bit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schemes: SchemesLike,
                   text_range: Tuple[int, int], cached: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None, qk_format: str = "int8") -> torch.Tensor:
    """Convenience entry: validates host-side schemes, then calls the op (hot paths call the op
    with a device schemes tensor built once)."""
    if not isinstance(schemes, torch.Tensor) or schemes.device.type == "cpu":
        table = schemes_to_tensor(schemes)
        if HeadKind.CACHED in table[:, 0].tolist() and cached is None:
            raise HeadAttentionError("a head is CACHED but no cached output was given; pass cached=[B, H, S, D]")
        schemes = table.to(q.device)
    text_start, text_end = normalize_text_range(text_range, q.shape[2] if q.dim() == 4 else 0)
    return torch.ops.ditbake.attention_8bit(q, k, v, schemes, text_start, text_end, cached, scale, qk_format)


def attention_8bit_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schemes: SchemesLike,
                         text_range: Tuple[int, int], cached: Optional[torch.Tensor] = None,
                         scale: Optional[float] = None, qk_format: str = "int8",
                         reference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-head relative squared error of the 8-bit attention that runs on q's device (the kernel on
    CUDA, the reference on CPU) against fp32 attention with the same masks: fp32 [H],
    ||out8_h - ref_h||^2 / ||ref_h||^2 over batch, tokens and channels (0 for cached heads).
    ``reference`` (e.g. the bf16 output the calibration already has) replaces the fp32 one."""
    table = schemes_to_tensor(schemes)
    text_range = normalize_text_range(text_range, q.shape[2] if q.dim() == 4 else 0)
    out8 = attention_8bit(q, k, v, table, text_range, cached, scale, qk_format).float()
    if reference is None:
        ref_cached = None if cached is None else cached.float()
        reference = head_attention_ref(q.float(), k.float(), v.float(), table, text_range, ref_cached, scale)
    elif reference.shape != q.shape:
        raise HeadAttentionError(f"reference must have q's shape {tuple(q.shape)}, got {tuple(reference.shape)}")
    reference = reference.float()
    num = (out8 - reference).pow(2).sum(dim=(0, 2, 3))
    den = reference.pow(2).sum(dim=(0, 2, 3)).clamp_min(torch.finfo(torch.float32).tiny)
    err = num / den
    err[table[:, 0].to(err.device) == HeadKind.CACHED] = 0.0
    return err.cpu()
