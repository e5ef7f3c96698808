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
    out = add_guidance_skips(plan, 0.0, at=[8, 15, 8])
    assert out.predicted["guidance_skips"] == [8, 15]
    assert not out.computes_stack(8, "uncond") and out.computes_stack(8, "cond")
    for bad in ([7], [3], [0], [25]):  # a TDC skip, the warm-up prefix, step 0, past the end
        with pytest.raises(PlanError, match="not steps"):
            add_guidance_skips(plan, 0.0, at=bad)
