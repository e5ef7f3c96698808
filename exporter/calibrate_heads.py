"""Progressive head calibration + search (DiTFastAttnV2's local metric), interleaved step by step.

The sampling trajectory runs through the runtime's own architecture functions (the adapter's
`arch`, over the model's weights), with the prompts batched, each CFG branch as its own forward
(as the runtime runs them, each with its own head caches). Every compressible attention call goes
to `HeadSearchAttention`, which

1. computes full attention and every candidate of the site's menu (arrow bands, local3d windows
   as masks over raster-ordered tokens, the head's previous-step output for "cached");
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

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ditbake.exporter.adapters import Adapter
from ditbake.exporter.calibrate import cfg_inputs, pooled_inputs
from ditbake.exporter.plan_heads import HeadsConfig, candidates, savings, solve_layer
from ditbake.exporter.sampler import scheduler_for
from ditbake.runtime import arch as runtime_arch
from ditbake.runtime.errors import InputError
from ditbake.runtime.plan import BlockVariant, HeadScheme

log = logging.getLogger(__name__)


def scheme_mask(scheme: HeadScheme, seq_len: int, text_range: tuple[int, int],
                grid: tuple[int, int, int] | None = None, tile: tuple[int, int, int] | None = None) -> torch.Tensor | None:
    """Boolean [S, S] mask (True = attend) of an arrow or local3d scheme over tokens in their
    natural (raster) order; None for full. local3d = the arrow rule applied to each token's
    position after the runtime's tile reordering (text tokens keep theirs)."""
    from ditbake.plugins.head_attention import (_visual_range, arrow_allowed, invert_permutation,  # noqa: PLC0415
                                                normalize_text_range, tile_order)

    if scheme.kind == "full":
        return None
    if scheme.kind not in ("arrow", "local3d"):
        raise InputError(f"no mask for a {scheme.kind!r} head")
    start, end = normalize_text_range(text_range, seq_len)
    pos = torch.arange(seq_len)
    if scheme.kind == "local3d":
        if grid is None or tile is None:
            raise InputError("a local3d mask needs the token grid and the tile")
        vs, ve = _visual_range(start, end, seq_len)
        pos[vs:ve] = vs + invert_permutation(tile_order(grid, tile))
    return arrow_allowed(pos[:, None], pos[None, :], scheme.left, scheme.right, start, end)


def relative_squared_error(out: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Per head [H]: mean squared difference over the variance of the full output (dims B, S, D)."""
    # fp32 is plenty for a ratio that only ranks candidates against δ (fp64 doubled the search time)
    diff = (out.float() - full.float()).pow(2).mean(dim=(0, 2, 3))
    var = full.float().var(dim=(0, 2, 3))
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
        self.masks: dict[tuple, torch.Tensor | None] = {}
        self.solve_seconds = 0.0
        self.solves = 0

    def _mask(self, scheme: HeadScheme, seq_len, text_range, grid, device):
        key = (scheme, seq_len, tuple(text_range), tuple(grid) if grid else None)
        if key not in self.masks:
            mask = scheme_mask(scheme, seq_len, text_range, grid, self.config.local3d_tile)
            self.masks[key] = None if mask is None else mask.to(device)
        return self.masks[key]

    @torch.no_grad()
    def __call__(self, key, q, k, v, schemes, text_range, grid=None):
        branch_name, block, site = key
        br, step = self.where
        info = self.sites[site]
        menu = info["menu"]
        full = F.scaled_dot_product_attention(q, k, v)
        outs = []
        for c, scheme in enumerate(menu):
            if scheme.kind == "full":
                out = full
            elif scheme.kind == "cached":
                out = self.prev.get(key) if step > 0 else None
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(scheme, q.shape[2], text_range,
                                                                                     grid, q.device))
            outs.append(out)
            if out is not None:
                self.errors[site][br, step, block, :, c] = relative_squared_error(out, full).float()
        start = time.perf_counter()
        choice = solve_layer(self.errors[site][br, step, block].numpy(), info["saving"], self.config.delta,
                             self.config.head_factor)
        self.solve_seconds += time.perf_counter() - start
        self.solves += 1
        self.choice[site][br, step, block] = torch.from_numpy(choice.astype(np.int16))
        result = torch.stack([outs[c][:, h] for h, c in enumerate(choice.tolist())], dim=1)
        self.prev[key] = result  # what the runtime caches: the output the chosen schemes gave
        return result


@torch.no_grad()
def calibrate_heads(adapter: Adapter, embeds: torch.Tensor, negative: torch.Tensor | None, *,
                    latent: tuple[int, ...], sampler: str, num_steps: int, guidance_scale: float, seed: int,
                    config: HeadsConfig, scheduler_config: dict | None = None,
                    progress: bool = True, pooled: torch.Tensor | None = None,
                    negative_pooled: torch.Tensor | None = None,
                    guidance: float | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Run the progressive search over the prompts (batched) and the whole trajectory.
    Returns (tensors, meta) to merge into the calibration statistics."""
    begin = time.perf_counter()
    n, text_len, _ = embeds.shape
    use_cfg = guidance_scale > 1.0
    pools = pooled_inputs(adapter, n, pooled, negative_pooled, negative is not None)
    negative, branches = cfg_inputs(embeds, negative, guidance_scale)
    weights = adapter.weights()
    profile = {"name": "calibration", "latent_shape": list(latent), "text_len": text_len}
    weights.update(adapter.profile_tensors(profile))
    dtype = next(iter(weights.values())).dtype
    layout = adapter.token_layout(latent, text_len)
    text_tokens = layout.text[1] - layout.text[0]
    visual_tokens = layout.visual[1] - layout.visual[0]
    head_dim = int(adapter.config["attention_head_dim"])
    sites = {}
    for site, heads in adapter.attention_sites.items():
        menu = candidates(config, visual_tokens)
        sites[site] = {"menu": menu, "heads": heads, "saving": savings(menu, text_tokens, visual_tokens, head_dim),
                       "text_tokens": text_tokens, "visual_tokens": visual_tokens, "head_dim": head_dim}
    attention = HeadSearchAttention(config, sites, (len(branches), num_steps, adapter.num_blocks))

    scheduler = scheduler_for(sampler, adapter, num_steps, latent, scheduler_config)
    sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
    # the same initial noise per prompt as the main calibration pass (seed + prompt index)
    x = torch.cat([torch.randn((1, *latent), generator=torch.Generator().manual_seed(seed + p)) for p in range(n)]) * sigma
    texts = {"cond": embeds.to(dtype), "uncond": negative[torch.arange(n) % negative.shape[0]].to(dtype)}
    variant = BlockVariant()
    extras = {}  # the prologue's pooled vector / distilled guidance per branch (runtime.arch.extra_inputs)
    for b in branches:
        values = []
        for name in runtime_arch.extra_inputs(adapter.arch, adapter.config):
            if name == "pooled":
                v = pools[b]
                v = adapter.arch.pooled_from_tokens(texts[b]) if v is None else v[torch.arange(n) % v.shape[0]]
                values.append(v.to(dtype))
            else:
                values.append(torch.full((n,), float(adapter.config.get("guidance", 3.5) if guidance is None
                                                     else guidance)))
        extras[b] = tuple(values)
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="calibrate heads", unit="step", disable=not progress)):
        outs = {}
        for bi, b in enumerate(branches):
            attention.where = (bi, i)
            h, ctx = adapter.arch.prologue(weights, adapter.config, x.to(dtype), t.expand(n).float(), texts[b], profile,
                                           *extras[b])
            for block in range(adapter.num_blocks):
                h = adapter.arch.block(weights, adapter.config, block, h, ctx, variant, attention, b)
            outs[b] = adapter.arch.epilogue(weights, adapter.config, h, ctx).float()
        out = outs["cond"] if not use_cfg else outs["uncond"] + guidance_scale * (outs["cond"] - outs["uncond"])
        x = scheduler.step(out, t, x, return_dict=False)[0]
    tensors = {}
    for site in sites:
        tensors[f"heads_error.{site}"] = attention.errors[site]
        tensors[f"heads_choice.{site}"] = attention.choice[site]
    meta = {"config": config.to_json(), "branches": list(branches), "num_prompts": n,
            "search_seconds": attention.solve_seconds, "solves": attention.solves,
            "calibration_seconds": time.perf_counter() - begin,
            "sites": {site: {"candidates": [s.to_json() for s in info["menu"]], "heads": info["heads"],
                             "text_tokens": text_tokens, "visual_tokens": visual_tokens, "head_dim": head_dim,
                             "text_range": list(layout.text), "grid": list(layout.grid),
                             "tile": list(config.local3d_tile) if config.local3d_tile else None}
                      for site, info in sites.items()},
            "layout": {"heads_error": "branch, step, block, head, candidate (NaN: unavailable)",
                       "heads_choice": "branch, step, block, head → candidate index"}}
    log.info("head search: %d layer solves in %.2f s (MILP), %.1f s in all", attention.solves,
             attention.solve_seconds, meta["calibration_seconds"])
    return tensors, meta
