"""TensorRT Python plugins ("quickly deployable plugins") for the 8-bit attention ops:
``ditbake::attention_8bit`` (INT8-QK / FP8 head-wise attention, Triton) and ``ditbake::fp8t_attention``
(per-tensor FP8 through cuDNN's fused FP8 SDPA; inputs q, k, v, attributes w_left, w_right, scale;
semantics ``cudnn_sdpa.fp8t_attention_ref``).

UNTESTED against TensorRT: TensorRT cannot be installed on the project's machines. Written to the
TensorRT 10.x documentation of ``tensorrt.plugin`` (register / autotune / impl), as
``trt_plugins.py`` is for ``head_attention``. Importable without tensorrt (``HAS_TENSORRT`` says
whether the plugin was registered); importing it with tensorrt registers the plugin, which TensorRT's
ONNX parser needs to resolve the ``attention_8bit`` nodes (plugin_namespace ``ditbake``) that
``ditbake.exporter.onnx_ops`` emits.

Plugin ``ditbake::attention_8bit``: inputs q, k, v [B, H, S, D] (bf16 or fp16, the kernel's types),
schemes int32 [H, 3]; attributes text_start, text_end, scale, qk_format (``int8`` | ``fp8``); output
[B, H, S, D] like q. Semantics: ``attention_8bit.attention_8bit_ref`` without cached heads.

Only the JIT implementation (``impl``: the Triton kernel through torch on TensorRT's stream; the
exported node asks for it with ``aot=0``), so engines with these nodes need Python and torch at run
time. An ``aot_impl`` (kernels compiled to PTX, as head_attention has) is the next step: the 8-bit
path is two kernels (quantize q/k/v with their per-block scales, then attention), while a TensorRT AOT
plugin launches one.
"""
from __future__ import annotations

import logging
from typing import Tuple

log = logging.getLogger(__name__)

PLUGIN_ID = "ditbake::attention_8bit"
FP8T_PLUGIN_ID = "ditbake::fp8t_attention"

try:  # TensorRT is optional: only machines that build or run TensorRT engines have it.
    import tensorrt as trt
    import tensorrt.plugin as trtp

    HAS_TENSORRT = True
except ImportError:  # pragma: no cover - depends on the machine
    trt = trtp = None
    HAS_TENSORRT = False


def run_plugin(q, k, v, schemes, text_start: int, text_end: int, scale: float, qk_format: str, out) -> None:
    """What the plugin computes, on torch tensors (the impl's body; callable without TensorRT)."""
    import torch  # noqa: PLC0415

    import ditbake.plugins.attention_8bit  # noqa: F401, PLC0415 - registers ditbake::attention_8bit

    out.copy_(torch.ops.ditbake.attention_8bit(q, k, v, schemes, text_start, text_end, None,
                                               scale if scale > 0 else None, qk_format))


def run_fp8t_plugin(q, k, v, w_left: int, w_right: int, scale: float, out) -> None:
    """What the fp8t plugin computes: the composite with cuDNN's FP8 SDPA (the reference on CPU)."""
    import torch  # noqa: PLC0415

    from ditbake.plugins import cudnn_sdpa  # noqa: PLC0415 - registers ditbake::fp8t_attention

    if q.is_cuda and not cudnn_sdpa.load_native():  # the C++ cuDNN ops the composite calls
        raise RuntimeError(f"fp8t plugin: cuDNN ops unavailable ({cudnn_sdpa.unavailable_reason()})")
    out.copy_(torch.ops.ditbake.fp8t_attention(q, k, v, w_left, w_right, scale if scale > 0 else None))


if HAS_TENSORRT:
    import torch  # noqa: E402 - only the JIT implementation needs it

    @trtp.register(PLUGIN_ID)
    def _attention_8bit_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, schemes: trtp.TensorDesc,
                             text_start: int, text_end: int, scale: float, qk_format: str) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(PLUGIN_ID)
    def _attention_8bit_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                                 schemes: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]):
        return [trtp.AutoTuneCombination("FP16|BF16, FP16|BF16, FP16|BF16, INT32, FP16|BF16", "LINEAR")]

    @trtp.impl(PLUGIN_ID)
    def _attention_8bit_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, schemes: trtp.Tensor,
                             text_start: int, text_end: int, scale: float, qk_format: str,
                             outputs: Tuple[trtp.Tensor], stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            qt, kt, vt = (torch.as_tensor(t, device="cuda") for t in (q, k, v))
            run_plugin(qt, kt, vt, torch.as_tensor(schemes, device="cuda"), text_start, text_end, scale, qk_format,
                       torch.as_tensor(outputs[0], device="cuda"))

    @trtp.register(FP8T_PLUGIN_ID)
    def _fp8t_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, w_left: int, w_right: int,
                   scale: float) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(FP8T_PLUGIN_ID)
    def _fp8t_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]):
        return [trtp.AutoTuneCombination("FP16|BF16, FP16|BF16, FP16|BF16, FP16|BF16", "LINEAR")]

    @trtp.impl(FP8T_PLUGIN_ID)
    def _fp8t_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, w_left: int, w_right: int, scale: float,
                   outputs: Tuple[trtp.Tensor], stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            qt, kt, vt = (torch.as_tensor(t, device="cuda") for t in (q, k, v))
            run_fp8t_plugin(qt, kt, vt, w_left, w_right, scale, torch.as_tensor(outputs[0], device="cuda"))

    log.debug("registered TensorRT plugins %s, %s (tensorrt %s)", PLUGIN_ID, FP8T_PLUGIN_ID, trt.__version__)
