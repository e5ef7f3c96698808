"""End-to-end transformer race on one GPU: Wan2.1-1.3B (random weights) at 480×832×81 frames
(32,760 tokens), 50 steps with classifier-free guidance (two forwards per step), bf16.

Contenders, all in one process on the same GPU:
* diffusers eager bf16;
* diffusers + torch.compile (regional: each transformer block's forward compiled, as diffusers
  recommends for repeated blocks);
* diffusers' cache hooks at comparable fidelity + the same torch.compile: MagCache (the test bed's
  calibrated magnitude ratios) and TaylorSeer (fixed interval), each at the point of the test-bed
  sweep at 50 steps (`--peer-source`, written by `benchmarks/tdc_peers.py --steps 50`) that skips
  most while reaching the ditbake plan's test-bed PSNR; their skip schedules do not depend on the
  weights, so the schedule timed here is the one whose fidelity was measured there;
* ditbake: `ditbake build --backend aoti` of a plan transplanted from the test-bed plan
  (`--source-plan`, made by `ditbake plan --tdc-skip-budget 0.4 --tdc-granularity step
  --tdc-extrapolate linear --heads` on
  a 50-step calibration of the test bed with δ = 0.01): the same per-step skip schedule (block index
  scaled to 30 blocks), the same arrow head schemes (head index scaled, widths as fractions of the
  visual tokens; at most `--max-variants` compiled configurations, attention work kept), all block
  linears W4A8 (NVFP4 weights, INT8 activations).
  Loaded with `ditbake.runtime.load` and run with `Session.generate` — the product path.

Per-step times are CUDA-event times between step boundaries (median and total over the 50 steps,
after a warm-up). Random weights: speed does not depend on their values, fidelity does, which is
why the plan's ratios come from the trained test-bed model. `--phase ditbake|peers` splits the work
across two device calls (each has a 10-minute limit); `--merge` joins their JSON.

    python benchmarks/e2e.py --phase ditbake --out $OUT/e2e_ditbake.json
    python benchmarks/e2e.py --phase peers --out $OUT/e2e_peers.json
    python benchmarks/e2e.py --merge $OUT/e2e_ditbake.json $OUT/e2e_peers.json --out benchmarks/results/e2e_h100.json
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from block_race import LATENT, TEXT_LEN, WAN_1_3B as ONE_BLOCK  # benchmarks/ is the script's directory
from tdc_peers import peer_configs
from provenance import stamp  # benchmarks/ is the script's directory: commit + dirty flag in every JSON

log = logging.getLogger("e2e")

WAN_1_3B = dict(ONE_BLOCK, num_layers=30)  # LATENT: 81 frames at 480×832 through Wan's VAE; TEXT_LEN: 512
SMOKE = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=32, ffn_dim=128, text_dim=32, num_layers=4)


# ---------------------------------------------------------------- plan transplant

def transplant_plan(source, adapter, visual_tokens: int, src_tokens: int, act_format: str = "int8",
                    max_variants: int = 0):
    """The source plan's per-step skip schedule and head schemes on a model with more blocks and
    heads: block b takes source block ⌊b·B_src/B⌋, head h source head ⌊h·H_src/H⌋, arrow widths
    keep their fraction of the visual tokens. Every computed block runs its linears in act_format.
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
                                              round(s.right * visual_tokens / src_tokens)))
                elif s.kind == "full":
                    schemes.append(HeadScheme())
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
                predicted={"transplanted_from": "test-bed plan"}, stack_extrapolation=source.stack_extrapolation)


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
    """Wrap the last block's forward to count real computations (a cache hook bypasses it)."""
    counter = {"calls": 0}
    block = model.blocks[-1]
    inner = block.forward

    def counted(*a, **k):
        counter["calls"] += 1
        return inner(*a, **k)

    block.forward = counted
    return counter


@torch.no_grad()
def run_peers(args, cfg, latent, text_len, dev, dtype) -> dict:
    import diffusers

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**cfg).to(dev, dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, *latent, generator=gen).to(dev)
    cond = torch.randn(1, text_len, cfg["text_dim"], generator=gen).to(dev, dtype)
    uncond = torch.randn(1, text_len, cfg["text_dim"], generator=gen).to(dev, dtype)
    rows = {}

    def race(name, warmup_steps=1):
        log.info("%s: warm-up", name)
        diffusers_loop(model, warmup_steps, latents, cond, uncond, args.guidance, StepTimer(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        counter["calls"] = 0
        timer = StepTimer(dev)
        diffusers_loop(model, args.steps, latents, cond, uncond, args.guidance, timer)
        rows[name] = {**summary(timer.step_ms(), dev), "weight_bytes": weight_bytes,
                      "skip_fraction": 1 - counter["calls"] / (2 * args.steps)}
        log.info("%s: %.1f ms/step, %.1f s total, skip %.2f", name, rows[name]["step_ms_median"],
                 rows[name]["total_s"], rows[name]["skip_fraction"])

    counter = count_block_calls(model)
    race("diffusers eager")
    for block in model.blocks:  # regional compile under the counter and (later) the cache hooks
        block.forward = torch.compile(block.forward, fullgraph=False)
    race("diffusers torch.compile", warmup_steps=2)
    source = json.loads(Path(args.peer_source).read_text()) if args.peer_source else None
    for family, knob, point in pick_peers(source, args.fidelity_db, args.fidelity_method, args.fidelity_skip):
        config = next(c for n, k, c in peer_configs(args.steps, source.get("mag_ratios")) if n == family and k == knob)
        model.enable_cache(config)
        name = f"diffusers {family}({knob}) + torch.compile"
        race(name, warmup_steps=args.steps)  # one full warm-up loop: cache state resets per loop
        rows[name]["testbed_fidelity"] = point
        model.disable_cache()
    return rows


# peers whose skip schedule does not depend on the weights (MagCache: calibrated ratios; TaylorSeer:
# a fixed interval), so the schedule measured on the test bed is the one timed here
SCHEDULED_PEERS = ("MagCache", "TaylorSeerCache")


def pick_peers(source: dict | None, min_db: float, method: str, skip: float) -> list[tuple[str, object, dict]]:
    """Per peer family, the test-bed point that skips most while reaching min_db PSNR vs the uncached
    output; min_db 0 means what `method` (a ditbake TDC curve of the same file) reaches at `skip`."""
    if not source:
        return []
    if not min_db:
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


@torch.no_grad()
def run_ditbake(args, cfg, latent, text_len, dev, dtype) -> dict:
    import diffusers

    from ditbake.exporter.adapters import adapter_for
    from ditbake.exporter.build import build
    from ditbake.runtime import load
    from ditbake.runtime.artifact import Profile
    from ditbake.runtime.plan import Plan

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**cfg).to(dtype).eval()
    adapter = adapter_for(model)
    p = cfg["patch_size"]
    visual = (latent[1] // p[0]) * (latent[2] // p[1]) * (latent[3] // p[2])
    source = Plan.load(args.source_plan)
    uncapped = plan_ratios(transplant_plan(source, adapter, visual, args.source_visual_tokens), visual)
    plan = transplant_plan(source, adapter, visual, args.source_visual_tokens, max_variants=args.max_variants)
    if plan.num_steps != args.steps:
        raise ValueError(f"source plan has {plan.num_steps} steps, the race runs {args.steps}")
    ratios = {**plan_ratios(plan, visual), "before_variant_cap": uncapped}
    log.info("transplanted plan: %s", ratios)
    t0 = time.perf_counter()
    path = build(adapter, plan, args.artifact, profiles=[Profile("e2e", latent, text_len)], samplers=["unipc"],
                 dtype=dtype, backend=args.backend, device=dev.type, label="Wan2.1-1.3B (random weights)",
                 progress=False)
    build_s = time.perf_counter() - t0
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
           "skip_fraction": result.report.skip_fraction,
           "attention_flops_fraction": result.report.attention_flops_fraction, "plan": ratios,
           "backend": args.backend, "cuda_graphs": session._graphs is not None,
           "graph_captures": result.report.graph_captures, "graph_replays": result.report.graph_replays}
    rows = {f"ditbake {args.backend}": row}
    Path(args.out).with_suffix(".partial.json").write_text(json.dumps(rows, indent=1))  # survives a timeout below
    profiled = session
    if session._graphs is not None:  # the same artifact without CUDA graphs, for their share
        profiled = plain = load(path, device=dev, cuda_graphs=False)
        plain.generate(cond, uncond, latents=latents, guidance_scale=args.guidance)
        timer = StepTimer(dev)
        plain.generate(cond, uncond, latents=latents, guidance_scale=args.guidance, progress=timer.wrap)
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

def merge(parts: list[dict]) -> dict:
    out = {k: v for k, v in parts[0].items() if k != "rows"}
    out["rows"] = {}
    for p in parts:
        out["rows"].update(p["rows"])
    rows = out["rows"]
    eager = rows.get("diffusers eager")
    comp = rows.get("diffusers torch.compile")
    peers = {k: r for k, r in rows.items() if k.startswith("diffusers") and "Cache" in k}
    ours = next((r for k, r in rows.items() if k.startswith("ditbake")), None)
    if ours and eager:
        out["speedup_vs_diffusers_eager"] = eager["total_s"] / ours["total_s"]
        out["weight_memory_ratio_vs_bf16"] = eager["weight_bytes"] / ours["weight_bytes"]
        if "peak_memory_bytes" in eager and "peak_memory_bytes" in ours:
            out["peak_memory_ratio_vs_bf16"] = eager["peak_memory_bytes"] / ours["peak_memory_bytes"]
    if ours and comp:
        out["speedup_vs_torch_compile"] = comp["total_s"] / ours["total_s"]
    if ours and peers:
        best = min(peers.values(), key=lambda r: r["total_s"])
        out["speedup_vs_best_peer"] = best["total_s"] / ours["total_s"]
    return out


def print_table(result: dict) -> None:
    rows = result["rows"]
    eager = rows.get("diffusers eager", {}).get("total_s")
    print(f"{'contender':46s} {'ms/step':>8s} {'total s':>8s} {'× eager':>8s} {'skip':>5s} {'weights GB':>10s} {'peak GB':>8s}")
    for name, r in rows.items():
        print(f"{name:46s} {r['step_ms_median']:8.1f} {r['total_s']:8.2f} "
              f"{(eager / r['total_s']) if eager else float('nan'):8.2f} {r.get('skip_fraction', 0):5.2f} "
              f"{r['weight_bytes'] / 1e9:10.2f} {r.get('peak_memory_bytes', 0) / 1e9:8.2f}")
    for k in ("speedup_vs_diffusers_eager", "speedup_vs_torch_compile", "speedup_vs_best_peer",
              "weight_memory_ratio_vs_bf16", "peak_memory_ratio_vs_bf16"):
        if k in result:
            print(f"{k}: {result[k]:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=("ditbake", "peers", "all"), default="all")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--backend", default="aoti", choices=("aoti", "eager"))
    ap.add_argument("--source-plan", default="benchmarks/results/e2e_source_plan.json",
                    help="test-bed plan whose ratios the Wan2.1-1.3B plan takes")
    ap.add_argument("--max-variants", type=int, default=2,
                    help="cap on distinct computed block configurations (compiled engines); 0: no cap")
    ap.add_argument("--source-visual-tokens", type=int, default=8 * 16 * 16,
                    help="visual tokens of the source plan's shape (test bed: 8 frames of 32×32, patch 1×2×2)")
    ap.add_argument("--peer-source", default="benchmarks/results/tdc_50steps.json",
                    help="tdc_peers.py result at the race's step count (MagCache ratios and fidelity)")
    ap.add_argument("--fidelity-db", type=float, default=0.0,
                    help="a peer must reach this test-bed PSNR vs the uncached model (default: see --fidelity-method)")
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
        result = merge([json.loads(Path(f).read_text()) for f in args.merge])
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
            result["rows"].update(run_ditbake(args, cfg, latent, text_len, dev, dtype))
        if args.phase in ("peers", "all"):
            result["rows"].update(run_peers(args, cfg, latent, text_len, dev, dtype))
        result = merge([result])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(stamp(result), indent=1))
    print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
