"""A compiled artifact in place of a diffusers pipeline's transformer.

    pipe = WanPipeline.from_pretrained(DIR)
    pipe.transformer = ditbake.diffusers.load_transformer(ART, pipeline=pipe)
    frames = pipe(prompt, num_inference_steps=20).frames   # runs the artifact's plan
    print(pipe.transformer.report.skip_fraction)

The pipeline keeps its own loop, text encoders, scheduler and VAE; each transformer call is mapped
to a plan step by its timestep (the baked timesteps of the artifact's samplers) and to a CFG
branch: WanPipeline and FluxPipeline call the model once per branch inside
`cache_context("cond" | "uncond")`; StableDiffusion3Pipeline and CogVideoXPipeline batch
[uncond; cond] into one call, which is split. Each branch then runs the plan's variants (skips
with their Δ caches, precisions, head schemes) through the runtime session's engines. A call at
a timestep, step count or shape the artifact was not built for is refused with DropInError.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from ditbake.exporter.scheduler_config import CLASS_KIND
from ditbake.runtime import arch_flux
from ditbake.runtime.errors import InputError

log = logging.getLogger(__name__)

# timesteps are on the schedulers' 0..1000 scale; distinct steps differ by ≥ ~1
TIMESTEP_TOL = 1e-2


class DropInError(InputError):
    """A pipeline call the artifact was not built for (timesteps, step count, shape, conditioning)."""


class CompiledTransformer(torch.nn.Module):
    """Behaves like the diffusers transformer the artifact was built from, for a pipeline's calls."""

    def __init__(self, session, pipeline=None):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict  # noqa: PLC0415

        self.session = session
        self.architecture = session.artifact.architecture
        self.config = FrozenDict(session.config)
        self._pipeline = [pipeline]  # a list: not registered as a submodule (the pipeline owns us)
        self._context: str | None = None
        self._state = None
        self._step: int | None = None
        self._last_t: float | None = None
        self._candidates: list[str] = []
        self.report = None  # GenerationReport of the current / last generation

    # --- what pipelines read off a transformer ---------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.session.dtype

    @property
    def device(self) -> torch.device:
        return self.session.device

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        self._context = name
        try:
            yield
        finally:
            self._context = None

    # --- the call --------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, pooled_projections: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, return_dict: bool = True, **unused):
        if encoder_hidden_states is None or timestep is None:
            raise DropInError("the compiled transformer needs encoder_hidden_states and timestep")
        if unused.get("controlnet_block_samples") is not None or unused.get("block_controlnet_hidden_states") is not None:
            raise DropInError("ControlNet residuals are not compiled into the artifact; use the diffusers transformer")
        out_dtype = hidden_states.dtype
        x, t = self._latents_in(hidden_states), self._timesteps_in(timestep, hidden_states.shape[0])
        branches = self._branches(x)
        outs = {}
        # cond first: a plan's guidance skips serve uncond from cond's residual of the same step
        for branch, rows in sorted(branches, key=lambda b: b[0] != "cond"):
            text = encoder_hidden_states[rows]
            pooled = None if pooled_projections is None else pooled_projections[rows]
            g = None if guidance is None else guidance[rows]
            outs[branch] = self._run(branch, x[rows], t[rows], text, pooled, g)
        out = torch.cat([outs[b] for b, _ in branches]) if len(outs) > 1 else next(iter(outs.values()))
        out = self._latents_out(out).to(out_dtype)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput  # noqa: PLC0415

        return Transformer2DModelOutput(sample=out)

    def _branches(self, x: torch.Tensor) -> list[tuple[str, slice]]:
        """(branch, rows) for this call: a named context is one branch; an unnamed or "cond_uncond"
        call is [uncond; cond] when the pipeline runs classifier-free guidance (SD3 exposes
        do_classifier_free_guidance, CogVideoX only its guidance scale); both halves then carry
        the same latents, which is checked."""
        if self._context in ("cond", "uncond"):
            return [(self._context, slice(None))]
        pipe = self._pipeline[0]
        cfg = getattr(pipe, "do_classifier_free_guidance", None)
        if cfg is None and pipe is not None:
            cfg = float(getattr(pipe, "_guidance_scale", 1.0) or 1.0) > 1.0
        if not cfg:
            return [("cond", slice(None))]
        half = x.shape[0] // 2
        if x.shape[0] % 2 or not torch.equal(x[:half], x[half:]):
            raise DropInError(f"the pipeline runs CFG but this call's batch of {x.shape[0]} is not [uncond; cond] "
                              "over the same latents; call the transformer per branch inside cache_context")
        return [("uncond", slice(0, half)), ("cond", slice(half, None))]

    def _run(self, branch: str, x, t, text, pooled, guidance) -> torch.Tensor:
        session = self.session
        prof = self._profile(tuple(x.shape[1:]), text.shape[1])
        step = self._step_for(float(t[0]), prof)
        if torch.any((t - t[0]).abs() > TIMESTEP_TOL):
            raise DropInError("the samples of one call are at different timesteps; the plan steps them together")
        if branch == "uncond" and "uncond" not in session.plan.steps[step]:
            raise DropInError("the artifact's plan has no uncond branch (built for guidance_scale <= 1); call the "
                              "pipeline with guidance off or rebuild with CFG")
        text = session._text(text, prof, "encoder_hidden_states")
        extras = session._extras(text, pooled, None if guidance is None else _scalar(guidance), "pooled_projections")
        return session.forward_once(self._state, step, branch, x.to(session.device, session.dtype),
                                    t.to(session.device, torch.float32), text, extras)

    # --- mapping calls to the artifact ------------------------------------------------------------
    def _profile(self, latent: tuple[int, ...], text_len: int):
        for p in self.session.profiles:
            if tuple(p.latent_shape) == latent and p.text_len == text_len:
                return p
        built = ", ".join(f"{p.name} (latent {list(p.latent_shape)}, text {p.text_len})" for p in self.session.profiles)
        raise DropInError(f"the pipeline calls the transformer with latents {list(latent)} and {text_len} text tokens; "
                          f"the artifact was built for {built}: call the pipeline at a built shape (height, width, "
                          "frames, max_sequence_length) or rebuild with this profile")

    def _step_for(self, t: float, prof) -> int:
        """The plan step of timestep t: the current step again (another CFG branch), the next step of
        the current generation, or step 0 of a new one (refused there if t is not a baked step 0)."""
        ongoing = self._state is not None and self._state.profile == prof
        if ongoing and abs(t - self._last_t) <= TIMESTEP_TOL:
            return self._step
        if ongoing and self._step + 1 < self.session.plan.num_steps:
            nxt = self._step + 1
            fits = [s for s in self._candidates if abs(self._table(s, prof).timesteps[nxt] - t) <= TIMESTEP_TOL]
            if fits:
                self._candidates, self._step, self._last_t = fits, nxt, t
                self.report.steps = nxt + 1
                return nxt
        self._begin(prof, t)
        return 0

    def _table(self, sampler: str, prof):
        return self.session.artifact.sampler(sampler, prof.name)

    def _begin(self, prof, t: float) -> None:
        samplers = list(self.session.artifact.samplers)
        expected = self._pipeline_timesteps()
        if expected is not None:
            fits = [s for s in samplers if _same(self._table(s, prof).timesteps, expected)]
            if not fits:
                baked = {s: [round(x, 2) for x in self._table(s, prof).timesteps] for s in samplers}
                raise DropInError(f"the pipeline's scheduler runs {len(expected)} steps at timesteps "
                                  f"{[round(x, 2) for x in expected]}, but the artifact was built for {baked}: call "
                                  f"the pipeline with num_inference_steps={self.session.plan.num_steps} and the "
                                  "scheduler config the artifact was built from, or rebuild")
        else:
            fits = [s for s in samplers if abs(self._table(s, prof).timesteps[0] - t) <= TIMESTEP_TOL]
        if not fits or abs(self._table(fits[0], prof).timesteps[0] - t) > TIMESTEP_TOL:
            raise DropInError(f"timestep {t:.2f} is not a step the artifact was built for (its schedules start at "
                              f"{sorted({round(self._table(s, prof).timesteps[0], 2) for s in samplers})}); check "
                              "num_inference_steps and the scheduler")
        own = CLASS_KIND.get(type(getattr(self._pipeline[0], "scheduler", None)).__name__)
        fits.sort(key=lambda s: s != own)  # the pipeline's own scheduler kind first
        self._state = self.session.new_state(prof.name, sampler=fits[0])
        self.report = self._state.report
        self.report.steps = 1
        self._candidates, self._step, self._last_t = fits, 0, t

    def _pipeline_timesteps(self) -> list[float] | None:
        """The pipeline scheduler's timesteps on the 0..1000 scale (None without a pipeline)."""
        scheduler = getattr(self._pipeline[0], "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            return None
        return [float(x) for x in timesteps]

    # --- layouts -------------------------------------------------------------------------------------
    def _latents_in(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The pipeline's model input → the runtime's latent layout (Flux: unpack its 2×2 tokens)."""
        if self.architecture != "flux":
            return hidden_states
        b, n, c = hidden_states.shape
        for p in self.session.profiles:
            _, h, w = p.latent_shape
            if (h // 2) * (w // 2) == n and 4 * p.latent_shape[0] == c:
                return arch_flux.unpack_latents(hidden_states, h // 2, w // 2)
        raise DropInError(f"the pipeline's packed latents [{b}, {n}, {c}] match no shape the artifact was built for "
                          f"({[list(p.latent_shape) for p in self.session.profiles]}); call the pipeline at a built "
                          "height and width or rebuild with this profile")

    def _latents_out(self, out: torch.Tensor) -> torch.Tensor:
        return arch_flux.pack_latents(out) if self.architecture == "flux" else out

    def _timesteps_in(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise DropInError(f"timestep has {t.numel()} values for a batch of {batch} (per-token timesteps, as "
                              "Wan 2.2's expand_timesteps, are not supported)")
        # FluxPipeline passes t / 1000 (the model multiplies by 1000 again)
        return t * 1000 if self.architecture == "flux" else t


def _same(a, b) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= TIMESTEP_TOL for x, y in zip(a, b))


def _scalar(guidance: torch.Tensor) -> float:
    values = guidance.reshape(-1).float()
    if torch.any(values != values[0]):
        raise DropInError("per-sample distilled guidance values differ; the compiled call takes one guidance scale")
    return float(values[0])


def load_transformer(artifact: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     pipeline=None) -> CompiledTransformer:
    """The artifact as a module for `pipeline.transformer`. Passing the pipeline lets the module check
    its scheduler's whole timestep schedule up front and split batched CFG calls."""
    from ditbake.runtime import load  # noqa: PLC0415

    session = load(artifact, device=device, dtype=dtype, cuda_graphs=False)
    if session.plan.mode != "baked":
        raise DropInError("the drop-in runs baked plans; re-plan with --mode baked or use `ditbake run`")
    module = CompiledTransformer(session, pipeline)
    if pipeline is not None:
        _check_matches(pipeline, module)
    return module


def replace_transformer(pipeline, artifact: str | Path, device=None, dtype: torch.dtype | None = None):
    """pipeline.transformer = the artifact's compiled transformer; returns that module."""
    device = device or getattr(pipeline, "device", "cpu")
    pipeline.transformer = load_transformer(artifact, device=device, dtype=dtype, pipeline=pipeline)
    return pipeline.transformer


def _check_matches(pipeline, module: CompiledTransformer) -> None:
    own = getattr(pipeline, "transformer", None)
    cls = module.session.artifact.manifest["model"].get("diffusers_class")
    if own is not None and not isinstance(own, CompiledTransformer) and type(own).__name__ != cls:
        raise DropInError(f"the artifact compiles a {cls}, but the pipeline's transformer is a "
                          f"{type(own).__name__}; load the artifact built from this pipeline")
