"""Where a video DiT's self-attention mass goes: bands, 3D windows, own frame vs other frames.

For sampled query tokens of one attention site (all heads), the full softmax rows are computed
in query chunks (never an [S, S] matrix) and summed inside:
  * diagonal bands in raster token order, with the arrow head scheme's rule: half-width
    w = max(1, round(f · S)) keys each side of the query (`exporter.plan_heads.candidates`),
    so a band of fraction f covers up to 2f of the keys;
  * 3D windows of `frames` × `side` × `side` tokens centred on the query (odd extents, clipped
    at the clip's borders; 0 = the whole axis): (1, 0) is the query's own frame, (0, 1) the
    query's position in every frame (a "temporal head" pattern);
  * the local3d scheme's windows: the arrow band taken after `plugins.head_attention.tile_order`;
  * the mass per frame distance |Δf| (0 … F−1).
The same sums with uniform rows give each window's share of keys (`coverage`): the mass a head
with no locality at all would put there.

`capture_self_attention` hands every self-attention call of a diffusers WanTransformer3DModel to
a callback with the q, k, v exactly as the attention kernel receives them (after the q/k norm and
rope) by wrapping the module's `dispatch_attention_fn` for the duration of the context.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ditbake.runtime.errors import InputError


class LocalityError(InputError):
    """A locality measurement was asked with impossible parameters (query count, widths, grid)."""


def band_half_width(fraction: float, tokens: int) -> int:
    """The arrow scheme's half-width for a fraction of the visual tokens (as `plan_heads.candidates`)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise LocalityError(f"band fractions must be in (0, 1], got {fraction!r}; give e.g. 0.125")
    return max(1, round(fraction * tokens))


@dataclass(frozen=True)
class Windows:
    """What to measure, for a visual token grid (frames, rows, cols) in raster order."""

    grid: tuple[int, int, int]
    band_fractions: tuple[float, ...] = (0.025, 0.05, 0.0625, 0.125, 0.25)
    frame_extents: tuple[int, ...] = (1, 3, 0)       # 0 = every frame
    side_extents: tuple[int, ...] = (1, 3, 7, 15, 0)  # rows = cols; 0 = the whole frame
    tile: tuple[int, int, int] | None = (2, 8, 8)     # local3d tile (plan_heads' Wan default)
    tile_fractions: tuple[float, ...] = (0.0625, 0.125)

    def __post_init__(self):
        if len(self.grid) != 3 or any(isinstance(g, bool) or not isinstance(g, int) or g <= 0 for g in self.grid):
            raise LocalityError(f"grid must be three positive ints (frames, rows, cols), got {self.grid!r}")
        for name in ("frame_extents", "side_extents"):
            for e in getattr(self, name):
                if isinstance(e, bool) or not isinstance(e, int) or e < 0 or (e > 0 and e % 2 == 0):
                    raise LocalityError(f"{name} must be odd window extents (or 0 = whole axis), got {e!r}")
        for f in (*self.band_fractions, *self.tile_fractions):
            band_half_width(f, self.tokens)
        if self.tile is not None and (len(self.tile) != 3 or any(int(t) <= 0 for t in self.tile)):
            raise LocalityError(f"tile must be three positive ints (frames, rows, cols), got {self.tile!r}")

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def names(self) -> list[str]:
        names = [f"band_{f:g}" for f in self.band_fractions]
        names += [f"win_t{_ext(t)}_hw{_ext(s)}" for t in self.frame_extents for s in self.side_extents]
        if self.tile is not None:
            tile = "x".join(str(t) for t in self.tile)
            names += [f"local3d_{tile}_{f:g}" for f in self.tile_fractions]
        return names


def _ext(e: int) -> str:
    return "all" if e == 0 else str(e)


def sample_queries(tokens: int, n: int, seed: int = 0) -> torch.Tensor:
    """`n` distinct query indices drawn uniformly over the clip, sorted."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= tokens:
        raise LocalityError(f"cannot sample {n!r} queries from {tokens} tokens; give 1 … {tokens}")
    return torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def _coords(grid, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, rows, cols = grid
    return index // (rows * cols), (index // cols) % rows, index % cols


def _near(centre: torch.Tensor, length: int, extent: int, dtype) -> torch.Tensor:
    """[n, length] 1 where |position − centre| <= extent // 2 (extent 0: everywhere)."""
    pos = torch.arange(length, device=centre.device)
    if extent == 0:
        return torch.ones(centre.numel(), length, dtype=dtype, device=centre.device)
    return ((pos[None, :] - centre[:, None]).abs() <= extent // 2).to(dtype)


def _band_sums(p: torch.Tensor, centre: torch.Tensor, half_widths: list[int]) -> list[torch.Tensor]:
    """Row sums of p [n, S] over keys [centre − w, centre + w] per w, from one prefix sum in p's
    dtype (a float32 prefix of a softmax row is off by ~1e-7 of the row's mass of 1)."""
    n, s = p.shape
    inclusive = p.cumsum(-1)
    rows = torch.arange(n, device=p.device)

    def below(j):  # sum of keys < j
        return torch.where(j > 0, inclusive[rows, (j - 1).clamp_min(0)], 0)

    out = []
    for w in half_widths:
        lo = (centre - w).clamp(0, s)
        hi = (centre + w + 1).clamp(0, s)
        out.append((below(hi) - below(lo)).to(torch.float64))
    return out


class _Layout:
    """Per-query index data shared by every head and chunk of one measurement."""

    def __init__(self, windows: Windows, device):
        self.w = windows
        s = windows.tokens
        self.band = [band_half_width(f, s) for f in windows.band_fractions]
        self.perm = self.inverse = None
        if windows.tile is not None:
            from ditbake.plugins.head_attention import invert_permutation, tile_order  # noqa: PLC0415

            self.perm = tile_order(windows.grid, windows.tile).to(device)
            self.inverse = invert_permutation(self.perm)
            self.tile_band = [band_half_width(f, s) for f in windows.tile_fractions]

    def sums(self, p: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per query (rows of p [n, S], query token ids idx [n]): the mass in every window, as float64."""
        frames, rows, cols = self.w.grid
        fq, rq, cq = _coords(self.w.grid, idx)
        out = dict(zip((f"band_{f:g}" for f in self.w.band_fractions), _band_sums(p, idx, self.band)))
        # per frame, the mass inside each query's side × side square: 4 lookups in a 2D prefix sum
        box = p.view(-1, frames, rows, cols).cumsum(2).cumsum(3).view(-1, frames, rows * cols)

        def below(r, c):  # [n, F]: mass of rows < r and cols < c, per frame
            at = ((r - 1).clamp_min(0) * cols + (c - 1).clamp_min(0))[:, None, None].expand(-1, frames, 1)
            return torch.where(((r > 0) & (c > 0))[:, None], box.gather(2, at)[..., 0], 0)

        per_frame = {}  # side → [n, F]
        for side in self.w.side_extents:
            half = max(rows, cols) if side == 0 else side // 2
            r0, r1 = (rq - half).clamp(0, rows), (rq + half + 1).clamp(0, rows)
            c0, c1 = (cq - half).clamp(0, cols), (cq + half + 1).clamp(0, cols)
            per_frame[side] = (below(r1, c1) - below(r0, c1) - below(r1, c0) + below(r0, c0)).to(torch.float64)
        for t in self.w.frame_extents:
            near_f = _near(fq, frames, t, torch.float64)
            for side in self.w.side_extents:
                out[f"win_t{_ext(t)}_hw{_ext(side)}"] = (per_frame[side] * near_f).sum(-1)
        if self.perm is not None:
            tile = "x".join(str(t) for t in self.w.tile)
            tiled = _band_sums(p[:, self.perm], self.inverse[idx], self.tile_band)
            out.update(zip((f"local3d_{tile}_{f:g}" for f in self.w.tile_fractions), tiled))
        whole = box[:, :, -1].to(torch.float64)
        distance = (torch.arange(frames, device=p.device)[None, :] - fq[:, None]).abs()
        out["frame_distance"] = torch.zeros_like(whole).scatter_add_(1, distance, whole)  # [n, F]
        return out


@dataclass
class SiteMasses:
    """Mean over the sampled queries, per head: window name → [H] (frame_distance → [H, F])."""

    mass: dict[str, torch.Tensor]
    coverage: dict[str, torch.Tensor]  # the same windows under uniform rows (share of keys), scalars


def site_masses(q: torch.Tensor, k: torch.Tensor, queries: torch.Tensor, windows: Windows,
                scale: float | None = None, chunk: int = 512) -> SiteMasses:
    """q, k: [H, S, D] of one sample; queries: token indices [N]. Softmax rows in float32 (float64
    for float64 inputs), `chunk` queries at a time; window sums accumulate in float64."""
    if q.dim() != 3 or k.shape != q.shape:
        raise LocalityError(f"q and k must both be [heads, tokens, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}")
    heads, s, d = q.shape
    if s != windows.tokens:
        raise LocalityError(f"the grid {windows.grid} has {windows.tokens} tokens but q has {s}; "
                            "give the visual token grid (frames, rows, cols) after patching")
    queries = torch.as_tensor(queries, device=q.device)
    if queries.dim() != 1 or queries.numel() == 0 or queries.dtype not in (torch.int32, torch.int64):
        raise LocalityError("queries must be a non-empty 1-D tensor of token indices")
    if int(queries.min()) < 0 or int(queries.max()) >= s:
        raise LocalityError(f"query indices must be in [0, {s}); sample them with sample_queries")
    queries = queries.long()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    layout = _Layout(windows, q.device)
    totals: dict[str, torch.Tensor] = {}
    coverage: dict[str, torch.Tensor] = {}
    k_t = k.to(dtype).transpose(-1, -2)
    for row0 in range(0, queries.numel(), chunk):
        idx = queries[row0:row0 + chunk]
        for h in range(heads):
            p = torch.softmax((q[h, idx].to(dtype) * scale) @ k_t[h], dim=-1)
            for name, v in layout.sums(p, idx).items():
                part = v.sum(0)
                totals[name] = totals.get(name, torch.zeros((heads, *part.shape), dtype=torch.float64,
                                                            device=q.device))
                totals[name][h] += part
        uniform = torch.full((idx.numel(), s), 1.0 / s, dtype=dtype, device=q.device)
        for name, v in layout.sums(uniform, idx).items():
            coverage[name] = coverage.get(name, 0) + v.sum(0)
    n = queries.numel()
    return SiteMasses({k_: v / n for k_, v in totals.items()}, {k_: v / n for k_, v in coverage.items()})


@contextlib.contextmanager
def capture_self_attention(model, callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
                           ) -> Iterator[None]:
    """While active, every self-attention (`blocks[i].attn1`) of a diffusers WanTransformer3DModel
    calls callback(layer, q, k, v, out) with q, k, v [B, S, H, D] as dispatched (rope applied) and
    the attention output. Wraps transformer_wan.dispatch_attention_fn; restored on exit."""
    from diffusers.models.transformers import transformer_wan  # noqa: PLC0415

    if not isinstance(model, transformer_wan.WanTransformer3DModel):
        raise LocalityError(f"attention capture needs a diffusers WanTransformer3DModel, got {type(model).__name__}")
    original = transformer_wan.dispatch_attention_fn
    current: list[int | None] = [None]

    def dispatch(query, key, value, *args, **kwargs):
        out = original(query, key, value, *args, **kwargs)
        if current[0] is not None:
            callback(current[0], query, key, value, out)
        return out

    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.attn1.register_forward_pre_hook(lambda *_, i=i: current.__setitem__(0, i)))
        handles.append(block.attn1.register_forward_hook(lambda *_: current.__setitem__(0, None)))
    transformer_wan.dispatch_attention_fn = dispatch
    try:
        yield
    finally:
        transformer_wan.dispatch_attention_fn = original
        for handle in handles:
            handle.remove()
