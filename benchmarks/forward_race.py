"""One computed forward, ditbake vs diffusers + regional torch.compile (bf16), on one GPU.

Rows (every block linear and every self-attention head of the model):
* diffusers eager bf16, diffusers + torch.compile per block (the bar);
* ditbake bf16 — the runtime's own composition, no quantization, dense attention;
* (a) every block linear FP8 W8A8 (FP8 weights, per-token activations quantized in-graph),
  attention bf16 dense;
* (b) (a) + 8-bit attention (INT8 QK with per-block scales, FP8 PV) in every head;
* (a8), (b8): (a) and (b) with INT8 W8A8 linears (plugins/linear_int8.py: slower GEMM than FP8,
  far more accurate on the test bed);
* (c) (b) + every head an arrow band of `--band` of the keys (0.5: half the attention FLOPs); (c8) the
  same on (b8);
each on the `eager` backend (the runtime composing torch ops and the plugins' kernels) and on
`aoti` (the artifact's AOTInductor engines, built with `ditbake.exporter.build` and run through
the runtime session's forward — the shipped path). Flux's eager rows run in memory; its aoti rows
go through an artifact of every linear of both block kinds in 8 bits (12 B parameters plus the
8-bit copies, ~36 GB at real size: narrow the rows with `--only` to fit one device call).

Each row: median of CUDA-event times of whole forwards after warm-up, the output's relative L2
error vs diffusers eager bf16, and the build (compile) time of its engines. Random weights:
speed does not depend on their values; fidelity is measured on the trained test bed
(`benchmarks/forward_fidelity.py`).

    python benchmarks/forward_race.py --model wan --out $OUT/forward_race_wan.json
    python benchmarks/forward_race.py --model flux --out $OUT/forward_race_flux.json
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from ditbake.runtime import arch as runtime_arch

from bench_attention import time_ms  # benchmarks/ is the script's directory
from block_race import LATENT, TEXT_LEN, WAN_1_3B as ONE_BLOCK
from provenance import stamp  # benchmarks/ is the script's directory: commit + dirty flag in every JSON

log = logging.getLogger("forward_race")

WAN = dict(ONE_BLOCK, num_layers=30)
# FLUX.1 [dev] transformer; 2048² pixels → 256² latents → 128² packed tokens = 16,384 (+ 512 text)
FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=[16, 56, 56])
FLUX_LATENT, FLUX_TEXT = (16, 256, 256), 512
SMOKE = {"wan": (dict(WAN, num_attention_heads=2, attention_head_dim=64, ffn_dim=128, text_dim=32, num_layers=2),
                 (16, 2, 8, 8), 8),
         "flux": (dict(FLUX, num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32,
                       joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[8, 12, 12]),
                  (16, 8, 8), 8)}

timer = functools.partial(time_ms, warmup=2, reps=5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def contenders(arch, config: dict, band: float, visual_tokens: int):
    """name → BlockVariant for the ditbake rows (the precision map covers every block kind's linears)."""
    from ditbake.runtime.plan import BlockVariant, HeadScheme

    site = arch.COMPRESSIBLE_ATTENTION[0]
    heads = int(config["num_attention_heads"])
    names = sorted(arch.BLOCK_LINEARS)  # every block linear; a block runs those it has
    fp8 = tuple((n, "fp8") for n in names)
    int8 = tuple((n, "int8") for n in names)  # W8A8 INT8: slower GEMM than FP8, far more accurate
    half = max(1, round(band * visual_tokens / 2))
    narrow = max(1, round(0.2 * visual_tokens / 2))
    # ffn.net.2 (8960 → 1536) measured slower in FP8 than bf16 on the H100 (its 8960-wide GELU
    # input costs a reduction pass to quantize; benchmarks/results/linear_fp8_h100.json): the
    # measured per-layer menu keeps it bf16
    menu = tuple((n, "bf16" if n.endswith("ffn.net.2") else "fp8") for n in names)
    def every_head(scheme):
        return ((site, (scheme,) * heads),)

    return {
        "ditbake bf16": BlockVariant(),
        "(a) linears fp8": BlockVariant(precisions=fp8),
        "(a*) linears fp8 where faster": BlockVariant(precisions=menu),
        # 8-bit attention, two numerics: SageAttention-style INT8 QK (ditbake's Triton kernel) and
        # per-tensor FP8 through cuDNN's fused FP8 SDPA (plugins/cudnn_sdpa.py)
        "(b) + attention int8 (Triton)": BlockVariant(precisions=fp8, heads=every_head(HeadScheme("full", precision="int8"))),
        "(b) + attention fp8t (cuDNN)": BlockVariant(precisions=fp8, heads=every_head(HeadScheme("full", precision="fp8t"))),
        "(a8) linears int8": BlockVariant(precisions=int8),
        "(b8) int8 linears + attention int8 (Triton)": BlockVariant(
            precisions=int8, heads=every_head(HeadScheme("full", precision="int8"))),
        f"(c) + band {band:.2f} int8 (Triton)": BlockVariant(precisions=fp8,
                                                            heads=every_head(HeadScheme("arrow", half, half, "int8"))),
        f"(c8) int8 linears + band {band:.2f} int8 (Triton)": BlockVariant(
            precisions=int8, heads=every_head(HeadScheme("arrow", half, half, "int8"))),
        # (c) as a fixed mix: two thirds of the heads a narrow band (0.2 of the visual keys), the rest full —
        # ≥ 50 % of the FLOPs removed with the text tokens counted (`attention_flops_removed` in the row),
        # each group on its fastest kernel (the full heads on the dense one)
        "(c8m) int8 linears + 2/3 heads band 0.20, 1/3 full, int8": BlockVariant(precisions=int8, heads=((site, tuple(
            HeadScheme("arrow", narrow, narrow, "int8") if h < round(2 * heads / 3) else HeadScheme("full", precision="int8")
            for h in range(heads))),)),
        f"(c) + band {band:.2f} fp8t (cuDNN)": BlockVariant(precisions=fp8,
                                                           heads=every_head(HeadScheme("arrow", half, half, "fp8t"))),
        # the band in bf16: Triton or cuDNN, whichever the build measured faster
        f"(c16) (a) + band {band:.2f} bf16": BlockVariant(precisions=fp8, heads=every_head(HeadScheme("arrow", half, half))),
    }


def attention_flops_removed(variant, config: dict, text_tokens: int, visual_tokens: int) -> float:
    """Fraction of the self-attention FLOPs (QK and PV over the allowed pairs, text tokens counted) the
    variant's head schemes remove against every head full, as the runtime's report counts them."""
    from ditbake.runtime.attention import AttentionRunner

    counter = AttentionRunner(None)
    schemes = next(iter(dict(variant.heads).values()), None)
    counter.account(schemes, 1, int(config["num_attention_heads"]), text_tokens + visual_tokens,
                    int(config["attention_head_dim"]), (0, text_tokens))
    return 1.0 - counter.flops_done / counter.flops_dense


def add_8bit_weights(weights: dict, arch, config: dict) -> None:
    """FP8 and INT8 per-channel weights beside the 16-bit ones for every block linear (the build's formats)."""
    from ditbake.plugins.linear_fp8 import quantize_weight_fp8
    from ditbake.plugins.linear_int8 import quantize_weight_int8

    for b in range(arch.num_blocks(config)):
        for n in runtime_arch.block_linears(arch, config, b):
            name = f"{arch.BLOCK_PREFIX}{b}.{n}"
            q, s = quantize_weight_fp8(weights[name + ".weight"])
            weights[name + ".fp8_weight"], weights[name + ".fp8_scale"] = q, s
            q, s = quantize_weight_int8(weights[name + ".weight"])
            weights[name + ".int8_weight"], weights[name + ".int8_scale"] = q, s


def selected(name: str, only: str, bf16_row: bool = True) -> bool:
    """`--only`: the rows the regex matches, and the bf16 row they are compared with unless `bf16_row` is
    off (Flux's aoti artifact then stores no 16-bit copy of the 12 B linear weights)."""
    if name == "ditbake bf16":
        return bf16_row
    return not only or re.search(only, name) is not None


def eager_forward(arch, config, weights, variant, x, t, text, profile: dict, tiles=None, extras: tuple = ()):
    from ditbake.runtime.attention import AttentionRunner

    h, ctx = arch.prologue(weights, config, x, t, text, profile, *extras)
    attention = AttentionRunner(tiles)
    for b in range(arch.num_blocks(config)):
        h = arch.block(weights, config, b, h, ctx, variant, attention, "cond")
    return arch.epilogue(weights, config, h, ctx)


def diffusers_rows(model, call, rows: dict, record) -> torch.Tensor:
    ref = call()
    record("diffusers eager bf16", call, ref)
    blocks = [m for name in ("blocks", "transformer_blocks", "single_transformer_blocks")
              for m in getattr(model, name, [])]
    for block in blocks:  # regional compile, as diffusers recommends for repeated blocks
        block.forward = torch.compile(block.forward, fullgraph=False)
    t0 = time.perf_counter()
    call()
    rows["_compile_s"] = time.perf_counter() - t0
    record("diffusers torch.compile (regional)", call, ref, build_s=rows.pop("_compile_s"))
    return ref


@torch.no_grad()
def race_wan(args, dev, dtype) -> dict:
    import diffusers

    from ditbake.exporter.adapters import adapter_for
    from ditbake.runtime.artifact import Profile

    cfg, latent, text_len = (WAN, LATENT, TEXT_LEN) if not args.smoke else SMOKE["wan"]
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**cfg).to(dev, dtype).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, *latent, generator=gen).to(dev, dtype)
    text = torch.randn(1, text_len, cfg["text_dim"], generator=gen).to(dev, dtype)
    t = torch.tensor([700.0], device=dev)
    rows: dict = {}
    record = _recorder(rows, Path(args.out).with_suffix(".partial.json"))
    adapter = adapter_for(model)
    ref = diffusers_rows(model, lambda: adapter.diffusers_forward(x, t, text), rows, record)
    if args.profile and dev.type == "cuda":  # the bar's own kernels, beside ditbake's
        rows.setdefault("_profile", {})["diffusers torch.compile (regional)"] = kernel_profile(
            lambda: adapter.diffusers_forward(x, t, text))

    p = cfg["patch_size"]
    visual = (latent[1] // p[0]) * (latent[2] // p[1]) * (latent[3] // p[2])
    backends = [b for b in args.backends.split(",") if b and not (b == "aoti" and args.no_aoti)]
    race_artifacts(args, adapter, Profile("race", latent, text_len), visual, backends, (x, t, text), (), ref, rows,
                   record, dev, dtype)
    return {"model": "Wan2.1-1.3B architecture (random weights)", "tokens": visual, "rows": rows}


def race_artifacts(args, adapter, profile, visual: int, backends: list[str], inputs: tuple, extras: tuple, ref,
                   rows: dict, record, dev, dtype, text_tokens: int = 0) -> None:
    """The ditbake rows through built artifacts, one per backend: the artifact's step i runs contender i in
    every block (the build stores each format once) and each row times one `Session` forward."""
    from ditbake.exporter.build import build
    from ditbake.runtime import load
    from ditbake.runtime.attention import AttentionRunner
    from ditbake.runtime.plan import Plan
    from ditbake.runtime.session import GenerationReport

    arch, config = adapter.arch, adapter.config
    x, t, text = inputs
    variants = {n: v for n, v in contenders(arch, config, args.band, visual).items()
                if selected(n, args.only, not args.no_bf16_row)}
    names = list(variants)
    plan = Plan(architecture=arch.NAME, num_blocks=adapter.num_blocks, linear_layers=tuple(adapter.linear_layers),
                attention_sites=tuple(sorted(adapter.attention_sites.items())), variants=tuple(variants.values()),
                steps=tuple({"cond": (i,) * adapter.num_blocks} for i in range(len(names))))
    sampler = "unipc" if arch.NAME == "wan" else "flow_euler"
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            t0 = time.perf_counter()
            try:
                path = build(adapter, plan, Path(tmp) / backend, profiles=[profile], samplers=[sampler], dtype=dtype,
                             backend=backend, device=dev.type, progress=False)
            except Exception as exc:  # one backend failing must not hide the other
                rows[f"ditbake {backend}"] = {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}
                log.exception("build %s failed", backend)
                continue
            build_s = time.perf_counter() - t0
            session = load(path, device=dev)  # once: Flux's artifact holds 12 GB of weights
            engines = session.artifact.manifest["engines"]
            rows[f"ditbake {backend} build"] = {"build_s": build_s, "engines": len(engines)}
            for i, name in enumerate(names):
                kernels = {}  # eager: measure each attention group's kernels once, as the aoti build does
                if backend == "eager" and dev.type == "cuda":
                    probe = AttentionRunner(dict(plan.tiles), measure=True)
                    session._forward(i, "cond", x, t, text, profile, probe, {}, GenerationReport(), extras=extras)
                    kernels = probe.kernels
                    rows.setdefault("_kernels", {})[f"{name} [eager]"] = probe.timings

                def forward(i=i, kernels=kernels):
                    return session._forward(i, "cond", x, t, text, profile, AttentionRunner(dict(plan.tiles), kernels), {},
                                            GenerationReport(), extras=extras)
                record(f"{name} [{backend}]", forward, ref)
                rows[f"{name} [{backend}]"]["attention_flops_removed"] = attention_flops_removed(
                    variants[name], config, text_tokens, visual)
                if args.profile and dev.type == "cuda":
                    rows.setdefault("_profile", {})[f"{name} [{backend}]"] = kernel_profile(forward)
            if backend == "aoti":  # what the build measured and baked, per engine
                rows["_kernels_aoti"] = {str(e.get("variant")): e.get("attention_kernels")
                                         for e in engines if e.get("attention_kernels")}
            session = None  # the engines go before the next backend's build


class FluxInputs(NamedTuple):
    model: torch.nn.Module
    adapter: object
    x: torch.Tensor
    t: torch.Tensor
    text: torch.Tensor
    weights: dict
    profile: dict
    extras: tuple


def flux_inputs(cfg: dict, latent: tuple, text_len: int, dev, dtype) -> FluxInputs:
    """A seeded random Flux model (initialised on `dev`: 12 B parameters), its runtime weights with the
    profile's tensors, and the race's inputs — latents, t = 700, text, and the further prologue inputs
    (CLIP pooled vector, distilled guidance), the same for diffusers and ditbake."""
    import diffusers

    from ditbake.exporter.adapters import adapter_for
    from ditbake.exporter.engine_aoti import example_extras

    torch.manual_seed(0)
    with torch.device(dev):
        model = diffusers.FluxTransformer2DModel(**cfg).to(dtype).eval()
    adapter = adapter_for(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, *latent, generator=gen).to(dev, dtype)
    text = torch.randn(1, text_len, cfg["joint_attention_dim"], generator=gen).to(dev, dtype)
    t = torch.tensor([700.0], device=dev)
    weights = adapter.weights()
    profile = {"name": "race", "latent_shape": list(latent), "text_len": text_len}
    weights.update({k: v.to(dev) for k, v in adapter.profile_tensors(profile).items()})
    extras = example_extras(adapter.arch, adapter.config, dtype, dev)
    return FluxInputs(model, adapter, x, t, text, weights, profile, extras)


@torch.no_grad()
def race_flux(args, dev, dtype) -> dict:
    cfg, latent, text_len = (FLUX, FLUX_LATENT, FLUX_TEXT) if not args.smoke else SMOKE["flux"]
    model, adapter, x, t, text, weights, profile, extras = flux_inputs(cfg, latent, text_len, dev, dtype)
    arch, config = adapter.arch, adapter.config
    named = dict(zip(runtime_arch.extra_inputs(arch, config), extras))
    h0, ctx0 = arch.prologue(weights, config, x, t, text, profile, *extras)
    rows: dict = {}
    record = _recorder(rows, Path(args.out).with_suffix(".partial.json"))
    # the adapter packs latents and builds ids as the runtime does (same conditioning)
    ref = diffusers_rows(model, lambda: adapter.diffusers_forward(x, t, text, **named), rows, record)
    add_8bit_weights(weights, arch, config)
    visual = h0.shape[1] - text_len
    for name, variant in contenders(arch, config, args.band, visual).items():
        if not selected(name, args.only, not args.no_bf16_row):
            continue
        record(f"{name} [eager]", lambda v=variant: eager_forward(arch, config, weights, v, x, t, text, profile,
                                                                  extras=extras), ref)
    backends = [b for b in args.backends.split(",") if b == "aoti" and not args.no_aoti]
    if backends:  # the eager rows above run in memory; aoti needs an artifact (every linear's 8-bit copies:
        # 12 B parameters write ~36 GB at real size — narrow it with --only)
        from ditbake.runtime.artifact import Profile

        race_artifacts(args, adapter, Profile("race", tuple(latent), text_len), visual, backends, (x, t, text), extras,
                       ref, rows, record, dev, dtype, text_tokens=text_len)  # joint attention: text in every head
    return {"model": "FLUX.1 transformer architecture (random weights), 2048²", "tokens": h0.shape[1], "rows": rows}


# kernel-name patterns → where a forward's GPU time goes (cuDNN/flash/Triton attention, GEMMs, the rest)
KERNEL_CLASSES = (("attention", re.compile(r"fmha|flash|sdpa|attention|attn|cudnn_generated|_attention_8bit|"
                                           r"_head_attention|_band_inner|_band_edge|sm90_.*softmax", re.I)),
                  ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|scaled_mm|cublas|matmul", re.I)))


def kernel_profile(fn, reps: int = 2) -> dict:
    """GPU time of `reps` forwards by kernel class (torch.profiler), ms per forward, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        ms = event.device_time_total / 1e3 / reps
        if ms <= 0:
            continue
        kind = next((k for k, pattern in KERNEL_CLASSES if pattern.search(event.key)), "other")
        totals[kind] = totals.get(kind, 0.0) + ms
        top.append((ms, kind, event.key[:90]))
    top.sort(reverse=True)
    return {"ms_per_forward": totals, "top": [{"ms": m, "class": k, "kernel": n} for m, k, n in top[:12]]}


def _recorder(rows: dict, partial: Path | None = None):
    def record(name, fn, ref, build_s=None):
        try:
            out = fn()
            ms = timer(fn)
            rows[name] = {"ms": ms, "rel_err_vs_diffusers_bf16": rel_err(out, ref)}
            if build_s is not None:
                rows[name]["build_s"] = build_s
        except Exception as exc:  # one failing contender must not hide the others
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}
            log.exception("%s failed", name)
        log.info("%-44s %s", name, rows[name])
        if partial is not None:  # what is measured survives a timeout of the device call
            partial.write_text(json.dumps(rows, indent=1))
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("wan", "flux"), default="wan")
    p.add_argument("--out", required=True)
    p.add_argument("--band", type=float, default=0.5, help="arrow band of (c) as a fraction of the visual keys")
    p.add_argument("--no-aoti", action="store_true")
    p.add_argument("--backends", default="eager,aoti", help="comma-separated: eager, aoti (Flux: eager rows run "
                   "in memory, aoti through an artifact)")
    p.add_argument("--profile", action="store_true", help="also profile each ditbake row's GPU kernels by class")
    p.add_argument("--only", default="", help="regex: race only the ditbake rows it matches (bf16 always)")
    p.add_argument("--no-bf16-row", action="store_true", help="leave out the ditbake bf16 row (with --only: an "
                   "artifact of 8-bit linears only; Flux's aoti build then writes 12 GB instead of 36)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (checks the script, times nothing)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    global timer
    if args.smoke:
        dev, dtype = torch.device("cpu"), torch.float32
        timer = lambda fn: 0.0  # noqa: E731 - no CUDA events on CPU
    else:
        dev, dtype = torch.device("cuda"), torch.bfloat16
    result = race_wan(args, dev, dtype) if args.model == "wan" else race_flux(args, dev, dtype)
    comp = result["rows"].get("diffusers torch.compile (regional)", {}).get("ms")
    for row in result["rows"].values():
        if comp and "ms" in row:
            row["speedup_vs_compile"] = comp / row["ms"] if row["ms"] else None
    result |= {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)",
               "torch": torch.__version__, "band": args.band, "method": "median CUDA-event ms of whole forwards "
               "(2 warm-up, 5 timed); error = relative L2 of the forward output vs diffusers eager bf16"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(stamp(result), indent=1))
    print(f"{result['model']}, {result['tokens']} tokens, {result['device']}")
    print(f"{'contender':48s} {'ms':>9s} {'× compile':>10s} {'rel err':>9s} {'build s':>8s}")
    for name, row in result["rows"].items():
        if "ms" in row:
            print(f"{name:48s} {row['ms']:9.2f} {row.get('speedup_vs_compile') or 0:10.3f} "
                  f"{row['rel_err_vs_diffusers_bf16']:9.2e} {row.get('build_s', 0):8.1f}")
        else:
            print(f"{name:48s} {str(row)[:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
