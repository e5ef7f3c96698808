"""Adaptive mode: at most one host synchronisation per step, and the baked plan's choices when the
measurements equal the calibration."""
import dataclasses

import pytest
import torch

from ditbake.exporter import build as builder, calibrate as cal, calibrate_precision as cp, models
from ditbake.exporter.adapters import adapter_for
from ditbake.exporter.plan_cache import CacheConfig
from ditbake.exporter.plan_precision import PrecisionConfig
from ditbake.exporter.plan_quantized import quantized_plan
from ditbake.runtime import load
from ditbake.runtime.adaptive import AdaptiveController
from ditbake.runtime.artifact import Profile
from ditbake.runtime.errors import PlanError

STEPS = 5


@pytest.fixture(scope="module")
def calibrated():
    adapter = adapter_for(models.load("tiny-wan"))
    stats = cal.calibrate(adapter, torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(2)), None,
                          latent=adapter.latent_shape(2, 8, 8), sampler="unipc", num_steps=STEPS, guidance_scale=4.0,
                          seed=0, source="tiny-wan", progress=False, observers=[cp.observer_factory()])
    return adapter, stats


@pytest.mark.parametrize("precision,budget", [(dict(avg_bits=6.0), 0.3), (dict(threshold=0.1), 0.45),
                                              (dict(nvfp4_fraction=0.8), 0.2)])
def test_equal_measurements_choose_the_baked_plan(calibrated, precision, budget):
    _, stats = calibrated
    kwargs = dict(cache=CacheConfig(skip_budget=budget, search="tau"))  # the walk adaptive plans re-run online
    baked = quantized_plan(stats.meta, stats.tensors, PrecisionConfig(**precision), **kwargs)
    plan = quantized_plan(stats.meta, stats.tensors, PrecisionConfig(**precision), mode="adaptive", **kwargs)
    assert baked.skip_fraction() > 0 and any(v.purified for v in baked.variants)
    _replay_calibrated_measurements(plan, baked)


def _replay_calibrated_measurements(plan, baked):
    """Feed the controller the calibrated means as measurements: it must pick the baked plan's variants."""
    ctl = AdaptiveController(plan, ["cond", "uncond"])
    gamma = plan.adaptive["precision"]["gamma"]
    change = plan.adaptive["skip"]["change"]
    for i in range(plan.num_steps):
        measured = None
        if i:  # the calibrated means as measurements of step i-1 (change since the last compute)
            measured = [[gamma[br][i - 1] for br in range(2)], [[0.0] * plan.num_blocks for _ in range(2)]]
            for br in range(2):
                for b in range(plan.num_blocks):
                    last, before = ctl.last_compute[br][b], ctl.prev_compute[br][b]
                    measured[1][br][b] = sum(change[br][s][b] for s in range(before + 1, last + 1)) if before >= 0 else 0.0
                    ctl.has_change[br][b] = before >= 0
        ctl.decide(i, measured)
        for br, name in enumerate(("cond", "uncond")):
            for b in range(plan.num_blocks):
                assert plan.variants[ctl.ids[br][b]] == baked.variant_for(i, name, b), (i, name, b)
    assert ctl.fallbacks == 0


class SyncCounter:
    """Counts device→host reads (the calls that synchronise on a GPU)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=original, **k):
                self.count += 1
                return _orig(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, wrapped)


def _build(adapter, plan, path):
    return load(builder.build(adapter, plan, path, profiles=[Profile("p", adapter.latent_shape(2, 8, 8), 8)],
                              samplers=["unipc"], dtype=torch.float32, progress=False))


def test_at_most_one_host_sync_per_step(calibrated, tmp_path, monkeypatch):
    adapter, stats = calibrated
    # bf16 plans: the quantization references' own host-side checks stay out of the count
    cache = CacheConfig(skip_budget=0.3)
    baked = _build(adapter, quantized_plan(stats.meta, stats.tensors, None, cache=cache, pdr=False), tmp_path / "b")
    adaptive = _build(adapter, quantized_plan(stats.meta, stats.tensors, None, cache=cache, pdr=False,
                                              mode="adaptive"), tmp_path / "a")
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(3))
    counter = SyncCounter(monkeypatch)
    r = baked.generate(embeds, seed=0, guidance_scale=4.0)
    # baked: only the input checks before the loop (finite embeddings and latents), none per step
    validation = counter.count
    assert validation <= 3 and r.report.host_syncs == 0
    counter.count = 0
    r = adaptive.generate(embeds, seed=0, guidance_scale=4.0)
    assert counter.count - validation <= STEPS - 1 and r.report.host_syncs == counter.count - validation
    assert r.report.adaptive_fallbacks == 0 and torch.isfinite(r.latents).all()
    assert r.report.block_skips > 0


def test_quantized_adaptive_runs_and_reports(calibrated, tmp_path):
    adapter, stats = calibrated
    plan = quantized_plan(stats.meta, stats.tensors, PrecisionConfig(avg_bits=6.0), cache=CacheConfig(skip_budget=0.3),
                          mode="adaptive")
    session = _build(adapter, plan, tmp_path / "q")
    r = session.generate(torch.randn(1, 8, 32), seed=1, guidance_scale=4.0)
    assert torch.isfinite(r.latents).all()
    assert r.report.host_syncs == STEPS - 1 and r.report.adaptive_fallbacks == 0
    assert r.report.to_json()["host_syncs"] == STEPS - 1


def test_block_kinds_with_different_linears_adapt_without_fallbacks(tmp_path):
    """Flux: double and single blocks have different linears; the layers a block lacks are bf16 in
    both the baked and the adaptive choices, so every adaptive pick was precompiled."""
    adapter = adapter_for(models.load("tiny-flux"))
    stats = cal.calibrate(adapter, torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(4)), None,
                          latent=adapter.latent_shape(1, 8, 8), sampler="flow_euler", num_steps=STEPS,
                          guidance_scale=4.0, seed=0, source="tiny-flux", progress=False,
                          observers=[cp.observer_factory()])
    kwargs = dict(cache=CacheConfig(skip_budget=0.3, search="tau"))
    baked = quantized_plan(stats.meta, stats.tensors, PrecisionConfig(avg_bits=6.0), **kwargs)
    plan = quantized_plan(stats.meta, stats.tensors, PrecisionConfig(avg_bits=6.0), mode="adaptive", **kwargs)
    absent = set(adapter.absent_linears)
    for i in range(STEPS):
        for branch in ("cond", "uncond"):
            for b in range(adapter.num_blocks):
                prec = baked.variant_for(i, branch, b).precision_map
                assert all(prec.get(n, "bf16") == "bf16" for m, n in absent if m == b), (i, branch, b)
                assert any(prec.get(n, "bf16") != "bf16" for n in adapter.block_linears(b)) or \
                    not baked.variant_for(i, branch, b).compute
    _replay_calibrated_measurements(plan, baked)
    session = load(builder.build(adapter, plan, tmp_path / "f", profiles=[Profile("p", adapter.latent_shape(1, 8, 8), 8)],
                                 samplers=["flow_euler"], dtype=torch.float32, progress=False))
    r = session.generate(torch.randn(1, 8, 32), seed=1, guidance_scale=4.0)
    assert torch.isfinite(r.latents).all() and r.report.adaptive_fallbacks == 0


def test_bad_adaptive_sections_are_typed_errors(calibrated):
    _, stats = calibrated
    plan = quantized_plan(stats.meta, stats.tensors, None, cache=CacheConfig(skip_budget=0.3), mode="adaptive")
    with pytest.raises(PlanError, match="version"):
        AdaptiveController(dataclasses.replace(plan, adaptive={**plan.adaptive, "version": 9}), ["cond"])
    with pytest.raises(PlanError, match="branch"):
        AdaptiveController(dataclasses.replace(plan, adaptive={**plan.adaptive, "branches": ["cond"]}),
                           ["cond", "uncond"])
    with pytest.raises(PlanError, match="something to adapt"):
        quantized_plan(stats.meta, stats.tensors, None, mode="adaptive")
