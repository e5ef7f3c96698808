"""Turn calibration statistics into a plan.

The baseline is the all-bf16, all-compute, all-full-attention plan with every schema field
filled explicitly. Each technique is a pass over the per-(step, branch, block) variant table that
only changes values, in a fixed order: attention heads, then activation precision, then the
Temporal Delta Cache skip schedule (a skipped block has no heads or precisions to choose), then
anything that depends on where the skips fell (Purified Delta Refresh). A pass also records its
predictions in `predicted`.
"""
from __future__ import annotations

from typing import Callable

import torch

from ditbake.exporter.plan_cache import CacheConfig, plan_schedule
from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import BlockVariant, HeadScheme, Plan, collapse

SKIP = BlockVariant(compute=False)

# configs[step][branch][block] -> BlockVariant, mutated in place by the technique passes
VariantTable = list[list[list[BlockVariant]]]
TechniquePass = Callable[[VariantTable, dict, dict], None]  # (configs, meta, predicted)


def baseline_variant(linear_layers, attention_sites: dict[str, int]) -> BlockVariant:
    return BlockVariant(compute=True, purified=False,
                        precisions=tuple(sorted((name, "bf16") for name in linear_layers)),
                        heads=tuple(sorted((site, tuple(HeadScheme() for _ in range(n)))
                                           for site, n in attention_sites.items())))


def cache_pass(tensors: dict[str, torch.Tensor] | None, cache: CacheConfig) -> TechniquePass:
    """Temporal Delta Cache: replace (step, branch, block) entries the skip schedule skips."""
    if tensors is None or "delta_change" not in tensors:
        raise PlanError("a TDC plan needs the calibration's delta_change statistics; re-run `ditbake calibrate`")

    def apply(configs: VariantTable, meta: dict, predicted: dict) -> None:
        sched = plan_schedule(tensors["delta_change"], cache, tensors.get("gamma"))
        for i, step in enumerate(configs):
            for br, blocks in enumerate(step):
                for b in range(len(blocks)):
                    if sched.skip[br, i, b]:
                        blocks[b] = SKIP
        predicted.update(skip_fraction=sched.skip_fraction, relative_block_cost=1.0 - sched.skip_fraction,
                         tdc={"tau": sched.tau, "max_run": cache.max_run, "metric": cache.metric, "granularity": cache.granularity, "search": cache.search,
                              "unsafe_steps": sched.unsafe_steps,
                              "max_predicted_error": float(sched.predicted_error.max())})
    return apply


def plan_from_calibration(meta: dict, mode: str = "baked", tensors: dict[str, torch.Tensor] | None = None,
                          cache: CacheConfig | None = None, passes: list[TechniquePass] | None = None,
                          adaptive: dict | None = None, after_cache: list[TechniquePass] | None = None) -> Plan:
    """The plan for the model and trajectory that `meta` (calibration.json) describes: uncompressed,
    then changed by each technique pass in order. `cache` appends the Temporal Delta Cache pass
    (kept as a keyword for the common case); `passes` run before it and `after_cache` after it
    (Purified Delta Refresh needs the skips); `adaptive` is the runtime predictor section an
    adaptive plan carries."""
    variant = baseline_variant(meta["linear_layers"], meta["attention_sites"])
    branches = meta.get("branches", ["cond", "uncond"])
    configs = [[[variant] * meta["num_blocks"] for _ in branches] for _ in range(meta["num_steps"])]
    predicted = {"relative_block_cost": 1.0, "skip_fraction": 0.0, "avg_activation_bits": 16.0,
                 "attention_flops_fraction": 1.0}
    all_passes = list(passes or [])
    if cache is not None:
        all_passes.append(cache_pass(tensors, cache))
    all_passes += list(after_cache or [])
    for technique in all_passes:
        technique(configs, meta, predicted)
    variants, table = collapse(configs)
    steps = tuple({b: tuple(ids) for b, ids in zip(branches, step)} for step in table)
    # the heads pass records the 3D tiles its local3d heads use; the plan carries them for the runtime
    tiles = tuple(sorted((site, tuple(tile)) for site, tile in predicted.get("heads", {}).get("tiles", {}).items()))
    return Plan(architecture=meta["architecture"], num_blocks=meta["num_blocks"],
                linear_layers=tuple(meta["linear_layers"]),
                attention_sites=tuple(sorted(meta["attention_sites"].items())), variants=variants, steps=steps,
                mode=mode, adaptive=adaptive, predicted=predicted, tiles=tiles,
                stack_extrapolation=cache.extrapolate if cache is not None else "none")
