"""RMS norm across heads + interleaved rotary embedding + head-major layout, in one pass: the q / k
preparation of Wan's self-attention.

Op ``ditbake::rms_rope(x, weight, cos, sin, eps, heads) -> [B, H, S, D]`` (contiguous, x.dtype):
x [B, S, H·D] (the q or k projection), weight [H·D], cos / sin [1, S, 1, D] fp32 (each angle
repeated for its pair, runtime.arch_wan.rope). The specification is the runtime's composition,
:func:`rms_rope_ref`: ``rms_norm(x, weight, eps)`` (torch's fused decomposition: x · rstd · weight in
fp32, one rounding to x.dtype), then the rotation of pairs (x[2i], x[2i+1]) in fp32 rounded to
x.dtype, laid out head-major for the attention kernels.

Why: Inductor fused the same composition into one kernel that took 412 µs per layer for q and k
at Wan2.1-1.3B's 32,760 tokens on the H200 (the largest non-attention, non-GEMM kernel of a
forward: 12.4 ms, in the diffusers + torch.compile baseline too); it reads and writes 200 MB each
way, ≈ 100 µs at the memory roofline. This kernel holds one token's whole row (all heads) in
registers: the statistic, the weight, the rotation and the transposed store in one read and one
write. FP32 sums in another order than PyTorch's: an output can differ by a rounding of x.dtype.
Measured on the H200 (Wan2.1-1.3B, 32,760 tokens): 162 µs per layer for q and k (≈ 2.5 TB/s),
−7.5 ms per forward (plugins/notes/gemm_w8a8_cutlass.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from ditbake.plugins._triton_util import HAS_TRITON, tl, triton, use_triton
from ditbake.plugins.nvfp4 import QuantFormatError

# One token per program, 2 warps: on the H100 at Wan's 32,760 tokens 81 µs per call (2.9 TB/s) vs 93 µs for
# the 2 tokens x 4 warps chosen on the H200 (benchmarks/bench_rms_rope.py, rms_rope_h100.json)
TOKENS_PER_PROGRAM = 1
WARPS = 2


def check_rms_rope_args(x, weight, cos, sin, eps, heads: int) -> None:
    if x.dim() != 3 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise QuantFormatError(f"rms_rope takes a float x [B, S, H*D], got {x.dtype} {tuple(x.shape)}")
    b, s, width = x.shape
    if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0 or width % heads or (width // heads) % 2:
        raise QuantFormatError(f"rms_rope: width {width} must split into {heads!r} heads of an even size")
    d = width // heads
    if tuple(weight.shape) != (width,):
        raise QuantFormatError(f"rms_rope weight must be [{width}], got {tuple(weight.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or tuple(t.shape) != (1, s, 1, d):
            raise QuantFormatError(f"rms_rope {name} must be float32 [1, {s}, 1, {d}], got {t.dtype} {tuple(t.shape)}")
    if not (isinstance(eps, float) and eps > 0):
        raise QuantFormatError(f"rms_rope eps must be a positive float, got {eps!r}")


def rms_rope_ref(x, weight, cos, sin, eps: float, heads: int) -> torch.Tensor:
    """The specification: the ops runtime.arch_wan composes on the CPU (runtime.nn.rms_norm and
    rotate_interleaved, written out here so that plugins do not import the runtime; the tests hold
    the two equal)."""
    y = F.rms_norm(x, (x.shape[-1],), weight, eps).unflatten(2, (heads, -1))
    y1, y2 = y.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack([y1 * c - y2 * s, y1 * s + y2 * c], dim=-1).flatten(-2).type_as(y)
    return out.transpose(1, 2).contiguous()


@triton_op("ditbake::rms_rope", mutates_args=())
def rms_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
             heads: int) -> torch.Tensor:
    """See the module docstring; x [B, S, H*D] -> [B, H, S, D] contiguous."""
    if not use_triton(x):
        return rms_rope_ref(x, weight, cos, sin, eps, heads)
    b, s, width = x.shape
    d = width // heads
    x = x.contiguous()
    out = torch.empty(b, heads, s, d, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(s, TOKENS_PER_PROGRAM), b)
    wrap_triton(_rms_rope_kernel)[grid](
        x, weight.contiguous(), cos.contiguous(), sin.contiguous(), out, s, eps,
        H=heads, D=d, HP=triton.next_power_of_2(heads), BLOCK_S=TOKENS_PER_PROGRAM, num_warps=WARPS)
    return out


def apply_rms_rope(x, weight, cos, sin, eps: float, heads: int) -> torch.Tensor:
    """Validated entry point for :func:`rms_rope`."""
    check_rms_rope_args(x, weight, cos, sin, eps, heads)
    return rms_rope(x, weight, cos, sin, eps, heads)


if HAS_TRITON:

    @triton.jit
    def _rms_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, S, eps,
                         H: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, BLOCK_S: tl.constexpr):
        """BLOCK_S tokens of one sample, each row as [HP, D] (heads padded to a power of two); pairs
        are split in registers (16-byte loads and stores, no strided access)."""
        b = tl.program_id(1)
        HALF: tl.constexpr = D // 2
        heads = tl.arange(0, HP)
        offs = heads[:, None] * D + tl.arange(0, D)[None, :]
        head_ok = (heads < H)[:, None]
        w_even, w_odd = tl.split(tl.reshape(tl.load(w_ptr + offs, mask=head_ok, other=0.0).to(tl.float32), [HP, HALF, 2]))
        pairs = tl.arange(0, HALF)
        dt = x_ptr.dtype.element_ty
        for i in tl.static_range(BLOCK_S):
            tok = tl.program_id(0) * BLOCK_S + i
            if tok < S:
                row = (b.to(tl.int64) * S + tok) * (H * D)
                x = tl.load(x_ptr + row + offs, mask=head_ok, other=0.0).to(tl.float32)
                r = tl.rsqrt(tl.sum(tl.sum(x * x, 1), 0) / (H * D) + eps)
                x_even, x_odd = tl.split(tl.reshape(x, [HP, HALF, 2]))
                # rms_norm (torch's fused decomposition): x * rstd * weight in fp32, rounded once to x's dtype
                y_even = (x_even * r * w_even).to(dt).to(tl.float32)
                y_odd = (x_odd * r * w_odd).to(dt).to(tl.float32)
                c = tl.load(cos_ptr + tok * D + 2 * pairs)[None, :]
                s_ = tl.load(sin_ptr + tok * D + 2 * pairs + 1)[None, :]
                o = tl.reshape(tl.join(y_even * c - y_odd * s_, y_even * s_ + y_odd * c), [HP, D])
                dst = out_ptr + ((b.to(tl.int64) * H + heads[:, None]) * S + tok) * D + tl.arange(0, D)[None, :]
                tl.store(dst, o.to(dt), mask=head_ok)
