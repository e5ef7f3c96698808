"""Fidelity of the forward-race configurations on the trained video test bed: each configuration
(every block linear FP8 W8A8; + 8-bit attention in every head; + arrow bands removing half the
attention FLOPs) run at every step, against the same model's 16-bit output, on held-out prompts
and seeds (PSNR / SSIM / temporal error from `ditbake eval`'s harness).

    python benchmarks/forward_fidelity.py --out benchmarks/results/forward_fidelity.json
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from forward_race import contenders  # benchmarks/ is the script's directory
from provenance import stamp  # benchmarks/ is the script's directory: commit + dirty flag in every JSON

log = logging.getLogger("forward_fidelity")


def main(argv=None) -> int:
    from ditbake.exporter import models
    from ditbake.exporter.adapters import adapter_for
    from ditbake.exporter.build import build
    from ditbake.exporter.evaluate import default_prompts, evaluate
    from ditbake.runtime.artifact import Profile
    from ditbake.runtime.plan import Plan

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="artifacts/testbed-wan")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=4, help="held-out test-bed captions")
    p.add_argument("--seeds", default="1234,777", help="comma-separated generation seeds")
    p.add_argument("--band", type=float, default=0.5)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--text-len", type=int, default=16)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dtype = getattr(torch, args.dtype)
    adapter = adapter_for(models.load(args.model, dtype=torch.float32))
    latent = adapter.latent_shape(args.frames, args.size, args.size)
    profile = Profile("fidelity", latent, args.text_len)
    layout = adapter.token_layout(latent, args.text_len)
    visual = layout.visual[1] - layout.visual[0]
    variants = contenders(adapter.arch, adapter.config, args.band, visual)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    prompts = default_prompts(args.prompts)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, variant in variants.items():
            plan = Plan(architecture=adapter.architecture, num_blocks=adapter.num_blocks,
                        linear_layers=tuple(adapter.linear_layers),
                        attention_sites=tuple(sorted(adapter.attention_sites.items())), variants=(variant,),
                        steps=tuple({"cond": (0,) * adapter.num_blocks} for _ in range(args.steps)))
            paths[name] = build(adapter, plan, Path(tmp) / str(len(paths)), profiles=[profile], samplers=["unipc"],
                                dtype=dtype, progress=False)
        reference = paths.pop("ditbake bf16")
        for name, path in paths.items():
            t0 = time.perf_counter()
            result = evaluate(path, reference, prompts=prompts, seeds=seeds, progress=False)
            rows[name] = {**result.summary(), "seconds": time.perf_counter() - t0}
            log.info("%-28s %s", name, {k: rows[name][k] for k in ("psnr", "ssim")})
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(rows, indent=1))  # survives a stop
    out = {"model": args.model, "dtype": args.dtype, "steps": args.steps, "prompts": prompts, "seeds": list(seeds),
           "band": args.band, "machine": "cpu (eager runtime; kernels' references)", "rows": rows,
           "method": "each configuration at every step and block vs the same model's 16-bit output (`ditbake eval`)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(stamp(out), indent=1))
    print(f"{'configuration':28s} {'PSNR dB':>8s} {'SSIM':>6s}")
    for name, row in rows.items():
        print(f"{name:28s} {row['psnr']:8.2f} {row['ssim']:6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
