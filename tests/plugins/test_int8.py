"""INT8 / FP8 (W8A8) specification tests (CPU)."""
import pytest
import torch

from ditbake.plugins.int8 import (
    dequantize_rows,
    fp8_matmul_ref,
    int8_matmul_ref,
    linear_8bit_ref,
    quantize_activation_per_token,
    quantize_weight_per_channel,
)
from ditbake.plugins.nvfp4 import QuantFormatError


def test_int8_scale_is_amax_over_127_and_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -127.0, 3.49]])
    q, s = quantize_activation_per_token(x, "int8")
    assert float(s[0]) == 1.0
    assert q.dtype == torch.int8
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -127, 3]]


def test_int8_never_produces_minus_128():
    x = torch.randn(64, 256)
    q, _ = quantize_activation_per_token(x, "int8")
    assert int(q.min()) >= -127 and int(q.max()) <= 127


def test_per_channel_weight_scales():
    w = torch.randn(16, 64) * torch.arange(1, 17).float()[:, None]
    q, s = quantize_weight_per_channel(w, "int8")
    assert s.shape == (16,)
    assert torch.allclose(s, w.abs().amax(dim=1) / 127)
    assert (q.abs().amax(dim=1) == 127).all()  # each row's amax maps to 127


def test_zero_rows_get_unit_scale():
    q, s = quantize_activation_per_token(torch.zeros(3, 8), "int8")
    assert torch.equal(s, torch.ones(3)) and torch.equal(q, torch.zeros(3, 8, dtype=torch.int8))
    q, s = quantize_activation_per_token(torch.zeros(3, 8), "fp8")
    assert torch.equal(s, torch.ones(3))


def test_fp8_per_token_relative_error_within_e4m3_bound():
    # E4M3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for normal values (>= 2^-6
    # after scaling); smaller values have an absolute error <= 2^-10 * scale.
    x = torch.randn(32, 512)
    q, s = quantize_activation_per_token(x, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    back = dequantize_rows(q, s)
    err = (back - x).abs()
    bound = torch.maximum(x.abs() * 2**-4, s[:, None] * 2**-10)
    assert (err <= bound * (1 + 1e-6)).all()
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((32,), 448.0))


def test_int8_matmul_is_exact_integer_arithmetic():
    qx = torch.randint(-127, 128, (7, 300), dtype=torch.int8)
    qw = torch.randint(-127, 128, (5, 300), dtype=torch.int8)
    exact = (qx.long()[:, None, :] * qw.long()[None, :, :]).sum(-1)
    out = int8_matmul_ref(qx, torch.ones(7), qw, torch.ones(5), out_dtype=torch.float64)
    assert torch.equal(out, exact.double())


def test_fp8_matmul_rescales_per_row_and_column():
    qx = torch.randn(4, 32).clamp(-448, 448).to(torch.float8_e4m3fn)
    qw = torch.randn(3, 32).to(torch.float8_e4m3fn)
    sx, sw = torch.rand(4) + 0.5, torch.rand(3) + 0.5
    out = fp8_matmul_ref(qx, sx, qw, sw, bias=torch.ones(3), out_dtype=torch.float64)
    ref = (qx.double() * sx.double()[:, None]) @ (qw.double() * sw.double()[:, None]).T + 1
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt, bound", [("int8", 0.02), ("fp8", 0.05)])
def test_w8a8_error_on_gaussian_data(fmt, bound):
    # INT8: per element |err| <= amax/254 with amax ~ 3.5 sigma over 1024 values, i.e. an RMS
    # of ~0.8 % per operand and ~1.1 % on the product: bound 2 %. FP8: 3 mantissa bits give a
    # relative RMS of ~2^-4/sqrt(3) ~ 3.6 % per operand... ~2.5 % measured on the product: 5 %.
    torch.manual_seed(0)
    x, w = torch.randn(64, 1024), torch.randn(96, 1024)
    out = linear_8bit_ref(x, w, None, fmt)
    ref = x.double() @ w.double().T
    assert float((out.double() - ref).norm() / ref.norm()) < bound


def test_bad_input_raises_quant_format_error():
    with pytest.raises(QuantFormatError):
        quantize_activation_per_token(torch.randn(2, 4), "int4")
    with pytest.raises(QuantFormatError):
        quantize_activation_per_token(torch.ones(2, 4, dtype=torch.int32), "int8")
    with pytest.raises(QuantFormatError):
        quantize_weight_per_channel(torch.randn(2, 3, 4), "int8")
    qx = torch.zeros(2, 8, dtype=torch.int8)
    with pytest.raises(QuantFormatError):
        int8_matmul_ref(qx, torch.ones(2), torch.zeros(3, 9, dtype=torch.int8), torch.ones(3))
    with pytest.raises(QuantFormatError):
        int8_matmul_ref(qx.float(), torch.ones(2), torch.zeros(3, 8, dtype=torch.int8), torch.ones(3))
