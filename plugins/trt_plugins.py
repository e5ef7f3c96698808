"""TensorRT Python plugin ("quickly deployable plugin") for ``ditbake::head_attention``.

UNTESTED against TensorRT: TensorRT cannot be installed on the project's machines. Written to
the TensorRT 10.x documentation of ``tensorrt.plugin`` (register / autotune / impl / aot_impl)
and its quickly_deployable_plugins sample. Importable without tensorrt (``HAS_TENSORRT`` says
whether the plugin was registered); importing it with tensorrt registers the plugin, which is
what TensorRT's ONNX parser needs to resolve the ``head_attention`` nodes (plugin_namespace
``ditbake``) that ``ditbake.exporter.onnx_ops`` emits.

Plugin ``ditbake::head_attention``: inputs q, k, v [B, H, S, D] (bf16 or fp16: the kernel's
types; a strongly typed fp32 network finds no format and fails to build), schemes int32 [H, 3];
attributes text_start, text_end, scale; output [B, H, S, D] like q. Semantics:
``head_attention.head_attention_ref`` without cached heads.

* ``aot_impl`` (the one the exported ONNX asks for, ``aot=1``): the Triton kernel of
  ``head_attention`` compiled ahead of time to PTX and embedded in the engine, so engines run
  without Python. TensorRT passes input pointers, then the scalar ``extra_args``, then output
  pointers; ``_trt_head_attention_kernel`` adapts that order to the kernel's.
  Doubt: Triton >= 3.3 appends two pointer parameters (global and profile scratch) to every
  kernel; the PTX compiled here (Triton 3.9, sm_90, verified to compile on CPU) declares 16
  parameters for the 14 the launcher passes. The kernel uses no scratch (checked), but whether
  TensorRT's launcher tolerates the trailing parameters is unverified.
* ``impl`` (JIT, Python at run time): calls the same kernel through torch on TensorRT's stream.
"""
from __future__ import annotations

import logging
import math
from typing import Tuple

from ditbake.plugins._triton_util import HAS_TRITON, tl, triton
from ditbake.plugins.head_attention import KERNEL_CONFIGS, launch_head_attention

if HAS_TRITON:  # the kernel exists only where Triton does (CI and CPU machines run without it)
    from ditbake.plugins.head_attention import _head_attention_kernel

log = logging.getLogger(__name__)

PLUGIN_ID = "ditbake::head_attention"
_LOG2E = 1.4426950408889634

try:  # TensorRT is optional: only machines that build or run TensorRT engines have it.
    import tensorrt as trt
    import tensorrt.plugin as trtp

    HAS_TENSORRT = True
except ImportError:  # pragma: no cover - depends on the machine
    trt = trtp = None
    HAS_TENSORRT = False


if HAS_TRITON:

    @triton.jit
    def _trt_head_attention_kernel(Q, K, V, SCHEMES, stride_b, stride_h, stride_s, num_heads, seq_len,
                                   text_start, text_end, vis_start, vis_end, O,
                                   QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                                   BLOCK_N: tl.constexpr):
        # TensorRT's AOT argument order (inputs, scalars, outputs); q, k, v, out are contiguous
        # [B, H, S, D] tensors of one shape, so they share strides. No cache (HAS_CACHE=False).
        _head_attention_kernel(Q, K, V, O, O, SCHEMES,
                               stride_b, stride_h, stride_s, stride_b, stride_h, stride_s,
                               stride_b, stride_h, stride_s, stride_b, stride_h, stride_s,
                               stride_b, stride_h, stride_s,
                               num_heads, seq_len, text_start, text_end, vis_start, vis_end, QK_SCALE,
                               HEAD_DIM, BLOCK_M, BLOCK_N, False)


def visual_range(text_start: int, text_end: int, seq_len):
    """(vis_start, vis_end) for text first, last or absent (head_attention._visual_range); seq_len
    may be a symbolic TensorRT shape expression."""
    if text_start == text_end:
        return 0, seq_len
    return (text_end, seq_len) if text_start == 0 else (0, text_start)


def compile_aot_kernel(dtype: str, head_dim: int, scale: float, arch: int = 90):
    """Compile the plugin kernel to PTX for `dtype` ('bf16' | 'fp16'); returns triton's compiled
    kernel (``.asm['ptx']``, ``.metadata.name/.num_warps/.shared``). Needs no GPU."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415

    cfg = dict(KERNEL_CONFIGS[head_dim])
    ptr = f"*{dtype}"
    signature = {"Q": ptr, "K": ptr, "V": ptr, "SCHEMES": "*i32", **{n: "i32" for n in (
        "stride_b", "stride_h", "stride_s", "num_heads", "seq_len", "text_start", "text_end", "vis_start",
        "vis_end")}, "O": ptr, "QK_SCALE": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr",
        "BLOCK_N": "constexpr"}
    constexprs = {"QK_SCALE": float(scale) * _LOG2E, "HEAD_DIM": head_dim, "BLOCK_M": cfg["BLOCK_M"],
                  "BLOCK_N": cfg["BLOCK_N"]}
    src = triton.compiler.ASTSource(fn=_trt_head_attention_kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    if getattr(compiled.metadata, "global_scratch_size", 0):
        # TensorRT's AOT launcher passes no scratch buffer, so the kernel must not need one.
        raise RuntimeError("head_attention AOT kernel needs Triton global scratch, which TensorRT does not pass")
    return compiled, cfg


if HAS_TENSORRT:
    import torch  # noqa: E402 - only the JIT implementation needs it

    @trtp.register(PLUGIN_ID)
    def _head_attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, schemes: trtp.TensorDesc,
                             text_start: int, text_end: int, scale: float) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(PLUGIN_ID)
    def _head_attention_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                                 schemes: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]):
        # q, k, v and out share one type; the scheme table is int32; all row-major.
        return [trtp.AutoTuneCombination("FP16|BF16, FP16|BF16, FP16|BF16, INT32, FP16|BF16", "LINEAR")]

    @trtp.impl(PLUGIN_ID)
    def _head_attention_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, schemes: trtp.Tensor,
                             text_start: int, text_end: int, scale: float, outputs: Tuple[trtp.Tensor],
                             stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            qt, kt, vt = (torch.as_tensor(t, device="cuda") for t in (q, k, v))
            st = torch.as_tensor(schemes, device="cuda")
            out = torch.as_tensor(outputs[0], device="cuda")
            launch_head_attention(qt, kt, vt, st, text_start, text_end, None, scale, out)

    @trtp.aot_impl(PLUGIN_ID)
    def _head_attention_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, schemes: trtp.TensorDesc,
                            text_start: int, text_end: int, scale: float, outputs: Tuple[trtp.TensorDesc],
                            tactic: int):
        dims = q.shape_expr
        if not dims[3].is_constant:
            raise ValueError("head_attention plugin needs a build-time head dim")
        head_dim = dims[3].constant_value()
        dtype = {trt.bfloat16: "bf16", trt.float16: "fp16"}[q.dtype]
        compiled, cfg = compile_aot_kernel(dtype, head_dim, scale if scale > 0 else 1.0 / math.sqrt(head_dim))
        batch, heads, seq_len = dims[0], dims[1], dims[2]
        vis_start, vis_end = visual_range(text_start, text_end, seq_len)
        # int32 scalars the kernel takes between the input and output pointers; shapes resolve at run time.
        extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (
            heads * seq_len * head_dim, seq_len * head_dim, head_dim, heads, seq_len, text_start, text_end,
            vis_start, vis_end)])
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(seq_len, cfg["BLOCK_M"])
        launch.grid_y = batch * heads
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        return compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), launch, extra_args

    log.debug("registered TensorRT plugin %s (tensorrt %s)", PLUGIN_ID, trt.__version__)

