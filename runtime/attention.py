"""Attention as the plan asks for it, and the FLOPs actually done.

Each head has a scheme (full, arrow band, local3d window, cached) and a precision (bf16 or an
8-bit format). Heads sharing (scheme class, precision) form a group that runs as ONE kernel
call: dense bf16 through SDPA (cuDNN / flash), banded bf16 through ditbake's head-wise Triton op,
8-bit (dense or banded) through ditbake's 8-bit Triton op, cached heads as last step's output.
Gathering a group's heads costs a copy of its q, k, v unless they are contiguous; measured
against permuting heads inside the q/k/v/o weights at build time in plugins/notes/attention_8bit.md.

A local3d head is an arrow head run on the visual tokens reordered into the site's 3D tiles
(frames × height × width, `Plan.tiles`): its group's q, k, v go through the tile permutation,
the op's band then covers neighbouring tiles, and the output is permuted back.

Kernels (issue #15 item 3): a group may have several kernels with the same numerics — dense bf16:
torch SDPA or ditbake's cuDNN op; a bf16 band shared by the group's heads with no text tokens:
ditbake's Triton op or cuDNN's diagonal band. `AttentionRunner(measure=True)` (the build, on the
GPU, before tracing each engine) times every candidate of every group it runs and keeps the
fastest in `kernels`, keyed by `group_signature`; the build records that table in the artifact and
engines and runtime follow it. `fp8t` (per-tensor FP8) has one kernel, cuDNN's FP8 SDPA."""
from __future__ import annotations

import logging
import statistics

import torch
import torch.nn.functional as F

from ditbake.runtime.errors import BackendError
from ditbake.runtime.plan import HeadScheme

log = logging.getLogger(__name__)


def _scheme_tensor(schemes: tuple[HeadScheme, ...]) -> torch.Tensor:
    # local3d runs as an arrow band on reordered tokens: same op kind, same pair count
    kinds = {"full": 0, "arrow": 1, "cached": 2, "local3d": 1}
    return torch.tensor([[kinds[s.kind], s.left, s.right] for s in schemes], dtype=torch.int32)


class AttentionRunner:
    """Runs attention sites for one generation, holding per-head output caches per CFG branch.

    flops_done / flops_dense count the QKᵀ and PV multiply-adds (4·S_q·S_k·D per head) done
    versus what dense attention would have done.
    """

    def __init__(self, tiles: dict[str, tuple[int, int, int]] | None = None, kernels: dict[str, str] | None = None,
                 measure: bool = False):
        self.tiles = dict(tiles or {})  # site → 3D tile of its local3d heads
        self.kernels = dict(kernels or {})  # group_signature → kernel name (the build's measurement)
        self.measure = measure  # time every candidate kernel of each group run and keep the fastest
        self.timings: dict[str, dict[str, float]] = {}  # group_signature → kernel → ms (when measuring)
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
        (frames, height, width of the visual tokens) is needed only by local3d heads.

        Heads are grouped by `HeadScheme.group` (kind class, precision) and each group runs as
        one kernel call over its heads: dense bf16 → SDPA (cuDNN / flash), banded bf16 → the
        head-wise Triton op, 8-bit → the 8-bit Triton op, cached → last step's output. A
        layer whose heads all share one group runs on the whole tensors (no gather); otherwise
        each group's heads are sliced (contiguous runs) or gathered, and the outputs put back
        in head order."""
        tracing = torch.compiler.is_compiling()  # inside torch.export: no host-side accounting
        if not tracing:
            self.account(schemes, q.shape[0], q.shape[1], q.shape[2], q.shape[3], text_range)
        if not schemes or all(s.group == ("full", "bf16") for s in schemes):
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            cached = self.cache.get(key)
            if cached is None and any(s.kind == "cached" for s in schemes):
                raise BackendError(f"attention site {key} reuses cached heads before any output was cached; "
                                   "the plan must compute every head at the first step")
            groups = head_groups(schemes)
            if len(groups) == 1:
                (group, heads), = groups.items()
                out = self._run_group(key, group, q, k, v, schemes, text_range, grid, cached)
            else:
                outs, order = [], []
                for group, heads in groups.items():
                    sel = self._head_selector(heads, q.device)
                    part = cached if cached is None else _take(cached, sel)
                    outs.append(self._run_group(key, group, _take(q, sel), _take(k, sel), _take(v, sel),
                                                tuple(schemes[h] for h in heads), text_range, grid, part))
                    order.extend(heads)
                out = torch.cat(outs, dim=1)
                if order != sorted(order):
                    out = out.index_select(1, self._head_selector(tuple(invert_order(order)), q.device))
        self.cache[key] = out  # cached heads copied their old output in, so this is always current
        return out

    def _head_selector(self, heads: tuple[int, ...], device) -> slice | torch.Tensor:
        """A slice for a contiguous run of heads (a view, no copy), else an index tensor made once
        per (heads, device): creating it inside a CUDA graph capture would be a host copy."""
        if heads == tuple(range(heads[0], heads[0] + len(heads))):
            return slice(heads[0], heads[0] + len(heads))
        key = ("heads", heads, str(device))
        if key not in self._perms:
            self._perms[key] = torch.tensor(heads, dtype=torch.long, device=device)
        return self._perms[key]

    def _table(self, schemes, device) -> torch.Tensor:
        """The kernels' per-head [H, 3] table, made once per (schemes, device) (see _head_selector)."""
        key = ("table", schemes, str(device))
        if key not in self._perms:
            self._perms[key] = _scheme_tensor(schemes).to(device)
        return self._perms[key]

    def _run_group(self, key, group: tuple, q, k, v, schemes, text_range, grid, cached):
        kind, precision = group[0], group[1]
        if kind == "cached":
            return cached
        if kind == "local3d":
            perm, inverse = self._permutations(key[-1], grid, q.device)
            from ditbake.plugins.head_attention import reorder_visual_tokens  # noqa: PLC0415

            q, k, v = (reorder_visual_tokens(t, perm, text_range, dim=2) for t in (q, k, v))
            out = self._choose_and_run(kind, precision, q, k, v, schemes, text_range)
            return reorder_visual_tokens(out, inverse, text_range, dim=2)
        return self._choose_and_run(kind, precision, q, k, v, schemes, text_range)

    def _choose_and_run(self, kind, precision, q, k, v, schemes, text_range):
        signature = group_signature(kind, precision, schemes, q, text_range) if (self.measure or self.kernels) else None
        # alternatives to the default are only looked up when measuring or following a recorded
        # choice: probing cuDNN builds its extension, which a plain run must not pay for
        names = candidate_kernels(kind, precision, schemes, q, text_range,
                                  alternatives=self.measure or signature in self.kernels)
        if self.measure and q.is_cuda and not torch.compiler.is_compiling():
            # one candidate too: the artifact lists every group's kernel
            self.timings[signature] = interleaved_median_ms(
                {n: (lambda n=n: self._run_kernel(n, precision, q, k, v, schemes, text_range)) for n in names})
            self.kernels[signature] = min(self.timings[signature], key=self.timings[signature].get)
            log.info("attention group %s: %s → %s", signature, self.timings[signature], self.kernels[signature])
        name = self.kernels.get(signature, names[0])
        if name not in names:
            raise BackendError(f"attention group {signature} was built for kernel {name!r}, which cannot run here "
                               f"(available: {names}); rebuild the artifact on this machine")
        return self._run_kernel(name, precision, q, k, v, schemes, text_range)

    def _run_kernel(self, name: str, precision: str, q, k, v, schemes, text_range):
        if name == "sdpa":
            return F.scaled_dot_product_attention(q, k, v)
        if name == "triton_dense":  # full INT8 heads (candidate_kernels checked the kernel supports q)
            return torch.ops.ditbake.attention_8bit_dense(q, k, v, None)
        if name == "triton_band":  # INT8 heads sharing one band, text first or none (checked likewise)
            w_left, w_right = _uniform_band(schemes)
            text_end = text_range[1] if text_range[1] > text_range[0] else 0
            return torch.ops.ditbake.attention_8bit_band(q, k, v, w_left, w_right, text_end, None)
        if name in ("cudnn", "reference"):
            from ditbake.plugins import cudnn_sdpa  # noqa: PLC0415 - registers the ditbake::cudnn_sdpa ops

            w_left, w_right = _uniform_band(schemes)
            if precision == "fp8t":
                if name == "reference":  # CPU, or a GPU without the cuDNN build: the op's specification
                    if not q.is_cuda:  # one node for graphs traced on the CPU (the tensorrt export)
                        return torch.ops.ditbake.fp8t_attention(q, k, v, w_left, w_right, None)
                    return cudnn_sdpa.fp8t_attention_ref(q, k, v, w_left, w_right)
                return cudnn_sdpa.fp8t_attention(q, k, v, w_left, w_right)
            return torch.ops.ditbake.cudnn_sdpa(q, k, v, w_left, w_right, q.shape[-1] ** -0.5)
        return self._kernel(precision, q, k, v, self._table(schemes, q.device), text_range)

    @staticmethod
    def _kernel(precision: str, q, k, v, table, text_range):
        # The plan validated the schemes; calling the ops directly keeps host-side checks (which
        # read tensor values) out of traced graphs, so torch.export sees one custom op per group.
        try:
            if precision == "bf16":
                import ditbake.plugins.head_attention as ha  # noqa: PLC0415 - registers ditbake::head_attention

                if q.is_cuda and not ha.kernel_supports(q):
                    return AttentionRunner._reference(ha, q, k, v, table, text_range)
                return torch.ops.ditbake.head_attention(q, k, v, table, text_range[0], text_range[1], None, None)
            import ditbake.plugins.attention_8bit  # noqa: F401, PLC0415 - registers ditbake::attention_8bit
        except ImportError as exc:  # pragma: no cover - depends on the plugins build
            raise BackendError(f"head-wise attention needs ditbake.plugins ({exc}); rebuild the plan with full "
                               "bf16 attention") from exc
        return torch.ops.ditbake.attention_8bit(q, k, v, table, text_range[0], text_range[1], None, None, precision)

    _warned = False

    @staticmethod
    def _reference(ha, q, k, v, table, text_range):
        """A dtype or head dim the Triton kernel lacks, on the GPU: the op's reference in query chunks
        (exact, memory grows with S; not fast)."""
        if not AttentionRunner._warned:
            AttentionRunner._warned = True
            log.warning("head-wise attention on %s %s with head dim %d: the Triton kernel takes bf16/fp16/fp32 with head "
                        "dim %s, so these heads run the chunked reference (slow)",
                        q.device, q.dtype, q.shape[-1], sorted(ha.KERNEL_CONFIGS))
        return ha.head_attention_ref(q, k, v, table, text_range)

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


def _uniform_band(schemes: tuple[HeadScheme, ...]) -> tuple[int, int]:
    """The band every head of a group shares, as the cuDNN ops take it (-1: unbounded side)."""
    first = schemes[0]
    if first.kind == "full":
        return -1, -1
    return first.left, first.right


def _single_band(schemes: tuple[HeadScheme, ...]) -> bool:
    return len({(s.kind, s.left, s.right) for s in schemes}) == 1


def candidate_kernels(kind: str, precision: str, schemes: tuple[HeadScheme, ...], q: torch.Tensor,
                      text_range: tuple[int, int], alternatives: bool = True) -> list[str]:
    """Kernels that compute this group with its precision's numerics, the default first
    (`alternatives=False`: the default only, without probing cuDNN).

    cuDNN takes one band per call and no text rows/columns, so a banded group qualifies only when
    its heads share one band and the sequence has no text tokens (Wan's self-attention). Full INT8
    groups take the dense 8-bit kernel where it runs (same specification as the general one, faster);
    INT8 groups sharing one band, with text first in whole tiles or none, the two-pass band kernels."""
    no_text = text_range[1] <= text_range[0]
    expressible = kind == "full" or (_single_band(schemes) and no_text)
    if precision == "fp8t":
        if not expressible:
            raise BackendError("fp8t attention runs through cuDNN, which cannot express per-head bands or text tokens "
                               "inside a band; plan these heads in int8/fp8 or bf16")
        if q.is_cuda:
            from ditbake.plugins import cudnn_sdpa  # noqa: PLC0415

            if not cudnn_sdpa.supports(q, "fp8t"):
                raise BackendError(f"fp8t attention needs cuDNN's FP8 SDPA (Hopper or newer, head dim a multiple of 16, "
                                   f"nvidia-cudnn-frontend): {cudnn_sdpa.unavailable_reason() or 'unsupported shape'}")
            return ["cudnn"]
        return ["reference"]
    if kind == "full" and precision == "int8" and q.is_cuda:
        from ditbake.plugins import attention_8bit_dense  # noqa: PLC0415 - registers ditbake::attention_8bit_dense

        if attention_8bit_dense.kernel_supports(q):  # the same numerics, one key scale per tile: faster
            return ["triton_dense", "triton"] if alternatives else ["triton_dense"]
    if kind in ("arrow", "local3d") and precision == "int8" and q.is_cuda and _single_band(schemes):
        from ditbake.plugins import attention_8bit_band  # noqa: PLC0415 - registers ditbake::attention_8bit_band

        w_left, w_right = _uniform_band(schemes)
        if attention_8bit_band.band_supported(q, w_left, w_right, text_range):  # the dense loop on the band
            return ["triton_band", "triton"] if alternatives else ["triton_band"]
    default = "sdpa" if (kind == "full" and precision == "bf16") else "triton"
    if precision != "bf16" or not expressible or not q.is_cuda or not alternatives:
        return [default]
    from ditbake.plugins import cudnn_sdpa  # noqa: PLC0415

    return [default, "cudnn"] if cudnn_sdpa.supports(q, "bf16") else [default]


def group_signature(kind: str, precision: str, schemes: tuple[HeadScheme, ...], q: torch.Tensor,
                    text_range: tuple[int, int]) -> str:
    """What decides a group's fastest kernel: scheme class, precision, bands, shape, dtype, text."""
    bands = ",".join(sorted({f"{s.left}-{s.right}" for s in schemes})) if kind != "full" else "-"
    b, h, s, d = q.shape
    dtype = str(q.dtype).replace("torch.", "")
    return f"{kind}/{precision}/{bands}/{b}x{h}x{s}x{d}/{dtype}/text{text_range[0]}-{text_range[1]}"


def median_cuda_ms(fn, warmup: int = 2, reps: int = 5) -> float:
    """Median CUDA-event time of fn after warm-up (the benchmarks' timer): one candidate in turn with itself."""
    return interleaved_median_ms({"fn": fn}, warmup, reps)["fn"]


def interleaved_median_ms(fns: dict, warmup: int = 2, reps: int = 7, inner: int = 3,
                          warm_ms: float = 200.0) -> dict[str, float]:
    """Median CUDA-event time per call of each candidate, timed in turns (A B A B ...) rather than one after the
    other, so that a clock or thermal drift moves every candidate alike (back-to-back medians of 5 once picked
    the slower of two band kernels). Before timing, the candidates run in turns until `warm_ms` of GPU time has
    passed, and each timing spans `inner` calls back to back: at a build, the GPU has idled through compilation
    and its clocks ramp up while the first calls run, and a single call between two events also counts the
    gaps in which the GPU waits for the host's launches. With 2 warm-up calls and one call per timing, the
    H100 measured the band kernel at 7.1 ms and the general kernel at 6.9 (the build chose the general one),
    while in the forward they took 3.9 and 5.7 ms per layer (forward_race_wan_h100acc2_h100.json)."""
    def timed(fn, calls: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    spent = 0.0
    while fns and spent < warm_ms:
        spent += sum(timed(fn, 1) for fn in fns.values())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn, inner) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def head_groups(schemes: tuple[HeadScheme, ...]) -> dict[tuple, tuple[int, ...]]:
    """Head indices per `HeadScheme.group`, groups in order of first appearance. fp8t band heads
    are split further by band: their only kernel (cuDNN) takes one band per call."""
    groups: dict[tuple, list[int]] = {}
    for h, s in enumerate(schemes):
        key = (*s.group, s.left, s.right) if s.precision == "fp8t" and s.kind != "full" else s.group
        groups.setdefault(key, []).append(h)
    return {g: tuple(heads) for g, heads in groups.items()}


def invert_order(order: list[int]) -> list[int]:
    """Positions that put a tensor concatenated in `order` back into head order."""
    inverse = [0] * len(order)
    for position, head in enumerate(order):
        inverse[head] = position
    return inverse


def _take(t: torch.Tensor, sel) -> torch.Tensor:
    return t[:, sel] if isinstance(sel, slice) else t.index_select(1, sel)
