"""Fidelity harness: a compressed artifact against the uncompressed model, same prompts and seeds.

    ditbake eval artifacts/built/testbed-wan-fast --reference artifacts/built/testbed-wan --out out/eval

The reference is another artifact (built from the all-bf16, all-compute plan) or, without one, the
same artifact with its plan replaced by that baseline plan. Both run through the ditbake runtime
on a fixed held-out prompt set and fixed seeds. Reported per sample and averaged:

* PSNR (dB, frames mapped to [0, 1]) and SSIM (Gaussian window 11, σ 1.5, per frame and
  channel, averaged) of the compressed frames against the reference frames;
* temporal error (video): mean |Δ_c − Δ_r| over consecutive-frame differences Δ_t = x_t − x_{t−1}
  of the compressed (c) and reference (r) clips, in [0, 1] units. Zero when the compressed
  clip's motion equals the reference's even if both are offset; it grows with flicker and
  motion drift. The flicker index of each clip (mean |Δ_t|) is reported beside it;
* the runtime's counts: skip fraction, attention-FLOPs fraction, and the average activation
  bits of the linear layers that ran (bf16 = 16, fp8/int8 = 8, nvfp4 = 4; skipped blocks excluded).

Pixel-space (3-channel) models map [-1, 1] to [0, 1]; other latents are scaled by the reference's
range so the measures stay comparable. Prompts are held-out captions of the test-bed data, encoded
with MiniLM when the model takes 384-d text; otherwise (tiny random models) seeded random embeddings.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ditbake.runtime import arch as runtime_arch
from ditbake.runtime.devices import resolve_device
from ditbake.runtime.errors import DitbakeError, InputError

log = logging.getLogger(__name__)

PRECISION_BITS = {"bf16": 16, "fp8": 8, "int8": 8, "nvfp4": 4}
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


class EvaluationError(DitbakeError):
    """The two artifacts cannot be compared (different shapes, no common sampler)."""

    exit_code = 10


# ---------------------------------------------------------------- image measures

def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole tensor; inf when identical."""
    if x.shape != y.shape:
        raise InputError(f"psnr needs equal shapes, got {list(x.shape)} and {list(y.shape)}")
    mse = F.mse_loss(x.double(), y.double()).item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM of images [N, C, H, W] (Gaussian window, valid positions only, per channel).

    The window shrinks to the image's shorter side (odd) for images smaller than 11 pixels."""
    if x.shape != y.shape or x.ndim != 4:
        raise InputError(f"ssim needs two [N, C, H, W] tensors of equal shape, got {list(x.shape)} and {list(y.shape)}")
    size = min(SSIM_WINDOW, x.shape[-1], x.shape[-2])
    size -= (size + 1) % 2
    channels = x.shape[1]
    window = _gaussian_window(size, SSIM_SIGMA * size / SSIM_WINDOW).expand(channels, 1, size, size)
    x, y = x.double(), y.double()

    def blur(t):
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


def flicker_index(frames: torch.Tensor) -> float:
    """Mean |x_t − x_{t−1}| of frames [F, C, H, W]; 0 for a single frame."""
    return float((frames[1:] - frames[:-1]).abs().mean()) if frames.shape[0] > 1 else 0.0


def temporal_error(compressed: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean |Δ_c − Δ_r| of consecutive-frame differences (frames [F, C, H, W]); 0 for images."""
    if compressed.shape[0] < 2:
        return 0.0
    return float(((compressed[1:] - compressed[:-1]) - (reference[1:] - reference[:-1])).abs().mean())


# ---------------------------------------------------------------- plan measures

def average_activation_bits(plan, absent: Collection[tuple[int, str]] = frozenset()) -> float:
    """Mean activation bits over the linear layers of every computed block of every step and branch
    (`absent`: (block, layer) pairs the block does not have, left out)."""
    bits, count = 0.0, 0
    for step in plan.steps:
        for ids in step.values():
            for b, vid in enumerate(ids):
                variant = plan.variants[vid]
                if not variant.compute:
                    continue
                for name, precision in variant.precisions:
                    if (b, name) in absent:
                        continue
                    bits += PRECISION_BITS[precision]
                    count += 1
    return bits / count if count else 16.0


def baseline_plan(plan):
    """The all-compute, all-bf16, all-full-attention plan for the same model and trajectory."""
    from ditbake.exporter.planner import plan_from_calibration  # noqa: PLC0415

    meta = {"architecture": plan.architecture, "num_blocks": plan.num_blocks,
            "linear_layers": list(plan.linear_layers), "attention_sites": dict(plan.attention_sites),
            "num_steps": plan.num_steps, "branches": sorted(plan.steps[0], key=["cond", "uncond"].index)}
    return plan_from_calibration(meta, mode="baked")


# ---------------------------------------------------------------- running

@dataclass(frozen=True)
class EvalConfig:
    num_prompts: int = 4
    seeds: tuple[int, ...] = (0,)
    guidance_scale: float = 5.0
    sampler: str | None = None
    prompts: tuple[str, ...] = ()

    def __post_init__(self):
        if self.num_prompts < 1 and not self.prompts:
            raise InputError(f"num_prompts must be at least 1, got {self.num_prompts}")
        if not self.seeds:
            raise InputError("at least one seed is needed")


@dataclass
class SampleScore:
    prompt: str
    seed: int
    psnr: float
    ssim: float
    temporal_error: float
    flicker_reference: float
    flicker_compressed: float


@dataclass
class EvalResult:
    artifact: str
    reference: str
    samples: list[SampleScore] = field(default_factory=list)
    skip_fraction: float = 0.0
    attention_flops_fraction: float = 1.0
    avg_activation_bits: float = 16.0
    seconds_compressed: float = 0.0
    seconds_reference: float = 0.0
    device: str = "cpu"
    # the first sample's (reference, compressed) frames [F, C, H, W] in [0, 1] (not serialised)
    first_frames: tuple | None = field(default=None, repr=False)

    def mean(self, name: str) -> float:
        values = [getattr(s, name) for s in self.samples]
        return float(np.mean(values)) if values else float("nan")

    def summary(self) -> dict:
        return {"psnr": self.mean("psnr"), "ssim": self.mean("ssim"), "temporal_error": self.mean("temporal_error"),
                "flicker_reference": self.mean("flicker_reference"),
                "flicker_compressed": self.mean("flicker_compressed"), "skip_fraction": self.skip_fraction,
                "attention_flops_fraction": self.attention_flops_fraction,
                "avg_activation_bits": self.avg_activation_bits, "seconds_compressed": self.seconds_compressed,
                "seconds_reference": self.seconds_reference}

    def to_json(self) -> dict:
        def finite(v):
            return v if isinstance(v, str) or math.isfinite(v) else str(v)

        return {"artifact": self.artifact, "reference": self.reference, "device": self.device,
                "summary": {k: finite(v) for k, v in self.summary().items()},
                "samples": [{k: finite(v) for k, v in asdict(s).items()} for s in self.samples]}

    def table(self) -> str:
        rows = [("prompt", "seed", "PSNR dB", "SSIM", "temporal err")]
        rows += [(s.prompt[:48], str(s.seed), f"{s.psnr:.2f}", f"{s.ssim:.4f}", f"{s.temporal_error:.4f}")
                 for s in self.samples]
        rows.append(("mean", "", f"{self.mean('psnr'):.2f}", f"{self.mean('ssim'):.4f}",
                     f"{self.mean('temporal_error'):.4f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(f"skip fraction {self.skip_fraction:.3f} · attention FLOPs fraction "
                     f"{self.attention_flops_fraction:.3f} · avg activation bits {self.avg_activation_bits:.2f}")
        return "\n".join(lines)


def default_prompts(n: int, spec=None) -> list[str]:
    """`n` held-out captions of a test bed's data, spread over its held-out set (fixed, seed-free).
    `spec` (exporter.testbed.data.ClipSpec) gives the kind and the held-out rule; without one, the
    first beds' video captions under rule v1."""
    from ditbake.exporter.testbed import data  # noqa: PLC0415

    kind, rule = (spec.kind, spec.held_out_rule) if spec is not None else ("video", "v1")
    held = data.held_out_ids(kind, rule)
    picks = [held[(k * len(held)) // n] for k in range(n)] if n <= len(held) else held
    return [data.caption_from_attributes(kind, data.attributes_of(kind, i)) for i in picks]


def testbed_spec(session, testbed: str | Path | None = None):
    """The data spec (ClipSpec) of the test bed an artifact was built from, None for other models.

    From `testbed` (a test-bed directory) when given; else from the source directory the manifest
    records (`model.config._name_or_path`) when it is still there; else the shipped bed whose clip
    size is the artifact's first profile (16×64×64 → wan16k, 8×32×32 → wan, 1×32×32 → sd3)."""
    from ditbake.exporter.testbed import models as beds  # noqa: PLC0415

    if testbed is not None:
        if not (Path(testbed) / "config.json").is_file():
            raise InputError(f"--testbed {testbed} is not a test-bed directory (no config.json); pass e.g. "
                             "artifacts/testbed-wan16k")
        return beds.data_spec_of(testbed)
    if not is_test_bed(session):
        return None
    source = session.config.get("_name_or_path")
    if isinstance(source, str) and (Path(source) / "config.json").is_file():
        return beds.data_spec_of(source)
    latent = tuple(session.profile().latent_shape)
    for _, spec in beds.TESTBEDS.values():
        size = (spec.height, spec.width) if spec.kind == "image" else (spec.frames, spec.height, spec.width)
        if latent[-len(size):] == size:
            return spec
    log.warning("test-bed artifact of unknown clip size %s: held-out captions by rule v1; pass --testbed DIR",
                list(latent))
    return None


def has_text_encoder(session) -> bool:
    m = session.artifact.manifest
    return bool(m.get("components") or m.get("text_encoder"))


def is_test_bed(session) -> bool:
    """Test-bed models take MiniLM's 384-d tokens (their captions are what they were trained on)."""
    c = session.config
    return int(c.get("text_dim", c.get("text_embed_dim", c.get("joint_attention_dim", 0)))) == 384


def eval_prompts(session, prompts: list[str] | None, num_prompts: int, testbed: str | Path | None = None) -> list[str]:
    """The given prompts, else held-out captions for a test bed (its own kind and held-out rule,
    `testbed_spec`), else the shipped default set."""
    if prompts:
        return list(prompts)
    if is_test_bed(session) or testbed is not None:
        return default_prompts(num_prompts, testbed_spec(session, testbed))
    from ditbake.exporter.prompt_source import default_prompts as shipped  # noqa: PLC0415

    return shipped(num_prompts)


def prompt_embeddings(session, prompts: list[str], seed: int,
                      random_embeddings: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds [N, L, D], negative [N, L, D]) for the session's first profile: the artifact's own text
    encoder(s), MiniLM for a test bed, random only when asked for explicitly."""
    profile = session.profile()
    text_dim = session.text_dim
    if has_text_encoder(session):
        negative = session._negative_default()
        return session.encode_prompt(prompts), session.encode_prompt([negative] * len(prompts))
    if text_dim == 384 and not random_embeddings:
        from ditbake.runtime.text_encoder import TextEncoder  # noqa: PLC0415

        encoder = TextEncoder.load(max_length=profile.text_len)
        return encoder.encode(prompts), encoder.encode([""] * len(prompts))
    if not random_embeddings:
        raise InputError("this artifact has no text encoder, so its prompts cannot be encoded: rebuild it from the "
                         "pipeline directory (`ditbake build --model PIPELINE_DIR`), or pass --random-embeddings "
                         "to score random embeddings (speed work only)")
    log.warning("scoring random prompt embeddings (--random-embeddings)")
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(len(prompts), profile.text_len, text_dim, generator=gen)
    return embeds, torch.zeros_like(embeds)


def dequantize_missing_weights(session, plan) -> int:
    """Give layers stored only in NVFP4 (or only in 8 bits) a 16-bit weight dequantized from it (Hadamard unfolded), so the
    baseline plan can run on a quantized artifact. Returns how many layers needed it: for those the
    reference carries the weight quantization, so the comparison measures skips, heads and activation
    precision but not the NVFP4 weights (an uncompressed `--reference` build measures everything)."""
    from ditbake.plugins.hadamard import fold_hadamard_into_weight  # noqa: PLC0415
    from ditbake.plugins.nvfp4 import NVFP4Tensor, dequantize_nvfp4  # noqa: PLC0415

    w = session.weights
    count = 0
    for layer in plan.layer_precisions(session.arch.BLOCK_PREFIX):
        if layer + ".weight" in w:
            continue
        eight = next((f for f in ("fp8", "int8") if f"{layer}.{f}_weight" in w), None)
        if layer + ".nvfp4_packed" not in w and eight:  # an 8-bit-only layer (W8A8): q · per-channel scale
            q, scale = w[f"{layer}.{eight}_weight"], w[f"{layer}.{eight}_scale"]
            w[layer + ".weight"] = (q.float() * scale.float()[:, None]).to(session.dtype)
            count += 1
            continue
        if layer + ".nvfp4_packed" not in w:
            continue
        packed = w[layer + ".nvfp4_packed"]
        t = NVFP4Tensor(packed, w[layer + ".nvfp4_block_scales"], w[layer + ".nvfp4_global_scale"].float().reshape(()),
                        torch.Size((packed.shape[0], packed.shape[1] * 2)))
        weight = dequantize_nvfp4(t, torch.float32)
        if layer + ".nvfp4_hadamard" in w:  # stored as W·H (H orthonormal, symmetric): W = (W·H)·H
            weight = fold_hadamard_into_weight(weight)
        w[layer + ".weight"] = weight.to(session.dtype)
        count += 1
    return count


def to_frames(latents: torch.Tensor, architecture: str, lo: float | None = None,
              hi: float | None = None) -> torch.Tensor:
    """One sample's latents → frames [F, C, H, W] in [0, 1] (see module doc)."""
    x = latents.detach().float().cpu()
    if x.ndim == 3:  # an image [C, H, W]
        x = x[:, None]
    frames = x if architecture == "cogvideox" else x.permute(1, 0, 2, 3)
    if frames.shape[1] == 3:
        return (frames.clamp(-1, 1) + 1) / 2
    return ((frames - lo) / max(hi - lo, 1e-6)).clamp(0, 1)


def _check_comparable(a, b) -> None:
    pa, pb = a.profile(), b.profile()
    if tuple(pa.latent_shape) != tuple(pb.latent_shape) or pa.text_len != pb.text_len:
        raise EvaluationError(f"artifact and reference have different shapes ({list(pa.latent_shape)}, text "
                              f"{pa.text_len} vs {list(pb.latent_shape)}, text {pb.text_len}); build both from one model")
    if a.artifact.architecture != b.artifact.architecture:
        raise EvaluationError(f"artifact is {a.artifact.architecture}, reference is {b.artifact.architecture}")


def evaluate(artifact_path: str | Path, reference_artifact_path: str | Path | None = None,
             prompts: list[str] | None = None, seeds: tuple[int, ...] = (0,), *, num_prompts: int = 4,
             guidance_scale: float = 5.0, sampler: str | None = None, out: str | Path | None = None,
             progress: bool = True, random_embeddings: bool = False, device: str | torch.device = "cpu",
             testbed: str | Path | None = None,
             embeddings: tuple[torch.Tensor, torch.Tensor] | None = None) -> EvalResult:
    """Generate with both on `device` (cpu, cuda, cuda:N), compare, and (with `out`) write eval.json
    and strip.png. `testbed`: the test-bed directory whose held-out captions are the default prompts
    (else found from the artifact, `testbed_spec`). `embeddings`: (embeds [N, L, D], negative [N, L, D])
    of `prompts` computed beforehand, for an artifact without a text encoder on a machine without
    the test beds' encoder (the GPU one)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    import ditbake.runtime as dr  # noqa: PLC0415

    cfg = EvalConfig(num_prompts=num_prompts, seeds=tuple(seeds), guidance_scale=guidance_scale, sampler=sampler,
                     prompts=tuple(prompts or ()))
    device = resolve_device(device)  # both sessions' device, checked before anything loads
    compressed = dr.load(artifact_path, device=device)
    if reference_artifact_path is not None:
        reference = dr.load(reference_artifact_path, device=device)
        reference_name = str(reference_artifact_path)
    else:
        reference = dr.load(artifact_path, device=device)
        reference.plan = baseline_plan(compressed.plan)
        if reference.engines.name != "eager":  # compiled engines exist for the artifact's own plan only
            from ditbake.runtime.engines import EagerEngines  # noqa: PLC0415

            reference.engines = EagerEngines(reference.arch, reference.config, reference.weights)
            reference._graphs = None  # captured graphs would replay the compiled engines
        reference_name = f"{artifact_path} (baseline plan)"
        dequantized = dequantize_missing_weights(reference, reference.plan)
        if dequantized:
            log.warning("%d layers are stored only in NVFP4: the baseline reference runs their dequantized weights, "
                        "so weight quantization is not measured; pass --reference UNCOMPRESSED_ARTIFACT for that",
                        dequantized)
            reference_name += f" ({dequantized} NVFP4-only layers dequantized)"
    _check_comparable(compressed, reference)
    prompt_list = eval_prompts(compressed, list(cfg.prompts), cfg.num_prompts, testbed)
    by_text = has_text_encoder(compressed)  # the session encodes (with pooled vectors where the model has them)
    if embeddings is not None:
        if by_text or len(embeddings[0]) != len(prompt_list) or len(embeddings[1]) != len(prompt_list):
            raise InputError(f"embeddings for {len(embeddings[0])} prompts given with {len(prompt_list)} prompts "
                             "(or an artifact that encodes its own prompts): pass one row per prompt")
        embeds, negative = embeddings
    elif not by_text:
        embeds, negative = prompt_embeddings(compressed, prompt_list, cfg.seeds[0], random_embeddings)
    arch = compressed.artifact.architecture
    result = EvalResult(artifact=str(artifact_path), reference=reference_name,
                        avg_activation_bits=average_activation_bits(
                            compressed.plan, set(runtime_arch.absent_linears(compressed.arch, compressed.config,
                                                                            compressed.plan.num_blocks))),
                        device=str(device))
    skips, attn_done, attn_dense, first_pair = [], 0.0, 0.0, None
    jobs = [(i, s) for i in range(len(prompt_list)) for s in cfg.seeds]
    for i, seed in tqdm(jobs, desc="evaluate", disable=not progress):
        kwargs = dict(seed=seed, guidance_scale=cfg.guidance_scale, sampler=cfg.sampler)
        inputs = ({"prompt": [prompt_list[i]]} if by_text else
                  {"text_embeds": embeds[i:i + 1], "negative_embeds": negative[i:i + 1]})
        ref = reference.generate(**inputs, **kwargs)
        out_c = compressed.generate(**inputs, **kwargs)
        lo, hi = float(ref.latents.min()), float(ref.latents.max())
        if compressed.components is not None:  # decoded frames through the artifact's VAE: [F, C, H, W]
            fr, fc = (compressed.decode(r.latents)[0].permute(0, 3, 1, 2).cpu() for r in (ref, out_c))
        else:
            fr, fc = to_frames(ref.latents[0], arch, lo, hi), to_frames(out_c.latents[0], arch, lo, hi)
        result.samples.append(SampleScore(prompt_list[i], seed, psnr(fc, fr), ssim(fc, fr), temporal_error(fc, fr),
                                          flicker_index(fr), flicker_index(fc)))
        skips.append(out_c.report.skip_fraction)
        attn_done += out_c.report.attention_flops_done
        attn_dense += out_c.report.attention_flops_dense
        result.seconds_compressed += out_c.report.seconds
        result.seconds_reference += ref.report.seconds
        if first_pair is None:
            first_pair = (fr, fc)
    result.first_frames = first_pair
    result.skip_fraction = float(np.mean(skips))
    result.attention_flops_fraction = attn_done / attn_dense if attn_dense else 1.0
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result.to_json(), indent=1))
        write_comparison_strip(*first_pair, out / "strip.png", caption=prompt_list[0])
    return result


def write_comparison_strip(reference: torch.Tensor, compressed: torch.Tensor, path: Path, caption: str = "",
                           scale: int = 3, diff_gain: float = 4.0) -> Path:
    """Rows: reference | compressed | |difference|×gain; one column per frame (frames [F, C, H, W] in [0, 1])."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    def row(frames):
        img = torch.cat(list(frames), dim=-1)  # [C, H, F·W]
        img = img[:3] if img.shape[0] >= 3 else img[:1].expand(3, *img.shape[1:])
        return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()

    rows = [row(reference), row(compressed), row((compressed - reference).abs() * diff_gain)]
    labels = ["uncompressed (reference)", "compressed", f"|difference| x{diff_gain:g}"]
    h, w = rows[0].shape[:2]
    label_h = 12
    strip = Image.new("RGB", (w * scale, 3 * (h * scale + label_h) + label_h), "white")
    draw = ImageDraw.Draw(strip)
    draw.text((2, 0), caption[:120], fill="black")
    for k, (pixels, label) in enumerate(zip(rows, labels)):
        y = label_h + k * (h * scale + label_h)
        draw.text((2, y), label, fill="black")
        strip.paste(Image.fromarray(pixels).resize((w * scale, h * scale), Image.NEAREST), (0, y + label_h))
    strip.save(path)
    return path


# ---------------------------------------------------------------- CLI

def _seeds(args) -> tuple[int, ...]:
    if args.seeds:
        try:
            return tuple(int(x) for x in args.seeds.split(","))
        except ValueError:
            raise InputError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    return tuple(range(args.seed, args.seed + args.num_seeds))


def cmd_eval(args) -> int:
    from ditbake.exporter.prompt_source import read_prompts  # noqa: PLC0415

    prompts = read_prompts(args.prompts)
    if args.guidance is None:
        from ditbake.runtime.artifact import read_manifest  # noqa: PLC0415

        args.guidance = float((read_manifest(Path(args.artifact)).get("components") or {}).get("guidance_scale", 5.0))
    if prompts and args.num_prompts:
        prompts = prompts[:args.num_prompts]
    result = evaluate(args.artifact, args.reference, prompts=prompts, seeds=_seeds(args),
                      num_prompts=args.num_prompts or 4, guidance_scale=args.guidance, sampler=args.sampler,
                      out=args.out, random_embeddings=args.random_embeddings, device=args.device,
                      testbed=args.testbed)
    print(result.table())  # the command's output: the table
    log.info("wrote %s and %s", Path(args.out) / "eval.json", Path(args.out) / "strip.png")
    return 0


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `ditbake eval` on the CLI's subparsers."""
    p = subparsers.add_parser("eval", help="fidelity of an artifact against the uncompressed model (PSNR, SSIM, "
                                           "temporal error, runtime counts); writes eval.json and strip.png")
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("--reference", help="reference artifact (default: ARTIFACT with its plan replaced by the baseline)")
    p.add_argument("--out", required=True, help="output directory for eval.json and strip.png")
    p.add_argument("--prompts", help="a .txt (one prompt per line), 'default' (the shipped set) or one prompt; "
                                      "encoded with the artifact's text encoder (default: held-out test-bed "
                                      "captions for test beds, the shipped set otherwise)")
    p.add_argument("--num-prompts", type=int, help="prompts to generate (default 4)")
    p.add_argument("--random-embeddings", action="store_true",
                   help="score random prompt embeddings (artifacts without a text encoder; speed work only)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (overrides --seed/--num-seeds)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--num-seeds", type=int, default=1, help="seeds per prompt: seed, seed+1, …")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the pipeline's own, else 5)")
    p.add_argument("--sampler")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where both artifacts generate")
    p.add_argument("--testbed", help="test-bed directory (e.g. artifacts/testbed-wan16k) whose held-out captions are "
                                     "the default prompts (default: found from the artifact's source / shape)")
    p.set_defaults(func=cmd_eval)
    return p
