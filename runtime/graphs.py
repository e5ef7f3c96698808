"""CUDA graphs for the baked denoising loop.

One graph per (shape profile, CFG branch, the step's variant ids): prologue → blocks (computed or
skipped with the cached Δ) → epilogue, replayed whenever a later step has the same ids. All graphs
draw on one shared memory pool, the activation workspace: they run one after another and nothing
allocated inside a graph outlives its replay (inputs, the output and the Δ cache are static
buffers allocated outside the pool), so their scratch memory can overlap.

A step's ids are first run eagerly (kernel autotuning, Δ buffers allocated), captured on their
second occurrence, replayed from then on. Bookkeeping the Python forward does (block and attention
counts) is recorded at capture and re-applied on every replay. Eligible: CUDA, a baked plan, a
compiled backend (aoti or tensorrt: the eager backend copies head tables from the host per call),
no cached or local3d heads (their state lives in Python objects between steps).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def graph_blockers(device: torch.device, plan, backend: str) -> list[str]:
    """Why this session cannot use CUDA graphs (empty when it can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"device is {device.type}, CUDA graphs need 'cuda'")
    if plan.mode != "baked":
        reasons.append("adaptive plans decide on the host between blocks")
    if backend == "eager":
        reasons.append("the eager backend copies head tables from the host per call; build with --backend aoti")
    used = {v for step in plan.steps for ids in step.values() for v in ids}
    kinds = {s.kind for v in used for _, schemes in plan.variants[v].heads for s in schemes}
    if kinds & {"cached", "local3d"}:
        reasons.append(f"the plan uses {sorted(kinds & {'cached', 'local3d'})} heads, whose state is host-side")
    return reasons


class ForwardGraphs:
    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.seen: set[tuple] = set()
        self.inputs: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self.outputs: dict[tuple, torch.Tensor] = {}
        self.captures = self.replays = 0

    def run(self, key: tuple, slot: tuple, inputs: tuple, forward, report, attention) -> torch.Tensor:
        """key: (profile, branch, ids); slot: (profile, branch), whose static buffers it uses;
        inputs: (x, t, text, *extras); forward(*inputs) is the eager forward with its bookkeeping."""
        if key not in self.seen:
            self.seen.add(key)
            out = forward(*inputs)
            if slot not in self.outputs:
                self.inputs[slot] = tuple(torch.empty_like(i) for i in inputs)
                self.outputs[slot] = torch.empty_like(out)
            return out
        static = self.inputs[slot]
        for buf, value in zip(static, inputs, strict=True):
            buf.copy_(value)
        if key not in self.graphs:
            before = _counters(report, attention)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[slot].copy_(forward(*static))
            after = _counters(report, attention)
            self.graphs[key] = (graph, tuple(a - b for a, b in zip(after[:4], before[:4])),
                                report.variants_used[before[4]:])
            self.captures += 1
            graph.replay()  # capture records, it does not run: this step still has to happen
            return self.outputs[slot]
        graph, diff, variants = self.graphs[key]
        graph.replay()
        self.replays += 1
        report.block_computes += diff[0]
        report.block_skips += diff[1]
        attention.flops_done += diff[2]
        attention.flops_dense += diff[3]
        report.variants_used.extend(variants)
        return self.outputs[slot]


def _counters(report, attention) -> tuple:
    return (report.block_computes, report.block_skips, attention.flops_done, attention.flops_dense,
            len(report.variants_used))
