"""End-to-end transformer race on one GPU: Wan2.1-1.3B (random weights) at 480×832×81 frames
(32,760 tokens), 50 steps with classifier-free guidance (two forwards per step), bf16.

Contenders, all in one process on the same GPU:
* diffusers eager bf16;
* diffusers + torch.compile (regional: each transformer block's forward compiled, as diffusers
  recommends for repeated blocks);
* diffusers + torch.compile + torchao FP8 (dynamic row-wise E4M3 linears in every block,
  benchmarks/fp8_linears.py; quantized before the blocks are compiled);
* the strongest peer stack: diffusers' cache hooks + torch.compile + torchao FP8, per family
  (MagCache with the test bed's calibrated magnitude ratios, TaylorSeer with a fixed interval) at
  the point of the 16k test-bed sweep (`--fp8-fidelity`, written by `benchmarks/e2e_fidelity.py`,
  its FP8 rows) that skips most while reaching the ditbake plan's test-bed PSNR (`--fidelity-db`,
  or `--fidelity-from` a ditbake fidelity JSON); no point reaching it: the family's most faithful
  point, flagged. Their skip schedules do not depend on the weights, so the schedule timed here
  is the one whose fidelity was measured there; FirstBlockCache's does (a threshold on the first
  block's output change), so it is timed only with `--weight-dependent-peers`, flagged;
* the same cache families with bf16 linears, picked the same way from the bf16 rows of that sweep
  (where FP8's own error keeps every FP8 peer below the bar, these are the strongest peers at equal
  fidelity); optionally (`--peer-source`, a `benchmarks/tdc_peers.py --steps 50` result) the older sweep;
* ditbake: `ditbake build --backend aoti` of a plan transplanted from a test-bed plan (`--source-plan`;
  default `e2e_source_plan16k.json`: `benchmarks/combined.py --steps 50 --granularity step --extrapolate
  linear --combos 0.4:8:0` on the 16k bed, which also scores it there): the same per-step skip schedule
  (block index scaled to 30 blocks), the same head schemes if any (head index scaled, widths as fractions
  of the visual tokens; at most `--max-variants` compiled configurations, attention work kept), every
  computed block linear in `--act-format` W8A8 (default INT8: 8-bit weights, per-token activations).
  The diffusers eager baseline is re-timed in this call over `--baseline-steps` steps.
  Loaded with `ditbake.runtime.load` and run with `Session.generate` — the product path.

Per-step times are CUDA-event times between step boundaries (median and total over the 50 steps,
after a warm-up). Random weights: speed does not depend on their values, fidelity does, which is
why the plan's ratios come from the trained test-bed model. `--phase ditbake|peers` splits the work
across two device calls (each has a 10-minute limit); `--merge` joins their JSON (and further calls'),
comparing rows through `speedup_vs_eager_in_call`, each row's speed-up over the eager of its own call.
`--only REGEX`
times a subset of the contenders (diffusers eager, the baseline of every call, always runs). Every
row has its peak memory (torch.cuda.max_memory_allocated over the timed loop).

    python benchmarks/e2e.py --phase ditbake --out $OUT/e2e_ditbake.json
    python benchmarks/e2e.py --phase peers --fp8-fidelity $OUT/e2e_fidelity16k.json --fidelity-db 36.5 \
        --out $OUT/e2e_peers.json
    python benchmarks/e2e.py --merge $OUT/e2e_ditbake.json $OUT/e2e_peers.json --out benchmarks/results/e2e_v2_h200.json
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import time
from pathlib import Path

import torch

from block_race import LATENT, TEXT_LEN, WAN_1_3B as ONE_BLOCK  # benchmarks/ is the script's directory
from e2e_fidelity import NO_CACHE, pick
from forward_fidelity import with_head_precision
from fp8_linears import quantize_blocks, weight_bytes
from tdc_peers import peer_config, peer_configs
from provenance import stamp  # benchmarks/ is the script's directory: commit + dirty flag in every JSON

log = logging.getLogger("e2e")

WAN_1_3B = dict(ONE_BLOCK, num_layers=30)  # LATENT: 81 frames at 480×832 through Wan's VAE; TEXT_LEN: 512
SMOKE = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=32, ffn_dim=128, text_dim=32, num_layers=4)


# ---------------------------------------------------------------- plan transplant

def transplant_plan(source, adapter, visual_tokens: int, src_tokens: int, act_format: str = "int8",
                    max_variants: int = 0):
    """The source plan's per-step skip schedule and head schemes on a model with more blocks and
    heads: block b takes source block ⌊b·B_src/B⌋, head h source head ⌊h·H_src/H⌋, arrow widths
    keep their fraction of the visual tokens, heads their precision. Every computed block runs its
    linears in act_format.
    `max_variants` > 0 caps the distinct computed configurations (each is one compiled engine)."""
    from ditbake.exporter.planner import SKIP
    from ditbake.runtime.plan import BlockVariant, HeadScheme, Plan, collapse

    nb, heads = adapter.num_blocks, dict(adapter.attention_sites)
    precisions = tuple(sorted((n, act_format) for n in adapter.linear_layers))

    def scaled(v: BlockVariant) -> BlockVariant:
        if not v.compute:
            return SKIP
        site_heads = []
        for site, n in sorted(heads.items()):
            src = v.head_map.get(site)
            if not src:
                site_heads.append((site, tuple(HeadScheme() for _ in range(n))))
                continue
            schemes = []
            for h in range(n):
                s = src[h * len(src) // n]
                if s.kind == "arrow":
                    schemes.append(HeadScheme("arrow", round(s.left * visual_tokens / src_tokens),
                                              round(s.right * visual_tokens / src_tokens), s.precision))
                elif s.kind == "full":
                    schemes.append(HeadScheme(precision=s.precision))
                else:
                    raise ValueError(f"head scheme {s.kind!r} does not transplant (aoti compiles full and arrow heads)")
            site_heads.append((site, tuple(schemes)))
        return BlockVariant(compute=True, precisions=precisions, heads=tuple(site_heads))

    configs = []
    for step in source.steps:
        row = []
        for branch in ("cond", "uncond"):
            ids = step.get(branch, step["cond"])
            row.append([scaled(source.variants[ids[b * source.num_blocks // nb]]) for b in range(nb)])
        configs.append(row)
    if max_variants:
        configs = coarsen(configs, max_variants, visual_tokens)
    variants, table = collapse(configs)
    return Plan(architecture=adapter.architecture, num_blocks=nb, linear_layers=tuple(adapter.linear_layers),
                attention_sites=tuple(sorted(heads.items())), variants=variants,
                steps=tuple({"cond": tuple(r[0]), "uncond": tuple(r[1])} for r in table),
                predicted={"transplanted_from": "test-bed plan"}, stack_extrapolation=source.stack_extrapolation,
                uncond_skip=source.uncond_skip)


def attention_cost(v, visual_tokens: int) -> float:
    """Fraction of dense attention work a variant's heads do (band pairs over all pairs, visual part)."""
    costs = [min(1.0, (s.left + s.right + 1) / visual_tokens) if s.kind == "arrow" else 1.0
             for _, schemes in v.heads for s in schemes]
    return sum(costs) / max(len(costs), 1)


def coarsen(configs, k: int, visual_tokens: int):
    """At most k computed configurations (one compiled engine each): the cheapest and the dearest in
    attention cost and the most used ones. Every other configuration becomes one of the two kept
    ones that bracket its cost, chosen by error diffusion over its occurrences so that the plan's
    total attention work stays what it was (plan_ratios reports both)."""
    from collections import Counter

    cost = lambda v: attention_cost(v, visual_tokens)  # noqa: E731
    use = Counter(v for step in configs for branch in step for v in branch if v.compute)
    kept = {min(use, key=cost), max(use, key=cost)}
    for v, _ in use.most_common():
        if len(kept) >= k:
            break
        kept.add(v)
    kept = sorted(kept, key=cost)
    debt = 0.0  # attention work owed (+) or overspent (-) so far

    def pick(v):
        nonlocal debt
        if v in kept:
            return v
        lo = max((q for q in kept if cost(q) <= cost(v)), key=cost)
        hi = min((q for q in kept if cost(q) >= cost(v)), key=cost)
        choice = lo if abs(debt + cost(lo) - cost(v)) <= abs(debt + cost(hi) - cost(v)) else hi
        debt += cost(choice) - cost(v)
        return choice

    return [[[pick(v) if v.compute else v for v in branch] for branch in step] for step in configs]


def plan_ratios(plan, visual_tokens: int) -> dict:
    """What the plan does, in the numbers the README quotes."""
    computes = [plan.variants[v] for s in plan.steps for ids in s.values() for v in ids]
    done = [v for v in computes if v.compute]
    return {"skip_fraction": 1 - len(done) / len(computes),
            "attention_cost_fraction_of_computed": sum(attention_cost(v, visual_tokens) for v in done) / max(len(done), 1),
            "distinct_computed_variants": len({v for v in done}),
            "activation_formats": sorted({p for v in done for _, p in v.precisions})}


# ---------------------------------------------------------------- timing

class StepTimer:
    """CUDA events at step boundaries, read once at the end (no host sync inside the loop)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.events, self.wall = [], []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.events.append(e)
        else:
            self.wall.append(time.perf_counter())

    def wrap(self, steps):
        for i in steps:
            self.mark()
            yield i
        self.mark()

    def step_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.events, self.events[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.wall, self.wall[1:])]


def summary(step_ms: list[float], device) -> dict:
    out = {"step_ms_median": statistics.median(step_ms), "total_s": sum(step_ms) / 1e3, "steps": len(step_ms),
           "step_ms": step_ms}
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return out


# ---------------------------------------------------------------- contenders

def diffusers_loop(model, steps: int, latents, cond, uncond, guidance: float, timer: StepTimer):
    """Flow-matching Euler with CFG; each forward inside its cache context (as diffusers' Wan pipeline)."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    x = latents.clone()
    for i in timer.wrap(range(steps)):
        t = torch.full((1,), float(sigmas[i]) * 1000, device=x.device)
        with model.cache_context("cond"):
            vc = model(x.to(cond.dtype), t, cond, return_dict=False)[0]
        with model.cache_context("uncond"):
            vu = model(x.to(cond.dtype), t, uncond, return_dict=False)[0]
        v = vu.float() + guidance * (vc.float() - vu.float())
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def count_block_calls(model):
    """Wrap the last block's forward to count real computations (a cache hook bypasses it). The wrapper
    stays outside any compiled region (compile_blocks compiles what it wraps): traced, the counter's
    value became a guard and its first change recompiled the block inside a timed loop."""
    counter = {"calls": 0}

    def counting(forward):
        def counted(*a, **k):
            counter["calls"] += 1
            return forward(*a, **k)

        counted.wraps, counted.rewrap = forward, counting
        return counted

    block = model.blocks[-1]
    block.forward = counting(block.forward)
    return counter


def compile_blocks(model) -> list:
    """Regional compile (each block's forward through torch.compile, as diffusers recommends for
    repeated blocks); returns the forwards it replaced, for restore_blocks."""
    before = [block.__dict__.get("forward") for block in model.blocks]
    for block in model.blocks:  # under the counter (count_block_calls) and the cache hooks
        forward = block.forward
        block.forward = (forward.rewrap(torch.compile(forward.wraps, fullgraph=False)) if hasattr(forward, "rewrap")
                         else torch.compile(forward, fullgraph=False))
    return before


def restore_blocks(model, before: list) -> None:
    for block, forward in zip(model.blocks, before):
        if forward is None:
            del block.forward  # the class's own again
        else:
            block.forward = forward


@torch.no_grad()
def run_peers(args, cfg, latent, text_len, dev, dtype) -> tuple[dict, dict]:
    """The diffusers rows and notes on what was not timed."""
    import diffusers

    min_db = required_psnr(args)  # a bad bar or fidelity file stops the run before anything is timed
    fidelity = fp8_fidelity(args, min_db)
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**cfg).to(dev, dtype).eval()
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, *latent, generator=gen).to(dev)
    cond = torch.randn(1, text_len, cfg["text_dim"], generator=gen).to(dev, dtype)
    uncond = torch.randn(1, text_len, cfg["text_dim"], generator=gen).to(dev, dtype)
    rows, notes = {}, {}

    def wanted(name: str) -> bool:
        return name == "diffusers eager" or not args.only or re.search(args.only, name) is not None

    def race(name, warmup_steps=1):
        log.info("%s: warm-up", name)
        diffusers_loop(model, warmup_steps, latents, cond, uncond, args.guidance, StepTimer(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        counter["calls"] = 0
        timer = StepTimer(dev)
        diffusers_loop(model, args.steps, latents, cond, uncond, args.guidance, timer)
        rows[name] = {**summary(timer.step_ms(), dev), "weight_bytes": weight_bytes(model),
                      "skip_fraction": 1 - counter["calls"] / (2 * args.steps)}
        log.info("%s: %.1f ms/step, %.1f s total, skip %.2f", name, rows[name]["step_ms_median"],
                 rows[name]["total_s"], rows[name]["skip_fraction"])

    def race_cached(name, config, point):
        model.enable_cache(config)
        try:
            race(name, warmup_steps=args.steps)  # one full warm-up loop: cache state resets per loop
        finally:
            model.disable_cache()
        rows[name]["testbed_fidelity"] = point

    counter = count_block_calls(model)
    race("diffusers eager")
    eager_forwards = compile_blocks(model)
    if wanted("diffusers torch.compile"):
        race("diffusers torch.compile", warmup_steps=2)
    source = json.loads(Path(args.peer_source).read_text()) if args.peer_source else None
    for family, knob, point in pick_peers(source, min_db or 0.0, args.fidelity_method, args.fidelity_skip):
        name = f"diffusers {family}({knob}) + torch.compile"
        if wanted(name):
            config = next(c for n, k, c in peer_configs(args.steps, source.get("mag_ratios")) if n == family and k == knob)
            race_cached(name, config, point)

    families = SCHEDULED_PEERS + (("FirstBlockCache",) if args.weight_dependent_peers else ())
    # bf16 linears + a cache hook: where FP8's own error keeps every FP8 peer below the bar, the most
    # aggressive bf16 point that reaches it is the strongest peer at equal fidelity
    for family in families if fidelity else ():
        point = pick(fidelity, family, min_db, "bf16")
        name = point and f"diffusers {family}({point['knob']}) + torch.compile"
        if point and wanted(name):
            ratios = fidelity.get("mag_ratios", {}).get("bf16")
            race_cached(name, peer_config(family, point["knob"], args.steps, ratios if isinstance(ratios, list) else None),
                        point)
    if fidelity and not args.weight_dependent_peers:
        notes["FirstBlockCache"] = ("not timed: its skips follow the first block's output change, so on random "
                                    "weights they are not the test bed's schedule (--weight-dependent-peers times it)")
    picks = [(f, pick(fidelity, f, min_db)) for f in families] if fidelity else []
    fp8_name = "diffusers torch.compile + torchao FP8"
    cached = [(f"diffusers {f}({p['knob']}) + torch.compile + torchao FP8", f, p) for f, p in picks if p]
    if not any(wanted(n) for n in [fp8_name] + [n for n, _, _ in cached]):
        return rows, notes
    restore_blocks(model, eager_forwards)  # FP8 first, then compile (the compiler traces torchao's subclass)
    torch._dynamo.reset()
    numerics = quantize_blocks(model, dev)
    compile_blocks(model)
    if wanted(fp8_name):
        race(fp8_name, warmup_steps=2)
        rows[fp8_name]["fp8"] = numerics
        if fidelity and NO_CACHE in fidelity["rows"]:
            point = fidelity["rows"][NO_CACHE]
            rows[fp8_name]["testbed_fidelity"] = {"name": NO_CACHE, **point, "required_psnr_db": min_db,
                                                  "reaches_required": point.get("psnr_db", -1.0) >= min_db}
    for name, family, point in cached:
        if not wanted(name):
            continue
        ratios = fidelity.get("mag_ratios", {}).get("fp8")
        race_cached(name, peer_config(family, point["knob"], args.steps, ratios if isinstance(ratios, list) else None),
                    point)
        rows[name]["fp8"] = numerics
        if family == "FirstBlockCache":
            rows[name]["schedule_depends_on_weights"] = True
    return rows, notes


def required_psnr(args) -> float | None:
    """The test-bed PSNR a peer must reach: --fidelity-db, else the number at --fidelity-from FILE[:KEY]
    (KEY a /-separated path, default shipped/psnr_db: combined.py's shipped ditbake plan)."""
    if args.fidelity_db:
        return args.fidelity_db
    if not args.fidelity_from:
        return None
    path, _, key = args.fidelity_from.partition(":")
    value = json.loads(Path(path).read_text())
    for part in (key or "shipped/psnr_db").split("/"):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]  # e.g. combined.py's rows/0/psnr_db
            continue
        if not isinstance(value, dict) or part not in value:
            raise SystemExit(f"--fidelity-from {args.fidelity_from}: no {part!r} there; name the PSNR as FILE:KEY/PATH")
        value = value[part]
    return float(value)


def fp8_fidelity(args, min_db: float | None) -> dict | None:
    """The e2e_fidelity.py JSON (--fp8-fidelity), checked against this race's step count."""
    if not args.fp8_fidelity:
        return None
    fidelity = json.loads(Path(args.fp8_fidelity).read_text())
    if fidelity.get("steps") != args.steps:
        raise SystemExit(f"{args.fp8_fidelity} was measured at {fidelity.get('steps')} steps, the race runs "
                         f"{args.steps}: rerun benchmarks/e2e_fidelity.py --steps {args.steps}")
    if min_db is None:
        raise SystemExit("--fp8-fidelity needs the PSNR to reach: --fidelity-db DB or --fidelity-from FILE[:KEY]")
    return fidelity


# peers whose skip schedule does not depend on the weights (MagCache: calibrated ratios; TaylorSeer:
# a fixed interval), so the schedule measured on the test bed is the one timed here
SCHEDULED_PEERS = ("MagCache", "TaylorSeerCache")


def pick_peers(source: dict | None, min_db: float, method: str, skip: float) -> list[tuple[str, object, dict]]:
    """Per peer family, the test-bed point that skips most while reaching min_db PSNR vs the uncached
    output; min_db 0 means what `method` (a ditbake TDC curve of the same file) reaches at `skip`."""
    if not source:
        return []
    if not min_db:  # the method's curve of the same file stands for the plan's fidelity
        min_db = min(source["methods"][method], key=lambda p: abs(p["skip_fraction"] - skip))["psnr_db"]
    picks = []
    for family in SCHEDULED_PEERS:
        if family == "MagCache" and not source.get("mag_ratios"):
            continue
        family_points = source["methods"].get(family, [])
        points = [p for p in family_points if p["psnr_db"] >= min_db]
        if points:
            best = max(points, key=lambda p: p["skip_fraction"])
        elif family_points:  # no point of this peer is as faithful: its most faithful one
            best = max(family_points, key=lambda p: p["psnr_db"])
        else:
            continue
        picks.append((family, best["knob"], {**best, "required_psnr_db": min_db}))
    return picks


BASELINE_IN_DITBAKE_CALL = "diffusers eager (ditbake's call)"


@torch.no_grad()
def eager_baseline(model, args, latent, text_len, cfg, dev, dtype) -> dict:
    """diffusers eager timed over `--baseline-steps` steps after one warm-up step: its per-step time
    is constant (no cache), so the total is the median step time × all steps, stated as such."""
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, *latent, generator=gen).to(dev)
    cond = torch.randn(1, text_len, cfg["text_dim"], generator=gen).to(dev, dtype)
    uncond = torch.randn(1, text_len, cfg["text_dim"], generator=gen).to(dev, dtype)
    diffusers_loop(model, 1, latents, cond, uncond, args.guidance, StepTimer(dev))
    timer = StepTimer(dev)
    diffusers_loop(model, args.baseline_steps, latents, cond, uncond, args.guidance, timer)
    row = summary(timer.step_ms(), dev)
    row.update(total_s=row["step_ms_median"] * args.steps / 1e3, steps=args.steps, timed_steps=args.baseline_steps,
               total_note=f"median of {args.baseline_steps} timed steps × {args.steps} (constant per-step work)",
               weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()), skip_fraction=0.0)
    log.info("diffusers eager (baseline of this call): %.1f ms/step", row["step_ms_median"])
    return row


@torch.no_grad()
def run_ditbake(args, cfg, latent, text_len, dev, dtype) -> dict:
    import diffusers

    from ditbake.exporter.adapters import adapter_for
    from ditbake.exporter.build import build
    from ditbake.runtime import load
    from ditbake.runtime.artifact import WEIGHTS, Profile
    from ditbake.runtime.plan import Plan

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**cfg).to(dtype).eval()
    rows = {}
    if args.baseline_steps and dev.type == "cuda":  # the uncompressed baseline in this call (issue 19 item 3)
        rows[BASELINE_IN_DITBAKE_CALL] = eager_baseline(model.to(dev), args, latent, text_len, cfg, dev, dtype)
        model.to("cpu")
        torch.cuda.empty_cache()
    adapter = adapter_for(model)
    p = cfg["patch_size"]
    visual = (latent[1] // p[0]) * (latent[2] // p[1]) * (latent[3] // p[2])
    source = unguided = Plan.load(args.source_plan)
    if args.guidance_skips:  # uncond skipped at that fraction of the steps both branches compute
        from ditbake.exporter.plan_guidance import add_guidance_skips

        source = add_guidance_skips(unguided, args.guidance_skips)
    uncapped = plan_ratios(transplant_plan(source, adapter, visual, args.source_visual_tokens), visual)

    def transplanted(src, adapter=adapter):  # bound now: adapter is deleted below
        out = transplant_plan(src, adapter, visual, args.source_visual_tokens, act_format=args.act_format,
                              max_variants=args.max_variants)
        # uniform, so the variant cap (attention cost by scheme) is unaffected
        return with_head_precision(out, args.attn_format) if args.attn_format else out

    plan = transplanted(source)
    if args.guidance_skips:  # the same engines serve the source plan without them: timed in this call too
        base_plan = transplanted(unguided)
        if base_plan.variants != plan.variants:
            raise ValueError("guidance skips changed the transplanted variants; time the plans in separate calls")
    if plan.num_steps != args.steps:
        raise ValueError(f"source plan has {plan.num_steps} steps, the race runs {args.steps}")
    ratios = {**plan_ratios(plan, visual), "before_variant_cap": uncapped}
    log.info("transplanted plan: %s", ratios)
    t0 = time.perf_counter()
    path = build(adapter, plan, args.artifact, profiles=[Profile("e2e", latent, text_len)], samplers=["unipc"],
                 dtype=dtype, backend=args.backend, device=dev.type, label="Wan2.1-1.3B (random weights)",
                 progress=False, weight_storage=args.weight_storage)
    build_s = time.perf_counter() - t0
    # what ships (weights.safetensors) vs the bf16 transformer: NVFP4 storage makes these differ from
    # the resident weight bytes, which hold the 8-bit weights the loader materializes
    file_bytes = (Path(path) / WEIGHTS).stat().st_size
    bf16_bytes = sum(t.numel() * 2 for t in adapter.weights().values())
    del model, adapter
    session = load(path, device=dev)
    weight_bytes = sum(t.numel() * t.element_size() for t in session.weights.values())
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, *latent, generator=gen)
    cond = torch.randn(1, text_len, cfg["text_dim"], generator=gen)
    uncond = torch.randn(1, text_len, cfg["text_dim"], generator=gen)
    log.info("warm-up generate")
    session.generate(cond, uncond, latents=latents, guidance_scale=args.guidance)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(dev)
    result = session.generate(cond, uncond, latents=latents, guidance_scale=args.guidance, progress=timer.wrap)
    row = {**summary(timer.step_ms(), dev), "weight_bytes": weight_bytes, "build_s": build_s,
           "weight_storage": args.weight_storage, "weight_file_bytes": file_bytes,
           "weight_file_ratio_vs_bf16": bf16_bytes / file_bytes,
           "skip_fraction": result.report.skip_fraction,
           "attention_flops_fraction": result.report.attention_flops_fraction, "plan": ratios,
           "backend": args.backend, "attention_format": args.attn_format or "the source plan's",
           "cuda_graphs": session._graphs is not None,
           "graph_captures": result.report.graph_captures, "graph_replays": result.report.graph_replays}
    rows[f"ditbake {args.backend}"] = row
    Path(args.out).with_suffix(".partial.json").write_text(json.dumps(rows, indent=1))  # survives a timeout below
    if args.guidance_skips:
        session.plan = base_plan
        session.generate(cond, uncond, latents=latents, guidance_scale=args.guidance)
        timer = StepTimer(dev)
        base = session.generate(cond, uncond, latents=latents, guidance_scale=args.guidance, progress=timer.wrap)
        rows[f"ditbake {args.backend}, without guidance skips"] = {
            **summary(timer.step_ms(), dev), "weight_bytes": weight_bytes, "skip_fraction": base.report.skip_fraction,
            "plan": plan_ratios(base_plan, visual)}
        row["guidance_skips"] = {"fraction": args.guidance_skips, "steps": source.predicted.get("guidance_skips"),
                                 "forward_fraction": source.predicted.get("forward_fraction")}
        session.plan = plan
    profiled = session
    if session._graphs is not None:  # the same artifact without CUDA graphs, for their share
        profiled = plain = load(path, device=dev, cuda_graphs=False)
        plain.generate(cond, uncond, latents=latents, guidance_scale=args.guidance)
        timer = StepTimer(dev)
        free = plain.generate(cond, uncond, latents=latents, guidance_scale=args.guidance, progress=timer.wrap)
        # the graphs replay what the graph-free session computes: same latents up to kernel-choice rounding
        row["graphs_vs_no_graphs_rel_diff"] = float((result.latents - free.latents).float().norm()
                                                    / free.latents.float().norm())
        other = summary(timer.step_ms(), dev)
        other.pop("peak_memory_bytes", None)  # both sessions are resident here
        rows[f"ditbake {args.backend}, no CUDA graphs"] = {**other, "weight_bytes": weight_bytes,
                                                          "skip_fraction": result.report.skip_fraction}
    if dev.type == "cuda":  # kernels by class, from the graph-free session (the profiler sees its launches)
        try:
            row["breakdown"] = breakdown(profiled, cond, uncond, latents, args.guidance)
        except Exception as exc:  # the profiler must not cost the timings
            row["breakdown"] = {"error": f"{type(exc).__name__}: {exc}"}
    log.info("ditbake: %.1f ms/step, %.1f s total", row["step_ms_median"], row["total_s"])
    return rows


def kernel_class(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "attn", "sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "matmul", "_mm", "mm_", "xmma", "nvjet", "cutlass", "act_quant", "to_8bit",
                            "w4a16", "w4a4", "dequant")):
        return "linears"
    return "other"


def breakdown(session, cond, uncond, latents, guidance: float) -> dict:
    """CUDA kernel time of a whole generate by class (attention / linears / other), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        session.generate(cond, uncond, latents=latents, guidance_scale=guidance)
        torch.cuda.synchronize()
    totals: dict[str, float] = {"attention": 0.0, "linears": 0.0, "other": 0.0}
    top = []
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if us <= 0:
            continue
        totals[kernel_class(evt.key)] += us
        top.append((us, evt.key[:90], kernel_class(evt.key)))
    whole = sum(totals.values()) or 1.0
    top.sort(reverse=True)
    return {"fractions": {k: v / whole for k, v in totals.items()}, "kernel_ms": {k: v / 1e3 for k, v in totals.items()},
            "top_kernels": [{"ms": us / 1e3, "name": n, "class": c} for us, n, c in top[:15]]}


# ---------------------------------------------------------------- report

def with_call_ratios(rows: dict, baseline: str) -> dict:
    """Each row's speed-up over the diffusers eager timed in the same call: what `merge` compares, so
    that any number of calls (each with its own baseline) can be joined."""
    if baseline in rows:
        for r in rows.values():
            r["speedup_vs_eager_in_call"] = rows[baseline]["total_s"] / r["total_s"]
    return rows


def merge(parts: list[dict]) -> dict:
    """Join the phases' JSON. Each phase times diffusers eager in its own call; ditbake's ratios to a
    peer are taken through those baselines (ours vs its call's eager) / (peer vs its call's eager), so
    no ratio mixes two calls' absolute times (issue 19 item 3)."""
    out = {"rows": {}}
    for p in parts:  # the first part's value of a shared key wins
        out.update({k: v for k, v in p.items() if k != "rows" and k not in out})
        out["rows"].update(p["rows"])
    rows = out["rows"]
    eager = rows.get("diffusers eager")
    ours_eager = rows.get(BASELINE_IN_DITBAKE_CALL, eager)
    peers = {k: r for k, r in rows.items() if k.startswith("diffusers") and k not in ("diffusers eager",
                                                                                     BASELINE_IN_DITBAKE_CALL)}
    ours = next((r for k, r in rows.items() if k.startswith("ditbake")), None)
    if ours and ours_eager:
        out["speedup_vs_diffusers_eager"] = ours_eager["total_s"] / ours["total_s"]
        out["weight_memory_ratio_vs_bf16"] = ours_eager["weight_bytes"] / ours["weight_bytes"]
        if "weight_file_ratio_vs_bf16" in ours:
            out["weight_file_ratio_vs_bf16"] = ours["weight_file_ratio_vs_bf16"]
    if ours and eager and "peak_memory_bytes" in ours:
        comp = rows.get("diffusers torch.compile")
        if comp and "peak_memory_bytes" in comp:
            out["peak_memory_ratio_vs_compile"] = comp["peak_memory_bytes"] / ours["peak_memory_bytes"]
    if ours and eager and ours_eager:
        def x_eager(row, call_eager):
            return row.get("speedup_vs_eager_in_call", call_eager["total_s"] / row["total_s"])

        def vs(name):  # ours vs a peer, through each one's own call's eager baseline
            return x_eager(ours, ours_eager) / x_eager(rows[name], eager)

        if "diffusers torch.compile" in rows:
            out["speedup_vs_torch_compile"] = vs("diffusers torch.compile")
        if peers:
            best = max(peers, key=lambda k: x_eager(peers[k], eager))
            out["fastest_peer"] = best
            out["speedup_vs_fastest_peer"] = vs(best)
            # issue 19's comparison: the fastest peer whose test-bed fidelity reaches ditbake's (rows without a
            # recorded point are bf16 without a cache: the uncompressed output itself)
            fair = {k: r for k, r in peers.items() if r.get("testbed_fidelity", {}).get("reaches_required", True)}
            if fair:
                best = max(fair, key=lambda k: x_eager(fair[k], eager))
                out["best_peer"] = best
                out["speedup_vs_best_peer"] = vs(best)
    return out


def print_table(result: dict) -> None:
    rows = result["rows"]
    eager = rows.get("diffusers eager", {}).get("total_s")
    print(f"{'contender':58s} {'ms/step':>8s} {'total s':>8s} {'× eager':>8s} {'skip':>5s} {'weights GB':>10s} {'peak GB':>8s}")
    for name, r in rows.items():
        print(f"{name:58s} {r['step_ms_median']:8.1f} {r['total_s']:8.2f} "
              f"{(eager / r['total_s']) if eager else float('nan'):8.2f} {r.get('skip_fraction', 0):5.2f} "
              f"{r['weight_bytes'] / 1e9:10.2f} {r.get('peak_memory_bytes', 0) / 1e9:8.2f}")
    for k in ("speedup_vs_diffusers_eager", "speedup_vs_torch_compile", "speedup_vs_best_peer", "speedup_vs_fastest_peer",
              "weight_memory_ratio_vs_bf16", "weight_file_ratio_vs_bf16", "peak_memory_ratio_vs_bf16"):
        if k in result:
            print(f"{k}: {result[k]:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=("ditbake", "peers", "all"), default="all")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--backend", default="aoti", choices=("aoti", "eager"))
    ap.add_argument("--source-plan", default="benchmarks/results/e2e_source_plan16k.json",
                    help="test-bed plan whose ratios the Wan2.1-1.3B plan takes (default: the 16k bed's, "
                         "combined.py --steps 50 --combos 0.4:8:0 --extrapolate linear)")
    ap.add_argument("--act-format", default="int8", choices=("int8", "fp8"),
                    help="8-bit W8A8 format of every computed block linear in the transplanted plan")
    ap.add_argument("--guidance-skips", type=float, default=0.0,
                    help="ditbake phase: skip uncond at this fraction of the steps both branches compute, reusing "
                         "the CFG gap (exporter/plan_guidance.py); the plan without them is timed on the same engines")
    ap.add_argument("--attn-format", default="", choices=("", "bf16", "int8", "fp8"),
                    help="ditbake phase: every transplanted head's attention precision (default: the source plan's)")
    ap.add_argument("--baseline-steps", type=int, default=5,
                    help="ditbake phase: also time diffusers eager over this many steps (0: not)")
    ap.add_argument("--max-variants", type=int, default=2,
                    help="cap on distinct computed block configurations (compiled engines); 0: no cap")
    ap.add_argument("--source-visual-tokens", type=int, default=16 * 32 * 32,
                    help="visual tokens of the source plan's shape (16k bed: 16 latent frames of 32×32 after "
                         "its 1×2×2 patches; the first bed's plans: 8 × 16 × 16)")
    ap.add_argument("--peer-source", default="",
                    help="tdc_peers.py result at the race's step count: also time its cache families with bf16 "
                         "linears (e.g. benchmarks/results/tdc_50steps.json)")
    ap.add_argument("--fp8-fidelity", default="",
                    help="e2e_fidelity.py result at the race's step count: times its FP8 cache points")
    ap.add_argument("--fidelity-db", type=float, default=0.0,
                    help="a peer must reach this test-bed PSNR vs the uncached model (default: --fidelity-from, "
                         "else for --peer-source see --fidelity-method)")
    ap.add_argument("--fidelity-from", default="",
                    help="FILE[:KEY]: the required PSNR from a ditbake fidelity JSON (KEY a /-path, default "
                         "shipped/psnr_db, as combined.py writes)")
    ap.add_argument("--weight-dependent-peers", action="store_true",
                    help="also time FirstBlockCache (its skips on random weights are not the test bed's)")
    ap.add_argument("--only", default="", help="regex: time only the matching contenders (eager always runs)")
    ap.add_argument("--weight-storage", default="8bit", choices=("8bit", "nvfp4", "nvfp4-resident"),
                    help="ditbake build's storage of the 8-bit layers (nvfp4: 4.5 bits shipped, 8-bit resident; "
                         "random weights, so rounded to nearest: speed and bytes only)")
    ap.add_argument("--fidelity-method", default="ditbake TDC per step, linear extrapolation",
                    help="the peer-source curve that stands for the ditbake plan's fidelity")
    ap.add_argument("--fidelity-skip", type=float, default=0.4, help="...at this skip fraction")
    ap.add_argument("--artifact", default="out/e2e/artifact")
    ap.add_argument("--merge", nargs="*", default=None, help="JSON files of earlier phases to join")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to check the script without a GPU")
    ap.add_argument("--out", default="benchmarks/results/e2e_h100.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        if args.fidelity_db:  # another ditbake plan than the peers were picked for: re-draw the bar
            for part in parts:
                part["required_psnr_db"] = args.fidelity_db
                part["required_psnr_source"] = f"--fidelity-db {args.fidelity_db:g}"
                for row in part["rows"].values():
                    fid = row.get("testbed_fidelity")
                    if fid and "psnr_db" in fid:
                        fid.update(required_psnr_db=args.fidelity_db, reaches_required=fid["psnr_db"] >= args.fidelity_db)
        result = merge(parts)
    else:
        dev, dtype = torch.device("cuda"), torch.bfloat16
        cfg, latent, text_len = WAN_1_3B, LATENT, TEXT_LEN
        if args.smoke:
            cfg, latent, text_len, dev, dtype = SMOKE, (16, 3, 8, 8), 8, torch.device("cpu"), torch.float32
        result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)",
                  "torch": torch.__version__, "model": "Wan2.1-1.3B architecture, random weights",
                  "latent": list(latent), "tokens": latent[1] * latent[2] * latent[3] // 4, "text_len": text_len,
                  "steps": args.steps, "guidance": args.guidance, "cfg_forwards_per_step": 2, "rows": {}}
        if args.phase in ("ditbake", "all"):
            result["rows"].update(with_call_ratios(run_ditbake(args, cfg, latent, text_len, dev, dtype),
                                                   BASELINE_IN_DITBAKE_CALL))
        if args.phase in ("peers", "all"):
            # bf16 even in a smoke run: torchao's row-wise FP8 takes bf16 weights only
            rows, notes = run_peers(args, cfg, latent, text_len, dev, torch.bfloat16)
            result["rows"].update(with_call_ratios(rows, "diffusers eager"))
            if notes:
                result["peers_not_timed"] = notes
            if required_psnr(args) is not None:
                result["required_psnr_db"] = required_psnr(args)
                result["required_psnr_source"] = (f"--fidelity-db {args.fidelity_db:g}" if args.fidelity_db
                                                  else f"--fidelity-from {args.fidelity_from}")
        result = merge([result])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(stamp(result), indent=1))
    print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
