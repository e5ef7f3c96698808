"""Attention as the plan asks for it: dense SDPA when every head is full, the head-wise op of
ditbake.plugins otherwise (arrow bands, cached heads). Also counts the FLOPs actually done."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ditbake.runtime.errors import BackendError
from ditbake.runtime.plan import HeadScheme


def _scheme_tensor(schemes: tuple[HeadScheme, ...]) -> torch.Tensor:
    kinds = {"full": 0, "arrow": 1, "cached": 2}
    return torch.tensor([[kinds[s.kind], s.left, s.right] for s in schemes], dtype=torch.int32)


class AttentionRunner:
    """Runs attention sites for one generation, holding per-head output caches per CFG branch.

    flops_done / flops_dense count the QKᵀ and PV multiply-adds (4·S_q·S_k·D per head) done
    versus what dense attention would have done.
    """

    def __init__(self):
        self.cache: dict[tuple, torch.Tensor] = {}
        self.flops_done = 0.0
        self.flops_dense = 0.0

    def __call__(self, key: tuple, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 schemes: tuple[HeadScheme, ...] | None, text_range: tuple[int, int]) -> torch.Tensor:
        """q, k, v: [B, H, S, D]. key identifies (branch, block, site) for the head cache."""
        b, h, s_q, d = q.shape
        dense_flops = 4.0 * b * h * s_q * k.shape[2] * d
        self.flops_dense += dense_flops
        if not schemes or all(s.kind == "full" for s in schemes):
            out = F.scaled_dot_product_attention(q, k, v)
            self.flops_done += dense_flops
        else:
            try:
                from ditbake.plugins import head_attention  # noqa: PLC0415
            except ImportError as exc:  # pragma: no cover - depends on the plugins build
                raise BackendError(f"head-wise attention needs ditbake.plugins.head_attention ({exc}); "
                                   "rebuild the plan with full attention") from exc
            table = _scheme_tensor(schemes)
            cached = self.cache.get(key)
            if cached is None and any(s.kind == "cached" for s in schemes):
                raise BackendError(f"attention site {key} reuses cached heads before any output was cached; "
                                   "the plan must compute every head at the first step")
            out = head_attention.head_attention(q, k, v, table, text_range, cached)
            text_tokens = text_range[1] - text_range[0]
            self.flops_done += float(head_attention.attention_flops(table, text_tokens, s_q - text_tokens, d, batch=b))
        self.cache[key] = out  # cached heads copied their old output in, so this is always current
        return out
