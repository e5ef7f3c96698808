"""One entry point for quantized plans: DMPQ precision → Temporal Delta Cache → Purified Delta
Refresh → bit count, baked or adaptive. Used by `ditbake plan` and the benchmarks:

    stats = CalibrationStats.load("cal/")
    plan = quantized_plan(stats.meta, stats.tensors, PrecisionConfig(avg_bits=6.0),
                          cache=CacheConfig(skip_budget=0.3), pdr=True)   # or pdr=False
"""
from __future__ import annotations

import dataclasses

import torch

from ditbake.exporter.plan_adaptive import adaptive_section, make_adaptive
from ditbake.exporter.plan_cache import CacheConfig
from ditbake.exporter.plan_pdr import PdrConfig, pdr_pass
from ditbake.exporter.plan_precision import PrecisionConfig, PrecisionConfigError, bits_pass, precision_pass
from ditbake.exporter.planner import plan_from_calibration
from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import Plan


def quantized_plan(meta: dict, tensors: dict[str, torch.Tensor], precision: PrecisionConfig | None = None, *,
                   cache: CacheConfig | None = None, pdr: bool | PdrConfig | None = None, mode: str = "baked",
                   passes: list | None = None) -> Plan:
    """`precision` None: no quantization (all bf16). `pdr` None: on when the plan is quantized and
    skips (the paper's default); True/False/PdrConfig to force. `passes` run before precision
    (e.g. the attention-heads pass)."""
    if mode not in ("baked", "adaptive"):
        raise PlanError(f"plan mode must be 'baked' or 'adaptive', got {mode!r}")
    if pdr is None:
        pdr = precision is not None and cache is not None
    pdr_cfg = pdr if isinstance(pdr, PdrConfig) else (PdrConfig() if pdr else None)
    if pdr_cfg is not None and cache is None:
        raise PlanError("Purified Delta Refresh needs the Temporal Delta Cache (a refresh follows skips); "
                        "give a TDC tau or skip budget, or turn PDR off")
    if mode == "adaptive" and precision is not None and precision.predictor != "gamma":
        raise PrecisionConfigError("adaptive mode applies the Γ predictor at run time; use predictor 'gamma'")
    if mode == "adaptive" and precision is None and cache is None:
        raise PlanError("adaptive mode needs something to adapt: a precision budget or a TDC setting")
    before = list(passes or [])
    prec = precision_pass(tensors, precision) if precision is not None else None
    if prec is not None:
        before.append(prec)
    after = ([pdr_pass(tensors, pdr_cfg)] if pdr_cfg is not None else []) + [bits_pass]
    if mode == "adaptive" and cache is not None:  # the runtime re-runs the per-branch τ walk online
        cache = dataclasses.replace(cache, search="tau")
    plan = plan_from_calibration(meta, mode="baked", tensors=tensors, cache=cache, passes=before, after_cache=after)
    if mode == "baked":
        return plan
    tdc = plan.predicted.get("tdc") or {}
    section = adaptive_section(meta, tensors, precision=prec, cache=cache, tau=tdc.get("tau"),
                               unsafe_steps=tdc.get("unsafe_steps"), pdr=pdr_cfg)
    return make_adaptive(plan, section)
