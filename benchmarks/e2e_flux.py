"""End-to-end transformer race on the FLUX.1 [dev] architecture (random weights) at 2048×2048
(latents 16×256×256, packed 2×2 → 16,384 image tokens) + 512 text tokens, bf16, 50 flow-matching
steps. FLUX.1 [dev] is guidance-distilled: ONE forward per step, the guidance scale is an input,
no classifier-free guidance.

Contenders, all in one process on one GPU:
* diffusers eager bf16; diffusers + regional torch.compile (each block's forward compiled, as
  benchmarks/e2e.py does for Wan);
* diffusers' cache hooks + the same regional compile, each at a stated knob (CLI):
  FirstBlockCache(threshold), TaylorSeerCache(cache_interval; whole blocks predicted) and
  MagCache(threshold) with diffusers' own published FLUX_MAG_RATIOS (no calibration needed);
* ditbake: an artifact built with `ditbake.exporter.build` (backend `eager` by default; an aoti
  build of the 12 B model did not fit one device call) and run with `Session.generate` — the
  product path — from a fixed plan:
  (i)  TDC per-step skips: the skip pattern of the Wan e2e race's test-bed plan
       (`--source-plan`, TDC skip budget 0.4, step granularity, linear extrapolation), resampled to
       `--steps`; step 0 always computed;
  (ii) every head of every block an arrow band of `--band` of the image keys (forward_race's (c)
       rows): the report's attention_flops_fraction says what is left;
  (iii) FP8 linears: every block linear of both block kinds (the plan lists Flux's BLOCK_LINEARS,
       the union of the double and single blocks' layers; each block stores and runs its own).

Per-step times are CUDA-event times between step boundaries. Contenders whose per-step time is
constant (eager, compile) may be timed over the first `--timed-steps` steps; their total is then
extrapolated to all steps and the JSON says so. Cache / skip contenders always run every step.
JSON is rewritten after each contender (a timeout keeps what was measured). Should one call not
hold everything, `--phase ditbake` (with its own diffusers eager baseline) and `--phase peers` split
it, and each JSON's ratios stay within its call. Speed only: the
weights are random, so no fidelity is measured (there is no trained Flux test bed).

    python benchmarks/e2e_flux.py --timed-steps 10 --out $OUT/e2e_flux.json
    python benchmarks/e2e_flux.py --smoke --out /tmp/e2e_flux_smoke.json   # CPU, tiny config
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import statistics
import time
from pathlib import Path

import torch

# benchmarks/ is the script's directory: the Flux config, the timer and the provenance stamp
from e2e import StepTimer
from forward_race import FLUX, FLUX_LATENT, FLUX_TEXT, SMOKE
from provenance import stamp

log = logging.getLogger("e2e_flux")

FIDELITY = ("not measured: random weights and no trained Flux test bed, so only speed, memory and weight "
            "bytes are compared; the skip schedule's fidelity was measured on the Wan test bed only")
SMOKE_FLUX = dict(SMOKE["flux"][0], num_layers=2, num_single_layers=2)  # ≥ 2 of each: FirstBlockCache has a rest


# ---------------------------------------------------------------- the schedule both sides share

def flux_sigmas(steps: int, image_tokens: int) -> torch.Tensor:
    """FluxPipeline's sigmas: linspace(1, 1/steps) time-shifted by μ, μ linear in the image sequence
    length (0.5 at 256 tokens, 1.15 at 4096, extrapolated beyond as the pipeline does); then 0."""
    mu = 0.5 + (1.15 - 0.5) * (image_tokens - 256) / (4096 - 256)
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    return torch.cat([shifted, torch.zeros(1, dtype=torch.float64)]).float()


def skip_schedule(source_plan: str, steps: int) -> list[bool]:
    """True where step i skips every block: the source plan's cond pattern, resampled so that the
    first i+1 steps skip as many as the same fraction of the source's trajectory does (at the
    source's step count: the source pattern itself). Step 0 is always computed (the runtime has no
    residual before it)."""
    from ditbake.runtime.plan import Plan

    src = Plan.load(source_plan)
    n = src.num_steps
    skipped = [not any(src.variants[v].compute for v in src.step_ids(i, "cond")) for i in range(n)]
    out, done = [], 0
    for i in range(steps):
        target = round(sum(skipped[:(i + 1) * n // steps]) * steps / n)
        out.append(i > 0 and target > done)
        done += out[-1]
    return out


# ---------------------------------------------------------------- diffusers contenders

def diffusers_loop(adapter, model, sigmas, steps: int, x, text, pooled, guidance, timer: StepTimer):
    """Flow-matching Euler, one forward per step inside its cache context (as FluxPipeline)."""
    x = x.clone()
    for i in timer.wrap(range(steps)):
        t = torch.full((1,), float(sigmas[i]) * 1000, device=x.device)
        with model.cache_context("cond"):
            v = adapter.diffusers_forward(x.to(text.dtype), t, text, pooled, guidance)
        x = x + (sigmas[i + 1] - sigmas[i]) * v.float()
    return x


class CountLastBlock:
    """Counts calls of the last block's current forward (a cache hook that skips it bypasses it);
    re-installed after each change of the block's forward (compile)."""

    def __init__(self, model):
        self.block, self.calls = model.single_transformer_blocks[-1], 0
        self.install()

    def install(self):
        self.inner = inner = self.block.forward

        def counted(*a, **k):
            self.calls += 1
            return inner(*a, **k)

        self.block.forward = counted

    def uninstall(self):
        self.block.forward = self.inner


def cache_configs(args, steps: int) -> list[tuple[str, object]]:
    import diffusers
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    whole_blocks = [r"^(transformer_blocks|single_transformer_blocks)\.\d+$"]
    return [
        (f"FirstBlockCache({args.fbc_threshold})", diffusers.FirstBlockCacheConfig(threshold=args.fbc_threshold)),
        # whole blocks predicted (the default predicts attention outputs only and skips no block);
        # fp32 factors as the Wan race's peers (benchmarks/tdc_peers.py)
        (f"TaylorSeerCache({args.taylor_interval})",
         diffusers.TaylorSeerCacheConfig(cache_interval=args.taylor_interval, disable_cache_before_step=2,
                                         taylor_factors_dtype=torch.float32, cache_identifiers=whole_blocks)),
        (f"MagCache({args.mag_threshold})",
         diffusers.MagCacheConfig(threshold=args.mag_threshold, mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=steps)),
    ]


@torch.no_grad()
def run_peers(args, cfg, latent, text_len, dev, dtype, inputs, report) -> None:
    from ditbake.exporter.adapters import adapter_for

    model = random_flux(cfg, dev, dtype)
    adapter = adapter_for(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x, text, pooled, guidance = (t.to(dev) for t in inputs)
    text, pooled = text.to(dtype), pooled.to(dtype)
    sigmas = flux_sigmas(args.steps, latent[1] * latent[2] // 4)
    counter = CountLastBlock(model)

    def race(name, timed_steps, warmup_steps):
        if report.over_budget(name):
            return
        t0 = time.perf_counter()
        model._reset_stateful_cache()
        diffusers_loop(adapter, model, sigmas, warmup_steps, x, text, pooled, guidance, StepTimer(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        warmup_s = time.perf_counter() - t0
        model._reset_stateful_cache()
        counter.calls = 0
        timer = StepTimer(dev)
        diffusers_loop(adapter, model, sigmas, timed_steps, x, text, pooled, guidance, timer)
        step_ms = timer.step_ms()
        row = {**summary(step_ms, args.steps, dev), "forwards_computed": counter.calls,
               "skip_fraction": 1 - counter.calls / timed_steps, "weight_bytes": weight_bytes, "warmup_s": warmup_s}
        report.add(name, row)

    constant = min(args.timed_steps or args.steps, args.steps)
    race("diffusers eager", constant, warmup_steps=1)
    if args.phase == "ditbake":  # a split run keeps its own eager baseline: ratios stay within one call
        return
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    counter.uninstall()  # the counter stays outside the compiled code (no side effects to trace)
    for block in blocks:  # regional compile, as diffusers recommends for repeated blocks
        block.forward = torch.compile(block.forward, fullgraph=False, backend=args.compile_backend)
    counter.install()
    race("diffusers torch.compile", constant, warmup_steps=2)
    if "diffusers torch.compile" in report.rows:  # the warm-up is the compilation
        report.rows["diffusers torch.compile"]["build_s"] = report.rows["diffusers torch.compile"]["warmup_s"]
    for name, config in cache_configs(args, args.steps):
        full = f"diffusers {name} + torch.compile"
        try:
            model.enable_cache(config)
        except Exception as exc:  # a hook diffusers cannot apply to Flux: logged, not fatal
            log.warning("%s: %s", full, exc)
            report.add(full, {"skipped": f"{type(exc).__name__}: {exc}"})
            continue
        try:  # a full loop: every cache/skip contender runs every step
            race(full, args.steps, warmup_steps=min(args.cache_warmup_steps, args.steps))
        except Exception as exc:
            log.exception("%s failed", full)
            report.add(full, {"error": f"{type(exc).__name__}: {str(exc)[:600]}"})
        model.disable_cache()


def random_flux(cfg: dict, dev, dtype):
    """The model with seeded random weights, initialised on `dev` directly in `dtype` (12 B parameters:
    an fp32 initialisation would need 48 GB first)."""
    import diffusers

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            return diffusers.FluxTransformer2DModel(**cfg).to(dtype).eval()
    finally:
        torch.set_default_dtype(default)


def release(dev) -> None:
    torch._dynamo.reset()  # compiled block graphs hold the model's weights
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- ditbake

def ditbake_plan(adapter, skipped: list[bool], band: float, head_precision: str, visual_tokens: int,
                 linear_format: str = "fp8"):
    """(i) the per-step skip schedule, (ii) every head an arrow band of `band` of the image keys,
    (iii) every block linear (each block kind's own) in `linear_format` (W8A8: fp8 or int8)."""
    from ditbake.exporter.planner import SKIP
    from ditbake.runtime.plan import BlockVariant, HeadScheme, Plan

    sites = sorted(adapter.attention_sites.items())
    half = max(1, round(band * visual_tokens / 2))
    heads = tuple((site, (HeadScheme("arrow", half, half, head_precision),) * n) for site, n in sites)
    computed = BlockVariant(precisions=tuple(sorted((n, linear_format) for n in adapter.linear_layers)), heads=heads)
    nb = adapter.num_blocks
    steps = tuple({"cond": (1 if skip else 0,) * nb} for skip in skipped)
    return Plan(architecture=adapter.architecture, num_blocks=nb, linear_layers=tuple(adapter.linear_layers),
                attention_sites=tuple(sites), variants=(computed, SKIP), steps=steps, stack_extrapolation="linear",
                predicted={"e2e_flux": f"fixed plan: Wan test-bed TDC step schedule, arrow band {band}, every block "
                                       f"linear {linear_format.upper()}"})


@torch.no_grad()
def run_ditbake(args, cfg, latent, text_len, dev, dtype, inputs, report) -> None:
    from ditbake.exporter.adapters import adapter_for
    from ditbake.exporter.build import build
    from ditbake.runtime import load
    from ditbake.runtime.artifact import Profile

    name = f"ditbake {args.backend}"
    if report.over_budget(name):
        return
    model = random_flux(cfg, dev, dtype)
    adapter = adapter_for(model)
    bf16_bytes = sum(p.numel() * 2 for p in model.parameters())
    visual = latent[1] * latent[2] // 4
    skipped = skip_schedule(args.source_plan, args.steps)
    plan = ditbake_plan(adapter, skipped, args.band, args.head_precision, visual, args.linear_format)
    t0 = time.perf_counter()
    path = build(adapter, plan, args.artifact, profiles=[Profile("e2e", latent, text_len)], samplers=["flow_euler"],
                 dtype=dtype, backend=args.backend, device=dev.type, label="FLUX.1-dev architecture (random weights)",
                 progress=False, force=True)
    build_s = time.perf_counter() - t0
    del model, adapter
    release(dev)
    t0 = time.perf_counter()
    session = load(path, device=dev)
    common_load_s = time.perf_counter() - t0
    artifact_bytes = sum(f["bytes"] for f in session.artifact.manifest["files"].values())
    x, text, pooled, _ = inputs
    common = {"plan": {"skipped_steps": [i for i, s in enumerate(skipped) if s], "skip_fraction": sum(skipped) / len(skipped),
                       "band": args.band, "head_precision": args.head_precision, "linear_format": args.linear_format,
                       "stack_extrapolation": "linear"},
              "bf16_weight_bytes": bf16_bytes, "backend": args.backend, "load_s": common_load_s}

    def timed(row_name, linears, build_s):
        if session._graphs is not None:  # aoti: one whole generate captures every step's CUDA graph first
            session.generate(text, latents=x, pooled_embeds=pooled, guidance_scale=1.0, guidance=args.guidance)
        else:  # eager: one computed forward (kernel JIT) and the timed generate is steady from its first step
            state = session.new_state()
            extras = session._extras(text.to(dev, session.dtype), pooled, args.guidance, "pooled_embeds")
            t = torch.full((1,), 1000.0, device=dev)
            session.forward_once(state, 0, "cond", x.to(dev, session.dtype), t, text.to(dev, session.dtype), extras)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        timer = StepTimer(dev)
        result = session.generate(text, latents=x, pooled_embeds=pooled, guidance_scale=1.0, guidance=args.guidance,
                                  progress=timer.wrap)
        r = result.report
        nb = session.plan.num_blocks
        weight_bytes = sum(v.numel() * v.element_size() for v in session.weights.values())
        row = {**summary(timer.step_ms(), args.steps, dev), "forwards_computed": r.block_computes // nb,
               "skip_fraction": r.skip_fraction, "attention_flops_fraction": r.attention_flops_fraction,
               "weight_bytes": weight_bytes, "weight_ratio_vs_bf16": bf16_bytes / weight_bytes,
               "quantized_linears": linears, "build_s": build_s, "cuda_graphs": session._graphs is not None,
               "graph_captures": r.graph_captures, "graph_replays": r.graph_replays, **common}
        report.add(row_name, row)

    timed(name, f"every block linear of both block kinds, {args.linear_format.upper()} W8A8", build_s)
    report.rows[name]["artifact_bytes"] = artifact_bytes


# ---------------------------------------------------------------- report

def summary(step_ms: list[float], steps: int, device) -> dict:
    """Median and total; a subset of steps is extrapolated to all `steps` (and said so)."""
    out = {"step_ms_median": statistics.median(step_ms), "timed_steps": len(step_ms), "step_ms": step_ms,
           "total_s": sum(step_ms) / len(step_ms) * steps / 1e3}
    if len(step_ms) < steps:
        out["total_s_note"] = f"per-step time constant: {len(step_ms)} of {steps} steps timed, total = mean × {steps}"
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return out


class Report:
    def __init__(self, head: dict, out: Path, budget_s: float):
        self.head, self.rows, self.out, self.budget_s, self.t0 = head, {}, out, budget_s, time.perf_counter()

    def over_budget(self, name: str) -> bool:
        spent = time.perf_counter() - self.t0
        if self.budget_s and spent > self.budget_s:
            log.warning("%s skipped: %.0f s spent of the %.0f s budget", name, spent, self.budget_s)
            self.add(name, {"skipped": f"time budget: {spent:.0f} s of {self.budget_s:.0f} s spent before it"})
            return True
        return False

    def add(self, name: str, row: dict) -> None:
        self.rows[name] = row
        if "total_s" in row:
            log.info("%s: %.1f ms/step, %.2f s total, %d forwards", name, row["step_ms_median"], row["total_s"],
                     row["forwards_computed"])
        self.write()

    def result(self) -> dict:
        rows = self.rows
        eager = rows.get("diffusers eager", {}).get("total_s")
        comp = rows.get("diffusers torch.compile", {}).get("total_s")
        for row in rows.values():
            if "total_s" in row:
                row["speedup_vs_eager"] = eager / row["total_s"] if eager else None
                row["speedup_vs_compile"] = comp / row["total_s"] if comp else None
        out = {**self.head, "rows": rows}
        peers = [r["total_s"] for k, r in rows.items() if "Cache" in k and "total_s" in r]
        ours = next((r for k, r in rows.items() if k.startswith("ditbake") and "total_s" in r), None)
        if ours and peers:
            out["speedup_vs_best_cache_hook"] = min(peers) / ours["total_s"]
        return out

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(stamp(self.result()), indent=1))


def print_table(result: dict) -> None:
    print(f"{'contender':72s} {'ms/step':>8s} {'total s':>8s} {'× eager':>8s} {'fwds':>5s} {'peak GB':>8s} "
          f"{'weights GB':>10s} {'build s':>8s}")
    for name, r in result["rows"].items():
        if "total_s" not in r:
            print(f"{name:72s} {str(r)[:80]}")
            continue
        print(f"{name:72s} {r['step_ms_median']:8.1f} {r['total_s']:8.2f} {r['speedup_vs_eager'] or 0:8.2f} "
              f"{r['forwards_computed']:5d} {r.get('peak_memory_bytes', 0) / 1e9:8.2f} {r['weight_bytes'] / 1e9:10.2f} "
              f"{r.get('build_s', 0):8.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=("all", "peers", "ditbake"), default="all",
                    help="split across device calls: `ditbake` also times diffusers eager (the in-call baseline)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--timed-steps", type=int, default=0,
                    help="time only the first N steps of eager / compile (constant per step); 0: all")
    ap.add_argument("--guidance", type=float, default=3.5, help="FLUX.1-dev's distilled guidance scale (an input)")
    ap.add_argument("--fbc-threshold", type=float, default=0.08)
    ap.add_argument("--taylor-interval", type=int, default=2)
    ap.add_argument("--mag-threshold", type=float, default=0.06, help="MagCache threshold (diffusers' default)")
    ap.add_argument("--cache-warmup-steps", type=int, default=4,
                    help="warm-up steps before each cache hook's timed loop (the blocks are compiled already)")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--backend", choices=("eager", "aoti"), default="eager", help="ditbake build backend")
    ap.add_argument("--source-plan", default="benchmarks/results/e2e_source_plan.json",
                    help="plan whose per-step skip schedule (TDC, step granularity) ditbake's plan takes")
    ap.add_argument("--band", type=float, default=0.5, help="arrow band of every head, fraction of the image keys")
    ap.add_argument("--head-precision", default="bf16", choices=("bf16", "int8", "fp8t"))
    ap.add_argument("--linear-format", default="fp8", choices=("fp8", "int8"),
                    help="every block linear's W8A8 format (int8: the CUTLASS INT8 GEMMs on sm90)")
    ap.add_argument("--artifact", default="/tmp/e2e_flux_artifact")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="skip (and record) contenders not started within this many seconds; 0: no limit")
    ap.add_argument("--smoke", action="store_true", help="tiny Flux config on the CPU (checks the script)")
    ap.add_argument("--out", default="benchmarks/results/e2e_flux_h100.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.smoke:
        cfg, latent, text_len, dev, dtype = SMOKE_FLUX, SMOKE["flux"][1], SMOKE["flux"][2], torch.device("cpu"), torch.float32
    else:
        cfg, latent, text_len, dev, dtype = FLUX, FLUX_LATENT, FLUX_TEXT, torch.device("cuda"), torch.bfloat16
    head = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)", "torch": torch.__version__,
            "model": "FLUX.1-dev transformer architecture, random weights", "config": cfg, "latent": list(latent),
            "image_tokens": latent[1] * latent[2] // 4, "text_len": text_len, "steps": args.steps,
            "forwards_per_step": 1, "guidance": args.guidance, "cfg": "none (guidance-distilled)",
            "timed_steps_constant_contenders": min(args.timed_steps or args.steps, args.steps), "fidelity": FIDELITY,
            "method": "CUDA-event ms between step boundaries after a warm-up; forwards computed = calls of the last block",
            "schedule": "diffusers side: FluxPipeline's shifted sigmas (mu from the image tokens); ditbake: its baked "
                        "flow_euler table (shift 3); per-step cost does not depend on the sigmas, cache-hook decisions may"}
    report = Report(head, Path(args.out), args.budget_s)
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, *latent, generator=gen), torch.randn(1, text_len, cfg["joint_attention_dim"], generator=gen),
              torch.randn(1, cfg["pooled_projection_dim"], generator=gen), torch.full((1,), args.guidance))
    # ditbake first: its build is the longest part, and `--budget-s` then drops the cheaper peers last
    if args.phase in ("all", "ditbake"):
        run_ditbake(args, cfg, latent, text_len, dev, dtype, inputs, report)
        release(dev)
    if args.phase in ("all", "peers", "ditbake"):
        run_peers(args, cfg, latent, text_len, dev, dtype, inputs, report)
    report.write()
    print_table(report.result())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
