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

from ditbake.exporter import scheduler_config as scheduler_config_mod
from ditbake.exporter.scheduler_config import SamplerError
from ditbake.runtime.sampler import SamplerTable

log = logging.getLogger(__name__)

SAMPLERS = {
    "wan": ("unipc", "flow_euler"),
    "cogvideox": ("ddim", "dpmpp"),
    "sd3": ("flow_euler",),  # FlowMatchEulerDiscreteScheduler, shift 3 (SD3's and the test bed's)
    "flux": ("flow_euler",),  # FlowMatchEulerDiscreteScheduler; dynamic shift resolved per shape profile
}


def default_samplers(architecture: str, scheduler_config: dict | None = None) -> tuple[str, ...]:
    """The samplers a build bakes by default: the pipeline's own scheduler first, then the
    architecture's other kinds that fit the model's prediction type."""
    own = scheduler_config_mod.pipeline_kind(scheduler_config)
    fits = scheduler_config_mod.SERVES
    pred = scheduler_config_mod.prediction_type(architecture, scheduler_config)
    rest = tuple(k for k in SAMPLERS[architecture] if k != own and pred in fits[k])
    return ((own,) if own else ()) + rest


def make_scheduler(kind: str, architecture: str, base_config: dict | None = None):
    """A diffusers scheduler of `kind`. With a pipeline scheduler config (it has `_class_name`) it is
    built from that config (exporter/scheduler_config.py); without one, configured as the
    architecture's reference pipelines do (a bare config dict may set shift / flow_shift)."""
    import diffusers  # noqa: PLC0415

    base = dict(base_config or {})
    if "_class_name" in base:
        return scheduler_config_mod.from_pipeline(kind, architecture, base)
    scheduler_config_mod.check_fits(kind, architecture, None)
    if kind == "flow_euler":
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=base.get("shift", base.get("flow_shift", 3.0)),
                                                         use_dynamic_shifting=bool(base.get("use_dynamic_shifting")))
    if kind == "unipc":
        return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 num_train_timesteps=1000,
                                                 flow_shift=base.get("flow_shift", base.get("shift", 3.0)))
    cog = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
               prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
               set_alpha_to_one=True, clip_sample=False)
    if kind == "ddim":
        return diffusers.CogVideoXDDIMScheduler(**cog)
    cog.pop("set_alpha_to_one")
    cog.pop("clip_sample")
    return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                 final_sigmas_type="zero", **cog)


def scheduler_for(kind: str, adapter, num_steps: int, latent: tuple[int, ...], scheduler_config: dict | None = None):
    """A scheduler of `kind` with its timesteps set as the architecture's pipeline sets them for
    this latent shape (calibration runs the model under exactly the timesteps the build bakes)."""
    scheduler = make_scheduler(kind, adapter.architecture, scheduler_config)
    scheduler.set_timesteps(num_steps, **scheduler_config_mod.timestep_kwargs(
        adapter.architecture, scheduler, num_steps, tuple(latent), adapter.config))
    return scheduler


def bake_samplers(adapter, samplers: list[str], profiles, num_steps: int,
                  scheduler_config: dict | None = None) -> dict:
    """The manifest's `samplers` entry: {kind: table JSON}. A kind whose timesteps depend on the
    shape profile (Flux / SD3 dynamic shift: `mu` from the token count) also carries
    `per_profile`: {profile name: table JSON}; its top-level table is the first profile's, so a
    reader that predates per-profile tables still finds a valid table."""
    out = {}
    for kind in samplers:
        tables = {}
        for prof in profiles:
            scheduler = make_scheduler(kind, adapter.architecture, scheduler_config)
            kwargs = scheduler_config_mod.timestep_kwargs(adapter.architecture, scheduler, num_steps,
                                                          tuple(prof.latent_shape), adapter.config)
            tables[prof.name] = bake(scheduler, num_steps, kind, timestep_kwargs=kwargs)
            if not scheduler_config_mod.depends_on_profile(scheduler):
                break
        entry = next(iter(tables.values())).to_json()
        if len(tables) > 1:
            entry["per_profile"] = {name: t.to_json() for name, t in tables.items()}
        out[kind] = entry
    return out


def _check_linear(scheduler) -> None:
    cfg = scheduler.config
    if cfg.get("thresholding") or cfg.get("clip_sample"):
        raise SamplerError(f"{type(scheduler).__name__} with thresholding/clip_sample is not linear; disable it")


def bake(scheduler, num_steps: int, name: str, max_window: int = 4, tol: float = 1e-6,
         timestep_kwargs: dict | None = None) -> SamplerTable:
    """`timestep_kwargs`: the extra set_timesteps arguments the pipeline passes (sigmas, mu)."""
    _check_linear(scheduler)
    if scheduler.config.get("use_dynamic_shifting") and "mu" not in (timestep_kwargs or {}):
        raise SamplerError(f"{name}: use_dynamic_shifting needs the shape profile's `mu` (FluxPipeline's "
                           "calculate_shift); bake through bake_samplers with the build's profiles")
    scheduler.set_timesteps(num_steps, **(timestep_kwargs or {}))
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
