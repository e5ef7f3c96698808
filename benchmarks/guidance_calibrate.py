"""Calibrated guidance skips on the 16k test bed: measure what a guidance skip costs at each eligible
step of a TDC plan (one skip at a time, on training captions and a calibration seed, with the
plan's numerics: every head in `--attn`), take the `--count` cheapest (exporter/plan_guidance.py),
and score that plan, the evenly spread one with the same count and the plan without guidance skips
on held-out captions and seeds (forward_fidelity.py --plan, vs the bed's bf16 output).

    python benchmarks/guidance_calibrate.py --device cuda --embeds .carry/fid16k/embeds.safetensors \
        --source-plan benchmarks/results/e2e_source_plan16k_b05.json --count 5 --out $OUT/guidance16k.json
    python benchmarks/guidance_calibrate.py --frames 2 --size 16 --steps-cap 8 --count 1 --calib-prompts 1 \
        --prompts 1 --seeds 1234 --out /tmp/g.json        # CPU smoke at a reduced shape

The calibration never sees the held-out captions or seeds that score it.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

import forward_fidelity  # benchmarks/ is the script's directory
from prompt_cache import TEXT_LEN, Embedder, train_captions
from provenance import stamp

log = logging.getLogger("guidance_calibrate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="artifacts/testbed-wan16k")
    p.add_argument("--device", default="cpu")
    p.add_argument("--embeds", help="caption-embedding cache (benchmarks/prompt_cache.py)")
    p.add_argument("--source-plan", default="benchmarks/results/e2e_source_plan16k_b05.json")
    p.add_argument("--count", type=int, default=5, help="guidance skips to place")
    p.add_argument("--start", type=int, default=5, help="first step a guidance skip may take")
    p.add_argument("--attn", default="int8", help="every head's precision while calibrating and scoring")
    p.add_argument("--calib-prompts", type=int, default=4, help="training captions to calibrate on")
    p.add_argument("--calib-seeds", default="42", help="calibration seeds (not the scoring ones)")
    p.add_argument("--prompts", type=int, default=4, help="held-out captions to score on")
    p.add_argument("--seeds", default="1234,777", help="held-out seeds to score on")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--frames", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--steps-cap", type=int, help="smoke runs: cut the source plan to its first N steps")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.calib_seed_list = [int(s) for s in args.calib_seeds.split(",") if s]
    if args.count < 1 or not args.calib_seed_list:
        p.error("--count must be at least 1 and --calib-seeds non-empty")
    return args


def run(args) -> dict:
    import dataclasses

    from ditbake.exporter import models
    from ditbake.exporter.adapters import adapter_for
    from ditbake.exporter.build import build
    from ditbake.exporter.plan_guidance import (add_guidance_skips, choose_guidance_steps, eligible_steps,
                                                guidance_step_errors)
    from ditbake.exporter.testbed.models import data_spec_of
    from ditbake.runtime import load
    from ditbake.runtime.artifact import Profile
    from ditbake.runtime.plan import Plan

    spec = data_spec_of(args.model)
    adapter = adapter_for(models.load(args.model, dtype=torch.float32))
    latent = adapter.latent_shape(args.frames or spec.frames, args.size or spec.height, args.size or spec.width)
    source = Plan.load(args.source_plan)
    if args.steps_cap:
        source = dataclasses.replace(source, steps=source.steps[:args.steps_cap])
    embed = Embedder(args.embeds)
    captions = train_captions(spec.kind, spec.held_out_rule, args.calib_prompts)
    text = embed(captions)
    negative = embed([""]).expand_as(text)
    device = torch.device(args.device)
    out = {"what": "guidance skips placed by measurement (one at a time on training captions) vs evenly spread, "
                   "same count, scored on held-out captions (exporter/plan_guidance.py)",
           "model": args.model, "source_plan": args.source_plan, "count": args.count, "attention": args.attn,
           "calibration_captions": captions, "calibration_seeds": args.calib_seed_list}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        calibrated_on = forward_fidelity.with_head_precision(source, args.attn)
        path = build(adapter, calibrated_on, Path(tmp) / "calib", profiles=[Profile("calib", latent, TEXT_LEN)],
                     samplers=["unipc"], dtype=torch.bfloat16, progress=False, label="guidance calibration")
        session = load(path, device=device)
        errors = guidance_step_errors(session, session.plan, args.calib_seed_list, start=args.start,
                                      guidance_scale=args.guidance, text_embeds=text.to(device, torch.bfloat16),
                                      negative_embeds=negative.to(device, torch.bfloat16))
        del session
    out["calibration_s"] = time.perf_counter() - t0
    out["step_errors"] = {str(i): e for i, e in errors.items()}
    chosen = choose_guidance_steps(errors, args.count)
    eligible = len(eligible_steps(source, args.start))  # the same count, evenly spread
    plans = {"calibrated": add_guidance_skips(source, start=args.start, at=chosen),
             "spread": add_guidance_skips(source, min(0.5, args.count / eligible), start=args.start),
             "no guidance skips": source}
    out["chosen"], out["spread"] = chosen, plans["spread"].predicted["guidance_skips"]
    log.info("step errors %s → chosen %s (spread %s)", {i: round(e, 4) for i, e in errors.items()}, chosen,
             out["spread"])
    out["rows"] = {}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, plan in plans.items():
            plan_path = Path(tmp) / f"{name.replace(' ', '_')}.json"
            plan.save(plan_path)
            argv = ["--model", args.model, "--device", args.device, "--plan", str(plan_path), "--plan-attn", args.attn,
                    "--only", f"every head {args.attn}", "--prompts", str(args.prompts), "--seeds", args.seeds,
                    "--guidance", str(args.guidance), "--out", str(Path(tmp) / f"{name}.fid.json")]
            argv += ["--embeds", args.embeds] if args.embeds else []
            argv += ["--frames", str(args.frames)] if args.frames else []
            argv += ["--size", str(args.size)] if args.size else []
            scored = forward_fidelity.run(forward_fidelity.parse_args(argv))
            (row,) = scored["rows"].values()
            out["rows"][name] = {**row, "guidance_skips": plan.predicted.get("guidance_skips", []),
                                 "forward_fraction": plan.predicted.get("forward_fraction", 1.0 - plan.skip_fraction())}
            out["held_out"] = {k: scored[k] for k in ("prompts", "seeds", "reference", "device")}
            Path(args.out).write_text(json.dumps(stamp(out), indent=1))
            if name == "calibrated":
                plan.save(Path(args.out).with_suffix(".plan.json"))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = run(args)
    print(f"{'plan':20s} {'PSNR dB':>8s} {'SSIM':>6s} {'forwards':>8s}  guidance skips")
    for name, r in out["rows"].items():
        print(f"{name:20s} {r.get('psnr_db', float('nan')):8.2f} {r.get('ssim', float('nan')):6.3f} "
              f"{r['forward_fraction']:8.2f}  {r['guidance_skips']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
