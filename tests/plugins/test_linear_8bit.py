"""W8A8 linear op: CPU spec tests, GPU kernels vs an fp64 reference."""
import pytest
import torch

from ditbake.plugins import linear_8bit as l8
from ditbake.plugins.act_quant import act_quant_ref
from ditbake.plugins.int8 import matmul_8bit_ref, quantize_weight_per_channel
from ditbake.plugins.nvfp4 import QuantFormatError


@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_op_equals_reference_composition(fmt, hadamard):
    x = torch.randn(2, 9, 256)
    qw, sw = quantize_weight_per_channel(torch.randn(48, 256), fmt)
    bias = torch.randn(48)
    out = l8.linear_8bit(x, qw, sw, bias, fmt, hadamard)
    qx, sx, _ = act_quant_ref(x, fmt, hadamard)
    ref = matmul_8bit_ref(qx, sx, qw, sw, bias, torch.float32)
    assert out.shape == (2, 9, 48) and torch.equal(out, ref)


def test_hadamard_with_folded_weight_approximates_float_linear():
    from ditbake.plugins.hadamard import fold_hadamard_into_weight

    torch.manual_seed(0)
    x, w = torch.randn(32, 512), torch.randn(64, 512)
    qw, sw = quantize_weight_per_channel(fold_hadamard_into_weight(w), "int8")
    out = l8.linear_8bit(x, qw, sw, None, "int8", True)
    ref = x.double() @ w.double().T
    assert float((out.double() - ref).norm() / ref.norm()) < 0.02  # as test_int8's bound


def test_op_passes_torch_library_checks():
    x = torch.randn(8, 128)
    qw, sw = quantize_weight_per_channel(torch.randn(16, 128), "int8")
    torch.library.opcheck(torch.ops.ditbake.linear_w8a8.default, (x, qw, sw, None, "int8", True),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_input_raises_quant_format_error():
    x = torch.randn(4, 64)
    qw, sw = quantize_weight_per_channel(torch.randn(8, 64), "int8")
    with pytest.raises(QuantFormatError):
        l8.linear_8bit(x, qw, sw, None, "fp8")  # int8 weight with fp8 format
    with pytest.raises(QuantFormatError):
        l8.linear_8bit(torch.randn(4, 32), qw, sw)
    with pytest.raises(QuantFormatError):
        l8.linear_8bit(x, qw, sw.double())
    with pytest.raises(QuantFormatError):
        l8.linear_8bit(x, qw, sw, torch.randn(9))


# ------------------------------------------------------------------------------------ GPU
def _poison_allocator(nbytes: int) -> None:
    t = torch.full((nbytes // 4 + 1,), float("nan"), device="cuda")
    del t


def relative_error(out: torch.Tensor, ref64: torch.Tensor) -> float:
    return float((out.double() - ref64).norm() / ref64.norm())


@pytest.mark.gpu
@pytest.mark.parametrize("m", [32760, 128])
@pytest.mark.parametrize("k, n", [(1536, 1536), (1536, 8960), (8960, 1536)])
@pytest.mark.parametrize("fmt, backend", [("int8", "triton"), ("fp8", "triton"), ("fp8", "scaled_mm")])
def test_w8a8_kernel_vs_fp64(fmt, backend, m, k, n, monkeypatch):
    monkeypatch.setattr(l8, "FP8_GEMM_BACKEND", backend)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    qw, sw = quantize_weight_per_channel(torch.randn(n, k, device="cuda"), fmt)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    _poison_allocator(m * n * 2 + m * k)
    out = l8.linear_8bit(x, qw, sw, bias, fmt, hadamard=True)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    # fp64 product of the reference's dequantized operands.
    qx, sx, _ = act_quant_ref(x, fmt, True)
    xa = qx.double() * sx.double()[:, None]
    wa = qw.double() * sw.double()[:, None]
    ref64 = xa @ wa.T + bias.double()
    # What plain bf16 achieves on the same operands (input rounding, fp32 sums, bf16 output).
    baseline = relative_error(xa.bfloat16() @ wa.bfloat16().T + bias, ref64)
    err = relative_error(out, ref64)
    assert err <= 2 * baseline, (err, baseline)
