"""Progressive head calibration + search (DiTFastAttnV2's local metric), interleaved step by step.

The sampling trajectory runs through the runtime's own architecture functions (the adapter's
`arch`, over the model's weights), with the prompts batched, each CFG branch as its own forward
(as the runtime runs them, each with its own head caches). Every compressible attention call goes
to `HeadSearchAttention`, which

1. computes full attention and every candidate of the site's menu (arrow bands, local3d windows,
   the head's previous-step output for "cached") without ever building an [S, S] mask: on CUDA
   with the plugins' block-sparse kernel (`torch.ops.ditbake.head_attention`, one call per
   candidate with every head set to it; local3d on the visual tokens reordered into tiles, as the
   runtime runs it), elsewhere with SDPA over query chunks whose masks are [chunk, S] tiles;
2. measures per head the relative squared error of each candidate vs full,
       e[h, c] = mean((o_c − o_full)²) / var(o_full)    over prompts, tokens and head dims;
3. solves that layer's MILP (plan_heads.solve_layer) and returns the output the chosen schemes
   give, and keeps it as that head's cache — so later layers, and later steps, see the
   compression already chosen: the errors are measured progressively.

Stored (added to the calibration statistics): `heads_error.<site>` [branch, step, block, head,
candidate] and `heads_choice.<site>` [branch, step, block, head], plus meta["heads"] (menu, token
counts, config, search and calibration wall time).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ditbake.exporter.adapters import Adapter
from ditbake.exporter.calibrate import cfg_inputs, initial_noise, pooled_inputs
from ditbake.exporter.calibrate_memory import check_heads_fit
from ditbake.exporter.plan_heads import HeadsConfig, candidates, savings, solve_layer
from ditbake.exporter.sampler import scheduler_for
from ditbake.runtime import arch as runtime_arch
from ditbake.runtime.attention import candidate_kernels
from ditbake.runtime.errors import InputError
from ditbake.runtime.plan import BlockVariant, HeadScheme

log = logging.getLogger(__name__)


TILE_ELEMENTS = 1 << 24  # score elements per query chunk of the reference path (64 MB in fp32)


def kernel_supports(q: torch.Tensor) -> bool:
    """Whether the plugins' Triton kernel can run these inputs (head_attention.kernel_supports)."""
    from ditbake.plugins.head_attention import kernel_supports as supports  # noqa: PLC0415

    return supports(q)


def scheme_positions(scheme: HeadScheme, seq_len: int, text_range: tuple[int, int],
                     grid: tuple[int, int, int] | None, tile: tuple[int, int, int] | None, device) -> torch.Tensor:
    """Each token's position in the order the scheme's band runs over: raster order for arrow,
    tile order for local3d's visual tokens (text tokens keep theirs)."""
    from ditbake.plugins.head_attention import (_visual_range, invert_permutation,  # noqa: PLC0415
                                                normalize_text_range, tile_order)

    pos = torch.arange(seq_len, device=device)
    if scheme.kind == "local3d":
        if grid is None or tile is None:
            raise InputError("a local3d candidate needs the token grid and the tile")
        start, end = normalize_text_range(text_range, seq_len)
        vs, ve = _visual_range(start, end, seq_len)
        pos[vs:ve] = vs + invert_permutation(tile_order(grid, tile)).to(device)
    return pos


def banded_attention_chunked(q, k, v, pos: torch.Tensor, left: int, right: int, text_range: tuple[int, int],
                             tile_elements: int = TILE_ELEMENTS) -> torch.Tensor:
    """Arrow attention over token positions `pos` by SDPA on query chunks: each chunk's mask is a
    [chunk, S] tile of the arrow rule, so memory grows with S, not S². The reference path (CPU,
    and CUDA inputs the kernel does not take)."""
    from ditbake.plugins.head_attention import arrow_allowed, normalize_text_range  # noqa: PLC0415

    batch, heads, seq_len, _ = q.shape
    start, end = normalize_text_range(text_range, seq_len)
    chunk = max(1, min(seq_len, tile_elements // max(1, batch * heads * seq_len)))
    out = torch.empty_like(q)
    for r0 in range(0, seq_len, chunk):
        r1 = min(r0 + chunk, seq_len)
        allowed = arrow_allowed(pos[r0:r1, None], pos[None, :], left, right, start, end)
        out[:, :, r0:r1] = F.scaled_dot_product_attention(q[:, :, r0:r1], k, v, attn_mask=allowed)
    return out


class CandidateRunner:
    """Computes one site's arrow and local3d candidates for every head at once."""

    def __init__(self, tile: tuple[int, int, int] | None, tile_elements: int = TILE_ELEMENTS):
        self.tile = tile
        self.tile_elements = tile_elements
        self._perms: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pos: dict[tuple, torch.Tensor] = {}
        self._warned = False
        self._fp8t_warned = False
        self._fp8t_refused: set[tuple] = set()  # (scheme, shape) graphs cuDNN refused: not rebuilt per layer

    def outputs(self, menu: tuple[HeadScheme, ...], q, k, v, text_range, grid):
        """Yields (candidate index, output [B, H, S, D]) for the arrow and local3d candidates and
        every 8-bit candidate (dense or banded, through the 8-bit op's numerics)."""
        yield from self._eight_bit([(c, s) for c, s in enumerate(menu) if s.precision != "bf16" and s.kind != "cached"],
                                   q, k, v, text_range, grid)
        banded = [(c, s) for c, s in enumerate(menu) if s.kind in ("arrow", "local3d") and s.precision == "bf16"]
        if not banded:
            return
        if kernel_supports(q):
            yield from self._kernel(banded, q, k, v, text_range, grid)
            return
        if q.is_cuda and not self._warned:
            self._warned = True
            from ditbake.plugins.head_attention import KERNEL_CONFIGS  # noqa: PLC0415

            log.warning("head search on %s %s with head dim %d: the block-sparse kernel takes bf16/fp16/fp32 with head dim "
                        "%s, so candidates run through the chunked reference (slow at large sizes)",
                        q.device, q.dtype, q.shape[-1], sorted(KERNEL_CONFIGS))
        seq_len = q.shape[2]
        for c, scheme in banded:
            key = (scheme.kind, seq_len, tuple(text_range), tuple(grid) if grid else None, str(q.device))
            if key not in self._pos:
                self._pos[key] = scheme_positions(scheme, seq_len, text_range, grid, self.tile, q.device)
            yield c, banded_attention_chunked(q, k, v, self._pos[key], scheme.left, scheme.right, text_range,
                                              self.tile_elements)

    def _eight_bit(self, candidates, q, k, v, text_range, grid):
        """8-bit candidates through ditbake::attention_8bit: its Triton kernel on CUDA (bf16/fp16, head
        dim 64/128), its reference elsewhere — the numerics the runtime runs either way. Full INT8
        candidates take the kernel the runtime defaults to for them (the dense one where it runs: same
        specification, p rounded at other points). "fp8t" candidates go through cuDNN's per-tensor FP8
        attention instead (`_fp8t`)."""
        if not candidates:
            return
        import ditbake.plugins.attention_8bit  # noqa: F401, PLC0415 - registers ditbake::attention_8bit
        from ditbake.plugins.head_attention import normalize_text_range, reorder_visual_tokens  # noqa: PLC0415

        start, end = normalize_text_range(text_range, q.shape[2])
        heads = q.shape[1]
        for c, scheme in candidates:
            if scheme.precision == "fp8t":
                out = self._fp8t(scheme, q, k, v, (start, end), grid)
                if out is not None:
                    yield c, out
                continue
            if scheme.kind == "full" and candidate_kernels("full", scheme.precision, (scheme,), q, (start, end),
                                                           alternatives=False) == ["triton_dense"]:
                yield c, torch.ops.ditbake.attention_8bit_dense(q, k, v, None)
                continue
            kind = 0 if scheme.kind == "full" else 1
            table = torch.tensor([[kind, scheme.left, scheme.right]] * heads, dtype=torch.int32, device=q.device)
            if scheme.kind != "local3d":
                yield c, torch.ops.ditbake.attention_8bit(q, k, v, table, start, end, None, None, scheme.precision)
                continue
            perm, inverse = self._permutation(grid, q.device)
            tiled = [reorder_visual_tokens(t, perm, (start, end), dim=2).contiguous() for t in (q, k, v)]
            out = torch.ops.ditbake.attention_8bit(*tiled, table, start, end, None, None, scheme.precision)
            yield c, reorder_visual_tokens(out, inverse, (start, end), dim=2)

    def _fp8t(self, scheme: HeadScheme, q, k, v, text_range: tuple[int, int], grid) -> torch.Tensor | None:
        """One fp8t candidate for every head at once (one scheme per call, as the runtime groups heads):
        full → unbounded band, arrow → (left, right), local3d → that band over the tile-ordered tokens.
        cuDNN's native op where `cudnn_sdpa.supports` says so, its reference elsewhere (CPU, other head
        dims, pre-Hopper). None where fp8t cannot express the candidate: cuDNN's band has no global
        rows or columns, so an arrow or local3d candidate WITH text tokens (whose rows and columns
        always attend) is not offered — its error stays NaN, which the MILP never picks; full fp8t
        with text is ordinary dense attention. Also None where cuDNN refuses the band graph on this
        GPU (check_support): the runtime could not run it either."""
        from ditbake.plugins import cudnn_sdpa  # noqa: PLC0415
        from ditbake.plugins.head_attention import reorder_visual_tokens  # noqa: PLC0415

        start, end = text_range
        if scheme.kind != "full" and end > start:
            return None
        native = cudnn_sdpa.supports(q, "fp8t")
        if not native and not self._fp8t_warned:
            self._fp8t_warned = True  # a GPU that should run it natively deserves a warning, a CPU run a note
            (log.warning if q.is_cuda else log.info)(
                "head search on %s: cuDNN's FP8 attention does not run %s with head dim %d here (%s); fp8t candidates "
                "run through its reference, the op's specification (slower)", q.device, q.dtype, q.shape[-1],
                cudnn_sdpa.unavailable_reason() or "head dim or GPU generation")
        attention = cudnn_sdpa.fp8t_attention if native else cudnn_sdpa.fp8t_attention_ref
        w_left, w_right = (-1, -1) if scheme.kind == "full" else (scheme.left, scheme.right)
        key = (scheme, tuple(q.shape), q.dtype, str(q.device))
        if key in self._fp8t_refused:
            return None
        try:
            if scheme.kind != "local3d":
                return attention(q, k, v, w_left, w_right)
            perm, inverse = self._permutation(grid, q.device)
            tiled = [reorder_visual_tokens(t, perm, text_range, dim=2).contiguous() for t in (q, k, v)]
            return reorder_visual_tokens(attention(*tiled, w_left, w_right), inverse, text_range, dim=2)
        except RuntimeError as exc:
            if "cuDNN cannot run this attention" not in str(exc):  # the C++ op's check_support refusal
                raise
            self._fp8t_refused.add(key)
            log.warning("head search: fp8t %s candidate not offered: %s", scheme.to_json(), str(exc).splitlines()[0])
            return None

    def _permutation(self, grid, device) -> tuple[torch.Tensor, torch.Tensor]:
        from ditbake.plugins.head_attention import invert_permutation, tile_order  # noqa: PLC0415

        if grid is None or self.tile is None:
            raise InputError("a local3d candidate needs the token grid and the tile")
        key = (tuple(grid), str(device))
        if key not in self._perms:
            perm = tile_order(tuple(grid), tuple(self.tile)).to(device)
            self._perms[key] = (perm, invert_permutation(perm))
        return self._perms[key]

    def _kernel(self, banded, q, k, v, text_range, grid):
        from ditbake.plugins.head_attention import normalize_text_range, reorder_visual_tokens  # noqa: PLC0415

        start, end = normalize_text_range(text_range, q.shape[2])
        heads = q.shape[1]
        tiled = None
        for c, scheme in banded:
            table = torch.tensor([[1, scheme.left, scheme.right]] * heads, dtype=torch.int32, device=q.device)
            if scheme.kind == "arrow":
                yield c, torch.ops.ditbake.head_attention(q, k, v, table, start, end, None, None)
                continue
            perm, inverse = self._permutation(grid, q.device)
            if tiled is None:  # q, k, v in tile order once per layer for all local3d widths
                tiled = [reorder_visual_tokens(t, perm, (start, end), dim=2).contiguous() for t in (q, k, v)]
            out = torch.ops.ditbake.head_attention(*tiled, table, start, end, None, None)
            yield c, reorder_visual_tokens(out, inverse, (start, end), dim=2)


def relative_squared_error(out: torch.Tensor, full: torch.Tensor, full_var: torch.Tensor | None = None) -> torch.Tensor:
    """Per head [H]: mean squared difference over the variance of the full output (dims B, S, D)."""
    # fp32 is plenty for a ratio that only ranks candidates against δ (fp64 doubled the search time)
    full = full.float()
    diff = (out.float() - full).pow_(2).mean(dim=(0, 2, 3))
    var = full.var(dim=(0, 2, 3)) if full_var is None else full_var
    return diff / var.clamp_min(1e-30)


class HeadSearchAttention:
    """The attention callable of the calibration run (same call signature as the runtime's
    AttentionRunner). `where = (branch index, step)` is set by the driver before each forward."""

    def __init__(self, config: HeadsConfig, sites: dict[str, dict], shape: tuple[int, int, int]):
        self.config = config
        self.sites = sites  # site → {"menu", "saving", "text_tokens", "visual_tokens", ...}
        branches, steps, blocks = shape
        self.errors = {s: torch.full((branches, steps, blocks, info["heads"], len(info["menu"])), float("nan"))
                       for s, info in sites.items()}
        self.choice = {s: torch.zeros((branches, steps, blocks, info["heads"]), dtype=torch.int16)
                       for s, info in sites.items()}
        self.where = (0, 0)
        self.prev: dict[tuple, torch.Tensor] = {}
        self.candidates = CandidateRunner(config.local3d_tile)
        self.solve_seconds = 0.0
        self.attention_seconds = 0.0  # full + candidates + errors (synchronised on CUDA)
        self.solves = 0

    @torch.no_grad()
    def __call__(self, key, q, k, v, schemes, text_range, grid=None):
        branch_name, block, site = key
        br, step = self.where
        info = self.sites[site]
        menu = info["menu"]
        if q.is_cuda:  # what ran before is the forward's, not the candidates' time
            torch.cuda.synchronize(q.device)
        begin = time.perf_counter()
        full = F.scaled_dot_product_attention(q, k, v)
        full32 = full.float()
        var = full32.var(dim=(0, 2, 3))
        errors = torch.full((q.shape[1], len(menu)), float("nan"), device=q.device)
        errors[:, 0] = 0.0
        outs = {0: full}
        for c, out in self.candidates.outputs(menu, q, k, v, text_range, grid):
            errors[:, c] = relative_squared_error(out, full32, var)
            outs[c] = out
        cached = self.prev.get(key) if step > 0 else None
        if cached is not None:
            c = len(menu) - 1  # the menu ends with "cached" when caching is on
            errors[:, c] = relative_squared_error(cached, full32, var)
            outs[c] = cached
        del full32
        layer_errors = errors.cpu()
        self.attention_seconds += time.perf_counter() - begin
        self.errors[site][br, step, block] = layer_errors
        begin = time.perf_counter()
        choice = solve_layer(layer_errors.numpy(), info["saving"], self.config.delta, self.config.head_factor)
        self.solve_seconds += time.perf_counter() - begin
        self.solves += 1
        self.choice[site][br, step, block] = torch.from_numpy(choice.astype(np.int16))
        result = torch.stack([outs[c][:, h] for h, c in enumerate(choice.tolist())], dim=1)
        if self.config.caching:
            self.prev[key] = result  # what the runtime caches: the output the chosen schemes gave
        return result


@torch.no_grad()
def calibrate_heads(adapter: Adapter, embeds: torch.Tensor, negative: torch.Tensor | None, *,
                    latent: tuple[int, ...], sampler: str, num_steps: int, guidance_scale: float, seed: int,
                    config: HeadsConfig, scheduler_config: dict | None = None,
                    progress: bool = True, checkpoint_dir: str | Path | None = None,
                    resume: bool = False, pooled: torch.Tensor | None = None,
                    negative_pooled: torch.Tensor | None = None,
                    guidance: float | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Run the progressive search over the prompts (one batch: each layer's MILP weighs every
    prompt's error) and the whole trajectory, on the model's device. Returns (tensors, meta) to
    merge into the calibration statistics. `checkpoint_dir`: save the finished search there; with
    `resume` a finished one found there is returned without running again (a search interrupted
    part-way restarts: resuming mid-trajectory would need its head caches, 6 GB per prompt at
    Wan2.1-1.3B's 480×832×81). SD3 / Flux: `pooled`, `negative_pooled`, `guidance` as calibrate's."""
    begin = time.perf_counter()
    n, text_len, _ = embeds.shape
    use_cfg = guidance_scale > 1.0
    pools = pooled_inputs(adapter, n, pooled, negative_pooled, negative is not None)
    negative, branches = cfg_inputs(embeds, negative, guidance_scale)
    checkpoint = None
    if checkpoint_dir is not None:
        from ditbake.exporter.calibrate import run_signature  # noqa: PLC0415
        from ditbake.exporter.calibrate_checkpoint import Checkpoint  # noqa: PLC0415

        checkpoint = Checkpoint(checkpoint_dir, run_signature(
            adapter, embeds, negative, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed,
            latent=list(latent), scheduler_config=scheduler_config, heads=config.to_json()), resume)
        done = checkpoint.load("search") if resume else None
        if done is not None:
            log.info("head search: resumed the finished search from %s", checkpoint.dir)
            return done
    weights = adapter.weights()
    device = next(iter(weights.values())).device
    profile = {"name": "calibration", "latent_shape": list(latent), "text_len": text_len}
    weights.update({k: v.to(device) for k, v in adapter.profile_tensors(profile).items()})
    dtype = next(iter(weights.values())).dtype
    layout = adapter.token_layout(latent, text_len)
    text_tokens = layout.text[1] - layout.text[0]
    visual_tokens = layout.visual[1] - layout.visual[0]
    head_dim = int(adapter.config["attention_head_dim"])
    sites = {}
    for site, heads in adapter.attention_sites.items():
        menu = candidates(config, visual_tokens)
        sites[site] = {"menu": menu, "heads": heads,
                       "saving": savings(menu, text_tokens, visual_tokens, head_dim, config.eight_bit_speedup),
                       "text_tokens": text_tokens, "visual_tokens": visual_tokens, "head_dim": head_dim}
    check_heads_fit(adapter, latent, text_len, n, len(branches), max(len(s["menu"]) for s in sites.values()),
                    config.caching)
    attention = HeadSearchAttention(config, sites, (len(branches), num_steps, adapter.num_blocks))

    scheduler = scheduler_for(sampler, adapter, num_steps, latent, scheduler_config)
    # the same initial noise per prompt as the main calibration pass (seed + prompt index)
    x = initial_noise(latent, slice(0, n), seed, float(getattr(scheduler, "init_noise_sigma", 1.0)), device)
    texts = {"cond": embeds.to(device, dtype),
             "uncond": negative[torch.arange(n) % negative.shape[0]].to(device, dtype)}
    variant = BlockVariant()
    extras = {}  # the prologue's pooled vector / distilled guidance per branch (runtime.arch.extra_inputs)
    for b in branches:
        values = []
        for name in runtime_arch.extra_inputs(adapter.arch, adapter.config):
            if name == "pooled":
                v = pools[b]
                v = adapter.arch.pooled_from_tokens(texts[b]) if v is None else v[torch.arange(n) % v.shape[0]]
                values.append(v.to(device, dtype))
            else:
                values.append(torch.full((n,), float(adapter.config.get("guidance", 3.5) if guidance is None
                                                     else guidance), device=device))
        extras[b] = tuple(values)
    bar = tqdm(total=num_steps, desc=f"calibrate heads ({n} prompts)", unit="step", disable=not progress)
    for i, t in enumerate(scheduler.timesteps):
        outs = {}
        timestep = t.expand(n).float().to(device)
        for bi, b in enumerate(branches):
            attention.where = (bi, i)
            h, ctx = adapter.arch.prologue(weights, adapter.config, x.to(dtype), timestep, texts[b], profile,
                                           *extras[b])
            for block in range(adapter.num_blocks):
                h = adapter.arch.block(weights, adapter.config, block, h, ctx, variant, attention, b)
            outs[b] = adapter.arch.epilogue(weights, adapter.config, h, ctx).float()
        out = outs["cond"] if not use_cfg else outs["uncond"] + guidance_scale * (outs["cond"] - outs["uncond"])
        x = scheduler.step(out, t, x, return_dict=False)[0]
        bar.update(1)
    bar.close()
    tensors = {}
    for site in sites:
        tensors[f"heads_error.{site}"] = attention.errors[site]
        tensors[f"heads_choice.{site}"] = attention.choice[site]
    meta = {"config": config.to_json(), "branches": list(branches), "num_prompts": n, "device": device.type,
            "kernel": "triton" if kernel_supports(torch.empty(0, 0, 0, head_dim, device=device, dtype=dtype))
            else "chunked_sdpa",
            "search_seconds": attention.solve_seconds, "solves": attention.solves,
            "attention_seconds": attention.attention_seconds,
            "calibration_seconds": time.perf_counter() - begin,
            "sites": {site: {"candidates": [s.to_json() for s in info["menu"]], "heads": info["heads"],
                             "text_tokens": text_tokens, "visual_tokens": visual_tokens, "head_dim": head_dim,
                             "text_range": list(layout.text), "grid": list(layout.grid),
                             "tile": list(config.local3d_tile) if config.local3d_tile else None}
                      for site, info in sites.items()},
            "layout": {"heads_error": "branch, step, block, head, candidate (NaN: unavailable)",
                       "heads_choice": "branch, step, block, head → candidate index"}}
    log.info("head search: %d layer solves in %.2f s (MILP), attention + candidates %.1f s, %.1f s in all",
             attention.solves, attention.solve_seconds, attention.attention_seconds, meta["calibration_seconds"])
    if checkpoint is not None:
        checkpoint.save("search", tensors, meta)
    return tensors, meta
