"""What a compressed artifact saves and what it costs in fidelity, in a few lines (the end of `make demo`).

    python -m ditbake.exporter.demo_summary artifacts/built/demo out/demo/eval.json

Reads the artifact's manifest and plan and `ditbake eval`'s eval.json (the compressed plan against
the uncompressed one, same prompts and seeds)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ditbake.runtime.artifact import WEIGHTS, read_manifest
from ditbake.runtime.plan import Plan


def summary(artifact: str | Path, eval_json: str | Path) -> str:
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    plan = Plan.load(artifact / manifest["plan_file"])
    result = json.loads(Path(eval_json).read_text())
    s = result["summary"]
    branches = len(plan.steps[0])
    total = plan.num_steps * branches * plan.num_blocks
    skipped = round(float(s["skip_fraction"]) * total)
    stored = manifest["files"][WEIGHTS]["bytes"]
    dtype = manifest["dtype"]
    dense = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4) * int(manifest["model"]["parameters"])
    psnr = s["psnr"] if isinstance(s["psnr"], str) else f"{s['psnr']:.1f} dB"
    lines = [
        f"compressed plan: {plan.num_steps} steps × {branches} CFG branches × {plan.num_blocks} blocks, "
        f"{len(plan.variants)} block variants",
        f"  skipped blocks   {skipped} of {total} block computations ({100 * float(s['skip_fraction']):.0f} %, "
        "served from the cached residual Δ)",
        f"  attention FLOPs  {100 * float(s['attention_flops_fraction']):.0f} % of dense "
        f"({100 * (1 - float(s['attention_flops_fraction'])):.0f} % removed by head-wise arrow/cached heads)",
        f"  activation bits  {float(s['avg_activation_bits']):.1f} on average over the linear layers run (bf16 = 16)",
        f"  weights          {stored / 1e6:.2f} MB stored vs {dense / 1e6:.2f} MB uncompressed in {dtype} "
        f"({dense / stored:.2f}× smaller)",
        f"fidelity vs the uncompressed plan ({len(result['samples'])} sample(s), same seeds): PSNR {psnr}, "
        f"SSIM {float(s['ssim']):.3f}, temporal error {float(s['temporal_error']):.4f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditbake.exporter.demo_summary")
    parser.add_argument("artifact")
    parser.add_argument("eval_json")
    args = parser.parse_args(argv)
    print(summary(args.artifact, args.eval_json))  # the command's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
