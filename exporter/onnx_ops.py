"""ONNX translations of ditbake's custom ops for the `tensorrt` backend (torch.onnx dynamo exporter).

* ``ditbake::linear_w8a8`` (8-bit weights stored per output channel, W8A8): DequantizeLinear of the
  weight (axis 0) and per-token QuantizeLinear/DequantizeLinear of the activations, then MatMul;
* ``ditbake::mixed_linear`` (NVFP4 weights, activations nvfp4 / int8 / fp8 / bf16):
  - weights, every format: the TensorRT-native NVFP4 weight pattern, two DequantizeLinear: the E4M3
    block scales by the FP32 global scale, then the FLOAT4E2M1 weight [N, K] by those scales with
    ``block_size=16`` along K (opset 23). The weight is a graph input: ditbake's packing (element 2i
    in the low nibble) is ONNX's FLOAT4E2M1 layout, so the artifact's uint8 [N, K/2] bytes are
    passed as they are; ``retype_fp4_inputs`` gives those inputs their FLOAT4E2M1 [N, K] type
    after export (the exporter only sees the uint8 tensor).
  - nvfp4 activations: ``trt::TRT_FP4DynamicQuantize`` (dynamic 16-blocks, E4M3 scales) + the same
    two DequantizeLinear. TensorRT wants the op's double-quantization scale to be a build-time
    constant, whereas ditbake's spec uses one FP32 global scale per token (amax/2688); so each
    token is divided by its global scale first, quantized with a constant scale 1, and the GEMM
    output is multiplied by the per-token scale (exact algebra; FP32 rounding differs in the last
    bits, and a code can differ where a value sits on a rounding boundary).
  - int8 / fp8 activations: standard QuantizeLinear/DequantizeLinear pairs; per-token scales
    (blocked Q/DQ, one block = the whole row) and the weight re-quantized per output channel from
    its NVFP4 values, as the spec's W4A8 path does.
  - online Hadamard: a MatMul of 128-blocks with the exact ±1 matrix, then a multiply by
    1/sqrt(b), the order of the reference.
* ``ditbake::head_attention`` → a plugin node ``head_attention`` in domain ``ditbake`` with
  ``plugin_namespace="ditbake"``, ``plugin_version="1"``, ``aot=1`` and the plugin's attributes;
  TensorRT's ONNX parser falls back to the plugin registry for ops it does not know
  (``ditbake.plugins.trt_plugins`` registers it). The per-head table stays a tensor input (an
  int32 [H, 3] initializer): the AOT kernel reads it from device memory, as the Triton kernel does.
  Cached heads are not exported (no cache input); engine_trt refuses those variants up front.
* ``ditbake::attention_8bit`` (INT8-QK / FP8 8-bit head-wise attention) → a plugin node
  ``attention_8bit`` in domain ``ditbake`` with the same attributes plus ``qk_format`` and ``aot=0``:
  TensorRT runs the plugin's JIT implementation (``ditbake.plugins.trt_attention_8bit``, the Triton
  kernel through torch on TensorRT's stream); no AOT kernel yet.
* ``ditbake::fp8t_attention`` (per-tensor FP8 attention through cuDNN's FP8 SDPA, the whole composite:
  smoothing, rotation, quantization, the fused op, dequantization) → a plugin node ``fp8t_attention``
  (attributes w_left, w_right, scale; ``aot=0``: the JIT plugin runs the composite with the cuDNN op).

Translations are plain Python functions traced by the exporter (its onnxscript tracer), so they
can read static shapes and constant inputs. The reference implementations of the custom-domain
ops live in ``onnx_reference_ops``.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx.defs import OpSchema
from onnxscript import values
from onnxscript.onnx_opset import opset23 as op

from ditbake.runtime.errors import BackendError

OPSET = 23
TRT_DOMAIN = "trt"
PLUGIN_DOMAIN = "ditbake"
PLUGIN_NAMESPACE = "ditbake"
PLUGIN_VERSION = "1"
FP4_INPUT_SUFFIX = ".nvfp4_packed"
NVFP4_BLOCK = 16
E2M1_X_E4M3_MAX = 6.0 * 448.0  # amax / this = NVFP4 global scale (nvfp4.py)
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_FORMAT_MAX = {"int8": 127.0, "fp8": 448.0}
_QTYPE = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}


def _schema(name: str, domain: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
            types: list[tuple[str, list[str]]], attributes: list[tuple[str, OpSchema.AttrType]]) -> OpSchema:
    """An OpSchema for the exporter's tracer only (never registered globally: the checker treats
    these domains as opaque, the reference evaluator gets Python implementations)."""
    return OpSchema(name, domain, 1,
                    inputs=[OpSchema.FormalParameter(n, t) for n, t in inputs],
                    outputs=[OpSchema.FormalParameter(n, t) for n, t in outputs],
                    type_constraints=[(t, allowed, "") for t, allowed in types],
                    attributes=[OpSchema.Attribute(n, kind, "", required=False) for n, kind in attributes])


_A = OpSchema.AttrType
FP4_DYNAMIC_QUANTIZE = values.Op(values.Opset(TRT_DOMAIN, 1), "TRT_FP4DynamicQuantize", _schema(
    "TRT_FP4DynamicQuantize", TRT_DOMAIN, [("X", "T1"), ("double_quant_scale", "T4")],
    [("Y", "T2"), ("Y_scale", "T3")],
    [("T1", _FLOAT_TYPES), ("T2", ["tensor(float4e2m1)"]), ("T3", ["tensor(float8e4m3fn)"]), ("T4", _FLOAT_TYPES)],
    [("axis", _A.INT), ("block_size", _A.INT), ("scale_type", _A.INT)]))
HEAD_ATTENTION = values.Op(values.Opset(PLUGIN_DOMAIN, 1), "head_attention", _schema(
    "head_attention", PLUGIN_DOMAIN, [("q", "T"), ("k", "T"), ("v", "T"), ("schemes", "I")], [("out", "T")],
    [("T", _FLOAT_TYPES), ("I", ["tensor(int32)"])],
    [("text_start", _A.INT), ("text_end", _A.INT), ("scale", _A.FLOAT), ("plugin_namespace", _A.STRING),
     ("plugin_version", _A.STRING), ("aot", _A.INT)]))


ATTENTION_8BIT = values.Op(values.Opset(PLUGIN_DOMAIN, 1), "attention_8bit", _schema(
    "attention_8bit", PLUGIN_DOMAIN, [("q", "T"), ("k", "T"), ("v", "T"), ("schemes", "I")], [("out", "T")],
    [("T", _FLOAT_TYPES), ("I", ["tensor(int32)"])],
    [("text_start", _A.INT), ("text_end", _A.INT), ("scale", _A.FLOAT), ("qk_format", _A.STRING),
     ("plugin_namespace", _A.STRING), ("plugin_version", _A.STRING), ("aot", _A.INT)]))


FP8T_ATTENTION = values.Op(values.Opset(PLUGIN_DOMAIN, 1), "fp8t_attention", _schema(
    "fp8t_attention", PLUGIN_DOMAIN, [("q", "T"), ("k", "T"), ("v", "T")], [("out", "T")], [("T", _FLOAT_TYPES)],
    [("w_left", _A.INT), ("w_right", _A.INT), ("scale", _A.FLOAT), ("plugin_namespace", _A.STRING),
     ("plugin_version", _A.STRING), ("aot", _A.INT)]))


# ----------------------------------------------------------------------------- helpers
def _const(value, dtype=np.float32):
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))


def _static_dim(value, axis: int, what: str) -> int:
    dim = value.shape[axis] if value.shape is not None else None
    if not isinstance(dim, int):
        raise BackendError(f"{what} needs a static size along axis {axis}; export with static shape profiles")
    return dim


def _row_scale(x, fmt_max: float):
    """amax / fmt_max per row (last axis), 1 for an all-zero row: nvfp4.per_row_global_scale and
    int8.row_scales, with a true division as the spec asks."""
    amax = op.ReduceMax(op.Abs(x), _const([-1], np.int64), keepdims=1)
    return op.Where(op.Greater(amax, _const(0.0)), op.Div(amax, _const(fmt_max)), _const(1.0))


def _hadamard(x, k: int, rank: int):
    """x H blockwise (hadamard.apply_hadamard): sum with the ±1 matrix, then scale by 1/sqrt(b)."""
    from ditbake.plugins.hadamard import hadamard_block_size, hadamard_sign_matrix  # noqa: PLC0415

    block = hadamard_block_size(k)
    signs = hadamard_sign_matrix(block, dtype=torch.float32).numpy()
    blocks = op.Reshape(x, _const([0] * (rank - 1) + [k // block, block], np.int64))
    rotated = op.Mul(op.MatMul(blocks, _const(signs)), _const(1.0 / math.sqrt(block)))
    return op.Reshape(rotated, _const([0] * (rank - 1) + [k], np.int64))


def nvfp4_weight(packed, block_scales, global_scale):
    """FP32 W [N, K] from the FLOAT4E2M1 weight input: the two-DequantizeLinear NVFP4 pattern."""
    scales = op.DequantizeLinear(block_scales, op.Reshape(global_scale, _const([], np.int64)))
    return op.DequantizeLinear(packed, scales, axis=1, block_size=NVFP4_BLOCK)


def _nvfp4_activation(x):
    """(dequantized NVFP4 x with a unit global scale, per-token global scale [..., 1])."""
    gs = _row_scale(x, E2M1_X_E4M3_MAX)
    q, q_scales = FP4_DYNAMIC_QUANTIZE(op.Div(x, gs), _const(1.0), axis=-1, block_size=NVFP4_BLOCK,
                                       scale_type=onnx.TensorProto.FLOAT8E4M3FN)
    scales = op.DequantizeLinear(q_scales, _const(1.0))
    return op.DequantizeLinear(q, scales, axis=-1, block_size=NVFP4_BLOCK), gs


def _qdq_rows(t, fmt: str, k: int):
    """Symmetric per-row Q/DQ (blocked along the last axis, one block per row)."""
    scale = _row_scale(t, _FORMAT_MAX[fmt])
    q = op.QuantizeLinear(t, scale, axis=-1, block_size=k, output_dtype=_QTYPE[fmt])
    return op.DequantizeLinear(q, scale, axis=-1, block_size=k)


# ----------------------------------------------------------------------------- translations
def mixed_linear(x, packed, block_scales, global_scale, bias=None, act_format: str = "bf16",
                 hadamard: bool = False):
    """ditbake::mixed_linear; the spec is plugins.mixed_linear.mixed_linear_ref."""
    k = _static_dim(x, -1, "mixed_linear")
    x_dtype = x.dtype
    xf = op.Cast(x, to=onnx.TensorProto.FLOAT) if x_dtype != ir.DataType.FLOAT else x
    if hadamard:
        xf = _hadamard(xf, k, len(x.shape))  # a Cast output carries no shape yet
    w = nvfp4_weight(packed, block_scales, global_scale)
    row_scale = None
    if act_format == "nvfp4":
        xa, row_scale = _nvfp4_activation(xf)
    elif act_format in _QTYPE:
        xa = _qdq_rows(xf, act_format, k)
        w = _qdq_rows(w, act_format, k)  # the spec's W4A8: NVFP4 → FP32 → 8-bit per output channel
    elif act_format == "bf16":
        xa = op.Cast(op.Cast(xf, to=onnx.TensorProto.BFLOAT16), to=onnx.TensorProto.FLOAT)
    else:
        raise BackendError(f"mixed_linear activation format {act_format!r} has no ONNX translation")
    out = op.MatMul(xa, op.Transpose(w, perm=[1, 0]))
    if row_scale is not None:
        out = op.Mul(out, row_scale)
    if bias is not None:
        out = op.Add(out, op.Cast(bias, to=onnx.TensorProto.FLOAT) if bias.dtype != ir.DataType.FLOAT else bias)
    return op.Cast(out, to=x_dtype.value) if x_dtype != ir.DataType.FLOAT else out


def linear_w8a8(x, qw, w_scale, bias=None, fmt: str = "int8", hadamard: bool = False):
    """ditbake::linear_w8a8 (8-bit weights per output channel, per-token activations; spec:
    plugins.linear_8bit.linear_w8a8_ref): DequantizeLinear of the stored weight, per-token Q/DQ."""
    if fmt not in _QTYPE:
        raise BackendError(f"linear_w8a8 format {fmt!r} has no ONNX translation")
    k = _static_dim(x, -1, "linear_w8a8")
    x_dtype = x.dtype
    xf = op.Cast(x, to=onnx.TensorProto.FLOAT) if x_dtype != ir.DataType.FLOAT else x
    if hadamard:
        xf = _hadamard(xf, k, len(x.shape))
    w = op.DequantizeLinear(qw, w_scale, axis=0)
    out = op.MatMul(_qdq_rows(xf, fmt, k), op.Transpose(w, perm=[1, 0]))
    if bias is not None:
        out = op.Add(out, op.Cast(bias, to=onnx.TensorProto.FLOAT) if bias.dtype != ir.DataType.FLOAT else bias)
    return op.Cast(out, to=x_dtype.value) if x_dtype != ir.DataType.FLOAT else out


def head_attention(q, k, v, schemes, text_start: int, text_end: int, cached=None, scale: float | None = None):
    """ditbake::head_attention → TensorRT plugin node (spec: plugins.head_attention.head_attention_ref)."""
    if cached is not None:
        raise BackendError("cached attention heads have no TensorRT plugin translation yet; "
                           "build with --backend eager or plan without head caching")
    head_dim = _static_dim(q, -1, "head_attention")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    return HEAD_ATTENTION(q, k, v, schemes, text_start=int(text_start), text_end=int(text_end), scale=scale,
                          plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION, aot=1)


def attention_8bit(q, k, v, schemes, text_start: int, text_end: int, cached=None, scale: float | None = None,
                   qk_format: str = "int8"):
    """ditbake::attention_8bit → TensorRT plugin node (spec: plugins.attention_8bit.attention_8bit_ref)."""
    if cached is not None:
        raise BackendError("cached attention heads have no TensorRT plugin translation yet; "
                           "build with --backend eager or plan without head caching")
    head_dim = _static_dim(q, -1, "attention_8bit")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    return ATTENTION_8BIT(q, k, v, schemes, text_start=int(text_start), text_end=int(text_end), scale=scale,
                          qk_format=str(qk_format), plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
                          aot=0)


def fp8t_attention(q, k, v, w_left: int, w_right: int, scale: float | None = None):
    """ditbake::fp8t_attention → TensorRT plugin node (spec: plugins.cudnn_sdpa.fp8t_attention_ref);
    scale 0 stands for the op's default (1/sqrt(d) in double, as the eager composite computes it)."""
    _static_dim(q, -1, "fp8t_attention")
    scale = 0.0 if scale is None else float(scale)
    return FP8T_ATTENTION(q, k, v, w_left=int(w_left), w_right=int(w_right), scale=scale,
                          plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION, aot=0)


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export (registers the ops first)."""
    import ditbake.plugins.attention_8bit  # noqa: F401, PLC0415 - registers ditbake::attention_8bit
    import ditbake.plugins.cudnn_sdpa  # noqa: F401, PLC0415 - registers ditbake::fp8t_attention
    import ditbake.plugins.head_attention  # noqa: F401, PLC0415 - registers ditbake::head_attention
    import ditbake.plugins.linear_8bit  # noqa: F401, PLC0415 - registers ditbake::linear_w8a8
    import ditbake.plugins.mixed_linear  # noqa: F401, PLC0415 - registers ditbake::mixed_linear

    return {torch.ops.ditbake.mixed_linear.default: mixed_linear,
            torch.ops.ditbake.linear_w8a8.default: linear_w8a8,
            torch.ops.ditbake.head_attention.default: head_attention,
            torch.ops.ditbake.attention_8bit.default: attention_8bit,
            torch.ops.ditbake.fp8t_attention.default: fp8t_attention}


# ----------------------------------------------------------------------------- post-export
def retype_fp4_inputs(model: ir.Model) -> list[str]:
    """Give NVFP4 weight inputs (uint8 [N, K/2], names ending in FP4_INPUT_SUFFIX) their ONNX type
    FLOAT4E2M1 [N, K]: the same bytes, since ONNX packs FLOAT4E2M1 two per byte, element 2i low."""
    changed = []
    for value in model.graph.inputs:
        if value.name.endswith(FP4_INPUT_SUFFIX) and value.dtype == ir.DataType.UINT8:
            n, half_k = value.shape
            value.type = ir.TensorType(ir.DataType.FLOAT4E2M1)
            value.shape = ir.Shape([n, 2 * half_k])
            changed.append(value.name)
    _forget_shapes_downstream(model, changed)
    return changed


def _forget_shapes_downstream(model: ir.Model, names: list[str]) -> None:
    """Drop the shapes the exporter inferred from the uint8 view (ONNX shape inference redoes them)."""
    outputs = {id(v) for v in model.graph.outputs}
    todo = [v for v in model.graph.inputs if v.name in names]
    seen = set()
    while todo:
        for node in [use.node for use in todo.pop().uses()]:
            for out in node.outputs:
                if id(out) not in seen and id(out) not in outputs:
                    seen.add(id(out))
                    out.shape = None
                    todo.append(out)


def ensure_opset_imports(model: ir.Model) -> None:
    """Declare the custom domains the translations used (version 1)."""
    used = {node.domain for node in model.graph.all_nodes()}
    for domain in (TRT_DOMAIN, PLUGIN_DOMAIN):
        if domain in used:
            model.opset_imports.setdefault(domain, 1)
            model.graph.opset_imports.setdefault(domain, 1)
