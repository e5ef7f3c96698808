"""The `ditbake` command: calibrate → plan → build → run, plus inspect, package and unpack."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from ditbake.runtime.errors import DitbakeError, InputError

log = logging.getLogger("ditbake")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _latent_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("shape (latent units; defaults from the model)")
    g.add_argument("--frames", type=int, help="latent frames")
    g.add_argument("--height", type=int, help="latent height")
    g.add_argument("--width", type=int, help="latent width")
    g.add_argument("--text-len", type=int, help="prompt embedding length")


def _default_shape(adapter, args) -> tuple[tuple[int, ...], int]:
    c = adapter.config
    if adapter.architecture == "cogvideox":
        frames = args.frames or (int(c["sample_frames"]) - 1) // int(c["temporal_compression_ratio"]) + 1
        h, w = args.height or int(c["sample_height"]), args.width or int(c["sample_width"])
        text_len = int(c["max_text_seq_length"])
        if args.text_len and args.text_len != text_len:
            raise InputError(f"CogVideoX needs text length {text_len} (max_text_seq_length), got {args.text_len}")
    else:
        frames, h, w = args.frames or 3, args.height or 16, args.width or 16
        text_len = args.text_len or 16
    return adapter.latent_shape(frames, h, w), text_len


def cmd_calibrate(args) -> int:
    from ditbake.exporter import calibrate as cal, models  # noqa: PLC0415
    from ditbake.exporter.adapters import adapter_for  # noqa: PLC0415

    adapter = adapter_for(models.load(args.model, dtype=DTYPES[args.dtype], seed=args.weights_seed))
    latent, text_len = _default_shape(adapter, args)
    text_dim = int(adapter.config.get("text_dim", adapter.config.get("text_embed_dim")))
    if args.prompts:
        embeds, negative = cal.load_prompt_embeds(args.prompts)
    else:
        embeds, negative = cal.random_prompt_embeds(args.num_prompts, text_len, text_dim, args.seed), None
    if embeds.shape[1:] != (text_len, text_dim) and adapter.architecture == "cogvideox":
        raise InputError(f"prompt embeddings are {list(embeds.shape)}; the model expects [N, {text_len}, {text_dim}]")
    if embeds.shape[-1] != text_dim:
        raise InputError(f"prompt embeddings have dim {embeds.shape[-1]}; the model expects {text_dim}")
    stats = cal.calibrate(adapter, embeds, negative, latent=latent, sampler=args.sampler or _samplers(adapter)[0],
                          num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, source=str(args.model))
    stats.meta["weights_seed"] = args.weights_seed
    stats.meta["dtype"] = args.dtype
    out = stats.save(args.out)
    g = stats.tensors["gamma"]
    log.info("calibration written to %s (Γ mean %.4f, min %.4f, max %.4f)", out, g.mean(), g.min(), g.max())
    return 0


def _samplers(adapter) -> tuple[str, ...]:
    from ditbake.exporter.sampler import SAMPLERS  # noqa: PLC0415

    return SAMPLERS[adapter.architecture]


def cmd_plan(args) -> int:
    from ditbake.exporter.calibrate import CalibrationStats  # noqa: PLC0415
    from ditbake.exporter.planner import plan_from_calibration  # noqa: PLC0415

    from ditbake.exporter.plan_cache import CacheConfig  # noqa: PLC0415

    stats = CalibrationStats.load(args.calibration)
    cache = None
    if args.tdc_tau is not None or args.tdc_skip_budget is not None:
        cache = CacheConfig(tau=args.tdc_tau if args.tdc_tau is not None else 0.0, max_run=args.tdc_max_run,
                            skip_budget=args.tdc_skip_budget)
    plan = plan_from_calibration(stats.meta, mode=args.mode, tensors=stats.tensors, cache=cache)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plan.save(args.out)
    log.info("plan written to %s: %d steps, %d variants, skip fraction %.2f", args.out, plan.num_steps,
             len(plan.variants), plan.skip_fraction())
    return 0


def cmd_build(args) -> int:
    from ditbake.exporter import build as builder, models  # noqa: PLC0415
    from ditbake.exporter.adapters import adapter_for  # noqa: PLC0415
    from ditbake.exporter.calibrate import CalibrationStats  # noqa: PLC0415
    from ditbake.runtime.artifact import Profile  # noqa: PLC0415
    from ditbake.runtime.plan import Plan  # noqa: PLC0415

    stats = CalibrationStats.load(args.calibration)
    seed = int(stats.meta.get("weights_seed", 0))
    adapter = adapter_for(models.load(args.model, dtype=torch.float32, seed=seed))
    plan = Plan.load(args.plan)
    latent = tuple(stats.meta["latent_shape"])
    profile = Profile(f"f{latent[1] if adapter.architecture == 'wan' else latent[0]}_h{latent[2]}_w{latent[3]}"
                      f"_t{stats.meta['text_len']}", latent, int(stats.meta["text_len"]))
    samplers = args.samplers.split(",") if args.samplers else list(_samplers(adapter))
    if stats.meta["sampler"] in samplers:  # the calibrated sampler is the default
        samplers.remove(stats.meta["sampler"])
        samplers.insert(0, stats.meta["sampler"])
    out = builder.build(adapter, plan, args.out, profiles=[profile], samplers=samplers, dtype=DTYPES[args.dtype],
                        backend=args.backend, label=args.label, device=args.device,
                        text_encoder=args.text_encoder)
    log.info("artifact ready: %s", out)
    return 0


def cmd_run(args) -> int:
    from tqdm.auto import tqdm  # noqa: PLC0415

    from ditbake.exporter.calibrate import load_prompt_embeds, random_prompt_embeds  # noqa: PLC0415
    from ditbake.exporter.media import latents_to_frames, write_gif, write_strip  # noqa: PLC0415
    from ditbake.runtime import load  # noqa: PLC0415

    session = load(args.artifact, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None)
    prof = session.profile(args.profile)
    embeds = negative = None
    if args.prompts:
        embeds, negative = load_prompt_embeds(args.prompts)
    elif not args.prompt:
        text_dim = int(session.config.get("text_dim", session.config.get("text_embed_dim")))
        embeds = random_prompt_embeds(1, prof.text_len, text_dim, args.seed)
        log.warning("no --prompt or --prompts: using random prompt embeddings")
    result = session.generate(embeds, negative, prompt=args.prompt, seed=args.seed, guidance_scale=args.guidance,
                              profile=prof.name, sampler=args.sampler,
                              progress=lambda it: tqdm(it, desc="denoise", unit="step"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = session.artifact.manifest["model"].get("label", "")
    frames = latents_to_frames(result.latents[0], session.artifact.architecture)
    write_gif(frames, out / "clip.gif")
    write_strip(frames, out / "strip.png", label=f"{label}: {args.prompt}" if args.prompt else label)
    report = result.report.to_json() | {"artifact": str(args.artifact), "label": label, "prompt": args.prompt}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log.info("wrote %s, %s and report.json (%d steps in %.1f s, %s)", out / "clip.gif", out / "strip.png",
             report["steps"], report["seconds"], label or "model")
    return 0


def cmd_inspect(args) -> int:
    from ditbake.runtime.artifact import load_artifact  # noqa: PLC0415

    art = load_artifact(args.artifact)
    m = art.manifest
    plan = art.plan
    summary = {
        "format": f"{m['format']} v{m['format_version']}", "producer": m["producer"],
        "model": {k: m["model"][k] for k in ("architecture", "diffusers_class", "label", "parameters")},
        "dtype": m["dtype"], "backend": m["backend"], "profiles": m["profiles"],
        "samplers": sorted(art.samplers), "default_sampler": art.default_sampler,
        "plan": {"mode": plan.mode, "steps": plan.num_steps, "blocks": plan.num_blocks,
                 "variants": len(plan.variants), "skip_fraction": plan.skip_fraction(), "predicted": plan.predicted},
        "files": m["files"], "hashes": "verified",
    }
    print(json.dumps(summary, indent=1))
    return 0


def cmd_package(args) -> int:
    from ditbake.runtime.package import pack  # noqa: PLC0415

    out = pack(args.artifact, args.out)
    log.info("packaged %s → %s (%.1f MB)", args.artifact, out, out.stat().st_size / 1e6)
    return 0


def cmd_unpack(args) -> int:
    from ditbake.runtime.package import unpack  # noqa: PLC0415

    log.info("unpacked and verified %s → %s", args.package, unpack(args.package, args.out))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditbake", description="Ahead-of-time compiler for diffusion transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("calibrate", help="run the model over prompts and the whole trajectory, record statistics")
    p.add_argument("--model", required=True, help="local diffusers dir, config .json (random weights) or tiny-wan/tiny-cogvideox")
    p.add_argument("--out", required=True, help="output directory for calibration.json + stats.safetensors")
    p.add_argument("--prompts", help="safetensors with 'embeds' [N, L, D] (and optional 'negative')")
    p.add_argument("--num-prompts", type=int, default=2, help="random prompt embeddings when --prompts is absent")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", help="flow_euler|unipc (Wan), ddim|dpmpp (CogVideoX)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights-seed", type=int, default=0, help="seed of random weights for config sources")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    _latent_args(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("plan", help="decide per step and block how to compute; writes plan.json")
    p.add_argument("--calibration", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("baked",), default="baked",
                   help="baked: the runtime only looks each step up (adaptive mode: not yet)")
    g = p.add_argument_group("Temporal Delta Cache (skip blocks, reuse cached residual)")
    g.add_argument("--tdc-tau", type=float, help="accumulated Δ-change threshold per skip run")
    g.add_argument("--tdc-skip-budget", type=float, help="target fraction of block computations to skip (searches tau)")
    g.add_argument("--tdc-max-run", type=int, default=2, help="most consecutive skips of one block")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("build", help="bake model, plan and samplers into an artifact directory")
    p.add_argument("--model", required=True)
    p.add_argument("--plan", required=True)
    p.add_argument("--calibration", required=True, help="calibration dir (shape profile, weights seed)")
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="eager", choices=("eager", "aoti"),
                   help="eager: ops composed at run time; aoti: AOTInductor packages per block variant")
    p.add_argument("--device", default="cpu", help="device the aoti engines are compiled for")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--samplers", help="comma-separated samplers to bake; the first is the default")
    p.add_argument("--label", default="", help="shown on outputs, e.g. 'RANDOM WEIGHTS'")
    p.add_argument("--text-encoder", action="store_true",
                   help="record the shipped MiniLM text encoder so `run --prompt TEXT` works")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("run", help="generate with an artifact; writes clip.gif, strip.png, report.json")
    p.add_argument("artifact")
    p.add_argument("--out", required=True)
    p.add_argument("--prompt", help="free-text prompt (artifact built with --text-encoder)")
    p.add_argument("--prompts", help="safetensors with 'embeds' [N, L, D] and optional 'negative'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--sampler")
    p.add_argument("--profile")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("package", help="write the artifact as one tar (manifest + indexed files, hashes checked)")
    p.add_argument("artifact")
    p.add_argument("--out", required=True, help="output .tar")
    p.set_defaults(func=cmd_package)

    p = sub.add_parser("unpack", help="unpack a package safely and verify every hash before it lands")
    p.add_argument("package")
    p.add_argument("--out", required=True, help="artifact directory to create or replace")
    p.set_defaults(func=cmd_unpack)

    from ditbake.exporter.evaluate import add_eval_parser  # noqa: PLC0415

    add_eval_parser(sub)

    p = sub.add_parser("inspect", help="validate an artifact (hashes, plan) and print its summary")
    p.add_argument("artifact")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except DitbakeError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
