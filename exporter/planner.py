"""Turn calibration statistics into a plan.

The baseline is the all-bf16, all-compute, all-full-attention plan with every schema field
filled explicitly; the technique planners (Temporal Delta Cache today) only change values.
"""
from __future__ import annotations

import torch

from ditbake.exporter.plan_cache import CacheConfig, plan_schedule
from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import BlockVariant, HeadScheme, Plan, collapse

SKIP = BlockVariant(compute=False)


def baseline_variant(linear_layers, attention_sites: dict[str, int]) -> BlockVariant:
    return BlockVariant(compute=True, purified=False,
                        precisions=tuple(sorted((name, "bf16") for name in linear_layers)),
                        heads=tuple(sorted((site, tuple(HeadScheme() for _ in range(n)))
                                           for site, n in attention_sites.items())))


def plan_from_calibration(meta: dict, mode: str = "baked", tensors: dict[str, torch.Tensor] | None = None,
                          cache: CacheConfig | None = None) -> Plan:
    """The plan for the model and trajectory that `meta` (calibration.json) describes: uncompressed,
    or with a Temporal Delta Cache skip schedule from the calibrated Δ changes when `cache` is set."""
    variant = baseline_variant(meta["linear_layers"], meta["attention_sites"])
    branches = meta.get("branches", ["cond", "uncond"])
    configs = [[[variant] * meta["num_blocks"] for _ in branches] for _ in range(meta["num_steps"])]
    predicted = {"relative_block_cost": 1.0, "skip_fraction": 0.0, "avg_activation_bits": 16.0,
                 "attention_flops_fraction": 1.0}
    if cache is not None:
        if tensors is None or "delta_change" not in tensors:
            raise PlanError("a TDC plan needs the calibration's delta_change statistics; re-run `ditbake calibrate`")
        sched = plan_schedule(tensors["delta_change"], cache)
        for i, step in enumerate(configs):
            for br, blocks in enumerate(step):
                for b in range(len(blocks)):
                    if sched.skip[br, i, b]:
                        blocks[b] = SKIP
        predicted.update(skip_fraction=sched.skip_fraction, relative_block_cost=1.0 - sched.skip_fraction,
                         tdc={"tau": sched.tau, "max_run": cache.max_run, "unsafe_steps": sched.unsafe_steps,
                              "max_predicted_error": float(sched.predicted_error.max())})
    variants, table = collapse(configs)
    steps = tuple({b: tuple(ids) for b, ids in zip(branches, step)} for step in table)
    return Plan(architecture=meta["architecture"], num_blocks=meta["num_blocks"],
                linear_layers=tuple(meta["linear_layers"]),
                attention_sites=tuple(sorted(meta["attention_sites"].items())), variants=variants, steps=steps,
                mode=mode, adaptive=None, predicted=predicted)
