"""FP8 W8A8 linear (in-graph activation quantization + cuBLASLt): the CPU path is the spec, the
GPU path matches it, and the format beats the bf16 noise floor it should."""
import pytest
import torch

from ditbake.plugins.int8 import matmul_8bit_ref, quantize_rows
from ditbake.plugins.linear_fp8 import check_fp8_linear_args, linear_fp8, linear_fp8_ref, quantize_weight_fp8
from ditbake.plugins.nvfp4 import QuantFormatError


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_cpu_path_is_the_reference_composition():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x, w, bias = torch.randn(3, 7, 64, generator=g), torch.randn(40, 64, generator=g), torch.randn(40, generator=g)
    qw, sw = quantize_weight_fp8(w)
    assert qw.dtype == torch.float8_e4m3fn and sw.shape == (40,)
    qx, sx = quantize_rows(x.reshape(-1, 64), "fp8")
    expected = matmul_8bit_ref(qx, sx.squeeze(-1), qw, sw, bias).reshape(3, 7, 40)
    assert torch.equal(linear_fp8(x, qw, sw, bias), expected)
    # E4M3 keeps 3 mantissa bits: ~2-3 % relative error per element, averaged over K=64 products
    err = _rel(linear_fp8(x, qw, sw, bias), x.double() @ w.double().T + bias.double())
    assert 1e-3 < err < 4e-2


def test_all_zero_rows_and_bad_arguments():
    qw, sw = quantize_weight_fp8(torch.randn(16, 32))
    assert torch.equal(linear_fp8_ref(torch.zeros(4, 32), qw, sw), torch.zeros(4, 16))
    with pytest.raises(QuantFormatError):
        check_fp8_linear_args(torch.randn(4, 32), qw.to(torch.float32), sw, None)
    with pytest.raises(QuantFormatError):
        check_fp8_linear_args(torch.randn(4, 31), qw, sw, None)
    with pytest.raises(QuantFormatError):
        check_fp8_linear_args(torch.randn(4, 32), qw, sw[:3], None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_reference_and_compiles():
    x = torch.randn(4096, 1536, device="cuda", dtype=torch.bfloat16)
    w, bias = torch.randn(8960, 1536, device="cuda"), torch.randn(8960, device="cuda")
    qw, sw = quantize_weight_fp8(w)
    got = linear_fp8(x, qw, sw, bias)
    ref = linear_fp8_ref(x.float().cpu(), qw.cpu(), sw.cpu(), bias.cpu())
    # fp32 accumulation vs exact, plus the bf16 output rounding (2^-9 relative)
    assert _rel(got.float().cpu(), ref) < 4e-3
    # compiled, the quantization fuses into GELU and reads its fp32 result (eager rounds it to bf16
    # first): different FP8 roundings, so both are held to the float result within the FP8 error
    gelu = torch.nn.functional.gelu(x.double())
    exact = gelu @ w.double().T + bias.double()
    compiled = torch.compile(lambda t: linear_fp8(torch.nn.functional.gelu(t), qw, sw, bias))
    assert _rel(compiled(x), exact) < 4e-2 and _rel(linear_fp8(gelu.to(x.dtype), qw, sw, bias), exact) < 4e-2
