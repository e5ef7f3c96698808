"""Bake a diffusers scheduler into a SamplerTable by probing it with basis vectors.

Every supported scheduler step (flow-match Euler, UniPC, DDIM, DPM-Solver++ without
thresholding or noise) is linear in the initial sample and the model outputs. Feeding it the
initial sample e_0 and model output e_{i+1} at step i yields every later sample as its exact
coefficient vector over (x_0, m_0, m_1, ...). Each step is then re-expressed over a short window
of recent samples and outputs by least squares, and the residual is checked to be ~0.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ditbake.runtime.errors import DitbakeError
from ditbake.runtime.sampler import SamplerTable

log = logging.getLogger(__name__)

SAMPLERS = {
    "wan": ("unipc", "flow_euler"),
    "cogvideox": ("ddim", "dpmpp"),
    "sd3": ("flow_euler",),  # FlowMatchEulerDiscreteScheduler, shift 3 (SD3's and the test bed's)
    "flux": ("flow_euler",),  # FlowMatchEulerDiscreteScheduler with a static shift (dynamic `mu` is refused)
}


class SamplerError(DitbakeError):
    """The scheduler cannot be baked into a linear table."""

    exit_code = 9


def make_scheduler(kind: str, architecture: str, base_config: dict | None = None):
    """A diffusers scheduler of `kind`, configured as the architecture's pipelines do."""
    import diffusers  # noqa: PLC0415

    base = dict(base_config or {})
    if kind == "flow_euler":
        if base.get("use_dynamic_shifting"):
            raise SamplerError("flow_euler with use_dynamic_shifting (resolution-dependent `mu`, as FluxPipeline "
                               "uses) is not supported; bake a static shift (set use_dynamic_shifting false, shift S)")
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=base.get("shift", base.get("flow_shift", 3.0)))
    if kind == "unipc":
        return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 num_train_timesteps=1000,
                                                 flow_shift=base.get("flow_shift", base.get("shift", 3.0)))
    cog = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
               prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
               set_alpha_to_one=True, clip_sample=False)
    if kind == "ddim":
        return diffusers.CogVideoXDDIMScheduler(**cog)
    if kind == "dpmpp":
        cog.pop("set_alpha_to_one")
        cog.pop("clip_sample")
        return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                     final_sigmas_type="zero", **cog)
    raise SamplerError(f"unknown sampler {kind!r}; choose one of flow_euler, unipc, ddim, dpmpp")


def _check_linear(scheduler) -> None:
    cfg = scheduler.config
    if cfg.get("thresholding") or cfg.get("clip_sample"):
        raise SamplerError(f"{type(scheduler).__name__} with thresholding/clip_sample is not linear; disable it")


def bake(scheduler, num_steps: int, name: str, max_window: int = 4, tol: float = 1e-6) -> SamplerTable:
    _check_linear(scheduler)
    scheduler.set_timesteps(num_steps)
    timesteps = [float(t) for t in scheduler.timesteps]
    if len(timesteps) != num_steps:
        raise SamplerError(f"scheduler produced {len(timesteps)} timesteps for {num_steps} steps")
    n = num_steps + 1
    basis = torch.eye(n, dtype=torch.float64)
    # Shape [1, n]: schedulers expect a batch axis and a channel axis.
    x = basis[0].clone()[None]
    xs = [x[0]]  # coefficient vectors of the samples the model sees
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(basis[i + 1].clone()[None], t, x, return_dict=False)[0].to(torch.float64)
        xs.append(x[0])
    X = torch.stack(xs).numpy()
    M = basis[1:].numpy()
    sample_rows, output_rows = [], []
    for i in range(num_steps):
        for window in range(1, max_window + 1):
            cols = [X[i - k] for k in range(min(window, i + 1))] + [M[i - k] for k in range(min(window, i + 1))]
            A = np.stack(cols, axis=1)
            coef, *_ = np.linalg.lstsq(A, X[i + 1], rcond=None)
            resid = np.abs(A @ coef - X[i + 1]).max() / max(np.abs(X[i + 1]).max(), 1e-12)
            if resid < tol:
                break
        else:
            raise SamplerError(f"{name}: step {i} is not a linear update over the last {max_window} steps "
                               f"(residual {resid:.2e})")
        w = len(cols) // 2
        sample_rows.append(tuple(float(c) for c in coef[:w]))
        output_rows.append(tuple(float(c) for c in coef[w:]))
    log.info("baked %s: %d steps, window %d", name, num_steps, max(len(r) for r in sample_rows))
    return SamplerTable(name=name, timesteps=tuple(timesteps), init_noise_sigma=float(getattr(scheduler, "init_noise_sigma", 1.0)),
                        sample_coeffs=tuple(sample_rows), output_coeffs=tuple(output_rows))
