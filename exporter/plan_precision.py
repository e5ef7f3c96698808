"""DMPQ precision planning (6Bit-Diffusion): per (step, CFG branch, block, linear layer), run the
layer's activations in NVFP4 (W4A4) or INT8 (W4A8); weights are always NVFP4.

A layer runs NVFP4 at step i when its predicted W4A4 error is at most a threshold θ, INT8 otherwise:

    predicted E_rel(i) = α·Γ̄(i−1) + β        (predictor "gamma", the paper's; Γ̄ = calibration mean)
    predicted E_rel(i) = Ē_rel(i)             (predictor "measured": the calibrated mean itself)

Step 0 has no Γ(t−1): there both predictors use the calibrated mean E_rel of step 0.
θ is given, or searched by bisection over the sorted predictions so that the predicted average
activation bits (bf16 16, int8 8, nvfp4 4, over every planned layer call) meet a target, or so
that a target fraction of the quantized layer calls runs NVFP4.

Layers a block does not have (the calibration's ``absent_linears``: Flux's single blocks, SD3's
last block) are no planned call: they keep bf16 in the precision map, which their block ignores,
and count in neither the budget nor the exclusions.

Exclusions (kept bf16 at every step; embeddings and the projections in and out are not block
linears, so they are never planned): a layer whose calibrated W4A8 error — the best a quantized
layer can do here, since its weight is NVFP4 either way — exceeds `extreme_factor` × the median
of that error over all layers (measured: mean over prompts, branches and steps), or whose mean
input outlier ratio max|X|/mean|X| exceeds `extreme_outlier_ratio` (off by default).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from ditbake.exporter.calibrate_check import absent_linears
from ditbake.exporter.calibrate_precision import (PrecisionStatsError, absent, chosen_erel, choose_hadamard,
                                                  fit_predictor, require)
from ditbake.runtime.errors import PlanError

log = logging.getLogger(__name__)

BITS = {"bf16": 16, "fp8": 8, "int8": 8, "nvfp4": 4}
PREDICTORS = ("gamma", "measured")


class PrecisionConfigError(PlanError):
    """A precision planning option is out of range or contradicts another."""


@dataclass(frozen=True)
class PrecisionConfig:
    """How the precision pass chooses activation formats. Exactly one of `threshold`, `avg_bits`,
    `nvfp4_fraction` is set (None of them: threshold 0.1).

    threshold: run NVFP4 where the predicted W4A4 relative error is at most this.
    avg_bits: target predicted average activation bits over all planned layer calls (≤ target).
    nvfp4_fraction: target fraction of the quantized (non-excluded) layer calls in NVFP4 (≥ target).
    predictor: "gamma" (α·Γ(t−1)+β, the paper's, needed by adaptive mode) or "measured"
        (the calibrated per-step mean error).
    extreme_factor: exclude a layer whose mean W4A8 error is above this × the median over layers.
    extreme_outlier_ratio: exclude a layer whose mean input outlier ratio is above this (None: off).
    high_format: the format of layers predicted above the threshold ("int8", or "fp8").
    """

    threshold: float | None = None
    avg_bits: float | None = None
    nvfp4_fraction: float | None = None
    predictor: str = "gamma"
    extreme_factor: float = 3.0
    extreme_outlier_ratio: float | None = None
    high_format: str = "int8"

    def __post_init__(self):
        given = [n for n in ("threshold", "avg_bits", "nvfp4_fraction") if getattr(self, n) is not None]
        if len(given) > 1:
            raise PrecisionConfigError(f"give one of threshold, avg_bits, nvfp4_fraction, not {' and '.join(given)}")
        if self.threshold is not None and not self.threshold >= 0:
            raise PrecisionConfigError(f"precision threshold must be >= 0, got {self.threshold}")
        if self.avg_bits is not None and not 4.0 <= self.avg_bits <= 16.0:
            raise PrecisionConfigError(f"average activation bits must be in [4, 16], got {self.avg_bits}")
        if self.nvfp4_fraction is not None and not 0.0 <= self.nvfp4_fraction <= 1.0:
            raise PrecisionConfigError(f"NVFP4 fraction must be in [0, 1], got {self.nvfp4_fraction}")
        if self.predictor not in PREDICTORS:
            raise PrecisionConfigError(f"predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if not self.extreme_factor > 1.0:
            raise PrecisionConfigError(f"extreme_factor must be > 1, got {self.extreme_factor}")
        if self.extreme_outlier_ratio is not None and not self.extreme_outlier_ratio > 1.0:
            raise PrecisionConfigError(f"extreme_outlier_ratio must be > 1, got {self.extreme_outlier_ratio}")
        if self.high_format not in ("int8", "fp8"):
            raise PrecisionConfigError(f"high_format must be 'int8' or 'fp8', got {self.high_format!r}")

    @property
    def effective_threshold(self) -> float | None:
        if self.threshold is None and self.avg_bits is None and self.nvfp4_fraction is None:
            return 0.1
        return self.threshold


@dataclass(frozen=True)
class PrecisionTables:
    """What the pass decides from: predicted W4A4 error [branch, step, block, layer] (float64,
    NaN where absent), excluded, hadamard and absent [block, layer] (bool)."""

    predicted: torch.Tensor
    excluded: torch.Tensor
    hadamard: torch.Tensor
    fit: object | None = None
    absent: torch.Tensor | None = None

    @property
    def planned(self) -> torch.Tensor:
        """bool [block, layer]: the layer exists in the block (a planned call)."""
        return torch.ones_like(self.excluded) if self.absent is None else ~self.absent


def excluded_layers(tensors: dict[str, torch.Tensor], hadamard: torch.Tensor, config: PrecisionConfig) -> torch.Tensor:
    """bool [block, layer] by the measured rule in the module docstring."""
    high = config.high_format if f"erel_{config.high_format}" in tensors else "int8"
    best = chosen_erel(tensors, high, hadamard).double().mean(dim=(0, 1, 2))  # [block, layer]
    present = ~absent(tensors)
    excluded = (best > config.extreme_factor * best[present].median()) & present
    if config.extreme_outlier_ratio is not None:
        excluded |= (tensors["outlier_ratio"].double().mean(dim=(0, 1, 2)) > config.extreme_outlier_ratio) & present
    return excluded


def precision_tables(tensors: dict[str, torch.Tensor], config: PrecisionConfig) -> PrecisionTables:
    require(tensors, "gamma", "erel_nvfp4", "outlier_ratio")
    had = choose_hadamard(tensors)
    erel = chosen_erel(tensors, "nvfp4", had).double()  # [p, br, s, block, layer]
    missing = absent(tensors)
    if not torch.isfinite(erel[..., ~missing]).all():  # NaN outside an absent layer: calls were missed
        raise PrecisionStatsError("precision statistics contain NaN or Inf (a layer missed calls during "
                                  "calibration); re-run `ditbake calibrate`")
    measured = erel.mean(dim=0)  # [br, s, block, layer]
    fit = None
    if config.predictor == "gamma" and erel.shape[2] > 1:
        fit = fit_predictor(tensors, "nvfp4", had)
        gamma_prev = tensors["gamma"].double().mean(dim=0)[:, :-1]  # [br, s-1, block]
        predicted = torch.cat([measured[:, :1], fit.predict(gamma_prev)], dim=1)
    else:
        predicted = measured
    predicted = predicted.masked_fill(missing, float("nan"))
    return PrecisionTables(predicted, excluded_layers(tensors, had, config), had & ~missing, fit, missing)


def assign(predicted: torch.Tensor, excluded: torch.Tensor, threshold: float, high: str = "int8",
           absent: torch.Tensor | None = None) -> list:
    """Format names [branch][step][block][layer] for threshold θ (bf16 for absent layers)."""
    low = predicted <= threshold
    keep = excluded if absent is None else excluded | absent
    out = []
    for br in range(predicted.shape[0]):
        out.append([[[("bf16" if keep[b, li] else "nvfp4" if low[br, i, b, li] else high)
                      for li in range(predicted.shape[3])] for b in range(predicted.shape[2])]
                    for i in range(predicted.shape[1])])
    return out


def stats_for(predicted: torch.Tensor, excluded: torch.Tensor, threshold: float, high: str = "int8",
              absent: torch.Tensor | None = None) -> dict:
    """Predicted average activation bits and NVFP4 fraction of threshold θ (over every planned call)."""
    planned = torch.ones_like(excluded) if absent is None else ~absent
    quant = (~excluded & planned).expand_as(predicted)
    nv = (predicted <= threshold) & quant
    n_all, n_q, n_nv = int(planned.expand_as(predicted).sum()), int(quant.sum()), int(nv.sum())
    bits = (BITS["bf16"] * (n_all - n_q) + BITS[high] * (n_q - n_nv) + BITS["nvfp4"] * n_nv) / max(n_all, 1)
    return {"avg_activation_bits": bits, "nvfp4_fraction": n_nv / n_q if n_q else 0.0}


def search_threshold(tables: PrecisionTables, config: PrecisionConfig) -> float:
    """Bisection over the sorted predictions of the quantized layers: the smallest θ that meets the
    budget (most INT8 under the budget: the budget is a cap on bits, not a goal to undercut).
    Both measures are monotone in θ. An unreachable budget logs a warning and takes the extreme."""
    values = tables.predicted[(~tables.excluded & tables.planned).expand_as(tables.predicted)].flatten().sort().values
    if values.numel() == 0:
        return 0.0
    high = config.high_format

    def meets(theta: float) -> bool:
        s = stats_for(tables.predicted, tables.excluded, theta, high, tables.absent)
        if config.avg_bits is not None:
            return s["avg_activation_bits"] <= config.avg_bits + 1e-12
        return s["nvfp4_fraction"] >= config.nvfp4_fraction - 1e-12

    # candidates: -1 (nothing NVFP4) then each sorted prediction (θ = that value admits it)
    candidates = [float(values[0]) - 1.0] + values.tolist()
    if not meets(candidates[-1]):
        s = stats_for(tables.predicted, tables.excluded, candidates[-1], high, tables.absent)
        log.warning("precision budget unreachable (all quantized layers NVFP4 gives %.2f bits, NVFP4 fraction %.2f); "
                    "using all NVFP4", s["avg_activation_bits"], s["nvfp4_fraction"])
        return candidates[-1]
    lo, hi = 0, len(candidates) - 1  # invariant: meets(candidates[hi])
    if meets(candidates[0]):
        return candidates[0]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(candidates[mid]):
            hi = mid
        else:
            lo = mid
    return candidates[hi]


def precision_pass(tensors: dict[str, torch.Tensor] | None, config: PrecisionConfig):
    """Planner pass: set the precision of every block linear at every (step, branch, block)."""
    if tensors is None:
        raise PlanError("a precision plan needs the calibration's statistics; pass the calibration tensors")
    tables = precision_tables(tensors, config)
    theta = config.effective_threshold
    if theta is None:
        theta = search_threshold(tables, config)

    def apply(configs, meta: dict, predicted: dict) -> None:
        layers = list(meta["linear_layers"])
        if tables.predicted.shape[1:] != (len(configs), meta["num_blocks"], len(layers)) or \
                tables.predicted.shape[0] != len(configs[0]):
            raise PlanError(f"precision statistics have shape {list(tables.predicted.shape)} but the plan is "
                            f"[{len(configs[0])} branches, {len(configs)} steps, {meta['num_blocks']} blocks, "
                            f"{len(layers)} layers]; re-run `ditbake calibrate`")
        measured_absent = {(b, layers[li]) for b, li in tables.planned.logical_not().nonzero().tolist()}
        if measured_absent != absent_linears(meta):
            raise PlanError(f"the calibration's statistics leave out {len(measured_absent)} (block, layer) pairs but "
                            f"its metadata lists {len(absent_linears(meta))} absent linears; re-run `ditbake calibrate`")
        formats = assign(tables.predicted, tables.excluded, theta, config.high_format, tables.absent)
        for i, step in enumerate(configs):
            for br, blocks in enumerate(step):
                for b, v in enumerate(blocks):
                    if not v.compute:
                        continue
                    prec = dict(v.precisions)
                    prec.update(zip(layers, formats[br][i][b]))
                    blocks[b] = dataclasses.replace(v, precisions=tuple(sorted(prec.items())))
        s = stats_for(tables.predicted, tables.excluded, theta, config.high_format, tables.absent)
        fit_summary = None
        if tables.fit is not None:
            fit_summary = {"r2_within": tables.fit.r2_within, "r2_global": tables.fit.r2_global}
        predicted.update(avg_activation_bits=s["avg_activation_bits"])
        predicted["precision"] = {
            "threshold": theta, "predictor": config.predictor, "high_format": config.high_format,
            # over every planned call, before skips (the budget's measure; `avg_activation_bits` is
            # re-counted over the computed blocks by the last pass)
            "nvfp4_fraction": s["nvfp4_fraction"], "planned_avg_activation_bits": s["avg_activation_bits"],
            "fit": fit_summary,
            # [block index, layer name] pairs
            "excluded": [[b, layers[li]] for b, li in tables.excluded.nonzero().tolist()],
            # the build folds the block Hadamard into these layers' NVFP4 weights (measured choice)
            "hadamard": [[b, layers[li]] for b, li in tables.hadamard.nonzero().tolist()],
        }
    apply.tables = tables  # for the adaptive section and tests
    apply.threshold = theta
    apply.config = config
    return apply


def activation_bits(configs, absent: set[tuple[int, str]] = frozenset()) -> float:
    """Average activation bits over the linear layers of every computed (step, branch, block),
    leaving out (block, layer) pairs the block does not have."""
    bits = count = 0
    for step in configs:
        for blocks in step:
            for b, v in enumerate(blocks):
                if v.compute:
                    for name, p in v.precisions:
                        if (b, name) not in absent:
                            bits += BITS[p]
                            count += 1
    return bits / count if count else 16.0


def bits_pass(configs, meta: dict, predicted: dict) -> None:
    """Last pass: re-count the predicted average activation bits over what really computes (after
    skips and purified refreshes)."""
    predicted["avg_activation_bits"] = activation_bits(configs, absent_linears(meta))
