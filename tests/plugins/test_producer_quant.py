"""Producer kernels that emit 8-bit activations (layer norm × mul + add, tanh-GELU): the
references are the runtime's compositions followed by per-token quantization, the ops trace into
one graph node, bad input gets a typed error, and on the GPU the kernels reproduce the reference
codes except at rounding boundaries."""
import pytest
import torch
import torch.nn.functional as F

from ditbake.plugins.int8 import dequantize_rows, quantize_rows
from ditbake.plugins.nvfp4 import QuantFormatError
from ditbake.plugins import producer_quant
from ditbake.plugins.producer_quant import (amax_quant, cat_amax_quant, gelu_quant, gelu_quant_ref, norm_quant,
                                            norm_quant_ref, quantize_cat_with_amax, quantize_gelu_output,
                                            quantize_norm_output, quantize_residual_norm_output,
                                            quantize_with_amax, residual_norm_quant, row_quant)


def _gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def _interpreted(monkeypatch, **launch) -> None:
    """Run the module's kernels under Triton's interpreter (kernel logic only) with these launch options."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name, value in launch.items():
        monkeypatch.setattr(producer_quant, name, value)


def assert_reciprocal_codes(got: torch.Tensor, want: torch.Tensor) -> None:
    """INT8 codes by reciprocal + Newton step vs IEEE division's: off by one at a .5 boundary at most, rarely."""
    step = (got.float() - want.float()).abs()
    assert float(step.max()) <= 1 and float((step > 0).float().mean()) < 1e-5


def assert_row_codes(got: torch.Tensor, want: torch.Tensor, fmt: str, reciprocal: bool = True) -> None:
    """A kernel's codes vs quantize_rows': INT8 through the reciprocal store as above, otherwise the same codes
    (no reduction, no reordering)."""
    if reciprocal and fmt == "int8":
        assert_reciprocal_codes(got, want)
    else:
        assert torch.equal(got.float(), want.float())


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_norm_reference_is_the_runtime_composition(fmt):
    g = _gen()
    x = (torch.randn(2, 33, 96, generator=g) * 3 + 1).to(torch.bfloat16)
    scale, shift = torch.randn(2, 1, 96, generator=g) * 0.2, torch.randn(2, 1, 96, generator=g) * 0.2
    composed = (F.layer_norm(x.float(), (96,), eps=1e-6) * (1 + scale) + shift).type_as(x)  # arch_wan
    q_expected, s_expected = quantize_rows(composed.reshape(-1, 96), fmt)
    q, s = norm_quant(x, (1 + scale).reshape(2, 96), shift.reshape(2, 96), 1e-6, fmt)
    assert q.shape == (66, 96) and s.shape == (66,)
    assert torch.equal(q, q_expected) and torch.equal(s, s_expected.reshape(-1))
    # a shared (R = 1) affine: what an affine layer norm passes
    w, b = torch.randn(1, 96, generator=g), torch.randn(1, 96, generator=g)
    affine = F.layer_norm(x.float(), (96,), w[0], b[0], 1e-6).type_as(x)
    q1, s1 = norm_quant(x, w, b, 1e-6, fmt)
    err = (dequantize_rows(q1, s1) - affine.reshape(-1, 96).float()).norm() / affine.float().norm()
    assert float(err) < (0.012 if fmt == "int8" else 0.04)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_gelu_reference_is_the_runtime_composition(fmt):
    h = (torch.randn(5, 7, 200, generator=_gen()) * 2).to(torch.bfloat16)
    q, s = gelu_quant(h, fmt)
    q_expected, s_expected = quantize_rows(F.gelu(h, approximate="tanh").reshape(-1, 200), fmt)
    assert torch.equal(q, q_expected) and torch.equal(s, s_expected.reshape(-1))
    assert torch.equal(gelu_quant_ref(h, fmt)[0], q)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_amax_quant_is_quantize_rows_with_the_given_amax(fmt):
    h = (torch.randn(37, 1000, generator=_gen()) * 2).to(torch.bfloat16)
    amax = h.float().abs().amax(-1)
    q, s = quantize_with_amax(h, amax, fmt)
    q_expected, s_expected = quantize_rows(h, fmt)
    assert torch.equal(q, q_expected) and torch.equal(s, s_expected.reshape(-1))


def test_amax_quant_kernel_tiles_cover_ragged_edges(monkeypatch):
    """The 2-D tiled kernel under Triton's interpreter (kernel logic only), with tiles that do not divide
    M or K: every code and scale where the reference puts it (int8: the interpreter rounds exactly)."""
    # the exact path (IEEE division); the GPU test covers both
    _interpreted(monkeypatch, AMAX_ROWS=4, AMAX_COLS=64, AMAX_RECIPROCAL=False)
    h = torch.randn(9, 150, generator=_gen()) * 3
    amax = h.abs().amax(-1)
    amax[3] = 0.0  # a row whose producer saw only zeros: scale 1, codes of h / 1 clamped
    q, s = amax_quant(h, amax, "int8")
    q_expected, s_expected = quantize_rows(h, "int8", amax)
    assert torch.equal(s, s_expected.reshape(-1))
    assert torch.equal(q, q_expected)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_cat_amax_quant_is_quantize_rows_of_the_concatenation(fmt):
    g = _gen()
    a = (torch.randn(37, 96, generator=g) * 5).to(torch.bfloat16)  # the larger part sets some rows' amax
    h = (torch.randn(37, 1000, generator=g) * 2).to(torch.bfloat16)
    cat = torch.cat([a, h], -1)
    amax = torch.maximum(a.float().abs().amax(-1), h.float().abs().amax(-1))
    q, s = quantize_cat_with_amax(a, h, amax, fmt)
    q_expected, s_expected = quantize_rows(cat, fmt)
    assert q.shape == (37, 1096)
    assert torch.equal(q.float(), q_expected.float()) and torch.equal(s, s_expected.reshape(-1))


@pytest.mark.parametrize("case", ["a rank", "rows", "dtype", "amax dtype", "amax shape", "format"])
def test_cat_amax_quant_bad_input_gets_typed_errors(case):
    a, h = torch.randn(4, 8).to(torch.bfloat16), torch.randn(4, 16).to(torch.bfloat16)
    args = dict(a=a, h=h, amax=torch.ones(4), fmt="int8")
    args.update({"a rank": dict(a=a[None]), "rows": dict(a=a[:3]), "dtype": dict(a=a.float()),
                 "amax dtype": dict(amax=torch.ones(4, dtype=torch.float64)), "amax shape": dict(amax=torch.ones(5)),
                 "format": dict(fmt="int4")}[case])
    with pytest.raises(QuantFormatError):
        quantize_cat_with_amax(*args.values())


@pytest.mark.parametrize("ka", [64, 50, 130])
def test_cat_amax_quant_kernel_tiles_cover_both_parts(monkeypatch, ka):
    """The kernel under Triton's interpreter (kernel logic only): tiles wholly in a, wholly in h and cut by
    the boundary (ka 64 on a tile edge, 50 and 130 inside tiles), ragged M and K; int8 by IEEE division
    (the interpreter rounds it exactly), codes and scales where the reference puts them."""
    _interpreted(monkeypatch, AMAX_ROWS=4, AMAX_COLS=64, AMAX_RECIPROCAL=False)
    g = _gen()
    a, h = torch.randn(9, ka, generator=g) * 3, torch.randn(9, 150, generator=g)
    amax = torch.maximum(a.abs().amax(-1), h.abs().amax(-1))
    q, s = cat_amax_quant(a, h, amax, "int8")
    q_expected, s_expected = quantize_rows(torch.cat([a, h], -1), "int8", amax)
    assert torch.equal(s, s_expected.reshape(-1))
    assert torch.equal(q, q_expected)


@pytest.mark.parametrize("steps,rows,seq,stages", [(1, 2, 37, 1), (3, 2, 37, 3), (4, 1, 9, 2), (8, 2, 100, 4),
                                                   (16, 1, 40, 3)])
def test_norm_quant_kernel_row_blocks_cover_ragged_edges(monkeypatch, steps, rows, seq, stages):
    """The norm kernel under Triton's interpreter (kernel logic only): several row blocks per program in
    Triton's pipelined loop, sequence lengths that end inside a block or a program, two samples with their
    own mul / add, a width (96) padded to 128 columns; fp32 input, int8 codes by IEEE division (the
    interpreter rounds it exactly)."""
    _interpreted(monkeypatch, NORM_STEPS=steps, NORM_ROWS=rows, NORM_STAGES=stages, NORM_RECIPROCAL=False)
    g = _gen()
    x = torch.randn(2, seq, 96, generator=g) * 3 + 1
    mul, add = 1 + 0.2 * torch.randn(2, 96, generator=g), 0.2 * torch.randn(2, 96, generator=g)
    q, s = norm_quant(x, mul, add, 1e-6, "int8")
    q_expected, s_expected = norm_quant_ref(x, mul, add, 1e-6, "int8")
    assert q.shape == q_expected.shape == (2 * seq, 96)
    # fp32 sums in another order than torch's layer norm: scales within a few ulps, codes at most one step off
    torch.testing.assert_close(s, s_expected.reshape(-1), rtol=1e-6, atol=0)
    step = (q.float() - q_expected.float()).abs()
    assert float(step.max()) <= 1 and float((step > 0).float().mean()) < 1e-3


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_residual_norm_quant_is_the_update_then_the_norm(gated, fmt):
    """The op off the GPU is its specification: the residual update as the runtime writes it (Wan:
    ``(h.float() + a * gate).type_as(h)``, or ``h + a`` in bf16), then norm_quant of the result."""
    g = _gen()
    x, a = ((torch.randn(2, 21, 96, generator=g) * 2).to(torch.bfloat16) for _ in range(2))
    gate = torch.randn(2, 96, generator=g) if gated else None
    mul, add = 1 + 0.2 * torch.randn(2, 96, generator=g), 0.2 * torch.randn(2, 96, generator=g)
    h, q, s = residual_norm_quant(x, a, gate, mul, add, 1e-6, fmt)
    want_h = (x.float() + a * gate[:, None, :]).type_as(x) if gated else x + a
    assert h.dtype == x.dtype and torch.equal(h, want_h)
    q_expected, s_expected = norm_quant(want_h, mul, add, 1e-6, fmt)
    assert torch.equal(q.float(), q_expected.float()) and torch.equal(s, s_expected)


@pytest.mark.parametrize("case", ["a_shape", "a_dtype", "gate_dtype", "gate_width", "gate_rows", "gate_dims"])
def test_residual_norm_quant_bad_input_gets_typed_errors(case):
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    a, gate, mul, add = x.clone(), torch.ones(2, 32), torch.ones(1, 32), torch.zeros(1, 32)
    bad = {"a_shape": dict(a=x[:, :4]), "a_dtype": dict(a=x.float()), "gate_dtype": dict(gate=gate.bfloat16()),
           "gate_width": dict(gate=torch.ones(2, 31)), "gate_rows": dict(gate=torch.ones(3, 32)),
           "gate_dims": dict(gate=torch.ones(2, 1, 32))}[case]
    args = dict(a=a, gate=gate) | bad
    with pytest.raises(QuantFormatError):
        quantize_residual_norm_output(x, args["a"], args["gate"], mul, add, 1e-6, "int8")
    assert torch.equal(a, x)  # inputs untouched


@pytest.mark.parametrize("gated", [True, False])
def test_residual_norm_quant_kernel_in_interpreter(monkeypatch, gated):
    """The fused residual under Triton's interpreter (kernel logic only): h written where the update puts it
    (ragged row blocks, two samples with their own gate and modulation) and the codes normalized from it;
    fp32 so the interpreter's arithmetic is exact where it matters (it truncates bf16 casts)."""
    _interpreted(monkeypatch, NORM_STEPS=3, NORM_ROWS=2, NORM_RECIPROCAL=False)
    g = _gen()
    x, a = torch.randn(2, 37, 96, generator=g) * 3, torch.randn(2, 37, 96, generator=g)
    gate = torch.randn(2, 96, generator=g) if gated else None
    mul, add = 1 + 0.2 * torch.randn(2, 96, generator=g), 0.2 * torch.randn(2, 96, generator=g)
    h, q, s = residual_norm_quant(x, a, gate, mul, add, 1e-6, "int8")
    want_h, q_expected, s_expected = producer_quant.residual_norm_quant_ref(x, a, gate, mul, add, 1e-6, "int8")
    torch.testing.assert_close(h, want_h, rtol=1e-6, atol=1e-6)  # one fp32 FMA vs a multiply then an add
    torch.testing.assert_close(s, s_expected.reshape(-1), rtol=1e-5, atol=0)
    step = (q.float() - q_expected.float()).abs()
    assert float(step.max()) <= 1 and float((step > 0).float().mean()) < 1e-3


def test_bad_input_gets_typed_errors():
    x = torch.randn(2, 4, 8)
    with pytest.raises(QuantFormatError):
        quantize_gelu_output(x, "int4")
    with pytest.raises(QuantFormatError):
        quantize_gelu_output(torch.zeros(3, 8, dtype=torch.int32), "int8")
    with pytest.raises(QuantFormatError):  # mul rows neither 1 nor B
        quantize_norm_output(x, torch.ones(3, 8), torch.zeros(3, 8), 1e-6, "int8")
    with pytest.raises(QuantFormatError):  # width mismatch
        quantize_norm_output(x, torch.ones(1, 7), torch.zeros(1, 7), 1e-6, "int8")
    with pytest.raises(QuantFormatError):  # float64 modulation
        quantize_norm_output(x, torch.ones(1, 8, dtype=torch.float64), torch.zeros(1, 8), 1e-6, "fp8")
    assert quantize_norm_output(torch.zeros(1, 3, 8), torch.ones(1, 8), torch.zeros(1, 8), 1e-6, "int8")[1].eq(1).all()
    h = torch.randn(4, 8)
    for amax in (torch.ones(3), torch.ones(4, dtype=torch.float64), torch.ones(4, 1)):
        with pytest.raises(QuantFormatError):
            quantize_with_amax(h, amax, "int8")
    with pytest.raises(QuantFormatError):  # rows must be 2-D
        quantize_with_amax(torch.randn(2, 4, 8), torch.ones(2, 4), "int8")


def test_ops_export_as_single_nodes():
    class M(torch.nn.Module):
        def forward(self, x, mul, add):
            q, s = norm_quant(x, mul, add, 1e-6, "int8")
            q2, s2 = gelu_quant(x, "fp8")
            return q, s, q2, s2

    args = (torch.randn(2, 5, 16), torch.ones(2, 16), torch.zeros(2, 16))
    ep = torch.export.export(M(), args)
    targets = {str(n.target) for n in ep.graph.nodes}
    assert any("norm_quant" in t for t in targets) and any("gelu_quant" in t for t in targets)
    for got, want in zip(ep.module()(*args), M()(*args)):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("width", [1536, 96, 3072])
def test_gpu_kernels_match_reference(fmt, width):
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    x = (torch.randn(2, 1000, width, device="cuda", generator=g) * 3 + 0.5).to(torch.bfloat16)
    mul = 1 + 0.2 * torch.randn(2, width, device="cuda", generator=g)
    add = 0.2 * torch.randn(2, width, device="cuda", generator=g)
    for got, want in ((norm_quant(x, mul, add, 1e-6, fmt), norm_quant_ref(x, mul, add, 1e-6, fmt)),
                      (gelu_quant(x * 0.7, fmt), gelu_quant_ref(x * 0.7, fmt))):
        torch.testing.assert_close(got[1], want[1], rtol=1e-2, atol=0)  # amax of the same values
        codes_differ = (got[0].float() != want[0].float()).float().mean().item()
        assert codes_differ < 0.02  # boundary flips only: layer norm sums / tanh in another order
        deq, ref = dequantize_rows(got[0], got[1]), dequantize_rows(want[0], want[1])
        assert float((deq - ref).norm() / ref.norm()) < (5e-3 if fmt == "int8" else 2e-2)
    h = x.reshape(-1, width)
    amax = h.float().abs().amax(-1)
    q_expected, s_expected = quantize_rows(h, fmt, amax)
    for reciprocal in (False, True):
        producer_quant.AMAX_RECIPROCAL, saved = reciprocal, producer_quant.AMAX_RECIPROCAL
        try:
            q, s = amax_quant(h, amax, fmt)
        finally:
            producer_quant.AMAX_RECIPROCAL = saved
        assert torch.equal(s, s_expected.reshape(-1))  # IEEE division in both
        assert_row_codes(q, q_expected, fmt, reciprocal)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("width", [1536, 3072])
def test_gpu_norm_quant_launch_options_agree(monkeypatch, width):
    """Every launch option of the norm kernel (rows, warps, row blocks per program, pipeline stages) writes
    the specification's codes: the same arithmetic per row, only the schedule (and the order of the fp32 sums
    across a row's threads) differs."""
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    x = (torch.randn(2, 3001, width, device="cuda", generator=g) * 3 + 0.5).to(torch.bfloat16)
    mul = 1 + 0.2 * torch.randn(2, width, device="cuda", generator=g)
    add = 0.2 * torch.randn(2, width, device="cuda", generator=g)
    got = []
    for option in ((1, 2, 1, 1), (2, 4, 4, 2), (1, 4, 16, 4), (2, 8, 8, 3), (1, 4, 16, 3)):
        for name, value in zip(("NORM_ROWS", "NORM_WARPS", "NORM_STEPS", "NORM_STAGES"), option):
            monkeypatch.setattr(producer_quant, name, value)
        got.append(norm_quant(x, mul, add, 1e-6, "int8"))
    want_q, want_s = norm_quant_ref(x, mul, add, 1e-6, "int8")
    for q, s in got:
        torch.testing.assert_close(s, want_s, rtol=1e-2, atol=0)  # amax of the same bf16 values
        step = (q.float() - want_q.float()).abs()
        assert float(step.max()) <= 1 and float((step > 0).float().mean()) < 0.02  # boundary flips only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("width", [1536, 3072])
def test_gpu_residual_norm_quant_matches_the_update_then_the_norm(gated, width):
    """The fused residual on the GPU (Wan's and Flux's widths, a ragged sequence, per-sample gate and
    modulation): h is the runtime's update except where the kernel's single FMA rounds across a bf16
    boundary the multiply-then-add does not (one ulp, rarely; more only where x and a · gate cancel to
    within the product's fp32 rounding); codes as norm_quant's of that h."""
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    x = (torch.randn(2, 3001, width, device="cuda", generator=g) * 3 + 0.5).to(torch.bfloat16)
    a = torch.randn(2, 3001, width, device="cuda", generator=g).to(torch.bfloat16)
    gate = torch.randn(2, width, device="cuda", generator=g) if gated else None
    mul = 1 + 0.2 * torch.randn(2, width, device="cuda", generator=g)
    add = 0.2 * torch.randn(2, width, device="cuda", generator=g)
    h, q, s = residual_norm_quant(x, a, gate, mul, add, 1e-6, "int8")
    want_h = (x.float() + a * gate[:, None, :]).type_as(x) if gated else x + a
    assert float((h != want_h).float().mean()) < 1e-3
    # one bf16 ulp apart (2**-7 relative at most), or, where x and a · gate cancel, the product's fp32 rounding
    torch.testing.assert_close(h.float(), want_h.float(), rtol=2 ** -7, atol=1e-5)
    q_expected, s_expected = norm_quant(h, mul, add, 1e-6, "int8")
    torch.testing.assert_close(s, s_expected, rtol=1e-6, atol=0)
    step = (q.float() - q_expected.float()).abs()
    assert float(step.max()) <= 1 and float((step > 0).float().mean()) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_norm_quant_reciprocal_store_matches_division():
    """norm_quant's INT8 store by reciprocal + Newton step against IEEE division, on the same y: the same
    scales, codes off by one at a .5 boundary at most and rarely (Wan's width, fresh inputs)."""
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    x = (torch.randn(1, 4000, 1536, device="cuda", generator=g) * 3 + 0.5).to(torch.bfloat16)
    mul = 1 + 0.2 * torch.randn(1, 1536, device="cuda", generator=g)
    add = 0.2 * torch.randn(1, 1536, device="cuda", generator=g)
    got = {}
    saved = producer_quant.NORM_RECIPROCAL
    try:
        for reciprocal in (False, True):
            producer_quant.NORM_RECIPROCAL = reciprocal
            got[reciprocal] = norm_quant(x, mul, add, 1e-6, "int8")
    finally:
        producer_quant.NORM_RECIPROCAL = saved
    assert torch.equal(got[True][1], got[False][1])
    assert_reciprocal_codes(got[True][0], got[False][0])


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_row_quant_op_is_quantize_rows_and_exports_as_one_node(fmt):
    """On the CPU the op is its specification; traced, one node (the engines' graphs keep it whole)."""
    h = torch.randn(37, 96, generator=_gen()) * 4
    q, s = row_quant(h, fmt)
    q_expected, s_expected = quantize_rows(h, fmt)
    assert torch.equal(s, s_expected.reshape(-1)) and torch.equal(q.float(), q_expected.float())

    class M(torch.nn.Module):
        def forward(self, h):
            return row_quant(h, fmt)

    ep = torch.export.export(M(), (h,))
    assert sum("row_quant" in str(n.target) for n in ep.graph.nodes) == 1


def test_row_quant_kernel_in_interpreter_is_quantize_rows(monkeypatch):
    """The one-pass row kernel under Triton's interpreter (kernel logic), rows per program not dividing M,
    a width that is no power of two, an all-zero row: scales exact, INT8 codes as the specification's
    (the reciprocal + Newton step lands on IEEE division's quotient)."""
    _interpreted(monkeypatch, ROW_ROWS=4)
    h = torch.randn(9, 150, generator=_gen()) * 3
    h[5] = 0.0
    q, s = row_quant(h, "int8")
    q_expected, s_expected = quantize_rows(h, "int8")
    assert torch.equal(s, s_expected.reshape(-1))
    assert torch.equal(q, q_expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("width", [1536, 96, 5120])
def test_gpu_row_quant_matches_quantize_rows(fmt, width):
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    h = (torch.randn(3001, width, device="cuda", generator=g) * 3).to(torch.bfloat16)
    h[7] = 0
    q, s = row_quant(h, fmt)
    q_expected, s_expected = quantize_rows(h, fmt)
    assert torch.equal(s, s_expected.reshape(-1))
    assert_row_codes(q, q_expected, fmt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("ka,kh", [(3072, 12288), (100, 1000)])
def test_gpu_cat_amax_quant_matches_quantize_rows_of_the_concatenation(fmt, ka, kh):
    """Flux's single-block widths (3,072 attention + 12,288 GELU) and a boundary inside a tile."""
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    a = (torch.randn(1001, ka, device="cuda", generator=g) * 4).to(torch.bfloat16)
    h = (torch.randn(1001, kh, device="cuda", generator=g) * 3).to(torch.bfloat16)
    cat = torch.cat([a, h], -1)
    amax = cat.float().abs().amax(-1)
    q, s = cat_amax_quant(a, h, amax, fmt)
    q_expected, s_expected = quantize_rows(cat, fmt)
    assert torch.equal(s, s_expected.reshape(-1))
    assert_row_codes(q, q_expected, fmt)
