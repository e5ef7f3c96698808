"""TDC quality vs skip budget at 5 % steps, per block and per step, with diffusers' caches beside it.

Held-out prompts and seeds (issue 18, item 2): captions composed from the test bed's vocabulary
that are in no project prompt list, one seed each. The reference is the uncached diffusers
pipeline; peers (FirstBlockCache, MagCache, TaylorSeer) run through `transformer.enable_cache`
with the knobs of `tdc_peers.py` whose skip fractions fall in the swept range. The run is split
into parts that can go in parallel processes (each writes CACHE/part_<name>.json); `report`
merges them into the JSON and the plot.

    python benchmarks/tdc_monotone.py --parts reference            # first: the reference latents
    python benchmarks/tdc_monotone.py --parts block & python benchmarks/tdc_monotone.py --parts step &
    python benchmarks/tdc_monotone.py --parts peers ; python benchmarks/tdc_monotone.py --parts report
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from provenance import commit_label  # benchmarks/ is the script's directory

log = logging.getLogger("tdc_monotone")

# (caption, held-out status for the small test bed, trained with rule v1 held out; the report
# recomputes the status for --held-out-rule)
PROMPTS = (
    ("a small red circle moving quickly up on a brown background", "v1 held-out (never seen)"),
    ("a small green triangle moving quickly down on a blue background", "v2 held-out only: SEEN in training"),
    ("a small purple triangle moving quickly right on a brown background", "v1 held-out (never seen)"),
    ("a large yellow square moving slowly up on a brown background", "v1 held-out (never seen)"),
    ("a large red square moving slowly up on a gray background", "v2 held-out only: SEEN in training"),
    ("a large purple triangle moving slowly left on a brown background", "v1 held-out (never seen)"),
)
SEEDS = (1234, 777, 4242)  # prompt k runs seed SEEDS[k % 3]
# tdc_peers.py's knobs whose skip fractions on this bed fall in 10-60 % (FirstBlockCache 0.02 / 0.05
# skip nothing, TaylorSeer 4 skips 65 %)
PEER_KNOBS = {"MagCache": (0.02, 0.06, 0.12, 0.25), "FirstBlockCache": (0.1, 0.2, 0.4), "TaylorSeerCache": (2, 3)}
PEER_ORDER = (("MagCache", 0.02), ("MagCache", 0.06), ("FirstBlockCache", 0.1), ("TaylorSeerCache", 2),
              ("MagCache", 0.12), ("FirstBlockCache", 0.2), ("MagCache", 0.25), ("FirstBlockCache", 0.4),
              ("TaylorSeerCache", 3))  # most informative first: a run cut short still has them


def _peers_module():
    spec = importlib.util.spec_from_file_location("tdc_peers", Path(__file__).with_name("tdc_peers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Bench:
    def __init__(self, args):
        from ditbake.exporter import models
        from ditbake.exporter.adapters import adapter_for
        self.args = args
        self.cache = Path(args.cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(args.device)
        self.adapter = adapter_for(models.load(args.model).to(self.device))
        self.latent = self.adapter.latent_shape(args.frames, args.size, args.size)
        self.encode = _encoder(args.embeds)
        self.prompts = eval_captions(args)
        (self.cache / "prompts.json").write_text(json.dumps(self.prompts))  # the report names what was scored
        self.embeds = self.encode(self.prompts).to(self.device)
        self.negative = self.encode([""]).to(self.device)
        self.seeds = [SEEDS[k % len(SEEDS)] for k in range(len(self.prompts))]
        self.noise = [torch.randn((1, *self.latent), generator=torch.Generator().manual_seed(s)).to(self.device)
                      for s in self.seeds]
        self.shape_kwargs = dict(height=self.latent[2] * 8, width=self.latent[3] * 8,
                                 num_frames=(self.latent[1] - 1) * 4 + 1)

    def reference(self) -> list[torch.Tensor]:
        from safetensors.torch import load_file, save_file

        path = self.cache / "reference.safetensors"
        if path.is_file():
            ref = load_file(str(path))
            return [ref[str(i)] for i in range(len(self.prompts))]
        outs, _ = self.run_peer("reference")
        tmp = path.with_suffix(".partial")  # a parallel process polls for the file: it appears whole
        save_file({str(i): o.contiguous() for i, o in enumerate(outs)}, str(tmp))
        tmp.rename(path)
        return outs

    def run_peer(self, label):
        peers = _peers_module()
        outs, skips = [], []
        for i in range(len(self.prompts)):
            o, s = peers.run_pipeline(self.adapter, self.args.sampler, self.args.steps, self.noise[i],
                                      self.embeds[i:i + 1], self.negative, self.args.guidance, self.shape_kwargs)
            outs.append(o.cpu())
            skips.append(s)
        log.info("%s: skip %.3f", label, sum(skips) / len(skips))
        return outs, sum(skips) / len(skips)

    def fidelity(self, outs, refs) -> dict:
        from safetensors.torch import load_file

        from ditbake.exporter.evaluate import psnr, ssim, to_frames

        path = self.cache / "reference.safetensors"
        while refs is None and not path.is_file():  # another process is computing it
            time.sleep(10)
        if refs is None:
            ref = load_file(str(path))
            refs = [ref[str(i)] for i in range(len(self.prompts))]

        frames = [(to_frames(o[0], "wan"), to_frames(r[0], "wan")) for o, r in zip(outs, refs)]
        ps = [min(psnr(o, r), 99.0) for o, r in frames]  # identical outputs count as 99 dB
        ss = [ssim(o, r) for o, r in frames]
        return {"psnr_db": sum(ps) / len(ps), "ssim": sum(ss) / len(ss), "psnr_per_clip": ps, "ssim_per_clip": ss}

    def calibration(self):
        from ditbake.exporter import calibrate as cal

        path = self.cache / f"cal{self.args.calib_prompts}"
        if path.is_dir():
            return cal.CalibrationStats.load(path), self.calib_captions()
        stats = cal.calibrate(self.adapter, self.encode(self.calib_captions()), self.negative.cpu(),
                              latent=self.latent, sampler=self.args.sampler, num_steps=self.args.steps,
                              guidance_scale=self.args.guidance, seed=7, source=self.args.model, progress=False)
        stats.save(path, force=True)
        return stats, self.calib_captions()

    def calib_captions(self) -> list[str]:
        from prompt_cache import train_captions  # benchmarks/ is this script's directory

        # training captions of the rule the model was trained with, every 97th (as tdc_peers.py)
        return train_captions("video", self.args.held_out_rule, self.args.calib_prompts)

    def tdc(self, granularity: str, refs) -> dict:
        from ditbake.exporter.plan_cache import CacheConfig
        from ditbake.exporter.planner import plan_from_calibration

        stats, captions = self.calibration()
        points = []
        with tempfile.TemporaryDirectory() as tmp:
            for budget in [float(b) for b in self.args.budgets.split(",")]:
                plan = plan_from_calibration(stats.meta, tensors=stats.tensors,
                                             cache=CacheConfig(skip_budget=budget, granularity=granularity,
                                                               max_run=self.args.max_run))
                skipped = sorted([i, br] for i, step in enumerate(plan.steps) for br, ids in step.items()
                                 if all(not plan.variants[v].compute for v in ids))
                result = self.run_plan(plan, refs, tmp, f"{granularity}{budget}")
                point = {"knob": budget, "max_run": self.args.max_run, **result, "tdc": plan.predicted["tdc"],
                         "whole_steps_skipped": skipped}
                points.append(point)
                log.info("TDC %s %.2f: skip %.3f psnr %.2f ssim %.4f", granularity, budget, point["skip_fraction"],
                         point["psnr_db"], point["ssim"])
                (self.cache / f"part_{granularity}{self.args.tag}.json").write_text(json.dumps(
                    {"calibration_captions": captions, "points": points}, indent=1))
        return {"calibration_captions": captions, "points": points}

    def run_plan(self, plan, refs, tmp, name) -> dict:
        from ditbake.exporter import build as builder
        from ditbake.runtime import load
        from ditbake.runtime.artifact import Profile

        path = builder.build(self.adapter, plan, Path(tmp) / name, profiles=[Profile("p", self.latent, 16)],
                             samplers=[self.args.sampler], dtype=torch.float32, progress=False)
        session = load(path, device=self.args.device)
        outs, skips = [], []
        for i in range(len(self.prompts)):
            r = session.generate(self.embeds[i:i + 1], self.negative, guidance_scale=self.args.guidance,
                                 latents=self.noise[i])
            outs.append(r.latents.cpu())
            skips.append(r.report.skip_fraction)
        return {"skip_fraction": sum(skips) / len(skips), **self.fidelity(outs, refs)}

    def diagnose(self, refs) -> dict:
        """The pre-fix search (bisection of tau, each CFG branch on its own), per step, at the budgets
        where the issue saw the jump, and its 30 % schedule with the uncond branch's skipped steps
        replaced by the cond branch's (same count, aligned): isolates what the jump comes from."""
        from ditbake.exporter.plan_cache import mean_change, search_tau
        from ditbake.exporter.planner import SKIP, plan_from_calibration

        stats, captions = self.calibration()
        change = mean_change(stats.tensors["delta_change"]).mean(-1, keepdim=True)
        cases = []
        for budget in (0.3, 0.4):
            skip = search_tau(change, budget, 2).skip[..., 0]
            cases.append((f"pre-fix tau search, per step, budget {budget:.2f}", skip))
            if budget == 0.3:
                cases.append(("the same 30 % schedule, uncond skipping the cond branch's steps", skip[:1].expand_as(skip)))
        points = []
        with tempfile.TemporaryDirectory() as tmp:
            for k, (label, skip) in enumerate(cases):
                def apply(configs, meta, predicted, skip=skip):
                    for i, step in enumerate(configs):
                        for br, blocks in enumerate(step):
                            if skip[br, i]:
                                blocks[:] = [SKIP] * len(blocks)
                plan = plan_from_calibration(stats.meta, tensors=stats.tensors, passes=[apply])
                point = {"label": label, "skipped_steps": {br: [i for i in range(skip.shape[1]) if skip[k2, i]]
                                                           for k2, br in enumerate(("cond", "uncond"))},
                         **self.run_plan(plan, refs, tmp, f"d{k}")}
                points.append(point)
                log.info("%s: skip %.3f psnr %.2f ssim %.4f", label, point["skip_fraction"], point["psnr_db"], point["ssim"])
                (self.cache / "part_diagnose.json").write_text(json.dumps({"points": points}, indent=1))
        return {"points": points}

    def peers(self, refs) -> dict:
        peers = _peers_module()
        # MagCache's per-step ratios from its own calibration mode, on one calibration caption (not
        # the evaluation prompts: ditbake calibrates on training captions too)
        emb = self.encode(self.calib_captions()[:1]).to(self.device)
        ratios = peers.mag_ratios(self.adapter, {"steps": self.args.steps, "call": lambda: peers.run_pipeline(
            self.adapter, self.args.sampler, self.args.steps, self.noise[0], emb, self.negative, self.args.guidance,
            self.shape_kwargs)})
        methods = {}
        configs = [c for c in peers.peer_configs(self.args.steps, ratios) if c[1] in PEER_KNOBS.get(c[0], ())]
        for name, knob, config in sorted(configs, key=lambda c: PEER_ORDER.index(c[:2])):
            self.adapter.model.enable_cache(config)
            try:
                outs, skip = self.run_peer(f"{name}({knob})")
            finally:
                self.adapter.model.disable_cache()
            methods.setdefault(name, []).append({"knob": knob, "skip_fraction": skip, **self.fidelity(outs, refs)})
            (self.cache / "part_peers.json").write_text(json.dumps({"methods": methods, "mag_ratios": ratios}, indent=1))
        return {"methods": methods, "mag_ratios": ratios}


def _encoder(cache: str | None):
    """Caption → embedding: the cache from benchmarks/prompt_cache.py (GPU machine: no text encoder)
    when given, else the shipped text encoder."""
    if cache:
        from prompt_cache import Embedder

        return Embedder(cache)
    from ditbake.runtime.text_encoder import TextEncoder

    encoder = TextEncoder.load(max_length=16)
    return encoder.encode


def eval_captions(args) -> list[str]:
    """PROMPTS (the small bed's fixed list), or with --prompt-set spec the model's own held-out captions
    (its testbed.json: kind and held-out rule, spread over the held-out set as `ditbake eval`)."""
    if args.prompt_set == "fixed":
        return [p for p, _ in PROMPTS[:args.prompts]]
    from prompt_cache import held_out_captions

    from ditbake.exporter.testbed.models import data_spec_of

    return held_out_captions(data_spec_of(args.model), args.prompts)


def held_out_status(caption: str, rule: str) -> str:
    """Whether the model (trained with `rule`'s captions held out) saw this caption in training."""
    from ditbake.exporter.testbed import data

    i = data.all_captions("video").index(caption)
    return f"held out under rule {rule} (never seen)" if data.is_held_out(i, rule) else \
        f"SEEN in training (not held out under rule {rule})"


def report(args) -> None:
    cache = Path(args.cache)
    out = {"what": "TDC skip-budget sweep at 5 % steps vs diffusers caches (issue 18 item 2)",
           "model": args.model, "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance,
           "latent_shape": [3, args.frames, args.size, args.size],
           "machine": (torch.cuda.get_device_name() if args.device == "cuda" else "2-core CPU shared with ~7 other agents")
           + ", eager runtime float32 (diffusers pipelines float32)",
           "prompts": [{"caption": p, "status": held_out_status(p, args.held_out_rule), "seed": SEEDS[k % len(SEEDS)]}
                       for k, p in enumerate(json.loads((cache / "prompts.json").read_text())
                                             if (cache / "prompts.json").is_file() else eval_captions(args))],
           "reference": "uncached diffusers WanPipeline, same initial noise (torch.randn, Generator seeded by the seed)",
           "methods": {}}
    if args.note:
        out["note"] = args.note
    out["git_commit"], out["seconds"] = {}, {}
    for path in sorted(cache.glob("meta_*.json")):  # one per process: parts may run in parallel
        for key, value in json.loads(path.read_text()).items():
            out[key][path.stem[5:]] = value
    for gran, label in (("block", "ditbake TDC per block"), ("step", "ditbake TDC per step")):
        for part in sorted(cache.glob(f"part_{gran}*.json")):  # several processes may share a granularity
            d = json.loads(part.read_text())
            out["calibration_captions"] = d["calibration_captions"]
            for q in d["points"]:
                name = label + ("" if q["max_run"] == 2 else f", max_run {q['max_run']}")
                out["methods"].setdefault(name, []).append(q)
    for pts in out["methods"].values():
        pts.sort(key=lambda q: q["knob"])
    if (cache / "part_diagnose.json").is_file():
        out["diagnosis"] = json.loads((cache / "part_diagnose.json").read_text())["points"]
    if (cache / "part_peers.json").is_file():
        d = json.loads((cache / "part_peers.json").read_text())
        out["methods"].update(d["methods"])
        out["mag_ratios"] = d["mag_ratios"]
    cal_dir = cache / f"cal{args.calib_prompts}"
    if cal_dir.is_dir():
        out["schedules"] = schedules(cal_dir, args.budgets)
    Path(args.out).write_text(json.dumps(out, indent=1))
    plot(out, args.plot)
    print(f"{'method':24s} {'knob':>6s} {'skip':>6s} {'PSNR dB':>8s} {'SSIM':>7s}")
    for name, pts in out["methods"].items():
        for q in pts:
            print(f"{name:24s} {q['knob']:>6} {q['skip_fraction']:6.3f} {q['psnr_db']:8.2f} {q['ssim']:7.4f}")


def schedules(cal_dir: Path, budgets: str) -> dict:
    """Planning only (no model runs): the per-step schedules before and after the fix, per budget:
    which steps each CFG branch skips, and how many skips of the previous budget were dropped."""
    from ditbake.exporter.calibrate import CalibrationStats
    from ditbake.exporter.plan_cache import CacheConfig, plan_schedule

    stats = CalibrationStats.load(cal_dir)
    out = {}
    for search in ("tau", "nested"):
        for gran in ("step", "block"):
            rows, prev = [], None
            for b in [float(x) for x in budgets.split(",")]:
                s = plan_schedule(stats.tensors["delta_change"], CacheConfig(skip_budget=b, granularity=gran,
                                                                             search=search))
                row = {"budget": b, "skip_fraction": s.skip_fraction,
                       "dropped_from_previous_budget": None if prev is None else int((prev & ~s.skip).sum()),
                       "branches_differ": int((s.skip[0] != s.skip[1]).sum())}
                if gran == "step":
                    row["skipped_steps"] = {br: s.skip[k, :, 0].nonzero().flatten().tolist()
                                            for k, br in enumerate(("cond", "uncond"))}
                rows.append(row)
                prev = s.skip
            out[f"{'pre-fix tau bisection, branches apart' if search == 'tau' else 'fixed: nested ranking, branches together'}, per {gran}"] = rows
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in results["methods"].items():
        pts = sorted(points, key=lambda q: q["skip_fraction"])
        style = "-" if name.startswith("ditbake") else "--"
        for ax, key in zip(axes, ("psnr_db", "ssim")):
            ax.plot([q["skip_fraction"] for q in pts], [q[key] for q in pts], style, marker="o", label=name)
    for q in results.get("diagnosis", []):  # pre-fix schedules (and the aligned control) as single points
        pre = q["label"].startswith("pre-fix")
        for ax, key in zip(axes, ("psnr_db", "ssim")):
            ax.plot([q["skip_fraction"]], [q[key]], "x" if pre else "+", color="red" if pre else "black",
                    markersize=9, label=q["label"] if key == "psnr_db" else None)
    for ax, key in zip(axes, ("PSNR vs uncached (dB)", "SSIM vs uncached")):
        ax.set_xlabel("fraction of block computations skipped")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['model']}: {results['steps']} steps, {results['sampler']}, CFG {results['guidance']}, "
                 f"{len(results['prompts'])} held-out prompts x 1 seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="reference,block,step,peers,report",
                   help="comma list of reference, block, step, peers, report")
    p.add_argument("--model", default="artifacts/testbed-wan")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="unipc")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--frames", type=int, help="latent frames (default: the test bed's own, its testbed.json)")
    p.add_argument("--size", type=int, help="latent height and width (default: the test bed's own)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--calib-prompts", type=int, default=8)
    p.add_argument("--budgets", default=",".join(f"{b / 100:.2f}" for b in range(10, 61, 5)))
    p.add_argument("--max-run", type=int, default=2, help="TDC max consecutive skips")
    p.add_argument("--tag", default="", help="suffix of this process's part files (parallel processes)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the JSON records which)")
    p.add_argument("--held-out-rule", default="v1", help="the rule the model was trained with (testbed-wan v1, "
                   "testbed-wan16k v2): labels each prompt held out or seen")
    p.add_argument("--prompt-set", choices=("fixed", "spec"), default="fixed", help="fixed: the PROMPTS list "
                   "(small bed); spec: --prompts held-out captions of the model's testbed.json (its held-out rule)")
    p.add_argument("--embeds", help="caption-embedding cache from benchmarks/prompt_cache.py (machines without the "
                   "text encoder: the GPU one)")
    p.add_argument("--note", default="", help="report: a remark stored in the JSON")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="out/tdc_monotone")
    p.add_argument("--out", default="benchmarks/results/tdc_monotone_cpu.json")
    p.add_argument("--plot", default="benchmarks/results/tdc_monotone.png")
    args = p.parse_args(argv)
    if args.frames is None or args.size is None:
        # the bed's own shape (the fixed defaults 8 × 32 × 32 had measured the 16k bed at 2,048 tokens)
        from ditbake.exporter.testbed.models import data_spec_of

        spec = data_spec_of(args.model)
        args.frames = args.frames or spec.frames
        args.size = args.size or spec.height
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    if parts == ["report"]:
        report(args)
        return 0
    bench = Bench(args)
    start = time.perf_counter()
    # parts other than the reference wait for its file only when they need it (parallel processes)
    refs = bench.reference() if "reference" in parts else None
    commit = commit_label()  # the code this process runs (HEAD may move while it does)
    for part in parts:
        t = time.perf_counter()
        if part in ("block", "step"):
            bench.tdc(part, refs)
        elif part == "diagnose":
            bench.diagnose(refs)
        elif part == "peers":
            bench.peers(refs)
        elif part not in ("reference", "report"):
            raise SystemExit(f"unknown part {part!r}")
        meta = {"git_commit": commit, "seconds": time.perf_counter() - t}
        (Path(args.cache) / f"meta_{part}{args.tag}.json").write_text(json.dumps(meta, indent=1))
    log.info("done in %.0f s", time.perf_counter() - start)
    if "report" in parts:
        report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
