"""Temporal Delta Cache planning (6Bit-Diffusion's TDC): which (step, block) may be skipped.

A skipped block returns h + Δ, with Δ = out − in cached at its last compute. The error a run of
skips incurs is bounded (triangle inequality) by the sum of the calibrated step-to-step relative
changes of Δ over the skipped steps, so per CFG branch and block we walk the steps:

    skip step i  iff  i is not unsafe,  run < max_run,  and  acc + change[i] ≤ τ
    (acc and run reset at every compute)

`change[i]` is the mean over calibration prompts of ‖Δ_i − Δ_{i−1}‖₁ / ‖Δ_{i−1}‖₁. Unsafe steps
are the first step (no cache yet) and the leading steps whose median change over blocks exceeds
τ, per CFG branch: the early, fast-moving part of the trajectory, measured rather than fixed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import EXTRAPOLATIONS

log = logging.getLogger(__name__)


METRICS = ("relative", "residual")
GRANULARITIES = ("block", "step")


@dataclass(frozen=True)
class CacheConfig:
    """Knobs of the skip schedule.

    tau: accumulated relative Δ change a skip run may incur (larger → more skips).
    max_run: most consecutive skips of one block (the paper uses 2).
    skip_budget: if set, search tau so that about this fraction of block computations is skipped.
    metric: what a skip's error is measured in. "relative" (the paper): ‖Δᵢ − Δᵢ₋₁‖ / ‖Δᵢ₋₁‖, the
        change of the block's own residual. "residual": the same change over the block's input,
        ‖Δᵢ − Δᵢ₋₁‖ / ‖hᵢ₋₁‖ = relative · Γᵢ₋₁, i.e. the error the skip adds to the residual stream;
        a block whose Δ is small next to its input may then skip even when its Δ moves a lot.
    granularity: "block" (the paper: each block decides alone) or "step": all blocks of a branch
        skip together, scored by the mean change over blocks, so the cached residuals are reused
        as one consistent stack (what diffusers' MagCache does for the whole transformer).
    extrapolate: how a step that skips every block rebuilds the stack's residual R = output − input:
        "none" reuses the last computed step's R; "linear" follows the line through the last two
        computed steps' R (a first-order prediction, as TaylorSeer does for block outputs).
    """

    tau: float = 0.2
    max_run: int = 2
    skip_budget: float | None = None
    metric: str = "relative"
    granularity: str = "block"
    extrapolate: str = "none"

    def __post_init__(self):
        if not self.tau >= 0:
            raise PlanError(f"TDC tau must be >= 0, got {self.tau}")
        if self.max_run < 0:
            raise PlanError(f"TDC max_run must be >= 0, got {self.max_run}")
        if self.skip_budget is not None and not 0.0 <= self.skip_budget < 1.0:
            raise PlanError(f"TDC skip budget must be in [0, 1), got {self.skip_budget}")
        if self.metric not in METRICS:
            raise PlanError(f"TDC metric must be one of {METRICS}, got {self.metric!r}")
        if self.extrapolate not in EXTRAPOLATIONS:
            raise PlanError(f"TDC extrapolate must be one of {EXTRAPOLATIONS}, got {self.extrapolate!r}")
        if self.granularity not in GRANULARITIES:
            raise PlanError(f"TDC granularity must be one of {GRANULARITIES}, got {self.granularity!r}")


@dataclass(frozen=True)
class SkipSchedule:
    skip: torch.Tensor  # bool [branch, step, block]
    tau: float
    unsafe_steps: tuple[int, ...]  # per branch
    predicted_error: torch.Tensor  # accumulated change at each skip [branch, step, block]

    @property
    def skip_fraction(self) -> float:
        return float(self.skip.float().mean())


def mean_change(delta_change: torch.Tensor) -> torch.Tensor:
    """[prompt, branch, step, block] → [branch, step, block], NaN (the first step) → +inf."""
    change = torch.nanmean(delta_change.double(), dim=0)
    return torch.nan_to_num(change, nan=float("inf"))


def unsafe_prefix(change: torch.Tensor, tau: float) -> int:
    """Number of leading steps of one branch ([step, block]) that may not be skipped (at least 1:
    the first step has no cache)."""
    median = change.median(dim=-1).values  # over blocks → [step]
    n = 1
    while n < median.numel() and median[n] > tau:
        n += 1
    return n


def schedule(change: torch.Tensor, tau: float, max_run: int) -> SkipSchedule:
    branches, steps, blocks = change.shape
    unsafe = tuple(unsafe_prefix(change[br], tau) for br in range(branches))
    skip = torch.zeros(branches, steps, blocks, dtype=torch.bool)
    error = torch.zeros(branches, steps, blocks, dtype=torch.float64)
    for br in range(branches):
        for b in range(blocks):
            acc, run = 0.0, 0
            for i in range(steps):
                c = float(change[br, i, b])
                if i >= unsafe[br] and run < max_run and acc + c <= tau:
                    acc, run = acc + c, run + 1
                    skip[br, i, b] = True
                    error[br, i, b] = acc
                else:
                    acc, run = 0.0, 0
    return SkipSchedule(skip, tau, unsafe, error)


def search_tau(change: torch.Tensor, budget: float, max_run: int, iters: int = 40) -> SkipSchedule:
    """The smallest tau whose schedule skips at least `budget` of the block computations (bisection;
    the skip fraction is monotone in tau). Returns the largest reachable schedule if the budget
    cannot be met under max_run."""
    finite = change[torch.isfinite(change)]
    hi = float(finite.sum()) + 1.0 if finite.numel() else 1.0
    best = schedule(change, hi, max_run)
    if best.skip_fraction < budget:
        log.warning("skip budget %.2f unreachable with max_run=%d; best is %.3f", budget, max_run, best.skip_fraction)
        return best
    lo = 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        s = schedule(change, mid, max_run)
        if s.skip_fraction >= budget:
            hi, best = mid, s
        else:
            lo = mid
    return best


def residual_change(delta_change: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """‖Δᵢ − Δᵢ₋₁‖ / ‖hᵢ₋₁‖ per [prompt, branch, step, block]: the relative change times the previous
    step's Γ = ‖Δ‖ / ‖h‖ (NaN at the first step, as delta_change)."""
    if gamma.shape != delta_change.shape:
        raise PlanError(f"gamma {list(gamma.shape)} and delta_change {list(delta_change.shape)} differ; "
                        "re-run `ditbake calibrate`")
    previous = torch.full_like(gamma, float("nan"))
    previous[:, :, 1:] = gamma[:, :, :-1]
    return delta_change * previous


def plan_schedule(delta_change: torch.Tensor, config: CacheConfig, gamma: torch.Tensor | None = None) -> SkipSchedule:
    if config.metric == "residual":
        if gamma is None:
            raise PlanError("the 'residual' TDC metric needs the calibration's gamma statistics")
        delta_change = residual_change(delta_change, gamma)
    change = mean_change(delta_change)
    blocks = change.shape[-1]
    if config.granularity == "step":
        change = change.mean(dim=-1, keepdim=True)  # one decision per (branch, step)
    if config.skip_budget is not None:
        sched = search_tau(change, config.skip_budget, config.max_run)
    else:
        sched = schedule(change, config.tau, config.max_run)
    if config.granularity == "step":
        sched = SkipSchedule(sched.skip.expand(-1, -1, blocks).clone(), sched.tau, sched.unsafe_steps,
                             sched.predicted_error.expand(-1, -1, blocks).clone())
    return sched
