"""Dense INT8-QK / FP8-PV attention: the fast kernel for a group of full heads (every query attends
every token; no band, no text rule, no cache) on sm_90+.

Same numerics as ``plugins/attention_8bit.py`` (its module docstring is the specification and its
``attention_8bit_ref`` the reference), on the same prepared buffers (``prepare_8bit``, INT8 q/k, V
stored [D, S_pad]); only the attention loop differs from that module's general kernel:
  * one key scale per tile (BLOCK_N divides QUANT_BLOCK_K), so the row max is taken on the integer
    dot's fp32 bits and the score's scale, the K offset of the int32 -> fp32 bit trick, the running
    max and log2(448) all come off in the exp's single FMA: per score one max, one FMA, one exp2, one
    add and half an E4M3 pack, instead of a further multiply-add and subtract;
  * no masked step: the last tile's keys past the sequence hold zero codes and zero values, so they
    score exactly 0, add nothing to the accumulator, and add one known p each to the row sum, which is
    recomputed once and taken out;
  * BLOCK_M 64 with 4 warps (one warpgroup, 164-167 registers, no spills): three programs per SM, so
    one program's softmax runs beside another's MMAs — the overlap an FA2-style loop lacks inside a
    program (plugins/notes/attention_8bit_dense.md has the measurements, warp specialization included).
The op ``ditbake::attention_8bit_dense(q, k, v, scale)`` is a ``torch.library.triton_op`` (Inductor
and AOTInductor compile it into the engine); off CUDA it calls the reference with every head full
through the opaque ``ditbake::attention_8bit_dense_reference`` op.
"""
from __future__ import annotations

from typing import Optional

import torch

from ditbake.plugins.attention_8bit import (HAS_TRITON, QUANT_BLOCK_K, QUANT_BLOCK_Q, Quantized, _resolve_scale,
                                            _v8_storage, attention_8bit_ref, prepare_8bit)
from ditbake.plugins.head_attention import HeadAttentionError, check_qkv_tensors

if HAS_TRITON:
    import triton
    import triton.language as tl

# Launch parameters per head dim (BLOCK_M divides QUANT_BLOCK_Q, BLOCK_N divides QUANT_BLOCK_K: one q
# and one k scale per tile), measured on the H200 at Wan's and Flux's shapes
# (benchmarks/results/attention_8bit_dense_h200.json). LOADS: "block_ptr" (cp.async through block
# pointers), "tma" (device-side descriptors: 7.85 ms at Wan's shape, but wrong under AOTInductor on torch
# 2.11, tests/plugins/test_attention_8bit_dense.py), "host_tma" (descriptors made at launch: Inductor
# refuses them). Plain pointer tensors took 254 registers and 8.7-9.4 ms; warp specialization 17.5 ms.
LOADS = {"block_ptr": 0, "tma": 1, "host_tma": 2}
DENSE_CONFIGS = {
    128: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2, LOADS="block_ptr", WARP_SPECIALIZE=False),
}


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for device-side tensor descriptors (Triton asks its allocator per launch)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def install_allocator() -> None:
    """Device-side descriptors (LOADS "tma") need Triton's global-scratch allocator, set once per process."""
    triton.set_allocator(_scratch)


if HAS_TRITON:
    @triton.jit
    def softmax_pv_step(q, k_t, v_tile, col_scale, m_i, l_i, acc, allowed, MASKED: tl.constexpr):
        """One key tile of the folded loop, given its K^T tile [D, N], its V tile [N, D] (both loaded by the
        caller, so each kernel keeps its own load path) and the tile's score scale (key scale x query
        scale): the INT8 dot, the int32 -> fp32 bit trick (the fp32 1.5 * 2**23 + qk, exactly), the row max on
        the bits, and the scale, the offset, the max and log2(448) (P's FP8 scale) in the exp's single FMA.
        With MASKED, the scores where ``allowed`` [M, N] is false become -inf: they leave the row max alone
        and get p = exp2(-inf) = 0 (col_scale > 0: the prepare floors every amax); a row with nothing
        allowed in the tile keeps its max, alpha = 1. Returns (m_new, l_i, acc). Shared by the dense and
        the band kernels (attention_8bit_band)."""
        qk_i = tl.dot(q, k_t, out_dtype=tl.int32)
        bits = (qk_i + 0x4B400000).to(tl.float32, bitcast=True)
        if MASKED:
            bits = tl.where(allowed, bits, float("-inf"))
        m_new = tl.maximum(m_i, (tl.max(bits, 1) - 12582912.0) * col_scale)
        p = tl.math.exp2(tl.fma(bits, col_scale, ((8.807354922057604 - 12582912.0 * col_scale) - m_new)[:, None]))
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v_tile)
        return m_new, l_i, acc

    @triton.jit
    def store_output(acc, l_i, VA, VM, O, pid_bh, num_heads, stride_ob, stride_oh, stride_os, rows, offs_d, seq_len,
                     HEAD_DIM: tl.constexpr):
        """Specification step 5 for one block of rows: acc · (v_amax / 448) / l + v_mean, stored in O's dtype at
        (batch, head, row) by O's strides; rows past the sequence are not stored. Shared with the band kernels."""
        l_i = tl.where(l_i > 0.0, l_i, 1.0)  # padding rows only
        v_scale = tl.load(VA + pid_bh * HEAD_DIM + offs_d) * (1.0 / 448.0)
        out = acc * v_scale[None, :] / l_i[:, None] + tl.load(VM + pid_bh * HEAD_DIM + offs_d)[None, :]
        batch = (pid_bh // num_heads).to(tl.int64)
        head = (pid_bh % num_heads).to(tl.int64)
        o_ptrs = O + batch * stride_ob + head * stride_oh + rows[:, None] * stride_os + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(rows < seq_len)[:, None])

    @triton.jit
    def _attention_8bit_dense_kernel(Q8, K8, V8T, QS, KS, VA, VM, O,
                                     stride_ob, stride_oh, stride_os,
                                     num_bh, num_heads, seq_len, seq_pad,
                                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                     BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                                     LOADS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        k_row = pid_bh * seq_pad
        v_row = pid_bh * HEAD_DIM
        offs_d = tl.arange(0, HEAD_DIM)
        if LOADS == 2:  # host-side descriptors, made at launch
            desc_q, desc_k, desc_v = Q8, K8, V8T
            q = desc_q.load([k_row + pid_m * BLOCK_M, 0])
        elif LOADS == 1:  # device-side descriptors: needs Triton's allocator (install_allocator)
            desc_q = tl.make_tensor_descriptor(Q8, shape=[num_bh * seq_pad, HEAD_DIM], strides=[HEAD_DIM, 1],
                                               block_shape=[BLOCK_M, HEAD_DIM])
            desc_k = tl.make_tensor_descriptor(K8, shape=[num_bh * seq_pad, HEAD_DIM], strides=[HEAD_DIM, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
            desc_v = tl.make_tensor_descriptor(V8T, shape=[num_bh * HEAD_DIM, seq_pad], strides=[seq_pad, 1],
                                               block_shape=[HEAD_DIM, BLOCK_N])
            q = desc_q.load([k_row + pid_m * BLOCK_M, 0])
        else:  # block pointers (cp.async pipelined by num_stages): no load masks, the buffers are padded.
            # Plain pointer tensors for K and V took 254 registers (their cp.async addresses stay live
            # across the pipeline stages), block pointers 167 (ptxas for sm_90a): 2 vs 3 programs per SM.
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            q = tl.load(Q8 + k_row.to(tl.int64) * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :])
            kt_block = tl.make_block_ptr(K8 + k_row.to(tl.int64) * HEAD_DIM, shape=(HEAD_DIM, seq_pad),
                                         strides=(1, HEAD_DIM), offsets=(0, 0), block_shape=(HEAD_DIM, BLOCK_N),
                                         order=(0, 1))
            v_block = tl.make_block_ptr(V8T + v_row.to(tl.int64) * seq_pad, shape=(seq_pad, HEAD_DIM),
                                        strides=(1, seq_pad), offsets=(0, 0), block_shape=(BLOCK_N, HEAD_DIM),
                                        order=(0, 1))
        q_scale = tl.load(QS + pid_bh * (seq_pad // BLOCK_Q) + (pid_m * BLOCK_M) // BLOCK_Q)
        ks_base = KS + pid_bh * (seq_pad // BLOCK_K)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        keys_hi = tl.cdiv(seq_len, BLOCK_N) * BLOCK_N
        for start_n in tl.range(0, keys_hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            if LOADS > 0:
                k_t = desc_k.load([k_row + start_n, 0]).T
                v = desc_v.load([v_row, start_n]).T
            else:  # K^T [D, N] (no transpose between the load and the dot); V [N, D] from its [D, S_pad]
                # storage: tokens contiguous, K-major for the FP8 wgmma
                k_t = tl.load(kt_block)
                kt_block = tl.advance(kt_block, (0, BLOCK_N))
                v = tl.load(v_block)
                v_block = tl.advance(v_block, (BLOCK_N, 0))
            # BLOCK_N divides BLOCK_K: one key scale per tile
            col_scale = tl.load(ks_base + start_n // BLOCK_K) * q_scale
            m_i, l_i, acc = softmax_pv_step(q, k_t, v, col_scale, m_i, l_i, acc, None, False)
        # The keys past the sequence in the last tile (zero codes, zero values) were scored exactly 0:
        # nothing reached acc, and each added the same p to l, recomputed here and taken out (no masked
        # step, which would cost a select per score or a second copy of the loop body in registers).
        last_scale = tl.load(ks_base + (keys_hi - BLOCK_N) // BLOCK_K) * q_scale
        zero_bits = tl.full([BLOCK_M], 12582912.0, tl.float32)
        p_pad = tl.math.exp2(tl.fma(zero_bits, last_scale, (8.807354922057604 - 12582912.0 * last_scale) - m_i))
        l_i = l_i - (keys_hi - seq_len) * p_pad
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        store_output(acc, l_i, VA, VM, O, pid_bh, num_heads, stride_ob, stride_oh, stride_os, offs_m, offs_d,
                     seq_len, HEAD_DIM)


def _runs_here(t: torch.Tensor) -> bool:
    """Triton, a CUDA tensor on sm_90+, and a head dim with a launch config."""
    return (HAS_TRITON and t.is_cuda and t.shape[-1] in DENSE_CONFIGS
            and torch.cuda.get_device_capability(t.device)[0] >= 9)


def kernel_supports(q: torch.Tensor) -> bool:
    """Whether the dense kernel runs q's shape here: CUDA sm_90+, bf16/fp16, a head dim with a config."""
    return q.dim() == 4 and q.dtype in (torch.bfloat16, torch.float16) and _runs_here(q)


def dense_supported(qz: Quantized) -> bool:
    """INT8 QK, V stored [D, S_pad], a head dim with a launch config, on sm_90+."""
    return qz.q8.dtype == torch.int8 and not qz.v8.is_contiguous() and _runs_here(qz.q8)


def output_storage(out: torch.Tensor) -> torch.Tensor:
    """The storage tensor behind ``out`` ([B, H, S, D] contiguous, or the view of a contiguous [B, S, H, D]),
    not a transposed view: user kernels in compiled graphs take contiguous buffers, and ``out``'s strides say
    where each head's rows go."""
    storage = out if out.is_contiguous() else out.transpose(1, 2)
    if not storage.is_contiguous():
        raise HeadAttentionError("out must be contiguous [B, H, S, D] or the [B, H, S, D] view of a contiguous "
                                 "[B, S, H, D]")
    return storage


def launch_attention_8bit_dense(qz: Quantized, seq_len: int, out: torch.Tensor, config: dict | None = None,
                                runner=None, stats: dict | None = None) -> torch.Tensor:
    """Dense attention of every head on prepared buffers (``prepare_8bit``) into ``out`` [B, H, S, D]."""
    batch, heads, seq_pad, head_dim = qz.q8.shape
    if not dense_supported(qz):
        raise HeadAttentionError("the dense 8-bit kernel needs INT8 q/k, V stored [D, S_pad], head dim in "
                                 f"{tuple(DENSE_CONFIGS)} and an sm_90+ GPU")
    cfg = dict(config or DENSE_CONFIGS[head_dim])
    block_m, block_n = cfg.pop("BLOCK_M"), cfg["BLOCK_N"]
    if QUANT_BLOCK_Q % block_m or QUANT_BLOCK_K % block_n:
        raise HeadAttentionError(f"BLOCK_M must divide {QUANT_BLOCK_Q} and BLOCK_N {QUANT_BLOCK_K} (one q and one "
                                 f"k scale per tile), got {block_m}, {block_n}")
    loads = cfg.pop("LOADS", "block_ptr")
    if loads not in LOADS:
        raise HeadAttentionError(f"LOADS must be one of {tuple(LOADS)}, got {loads!r}")
    q8, k8, v8t = qz.q8, qz.k8, _v8_storage(qz.v8)
    if loads == "tma":
        install_allocator()  # eager launches; compiled code gets its scratch from Inductor's launcher
    elif loads == "host_tma":
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: PLC0415

        q8 = TensorDescriptor.from_tensor(q8.view(batch * heads * seq_pad, head_dim), [block_m, head_dim])
        k8 = TensorDescriptor.from_tensor(k8.view(batch * heads * seq_pad, head_dim), [block_n, head_dim])
        v8t = TensorDescriptor.from_tensor(v8t.view(batch * heads * head_dim, seq_pad), [head_dim, block_n])
    kernel = runner(_attention_8bit_dense_kernel) if runner is not None else _attention_8bit_dense_kernel
    grid = (triton.cdiv(seq_len, block_m), batch * heads)
    compiled = kernel[grid](q8, k8, v8t, qz.q_scale, qz.k_scale, qz.v_amax, qz.v_mean, output_storage(out),
                 out.stride(0), out.stride(1), out.stride(2),
                 batch * heads, heads, seq_len, seq_pad,
                 HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_Q=QUANT_BLOCK_Q, BLOCK_K=QUANT_BLOCK_K, LOADS=LOADS[loads], **cfg)
    if stats is not None and hasattr(compiled, "n_regs"):  # registers/spills/shared memory, for the notes
        stats.update(n_regs=compiled.n_regs, n_spills=compiled.n_spills, shared=compiled.metadata.shared)
    return out


# --------------------------------------------------------------------------------------------
# torch.library op
# --------------------------------------------------------------------------------------------

def _full_table(heads: int, device) -> torch.Tensor:
    return torch.zeros(heads, 3, dtype=torch.int32, device=device)


def _token_major(q: torch.Tensor) -> torch.Tensor:
    """The op's output: [B, S, H, D] memory, returned as the [B, H, S, D] view. The consumer (the output
    projection) reads tokens as rows, so its flatten of the heads is a view rather than a transposing
    copy. Every path (kernel, reference, fake) returns this layout, so compiled graphs can trust it."""
    batch, heads, seq, dim = q.shape
    return torch.empty(batch, seq, heads, dim, dtype=q.dtype, device=q.device).transpose(1, 2)


@torch.library.custom_op("ditbake::attention_8bit_dense_reference", mutates_args=())
def attention_8bit_dense_reference_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      scale: Optional[float] = None) -> torch.Tensor:
    """The reference with every head full, as an opaque op: ditbake::attention_8bit_dense runs it off the
    CUDA kernel (torch.compile and AOTInductor inline the triton_op's body, and the reference reads its
    table on the host, which fake tensors cannot; an opaque op stays one fallback call in the graph)."""
    ref = attention_8bit_ref(q, k, v, _full_table(q.shape[1], q.device), (0, 0), None, scale, "int8")
    return _token_major(q).copy_(ref)


@attention_8bit_dense_reference_op.register_fake
def _attention_8bit_dense_reference_fake(q, k, v, scale=None):
    return _token_major(q)


@torch.library.triton_op("ditbake::attention_8bit_dense", mutates_args=())
def attention_8bit_dense_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: Optional[float] = None) -> torch.Tensor:
    # This body is the CUDA kernel, the other devices' kernel and, traced with fake tensors, the meta
    # implementation; compiled graphs inline it, so the reference must be an op here, not a kernel
    # registered beside it (that one would be bypassed). Every head is full, so there is no scheme
    # table to check (nor to allocate on each call).
    check_qkv_tensors(q, k, v)
    _resolve_scale(scale, q.shape[-1])
    if not HAS_TRITON or q.device.type != "cuda":
        return torch.ops.ditbake.attention_8bit_dense_reference(q, k, v, scale)
    out = _token_major(q)
    if not kernel_supports(q):
        raise HeadAttentionError(f"the dense 8-bit kernel takes bf16/fp16 with head dim {tuple(DENSE_CONFIGS)} "
                                 f"on sm_90+, got {q.dtype} with head dim {q.shape[-1]}; use ditbake::attention_8bit")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    qz = prepare_8bit(q, k, v, scale, "int8", v_transposed=True, runner=torch.library.wrap_triton)
    return launch_attention_8bit_dense(qz, q.shape[2], out, runner=torch.library.wrap_triton)

