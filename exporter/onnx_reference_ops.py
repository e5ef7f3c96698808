"""Python implementations of the non-standard ONNX ops of the `tensorrt` backend, for
``onnx.reference.ReferenceEvaluator``, written from ditbake's reference numerics (plugins/*_ref):

* ``trt::TRT_FP4DynamicQuantize`` — TensorRT's dynamic NVFP4 block quantization: block scales
  ``e4m3(amax_block / (6 * double_quant_scale))``, codes E2M1 round-to-nearest-even of
  ``x / (scale * double_quant_scale)`` (nvfp4.quantize_nvfp4_unchecked with that global scale).
* ``ditbake::head_attention`` — the plugin node; plugins.head_attention.head_attention_ref.
* ``ditbake::attention_8bit`` — the plugin node; plugins.attention_8bit.attention_8bit_ref.
* ``ditbake::fp8t_attention`` — the plugin node; plugins.cudnn_sdpa.fp8t_attention_ref.

Also converts runtime tensors into evaluator feeds: bf16 / e4m3 as ml_dtypes arrays, and the
NVFP4 weights (uint8 [N, K/2]) as FLOAT4E2M1 [N, K] (one element per value, as numpy holds it).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from ditbake.plugins.attention_8bit import attention_8bit_ref
from ditbake.plugins.cudnn_sdpa import fp8t_attention_ref
from ditbake.plugins.head_attention import head_attention_ref
from ditbake.plugins.nvfp4 import e2m1_to_float, quantize_nvfp4_unchecked, unpack_e2m1
from ditbake.runtime.errors import BackendError


class TRT_FP4DynamicQuantize(OpRun):  # noqa: N801 - the class name is the ONNX op type
    op_domain = "trt"

    def _run(self, x, double_quant_scale, axis=-1, block_size=16, scale_type=onnx.TensorProto.FLOAT8E4M3FN):
        if axis not in (-1, x.ndim - 1) or block_size != 16 or scale_type != onnx.TensorProto.FLOAT8E4M3FN:
            raise BackendError(f"TRT_FP4DynamicQuantize reference covers axis=-1, block_size=16, E4M3 scales; got "
                               f"axis={axis}, block_size={block_size}, scale_type={scale_type}")
        xt = torch.from_numpy(np.array(x, dtype=np.float32))
        gs = torch.tensor(float(np.asarray(double_quant_scale, dtype=np.float32).reshape(())))
        t = quantize_nvfp4_unchecked(xt, gs)
        values = e2m1_to_float(unpack_e2m1(t.packed)).reshape(xt.shape)
        return (values.numpy().astype(ml_dtypes.float4_e2m1fn),
                t.block_scales.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn))


class head_attention(OpRun):  # noqa: N801 - the class name is the ONNX op type
    op_domain = "ditbake"

    def _run(self, q, k, v, schemes, text_start=0, text_end=0, scale=None, plugin_namespace=None,
             plugin_version=None, aot=None):
        qt, kt, vt = (torch.from_numpy(np.array(a, dtype=np.float32)) for a in (q, k, v))
        out = head_attention_ref(qt, kt, vt, torch.from_numpy(np.array(schemes)), (text_start, text_end),
                                 None, scale)
        return (out.numpy().astype(q.dtype),)


class attention_8bit(OpRun):  # noqa: N801 - the class name is the ONNX op type
    op_domain = "ditbake"

    def _run(self, q, k, v, schemes, text_start=0, text_end=0, scale=None, qk_format=b"int8",
             plugin_namespace=None, plugin_version=None, aot=None):
        qt, kt, vt = (torch.from_numpy(np.array(a, dtype=np.float32)) for a in (q, k, v))
        fmt = qk_format.decode() if isinstance(qk_format, bytes) else qk_format
        out = attention_8bit_ref(qt, kt, vt, torch.from_numpy(np.array(schemes)), (text_start, text_end),
                                 None, scale, fmt)
        return (out.numpy().astype(q.dtype),)


class fp8t_attention(OpRun):  # noqa: N801 - the class name is the ONNX op type
    op_domain = "ditbake"

    def _run(self, q, k, v, w_left=-1, w_right=-1, scale=None, plugin_namespace=None, plugin_version=None, aot=None):
        qt, kt, vt = (torch.from_numpy(np.array(a, dtype=np.float32)) for a in (q, k, v))
        scale = float(scale) if scale is not None and scale > 0 else None  # 0: the op's default 1/sqrt(d)
        return (fp8t_attention_ref(qt, kt, vt, int(w_left), int(w_right), scale).numpy().astype(q.dtype),)


NEW_OPS = (TRT_FP4DynamicQuantize, head_attention, attention_8bit, fp8t_attention)


def evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    return ReferenceEvaluator(model, new_ops=list(NEW_OPS))


def to_feed(tensor: torch.Tensor, elem_type: int) -> np.ndarray:
    """A runtime tensor as the evaluator expects the graph input of ONNX type `elem_type`."""
    t = tensor.detach().cpu().contiguous()
    if elem_type == onnx.TensorProto.FLOAT4E2M1:
        values = e2m1_to_float(unpack_e2m1(t.view(torch.uint8)))
        return values.numpy().astype(ml_dtypes.float4_e2m1fn)
    if elem_type == onnx.TensorProto.FLOAT8E4M3FN:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    if elem_type == onnx.TensorProto.BFLOAT16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def run(model: onnx.ModelProto, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """Execute `model` on positional torch inputs; outputs as fp32 torch tensors."""
    feeds = {i.name: to_feed(a, i.type.tensor_type.elem_type) for i, a in zip(model.graph.input, args)}
    return [torch.from_numpy(np.array(o, dtype=np.float32)) for o in evaluator(model).run(None, feeds)]
