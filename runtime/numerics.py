"""Numeric guards of a generation: requests refused up front (non-finite, non-float or absurd
guidance, seeds, embeddings), and latents watched for NaN/Inf at every step.

The watch must not add a host synchronisation per step to the baked loop (it would cost the
CUDA-graph replay its overlap): on the CPU, where there is nothing to overlap, a step that goes
non-finite stops the loop at once and the message says which input was already non-finite; on
a GPU the first bad step is tracked on the device and read once, with the final latents.
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
    """Float (not int, bool or complex: those would be cast silently), a non-empty batch, finite, sane."""
    if embeds.dtype not in FLOAT_DTYPES:
        raise InputError(f"{what} has dtype {embeds.dtype}; pass floating-point embeddings (float32/bf16/fp16)")
    if embeds.numel() == 0 or embeds.shape[0] == 0:
        raise InputError(f"{what} is empty (shape {list(embeds.shape)}); pass at least one prompt")
    if not torch.isfinite(embeds).all():
        raise InputError(f"{what} contains NaN or Inf; pass finite values")
    peak = embeds.abs().max().item()
    if peak > MAX_EMBED:
        raise InputError(f"{what} holds values up to {peak:.3g}, far beyond any text encoder's output "
                         f"(|x| ≤ {MAX_EMBED:g}); pass real embeddings")


def _cause(outputs: dict, guided: torch.Tensor) -> str:
    if any(not torch.isfinite(o).all() for o in outputs.values()):
        return "the model's output itself is non-finite: inputs (embeddings, latents) or weights (rebuild the artifact)"
    if not torch.isfinite(guided).all():
        return "the guidance scale amplified finite outputs past the float range: lower --guidance"
    return "the sampler's step overflowed: the artifact's sampler table or the latents scale; rebuild the artifact"


class FiniteWatch:
    """Stops (CPU) or flags (GPU) the first step whose latents are not finite."""

    def __init__(self, device: torch.device, num_steps: int, guidance_scale: float):
        self.eager = torch.device(device).type == "cpu"
        self.num_steps, self.guidance = num_steps, guidance_scale
        self.first = None

    def _error(self, step: int, cause: str) -> NumericsError:
        return NumericsError(f"the latents became NaN/Inf at step {step} of {self.num_steps} (guidance "
                             f"{self.guidance:g}); likely cause: {cause}")

    def after_step(self, step: int, x: torch.Tensor, outputs: dict, guided: torch.Tensor) -> None:
        if self.eager:
            if not torch.isfinite(x).all():
                raise self._error(step, _cause(outputs, guided))
            return
        bad = ~torch.isfinite(x).all()
        if self.first is None:
            self.first = torch.full((), -1, dtype=torch.int64, device=x.device)
        self.first = torch.where(bad & (self.first < 0), torch.full_like(self.first, step), self.first)

    def finish(self) -> None:
        if self.first is not None and (step := int(self.first)) >= 0:
            raise self._error(step, "too large a guidance scale, extreme inputs, or non-finite weights (lower "
                                    "--guidance, check the embeddings, rebuild the artifact)")
