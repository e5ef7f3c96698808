"""Generate clips of a test-bed model for captions of a split, straight through diffusers (any device).

Used where the runtime is not the point — judging a freshly trained bed on the GPU between training
calls and feeding the prompt-adherence score (`adherence.py`) — with the caption-embedding table of
`train embed`, so no text encoder is needed on the GPU machine:

    python -m ditbake.exporter.testbed.generate --model-dir OUT/stage2 --embeds out/testbed \\
        --split held_out --out OUT/clips.safetensors --grid OUT/samples.png

Writes `clips` uint8 [N, 3, F, H, W] (pixels (x + 1) · 127.5), `caption_ids` [N] and `seeds` [N].
Sampler: flow-match Euler, 20 steps, CFG 5, shift 3 (`flow.euler_sample`), the empty prompt as negative.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ditbake.exporter.testbed import data, flow
from ditbake.exporter.testbed.models import data_spec_of
from ditbake.exporter.testbed.train import load_embeds, load_model

log = logging.getLogger("ditbake.testbed")


@torch.no_grad()
def generate(model, tokens: torch.Tensor, caption_ids: list[int], seeds: list[int], spec: data.ClipSpec,
             steps: int = 20, guidance: float = 5.0, batch: int = 8) -> torch.Tensor:
    """Clips in [-1, 1], [N, 3, F, H, W] float32 on the CPU; noise drawn per (seed) on the CPU."""
    device = next(model.parameters()).device
    empty = tokens[-1:]
    out = []
    for i in range(0, len(caption_ids), batch):
        ids, sd = caption_ids[i:i + batch], seeds[i:i + batch]
        cond = tokens[torch.tensor(ids, device=tokens.device)]
        uncond = empty.expand(len(ids), -1, -1)
        noise = torch.stack([torch.randn((3, spec.frames, spec.height, spec.width),
                                         generator=torch.Generator().manual_seed(s)) for s in sd]).to(device)

        def velocity(x, t, conditional, cond=cond, uncond=uncond):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                return flow.model_velocity(model, "video", x, t, cond if conditional else uncond).float()

        out.append(flow.euler_sample(velocity, noise, steps=steps, guidance_scale=guidance).clamp(-1, 1).cpu())
        log.info("generated %d / %d", min(i + batch, len(caption_ids)), len(caption_ids))
    return torch.cat(out)


def to_uint8(clips: torch.Tensor) -> torch.Tensor:
    return ((clips.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def write_grid(clips_u8: torch.Tensor, captions: list[str], path: Path, frames: int = 6, scale: int = 2) -> Path:
    """One row per clip: caption, then `frames` evenly spaced frames."""
    from ditbake.exporter.testbed.samples import write_grid as grid  # noqa: PLC0415

    f = clips_u8.shape[2]
    pick = sorted({round(j * (f - 1) / (frames - 1)) for j in range(frames)})
    rows = [[clip[:, k].permute(1, 2, 0).numpy() for k in pick] for clip in clips_u8]
    return grid(rows, captions, path, scale=scale)


def split_ids(kind: str, rule: str, split: str, every: int = 1, limit: int = 0) -> list[int]:
    """Caption ids of `split` under held-out `rule`, every `every`-th, the first `limit` (0 = all)."""
    ids = data.held_out_ids(kind, rule)
    if split == "train":
        held = set(ids)
        ids = [i for i in range(data.num_captions(kind)) if i not in held]
    ids = ids[::every]
    return ids[:limit] if limit else ids


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m ditbake.exporter.testbed.generate")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--embeds", type=Path, required=True, help="directory written by `train embed`")
    p.add_argument("--split", choices=("held_out", "train"), default="held_out")
    p.add_argument("--held-out-rule", choices=data.HELD_OUT_RULES,
                   help="split the captions by this rule instead of the bed's own (e.g. score a v1 bed on the v2 "
                        "held-out captions, which it partly saw in training)")
    p.add_argument("--limit", type=int, default=0, help="first N captions of the split (0 = all)")
    p.add_argument("--every", type=int, default=1, help="every K-th caption of the split (a spread-out subset)")
    p.add_argument("--seed", type=int, default=0, help="clip i uses seed + i")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--grid", type=Path, help="also a PNG grid of the first 12 clips")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = data_spec_of(args.model_dir)
    rule = args.held_out_rule or spec.held_out_rule
    if args.every < 1:
        p.error("--every must be >= 1")
    ids = split_ids(spec.kind, rule, args.split, args.every, args.limit)
    device = torch.device(args.device)
    model = load_model(args.model_dir).to(device).eval()
    tokens, _ = load_embeds(args.embeds, spec.kind, device)
    seeds = [args.seed + i for i in range(len(ids))]
    clips = to_uint8(generate(model, tokens, ids, seeds, spec, args.steps, args.guidance, args.batch))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"clips": clips.contiguous(), "caption_ids": torch.tensor(ids), "seeds": torch.tensor(seeds)},
              str(args.out), metadata={"model_dir": str(args.model_dir), "steps": str(args.steps),
                                       "guidance": str(args.guidance), "sampler": "flow_euler shift 3",
                                       "split": args.split, "held_out_rule": rule})
    if args.grid:
        write_grid(clips[:12], [data.caption_from_attributes(spec.kind, data.attributes_of(spec.kind, i))
                                for i in ids[:12]], args.grid)
    log.info("wrote %s (%d clips)", args.out, len(ids))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
