"""The persistent TMA 8-bit GEMM and its GELU + row-amax epilogue: the CPU path is the
specification (GEMM rounded, tanh-GELU, amax of the rounded result), the one-pass quantization
from a given amax equals per-row quantization, bad operands get typed errors; on the GPU the
kernel is bit-identical to linear_8bit's and the epilogue matches the reference."""
import pytest
import torch
import torch.nn.functional as F

from ditbake.plugins.gemm_8bit_persistent import gelu_gemm_8bit, gemm_w8a8_gelu_ref
from ditbake.plugins.int8 import matmul_8bit_ref, quantize_rows, quantize_with_scales, scales_from_amax
from ditbake.plugins.nvfp4 import QuantFormatError


def _gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def _operands(m, k, n, fmt, g, device="cpu"):
    qx, sx = quantize_rows(torch.randn(m, k, generator=g), fmt)
    qw, sw = quantize_rows(torch.randn(n, k, generator=g) / k ** 0.5, fmt)
    bias = torch.randn(n, generator=g)
    return [t.to(device) for t in (qx, sx.reshape(-1), qw, sw.reshape(-1), bias)]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_cpu_gelu_gemm_is_the_composition(fmt):
    qx, sx, qw, sw, bias = _operands(37, 64, 40, fmt, _gen())
    g, amax = gelu_gemm_8bit(qx, sx, qw, sw, bias, torch.bfloat16)
    lin = matmul_8bit_ref(qx, sx, qw, sw, bias, torch.float32).to(torch.bfloat16)
    assert g.dtype == torch.bfloat16 and amax.dtype == torch.float32 and amax.shape == (37,)
    assert torch.equal(g, F.gelu(lin, approximate="tanh"))
    assert torch.equal(amax, g.float().abs().amax(-1))
    assert float(amax.min()) > 0  # GELU of a non-degenerate row


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantizing_from_a_given_amax_equals_per_row_quantization(fmt):
    x = torch.randn(50, 96, generator=_gen()) * torch.rand(50, 1, generator=_gen()) * 10
    x[3] = 0  # an all-zero row keeps scale 1
    q, s = quantize_rows(x, fmt)
    s2 = scales_from_amax(x.abs().amax(-1, keepdim=True), fmt)
    assert torch.equal(s, s2) and float(s2[3]) == 1.0
    assert torch.equal(quantize_with_scales(x, s2, fmt).view(torch.uint8), q.view(torch.uint8))


def test_bad_operands_get_typed_errors():
    qx, sx, qw, sw, bias = _operands(8, 32, 16, "int8", _gen())
    with pytest.raises(QuantFormatError):
        gelu_gemm_8bit(qx.float(), sx, qw, sw, bias, torch.float32)
    with pytest.raises(QuantFormatError):  # mixed 8-bit formats
        gelu_gemm_8bit(qx, sx, qw.float().to(torch.float8_e4m3fn), sw, bias, torch.float32)
    with pytest.raises(QuantFormatError):  # K mismatch
        gelu_gemm_8bit(qx[:, :16], sx, qw, sw, bias, torch.float32)
    with pytest.raises(QuantFormatError):  # scales of the wrong length
        gelu_gemm_8bit(qx, sx[:4], qw, sw, bias, torch.float32)
    with pytest.raises(QuantFormatError):
        gelu_gemm_8bit(qx, sx, qw, sw, bias[:3], torch.float32)
    with pytest.raises(QuantFormatError):
        scales_from_amax(torch.ones(3), "int4")


def test_gelu_gemm_exports_as_one_node():
    qx, sx, qw, sw, bias = _operands(16, 64, 32, "int8", _gen())

    class M(torch.nn.Module):
        def forward(self, qx):
            return torch.ops.ditbake.gemm_w8a8_gelu(qx, sx, qw, sw, bias, torch.float32)

    ep = torch.export.export(M(), (qx,))
    assert sum("gemm_w8a8_gelu" in str(n.target) for n in ep.graph.nodes) == 1
    for a, b in zip(ep.module()(qx), gemm_w8a8_gelu_ref(qx, sx, qw, sw, bias, torch.float32)):
        assert torch.equal(a, b)



@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m,k,n", [(4096, 1536, 4608), (2077, 4112, 1000)])  # ragged M, N and K tails
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_persistent_kernel_matches_pointer_kernel(fmt, m, k, n):
    from ditbake.plugins.gemm_8bit_persistent import gemm_8bit_persistent, tma_gemm_applies
    from ditbake.plugins.linear_8bit import gemm_8bit

    qx, sx, qw, sw, bias = _operands(m, k, n, fmt, _gen(), "cuda")
    if not tma_gemm_applies(qx, qw):
        pytest.skip("no TMA on this GPU")
    ptr_cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    pointer = gemm_8bit(qx, sx, qw, sw, bias, torch.bfloat16, ptr_cfg)
    persistent = gemm_8bit_persistent(qx, sx, qw, sw, bias, torch.bfloat16)[0]
    if fmt == "int8":  # exact int32 sums, the same FP32 epilogue
        assert torch.equal(persistent, pointer)
    else:  # fp32 accumulation order may differ
        torch.testing.assert_close(persistent.float(), pointer.float(), rtol=1e-2, atol=1e-2)
    exact = matmul_8bit_ref(qx.cpu(), sx.cpu(), qw.cpu(), sw.cpu(), bias.cpu(), torch.float32)
    torch.testing.assert_close(persistent.float().cpu(), exact, rtol=8e-3, atol=8e-3)  # bf16 output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gelu_epilogue_matches_reference():
    qx, sx, qw, sw, bias = _operands(3000, 1536, 4200, "int8", _gen(), "cuda")
    g, amax = gelu_gemm_8bit(qx, sx, qw, sw, bias, torch.bfloat16)
    g_ref, amax_ref = gemm_w8a8_gelu_ref(qx.cpu(), sx.cpu(), qw.cpu(), sw.cpu(), bias.cpu(), torch.bfloat16)
    # MUFU tanh (|err| ~ 2^-11) may move a value by one bf16 ulp (2^-8 relative): nothing more
    torch.testing.assert_close(g.float().cpu(), g_ref.float(), rtol=2 ** -7, atol=2 ** -10)
    assert torch.equal(amax, g.float().abs().amax(-1))  # the amax of exactly what was written
    torch.testing.assert_close(amax.cpu(), amax_ref, rtol=2 ** -7, atol=0)
