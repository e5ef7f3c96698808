"""The CUTLASS INT8 GEMM op: on CPU the specification (exact sums, fp32 epilogue, bf16 out) with
typed errors for every malformed operand, a dispatch rule that keeps CPU tensors and other formats
on the other paths, a content-named build, and export as one node; on an sm90 GPU every tile
configuration bit-identical to the Triton kernels (the same int32 sums and fp32 epilogue), ragged
tails of M and N included, with and without bias, under compile and inside a CUDA graph. The GELU
variant (tanh-GELU and each row's max |GELU| in the epilogue) against its fp32 specification, and the
runtime's fused INT8 MLP against the unfused one."""
import pytest
import torch

import torch.nn.functional as F

import ditbake.plugins.gemm_w8a8_cutlass as gc
import ditbake.plugins.linear_8bit  # noqa: F401 - registers ditbake::gemm_w8a8
from ditbake.plugins.int8 import matmul_8bit_ref, quantize_rows
from ditbake.plugins.nvfp4 import QuantFormatError


def _gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def _operands(m, k, n, g, device="cpu"):
    qx, sx = quantize_rows(torch.randn(m, k, generator=g), "int8")
    qw, sw = quantize_rows(torch.randn(n, k, generator=g) / k ** 0.5, "int8")
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    return [t.to(device) for t in (qx, sx.reshape(-1), qw, sw.reshape(-1), bias)]


def test_cpu_op_is_the_specification():
    qx, sx, qw, sw, bias = _operands(37, 64, 24, _gen())
    for b in (bias, None):
        out = torch.ops.ditbake.gemm_w8a8_cutlass(qx, sx, qw, sw, b)
        assert out.dtype == torch.bfloat16 and out.shape == (37, 24)
        assert torch.equal(out, matmul_8bit_ref(qx, sx, qw, sw, b, torch.float32).to(torch.bfloat16))
    # the empty sum is the bias alone
    empty = torch.ops.ditbake.gemm_w8a8_cutlass(qx[:, :0], sx, qw[:, :0], sw, bias)
    assert torch.equal(empty, bias.expand(37, 24))


@pytest.mark.parametrize("case", ["fp8 operand", "k mismatch", "k not 16-aligned", "n not 8-aligned", "sx dtype",
                                  "sx size", "w_scale size", "bias fp32", "bias size", "config", "config bool"])
def test_malformed_operands_get_a_typed_error(case):
    qx, sx, qw, sw, bias = _operands(8, 32, 16, _gen())
    args = dict(qx=qx, sx=sx, qw=qw, w_scale=sw, bias=bias, config=0)
    bad = {"fp8 operand": dict(qx=qx.float().to(torch.float8_e4m3fn)),
           "k mismatch": dict(qw=qw[:, :16].contiguous()),
           "k not 16-aligned": dict(qx=qx[:, :24].contiguous(), qw=qw[:, :24].contiguous()),
           "n not 8-aligned": dict(qw=qw[:12], w_scale=sw[:12], bias=bias[:12]),
           "sx dtype": dict(sx=sx.double()), "sx size": dict(sx=sx[:4]), "w_scale size": dict(w_scale=sw[:8]),
           "bias fp32": dict(bias=bias.float()), "bias size": dict(bias=bias[:8]),
           "config": dict(config=len(gc.CONFIGS) + 1), "config bool": dict(config=True)}[case]
    args.update(bad)
    with pytest.raises(QuantFormatError):
        gc.check_args(*args.values())
    if case != "config bool":  # the schema turns a bool into an int before the kernel sees it
        with pytest.raises(QuantFormatError):
            torch.ops.ditbake.gemm_w8a8_cutlass(*args.values())


def test_dispatch_rule_keeps_cpu_and_other_formats_away():
    qx, sx, qw, sw, _ = _operands(2048, 64, 32, _gen())
    assert not gc.cutlass_gemm_applies(qx, qw, torch.bfloat16)  # CPU: the Triton op's reference
    # the op's CPU answer through gemm_w8a8 is unchanged
    out = torch.ops.ditbake.gemm_w8a8(qx, sx, qw, sw, None, torch.bfloat16)
    assert torch.equal(out, matmul_8bit_ref(qx, sx, qw, sw, None, torch.float32).to(torch.bfloat16))


def test_build_key_follows_the_sources(tmp_path, monkeypatch):
    """The library's file name is a hash of what built it: a changed source is a new library, not a
    stale one loaded from the cache directory."""
    key = gc.build_key([])
    assert key == gc.build_key([]) and len(key) == 16
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for name in gc.SOURCES + gc.HEADERS:
        (csrc / name).write_bytes((gc.CSRC / name).read_bytes())
    monkeypatch.setattr(gc, "CSRC", csrc)
    assert gc.build_key([]) == key
    (csrc / gc.SOURCES[1]).write_text((csrc / gc.SOURCES[1]).read_text() + "\n// changed\n")
    assert gc.build_key([]) != key


def test_no_cuda_means_unavailable_with_a_reason(monkeypatch):
    monkeypatch.setattr(gc._NATIVE, "loaded", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.load_native() is False
    assert "CUDA" in gc.unavailable_reason()


def test_exports_as_one_node():
    qx, sx, qw, sw, bias = _operands(40, 64, 24, _gen())

    class M(torch.nn.Module):
        def forward(self, qx):
            return torch.ops.ditbake.gemm_w8a8_cutlass(qx, sx, qw, sw, bias, 0)

    ep = torch.export.export(M(), (qx,))
    assert sum("gemm_w8a8_cutlass" in str(n.target) for n in ep.graph.nodes) == 1
    assert torch.equal(ep.module()(qx), M()(qx))


def _cuda_ready():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm90 GPU")
    if not gc.load_native():
        pytest.skip(f"CUTLASS GEMM unavailable: {gc.unavailable_reason()}")


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(len(gc.CONFIGS) + 1))
@pytest.mark.parametrize("m,k,n", [(4096, 1536, 8960), (2077, 4112, 1000), (1100, 8960, 1536)])
def test_gpu_configs_match_the_triton_kernel_bit_for_bit(config, m, k, n):
    _cuda_ready()
    from ditbake.plugins.linear_8bit import gemm_8bit

    qx, sx, qw, sw, bias = _operands(m, k, n, _gen(), "cuda")
    ptr_cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    for b in (bias, None):
        triton_out = gemm_8bit(qx, sx, qw, sw, b, torch.bfloat16, ptr_cfg)
        out = torch.ops.ditbake.gemm_w8a8_cutlass(qx, sx, qw, sw, b, config)
        assert torch.equal(out, triton_out), f"config {config}: max diff {(out.float() - triton_out.float()).abs().max()}"
        exact = matmul_8bit_ref(qx.cpu(), sx.cpu(), qw.cpu(), sw.cpu(), None if b is None else b.cpu(), torch.float32)
        rel = float((out.double().cpu() - exact.double()).norm() / exact.double().norm())
        assert rel < 3e-3  # bf16 output rounding only


@pytest.mark.gpu
def test_gpu_gemm_w8a8_dispatches_to_cutlass_under_compile_and_in_a_cuda_graph():
    _cuda_ready()
    qx, sx, qw, sw, bias = _operands(2048, 1536, 4608, _gen(), "cuda")
    assert gc.cutlass_gemm_applies(qx, qw, torch.bfloat16)
    want = torch.ops.ditbake.gemm_w8a8_cutlass(qx, sx, qw, sw, bias, 0)
    fn = torch.compile(lambda q: torch.ops.ditbake.gemm_w8a8(q, sx, qw, sw, bias, torch.bfloat16), dynamic=False)
    assert torch.equal(fn(qx), want)
    static = qx.clone()
    torch.ops.ditbake.gemm_w8a8_cutlass(static, sx, qw, sw, bias, 0)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.ditbake.gemm_w8a8_cutlass(static, sx, qw, sw, bias, 0)
    fresh = _operands(2048, 1536, 4608, _gen(), "cuda")[0]
    static.copy_(fresh)
    graph.replay()
    assert torch.equal(captured, torch.ops.ditbake.gemm_w8a8_cutlass(fresh, sx, qw, sw, bias, 0))


def test_cpu_gelu_op_is_the_specification():
    qx, sx, qw, sw, bias = _operands(33, 64, 40, _gen())
    h, amax = torch.ops.ditbake.gemm_w8a8_gelu_cutlass(qx, sx, qw, sw, bias)
    pre = matmul_8bit_ref(qx, sx, qw, sw, bias, torch.float32)
    g = F.gelu(pre, approximate="tanh")
    assert h.dtype == torch.bfloat16 and torch.equal(h, g.to(torch.bfloat16))
    assert amax.dtype == torch.float32 and torch.equal(amax, g.abs().amax(-1))
    with pytest.raises(QuantFormatError):  # the GELU op has fewer configurations
        torch.ops.ditbake.gemm_w8a8_gelu_cutlass(qx, sx, qw, sw, bias, len(gc.GELU_CONFIGS) + 1)
    with pytest.raises(QuantFormatError):
        torch.ops.ditbake.gemm_w8a8_gelu_cutlass(qx, sx, qw[:, :48].contiguous(), sw, bias)


def test_quantize_rows_with_a_given_amax_is_one_pass_of_the_same_rule():
    g = _gen()
    x = torch.randn(7, 5, 96, generator=g)
    q, s = quantize_rows(x, "int8")
    q2, s2 = quantize_rows(x, "int8", x.abs().amax(-1))
    assert torch.equal(q, q2) and torch.equal(s, s2)
    # an amax measured before rounding x (a little low): codes saturate at ±127, never wrap
    q3, _ = quantize_rows(x, "int8", x.abs().amax(-1) * (1 - 2 ** -9))
    assert int(q3.abs().max()) == 127 and ((q3.int() - q.int()).abs() <= 1).all()
    zero = quantize_rows(torch.zeros(2, 16), "int8", torch.zeros(2))
    assert torch.equal(zero[0], torch.zeros(2, 16, dtype=torch.int8)) and torch.equal(zero[1], torch.ones(2, 1))
    with pytest.raises(QuantFormatError):
        quantize_rows(x, "int8", x.abs().amax(-1)[:, :2])


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(len(gc.GELU_CONFIGS) + 1))
@pytest.mark.parametrize("m,k,n", [(4096, 1536, 8960), (2077, 4112, 1000)])
def test_gpu_gelu_variant_matches_its_specification(config, m, k, n):
    _cuda_ready()
    qx, sx, qw, sw, bias = _operands(m, k, n, _gen(), "cuda")
    h, amax = torch.ops.ditbake.gemm_w8a8_gelu_cutlass(qx, sx, qw, sw, bias, config)
    want_h, want_amax = gc.gemm_gelu_ref(qx.cpu(), sx.cpu(), qw.cpu(), sw.cpu(), bias.cpu())
    pre = matmul_8bit_ref(qx.cpu(), sx.cpu(), qw.cpu(), sw.cpu(), bias.cpu(), torch.float32)
    # GELU = x (1 + t) / 2 with t = tanh.approx.f32 (|error| <= 2^-10.99): an absolute error up to
    # |x| 2^-12 (relative error unbounded where 1 + t cancels, x << 0), then one bf16 rounding (2^-8);
    # and x itself is the fp32 epilogue's acc·sx·sw + bias, whose roundings are absolute in the two
    # terms: where they cancel (pre-activations of 1e-8 .. 1e-6 on the H200) that dominates
    diff = (h.float().cpu() - want_h.float()).abs()
    product = (pre.double() - bias.cpu().double()).abs().float()
    bound = want_h.float().abs() * 2 ** -7 + pre.abs() * 2 ** -11 + (product + bias.cpu().float().abs()) * 2 ** -22
    assert bool((diff <= bound).all()), f"max {float((diff / bound).max()):.2f} of the bound"
    assert float((h.double().cpu() - want_h.double()).norm() / want_h.double().norm()) < 3e-3
    assert torch.allclose(amax.cpu(), want_amax, rtol=2e-3, atol=1e-6)
    assert bool((amax.cpu() > 0).all())


@pytest.mark.gpu
def test_gpu_fused_int8_mlp_matches_the_unfused_path():
    """runtime.nn's INT8 GELU MLP with the GELU in the up projection's epilogue against the path with the
    GELU producer kernel: the same formats, differing only in where GELU and the bf16 rounding fall."""
    _cuda_ready()
    from ditbake.runtime import nn

    g = _gen()
    dim, hidden = 1536, 8960
    w = {}
    for name, (n, k) in {"ff.net.0.proj": (hidden, dim), "ff.net.2": (dim, hidden)}.items():
        q, s = quantize_rows(torch.randn(n, k, generator=g) / k ** 0.5, "int8")
        w[name + ".int8_weight"], w[name + ".int8_scale"] = q.cuda(), s.reshape(-1).cuda()
        w[name + ".bias"] = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16).cuda()
    x = torch.randn(1, 2048, dim, generator=g).to(torch.bfloat16).cuda()
    precisions = {"ff.net.0.proj": "int8", "ff.net.2": "int8"}
    assert nn._int8_gelu_up(x, w, "ff.net.0.proj", "ff.net.2", precisions) is not None
    fused = nn.gelu_tanh_mlp(x, w, "ff", precisions)
    gc_enabled, gc.ENABLED = gc.ENABLED, False
    try:
        unfused = nn.gelu_tanh_mlp(x, w, "ff", precisions)
    finally:
        gc.ENABLED = gc_enabled
    assert torch.equal(nn.gelu_tanh_mlp(x, w, "ff", precisions), fused)
    rel = float((fused.double() - unfused.double()).norm() / unfused.double().norm())
    assert rel < 1e-2, rel  # INT8 step of the GELU output (~1/254 of the row max) dominates both


@pytest.mark.gpu
def test_gpu_flux_single_block_proj_out_input_matches_the_unfused_path():
    """A Flux single block's proj_out over cat([attention, GELU(proj_mlp)]) with the GELU and its rows' amax
    from the up projection's epilogue and the codes of the concatenation in one pass
    (runtime.arch_flux._attention_beside_gelu) against the unfused path (GELU and cat as torch ops)."""
    _cuda_ready()
    from ditbake.runtime import arch_flux, nn

    g = _gen()
    dim, hidden = 3072, 12288
    w = {}
    for name, (n, k) in {"proj_mlp": (hidden, dim), "proj_out": (dim, dim + hidden)}.items():
        q, s = quantize_rows(torch.randn(n, k, generator=g) / k ** 0.5, "int8")
        w[name + ".int8_weight"], w[name + ".int8_scale"] = q.cuda(), s.reshape(-1).cuda()
        w[name + ".bias"] = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16).cuda()
    x = torch.randn(1, 1536, dim, generator=g).to(torch.bfloat16).cuda()
    a = (torch.randn(1, 1536, dim, generator=g) * 2).to(torch.bfloat16).cuda()
    precisions = {"proj_mlp": "int8", "proj_out": "int8"}
    up = nn.int8_gelu_gemm(x, w, "proj_mlp", "proj_out", precisions)
    assert up is not None
    fused = nn.quantizable_linear(arch_flux._attention_beside_gelu(a, *up), w, "proj_out", "int8")
    mlp = F.gelu(nn.quantizable_linear(x, w, "proj_mlp", "int8"), approximate="tanh")
    unfused = nn.quantizable_linear(torch.cat([a, mlp], dim=2), w, "proj_out", "int8")
    assert fused.shape == unfused.shape == (1, 1536, dim)
    rel = float((fused.double() - unfused.double()).norm() / unfused.double().norm())
    assert rel < 1e-2, rel  # INT8 steps of the input (~1/254 of the row max) dominate both
