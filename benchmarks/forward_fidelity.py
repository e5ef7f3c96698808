"""Fidelity of the forward-race configurations on the 16,384-token video test bed (issue 15 item 5):
each configuration of `forward_race.contenders()` ((a) every block linear FP8 W8A8, (a*) FP8 where
faster, (b) + 8-bit attention int8 / fp8t, (c) + half-the-keys bands, (c16) bf16 bands) run at every
step and block of a 20-step CFG generation, against the same model's 16-bit output, on held-out
captions (the bed's held-out rule, v2 for artifacts/testbed-wan16k) and seeds: PSNR / SSIM /
temporal error from `ditbake eval`'s harness (exporter/evaluate.py).

    python benchmarks/forward_fidelity.py --device cuda --embeds .carry/fid16k/embeds.safetensors \
        --prompts 3 --seeds 1234,777 --out $OUT/forward_fidelity16k_h100.json
    python benchmarks/forward_fidelity.py --device cuda --embeds .carry/fid16k/embeds.safetensors \
        --plan benchmarks/results/e2e_source_plan16k.json --plan-attn int8 --out $OUT/plan_fidelity.json
    python benchmarks/forward_fidelity.py --frames 2 --size 16 --steps 2 --prompts 1 --seeds 1234 \
        --only "\\(a\\) linears" --out /tmp/ff.json          # CPU smoke at a reduced shape

What "vs its 16-bit output" means here: the reference is an artifact of the race's own "ditbake
bf16" row (every linear bf16, dense SDPA attention), built and run in `--dtype` like the
contenders. With the default bfloat16 that is the model's 16-bit output, exactly what a user
switching the 8-bit formats off would get, and the race's speed rows run bf16 too; so each row's
PSNR is the cost of its 8-bit formats and bands alone. `--dtype float32` runs both in fp32 (the
JSON's "reference" says so): then the numbers also contain no bf16 rounding, but the Triton 8-bit
attention takes bf16/fp16 only, so its rows fail on the GPU. With bfloat16 one extra row,
"ditbake bf16 vs float32", scores the bf16 reference itself against the fp32 model: the floor
below which 8-bit formats cannot be told apart from bf16's own rounding.

Backend: eager (the runtime composing torch ops and the plugins' ops, every block of every step).
On CUDA the kernels run (Triton 8-bit / banded attention, FP8 GEMMs, cuDNN's FP8 SDPA for fp8t
when its native build loads); on the CPU the kernels' references (the numeric specifications).
A row whose kernel cannot run on this machine (a head dim without a kernel config, no cuDNN
build) is recorded with its error and the others go on. The JSON at `--out` is rewritten after
every row ("complete": false until the last), so a run cut short keeps its finished rows.

The GPU machine has no text encoder: `--embeds` is the caption cache benchmarks/prompt_cache.py
writes (held-out captions and the empty negative prompt); without it the bed's MiniLM encoder runs.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import re
import tempfile
import time
from pathlib import Path

import torch

from forward_race import contenders  # benchmarks/ is the script's directory
from prompt_cache import TEXT_LEN, Embedder, held_out_captions
from provenance import stamp  # commit + dirty flag in every JSON

log = logging.getLogger("forward_fidelity")
REFERENCE = "ditbake bf16"
FLOOR = "ditbake bf16 vs float32"
WEIGHT_STORAGES = ("8bit", "nvfp4", "nvfp4-gptq")  # --weights: how the 8-bit layers are stored


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="artifacts/testbed-wan16k", help="test-bed directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where every generation runs")
    p.add_argument("--embeds", help="caption-embedding cache (benchmarks/prompt_cache.py); else the text encoder")
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=3, help="held-out captions (the bed's rule)")
    p.add_argument("--seeds", default="1234,777", help="comma-separated seeds: every prompt runs each")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--sampler", default="unipc")
    p.add_argument("--band", type=float, default=0.5, help="fraction of the keys a (c) row's band keeps")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="reference and contenders (module docstring)")
    p.add_argument("--only", help="regex: score only the rows whose name matches (as forward_race.py)")
    p.add_argument("--plan", help="score this plan JSON of the bed (its steps, skips, precisions) instead of the "
                                  "race's configurations: as stored, and with every head in each --plan-attn format")
    p.add_argument("--plan-attn", default="int8", help="comma-separated attention precisions for --plan's extra rows")
    p.add_argument("--weights", default="8bit",
                   help="comma-separated weight storages each row is scored with: 8bit (the 8-bit layers store 8-bit "
                        "weights), nvfp4 (they store NVFP4, rounded to nearest, loaded as 8-bit), nvfp4-gptq (the "
                        "same rounded by GPTQ on --gptq-prompts training captions)")
    p.add_argument("--gptq-prompts", type=int, default=4, help="training captions GPTQ's statistics come from")
    p.add_argument("--frames", type=int, help="override the bed's frames (reduced-shape smoke runs)")
    p.add_argument("--size", type=int, help="override the bed's height and width (reduced-shape smoke runs)")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.steps < 1:
        p.error("--prompts and --steps must be at least 1")
    try:
        args.seed_list = tuple(int(s) for s in args.seeds.split(",") if s)
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not args.seed_list:
        p.error("--seeds needs at least one seed")
    args.weight_list = tuple(w for w in args.weights.split(",") if w)
    if not args.weight_list or set(args.weight_list) - set(WEIGHT_STORAGES):
        p.error(f"--weights takes a comma-separated subset of {WEIGHT_STORAGES}, got {args.weights!r}")
    if args.gptq_prompts < 1:
        p.error("--gptq-prompts must be at least 1")
    return args


def single_variant_plan(adapter, variant, steps: int):
    """Every block of every step and both CFG branches run `variant`."""
    from ditbake.runtime.plan import Plan

    ids = (0,) * adapter.num_blocks
    return Plan(architecture=adapter.architecture, num_blocks=adapter.num_blocks,
                linear_layers=tuple(adapter.linear_layers), attention_sites=tuple(sorted(adapter.attention_sites.items())),
                variants=(variant,), steps=tuple({"cond": ids, "uncond": ids} for _ in range(steps)))


def with_head_precision(plan, precision: str):
    """``plan`` with every head of every computed variant in ``precision`` (schemes unchanged)."""
    import dataclasses

    def heads(v):
        return tuple((site, tuple(dataclasses.replace(h, precision=precision) for h in schemes)) for site, schemes in v.heads)
    return dataclasses.replace(plan, variants=tuple(dataclasses.replace(v, heads=heads(v)) if v.compute else v
                                                    for v in plan.variants))


def finite(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def run(args) -> dict:
    from ditbake.exporter import models
    from ditbake.exporter.adapters import adapter_for
    from ditbake.exporter.build import build
    from ditbake.exporter.evaluate import evaluate
    from ditbake.exporter.testbed.models import data_spec_of
    from ditbake.runtime.artifact import WEIGHTS, Profile

    dtype = getattr(torch, args.dtype)
    spec = data_spec_of(args.model)
    adapter = adapter_for(models.load(args.model, dtype=torch.float32))
    latent = adapter.latent_shape(args.frames or spec.frames, args.size or spec.height, args.size or spec.width)
    profile = Profile("fidelity", latent, TEXT_LEN)
    layout = adapter.token_layout(latent, TEXT_LEN)
    visual = layout.visual[1] - layout.visual[0]
    variants = contenders(adapter.arch, adapter.config, args.band, visual)
    reference_variant = variants.pop(REFERENCE)
    plans = {}  # name -> a whole plan (--plan): its own steps, skips and precisions
    if args.plan:
        from ditbake.runtime.plan import Plan

        source = Plan.load(args.plan)
        args.steps = source.num_steps
        plans[f"plan {Path(args.plan).name}"] = source
        for fmt in filter(None, args.plan_attn.split(",")):
            plans[f"plan {Path(args.plan).name}, every head {fmt}"] = with_head_precision(source, fmt)
        variants = {}
    names = list(variants) + list(plans) + ([FLOOR] if args.dtype == "bfloat16" and not plans else [])
    if args.only:
        names = [n for n in names if re.search(args.only, n)]
    # row → (the configuration it scores, its weight storage); rows beyond 8bit get a suffix
    storage = {n: (n, "8bit") for n in names}
    storage.update({f"{n} [weights {w}]": (n, w) for n in names if n != FLOOR for w in args.weight_list if w != "8bit"})
    names = [n for n, (_, w) in storage.items() if "8bit" in args.weight_list or w != "8bit" or n == FLOOR]
    prompts = held_out_captions(spec, args.prompts)
    embed = Embedder(args.embeds)
    embeds = embed(prompts)
    embeddings = (embeds, embed([""]).expand_as(embeds))
    device = torch.device(args.device)
    rows: dict = {}
    out = {"what": "forward-race configurations (benchmarks/forward_race.py contenders) vs the same model's "
                   f"{'16-bit' if args.dtype == 'bfloat16' else 'float32'} output on held-out captions (issue 15 item 5)",
           "model": args.model, "latent_shape": list(latent), "tokens": visual, "held_out_rule": spec.held_out_rule,
           "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance, "band": args.band,
           "dtype": args.dtype, "prompts": prompts, "seeds": list(args.seed_list),
           "weight_storages": list(args.weight_list), "gptq_prompts": args.gptq_prompts,
           "reference": f"an artifact of the '{REFERENCE}' row (bf16 linears, dense SDPA attention) built and run in "
                        f"{args.dtype}, same prompts, seeds and sampler; row '{FLOOR}' instead scores that bf16 "
                        "artifact against the same plan in float32",
           "backend": "eager", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "numerics": "CUDA kernels" if device.type == "cuda" else "the kernels' CPU references",
           "embeddings": f"cache {args.embeds}" if args.embeds else "the bed's text encoder",
           "complete": False, "rows": rows}

    def write():
        Path(args.out).write_text(json.dumps(stamp(out), indent=1))

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write()
    with tempfile.TemporaryDirectory() as tmp:
        count = itertools.count()

        hessians = {}

        def built(name: str, variant, build_dtype) -> Path:
            base, weights = storage.get(name, (name, "8bit"))
            plan = plans[base] if base in plans else single_variant_plan(adapter, variant, args.steps)
            if weights == "nvfp4-gptq" and not hessians:
                hessians.update(gptq_statistics(adapter, args, spec, embed, latent, device))
            return build(adapter, plan, Path(tmp) / f"a{next(count)}", profiles=[profile], samplers=[args.sampler],
                         dtype=build_dtype, progress=False, label=name,
                         weight_storage="8bit" if weights == "8bit" else "nvfp4",
                         hessians=hessians if weights == "nvfp4-gptq" else None)

        reference = built(REFERENCE, reference_variant, dtype)
        for name in names:
            t0 = time.perf_counter()
            try:
                if name == FLOOR:
                    path, ref = reference, built(FLOOR, reference_variant, torch.float32)
                else:
                    path, ref = built(name, variants.get(storage[name][0]), dtype), reference
                r = evaluate(path, ref, prompts=prompts, seeds=args.seed_list, guidance_scale=args.guidance,
                             sampler=args.sampler, progress=False, device=device, embeddings=embeddings)
                s = r.summary()
                rows[name] = {"psnr_db": finite(s["psnr"]), "ssim": s["ssim"], "temporal_error": s["temporal_error"],
                              "psnr_min_db": finite(min(x.psnr for x in r.samples)),
                              "ssim_min": min(x.ssim for x in r.samples),
                              "attention_flops_fraction": r.attention_flops_fraction,
                              "avg_activation_bits": r.avg_activation_bits,
                              "seconds_per_generation": r.seconds_compressed / len(r.samples),
                              "weight_storage": storage[name][1],
                              "weight_file_bytes": (path / WEIGHTS).stat().st_size,
                              "seconds": time.perf_counter() - t0}
            except Exception as exc:  # noqa: BLE001 - one row's kernel failing must not hide the others
                rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:600]}", "seconds": time.perf_counter() - t0}
                log.exception("%s failed", name)
            log.info("%-36s %s", name, rows[name])
            write()  # a run cut short keeps its finished rows
    out["complete"] = True
    write()
    return out


def gptq_statistics(adapter, args, spec, embed, latent, device) -> dict:
    """GPTQ's per-layer input statistics from the bed's real sampler on training captions (never the
    held-out ones scored here), on `device`; returned on the CPU for the build."""
    from ditbake.exporter.gptq import collect_hessians  # noqa: PLC0415
    from prompt_cache import train_captions  # noqa: PLC0415

    t0 = time.perf_counter()
    model = adapter.model.to(device)
    try:
        hessians = collect_hessians(adapter, embed(train_captions(spec.kind, spec.held_out_rule, args.gptq_prompts)),
                                    embed([""]), latent=latent, sampler=args.sampler, num_steps=args.steps,
                                    guidance_scale=args.guidance, progress=False)
    finally:
        model.to("cpu")
    log.info("GPTQ statistics of %d layers from %d training captions in %.1f s", len(hessians), args.gptq_prompts,
             time.perf_counter() - t0)
    return {k: v.cpu() for k, v in hessians.items()}


def table(out: dict) -> str:
    lines = [f"{'configuration':36s} {'PSNR dB':>8s} {'SSIM':>6s} {'SSIM min':>8s} {'temp err':>8s} {'s':>6s}"]
    for name, row in out["rows"].items():
        if "error" in row:
            lines.append(f"{name:36s} error: {row['error'][:100]}")
            continue
        psnr = row["psnr_db"] if isinstance(row["psnr_db"], float) else float(row["psnr_db"])
        lines.append(f"{name:36s} {psnr:8.2f} {row['ssim']:6.3f} {row['ssim_min']:8.3f} {row['temporal_error']:8.4f} "
                     f"{row['seconds']:6.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = run(args)
    print(table(out))  # the script's output: the table
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
