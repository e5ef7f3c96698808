"""Functional building blocks shared by the architectures the runtime implements.

The runtime re-implements each supported architecture in plain torch over a flat weight dict
keyed by the diffusers state-dict names, so production never needs diffusers. The exporter's
tests hold these functions to the diffusers modules' outputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ditbake.runtime.errors import ArtifactError, BackendError

Weights = dict[str, torch.Tensor]


def num_blocks(config: dict) -> int:
    """Transformer blocks of a diffusers DiT config (both supported families name it num_layers)."""
    return int(config["num_layers"])


def heads(config: dict) -> int:
    return int(config["num_attention_heads"])


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a 1-D tensor of timesteps, as diffusers' Timesteps (fp32)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - shift))
    angles = t[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


QUANTIZED_SUFFIXES = (".nvfp4_", ".fp8_", ".int8_")


def is_quantized_tensor(name: str) -> bool:
    """A stored quantized weight or its scales (kept in their own dtypes, never cast)."""
    return any(s in name for s in QUANTIZED_SUFFIXES)


def dense(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    """A plain linear layer `name` (weights `name.weight`, optional `name.bias`)."""
    return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))


class LinearInput:
    """A linear layer's input, made once per format it is read in: the float tensor (the
    composition of torch ops, which Inductor compiles) or, for a W8A8 layer on the GPU, the
    per-token 8-bit codes and scales written directly by a producer kernel
    (plugins/producer_quant.py) — so the quantization costs no pass of its own. Several linears
    may read one input in different formats (q/k/v of one plan may differ)."""

    def __init__(self, make_float, make_8bit=None):
        self._make_float, self._make_8bit, self._made = make_float, make_8bit, {}

    def float(self) -> torch.Tensor:
        if "float" not in self._made:
            self._made["float"] = self._make_float()
        return self._made["float"]

    def provide(self, fmt: str, made) -> "LinearInput":
        """Codes already written for `fmt` (a kernel that made them beside another output)."""
        self._made[fmt] = made
        return self

    def quantized(self, fmt: str):
        """(codes [M, K], scales fp32 [M], (lead shape, float dtype)) in `fmt`, or None where no
        producer kernel applies (CPU runs keep the W8A8 op, one node the ONNX exporter translates)."""
        if self._make_8bit is None:
            return None
        if fmt not in self._made:
            self._made[fmt] = self._make_8bit(fmt)
        return self._made[fmt]


def _8bit_from_producer(x: LinearInput, w: Weights, name: str, precision: str):
    """The W8A8 GEMM on a producer kernel's codes, or None when this layer cannot take them."""
    if eight_bit_format(w, name, precision) is None:
        return None
    made = x.quantized(precision)
    if made is None:
        return None
    q, s, (lead, dtype) = made
    (qw, sw), bias = eight_bit_weight(w, name, precision), w.get(name + ".bias")
    if precision == "fp8":
        from ditbake.plugins.linear_fp8 import gemm_fp8  # noqa: PLC0415

        out = gemm_fp8(q, s, qw, sw, bias, dtype)
    else:
        import ditbake.plugins.linear_8bit  # noqa: F401, PLC0415 - registers ditbake::gemm_w8a8

        out = torch.ops.ditbake.gemm_w8a8(q, s, qw, sw, bias, dtype)
    return out.reshape(*lead, qw.shape[0])


# The norm producer kernel with its INT8 codes by reciprocal + Newton step instead of IEEE division runs
# layer norm + modulation + amax + codes in 97 µs vs 225 µs for Inductor's fusion of the same ops (H200,
# M = 32,760, D = 1,536, norm_quant_h200.json; with division it took 199 µs, which is why it was off
# before); the GELU producer kernel wins too (≈ 0.59 ms vs 1.02 ms). Compiled engines use both.
NORM_PRODUCER_KERNEL = True


def normed_input(h: torch.Tensor, mul: torch.Tensor, add: torch.Tensor, eps: float, make_float=None) -> LinearInput:
    """`(layer_norm(h) * mul + add).type_as(h)` as a linear input; mul / add fp32, broadcast over
    tokens ([B, 1, D] or [1, 1, D]; Wan's modulation passes 1 + scale / shift, an affine norm its
    weight / bias together with its own `make_float`, so the float path keeps its exact ops)."""
    if make_float is None:
        def make_float():
            return (layer_norm(h, None, None, eps) * mul + add).type_as(h)

    def make_8bit(fmt):
        from ditbake.plugins.producer_quant import norm_quant  # noqa: PLC0415

        rows = mul.shape[0]
        q, s = norm_quant(h, mul.reshape(rows, -1).float(), add.reshape(rows, -1).float(), eps, fmt)
        return q, s, (h.shape[:-1], h.dtype)

    return LinearInput(make_float, make_8bit if _norm_kernel_fits(h, mul, add) else None)


def _norm_kernel_fits(h: torch.Tensor, mul: torch.Tensor, add: torch.Tensor) -> bool:
    """Whether the norm producer kernel takes h [B, S, D] with mul / add [B or 1, 1, D] (on the GPU)."""
    return (NORM_PRODUCER_KERNEL and h.is_cuda and h.dim() == 3 and mul.shape == add.shape
            and mul.dim() == 3 and mul.shape[1] == 1 and mul.shape[0] in (1, h.shape[0]))


def residual_update(h: torch.Tensor, a: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """`(h.float() + a * gate).type_as(h)` (gate fp32 [B or 1, 1, D]), or `h + a` without a gate."""
    return h + a if gate is None else (h.float() + a * gate).type_as(h)


def residual_normed_input(h: torch.Tensor, a: torch.Tensor, gate: torch.Tensor | None, mul: torch.Tensor,
                          add: torch.Tensor, eps: float, fmt: str | None = None, float_of=None):
    """`residual_update(h, a, gate)` and the next norm's input `normed_input(new h, mul, add, eps)`
    (`float_of(new h)`: the float path of an affine norm). Returns (new h, LinearInput). With `fmt`, the
    8-bit format that input's reader runs in, on the GPU one kernel (plugins/producer_quant.residual_norm_quant)
    writes the new h and those codes, normalized from registers instead of reading h back."""
    fused = (fmt is not None and _norm_kernel_fits(h, mul, add) and a.shape == h.shape and a.dtype == h.dtype
             and (gate is None or (gate.dim() == 3 and gate.shape[1] == 1 and gate.shape[0] in (1, h.shape[0]))))
    if fused:
        from ditbake.plugins.producer_quant import residual_norm_quant  # noqa: PLC0415

        rows = mul.shape[0]
        gate2 = None if gate is None else gate.reshape(gate.shape[0], -1).float()
        new, q, s = residual_norm_quant(h, a, gate2, mul.reshape(rows, -1).float(), add.reshape(rows, -1).float(),
                                        eps, fmt)
    else:
        new = residual_update(h, a, gate)
    x = normed_input(new, mul, add, eps, make_float=None if float_of is None else lambda: float_of(new))
    return new, (x.provide(fmt, (q, s, (new.shape[:-1], new.dtype))) if fused else x)


def eight_bit_format(stored, name: str, precision: str) -> str | None:
    """The 8-bit format layer `name` reads its input in at `precision` (int8 / fp8 with that weight stored,
    or made from a resident NVFP4 weight), else None."""
    if precision not in ("fp8", "int8"):
        return None
    return precision if linear_format(stored, name, precision) in (precision, NVFP4_AS_8BIT) else None


# The tensors of each stored format of a linear layer `L` (`L.<suffix>`); `L.bias` serves them all.
# `nvfp4_8bit`: a resident NVFP4 weight (marked `L.nvfp4_as_8bit`) turned into the plan's 8-bit weight
# inside the graph at each call (runtime/weights_4bit.py), then the W8A8 kernels as for a stored one.
NVFP4_AS_8BIT = "nvfp4_8bit"
LINEAR_FORMAT_TENSORS = {"bf16": ("weight",), "fp8": ("fp8_weight", "fp8_scale"), "int8": ("int8_weight", "int8_scale"),
                         "nvfp4": ("nvfp4_packed", "nvfp4_block_scales", "nvfp4_global_scale", "nvfp4_hadamard"),
                         NVFP4_AS_8BIT: ("nvfp4_packed", "nvfp4_block_scales", "nvfp4_global_scale", "nvfp4_as_8bit")}


def linear_format(stored, name: str, precision: str) -> str:
    """The stored format `quantizable_linear` runs layer `name` in at `precision` (`stored`: the weight
    names, any container): bf16 its 16-bit weight, fp8 / int8 their 8-bit weights where stored, or the
    resident NVFP4 weight converted per call where marked, else (and for nvfp4) the NVFP4 weight (W4A8)."""
    if precision == "bf16":
        return "bf16"
    if precision in ("fp8", "int8"):
        if f"{name}.{precision}_weight" in stored:
            return precision
        if f"{name}.nvfp4_as_8bit" in stored:
            return NVFP4_AS_8BIT
    return "nvfp4"


def eight_bit_weight(w: Weights, name: str, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [N, K], per-channel scale fp32 [N]) of layer `name` in 8-bit `fmt`: the stored ones, or
    made from its resident NVFP4 weight by torch ops (traced into the engine: memory-bound, ≈ 2 bytes
    moved per weight, against the GEMM's M·K·2 operations per weight at 32k tokens)."""
    if f"{name}.{fmt}_weight" in w:
        return w[f"{name}.{fmt}_weight"], w[f"{name}.{fmt}_scale"]
    from ditbake.runtime.weights_4bit import nvfp4_to_8bit  # noqa: PLC0415

    return nvfp4_to_8bit(w[name + ".nvfp4_packed"], w[name + ".nvfp4_block_scales"], w[name + ".nvfp4_global_scale"], fmt)


def quantizable_linear(x: torch.Tensor | LinearInput, w: Weights, name: str, precision: str) -> torch.Tensor:
    """A linear layer the plan may run at reduced precision; the stored weight format decides the kernel.

    `bf16` runs the stored 16-bit weight. A layer run in 8 bits stores 8-bit weights (W8A8):
    `fp8` reads `name.fp8_weight` (e4m3 [N, K]) and `name.fp8_scale` (fp32 [N]) and runs
    ditbake.plugins.linear_fp8 (per-token activations quantized in-graph, cuBLASLt FP8 GEMM);
    `int8` reads `name.int8_weight` / `name.int8_scale` and runs ditbake.plugins.linear_int8
    (the same in-graph quantization, Triton INT8 GEMM). `nvfp4`
    runs the mixed-precision op on the NVFP4 weight (`name.nvfp4_packed`, `.nvfp4_block_scales`,
    `.nvfp4_global_scale`, Hadamard folded in when `name.nvfp4_hadamard` is present); so does an
    8-bit precision on an artifact that stores only NVFP4 for the layer (W4A8, format of
    artifacts built before 8-bit weights were stored).
    """
    if isinstance(x, LinearInput):
        out = _8bit_from_producer(x, w, name, precision)
        if out is not None:
            return out
        x = x.float()
    fmt = linear_format(w, name, precision)
    if fmt == "bf16":
        return dense(x, w, name)
    if fmt == NVFP4_AS_8BIT:
        fmt = precision
    if fmt == "fp8":
        from ditbake.plugins.linear_fp8 import linear_fp8  # noqa: PLC0415

        return linear_fp8(x, *eight_bit_weight(w, name, "fp8"), w.get(name + ".bias"))
    if fmt == "int8":
        from ditbake.plugins.linear_int8 import linear_int8  # noqa: PLC0415

        return linear_int8(x, *eight_bit_weight(w, name, "int8"), w.get(name + ".bias"))
    packed = w.get(name + ".nvfp4_packed")
    if packed is None:
        raise ArtifactError(f"layer {name} is planned at {precision} but the artifact stores no weight in that "
                            "format for it; rebuild the artifact from this plan")
    try:
        from ditbake.plugins.mixed_linear import mixed_linear  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the plugins build
        raise BackendError(f"precision {precision!r} for {name} needs ditbake.plugins.mixed_linear ({exc}); "
                           "rebuild the plan with bf16") from exc
    return mixed_linear(x, packed, w[name + ".nvfp4_block_scales"], w[name + ".nvfp4_global_scale"],
                        w.get(name + ".bias"), precision, (name + ".nvfp4_hadamard") in w)


def layer_norm(x: torch.Tensor, w: Weights | None, name: str | None, eps: float) -> torch.Tensor:
    """LayerNorm in fp32 (as diffusers' FP32LayerNorm), affine when the weights exist."""
    weight = bias = None
    if w is not None and name is not None:
        weight = w.get(name + ".weight")
        bias = w.get(name + ".bias")
        weight = weight.float() if weight is not None else None
        bias = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def gelu_tanh_mlp(x: torch.Tensor, w: Weights, name: str, precisions: dict[str, str]) -> torch.Tensor:
    """diffusers FeedForward with activation 'gelu-approximate': proj → tanh-GELU → out."""
    up, down = name + ".net.0.proj", name + ".net.2"
    g = _int8_gelu_up(x, w, up, down, precisions)
    if g is None:
        h = quantizable_linear(x, w, up, precisions.get(up, "bf16"))

        def make_8bit(fmt):  # the GELU kernel writes the 8-bit input of a W8A8 down projection directly
            from ditbake.plugins.producer_quant import gelu_quant  # noqa: PLC0415

            return (*gelu_quant(h, fmt), (h.shape[:-1], h.dtype))

        g = LinearInput(lambda: F.gelu(h, approximate="tanh"), make_8bit if h.is_cuda else None)
    return quantizable_linear(g, w, down, precisions.get(down, "bf16"))


def _int8_gelu_up(x, w: Weights, up: str, down: str, precisions: dict[str, str]) -> LinearInput | None:
    """Both projections INT8 on an sm90 GPU with the CUTLASS GEMM: the up projection's epilogue applies
    tanh-GELU and measures each row's max |GELU| (plugins/gemm_w8a8_cutlass.py), so the down
    projection's input — returned as its LinearInput — gets its codes in one pass with no reduction
    (producer_quant.amax_quant) instead of the GELU producer kernel's two passes over the 8,960-wide
    rows. None where that path does not apply."""
    made = int8_gelu_gemm(x, w, up, down, precisions)
    if made is None:
        return None
    h, amax, lead, dtype = made
    from ditbake.plugins.producer_quant import amax_quant  # noqa: PLC0415

    return LinearInput(lambda: h.reshape(*lead, h.shape[-1]),
                       lambda fmt: (*amax_quant(h, amax, fmt), (lead, dtype)))


def int8_gelu_gemm(x, w: Weights, up: str, down: str, precisions: dict[str, str]):
    """The up projection `up` with tanh-GELU and each row's max |GELU| in the CUTLASS GEMM's epilogue, when
    `up` and the layer `down` that reads its output both run INT8 on an sm90 GPU: (h [M, N] bf16, amax fp32
    [M], lead shape, dtype of x), else None. x: a tensor or a LinearInput."""
    if not all(eight_bit_format(w, n, precisions.get(n, "bf16")) == "int8" for n in (up, down)):
        return None
    if not w[up + (".int8_weight" if up + ".int8_weight" in w else ".nvfp4_packed")].is_cuda:
        return None
    (qw, sw), bias = eight_bit_weight(w, up, "int8"), w.get(up + ".bias")
    from ditbake.plugins import gemm_w8a8_cutlass  # noqa: PLC0415
    from ditbake.plugins.int8 import quantize_rows  # noqa: PLC0415

    made = x.quantized("int8") if isinstance(x, LinearInput) else None
    if made is not None:  # a producer kernel wrote the codes
        q, s, (lead, dtype) = made
    else:  # torch ops: Inductor fuses the quantization into the kernel that produced x
        raw = x.float() if isinstance(x, LinearInput) else x
        lead, dtype = raw.shape[:-1], raw.dtype
        q, s = quantize_rows(raw.reshape(-1, raw.shape[-1]), "int8")
    if dtype != torch.bfloat16 or not gemm_w8a8_cutlass.cutlass_gemm_applies(q, qw, torch.bfloat16, bias):
        return None
    h, amax = torch.ops.ditbake.gemm_w8a8_gelu_cutlass(q, s.reshape(-1), qw, sw, bias, 0)
    return h, amax, lead, dtype


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs (x[2i], x[2i+1]); x is [B, S, H, D], cos/sin [1, S, 1, D]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.type_as(x)
