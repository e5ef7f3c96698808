"""Per-head RMS norm + interleaved rotary embedding + head-major layout, in one pass: the q / k
preparation of Flux's joint attention (Wan's, which normalizes across all heads, is rms_rope.py).

Op ``ditbake::rms_rope_heads(x, weight, cos, sin, eps, heads, first, first_weight) -> [B, H, S, D]``
(contiguous, x.dtype): x [B, N, H·D] (a q or k projection), weight [D]; the optional ``first``
[B, T, H·D] with ``first_weight`` [D] is a second projection whose tokens come first (a double
block's text stream, normalized with its own weight), so S = T + N; cos / sin [1, 1, S, D] fp32
(each angle repeated for its pair, runtime.arch_flux.rope). The specification is the runtime's
composition, :func:`rms_rope_heads_ref`: per head ``F.rms_norm`` in fp32 rounded once to x.dtype
(FluxAttention's norm_q / norm_k and norm_added_q / norm_added_k), the text stream concatenated
first, then the rotation of pairs (x[2i], x[2i+1]) in fp32 rounded to x.dtype.

Why: Inductor turned this composition into two kernels (a reduction over the normalized heads and
a pointwise cat + rotation) that took 17.1 ms per Flux forward at 2048² on the H200
(forward_race_flux_band2_h200.json: 13.2 + 3.9 ms; ≈ 1.8 TB/s for the reduction) for 23.7 GB of
q / k traffic, ≈ 6 ms at the memory roofline. One program here holds BLOCK_S tokens of a few heads:
the statistic, the weight, the rotation and the head-major store in one read and one write, with the
token block's cos / sin rows loaded once for all its heads (a first version, one head per program,
read them per head: 1 KB of fp32 table per 256-byte head row, 0.5-1.2 TB/s). FP32 sums in another
order than PyTorch's: an output can differ by a rounding of x.dtype. Head sizes that are not a power of
two (Triton's tiles are) run the specification. Measurements: plugins/notes/rms_rope_heads.md.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from ditbake.plugins._triton_util import HAS_TRITON, tl, triton, use_triton
from ditbake.plugins.nvfp4 import QuantFormatError

# H100, Flux's double block at 2048² (rms_rope_heads_h100.json): 8 tokens x 24 heads x 8 warps 82 µs per call
# vs 105 µs for the 16 x 4 x 4 chosen on the H200 (73-75 µs there, rms_rope_heads_h200.json)
TOKENS_PER_PROGRAM = 8
HEADS_PER_PROGRAM = 24
WARPS = 8


def check_rms_rope_heads_args(x, weight, cos, sin, eps, heads: int, first=None, first_weight=None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype not in (torch.bfloat16, torch.float16,
                                                                             torch.float32):
        raise QuantFormatError(f"rms_rope_heads takes a float x [B, N, H*D], got {getattr(x, 'dtype', x)} "
                               f"{tuple(getattr(x, 'shape', ()))}")
    b, n, width = x.shape
    if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0 or width % heads or (width // heads) % 2:
        raise QuantFormatError(f"rms_rope_heads: width {width} must split into {heads!r} heads of an even size")
    d = width // heads
    t = 0
    if (first is None) != (first_weight is None):
        raise QuantFormatError("rms_rope_heads: first and first_weight come together")
    if first is not None:
        if first.dim() != 3 or first.dtype != x.dtype or first.shape[0] != b or first.shape[2] != width:
            raise QuantFormatError(f"rms_rope_heads first must be {x.dtype} [{b}, T, {width}], got "
                                   f"{first.dtype} {tuple(first.shape)}")
        t = first.shape[1]
    for name, w in (("weight", weight), ("first_weight", first_weight)):
        if w is not None and (tuple(w.shape) != (d,) or not w.is_floating_point()):
            raise QuantFormatError(f"rms_rope_heads {name} must be a float [{d}], got {w.dtype} {tuple(w.shape)}")
    for name, r in (("cos", cos), ("sin", sin)):
        if r.dtype != torch.float32 or tuple(r.shape) != (1, 1, t + n, d):
            raise QuantFormatError(f"rms_rope_heads {name} must be float32 [1, 1, {t + n}, {d}], got "
                                   f"{r.dtype} {tuple(r.shape)}")
    if not (isinstance(eps, float) and eps > 0):
        raise QuantFormatError(f"rms_rope_heads eps must be a positive float, got {eps!r}")


def _normed_heads(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int) -> torch.Tensor:
    y = x.unflatten(2, (heads, -1)).transpose(1, 2)  # [B, H, N, D]
    return F.rms_norm(y.float(), (y.shape[-1],), weight.float(), eps).to(x.dtype)


def rms_rope_heads_ref(x, weight, cos, sin, eps: float, heads: int, first=None, first_weight=None) -> torch.Tensor:
    """The specification: the ops runtime.arch_flux composes (its _rms and runtime.nn.rotate_interleaved,
    written out here so that plugins do not import the runtime; the tests hold the two equal)."""
    y = _normed_heads(x, weight, eps, heads)
    if first is not None:
        y = torch.cat([_normed_heads(first, first_weight, eps, heads), y], dim=2)
    y1, y2 = y.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack([y1 * c - y2 * s, y1 * s + y2 * c], dim=-1).flatten(-2).type_as(y)
    return out.contiguous()


@triton_op("ditbake::rms_rope_heads", mutates_args=())
def rms_rope_heads(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                   heads: int, first: Optional[torch.Tensor] = None,
                   first_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """See the module docstring; x [B, N, H*D] (and first [B, T, H*D]) -> [B, H, T + N, D] contiguous."""
    d = x.shape[2] // heads
    if not use_triton(x) or d & (d - 1):
        return rms_rope_heads_ref(x, weight, cos, sin, eps, heads, first, first_weight)
    return launch_rms_rope_heads(x, weight, cos, sin, eps, heads, first, first_weight)


def launch_rms_rope_heads(x, weight, cos, sin, eps: float, heads: int, first=None, first_weight=None,
                          tokens_per_program: int = TOKENS_PER_PROGRAM, heads_per_program: int = HEADS_PER_PROGRAM,
                          warps: int = WARPS) -> torch.Tensor:
    """The kernel launch behind the op (benchmarks sweep its launch options)."""
    b, n, width = x.shape
    d = width // heads
    t = 0 if first is None else first.shape[1]
    x = x.contiguous()
    out = torch.empty(b, heads, t + n, d, dtype=x.dtype, device=x.device)
    has_first = first is not None
    first = (first if has_first else x).contiguous()
    first_weight = (first_weight if has_first else weight).contiguous()
    heads_per_program = min(heads_per_program, heads)
    grid = (triton.cdiv(t + n, tokens_per_program), triton.cdiv(heads, heads_per_program), b)
    wrap_triton(_rms_rope_heads_kernel)[grid](
        x, weight.contiguous(), first, first_weight, cos.contiguous(), sin.contiguous(), out, t, n, eps,
        H=heads, D=d, BLOCK_S=tokens_per_program, HEADS_PER=heads_per_program, HAS_FIRST=has_first,
        num_warps=warps)
    return out


def apply_rms_rope_heads(x, weight, cos, sin, eps: float, heads: int, first=None, first_weight=None) -> torch.Tensor:
    """Validated entry point for :func:`rms_rope_heads`."""
    check_rms_rope_heads_args(x, weight, cos, sin, eps, heads, first, first_weight)
    return rms_rope_heads(x, weight, cos, sin, eps, heads, first, first_weight)


if HAS_TRITON:

    @triton.jit
    def _rms_rope_heads_kernel(x_ptr, w_ptr, f_ptr, fw_ptr, cos_ptr, sin_ptr, out_ptr, T, N, eps,
                               H: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, HEADS_PER: tl.constexpr,
                               HAS_FIRST: tl.constexpr):
        """BLOCK_S tokens of HEADS_PER heads (from HEADS_PER * program_id(1)) of sample program_id(2), each head
        a [BLOCK_S, D] tile. The cos / sin rows are loaded once per program (whole rows, 16-byte loads) and
        serve all its heads; pairs are split in registers (no strided access to x, cos, sin or out)."""
        b = tl.program_id(2).to(tl.int64)
        HALF: tl.constexpr = D // 2
        tok = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        ok = tok < T + N
        row_ok = ok[:, None]
        cols = tl.arange(0, D)
        table = tok[:, None] * D + cols[None, :]
        c, _ = tl.split(tl.reshape(tl.load(cos_ptr + table, mask=row_ok, other=0.0), [BLOCK_S, HALF, 2]))
        _, s = tl.split(tl.reshape(tl.load(sin_ptr + table, mask=row_ok, other=0.0), [BLOCK_S, HALF, 2]))
        w = tl.load(w_ptr + cols).to(tl.float32)[None, :]
        in_x = ok & (tok >= T)
        x_rows = (b * N + (tok - T)) * (H * D)
        if HAS_FIRST:
            in_f = tok < T
            f_rows = (b * T + tok) * (H * D)
            w = tl.where(in_f[:, None], tl.load(fw_ptr + cols).to(tl.float32)[None, :], w)
        dt = out_ptr.dtype.element_ty
        for i in tl.static_range(HEADS_PER):
            head = tl.program_id(1) * HEADS_PER + i
            if head < H:
                x = tl.load(x_ptr + x_rows[:, None] + head * D + cols[None, :], mask=in_x[:, None],
                            other=0.0).to(tl.float32)
                if HAS_FIRST:
                    f = tl.load(f_ptr + f_rows[:, None] + head * D + cols[None, :], mask=in_f[:, None],
                                other=0.0).to(tl.float32)
                    x = tl.where(in_f[:, None], f, x)
                r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
                # F.rms_norm on fp32: x * rstd * weight, rounded once to the output dtype
                y = (x * r[:, None] * w).to(dt).to(tl.float32)
                y_even, y_odd = tl.split(tl.reshape(y, [BLOCK_S, HALF, 2]))
                o = tl.reshape(tl.join(y_even * c - y_odd * s, y_even * s + y_odd * c), [BLOCK_S, D])
                dst = out_ptr + ((b * H + head) * (T + N) + tok[:, None]) * D + cols[None, :]
                tl.store(dst, o.to(dt), mask=row_ok)
