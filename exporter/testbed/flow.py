"""Rectified-flow training pairs and a flow-match Euler sampler with classifier-free guidance.

Convention (Wan's): x_t = (1 − t)·x0 + t·noise, the model predicts the velocity noise − x0,
and takes timesteps t·1000. Sampling integrates from t = 1 (noise) to t = 0 over the shifted
schedule σ(u) = s·u / (1 + (s − 1)·u) that diffusers' flow-match schedulers use (shift s = 3).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

DEFAULT_SHIFT = 3.0


def shift_sigmas(u: torch.Tensor, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def sample_t(n: int, shift: float = DEFAULT_SHIFT, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Training times: uniform u pushed through the sampling shift, so training sees t where sampling spends it."""
    u = torch.rand(n, generator=generator).to(device)
    return shift_sigmas(u, shift)


def training_pair(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity target) for clean samples x0 and times t [B]."""
    tt = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - tt) * x0 + tt * noise, noise - x0


def model_velocity(model, kind: str, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor,
                   pooled: torch.Tensor | None = None) -> torch.Tensor:
    """One diffusers forward of a test-bed model: Wan (video) or SD3 (image, needs pooled)."""
    if kind == "video":
        return model(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=tokens, return_dict=False)[0]
    return model(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=tokens, pooled_projections=pooled,
                 return_dict=False)[0]


@torch.no_grad()
def euler_sample(velocity: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor], noise: torch.Tensor,
                 steps: int = 20, guidance_scale: float = 5.0, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 to 0. `velocity(x, t, conditional)` returns v for one branch."""
    sigmas = torch.cat([shift_sigmas(torch.linspace(1.0, 1.0 / steps, steps), shift), torch.zeros(1)])
    x = noise
    for i in range(steps):
        t = torch.full((x.shape[0],), float(sigmas[i]), device=x.device)
        v = velocity(x, t, True)
        if guidance_scale > 1.0:
            v_uncond = velocity(x, t, False)
            v = v_uncond + guidance_scale * (v - v_uncond)
        x = x + (sigmas[i + 1] - sigmas[i]) * v.float()
    return x
