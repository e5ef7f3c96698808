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
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ditbake.exporter.adapters import Adapter
from ditbake.exporter.models import compute_dtype
from ditbake.exporter.sampler import scheduler_for
from ditbake.runtime import arch as runtime_arch
from ditbake.runtime import atomic
from ditbake.runtime.devices import resolve_device
from ditbake.runtime.errors import DitbakeError, InputError
from ditbake.runtime.outputs import CALIBRATION_FORMAT, check_output
from ditbake.runtime.safe_io import read_json, regular_file_size

log = logging.getLogger(__name__)

STATS_FILE = "stats.safetensors"
META_FILE = "calibration.json"
BRANCHES = ("cond", "uncond")


class CalibrationError(DitbakeError):
    exit_code = 10


from ditbake.exporter.calibrate_check import check_fits_model, check_meta, check_tensors  # noqa: E402, F401


@dataclass
class CalibrationStats:
    meta: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, out: str | Path, force: bool = False) -> Path:
        """Write the stats beside their metadata; an existing `out` is replaced only when it is an
        earlier calibration or with `force` (runtime/outputs.py)."""
        out = check_output(out, "calibration", force)
        tmp = atomic.staging_dir(out)
        try:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp / STATS_FILE))
            (tmp / META_FILE).write_text(json.dumps({"format": CALIBRATION_FORMAT} | self.meta, indent=1))
            check_output(out, "calibration", force)
            atomic.replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    @staticmethod
    def load(path: str | Path) -> "CalibrationStats":
        """Read and validate (types, ranges, tensor shapes): a truncated or garbage calibration is a
        CalibrationError naming the fix, never a traceback."""
        path = Path(path)
        if not os.path.lexists(path / META_FILE) or not os.path.lexists(path / STATS_FILE):
            raise CalibrationError(f"{path} holds no calibration ({META_FILE} + {STATS_FILE}); "
                                   "run `ditbake calibrate` first")
        meta = read_json(path / META_FILE, "calibration metadata", CalibrationError)
        check_meta(meta, path / META_FILE)
        meta.pop("format", None)  # the marker outputs.is_ours reads, not a statistic
        regular_file_size(path / STATS_FILE, "calibration stats", CalibrationError)
        try:
            tensors = load_file(str(path / STATS_FILE))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CalibrationError(f"{path / STATS_FILE} cannot be read ({str(exc)[:120]}); it is truncated or "
                                   "corrupted, re-run `ditbake calibrate`") from None
        check_tensors(meta, tensors, path / STATS_FILE)
        return CalibrationStats(meta, tensors)


def load_prompt_embeds(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A safetensors file with `embeds` [N, L, D] and optionally `negative` [N, L, D] or [L, D]."""
    regular_file_size(Path(path), "prompt embeddings", InputError)  # a FIFO would hang the reader
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for bad files
        raise InputError(f"cannot read prompt embeddings from {path}: {str(exc)[:200]}") from None
    if "embeds" not in tensors:
        raise InputError(f"{path} has no 'embeds' tensor (found {sorted(tensors)[:5]})")
    for name in ("embeds", "negative"):
        t = tensors.get(name)
        if t is not None and (not t.is_floating_point() or t.numel() == 0 or not torch.isfinite(t).all()):
            raise InputError(f"{path}: {name!r} is {t.dtype} {list(t.shape)}; pass non-empty, finite floating-point "
                             "embeddings (integers or bools would be cast silently)")
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
    """A statistic gathered during the calibration pass. The pass sets `where` = (prompts, branch
    index, step) before every model forward; `results()` returns named tensors to store, each
    with the prompt axis first (the pass saves and resumes them per prompt batch by slicing it).

    `batched = False` (the default): one prompt per forward and `where[0]` is that prompt's index.
    `batched = True`: the observer handles a batch of prompts per forward; `where[0]` is then the
    `slice` of prompt indices in the batch's rows (batch axis 0 of every hooked tensor) and it
    must record one value per sample. The pass batches prompts only when every observer does."""

    where: tuple = (0, 0, 0)
    batched: bool = False

    def results(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def end_prompt(self) -> None:
        """Called after each prompt batch's trajectory (drop per-trajectory state)."""

    def remove(self) -> None:
        """Detach hooks."""


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


class BlockResidualObserver(Observer):
    """Forward hooks on every block, writing into [prompt, branch, step, block] tensors at `where`.
    The tensors live on the model's device (no host sync per block); `results()` copies them back."""

    batched = True

    def __init__(self, adapter: Adapter, shape: tuple[int, int, int, int]):
        self.adapter = adapter
        device = next(adapter.model.parameters()).device
        self.gamma = torch.zeros(shape, device=device)
        self.delta_l1 = torch.zeros(shape, device=device)
        self.delta_change = torch.full(shape, float("nan"), device=device)
        self.where = (slice(0, 1), 0, 0)  # prompts, branch, step
        self.prev_delta: dict[tuple[int, int], torch.Tensor] = {}  # (branch, block) → Δ of this prompt batch
        self.handles = [m.register_forward_hook(self._hook(i), with_kwargs=True)
                        for i, m in enumerate(adapter.block_modules())]

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            rows, b, step = self.where
            inp, out = self.adapter.block_io(args, kwargs, output)
            inp, out = inp.float(), out.float()
            delta = out - inp
            size = _per_sample_mean(delta.abs())
            self.gamma[rows, b, step, index] = size / _per_sample_mean(inp.abs()).clamp_min(1e-12)
            self.delta_l1[rows, b, step, index] = size
            prev = self.prev_delta.pop((b, index), None)
            if prev is not None:
                self.delta_change[rows, b, step, index] = (_per_sample_mean((delta - prev).abs())
                                                           / _per_sample_mean(prev.abs()).clamp_min(1e-12))
            self.prev_delta[(b, index)] = delta
        return hook

    def results(self) -> dict[str, torch.Tensor]:
        return {"gamma": self.gamma.cpu(), "delta_l1": self.delta_l1.cpu(), "delta_change": self.delta_change.cpu()}

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


def calibration_device(name: str) -> torch.device:
    """The device a calibration runs on, checked before any model is moved there."""
    device = resolve_device(name)
    if device.type == "cuda" and not torch.cuda.is_initialized():
        # Batched prompts at real size allocate GB-sized activations of varying shapes; without
        # expandable segments the caching allocator fragmented 21 GB of an 80 GB H100 and a batch
        # the estimate allowed ran out of memory. Read when the allocator starts, so set it first.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return device


def prompt_batches(n: int, batch_size: int) -> list[slice]:
    return [slice(p0, min(p0 + batch_size, n)) for p0 in range(0, n, batch_size)]


def initial_noise(latent: tuple[int, ...], prompts: slice, seed: int, sigma: float, device) -> torch.Tensor:
    """Each prompt's initial latents from its own generator (seed + prompt index), drawn on the CPU:
    the same noise on every device and in every batching."""
    return torch.cat([torch.randn((1, *latent), generator=torch.Generator().manual_seed(seed + p))
                      for p in range(prompts.start, prompts.stop)]).to(device) * sigma


def run_signature(adapter: Adapter, embeds: torch.Tensor, negative: torch.Tensor | None, **settings) -> dict:
    """What a resumed calibration must share with the interrupted one (see calibrate_checkpoint)."""
    from ditbake.exporter.calibrate_checkpoint import tensor_digest  # noqa: PLC0415

    param = next(adapter.model.parameters())
    return {"architecture": adapter.architecture, "config": adapter.config, "dtype": str(compute_dtype(adapter.model)),
            "device": param.device.type, "weights": tensor_digest(param), "prompts": tensor_digest(embeds, negative),
            **settings}


@torch.no_grad()
def calibrate(adapter: Adapter, embeds: torch.Tensor, negative: torch.Tensor | None, *, latent: tuple[int, ...],
              sampler: str, num_steps: int, guidance_scale: float, seed: int, source: str,
              scheduler_config: dict | None = None, progress: bool = True,
              observers: list | None = None, batch_size: int | None = None,
              checkpoint_dir: str | Path | None = None, resume: bool = False, pooled: torch.Tensor | None = None,
              negative_pooled: torch.Tensor | None = None, guidance: float | None = None) -> CalibrationStats:
    """One pass over prompt batches × steps × CFG branches, on the model's device. `observers` are
    factories `(adapter, (prompts, branches, steps, blocks)) -> Observer` for statistics beyond Γ
    and Δ. `batch_size`: prompts per forward (None: all on the CPU, from free memory on CUDA; 1 when
    an observer is not `batched`). `checkpoint_dir`: save each completed prompt batch there
    (calibrate_checkpoint); with `resume`, completed batches found there are not run again.
    SD3 / Flux: `pooled` [N, P] and `negative_pooled` (see pooled_inputs); Flux with a guidance
    embedding: `guidance`, the distilled guidance scale (default the model config's)."""
    model = adapter.model
    dtype = compute_dtype(model)
    device = next(model.parameters()).device
    n, text_len, _ = embeds.shape
    use_cfg = guidance_scale > 1.0
    pools = pooled_inputs(adapter, n, pooled, negative_pooled, negative is not None)
    negative, branches = cfg_inputs(embeds, negative, guidance_scale)
    shape = (n, len(branches), num_steps, adapter.num_blocks)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    active = [BlockResidualObserver(adapter, shape)] + [make(adapter, shape) for make in (observers or [])]
    restored: dict[str, tuple[slice, dict[str, torch.Tensor]]] = {}
    bar = None
    try:  # from here on the observers' hooks are removed whatever happens
        if batch_size is None:
            from ditbake.exporter.calibrate_memory import base_batch_size  # noqa: PLC0415

            batch_size = base_batch_size(adapter, latent, text_len, n, len(branches), len(active) - 1)
        if not all(obs.batched for obs in active) and batch_size > 1:
            log.info("an observer handles one prompt per forward (%s): batch size 1",
                     ", ".join(type(o).__name__ for o in active if not o.batched))
            batch_size = 1
        batches = prompt_batches(n, min(batch_size, n))
        checkpoint = None
        if checkpoint_dir is not None:
            from ditbake.exporter.calibrate_checkpoint import Checkpoint  # noqa: PLC0415

            checkpoint = Checkpoint(checkpoint_dir, run_signature(
                adapter, embeds, negative, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                seed=seed, latent=list(latent), scheduler_config=scheduler_config,
                batch_size=len(range(*batches[0].indices(n))), observers=[type(o).__name__ for o in active]), resume)
        bar = tqdm(total=len(batches) * num_steps, desc=f"calibrate ({len(batches)} prompt batches)", unit="step",
                   disable=not progress)
        for rows in batches:
            piece = f"base-{rows.start:05d}-{rows.stop:05d}"
            done = checkpoint.load(piece) if checkpoint is not None and resume else None
            if done is not None:
                restored[piece] = (rows, done[0])
                bar.update(num_steps)
                continue
            scheduler = scheduler_for(sampler, adapter, num_steps, latent, scheduler_config)
            x = initial_noise(latent, rows, seed, float(getattr(scheduler, "init_noise_sigma", 1.0)), device)
            b = x.shape[0]
            index = torch.arange(rows.start, rows.stop)
            texts = {"cond": embeds[rows].to(device, dtype),
                     "uncond": negative[index % negative.shape[0]].to(device, dtype)}
            pooled_b = {br: None if v is None else v[index % v.shape[0]].to(device, dtype) for br, v in pools.items()}
            g = None if guidance is None else torch.full((b,), float(guidance), device=device)
            for i, t in enumerate(scheduler.timesteps):
                outs = {}
                for bi, br in enumerate(branches):
                    for obs in active:
                        obs.where = (rows if obs.batched else rows.start, bi, i)
                    outs[br] = adapter.diffusers_forward(x.to(dtype), t.expand(b).to(device), texts[br],
                                                         pooled=pooled_b[br], guidance=g).float()
                out = outs["cond"] if not use_cfg else outs["uncond"] + guidance_scale * (outs["cond"] - outs["uncond"])
                x = scheduler.step(out, t, x, return_dict=False)[0]
                bar.update(1)
            for obs in active:
                obs.end_prompt()
            if checkpoint is not None:
                checkpoint.save(piece, {k: v[rows] for obs in active for k, v in obs.results().items()})
    finally:
        for obs in active:
            obs.remove()
        if bar is not None:
            bar.close()
    meta = {"source": source, "architecture": adapter.architecture, "diffusers_class": adapter.diffusers_class,
            "num_blocks": adapter.num_blocks, "linear_layers": list(adapter.linear_layers),
            "absent_linears": [list(pair) for pair in adapter.absent_linears],
            "attention_sites": adapter.attention_sites, "sampler": sampler, "num_steps": num_steps,
            "guidance_scale": guidance_scale, "seed": seed, "num_prompts": n, "branches": list(branches),
            "latent_shape": list(latent), "text_len": text_len, "device": device.type,
            "prompt_batch_size": len(range(*batches[0].indices(n))), "scheduler_config": scheduler_config,
            "layout": {"gamma": "prompt, branch, step, block", "delta_l1": "prompt, branch, step, block",
                       "delta_change": "prompt, branch, step, block (NaN at step 0)"}}
    tensors: dict[str, torch.Tensor] = {}
    for obs in active:
        tensors.update(obs.results())
    for piece, (rows, part) in restored.items():
        for k, v in part.items():
            if k not in tensors or tensors[k][rows].shape != v.shape:
                raise CalibrationError(f"partial result {piece} has {k} {list(v.shape)}, which this calibration "
                                       "does not produce; run without --resume to start over")
            tensors[k][rows] = v
    return CalibrationStats(meta, tensors)
