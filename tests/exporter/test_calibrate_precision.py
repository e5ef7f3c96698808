"""DMPQ calibration: the precision observer measures what it says, the predictor fit is right."""
import math

import pytest
import torch

from ditbake.exporter import calibrate as cal, calibrate_precision as cp, models
from ditbake.exporter.adapters import adapter_for
from ditbake.plugins.hadamard import fold_hadamard_into_weight
from ditbake.plugins.int8 import quantize_weight_per_channel
from ditbake.plugins.linear_8bit import linear_w8a8_ref
from ditbake.plugins.mixed_linear import mixed_linear_ref, prepare_nvfp4_weight


@pytest.fixture(scope="module")
def calibrated():
    adapter = adapter_for(models.load("tiny-wan"))
    embeds = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    captured = {}
    block0_q = adapter.block_modules()[1].get_submodule("attn1.to_q")

    def grab(module, args, output):  # the layer input at (prompt 1, uncond, step 2), registered first
        rows, branch, step = obs_ref[0].where  # both prompts go in one batch: rows 0:2
        if (branch, step) == (1, 2):
            captured["x"] = args[0][1 - rows.start].detach().clone()

    obs_ref = []

    def factory(a, shape):
        o = cp.PrecisionObserver(a, shape, cp.PrecisionObserverConfig(max_tokens=None))
        obs_ref.append(o)
        return o

    h = block0_q.register_forward_hook(grab)
    try:
        stats = cal.calibrate(adapter, embeds, None, latent=adapter.latent_shape(2, 8, 8), sampler="unipc",
                              num_steps=3, guidance_scale=4.0, seed=3, source="tiny-wan", progress=False,
                              observers=[factory])
    finally:
        h.remove()
    return adapter, stats, captured["x"]


def test_observer_records_erel_and_outliers(calibrated):
    adapter, stats, x = calibrated
    t = stats.tensors
    layers = adapter.linear_layers
    assert t["erel_nvfp4"].shape == (2, 2, 3, 3, len(layers), 2)
    assert t["outlier_ratio"].shape == (2, 2, 3, 3, len(layers))
    assert torch.isfinite(t["erel_nvfp4"]).all() and torch.isfinite(t["erel_int8"]).all()
    # W8A8 is far more accurate than W4A4 (8-bit weights too), and both are small but non-zero
    assert 0 < 4 * t["erel_int8"].mean() < t["erel_nvfp4"].mean() < 0.5
    # by hand: block 1 attn1.to_q at (prompt 1, uncond, step 2), int8 W8A8 with Hadamard, and nvfp4
    lin = adapter.block_modules()[1].get_submodule("attn1.to_q")
    li = layers.index("attn1.to_q")
    x2 = x.reshape(-1, x.shape[-1]).float()
    y = torch.nn.functional.linear(x2, lin.weight.float(), lin.bias.float())
    qw, sw = quantize_weight_per_channel(fold_hadamard_into_weight(lin.weight.float()), "int8")
    yq = linear_w8a8_ref(x2, qw, sw, lin.bias.float(), "int8", True)
    expected = ((yq - y).norm() / y.norm()).item()
    assert math.isclose(t["erel_int8"][1, 1, 2, 1, li, 1].item(), expected, rel_tol=1e-4)
    w = prepare_nvfp4_weight(lin.weight.float(), hadamard=True)
    yq = mixed_linear_ref(x2, w.packed, w.block_scales, w.global_scale, lin.bias.float(), "nvfp4", True)
    expected = ((yq - y).norm() / y.norm()).item()
    assert math.isclose(t["erel_nvfp4"][1, 1, 2, 1, li, 1].item(), expected, rel_tol=1e-4)
    ratio = (x2.abs().max() / x2.abs().mean()).item()
    assert math.isclose(t["outlier_ratio"][1, 1, 2, 1, li].item(), ratio, rel_tol=1e-5)


def test_fit_recovers_known_line(rng_seed):
    g = torch.Generator().manual_seed(rng_seed)
    x = torch.rand(400, 3, 4, generator=g, dtype=torch.float64)
    alpha = torch.tensor([0.5, -0.2, 0.0, 1.5], dtype=torch.float64)
    beta = torch.tensor([0.05, 0.1, 0.2, 0.0], dtype=torch.float64)
    y = alpha * x + beta
    fit = cp.fit_linear(x, y)
    assert torch.allclose(fit.alpha[:, [0, 1, 3]], alpha[[0, 1, 3]].expand(3, 3), atol=1e-10)
    assert torch.allclose(fit.beta, beta.expand(3, 4), atol=1e-10)
    assert torch.isnan(fit.r2[:, 2]).all()  # constant E_rel: R² undefined, not 1
    # with noise: R² matches its definition and is sane
    noisy = y + 0.05 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    fit = cp.fit_linear(x, noisy)
    assert torch.allclose(fit.alpha[:, 3], torch.full((3,), 1.5, dtype=torch.float64), atol=0.05)
    assert (fit.r2[:, 3] > 0.95).all() and (fit.r2[:, 2] < 0.05).all()
    assert 0 < fit.r2_within < 1 and fit.r2_global >= fit.r2_within - 1e-12


def test_predictor_on_calibration_and_report(calibrated, tmp_path):
    adapter, stats, _ = calibrated
    fit = cp.fit_predictor(stats.tensors)
    assert fit.alpha.shape == (3, len(adapter.linear_layers)) and fit.n == 2 * 2 * 2
    finite = fit.r2[torch.isfinite(fit.r2)]
    assert ((finite >= -1e-9) & (finite <= 1 + 1e-9)).all()
    report = cp.precision_report(stats.tensors, tuple(adapter.linear_layers))
    assert set(report["formats"]) == {"nvfp4", "int8"}
    png = cp.scatter_plot(stats.tensors, tuple(adapter.linear_layers), tmp_path / "s.png", "tiny")
    assert png.stat().st_size > 1000
    had = cp.choose_hadamard(stats.tensors)
    e = stats.tensors["erel_nvfp4"].double().nanmean(dim=(0, 1, 2))
    assert torch.equal(had, e[..., 1] < e[..., 0])


def test_errors_are_typed():
    with pytest.raises(cp.PrecisionStatsError, match="--precision-stats"):
        cp.fit_predictor({"gamma": torch.zeros(1, 1, 3, 2)})
    with pytest.raises(cp.PrecisionStatsError, match="nvfp4"):
        cp.PrecisionObserverConfig(formats=("int8",))
    with pytest.raises(cp.PrecisionStatsError):
        cp.PrecisionObserverConfig(max_tokens=0)
    with pytest.raises(cp.PrecisionStatsError, match="at least 2"):
        cp.predictor_samples(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2, 3))
    for bad in (-1, 1.5, True, "1GB"):
        with pytest.raises(cp.PrecisionStatsError, match="weight_cache_bytes"):
            cp.PrecisionObserverConfig(weight_cache_bytes=bad)


def test_weights_beyond_the_cache_budget_are_requantized_per_call_with_equal_results(rng_seed):
    """A model whose quantized weight copies do not fit (Flux 12 B: ≈ 70 GB) keeps some and re-makes
    the rest at each call: the statistics are the same, bit for bit."""
    adapter = adapter_for(models.load("tiny-flux"))
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(rng_seed))
    one_layer = 2 * (2 + 1) * adapter.block_modules()[0].get_submodule("attn.to_q").weight.numel()
    runs = {}
    for budget in (None, 0, 5 * one_layer):
        observers = []

        def factory(a, shape, budget=budget):
            observers.append(cp.PrecisionObserver(a, shape, cp.PrecisionObserverConfig(weight_cache_bytes=budget)))
            return observers[-1]

        stats = cal.calibrate(adapter, embeds, None, latent=adapter.latent_shape(1, 8, 8), sampler="flow_euler",
                              num_steps=2, guidance_scale=1.0, seed=0, source="tiny-flux", progress=False,
                              observers=[factory])
        runs[budget] = stats.tensors, observers[0].cached_layers, observers[0].total_layers
    total = runs[None][2]
    assert total == sum(len(adapter.block_linears(b)) for b in range(adapter.num_blocks))
    assert runs[None][1] == total and runs[0][1] == 0 and 0 < runs[5 * one_layer][1] < total
    for budget in (0, 5 * one_layer):
        for key, value in runs[None][0].items():
            assert torch.equal(value.nan_to_num(-1.0), runs[budget][0][key].nan_to_num(-1.0)), (budget, key)


@pytest.mark.parametrize("fmt", ["nvfp4", "int8", "fp8"])
@pytest.mark.parametrize("hadamard", [False, True])
def test_fast_fake_quant_equals_the_shipped_references(fmt, hadamard):
    """The observer's FP32 path vs the plugins' references (float64 accumulation, per-call
    dequantization): 1e-5 of the output scale, against quantization errors of 1e-2 to 1e-1."""
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    x = torch.randn(96, 256, generator=g) * torch.rand(256, generator=g) * 4
    w, bias = torch.randn(192, 256, generator=g) * 0.05, torch.randn(192, generator=g)
    if fmt == "nvfp4":
        t = prepare_nvfp4_weight(w, hadamard=hadamard)
        unit = cp.NVFP4Tensor(t.packed, t.block_scales, torch.ones(()), t.shape)
        fast = cp._fake_quant_linear(x, (cp.dequantize_nvfp4(unit, torch.bfloat16), t.global_scale.float()), bias,
                                     fmt, hadamard)
        ref = mixed_linear_ref(x, t.packed, t.block_scales, t.global_scale, bias, fmt, hadamard)
    else:
        qw, sw = quantize_weight_per_channel(fold_hadamard_into_weight(w) if hadamard else w, fmt)
        fast = cp._fake_quant_linear(x, (qw, sw), bias, fmt, hadamard)
        ref = linear_w8a8_ref(x, qw, sw, bias, fmt, hadamard)
    scale = ref.abs().max().item()
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5 * scale)
    exact = torch.nn.functional.linear(x, w, bias)
    assert (ref - exact).norm() > 1e-3 * exact.norm()  # the formats do quantize: the test can fail
