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


def _flux_modulation(g, batch, tokens, dim, device="cpu"):
    h = (torch.randn(batch, tokens, dim, generator=g) * 2 + 0.3).to(torch.bfloat16).to(device)
    scale = (torch.randn(batch, dim, generator=g) * 0.3).to(torch.bfloat16).to(device)
    shift = (torch.randn(batch, dim, generator=g) * 0.3).to(torch.bfloat16).to(device)
    return h, scale, shift


def test_flux_modulated_norm_float_path_and_producer_arguments(monkeypatch):
    """arch_flux._modulated: the float path is diffusers' composition exactly; the norm producer kernel gets the
    modulation that path multiplies by (1 + scale rounded in x's dtype) and the shift, so its codes (the
    specification, run here through the CPU reference) are those of the float path's values up to the
    roundings of the modulated norm: at most two code steps apart, most codes equal."""
    from ditbake.plugins.int8 import quantize_rows
    from ditbake.plugins.producer_quant import norm_quant_ref
    from ditbake.runtime import arch_flux

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    h, scale, shift = _flux_modulation(g, 2, 33, 96)
    seen = []
    real = arch_flux.normed_input
    monkeypatch.setattr(arch_flux, "normed_input", lambda *a, **k: seen.append(a) or real(*a, **k))
    x = arch_flux._modulated(h, scale, shift)
    want = arch_flux._layer_norm(h) * (1 + scale[:, None]) + shift[:, None]
    assert torch.equal(x.float(), want) and x.float().dtype == torch.bfloat16
    assert x.quantized("int8") is None  # no producer kernel off the GPU: the W8A8 op quantizes the float path
    (_, mul, add, eps), = seen
    assert mul.dtype == add.dtype == torch.float32 and mul.shape == add.shape == (2, 1, 96) and eps == arch_flux.NORM_EPS
    q, s = norm_quant_ref(h, mul.reshape(2, 96), add.reshape(2, 96), eps, "int8")
    q_float, s_float = quantize_rows(want.reshape(-1, 96), "int8")
    torch.testing.assert_close(s, s_float.reshape(-1), rtol=2 ** -6, atol=0)  # the row max: <= 1.5 bf16 ulps apart
    # the float path rounds three times in bf16 (norm, product, sum: <= 1.5 ulp = 0.6 % of a value, <= 0.75
    # of a code step at the row max), the kernel once: codes differ by at most 2 steps, about 1 in 10 by one
    step = (q.int() - q_float.int()).abs()
    assert int(step.max()) <= 2 and float((step > 0).float().mean()) < 0.2  # measured ≈ 0.10


@pytest.mark.gpu
def test_gpu_flux_modulated_norm_codes_feed_the_int8_linear():
    """On the GPU the Flux modulated norm's 8-bit readers take the producer kernel's codes: within two code steps of
    the float path's, and the INT8 linear's output within the format's error of the float path's W8A8 op."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs an sm90+ GPU")
    from ditbake.plugins.int8 import quantize_rows
    from ditbake.runtime import arch_flux

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    h, scale, shift = _flux_modulation(g, 1, 4096 + 17, 3072, "cuda")
    x = arch_flux._modulated(h, scale, shift)
    q, s, (lead, dtype) = x.quantized("int8")
    assert lead == h.shape[:-1] and dtype == h.dtype
    q_float, _ = quantize_rows(x.float().reshape(-1, 3072), "int8")
    step = (q.int() - q_float.int()).abs()
    assert int(step.max()) <= 2 and float((step > 0).float().mean()) < 0.2  # measured ≈ 0.10
    w = {k: v.cuda() for k, v in _weights(g, 256, 3072).items()}
    got = quantizable_linear(x, w, "l", "int8")
    want = quantizable_linear(x.float(), w, "l", "int8")
    rel = float((got.double() - want.double()).norm() / want.double().norm())
    assert rel < 1e-2, rel


def _wan_residual(g, device="cpu", width=64, tokens=9):
    h = (torch.randn(2, tokens, width, generator=g) * 2).to(torch.bfloat16).to(device)
    a = torch.randn(2, tokens, width, generator=g).to(torch.bfloat16).to(device)
    gate = torch.randn(2, 1, width, generator=g).to(device)
    mul, add = (1 + 0.1 * torch.randn(2, 1, width, generator=g)).to(device), (0.1 * torch.randn(2, 1, width, generator=g)).to(device)
    return h, a, gate, mul, add


@pytest.mark.parametrize("gated", [True, False])
def test_residual_normed_input_is_the_update_then_the_norm(gated):
    """runtime.nn.residual_normed_input off the GPU: the new h is Wan's update exactly and its input the norm
    of it (an affine norm's own float path through float_of); an 8-bit reader gets the W8A8 op's codes."""
    from ditbake.runtime.nn import residual_normed_input

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    h, a, gate, mul, add = _wan_residual(g)
    gate = gate if gated else None
    new, x = residual_normed_input(h, a, gate, mul, add, 1e-6, "int8")
    want = (h.float() + a * gate).type_as(h) if gated else h + a
    assert torch.equal(new, want)
    assert torch.equal(x.float(), (layer_norm(want, None, None, 1e-6) * mul + add).type_as(h))
    _, x_affine = residual_normed_input(h, a, gate, mul, add, 1e-6, "int8", float_of=lambda t: t * 2)
    assert torch.equal(x_affine.float(), want * 2)
    w = _weights(g, 24, 64)
    assert torch.equal(quantizable_linear(x, w, "l", "int8"), quantizable_linear(x.float(), w, "l", "int8"))


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [True, False])
def test_gpu_residual_normed_input_fused_equals_the_two_steps(gated):
    """On the GPU the fused kernel's new h and codes against the update, then normed_input's producer kernel:
    h equal but for a rare one-ulp FMA rounding, and the INT8 linear reading either input within 1e-3."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs an sm90+ GPU")
    from ditbake.runtime.nn import normed_input, residual_normed_input

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    h, a, gate, mul, add = _wan_residual(g, "cuda", 1536, 4099)
    gate = gate if gated else None
    new, x = residual_normed_input(h, a, gate, mul, add, 1e-6, "int8")
    want = (h.float() + a * gate).type_as(h) if gated else h + a
    assert float((new != want).float().mean()) < 1e-3
    w = {k: v.cuda() for k, v in _weights(g, 256, 1536).items()}
    got = quantizable_linear(x, w, "l", "int8")
    ref = quantizable_linear(normed_input(want, mul, add, 1e-6), w, "l", "int8")
    rel = float((got.double() - ref.double()).norm() / ref.double().norm())
    assert rel < 1e-3, rel
