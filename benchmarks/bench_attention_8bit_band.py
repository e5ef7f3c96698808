"""Banded INT8 attention on the GPU: the two-pass band kernels (plugins/attention_8bit_band.py) against the
general 8-bit kernel on the same arrow heads (plugins/attention_8bit.py) and the dense 8-bit kernel on every
key (plugins/attention_8bit_dense.py), at Flux's 1 x 24 x 16,896 x 128 (512 text tokens first) and
Wan2.1-1.3B's 1 x 12 x 32,760 x 128 (no text), for a few band widths. Each row: the op's time (prepare
included, as the runtime calls it), the attention kernels' own time from the profiler, the fraction of
attention FLOPs the band removes, the effective TFLOP/s on the FLOPs done, and the relative L2 error against
fp64 attention on two heads (and against the general kernel on all).

    python3 benchmarks/bench_attention_8bit_band.py            # GPU, writes $OUT/attention_8bit_band.json

Timing: CUDA events, median over repeats after warm-up (bench_attention.do_bench_ms).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from bench_attention import do_bench_ms, kernel_us
from bench_attention_8bit import peaky_inputs, rel_err
from ditbake.plugins import attention_8bit as a8
from ditbake.plugins import attention_8bit_band as band
from ditbake.plugins import attention_8bit_dense  # noqa: F401 - registers ditbake::attention_8bit_dense
from ditbake.plugins import head_attention as ha
from provenance import stamp

logger = logging.getLogger("bench_attention_8bit_band")

SHAPES = {"flux-2048": ((1, 24, 16896, 128), 512), "wan2.1-1.3b": ((1, 12, 32760, 128), 0)}
BAND_FRACTIONS = (0.5, 0.2)  # w on each side as a fraction of the visual tokens: 0.5 keeps about half the pairs


def kernels_ms(fn) -> dict[str, float]:
    """Device ms per call of each kernel ``fn`` launches, after one warm-up call (bench_attention.kernel_us
    over 5 calls)."""
    fn()
    torch.cuda.synchronize()
    return {name: us / 1000.0 for name, us in kernel_us(fn, 5).items()}


def named_ms(per_kernel: dict[str, float], *names: str) -> float:
    """The summed time of the kernels whose name contains one of ``names``."""
    return sum(ms for kernel, ms in per_kernel.items() if any(n in kernel for n in names))


def bench_shape(name: str, shape: tuple, text_end: int) -> dict:
    batch, heads, seq, dim = shape
    visual = seq - text_end
    q, k, v = peaky_inputs(batch, heads, seq, dim, "cuda", torch.bfloat16)
    dense_flops = 4.0 * batch * heads * seq * seq * dim
    dense = lambda: torch.ops.ditbake.attention_8bit_dense(q, k, v, None)  # noqa: E731
    row = {"shape": list(shape), "text_tokens": text_end, "dense_ms": do_bench_ms(dense),
           "dense_kernel_ms": named_ms(kernels_ms(dense), "_attention_8bit_dense_kernel"), "bands": {}}
    for fraction in BAND_FRACTIONS:
        w = int(fraction * visual / 2) if fraction < 0.5 else visual // 4
        table = ha.schemes_to_tensor([ha.HeadScheme.arrow(w, w)] * heads).to("cuda")
        done = float(ha.attention_flops(table.cpu(), text_end, visual, dim, batch=batch))
        general = lambda: torch.ops.ditbake.attention_8bit(q, k, v, table, 0, text_end, None, None, "int8")  # noqa: E731
        banded = lambda: torch.ops.ditbake.attention_8bit_band(q, k, v, w, w, text_end, None)  # noqa: E731
        exact = ha.head_attention_ref(q[:, :2].double(), k[:, :2].double(), v[:, :2].double(), table[:2], (0, text_end))
        out_band, out_general = banded(), general()
        stats: dict = {}
        qz = a8.prepare_8bit(q, k, v, None, "int8", v_transposed=True)
        band.launch_attention_8bit_band(qz, seq, torch.empty_like(q), w, w, text_end, stats=stats)
        band_kernels = kernels_ms(banded)  # one profile for the pair and the inner pass alone
        entry = {"w": w, "flops_removed": 1.0 - done / dense_flops,
                 "band_ms": do_bench_ms(banded), "general_ms": do_bench_ms(general),
                 "band_kernels_ms": named_ms(band_kernels, "_band_inner_kernel", "_band_edge_kernel"),
                 "band_inner_ms": named_ms(band_kernels, "_band_inner_kernel"),
                 "general_kernel_ms": named_ms(kernels_ms(general), "_attention_8bit_kernel"),
                 "band_err": rel_err(out_band[:, :2], exact), "general_err": rel_err(out_general[:, :2], exact),
                 "band_vs_general": rel_err(out_band, out_general), "inner_registers": stats}
        entry["band_tflops"] = done / entry["band_kernels_ms"] / 1e9
        entry["band_vs_dense_kernel_time"] = entry["band_kernels_ms"] / row["dense_kernel_ms"]
        entry["ideal_vs_dense"] = done / dense_flops
        row["bands"][f"{fraction:.2f}"] = entry
        logger.info("%s band %.2f (w %d, %.1f %% removed): band %.3f ms (kernels %.3f, inner %.3f), general %.3f "
                    "(kernel %.3f), dense kernel %.3f; err band %.3e general %.3e, band vs general %.3e; inner %s",
                    name, fraction, w, 100 * entry["flops_removed"], entry["band_ms"], entry["band_kernels_ms"],
                    entry["band_inner_ms"], entry["general_ms"], entry["general_kernel_ms"], row["dense_kernel_ms"],
                    entry["band_err"], entry["general_err"], entry["band_vs_general"], stats)
    return row


EDGE_SWEEP = [dict(num_warps=4, num_stages=2), dict(num_warps=4, num_stages=3), dict(num_warps=4, num_stages=4),
              dict(num_warps=4, num_stages=1), dict(num_warps=8, num_stages=2), dict(num_warps=8, num_stages=3),
              # a register cap: 168 lets three programs share an SM (253 registers: two), at 76 B of spills
              dict(num_warps=4, num_stages=2, maxnreg=168), dict(num_warps=4, num_stages=3, maxnreg=168)]


def edge_sweep(name: str, shape: tuple, text_end: int) -> dict:
    """The edge pass's launch options at the 50 % band: its kernel time per config (the inner pass fixed)."""
    batch, heads, seq, dim = shape
    q, k, v = peaky_inputs(batch, heads, seq, dim, "cuda", torch.bfloat16)
    w = (seq - text_end) // 4
    qz = a8.prepare_8bit(q, k, v, None, "int8", v_transposed=True)
    out, default = torch.empty_like(q), dict(band.EDGE_CONFIG)
    rows = {}
    try:
        for cfg in EDGE_SWEEP:
            band.EDGE_CONFIG.clear()
            band.EDGE_CONFIG.update(cfg)
            run = lambda: band.launch_attention_8bit_band(qz, seq, out, w, w, text_end)  # noqa: E731
            label = f"w{cfg['num_warps']} s{cfg['num_stages']}" + (f" r{cfg['maxnreg']}" if "maxnreg" in cfg else "")
            per_kernel = kernels_ms(run)
            rows[label] = {"edge_ms": named_ms(per_kernel, "_band_edge_kernel"),
                           "inner_ms": named_ms(per_kernel, "_band_inner_kernel")}
            logger.info("%s edge %s: %.3f ms (inner %.3f)", name, label, rows[label]["edge_ms"], rows[label]["inner_ms"])
    finally:
        band.EDGE_CONFIG.clear()
        band.EDGE_CONFIG.update(default)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "attention_8bit_band.json"))
    parser.add_argument("--only", default="", help="shape names to run, comma separated (default: all)")
    parser.add_argument("--edge-sweep", action="store_true", help="time the edge pass's launch options only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention_8bit_band needs a CUDA GPU (sm_90+)")
    names = [n for n in SHAPES if not args.only or n in args.only.split(",")]
    result = {"what": __doc__.splitlines()[0], "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.edge_sweep:
        result["edge_sweep"] = {n: edge_sweep(n, *SHAPES[n]) for n in names}
        stamp(result)
        Path(args.out).write_text(json.dumps(result, indent=1))
        return
    result["shapes"] = {n: bench_shape(n, *SHAPES[n]) for n in names}
    stamp(result)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({n: {f: {k: round(v, 4) if isinstance(v, float) else v for k, v in e.items()}
                          for f, e in r["bands"].items()} for n, r in result["shapes"].items()}, indent=1))


if __name__ == "__main__":
    main()
