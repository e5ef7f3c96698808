"""The whole calibration pass at real size on one GPU, timed per phase: Γ/Δ base pass, DMPQ precision
statistics, progressive head search (forward, attention candidates, MILP), save.

    python benchmarks/calibrate_speed.py --steps 3 --prompts 4            # Wan2.1-1.3B arch, 480×832×81
    python benchmarks/calibrate_speed.py --testbed --steps 20 --prompts 4 # artifacts/testbed-wan, native shape
    python benchmarks/calibrate_speed.py --testbed artifacts/testbed-wan16k --steps 20 --prompts 4  # 16,384 tokens
    python benchmarks/calibrate_speed.py --tiny                           # tiny sizes on CPU: checks the script

The model is the Wan2.1-1.3B architecture (benchmarks/e2e.py's WAN_1_3B: 30 blocks, 12 heads × 128,
width 1536) with random weights, bf16, at 32,760 tokens; CFG 5 (two forwards per step), random
prompt embeddings [P, 512, 4096]. The calibration runs as `ditbake calibrate --device cuda
--precision-stats --heads-delta 0.1 --heads-tile 2,8,8` runs it (the exporter's API, phase by phase).

Only `--steps N` of the trajectory are run (one device command may take 10 minutes), and every
phase is extrapolated linearly to `--target-steps` (default 50): each prompt batch runs one
trajectory whose steps all cost the same (same shapes, same work), so a phase's time is
(fixed part) + steps × (per-step part); the fixed part (Triton compiles, cuDNN plans, allocator
growth) is taken out by a 1-step, 1-prompt warm-up of each phase before the timed runs, so the
extrapolation is measured × target / N. One known bias: step 0 of the head search has no cached
candidate, so that search step is a little cheaper (1 of N steps measured, 1 of 50 extrapolated).
The base pass is run twice, without and with the precision observer: the difference is the
precision statistics' cost (the CLI gathers both in one pass, whose time is what the totals use).
Writes JSON to --out (default $OUT/calibrate_speed.json when $OUT is set).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from e2e import SMOKE, WAN_1_3B  # benchmarks/ is the script's directory
from block_race import LATENT, TEXT_LEN
from provenance import stamp  # benchmarks/ is the script's directory: commit + dirty flag in every JSON

log = logging.getLogger("calibrate_speed")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _machine(device: torch.device) -> dict:
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    try:
        import triton  # noqa: PLC0415

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 1e9
    return info


def _model(args, device):
    from ditbake.exporter import models  # noqa: PLC0415
    from ditbake.exporter.adapters import adapter_for  # noqa: PLC0415

    if args.tiny:
        cfg, latent, text_len, dtype = SMOKE, (16, 3, 8, 8), 8, torch.float32
        model = models.from_config(dict(cfg, _class_name="WanTransformer3DModel"), seed=0, dtype=dtype)
        label = "Wan tiny smoke config (random weights)"
    elif args.testbed:
        from ditbake.exporter.testbed.models import data_spec_of  # noqa: PLC0415

        model = models.load(args.testbed, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        adapter = adapter_for(model)
        spec = data_spec_of(args.testbed)  # the bed's own clip size: 8×32×32 or 16×64×64 pixels
        latent = adapter.latent_shape(args.frames or spec.frames, args.height or spec.height, args.width or spec.width)
        text_len = args.text_len or 16
        label = f"test bed {args.testbed}"
    else:
        latent, text_len = LATENT, TEXT_LEN
        model = models.from_config(dict(WAN_1_3B, _class_name="WanTransformer3DModel"), seed=0, dtype=torch.bfloat16)
        label = "Wan2.1-1.3B architecture (random weights)"
    adapter = adapter_for(model.to(device).eval())
    return adapter, tuple(latent), text_len, label


def main(argv=None) -> int:
    from ditbake.exporter import calibrate as cal  # noqa: PLC0415
    from ditbake.exporter.calibrate_heads import calibrate_heads  # noqa: PLC0415
    from ditbake.exporter.calibrate_precision import (PrecisionObserverConfig, observer_factory,  # noqa: PLC0415
                                                      precision_report, scatter_plot)
    from ditbake.exporter.models import compute_dtype  # noqa: PLC0415
    from ditbake.exporter.plan_heads import VALIDATED, HeadsConfig  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="trajectory steps actually run")
    p.add_argument("--target-steps", type=int, default=50, help="steps the totals are extrapolated to")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--sampler", default="unipc")
    p.add_argument("--batch-size", type=int, help="base-pass prompts per forward (default: from free memory)")
    p.add_argument("--heads-delta", type=float, help="default: the validated Wan config (δ 0.1, tile 2,8,8)")
    p.add_argument("--no-split", action="store_true", help="skip the base-only pass that splits off precision")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on CPU, to check the script without a GPU")
    p.add_argument("--testbed", nargs="?", const="artifacts/testbed-wan", help="a shipped test bed at its native shape")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--text-len", type=int)
    p.add_argument("--device", help="default: cuda, cpu with --tiny")
    p.add_argument("--out", help="JSON path (default $OUT/calibrate_speed.json, else out/calibrate_speed.json)")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2: the precision report fits E_rel against the previous step's Γ")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = cal.calibration_device(args.device or ("cpu" if args.tiny else "cuda"))
    out = Path(args.out or Path(os.environ.get("OUT", "out")) / "calibrate_speed.json")

    begin = time.perf_counter()
    adapter, latent, text_len, label = _model(args, device)
    build_seconds = time.perf_counter() - begin
    text_dim = int(adapter.config["text_dim"])
    embeds = cal.random_prompt_embeds(args.prompts, text_len, text_dim, seed=0)
    heads_config = VALIDATED["wan"] if args.heads_delta is None else HeadsConfig(
        delta=args.heads_delta, local3d_tile=VALIDATED["wan"].local3d_tile)
    if args.tiny:
        heads_config = HeadsConfig(delta=0.1, local3d_tile=(1, 2, 2))
    precision = [observer_factory(PrecisionObserverConfig())]
    common = dict(latent=latent, sampler=args.sampler, guidance_scale=args.guidance, seed=0, progress=True)

    def base(steps, prompts, observers, batch_size=args.batch_size):
        return cal.calibrate(adapter, embeds[:prompts], None, num_steps=steps, source=label, observers=observers,
                             batch_size=batch_size, **common)

    def heads(steps, prompts):
        return calibrate_heads(adapter, embeds[:prompts], None, num_steps=steps, config=heads_config, **common)

    warmup = 0.0
    if not args.no_warmup:  # Triton/cuDNN compiles and allocator growth: the fixed part, not per step
        t0 = time.perf_counter()
        base(1, 1, precision, 1)
        heads(1, 1)
        _sync(device)
        warmup = time.perf_counter() - t0

    phases: dict[str, dict] = {}

    def timed(name, fn):
        _sync(device)
        _reset_peak(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        phases[name] = {"seconds": time.perf_counter() - t0, "peak_gb": _peak_gb(device)}
        return result

    if not args.no_split:
        timed("base_only", lambda: base(args.steps, args.prompts, []))
    stats = timed("base_and_precision", lambda: base(args.steps, args.prompts, precision))
    tensors, heads_meta = timed("head_search", lambda: heads(args.steps, args.prompts))
    stats.tensors.update(tensors)
    stats.meta["heads"] = heads_meta

    def save():
        with tempfile.TemporaryDirectory() as tmp:
            path = stats.save(Path(tmp) / "calibration")
            layers = tuple(stats.meta["linear_layers"])
            (path / "precision.json").write_text(json.dumps(precision_report(stats.tensors, layers), indent=1))
            try:
                scatter_plot(stats.tensors, layers, path / "precision_scatter.png", title=label)
            except ImportError:  # a GPU image without matplotlib: the timings matter more than the plot
                log.warning("no matplotlib: precision_scatter.png not drawn (save time without it)")

    timed("save", save)

    scale = args.target_steps / args.steps
    hs = phases["head_search"]["seconds"]
    split = {
        "base_pass": phases["base_only"]["seconds"] if "base_only" in phases else None,
        "precision_stats": (phases["base_and_precision"]["seconds"] - phases["base_only"]["seconds"]
                            if "base_only" in phases else None),
        "base_and_precision_pass": phases["base_and_precision"]["seconds"],
        "head_search_forward": hs - heads_meta["attention_seconds"] - heads_meta["search_seconds"],
        "head_search_candidates": heads_meta["attention_seconds"],
        "milp_solve": heads_meta["search_seconds"],
        "save": phases["save"]["seconds"],
    }
    total = phases["base_and_precision"]["seconds"] + hs + phases["save"]["seconds"]
    # saving (safetensors of a few MB, precision.json, one scatter plot) is a fixed cost: not scaled
    extrapolated = {k: None if v is None else (v if k == "save" else v * scale) for k, v in split.items()}
    total_extrapolated = (total - phases["save"]["seconds"]) * scale + phases["save"]["seconds"]
    result = {
        "what": "full calibration: Γ/Δ + DMPQ precision statistics in one pass, progressive head search, save",
        "machine": _machine(device), "model": label, "config": dict(adapter.config),
        "dtype": str(compute_dtype(adapter.model)), "latent": list(latent), "text_len": text_len,
        "tokens": sum(b - a for a, b in (adapter.token_layout(latent, text_len).text,
                                        adapter.token_layout(latent, text_len).visual)),
        "prompts": args.prompts, "cfg_branches": len(stats.meta["branches"]), "sampler": args.sampler,
        "base_prompt_batch_size": stats.meta["prompt_batch_size"], "heads_config": heads_config.to_json(),
        "heads_kernel": heads_meta["kernel"], "milp_solves": heads_meta["solves"],
        "milp_ms_per_solve": 1e3 * heads_meta["search_seconds"] / max(1, heads_meta["solves"]),
        "steps_measured": args.steps, "steps_target": args.target_steps,
        "model_build_seconds": build_seconds, "warmup_seconds": warmup,
        "phases_measured": phases,
        "split_measured_seconds": split,
        "split_extrapolated_seconds": extrapolated,
        "total_measured_seconds": total,
        "total_extrapolated_seconds": total_extrapolated,
        "total_extrapolated_minutes": total_extrapolated / 60,
        "extrapolation": (f"linear in steps: every phase but save × {args.target_steps}/{args.steps} (save is "
                          "a fixed cost); fixed costs (compiles, allocator) excluded by a 1-step 1-prompt warm-up "
                          "of each phase; head-search step 0 has no cached candidate (slightly cheaper), so the "
                          "extrapolation errs low by < 1 step's candidate share"),
        "peak_memory_gb": max((v["peak_gb"] or 0.0) for v in phases.values()) if device.type == "cuda" else None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamp(result), indent=1))
    log.info("calibration of %s, %d prompts × %d steps: %.1f s measured → %.1f min at %d steps (peak %s GB); %s",
             label, args.prompts, args.steps, total, total_extrapolated / 60, args.target_steps,
             result["peak_memory_gb"], out)
    for k, v in split.items():
        log.info("  %-24s %8s s measured  %8s s extrapolated", k, "-" if v is None else f"{v:.2f}",
                 "-" if v is None else f"{extrapolated[k]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
