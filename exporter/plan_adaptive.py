"""The `adaptive` section of a plan and the variants it may pick (runtime: runtime/adaptive.py).

In adaptive mode the runtime measures, per CFG branch and block, Γ (relative L1 change the block
makes to its input) and the step-to-step change of the residual Δ, and re-decides step i from the
measurements of step i−1 with the planner's own rules:

- precision: a layer runs NVFP4 where α·Γ(i−1) + β ≤ θ (the fitted DMPQ predictor), else the
  high format; excluded layers stay bf16;
- skip: the TDC walk (unsafe prefix, at most max_run skips, accumulated change ≤ τ), with the
  calibrated per-step change scaled by r = measured / expected at the block's last compute;
- purified refresh: the first compute after skips runs the calibrated outlier layers in bf16.

With measurements equal to the calibration means the runtime picks exactly the baked plan.
Every configuration the rules can reach is precompiled: per block, the precision rule is a
threshold on Γ for each layer, so as Γ varies the block passes through at most L+1 precision
configurations (ordered by the layers' break points); each also exists as a purified refresh
(with the outlier layers of every step) and with the baked step's attention heads or full heads.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ditbake.exporter.plan_cache import mean_change
from ditbake.exporter.plan_pdr import outlier_table
from ditbake.exporter.planner import SKIP
from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import BlockVariant, HeadScheme, Plan

RATIO_CLAMP = (0.25, 4.0)  # trajectories measured beyond 4× the calibrated scale are extrapolation


def _finite_or_none(v: float):
    return float(v) if math.isfinite(float(v)) else None


def precision_breakpoints(alpha, beta, threshold: float) -> list[float]:
    """Γ values where some layer of a block flips format (per-layer sequences), in float64 as the runtime
    evaluates the rule (runtime/adaptive.py reads α, β from the plan's JSON as Python floats)."""
    pts = []
    for a, b in zip(_floats(alpha), _floats(beta)):
        if a != 0:
            g = (threshold - b) / a
            if g >= 0 and math.isfinite(g):
                pts.append(g)
    return sorted(pts)


def _floats(values) -> list[float]:
    return [float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]


def precision_choice(alpha, beta, excluded, gamma: float, threshold: float, high: str, layers) -> dict[str, str]:
    """The rule the runtime applies (runtime/adaptive.py mirrors it; tests hold them equal)."""
    out = {}
    for li, name in enumerate(layers):
        if excluded[li]:
            out[name] = "bf16"
        else:
            out[name] = "nvfp4" if alpha[li] * gamma + beta[li] <= threshold else high
    return out


def reachable_precisions(alpha, beta, excluded, threshold, high, layers) -> list[dict[str, str]]:
    """Every configuration the rule gives for some Γ ≥ 0: the configuration is constant between consecutive
    break points, so one probe inside each interval (midpoints, below the first, beyond the last) and one at
    each break point (where `<=` can make two layers flip together) find them all. Probes a relative 1e-9 on
    either side of break points computed in float32 (the first version) fell on the same side of the exact
    break point and missed the interval between two close break points (a Flux block: 0.0227 and 0.0359)."""
    alpha, beta = _floats(alpha), _floats(beta)
    pts = sorted(set(precision_breakpoints(alpha, beta, threshold)))
    probes = [0.0] + pts + [(x + y) / 2 for x, y in zip(pts, pts[1:])]
    if pts:
        probes += [pts[0] / 2, pts[-1] * 2 + 1.0]
    seen, out = set(), []
    for g in sorted(probes):
        c = precision_choice(alpha, beta, excluded, g, threshold, high, layers)
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def adaptive_section(meta: dict, tensors: dict[str, torch.Tensor], *, precision=None, cache=None, tau=None,
                     unsafe_steps=None, pdr=None) -> dict:
    """The JSON section. `precision` is a precision pass (its `tables`, `threshold`), `cache` the
    CacheConfig with the tau it ran at (`tau`, `unsafe_steps` from predicted["tdc"]), `pdr` a PdrConfig."""
    layers = list(meta["linear_layers"])
    section: dict = {"version": 1, "branches": list(meta.get("branches", ["cond", "uncond"])), "layers": layers,
                     "ratio_clamp": list(RATIO_CLAMP), "precision": None, "skip": None, "pdr": None}
    if precision is not None:
        tables = precision.tables
        if tables.fit is None:
            raise PlanError("adaptive precision needs the fitted Γ predictor (predictor 'gamma' and >= 2 steps)")
        gamma = tensors["gamma"].double().mean(dim=0)  # [branch, step, block]
        section["precision"] = {
            "threshold": precision.threshold, "high_format": precision.config.high_format,
            "alpha": tables.fit.alpha.tolist(), "beta": tables.fit.beta.tolist(),
            # a layer the block lacks is "excluded" (bf16, as the baked plan keeps it; its block ignores it)
            "excluded": (tables.excluded | ~tables.planned).tolist(),
            "gamma": gamma.tolist()}  # alpha/beta/excluded [block][layer]
    if cache is not None:
        change = mean_change(tensors["delta_change"])  # [branch, step, block], inf at step 0
        section["skip"] = {"tau": tau, "max_run": cache.max_run, "unsafe_steps": list(unsafe_steps),
                           # [branch][step][block]; None = +inf (step 0: no cache yet)
                           "change": [[[_finite_or_none(c) for c in blocks] for blocks in steps] for steps in
                                      change.tolist()]}
        if pdr is not None:
            ratio = outlier_table(tensors)  # [branch, step, block, layer]
            section["pdr"] = {"outlier_threshold": pdr.outlier_threshold,
                              # [branch][step][block] → layers run in bf16 at a refresh there
                              "bf16_layers": [[[[layers[li] for li in range(len(layers)) if r[li] > pdr.outlier_threshold]
                                                for r in blocks] for blocks in steps] for steps in ratio.tolist()]}
    return section


def reachable_variants(plan: Plan, section: dict) -> list[BlockVariant]:
    """Every block configuration the runtime's rules can pick under `section`."""
    layers = section["layers"]
    full = tuple(sorted((site, tuple(HeadScheme() for _ in range(n))) for site, n in plan.attention_sites))
    out: list[BlockVariant] = [SKIP] if section["skip"] else []
    heads_per_block: dict[int, set] = {}
    for step in plan.steps:
        for ids in step.values():
            for b, vid in enumerate(ids):
                v = plan.variants[vid]
                heads_per_block.setdefault(b, {full}).add(v.heads if v.compute else full)
    prec = section["precision"]
    for b in range(plan.num_blocks):
        if prec is not None:
            configs = reachable_precisions(prec["alpha"][b], prec["beta"][b], prec["excluded"][b], prec["threshold"],
                                           prec["high_format"], layers)
        else:
            configs = [dict(plan.variants[ids[b]].precisions) for step in plan.steps for ids in step.values()
                       if plan.variants[ids[b]].compute] + [{name: "bf16" for name in layers}]
        purify_sets = {()}
        if section["pdr"]:
            purify_sets |= {tuple(blocks[b]) for steps in section["pdr"]["bf16_layers"] for blocks in steps}
        for heads in heads_per_block.get(b, {full}):
            for c in configs:
                out.append(BlockVariant(compute=True, purified=False, precisions=tuple(sorted(c.items())), heads=heads))
                if section["pdr"]:
                    for s in purify_sets:
                        p = {k: ("bf16" if k in s else v) for k, v in c.items()}
                        out.append(BlockVariant(compute=True, purified=True, precisions=tuple(sorted(p.items())),
                                                heads=heads))
    return out


def make_adaptive(plan: Plan, section: dict) -> Plan:
    """The baked plan turned adaptive: mode, section, and the reachable variants appended (the
    baked ids stay valid; step 0 always runs the baked ids)."""
    known = {v: i for i, v in enumerate(plan.variants)}
    extra = []
    for v in reachable_variants(plan, section):
        if v not in known:
            known[v] = len(plan.variants) + len(extra)
            extra.append(v)
    return dataclasses.replace(plan, variants=plan.variants + tuple(extra), mode="adaptive", adaptive=section)
