"""Mixed NVFP4 linear: each activation path vs an fp64 matmul of the dequantized operands
(CPU), export, bad input; GPU kernels vs the same fp64 reference at Wan2.1-1.3B sizes."""
import pytest
import torch

from ditbake.plugins import mixed_linear as ml
from ditbake.plugins.act_quant import act_quant_ref
from ditbake.plugins.int8 import quantize_weight_per_channel
from ditbake.plugins.nvfp4 import QuantFormatError, dequantize_nvfp4, quantize_nvfp4


def _weights(n, k, hadamard=False, device="cpu"):
    lin = torch.nn.Linear(k, n).to(device)
    return lin, ml.prepare_nvfp4_linear(lin, hadamard)


def dequantized_operands(x, p, act_format, hadamard):
    """The fp64 operands each path multiplies, built from the spec functions (not the op)."""
    w = dequantize_nvfp4(ml._weight_tensor(p["packed"], p["block_scales"], p["global_scale"])).double()
    x2 = x.reshape(-1, x.shape[-1])
    if act_format in ("int8", "fp8"):
        qx, sx, _ = act_quant_ref(x2, act_format, hadamard)
        qw, sw = quantize_weight_per_channel(w.float(), act_format)
        return qx.double() * sx.double()[:, None], qw.double() * sw.double()[:, None]
    if act_format == "nvfp4":
        return ml.nvfp4_fake_activation(x2, hadamard).double(), w
    rotated = act_quant_ref(x2, "none", hadamard)[0] if hadamard else x2
    return rotated.to(torch.bfloat16).double(), w


def relative_error(out, ref64) -> float:
    return float((out.double() - ref64).norm() / ref64.norm())


@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("act_format", ml.ACT_FORMATS)
def test_each_path_matches_fp64_matmul_of_dequantized_operands(act_format, hadamard):
    x = torch.randn(3, 11, 256)
    _, p = _weights(80, 256, hadamard)
    out = ml.nvfp4_linear(x, **p, act_format=act_format, hadamard=hadamard)
    xa, wa = dequantized_operands(x, p, act_format, hadamard)
    ref64 = (xa @ wa.T + p["bias"].double()).reshape(3, 11, 80)
    # Operands are exact; only FP32 summation (nvfp4/bf16) or float64 (int8/fp8) rounds.
    assert relative_error(out, ref64) < 1e-6


@pytest.mark.parametrize(
    "act_format, bound",
    # Gaussian x, Kaiming-uniform W: NVFP4 weight error ~0.09-0.10 relative RMS; W4A4 adds the
    # activation's ~0.09 in quadrature (~0.14); INT8/FP8 activations add 1 % / 3 %.
    [("bf16", 0.12), ("int8", 0.12), ("fp8", 0.13), ("nvfp4", 0.17)],
)
@pytest.mark.parametrize("hadamard", [False, True])
def test_error_vs_float_linear_within_format_bound(act_format, bound, hadamard):
    torch.manual_seed(1)
    x = torch.randn(64, 512)
    lin, p = _weights(128, 512, hadamard)
    out = ml.nvfp4_linear(x, **p, act_format=act_format, hadamard=hadamard)
    ref = (x.double() @ lin.weight.double().T + lin.bias.double()).detach()
    assert relative_error(out, ref) < bound


def test_output_dtype_follows_input_and_integer_codes_work():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    _, p = _weights(32, 64)
    by_name = ml.nvfp4_linear(x, **p, act_format="int8")
    by_code = ml.nvfp4_linear(x, **p, act_format=ml.ACT_FORMAT_CODES["int8"])
    assert by_name.dtype == torch.bfloat16 and torch.equal(by_name, by_code)


def test_module_and_export():
    lin = torch.nn.Linear(128, 64)
    mod = ml.NVFP4Linear.from_linear(lin, act_format="nvfp4", hadamard=True)
    x = torch.randn(2, 5, 128)
    out = mod(x)
    assert out.shape == (2, 5, 64)
    exported = torch.export.export(mod, (x,))
    assert torch.equal(exported.module()(x), out)
    assert "ditbake.mixed_linear" in str(exported.graph)


def test_op_passes_torch_library_checks():
    _, p = _weights(32, 128)
    x = torch.randn(8, 128, dtype=torch.bfloat16)
    for fmt in ml.ACT_FORMATS:
        torch.library.opcheck(
            torch.ops.ditbake.mixed_linear.default,
            (x, p["packed"], p["block_scales"], p["global_scale"], p["bias"], fmt, True),
            # (opcheck's schema test multiplies inputs, which float8 does not support on CPU)
            test_utils=("test_faketensor",),
        )


def test_bad_input_raises_quant_format_error():
    x = torch.randn(4, 64)
    _, p = _weights(32, 64)
    with pytest.raises(QuantFormatError):
        ml.nvfp4_linear(x, **p, act_format="int4")
    with pytest.raises(QuantFormatError):
        ml.nvfp4_linear(x, **p, act_format=9)
    with pytest.raises(QuantFormatError):
        ml.nvfp4_linear(torch.randn(4, 48), **p)
    bad = dict(p, block_scales=p["block_scales"].float())
    with pytest.raises(QuantFormatError):
        ml.nvfp4_linear(x, **bad)
    bad = dict(p, packed=p["packed"].to(torch.int32))
    with pytest.raises(QuantFormatError):
        ml.nvfp4_linear(x, **bad)
    with pytest.raises(QuantFormatError):
        ml.nvfp4_linear(x, **dict(p, bias=torch.randn(31)))
    with pytest.raises(QuantFormatError):
        ml.prepare_nvfp4_weight(torch.randn(2, 3, 4))


# ------------------------------------------------------------------------------------ GPU
def _poison_allocator(nbytes: int) -> None:
    t = torch.full((nbytes // 4 + 1,), float("nan"), device="cuda")
    del t


SHAPES = [(1536, 1536), (1536, 8960), (8960, 1536)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [32760, 128])
@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("act_format, hadamard", [("bf16", False), ("int8", True), ("fp8", True), ("nvfp4", True)])
def test_kernels_vs_fp64_of_dequantized_operands(act_format, hadamard, m, k, n):
    torch.manual_seed(m + k + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * k**-0.5
    t = quantize_nvfp4(w)
    p = {"packed": t.packed, "block_scales": t.block_scales, "global_scale": t.global_scale,
         "bias": torch.randn(n, device="cuda", dtype=torch.bfloat16)}
    _poison_allocator(m * n * 2 + m * k * 2)
    out = ml.nvfp4_linear(x, **p, act_format=act_format, hadamard=hadamard)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    xa, wa = dequantized_operands(x, p, act_format, hadamard)
    ref64 = xa @ wa.T + p["bias"].double()
    baseline = relative_error(xa.bfloat16() @ wa.bfloat16().T + p["bias"], ref64)
    err = relative_error(out, ref64)
    assert err <= 2 * baseline, (err, baseline)


@pytest.mark.gpu
@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("m", [128, 32760])
@pytest.mark.parametrize("fused", [True, False])
def test_w4a16_fused_and_dequant_paths(m, fused, gather):
    k, n = 1536, 8960
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    t = quantize_nvfp4(torch.randn(n, k, device="cuda"))
    gs = t.global_scale.reshape(1)
    _poison_allocator(m * n * 2)
    out = ml.w4a16_gemm(x, t.packed, t.block_scales, gs, None, fused=fused, gather=gather)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    wa = dequantize_nvfp4(t).double()
    ref64 = x.double() @ wa.T
    baseline = relative_error(x @ wa.bfloat16().T, ref64)
    assert relative_error(out, ref64) <= 2 * baseline


@pytest.mark.gpu
@pytest.mark.parametrize("gather", [True, False])
def test_weight_conversion_kernels_are_bit_exact(gather):
    t = quantize_nvfp4(torch.randn(1536, 8960, device="cuda"))
    gs = t.global_scale.reshape(1)
    for fmt in ("int8", "fp8"):
        q, s = ml.nvfp4_weight_to_8bit(t.packed, t.block_scales, gs, fmt, gather)
        q_ref, s_ref = ml.nvfp4_weight_to_8bit_ref(t.packed, t.block_scales, t.global_scale, fmt)
        assert torch.equal(s, s_ref)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    deq = ml.dequantize_weight_bf16(t.packed, t.block_scales, gs, gather)
    assert torch.equal(deq, dequantize_nvfp4(t, torch.float32).to(torch.bfloat16))
