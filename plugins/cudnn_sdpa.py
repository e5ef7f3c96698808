"""cuDNN fused attention as C++ ops that AOTInductor engines can call: bf16 (dense or one diagonal
band) and per-tensor FP8 (``fp8t``, Hopper's 8-bit tensor-core attention).

What:
* ``ditbake::cudnn_sdpa(q, k, v, w_left, w_right, scale)`` — bf16/fp16 [B, H, S, D], every head the
  band [i - w_left, i + w_right] (a negative width: unbounded on that side; both negative: dense);
* ``ditbake::cudnn_sdpa_fp8(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, w_left, w_right,
  scale)`` — E4M3 in, E4M3 out, one fp32 scale per tensor (cuDNN's FP8 SDPA; bf16 output is
  Blackwell-only, NVIDIA's support surface);
* ``fp8t_attention(q, k, v, w_left, w_right)`` — the composite the runtime calls: smooth, quantize,
  the FP8 op, dequantize. Plain torch ops around one custom op, so Inductor fuses the amax and casts
  into the kernels that produce q, k, v (RoPE, norms) and the dequantization into the consumer.

Why C++: the Python-frontend op (plugins/attention_cudnn.py) segfaults when AOTInductor's proxy
executor calls it back from inside an engine; kernels registered in C++ are what that executor
calls. The schemas, CPU references and fake kernels are registered here (a CPU install never
compiles anything); ``load_native()`` compiles ``csrc/cudnn_sdpa.cpp`` against the cuDNN that torch
loads and the header-only ``nvidia-cudnn-frontend`` (the ``cuda`` extra) and registers its CUDA
kernels. Compiling takes about a minute, once per machine (torch's extension cache).

Numerics of ``fp8t`` (the specification is ``fp8t_attention_ref``):
1. k ← k − mean_tokens(k) per head: exact for softmax (it shifts every score of a query row alike,
   band or not) and it removes a key offset that would take FP8's range.
2. v ← v − mean_tokens(v) per head, added back after attention: exact since each row's weights sum
   to 1, and the FP8 output then only carries the deviation.
2b. q, k ← q·S, k·S with S the ±1 Sylvester Hadamard matrix (power-of-two head dims; the softmax
   scale takes 1/d since S Sᵀ = d·I): scores are unchanged, and channels with outliers shared by
   q and k are spread over all channels. FP8's error is relative per product, so a few dominant
   products make the score error large: on the trained 16k test bed's layer 0 (q, k amax 6-10x
   their rms) the rotation cut the attention error from 7.8 % to 5.7 %, on synthetic peaky inputs
   from 30 % to 9.4 % (CPU reference; plugins/notes/cudnn_sdpa.md).
3. q, k, v → E4M3 with one scale per tensor, s = amax / 448 (E4M3 is floating point: heads of
   different magnitudes keep their relative precision down to amax · 2⁻⁶ / 448, below which
   values are subnormal).
4. cuDNN: S = q8·k8ᵀ · s_q s_k · scale in fp32; P = exp(S − rowmax) rounded to E4M3 after ×448;
   O = P8·v8 · s_v / rowsum, multiplied by scale_o = 448 / amax(v) and rounded to E4M3, saturating
   at 448 (a softmax average never exceeds max |v|; P's rounding can overshoot it by a few %).
5. out = O8 · amax(v)/448 + mean(v), in the input dtype.
Error, measured against fp64 (tests/plugins/test_cudnn_sdpa.py, GPU): a few % on random data, as
every attention with FP8 P and V (plugins/notes/attention_8bit.md: E4M3 keeps 3 mantissa bits);
far less where the output has a coherent part.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from ditbake.plugins.hadamard import hadamard_sign_matrix
from ditbake.plugins.head_attention import HeadAttentionError, HeadKind, check_qkv_tensors, head_attention_ref
from ditbake.plugins.native_loading import NativeLibrary, extension_dir

FP8_MAX = 448.0
CSRC = Path(__file__).resolve().parent / "csrc" / "cudnn_sdpa.cpp"
# Hopper's FP8 SDPA: head dim a multiple of 16, <= 256 (cudnn_frontend sdpa_support_surface.h);
# bf16: a multiple of 8, <= 256
FP8_HEAD_DIMS = range(16, 257, 16)
BF16_HEAD_DIMS = range(8, 257, 8)


class CudnnSdpaInputError(HeadAttentionError):
    """Malformed input to the cuDNN ops (shape, dtype, width, scale); the message names the fix."""


# --------------------------------------------------------------------------------------------
# Schemas, references, fake kernels
# --------------------------------------------------------------------------------------------

torch.library.define("ditbake::cudnn_sdpa", "(Tensor q, Tensor k, Tensor v, int w_left, int w_right, float scale) -> Tensor")
torch.library.define("ditbake::cudnn_sdpa_fp8",
                     "(Tensor q, Tensor k, Tensor v, Tensor descale_q, Tensor descale_k, Tensor descale_v, "
                     "Tensor scale_o, int w_left, int w_right, float scale) -> Tensor")


def _widths(w_left: int, w_right: int, seq: int) -> tuple[int, int]:
    """Negative = unbounded → the reference's full width."""
    return (seq if w_left < 0 else w_left), (seq if w_right < 0 else w_right)


def check_inputs(q, k, v, w_left: int, w_right: int, scale: float, fp8: bool = False) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise CudnnSdpaInputError(f"{name} must be a 4-D tensor [B, H, S, D], got {getattr(t, 'shape', None)}")
    if k.shape != q.shape or v.shape != q.shape or k.dtype != q.dtype or v.dtype != q.dtype:
        raise CudnnSdpaInputError(f"q, k, v must share one shape and dtype, got {tuple(q.shape)} {q.dtype}, "
                                  f"{tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
    if fp8 and q.dtype != torch.float8_e4m3fn:
        raise CudnnSdpaInputError(f"cudnn_sdpa_fp8 takes float8_e4m3fn q, k, v, got {q.dtype}")
    if not fp8:
        check_qkv_tensors(q, k, v, CudnnSdpaInputError)
    if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
        raise CudnnSdpaInputError(f"scale must be a positive finite float, got {scale!r}")
    for name, w in (("w_left", w_left), ("w_right", w_right)):
        if isinstance(w, bool) or not isinstance(w, int):
            raise CudnnSdpaInputError(f"{name} must be an int (negative: unbounded), got {w!r}")


def check_fp8_scales(descale_q, descale_k, descale_v, scale_o) -> None:
    """The FP8 op's scales: one-element fp32 tensors (the CUDA kernel binds their pointers as fp32)."""
    for name, t in (("descale_q", descale_q), ("descale_k", descale_k), ("descale_v", descale_v), ("scale_o", scale_o)):
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32:
            raise CudnnSdpaInputError(f"{name} must be a one-element fp32 tensor, got "
                                      f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}")


def band_attention_ref(q, k, v, w_left: int, w_right: int, scale: Optional[float]) -> torch.Tensor:
    """bf16 op's specification: every head ARROW(w_left, w_right) with no text, fp32 softmax."""
    wl, wr = _widths(w_left, w_right, q.shape[2])
    table = torch.tensor([[int(HeadKind.ARROW), wl, wr]] * q.shape[1], dtype=torch.int32)
    return head_attention_ref(q, k, v, table, (0, 0), scale=scale).contiguous()


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to E4M3 (saturating at ±448) and back to fp32."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def fp8_op_ref(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, w_left: int, w_right: int,
               scale: float, query_chunk: int = 2048) -> torch.Tensor:
    """cudnn_sdpa_fp8's specification: fp32 scores from the dequantized codes, P rounded to E4M3
    after ×448 (against the row's final max: cuDNN rounds against its running max, so the GPU
    differs by at most one E4M3 step of p), row sum of the unrounded p, output ×scale_o → E4M3."""
    b, h, s, d = q8.shape
    wl, wr = _widths(w_left, w_right, s)
    qf = q8.to(torch.float32) * descale_q.reshape(()).float()
    kf = k8.to(torch.float32) * descale_k.reshape(()).float()
    vf = v8.to(torch.float32) * descale_v.reshape(()).float()
    out = torch.empty(b, h, s, d, dtype=torch.float32, device=q8.device)
    keys = torch.arange(s, device=q8.device)
    for row0 in range(0, s, query_chunk):
        rows = torch.arange(row0, min(row0 + query_chunk, s), device=q8.device)
        scores = (qf[:, :, rows] @ kf.transpose(-1, -2)) * scale
        allowed = (keys[None, :] >= rows[:, None] - wl) & (keys[None, :] <= rows[:, None] + wr)
        scores = scores.masked_fill(~allowed, float("-inf"))
        p = torch.exp(scores - scores.amax(-1, keepdim=True))
        p8 = e4m3(p * FP8_MAX) / FP8_MAX
        out[:, :, rows] = (p8 @ vf) / p.sum(-1, keepdim=True)
    return e4m3(out * scale_o.reshape(()).float()).to(torch.float8_e4m3fn)


@torch.library.impl("ditbake::cudnn_sdpa", "CPU")
def _cudnn_sdpa_cpu(q, k, v, w_left, w_right, scale):
    check_inputs(q, k, v, w_left, w_right, scale)
    return band_attention_ref(q, k, v, w_left, w_right, scale)


@torch.library.impl("ditbake::cudnn_sdpa_fp8", "CPU")
def _cudnn_sdpa_fp8_cpu(q, k, v, descale_q, descale_k, descale_v, scale_o, w_left, w_right, scale):
    check_inputs(q, k, v, w_left, w_right, scale, fp8=True)
    check_fp8_scales(descale_q, descale_k, descale_v, scale_o)
    return fp8_op_ref(q, k, v, descale_q, descale_k, descale_v, scale_o, w_left, w_right, scale)


# The fake kernels check too: a malformed call fails at export, not inside a compiled engine
# (whose C++ kernel would only raise an untyped cuDNN error).
@torch.library.register_fake("ditbake::cudnn_sdpa")
def _cudnn_sdpa_fake(q, k, v, w_left, w_right, scale):
    check_inputs(q, k, v, w_left, w_right, scale)
    return q.new_empty(q.shape)


@torch.library.register_fake("ditbake::cudnn_sdpa_fp8")
def _cudnn_sdpa_fp8_fake(q, k, v, descale_q, descale_k, descale_v, scale_o, w_left, w_right, scale):
    check_inputs(q, k, v, w_left, w_right, scale, fp8=True)
    check_fp8_scales(descale_q, descale_k, descale_v, scale_o)
    return q.new_empty(q.shape)


# --------------------------------------------------------------------------------------------
# The fp8t composite (what the runtime calls) and its reference
# --------------------------------------------------------------------------------------------

def _per_tensor_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x → (E4M3 codes, descale [1,1,1,1] fp32, amax fp32 scalar)."""
    amax = x.abs().amax().float().clamp_min(1e-12)
    codes = (x.float() * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, (amax / FP8_MAX).reshape(1, 1, 1, 1), amax


def _fp8t_inputs(q, k, v, w_left, w_right, scale):
    """Steps 1-3 of the module docstring, after checking the composite's own inputs (floating q, k, v
    of one shape and dtype, int widths, a positive scale): the quantized op inputs and what
    dequantizes its output."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None and isinstance(q, torch.Tensor) else scale
    check_inputs(q, k, v, w_left, w_right, scale)
    k = k.float() - k.float().mean(dim=2, keepdim=True)
    v_mean = v.float().mean(dim=2, keepdim=True)
    v_dev = v.float() - v_mean
    d = q.shape[-1]
    if d & (d - 1) == 0:  # rotate q and k (step 2b): scores unchanged, outliers spread
        # one plain [tokens, d] x [d, d] bf16 GEMM each with the exact ±1 matrix (fp32 accumulation);
        # (qS)(kS)ᵀ = d·qkᵀ, so the softmax scale takes the 1/d. A blockwise fp32 batched product
        # here cost 6.5 ms per Wan layer on the H200 (forward_race: 408 -> 604 ms).
        signs = hadamard_sign_matrix(d, dtype=torch.bfloat16, device=q.device)
        q = (q.to(torch.bfloat16).reshape(-1, d) @ signs).reshape(q.shape)
        k = (k.to(torch.bfloat16).reshape(-1, d) @ signs).reshape(k.shape)
        scale = scale / d
    q8, dq, _ = _per_tensor_fp8(q)
    k8, dk, _ = _per_tensor_fp8(k)
    v8, dv, v_amax = _per_tensor_fp8(v_dev)
    scale_o = (FP8_MAX / v_amax).reshape(1, 1, 1, 1)
    return (q8, k8, v8, dq, dk, dv, scale_o, int(w_left), int(w_right), float(scale)), v_amax, v_mean


def fp8t_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_left: int = -1, w_right: int = -1,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Per-tensor FP8 attention through cuDNN (module docstring, steps 1-5); traceable. On CPU the
    op's reference runs, so this is also the CPU specification of the composite."""
    (q8, k8, v8, *rest), v_amax, v_mean = _fp8t_inputs(q, k, v, w_left, w_right, scale)
    o8 = torch.ops.ditbake.cudnn_sdpa_fp8(q8.contiguous(), k8.contiguous(), v8.contiguous(), *rest)
    return (o8.float() * (v_amax / FP8_MAX) + v_mean).to(q.dtype)


def fp8t_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_left: int = -1, w_right: int = -1,
                       scale: Optional[float] = None) -> torch.Tensor:
    """The composite's specification on any device (the op's reference in place of cuDNN)."""
    args, v_amax, v_mean = _fp8t_inputs(q, k, v, w_left, w_right, scale)
    o8 = fp8_op_ref(*args)
    return (o8.float() * (v_amax / FP8_MAX) + v_mean).to(q.dtype)


# The whole composite as one op, for graphs that must keep it as one node: the CPU runtime calls it, so
# the tensorrt backend's ONNX export (traced on the CPU) sees one `fp8t_attention` node and translates it
# to a TensorRT plugin (exporter/onnx_ops.py, plugins/trt_attention_8bit.py). On CUDA the runtime calls the
# traceable composite above instead, so that Inductor fuses its casts into the neighbouring kernels.
torch.library.define("ditbake::fp8t_attention",
                     "(Tensor q, Tensor k, Tensor v, int w_left, int w_right, float? scale) -> Tensor")


@torch.library.impl("ditbake::fp8t_attention", "CPU")
def _fp8t_attention_cpu(q, k, v, w_left, w_right, scale):
    return fp8t_attention_ref(q, k, v, w_left, w_right, scale)


@torch.library.impl("ditbake::fp8t_attention", "CUDA")
def _fp8t_attention_cuda(q, k, v, w_left, w_right, scale):
    return fp8t_attention(q, k, v, w_left, w_right, scale)


@torch.library.register_fake("ditbake::fp8t_attention")
def _fp8t_attention_fake(q, k, v, w_left, w_right, scale):
    check_inputs(q, k, v, w_left, w_right, 1.0 if scale is None else scale)
    return q.new_empty(q.shape)


# --------------------------------------------------------------------------------------------
# Building and loading the CUDA kernels
# --------------------------------------------------------------------------------------------

def _nvidia_cudnn_dir() -> Optional[Path]:
    """The pip cuDNN torch uses (nvidia/cudnn: include/, lib/), or None for a system cuDNN."""
    try:
        import nvidia.cudnn  # noqa: PLC0415 - torch's own cuDNN wheel

        return Path(list(nvidia.cudnn.__path__)[0])
    except Exception:  # noqa: BLE001 - a system cuDNN: CUDA_HOME is searched by the build
        return None


def _include_dirs() -> list[str]:
    """cudnn_frontend.h (the frontend wheel's include/) and cudnn.h (the cuDNN wheel torch uses)."""
    dirs = []
    try:
        import cudnn  # noqa: PLC0415 - nvidia-cudnn-frontend, the `cuda` extra

        frontend = Path(cudnn.__file__).resolve().parent.parent / "include"
        if (frontend / "cudnn_frontend.h").is_file():
            dirs.append(str(frontend))
    except Exception:  # noqa: BLE001 - missing or broken frontend: reported below
        pass
    base = _nvidia_cudnn_dir()
    if base is not None and (base / "include" / "cudnn.h").is_file():
        dirs.append(str(base / "include"))
    return dirs


def _cudnn_lib_flags() -> list[str]:
    base = _nvidia_cudnn_dir()
    if base is not None and (base / "lib" / "libcudnn.so.9").exists():
        lib = base / "lib"
        return [f"-L{lib}", "-l:libcudnn.so.9", f"-Wl,-rpath,{lib}"]
    return ["-lcudnn"]


def _build(verbose: bool) -> Optional[str]:
    includes = _include_dirs()
    if not any(Path(d, "cudnn_frontend.h").is_file() for d in includes):
        return "nvidia-cudnn-frontend headers not found; install ditbake[cuda]"
    from torch.utils.cpp_extension import load  # noqa: PLC0415

    build_dir = extension_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    load(name="ditbake_cudnn_sdpa", sources=[str(CSRC)], extra_include_paths=includes,
         extra_cflags=["-O2", "-std=c++17"], extra_ldflags=_cudnn_lib_flags(), with_cuda=True,
         build_directory=str(build_dir), is_python_module=False, verbose=verbose)
    return None


_NATIVE = NativeLibrary(_build, "building the cuDNN extension failed", "ditbake cuDNN attention unavailable")


def load_native(verbose: bool = False) -> bool:
    """Compile (once per machine) and load the CUDA kernels; False with `unavailable_reason()` set
    when this machine cannot (no GPU, no frontend headers, compiler error)."""
    return _NATIVE.load(verbose)


def unavailable_reason() -> Optional[str]:
    """Why `load_native()` returned False (None when it has not been tried or succeeded)."""
    return _NATIVE.reason


def supports(q: torch.Tensor, precision: str) -> bool:
    """Whether cuDNN can run this group on this machine: CUDA, head dim, dtype, the extension."""
    if not q.is_cuda:
        return False
    head_dim = q.shape[-1]
    if precision == "fp8t":
        major = torch.cuda.get_device_capability(q.device)[0]
        # Blackwell's FP8 SDPA takes head dims <= 128 (plus special sizes); Hopper's up to 256
        ok = head_dim in FP8_HEAD_DIMS and major >= 9 and (major < 10 or head_dim <= 128)
    else:
        ok = head_dim in BF16_HEAD_DIMS and q.dtype in (torch.bfloat16, torch.float16)
    return ok and load_native()
