"""Fidelity of every peer configuration of the end-to-end race (issue 19) on the 16,384-token video
test bed: diffusers' cache hooks (FirstBlockCache thresholds, MagCache thresholds, TaylorSeer
intervals), each with bf16 linears and with torchao FP8 dynamic row-wise linears
(benchmarks/fp8_linears.py), plus torchao FP8 without a cache, against the uncompressed output (no
cache, bf16 linears) of the same bf16 diffusers pipeline (eager, WanPipeline, 50 UniPC steps, CFG 5)
on held-out captions (the bed's rule, v2) and seeds: PSNR / SSIM / temporal error (exporter/evaluate.py's
measures, per clip, then averaged) and the fraction of block computations skipped.

    python benchmarks/e2e_fidelity.py --device cuda --embeds .carry/fid16k/embeds.safetensors \
        --out $OUT/e2e_fidelity16k.json
    python benchmarks/e2e_fidelity.py --frames 2 --size 16 --steps 4 --prompts 1 --seeds 1234 \
        --out /tmp/ef.json                                     # CPU smoke at a reduced shape

MagCache's per-step magnitude ratios come from its own calibration mode, run on a TRAINING caption
of the bed with a seed that is not scored, once per linear format (a user calibrates the model they
deploy); the JSON keeps them, and benchmarks/e2e.py times the picked points with them (their skip
schedules depend on those ratios only, not on the weights). TaylorSeer's schedule is fixed by its
interval; FirstBlockCache's depends on the weights (see e2e.py).

Rows run FP8 first (what the race times), gentle knobs before aggressive ones, each family in
turn; the JSON at --out is rewritten after every row ("complete": false until the end), and rows
that would pass --time-limit are listed under "not_run" instead. PSNR per clip is capped at 99 dB
(identical outputs) before averaging, as tdc_monotone.py does.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from fp8_linears import Fp8Unavailable, quantize_blocks  # benchmarks/ is the script's directory
from prompt_cache import Embedder, held_out_captions, train_captions
from provenance import stamp  # commit + dirty flag in every JSON
from tdc_peers import mag_ratios, peer_config, run_pipeline

log = logging.getLogger("e2e_fidelity")

# gentle to aggressive; the first TDC sweep (tdc_monotone16k_h100.json, 20 steps at 8 frames of 32×32 px:
# the script's old --frames/--size defaults, not the bed's 16×64×64) measured MagCache(0.02) at 22 dB and
# TaylorSeer(2) at 17 dB, far below ditbake's shipped 36 dB (combined16k), hence the gentler ends here
# (at the bed's own size, tdc_monotone16k_h200.json: 29.2 and 23.1 dB)
SWEEP = {"FirstBlockCache": (0.01, 0.02, 0.05, 0.1, 0.2, 0.4),
         "MagCache": (0.005, 0.01, 0.02, 0.06, 0.12, 0.25),
         "TaylorSeerCache": (2, 3, 4)}
NO_CACHE = "no cache, fp8 linears"
PSNR_CAP = 99.0
CALIBRATION_SEED = 7  # MagCache's calibration noise: not one of the scored seeds


def row_name(family: str, knob, linears: str) -> str:
    return f"{family}({knob}), {linears} linears"


def sweep_order(sweep: dict, formats) -> list[tuple[str, object, str]]:
    """(family, knob, linears): per format, the families' i-th knobs together, gentle first, so a run
    cut short still has every family's most faithful points."""
    out = []
    for linears in formats:
        for i in range(max((len(k) for k in sweep.values()), default=0)):
            out += [(family, knobs[i], linears) for family, knobs in sweep.items() if i < len(knobs)]
    return out


def pick(fidelity: dict, family: str, min_db: float, linears: str = "fp8") -> dict | None:
    """The most aggressive point (largest skip fraction) of `family` with `linears` whose PSNR reaches
    `min_db`; when none does, its most faithful point, flagged `reaches_required: false`. None when the
    JSON has no scored point of that family and format."""
    points = [{"name": n, **r} for n, r in fidelity["rows"].items()
              if r.get("family") == family and r.get("linears") == linears and "psnr_db" in r]
    if not points:
        return None
    good = [p for p in points if p["psnr_db"] >= min_db]
    best = (max(good, key=lambda p: (p["skip_fraction"], p["psnr_db"])) if good
            else max(points, key=lambda p: (p["psnr_db"], -p["skip_fraction"])))
    return {**best, "required_psnr_db": min_db, "reaches_required": bool(good)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="artifacts/testbed-wan16k", help="test-bed directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where every generation runs")
    p.add_argument("--embeds", help="caption-embedding cache (benchmarks/prompt_cache.py); else the text encoder")
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=3, help="held-out captions (the bed's rule)")
    p.add_argument("--seeds", default="1234,777", help="comma-separated seeds: every prompt runs each")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--sampler", default="unipc")
    p.add_argument("--linears", default="fp8,bf16", help="comma list of linear formats to sweep (fp8, bf16)")
    for family, flag in (("FirstBlockCache", "--fbc"), ("MagCache", "--mag"), ("TaylorSeerCache", "--taylor")):
        p.add_argument(flag, default=",".join(map(str, SWEEP[family])),
                       help=f"comma list of {family} knobs ('' leaves the family out)")
    p.add_argument("--time-limit", type=float, default=380.0,
                   help="seconds: a row that would end past this is listed under not_run instead")
    p.add_argument("--frames", type=int, help="override the bed's frames (reduced-shape smoke runs)")
    p.add_argument("--size", type=int, help="override the bed's height and width (reduced-shape smoke runs)")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.steps < 1:
        p.error("--prompts and --steps must be at least 1")
    try:
        args.seed_list = tuple(int(s) for s in args.seeds.split(",") if s)
        args.sweep = {"FirstBlockCache": tuple(float(k) for k in args.fbc.split(",") if k),
                      "MagCache": tuple(float(k) for k in args.mag.split(",") if k),
                      "TaylorSeerCache": tuple(int(k) for k in args.taylor.split(",") if k)}
    except ValueError as exc:
        p.error(f"--seeds, --fbc, --mag and --taylor take comma-separated numbers ({exc})")
    if not args.seed_list:
        p.error("--seeds needs at least one seed")
    args.formats = tuple(f for f in args.linears.split(",") if f)
    if not set(args.formats) <= {"fp8", "bf16"}:
        p.error(f"--linears takes fp8 and/or bf16, got {args.linears!r}")
    return args


class Bed:
    """The bed in bf16 on the device, its held-out clips, and one diffusers WanPipeline run per clip."""

    def __init__(self, args):
        from ditbake.exporter import models
        from ditbake.exporter.adapters import adapter_for
        from ditbake.exporter.testbed.models import data_spec_of

        self.args, self.device = args, torch.device(args.device)
        self.spec = data_spec_of(args.model)
        self.load = lambda: adapter_for(models.load(args.model, dtype=torch.bfloat16).to(self.device))
        self.adapter = self.load()
        self.latent = self.adapter.latent_shape(args.frames or self.spec.frames, args.size or self.spec.height,
                                                args.size or self.spec.width)
        self.prompts = held_out_captions(self.spec, args.prompts)
        self.calibration_caption = train_captions(self.spec.kind, self.spec.held_out_rule, 1)[0]
        embed = Embedder(args.embeds)
        self.embeds = embed(self.prompts).to(self.device)
        self.calibration_embeds = embed([self.calibration_caption]).to(self.device)
        self.negative = embed([""]).to(self.device)
        self.clips = [(i, seed) for i in range(len(self.prompts)) for seed in args.seed_list]
        self.shape_kwargs = dict(height=self.latent[2] * 8, width=self.latent[3] * 8,
                                 num_frames=(self.latent[1] - 1) * 4 + 1)

    def noise(self, seed: int) -> torch.Tensor:
        return torch.randn((1, *self.latent), generator=torch.Generator().manual_seed(seed)).to(self.device)

    def generate(self, adapter, config=None) -> tuple[list[torch.Tensor], float]:
        """Every clip with `config` enabled (None: no cache): final latents and the mean skip fraction."""
        a = self.args
        if config is not None:
            adapter.model.enable_cache(config)
        try:
            runs = [run_pipeline(adapter, a.sampler, a.steps, self.noise(seed), self.embeds[i:i + 1], self.negative,
                                 a.guidance, self.shape_kwargs) for i, seed in self.clips]
        finally:
            if config is not None:
                adapter.model.disable_cache()
        return [o.cpu() for o, _ in runs], sum(s for _, s in runs) / len(runs)

    def calibrate_magcache(self, adapter) -> list[float]:
        a = self.args
        return [float(r) for r in mag_ratios(adapter, {"steps": a.steps, "call": lambda: run_pipeline(
            adapter, a.sampler, a.steps, self.noise(CALIBRATION_SEED), self.calibration_embeds, self.negative,
            a.guidance, self.shape_kwargs)})]


def score(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> dict:
    from ditbake.exporter.evaluate import psnr, ssim, temporal_error, to_frames

    frames = [(to_frames(o[0], "wan"), to_frames(r[0], "wan")) for o, r in zip(outs, refs)]
    ps = [min(psnr(o, r), PSNR_CAP) for o, r in frames]
    ss = [ssim(o, r) for o, r in frames]
    te = [temporal_error(o, r) for o, r in frames]
    return {"psnr_db": sum(ps) / len(ps), "psnr_min_db": min(ps), "ssim": sum(ss) / len(ss), "ssim_min": min(ss),
            "temporal_error": sum(te) / len(te)}


def run(args) -> dict:
    start = time.perf_counter()
    bed = Bed(args)
    rows: dict = {}
    out = {"what": "peer configurations of the end-to-end race (diffusers cache hooks x bf16 / torchao FP8 linears) "
                   "vs the uncompressed diffusers output on held-out captions (issue 19 item 2)",
           "model": args.model, "latent_shape": list(bed.latent),
           "tokens": bed.latent[1] * (bed.latent[2] // 2) * (bed.latent[3] // 2),
           "held_out_rule": bed.spec.held_out_rule, "steps": args.steps, "sampler": args.sampler,
           "guidance": args.guidance, "dtype": "bfloat16", "prompts": bed.prompts, "seeds": list(args.seed_list),
           "reference": "the same bf16 diffusers WanPipeline (eager) without a cache hook and with bf16 linears, same "
                        "captions, seeds (torch.randn noise) and sampler",
           "magcache_calibration": {"caption": bed.calibration_caption, "seed": CALIBRATION_SEED,
                                    "note": "a training caption of the bed; one calibration run per linear format"},
           "sweep": {k: list(v) for k, v in args.sweep.items()}, "psnr_cap_db": PSNR_CAP,
           "device": torch.cuda.get_device_name(bed.device) if bed.device.type == "cuda" else "cpu",
           "embeddings": f"cache {args.embeds}" if args.embeds else "the bed's text encoder",
           "fp8": {}, "mag_ratios": {}, "complete": False, "not_run": {}, "rows": rows}

    def write():
        out["seconds"] = time.perf_counter() - start
        Path(args.out).write_text(json.dumps(stamp(out), indent=1))

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write()
    t0 = time.perf_counter()
    reference, _ = bed.generate(bed.adapter)
    out["seconds_reference"] = last = time.perf_counter() - t0
    models = {}
    if "bf16" in args.formats:
        models["bf16"] = bed.adapter
    if "fp8" in args.formats:
        try:
            fp8 = bed.load()
            out["fp8"] = {"available": True, "numerics": quantize_blocks(fp8.model, bed.device)}
            models["fp8"] = fp8
        except (Fp8Unavailable, AssertionError, RuntimeError) as exc:  # torchao asserts its GPU capability
            out["fp8"] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"[:600]}
            log.warning("FP8 rows skipped: %s", exc)
    for linears, adapter in models.items():
        if args.sweep["MagCache"]:
            try:
                out["mag_ratios"][linears] = bed.calibrate_magcache(adapter)
            except Exception as exc:  # noqa: BLE001 - MagCache may not support this model: its rows say why
                out["mag_ratios"][linears] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
    write()

    todo = ([(None, None, "fp8")] if "fp8" in models else []) + \
        [(f, k, lin) for f, k, lin in sweep_order(args.sweep, args.formats) if lin in models]
    for family, knob, linears in todo:
        name = NO_CACHE if family is None else row_name(family, knob, linears)
        if time.perf_counter() - start + last > args.time_limit:
            out["not_run"][name] = f"--time-limit {args.time_limit:g} s"
            continue
        t0 = time.perf_counter()
        try:
            ratios = out["mag_ratios"].get(linears)
            config = None if family is None else peer_config(family, knob, args.steps,
                                                             ratios if isinstance(ratios, list) else None)
            outs, skip = bed.generate(models[linears], config)
            rows[name] = {"family": family, "knob": knob, "linears": linears, "skip_fraction": skip,
                          **score(outs, reference)}
        except Exception as exc:  # noqa: BLE001 - one configuration failing must not hide the others
            rows[name] = {"family": family, "knob": knob, "linears": linears,
                          "error": f"{type(exc).__name__}: {exc}"[:600]}
            log.exception("%s failed", name)
        rows[name]["seconds"] = last = time.perf_counter() - t0
        log.info("%-36s %s", name, {k: v for k, v in rows[name].items() if k not in ("family", "knob", "linears")})
        write()  # a run cut short keeps its finished rows
    out["complete"] = True
    write()
    return out


def table(out: dict) -> str:
    lines = [f"{'configuration':36s} {'skip':>5s} {'PSNR dB':>8s} {'SSIM':>6s} {'temp err':>8s} {'s':>6s}"]
    for name, r in out["rows"].items():
        if "error" in r:
            lines.append(f"{name:36s} error: {r['error'][:100]}")
        else:
            lines.append(f"{name:36s} {r['skip_fraction']:5.2f} {r['psnr_db']:8.2f} {r['ssim']:6.3f} "
                         f"{r['temporal_error']:8.4f} {r['seconds']:6.1f}")
    lines += [f"{name:36s} not run: {why}" for name, why in out["not_run"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = run(args)
    print(table(out))  # the script's output: the table
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
