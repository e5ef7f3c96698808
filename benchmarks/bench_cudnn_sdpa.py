"""ditbake's C++ cuDNN ops (plugins/cudnn_sdpa.py) vs SDPA and ditbake's Triton kernels, dense and banded.

Shapes: Wan2.1-1.3B self-attention (1 x 12 x 32,760 x 128), Flux at 2048² (1 x 24 x 16,896 x 128) and
the 16k test bed (1 x 8 x 16,384 x 32), random bf16 with a per-channel offset on v and k (DiT-like:
the smoothing steps matter). Rows per shape and band (dense, 25 %, 50 % of the pairs):
* bf16: torch SDPA (dense), ditbake::cudnn_sdpa (C++), ditbake::head_attention (Triton);
* 8-bit: fp8t composite (quantize + cuDNN FP8 + dequantize; its op alone too), ditbake::attention_8bit int8
  (Triton, SageAttention-style).
Each: median CUDA-event ms, TFLOP/s of the kept work, relative L2 vs an fp64 reference on the first
REF_HEADS heads and REF_ROWS query rows. Then the AOTInductor check: a module calling both C++ ops,
compiled and loaded in a fresh process, vs eager. Each part in its own try/except.

    python3 benchmarks/bench_cudnn_sdpa.py --out $OUT/cudnn_sdpa_h100.json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench_attention import band_width_for_density, time_ms  # benchmarks/ is the script's directory
from provenance import stamp

log = logging.getLogger("bench_cudnn_sdpa")

SHAPES = {"wan2.1-1.3b": (1, 12, 32760, 128), "flux-2048": (1, 24, 16896, 128), "testbed-16k": (1, 8, 16384, 32)}
FRACTIONS = (1.0, 0.5, 0.25)
REF_HEADS, REF_ROWS = 2, 1024


def _attempt(rows: dict, key: str, fn) -> None:
    try:
        rows[key] = fn()
    except Exception as exc:  # noqa: BLE001 - report and go on
        rows[key] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
        log.warning("%s failed: %s", key, traceback.format_exc(limit=4))
    log.info("%-40s %s", key, rows[key])


def reference(q, k, v, w: int) -> torch.Tensor:
    """fp64 attention of the first REF_HEADS heads, query rows spread over the sequence."""
    seq = q.shape[2]
    rows = torch.linspace(0, seq - 1, REF_ROWS, device=q.device).long()
    qh, kh, vh = (t[:, :REF_HEADS].double() for t in (q, k, v))
    s = (qh[:, :, rows] @ kh.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    keys = torch.arange(seq, device=q.device)
    if w >= 0:
        s = s.masked_fill((keys[None, :] < rows[:, None] - w) | (keys[None, :] > rows[:, None] + w), float("-inf"))
    return torch.softmax(s, -1) @ vh, rows


def bench_shape(name, shape, warmup, reps) -> dict:
    from ditbake.plugins import attention_8bit, cudnn_sdpa, head_attention  # noqa: F401 - register the ops

    b, h, s, d = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    k = k + 3 * torch.randn(1, h, 1, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = v + 2 * torch.randn(1, h, 1, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    out: dict = {"shape": list(shape)}
    for frac in FRACTIONS:
        w = -1 if frac >= 1 else band_width_for_density(s, frac)
        pairs = s * s if w < 0 else head_attention._band_pairs(s, w, w)
        ref, rows = reference(q, k, v, w)
        tag = "dense" if w < 0 else f"band{int(frac * 100)}"

        def measure(fn):
            res = fn()
            ms = time_ms(fn, warmup, reps)
            err = float((res[:, :REF_HEADS, rows].double() - ref).norm() / ref.norm())
            return {"ms": ms, "tflops": 4.0 * b * h * d * pairs / (ms * 1e-3) / 1e12, "rel_err": err}

        table = torch.tensor([[0 if w < 0 else 1, max(w, 0), max(w, 0)]] * h, dtype=torch.int32, device="cuda")
        if w < 0:
            _attempt(out, f"{tag} sdpa bf16", lambda: measure(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)))
        _attempt(out, f"{tag} cudnn bf16 (C++)", lambda: measure(lambda: torch.ops.ditbake.cudnn_sdpa(q, k, v, w, w, d ** -0.5)))
        if d in head_attention.KERNEL_CONFIGS:
            _attempt(out, f"{tag} triton bf16", lambda: measure(
                lambda: torch.ops.ditbake.head_attention(q, k, v, table, 0, 0, None, None)))
            _attempt(out, f"{tag} triton int8", lambda: measure(
                lambda: torch.ops.ditbake.attention_8bit(q, k, v, table, 0, 0, None, None, "int8")))
        _attempt(out, f"{tag} fp8t cudnn (total)", lambda: measure(lambda: cudnn_sdpa.fp8t_attention(q, k, v, w, w)))
        compiled = torch.compile(lambda q, k, v: cudnn_sdpa.fp8t_attention(q, k, v, w, w))
        _attempt(out, f"{tag} fp8t cudnn (compiled total)", lambda: measure(lambda: compiled(q, k, v)))
        q8, dq = (q.float() / 8).to(torch.float8_e4m3fn), torch.full((1, 1, 1, 1), 8.0, device="cuda")
        o_scale = torch.ones(1, 1, 1, 1, device="cuda")

        def op_only():
            ms = time_ms(lambda: torch.ops.ditbake.cudnn_sdpa_fp8(q8, q8, q8, dq, dq, dq, o_scale, w, w, d ** -0.5),
                         warmup, reps)
            return {"ms": ms, "tflops": 4.0 * b * h * d * pairs / (ms * 1e-3) / 1e12}
        _attempt(out, f"{tag} fp8t cudnn (op only)", op_only)
        torch.cuda.empty_cache()
    return out


AOTI_CHILD = r"""
import sys, torch
import ditbake.plugins.cudnn_sdpa as c
assert c.load_native(), c.unavailable_reason()
pkg = torch._inductor.aoti_load_package(sys.argv[1])
x = torch.load(sys.argv[2])
got = pkg(*x["args"])
print("max_abs_diff", max(float((g.float().cpu() - e.float()).abs().max()) for g, e in zip(got, x["expected"])))
"""


class _Both(torch.nn.Module):
    def forward(self, q, k, v):
        from ditbake.plugins import cudnn_sdpa

        dense = torch.ops.ditbake.cudnn_sdpa(q, k, v, -1, -1, q.shape[-1] ** -0.5)
        band = cudnn_sdpa.fp8t_attention(q, k, v, 256, 256)
        return dense * 2, band + 1


def aoti_check() -> dict:
    q, k, v = (torch.randn(1, 4, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    module = _Both()
    expected = module(q, k, v)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        exported = torch.export.export(module, (q, k, v))
        path = torch._inductor.aoti_compile_and_package(exported, package_path=f"{tmp}/both.pt2")
        build_s = time.perf_counter() - t0
        torch.save({"args": (q, k, v), "expected": [e.cpu() for e in expected]}, f"{tmp}/io.pt")
        proc = subprocess.run([sys.executable, "-c", AOTI_CHILD, path, f"{tmp}/io.pt"], capture_output=True, text=True,
                              timeout=300)
    return {"build_s": build_s, "returncode": proc.returncode, "stdout": proc.stdout[-400:], "stderr": proc.stderr[-800:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ditbake.plugins import cudnn_sdpa

    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "cudnn": torch.backends.cudnn.version(), "method": f"median of {args.reps} CUDA-event timings after "
                    f"{args.warmup} warm-ups; error vs fp64 on {REF_HEADS} heads x {REF_ROWS} query rows"}
    t0 = time.perf_counter()
    result["native_loaded"] = cudnn_sdpa.load_native(verbose=False)
    result["native_build_s"] = time.perf_counter() - t0
    result["native_reason"] = cudnn_sdpa.unavailable_reason()
    log.info("native: %s in %.1f s (%s)", result["native_loaded"], result["native_build_s"], result["native_reason"])
    if result["native_loaded"]:
        _attempt(result, "aoti", aoti_check)
        for name in args.shapes.split(","):
            _attempt(result, name, lambda name=name: bench_shape(name, SHAPES[name], args.warmup, args.reps))
            Path(args.out).write_text(json.dumps(stamp(result), indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(stamp(result), indent=1))
    for name in SHAPES:
        for key, row in (result.get(name) or {}).items():
            if isinstance(row, dict) and "ms" in row:
                print(f"{name:12s} {key:34s} {row['ms']:8.3f} ms {row.get('tflops', 0):7.1f} TF/s "
                      f"err {row.get('rel_err', float('nan')):.2e}")
            elif isinstance(row, dict):
                print(f"{name:12s} {key:34s} {str(row)[:150]}")
    print("aoti:", result.get("aoti"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
