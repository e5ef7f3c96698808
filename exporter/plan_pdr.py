"""Purified Delta Refresh (6Bit-Diffusion's PDR): the first compute of a block after a run of
skips refreshes the cached residual Δ that the next skips will reuse, so quantization noise
computed there is replayed at every following skip. PDR marks that compute `purified` and runs
its outlier layers — calibrated input outlier ratio max|X|/mean|X| above a threshold (25 in the
paper) — in bf16, where activation quantization hurts most.

The outlier ratio of a layer at a refresh is the calibration's mean over prompts at that
(branch, step, block, layer): the refresh happens at a known step in a baked plan, and the ratio
moves along the trajectory. Runs after the Temporal Delta Cache pass (it needs the skips).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ditbake.exporter.calibrate_precision import require
from ditbake.runtime.errors import PlanError


@dataclass(frozen=True)
class PdrConfig:
    """outlier_threshold: layers whose input outlier ratio exceeds this run bf16 at a refresh."""

    outlier_threshold: float = 25.0

    def __post_init__(self):
        if not self.outlier_threshold > 1.0:
            raise PlanError(f"PDR outlier threshold must be > 1 (max|X|/mean|X| >= 1 always), "
                            f"got {self.outlier_threshold}")


def outlier_table(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean outlier ratio [branch, step, block, layer] over calibration prompts."""
    require(tensors, "outlier_ratio")
    return tensors["outlier_ratio"].double().mean(dim=0)


def refresh_steps(configs) -> set[tuple[int, int, int]]:
    """(step, branch, block) of every first compute after a skip run."""
    out = set()
    for i in range(1, len(configs)):
        for br, blocks in enumerate(configs[i]):
            for b, v in enumerate(blocks):
                if v.compute and not configs[i - 1][br][b].compute:
                    out.add((i, br, b))
    return out


def pdr_pass(tensors: dict[str, torch.Tensor] | None, config: PdrConfig | None = None):
    """Planner pass (after the cache pass): purify the refresh computes."""
    cfg = config or PdrConfig()
    if tensors is None:
        raise PlanError("PDR needs the calibration's outlier ratios; pass the calibration tensors")
    ratio = outlier_table(tensors)

    def apply(configs, meta: dict, predicted: dict) -> None:
        layers = list(meta["linear_layers"])
        if ratio.shape[1:] != (len(configs), meta["num_blocks"], len(layers)):
            raise PlanError(f"outlier statistics have shape {list(ratio.shape)}; the plan needs "
                            f"[branch, {len(configs)}, {meta['num_blocks']}, {len(layers)}]; re-run `ditbake calibrate`")
        refreshed = kept = 0
        for i, br, b in sorted(refresh_steps(configs)):
            v = configs[i][br][b]
            prec = dict(v.precisions)
            for li, name in enumerate(layers):
                if ratio[br, i, b, li] > cfg.outlier_threshold and prec.get(name, "bf16") != "bf16":
                    prec[name] = "bf16"
                    kept += 1
            configs[i][br][b] = dataclasses.replace(v, purified=True, precisions=tuple(sorted(prec.items())))
            refreshed += 1
        predicted["pdr"] = {"outlier_threshold": cfg.outlier_threshold, "refreshes": refreshed,
                            "layers_kept_bf16": kept}
    return apply
