"""Sample grids and CPU timings for the shipped test-bed models.

Wan goes through the ditbake runtime (baseline artifact built from `artifacts/testbed-wan`);
SD3 (no runtime support yet) through the flow-match Euler sampler in `flow.py` over diffusers.

    python -m ditbake.exporter.testbed.samples --model wan   # artifacts/testbed-wan/samples.png
    python -m ditbake.exporter.testbed.samples --model sd3
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ditbake.exporter.testbed import data, flow
from ditbake.exporter.testbed.models import TESTBEDS, TEXT_LEN, data_spec_of

log = logging.getLogger("ditbake.testbed")

ARTIFACTS = Path("artifacts")
SAMPLE_PROMPTS = {
    "wan": ["a large red circle moving slowly right on a black background",
            "a small yellow square moving quickly down on a blue background",
            "a large white triangle moving slowly left on a brown background",
            "a small green circle moving quickly up on a gray background",
            "a large purple square moving quickly right on a gray background",
            "a small orange triangle moving slowly down on a black background"],
    "sd3": ["a large red circle in the center on a black background",
            "a small yellow square in the top left on a blue background",
            "a large white triangle in the bottom right on a brown background",
            "a small green circle in the top right on a gray background",
            "a large purple square in the bottom left on a gray background",
            "a small orange triangle in the center on a black background"],
}


def build_baseline_artifact(model_dir: Path, out: Path, dtype: torch.dtype = torch.float32,
                            clip: tuple[int, int, int] | None = None) -> Path:
    """An all-compute, all-16-bit artifact of a test-bed Wan: one profile, the bed's clip size (8×32×32
    pixels for `testbed-wan`, 16×64×64 for `testbed-wan16k`) or `clip` (frames, height, width), 16 tokens."""
    from ditbake.exporter import build as builder, models  # noqa: PLC0415
    from ditbake.exporter.adapters import adapter_for  # noqa: PLC0415
    from ditbake.exporter.planner import plan_from_calibration  # noqa: PLC0415
    from ditbake.runtime.artifact import Profile  # noqa: PLC0415

    model = models.load(model_dir)
    # diffusers records the load path as a PosixPath, which the adapter's JSON round trip rejects
    model.register_to_config(_name_or_path=str(model_dir))
    adapter = adapter_for(model)
    spec = data_spec_of(model_dir)
    if clip is not None:
        spec = spec.at_size(*clip)
    meta = {"architecture": adapter.architecture, "num_blocks": adapter.num_blocks,
            "linear_layers": list(adapter.linear_layers), "absent_linears": [list(p) for p in adapter.absent_linears],
            "attention_sites": adapter.attention_sites,
            "num_steps": 20, "branches": ["cond", "uncond"]}
    latent = adapter.latent_shape(spec.frames, spec.height, spec.width)
    profile = Profile(f"f{spec.frames}_h{spec.height}_w{spec.width}_t{TEXT_LEN}", tuple(latent), TEXT_LEN)
    return builder.build(adapter, plan_from_calibration(meta), out, profiles=[profile],
                         samplers=["unipc", "flow_euler"], dtype=dtype, label="test-bed Wan (trained)")


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] → [H, W, 3] uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def write_grid(rows: list[list[np.ndarray]], captions: list[str], path: Path, scale: int = 3) -> Path:
    """One row per prompt: its caption on top, then its frames (or image) side by side."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    caption_h = 12
    grid = Image.new("RGB", (max(cols * w * scale, 6 * len(max(captions, key=len))), len(rows) * (h * scale + caption_h)),
                     "white")
    draw = ImageDraw.Draw(grid)
    for i, (row, caption) in enumerate(zip(rows, captions)):
        y = i * (h * scale + caption_h)
        draw.text((2, y), caption, fill="black")
        for j, frame in enumerate(row):
            grid.paste(Image.fromarray(frame).resize((w * scale, h * scale), Image.NEAREST), (j * w * scale, y + caption_h))
    grid.save(path)
    return path


def wan_samples(model_dir: Path, prompts: list[str], seed: int = 0, guidance: float = 5.0) -> tuple[list, dict]:
    import ditbake.runtime as dr  # noqa: PLC0415
    from ditbake.runtime.text_encoder import TextEncoder  # noqa: PLC0415

    artifact = build_baseline_artifact(model_dir, ARTIFACTS / "built" / "testbed-wan")
    session = dr.load(artifact)
    encoder = TextEncoder.load(max_length=TEXT_LEN)
    negative = encoder.encode([""])
    rows, seconds = [], []
    for i, prompt in enumerate(prompts):
        result = session.generate(encoder.encode([prompt]), negative, seed=seed + i, guidance_scale=guidance)
        seconds.append(result.report.seconds)
        clip = result.latents[0]  # [3, F, H, W]
        rows.append([_to_uint8(clip[:, f]) for f in range(clip.shape[1])])
        log.info("%s: %.1f s", prompt, result.report.seconds)
    timing = {"cpu_seconds_per_generation": float(np.median(seconds)), "threads": torch.get_num_threads(),
              "steps": 20, "forwards": 40, "sampler": session.artifact.default_sampler}
    return rows, timing


def sd3_samples(model_dir: Path, prompts: list[str], seed: int = 0, guidance: float = 5.0) -> tuple[list, dict]:
    import diffusers  # noqa: PLC0415

    from ditbake.runtime.text_encoder import TextEncoder  # noqa: PLC0415

    model = diffusers.SD3Transformer2DModel.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    encoder = TextEncoder.load(max_length=TEXT_LEN)
    spec = TESTBEDS["sd3"][1]
    all_prompts = prompts + [""]
    tokens, mask = encoder.encode_with_mask(all_prompts)
    pooled = tokens.sum(1) / mask.sum(1, keepdim=True)
    n = len(prompts)
    cond_t, cond_p = tokens[:n], pooled[:n]
    uncond_t, uncond_p = tokens[n:].expand(n, -1, -1), pooled[n:].expand(n, -1)

    def velocity(x, t, conditional):
        return flow.model_velocity(model, "image", x, t, cond_t if conditional else uncond_t,
                                   cond_p if conditional else uncond_p)

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, 3, spec.height, spec.width), generator=gen)
    start = time.perf_counter()
    images = flow.euler_sample(velocity, noise, steps=20, guidance_scale=guidance)
    seconds = (time.perf_counter() - start) / n
    # a second and third seed per prompt, to show variety
    more = [flow.euler_sample(velocity, torch.randn(noise.shape, generator=gen), steps=20, guidance_scale=guidance)
            for _ in range(3)]
    rows = [[_to_uint8(images[i])] + [_to_uint8(m[i]) for m in more] for i in range(n)]
    return rows, {"cpu_seconds_per_image": seconds, "threads": torch.get_num_threads(), "steps": 20,
                  "sampler": "flow_euler (exporter/testbed/flow.py, diffusers forward)"}


def plot_stages(model_dir: Path) -> Path:
    """loss.png of a bed trained in stages at several resolutions (history.json {"stages": [...]}, one
    entry per `train fit` run in order): held-out losses are comparable only within one resolution."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from ditbake.exporter.testbed.train import running_mean  # noqa: PLC0415

    stages = json.loads((model_dir / "history.json").read_text())["stages"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    palette, labelled, offset = ["tab:blue", "tab:red", "tab:green", "tab:purple"], set(), 0
    sizes = sorted({tuple(s["clip"]) for s in stages})
    for s in stages:
        hist, size = s["history"], tuple(s["clip"])
        colour, name = palette[sizes.index(size) % len(palette)], "×".join(map(str, size)) + " px"
        smooth = running_mean(hist["train_loss"], max(1, len(hist["train_loss"]) // 60))
        ax.plot([offset + x for x in hist["step"]], smooth, color=colour, lw=1, alpha=0.6,
                label=None if ("train", size) in labelled else f"train, {name}")
        ax.plot([offset + x for x in hist["eval_step"]], hist["held_out_loss"], "o-", ms=3, color=colour,
                label=None if ("held", size) in labelled else f"held-out (EMA), {name}")
        labelled |= {("train", size), ("held", size)}
        offset += s["steps"]
        ax.axvline(offset, color="gray", lw=0.5, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("velocity MSE")
    ax.set_title(f"{model_dir.name}: {len(stages)} stages")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(model_dir / "loss.png", dpi=100)
    plt.close(fig)
    return model_dir / "loss.png"


def combined_history(model_dir: Path) -> dict:
    """The training history, with an earlier stage (history_stage1.json, continued with --init) prepended."""
    history = json.loads((model_dir / "history.json").read_text())["history"]
    first = model_dir / "history_stage1.json"
    if not first.exists():
        return history
    h1 = json.loads(first.read_text())["history"]
    offset = h1["step"][-1] + 1
    return {"step": h1["step"] + [s + offset for s in history["step"]],
            "train_loss": h1["train_loss"] + history["train_loss"],
            "eval_step": h1["eval_step"] + [s + offset for s in history["eval_step"]],
            "held_out_loss": h1["held_out_loss"] + history["held_out_loss"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditbake.exporter.testbed.samples")
    parser.add_argument("--model", choices=sorted(TESTBEDS), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--plot-only", action="store_true", help="only redraw loss.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir = ARTIFACTS / f"testbed-{args.model}"
    from ditbake.exporter.testbed.train import plot_loss  # noqa: PLC0415

    if "stages" in json.loads((model_dir / "history.json").read_text()):
        plot_stages(model_dir)
    else:
        plot_loss(combined_history(model_dir), model_dir / "loss.png", f"test-bed {args.model}")
    if args.plot_only:
        return 0
    if args.model not in SAMPLE_PROMPTS:
        log.error("%s is GPU-sized (16,384 tokens): its samples.png comes from `python -m "
                  "ditbake.exporter.testbed.generate --grid` on the GPU (benchmarks/train_testbed16k.sh)", args.model)
        return 2
    prompts = SAMPLE_PROMPTS[args.model]
    make = wan_samples if args.model == "wan" else sd3_samples
    rows, timing = make(model_dir, prompts, args.seed, args.guidance)
    write_grid(rows, prompts, model_dir / "samples.png")
    (model_dir / "timing.json").write_text(json.dumps(timing, indent=1))
    log.info("wrote %s, loss.png, timing.json: %s", model_dir / "samples.png", timing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
