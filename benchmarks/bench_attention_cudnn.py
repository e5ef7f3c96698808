"""cuDNN band attention (ditbake::cudnn_band_attention) vs dense SDPA and ditbake's Triton band kernel.

Shapes: Wan2.1-1.3B self-attention (1 x 12 x 32,760 x 128) and the 16k test bed (1 x 8 x 16,384 x 32),
random bf16. Bands keep 12.5 / 25 / 50 % of the (query, key) pairs (a symmetric half-width solved
for that fraction, edge clipping included). Per row: median CUDA-event ms, TFLOP/s of the work the
mask keeps (4 * pairs * D * H), relative L2 vs an fp32 reference on the first heads, and for cuDNN
the graph build time. Plus the op inside an AOTInductor package vs the eager op. Each part runs in
its own try/except so one failure still reports the rest. Must finish in < 3 min on an H100.

    python3 benchmarks/bench_attention_cudnn.py [--out FILE]   # default $OUT/attention_cudnn_h100.json,
                                                                # else benchmarks/results/attention_cudnn_h100.json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_attention import band_width_for_density, relative_error, time_ms  # benchmarks/ is the script dir
from ditbake.plugins import attention_cudnn as ac
from ditbake.plugins import head_attention as ha
from provenance import stamp

logger = logging.getLogger("bench_attention_cudnn")

SHAPES = {"wan2.1-1.3b": (1, 12, 32760, 128), "testbed-16k": (1, 8, 16384, 32)}
FRACTIONS = (0.125, 0.25, 0.5)
REF_HEADS = 2  # the fp32 reference runs on these heads only (time); errors are over them


def _attempt(record: dict, key: str, fn) -> None:
    try:
        record[key] = fn()
    except Exception as exc:  # noqa: BLE001 - report and go on with the other parts
        record[key] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
        logger.warning("%s failed: %s", key, traceback.format_exc(limit=3))


def _tflops(batch, heads, head_dim, pairs, ms) -> float:
    return 4.0 * batch * heads * head_dim * pairs / (ms * 1e-3) / 1e12


def bench_shape(name, batch, heads, seq, head_dim, warmup, reps) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qr, kr, vr = (t[:, :REF_HEADS].float() for t in (q, k, v))
    rows: dict = {"shape": [batch, heads, seq, head_dim]}

    def err(out, w):  # relative L2 on the reference heads vs fp32
        ref = ac.cudnn_band_attention_ref(qr, kr, vr, w, w)
        return relative_error(out[:, :REF_HEADS], ref)

    def dense():
        ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), warmup, reps)
        out = F.scaled_dot_product_attention(q, k, v)
        return {"ms": ms, "tflops": _tflops(batch, heads, head_dim, seq * seq, ms), "rel_l2": err(out, seq)}

    _attempt(rows, "sdpa_dense", dense)
    # "pairs" bands keep that fraction of all (query, key) pairs (the project's convention); "keys" bands
    # are w = frac * S / 2 per side (the "band of 25 % of the keys" per row), cuDNN only.
    bands = [(f"{frac:g}", band_width_for_density(seq, frac)) for frac in FRACTIONS] + [("1", seq)]
    bands += [(f"keys{frac:g}", round(frac * seq / 2)) for frac in (0.25, 0.5)]
    for tag, w in bands:
        pairs = ha._band_pairs(seq, w, w)

        def cudnn_band():
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = ac.cudnn_band_attention(q, k, v, w, w)
            torch.cuda.synchronize()
            first_s = time.perf_counter() - start
            built = ac.get_graph(q, k, v, out, w, w, 1.0 / math.sqrt(head_dim))  # the op's default scale
            ms = time_ms(lambda: torch.ops.ditbake.cudnn_band_attention(q, k, v, w, w, None), warmup, reps)
            return {"width": w, "pair_fraction": pairs / seq / seq, "ms": ms,
                    "tflops": _tflops(batch, heads, head_dim, pairs, ms), "rel_l2": err(out, w),
                    "graph_build_s": built.build_s, "first_call_s": first_s, "plan": built.plan,
                    "workspace_bytes": built.workspace_bytes}

        def triton_band():
            schemes = ha.schemes_to_tensor([ha.HeadScheme.arrow(w, w)] * heads).to("cuda")
            run = lambda: torch.ops.ditbake.head_attention(q, k, v, schemes, 0, 0, None, None)  # noqa: E731
            out = run()
            ms = time_ms(run, warmup, reps)
            return {"width": w, "pair_fraction": pairs / seq / seq, "ms": ms,
                    "tflops": _tflops(batch, heads, head_dim, pairs, ms), "rel_l2": err(out, w)}

        _attempt(rows, f"cudnn_band_{tag}", cudnn_band)
        if not tag.startswith("keys"):
            _attempt(rows, f"triton_band_{tag}", triton_band)
    return rows


class _BandModule(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, q, k, v):
        return torch.ops.ditbake.cudnn_band_attention(q, k, v, self.width, self.width, None)


def bench_aoti(batch, heads, seq, head_dim, warmup, reps) -> dict:
    """The op compiled into an AOTInductor package (called back through the proxy executor) vs eager."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w = band_width_for_density(seq, 0.25)
    model = _BandModule(w).eval()
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ep = torch.export.export(model, (q, k, v))
        path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(tmp, "band.pt2"))
        compile_s = time.perf_counter() - start
        loaded = torch._inductor.aoti_load_package(path)
        got, want = loaded(q, k, v), model(q, k, v)
        aoti_ms = time_ms(lambda: loaded(q, k, v), warmup, reps)
        eager_ms = time_ms(lambda: model(q, k, v), warmup, reps)
    return {"shape": [batch, heads, seq, head_dim], "width": w, "compile_s": compile_s, "aoti_ms": aoti_ms,
            "eager_ms": eager_ms, "max_abs_diff": (got.float() - want.float()).abs().max().item(),
            "bitwise_equal": bool(torch.equal(got, want))}


def print_table(results: dict) -> None:
    for name, rows in results["shapes"].items():
        if "error" in rows:
            logger.info("%s: %s", name, rows["error"])
            continue
        logger.info("%s %s", name, rows.get("shape"))
        logger.info("%-22s %9s %9s %10s %10s", "kernel", "ms", "TFLOP/s", "rel L2", "build s")
        for key, row in rows.items():
            if key == "shape":
                continue
            if "error" in row:
                logger.info("%-22s %s", key, row["error"][:100])
                continue
            logger.info("%-22s %9.3f %9.1f %10.2e %10s", key, row["ms"], row["tflops"], row["rel_l2"],
                        f"{row['graph_build_s']:.2f}" if "graph_build_s" in row else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = (Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results")
    parser.add_argument("--out", type=Path, default=default_out / "attention_cudnn_h100.json")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--aoti", action="store_true", help="also the op inside an AOTInductor package (segfaulted "
                        "in the proxy executor on torch 2.11: run last, after the JSON is written)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        logger.error("needs a CUDA GPU")
        return 2
    results: dict = {"device": torch.cuda.get_device_name(), "cudnn": torch.backends.cudnn.version(),
                     "cudnn_unavailable": ac.unavailable_reason(), "shapes": {}}
    try:
        import cudnn  # noqa: PLC0415
        results["cudnn_frontend"] = cudnn.__version__
    except ImportError:
        results["cudnn_frontend"] = None
    for name, shape in SHAPES.items():
        _attempt(results["shapes"], name, lambda shape=shape, name=name: bench_shape(name, *shape, args.warmup, args.reps))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(stamp(results), indent=2) + "\n")  # before AOTI: a crash there keeps these
    print_table(results)
    if args.aoti:
        _attempt(results, "aoti", lambda: bench_aoti(*SHAPES["wan2.1-1.3b"], args.warmup, args.reps))
        args.out.write_text(json.dumps(stamp(results), indent=2) + "\n")
        logger.info("aoti: %s", results.get("aoti"))
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
