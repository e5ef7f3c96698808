"""Turn calibration statistics into a plan.

This first planner emits the all-bf16, all-compute, all-full-attention plan: every field of the
schema is filled explicitly, so the precision, cache and head planners only change values.
"""
from __future__ import annotations

from ditbake.runtime.plan import BlockVariant, HeadScheme, Plan, collapse


def baseline_variant(linear_layers, attention_sites: dict[str, int]) -> BlockVariant:
    return BlockVariant(compute=True, purified=False,
                        precisions=tuple(sorted((name, "bf16") for name in linear_layers)),
                        heads=tuple(sorted((site, tuple(HeadScheme() for _ in range(n)))
                                           for site, n in attention_sites.items())))


def plan_from_calibration(meta: dict, mode: str = "baked") -> Plan:
    """The uncompressed plan for the model and trajectory that `meta` (calibration.json) describes."""
    variant = baseline_variant(meta["linear_layers"], meta["attention_sites"])
    branches = meta.get("branches", ["cond", "uncond"])
    configs = [[[variant] * meta["num_blocks"] for _ in branches] for _ in range(meta["num_steps"])]
    variants, table = collapse(configs)
    steps = tuple({b: tuple(ids) for b, ids in zip(branches, step)} for step in table)
    return Plan(architecture=meta["architecture"], num_blocks=meta["num_blocks"],
                linear_layers=tuple(meta["linear_layers"]),
                attention_sites=tuple(sorted(meta["attention_sites"].items())), variants=variants, steps=steps,
                mode=mode, adaptive=None,
                predicted={"relative_block_cost": 1.0, "skip_fraction": 0.0, "avg_activation_bits": 16.0,
                           "attention_flops_fraction": 1.0})
