"""Numeric guards of a generation: requests refused up front (non-finite, non-float or absurd
guidance, seeds, embeddings), and latents watched for NaN/Inf at every step.

The watch must not add a host synchronisation per step to the baked loop (it would cost the
CUDA-graph replay its overlap and break the one-read-per-step budget of adaptive mode): the first
bad step and its cause (model output, guidance combination or sampler step) are tracked on the
device and read once, after the loop, which then refuses to return the non-finite latents.
"""
from __future__ import annotations

import math
import numbers

import torch

from ditbake.runtime.errors import InputError, NumericsError

MAX_GUIDANCE = 100.0  # far above any model's useful scale (1-15); beyond it bf16 latents overflow
MAX_EMBED = 1e5  # |value| of a prompt embedding: encoders give O(1)-O(100); above this is not an embedding
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_request(prompt, guidance_scale, seed) -> None:
    if isinstance(prompt, str) and not prompt.strip():
        raise InputError("--prompt is empty; give a text prompt, or leave it out to use --prompts embeddings")
    if isinstance(prompt, (list, tuple)) and (not prompt or any(not isinstance(p, str) or not p.strip() for p in prompt)):
        raise InputError("prompts must be a non-empty list of non-empty strings")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
        raise InputError(f"guidance_scale must be a number, got {type(guidance_scale).__name__}")
    if not math.isfinite(guidance_scale) or abs(guidance_scale) > MAX_GUIDANCE:
        raise InputError(f"guidance_scale {guidance_scale} must be finite and within ±{MAX_GUIDANCE:g} "
                         "(typical: 1-15)")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise InputError(f"seed must be an integer in [0, 2^64), got {str(seed)[:40]!r}")


def check_embeds(what: str, embeds: torch.Tensor) -> None:
    """Float (not int, bool or complex: those would be cast silently), a non-empty batch, finite, sane.
    One host read (the peak |value|: NaN or Inf show there too)."""
    if embeds.dtype not in FLOAT_DTYPES:
        raise InputError(f"{what} has dtype {embeds.dtype}; pass floating-point embeddings (float32/bf16/fp16)")
    if embeds.numel() == 0 or embeds.shape[0] == 0:
        raise InputError(f"{what} is empty (shape {list(embeds.shape)}); pass at least one prompt")
    peak = embeds.abs().amax().item()
    if not math.isfinite(peak):
        raise InputError(f"{what} contains NaN or Inf; pass finite values")
    if peak > MAX_EMBED:
        raise InputError(f"{what} holds values up to {peak:.3g}, far beyond any text encoder's output "
                         f"(|x| ≤ {MAX_EMBED:g}); pass real embeddings")


CAUSES = ("the model's output itself is non-finite: inputs (embeddings, latents) or weights (rebuild the artifact)",
          "the guidance scale amplified finite outputs past the float range: lower --guidance",
          "the sampler's step overflowed: the artifact's sampler table or the latents' scale; rebuild the artifact")


class FiniteWatch:
    """Flags the first step whose latents are not finite, and why, on the device: no host read per
    step (the baked loop has none); `finish` reads it once and raises a NumericsError naming the step."""

    def __init__(self, device: torch.device, num_steps: int, guidance_scale: float):
        self.num_steps, self.guidance = num_steps, guidance_scale
        self.first = None  # [step, cause], -1 while all finite

    def after_step(self, step: int, x: torch.Tensor, outputs: dict, guided: torch.Tensor) -> None:
        finite = [torch.isfinite(o).all() for o in outputs.values()]
        model_ok = torch.stack(finite).all()
        cause = torch.where(~model_ok, 0, torch.where(torch.isfinite(guided).all(), 2, 1))
        bad = ~torch.isfinite(x).all()
        if self.first is None:
            self.first = torch.full((2,), -1, dtype=torch.int64, device=x.device)
        now = torch.stack([torch.full_like(cause, step), cause]).to(torch.int64)
        self.first = torch.where(bad & (self.first[0] < 0), now, self.first)

    def finish(self) -> None:
        if self.first is None:
            return
        step, cause = self.first.tolist()
        if step >= 0:
            raise NumericsError(f"the latents became NaN/Inf at step {step} of {self.num_steps} (guidance "
                                f"{self.guidance:g}); likely cause: {CAUSES[cause]}")
