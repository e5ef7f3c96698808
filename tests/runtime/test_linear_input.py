"""LinearInput: a linear layer's input made once per format. The producer-kernel path (8-bit codes
written by the norm / GELU kernel, then the GEMM alone) computes exactly what the float path's
W8A8 op computes — both follow the same per-token specification — and layers without 8-bit
weights, or bf16 layers, read the float tensor."""
import pytest
import torch
import torch.nn.functional as F

from ditbake.plugins.linear_fp8 import quantize_weight_fp8
from ditbake.plugins.linear_int8 import quantize_weight_int8
from ditbake.plugins.producer_quant import gelu_quant, norm_quant
from ditbake.runtime.errors import ArtifactError
from ditbake.runtime.nn import LinearInput, layer_norm, quantizable_linear


def _weights(g, n=24, k=64):
    w = torch.randn(n, k, generator=g)
    out = {"l.weight": w, "l.bias": torch.randn(n, generator=g)}
    out["l.fp8_weight"], out["l.fp8_scale"] = quantize_weight_fp8(w)
    out["l.int8_weight"], out["l.int8_scale"] = quantize_weight_int8(w)
    return out


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_producer_path_equals_the_float_path(fmt):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    h = torch.randn(2, 9, 64, generator=g)
    scale, shift = torch.randn(2, 1, 64, generator=g) * 0.1, torch.randn(2, 1, 64, generator=g) * 0.1
    w = _weights(g)
    made = []

    def make_float():
        made.append("float")
        return (layer_norm(h, None, None, 1e-6) * (1 + scale) + shift).type_as(h)

    def make_8bit(f):  # what normed_input does on the GPU, run here through the CPU references
        made.append(f)
        q, s = norm_quant(h, (1 + scale).reshape(2, 64), shift.reshape(2, 64), 1e-6, f)
        return q, s, (h.shape[:-1], h.dtype)

    x = LinearInput(make_float, make_8bit)
    got = quantizable_linear(x, w, "l", fmt)
    again = quantizable_linear(x, w, "l", fmt)  # a second reader (k after q) reuses the codes
    want = quantizable_linear(make_float(), w, "l", fmt)
    assert got.shape == (2, 9, 24) and torch.equal(got, want) and torch.equal(again, got)
    assert made.count(fmt) == 1
    bf16 = quantizable_linear(x, w, "l", "bf16")  # a bf16 reader of the same input: the float tensor
    torch.testing.assert_close(bf16, F.linear(make_float(), w["l.weight"], w["l.bias"]))


def test_gelu_producer_and_missing_weights():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    h = torch.randn(3, 5, 64, generator=g)
    w = _weights(g)
    x = LinearInput(lambda: F.gelu(h, approximate="tanh"), lambda f: (*gelu_quant(h, f), (h.shape[:-1], h.dtype)))
    assert torch.equal(quantizable_linear(x, w, "l", "int8"),
                       quantizable_linear(F.gelu(h, approximate="tanh"), w, "l", "int8"))
    del w["l.fp8_weight"], w["l.fp8_scale"]
    x_only_float = LinearInput(lambda: h)  # no producer kernel (CPU runs): the float path, same errors
    with pytest.raises(ArtifactError):
        quantizable_linear(x_only_float, {"l.weight": w["l.weight"]}, "l", "fp8")
    with pytest.raises(ArtifactError):
        quantizable_linear(x, {"l.weight": w["l.weight"]}, "l", "fp8")
