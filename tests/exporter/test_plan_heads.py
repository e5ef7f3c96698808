"""Head search: the MILP's guarantees, the progressive calibration, the planner pass and the runtime."""
import itertools

import numpy as np
import pytest
import torch

from ditbake.exporter import build as builder, models
from ditbake.exporter.adapters import adapter_for
from ditbake.exporter.calibrate_heads import calibrate_heads
from ditbake.exporter.plan_heads import (HeadsConfig, candidates, heads_pass, layer_error, savings, solve_greedy,
                                         solve_layer)
from ditbake.exporter.planner import plan_from_calibration
from ditbake.runtime import load
from ditbake.runtime.artifact import Profile
from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import HeadScheme, Plan
from tests.conftest import CudaLookingTensor

SAVING = np.array([0.0, 0.6, 0.8, 0.9, 1.0])  # full, three arrows, cached


def _instance(rng, heads=6):
    errors = rng.gamma(1.0, 0.05, size=(heads, SAVING.size)) * np.array([0, 1, 2, 4, 1.5])
    errors[rng.random(heads) < 0.2, -1] = np.nan  # some heads have no cache
    return errors


def _check(errors, choice, delta, c):
    heads = errors.shape[0]
    assert layer_error(errors, choice) <= delta + 1e-9
    for h, k in enumerate(choice):
        assert k == 0 or (np.isfinite(errors[h, k]) and errors[h, k] <= c * delta / heads + 1e-12)


@pytest.mark.parametrize("delta", [0.02, 0.1, 0.3])
def test_milp_respects_constraints_and_beats_greedy(delta, rng_seed):
    rng = np.random.default_rng(rng_seed)
    for _ in range(20):
        errors = _instance(rng)
        choice, greedy = solve_layer(errors, SAVING, delta, 1.5), solve_greedy(errors, SAVING, delta, 1.5)
        _check(errors, choice, delta, 1.5)
        _check(errors, greedy, delta, 1.5)
        assert SAVING[choice].sum() >= SAVING[greedy].sum() - 1e-9


def test_milp_is_optimal_on_small_instances(rng_seed):
    rng = np.random.default_rng(rng_seed)
    for _ in range(10):
        errors = _instance(rng, heads=3)
        delta = 0.1
        best = 0.0
        for combo in itertools.product(range(SAVING.size), repeat=3):
            c = np.array(combo)
            ok = all(k == 0 or (np.isfinite(errors[h, k]) and errors[h, k] <= 1.5 * delta / 3) for h, k in enumerate(c))
            if ok and layer_error(errors, c) <= delta:
                best = max(best, SAVING[c].sum())
        assert SAVING[solve_layer(errors, SAVING, delta, 1.5)].sum() == pytest.approx(best)


def test_shortcut_equals_highs_when_the_budget_does_not_bind(rng_seed):
    rng = np.random.default_rng(rng_seed)
    taken = 0
    for _ in range(30):
        errors = _instance(rng, heads=12) * rng.choice([0.01, 0.1, 1.0])
        delta = 0.1
        fast, milp = solve_layer(errors, SAVING, delta, 1.5), solve_layer(errors, SAVING, delta, 1.5, shortcut=False)
        assert SAVING[fast].sum() == pytest.approx(SAVING[milp].sum())
        _check(errors, fast, delta, 1.5)
        ok = np.isfinite(errors) & (errors <= 1.5 * delta / 12)
        own_best = np.where(ok, SAVING, -1.0).max(axis=1)
        own_best[:] = np.maximum(own_best, 0.0)
        if np.allclose(SAVING[fast], own_best):  # every head got its own best: the shortcut's case
            taken += 1
            assert layer_error(errors, fast) <= layer_error(errors, milp) + 1e-12  # ties go to the smaller error
    assert taken > 0


@pytest.mark.parametrize("kwargs,message", [
    ({"delta": 0.0}, "delta must be a positive"),
    ({"delta": float("nan")}, "delta must be a positive"),
    ({"head_factor": -1.0}, "factor c must be positive"),
    ({"arrow_fractions": (0.5, 1.5)}, "arrow_fractions must lie in"),
    ({"local3d_tile": (2, 0, 2)}, "three positive ints"),
])
def test_bad_config_raises_typed_one_line(kwargs, message):
    with pytest.raises(PlanError, match=message) as info:
        HeadsConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_candidate_menu_and_savings():
    menu = candidates(HeadsConfig(arrow_fractions=(0.1, 0.97), local3d_tile=(1, 2, 2), local3d_fractions=(0.2,)), 20)
    assert menu == (HeadScheme("full"), HeadScheme("arrow", 2, 2), HeadScheme("local3d", 4, 4), HeadScheme("cached"))
    s = savings(menu, text_tokens=4, visual_tokens=20, head_dim=8)
    assert s[0] == 0 and s[-1] == 1 and 0 < s[2] < s[1] < 1


def _calibrate(name, latent, text_len, config, steps=3):
    adapter = adapter_for(models.load(name, seed=1))
    embeds = torch.randn(2, text_len, 32, generator=torch.Generator().manual_seed(0))
    sampler = {"sd3": "flow_euler", "wan": "flow_euler"}[adapter.architecture]
    tensors, meta = calibrate_heads(adapter, embeds, None, latent=latent, sampler=sampler, num_steps=steps,
                                    guidance_scale=4.0, seed=0, config=config, progress=False)
    plan_meta = {"architecture": adapter.architecture, "num_blocks": adapter.num_blocks,
                 "linear_layers": list(adapter.linear_layers), "attention_sites": adapter.attention_sites,
                 "num_steps": steps, "branches": ["cond", "uncond"], "heads": meta}
    return adapter, tensors, meta, plan_meta


@pytest.fixture(scope="module")
def sd3_search():
    return _calibrate("tiny-sd3", (4, 8, 8), 6, HeadsConfig(delta=0.5, arrow_fractions=(0.1, 0.25)))


def test_progressive_search_obeys_budget(sd3_search):
    _, tensors, meta, _ = sd3_search
    errors, choice = tensors["heads_error.attn"], tensors["heads_choice.attn"].long()
    menu = meta["sites"]["attn"]["candidates"]
    assert menu[0][0] == "full" and menu[-1][0] == "cached"
    assert torch.isnan(errors[:, 0, :, :, -1]).all()  # no cache exists at step 0
    assert not (choice[:, 0] == len(menu) - 1).any()
    assert torch.isfinite(errors[:, 1:]).all()
    delta, heads = 0.5, errors.shape[3]
    picked = errors.gather(-1, choice[..., None])[..., 0].masked_fill(choice == 0, 0.0)
    assert (picked.sum(-1) <= delta + 1e-6).all()
    assert (picked <= 1.5 * delta / heads + 1e-6).all()
    assert (choice > 0).any()  # the budget is wide enough to compress something
    assert meta["search_seconds"] > 0 and meta["solves"] == 2 * 3 * 3


def _artifact(tmp_path, adapter, plan, latent, text_len):
    return builder.build(adapter, plan, tmp_path / "art", profiles=[Profile("p", latent, text_len)],
                         samplers=["flow_euler"], dtype=torch.float32, progress=False)


def test_plan_validates_and_runtime_counts_predicted_flops(sd3_search, tmp_path):
    adapter, tensors, meta, plan_meta = sd3_search
    plan = plan_from_calibration(plan_meta, tensors=tensors, passes=[heads_pass(tensors, meta)])
    assert Plan.from_json(plan.to_json()) == plan
    assert not any(plan.variants[v].uses_cached_heads for ids in plan.steps[0].values() for v in ids)
    predicted = plan.predicted["attention_flops_fraction"]
    assert predicted < 1.0 and plan.predicted["heads"]["search_seconds"] > 0
    session = load(_artifact(tmp_path, adapter, plan, (4, 8, 8), 6))
    result = session.generate(torch.randn(1, 6, 32), torch.zeros(1, 6, 32), seed=0, guidance_scale=4.0)
    assert result.report.attention_flops_fraction == pytest.approx(predicted, rel=1e-9)
    assert torch.isfinite(result.latents).all()


def test_resolve_at_other_delta_and_missing_search(sd3_search):
    _, tensors, meta, plan_meta = sd3_search
    tight = plan_from_calibration(plan_meta, passes=[heads_pass(tensors, meta, HeadsConfig(delta=1e-9))])
    assert tight.predicted["heads"]["resolved_from_errors"]
    assert tight.predicted["attention_flops_fraction"] == 1.0
    with pytest.raises(PlanError, match="holds no head search"):
        plan_from_calibration(plan_meta, passes=[heads_pass(tensors, {})])


def test_all_full_schemes_equal_uncompressed_and_match_diffusers(tmp_path):
    """A search with a vanishing budget keeps every head full: the runtime output equals the baseline
    plan's exactly, and both follow the diffusers model + FlowMatchEulerDiscreteScheduler."""
    from ditbake.exporter.sampler import make_scheduler

    adapter, tensors, meta, plan_meta = _calibrate("tiny-sd3", (4, 8, 8), 6, HeadsConfig(delta=1e-12), steps=3)
    plan = plan_from_calibration(plan_meta, passes=[heads_pass(tensors, meta)])
    assert plan.predicted["attention_flops_fraction"] == 1.0
    session = load(_artifact(tmp_path, adapter, plan, (4, 8, 8), 6))
    text = torch.randn(1, 6, 32)
    out = session.generate(text, guidance_scale=1.0, seed=3).latents
    session.plan = plan_from_calibration(plan_meta)
    assert torch.equal(out, session.generate(text, guidance_scale=1.0, seed=3).latents)
    scheduler = make_scheduler("flow_euler", "sd3")
    scheduler.set_timesteps(3)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(adapter.diffusers_forward(x, t.expand(1), text), t, x, return_dict=False)[0]
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-4)


def test_wan_search_with_local3d_runs_in_runtime(tmp_path):
    config = HeadsConfig(delta=2.0, head_factor=3.0, arrow_fractions=(0.1,), local3d_tile=(2, 2, 2),
                         local3d_fractions=(0.1,))
    adapter, tensors, meta, plan_meta = _calibrate("tiny-wan", (4, 4, 8, 8), 6, config, steps=2)
    kinds = [k for k, _, _ in meta["sites"]["attn1"]["candidates"]]
    assert kinds == ["full", "arrow", "local3d", "cached"]
    plan = plan_from_calibration(plan_meta, passes=[heads_pass(tensors, meta)])
    assert dict(plan.tiles) == {"attn1": (2, 2, 2)}
    used = {s.kind for v in plan.variants for _, schemes in v.heads for s in schemes}
    assert "local3d" in used or "arrow" in used
    session = load(_artifact(tmp_path, adapter, plan, (4, 4, 8, 8), 6))
    result = session.generate(torch.randn(1, 6, 32), seed=0, guidance_scale=4.0)
    assert result.report.attention_flops_fraction == pytest.approx(plan.predicted["attention_flops_fraction"])


def test_eight_bit_twins_in_the_menu_and_their_saving_counts_the_speedup():
    from ditbake.exporter.plan_heads import HeadsConfig, candidates, savings

    config = HeadsConfig(arrow_fractions=(0.25,), attention_precisions=("int8",), eight_bit_speedup=2.0)
    menu = candidates(config, 64)
    assert menu == (HeadScheme("full"), HeadScheme("arrow", 16, 16), HeadScheme("full", precision="int8"),
                    HeadScheme("arrow", 16, 16, "int8"), HeadScheme("cached"))
    saving = savings(menu, 0, 64, 32, config.eight_bit_speedup)
    band = 1.0 - saving[1]  # the band's share of dense FLOPs
    assert saving[0] == 0.0 and saving[2] == 0.5 and abs(saving[3] - (1 - band / 2)) < 1e-12 and saving[4] == 1.0
    assert HeadsConfig.from_json(config.to_json()) == config
    with pytest.raises(PlanError, match="8-bit formats"):
        HeadsConfig(attention_precisions=("bf16",))


@pytest.mark.parametrize("dense_runs", [True, False])
def test_full_int8_candidates_are_measured_on_the_kernel_the_runtime_runs(monkeypatch, dense_runs):
    """The head search scores a candidate under the numerics that run: full INT8 heads on the dense
    kernel where the runtime picks it by default, the general 8-bit kernel otherwise."""
    from ditbake.exporter.calibrate_heads import CandidateRunner
    from ditbake.plugins import attention_8bit_dense

    monkeypatch.setattr(attention_8bit_dense, "kernel_supports", lambda q: dense_runs)
    calls = []
    for name in ("attention_8bit_dense", "attention_8bit"):
        op = getattr(torch.ops.ditbake, name)
        plain = lambda a: a.as_subclass(torch.Tensor) if isinstance(a, torch.Tensor) else a  # noqa: E731
        monkeypatch.setattr(torch.ops.ditbake, name,
                            lambda *a, _n=name, _op=op: calls.append(_n) or _op(*(plain(x) for x in a)))
    q, k, v = (torch.randn(1, 2, 40, 32).as_subclass(CudaLookingTensor) for _ in range(3))
    menu = [(0, HeadScheme("full", precision="int8")), (1, HeadScheme("arrow", 4, 4, "int8"))]
    outs = dict(CandidateRunner(None)._eight_bit(menu, q, k, v, (0, 0), None))
    assert calls == (["attention_8bit_dense", "attention_8bit"] if dense_runs else ["attention_8bit"] * 2)
    assert set(outs) == {0, 1} and all(o.shape == q.shape for o in outs.values())


def test_wan_search_plans_8bit_attention_heads_and_the_runtime_runs_them(tmp_path):
    """With 8-bit twins in the menu the search measures their error (the 8-bit op's numerics: here
    its reference) like any candidate, the plan carries per-head precision, the runtime runs it."""
    config = HeadsConfig(delta=2.0, head_factor=3.0, arrow_fractions=(0.1,), local3d_tile=(2, 2, 2),
                         local3d_fractions=(0.1,), attention_precisions=("int8",), eight_bit_speedup=2.0)
    adapter, tensors, meta, plan_meta = _calibrate("tiny-wan", (4, 4, 8, 8), 6, config, steps=2)
    menu = [HeadScheme.from_json(c) for c in meta["sites"]["attn1"]["candidates"]]
    assert [(s.kind, s.precision) for s in menu] == [("full", "bf16"), ("arrow", "bf16"), ("local3d", "bf16"),
                                                    ("full", "int8"), ("arrow", "int8"), ("local3d", "int8"),
                                                    ("cached", "bf16")]
    errors = tensors["heads_error.attn1"]
    dense8 = errors[..., 3]
    # 8-bit dense attention: small but non-zero error, below the bands' on average
    assert torch.isfinite(dense8).all() and 0 < dense8.mean() < errors[..., 1].mean()
    plan = plan_from_calibration(plan_meta, passes=[heads_pass(tensors, meta)])
    used = {(s.kind, s.precision) for v in plan.variants for _, schemes in v.heads for s in schemes}
    assert any(p == "int8" for _, p in used), used
    session = load(_artifact(tmp_path, adapter, plan, (4, 4, 8, 8), 6))
    result = session.generate(torch.randn(1, 6, 32), seed=0, guidance_scale=4.0)
    assert torch.isfinite(result.latents).all()
    assert result.report.attention_flops_fraction == pytest.approx(plan.predicted["attention_flops_fraction"])
