"""`ditbake run`: text in, frames out with an artifact.

    ditbake run ART --prompt "a cat walks on the beach" --height 480 --width 832 --frames 81 --output clip.mp4

Writes the decoded video (MP4) or image/frames (PNG) and the latents beside it; a batch of prompts
(`--prompt` repeated, or a .txt with one per line) writes every sample, numbered. `--out DIR` keeps
the earlier outputs (clip.gif, strip.png, report.json) for every sample.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from ditbake.runtime.errors import InputError

log = logging.getLogger("ditbake")

FPS = {"wan": 16, "cogvideox": 8}


def add_run_arguments(p: argparse.ArgumentParser, dtypes) -> None:
    p.add_argument("artifact")
    p.add_argument("--prompt", action="append",
                   help="prompt text (repeat for a batch) or a .txt file with one prompt per line")
    p.add_argument("--negative-prompt", help="negative prompt (default: the artifact's)")
    p.add_argument("--prompts", help="safetensors with 'embeds' [N, L, D] and optional 'negative' (instead of text)")
    p.add_argument("--random-embeddings", action="store_true",
                   help="random prompt embeddings (models without a text encoder; speed work only)")
    p.add_argument("--output", help="clip.mp4 (video) or frames.png (image, or a video's frames side by side); "
                                    "latents go to <stem>.latents.safetensors; numbered for a batch")
    p.add_argument("--out", help="directory for clip.gif, strip.png and report.json (per sample)")
    g = p.add_argument_group("shape (pixels; one of the artifact's profiles)")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--frames", type=int)
    g.add_argument("--profile", help="profile name (see `ditbake inspect`), e.g. 480x832x81")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale (1: off; default: the pipeline's, else 5)")
    p.add_argument("--distilled-guidance", type=float,
                   help="Flux guidance-distilled models: the guidance embedding's scale (default the artifact's, 3.5)")
    p.add_argument("--sampler")
    p.add_argument("--fps", type=int, help="video frame rate (default: 16 for Wan, 8 for CogVideoX)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=dtypes)
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each step's forward from a CUDA graph (default: where the artifact allows)")
    p.add_argument("--gpus", type=int, default=1, help="processes (one per GPU, or gloo ranks on --device cpu); "
                   "N > 1 re-launches this command under torchrun")
    p.add_argument("--parallel", choices=("cfg", "ulysses", "cfg+ulysses"),
                   help="cfg: CFG branches on different GPUs; ulysses: visual tokens split across GPUs; "
                        "default: cfg (2 GPUs) or cfg+ulysses (4, 6, ...) with guidance, ulysses without")


def pick_profile(session, name: str | None, height: int | None, width: int | None, frames: int | None):
    """The profile named `name`, or the one whose pixel size is H×W×F (unset ones: any)."""
    if name or not (height or width or frames):
        return session.profile(name)
    wanted = (height, width, frames)
    matches = []
    for p in session.profiles:
        try:
            dims = tuple(int(x) for x in p.name.split("x"))
        except ValueError:
            continue
        if len(dims) == 3 and all(w is None or w == d for w, d in zip(wanted, dims)):
            matches.append(p)
    if len(matches) != 1:
        have = ", ".join(p.name for p in session.profiles)
        what = "x".join("?" if v is None else str(v) for v in wanted)
        raise InputError(f"{'no' if not matches else 'more than one'} shape profile matches {what} (H×W×frames); "
                         f"this artifact has {have}; rebuild with `ditbake build --profile HxWxF` to add one")
    return matches[0]


def read_prompt_args(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    prompts = []
    for v in values:
        path = Path(v)
        if path.suffix == ".txt":
            if not path.is_file():
                raise InputError(f"prompt file {path} does not exist")
            prompts += [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        else:
            prompts.append(v)
    if not prompts:
        raise InputError("no prompt given (the .txt holds none)")
    return prompts


def frames_of(session, latents: torch.Tensor) -> torch.Tensor:
    """Decoded frames [B, F, H, W, 3]; artifacts without a VAE whose latents are not pixels are shown
    through three normalised latent channels (a view, logged as such)."""
    c = latents.shape[1] if session.artifact.architecture != "cogvideox" else latents.shape[2]
    if session.components is None and c != 3:
        from ditbake.exporter.media import latents_to_frames  # noqa: PLC0415

        log.warning("the artifact stores no VAE: showing 3 latent channels, not a decode (build from the pipeline "
                    "directory to get frames)")
        return torch.stack([torch.from_numpy(latents_to_frames(x, session.artifact.architecture)).float() / 255
                            for x in latents])
    return session.decode(latents)


def cmd_run(args) -> int:
    from tqdm.auto import tqdm  # noqa: PLC0415

    from ditbake.exporter.calibrate import load_prompt_embeds  # noqa: PLC0415
    from ditbake.exporter.cli import DTYPES  # noqa: PLC0415
    from ditbake.runtime import distributed, load  # noqa: PLC0415

    if not args.output and not args.out:
        raise InputError("say where to write: --output clip.mp4|frames.png (or --out DIR for GIF + strip)")
    parallel, relaunch = distributed.cli_launch(args.gpus, args.parallel, args.guidance or 5.0, args.device)
    if relaunch:  # one process per GPU under torchrun, each running this same command
        return distributed.relaunch(args.gpus, ["ditbake.exporter.cli", *args.argv])
    session = load(args.artifact, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
                   cuda_graphs=args.cuda_graphs, parallel=parallel)
    prof = pick_profile(session, args.profile, args.height, args.width, args.frames)
    prompts = read_prompt_args(args.prompt)
    embeds = negative = pooled = negative_pooled = None
    if args.prompts:
        if prompts:
            raise InputError("pass --prompt text or --prompts embeddings, not both")
        from ditbake.exporter.calibrate import load_pooled  # noqa: PLC0415

        embeds, negative = load_prompt_embeds(args.prompts)
        pooled, negative_pooled = load_pooled(args.prompts)
    elif not prompts:
        if not args.random_embeddings:
            raise InputError("no prompt: pass --prompt TEXT (or --prompts EMBEDS.safetensors, or --random-embeddings)")
        from ditbake.exporter.calibrate import random_prompt_embeds  # noqa: PLC0415

        c = session.config
        text_dim = int(c.get("text_dim", c.get("text_embed_dim", c.get("joint_attention_dim", 0))))
        embeds = random_prompt_embeds(1, prof.text_len, text_dim, args.seed)
        if "pooled" in session.extra_inputs and not session.arch.pooled_is_token_mean(session.config):
            pooled = random_prompt_embeds(1, 1, session.arch.pooled_dim(session.config), args.seed + 1)[:, 0]
        log.warning("--random-embeddings: generating from random prompt embeddings")
    if args.guidance is None:
        args.guidance = float((session.artifact.manifest.get("components") or {}).get("guidance_scale", 5.0))
    writer = getattr(session, "is_writer", True)
    result = session.generate(embeds, negative, prompt=prompts, negative_prompt=args.negative_prompt, seed=args.seed,
                              guidance_scale=args.guidance, profile=prof.name, sampler=args.sampler,
                              pooled_embeds=pooled, negative_pooled_embeds=negative_pooled,
                              guidance=args.distilled_guidance,
                              progress=lambda it: tqdm(it, desc="denoise", unit="step", disable=not writer))
    if parallel:
        distributed.shutdown()
    if not writer:  # every rank holds the same latents; rank 0 writes them
        return 0
    frames = frames_of(session, result.latents)
    label = session.artifact.manifest["model"].get("label", "")
    report = result.report.to_json() | {"artifact": str(args.artifact), "label": label, "prompts": prompts}
    if args.output:
        from ditbake.exporter.video import write_samples  # noqa: PLC0415

        fps = args.fps or FPS.get(session.artifact.architecture, 8)
        # pixel-space test beds are tiny (32 px): upscaled so a player shows them
        min_side = 256 if session.components is None else 0
        paths = write_samples(frames, result.latents, args.output, fps=fps, min_side=min_side)
        log.info("wrote %s (+ latents) in %.1f s", ", ".join(str(p) for p in paths), report["seconds"])
    if args.out:
        _write_previews(frames, prompts, label, report, Path(args.out))
    return 0


def _write_previews(frames: torch.Tensor, prompts, label: str, report: dict, out: Path) -> None:
    """clip.gif + strip.png per sample (numbered for a batch) and report.json."""
    from ditbake.exporter.media import write_gif, write_strip  # noqa: PLC0415
    from ditbake.exporter.video import to_uint8  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    n = frames.shape[0]
    for i in range(n):
        suffix = f"_{i:03d}" if n > 1 else ""
        pixels = to_uint8(frames[i])
        text = prompts[i] if prompts and i < len(prompts) else ""
        write_gif(pixels, out / f"clip{suffix}.gif")
        write_strip(pixels, out / f"strip{suffix}.png", label=f"{label}: {text}" if text else label)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log.info("wrote %d sample(s) to %s (clip.gif, strip.png, report.json)", n, out)
