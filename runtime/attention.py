"""Attention as the plan asks for it: dense SDPA when every head is full, the head-wise op of
ditbake.plugins otherwise (arrow bands, cached heads, local3d windows). Also counts the FLOPs
actually done.

A local3d head is an arrow head run on the visual tokens reordered into the site's 3D tiles
(frames × height × width, `Plan.tiles`): its q, k, v go through the tile permutation, the op's
band then covers neighbouring tiles, and its output is permuted back. Heads of one layer may mix
local3d with the other kinds in one op call (the permutation is applied per head)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ditbake.runtime.errors import BackendError
from ditbake.runtime.plan import HeadScheme


def _scheme_tensor(schemes: tuple[HeadScheme, ...]) -> torch.Tensor:
    # local3d runs as an arrow band on reordered tokens: same op kind, same pair count
    kinds = {"full": 0, "arrow": 1, "cached": 2, "local3d": 1}
    return torch.tensor([[kinds[s.kind], s.left, s.right] for s in schemes], dtype=torch.int32)


class AttentionRunner:
    """Runs attention sites for one generation, holding per-head output caches per CFG branch.

    flops_done / flops_dense count the QKᵀ and PV multiply-adds (4·S_q·S_k·D per head) done
    versus what dense attention would have done.
    """

    def __init__(self, tiles: dict[str, tuple[int, int, int]] | None = None):
        self.tiles = dict(tiles or {})  # site → 3D tile of its local3d heads
        self._perms: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cache: dict[tuple, torch.Tensor] = {}
        self.flops_done = 0.0
        self.flops_dense = 0.0

    def account(self, schemes: tuple[HeadScheme, ...] | None, batch: int, heads: int, seq: int, head_dim: int,
                text_range: tuple[int, int]) -> None:
        """Count the FLOPs an attention site does (called by compiled engines, which cannot count inside)."""
        dense = 4.0 * batch * heads * seq * seq * head_dim
        self.flops_dense += dense
        if not schemes or all(s.kind == "full" for s in schemes):
            self.flops_done += dense
            return
        from ditbake.plugins import head_attention  # noqa: PLC0415

        text_tokens = text_range[1] - text_range[0]
        self.flops_done += float(head_attention.attention_flops(_scheme_tensor(schemes), text_tokens,
                                                                seq - text_tokens, head_dim, batch=batch))

    def __call__(self, key: tuple, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 schemes: tuple[HeadScheme, ...] | None, text_range: tuple[int, int],
                 grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """q, k, v: [B, H, S, D]. key identifies (branch, block, site) for the head cache; `grid`
        (frames, height, width of the visual tokens) is needed only by local3d heads."""
        tracing = torch.compiler.is_compiling()  # inside torch.export: no host-side accounting
        if not tracing:
            self.account(schemes, q.shape[0], q.shape[1], q.shape[2], q.shape[3], text_range)
        if not schemes or all(s.kind == "full" for s in schemes):
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            try:
                import ditbake.plugins.head_attention  # noqa: F401, PLC0415 - registers ditbake::head_attention
            except ImportError as exc:  # pragma: no cover - depends on the plugins build
                raise BackendError(f"head-wise attention needs ditbake.plugins.head_attention ({exc}); "
                                   "rebuild the plan with full attention") from exc
            table = _scheme_tensor(schemes)
            cached = self.cache.get(key)
            if cached is None and any(s.kind == "cached" for s in schemes):
                raise BackendError(f"attention site {key} reuses cached heads before any output was cached; "
                                   "the plan must compute every head at the first step")
            # The plan validated the schemes; calling the op directly keeps host-side checks (which
            # read tensor values) out of traced graphs, so torch.export sees one custom op.
            local = [s.kind == "local3d" for s in schemes]
            if any(local):
                out = self._local3d(key, q, k, v, table, local, text_range, grid, cached)
            else:
                out = torch.ops.ditbake.head_attention(q, k, v, table.to(q.device), text_range[0], text_range[1],
                                                       cached, None)
        self.cache[key] = out  # cached heads copied their old output in, so this is always current
        return out

    def _permutations(self, site: str, grid, device) -> tuple[torch.Tensor, torch.Tensor]:
        from ditbake.plugins.head_attention import invert_permutation, tile_order  # noqa: PLC0415

        tile = self.tiles.get(site)
        if tile is None:
            raise BackendError(f"attention site {site!r} has local3d heads but no tile; the plan must list it in "
                               "`tiles` (re-run `ditbake plan`)")
        if grid is None:
            raise BackendError(f"attention site {site!r} has local3d heads but this architecture gives no token grid; "
                               "plan it with arrow heads instead")
        key = (site, tuple(grid), str(device))
        if key not in self._perms:
            perm = tile_order(tuple(grid), tuple(tile)).to(device)
            self._perms[key] = (perm, invert_permutation(perm))
        return self._perms[key]

    def _local3d(self, key, q, k, v, table, local, text_range, grid, cached):
        from ditbake.plugins.head_attention import reorder_visual_tokens  # noqa: PLC0415

        perm, inverse = self._permutations(key[-1], grid, q.device)
        sel = torch.tensor(local, device=q.device)[None, :, None, None]
        q, k, v = (torch.where(sel, reorder_visual_tokens(t, perm, text_range, dim=2), t) for t in (q, k, v))
        out = torch.ops.ditbake.head_attention(q, k, v, table.to(q.device), text_range[0], text_range[1], cached, None)
        return torch.where(sel, reorder_visual_tokens(out, inverse, text_range, dim=2), out)
