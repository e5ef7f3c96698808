"""Guidance skips: the uncond branch skipped at steps where cond computes, serving
uncond's stack residual as cond's fresh one plus the gap uncond − cond measured at the last step
both computed (`Plan.uncond_skip == "guidance"`, runtime/session.py).

Why this and not more whole-step skips: on the 16k bed, the TDC plan falls off a cliff past
50 % skipped steps (36.9 → 27.6 dB at 56 %), because a skipped step reuses a residual that
moves with the latent. The CFG gap is the conditioning's contribution; FasterCache (Lv et al.,
2024) found it changes slowly over the steps of video DiTs. Guidance skips spend that on
the steps a TDC plan still computes: each one saves one of the step's two forwards.

`add_guidance_skips` spreads them evenly over the eligible steps (both branches compute, past
a warm-up prefix) or places them where told. Where they go matters more than how many: on the
16k bed five skips cost 0.9-13 dB depending on the steps (the last steps' gap moves most), so
`guidance_step_errors` measures each eligible step's cost on calibration prompts (one skip at a
time, final latents vs the plan without it) and `choose_guidance_steps` takes the cheapest.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import BlockVariant, Plan


log = logging.getLogger(__name__)


def eligible_steps(plan: Plan, start: int) -> list[int]:
    """Steps ≥ start where both branches compute: an uncond skip there can pair with cond's residual."""
    return [i for i in range(max(start, 1), plan.num_steps)
            if plan.computes_stack(i, "cond") and plan.computes_stack(i, "uncond")]


def add_guidance_skips(plan: Plan, fraction: float = 0.0, start: int = 5, at: list[int] | None = None) -> Plan:
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


def guidance_step_errors(session, plan: Plan, seeds: list[int], *, start: int = 5, guidance_scale: float = 5.0,
                         progress=None, **conditioning) -> dict[int, float]:
    """For every eligible step i: the mean relative L2 error of the final latents when uncond is
    guidance-skipped at i alone, against `plan` itself, over one batch of prompts × `seeds`.
    `conditioning` is what `session.generate` takes for that batch (text_embeds and negative_embeds
    [B, L, D], or prompt=[...], pooled vectors where the model has them). `session` runs `plan`'s
    variants (guidance skips add none: the skip variant needs no engine); its plan is restored."""
    original = session.plan
    steps = eligible_steps(plan, start)
    if not seeds or not steps:
        raise PlanError("guidance step errors need seeds and eligible steps")

    def finals():
        return [session.generate(seed=s, guidance_scale=guidance_scale, **conditioning).latents.flatten(1)
                for s in seeds]

    try:
        session.plan = plan
        refs = finals()
        errors = {}
        for i in (progress(steps) if progress else steps):
            session.plan = add_guidance_skips(plan, start=start, at=[i])
            errs = torch.cat([(x - r).norm(dim=1) / r.norm(dim=1) for x, r in zip(finals(), refs)])
            errors[i] = float(errs.mean())
            log.debug("guidance skip at step %d: relative error %.4g", i, errors[i])
    finally:
        session.plan = original
    return errors


def choose_guidance_steps(errors: dict[int, float], count: int) -> list[int]:
    """The `count` steps of lowest measured error, no two neighbours among the measured steps (a
    skip's gap must come from a computed step just before it)."""
    order = sorted(errors)
    position = {i: k for k, i in enumerate(order)}
    chosen: list[int] = []
    for i in sorted(errors, key=lambda i: (errors[i], i)):
        if len(chosen) == count:
            break
        if all(abs(position[i] - position[j]) > 1 for j in chosen):
            chosen.append(i)
    if len(chosen) < count:
        raise PlanError(f"only {len(chosen)} of {count} guidance skips fit without two in a row")
    return sorted(chosen)
