"""The `aoti` backend: torch.export + AOTInductor packages per distinct block configuration.

A configuration is (block kind, variant, profile): Flux's double- and single-stream blocks and SD3's
last (context_pre_only) block have their own code and weights, so each kind is keyed by
runtime.arch.block_kind. A block engine takes the weights its variant reads
(runtime.engines.variant_weight_names); the blocks running a variant whose read weights differ (a
per-block precision plan folds the Hadamard into one block's NVFP4 layer and not another's) get an
engine group each, traced at the group's first block.

Engines take weights as inputs (never constants), so one compiled block serves every block that
shares its configuration, and the weights exist once in memory. Prologue and epilogue are
engines too. The positional conventions come from ditbake.runtime.engines.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ditbake.plugins.native_loading import NATIVE_OPS
from ditbake.runtime import arch as runtime_arch
from ditbake.runtime.artifact import Profile, sha256_file
from ditbake.runtime.attention import AttentionRunner
from ditbake.runtime.engines import engine_key, global_weight_names, variant_weight_names
from ditbake.runtime.errors import BackendError
from ditbake.runtime.plan import BlockVariant, Plan

log = logging.getLogger(__name__)


class _Prologue(torch.nn.Module):
    """prologue(x, t, text, *extras, *weights): extras are the architecture's further inputs (pooled, guidance)."""

    def __init__(self, arch, config, names, profile: Profile, n_extras: int = 0):
        super().__init__()
        self.arch, self.config, self.names, self.profile, self.n_extras = arch, config, names, profile, n_extras

    def forward(self, x, t, text, *rest):
        extras, weights = rest[:self.n_extras], rest[self.n_extras:]
        h, ctx = self.arch.prologue(dict(zip(self.names, weights)), self.config, x, t, text, self.profile.to_json(),
                                    *extras)
        return (h, *self.arch.pack_ctx(ctx))


class _Block(torch.nn.Module):
    """A block of one configuration; its weights arrive under block `index`'s names (the first of its kind).

    Plans with cached heads: the engine also returns each `cache_sites` site's attention output (the
    head cache the runtime keeps per branch and block), and an engine whose variant reuses cached heads
    takes those outputs of the block's previous compute after its weights (`takes_cached`)."""

    def __init__(self, arch, config, names, variant, latent, text_len, n_ctx, tiles=(), index: int = 0,
                 cache_sites: tuple[str, ...] = (), takes_cached: bool = False):
        super().__init__()
        self.arch, self.config, self.variant, self.tiles, self.index = arch, config, variant, dict(tiles), index
        self.names = [f"{arch.BLOCK_PREFIX}{index}.{n}" for n in names]
        self.latent, self.text_len, self.n_ctx = latent, text_len, n_ctx
        self.cache_sites, self.takes_cached = tuple(cache_sites), takes_cached
        self.kernels: dict[str, str] = {}  # attention group → kernel, measured by measure_kernels()
        self.timings: dict[str, dict[str, float]] = {}
        self._measure = False

    def forward(self, h, *rest):
        ctx = self.arch.unpack_ctx(rest[: self.n_ctx], self.latent, self.text_len)
        w = dict(zip(self.names, rest[self.n_ctx:self.n_ctx + len(self.names)]))
        # the plan's tiles: local3d heads compile their token permutation into the engine
        attention = AttentionRunner(self.tiles, self.kernels, measure=self._measure)
        if self.takes_cached:
            cached = rest[self.n_ctx + len(self.names):]
            attention.cache.update({("cond", self.index, site): c for site, c in zip(self.cache_sites, cached)})
        out = self.arch.block(w, self.config, self.index, h, ctx, self.variant, attention, "cond")
        if self._measure:
            self.kernels.update(attention.kernels)
            self.timings.update(attention.timings)
        if self.cache_sites:  # contiguous: an AOTInductor input is read with the strides it was traced at
            return (out, *[attention.cache[("cond", self.index, site)].contiguous() for site in self.cache_sites])
        return out

    def measure_kernels(self, args: tuple) -> None:
        """Run the block once eagerly on the GPU, timing every kernel that can run each attention
        group; the export that follows bakes the fastest into the engine (issue #15 item 3)."""
        self._measure = True
        try:
            self(*args)
        finally:
            self._measure = False


class _Epilogue(torch.nn.Module):
    def __init__(self, arch, config, names, latent, text_len, n_ctx):
        super().__init__()
        self.arch, self.config, self.names = arch, config, names
        self.latent, self.text_len, self.n_ctx = latent, text_len, n_ctx

    def forward(self, h, *rest):
        ctx = self.arch.unpack_ctx(rest[: self.n_ctx], self.latent, self.text_len)
        return self.arch.epilogue(dict(zip(self.names, rest[self.n_ctx:])), self.config, h, ctx)


# Widest row Inductor keeps whole in registers for a row reduction (its default: 1,024). Wan's rows are
# 1,536 wide, so its layer norms, RMS norms + RoPE and per-token quantizations compile as looped
# reductions that read each row twice or three times; DITBAKE_PERSISTENT_ROWS=2048 makes them one pass
# (measured in plugins/notes/gemm_w8a8_cutlass.md).
PERSISTENT_ROWS = int(os.environ.get("DITBAKE_PERSISTENT_ROWS", "0") or 0)


# Parts compiled with eager's rounding of every intermediate (Inductor otherwise keeps a fused chain in
# fp32 and rounds once). Flux's prologue embeds bf16(t) · 1000 as a sinusoid: kept in fp32 the product
# moves by up to 2,048 against eager's bf16 one and the high-frequency phases turn around — temb 33 % away
# from diffusers' on the H200 (benchmarks/diagnose_flux_aoti.py). Prologue and epilogue are tiny; the
# blocks keep Inductor's fusion (their bf16 error vs eager is 1e-2, as diffusers + torch.compile's).
EAGER_CASTS_PARTS = ("prologue", "epilogue")


def _compile(module: torch.nn.Module, args: tuple, path: Path, eager_casts: bool = False) -> list[str]:
    """Export and package one engine; returns the ditbake C++ ops (NATIVE_OPS) its package calls."""
    exported = torch.export.export(module, args)
    configs = {"emulate_precision_casts": True} if eager_casts else {}
    with _persistent_rows(PERSISTENT_ROWS):
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path), inductor_configs=configs)
    return native_ops_named(path)


@contextlib.contextmanager
def _persistent_rows(width: int):
    """Inductor's choices with one-pass (persistent) row reductions up to `width` elements."""
    if width <= 1024:
        yield
        return
    from torch._inductor.choices import InductorChoices  # noqa: PLC0415
    from torch._inductor.runtime.hints import ReductionHint  # noqa: PLC0415
    from torch._inductor.virtualized import V  # noqa: PLC0415

    class WideRows(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction) -> bool:
            if (torch._inductor.config.triton.persistent_reductions and not cooperative_reduction
                    and features.get_reduction_hint() == ReductionHint.INNER):
                return V.graph.sizevars.statically_known_leq(features.reduction_numel, width)
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    with V.set_choices_handler(WideRows()):
        yield


def native_ops_named(package: Path) -> list[str]:
    """Which of ditbake's C++ ops an AOTInductor package calls, read from the package itself: the
    ops are chosen while Inductor lowers ditbake's Triton ops (plugins/linear_8bit.py picks the
    CUTLASS GEMM there), so the exported graph does not show them, and a cached compile would not
    re-run the choice; the package names every dispatcher op it calls."""
    # the C++ wrapper names the op "ditbake::op", the proxy executor's node table "ditbake.op"
    names = {op: (f"ditbake::{op}".encode(), f"ditbake.{op}".encode()) for op in NATIVE_OPS}
    found = set()
    with zipfile.ZipFile(package) as pkg:
        for info in pkg.infolist():
            tail = b""
            with pkg.open(info) as member:
                while chunk := member.read(1 << 24):
                    data = tail + chunk
                    found.update(op for op, forms in names.items() if any(f in data for f in forms))
                    tail = data[-64:]
    return sorted(found)


def _content_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def compile_engines(arch, config: dict, weights: dict[str, torch.Tensor], plan: Plan, profiles: list[Profile],
                    out_dir: Path, device: str = "cpu", progress: bool = True) -> list[dict]:
    """Compile prologue, every computed block variant and epilogue for each profile into out_dir/engines."""
    device_weights = {k: v.to(device) for k, v in weights.items()}
    built_for = {"device": torch.device(device).type, "torch": torch.__version__,
                 "capability": list(torch.cuda.get_device_capability()) if torch.device(device).type == "cuda" else None}
    used = sorted({vid for _, vid in plan.block_variant_ids() if plan.variants[vid].compute})
    bar = tqdm(total=0, desc="compile aoti", unit="engine", disable=not progress)  # each profile adds its jobs
    entries = []
    (out_dir / "engines").mkdir(exist_ok=True)
    dtype = next(v.dtype for v in weights.values() if v.is_floating_point())
    text_dim = int(config.get("text_dim", config.get("text_embed_dim")))
    for prof in profiles:
        x = torch.randn(1, *prof.latent_shape, device=device, dtype=dtype)
        t = torch.full((1,), 500.0, device=device)
        text = torch.randn(1, prof.text_len, text_dim, device=device, dtype=dtype)
        extras = example_extras(arch, config, dtype, device)
        jobs, gnames, n_ctx = engine_jobs(arch, config, device_weights, plan, used, prof, x, t, text, extras)
        bar.total += len(jobs)
        for job in jobs:
            part, kind, vid, module, args = job.part, job.kind, job.vid, job.module, job.args
            key = engine_key(part, vid, prof.name, kind, job.group)
            config_json = plan.variants[vid].to_json() if vid is not None else None
            bar.set_postfix_str(key)
            kernels = {}
            if part == "block" and torch.device(device).type == "cuda":
                module.measure_kernels(args)
                kernels = {sig: {"kernel": name, "ms": module.timings.get(sig)} for sig, name in module.kernels.items()}
            choice = {sig: k["kernel"] for sig, k in kernels.items()}  # the engine's code depends on it
            eager_casts = part in EAGER_CASTS_PARTS
            content = _content_key(part, kind, config_json, prof.to_json(), arch.NAME, config, str(dtype), built_for,
                                   choice, job.block_names, eager_casts)
            rel = f"engines/{part}-{content}.pt2"
            native_ops = _compile(module, args, out_dir / rel, eager_casts)
            entries.append({"key": key, "part": part, **({"block_kind": kind} if kind else {}), "variant": vid,
                            **({"blocks": job.blocks} if part == "block" else {}),
                            "profile": prof.name, "backend": "aoti",
                            "file": rel, "sha256": sha256_file(out_dir / rel), "built_for": built_for,
                            "inputs": _input_names(part, gnames, job.block_names, n_ctx,
                                                   runtime_arch.extra_inputs(arch, config))
                            + [f"cached.{site}" for site in job.cache_inputs],
                            "outputs": ["hidden", *[f"ctx{i}" for i in range(n_ctx)]] if part == "prologue"
                            else ["hidden", *[f"attention.{site}" for site in job.cache_outputs]] if part == "block"
                            else ["model_output"],
                            **({"attention_kernels": kernels} if kernels else {}),
                            **({"native_ops": native_ops} if native_ops else {})})
            bar.update(1)
    bar.close()
    return entries


def example_extras(arch, config: dict, dtype, device="cpu", batch: int = 1) -> tuple[torch.Tensor, ...]:
    """Example values of the architecture's extra prologue inputs (pooled vector, guidance) to trace with."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for name in runtime_arch.extra_inputs(arch, config):
        if name == "pooled":
            out.append(torch.randn(batch, arch.pooled_dim(config), generator=gen).to(device, dtype))
        elif name == "guidance":
            out.append(torch.full((batch,), 3.5, device=device))
        else:
            raise BackendError(f"unknown prologue input {name!r}; update ditbake")
    return tuple(out)


@dataclass
class EngineJob:
    """One engine to compile: its part, block kind / variant / group (blocks only), the wrapper module,
    example arguments, the block weight names it takes and the blocks it serves."""

    part: str
    kind: str | None
    vid: int | None
    group: int | None
    module: torch.nn.Module
    args: tuple
    block_names: list[str] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    cache_outputs: tuple[str, ...] = ()  # sites whose attention output the engine returns (head cache)
    cache_inputs: tuple[str, ...] = ()  # sites whose cached output it takes (its variant reuses heads)


def _example_cache(arch, config: dict, weights: dict, index: int, hidden, ctx, variant: BlockVariant,
                   sites: tuple[str, ...]) -> list[torch.Tensor]:
    """Example head-cache inputs: the attention outputs of block `index` run with every head full."""
    if not sites:
        return []
    runner = AttentionRunner()
    arch.block(weights, config, index, hidden, ctx, dataclasses.replace(variant, heads=()), runner, "cond")
    return [runner.cache[("cond", index, site)].contiguous() for site in sites]


def engine_jobs(arch, config: dict, weights: dict, plan: Plan, used: list[int], prof: Profile, x, t, text,
                extras: tuple = ()):
    """One shape profile's engines in the shared calling convention, traced at the example inputs
    x, t, text, *extras: ([EngineJob], global weight names, number of context tensors). Each block
    kind's engines take the hidden state the blocks before the kind give. Shared by the AOTInductor
    and TensorRT exporters."""
    gnames = global_weight_names(weights, arch, prof.name)
    gw = [weights[k] for k in gnames]
    h, ctx = arch.prologue(weights, config, x, t, text, prof.to_json(), *extras)
    ctx_tensors = arch.pack_ctx(ctx)
    n_ctx = len(ctx_tensors)
    num_blocks = arch.num_blocks(config)
    kinds = runtime_arch.block_kinds(arch, config, num_blocks)
    # a plan that reuses cached heads anywhere: every block engine returns its attention outputs
    cache_sites = tuple(arch.COMPRESSIBLE_ATTENTION) if any(plan.variants[v].uses_cached_heads for v in used) else ()
    jobs = [EngineJob("prologue", None, None, None, _Prologue(arch, config, gnames, prof, len(extras)),
                      (x, t, text, *extras, *gw))]
    # the blocks each variant runs on (the pairs the build stored weights for), in plan order
    runs: dict[int, list[int]] = {}
    for b, vid in plan.block_variant_ids():
        if plan.variants[vid].compute:
            runs.setdefault(vid, []).append(b)
    hidden, index = h, 0
    for kind, first in kinds.items():
        while index < first:  # a realistic input for this kind: the blocks before it, at a variant they compute
            computed = next((plan.variants[vid] for vid in used if index in runs[vid]), BlockVariant())
            hidden = arch.block(weights, config, index, hidden, ctx, computed, AttentionRunner(), "cond")
            index += 1
        for vid in used:
            groups: dict[tuple[str, ...], list[int]] = {}
            for b in sorted(runs.get(vid, ())):
                if runtime_arch.block_kind(arch, config, b) == kind:
                    names = tuple(variant_weight_names(weights, arch, config, b, plan.variants[vid]))
                    groups.setdefault(names, []).append(b)
            for g, (names, blocks) in enumerate(groups.items()):
                rep = blocks[0]
                variant = plan.variants[vid]
                takes = cache_sites if variant.uses_cached_heads else ()
                module = _Block(arch, config, list(names), variant, tuple(x.shape), prof.text_len, n_ctx,
                                plan.tiles, index=rep, cache_sites=cache_sites, takes_cached=bool(takes))
                bw = [weights[f"{arch.BLOCK_PREFIX}{rep}.{n}"] for n in names]
                cached = _example_cache(arch, config, weights, rep, hidden, ctx, variant, takes)
                jobs.append(EngineJob("block", kind, vid, g if len(groups) > 1 else None, module,
                                      (hidden, *ctx_tensors, *bw, *cached), list(names), blocks, cache_sites, takes))
    jobs.append(EngineJob("epilogue", None, None, None,
                          _Epilogue(arch, config, gnames, tuple(x.shape), prof.text_len, n_ctx), (h, *ctx_tensors, *gw)))
    return jobs, gnames, n_ctx


def _input_names(part: str, gnames, bnames, n_ctx: int, extras: tuple[str, ...] = ()) -> list[str]:
    ctx = [f"ctx{i}" for i in range(n_ctx)]
    if part == "prologue":
        return ["latents", "timestep", "text", *extras, *gnames]
    if part == "block":
        return ["hidden", *ctx, *[f"block.{n}" for n in bnames]]
    return ["hidden", *ctx, *gnames]
