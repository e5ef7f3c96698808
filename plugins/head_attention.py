"""Head-wise arrow attention (DiTFastAttnV2): per head full, arrow (text global + visual band) or cached.

One module holds:
  * the PyTorch reference ``head_attention_ref`` -- the numeric specification (runs anywhere);
  * the Triton kernel: one launch per layer whatever the per-head mix;
  * the ``ditbake::head_attention`` op (``torch.library.triton_op``; off CUDA it calls the reference
    through the opaque ``ditbake::head_attention_reference`` op);
  * the FLOP counter the runtime uses, the 3D tile reordering helpers, and a FlexAttention
    BlockMask builder used only to benchmark against.

Semantics, for a joint sequence of S tokens whose text tokens occupy ``[text_start, text_end)``
(text first, text last, or none) and whose visual tokens are the rest, in token order:
  * FULL: ordinary softmax attention over all keys.
  * ARROW(w_left, w_right): a text query attends to every key; a visual query at visual index i
    attends to every text key and to the visual keys j with ``i - w_left <= j <= i + w_right``.
  * CACHED: no work; the head's output is ``cached[:, h]`` (from the previous step).
Scores are scaled by ``scale`` (default 1/sqrt(D)); softmax and accumulation are in float32
(float64 when the inputs are float64); the output has the input dtype.

Per-head schemes travel as an int32 tensor [H, 3] of (kind, w_left, w_right).
"""
from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

logger = logging.getLogger(__name__)

try:  # Triton is optional: CPU machines (and CI) run the reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    HAS_TRITON = False


class HeadAttentionError(ValueError):
    """A bad input to head attention (shape, dtype, scheme, text range); the message names the fix."""


class HeadKind(enum.IntEnum):
    FULL = 0
    ARROW = 1
    CACHED = 2


@dataclass(frozen=True)
class HeadScheme:
    """How one head is computed at one step. Widths are in visual tokens and only used by ARROW."""

    kind: HeadKind
    w_left: int = 0
    w_right: int = 0

    @classmethod
    def full(cls) -> "HeadScheme":
        return cls(HeadKind.FULL)

    @classmethod
    def arrow(cls, w_left: int, w_right: Optional[int] = None) -> "HeadScheme":
        return cls(HeadKind.ARROW, int(w_left), int(w_left if w_right is None else w_right))

    @classmethod
    def cached(cls) -> "HeadScheme":
        return cls(HeadKind.CACHED)


SchemesLike = Union[torch.Tensor, Sequence[HeadScheme]]


# --------------------------------------------------------------------------------------------
# Validation (host side; one-line typed errors)
# --------------------------------------------------------------------------------------------

def schemes_to_tensor(schemes: SchemesLike) -> torch.Tensor:
    """Validate per-head schemes and return them as a CPU int32 tensor [H, 3] = (kind, w_left, w_right)."""
    if isinstance(schemes, torch.Tensor):
        if schemes.dim() != 2 or schemes.shape[1] != 3:
            raise HeadAttentionError(
                f"schemes must be an int tensor of shape [H, 3] (kind, w_left, w_right), got {tuple(schemes.shape)}")
        if schemes.dtype.is_floating_point or schemes.dtype.is_complex or schemes.dtype == torch.bool:
            raise HeadAttentionError(f"schemes must be an integer tensor, got dtype {schemes.dtype}")
        table = schemes.detach().to("cpu", torch.int64)
    else:
        rows = []
        for h, s in enumerate(schemes):
            if not isinstance(s, HeadScheme):
                raise HeadAttentionError(f"head {h}: expected a HeadScheme, got {type(s).__name__}")
            rows.append((int(s.kind), int(s.w_left), int(s.w_right)))
        if not rows:
            raise HeadAttentionError("schemes is empty: give one scheme per head")
        table = torch.tensor(rows, dtype=torch.int64)
    known = {int(k) for k in HeadKind}
    for h, (kind, w_left, w_right) in enumerate(table.tolist()):
        if kind not in known:
            raise HeadAttentionError(f"head {h}: unknown kind {kind}; use 0 (full), 1 (arrow) or 2 (cached)")
        if kind == HeadKind.ARROW and (w_left < 0 or w_right < 0):
            raise HeadAttentionError(f"head {h}: arrow widths must be >= 0, got w_left={w_left}, w_right={w_right}")
        if max(abs(w_left), abs(w_right)) >= 2**31:
            raise HeadAttentionError(f"head {h}: width does not fit int32; clamp it to the sequence length")
    return table.to(torch.int32)


def normalize_text_range(text_range: Tuple[int, int], seq_len: int) -> Tuple[int, int]:
    """Check that text tokens are first, last or absent; an empty range becomes (0, 0)."""
    try:
        start, end = (int(x) for x in text_range)
    except (TypeError, ValueError):
        raise HeadAttentionError(f"text_range must be two ints (start, end), got {text_range!r}") from None
    if not 0 <= start <= end <= seq_len:
        raise HeadAttentionError(f"text_range {(start, end)} is out of bounds for a sequence of {seq_len} tokens")
    if start == end:
        return 0, 0
    if start != 0 and end != seq_len:
        raise HeadAttentionError(
            f"text_range {(start, end)} must be at the start or the end of the {seq_len}-token sequence")
    return start, end


def _visual_range(text_start: int, text_end: int, seq_len: int) -> Tuple[int, int]:
    if text_start == text_end:
        return 0, seq_len
    return (text_end, seq_len) if text_start == 0 else (0, text_start)


def check_qkv_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, error=None) -> None:
    """q, k, v are 4-D [B, H, S, D] floating tensors of one shape, dtype and device (self-attention);
    `error` is the plugin's own subclass of HeadAttentionError (default HeadAttentionError)."""
    error = error or HeadAttentionError
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise error(f"{name} must be a 4-D tensor [B, H, S, D], got shape {getattr(t, 'shape', None)}")
        if t.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            raise error(f"{name} must be bf16, fp16, fp32 or fp64, got {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise error(f"q, k, v must have the same shape [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                    f"{tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise error("q, k, v must share one dtype and one device")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_schemes: int,
               cached: Optional[torch.Tensor]) -> None:
    check_qkv_tensors(q, k, v)
    if num_schemes != q.shape[1]:
        raise HeadAttentionError(f"got {num_schemes} head schemes for {q.shape[1]} heads; give one per head")
    if cached is not None and (cached.shape != q.shape or cached.dtype != q.dtype or cached.device != q.device):
        raise HeadAttentionError(
            f"cached must match q: shape {tuple(q.shape)}, {q.dtype} on {q.device}; got {tuple(cached.shape)}, "
            f"{cached.dtype} on {cached.device}")


# --------------------------------------------------------------------------------------------
# Reference (the specification)
# --------------------------------------------------------------------------------------------

def arrow_allowed(query_idx: torch.Tensor, key_idx: torch.Tensor, w_left, w_right,
                  text_start: int, text_end: int) -> torch.Tensor:
    """Arrow rule on broadcastable token-index tensors: text rows/columns always, visual band otherwise.

    Visual indices share one offset for queries and keys, so the band is a token-index difference.
    """
    query_text = (query_idx >= text_start) & (query_idx < text_end)
    key_text = (key_idx >= text_start) & (key_idx < text_end)
    offset = key_idx - query_idx
    band = (offset >= -w_left) & (offset <= w_right)
    return query_text | key_text | band


def head_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schemes: SchemesLike,
                       text_range: Tuple[int, int], cached: Optional[torch.Tensor] = None,
                       scale: Optional[float] = None, query_chunk: int = 2048) -> torch.Tensor:
    """Head-wise attention, the numeric specification. q, k, v: [B, H, S, D]; returns [B, H, S, D].

    Works on any device; queries go in chunks so that the fp64 reference fits at 32k tokens.
    """
    table = schemes_to_tensor(schemes)
    _check_qkv(q, k, v, table.shape[0], cached)
    seq_len, head_dim = q.shape[2], q.shape[3]
    text_start, text_end = normalize_text_range(text_range, seq_len)
    kinds = table[:, 0].tolist()
    if HeadKind.CACHED in kinds and cached is None:
        raise HeadAttentionError("a head is CACHED but no cached output was given; pass cached=[B, H, S, D]")
    if scale is not None and not scale > 0:
        raise HeadAttentionError(f"scale must be a positive float, got {scale}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    out = torch.empty_like(q)
    key_idx = torch.arange(seq_len, device=q.device)
    for h, (kind, w_left, w_right) in enumerate(table.tolist()):
        if kind == HeadKind.CACHED:
            out[:, h] = cached[:, h]
            continue
        qh = q[:, h].to(compute_dtype) * scale
        kh_t = k[:, h].to(compute_dtype).transpose(-1, -2)
        vh = v[:, h].to(compute_dtype)
        for row0 in range(0, seq_len, query_chunk):
            row1 = min(row0 + query_chunk, seq_len)
            scores = qh[:, row0:row1] @ kh_t
            if kind == HeadKind.ARROW:
                query_idx = torch.arange(row0, row1, device=q.device)[:, None]
                allowed = arrow_allowed(query_idx, key_idx[None, :], w_left, w_right, text_start, text_end)
                scores = scores.masked_fill(~allowed, float("-inf"))
            out[:, h, row0:row1] = (torch.softmax(scores, dim=-1) @ vh).to(q.dtype)
    return out


def attention_flops(schemes: SchemesLike, text_tokens: int, visual_tokens: int, head_dim: int,
                    batch: int = 1) -> int:
    """FLOPs of the attention actually done: 4 * D per allowed (query, key) pair, cached heads free.

    Counts QK^T and PV (2 FLOPs per multiply-add each), not the softmax; it is the mask's nnz,
    not the kernel's block-granular work (boundary blocks cost a little more on the GPU).
    """
    table = schemes_to_tensor(schemes)
    if text_tokens < 0 or visual_tokens < 0 or head_dim <= 0 or batch <= 0:
        raise HeadAttentionError(
            f"token counts must be >= 0 and head_dim, batch > 0; got {text_tokens}, {visual_tokens}, {head_dim}, {batch}")
    seq_len = text_tokens + visual_tokens
    pairs = 0
    for kind, w_left, w_right in table.tolist():
        if kind == HeadKind.FULL:
            pairs += seq_len * seq_len
        elif kind == HeadKind.ARROW:
            pairs += text_tokens * seq_len + visual_tokens * text_tokens
            pairs += _band_pairs(visual_tokens, w_left, w_right)
    return 4 * head_dim * pairs * batch


def _band_pairs(n: int, w_left: int, w_right: int) -> int:
    """Number of (i, j) in [0, n)^2 with i - w_left <= j <= i + w_right, in closed form."""
    if n == 0:
        return 0
    # Unclipped rows hold w_left + w_right + 1 keys; subtract what falls off each edge.
    left_rows = min(w_left, n)    # rows i < w_left lose w_left - i keys on the left
    right_rows = min(w_right, n)  # rows n-1-i < w_right lose w_right - (n-1-i) keys on the right
    left_loss = left_rows * w_left - left_rows * (left_rows - 1) // 2
    right_loss = right_rows * w_right - right_rows * (right_rows - 1) // 2
    return n * (w_left + w_right + 1) - left_loss - right_loss


# --------------------------------------------------------------------------------------------
# 3D local windows: tile reordering of visual tokens
# --------------------------------------------------------------------------------------------

def tile_order(grid: Tuple[int, int, int], tile: Tuple[int, int, int]) -> torch.Tensor:
    """Permutation putting raster-ordered (frame, row, col) tokens into tile order.

    ``tiled = raster[perm]``. Tiles go frame-tile, row-tile, col-tile; tokens inside a tile go in
    raster order. Edge tiles may be smaller. A band in tile order then covers whole neighbouring
    tiles, which approximates a 3D local window around each token.
    """
    if len(grid) != 3 or len(tile) != 3 or any(int(g) <= 0 for g in grid) or any(int(t) <= 0 for t in tile):
        raise HeadAttentionError(f"grid and tile must be three positive ints (F, H, W); got {grid}, {tile}")
    frames, rows, cols = (int(g) for g in grid)
    tf, th, tw = (min(int(t), int(g)) for t, g in zip(tile, grid))
    f = torch.arange(frames).view(-1, 1, 1).expand(frames, rows, cols).reshape(-1)
    r = torch.arange(rows).view(1, -1, 1).expand(frames, rows, cols).reshape(-1)
    c = torch.arange(cols).view(1, 1, -1).expand(frames, rows, cols).reshape(-1)
    tiles_r, tiles_c = -(-rows // th), -(-cols // tw)
    tile_id = ((f // tf) * tiles_r + (r // th)) * tiles_c + (c // tw)
    within = ((f % tf) * th + (r % th)) * tw + (c % tw)
    return torch.argsort(tile_id * (tf * th * tw) + within, stable=True)


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


def reorder_visual_tokens(x: torch.Tensor, perm: torch.Tensor, text_range: Tuple[int, int],
                          dim: int = -2) -> torch.Tensor:
    """Apply ``perm`` to the visual tokens of ``x`` along ``dim``; text tokens stay where they are.

    Use ``invert_permutation(perm)`` to go back.
    """
    seq_len = x.shape[dim]
    text_start, text_end = normalize_text_range(text_range, seq_len)
    vis_start, vis_end = _visual_range(text_start, text_end, seq_len)
    if perm.dim() != 1 or perm.numel() != vis_end - vis_start:
        raise HeadAttentionError(
            f"permutation has {perm.numel()} entries for {vis_end - vis_start} visual tokens; build it from the visual grid")
    index = torch.arange(seq_len, device=x.device)
    index[vis_start:vis_end] = perm.to(x.device) + vis_start
    return x.index_select(dim, index)


# --------------------------------------------------------------------------------------------
# FlexAttention mask (benchmark comparison only)
# --------------------------------------------------------------------------------------------

def flex_mask_mod(schemes: SchemesLike, text_range: Tuple[int, int], seq_len: int, device=None):
    """FlexAttention ``mask_mod`` with the same semantics (cached heads keep only the diagonal:
    flex cannot skip a head, so it does the least work it can)."""
    table = schemes_to_tensor(schemes).to(device=device, dtype=torch.int64)
    text_start, text_end = normalize_text_range(text_range, seq_len)
    kinds, w_left, w_right = table[:, 0], table[:, 1], table[:, 2]

    def mask_mod(b, h, q_idx, kv_idx):
        kind = kinds[h]
        arrow = arrow_allowed(q_idx, kv_idx, w_left[h], w_right[h], text_start, text_end)
        return ((kind == HeadKind.FULL) | ((kind == HeadKind.ARROW) & arrow)
                | ((kind == HeadKind.CACHED) & (q_idx == kv_idx)))

    return mask_mod


def flex_block_mask(schemes: SchemesLike, batch: int, seq_len: int, text_range: Tuple[int, int],
                    device=None, block_size: int = 128):
    """The FlexAttention BlockMask for these schemes (one per batch-less layer: B=None broadcasts)."""
    from torch.nn.attention.flex_attention import create_block_mask

    table = schemes_to_tensor(schemes)
    mask_mod = flex_mask_mod(table, text_range, seq_len, device)
    # Compiled mask building goes block by block; eager would materialize an [H, S, S] mask (OOM at 32k).
    on_gpu = torch.device(device or "cpu").type == "cuda"
    return create_block_mask(mask_mod, B=None, H=table.shape[0], Q_LEN=seq_len, KV_LEN=seq_len,
                             device=device, BLOCK_SIZE=block_size, _compile=on_gpu)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

# Which mask a key block needs (the MASK constexpr of _attend_key_block takes these values);
# decided per block range, so that interior blocks pay none.
MASK_NONE = 0        # every (row, key) pair of the block is allowed
MASK_TEXT_KEYS = 1   # only text keys count (last, partial text block of a visual query block)
MASK_BAND = 2        # only visual keys inside the band count
MASK_RULE = 3        # the whole arrow rule plus the sequence bound (text rows, sequence tail)

# Launch parameters per head dim (BLOCK_M queries x BLOCK_N keys per step).
# Picked by the sweep in benchmarks/bench_attention.py on an H100 (see plugins/notes/head_attention.md).
KERNEL_CONFIGS = {
    # 32: the 16k test bed's heads (8 x 32); not swept, the 64 config's tiles
    32: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    64: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    128: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
}

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def kernel_supports(q: torch.Tensor) -> bool:
    """Whether the Triton kernel can run these inputs (CUDA, KERNEL_DTYPES, a head dim of KERNEL_CONFIGS)."""
    return HAS_TRITON and q.is_cuda and q.dtype in KERNEL_DTYPES and q.shape[-1] in KERNEL_CONFIGS

if HAS_TRITON:

    @triton.jit
    def _attend_key_block(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start_n,
                          offs_m, offs_n, offs_d, seq_len, text_start, text_end, vis_start, vis_end,
                          w_left, w_right, qk_scale, MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
        cols = start_n + offs_n
        if MASK == 0:
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :])
        else:
            # Zero-fill past the sequence: garbage there could be NaN, and NaN * 0 stays NaN.
            in_seq = cols < seq_len
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=in_seq[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
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
        # Online softmax in the log2 domain: scale * log2(e) is folded into one multiply-add.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _head_attention_kernel(Q, K, V, C, O, SCHEMES,
                               stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                               stride_vb, stride_vh, stride_vs, stride_cb, stride_ch, stride_cs,
                               stride_ob, stride_oh, stride_os,
                               num_heads, seq_len, text_start, text_end, vis_start, vis_end, qk_scale,
                               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               HAS_CACHE: tl.constexpr, DOT_PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
        batch = (pid_bh // num_heads).to(tl.int64)
        head = pid_bh % num_heads
        kind = tl.load(SCHEMES + head * 3)
        if not HAS_CACHE:
            kind = tl.where(kind == 2, 0, kind)  # no cache given: compute the head in full
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < seq_len
        o_ptrs = O + batch * stride_ob + head.to(tl.int64) * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]

        if kind == 2:
            c_ptrs = C + batch * stride_cb + head.to(tl.int64) * stride_ch + offs_m[:, None] * stride_cs + offs_d[None, :]
            tl.store(o_ptrs, tl.load(c_ptrs, mask=row_ok[:, None]), mask=row_ok[:, None])
        else:
            is_arrow = kind == 1
            # Full heads use an infinite band, so the one masked path serves both kinds.
            w_left = tl.where(is_arrow, tl.minimum(tl.maximum(tl.load(SCHEMES + head * 3 + 1), 0), seq_len), seq_len)
            w_right = tl.where(is_arrow, tl.minimum(tl.maximum(tl.load(SCHEMES + head * 3 + 2), 0), seq_len), seq_len)
            row_lo = pid_m * BLOCK_M
            row_hi = tl.minimum(row_lo + BLOCK_M, seq_len) - 1  # last real row of this block
            rows_visual = (row_lo >= text_end) | (row_hi < text_start)
            rows_text = (row_lo >= text_start) & (row_hi < text_end)
            banded = is_arrow & rows_visual
            # Text query rows of an arrow head see every key: they run like a full head.
            full_rows = (kind != 1) | rows_text
            mixed_rows = is_arrow & (rows_visual == 0) & (rows_text == 0)

            # Visual key range of the band for this query block, and its unmasked interior.
            band_lo = tl.maximum(vis_start, row_lo - w_left)
            band_hi = tl.maximum(tl.minimum(vis_end, row_hi + w_right + 1), band_lo)
            num_band_blocks = (band_hi - band_lo + BLOCK_N - 1) // BLOCK_N
            first_interior = tl.minimum((tl.maximum(row_hi - w_left - band_lo, 0) + BLOCK_N - 1) // BLOCK_N,
                                        num_band_blocks)
            end_interior = tl.maximum(tl.minimum(row_lo + w_right + 1, vis_end) - band_lo, 0) // BLOCK_N
            end_interior = tl.minimum(tl.maximum(end_interior, first_interior), num_band_blocks)

            seq_floor = (seq_len // BLOCK_N) * BLOCK_N
            text_floor = text_start + ((text_end - text_start) // BLOCK_N) * BLOCK_N
            # Loop ranges; an empty range (hi == lo) runs no iteration. Masks only where needed.
            text_plain_hi = tl.where(banded, text_floor, text_start)
            text_tail_hi = tl.where(banded, text_end, text_floor)
            lead_hi = tl.where(banded, band_lo + first_interior * BLOCK_N, band_lo)
            plain_lo = tl.where(banded, band_lo + first_interior * BLOCK_N, 0)
            plain_hi = tl.where(banded, band_lo + end_interior * BLOCK_N, tl.where(full_rows, seq_floor, 0))
            trail_lo = band_lo + end_interior * BLOCK_N
            trail_hi = tl.where(banded, band_hi, trail_lo)
            rule_lo = tl.where(mixed_rows, 0, seq_floor)
            rule_hi = tl.where(banded, rule_lo, seq_len)

            q_ptrs = Q + batch * stride_qb + head.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            k_base = K + batch * stride_kb + head.to(tl.int64) * stride_kh
            v_base = V + batch * stride_vb + head.to(tl.int64) * stride_vh
            # A finite start for the running max keeps fully masked blocks from making NaN.
            m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

            for start_n in range(text_start, text_plain_hi, BLOCK_N):
                acc, m_i, l_i = _attend_key_block(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start_n,
                                                  offs_m, offs_n, offs_d, seq_len, text_start, text_end,
                                                  vis_start, vis_end, w_left, w_right, qk_scale, 0, DOT_PRECISION)
            for start_n in range(text_floor, text_tail_hi, BLOCK_N):
                acc, m_i, l_i = _attend_key_block(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start_n,
                                                  offs_m, offs_n, offs_d, seq_len, text_start, text_end,
                                                  vis_start, vis_end, w_left, w_right, qk_scale, 1, DOT_PRECISION)
            for start_n in range(band_lo, lead_hi, BLOCK_N):
                acc, m_i, l_i = _attend_key_block(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start_n,
                                                  offs_m, offs_n, offs_d, seq_len, text_start, text_end,
                                                  vis_start, vis_end, w_left, w_right, qk_scale, 2, DOT_PRECISION)
            for start_n in range(plain_lo, plain_hi, BLOCK_N):
                acc, m_i, l_i = _attend_key_block(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start_n,
                                                  offs_m, offs_n, offs_d, seq_len, text_start, text_end,
                                                  vis_start, vis_end, w_left, w_right, qk_scale, 0, DOT_PRECISION)
            for start_n in range(trail_lo, trail_hi, BLOCK_N):
                acc, m_i, l_i = _attend_key_block(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start_n,
                                                  offs_m, offs_n, offs_d, seq_len, text_start, text_end,
                                                  vis_start, vis_end, w_left, w_right, qk_scale, 2, DOT_PRECISION)
            for start_n in range(rule_lo, rule_hi, BLOCK_N):
                acc, m_i, l_i = _attend_key_block(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start_n,
                                                  offs_m, offs_n, offs_d, seq_len, text_start, text_end,
                                                  vis_start, vis_end, w_left, w_right, qk_scale, 3, DOT_PRECISION)

            l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows past the sequence end
            tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])


def launch_head_attention(q, k, v, schemes, text_start, text_end, cached, scale, out, config=None,
                          runner=None):
    """Launch the kernel into ``out``. ``runner`` wraps the kernel (``wrap_triton`` inside the op);
    ``config`` overrides KERNEL_CONFIGS (the benchmark sweeps it)."""
    batch, heads, seq_len, head_dim = q.shape
    cfg = dict(config or KERNEL_CONFIGS[head_dim])
    block_m = cfg.pop("BLOCK_M")
    if q.dtype == torch.float32:  # fp32 tiles are twice the bytes: two stages keep K, V in shared memory
        cfg["num_stages"] = min(cfg.get("num_stages", 2), 2)
    # fp32 inputs (test beds' fidelity runs) get IEEE fp32 products, not TF32: the reference's numerics
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    text_start, text_end = (0, 0) if text_end <= text_start else (text_start, text_end)
    vis_start, vis_end = _visual_range(text_start, text_end, seq_len)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    has_cache = cached is not None
    cache = cached if has_cache else out
    kernel = runner(_head_attention_kernel) if runner is not None else _head_attention_kernel
    grid = (triton.cdiv(seq_len, block_m), batch * heads)
    kernel[grid](q, k, v, cache, out, schemes,
                 q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                 v.stride(0), v.stride(1), v.stride(2), cache.stride(0), cache.stride(1), cache.stride(2),
                 out.stride(0), out.stride(1), out.stride(2),
                 heads, seq_len, text_start, text_end, vis_start, vis_end, scale * 1.4426950408889634,
                 HEAD_DIM=head_dim, BLOCK_M=block_m, HAS_CACHE=has_cache, DOT_PRECISION=dot_precision, **cfg)
    return out


# --------------------------------------------------------------------------------------------
# torch.library op
# --------------------------------------------------------------------------------------------

def _check_op_inputs(q, k, v, schemes, cached, scale) -> None:
    """Shape/dtype checks that need no device sync (values are the caller's job: schemes_to_tensor)."""
    if not isinstance(schemes, torch.Tensor) or schemes.dim() != 2 or schemes.shape[1] != 3 \
            or schemes.dtype != torch.int32:
        raise HeadAttentionError("schemes must be an int32 tensor [H, 3]; build it with schemes_to_tensor")
    _check_qkv(q, k, v, schemes.shape[0], cached)
    if scale is not None and not scale > 0:
        raise HeadAttentionError(f"scale must be a positive float, got {scale}")


@torch.library.custom_op("ditbake::head_attention_reference", mutates_args=())
def head_attention_reference_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schemes: torch.Tensor,
                                text_start: int, text_end: int, cached: Optional[torch.Tensor] = None,
                                scale: Optional[float] = None) -> torch.Tensor:
    """The reference as an opaque op: ditbake::head_attention runs it off the CUDA kernel. torch.compile
    and AOTInductor inline a triton_op's body, not its device kernels, and the reference reads the
    table on the host, which fake tensors cannot: an opaque op stays one fallback call in the graph."""
    return head_attention_ref(q, k, v, schemes, (text_start, text_end), cached, scale).contiguous()


@head_attention_reference_op.register_fake
def _head_attention_reference_fake(q, k, v, schemes, text_start, text_end, cached=None, scale=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.triton_op("ditbake::head_attention", mutates_args=())
def head_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schemes: torch.Tensor,
                      text_start: int, text_end: int, cached: Optional[torch.Tensor] = None,
                      scale: Optional[float] = None) -> torch.Tensor:
    # This body is the CUDA kernel, the other devices' kernel and, traced with fake tensors, the meta
    # implementation; compiled graphs inline it, so the reference must be an op here, not a kernel
    # registered beside it (that one would be bypassed and the graph would return uninitialized memory).
    _check_op_inputs(q, k, v, schemes, cached, scale)
    if not HAS_TRITON or q.device.type != "cuda":
        return torch.ops.ditbake.head_attention_reference(q, k, v, schemes, text_start, text_end, cached, scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[-1] not in KERNEL_CONFIGS:
        raise HeadAttentionError(f"the GPU kernel supports head dim {sorted(KERNEL_CONFIGS)}, got {q.shape[-1]}")
    if q.dtype not in KERNEL_DTYPES:
        raise HeadAttentionError(f"the GPU kernel takes bf16, fp16 or fp32, got {q.dtype}; cast q, k, v first")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if cached is not None and cached.stride(-1) != 1:
        cached = cached.contiguous()
    schemes = schemes.to(q.device).contiguous()
    return launch_head_attention(q, k, v, schemes, text_start, text_end, cached, scale, out,
                                 runner=torch.library.wrap_triton)


def head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schemes: SchemesLike,
                   text_range: Tuple[int, int], cached: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Convenience entry: validates schemes when they are host-side, then calls the op.

    Hot paths should build the device schemes tensor once (``schemes_to_tensor(...).to(device)``)
    and call ``torch.ops.ditbake.head_attention`` directly: no host sync per call.
    """
    if not isinstance(schemes, torch.Tensor) or schemes.device.type == "cpu":
        table = schemes_to_tensor(schemes)
        if HeadKind.CACHED in table[:, 0].tolist() and cached is None:
            raise HeadAttentionError("a head is CACHED but no cached output was given; pass cached=[B, H, S, D]")
        schemes = table.to(q.device)
    text_start, text_end = normalize_text_range(text_range, q.shape[2] if q.dim() == 4 else 0)
    return torch.ops.ditbake.head_attention(q, k, v, schemes, text_start, text_end, cached, scale)
