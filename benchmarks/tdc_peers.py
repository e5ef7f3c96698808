"""Temporal Delta Cache vs diffusers' own cache hooks on the very same model.

Every method runs the same prompts and seeds. The reference is the uncached diffusers pipeline.
For each method and threshold: fraction of block computations skipped (counted by hooks on
each block's feed-forward, which runs only when the block is computed) and fidelity of the
final output against the reference (PSNR, SSIM). ditbake's TDC is swept over its skip budget
and run through the ditbake runtime; the peers run through `transformer.enable_cache(...)`.

    python benchmarks/tdc_peers.py --model artifacts/testbed-wan --out benchmarks/results/tdc.json
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
from pathlib import Path

import torch

from provenance import stamp  # benchmarks/ is the script's directory: commit + dirty flag in every JSON

log = logging.getLogger("tdc_peers")


class BlockComputeCounter:
    """Counts block computations through a hook on the last linear of each block's feed-forward.

    diffusers' cache hooks replace a module's `forward`, so pre-hooks on the module they wrap
    still fire when it is skipped; the innermost linear runs only when the block really computes.
    """

    def __init__(self, adapter):
        self.count = 0
        self.handles = []
        for block in adapter.block_modules():
            ff = block.ffn if hasattr(block, "ffn") else block.ff
            self.handles.append(ff.net[2].register_forward_pre_hook(self._hit))

    def _hit(self, *_):
        self.count += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def pipeline_for(adapter, scheduler):
    import diffusers

    cls = diffusers.WanPipeline if adapter.architecture == "wan" else diffusers.CogVideoXPipeline
    pipe = cls(tokenizer=None, text_encoder=None, transformer=adapter.model, vae=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(adapter, sampler, steps, latents, embeds, negative, guidance, shape_kwargs):
    from ditbake.exporter.sampler import make_scheduler

    pipe = pipeline_for(adapter, make_scheduler(sampler, adapter.architecture))
    counter = BlockComputeCounter(adapter)
    try:
        out = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents.clone(),
                   num_inference_steps=steps, guidance_scale=guidance, output_type="latent", **shape_kwargs).frames
    finally:
        counter.remove()
    total = steps * (2 if guidance > 1 else 1) * adapter.num_blocks
    return out.float(), 1.0 - counter.count / total


def mag_ratios(adapter, run):
    """MagCache needs per-step magnitude ratios: run its calibration mode once, capture its log."""
    import diffusers

    captured = []

    class Grab(logging.Handler):
        def emit(self, record):
            m = re.search(r"MagCache Calibration Results: (\[.*\])", record.getMessage())
            if m:
                captured.append(json.loads(m.group(1)))

    logger = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level = Grab(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        adapter.model.enable_cache(diffusers.MagCacheConfig(calibrate=True, num_inference_steps=run["steps"]))
        run["call"]()
    finally:
        adapter.model.disable_cache()
        logger.removeHandler(handler)
        logger.setLevel(level)
    if not captured:
        raise RuntimeError("MagCache calibration produced no ratios")
    return captured[-1]


def peer_config(family: str, knob, steps: int, ratios=None):
    """The diffusers cache config of one peer point: FirstBlockCache(threshold), MagCache(threshold, with
    calibrated per-step ratios), TaylorSeerCache(interval)."""
    import diffusers

    if family == "FirstBlockCache":
        return diffusers.FirstBlockCacheConfig(threshold=float(knob))
    if family == "MagCache":
        if ratios is None:
            raise ValueError("MagCache needs calibrated magnitude ratios (mag_ratios)")
        return diffusers.MagCacheConfig(threshold=float(knob), mag_ratios=ratios, num_inference_steps=steps)
    if family == "TaylorSeerCache":
        # whole blocks predicted (the default predicts attention outputs only, no block skip)
        return diffusers.TaylorSeerCacheConfig(cache_interval=int(knob), disable_cache_before_step=2,
                                               taylor_factors_dtype=torch.float32,
                                               cache_identifiers=[r"^(blocks|transformer_blocks)\.\d+$"])
    raise ValueError(f"unknown cache family {family!r}")


def peer_configs(steps: int, ratios):
    knobs = [("FirstBlockCache", t) for t in (0.02, 0.05, 0.1, 0.2, 0.4)]
    if ratios is not None:
        knobs += [("MagCache", t) for t in (0.02, 0.06, 0.12, 0.25)]
    knobs += [("TaylorSeerCache", interval) for interval in (2, 3, 4)]
    return [(family, knob, peer_config(family, knob, steps, ratios)) for family, knob in knobs]


def main(argv=None) -> int:
    from ditbake.exporter import build as builder, calibrate as cal, models
    from ditbake.exporter.adapters import adapter_for
    from ditbake.exporter.evaluate import default_prompts, psnr, ssim, to_frames
    from ditbake.exporter.plan_cache import CacheConfig
    from ditbake.exporter.planner import plan_from_calibration
    from ditbake.runtime import load
    from ditbake.runtime.artifact import Profile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="artifacts/testbed-wan")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="unipc")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--calib-prompts", type=int, default=4)
    p.add_argument("--eval-prompts", type=int, default=4)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--budgets", default="0.1,0.2,0.3,0.4,0.5")
    p.add_argument("--max-runs", default="2", help="comma list of TDC max consecutive skips to sweep")
    p.add_argument("--granularities", default="block", help="comma list: block, step")
    p.add_argument("--metrics", default="relative", help="comma list of TDC metrics to sweep (relative, residual)")
    p.add_argument("--extrapolations", default="none",
                   help="comma list: none, linear (whole-step skips only, so swept with step granularity)")
    p.add_argument("--no-peers", action="store_true", help="ditbake TDC only (with the uncached reference)")
    p.add_argument("--pdr-bits", type=float, default=None,
                   help="also run TDC on top of a mixed-precision plan at this average activation bit budget, "
                        "with and without Purified Delta Refresh")
    p.add_argument("--pdr-budgets", default="0.0,0.2,0.3,0.4")
    p.add_argument("--no-tdc-sweep", action="store_true", help="skip the plain TDC sweep")
    p.add_argument("--out", default="benchmarks/results/tdc.json")
    p.add_argument("--plot", default="benchmarks/results/tdc.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--embeds", default=None, help="cache of the prompt embeddings (.pt): read when it exists, "
                   "written otherwise; lets a machine without the text encoder package run the sweep")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)

    adapter = adapter_for(models.load(args.model).to(args.device))
    latent = adapter.latent_shape(args.frames, args.size, args.size)
    text_dim = int(adapter.config.get("text_dim", adapter.config.get("text_embed_dim")))
    text_len = 16
    if args.embeds and Path(args.embeds).is_file():
        cached = torch.load(args.embeds)
        calib_embeds, eval_embeds, negative, prompts_note = (cached["calib"][:args.calib_prompts], cached["eval"],
                                                             cached["negative"], cached["note"])
    elif text_dim == 384:  # the test-bed models: real captions through the shipped text encoder
        from ditbake.exporter.testbed import data
        from ditbake.runtime.text_encoder import TextEncoder

        encoder = TextEncoder.load(max_length=text_len)
        train = [c for i, c in enumerate(data.all_captions("video")) if not data.is_held_out(i)]
        calib_embeds = encoder.encode([train[(k * 97) % len(train)] for k in range(args.calib_prompts)])
        eval_embeds = encoder.encode(default_prompts(args.eval_prompts))
        negative = encoder.encode([""])
        prompts_note = "held-out test-bed captions (calibration on training captions), MiniLM embeddings"
    else:
        calib_embeds = cal.random_prompt_embeds(args.calib_prompts, text_len, text_dim, seed=1)
        eval_embeds = cal.random_prompt_embeds(args.eval_prompts, text_len, text_dim, seed=2)
        negative = torch.zeros(1, text_len, text_dim)
        prompts_note = "random prompt embeddings"
    if args.embeds and not Path(args.embeds).is_file():
        Path(args.embeds).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"calib": calib_embeds, "eval": eval_embeds, "negative": negative, "note": prompts_note}, args.embeds)
    dev = torch.device(args.device)
    calib_embeds, eval_embeds, negative = calib_embeds.to(dev), eval_embeds.to(dev), negative.to(dev)

    shape_kwargs = (dict(height=latent[2] * 8, width=latent[3] * 8, num_frames=(latent[1] - 1) * 4 + 1)
                    if adapter.architecture == "wan" else dict(height=latent[2] * 8, width=latent[3] * 8,
                                                               num_frames=(latent[0] - 1) * 4 + 1,
                                                               use_dynamic_cfg=False))
    noise = [torch.randn((1, *latent), generator=torch.Generator().manual_seed(100 + i)).to(dev)
             for i in range(args.eval_prompts)]

    def run_all(label):
        outs, skips = [], []
        for i in range(args.eval_prompts):
            o, s = run_pipeline(adapter, args.sampler, args.steps, noise[i], eval_embeds[i:i + 1], negative,
                                args.guidance, shape_kwargs)
            outs.append(o.cpu())
            skips.append(s)
        log.info("%s: skip %.3f", label, sum(skips) / len(skips))
        return outs, sum(skips) / len(skips)

    def fidelity(outs, refs):
        frames = [(to_frames(o[0], adapter.architecture), to_frames(r[0], adapter.architecture)) for o, r in zip(outs, refs)]
        ps = [min(psnr(o, r), 99.0) for o, r in frames]  # identical outputs count as 99 dB
        ss = [ssim(o, r) for o, r in frames]
        return sum(ps) / len(ps), sum(ss) / len(ss)

    start = time.perf_counter()
    reference, _ = run_all("reference")
    results = {"model": args.model, "prompts": prompts_note, "steps": args.steps, "sampler": args.sampler,
               "guidance": args.guidance, "latent_shape": list(latent), "methods": {}}

    ratios = None
    try:
        if args.no_peers:
            raise RuntimeError("peers not requested")
        ratios = mag_ratios(adapter, {"steps": args.steps, "call": lambda: run_all("magcache-calibration")})
        results["mag_ratios"] = [float(r) for r in ratios]  # MagCache's skips depend only on these (e2e reuses them)
    except Exception as exc:  # MagCache may not support this model; record why
        results["magcache_error"] = f"{type(exc).__name__}: {exc}"
        log.warning("MagCache unavailable: %s", exc)
    for name, knob, config in ([] if args.no_peers else peer_configs(args.steps, ratios)):
        try:
            adapter.model.enable_cache(config)
            outs, skip = run_all(f"{name}({knob})")
        except Exception as exc:
            results.setdefault("peer_errors", {})[f"{name}({knob})"] = f"{type(exc).__name__}: {exc}"
            log.warning("%s(%s) failed: %s", name, knob, exc)
            continue
        finally:
            adapter.model.disable_cache()
        psnr_db, ssim_value = fidelity(outs, reference)
        results["methods"].setdefault(name, []).append({"knob": knob, "skip_fraction": skip, "psnr_db": psnr_db,
                                                        "ssim": ssim_value})

    observers = []
    if args.pdr_bits is not None:
        from ditbake.exporter import calibrate_precision as cp

        observers.append(cp.observer_factory(cp.PrecisionObserverConfig()))
    stats = cal.calibrate(adapter, calib_embeds.cpu(), negative.cpu(), latent=latent, sampler=args.sampler, num_steps=args.steps,
                          guidance_scale=args.guidance, seed=7, source=args.model, progress=False, observers=observers)
    with tempfile.TemporaryDirectory() as tmp:
        sweep = [] if args.no_tdc_sweep else [(float(b), int(r), m, g, x) for g in args.granularities.split(",")
                                               for x in args.extrapolations.split(",")
                                               if x == "none" or g == "step"
                                               for m in args.metrics.split(",")
                                               for r in args.max_runs.split(",") for b in args.budgets.split(",")]
        for budget, max_run, metric, gran, extrap in sweep:
            plan = plan_from_calibration(stats.meta, tensors=stats.tensors,
                                         cache=CacheConfig(skip_budget=budget, max_run=max_run, metric=metric,
                                                           granularity=gran, extrapolate=extrap))
            path = builder.build(adapter, plan, Path(tmp) / f"tdc{budget}", profiles=[Profile("p", latent, text_len)],
                                 samplers=[args.sampler], dtype=torch.float32, progress=False)
            session = load(path, device=args.device)
            outs, skips = [], []
            for i in range(args.eval_prompts):
                r = session.generate(eval_embeds[i:i + 1], negative, guidance_scale=args.guidance, latents=noise[i])
                outs.append(r.latents.cpu())
                skips.append(r.report.skip_fraction)
            psnr_db, ssim_value = fidelity(outs, reference)
            label = "ditbake TDC" + ("" if max_run == 2 else f" max_run={max_run}") + (
                "" if metric == "relative" else f" ({metric})") + ("" if gran == "block" else " per step") + (
                "" if extrap == "none" else f", {extrap} extrapolation")
            results["methods"].setdefault(label, []).append(
                {"knob": budget, "tau": plan.predicted["tdc"]["tau"], "skip_fraction": sum(skips) / len(skips),
                 "psnr_db": psnr_db, "ssim": ssim_value})
            log.info("ditbake TDC budget %.2f: skip %.3f psnr %.2f ssim %.4f", budget, sum(skips) / len(skips),
                     psnr_db, ssim_value)
        if args.pdr_bits is not None:
            from ditbake.exporter.plan_precision import PrecisionConfig
            from ditbake.exporter.plan_quantized import quantized_plan

            results["pdr"] = {"avg_bits_target": args.pdr_bits, "with": {"points": []}, "without": {"points": []}}
            for budget in [float(b) for b in args.pdr_budgets.split(",")]:
                for pdr in (True, False):
                    plan = quantized_plan(stats.meta, stats.tensors, PrecisionConfig(avg_bits=args.pdr_bits),
                                          cache=CacheConfig(skip_budget=budget), pdr=pdr)
                    path = builder.build(adapter, plan, Path(tmp) / f"q{budget}{pdr}", profiles=[Profile("p", latent, text_len)],
                                         samplers=[args.sampler], dtype=torch.float32, progress=False)
                    session = load(path, device=args.device)
                    outs, skips = [], []
                    for i in range(args.eval_prompts):
                        r = session.generate(eval_embeds[i:i + 1], negative, guidance_scale=args.guidance,
                                             latents=noise[i])
                        outs.append(r.latents.cpu())
                        skips.append(r.report.skip_fraction)
                    psnr_db, ssim_value = fidelity(outs, reference)
                    point = {"skip_budget": budget, "skip_fraction": sum(skips) / len(skips), "psnr_db": psnr_db,
                             "ssim": ssim_value, "avg_activation_bits": plan.predicted.get("avg_activation_bits"),
                             "purified_variants": sum(v.purified for v in plan.variants)}
                    results["pdr"]["with" if pdr else "without"]["points"].append(point)
                    log.info("quantized %.1f bits + TDC %.2f, PDR %s: %s", args.pdr_bits, budget, pdr, point)
            for key in ("with", "without"):  # headline: the point nearest a 30 % skip
                pts = results["pdr"][key]["points"]
                results["pdr"][key].update(min(pts, key=lambda q: abs(q["skip_fraction"] - 0.3)))
    results["seconds"] = time.perf_counter() - start

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(stamp(results), indent=1))
    plot(results, args.plot)
    print(f"{'method':18s} {'knob':>8s} {'skip':>6s} {'PSNR dB':>8s} {'SSIM':>7s}")
    for name, points in results["methods"].items():
        for pt in points:
            print(f"{name:18s} {pt['knob']:>8} {pt['skip_fraction']:6.3f} {pt['psnr_db']:8.2f} {pt['ssim']:7.4f}")
    return 0


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in results["methods"].items():
        pts = sorted(points, key=lambda q: q["skip_fraction"])
        ax.plot([q["skip_fraction"] for q in pts], [min(q["psnr_db"], 60.0) for q in pts], marker="o", label=name)
    for key, style in (("with", "--"), ("without", ":")):
        pts = sorted(results.get("pdr", {}).get(key, {}).get("points", []), key=lambda q: q["skip_fraction"])
        if pts:
            ax.plot([q["skip_fraction"] for q in pts], [min(q["psnr_db"], 60.0) for q in pts], style, marker="s",
                    label=f"ditbake TDC + {results['pdr']['avg_bits_target']:g}-bit mixed, PDR {'on' if key == 'with' else 'off'}")
    ax.axvspan(0.3, 0.4, color="grey", alpha=0.15, label="target skip range")
    ax.set_xlabel("fraction of block computations skipped")
    ax.set_ylabel("PSNR vs uncached (dB, capped at 60)")
    ax.set_title(f"{results['model']}: {results['steps']} steps, {results['sampler']}, CFG {results['guidance']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
