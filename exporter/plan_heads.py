"""Head-wise attention search (DiTFastAttnV2): per layer and step, which scheme each head runs.

Per (step, CFG branch, block, attention site) the progressive calibration (calibrate_heads.py)
measures every candidate's error e[h, c] (relative squared error of head h's output vs full
attention) and this module picks one candidate per head with a small integer program:

    maximise   Σ_h Σ_c saving[c] · x[h, c]          (attention FLOPs saved, the latency proxy)
    subject to Σ_c x[h, c] = 1                        (one scheme per head)
               Σ_h Σ_c e[h, c] · x[h, c] ≤ δ          (the layer's error budget)
               x[h, c] = 0 where e[h, c] > c_head · δ / H   (no head takes most of the budget)
               x binary

`scipy.optimize.milp` solves it (H × C binaries: milliseconds). Full attention (error 0) is
always feasible. The planner pass `heads_pass` bakes the chosen schemes into the plan.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import BlockVariant, HeadScheme

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadsConfig:
    """Knobs of the head search.

    delta: per-layer error budget, the sum over heads of the chosen candidates' errors.
    head_factor: c in the per-head bound c·δ/H (1.5 for images, as the paper).
    arrow_fractions: arrow half-widths (w_left = w_right) as fractions of the visual tokens.
    caching: offer "reuse the previous step's head output" (never at step 0).
    local3d_tile: (frames, height, width) tile for local3d candidates (video); None: no local3d.
    local3d_fractions: local3d band half-widths as fractions of the visual tokens.
    attention_precisions: 8-bit attention formats offered beside bf16 (runtime/plan.py
        ATTENTION_PRECISIONS, e.g. ("int8",)): every computed candidate gets an 8-bit twin, and the
        search measures its error like any other candidate, so precision is planned per head,
        layer, step and branch within the same δ budget.
    eight_bit_speedup: how much faster the 8-bit kernel runs a head than bf16 on the target
        (measured: benchmarks/results/attention_8bit_h100.json); the objective counts an 8-bit
        candidate's time as its FLOPs over this factor.
    """

    delta: float = 0.05
    head_factor: float = 1.5
    arrow_fractions: tuple[float, ...] = (0.0625, 0.125, 0.25)
    caching: bool = True
    local3d_tile: tuple[int, int, int] | None = None
    local3d_fractions: tuple[float, ...] = (0.0625, 0.125)
    attention_precisions: tuple[str, ...] = ()
    eight_bit_speedup: float = 1.5

    def __post_init__(self):
        from ditbake.runtime.plan import ATTENTION_PRECISIONS  # noqa: PLC0415

        bad = [p for p in self.attention_precisions if p not in ATTENTION_PRECISIONS or p == "bf16"]
        if bad:
            raise PlanError(f"heads attention precisions must be 8-bit formats of {ATTENTION_PRECISIONS[1:]}, got {bad}")
        if not (math.isfinite(self.eight_bit_speedup) and self.eight_bit_speedup >= 1.0):
            raise PlanError(f"eight_bit_speedup must be a number >= 1, got {self.eight_bit_speedup}")
        if not (math.isfinite(self.delta) and self.delta > 0):
            raise PlanError(f"heads delta must be a positive number, got {self.delta}")
        if not (math.isfinite(self.head_factor) and self.head_factor > 0):
            raise PlanError(f"heads per-head factor c must be positive, got {self.head_factor}")
        for name in ("arrow_fractions", "local3d_fractions"):
            for f in getattr(self, name):
                if not 0.0 < f < 1.0:
                    raise PlanError(f"heads {name} must lie in (0, 1), got {f}")
        if self.local3d_tile is not None and (len(self.local3d_tile) != 3 or any(int(t) <= 0 for t in self.local3d_tile)):
            raise PlanError(f"heads local3d tile must be three positive ints (frames, height, width), "
                            f"got {self.local3d_tile}")

    def to_json(self) -> dict:
        return asdict(self) | {"local3d_tile": list(self.local3d_tile) if self.local3d_tile else None}

    @staticmethod
    def from_json(d: dict) -> "HeadsConfig":
        return HeadsConfig(delta=float(d["delta"]), head_factor=float(d["head_factor"]),
                           arrow_fractions=tuple(float(f) for f in d["arrow_fractions"]), caching=bool(d["caching"]),
                           local3d_tile=tuple(int(t) for t in d["local3d_tile"]) if d.get("local3d_tile") else None,
                           local3d_fractions=tuple(float(f) for f in d.get("local3d_fractions", ())),
                           attention_precisions=tuple(str(p) for p in d.get("attention_precisions", ())),
                           eight_bit_speedup=float(d.get("eight_bit_speedup", 1.5)))


# The configurations validated on the shipped test beds (benchmarks/heads.py, benchmarks/results/heads.json):
# the largest measured δ whose output kept SSIM ≥ 0.9 against the uncompressed run there. SD3:
# δ = 0.1 gave −52% attention FLOPs at SSIM 0.926 (δ = 0.2: −62% at 0.83). Wan's δ is not
# validated yet (its sweep is CPU-expensive: 2048 tokens × 6 masked candidates); 0.1 by analogy.
VALIDATED = {
    "sd3": HeadsConfig(delta=0.1, head_factor=1.5),
    "wan": HeadsConfig(delta=0.1, head_factor=1.5, local3d_tile=(2, 8, 8)),
}


def candidates(config: HeadsConfig, visual_tokens: int) -> tuple[HeadScheme, ...]:
    """The scheme menu of one site: full first (error 0), arrows, local3d windows (when a tile is
    configured; an image is one frame, so the tile is then 2D), cached last. Widths that would
    cover every visual token are dropped (they are full attention)."""
    menu = [HeadScheme("full")]
    for kind, fractions in (("arrow", config.arrow_fractions),
                            ("local3d", config.local3d_fractions if config.local3d_tile else ())):
        for f in fractions:
            w = max(1, round(f * visual_tokens))
            if w < visual_tokens - 1 and HeadScheme(kind, w, w) not in menu:
                menu.append(HeadScheme(kind, w, w))
    for precision in config.attention_precisions:  # 8-bit twins of every computed candidate
        menu.extend(replace(s, precision=precision) for s in list(menu) if s.precision == "bf16")
    if config.caching:
        menu.append(HeadScheme("cached"))
    return tuple(menu)


def scheme_flops(scheme: HeadScheme, text_tokens: int, visual_tokens: int, head_dim: int) -> float:
    """Attention FLOPs of one head for one sample (local3d counts as the same band in tile order)."""
    from ditbake.plugins.head_attention import attention_flops  # noqa: PLC0415

    kind = {"full": 0, "arrow": 1, "local3d": 1, "cached": 2}[scheme.kind]
    table = torch.tensor([[kind, scheme.left, scheme.right]], dtype=torch.int32)
    return float(attention_flops(table, text_tokens, visual_tokens, head_dim))


def savings(menu: tuple[HeadScheme, ...], text_tokens: int, visual_tokens: int, head_dim: int,
            eight_bit_speedup: float = 1.5) -> np.ndarray:
    """Time each candidate saves on one head, as a fraction of that head's dense bf16 attention:
    its FLOPs fraction, divided by the measured 8-bit speedup for 8-bit candidates."""
    dense = scheme_flops(HeadScheme("full"), text_tokens, visual_tokens, head_dim)
    return np.array([1.0 - scheme_flops(s, text_tokens, visual_tokens, head_dim) / dense
                     / (eight_bit_speedup if s.precision != "bf16" else 1.0) for s in menu])


def _allowed(errors: np.ndarray, delta: float, head_factor: float) -> np.ndarray:
    heads = errors.shape[0]
    ok = np.isfinite(errors) & (errors <= head_factor * delta / heads)
    ok[:, 0] = True  # full attention is the exact reference
    return ok


def solve_layer(errors: np.ndarray, saving: np.ndarray, delta: float, head_factor: float,
                shortcut: bool = True) -> np.ndarray:
    """One candidate index per head, by MILP. errors [H, C] (NaN/inf: unavailable; column 0 is
    full attention), saving [C]. Ties on saving go to the smaller total error. `shortcut=False`
    always calls HiGHS (the tests compare both)."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # noqa: PLC0415

    errors = np.asarray(errors, dtype=np.float64)
    heads, cands = errors.shape
    if saving.shape != (cands,):
        raise PlanError(f"savings has shape {saving.shape}, expected ({cands},)")
    ok = _allowed(errors, delta, head_factor)
    e = np.where(ok, np.nan_to_num(errors, nan=0.0, posinf=0.0), 0.0)
    e[:, 0] = 0.0
    # maximise saving; a tiny error term (≪ any saving step) breaks ties towards accuracy
    cost = -(np.tile(saving, heads)) + 1e-6 * (e / delta).ravel()
    # The objective is a sum over heads: when each head's own best allowed candidate already fits
    # the layer budget, that choice is the optimum and HiGHS need not run (the common case at a
    # loose δ; the search solves one layer per block, step and branch on the critical path).
    own = np.where(ok, cost.reshape(heads, cands), np.inf).argmin(axis=1)
    if shortcut and e[np.arange(heads), own].sum() <= delta:
        return own.astype(np.int64)
    one_each = np.kron(np.eye(heads), np.ones(cands))
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(e.ravel()[None], -np.inf, delta)]
    res = milp(cost, integrality=np.ones(heads * cands), bounds=Bounds(0, ok.ravel().astype(float)),
               constraints=constraints)
    if res.x is None:  # cannot happen (all-full is feasible); keep the exact answer if it does
        log.warning("head MILP failed (%s); keeping full attention", res.message)
        return np.zeros(heads, dtype=np.int64)
    return np.asarray(res.x).reshape(heads, cands).argmax(axis=1)


def solve_greedy(errors: np.ndarray, saving: np.ndarray, delta: float, head_factor: float) -> np.ndarray:
    """Baseline for the tests: start all full, repeatedly take the feasible per-head upgrade with the
    best extra saving per extra error."""
    errors = np.asarray(errors, dtype=np.float64)
    heads, _ = errors.shape
    ok = _allowed(errors, delta, head_factor)
    e = np.where(ok, np.nan_to_num(errors, nan=0.0, posinf=0.0), np.inf)
    e[:, 0] = 0.0
    choice = np.zeros(heads, dtype=np.int64)
    used = 0.0
    while True:
        best, best_ratio = None, 0.0
        for h in range(heads):
            cur = choice[h]
            for c in np.flatnonzero(ok[h]):
                gain, cost = saving[c] - saving[cur], e[h, c] - e[h, cur]
                if gain <= 0 or used + cost > delta:
                    continue
                ratio = gain / max(cost, 1e-12)
                if ratio > best_ratio:
                    best, best_ratio = (h, c), ratio
        if best is None:
            return choice
        h, c = best
        used += e[h, c] - e[h, choice[h]]
        choice[h] = c


def layer_error(errors: np.ndarray, choice: np.ndarray) -> float:
    return float(sum(0.0 if c == 0 else errors[h, c] for h, c in enumerate(choice)))


# ------------------------------------------------------------------ planner pass

def heads_pass(tensors: dict[str, torch.Tensor], heads_meta: dict, config: HeadsConfig | None = None):
    """Planner pass: the head schemes the progressive search chose (calibration tensors
    `heads_choice.<site>` [branch, step, block, head]) into every computed block's variant.

    With `config` whose δ or c differs from the calibrated one, the choices are re-solved from the
    stored errors `heads_error.<site>` [branch, step, block, head, candidate]: faster than
    recalibrating, but the errors were then measured on another trajectory (not progressive)."""
    if not heads_meta or "sites" not in heads_meta:
        raise PlanError("the calibration holds no head search; re-run `ditbake calibrate --heads-delta D`")
    calibrated = HeadsConfig.from_json(heads_meta["config"])
    resolve = config is not None and (config.delta, config.head_factor) != (calibrated.delta, calibrated.head_factor)
    if resolve:
        log.warning("re-solving head schemes at delta=%g, c=%g from errors measured progressively at delta=%g: "
                    "not progressive; recalibrate for the exact search", config.delta, config.head_factor,
                    calibrated.delta)

    def apply(configs, meta: dict, predicted: dict) -> None:
        start = time.perf_counter()
        done = dense = 0.0
        kinds: dict[str, int] = {}
        precisions: dict[str, int] = {}
        for site, info in heads_meta["sites"].items():
            menu = tuple(HeadScheme.from_json(c) for c in info["candidates"])
            key = f"heads_choice.{site}"
            if key not in tensors:
                raise PlanError(f"calibration lacks {key}; re-run `ditbake calibrate --heads-delta D`")
            choice = tensors[key].long()
            flops = np.array([scheme_flops(s, info["text_tokens"], info["visual_tokens"], info["head_dim"]) for s in menu])
            if resolve:
                errors = tensors[f"heads_error.{site}"].double().numpy()
                saving = savings(menu, info["text_tokens"], info["visual_tokens"], info["head_dim"],
                                 calibrated.eight_bit_speedup)
                choice = torch.from_numpy(np.stack([
                    np.stack([np.stack([solve_layer(errors[br, i, b], saving, config.delta, config.head_factor)
                                        for b in range(errors.shape[2])]) for i in range(errors.shape[1])])
                    for br in range(errors.shape[0])]))
            branches, steps, blocks, _ = choice.shape
            if steps != len(configs) or branches != len(configs[0]) or blocks != len(configs[0][0]):
                raise PlanError(f"head search covers {steps} steps × {branches} branches × {blocks} blocks, the plan "
                                f"{len(configs)} × {len(configs[0])} × {len(configs[0][0])}; recalibrate")
            if (choice[:, 0] == len(menu) - 1).any() and menu[-1].kind == "cached":
                raise PlanError("head search chose a cached head at step 0; recalibrate")
            for i in range(steps):
                for br in range(branches):
                    for b in range(blocks):
                        variant: BlockVariant = configs[i][br][b]
                        if not variant.compute:
                            continue
                        schemes = tuple(menu[c] for c in choice[br, i, b].tolist())
                        heads = dict(variant.heads)
                        heads[site] = schemes
                        configs[i][br][b] = replace(variant, heads=tuple(sorted(heads.items())))
                        done += float(flops[choice[br, i, b].numpy()].sum())
                        dense += float(flops[0]) * len(schemes)
                        for s in schemes:
                            kinds[s.kind] = kinds.get(s.kind, 0) + 1
                            precisions[s.precision] = precisions.get(s.precision, 0) + 1
        total = max(sum(kinds.values()), 1)
        used = config or calibrated
        predicted["attention_flops_fraction"] = done / dense if dense else 1.0
        predicted["heads"] = {
            "config": used.to_json(), "resolved_from_errors": resolve,
            "search_seconds": float(heads_meta.get("search_seconds", 0.0)) + (time.perf_counter() - start if resolve else 0.0),
            "calibration_seconds": float(heads_meta.get("calibration_seconds", 0.0)),
            "kind_fractions": {k: v / total for k, v in sorted(kinds.items())},
            "precision_fractions": {k: v / total for k, v in sorted(precisions.items())},
            "tiles": {site: list(info["tile"]) for site, info in heads_meta["sites"].items() if info.get("tile")},
        }
    return apply
