"""Persistent 8-bit GEMM (INT8 with int32 accumulation, FP8 E4M3 with fp32): one program per SM walks
the output tiles, operands through TMA descriptors built on the device (sm90 Hopper and later).

Why: the one-program-per-tile pointer kernel of ``linear_8bit`` reaches 840-1,170 INT8 TOPS at Wan's
shapes where cuBLASLt's FP8 kernel reaches 1,390-1,540 (plugins/notes/linear_int8.md), so INT8 —
the accurate 8-bit format on the test bed — bought almost no speed. A persistent loop has no launch
tail and overlaps one tile's epilogue with the next tile's loads; TMA moves operands as bulk async
copies with no address arithmetic in the main loop.

Numerics: ``acc * sx[m] * sw[n] (+ bias[n])`` in FP32, rounded to the output dtype — for INT8
bit-identical to ``linear_8bit``'s kernel (exact int32 sums). ``ditbake::gemm_w8a8``
(plugins/linear_8bit.py) calls the opaque op ``ditbake::gemm_w8a8_persistent`` when
:func:`persistent_gemm_applies` (why opaque: that op's docstring). A Blackwell path
(tcgen05, native block-scaled formats) would be another kernel behind the same op.
"""
from __future__ import annotations

import os

import torch

from ditbake.plugins._triton_util import HAS_TRITON, tl, triton
from ditbake.plugins.int8 import matmul_8bit_ref

# Tile and pipeline by measurement on the H200 (benchmarks/bench_gemm_8bit.py, results/gemm_8bit_*.json):
# 128 x 256 x 128, 8 warps, 4 stages was best or within noise of the best at both FFN shapes.
CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4,
              WARP_SPECIALIZE=False, FLATTEN=True)
MIN_ROWS = 1024  # below this the tiles do not fill the SMs; linear_8bit's kernel keeps small M
# At Wan's 1536 x 1536 layers the pointer kernel measured faster (199 vs 216 µs, sweep1); at the FFN's
# 1536 x 8960 / 8960 x 1536 this one wins (858 vs 1,061 µs / 757 vs 831 µs)
MIN_WIDTH = 4096
# Operators' switch: DITBAKE_PERSISTENT_GEMM=on (default) | off (linear_8bit's kernel only). A persistent
# variant with pointer loads instead of TMA measured slower than linear_8bit's kernel (sweep3) and was dropped.
MODE = os.environ.get("DITBAKE_PERSISTENT_GEMM", "on")
if MODE not in ("on", "off"):
    raise ValueError(f"DITBAKE_PERSISTENT_GEMM must be on or off, got {MODE!r}")
ENABLED = MODE == "on"


def persistent_gemm_applies(qx: torch.Tensor, qw: torch.Tensor) -> bool:
    """On CUDA sm90+, both operands contiguous, 16-byte-aligned rows (K % 16 == 0 for 8-bit codes:
    TMA's stride rule), M large enough to fill the GPU and K or N wide enough for this kernel to
    win (MIN_WIDTH)."""
    if not (ENABLED and HAS_TRITON and qx.is_cuda and qw.is_cuda):
        return False
    if torch.cuda.get_device_capability(qx.device)[0] < 9:
        return False
    m, k = qx.shape
    # storage offsets, not data_ptr(): this runs while Inductor traces with fake tensors; the
    # caching allocator aligns every base far beyond 16 bytes
    return (m >= MIN_ROWS and max(k, qw.shape[0]) >= MIN_WIDTH and k % 16 == 0 and qx.is_contiguous()
            and qw.is_contiguous() and qx.storage_offset() % 16 == 0 and qw.storage_offset() % 16 == 0)


def _ensure_scratch_allocator() -> None:
    """The kernel builds its TMA descriptors on the device (host-side descriptors made inside a
    triton_op do not survive torch 2.11's compile tracing: KeyError on the descriptor argument),
    which needs Triton's global-scratch allocator for eager launches; compiled wrappers set theirs."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


_ALLOCATOR_SET = False


def gemm_8bit_persistent(qx, sx, qw, sw, bias, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """out = qx @ qw.T * sx[:, None] * sw[None, :] (+ bias) -> [M, N] out_dtype. Callers check
    :func:`persistent_gemm_applies` first (benchmarks may pass a config and call it directly)."""
    m, k = qx.shape
    n = qw.shape[0]
    cfg = dict(CONFIG, **(config or {}))
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    _ensure_scratch_allocator()
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    num_sms = torch.cuda.get_device_properties(qx.device).multi_processor_count
    _gemm_8bit_persistent_kernel[(min(num_sms, tiles),)](
        qx, qw, sx, sw, bias if bias is not None else sx, out, m, n, k,
        HAS_BIAS=bias is not None, IS_INT8=qx.dtype == torch.int8, NUM_SMS=num_sms, **cfg)
    return out


OUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@torch.library.custom_op("ditbake::gemm_w8a8_persistent", mutates_args=())
def gemm_w8a8_persistent(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None, out_dtype: str) -> torch.Tensor:
    """The persistent GEMM as an opaque op: compiled graphs (AOTInductor included) call it rather
    than inlining the Triton kernel, because the kernel's device-side TMA descriptors need Triton's
    global scratch memory, which torch 2.11's C++ wrapper does not provide; launched here, Triton's
    own launcher allocates it. ``out_dtype`` is a name ("bfloat16", "float16", "float32"): a
    torch.dtype argument reaches an AOTInductor-called Python op renumbered (bfloat16 arrived as
    quint8 through torch 2.11's proxy executor)."""
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"gemm_w8a8_persistent out_dtype must be one of {sorted(OUT_DTYPES)}, got {out_dtype!r}")
    if not qx.is_cuda:  # the specification (CPU callers never reach this op through gemm_w8a8)
        return matmul_8bit_ref(qx, sx, qw, w_scale, bias, torch.float32).to(OUT_DTYPES[out_dtype])
    return gemm_8bit_persistent(qx, sx, qw, w_scale, bias, OUT_DTYPES[out_dtype])


@gemm_w8a8_persistent.register_fake
def _gemm_w8a8_persistent_fake(qx, sx, qw, w_scale, bias, out_dtype):
    return qx.new_empty((qx.shape[0], qw.shape[0]), dtype=OUT_DTYPES[out_dtype])


def dtype_name(dtype: torch.dtype) -> str:
    """The op's name for an output dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


if HAS_TRITON:

    @triton.jit
    def _grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
        """Tile index -> (row tile, column tile), GROUP_M row tiles sharing each weight tile in L2."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % rows, (tile % per_group) // rows

    @triton.jit
    def _gemm_8bit_persistent_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K,
                                     HAS_BIAS: tl.constexpr, IS_INT8: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                     GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
                                     WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr):
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        acc_dtype: tl.constexpr = tl.int32 if IS_INT8 else tl.float32
        # TMA zero-fills the tails of M, N and K
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=FLATTEN,
                             warp_specialize=WARP_SPECIALIZE):
            pid_m, pid_n = _grouped_tile(tile, num_m, num_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            rm = off_m + tl.arange(0, BLOCK_M)
            rn = off_n + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
            for ki in range(k_tiles):
                a = a_desc.load([off_m, ki * BLOCK_K])
                b = b_desc.load([off_n, ki * BLOCK_K])
                acc = tl.dot(a, b.T, acc, out_dtype=acc_dtype)
            row_ok = rm < M
            col_ok = rn < N
            out = (acc.to(tl.float32) * tl.load(sa_ptr + rm, mask=row_ok, other=0.0)[:, None]
                   * tl.load(sb_ptr + rn, mask=col_ok, other=0.0)[None, :])
            if HAS_BIAS:
                out += tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            mask = row_ok[:, None] & col_ok[None, :]
            tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], out.to(c_ptr.dtype.element_ty), mask=mask)
