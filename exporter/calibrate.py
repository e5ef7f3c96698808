"""The calibration pass: run the model's real diffusers scheduler over N prompts through every
step, with forward hooks on the blocks recording per (prompt, CFG branch, step, block):

- gamma        Γ = ‖out − in‖₁ / ‖in‖₁, the relative L1 change a block makes to its input
- delta_l1     ‖Δ‖₁ / numel with Δ = out − in, the residual a skip would reuse
- delta_change ‖Δ_t − Δ_{t−1}‖₁ / ‖Δ_{t−1}‖₁ (NaN at the first step): how stale a cached Δ gets

Stored as safetensors (tensors) + JSON (metadata). Later techniques add their statistics to
this one pass as further observers (see `Observer`) rather than adding passes.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ditbake.exporter.adapters import Adapter
from ditbake.exporter.sampler import scheduler_for
from ditbake.runtime import arch as runtime_arch
from ditbake.runtime import atomic
from ditbake.runtime.errors import DitbakeError, InputError

log = logging.getLogger(__name__)

STATS_FILE = "stats.safetensors"
META_FILE = "calibration.json"
BRANCHES = ("cond", "uncond")


class CalibrationError(DitbakeError):
    exit_code = 10


@dataclass
class CalibrationStats:
    meta: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        tmp = atomic.staging_dir(out)
        try:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp / STATS_FILE))
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=1))
            atomic.replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    @staticmethod
    def load(path: str | Path) -> "CalibrationStats":
        path = Path(path)
        if not (path / META_FILE).exists() or not (path / STATS_FILE).exists():
            raise CalibrationError(f"{path} holds no calibration ({META_FILE} + {STATS_FILE}); "
                                   "run `ditbake calibrate` first")
        try:
            meta = json.loads((path / META_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path / META_FILE} is not valid JSON; re-run `ditbake calibrate`") from exc
        return CalibrationStats(meta, load_file(str(path / STATS_FILE)))


def load_prompt_embeds(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A safetensors file with `embeds` [N, L, D] and optionally `negative` [N, L, D] or [L, D]."""
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for bad files
        raise InputError(f"cannot read prompt embeddings from {path}: {exc}") from exc
    if "embeds" not in tensors:
        raise InputError(f"{path} has no 'embeds' tensor (found {sorted(tensors)})")
    embeds = tensors["embeds"]
    if embeds.ndim == 2:
        embeds = embeds[None]
    return embeds.float(), tensors.get("negative")


def load_pooled(path: str | Path) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The optional `pooled` [N, P] and `negative_pooled` [N or 1, P] tensors of a prompt file (SD3 / Flux:
    the CLIP encoders' pooled outputs)."""
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for bad files
        raise InputError(f"cannot read prompt embeddings from {path}: {exc}") from exc
    pooled, negative = tensors.get("pooled"), tensors.get("negative_pooled")
    return (None if pooled is None else pooled.float()), (None if negative is None else negative.float())


def pooled_inputs(adapter: Adapter, n: int, pooled: torch.Tensor | None, negative_pooled: torch.Tensor | None,
                  negative_given: bool) -> dict[str, torch.Tensor | None]:
    """Per-branch pooled vectors ({"cond": [N, P], "uncond": [1 or N, P]}); None where the architecture
    has no pooled input or the model derives it from its tokens (pooled_source "token_mean")."""
    arch, config = adapter.arch, adapter.config
    if "pooled" not in runtime_arch.extra_inputs(arch, config):
        return {"cond": None, "uncond": None}
    dim = arch.pooled_dim(config)
    token_mean = arch.pooled_is_token_mean(config)
    out = {}
    for branch, value, key in (("cond", pooled, "pooled"), ("uncond", negative_pooled, "negative_pooled")):
        if value is None:
            if token_mean:
                out[branch] = None
                continue
            if branch == "uncond" and not negative_given:  # no negative at all: zero conditioning
                out[branch] = torch.zeros(1, dim)
                continue
            raise InputError(f"this model takes a pooled text vector ({dim}-d, its CLIP encoders' pooled output): the "
                             f"prompt file needs `{key}` [N, {dim}]")
        value = value[None] if value.ndim == 1 else value
        if value.ndim != 2 or value.shape[1] != dim or (branch == "cond" and value.shape[0] != n):
            raise InputError(f"`{key}` has shape {list(value.shape)}; the model expects [{n}, {dim}]")
        out[branch] = value.float()
    return out


def random_prompt_embeds(n: int, text_len: int, text_dim: int, seed: int) -> torch.Tensor:
    """Stand-in prompt embeddings for random-weight models (no text encoder is shipped yet)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, text_len, text_dim, generator=gen)


class Observer:
    """A statistic gathered during the calibration pass. The pass sets `where` = (prompt, branch
    index, step) before every model forward; `results()` returns named tensors to store."""

    where: tuple[int, int, int] = (0, 0, 0)

    def results(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def end_prompt(self) -> None:
        """Called after each prompt's trajectory (drop per-trajectory state)."""

    def remove(self) -> None:
        """Detach hooks."""


class BlockResidualObserver(Observer):
    """Forward hooks on every block, writing into [prompt, branch, step, block] tensors at `where`."""

    def __init__(self, adapter: Adapter, shape: tuple[int, int, int, int]):
        self.adapter = adapter
        self.gamma = torch.zeros(shape)
        self.delta_l1 = torch.zeros(shape)
        self.delta_change = torch.full(shape, float("nan"))
        self.where = (0, 0, 0)  # prompt, branch, step
        self.prev_delta: dict[tuple[int, int, int], torch.Tensor] = {}  # (prompt, branch, block) → Δ
        self.handles = [m.register_forward_hook(self._hook(i), with_kwargs=True)
                        for i, m in enumerate(adapter.block_modules())]

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            p, b, step = self.where
            inp, out = self.adapter.block_io(args, kwargs, output)
            inp, out = inp.float(), out.float()
            delta = out - inp
            self.gamma[p, b, step, index] = delta.abs().mean() / inp.abs().mean().clamp_min(1e-12)
            self.delta_l1[p, b, step, index] = delta.abs().mean()
            prev = self.prev_delta.pop((p, b, index), None)
            if prev is not None:
                self.delta_change[p, b, step, index] = (delta - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12)
            self.prev_delta[(p, b, index)] = delta
        return hook

    def results(self) -> dict[str, torch.Tensor]:
        return {"gamma": self.gamma, "delta_l1": self.delta_l1, "delta_change": self.delta_change}

    def end_prompt(self) -> None:
        self.prev_delta.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def cfg_inputs(embeds: torch.Tensor, negative: torch.Tensor | None,
               guidance_scale: float) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The negative embeddings as [1 or N, L, D] (zeros when none are given) and the CFG branches
    a calibration pass runs (cond only when guidance is off)."""
    if negative is None:
        negative = torch.zeros_like(embeds[:1])
    if negative.ndim == 2:
        negative = negative[None]
    return negative, BRANCHES if guidance_scale > 1.0 else BRANCHES[:1]


@torch.no_grad()
def calibrate(adapter: Adapter, embeds: torch.Tensor, negative: torch.Tensor | None, *, latent: tuple[int, ...],
              sampler: str, num_steps: int, guidance_scale: float, seed: int, source: str,
              scheduler_config: dict | None = None, progress: bool = True,
              observers: list | None = None, pooled: torch.Tensor | None = None,
              negative_pooled: torch.Tensor | None = None, guidance: float | None = None) -> CalibrationStats:
    """One pass over prompts × steps × CFG branches. `observers` are factories
    `(adapter, (prompts, branches, steps, blocks)) -> Observer` for statistics beyond Γ and Δ.
    SD3 / Flux: `pooled` [N, P] and `negative_pooled` (see pooled_inputs); Flux with a guidance
    embedding: `guidance`, the distilled guidance scale (default the model config's)."""
    model = adapter.model
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    n, text_len, _ = embeds.shape
    use_cfg = guidance_scale > 1.0
    pools = pooled_inputs(adapter, n, pooled, negative_pooled, negative is not None)
    negative, branches = cfg_inputs(embeds, negative, guidance_scale)
    shape = (n, len(branches), num_steps, adapter.num_blocks)
    active = [BlockResidualObserver(adapter, shape)] + [make(adapter, shape) for make in (observers or [])]
    bar = tqdm(total=n * num_steps, desc="calibrate", unit="step", disable=not progress)
    try:
        for p in range(n):
            scheduler = scheduler_for(sampler, adapter, num_steps, latent, scheduler_config)
            gen = torch.Generator().manual_seed(seed + p)
            x = torch.randn((1, *latent), generator=gen).to(device) * float(getattr(scheduler, "init_noise_sigma", 1.0))
            texts = {"cond": embeds[p:p + 1].to(device, dtype),
                     "uncond": negative[p % negative.shape[0]][None].to(device, dtype)}
            pooled_p = {b: None if v is None else v[p % v.shape[0]][None].to(device, dtype) for b, v in pools.items()}
            g = None if guidance is None else torch.full((1,), float(guidance), device=device)
            for i, t in enumerate(scheduler.timesteps):
                outs = {}
                for bi, b in enumerate(branches):
                    for obs in active:
                        obs.where = (p, bi, i)
                    outs[b] = adapter.diffusers_forward(x.to(dtype), t.expand(1).to(device), texts[b],
                                                        pooled=pooled_p[b], guidance=g).float()
                out = outs["cond"] if not use_cfg else outs["uncond"] + guidance_scale * (outs["cond"] - outs["uncond"])
                x = scheduler.step(out, t, x, return_dict=False)[0]
                bar.update(1)
            for obs in active:
                obs.end_prompt()
    finally:
        for obs in active:
            obs.remove()
        bar.close()
    meta = {"source": source, "architecture": adapter.architecture, "diffusers_class": adapter.diffusers_class,
            "num_blocks": adapter.num_blocks, "linear_layers": list(adapter.linear_layers),
            "attention_sites": adapter.attention_sites, "sampler": sampler, "num_steps": num_steps,
            "guidance_scale": guidance_scale, "seed": seed, "num_prompts": n, "branches": list(branches),
            "latent_shape": list(latent), "text_len": text_len, "scheduler_config": scheduler_config,
            "layout": {"gamma": "prompt, branch, step, block", "delta_l1": "prompt, branch, step, block",
                       "delta_change": "prompt, branch, step, block (NaN at step 0)"}}
    tensors: dict[str, torch.Tensor] = {}
    for obs in active:
        tensors.update(obs.results())
    return CalibrationStats(meta, tensors)
