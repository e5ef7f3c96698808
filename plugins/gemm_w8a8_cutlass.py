"""INT8 W8A8 GEMM through CUTLASS 3's Hopper kernels, as the C++ op ``ditbake::gemm_w8a8_cutlass``.

What: ``gemm_w8a8_cutlass(qx, sx, qw, w_scale, bias, config) -> bf16 [M, N]`` with
``out = bf16(float(qx @ qw.T) * sx[:, None] * sw[None, :] + bias)`` — the same numerics as
``ditbake::gemm_w8a8``'s Triton kernels (exact int32 sums, the fp32 epilogue in that order, one
rounding to bf16), so swapping kernels does not change an engine's output.

Why: INT8 is the accurate 8-bit format on the test bed (36.9 dB vs FP8's 31.9), but Triton 3.6's
Hopper INT8 GEMM reaches 1,000-1,090 TOPS where cuBLASLt's FP8 kernels reach 1,250-1,540 at the same
tensor-core rate: it has no producer/consumer warp-group split or ping-pong epilogue
(plugins/notes/gemm_8bit_persistent.md). CUTLASS's sm90 warp-specialized kernels have both; cuBLASLt's
INT8 path (``torch._int_mm``) is slower still on Hopper. The kernels are sm90a (wgmma, TMA,
clusters): a Blackwell path would be another set of translation units behind the same op.

Where it runs: a C++ kernel, so AOTInductor engines call it through the dispatcher without Python
(the runtime loads it before an engine that uses it: ``runtime.engines``). The schema, the CPU
reference and the fake kernel are registered here, so a CPU install compiles nothing;
:func:`load_native` compiles ``csrc/gemm_w8a8_cutlass*.{cpp,cu}`` against the headers of the
``nvidia-cutlass`` package (the ``cutlass`` extra) once per machine, and keeps the library under
``$DITBAKE_EXT_DIR`` named by a hash of its sources, flags and torch version (a build can be carried
to another machine of the same image).

Switch: ``DITBAKE_CUTLASS_GEMM=on`` (default: used where :func:`cutlass_gemm_applies`) or ``off``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from ditbake.plugins.int8 import matmul_8bit_ref
from ditbake.plugins.native_loading import NativeLibrary, extension_dir
from ditbake.plugins.nvfp4 import QuantFormatError

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ["gemm_w8a8_cutlass.cpp", "gemm_w8a8_cutlass_coop_128x256.cu", "gemm_w8a8_cutlass_pingpong_128x128.cu",
           "gemm_w8a8_cutlass_coop_256x128.cu", "gemm_w8a8_cutlass_gelu_coop_128x256.cu",
           "gemm_w8a8_cutlass_gelu_pingpong_128x128.cu"]
HEADERS = ["gemm_w8a8_cutlass.cuh", "gemm_w8a8_cutlass_api.h"]
# the ops' `config` argument: 0 = by shape (csrc/gemm_w8a8_cutlass.cpp's auto_config), then these
CONFIGS = ("coop_128x256", "pingpong_128x128", "coop_256x128")
GELU_CONFIGS = ("coop_128x256", "pingpong_128x128")
CUDA_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG"]
ARCH = "9.0a"  # wgmma and TMA multicast need the arch-specific target, not plain sm_90
MIN_ROWS = 1024  # smaller M leaves most SMs idle on 128-row tiles: the Triton kernels keep it

MODE = os.environ.get("DITBAKE_CUTLASS_GEMM", "on")
if MODE not in ("on", "off"):
    raise ValueError(f"DITBAKE_CUTLASS_GEMM must be on or off, got {MODE!r}")
ENABLED = MODE == "on"

torch.library.define("ditbake::gemm_w8a8_cutlass",
                     "(Tensor qx, Tensor sx, Tensor qw, Tensor w_scale, Tensor? bias, int config=0) -> Tensor")
torch.library.define("ditbake::gemm_w8a8_gelu_cutlass",
                     "(Tensor qx, Tensor sx, Tensor qw, Tensor w_scale, Tensor? bias, int config=0) -> (Tensor, Tensor)")


def check_args(qx, sx, qw, w_scale, bias, config: int, configs: tuple = CONFIGS) -> None:
    """The op's contract, checked on every device (the C++ kernel checks it again)."""
    if qx.dim() != 2 or qw.dim() != 2 or qx.dtype != torch.int8 or qw.dtype != torch.int8:
        raise QuantFormatError(f"gemm_w8a8_cutlass takes int8 qx [M, K] and qw [N, K], got {qx.dtype} "
                               f"{tuple(qx.shape)} and {qw.dtype} {tuple(qw.shape)}")
    m, k = qx.shape
    n = qw.shape[0]
    if qw.shape[1] != k:
        raise QuantFormatError(f"qx has K={k} but qw has K={qw.shape[1]}")
    if k % 16 or n % 8:
        raise QuantFormatError(f"gemm_w8a8_cutlass needs K % 16 == 0 and N % 8 == 0 (16-byte TMA rows), got K={k} N={n}")
    for name, t, size in (("sx", sx, m), ("w_scale", w_scale, n)):
        if t.dtype != torch.float32 or t.numel() != size:
            raise QuantFormatError(f"{name} must be float32 with {size} elements, got {t.dtype} {tuple(t.shape)}")
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.numel() != n):
        raise QuantFormatError(f"bias must be bfloat16 [{n}], got {bias.dtype} {tuple(bias.shape)}")
    if isinstance(config, bool) or not isinstance(config, int) or not 0 <= config <= len(configs):
        raise QuantFormatError(f"config must be 0 (by shape) .. {len(configs)}, got {config!r}")


@torch.library.impl("ditbake::gemm_w8a8_cutlass", "CPU")
def _gemm_w8a8_cutlass_cpu(qx, sx, qw, w_scale, bias, config=0):
    """The specification: exact sums, fp32 epilogue, one rounding to bf16."""
    check_args(qx, sx, qw, w_scale, bias, config)
    return matmul_8bit_ref(qx, sx.reshape(-1), qw, w_scale, bias, torch.float32).to(torch.bfloat16)


@torch.library.register_fake("ditbake::gemm_w8a8_cutlass")
def _gemm_w8a8_cutlass_fake(qx, sx, qw, w_scale, bias, config=0):
    return qx.new_empty((qx.shape[0], qw.shape[0]), dtype=torch.bfloat16)


def gemm_gelu_ref(qx, sx, qw, w_scale, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """The GELU op's specification: p = exact sums · sx · sw + bias in fp32, g = tanh-GELU(p) in fp32;
    returns (bf16(g), max |g| per row in fp32). (The kernel's tanh is tanh.approx.f32, |error| ≲ 2⁻¹¹,
    far below the bf16 rounding of g.)"""
    pre = matmul_8bit_ref(qx, sx.reshape(-1), qw, w_scale, bias, torch.float32)
    g = torch.nn.functional.gelu(pre, approximate="tanh")
    return g.to(torch.bfloat16), g.abs().amax(dim=-1) if g.shape[-1] else g.new_zeros(g.shape[0])


@torch.library.impl("ditbake::gemm_w8a8_gelu_cutlass", "CPU")
def _gemm_w8a8_gelu_cutlass_cpu(qx, sx, qw, w_scale, bias, config=0):
    check_args(qx, sx, qw, w_scale, bias, config, GELU_CONFIGS)
    return gemm_gelu_ref(qx, sx, qw, w_scale, bias)


@torch.library.register_fake("ditbake::gemm_w8a8_gelu_cutlass")
def _gemm_w8a8_gelu_cutlass_fake(qx, sx, qw, w_scale, bias, config=0):
    return (qx.new_empty((qx.shape[0], qw.shape[0]), dtype=torch.bfloat16),
            qx.new_empty((qx.shape[0],), dtype=torch.float32))


def cutlass_gemm_applies(qx: torch.Tensor, qw: torch.Tensor, out_dtype: torch.dtype,
                         bias: torch.Tensor | None = None) -> bool:
    """Whether ``ditbake::gemm_w8a8`` should run this product here: INT8 on an sm90 GPU (the kernels
    are sm90a-only), bf16 out and bias (if any), contiguous 16-byte-aligned operands, M large enough
    to fill the SMs, and the extension built. Called while Inductor traces (fake tensors): storage
    offsets, not pointers."""
    if not (ENABLED and qx.is_cuda and qx.dtype == torch.int8 and qw.dtype == torch.int8
            and out_dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16)):
        return False
    if torch.cuda.get_device_capability(qx.device) != (9, 0):
        return False
    m, k = qx.shape
    n = qw.shape[0]
    if not (m >= MIN_ROWS and k % 16 == 0 and n % 8 == 0 and qx.is_contiguous() and qw.is_contiguous()
            and qx.storage_offset() % 16 == 0 and qw.storage_offset() % 16 == 0):
        return False
    return load_native()


# --------------------------------------------------------------------------------------------
# Building and loading the CUDA kernels
# --------------------------------------------------------------------------------------------

LIBRARY = "ditbake_gemm_w8a8_cutlass"


def cutlass_include_dirs() -> list[str]:
    """CUTLASS's and CuTe's headers plus its util headers, from the ``nvidia-cutlass`` package."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return []
    source = Path(list(spec.submodule_search_locations)[0]) / "source"
    dirs = [source / "include", source / "tools" / "util" / "include"]
    return [str(d) for d in dirs if d.is_dir()] if (dirs[0] / "cutlass" / "cutlass.h").is_file() else []


def build_key(includes: list[str]) -> str:
    """Content identity of the library: sources, headers, flags, target, torch and CUTLASS versions."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    version = Path(includes[0], "cutlass", "version.h").read_bytes() if includes else b""
    h.update(" ".join(CUDA_FLAGS + [ARCH, torch.__version__, str(torch.version.cuda)]).encode() + version)
    return h.hexdigest()[:16]


def _build(verbose: bool) -> Optional[str]:
    """Load the library of this content from the extension folder, building it first where absent."""
    includes = cutlass_include_dirs()
    if not includes:
        return "CUTLASS headers not found; install ditbake[cutlass] (the nvidia-cutlass package)"
    ext_dir = extension_dir()
    library = ext_dir / f"{LIBRARY}-{build_key(includes)}.so"
    if library.is_file():
        torch.ops.load_library(str(library))
    else:
        _build_and_load(includes, ext_dir, library, verbose)
    return None


_NATIVE = NativeLibrary(_build, "building or loading the CUTLASS GEMM failed", "ditbake CUTLASS INT8 GEMM unavailable")


def load_native(verbose: bool = False) -> bool:
    """Load (building once per machine when no library of this content exists) the CUDA kernels;
    False with :func:`unavailable_reason` set where this machine cannot."""
    return _NATIVE.load(verbose)


def _build_and_load(includes: list[str], ext_dir: Path, library: Path, verbose: bool) -> None:
    """Compile with torch's extension builder (ninja: the translation units in parallel; it loads
    the result), then keep a copy under the content name (a temporary name first: never a
    half-written library) for the next process or machine."""
    from torch.utils.cpp_extension import load  # noqa: PLC0415

    logger.info("building the CUTLASS INT8 GEMM (a few minutes, once per machine) into %s", library)
    build_dir = ext_dir / library.stem
    build_dir.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = ARCH
    try:
        load(name=LIBRARY, sources=[str(CSRC / s) for s in SOURCES], extra_include_paths=includes + [str(CSRC)],
             extra_cflags=["-O2", "-std=c++17"], extra_cuda_cflags=CUDA_FLAGS, extra_ldflags=["-lcuda"],
             with_cuda=True, build_directory=str(build_dir), is_python_module=False, verbose=verbose)
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    partial = library.with_suffix(".so.partial")
    shutil.copyfile(build_dir / f"{LIBRARY}.so", partial)
    partial.replace(library)


def unavailable_reason() -> Optional[str]:
    """Why :func:`load_native` returned False (None when it has not been tried or succeeded)."""
    return _NATIVE.reason
