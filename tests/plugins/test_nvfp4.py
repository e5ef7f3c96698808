"""NVFP4 specification tests (CPU): codes, rounding, scales, packing, error bounds, bad input."""
import pytest
import torch

from ditbake.plugins.nvfp4 import (
    E2M1_MAGNITUDES,
    NVFP4Tensor,
    QuantFormatError,
    dequantize_nvfp4,
    e2m1_to_float,
    pack_e2m1,
    per_row_global_scale,
    quantize_nvfp4,
    unpack_e2m1,
)

ALL_CODES = torch.arange(16, dtype=torch.uint8)


def _unit_scale_tensor(codes: torch.Tensor) -> NVFP4Tensor:
    """One block of 16 codes with block scale 1 and global scale 1 (values = E2M1 values)."""
    return NVFP4Tensor(
        pack_e2m1(codes.reshape(1, 16)),
        torch.ones(1, 1).to(torch.float8_e4m3fn),
        torch.tensor(1.0),
        torch.Size((1, 16)),
    )


def test_e2m1_values_of_all_codes():
    values = e2m1_to_float(ALL_CODES)
    expected = list(E2M1_MAGNITUDES) + [-m for m in E2M1_MAGNITUDES]
    assert values.tolist() == expected
    assert torch.signbit(values[8])  # code 8 is -0.0


def test_every_code_round_trips_through_unpack_dequant_quant():
    t = _unit_scale_tensor(ALL_CODES)
    assert torch.equal(unpack_e2m1(t.packed).flatten(), ALL_CODES)
    values = dequantize_nvfp4(t)
    # Block amax is 6 and global scale 1, so the block scale is exactly 1 again.
    again = quantize_nvfp4(values, global_scale=1.0)
    assert torch.equal(again.block_scales.float(), torch.ones(1, 1))
    assert torch.equal(unpack_e2m1(again.packed).flatten(), ALL_CODES)


@pytest.mark.parametrize(
    "value, code",
    [
        (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),  # ties -> even code
        (0.2500001, 1), (0.7499999, 1), (1.2500001, 3), (4.9999995, 6), (5.0000005, 7),
        (-0.25, 8), (-0.75, 10), (-2.5, 12), (-5.0, 14), (-0.1, 8), (7.0, 7),
    ],
)
def test_rounding_is_nearest_with_ties_to_even(value, code):
    # 6.0 in the block fixes the block scale at 1 (global 1), so `value` is quantized unscaled.
    x = torch.full((1, 16), 0.0)
    x[0, 0] = 6.0
    x[0, 1] = value
    if abs(value) > 6:
        x[0, 0] = 0.0
    gs = 1.0 if abs(value) <= 6 else abs(value) / 6.0  # saturation case: scale maps |v| to 6
    codes = unpack_e2m1(quantize_nvfp4(x, global_scale=gs).packed)
    assert int(codes[0, 1]) == code


def test_block_scales_saturate_at_448_and_never_overflow():
    x = torch.randn(8, 64) * 1000
    tiny_global = torch.tensor(1e-3)  # amax/(6*g) far above 448 for every block
    t = quantize_nvfp4(x, global_scale=tiny_global)
    scales = t.block_scales.float()
    assert torch.isfinite(scales).all()
    assert torch.equal(scales, torch.full_like(scales, 448.0))
    # Out-of-range elements saturate at the largest code, never NaN.
    values = dequantize_nvfp4(t)
    assert torch.isfinite(values).all()
    assert values.abs().max() <= 6 * 448 * 1e-3 * (1 + 1e-6)


def test_default_global_scale_puts_largest_block_at_448():
    x = torch.randn(16, 128)
    t = quantize_nvfp4(x)
    assert torch.allclose(t.global_scale, x.abs().max() / (6 * 448))
    assert float(t.block_scales.float().max()) == 448.0
    assert t.block_scales.dtype == torch.float8_e4m3fn and t.global_scale.dtype == torch.float32


def test_zero_blocks_and_zero_tensor():
    x = torch.randn(2, 64)
    x[0, 16:32] = 0.0
    t = quantize_nvfp4(x)
    assert float(t.block_scales[0, 1].float()) == 0.0
    assert torch.equal(dequantize_nvfp4(t)[0, 16:32], torch.zeros(16))
    z = quantize_nvfp4(torch.zeros(3, 32))
    assert float(z.global_scale) == 1.0
    assert torch.equal(dequantize_nvfp4(z), torch.zeros(3, 32))


def test_packing_is_bit_exact():
    # element 2i -> low nibble, element 2i+1 -> high nibble
    codes = torch.tensor([[1, 7, 0xF, 0x0, 0x3, 0xA]], dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.tolist() == [[0x71, 0x0F, 0xA3]]
    assert torch.equal(unpack_e2m1(packed), codes)
    all_bytes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(pack_e2m1(unpack_e2m1(all_bytes)), all_bytes)


def test_known_vector_quantizes_to_hand_computed_bytes():
    # Block [6, 0.5, -1, 3, 0...]: scale 1 with global 1; codes 7, 1, 10, 5 -> bytes 0x17, 0x5A.
    x = torch.zeros(1, 16)
    x[0, :4] = torch.tensor([6.0, 0.5, -1.0, 3.0])
    t = quantize_nvfp4(x, global_scale=1.0)
    assert t.packed[0, :2].tolist() == [0x17, 0x5A]
    assert t.packed[0, 2:].tolist() == [0] * 6


def test_gaussian_relative_rms_error_within_known_bound():
    # For N(0,1) blocks of 16 scaled by their absmax (~1.8 sigma -> 6), the E2M1 grid gives a
    # relative RMS error near 0.09-0.10 (measured 0.092); E4M3 scale rounding adds < 1 %.
    # Bound 0.12 catches a wrong rounding (e.g. truncation gives ~0.17).
    torch.manual_seed(0)
    x = torch.randn(256, 1024)
    err = (dequantize_nvfp4(quantize_nvfp4(x)) - x).norm() / x.norm()
    assert 0.05 < float(err) < 0.12


def test_per_row_global_scale_broadcasts():
    x = torch.randn(4, 64) * torch.tensor([[1.0], [10.0], [100.0], [0.01]])
    gs = per_row_global_scale(x)
    t = quantize_nvfp4(x, gs)
    rowwise = torch.stack([dequantize_nvfp4(quantize_nvfp4(x[i : i + 1], gs[i])) for i in range(4)]).squeeze(1)
    assert torch.equal(dequantize_nvfp4(t), rowwise)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    x = torch.randn(8, 32).to(dtype)
    out = dequantize_nvfp4(quantize_nvfp4(x), dtype)
    assert out.dtype == dtype and out.shape == x.shape


def test_bad_input_raises_quant_format_error():
    with pytest.raises(QuantFormatError):
        quantize_nvfp4(torch.randn(4, 20))
    with pytest.raises(QuantFormatError):
        quantize_nvfp4(torch.ones(4, 16, dtype=torch.int32))
    with pytest.raises(QuantFormatError):
        quantize_nvfp4(torch.tensor([[float("nan")] * 16]))
    with pytest.raises(QuantFormatError):
        quantize_nvfp4(torch.randn(2, 16), global_scale=-1.0)
    with pytest.raises(QuantFormatError):
        pack_e2m1(torch.tensor([16, 0], dtype=torch.uint8))
    with pytest.raises(QuantFormatError):
        pack_e2m1(torch.tensor([1, 2, 3], dtype=torch.uint8))
    with pytest.raises(QuantFormatError):
        unpack_e2m1(torch.tensor([1], dtype=torch.int32))
    assert issubclass(QuantFormatError, ValueError)
