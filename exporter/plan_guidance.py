"""Guidance skips: the uncond branch skipped at steps where cond computes, serving
uncond's stack residual as cond's fresh one plus the gap uncond − cond measured at the last step
both computed (`Plan.uncond_skip == "guidance"`, runtime/session.py).

Why this and not more whole-step skips: on the 16k bed, the TDC plan falls off a cliff past
50 % skipped steps (36.9 → 27.6 dB at 56 %), because a skipped step reuses a residual that
moves with the latent. The CFG gap is the conditioning's contribution; FasterCache (Lv et al.,
2024) found it changes slowly over the steps of video DiTs. Guidance skips spend that on
the steps a TDC plan still computes: each one saves one of the step's two forwards.

`add_guidance_skips` spreads them evenly over the eligible steps (both branches compute, past
a warm-up prefix); which steps to pick by measurement is open (see the README).
"""
from __future__ import annotations

import dataclasses

from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import BlockVariant, Plan


def eligible_steps(plan: Plan, start: int) -> list[int]:
    """Steps ≥ start where both branches compute: an uncond skip there can pair with cond's residual."""
    return [i for i in range(max(start, 1), plan.num_steps)
            if plan.computes_stack(i, "cond") and plan.computes_stack(i, "uncond")]


def add_guidance_skips(plan: Plan, fraction: float, start: int = 5, at: list[int] | None = None) -> Plan:
    """The plan with uncond skipped at about `fraction` of its eligible steps, evenly spread and
    never two eligible steps in a row (each skipped one's gap comes from the computed one before);
    or, with `at`, exactly at those steps (each must be eligible)."""
    if not 0.0 <= fraction <= 0.5:
        raise PlanError(f"guidance skip fraction must be in [0, 0.5] (no two in a row), got {fraction}")
    if plan.mode != "baked":
        raise PlanError("guidance skips need a baked plan")
    steps = eligible_steps(plan, start)
    if at is not None:
        chosen = sorted(set(at))
        bad = [i for i in chosen if i not in steps]
        if bad:
            raise PlanError(f"guidance skips at {bad}: not steps ≥ {start} where both branches compute")
    else:
        candidates = steps[1::2]  # every other eligible step: no two skips in a row
        count = min(len(candidates), round(fraction * len(steps)))
        chosen = [candidates[int((k + 0.5) * len(candidates) / count)] for k in range(count)]
    skip = BlockVariant(compute=False)
    variants = list(plan.variants)
    if skip not in variants:
        variants.append(skip)
    skip_id = variants.index(skip)
    table = [dict(s) for s in plan.steps]
    for i in chosen:
        table[i]["uncond"] = (skip_id,) * plan.num_blocks
    predicted = dict(plan.predicted, guidance_skips=chosen,
                     forward_fraction=_forward_fraction(plan, len(chosen)))
    return dataclasses.replace(plan, variants=tuple(variants), steps=tuple(table), uncond_skip="guidance",
                               predicted=predicted)


def _forward_fraction(plan: Plan, extra_skips: int) -> float:
    """Fraction of the 2 × steps branch forwards that still compute the stack."""
    computed = sum(plan.computes_stack(i, b) for i in range(plan.num_steps) for b in ("cond", "uncond"))
    return (computed - extra_skips) / (2 * plan.num_steps)
