"""The end of `make demo`: generate a prompt with the compressed artifact and with its uncompressed
plan (same seed), write the compressed clip as MP4, a side-by-side MP4 and PNG strip
(uncompressed | compressed | difference), and print what the plan saved and what it cost.

    python -m ditbake.exporter.demo artifacts/built/demo --prompt "a red circle ..." --out out/demo

The comparison is `ditbake eval` on that one prompt (eval.json); the summary reads the artifact's
manifest and plan."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

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


def write_videos(reference: torch.Tensor, compressed: torch.Tensor, out: Path, fps: int, diff_gain: float = 4.0,
                 min_side: int = 256) -> list[Path]:
    """clip.mp4 (compressed) and side_by_side.mp4 (uncompressed | compressed | |difference|×gain) from
    frames [F, C, H, W] in [0, 1]."""
    from ditbake.exporter.video import to_uint8, write_mp4  # noqa: PLC0415

    def hwc(x):  # [F, C, H, W] → [F, H, W, 3] (a latent view shows its first three channels, as the strip)
        x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
        return x.permute(0, 2, 3, 1)

    diff = ((compressed - reference).abs() * diff_gain).clamp(0, 1)
    side = torch.cat([hwc(reference), hwc(compressed), hwc(diff)], dim=2)
    return [write_mp4(to_uint8(hwc(compressed)), out / "clip.mp4", fps=fps, min_side=min_side),
            write_mp4(to_uint8(side), out / "side_by_side.mp4", fps=fps, min_side=min_side)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditbake.exporter.demo")
    parser.add_argument("artifact")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--fps", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ditbake.exporter.evaluate import evaluate  # noqa: PLC0415
    from ditbake.runtime.errors import DitbakeError  # noqa: PLC0415

    out = Path(args.out)
    try:
        result = evaluate(args.artifact, None, prompts=[args.prompt], seeds=(args.seed,),
                          guidance_scale=args.guidance, out=out)
    except DitbakeError as exc:
        logging.getLogger("ditbake").error("%s: %s", type(exc).__name__, exc)
        return exc.exit_code
    videos = write_videos(*result.first_frames, out, fps=args.fps)
    print(summary(args.artifact, out / "eval.json"))  # the command's output
    print(f"outputs: {', '.join(str(p) for p in videos)}, {out / 'strip.png'} (uncompressed | compressed | "
          f"difference), {out / 'eval.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
