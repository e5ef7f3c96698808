"""The plan: how every sampling step computes every block. Versioned JSON, validated on load.

Layout (format "ditbake-plan", version 1)::

    {"format": "ditbake-plan", "version": 1, "mode": "baked" | "adaptive",
     "architecture": "wan", "num_blocks": 30, "num_steps": 50,
     "linear_layers": ["attn1.to_q", ...],          # block linears (relative names; each block has its kind's)
     "attention_sites": {"attn1": 12},              # compressible attention sites → head count
     "variants": [BlockVariant, ...],               # distinct block configurations
     "steps": [{"cond": [vid per block], "uncond": [vid per block]}, ...],
     "tiles": {"attn1": [2, 4, 4]},                 # per site: 3D tile of "local3d" heads (optional)
     "stack_extrapolation": "none" | "linear",      # how a whole skipped stack rebuilds its residual
     "uncond_skip": "residual" | "guidance",        # what a skipped uncond stack reuses (optional)
     "adaptive": null | {...},                      # predictor tables for adaptive mode
     "predicted": {...}}                            # planner's cost / memory estimate

A BlockVariant says: compute or skip (reuse cached Δ); whether a compute is a purified
refresh; the activation precision of each linear layer; the scheme of each attention head.
Identical configurations share one variant id, so one engine serves them all.
"""
from __future__ import annotations

import json
import numbers
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from ditbake.runtime import atomic
from ditbake.runtime.errors import PlanError
from ditbake.runtime.safe_io import read_json

PLAN_FORMAT = "ditbake-plan"
PLAN_VERSION = 1
# version 2: plans with guidance skips (uncond_skip "guidance"). A plan is written at the lowest
# version that expresses it, so a version-1 runtime — which would ignore the field and serve those
# steps from uncond's own residual — refuses it instead of running other numerics.
GUIDANCE_PLAN_VERSION = 2
READ_VERSIONS = (PLAN_VERSION, GUIDANCE_PLAN_VERSION)
PRECISIONS = ("bf16", "int8", "fp8", "nvfp4")
HEAD_KINDS = ("full", "arrow", "cached", "local3d")
# attention precision of a head: bf16, or 8-bit (ditbake.plugins.attention_8bit): int8 = INT8 QK
# with per-block scales + FP8 PV (SageAttention's recipe), fp8 = FP8 QK + FP8 PV; fp8t = per-tensor
# FP8 q, k, v, P and output through cuDNN's fused FP8 SDPA (ditbake.plugins.cudnn_sdpa)
ATTENTION_PRECISIONS = ("bf16", "int8", "fp8", "fp8t")
# how a step that skips every block rebuilds the stack's residual: the last computed step's
# ("none") or the line through the last two computed steps' residuals ("linear")
EXTRAPOLATIONS = ("none", "linear")
# what an uncond stack skipped at a step where cond computes reuses: its own last residual (with
# the stack extrapolation above), or "guidance": cond's fresh residual plus the last measured gap
# uncond − cond, i.e. the CFG difference is what is cached (FasterCache's CFG reuse, in residual form)
UNCOND_SKIPS = ("residual", "guidance")
BRANCHES = ("cond", "uncond")


@dataclass(frozen=True)
class HeadScheme:
    """One attention head's scheme: full; arrow with a band [i-left, i+right] over visual tokens;
    cached (reuse that head's output from the previous step); or local3d: the arrow band taken
    after reordering the visual tokens into the site's 3D tiles (`Plan.tiles`), i.e. a local
    window in frames × height × width."""

    kind: str = "full"
    left: int = 0
    right: int = 0
    precision: str = "bf16"

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise PlanError(f"unknown head scheme {self.kind!r}; expected one of {HEAD_KINDS}")
        for name in ("left", "right"):  # a JSON float is refused, not truncated
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise PlanError(f"arrow widths must be integers >= 0, got ({self.left!r}, {self.right!r})")
            object.__setattr__(self, name, int(value))
        if self.precision not in ATTENTION_PRECISIONS:
            raise PlanError(f"unknown attention precision {self.precision!r}; expected one of {ATTENTION_PRECISIONS}")

    @property
    def group(self) -> tuple[str, str]:
        """Heads of one layer that share this key run in one kernel call: same precision, and
        dense / banded-in-token-order / banded-after-tile-reordering / cached (bands may differ
        per head inside a call: the kernels take a per-head table)."""
        return ("full" if self.kind == "full" else self.kind, self.precision)

    def to_json(self) -> list:
        base = [self.kind, self.left, self.right]
        return base if self.precision == "bf16" else [*base, self.precision]

    @staticmethod
    def from_json(item) -> "HeadScheme":
        if not isinstance(item, (list, tuple)) or len(item) not in (3, 4):
            raise PlanError(f"a head scheme is [kind, left, right] or [kind, left, right, precision], got {item!r}")
        kind, left, right, *precision = item
        return HeadScheme(str(kind), left, right, *(str(p) for p in precision))


@dataclass(frozen=True)
class BlockVariant:
    """A distinct block configuration; `compute=False` means skip with the cached residual Δ."""

    compute: bool = True
    purified: bool = False
    precisions: tuple[tuple[str, str], ...] = ()
    heads: tuple[tuple[str, tuple[HeadScheme, ...]], ...] = ()

    def __post_init__(self):
        if self.purified and not self.compute:
            raise PlanError("a skipped block cannot be a purified refresh")
        for layer, precision in self.precisions:
            if precision not in PRECISIONS:
                raise PlanError(f"layer {layer}: unknown precision {precision!r}; expected one of {PRECISIONS}")

    @property
    def precision_map(self) -> dict[str, str]:
        return dict(self.precisions)

    @property
    def head_map(self) -> dict[str, tuple[HeadScheme, ...]]:
        return dict(self.heads)

    @property
    def uses_cached_heads(self) -> bool:
        return any(s.kind == "cached" for _, schemes in self.heads for s in schemes)

    def to_json(self) -> dict:
        return {"compute": self.compute, "purified": self.purified,
                "precisions": dict(self.precisions),
                "heads": {site: [s.to_json() for s in schemes] for site, schemes in self.heads}}

    @staticmethod
    def from_json(d: dict) -> "BlockVariant":
        try:
            return BlockVariant(
                compute=bool(d["compute"]), purified=bool(d.get("purified", False)),
                precisions=tuple(sorted(d.get("precisions", {}).items())),
                heads=tuple(sorted((site, tuple(HeadScheme.from_json(s) for s in schemes))
                                   for site, schemes in d.get("heads", {}).items())))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed block variant {d!r}: {exc}") from exc


@dataclass(frozen=True)
class Plan:
    architecture: str
    num_blocks: int
    linear_layers: tuple[str, ...]
    attention_sites: tuple[tuple[str, int], ...]
    variants: tuple[BlockVariant, ...]
    steps: tuple[dict[str, tuple[int, ...]], ...]
    mode: str = "baked"
    adaptive: dict | None = None
    predicted: dict = field(default_factory=dict)
    tiles: tuple[tuple[str, tuple[int, int, int]], ...] = ()
    stack_extrapolation: str = "none"
    uncond_skip: str = "residual"

    def __post_init__(self):
        self.validate()

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def validate(self) -> None:
        if self.stack_extrapolation not in EXTRAPOLATIONS:
            raise PlanError(f"stack_extrapolation must be one of {EXTRAPOLATIONS}, got {self.stack_extrapolation!r}")
        if self.mode not in ("baked", "adaptive"):
            raise PlanError(f"plan mode must be 'baked' or 'adaptive', got {self.mode!r}")
        if self.uncond_skip not in UNCOND_SKIPS:
            raise PlanError(f"uncond_skip must be one of {UNCOND_SKIPS}, got {self.uncond_skip!r}")
        if self.uncond_skip == "guidance" and self.mode != "baked":
            raise PlanError("uncond_skip 'guidance' needs a baked plan (adaptive plans decide skips per step)")
        if self.mode == "adaptive" and not self.adaptive:
            raise PlanError("an adaptive plan needs its 'adaptive' predictor section; re-run `ditbake plan`")
        if not self.variants:
            raise PlanError("plan has no block variants")
        heads = dict(self.attention_sites)
        tiles = dict(self.tiles)
        for site, tile in self.tiles:
            if site not in heads:
                raise PlanError(f"tiles name unknown attention site {site!r}")
            if len(tile) != 3 or any(int(t) <= 0 for t in tile):
                raise PlanError(f"site {site}: tile must be three positive ints (frames, height, width), got {tile}")
        for vid, variant in enumerate(self.variants):
            unknown = set(variant.precision_map) - set(self.linear_layers)
            if unknown:
                raise PlanError(f"variant {vid} sets precision of unknown layers {sorted(unknown)}")
            for site, schemes in variant.heads:
                if site not in heads:
                    raise PlanError(f"variant {vid} names unknown attention site {site!r}")
                if len(schemes) != heads[site]:
                    raise PlanError(f"variant {vid} site {site}: {len(schemes)} head schemes for {heads[site]} heads")
                if site not in tiles and any(s.kind == "local3d" for s in schemes):
                    raise PlanError(f"variant {vid} site {site} has local3d heads but the plan gives no tile for "
                                    f"{site}; re-run `ditbake plan`")
        for i, step in enumerate(self.steps):
            if "cond" not in step:
                raise PlanError(f"step {i} has no 'cond' branch")
            for branch, ids in step.items():
                if branch not in BRANCHES:
                    raise PlanError(f"step {i}: unknown branch {branch!r}; expected {BRANCHES}")
                if len(ids) != self.num_blocks:
                    raise PlanError(f"step {i} branch {branch}: {len(ids)} block entries for {self.num_blocks} blocks")
                for b, vid in enumerate(ids):
                    if not 0 <= vid < len(self.variants):
                        raise PlanError(f"step {i} block {b}: unknown variant id {vid}")
                    v = self.variants[vid]
                    if i == 0 and (not v.compute or v.uses_cached_heads):
                        raise PlanError(f"step 0 block {b} reuses a cache that does not exist yet; compute it")
            if self.uncond_skip == "guidance" and self.computes_stack(i, "uncond") and not self.computes_stack(i, "cond"):
                raise PlanError(f"step {i}: uncond computes where cond skips every block; with uncond_skip "
                                "'guidance' the gap uncond − cond is measured where both compute")

    def computes_stack(self, step: int, branch: str) -> bool:
        """Whether any block of this step and branch computes (else the stack's residual is reused)."""
        return any(self.variants[v].compute for v in self.step_ids(step, branch))

    def step_ids(self, step: int, branch: str) -> tuple[int, ...]:
        """The variant id of every block at this step and CFG branch (a plan without an uncond
        table runs cond's for both)."""
        return self.steps[step].get(branch, self.steps[step]["cond"])

    def variant_for(self, step: int, branch: str, block: int) -> BlockVariant:
        return self.variants[self.step_ids(step, branch)[block]]

    def block_variant_ids(self) -> list[tuple[int, int]]:
        """Every (block, variant id) the runtime may run, without repeats: baked, those the step table
        names, in step order; adaptive, every variant on every block (the controller may pick any).
        The build stores each pair's weight formats and compiles each pair's engine."""
        if self.mode == "adaptive":
            return [(b, vid) for vid in range(len(self.variants)) for b in range(self.num_blocks)]
        pairs = {(b, vid): None for step in self.steps for ids in step.values() for b, vid in enumerate(ids)}
        return list(pairs)

    def layer_precisions(self, block_prefix: str = "blocks.",
                         absent: Collection[tuple[int, str]] = frozenset()) -> dict[str, set[str]]:
        """Full layer name → the precisions it may run at, over `block_variant_ids` (what the build
        stores weights for). `absent`: (block, layer) pairs the block does not have (their
        precision-map entries are ignored by the block, so nothing is stored for them)."""
        used: dict[str, set[str]] = {}
        for b, vid in self.block_variant_ids():
            v = self.variants[vid]
            if v.compute:
                prec = v.precision_map
                for name in self.linear_layers:
                    if (b, name) not in absent:
                        used.setdefault(f"{block_prefix}{b}.{name}", set()).add(prec.get(name, "bf16"))
        return used

    def skip_fraction(self) -> float:
        total = skipped = 0
        for step in self.steps:
            for ids in step.values():
                total += len(ids)
                skipped += sum(not self.variants[v].compute for v in ids)
        return skipped / max(total, 1)

    def to_json(self) -> dict:
        version = GUIDANCE_PLAN_VERSION if self.uncond_skip == "guidance" else PLAN_VERSION
        return {"format": PLAN_FORMAT, "version": version, "mode": self.mode,
                "architecture": self.architecture, "num_blocks": self.num_blocks,
                "num_steps": self.num_steps, "linear_layers": list(self.linear_layers),
                "attention_sites": dict(self.attention_sites),
                "variants": [v.to_json() for v in self.variants],
                "steps": [{b: list(ids) for b, ids in s.items()} for s in self.steps],
                "adaptive": self.adaptive, "predicted": self.predicted,
                "tiles": {site: list(tile) for site, tile in self.tiles},
                "stack_extrapolation": self.stack_extrapolation, "uncond_skip": self.uncond_skip}

    @staticmethod
    def from_json(d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a ditbake plan (format {d.get('format') if isinstance(d, dict) else None!r})")
        version = d.get("version")
        if version not in READ_VERSIONS or isinstance(version, bool):
            raise PlanError(f"plan version {d.get('version')!r} is not supported (this runtime reads "
                            f"versions {READ_VERSIONS}); re-run `ditbake plan` with this version")
        if d.get("uncond_skip") == "guidance" and version != GUIDANCE_PLAN_VERSION:
            raise PlanError(f"a plan with guidance skips is version {GUIDANCE_PLAN_VERSION}, this one says "
                            f"{version!r}; re-write it with `ditbake guidance`")
        from ditbake.runtime.validate import check_plan_json  # noqa: PLC0415 - validate imports the architectures

        check_plan_json(d)
        try:
            plan = Plan(architecture=str(d["architecture"]), num_blocks=int(d["num_blocks"]),
                        linear_layers=tuple(d["linear_layers"]),
                        attention_sites=tuple(sorted((k, int(v)) for k, v in d["attention_sites"].items())),
                        variants=tuple(BlockVariant.from_json(v) for v in d["variants"]),
                        steps=tuple({b: tuple(int(x) for x in ids) for b, ids in s.items()} for s in d["steps"]),
                        mode=str(d.get("mode", "baked")), adaptive=d.get("adaptive"),
                        predicted=dict(d.get("predicted") or {}),
                        tiles=tuple(sorted((k, tuple(int(x) for x in v)) for k, v in (d.get("tiles") or {}).items())),
                        stack_extrapolation=str(d.get("stack_extrapolation", "none")),
                        uncond_skip=str(d.get("uncond_skip", "residual")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"malformed plan: {exc!r}") from exc
        if int(d.get("num_steps", plan.num_steps)) != plan.num_steps:
            raise PlanError(f"plan says num_steps={d['num_steps']} but lists {plan.num_steps} steps")
        return plan

    def save(self, path: str | Path) -> None:
        atomic.write_text(path, json.dumps(self.to_json(), indent=1))

    @staticmethod
    def load(path: str | Path) -> "Plan":
        if not Path(path).exists():
            raise PlanError(f"plan file {path} not found; run `ditbake plan` first")
        return Plan.from_json(read_json(path, "plan file", PlanError))


def collapse(configs: list[list[list[BlockVariant]]]) -> tuple[tuple[BlockVariant, ...], list[list[list[int]]]]:
    """Give identical block configurations one variant id. configs[step][branch][block]."""
    ids: dict[BlockVariant, int] = {}
    table = [[[ids.setdefault(v, len(ids)) for v in branch] for branch in step] for step in configs]
    return tuple(ids), table
