"""Shared checks for the runtime's pipeline components (text encoders, tokenizer, VAE decoders)."""
from __future__ import annotations

import random

import torch


def fresh_seed() -> int:
    """A new seed per run (fresh random inputs), reported in failure messages to reproduce."""
    return random.randrange(2**31)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, seed: int, rel: float = 1e-4) -> float:
    """Max abs difference within `rel` of the reference's magnitude (fp32 rounding through a few layers)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)} (seed {seed})"
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != reference {ref.dtype} (seed {seed})"
    diff = (ours.double() - ref.double()).abs().max().item()
    scale = max(1.0, ref.double().abs().max().item())
    assert diff <= rel * scale, f"{what}: max abs diff {diff:.3g} > {rel:g} x {scale:.3g} (seed {seed})"
    return diff
