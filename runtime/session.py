"""The runtime session: load an artifact once, then generate.

    session = ditbake.runtime.load("artifacts/built/tiny-wan")
    result = session.generate(text_embeds, seed=0, guidance_scale=5.0)

Per step: look up each block's variant in the plan (no host synchronisation in baked mode),
run prologue → blocks → epilogue for each CFG branch, combine with the guidance scale, apply the
baked sampler. A skipped block adds its cached residual Δ (Temporal Delta Cache); caches are
kept per CFG branch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ditbake.runtime import arch as runtime_arch
from ditbake.runtime.artifact import Artifact, Profile, load_artifact
from ditbake.runtime.attention import AttentionRunner
from ditbake.runtime.conditioning import prologue_extras
from ditbake.runtime.devices import resolve_device
from ditbake.runtime.engines import AotiEngines, EagerEngines
from ditbake.runtime.errors import BackendError, InputError
from ditbake.runtime.graphs import ForwardGraphs, graph_blockers
from ditbake.runtime.nn import is_quantized_tensor
from ditbake.runtime.numerics import FiniteWatch, check_embeds, check_request
from ditbake.runtime.sampler import BakedSampler

log = logging.getLogger(__name__)

BACKENDS = ("eager", "aoti", "tensorrt")


@dataclass
class GenerationReport:
    """What ran: counts the fidelity harness and benchmarks read."""

    steps: int = 0
    block_computes: int = 0
    block_skips: int = 0
    attention_flops_done: float = 0.0
    attention_flops_dense: float = 0.0
    seconds: float = 0.0
    sampler: str = ""
    profile: str = ""
    variants_used: list[int] = field(default_factory=list)
    # adaptive mode: device→host reads (at most one per step) and picks the plan had not precompiled
    host_syncs: int = 0
    adaptive_fallbacks: int = 0
    # CUDA graphs: forwards captured and replayed in this call
    graph_captures: int = 0
    graph_replays: int = 0

    @property
    def skip_fraction(self) -> float:
        return self.block_skips / max(self.block_computes + self.block_skips, 1)

    @property
    def attention_flops_fraction(self) -> float:
        return self.attention_flops_done / max(self.attention_flops_dense, 1.0)

    def to_json(self) -> dict:
        return {"steps": self.steps, "block_computes": self.block_computes, "block_skips": self.block_skips,
                "skip_fraction": self.skip_fraction, "attention_flops_fraction": self.attention_flops_fraction,
                "seconds": self.seconds, "sampler": self.sampler, "profile": self.profile,
                "variants_used": sorted(set(self.variants_used)), "host_syncs": self.host_syncs,
                "adaptive_fallbacks": self.adaptive_fallbacks, "graph_captures": self.graph_captures,
                "graph_replays": self.graph_replays}


@dataclass
class GenerationResult:
    latents: torch.Tensor
    report: GenerationReport
    trajectory: list[torch.Tensor] | None = None


@dataclass
class DenoiseState:
    """What one generation carries between model evaluations: Δ caches per branch, attention counts,
    the report. `Session.generate` keeps its own; callers driving their own loop (the diffusers
    drop-in) keep one per generation and pass it to `Session.forward_once`."""

    profile: Profile
    attention: AttentionRunner
    report: GenerationReport
    deltas: dict = field(default_factory=dict)
    cond_step: int = -1  # the last step whose cond forward ran (a guidance skip of uncond reads it)


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise InputError(f"{name} contains NaN or Inf; pass finite values")


class Session:
    def __init__(self, artifact: Artifact, device: torch.device, dtype: torch.dtype | None,
                 cuda_graphs: bool | None = None):
        self.artifact = artifact
        self.device = device
        self.arch = runtime_arch.get(artifact.architecture)
        self.config = artifact.config
        stored = {t.dtype for t in artifact.weights.values() if t.is_floating_point()}
        self.dtype = dtype or (torch.bfloat16 if torch.bfloat16 in stored else torch.float32)
        # quantized tensors keep their formats (NVFP4 / 8-bit weights and their fp32 scales): casting
        # them to the compute dtype would dequantize them or round their scales.
        self.weights = {k: (v.to(self.dtype) if v.is_floating_point() and not is_quantized_tensor(k) else v)
                        for k, v in artifact.weights.items()}
        self.plan = artifact.plan
        self._text_encoder = None
        self._components = None
        if artifact.manifest.get("backend", "eager") == "tensorrt":
            from ditbake.runtime.engines_trt import TrtEngines  # noqa: PLC0415 - needs tensorrt, loaded on demand

            self.engines = TrtEngines(self.arch, self.config, self.weights, artifact.path,
                                      artifact.manifest["engines"], device)
        elif artifact.manifest.get("backend", "eager") == "aoti":
            self.engines = AotiEngines(self.arch, self.config, self.weights, artifact.path,
                                       artifact.manifest["engines"], device)
        else:
            self.engines = EagerEngines(self.arch, self.config, self.weights)
        if self.plan.num_blocks != self.arch.num_blocks(self.config):
            raise InputError(f"plan has {self.plan.num_blocks} blocks but the model has "
                             f"{self.arch.num_blocks(self.config)}; re-run `ditbake plan` for this model")
        self._graphs = None
        blockers = graph_blockers(self.device, self.plan, artifact.manifest.get("backend", "eager"))
        if cuda_graphs and blockers:
            raise BackendError(f"CUDA graphs are not possible here: {'; '.join(blockers)}")
        if cuda_graphs is not False and not blockers:
            self._graphs = ForwardGraphs()
            self._graph_deltas: dict[tuple, dict] = {}  # Δ buffers the graphs read and write, per (profile, batch)
        self._graphs_required = bool(cuda_graphs)

    @property
    def text_dim(self) -> int:
        """Width of the per-token text embeddings the model takes."""
        return int(self.config.get("text_dim", self.config.get("text_embed_dim", 0)))

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """The architecture's conditioning beyond token embeddings: ("pooled",), ("pooled", "guidance") or ()."""
        return runtime_arch.extra_inputs(self.arch, self.config)

    @property
    def plan(self):
        return self._plan

    @plan.setter
    def plan(self, plan) -> None:
        """Setting a plan (eval's baseline, benchmarks) re-derives which stack residuals and per-block Δs
        it needs: stale sets would keep serving the old plan's whole-step skips."""
        self._plan = plan
        self._stack_skips, self._cached_blocks = _delta_needs(plan)
        self._stack_branches = {branch for _, branch in self._stack_skips}  # branches that keep a stack residual
        self._stack_coeff = _extrapolation_coefficients(plan, self._stack_skips)
        # uncond skips served by cond's residual of the same step + the last gap (plan.uncond_skip "guidance")
        self._guidance_steps = {i for i, branch in self._stack_skips
                                if branch == "uncond" and plan.uncond_skip == "guidance" and plan.computes_stack(i, "cond")}
        if self._guidance_steps:
            self._stack_branches |= {"cond", "uncond"}

    @property
    def profiles(self) -> tuple[Profile, ...]:
        return self.artifact.profiles

    def profile(self, name: str | None = None) -> Profile:
        if name is None:
            return self.profiles[0]
        for p in self.profiles:
            if p.name == name:
                return p
        raise InputError(f"shape profile {name!r} is not in this artifact; it supports "
                         f"{', '.join(f'{p.name} (latent {list(p.latent_shape)}, text {p.text_len})' for p in self.profiles)}")

    def _text(self, embeds: torch.Tensor, profile: Profile, what: str) -> torch.Tensor:
        if not isinstance(embeds, torch.Tensor):
            raise InputError(f"{what} must be a torch.Tensor, got {type(embeds).__name__}")
        if embeds.ndim == 2:
            embeds = embeds[None]
        if embeds.ndim != 3 or embeds.shape[1:] != (profile.text_len, self.text_dim):
            raise InputError(f"{what} has shape {list(embeds.shape)}; profile {profile.name} expects "
                             f"[batch, {profile.text_len}, {self.text_dim}]")
        check_embeds(what, embeds)
        return embeds.to(self.device, self.dtype)

    @property
    def components(self):
        """The artifact's text encoder(s) and VAE decoder (runtime/components_session.py), or None."""
        section = self.artifact.manifest.get("components")
        if not section:
            return None
        if self._components is None:
            from safetensors.torch import load_file  # noqa: PLC0415

            from ditbake.runtime.components_session import Components  # noqa: PLC0415

            path = self.artifact.path  # every file under it was hash-checked at load
            self._components = Components(path, section, lambda rel: load_file(str(path / rel), device=str(self.device)),
                                          self.device, self.artifact.manifest.get("backend", "eager"))
        return self._components

    def _negative_default(self) -> str:
        if self.components is not None:
            return self.components.negative_prompt
        return self.artifact.manifest["text_encoder"].get("negative_prompt", "")

    def _extras(self, text: torch.Tensor, pooled, guidance, what: str, zero_pooled: bool = False) -> tuple:
        """The architecture's extra prologue inputs for one CFG branch (runtime/conditioning.py)."""
        return prologue_extras(self.arch, self.config, text, pooled, guidance, what, zero_pooled=zero_pooled,
                               device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Per-token prompt embeddings from the text encoder(s) the artifact stores (or records)."""
        if self.components is not None:
            return self.components.encode(list(prompts))[0]
        entry = self.artifact.manifest.get("text_encoder")
        if not entry:
            raise InputError("this artifact stores no text encoder; pass text_embeds, or rebuild it from the "
                             "pipeline directory (`ditbake build --model PIPELINE_DIR`)")
        if self._text_encoder is None:
            from ditbake.runtime.artifact import sha256_file  # noqa: PLC0415
            from ditbake.runtime.text_encoder import TextEncoder, model_dir  # noqa: PLC0415

            digest = sha256_file(model_dir() / "model.safetensors")
            if digest != entry["weights_sha256"]:
                raise InputError(f"installed text encoder weights ({digest[:12]}…) differ from the ones the artifact "
                                 f"was built with ({entry['weights_sha256'][:12]}…); install {entry['package']} "
                                 "at that version")
            self._text_encoder = TextEncoder.load(max_length=int(entry["max_length"]))
        return self._text_encoder.encode(prompts)

    def _encode_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(per-token embeddings, pooled vector or None): SD3 and Flux pipelines give both."""
        if self.components is not None:
            return self.components.encode(list(prompts))
        return self.encode_prompt(prompts), None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, *latent_shape] → frames float [B, F, H, W, 3] in [0, 1]: the stored VAE decoder after
        the pipeline's latent normalization, or the identity for pixel-space test beds."""
        if self.components is not None:
            return self.components.decode(latents)
        from ditbake.runtime.components_session import identity_frames  # noqa: PLC0415

        return identity_frames(latents, self.artifact.architecture)

    @torch.no_grad()  # inputs straight from a text encoder may require grad; inference never does
    def generate(self, text_embeds: torch.Tensor | None = None, negative_embeds: torch.Tensor | None = None, *,
                 prompt: str | list[str] | None = None, negative_prompt: str | None = None, seed: int = 0, guidance_scale: float = 5.0, profile: str | None = None,
                 sampler: str | None = None, latents: torch.Tensor | None = None,
                 keep_trajectory: bool = False, progress=None, pooled_embeds: torch.Tensor | None = None,
                 negative_pooled_embeds: torch.Tensor | None = None,
                 guidance: float | None = None) -> GenerationResult:
        """Run the whole denoising loop; returns the final latents [B, *latent_shape] (fp32).

        Conditioning: `text_embeds` [B, L, D], or `prompt` (free text, encoded by the artifact's text
        encoder; the negative defaults to the encoder's empty prompt). SD3 and Flux also take the
        pooled text vector `pooled_embeds` [B, P] (and `negative_pooled_embeds` with CFG; optional
        where the model's pooled vector is its token mean, as the test bed's). `guidance`: Flux's
        distilled guidance scale (guidance_embeds models; default the artifact's, 3.5), separate
        from the CFG `guidance_scale`."""
        prof = self.profile(profile)
        check_request(prompt, guidance_scale, seed)
        if prompt is not None:
            if text_embeds is not None:
                raise InputError("pass either prompt or text_embeds, not both")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            text_embeds, pooled = self._encode_with_pooled(prompts)
            pooled_embeds = pooled if pooled_embeds is None else pooled_embeds
            if negative_embeds is None:
                default = self._negative_default()
                negative_embeds, negative_pooled = self._encode_with_pooled(
                    [negative_prompt if negative_prompt is not None else default] * len(prompts))
                negative_pooled_embeds = negative_pooled if negative_pooled_embeds is None else negative_pooled_embeds
        if text_embeds is None:
            raise InputError("generate needs text_embeds or a prompt")
        sampler_name = sampler or self.artifact.default_sampler
        if sampler_name not in self.artifact.samplers:
            raise InputError(f"sampler {sampler_name!r} is not baked into this artifact; it has "
                             f"{sorted(self.artifact.samplers)}")
        table = self.artifact.sampler(sampler_name, prof.name)
        cond = self._text(text_embeds, prof, "text_embeds")
        batch = cond.shape[0]
        use_cfg = guidance_scale > 1.0
        extras = {"cond": self._extras(cond, pooled_embeds, guidance, "pooled_embeds")}
        if use_cfg:
            no_negative = negative_embeds is None
            if no_negative:
                negative_embeds = torch.zeros_like(cond)
            uncond = self._text(negative_embeds, prof, "negative_embeds")
            if uncond.shape[0] != batch:
                raise InputError(f"negative_embeds batch {uncond.shape[0]} differs from text_embeds batch {batch}")
            # no negative at all is zero conditioning, its pooled vector included
            extras["uncond"] = self._extras(uncond, negative_pooled_embeds, guidance, "negative_pooled_embeds",
                                            zero_pooled=no_negative)
        shape = (batch, *prof.latent_shape)
        if latents is None:
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            latents = torch.randn(shape, generator=gen, dtype=torch.float32) * table.init_noise_sigma
        elif tuple(latents.shape) != shape:
            raise InputError(f"latents have shape {list(latents.shape)}; profile {prof.name} expects {list(shape)}")
        elif not latents.is_floating_point():
            raise InputError(f"latents have dtype {latents.dtype}; pass floating-point latents")
        else:  # seeded noise is finite by construction: only given latents cost a check (a host read)
            _check_finite("latents", latents)
        x = latents.to(self.device, torch.float32)

        report = GenerationReport(sampler=sampler_name, profile=prof.name)
        attention = AttentionRunner(tiles=dict(self.plan.tiles))
        deltas: dict[tuple[str, int], torch.Tensor] = {}
        baked = BakedSampler(table)
        trajectory = [x.clone()] if keep_trajectory else None
        branches = [("cond", cond)] + ([("uncond", uncond)] if use_cfg else [])
        branches = self._local_branches(branches)  # CFG-parallel: this rank's branch (runtime/distributed.py)
        start = time.perf_counter()
        steps = range(table.num_steps)
        adaptive = None
        if self.plan.mode == "adaptive":  # baked mode (the default) never reads back from the device
            from ditbake.runtime.adaptive import AdaptiveController  # noqa: PLC0415

            adaptive = AdaptiveController(self.plan, [b for b, _ in branches], self.device)
        graphs = self._graphs
        if graphs is not None:
            deltas = self._graph_deltas.setdefault((prof.name, batch), {})
            captures, replays = graphs.captures, graphs.replays
        watch = FiniteWatch(self.device, table.num_steps, guidance_scale)
        for i in (progress(steps) if progress else steps):
            if adaptive is not None:
                adaptive.begin_step(i)
            t = torch.full((batch,), table.timesteps[i], device=self.device, dtype=torch.float32)
            outputs = {}
            for branch, text in branches:
                if graphs is None:
                    outputs[branch] = self._forward(i, branch, x, t, text, prof, attention, deltas, report, adaptive,
                                                    extras[branch])
                    continue
                ids = self._graph_key(i, branch)

                def forward(x_, t_, text_, *extras_, i=i, branch=branch):
                    return self._forward(i, branch, x_, t_, text_, prof, attention, deltas, report, None, extras_)

                try:
                    outputs[branch] = graphs.run((prof.name, batch, branch, ids), (prof.name, batch, branch),
                                                 (x.to(self.dtype), t, text, *extras[branch]), forward, report,
                                                 attention)
                except RuntimeError as exc:  # a capture the driver refused: run eagerly from here on
                    if self._graphs_required:
                        raise BackendError(f"CUDA graph capture failed ({exc}); load with cuda_graphs=False") from exc
                    log.warning("CUDA graph capture failed (%s); continuing without graphs", exc)
                    self._graphs = graphs = None
                    outputs[branch] = self._forward(i, branch, x, t, text, prof, attention, deltas, report, None,
                                                    extras[branch])
            outputs = self._share_outputs(outputs)
            out = outputs["cond"]
            if use_cfg:
                out = outputs["uncond"] + guidance_scale * (outputs["cond"] - outputs["uncond"])
            x = baked.step(i, x, out.float())
            watch.after_step(i, x, outputs, out)
            if trajectory is not None:
                trajectory.append(x.clone())
        watch.finish()
        if graphs is not None:
            report.graph_captures, report.graph_replays = graphs.captures - captures, graphs.replays - replays
        report.steps = table.num_steps
        report.seconds = time.perf_counter() - start
        report.attention_flops_done = attention.flops_done
        report.attention_flops_dense = attention.flops_dense
        if adaptive is not None:
            report.host_syncs, report.adaptive_fallbacks = adaptive.host_syncs, adaptive.fallbacks
        return GenerationResult(latents=x, report=report, trajectory=trajectory)

    def _graph_key(self, step: int, branch: str) -> tuple:
        """What a captured forward of this step and branch bakes in: the variant ids, the extrapolation
        coefficient (a constant inside the graph) and whether a skipped uncond stack reads cond's
        residual + the gap instead of its own (same ids and coefficient, another computation)."""
        guidance = branch == "uncond" and step in self._guidance_steps
        return (*self.plan.step_ids(step, branch), self._stack_coeff.get((step, branch)), guidance)

    def _local_branches(self, branches: list) -> list:
        return branches  # one process runs every CFG branch

    def _share_outputs(self, outputs: dict) -> dict:
        return outputs
    def new_state(self, profile: str | None = None, sampler: str = "") -> DenoiseState:
        prof = self.profile(profile)
        return DenoiseState(prof, AttentionRunner(tiles=dict(self.plan.tiles)),
                            GenerationReport(sampler=sampler, profile=prof.name))

    @torch.no_grad()
    def forward_once(self, state: DenoiseState, step: int, branch: str, x: torch.Tensor, t: torch.Tensor,
                     text: torch.Tensor, extras: tuple = ()) -> torch.Tensor:
        """One model evaluation at plan step `step` for CFG `branch` ("cond" / "uncond"), with the plan's
        variants and the state's Δ caches: the model output [B, *latent_shape] in the session dtype.
        Inputs are already in the session's device and dtype (t: fp32 [B], extras per extra_inputs).
        Baked plans only: an adaptive plan decides per step inside `generate`."""
        if self.plan.mode != "baked":
            raise InputError("forward_once runs baked plans; an adaptive plan runs through generate()")
        if not 0 <= step < self.plan.num_steps or branch not in ("cond", "uncond"):
            raise InputError(f"step {step} / branch {branch!r} is outside the plan ({self.plan.num_steps} steps, "
                             "branches cond and uncond)")
        if branch == "uncond" and self._guidance_steps and state.cond_step != step:
            raise InputError(f"step {step}: this plan's uncond pairs with cond's residual of the same step "
                             "(uncond_skip 'guidance'); run cond before uncond")
        out = self._forward(step, branch, x, t, text, state.profile, state.attention, state.deltas, state.report,
                            None, extras)
        if branch == "cond":
            state.cond_step = step
        state.report.attention_flops_done = state.attention.flops_done
        state.report.attention_flops_dense = state.attention.flops_dense
        return out

    def _forward(self, step: int, branch: str, x, t, text, prof: Profile, attention, deltas, report,
                 adaptive=None, extras: tuple = ()) -> torch.Tensor:
        h, ctx = self.engines.prologue(x.to(self.dtype), t, text, prof, extras)
        ids = self.plan.step_ids(step, branch)
        stack_key = (branch, -1)
        if adaptive is None and (step, branch) in self._stack_skips:
            # the whole stack is skipped: Σ of the blocks' cached Δ is the last computed step's
            # output − input, so one add replaces num_blocks adds and per-block Δs need not be kept
            if stack_key not in deltas:
                raise InputError(f"plan skips every block at step {step} ({branch}) before any was computed; "
                                 "re-run `ditbake plan`")
            report.variants_used.extend(ids)
            report.block_skips += self.plan.num_blocks
            if branch == "uncond" and step in self._guidance_steps:
                # cond's residual of this step (its forward ran first) + the last measured uncond − cond gap
                return self.engines.epilogue(h + deltas[("cond", -1)] + deltas[_GAP], ctx)
            residual = deltas[stack_key]
            coeff = self._stack_coeff.get((step, branch), 0.0)
            if coeff:  # the line through the last two computed residuals: R₁ + c·(R₁ − R₀)
                residual = torch.add(residual, residual - deltas[(branch, -2)], alpha=coeff)
            return self.engines.epilogue(h + residual, ctx)
        h_in = h
        if adaptive is not None:
            ids = list(ids)
        for b in range(self.plan.num_blocks):
            if adaptive is not None:
                ids[b] = adaptive.variant_id(branch, b)
            variant = self.plan.variants[ids[b]]
            report.variants_used.append(ids[b])
            key = (branch, b)
            if variant.compute:
                out = self.engines.block(ids[b], variant, b, h, ctx, attention, branch)
                if adaptive is not None:
                    adaptive.record(branch, b, h, out, deltas.get(key))
                if adaptive is not None or key in self._cached_blocks:
                    _store_difference(deltas, key, out, h)
                h = out
                report.block_computes += 1
            else:
                h = h + deltas[key]
                report.block_skips += 1
        if adaptive is None and branch in self._stack_branches:
            if self.plan.stack_extrapolation == "linear":
                previous = deltas.get(stack_key)
                if previous is None:  # allocated now, outside any graph capture; read only once refreshed
                    deltas[(branch, -2)] = torch.empty_like(h)
                else:
                    deltas[(branch, -2)].copy_(previous)
            _store_difference(deltas, stack_key, h, h_in)
            if self._guidance_steps and branch == "uncond":  # the plan guarantees cond computed this step too
                _store_difference(deltas, _GAP, deltas[stack_key], deltas[("cond", -1)])
        return self.engines.epilogue(h, ctx)


_GAP = ("gap", -1)  # uncond's stack residual − cond's, at the last step both computed


def _store_difference(deltas: dict, key, a: torch.Tensor, b: torch.Tensor) -> None:
    """deltas[key] = a − b, written into the existing buffer when there is one (CUDA graphs hold it)."""
    buf = deltas.get(key)
    if buf is not None and buf.shape == a.shape and buf.dtype == a.dtype:
        torch.sub(a, b, out=buf)
    else:
        deltas[key] = a - b


def _extrapolation_coefficients(plan, stack_skips) -> dict[tuple[int, str], float]:
    """For a plan with linear stack extrapolation: at each whole-skip step i of a branch, with j₁ and
    j₀ its last two computed steps, c = (i − j₁)/(j₁ − j₀), so the residual used is R₁ + c·(R₁ − R₀)
    (in step units, as TaylorSeer). 0 where fewer than two steps were computed."""
    if plan.stack_extrapolation != "linear":
        return {}
    coeffs = {}
    for branch in ("cond", "uncond"):
        computed = []
        for i in range(plan.num_steps):
            if (i, branch) in stack_skips:
                coeffs[i, branch] = (i - computed[-1]) / (computed[-1] - computed[-2]) if len(computed) >= 2 else 0.0
            else:
                computed.append(i)
    return coeffs


def _delta_needs(plan) -> tuple[set[tuple[int, str]], set[tuple[str, int]]]:
    """Baked plans: the (step, branch) pairs that skip every block (served from one stack residual),
    and the (branch, block) pairs some other step skips on their own (their Δ must be cached).
    Keeping only these bounds the cache: a whole-step skip plan holds one residual per branch, not
    one per block (30 blocks × 2 branches × 100 MB for Wan2.1-1.3B at 480×832×81)."""
    stack, blocks = set(), set()
    for i in range(plan.num_steps):
        for branch in ("cond", "uncond"):
            if not plan.computes_stack(i, branch):
                stack.add((i, branch))
            else:
                blocks.update((branch, b) for b, v in enumerate(plan.step_ids(i, branch)) if not plan.variants[v].compute)
    return stack, blocks


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         backend: str | None = None, cuda_graphs: bool | None = None, parallel: str | None = None) -> Session:
    """Load and validate an artifact (hashes, format version, plan) and return a Session.

    `backend` defaults to the one the artifact was built for; naming another is an error.
    `cuda_graphs`: None uses them where possible (runtime/graphs.py says where), True requires
    them (an error says why not), False never. `parallel` ("cfg", "ulysses", "cfg+ulysses"):
    this process is one rank of a torchrun job (runtime/distributed.py)."""
    if backend is not None and backend not in BACKENDS:
        raise BackendError(f"backend {backend!r} is not available in this runtime; choose one of {BACKENDS}")
    device = resolve_device(device)
    if parallel is not None:
        from ditbake.runtime import distributed  # noqa: PLC0415 - imports this module

        device = distributed.init_process_group(device)
    artifact = load_artifact(path, device=device)
    built_for = artifact.manifest.get("backend", "eager")
    if built_for not in BACKENDS:
        raise BackendError(f"artifact {path} was built for backend {built_for!r}, which this runtime does not have; "
                           f"it has {BACKENDS}")
    if backend is not None and built_for != backend:
        raise BackendError(f"artifact {path} was built for backend {built_for!r}, not {backend!r}; load it with "
                           f"backend={built_for!r} or rebuild it with `ditbake build --backend {backend}`")
    if parallel is not None:
        return distributed.ParallelSession(artifact, device, dtype, cuda_graphs=cuda_graphs, parallel=parallel)
    return Session(artifact, device, dtype, cuda_graphs=cuda_graphs)
