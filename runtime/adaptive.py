"""Adaptive mode: pick among the plan's precompiled block variants from measurements taken on the fly.

Per CFG branch and block the runtime measures, at every compute (on the device, no sync):
Γ = mean|out − in| / mean|in| and c = mean|Δ − Δ_prev| / mean|Δ_prev| (Δ = out − in, Δ_prev the
residual cached at the block's previous compute). The measurements of step i−1 sit in one device
tensor that is read back with a single `.tolist()` at the start of step i: at most one host
synchronisation per step, none at step 0 (which runs the baked ids). Then, with the rules of the
exporter's planners (exporter/plan_adaptive.py writes the section and precompiles the variants):

- skip at step i iff i is past the branch's unsafe prefix, the block's skip run is < max_run and
  acc + ĉ(i) ≤ τ, where ĉ(i) = r · change_cal(i) and r = measured / expected at the block's last
  compute (expected = the calibrated changes summed since the compute before it), clamped;
- precision: layer l runs NVFP4 iff α_l·Γ̂ + β_l ≤ θ (else the high format; excluded → bf16), with
  Γ̂ = Γ measured at i−1, or the calibrated Γ(i−1) scaled by the block's last measured ratio when
  the block skipped at i−1;
- purified refresh: a compute right after a skip runs the section's outlier layers in bf16.

A configuration the plan did not precompile (it should not happen) falls back to the baked id and
is counted in the report. Equal measurements and calibration reproduce the baked plan exactly.
"""
from __future__ import annotations

import math

import torch

from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import BlockVariant, HeadScheme, Plan


class AdaptiveController:
    """Decides the variant id of every (branch, block) once per step; see the module docstring."""

    def __init__(self, plan: Plan, branches: list[str], device: torch.device | str = "cpu"):
        sec = plan.adaptive or {}
        if sec.get("version") != 1:
            raise PlanError(f"adaptive section version {sec.get('version')!r} is not supported; re-run `ditbake plan`")
        self.plan, self.branches = plan, list(branches)
        self.layers = list(sec.get("layers", plan.linear_layers))
        self.prec, self.skip, self.pdr = sec.get("precision"), sec.get("skip"), sec.get("pdr")
        self.clamp = tuple(sec.get("ratio_clamp", (0.25, 4.0)))
        self.section_branches = list(sec.get("branches", ["cond", "uncond"]))
        missing = [b for b in self.branches if b not in self.section_branches]
        if missing:
            raise PlanError(f"adaptive section has no tables for branch(es) {missing}; re-plan with CFG")
        self.lookup = {v: i for i, v in enumerate(plan.variants)}
        self.full_heads = tuple(sorted((site, tuple(HeadScheme() for _ in range(n))) for site, n in plan.attention_sites))
        nb, nbr = plan.num_blocks, len(self.branches)
        self.buf = torch.zeros(2, nbr, nb, dtype=torch.float32, device=device)  # Γ, change
        self.computed = [[False] * nb for _ in range(nbr)]  # at the previous step
        self.has_change = [[False] * nb for _ in range(nbr)]  # change measured at the previous step
        self.last_compute = [[-1] * nb for _ in range(nbr)]
        self.prev_compute = [[-1] * nb for _ in range(nbr)]  # the compute before the last one
        self.r_gamma = [[1.0] * nb for _ in range(nbr)]
        self.r_change = [[1.0] * nb for _ in range(nbr)]
        self.acc = [[0.0] * nb for _ in range(nbr)]
        self.run = [[0] * nb for _ in range(nbr)]
        self.ids: list[list[int]] = [[0] * nb for _ in range(nbr)]
        self.host_syncs = 0
        self.fallbacks = 0
        self.step = -1

    # ------------------------------------------------------------------ per step
    def begin_step(self, i: int) -> None:
        """Read step i−1's measurements (one sync) and decide step i."""
        measured = None
        if i > 0:
            measured = self.buf.tolist()  # the one host synchronisation of this step
            self.host_syncs += 1
        self.decide(i, measured)

    def decide(self, i: int, measured: list | None) -> None:
        """Host-side decisions for step i from measured [2][branch][block] values of step i−1
        (None at step 0). Also usable directly (tests feed calibrated values)."""
        self.step = i
        for br, branch in enumerate(self.branches):
            sbr = self.section_branches.index(branch)
            baked_ids = self.plan.step_ids(i, branch)
            for b in range(self.plan.num_blocks):
                if measured is not None and self.computed[br][b]:
                    self._update_ratios(i, br, sbr, b, measured[0][br][b], measured[1][br][b])
                if i == 0:
                    vid = baked_ids[b]
                    compute = self.plan.variants[vid].compute
                else:
                    compute = not self._skip(i, br, sbr, b, baked_ids[b])
                    vid = self._variant(i, br, sbr, b, baked_ids[b], measured) if compute else self._skip_id(baked_ids[b])
                    compute = self.plan.variants[vid].compute
                if compute:
                    self.acc[br][b], self.run[br][b] = 0.0, 0
                    self.prev_compute[br][b], self.last_compute[br][b] = self.last_compute[br][b], i
                self.computed[br][b] = compute
                self.ids[br][b] = vid

    def variant_id(self, branch: str, block: int) -> int:
        return self.ids[self.branches.index(branch)][block]

    def record(self, branch: str, block: int, h_in: torch.Tensor, out: torch.Tensor,
               prev_delta: torch.Tensor | None) -> None:
        """Measurements of a computed block, written on the device (no sync)."""
        br = self.branches.index(branch)
        delta = (out - h_in).float()
        self.buf[0, br, block] = delta.abs().mean() / h_in.float().abs().mean().clamp_min(1e-12)
        if prev_delta is not None:
            prev = prev_delta.float()
            self.buf[1, br, block] = (delta - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12)
        self.has_change[br][block] = prev_delta is not None

    # ------------------------------------------------------------------ rules
    def _ratio(self, measured: float, expected: float) -> float:
        if not (expected > 0 and math.isfinite(expected) and math.isfinite(measured)):
            return 1.0
        return min(max(measured / expected, self.clamp[0]), self.clamp[1])

    def _change_cal(self, sbr: int, step: int, b: int) -> float:
        c = self.skip["change"][sbr][step][b] if self.skip else None
        return math.inf if c is None else float(c)

    def _update_ratios(self, i: int, br: int, sbr: int, b: int, gamma: float, change: float) -> None:
        if self.prec is not None:
            self.r_gamma[br][b] = self._ratio(gamma, float(self.prec["gamma"][sbr][i - 1][b]))
        if self.skip is not None and self.has_change[br][b] and self.prev_compute[br][b] >= 0:
            expected = sum(self._change_cal(sbr, s, b) for s in range(self.prev_compute[br][b] + 1, i))
            self.r_change[br][b] = self._ratio(change, expected)

    def _skip(self, i: int, br: int, sbr: int, b: int, baked_id: int) -> bool:
        if self.skip is None:
            return not self.plan.variants[baked_id].compute
        if i < int(self.skip["unsafe_steps"][sbr]) or self.run[br][b] >= int(self.skip["max_run"]):
            return False
        c = self.r_change[br][b] * self._change_cal(sbr, i, b)
        if self.acc[br][b] + c <= float(self.skip["tau"]):
            self.acc[br][b] += c
            self.run[br][b] += 1
            return True
        return False

    def _skip_id(self, baked_id: int) -> int:
        vid = self.lookup.get(BlockVariant(compute=False))
        if vid is None:
            self.fallbacks += 1
            return baked_id
        return vid

    def _variant(self, i: int, br: int, sbr: int, b: int, baked_id: int, measured) -> int:
        baked = self.plan.variants[baked_id]
        heads = baked.heads if baked.compute else self.full_heads
        if self.prec is not None:
            if self.computed[br][b]:
                gamma = float(measured[0][br][b])
            else:
                gamma = self.r_gamma[br][b] * float(self.prec["gamma"][sbr][i - 1][b])
            alpha, beta, excl = self.prec["alpha"][b], self.prec["beta"][b], self.prec["excluded"][b]
            theta, high = float(self.prec["threshold"]), self.prec["high_format"]
            prec = {name: ("bf16" if excl[li] else "nvfp4" if alpha[li] * gamma + beta[li] <= theta else high)
                    for li, name in enumerate(self.layers)}
        elif baked.compute:
            prec = dict(baked.precisions)
        else:
            prec = {name: "bf16" for name in self.layers}
        purified = False
        if self.pdr is not None and not self.computed[br][b]:
            purified = True
            for name in self.pdr["bf16_layers"][sbr][i][b]:
                prec[name] = "bf16"
        want = BlockVariant(compute=True, purified=purified, precisions=tuple(sorted(prec.items())), heads=heads)
        vid = self.lookup.get(want)
        if vid is None:
            self.fallbacks += 1
            return baked_id
        return vid
