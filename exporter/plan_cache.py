"""Temporal Delta Cache planning (6Bit-Diffusion's TDC): which (step, block) may be skipped.

A skipped block returns h + Δ, with Δ = out − in cached at its last compute. The error a run of
skips incurs is bounded (triangle inequality) by the sum of the calibrated step-to-step relative
changes of Δ over the skipped steps, so per block (both CFG branches together) we walk the steps:

    skip step i  iff  i is not unsafe,  run < max_run,  and  acc + change[i] ≤ τ
    (acc and run reset at every compute)

`change[i]` is the mean over calibration prompts and CFG branches of ‖Δ_i − Δ_{i−1}‖₁ / ‖Δ_{i−1}‖₁.
Unsafe steps are the first step (no cache yet) and the leading steps whose median change over
blocks exceeds τ: the early, fast-moving part of the trajectory, measured rather than fixed.

The CFG branches skip together: in u + g·(c − u) a branch that is stale alone has its error
multiplied by g (or g − 1), while both stale together largely cancel in c − u. Planned apart,
their skips fell on alternate steps at some budgets and not at others.

A skip budget is met by `nested_schedule`, not by bisecting τ: the τ walk is greedy along the
steps, so a larger τ can move skips to other steps (a skip that now fits carries its accumulated
change into the next step, which then no longer fits), and the unsafe prefix shrinks with τ.
Quality jumped with the budget (issue 18: per step 22 dB at 30 %, 29 dB at 40 %; the diagnosis
is in benchmarks/results/tdc_monotone_cpu.json). `nested_schedule` ranks every skip once,
cheapest first, by the growth of the summed accumulated change Σ acc it causes, and a budget
takes the shortest prefix of that ranking: a larger budget is a smaller one plus the next
cheapest skips. With max_run = 2 the ranking reaches about half of the steps (lone skips come
first and a lone skip between two others would make a run of 3); more needs a larger max_run.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import EXTRAPOLATIONS

log = logging.getLogger(__name__)


METRICS = ("relative", "residual")
GRANULARITIES = ("block", "step")
SEARCHES = ("nested", "tau")


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
    # "nested" (CFG branches together, budgets by the skip ranking) or "tau" (each branch walks
    # on its own, budgets bisect τ): the rule adaptive plans re-run online (runtime/adaptive.py)
    search: str = "nested"

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
        if self.search not in SEARCHES:
            raise PlanError(f"TDC search must be one of {SEARCHES}, got {self.search!r}")
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
        return float(self.skip.double().mean())  # float32 would put 42/120 below 0.35


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


def _column_cost(change: list[float], skip: list[bool]) -> float:
    """Σ over skipped steps of the run's accumulated change (the bound of each skip's error)."""
    cost, acc = 0.0, 0.0
    for c, s in zip(change, skip):
        acc = acc + c if s else 0.0
        cost += acc if s else 0.0
    return cost


def _longest_run(skip: list[bool], i: int) -> int:
    """Length of the run of skips through step i if i were skipped."""
    lo = i
    while lo > 0 and skip[lo - 1]:
        lo -= 1
    hi = i
    while hi + 1 < len(skip) and skip[hi + 1]:
        hi += 1
    return hi - lo + 1


def skip_ranking(change: torch.Tensor, max_run: int, limit: int | None = None) -> list[tuple[int, int, int]]:
    """Every admissible skip (branch, step, column), in the order a growing budget adds them (the
    first `limit` of them if given: the order does not depend on it).

    Greedy: repeatedly add the skip whose addition grows its column's Σ acc the least (acc: the
    change accumulated since the run's last compute), never the first step (no cache yet) nor a
    skip that would make a run longer than max_run. Ties go to the later step, then the lower
    index. Fast-moving steps come last because their own change is large, so no τ-dependent
    unsafe prefix is needed."""
    branches, steps, cols = change.shape
    change = torch.nan_to_num(change.double(), nan=float("inf"))
    skip = [[[False] * steps for _ in range(cols)] for _ in range(branches)]
    base = [[0.0] * cols for _ in range(branches)]

    def marginals(br: int, col: int) -> list[float]:
        column, state = change[br, :, col].tolist(), skip[br][col]
        out = [float("inf")] * steps
        for i in range(1, steps):
            if state[i] or not math.isfinite(column[i]) or _longest_run(state, i) > max_run:
                continue
            trial = state.copy()
            trial[i] = True
            out[i] = _column_cost(column, trial) - base[br][col]
        return out

    cost = torch.tensor([[marginals(br, col) for col in range(cols)] for br in range(branches)],
                        dtype=torch.float64).permute(0, 2, 1).contiguous()  # [branch, step, col]
    order = []
    while limit is None or len(order) < limit:
        # lowest cost first; ties to the later step (calmer), then the lower branch / column
        best = float(cost.min())
        if not best < float("inf"):
            return order
        hits = (cost == best).nonzero().tolist()
        br, i, col = min(hits, key=lambda h: (-h[1], h[0], h[2]))
        skip[br][col][i] = True
        base[br][col] = _column_cost(change[br, :, col].tolist(), skip[br][col])
        order.append((br, i, col))
        cost[br, :, col] = torch.tensor(marginals(br, col), dtype=torch.float64)
    return order


def nested_schedule(change: torch.Tensor, budget: float, max_run: int) -> SkipSchedule:
    """The shortest prefix of `skip_ranking` that skips at least `budget` of the entries of
    `change` [branch, step, column]: schedules of growing budgets are nested."""
    branches, steps, cols = change.shape
    need = math.ceil(budget * branches * steps * cols - 1e-9)
    ranking = skip_ranking(change, max_run, need)
    if need > len(ranking):
        log.warning("skip budget %.2f unreachable with max_run=%d; best is %.3f", budget, max_run,
                    len(ranking) / (branches * steps * cols))
    skip = torch.zeros(branches, steps, cols, dtype=torch.bool)
    for br, i, col in ranking[:need]:
        skip[br, i, col] = True
    error = torch.zeros(branches, steps, cols, dtype=torch.float64)
    tau = 0.0
    for br in range(branches):
        for col in range(cols):
            acc = 0.0
            for i in range(steps):
                acc = acc + float(change[br, i, col]) if skip[br, i, col] else 0.0
                error[br, i, col] = acc
                tau = max(tau, acc)
    # "unsafe" here: the leading steps no skip of the budget touches, per branch
    unsafe = tuple(int(skip[br].any(-1).nonzero().min()) if skip[br].any() else steps for br in range(branches))
    return SkipSchedule(skip, tau, unsafe, error)


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
    branches, _, blocks = change.shape
    # CFG branches skip together: the guided prediction u + g·(c − u) multiplies an error of one
    # branch alone by g (or g − 1), while errors of both stale branches largely cancel in c − u.
    # Planned apart, the branches' skips fell on alternate steps at some budgets (issue 18: 22 dB at
    # 30 % per step, 29 dB at 40 %; benchmarks/results/tdc_monotone_cpu.json "diagnosis").
    if config.search == "nested":
        change = change.mean(dim=0, keepdim=True)
    if config.granularity == "step":
        change = change.mean(dim=-1, keepdim=True)  # one decision per step
    if config.skip_budget is not None and config.search == "nested":
        sched = nested_schedule(change, config.skip_budget, config.max_run)
    elif config.skip_budget is not None:
        sched = search_tau(change, config.skip_budget, config.max_run)
    else:
        sched = schedule(change, config.tau, config.max_run)
    together = sched.skip.shape[0] == 1
    return SkipSchedule(sched.skip.expand(branches, -1, blocks).clone(), sched.tau,
                        sched.unsafe_steps * branches if together else sched.unsafe_steps,
                        sched.predicted_error.expand(branches, -1, blocks).clone())
