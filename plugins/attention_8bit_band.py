"""Banded INT8-QK / FP8-PV attention in two passes: the fast kernel for a group of arrow heads sharing
one band, on sm_90+.

Every head of the group is an arrow head (``head_attention`` semantics): a visual query attends every
text key and the visual keys within ``[-w_left, +w_right]`` of its own index; a text query attends every
key. Numerics are ``attention_8bit``'s specification (``attention_8bit_ref`` with an arrow table is the
reference) on the same prepared buffers as ``attention_8bit_dense``. Per block of 64 query rows the key
tiles split in two:
  * **inner pass** — the band's interior, the tiles every row of the block allows whole (from the first
    text tile when the interior starts right after the text; text rows: every tile up to the one holding
    padding): the dense kernel's loop, unmasked, over one contiguous run of tiles; it leaves the
    online-softmax state (accumulator in bf16, running max and sum in fp32) in a scratch buffer.
  * **edge pass** — the rest: the text tiles (visual rows), the band's edge tiles and the padded tile,
    masked by the rule; it resumes from that state, and normalizes and stores the output.
Why two launches: in one Triton kernel a second key loop or the 2-D band mask took the dense loop from
166 to 233-255 registers (two programs per SM instead of three; ``plugins/notes/attention_8bit_band.md``),
while the general kernel (``attention_8bit``: per-column scales, a masked step per band tile) runs a 50 %
band in 85 % of the dense kernel's time. The state round trip costs 2 x 2 bytes per output element.
The resumed softmax is the same online algorithm with the text and edge tiles last, so the result differs from
one loop only in rounding points (within the FP8 slack ``attention_8bit``'s tests allow).

Conditions (``band_supported``): the dense kernel's (INT8, head dim 128, sm_90+, bf16/fp16), bands ≥ 0,
and text tokens either absent or first, a multiple of TEXT_ALIGN of them (Flux: 512; Wan's
self-attention: none), so every tile is all text or all visual.

The op ``ditbake::attention_8bit_band(q, k, v, w_left, w_right, text_end, scale)`` is a
``torch.library.triton_op``; off CUDA it runs the reference through an opaque op (compiled graphs inline
a triton_op's body: see ``attention_8bit_dense``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ditbake.plugins.attention_8bit import (HAS_TRITON, QUANT_BLOCK_K, QUANT_BLOCK_Q, Quantized, _resolve_scale,
                                            _v8_storage, attention_8bit_ref, prepare_8bit)
from ditbake.plugins import attention_8bit_dense
from ditbake.plugins.attention_8bit_dense import DENSE_CONFIGS, _token_major, dense_supported, output_storage
from ditbake.plugins.head_attention import HeadAttentionError, HeadKind, check_qkv_tensors

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ditbake.plugins.attention_8bit_dense import softmax_pv_step, store_output

TEXT_ALIGN = 128  # text tokens fill whole query and key tiles
BAND_CONFIGS = {d: dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], num_warps=c["num_warps"],
                        num_stages=c["num_stages"]) for d, c in DENSE_CONFIGS.items()}
EDGE_CONFIG = dict(num_warps=4, num_stages=2)


def band_supported(q: torch.Tensor, w_left: int, w_right: int, text_range: tuple[int, int]) -> bool:
    """Whether these kernels run the group here: the dense kernel's conditions, a band (w ≥ 0), and text
    tokens either absent or first, a multiple of TEXT_ALIGN of them, fewer than the sequence."""
    text_start, text_end = text_range
    no_text = text_end <= text_start
    text_first = text_start == 0 and text_end % TEXT_ALIGN == 0 and text_end < q.shape[2]
    # through the module: where the dense kernel does not run (its one definition), neither do these
    return attention_8bit_dense.kernel_supports(q) and w_left >= 0 and w_right >= 0 and (no_text or text_first)


def band_tiles(seq_len: int, text_end: int, w_left: int, w_right: int, block_m: int, block_n: int,
               device=None) -> torch.Tensor:
    """Per block of ``block_m`` query rows, the key bounds (lo, inner_lo, inner_hi, hi), int32
    [blocks, 4], multiples of ``block_n``: the inner pass takes [inner_lo, inner_hi), every key of which
    every row of the block allows; the edge pass the text tiles [0, text_end) (visual rows whose inner run
    does not start at 0), [lo, inner_lo) and [inner_hi, hi). Text rows allow every key: their inner run
    is every whole tile, their edge the padded one. Device tensor ops, no host sync (engines and CUDA
    graphs run it on every call)."""
    row_lo = torch.arange(0, seq_len, block_m, device=device, dtype=torch.int64)
    row_hi = torch.clamp(row_lo + block_m, max=seq_len) - 1
    keys_hi, seq_floor = -(-seq_len // block_n) * block_n, (seq_len // block_n) * block_n
    lo = torch.div(torch.clamp(row_lo - w_left, min=text_end), block_n, rounding_mode="floor") * block_n
    hi = torch.maximum(-torch.div(-torch.clamp(row_hi + w_right + 1, max=seq_len), block_n, rounding_mode="floor") * block_n, lo)
    inner_lo = -torch.div(-torch.clamp(row_hi - w_left, min=text_end), block_n, rounding_mode="floor") * block_n
    inner_lo = torch.minimum(torch.maximum(inner_lo, lo), hi)
    inner_hi = torch.div(torch.clamp(row_lo + w_right + 1, max=seq_len), block_n, rounding_mode="floor") * block_n
    inner_hi = torch.minimum(torch.maximum(inner_hi, inner_lo), hi)
    text_rows = row_lo < text_end
    # a visual block whose interior starts at the text tiles runs them in the inner pass: one run [0, inner_hi)
    # at the inner pass's speed instead of four masked tiles in the edge pass (Flux: a quarter of the blocks)
    joined = (row_lo >= text_end) & (inner_lo == text_end) & (text_end > 0)
    zero = torch.zeros_like(lo)
    lo, inner_lo = torch.where(joined, zero, lo), torch.where(joined, zero, inner_lo)
    table = torch.stack([torch.where(text_rows, zero, lo), torch.where(text_rows, zero, inner_lo),
                         torch.where(text_rows, zero + seq_floor, inner_hi), torch.where(text_rows, zero + keys_hi, hi)], 1)
    return table.to(torch.int32)


if HAS_TRITON:
    @triton.jit
    def _band_inner_kernel(Q8, K8, V8T, QS, KS, ACC, ML, TILES, seq_pad,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        k_row = pid_bh * seq_pad
        offs_d = tl.arange(0, HEAD_DIM)
        row_lo = pid_m * BLOCK_M
        rows = row_lo + tl.arange(0, BLOCK_M)
        inner_lo = tl.load(TILES + pid_m * 4 + 1)
        inner_hi = tl.load(TILES + pid_m * 4 + 2)
        # The run starts in the base pointers, with block offsets 0: a runtime offset in make_block_ptr took
        # 233 registers (ptxas for sm_90a), this 168 (three programs per SM, as the dense kernel). The
        # // * tells the compiler the table's multiple of BLOCK_N, so the loads stay 16-byte cp.async.
        inner_lo = (inner_lo // BLOCK_N) * BLOCK_N
        q = tl.load(Q8 + k_row.to(tl.int64) * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :])
        kt_block = tl.make_block_ptr(K8 + (k_row + inner_lo).to(tl.int64) * HEAD_DIM, shape=(HEAD_DIM, seq_pad),
                                     strides=(1, HEAD_DIM), offsets=(0, 0), block_shape=(HEAD_DIM, BLOCK_N),
                                     order=(0, 1))
        v_block = tl.make_block_ptr(V8T + (pid_bh * HEAD_DIM).to(tl.int64) * seq_pad + inner_lo,
                                    shape=(seq_pad, HEAD_DIM), strides=(1, seq_pad), offsets=(0, 0),
                                    block_shape=(BLOCK_N, HEAD_DIM), order=(0, 1))
        q_scale = tl.load(QS + pid_bh * (seq_pad // BLOCK_Q) + row_lo // BLOCK_Q)
        ks_base = KS + pid_bh * (seq_pad // BLOCK_K) + inner_lo // BLOCK_K
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for start_n in range(0, inner_hi - inner_lo, BLOCK_N):  # the dense kernel's loop, on the run
            # this order (scale, K, V) gives 168 registers; K, V, scale gave ptxas 235 for the same instructions
            col_scale = tl.load(ks_base + start_n // BLOCK_K) * q_scale
            k_t = tl.load(kt_block)
            kt_block = tl.advance(kt_block, (0, BLOCK_N))
            v = tl.load(v_block)
            v_block = tl.advance(v_block, (BLOCK_N, 0))
            m_i, l_i, acc = softmax_pv_step(q, k_t, v, col_scale, m_i, l_i, acc, None, False)
        state = pid_bh.to(tl.int64) * seq_pad + rows
        tl.store(ACC + state[:, None] * HEAD_DIM + offs_d[None, :], acc.to(ACC.dtype.element_ty))
        tl.store(ML + state * 2, m_i)
        tl.store(ML + state * 2 + 1, l_i)

    @triton.jit
    def _band_edge_kernel(Q8, K8, V8T, QS, KS, VA, VM, ACC, ML, TILES, O,
                          stride_ob, stride_oh, stride_os,
                          num_heads, seq_len, seq_pad, text_end, w_left, w_right,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        k_row = pid_bh * seq_pad
        offs_d = tl.arange(0, HEAD_DIM)
        row_lo = pid_m * BLOCK_M
        rows = row_lo + tl.arange(0, BLOCK_M)
        lo = tl.load(TILES + pid_m * 4)
        inner_lo = tl.load(TILES + pid_m * 4 + 1)
        inner_hi = tl.load(TILES + pid_m * 4 + 2)
        hi = tl.load(TILES + pid_m * 4 + 3)
        state = pid_bh.to(tl.int64) * seq_pad + rows
        acc = tl.load(ACC + state[:, None] * HEAD_DIM + offs_d[None, :]).to(tl.float32)
        m_i = tl.load(ML + state * 2)
        l_i = tl.load(ML + state * 2 + 1)
        # per row, the keys it allows: [first, last] (text rows: all) plus, for visual rows, the text keys;
        # never padding (softmax_pv_step turns the rest into -inf)
        text_rows = rows < text_end
        first = tl.where(text_rows, 0, rows - w_left)
        last = tl.minimum(tl.where(text_rows, seq_len, rows + w_right), seq_len - 1)
        # three runs in one loop: the text tiles (visual rows whose inner run did not take them), [lo, inner_lo),
        # [inner_hi, hi)
        n_text = text_end
        if row_lo < text_end or inner_lo == 0:
            n_text = 0
        n_left = n_text + inner_lo - lo
        q = tl.load(Q8 + k_row.to(tl.int64) * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :])
        q_scale = tl.load(QS + pid_bh * (seq_pad // BLOCK_Q) + row_lo // BLOCK_Q)
        ks_base = KS + pid_bh * (seq_pad // BLOCK_K)
        k_base = K8 + k_row.to(tl.int64) * HEAD_DIM
        v_base = V8T + (pid_bh * HEAD_DIM).to(tl.int64) * seq_pad
        for tile_n in range(0, n_left + hi - inner_hi, BLOCK_N):
            if tile_n < n_text:
                start_n = tile_n
            elif tile_n < n_left:
                start_n = lo + tile_n - n_text
            else:
                start_n = inner_hi + tile_n - n_left
            start_n = (start_n // BLOCK_N) * BLOCK_N  # the tile alignment, for 16-byte loads
            keys = start_n + tl.arange(0, BLOCK_N)
            k_t = tl.load(k_base + keys[None, :] * HEAD_DIM + offs_d[:, None])
            v = tl.load(v_base + offs_d[None, :] * seq_pad + keys[:, None])
            allowed = ((keys[None, :] >= first[:, None]) | (keys[None, :] < text_end)) & (keys[None, :] <= last[:, None])
            col_scale = tl.load(ks_base + start_n // BLOCK_K) * q_scale
            m_i, l_i, acc = softmax_pv_step(q, k_t, v, col_scale, m_i, l_i, acc, allowed, True)
        store_output(acc, l_i, VA, VM, O, pid_bh, num_heads, stride_ob, stride_oh, stride_os, rows, offs_d, seq_len,
                     HEAD_DIM)


def launch_attention_8bit_band(qz: Quantized, seq_len: int, out: torch.Tensor, w_left: int, w_right: int,
                               text_end: int, config: dict | None = None, runner=None,
                               stats: dict | None = None) -> torch.Tensor:
    """Banded attention of every head on prepared buffers (``prepare_8bit``, V stored [D, S_pad]) into
    ``out`` ([B, H, S, D], contiguous or the view of a contiguous [B, S, H, D])."""
    batch, heads, seq_pad, head_dim = qz.q8.shape
    if not dense_supported(qz):
        raise HeadAttentionError("the banded 8-bit kernels need INT8 q/k, V stored [D, S_pad], head dim in "
                                 f"{tuple(BAND_CONFIGS)} and an sm_90+ GPU")
    cfg = dict(config or BAND_CONFIGS[head_dim])
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    if QUANT_BLOCK_Q % block_m or QUANT_BLOCK_K % block_n or TEXT_ALIGN % block_m or TEXT_ALIGN % block_n:
        raise HeadAttentionError(f"BLOCK_M and BLOCK_N must divide {QUANT_BLOCK_Q} / {QUANT_BLOCK_K} and "
                                 f"{TEXT_ALIGN}, got {block_m}, {block_n}")
    if text_end % TEXT_ALIGN or not 0 <= text_end < seq_len or w_left < 0 or w_right < 0:
        raise HeadAttentionError(f"the banded kernels take text tokens first, a multiple of {TEXT_ALIGN} below the "
                                 f"sequence, and bands ≥ 0; got text_end {text_end}, band ({w_left}, {w_right})")
    out_storage = output_storage(out)
    # a band wider than the sequence is the whole sequence; clamped so row + w stays inside int32 in the kernel
    w_left, w_right = min(w_left, seq_len), min(w_right, seq_len)
    run = runner or (lambda kernel: kernel)
    device = qz.q8.device
    acc = torch.empty(batch * heads, seq_pad, head_dim, dtype=torch.bfloat16, device=device)
    ml = torch.empty(batch * heads, seq_pad, 2, dtype=torch.float32, device=device)
    tiles = band_tiles(seq_len, text_end, w_left, w_right, block_m, block_n, device)
    grid = (triton.cdiv(seq_len, block_m), batch * heads)
    v8t = _v8_storage(qz.v8)
    common = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_Q=QUANT_BLOCK_Q, BLOCK_K=QUANT_BLOCK_K)
    inner = run(_band_inner_kernel)[grid](qz.q8, qz.k8, v8t, qz.q_scale, qz.k_scale, acc, ml, tiles, seq_pad,
                                          **common, **cfg)
    run(_band_edge_kernel)[grid](qz.q8, qz.k8, v8t, qz.q_scale, qz.k_scale, qz.v_amax, qz.v_mean, acc, ml, tiles,
                                 out_storage, out.stride(0), out.stride(1), out.stride(2),
                                 heads, seq_len, seq_pad, text_end, w_left, w_right, **common, **EDGE_CONFIG)
    if stats is not None and hasattr(inner, "n_regs"):  # the inner pass's registers, for the notes
        stats.update(n_regs=inner.n_regs, n_spills=inner.n_spills, shared=inner.metadata.shared)
    return out


# --------------------------------------------------------------------------------------------
# torch.library op
# --------------------------------------------------------------------------------------------

def _arrow_table(heads: int, w_left: int, w_right: int, device) -> torch.Tensor:
    row = torch.tensor([int(HeadKind.ARROW), w_left, w_right], dtype=torch.int32, device=device)
    return row.expand(heads, 3).contiguous()


def _check_band(q: torch.Tensor, w_left: int, w_right: int, text_end: int) -> None:
    if w_left < 0 or w_right < 0:
        raise HeadAttentionError(f"band widths must be ≥ 0, got ({w_left}, {w_right})")
    if not 0 <= text_end < q.shape[2]:
        raise HeadAttentionError(f"text_end must be in [0, {q.shape[2]}) (text tokens first), got {text_end}")


@torch.library.custom_op("ditbake::attention_8bit_band_reference", mutates_args=())
def attention_8bit_band_reference_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_left: int, w_right: int,
                                     text_end: int, scale: Optional[float] = None) -> torch.Tensor:
    """The reference with every head the same arrow band, as an opaque op (see attention_8bit_dense)."""
    table = _arrow_table(q.shape[1], w_left, w_right, q.device)
    ref = attention_8bit_ref(q, k, v, table, (0, text_end), None, scale, "int8")
    return _token_major(q).copy_(ref)


@attention_8bit_band_reference_op.register_fake
def _attention_8bit_band_reference_fake(q, k, v, w_left, w_right, text_end, scale=None):
    return _token_major(q)


@torch.library.triton_op("ditbake::attention_8bit_band", mutates_args=())
def attention_8bit_band_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_left: int, w_right: int,
                           text_end: int, scale: Optional[float] = None) -> torch.Tensor:
    # the CUDA kernels; elsewhere (and for compiled CPU graphs, which inline this body) the opaque reference
    check_qkv_tensors(q, k, v)
    _resolve_scale(scale, q.shape[-1])
    _check_band(q, w_left, w_right, text_end)
    if not HAS_TRITON or q.device.type != "cuda":
        return torch.ops.ditbake.attention_8bit_band_reference(q, k, v, w_left, w_right, text_end, scale)
    if not band_supported(q, w_left, w_right, (0, text_end)):
        raise HeadAttentionError(f"the banded 8-bit kernels take bf16/fp16 with head dim {tuple(BAND_CONFIGS)} on "
                                 f"sm_90+ and text first in multiples of {TEXT_ALIGN}; got {q.dtype}, head dim "
                                 f"{q.shape[-1]}, text_end {text_end}; use ditbake::attention_8bit")
    out = _token_major(q)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    qz = prepare_8bit(q, k, v, scale, "int8", v_transposed=True, runner=torch.library.wrap_triton)
    return launch_attention_8bit_band(qz, q.shape[2], out, w_left, w_right, text_end, runner=torch.library.wrap_triton)
