"""add_guidance_skips: uncond skipped at evenly spread steps where both branches compute."""
import random

import pytest

from ditbake.exporter.plan_guidance import add_guidance_skips, eligible_steps
from ditbake.exporter.planner import plan_from_calibration
from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import BlockVariant, Plan


def _tdc_plan(num_steps, skipped):
    meta = {"architecture": "wan", "num_blocks": 3, "linear_layers": ["attn1.to_q"],
            "attention_sites": {"attn1": 2}, "num_steps": num_steps, "branches": ["cond", "uncond"]}
    plan = plan_from_calibration(meta).to_json()
    plan["variants"].append(BlockVariant(compute=False).to_json())
    for i in skipped:
        plan["steps"][i] = {"cond": [1] * 3, "uncond": [1] * 3}
    plan["stack_extrapolation"] = "linear"
    return Plan.from_json(plan)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.4, 0.5])
def test_spread_never_adjacent_and_counted(fraction, rng_seed):
    rnd = random.Random(rng_seed)
    n = rnd.randrange(12, 60)
    skipped = sorted(rnd.sample(range(6, n), k=(n - 6) // 3))
    plan = _tdc_plan(n, skipped)
    eligible = eligible_steps(plan, 5)
    out = add_guidance_skips(plan, fraction, start=5)
    chosen = out.predicted["guidance_skips"]
    assert len(chosen) == min(len(eligible[1::2]), round(fraction * len(eligible)))
    assert set(chosen) <= set(eligible) and chosen == sorted(set(chosen))
    positions = [eligible.index(i) for i in chosen]
    assert all(b - a >= 2 for a, b in zip(positions, positions[1:]))  # a computed uncond between any two
    assert out.uncond_skip == "guidance"
    for i in range(n):  # cond untouched; uncond skipped exactly at chosen steps (and the TDC skips)
        assert out.steps[i]["cond"] == plan.steps[i]["cond"]
        assert out.computes_stack(i, "uncond") == (plan.computes_stack(i, "uncond") and i not in chosen)
    computed = sum(out.computes_stack(i, b) for i in range(n) for b in ("cond", "uncond"))
    assert out.predicted["forward_fraction"] == pytest.approx(computed / (2 * n))
    assert Plan.from_json(out.to_json()) == out  # the result is a valid plan that round-trips


@pytest.mark.parametrize("fraction", [-0.1, 0.6, 2.0])
def test_bad_fraction_refused(fraction):
    with pytest.raises(PlanError, match="fraction must be in"):
        add_guidance_skips(_tdc_plan(10, [6]), fraction)


def test_explicit_steps_and_ineligible_ones_refused():
    plan = _tdc_plan(20, [7, 9, 12])
    out = add_guidance_skips(plan, at=[8, 15, 8])
    assert out.predicted["guidance_skips"] == [8, 15]
    assert not out.computes_stack(8, "uncond") and out.computes_stack(8, "cond")
    for bad in ([7], [3], [0], [25]):  # a TDC skip, the warm-up prefix, step 0, past the end
        with pytest.raises(PlanError, match="not steps"):
            add_guidance_skips(plan, at=bad)


def test_choose_cheapest_without_neighbours(rng_seed):
    from ditbake.exporter.plan_guidance import choose_guidance_steps

    rnd = random.Random(rng_seed)
    steps = sorted(rnd.sample(range(5, 60), 20))
    errors = {i: rnd.random() for i in steps}
    chosen = choose_guidance_steps(errors, 6)
    assert len(chosen) == 6 and chosen == sorted(chosen)
    pos = [steps.index(i) for i in chosen]
    assert all(b - a >= 2 for a, b in zip(pos, pos[1:]))
    assert min(errors, key=errors.get) in chosen
    # greedy by error: a step left out is either dearer than every chosen one or a neighbour of a cheaper chosen one
    for i in set(steps) - set(chosen):
        k = steps.index(i)
        cheaper_neighbour = any(abs(steps.index(j) - k) == 1 and errors[j] <= errors[i] for j in chosen)
        assert cheaper_neighbour or errors[i] >= max(errors[j] for j in chosen)
    with pytest.raises(PlanError, match="fit without two in a row"):
        choose_guidance_steps({1: 0.1, 2: 0.2, 3: 0.3}, 3)


def test_step_errors_measure_each_skip_alone(tmp_path):
    import torch

    from ditbake.exporter.plan_guidance import guidance_step_errors
    from ditbake.runtime import load

    from tests.conftest import build_tiny_artifact

    def plan_fn(meta):
        p = plan_from_calibration(meta).to_json()
        p["variants"].append(BlockVariant(compute=False).to_json())
        p["steps"][4] = {"cond": [1] * 3, "uncond": [1] * 3}
        return Plan.from_json(p)

    path, _ = build_tiny_artifact(tmp_path, "tiny-wan", steps=8, plan_fn=plan_fn)
    session = load(path)
    plan = session.plan
    text = torch.randn(2, session.profile().text_len, 32)
    negative = torch.randn_like(text)
    errors = guidance_step_errors(session, plan, seeds=[3], start=2, text_embeds=text, negative_embeds=negative)
    assert sorted(errors) == [2, 3, 5, 6, 7] and session.plan is plan
    assert all(0 < e < 10 for e in errors.values())
    # one of them by hand
    ref = session.generate(text, negative, seed=3).latents.flatten(1)
    session.plan = add_guidance_skips(plan, start=2, at=[6])
    x = session.generate(text, negative, seed=3).latents.flatten(1)
    assert errors[6] == pytest.approx(float(((x - ref).norm(dim=1) / ref.norm(dim=1)).mean()), rel=1e-5)
