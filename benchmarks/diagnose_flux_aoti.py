"""Where Flux's aoti engines and the eager runtime part ways: a Flux architecture of a few blocks at
the race's size (2048², 16,896 tokens), built into an aoti artifact with the bf16 and the INT8-linear
variant, then prologue, every block and the epilogue run on the same inputs by both backends
(teacher-forced: each block gets the eager block's input), relative L2 per stage.

    python benchmarks/diagnose_flux_aoti.py --double 2 --single 2 --out $OUT/diagnose_flux_aoti.json
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from forward_race import FLUX, FLUX_LATENT, FLUX_TEXT, SMOKE, add_8bit_weights, contenders, flux_inputs, rel_err
from provenance import stamp

log = logging.getLogger("diagnose_flux_aoti")


@torch.no_grad()
def main(argv=None) -> int:
    from ditbake.exporter.build import build
    from ditbake.runtime import arch as runtime_arch, load
    from ditbake.runtime.artifact import Profile
    from ditbake.runtime.attention import AttentionRunner
    from ditbake.runtime.plan import Plan

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=2)
    p.add_argument("--rows", default="ditbake bf16,(a8) linears int8")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dev, dtype = (torch.device("cpu"), torch.float32) if args.smoke else (torch.device("cuda"), torch.bfloat16)
    cfg, latent, text_len = SMOKE["flux"] if args.smoke else (FLUX, FLUX_LATENT, FLUX_TEXT)
    cfg = dict(cfg, num_layers=args.double, num_single_layers=args.single)
    _, adapter, x, t, text, weights, prof, extras = flux_inputs(cfg, latent, text_len, dev, dtype)
    arch, config = adapter.arch, adapter.config
    add_8bit_weights(weights, arch, config)
    h0, ctx0 = arch.prologue(weights, config, x, t, text, prof, *extras)
    names = args.rows.split(",")
    everything = contenders(arch, config, 0.5, h0.shape[1] - text_len)
    variants = [everything[n] for n in names]
    plan = Plan(architecture=arch.NAME, num_blocks=adapter.num_blocks, linear_layers=tuple(adapter.linear_layers),
                attention_sites=tuple(sorted(adapter.attention_sites.items())), variants=tuple(variants),
                steps=tuple({"cond": (i,) * adapter.num_blocks} for i in range(len(names))))
    profile = Profile("race", tuple(latent), text_len)
    result = {"double": args.double, "single": args.single, "tokens": h0.shape[1], "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = build(adapter, plan, Path(tmp) / "aoti", profiles=[profile], samplers=["flow_euler"], dtype=dtype,
                     backend="aoti", device=dev.type, progress=False)
        engines = load(path, device=dev).engines
        ha, ctxa = engines.prologue(x, t, text, profile, extras)
        stages = {"prologue h": rel_err(ha, h0)}
        for key in ctx0:
            if isinstance(ctx0[key], torch.Tensor) and isinstance(ctxa.get(key), torch.Tensor):
                stages[f"prologue ctx[{key}]"] = rel_err(ctxa[key], ctx0[key])
        result["prologue"] = stages
        for vid, (name, variant) in enumerate(zip(names, variants)):
            rows, h = {}, h0
            for b in range(arch.num_blocks(config)):
                kind = runtime_arch.block_kind(arch, config, b)
                eager = arch.block(weights, config, b, h, ctx0, variant, AttentionRunner(None), "cond")
                aoti = engines.block(vid, variant, b, h, ctxa, AttentionRunner(None), "cond")
                rows[f"block {b} ({kind})"] = {"rel_err": rel_err(aoti, eager),
                                               "text_rel_err": rel_err(aoti[:, :text_len], eager[:, :text_len]),
                                               "image_rel_err": rel_err(aoti[:, text_len:], eager[:, text_len:])}
                h = eager
            rows["epilogue"] = {"rel_err": rel_err(engines.epilogue(h, ctxa), arch.epilogue(weights, config, h, ctx0))}
            result["rows"][name] = rows
            for stage, r in rows.items():
                print(f"{name:28s} {stage:22s} " + "  ".join(f"{k} {v:.2e}" for k, v in r.items()), flush=True)
    for stage, e in result["prologue"].items():
        print(f"{'prologue':28s} {stage:22s} rel_err {e:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(stamp(result), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
