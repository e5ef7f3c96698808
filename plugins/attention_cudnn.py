"""Banded self-attention through cuDNN's fused SDPA (``nvidia-cudnn-frontend`` graph API).

What: one op, ``ditbake::cudnn_band_attention(q, k, v, w_left, w_right, scale)``, that runs a group
of heads sharing one arrow band on a visual-only sequence (no text tokens: Wan's self-attention)
as ONE cuDNN flash-attention call whose diagonal band mask skips the key tiles outside the band.

Why: issue #15 item 3 wants the fastest kernel per head group. On the H100 cuDNN's SDPA with a
diagonal band ran 25 % of the keys in 2.54 ms and 50 % in 4.61 ms (1 x 12 x 32,760 x 128 bf16)
against 11.5 ms dense, about 1.3x faster than ditbake's Triton band kernel (plugins/head_attention.py).
cuDNN cannot express text rows/columns, cached heads or per-head widths in one call: those stay on
the Triton op; this op serves the band groups it can express.

Semantics (exactly ``head_attention_ref`` with every head ARROW(w_left, w_right) and no text): query
i attends to the keys j with ``i - w_left <= j <= i + w_right``; scores are scaled by ``scale``
(default 1/sqrt(D)); softmax in fp32; output in the input dtype, contiguous [B, H, S, D].

cuDNN's bound convention (NVIDIA/cudnn-frontend docs/operations/Attention.md, "Diagonal masking
options"; https://docs.nvidia.com/deeplearning/cudnn/frontend/latest/operations/Attention.html):
``diagonal_band_left_bound`` = L masks the columns "at or before row_idx - left_bound" (exclusive:
j > i - L stays), ``diagonal_band_right_bound`` = R masks the columns "beyond row_idx + right_bound"
(inclusive: j <= i + R stays); R = 0 is causal, L must be >= 1. The frontend's own FlashAttention
adapter (cudnn/torch/sdpa_provider.py in the 1.32 wheel: "lb = w + 1", "rb = r with no offset")
says the same. Hence L = w_left + 1, R = w_right, with ``diagonal_alignment=TOP_LEFT`` (S_q == S_kv,
so TOP_LEFT and BOTTOM_RIGHT coincide). A side whose width reaches S - 1 is left unbounded (None):
same mask, and the graph cache sees one key for every width past the sequence.

Running: graphs are built once per (B, H, S_q, S_kv, D, strides, dtype, bounds, scale, device)
(graph build takes from tens of ms to seconds) and executed on torch's current stream with the
tensors' data pointers and a workspace tensor from torch's allocator, so a call is CUDA-graph
capturable once its graph is built (build at warm-up, before capture). ``import cudnn`` is lazy:
this module imports on machines without the frontend; ``available()`` says whether the CUDA path
can run. The CPU kernel of the op is the reference, so torch.export / AOTInductor see one opaque
custom-op node (AOTInductor calls it back through the dispatcher: the process that loads the
package must have imported this module).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Optional

import torch

from ditbake.plugins.head_attention import HeadAttentionError, check_qkv_tensors

logger = logging.getLogger(__name__)


# plugins/ may not import ditbake.runtime (tests/runtime/test_isolation.py), so the typed errors live
# here, like HeadAttentionError; the runtime maps them to InputError / BackendError where it calls the op.
class BandInputError(HeadAttentionError):
    """Malformed input to the band op (shape, dtype, width, scale); the message names the fix."""


class CudnnUnavailableError(RuntimeError):
    """The cuDNN path cannot run this call here (frontend, GPU, cuDNN version, dtype, head dim);
    the message names the fix, usually ditbake::head_attention for this group."""

# Left and right diagonal bands on the SDPA node came with cuDNN 9.7 (frontend 1.10 release notes:
# "SDPA operations now accept both left window and right window size"); torch 2.11 + CUDA 13 ships newer.
MIN_CUDNN_VERSION = 90700
MAX_HEAD_DIM = 256  # Attention.md support matrix, Hopper prefill: d <= 256, multiple of 8 for fp16/bf16
_IO_DTYPES = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# Availability (lazy import of the frontend)
# --------------------------------------------------------------------------------------------

def _import_cudnn():
    try:
        import cudnn  # noqa: PLC0415 - optional dependency, imported on first use
    except ImportError:
        return None
    except Exception as exc:  # noqa: BLE001 - a broken install (missing shared library) is "unavailable" too
        logger.warning("nvidia-cudnn-frontend failed to import: %s", exc)
        return None
    return cudnn


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """Why the cuDNN path cannot run here (None when it can): frontend, GPU, cuDNN version."""
    if _import_cudnn() is None:
        return "nvidia-cudnn-frontend is not installed; install ditbake[cuda] (or pip install nvidia-cudnn-frontend)"
    if not torch.cuda.is_available():
        return "no CUDA device; cuDNN band attention runs on NVIDIA GPUs only"
    if not torch.backends.cudnn.is_available():
        return "torch was built without cuDNN; use a CUDA build of torch"
    version = torch.backends.cudnn.version() or 0
    if version < MIN_CUDNN_VERSION:
        return f"cuDNN {version} is older than {MIN_CUDNN_VERSION} (diagonal bands); upgrade torch"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"cuDNN SDPA needs compute capability >= 8.0, this GPU has {major}.x"
    return None


def available(device: Optional[torch.device] = None) -> bool:
    """Whether the frontend imports and a CUDA device with a recent enough cuDNN is present."""
    return unavailable_reason(device) is None


# --------------------------------------------------------------------------------------------
# Validation and the bound mapping
# --------------------------------------------------------------------------------------------

def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_left: int, w_right: int,
                 scale: Optional[float]) -> None:
    """Shape/dtype/width checks valid on every device (BandInputError, one line)."""
    check_qkv_tensors(q, k, v, BandInputError)
    if w_left < 0 or w_right < 0:
        raise BandInputError(f"band widths must be >= 0, got w_left={w_left}, w_right={w_right}")
    if scale is not None and not (scale > 0 and math.isfinite(scale)):
        raise BandInputError(f"scale must be a positive finite float, got {scale}")


def check_cuda_inputs(q: torch.Tensor) -> None:
    """What the cuDNN kernel itself cannot run (CudnnUnavailableError names the fix)."""
    if q.dtype not in _IO_DTYPES:
        raise CudnnUnavailableError(f"cuDNN band attention takes bf16 or fp16, got {q.dtype}; cast q, k, v first")
    head_dim = q.shape[-1]
    if head_dim % 8 != 0 or head_dim > MAX_HEAD_DIM:
        raise CudnnUnavailableError(f"cuDNN SDPA needs a head dim that is a multiple of 8 and <= {MAX_HEAD_DIM}, got {head_dim}; "
                           "use ditbake::head_attention for this group")
    reason = unavailable_reason(q.device)
    if reason is not None:
        raise CudnnUnavailableError(reason)


def cudnn_bounds(w_left: int, w_right: int, seq_kv: int) -> tuple[Optional[int], Optional[int]]:
    """ditbake's inclusive band [i - w_left, i + w_right] as cuDNN's (left_bound, right_bound).

    left_bound is exclusive (masks j <= i - L), so L = w_left + 1; right_bound is inclusive, R = w_right.
    A side covering the whole sequence is None (no bound).
    """
    left = None if w_left >= seq_kv - 1 else w_left + 1
    right = None if w_right >= seq_kv - 1 else w_right
    return left, right


def cudnn_band_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_left: int, w_right: int,
                             scale: Optional[float] = None) -> torch.Tensor:
    """The specification: ditbake's arrow reference with every head ARROW(w_left, w_right), no text."""
    check_inputs(q, k, v, w_left, w_right, scale)
    from ditbake.plugins.cudnn_sdpa import band_attention_ref  # noqa: PLC0415 - the C++ op's spec is the same

    return band_attention_ref(q, k, v, w_left, w_right, scale)


# --------------------------------------------------------------------------------------------
# Graph cache (built once per shape/band; execution only binds pointers)
# --------------------------------------------------------------------------------------------

def define_graph(cudnn, handle, q, k, v, out, left: Optional[int], right: Optional[int], scale: float):
    """The SDPA graph (not yet built): q, k, v, out with their own dims and strides, the band as bounds.

    Returns (graph, (q, k, v, o) graph tensors). Needs no GPU, so CPU tests can check it validates.
    """
    io = cudnn.data_type.BFLOAT16 if q.dtype == torch.bfloat16 else cudnn.data_type.HALF
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    tq, tk, tv = (g.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=io)
                  for name, t in (("q", q), ("k", k), ("v", v)))
    to, _ = g.sdpa(name="band_sdpa", q=tq, k=tk, v=tv, generate_stats=False, attn_scale=scale,
                   diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
                   diagonal_band_left_bound=left, diagonal_band_right_bound=right)
    to.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(io)
    return g, (tq, tk, tv, to)


class _BandGraph:
    """One built cuDNN SDPA graph and what executing it needs."""

    def __init__(self, cudnn, handle, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 left: Optional[int], right: Optional[int], scale: float):
        start = time.perf_counter()
        g, (self.q, self.k, self.v, self.o) = define_graph(cudnn, handle, q, k, v, out, left, right, scale)
        try:
            g.validate()
            g.build_operation_graph()
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            g.check_support()
            g.build_plans()
        except Exception as exc:  # cuDNN raises several types (cudnnGraphNotSupportedError, RuntimeError)
            raise CudnnUnavailableError(
                f"cuDNN cannot run this band attention (shape {tuple(q.shape)}, {q.dtype}, bounds {left}/{right}): "
                f"{exc}; use ditbake::head_attention for this group") from exc
        self.graph = g
        self.workspace_bytes = int(g.get_workspace_size())
        self.build_s = time.perf_counter() - start
        try:
            self.plan = g.get_plan_name_at_index(0)  # the heuristics' first plan
        except Exception:  # noqa: BLE001 - the name is informational only
            self.plan = "?"
        logger.info("cuDNN band graph %s: %.2f s, workspace %d B, plan %s", tuple(q.shape), self.build_s,
                    self.workspace_bytes, self.plan)

    def run(self, handle, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        workspace = torch.empty(max(self.workspace_bytes, 1), dtype=torch.uint8, device=q.device)
        self.graph.execute({self.q: q, self.k: k, self.v: v, self.o: out}, workspace, handle=handle)


_GRAPHS: dict[tuple, _BandGraph] = {}
_LOCK = threading.Lock()
_TLS = threading.local()  # cuDNN handles are not thread-safe: one per (thread, device)


def _handle(cudnn, device: torch.device):
    handles = getattr(_TLS, "handles", None)
    if handles is None:
        handles = _TLS.handles = {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in handles:
        with torch.cuda.device(index):
            handles[index] = cudnn.create_handle()
    cudnn.set_stream(handle=handles[index], stream=torch.cuda.current_stream(index).cuda_stream)
    return handles[index]


def graph_key(q, k, v, out, left, right, scale) -> tuple:
    return (tuple(q.shape), q.dtype, tuple(q.stride()), tuple(k.stride()), tuple(v.stride()),
            tuple(out.stride()), left, right, scale, q.device.index)


def get_graph(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, w_left: int, w_right: int,
              scale: float) -> _BandGraph:
    """The built graph for these tensors and this band (built on first use; build is slow)."""
    cudnn = _import_cudnn()
    left, right = cudnn_bounds(w_left, w_right, k.shape[2])
    key = graph_key(q, k, v, out, left, right, scale)
    with _LOCK:
        built = _GRAPHS.get(key)
        if built is None:
            built = _GRAPHS[key] = _BandGraph(cudnn, _handle(cudnn, q.device), q, k, v, out, left, right, scale)
    return built


def _cuda_band_attention(q, k, v, w_left, w_right, scale):
    check_cuda_inputs(q)
    # cuDNN needs a unit stride on the head dim; any other strides (a head slice, [B, S, H, D]
    # storage transposed) go to cuDNN as they are.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    built = get_graph(q, k, v, out, w_left, w_right, scale)
    built.run(_handle(_import_cudnn(), q.device), q, k, v, out)
    return out


# --------------------------------------------------------------------------------------------
# torch.library op
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("ditbake::cudnn_band_attention", mutates_args=(), device_types="cuda")
def cudnn_band_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_left: int, w_right: int,
                            scale: Optional[float] = None) -> torch.Tensor:
    check_inputs(q, k, v, w_left, w_right, scale)
    return _cuda_band_attention(q, k, v, w_left, w_right, scale)


@cudnn_band_attention_op.register_kernel("cpu")
def _cudnn_band_attention_cpu(q, k, v, w_left, w_right, scale=None):
    return cudnn_band_attention_ref(q, k, v, w_left, w_right, scale)


@cudnn_band_attention_op.register_fake
def _cudnn_band_attention_fake(q, k, v, w_left, w_right, scale=None):
    check_inputs(q, k, v, w_left, w_right, scale)
    return q.new_empty(q.shape)


def cudnn_band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_left: int, w_right: int,
                         scale: Optional[float] = None) -> torch.Tensor:
    """Checked entry (typed errors before the dispatcher); hot paths may call the op directly."""
    check_inputs(q, k, v, w_left, w_right, scale)
    if q.device.type == "cuda":
        check_cuda_inputs(q)
    return torch.ops.ditbake.cudnn_band_attention(q, k, v, int(w_left), int(w_right), scale)
