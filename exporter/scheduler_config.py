"""The pipeline's own scheduler: read its `scheduler/` config, rebuild it (or another bakeable class
with the compatible fields carried over), and set its timesteps exactly as the pipeline does.

A sampler *kind* (the name a table is baked under) is one bakeable scheduler family:

    flow_euler  FlowMatchEulerDiscreteScheduler   flow matching only
    unipc       UniPCMultistepScheduler           flow matching (flow sigmas) or ε / v prediction
    ddim        CogVideoXDDIMScheduler / DDIM      ε / v prediction only
    dpmpp       DPMSolverMultistepScheduler        ε / v prediction, or flow matching (flow sigmas)

With a pipeline config the scheduler of the pipeline's own class is `Class.from_config(config)`:
every field honoured. Another kind gets the fields its class accepts, plus the flow-matching
translation (`shift` ⇄ `flow_shift`, `prediction_type="flow_prediction"`, `use_flow_sigmas`), and
is refused when it cannot serve the model's prediction type. Without a config (a bare transformer
directory, a config .json, a tiny model) the architecture's historical defaults apply.
"""
from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import numpy as np

from ditbake.runtime.errors import DitbakeError

log = logging.getLogger(__name__)

CLASS_KIND = {"FlowMatchEulerDiscreteScheduler": "flow_euler", "UniPCMultistepScheduler": "unipc",
              "CogVideoXDDIMScheduler": "ddim", "DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpmpp"}
KINDS = ("flow_euler", "unipc", "ddim", "dpmpp")
# which prediction types each kind can integrate ("flow" = flow matching's velocity)
SERVES = {"flow_euler": {"flow"}, "unipc": {"flow", "epsilon", "v_prediction"}, "ddim": {"epsilon", "v_prediction"},
          "dpmpp": {"flow", "epsilon", "v_prediction"}}
# what each architecture's transformer predicts when no scheduler config says otherwise
ARCH_PREDICTION = {"wan": "flow", "sd3": "flow", "flux": "flow", "cogvideox": "v_prediction"}
# pipelines' own fallbacks when the scheduler config omits the dynamic-shift fields
# (FluxPipeline: max_shift 1.15; StableDiffusion3Pipeline: 1.16)
SHIFT_DEFAULTS = {"flux": (256, 4096, 0.5, 1.15), "sd3": (256, 4096, 0.5, 1.16)}


class SamplerError(DitbakeError):
    """The scheduler cannot be rebuilt as, or baked into, a linear sampler table of the requested kind."""

    exit_code = 9


def read(source: str | Path) -> dict | None:
    """The pipeline's scheduler config for a model source, or None (tiny model, config .json, a
    transformer directory without a sibling `scheduler/`)."""
    path = Path(str(source))
    if not path.is_dir():
        return None
    # the pipeline root, or its transformer/ component (the scheduler is then a sibling)
    candidates = [path / "scheduler"] + ([path.parent / "scheduler"] if path.name == "transformer" else [])
    for candidate in candidates:
        file = candidate / "scheduler_config.json"
        if file.is_file():
            try:
                config = json.loads(file.read_text())
            except json.JSONDecodeError as exc:
                raise SamplerError(f"{file} is not valid JSON ({exc.msg}); repair or re-save the pipeline") from exc
            log.info("scheduler from the pipeline: %s (%s)", config.get("_class_name"), file)
            return config
    return None


def prediction_type(architecture: str, config: dict | None) -> str:
    """"flow", "epsilon" or "v_prediction": what the model's output means to the scheduler."""
    if not config:
        return ARCH_PREDICTION[architecture]
    if str(config.get("_class_name", "")).startswith("FlowMatch") or config.get("prediction_type") == "flow_prediction":
        return "flow"
    if "_class_name" in config and "prediction_type" in config:
        return str(config["prediction_type"])
    return ARCH_PREDICTION[architecture]


def pipeline_kind(config: dict | None) -> str | None:
    """The sampler kind of the pipeline's own scheduler class (None without a pipeline config)."""
    if not config or "_class_name" not in config:
        return None
    name = config["_class_name"]
    if name not in CLASS_KIND:
        raise SamplerError(
            f"the pipeline's scheduler {name} cannot be baked (bakeable: {', '.join(sorted(CLASS_KIND))}; stochastic "
            "schedulers such as CogVideoXDPMScheduler add noise every step); pass --sampler "
            f"{'|'.join(KINDS)} to carry its config over to a bakeable one")
    return CLASS_KIND[name]


def check_fits(kind: str, architecture: str, config: dict | None) -> None:
    if kind not in KINDS:
        raise SamplerError(f"unknown sampler {kind!r}; choose one of {', '.join(KINDS)}")
    pred = prediction_type(architecture, config)
    if pred not in SERVES[kind]:
        source = f"its scheduler config ({config.get('_class_name')})" if config and "_class_name" in config else \
            f"the {architecture} architecture"
        fits = [k for k in KINDS if pred in SERVES[k]]
        raise SamplerError(f"sampler {kind!r} does not fit this model: {source} predicts {pred!r}, which "
                                   f"{kind} cannot integrate; choose one of {', '.join(fits)}")


def _accepted(cls, fields: dict) -> dict:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in fields.items() if k in params and not k.startswith("_")}


def from_pipeline(kind: str, architecture: str, config: dict):
    """A scheduler of `kind` from a pipeline scheduler config (see the module docstring)."""
    import diffusers  # noqa: PLC0415

    check_fits(kind, architecture, config)
    own = config.get("_class_name")
    if CLASS_KIND.get(own) == kind:
        return getattr(diffusers, own).from_config(config)
    target = {"flow_euler": diffusers.FlowMatchEulerDiscreteScheduler, "unipc": diffusers.UniPCMultistepScheduler,
              "ddim": diffusers.CogVideoXDDIMScheduler if architecture == "cogvideox" else diffusers.DDIMScheduler,
              "dpmpp": diffusers.DPMSolverMultistepScheduler}[kind]
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    if prediction_type(architecture, config) == "flow":
        if config.get("use_dynamic_shifting") and "use_dynamic_shifting" not in inspect.signature(target.__init__).parameters:
            raise SamplerError(f"the pipeline's {own} shifts by resolution (use_dynamic_shifting), which "
                                       f"{target.__name__} cannot; use --sampler {CLASS_KIND.get(own, 'flow_euler')}")
        shift = float(config.get("flow_shift", config.get("shift", 1.0)))
        if kind == "flow_euler":
            fields["shift"] = shift
        else:
            fields.update(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    carried = _accepted(target, fields)
    log.info("sampler %s: %s with %s carried over from the pipeline's %s", kind, target.__name__,
             sorted(carried), own)
    return target.from_config(carried)


def timestep_kwargs(architecture: str, scheduler, num_steps: int, latent_shape: tuple[int, ...],
                    model_config: dict) -> dict:
    """The extra `set_timesteps` arguments the architecture's pipeline passes for one shape profile:
    FluxPipeline always passes sigmas = linspace(1, 1/N, N) (unless use_flow_sigmas) and
    mu = calculate_shift(packed tokens); StableDiffusion3Pipeline passes mu only under
    use_dynamic_shifting. `mu` is a constant per profile, so it is resolved here at build time."""
    cfg = scheduler.config
    accepted = inspect.signature(scheduler.set_timesteps).parameters
    kwargs = {}
    if architecture == "flux":
        if not cfg.get("use_flow_sigmas"):
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        kwargs["mu"] = _mu(architecture, cfg, (latent_shape[-2] // 2) * (latent_shape[-1] // 2))
    elif architecture == "sd3" and cfg.get("use_dynamic_shifting"):
        p = int(model_config.get("patch_size", 2))
        kwargs["mu"] = _mu(architecture, cfg, (latent_shape[-2] // p) * (latent_shape[-1] // p))
    missing = [k for k in kwargs if k not in accepted]
    if missing and cfg.get("use_dynamic_shifting"):
        raise SamplerError(f"{type(scheduler).__name__}.set_timesteps takes no {missing}, which the "
                                   f"{architecture} pipeline passes; choose --sampler flow_euler")
    return {k: v for k, v in kwargs.items() if k in accepted}


def _mu(architecture: str, cfg, image_seq_len: int) -> float:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: PLC0415 - the pipelines' own formula

    base_len, max_len, base_shift, max_shift = SHIFT_DEFAULTS[architecture]
    return float(calculate_shift(image_seq_len, cfg.get("base_image_seq_len", base_len),
                                 cfg.get("max_image_seq_len", max_len), cfg.get("base_shift", base_shift),
                                 cfg.get("max_shift", max_shift)))


def depends_on_profile(scheduler) -> bool:
    """True when the timesteps depend on the shape profile (resolution-dependent shift)."""
    return bool(scheduler.config.get("use_dynamic_shifting"))
