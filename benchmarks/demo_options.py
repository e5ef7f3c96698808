"""Which compressed plan `make demo` ships for the test-bed video model, measured on the CPU.

One calibration (training captions, 20 UniPC steps, DMPQ statistics and the head search at δ), then
per option: plan → build (fp32) → `ditbake eval` against the baseline plan on held-out captions.
Writes benchmarks/results/demo_options_cpu.json (or $OUT/demo_options_cpu.json).

    .venv/bin/python benchmarks/demo_options.py --work out/demo_options
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from provenance import stamp  # benchmarks/ is the script's directory: commit + dirty flag in every JSON

# option → (calibration, plan arguments); "cal" has the head search, "cal_prec" the DMPQ statistics
OPTIONS = {
    "tdc0.3-block": ("cal", ["--tdc-skip-budget", "0.3"]),
    "tdc0.4-step": ("cal", ["--tdc-skip-budget", "0.4", "--tdc-granularity", "step"]),
    "tdc0.3-block+heads": ("cal", ["--tdc-skip-budget", "0.3", "--heads"]),
    "tdc0.2-block+heads": ("cal", ["--tdc-skip-budget", "0.2", "--heads"]),
    "tdc0.4-step+heads": ("cal", ["--tdc-skip-budget", "0.4", "--tdc-granularity", "step", "--heads"]),
    "tdc0.3-block+w4a8": ("cal_prec", ["--tdc-skip-budget", "0.3", "--avg-bits", "8"]),
    "tdc0.3-block+mixed6.5": ("cal_prec", ["--tdc-skip-budget", "0.3", "--avg-bits", "6.5"]),
}
CALIBRATIONS = {"cal": ["--heads-delta", "0.01"], "cal_prec": ["--precision-stats", "--precision-max-tokens", "256"]}
CALIBRATION_PROMPTS = ["a small red square moving slowly left on a black background",
                       "a large yellow triangle moving quickly down on a gray background"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="out/demo_options")
    parser.add_argument("--eval-prompts", type=int, default=2)
    parser.add_argument("--options", default=",".join(OPTIONS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ditbake.exporter.cli import main as cli
    from ditbake.exporter.evaluate import evaluate

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "prompts.txt").write_text("\n".join(CALIBRATION_PROMPTS) + "\n")
    model = "artifacts/testbed-wan"
    shape = ["--frames", "8", "--height", "32", "--width", "32", "--text-len", "16"]
    out = Path(os.environ.get("OUT", "benchmarks/results")) / "demo_options_cpu.json"
    results = {"calibration_seconds": {}, "calibrations": CALIBRATIONS,
               "machine": f"CPU, {os.cpu_count()} cores (shared with other jobs)", "options": {}}
    if out.exists():  # runs add options to the same table
        results = json.loads(out.read_text()) | {"calibrations": CALIBRATIONS}
    for name in args.options.split(","):
        cal, plan_args = OPTIONS[name]
        if not (work / cal / "calibration.json").exists():
            t0 = time.perf_counter()
            assert cli(["calibrate", "--model", model, "--out", str(work / cal), "--steps", "20", "--sampler", "unipc",
                        "--prompts", str(work / "prompts.txt"), *CALIBRATIONS[cal], *shape]) == 0
            results["calibration_seconds"][cal] = time.perf_counter() - t0
        plan, art = work / f"{name}.plan.json", work / f"{name}.art"
        assert cli(["plan", "--calibration", str(work / cal), "--out", str(plan), *plan_args]) == 0
        assert cli(["build", "--model", model, "--plan", str(plan), "--calibration", str(work / cal),
                    "--out", str(art), "--dtype", "float32", "--text-encoder"]) == 0
        t = time.perf_counter()
        r = evaluate(art, None, num_prompts=args.eval_prompts, seeds=(0,), progress=False)
        manifest = json.loads((art / "manifest.json").read_text())
        results["options"][name] = {"calibration": cal, "plan_args": plan_args, **r.summary(),
                                    "weights_bytes": manifest["files"]["weights.safetensors"]["bytes"],
                                    "eval_seconds": time.perf_counter() - t}
        logging.info("%s: %s", name, results["options"][name])
        out.write_text(json.dumps(stamp(results), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
