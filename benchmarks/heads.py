"""Head-wise attention (DiTFastAttnV2) on the shipped test beds: attention FLOPs vs fidelity.

    .venv/bin/python benchmarks/heads.py                       # both models, default deltas
    .venv/bin/python benchmarks/heads.py --models sd3 --deltas 0.05,0.2
    .venv/bin/python benchmarks/heads.py --quick    # the cheap point tests/benchmarks re-runs: heads.json "quick"

For each model and δ: the progressive calibration + MILP search (calibrate_heads) on training
captions, the plan (heads_pass), then generation through the ditbake eager runtime on held-out
captions with fixed seeds, against the same runtime with the uncompressed plan: attention FLOPs
reduction (counted by the runtime), PSNR and SSIM (exporter/evaluate.py), search wall time.
Ablation: arrow-only (no cached heads) vs arrow + caching (+ local3d windows for Wan).
Writes benchmarks/results/heads.json (merged per model) and benchmarks/results/heads_heatmap.png.
Clip sizes and held-out captions come from each bed's data spec (`testbed.json`: wan16k is
16×64×64 pixels with held-out rule v2).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ditbake.exporter import build as builder, models
from ditbake.exporter.adapters import adapter_for
from ditbake.exporter.calibrate_heads import calibrate_heads
from ditbake.exporter.evaluate import psnr, ssim, to_frames
from ditbake.exporter.plan_heads import VALIDATED, HeadsConfig, heads_pass
from ditbake.exporter.planner import plan_from_calibration
from ditbake.exporter.testbed import data
from ditbake.exporter.testbed.models import data_spec_of
from ditbake.runtime import load
from ditbake.runtime.artifact import Profile
from ditbake.runtime.text_encoder import TextEncoder

from provenance import stamp  # benchmarks/ is the script's directory: commit + dirty flag in every JSON

log = logging.getLogger("benchmarks.heads")
RESULTS = Path(__file__).parent / "results"
TEXT_LEN = 16
MODELS = {  # name → (model dir, sampler); clip kind, size and held-out rule from the bed's data spec
    "sd3": ("artifacts/testbed-sd3", "flow_euler"),
    "wan": ("artifacts/testbed-wan", "unipc"),
    "wan16k": ("artifacts/testbed-wan16k", "unipc"),
}
# The point tests/benchmarks/test_reports_reproduce.py re-runs (heads.json "quick"): the SD3 bed (272
# tokens: the Wan bed's 2,048 cost 50 s of CPU here), one δ, 3 steps, one calibration and one
# held-out caption, no ablation.
QUICK = ["--models", "sd3", "--deltas", "0.1", "--ablation-deltas", "", "--steps", "3", "--calibration-prompts", "1",
         "--eval-prompts", "1"]


def captions(kind: str, held_out: bool, n: int, rule: str = "v1") -> list[str]:
    ids = [i for i in range(data.num_captions(kind)) if data.is_held_out(i, rule) == held_out]
    picks = [ids[(k * len(ids)) // n] for k in range(n)]
    return [data.caption_from_attributes(kind, data.attributes_of(kind, i)) for i in picks]


CACHE_ONLY: str | None = None  # a prompt_cache.py file: its captions only (no encoder on the GPU machine)
EMBEDS: dict[str, torch.Tensor] = {}  # caption → [TEXT_LEN, D], filled from --embeds or the encoder


def encode(texts: list[str]) -> torch.Tensor:
    """Prompt embeddings through the shipped text encoder, or from a cache written on a machine
    that has it (the GPU host does not carry the encoder package: a .safetensors cache from
    benchmarks/prompt_cache.py fills EMBEDS in main, and a caption missing from it is an error there)."""
    if CACHE_ONLY and any(t not in EMBEDS for t in texts):
        from prompt_cache import Embedder  # noqa: PLC0415

        return Embedder(CACHE_ONLY)(texts)  # names the missing caption and the fix
    missing = [t for t in texts if t not in EMBEDS]
    if missing:
        encoded = TextEncoder.load(max_length=TEXT_LEN).encode(missing)
        EMBEDS.update(zip(missing, encoded))
    return torch.stack([EMBEDS[t] for t in texts])


def bench_model(name: str, deltas: list[float], ablation_deltas: list[float], steps: int, cal_prompts: int,
                eval_prompts: int, out_dir: Path, device: str = "cpu", seeds: list[int] | None = None,
                frames: int | None = None, size: int | None = None, partial: str | None = None) -> dict:
    """`frames` / `size` override the bed's clip size (a reduced shape for a CPU smoke run of a large
    bed); `seeds` the held-out seeds (default 0, 1, …, one per prompt); `partial`: a JSON rewritten with
    the points so far after each one (a run cut short by a time limit keeps them)."""
    src, sampler = MODELS[name]
    spec = data_spec_of(src)
    kind, rule = spec.kind, spec.held_out_rule
    model = models.load(src)
    model.register_to_config(_name_or_path=str(src))
    adapter = adapter_for(model.to(device))
    latent = adapter.latent_shape(frames or spec.frames, size or spec.height, size or spec.width)
    cal_text = encode(captions(kind, False, cal_prompts, rule))
    eval_caps = captions(kind, True, eval_prompts, rule)
    eval_text, negative = encode(eval_caps), encode([""])
    seeds = list(seeds) if seeds else list(range(len(eval_caps)))
    if len(seeds) < len(eval_caps):
        seeds = [seeds[k % len(seeds)] for k in range(len(eval_caps))]  # prompt k runs seed k mod len
    meta = {"architecture": adapter.architecture, "num_blocks": adapter.num_blocks,
            "linear_layers": list(adapter.linear_layers), "absent_linears": [list(p) for p in adapter.absent_linears],
            "attention_sites": adapter.attention_sites,
            "num_steps": steps, "branches": ["cond", "uncond"]}
    baseline = plan_from_calibration(meta)
    art = builder.build(adapter, baseline, out_dir / f"heads-{name}", profiles=[Profile("p", latent, TEXT_LEN)],
                        samplers=[sampler], dtype=torch.float32, progress=False, label=f"test-bed {name}")
    session = load(art, device=device)

    def generate_all(plan):
        session.plan = plan
        results = [session.generate(eval_text[i:i + 1], negative, seed=seeds[i], guidance_scale=5.0)
                   for i in range(len(eval_caps))]
        return results

    reference = generate_all(baseline)
    ref_frames = [to_frames(r.latents[0], adapter.architecture) for r in reference]
    base_cfg = replace(VALIDATED["sd3" if kind == "image" else "wan"], delta=1.0)
    points, ablation, searches = [], [], {}
    runs = [(d, True) for d in deltas] + [(d, False) for d in ablation_deltas]
    for delta, caching in runs:
        cfg = replace(base_cfg, delta=delta, caching=caching)
        start = time.perf_counter()
        tensors, heads_meta = calibrate_heads(adapter, cal_text, negative, latent=latent, sampler=sampler,
                                              num_steps=steps, guidance_scale=5.0, seed=0, config=cfg, progress=False)
        search_seconds = time.perf_counter() - start
        plan = plan_from_calibration(meta | {"heads": heads_meta}, passes=[heads_pass(tensors, heads_meta)])
        outs = generate_all(plan)
        done = sum(o.report.attention_flops_done for o in outs)
        dense = sum(o.report.attention_flops_dense for o in outs)
        frames = [to_frames(o.latents[0], adapter.architecture) for o in outs]
        point = {"delta": delta, "attention_flops_reduction": 1.0 - done / dense,
                 "psnr_db": float(np.mean([psnr(f, r) for f, r in zip(frames, ref_frames)])),
                 "ssim": float(np.mean([ssim(f, r) for f, r in zip(frames, ref_frames)])),
                 "search_seconds": search_seconds, "milp_seconds": heads_meta["search_seconds"],
                 "predicted_attention_flops_fraction": plan.predicted["attention_flops_fraction"],
                 "kind_fractions": plan.predicted["heads"]["kind_fractions"]}
        (points if caching else ablation).append(point)
        if caching:
            searches[delta] = (tensors, heads_meta)
        if partial:
            Path(partial).write_text(json.dumps({"model": name, "points": points, "ablation_arrow_only": ablation}, indent=1))
        print(f"{name} delta={delta:<6g} caching={caching!s:<5} attn FLOPs -{point['attention_flops_reduction']:.1%} "
              f"PSNR {point['psnr_db']:.2f} dB SSIM {point['ssim']:.4f} search {search_seconds:.0f} s "
              f"(MILP {point['milp_seconds']:.2f} s) kinds {point['kind_fractions']}", flush=True)
    return {"points": points, "ablation_arrow_only": ablation, "searches": searches,
            "setup": {"latent_shape": list(latent), "held_out_rule": rule, "steps": steps, "sampler": sampler, "guidance_scale": 5.0, "calibration_prompts": cal_prompts,
                      "eval_prompts": eval_caps, "seeds": seeds[:len(eval_caps)], "config": base_cfg.to_json(),
                      "machine": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda"
                      else f"CPU, {torch.get_num_threads()} threads (shared)", "torch": torch.__version__}}


def heatmap_data(delta: float, tensors: dict, meta: dict) -> dict:
    """What the heatmap draws, kept in heads.json so a later run of one model redraws both."""
    site = next(iter(meta["sites"]))
    return {"delta": delta, "site": site,
            "menu": [k if k in ("full", "cached") else f"{k} {l}" for k, l, _ in meta["sites"][site]["candidates"]],
            "choice_cond": tensors[f"heads_choice.{site}"][0].tolist()}  # [step][block][head]


def heatmap(searches: dict[str, dict], path: Path, steps_to_show=(0, 1, 5, 10, 19)) -> Path:
    """Chosen scheme per head (rows) and layer (columns) for a few steps, cond branch."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.colors import ListedColormap  # noqa: PLC0415

    rows = len(searches)
    fig, axes = plt.subplots(rows, len(steps_to_show), figsize=(3.0 * len(steps_to_show), 2.6 * rows), squeeze=False)
    for r, (name, info) in enumerate(searches.items()):
        delta, menu = info["delta"], info["menu"]
        choice = np.array(info["choice_cond"])  # cond: [step, block, head]
        cmap = ListedColormap(plt.get_cmap("tab10").colors[:len(menu)])
        for c, step in enumerate(s for s in steps_to_show if s < choice.shape[0]):
            ax = axes[r, c]
            im = ax.imshow(choice[step].T, cmap=cmap, vmin=-0.5, vmax=len(menu) - 0.5, aspect="auto")
            ax.set_title(f"{name} δ={delta:g} step {step}", fontsize=8)
            ax.set_xlabel("layer", fontsize=7)
            ax.set_ylabel("head", fontsize=7)
            ax.tick_params(labelsize=6)
        cbar = fig.colorbar(im, ax=list(axes[r]), ticks=range(len(menu)))
        cbar.ax.set_yticklabels(menu, fontsize=6)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def quick_point(args: argparse.Namespace) -> dict:
    """The QUICK configuration's one point (attention FLOPs removed, PSNR, SSIM), with its commit."""
    r = bench_model(args.models, [float(args.deltas)], [], args.steps, args.calibration_prompts, args.eval_prompts,
                    Path(args.out))
    point = {k: r["points"][0][k] for k in ("delta", "attention_flops_reduction", "psnr_db", "ssim")}
    return stamp({"args": QUICK, "model": args.models, "point": point})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="sd3,wan")
    p.add_argument("--deltas", default="0.05,0.1,0.2,0.4")
    p.add_argument("--ablation-deltas", default="0.1,0.4", help="arrow-only runs (no cached heads)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calibration-prompts", type=int, default=2)
    p.add_argument("--eval-prompts", type=int, default=2)
    p.add_argument("--heatmap-delta", type=float, help="δ whose schemes the heatmap shows (default: largest run)")
    p.add_argument("--out", default="artifacts/built")
    p.add_argument("--device", default="cpu", help="cpu or cuda: model, calibration and runtime session")
    p.add_argument("--seeds", default="", help="comma-separated held-out seeds, prompt k runs seed k mod len "
                   "(default 0, 1, … one per prompt)")
    p.add_argument("--frames", type=int, help="override the bed's frames (reduced-shape smoke runs)")
    p.add_argument("--size", type=int, help="override the bed's height and width (reduced-shape smoke runs)")
    p.add_argument("--partial", help="JSON rewritten with the points so far after each one")
    p.add_argument("--results", default=str(RESULTS), help="directory of heads.json and heads_heatmap.png")
    p.add_argument("--embeds", help="caption-embedding cache (.pt): read if present, written after the run")
    p.add_argument("--only-embeds", action="store_true", help="fill the --embeds cache for the models and stop")
    p.add_argument("--quick", action="store_true", help=f"run only the quick point ({' '.join(QUICK)}) and store it "
                   "as heads.json's \"quick\" entry (the rest of the file is kept)")
    return p


def main(argv=None) -> int:
    p = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.quick:
        args = p.parse_args([*argv, *QUICK])  # the quick point's settings win over any given
    if args.embeds and args.embeds.endswith(".safetensors"):  # benchmarks/prompt_cache.py (no pickle)
        global CACHE_ONLY
        from prompt_cache import load as load_cache  # noqa: PLC0415

        CACHE_ONLY = args.embeds
        EMBEDS.update(load_cache(args.embeds))
    elif args.embeds and Path(args.embeds).is_file():
        EMBEDS.update(torch.load(args.embeds))
    if args.only_embeds:
        for name in args.models.split(","):
            spec = data_spec_of(MODELS[name][0])
            encode(captions(spec.kind, False, args.calibration_prompts, spec.held_out_rule)
                   + captions(spec.kind, True, args.eval_prompts, spec.held_out_rule) + [""])
        torch.save(EMBEDS, args.embeds)
        return 0
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "heads.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.quick:
        results["quick"] = quick_point(args)
        path.write_text(json.dumps(results, indent=1))
        print(json.dumps(results["quick"]["point"]))
        return 0
    for name in args.models.split(","):
        deltas = [float(x) for x in args.deltas.split(",")]
        ablation = [float(x) for x in args.ablation_deltas.split(",") if x]
        seeds = [int(x) for x in args.seeds.split(",") if x]
        r = bench_model(name, deltas, ablation, args.steps, args.calibration_prompts, args.eval_prompts, Path(args.out),
                        device=args.device, seeds=seeds, frames=args.frames, size=args.size, partial=args.partial)
        d = args.heatmap_delta if args.heatmap_delta in r["searches"] else max(r["searches"])
        r["heatmap"] = heatmap_data(d, *r.pop("searches")[d])
        results[name] = stamp(r)  # models merged from earlier runs keep their own commit
        path.write_text(json.dumps(stamp(results), indent=1))
    heatmap({name: r["heatmap"] for name, r in results.items() if "heatmap" in r}, results_dir / "heads_heatmap.png")
    print(f"wrote {path} and {results_dir / 'heads_heatmap.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
