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


def _calibration_shape(adapter, args) -> tuple[tuple[int, ...], int, tuple[int, int, int] | None]:
    """(latent shape, text length, pixels or None): a pipeline directory takes `--profile HxWxF` in
    pixels (latent from its VAE's factors) and its pipeline's text length; other sources latent units."""
    from ditbake.exporter import pipeline  # noqa: PLC0415

    if not pipeline.is_pipeline_dir(args.model) or (args.frames or args.height or args.width) and not args.profile:
        if args.profile:
            raise InputError("--profile HxWxF (pixels) needs a pipeline directory (its VAE gives the latent size); "
                             "use --frames/--height/--width in latent units")
        latent, text_len = _default_shape(adapter, args)
        return latent, text_len, None
    spec = pipeline.pipeline_spec(args.model)
    pixels = pipeline.parse_pixels(args.profile or pipeline.default_pixels(args.model, spec))
    f, h, w = pipeline.latent_dims(args.model, adapter.architecture, *pixels)
    text_len = args.text_len or spec.default_text_len
    if adapter.architecture == "cogvideox":
        text_len = int(adapter.config["max_text_seq_length"])
    return adapter.latent_shape(f, h, w), text_len, pixels


def cmd_calibrate(args) -> int:
    from ditbake.exporter import calibrate as cal, models  # noqa: PLC0415
    from ditbake.exporter.adapters import adapter_for  # noqa: PLC0415
    from ditbake.exporter.prompt_source import conditioning  # noqa: PLC0415
    from ditbake.runtime import arch as runtime_arch  # noqa: PLC0415

    from ditbake.exporter.calibrate_checkpoint import partial_dir  # noqa: PLC0415

    device = cal.calibration_device(args.device)
    adapter = adapter_for(models.load(args.model, dtype=DTYPES[args.dtype], seed=args.weights_seed).to(device))
    latent, text_len, pixels = _calibration_shape(adapter, args)
    if args.guidance is None:
        from ditbake.exporter.pipeline import default_cfg  # noqa: PLC0415

        args.guidance = default_cfg(args.model)
    text_dim = int(adapter.config.get("text_dim", adapter.config.get("text_embed_dim",
                                                                      adapter.config.get("joint_attention_dim", 0))))
    # SD3 / Flux with a real pooled input: random embeddings need a random pooled vector too
    pooled_dim = adapter.arch.pooled_dim(adapter.config) if (
        "pooled" in runtime_arch.extra_inputs(adapter.arch, adapter.config)
        and not adapter.arch.pooled_is_token_mean(adapter.config)) else None
    cond = conditioning(str(args.model), text_dim, text_len, prompts_arg=args.prompts,
                        negative_prompt=args.negative_prompt, num_prompts=args.num_prompts,
                        random_embeddings=args.random_embeddings, seed=args.seed, pooled_dim=pooled_dim)
    embeds, negative, pooled, negative_pooled = cond.embeds, cond.negative, cond.pooled, cond.negative_pooled
    if embeds.shape[1:] != (text_len, text_dim) and adapter.architecture == "cogvideox":
        raise InputError(f"prompt embeddings are {list(embeds.shape)}; the model expects [N, {text_len}, {text_dim}]")
    if embeds.shape[-1] != text_dim:
        raise InputError(f"prompt embeddings have dim {embeds.shape[-1]}; the model expects {text_dim}")
    text_len = int(embeds.shape[1])
    observers = []
    if args.precision_stats:  # DMPQ statistics in the same pass (E_rel per format, outlier ratios)
        from ditbake.exporter.calibrate_precision import PrecisionObserverConfig, observer_factory  # noqa: PLC0415

        cache_gb = args.precision_weight_cache_gb  # range-checked with the other arguments (outputs.check_args)
        observers.append(observer_factory(PrecisionObserverConfig(
            max_tokens=args.precision_max_tokens,
            weight_cache_bytes=None if cache_gb is None else int(cache_gb * 1e9))))
    hessian_collector = None
    if args.gptq_hessians:  # GPTQ's per-layer input second moments, from the same pass (exporter/gptq.py)
        from ditbake.exporter.gptq import HessianCollector  # noqa: PLC0415

        if args.resume:
            raise InputError("--gptq-hessians sums over the whole pass; run it without --resume")
        hessian_collector = HessianCollector(args.gptq_max_tokens)
        observers.append(hessian_collector.factory)
    sched = _scheduler_config(args.model)
    stats = cal.calibrate(adapter, embeds, negative, latent=latent, sampler=args.sampler or _samplers(adapter, sched)[0],
                          num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, source=str(args.model),
                          observers=observers, batch_size=args.batch_size, checkpoint_dir=partial_dir(args.out),
                          resume=args.resume, scheduler_config=sched, pooled=pooled, negative_pooled=negative_pooled)
    stats.meta["weights_seed"] = args.weights_seed
    stats.meta["dtype"] = args.dtype
    stats.meta["conditioning"] = {"origin": cond.origin, "prompts": list(cond.prompts),
                                  "negative_prompt": args.negative_prompt}
    if pixels:
        stats.meta["pixels"] = list(pixels)  # height, width, frames of the calibrated profile
    if args.heads_delta is not None:  # the progressive head search interleaves with its own trajectory
        from ditbake.exporter.calibrate_heads import calibrate_heads  # noqa: PLC0415

        tensors, heads_meta = calibrate_heads(adapter, embeds, negative, latent=latent,
                                              sampler=stats.meta["sampler"], num_steps=args.steps,
                                              guidance_scale=args.guidance, seed=args.seed, config=_heads_config(args),
                                              checkpoint_dir=partial_dir(args.out, "heads"), resume=args.resume,
                                              scheduler_config=sched, pooled=pooled, negative_pooled=negative_pooled)
        stats.tensors.update(tensors)
        stats.meta["heads"] = heads_meta
    out = stats.save(args.out, force=args.force)
    if hessian_collector is not None:
        from ditbake.exporter.gptq import HESSIANS_FILE, save_hessians  # noqa: PLC0415

        hessians = hessian_collector.hessians()  # K² per layer (≈ 12 GB for the 1.3B): made once
        save_hessians(out / HESSIANS_FILE, hessians)
        log.info("GPTQ input statistics of %d layers written to %s", len(hessians), out / HESSIANS_FILE)
    if args.precision_stats:
        _precision_outputs(stats, out)
    g = stats.tensors["gamma"]
    log.info("calibration written to %s (Γ mean %.4f, min %.4f, max %.4f)", out, g.mean(), g.min(), g.max())
    return 0


def _precision_outputs(stats, out: Path) -> None:
    """precision.json (Hadamard choice, predictor fits and R²) and the Γ–E_rel scatter beside the stats."""
    from ditbake.exporter.calibrate_precision import precision_report, scatter_plot  # noqa: PLC0415

    layers = tuple(stats.meta["linear_layers"])
    report = precision_report(stats.tensors, layers)
    (Path(out) / "precision.json").write_text(json.dumps(report, indent=1))
    scatter_plot(stats.tensors, layers, Path(out) / "precision_scatter.png", title=str(stats.meta["source"]))
    fit = report["formats"]["nvfp4"]
    log.info("DMPQ predictor E_rel = a·Γ(t−1) + b: R² within layers %.3f, median per layer %s (precision.json, "
             "precision_scatter.png)", fit["r2_within"], fit["r2_median_layer"])


def _heads_config(args, base=None):
    """HeadsConfig from the --heads-* flags (unset flags keep `base`'s values or the defaults)."""
    from dataclasses import replace  # noqa: PLC0415

    from ditbake.exporter.plan_heads import HeadsConfig  # noqa: PLC0415

    def floats(text):
        try:
            return tuple(float(x) for x in text.split(","))
        except ValueError:
            raise InputError(f"expected comma-separated numbers, got {text!r}") from None

    config = base or HeadsConfig()
    changes = {}
    if args.heads_delta is not None:
        changes["delta"] = args.heads_delta
    if args.heads_c is not None:
        changes["head_factor"] = args.heads_c
    if getattr(args, "heads_widths", None):
        changes["arrow_fractions"] = floats(args.heads_widths)
    if getattr(args, "heads_no_cache", False):
        changes["caching"] = False
    if getattr(args, "heads_tile", None):
        changes["local3d_tile"] = tuple(int(x) for x in floats(args.heads_tile))
    if getattr(args, "heads_precisions", None):
        changes["attention_precisions"] = tuple(p.strip() for p in args.heads_precisions.split(",") if p.strip())
    if getattr(args, "heads_8bit_speedup", None) is not None:
        changes["eight_bit_speedup"] = args.heads_8bit_speedup
    return replace(config, **changes)


def _samplers(adapter, scheduler_config: dict | None = None) -> tuple[str, ...]:
    from ditbake.exporter.sampler import default_samplers  # noqa: PLC0415

    return default_samplers(adapter.architecture, scheduler_config)


def _scheduler_config(model) -> dict | None:
    """The pipeline's own scheduler/ config (None for tiny models, config files, bare transformers)."""
    from ditbake.exporter import scheduler_config  # noqa: PLC0415

    return scheduler_config.read(model)


def cmd_plan(args) -> int:
    from ditbake.exporter.calibrate import CalibrationStats  # noqa: PLC0415
    from ditbake.exporter.planner import plan_from_calibration  # noqa: PLC0415

    from ditbake.exporter.plan_cache import CacheConfig  # noqa: PLC0415

    stats = CalibrationStats.load(args.calibration)
    cache = None
    if args.tdc_tau is not None or args.tdc_skip_budget is not None:
        cache = CacheConfig(tau=args.tdc_tau if args.tdc_tau is not None else 0.0, max_run=args.tdc_max_run,
                            skip_budget=args.tdc_skip_budget, metric=args.tdc_metric,
                            granularity=args.tdc_granularity, extrapolate=args.tdc_extrapolate)
    passes = []
    if args.heads or args.heads_delta is not None or args.heads_c is not None:
        from ditbake.exporter.plan_heads import HeadsConfig, heads_pass  # noqa: PLC0415

        heads_meta = stats.meta.get("heads") or {}
        base = HeadsConfig.from_json(heads_meta["config"]) if heads_meta.get("config") else None
        passes.append(heads_pass(stats.tensors, heads_meta, _heads_config(args, base) if base else None))
    precision = _precision_config(args)
    if precision is not None or args.mode == "adaptive" or args.pdr:
        from ditbake.exporter.plan_pdr import PdrConfig  # noqa: PLC0415
        from ditbake.exporter.plan_quantized import quantized_plan  # noqa: PLC0415

        pdr = None if args.pdr is None else (PdrConfig(args.pdr_outlier_threshold) if args.pdr else False)
        plan = quantized_plan(stats.meta, stats.tensors, precision, cache=cache, pdr=pdr, mode=args.mode,
                              passes=passes)
    else:
        plan = plan_from_calibration(stats.meta, mode=args.mode, tensors=stats.tensors, cache=cache, passes=passes)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plan.save(args.out)
    log.info("plan written to %s: %d steps, %d variants, skip fraction %.2f", args.out, plan.num_steps,
             len(plan.variants), plan.skip_fraction())
    return 0


def cmd_guidance(args) -> int:
    """Place `--count` guidance skips on an artifact's plan by measurement; write the new plan."""
    import dataclasses  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from ditbake.exporter.plan_guidance import (add_guidance_skips, choose_guidance_steps,  # noqa: PLC0415
                                                eligible_steps, guidance_step_errors)
    from ditbake.exporter.prompt_source import default_prompts, is_embeddings_file, read_prompts  # noqa: PLC0415
    from ditbake.runtime import load  # noqa: PLC0415

    session = load(args.artifact, device=args.device)
    if session.plan.mode != "baked":
        raise InputError("guidance skips need a baked plan; this artifact's plan is adaptive")
    if session.plan.uncond_skip == "guidance":
        raise InputError("this artifact's plan already has guidance skips; place them on the plan without them")
    fit = (len(eligible_steps(session.plan, args.start)) + 1) // 2  # no two in a row: checked before any run
    if args.count > fit:
        raise InputError(f"--count {args.count}: at most {fit} guidance skips fit this plan from step {args.start} "
                         "(steps where both branches compute, no two in a row)")
    n, prof = args.num_prompts, session.profile()
    if args.random_embeddings:
        gen = torch.Generator().manual_seed(args.seed)
        conditioning = {"text_embeds": torch.randn(n, prof.text_len, session.text_dim, generator=gen),
                        "negative_embeds": torch.randn(n, prof.text_len, session.text_dim, generator=gen)}
        if "pooled" in session.extra_inputs and not session.arch.pooled_is_token_mean(session.config):
            pooled = session.arch.pooled_dim(session.config)
            conditioning |= {"pooled_embeds": torch.randn(n, pooled, generator=gen),
                             "negative_pooled_embeds": torch.randn(n, pooled, generator=gen)}
    else:
        if is_embeddings_file(args.prompts):
            raise InputError("ditbake guidance encodes text prompts with the artifact's encoder; pass a .txt, "
                             "'default' or one prompt (or --random-embeddings)")
        prompts = read_prompts(args.prompts) or default_prompts(n)
        conditioning = {"prompt": prompts[:n]}
    errors = guidance_step_errors(session, session.plan, [args.seed + k for k in range(args.num_seeds)],
                                  start=args.start, guidance_scale=args.guidance,
                                  progress=lambda steps: tqdm(steps, desc="one guidance skip per step", unit="step"),
                                  **conditioning)
    chosen = choose_guidance_steps(errors, args.count)
    plan = add_guidance_skips(session.plan, start=args.start, at=chosen)
    plan = dataclasses.replace(plan, predicted={**plan.predicted, "guidance_step_errors": {
        str(i): e for i, e in errors.items()}})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plan.save(args.out)
    log.info("guidance skips at steps %s (relative error alone %s); %.0f %% of the branch forwards compute; "
             "plan written to %s: build it with `ditbake build --plan %s`", chosen,
             ", ".join(f"{errors[i]:.3g}" for i in chosen), 100 * plan.predicted["forward_fraction"], args.out,
             args.out)
    return 0


def _precision_config(args):
    """PrecisionConfig from the --precision-threshold / --avg-bits / --nvfp4-fraction flags (None: bf16 plan)."""
    if args.precision_threshold is None and args.avg_bits is None and args.nvfp4_fraction is None:
        return None
    from ditbake.exporter.plan_precision import PrecisionConfig  # noqa: PLC0415

    return PrecisionConfig(threshold=args.precision_threshold, avg_bits=args.avg_bits,
                           nvfp4_fraction=args.nvfp4_fraction, predictor=args.precision_predictor)


def _build_profiles(adapter, args, meta: dict) -> list:
    """The calibrated shape, or each `--profile HxWxF` (pixels; latent from the pipeline's VAE). Named
    'HxWxF' when the pixel size is known, so `run --profile 480x832x81` or --height/--width/--frames pick it."""
    from ditbake.exporter import pipeline  # noqa: PLC0415
    from ditbake.runtime.artifact import Profile  # noqa: PLC0415

    text_len = int(meta["text_len"])
    if args.profile:
        if not pipeline.is_pipeline_dir(args.model):
            raise InputError("--profile HxWxF (pixels) needs a pipeline directory (its VAE gives the latent size)")
        profiles = []
        for text in args.profile:
            h, w, f = pipeline.parse_pixels(text)
            latent = adapter.latent_shape(*pipeline.latent_dims(args.model, adapter.architecture, h, w, f))
            profiles.append(Profile(f"{h}x{w}x{f}", tuple(latent), text_len))
        return profiles
    latent = tuple(meta["latent_shape"])
    if meta.get("pixels"):
        h, w, f = meta["pixels"]
        return [Profile(f"{h}x{w}x{f}", latent, text_len)]
    frames = 1 if len(latent) == 3 else latent[1] if adapter.architecture == "wan" else latent[0]  # 3-D: an image
    return [Profile(f"f{frames}_h{latent[-2]}_w{latent[-1]}_t{text_len}", latent, text_len)]


def cmd_build(args) -> int:
    from ditbake.exporter import build as builder, models  # noqa: PLC0415
    from ditbake.exporter.adapters import adapter_for  # noqa: PLC0415
    from ditbake.exporter.calibrate import CalibrationStats  # noqa: PLC0415
    from ditbake.runtime.plan import Plan  # noqa: PLC0415

    from ditbake.exporter.calibrate_check import check_fits_model  # noqa: PLC0415

    stats = CalibrationStats.load(args.calibration)
    seed = int(stats.meta.get("weights_seed", 0))
    adapter = adapter_for(models.load(args.model, dtype=torch.float32, seed=seed))
    check_fits_model(stats.meta, adapter)  # another model's calibration is refused before any work
    plan = Plan.load(args.plan)
    profiles = _build_profiles(adapter, args, stats.meta)
    sched = _scheduler_config(args.model)
    samplers = args.samplers.split(",") if args.samplers else list(_samplers(adapter, sched))
    if stats.meta["sampler"] in samplers:  # the calibrated sampler is the default
        samplers.remove(stats.meta["sampler"])
        samplers.insert(0, stats.meta["sampler"])
    from ditbake.exporter.pipeline import is_pipeline_dir  # noqa: PLC0415

    pipeline_dir = args.model if is_pipeline_dir(args.model) and args.components else None
    negative = args.negative_prompt if args.negative_prompt is not None else \
        (stats.meta.get("conditioning") or {}).get("negative_prompt", "")
    hessians = None
    if args.gptq:
        from ditbake.exporter.gptq import HESSIANS_FILE, GPTQError, load_hessians  # noqa: PLC0415

        path = Path(args.calibration) / HESSIANS_FILE
        if not path.is_file():
            raise GPTQError(f"--gptq needs {path}: calibrate with --gptq-hessians")
        hessians = load_hessians(path)
    out = builder.build(adapter, plan, args.out, profiles=profiles, samplers=samplers, dtype=DTYPES[args.dtype],
                        backend=args.backend, label=args.label, device=args.device,
                        text_encoder=args.text_encoder, onnx_only=args.onnx_only, scheduler_config=sched,
                        pipeline_dir=pipeline_dir, negative_prompt=negative, force=args.force,
                        weight_storage=args.weight_storage, hessians=hessians)
    log.info("artifact ready: %s", out)
    return 0


def cmd_run(args) -> int:
    from ditbake.exporter.run import cmd_run as run  # noqa: PLC0415

    return run(args)


def cmd_inspect(args) -> int:
    from ditbake.runtime.artifact import load_artifact  # noqa: PLC0415

    art = load_artifact(args.artifact)
    m = art.manifest
    plan = art.plan
    summary = {
        "format": f"{m['format']} v{m['format_version']}", "producer": m.get("producer"),
        "model": {k: m["model"].get(k) for k in ("architecture", "diffusers_class", "label", "parameters")},
        "dtype": m.get("dtype"), "backend": m.get("backend", "eager"), "profiles": m["profiles"],
        "samplers": sorted(art.samplers), "default_sampler": art.default_sampler,
        "plan": {"mode": plan.mode, "steps": plan.num_steps, "blocks": plan.num_blocks,
                 "variants": len(plan.variants), "skip_fraction": plan.skip_fraction(), "predicted": plan.predicted},
        "files": m["files"], "hashes": "verified",
        "layers_stored_nvfp4_loaded_8bit": len(m.get("weights_8bit_from_nvfp4") or {}),
        "components": {"pipeline": m["components"]["pipeline"],
                       "text_encoders": {k: v["class"] for k, v in m["components"]["text_encoders"].items()},
                       "vae": m["components"]["vae"]["class"]} if m.get("components") else None,
    }
    print(json.dumps(summary, indent=1))
    return 0


def cmd_package(args) -> int:
    from ditbake.runtime.package import pack  # noqa: PLC0415

    out = pack(args.artifact, args.out, force=args.force)
    log.info("packaged %s → %s (%.1f MB)", args.artifact, out, out.stat().st_size / 1e6)
    return 0


def cmd_unpack(args) -> int:
    from ditbake.runtime.package import unpack  # noqa: PLC0415

    log.info("unpacked and verified %s → %s", args.package, unpack(args.package, args.out, force=args.force))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditbake", description="Ahead-of-time compiler for diffusion transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("calibrate", help="run the model over prompts and the whole trajectory, record statistics")
    p.add_argument("--model", required=True, help="local diffusers dir, config .json (random weights) or tiny-wan/tiny-cogvideox")
    p.add_argument("--out", required=True, help="output directory for calibration.json + stats.safetensors")
    p.add_argument("--prompts", help="a .txt (one prompt per line), 'default' (the shipped set), free text, or a "
                                      "safetensors with 'embeds' [N, L, D] (and optional 'negative'; SD3/Flux: "
                                      "'pooled' [N, P] and 'negative_pooled'); text is encoded with the pipeline's "
                                      "own text encoder(s). Default for a pipeline directory: the shipped set")
    p.add_argument("--negative-prompt", default="", help="negative prompt (the unconditional CFG branch)")
    p.add_argument("--num-prompts", type=int, help="use at most this many prompts (default set: 8; random: 2)")
    p.add_argument("--random-embeddings", action="store_true",
                   help="calibrate on random prompt embeddings (models without a text encoder; speed work only)")
    p.add_argument("--profile", help="pipeline directories: HEIGHTxWIDTHxFRAMES in pixels, e.g. 480x832x81")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", help="flow_euler|unipc|ddim|dpmpp (default: the pipeline's own scheduler; another "
                   "kind takes over its config's compatible fields)")
    p.add_argument("--guidance", type=float,
                   help="CFG scale (default: the pipeline's own — Wan 5, CogVideoX 6, SD3 7, Flux 1 — else 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights-seed", type=int, default=0, help="seed of random weights for config sources")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the whole pass runs (model, statistics, "
                   "head search)")
    p.add_argument("--batch-size", type=int, help="prompts per forward of the base pass (default: all on cpu, "
                   "as many as fit the free memory on cuda)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted calibration in --out from its "
                   "last completed prompt batch (same settings required)")
    p.add_argument("--precision-stats", action=argparse.BooleanOptionalAction, default=False,
                   help="record the DMPQ precision statistics (E_rel per activation format and layer, outlier "
                        "ratios; writes precision.json and precision_scatter.png); costs ~4 reference "
                        "quantized matmuls per linear call")
    p.add_argument("--precision-max-tokens", type=int, default=1024,
                   help="tokens per layer input used for E_rel (strided subset; formats quantize per token)")
    p.add_argument("--precision-weight-cache-gb", type=float,
                   help="memory for the layers' quantized weight copies (≈ 6 bytes per weight; default: a "
                        "quarter of the free GPU memory, all on cpu); layers beyond it re-quantize per call")
    p.add_argument("--gptq-hessians", action="store_true",
                   help="also record each block linear's input second moment (hessians.safetensors, K² floats "
                        "per layer: ≈ 12 GB for Wan2.1-1.3B) for `build --gptq`")
    p.add_argument("--gptq-max-tokens", type=int, default=4096,
                   help="tokens per layer input summed into its second moment (strided subset)")
    g = p.add_argument_group("head-wise attention search (progressive, DiTFastAttnV2)")
    g.add_argument("--heads-delta", type=float, help="run the head search with this per-layer error budget δ")
    g.add_argument("--heads-c", type=float, help="per-head bound factor c: each head's error ≤ c·δ/H (default 1.5)")
    g.add_argument("--heads-widths", help="arrow half-widths as fractions of the visual tokens (default 0.0625,0.125,0.25)")
    g.add_argument("--heads-no-cache", action="store_true", help="do not offer cached heads (arrow-only ablation)")
    g.add_argument("--heads-tile", help="F,H,W tile for local3d window candidates after tile reordering, e.g. 2,8,8")
    g.add_argument("--heads-precisions", help="8-bit attention formats to offer per head beside bf16: int8, fp8, "
                                              "fp8t (cuDNN per-tensor FP8), comma-separated (each candidate gets an "
                                              "8-bit twin whose error is measured)")
    g.add_argument("--heads-8bit-speedup", type=float,
                   help="measured 8-bit/bf16 attention speed ratio on the target (weighs 8-bit candidates; default 1.5)")
    _latent_args(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("plan", help="decide per step and block how to compute; writes plan.json")
    p.add_argument("--calibration", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("baked", "adaptive"), default="baked",
                   help="baked: the runtime only looks each step up; adaptive: it measures Γ and the Δ change "
                        "and picks among precompiled variants (one host sync per step)")
    g = p.add_argument_group("mixed precision NVFP4/INT8 (DMPQ; needs `calibrate --precision-stats`)")
    g.add_argument("--precision-threshold", type=float,
                   help="run a layer's activations in NVFP4 where its predicted W4A4 error is at most this")
    g.add_argument("--avg-bits", type=float, help="target average activation bits (searches the threshold)")
    g.add_argument("--nvfp4-fraction", type=float, help="target fraction of quantized layer calls in NVFP4")
    g.add_argument("--precision-predictor", choices=("gamma", "measured"), default="gamma",
                   help="gamma: the fitted E_rel = a·Γ(t−1) + b (paper); measured: the calibrated per-step mean")
    g.add_argument("--pdr", action=argparse.BooleanOptionalAction, default=None,
                   help="Purified Delta Refresh: outlier layers in bf16 at the first compute after skips "
                        "(default: on when the plan is quantized and skips)")
    g.add_argument("--pdr-outlier-threshold", type=float, default=25.0,
                   help="max|X|/mean|X| above which a layer runs bf16 at a refresh")
    g = p.add_argument_group("Temporal Delta Cache (skip blocks, reuse cached residual)")
    g.add_argument("--tdc-tau", type=float, help="accumulated Δ-change threshold per skip run")
    g.add_argument("--tdc-skip-budget", type=float,
                   help="target fraction of block computations to skip (a larger budget keeps every skip of a smaller one)")
    g.add_argument("--tdc-max-run", type=int, default=2, help="most consecutive skips of one block")
    g.add_argument("--tdc-metric", default="relative", choices=("relative", "residual"),
                   help="skip error measured against the block's Δ (paper) or against its input")
    g.add_argument("--tdc-granularity", default="block", choices=("block", "step"),
                   help="skip each block on its own (paper) or all blocks of a step together")
    g.add_argument("--tdc-extrapolate", default="none", choices=("none", "linear"),
                   help="a step skipping every block reuses the last stack residual, or extrapolates "
                        "the last two linearly")
    g = p.add_argument_group("head-wise attention (arrow / local3d / cached heads, DiTFastAttnV2)")
    g.add_argument("--heads", action="store_true", help="bake the head schemes the calibration's search chose")
    g.add_argument("--heads-delta", type=float,
                   help="re-solve at this per-layer error budget from the stored errors (not progressive)")
    g.add_argument("--heads-c", type=float, help="re-solve with this per-head bound factor c (c·δ/H)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("guidance", help="place guidance skips (uncond served from cond + the cached CFG gap) on an "
                                        "artifact's plan by measuring each step's cost; writes plan.json")
    p.add_argument("artifact", help="an artifact built with the plan to extend (any backend)")
    p.add_argument("--count", type=int, required=True, help="guidance skips to place (each saves one branch forward)")
    p.add_argument("--out", required=True, help="the new plan (build it with `ditbake build --plan`)")
    p.add_argument("--start", type=int, default=5, help="first step a guidance skip may take")
    p.add_argument("--prompts", help="calibration prompts: a .txt (one per line), 'default' or one prompt, encoded "
                                     "with the artifact's text encoder (default: the shipped set); keep them apart "
                                     "from the prompts you evaluate on")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts to calibrate on (one batch)")
    p.add_argument("--random-embeddings", action="store_true", help="random prompt embeddings (no text encoder)")
    p.add_argument("--seed", type=int, default=42, help="first calibration seed")
    p.add_argument("--num-seeds", type=int, default=1, help="calibration seeds: seed, seed+1, …")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale the plan will run at")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_guidance)

    p = sub.add_parser("build", help="bake model, plan and samplers into an artifact directory")
    p.add_argument("--model", required=True)
    p.add_argument("--plan", required=True)
    p.add_argument("--calibration", required=True, help="calibration dir (shape profile, weights seed)")
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="eager", choices=("eager", "aoti", "tensorrt"),
                   help="eager: ops composed at run time; aoti: AOTInductor packages per block variant; "
                        "tensorrt: ONNX + TensorRT engines per block variant")
    p.add_argument("--onnx-only", action="store_true",
                   help="tensorrt without TensorRT installed: ship the verified ONNX graphs, no engines")
    p.add_argument("--device", default="cpu", help="device the aoti engines are compiled for (and --gptq rounds on)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--samplers", help="comma-separated samplers to bake; the first is the default")
    p.add_argument("--label", default="", help="shown on outputs, e.g. 'RANDOM WEIGHTS'")
    p.add_argument("--text-encoder", action="store_true",
                   help="record the shipped MiniLM text encoder so `run --prompt TEXT` works (test beds)")
    p.add_argument("--profile", action="append",
                   help="shape profile HEIGHTxWIDTHxFRAMES in pixels (repeatable; pipeline directories); default: "
                        "the calibrated shape")
    p.add_argument("--components", action=argparse.BooleanOptionalAction, default=True,
                   help="store a pipeline directory's text encoder(s), tokenizer(s) and VAE decoder")
    p.add_argument("--negative-prompt", help="default negative prompt of the artifact (default: the calibration's)")
    p.add_argument("--weight-storage", choices=("8bit", "nvfp4", "nvfp4-resident"), default="8bit",
                   help="how layers the plan runs only in 8 bits are stored: 8bit weights; NVFP4 (4.5 bits per "
                        "weight) that the loader turns into 8-bit weights; or NVFP4 kept in memory too, turned "
                        "into 8-bit weights at each call (runtime/weights_4bit.py)")
    p.add_argument("--gptq", action="store_true",
                   help="round NVFP4 weights by GPTQ with the calibration's hessians.safetensors "
                        "(calibrate --gptq-hessians) instead of to nearest")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("run", help="generate with an artifact: text in, decoded video/image (+ latents) out")
    from ditbake.exporter.run import add_run_arguments  # noqa: PLC0415

    add_run_arguments(p, DTYPES)
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
    # no prefix matching: `--prompt` must not silently mean `--prompts`
    for each in (parser, *sub.choices.values()):
        each.allow_abbrev = False
    for p in sub.choices.values():  # every command that writes an output path
        if any("--out" in a.option_strings for a in p._actions):
            p.add_argument("--force", action="store_true",
                           help="replace --out even if it exists and is not an earlier ditbake output")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("ditbake")
    except PackageNotFoundError:
        from ditbake.exporter.build import PRODUCER_VERSION  # noqa: PLC0415

        return PRODUCER_VERSION


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # `run --gpus N` re-launches itself with them
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: PLC0415

    from ditbake.exporter.outputs import check_args, typed_os_error  # noqa: PLC0415
    from ditbake.runtime.errors import ResourceError  # noqa: PLC0415

    try:
        try:
            check_args(args)
            with logging_redirect_tqdm():  # log lines print above the progress bars, not through them
                return args.func(args)
        except OSError as exc:  # out of disk, permissions, …: typed, with the path
            log.debug("operating-system error", exc_info=True)
            raise typed_os_error(exc) from exc
        except MemoryError:
            raise ResourceError("out of memory; use a smaller shape profile or batch, or a larger machine") from None
    except DitbakeError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
