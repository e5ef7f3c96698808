"""The persistent 8-bit GEMM behind ditbake::gemm_w8a8 at large shapes: on CPU the ops stay the
exact-accumulation specification, the dispatch rule keeps small shapes and CPU tensors away from
it, and the opaque op survives export as one node; on the GPU the kernel is bit-identical to
linear_8bit's for INT8 and as close as FP8's accumulation allows, including ragged tails of M, N
and K, and compiles inside a graph."""
import pytest
import torch

import ditbake.plugins.gemm_8bit_persistent as gp
from ditbake.plugins.int8 import matmul_8bit_ref, quantize_rows


def _gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def _operands(m, k, n, fmt, g, device="cpu"):
    qx, sx = quantize_rows(torch.randn(m, k, generator=g), fmt)
    qw, sw = quantize_rows(torch.randn(n, k, generator=g) / k ** 0.5, fmt)
    bias = torch.randn(n, generator=g)
    return [t.to(device) for t in (qx, sx.reshape(-1), qw, sw.reshape(-1), bias)]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_dispatch_rule_keeps_cpu_and_small_shapes_on_the_other_paths():
    qx, _, qw, _, _ = _operands(2048, 4096, 64, "int8", _gen())
    assert not gp.persistent_gemm_applies(qx, qw)  # CPU tensors: the reference
    big = torch.ops.ditbake.gemm_w8a8(*_operands(2048, 4096, 64, "int8", _gen())[:4], None, torch.float32)
    assert big.shape == (2048, 64)  # the op on CPU still answers with the specification


def test_cpu_op_is_the_specification_at_persistent_sizes():
    qx, sx, qw, sw, bias = _operands(1100, 4112, 24, "int8", _gen())  # past MIN_ROWS / MIN_WIDTH
    out = torch.ops.ditbake.gemm_w8a8(qx, sx, qw, sw, bias, torch.float32)
    assert torch.equal(out, matmul_8bit_ref(qx, sx, qw, sw, bias, torch.float32))


def test_opaque_op_is_the_specification_and_exports_as_one_node():
    qx, sx, qw, sw, bias = _operands(40, 64, 24, "int8", _gen())
    out = torch.ops.ditbake.gemm_w8a8_persistent(qx, sx, qw, sw, bias, "bfloat16")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, matmul_8bit_ref(qx, sx, qw, sw, bias, torch.float32).to(torch.bfloat16))

    class M(torch.nn.Module):
        def forward(self, qx):
            return torch.ops.ditbake.gemm_w8a8_persistent(qx, sx, qw, sw, None, "float32")

    ep = torch.export.export(M(), (qx,))
    assert sum("gemm_w8a8_persistent" in str(n.target) for n in ep.graph.nodes) == 1
    assert torch.equal(ep.module()(qx), M()(qx))
    with pytest.raises(ValueError):  # an output dtype the op does not produce
        torch.ops.ditbake.gemm_w8a8_persistent(qx, sx, qw, sw, None, "int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m,k,n", [(4096, 1536, 4608), (2077, 4112, 1000)])  # ragged M, N and K tails
def test_gpu_persistent_kernel_matches_pointer_kernel(fmt, m, k, n):
    from ditbake.plugins.linear_8bit import gemm_8bit

    qx, sx, qw, sw, bias = _operands(m, k, n, fmt, _gen(), "cuda")
    if not gp.persistent_gemm_applies(qx, qw):
        pytest.skip("needs sm90+")
    ptr_cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    pointer = gemm_8bit(qx, sx, qw, sw, bias, torch.bfloat16, ptr_cfg)
    persistent = torch.ops.ditbake.gemm_w8a8_persistent(qx, sx, qw, sw, bias, "bfloat16")
    exact = matmul_8bit_ref(qx.cpu(), sx.cpu(), qw.cpu(), sw.cpu(), bias.cpu(), torch.float32)
    if fmt == "int8":  # exact int32 sums, the same FP32 epilogue
        assert torch.equal(persistent, pointer)
        assert torch.equal(torch.ops.ditbake.gemm_w8a8(qx, sx, qw, sw, bias, torch.bfloat16), persistent)
    # bf16 output rounding (2^-9 relative) dominates; Hopper's FP8 MMA accumulates in reduced
    # precision, which near-zero outputs show as large relative but tiny absolute differences
    assert _rel(persistent.float().cpu(), exact) < 3e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gemm_op_compiles_around_the_persistent_op():
    qx, sx, qw, sw, bias = _operands(2048, 1536, 4608, "int8", _gen(), "cuda")
    if not gp.persistent_gemm_applies(qx, qw):
        pytest.skip("needs sm90+")
    fn = torch.compile(lambda q: torch.ops.ditbake.gemm_w8a8(q, sx, qw, sw, bias, torch.bfloat16), dynamic=False)
    assert torch.equal(fn(qx), torch.ops.ditbake.gemm_w8a8_persistent(qx, sx, qw, sw, bias, "bfloat16"))
