"""How local is the self-attention of the trained Wan test beds? Mass in bands and 3D windows.

    .venv/bin/python benchmarks/attention_locality.py --model artifacts/testbed-wan16k --model artifacts/testbed-wan

For each bed: held-out captions (the first and the middle one of its held-out split, seed 0), the
ground-truth render noised to the flow time t of chosen steps of the 20-step flow-Euler schedule
(shift 3) with `flow.training_pair` — what the sampler's x_t looks like at that noise level,
without integrating a trajectory — and one conditional (CFG cond branch) forward per step with
every self-attention captured (`exporter.attention_locality`). For `--queries` query tokens per
head drawn uniformly over the clip, the full softmax rows give the mass inside arrow bands, 3D
windows, the local3d tile bands and per frame distance, averaged over queries and prompts.
Writes benchmarks/results/attention_locality.json (merged per bed; under $OUT when set) and
attention_locality.png beside it. CPU cost at 2,048 queries: about 11 CPU-min for the 16k bed,
1 for the 2k bed (two prompts, three steps); on a GPU `--device cuda --queries 16384` measures
every query.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from ditbake.exporter.attention_locality import Windows, capture_self_attention, sample_queries, site_masses
from ditbake.exporter.testbed import data, flow
from ditbake.exporter.testbed.models import data_spec_of
from ditbake.exporter.testbed.train import load_embeds, load_model
from provenance import provenance  # benchmarks/ is the script's directory

log = logging.getLogger("benchmarks.attention_locality")
RESULTS = Path(__file__).parent / "results"
SCHEDULE_STEPS = 20
HEADLINE = ("band_0.125", "band_0.25", "win_t3_hw7", "win_t1_hwall", "win_tall_hw1", "local3d_2x8x8_0.0625")


def sigmas(steps: int = SCHEDULE_STEPS) -> torch.Tensor:
    """The flow-Euler sampler's σ per step (flow.euler_sample)."""
    return flow.shift_sigmas(torch.linspace(1.0, 1.0 / steps, steps))


def measure_bed(model_dir: Path, embeds: Path, steps: list[int], queries: int, prompts: int, seed: int,
                device: torch.device, chunk: int) -> dict:
    spec = data_spec_of(model_dir)
    model = load_model(model_dir).to(device).eval()
    config = dict(model.config)
    pf, ph, pw = config["patch_size"]
    grid = (spec.frames // pf, spec.height // ph, spec.width // pw)
    windows = Windows(grid)
    tokens, _ = load_embeds(embeds, spec.kind, device)
    held = data.held_out_ids(spec.kind, spec.held_out_rule)
    ids = [held[round(i * len(held) / prompts)] for i in range(prompts)]  # spread over the split
    gen = torch.Generator().manual_seed(seed)
    x0 = data.render(spec, data.scenes_from_ids(spec, torch.tensor(ids), gen)).to(device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    picked = sample_queries(windows.tokens, queries, seed).to(device)
    layers, heads = config["num_layers"], config["num_attention_heads"]
    names = windows.names()
    mass = {n: torch.zeros(len(steps), layers, heads, dtype=torch.float64) for n in names}
    frame_distance = torch.zeros(len(steps), layers, heads, grid[0], dtype=torch.float64)
    coverage: dict[str, float] = {}
    state = {"step": 0}

    def on_attention(layer, q, k, v, out):
        for b in range(q.shape[0]):  # [B, S, H, D] → [H, S, D] per prompt
            got = site_masses(q[b].transpose(0, 1), k[b].transpose(0, 1), picked, windows, chunk=chunk)
            for n in names:
                mass[n][state["step"], layer] += got.mass[n].cpu() / q.shape[0]
            frame_distance[state["step"], layer] += got.mass["frame_distance"].cpu() / q.shape[0]
            coverage.update({n: float(c) for n, c in got.coverage.items() if n != "frame_distance"})

    t_wall, t_cpu = time.perf_counter(), time.process_time()
    table = sigmas()
    cond = tokens[torch.tensor(ids, device=tokens.device)]
    with capture_self_attention(model, on_attention), torch.no_grad():
        for i, step in enumerate(steps):
            state["step"] = i
            t = torch.full((len(ids),), float(table[step]), device=device)
            x_t, _ = flow.training_pair(x0, noise, t)
            flow.model_velocity(model, "video", x_t, t, cond)
            log.info("%s: step %d (σ %.3f) measured, %.0f s", model_dir.name, step, float(table[step]),
                     time.perf_counter() - t_wall)
    r3 = lambda x: [[[round(float(v), 5) for v in h] for h in layer] for layer in x]  # noqa: E731
    return {
        "model": str(model_dir), "grid": list(grid), "tokens": windows.tokens, "layers": layers, "heads": heads,
        "head_dim": config["attention_head_dim"], "queries_per_head": queries, "query_sampling": "uniform without "
        "replacement over the clip's tokens, the same tokens for every head, layer, step and prompt",
        "prompts": [data.caption_from_attributes(spec.kind, data.attributes_of(spec.kind, i)) for i in ids],
        "caption_ids": ids, "seed": seed, "branch": "cond",
        "steps": [{"index": s, "sigma": round(float(table[s]), 4)} for s in steps],
        "windows": {"band_fractions": list(windows.band_fractions), "frame_extents": list(windows.frame_extents),
                    "side_extents": list(windows.side_extents), "tile": list(windows.tile),
                    "tile_fractions": list(windows.tile_fractions)},
        "coverage": {n: round(coverage[n], 5) for n in names},
        "mass": {n: [[[round(float(v), 5) for v in layer] for layer in step] for step in mass[n]] for n in names},
        "frame_distance": [r3(step) for step in frame_distance],
        "mean": {n: {"all": round(float(mass[n].mean()), 4),
                     "per_step": [round(float(m), 4) for m in mass[n].mean((1, 2))]} for n in names},
        "time_s": {"wall": round(time.perf_counter() - t_wall, 1), "cpu": round(time.process_time() - t_cpu, 1)},
    }


def frame_distance_share(grid, queries: int, seed: int) -> torch.Tensor:
    """Share of keys at each frame distance |Δf| from the sampled queries: the uniform baseline."""
    frames, rows, cols = grid
    fq = sample_queries(frames * rows * cols, queries, seed) // (rows * cols)
    distance = (torch.arange(frames)[None, :] - fq[:, None]).abs()
    return torch.stack([(distance == d).double().mean() for d in range(frames)])


def plot(results: dict, path: Path) -> Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    beds = sorted(results["beds"])
    fig, axes = plt.subplots(len(beds) + 1, 3, figsize=(13, 3.6 * (len(beds) + 1)), squeeze=False)
    for row, name in zip(axes, beds):
        bed = results["beds"][name]
        mid = len(bed["steps"]) // 2
        step = bed["steps"][mid]
        for ax, key, title in zip(row, ("band_0.125", "win_t3_hw7", "win_t1_hwall"),
                                  ("band ±12.5 % (25 % of keys)", "3D window 3 frames × 7 × 7", "own frame")):
            im = ax.imshow(torch.tensor(bed["mass"][key][mid]).numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{name}: {title}\nstep {step['index']} (σ {step['sigma']}); keys {bed['coverage'][key]:.1%}",
                         fontsize=9)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, fraction=0.046)
    ax_band, ax_win, ax_dist = axes[-1]
    for name in beds:
        bed = results["beds"][name]
        bands = [f"band_{f:g}" for f in bed["windows"]["band_fractions"]]
        ax_band.plot([bed["coverage"][b] for b in bands], [bed["mean"][b]["all"] for b in bands], "o-", label=name)
        wins = [f"win_t{t}_hw{s}" for t in ("3",) for s in ("1", "3", "7", "15", "all")]
        ax_win.plot([bed["coverage"][w] for w in wins], [bed["mean"][w]["all"] for w in wins], "s-",
                    label=f"{name}: 3 frames × side")
        own = [f"win_t1_hw{s}" for s in ("1", "3", "7", "15", "all")]
        ax_win.plot([bed["coverage"][w] for w in own], [bed["mean"][w]["all"] for w in own], "^--",
                    label=f"{name}: own frame × side")
        profile = torch.tensor(bed["frame_distance"]).mean((0, 1, 2))
        share = frame_distance_share(bed["grid"], bed["queries_per_head"], bed["seed"])
        ax_dist.plot(range(len(profile)), (profile / share).numpy(), "o-", label=name)
    ax_dist.axhline(1.0, color="k", ls=":", lw=0.8, label="no locality")
    for ax in (ax_band, ax_win):
        x = torch.logspace(-4, 0, 50).numpy()
        ax.plot(x, x, "k:", lw=0.8, label="no locality (mass = share of keys)")
        ax.set_xscale("log")
        ax.set_xlabel("share of keys inside")
        ax.set_ylabel("mean attention mass inside")
        ax.legend(fontsize=7)
    ax_band.set_title("diagonal bands (raster order)", fontsize=9)
    ax_win.set_title("3D windows", fontsize=9)
    ax_dist.set_title("mass at frame distance |Δf| ÷ share of keys there\n(mean of heads, layers, steps)", fontsize=9)
    ax_dist.set_yscale("log")
    ax_dist.set_xlabel("|Δf|")
    ax_dist.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, action="append", default=[], help="a test-bed directory (repeatable)")
    p.add_argument("--embeds", type=Path, default=Path("out/testbed"), help="directory of `train embed`'s table")
    p.add_argument("--steps", default="1,10,19", help=f"step indices of the {SCHEDULE_STEPS}-step schedule")
    p.add_argument("--queries", type=int, default=2048, help="query tokens per head")
    p.add_argument("--prompts", type=int, default=2, help="held-out captions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=512, help="queries per softmax block")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", RESULTS)) / "attention_locality.json",
                   help="JSON (merged per bed); the PNG goes beside it (default: $OUT if set, else benchmarks/results)")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return 0
    steps = [int(s) for s in args.steps.split(",")]
    if any(not 0 <= s < SCHEDULE_STEPS for s in steps):
        p.error(f"--steps must be indices in [0, {SCHEDULE_STEPS})")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"beds": {}}
    commit = provenance()["commit"] or "unknown"  # the code the run starts with
    for model_dir in args.model:
        name = model_dir.name.removeprefix("testbed-")
        bed = measure_bed(model_dir, args.embeds, steps, args.queries, args.prompts, args.seed,
                          torch.device(args.device), args.chunk)
        bed.update(commit=commit, device=args.device, torch=torch.__version__)
        results["beds"][name] = bed
        log.info("%s: %s", name, {k: bed["mean"][k]["all"] for k in HEADLINE if k in bed["mean"]})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
