"""The 8-bit attention's prepare kernels on the GPU (plugins/attention_8bit.py: K/V statistics, then the
quantization of q, k, v), launch-shape sweep against the memory roofline, at Wan2.1-1.3B's
1 x 12 x 32,760 x 128 and Flux's 1 x 24 x 16,896 x 128, with q and k contiguous and v a [B, S, H, D]
view, as the forwards pass them.

    python3 benchmarks/bench_prepare_8bit.py            # GPU, writes $OUT/prepare_8bit.json

Bytes per call: the statistics read k and v (bf16), the quantization reads q, k, v and writes their
codes (1 byte each); the roofline row is a device-to-device copy moving the same number of bytes.
Timing: triton.testing.do_bench (CUDA events, median, L2 flushed between runs). Two stages: the
statistics' launch shapes with the default quantization, then the quantization's with the best
statistics.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from bench_attention import copy_ms, do_bench_ms, kernel_us  # benchmarks/ is the script's directory
from ditbake.plugins import attention_8bit as a8
from provenance import stamp

logger = logging.getLogger("bench_prepare_8bit")

SHAPES = {"wan2.1-1.3b": (1, 12, 32760, 128), "flux-2048": (1, 24, 16896, 128)}


def stats_variants() -> list[dict]:
    """Per-tile reductions at their best shape, and reduce-once around its best (the first sweep,
    prepare_8bit_h200.json: rows 16-32, 4 warps, k and v split)."""
    per_tile = [dict(stats_chunk=512, stats_rows=64, stats_warps=4, stats_split=True, stats_reduce_once=False)]
    once = [dict(stats_chunk=c, stats_rows=r, stats_warps=w, stats_split=True, stats_reduce_once=True)
            for c, r, w in ((256, 16, 2), (256, 16, 4), (256, 32, 4), (512, 16, 4), (512, 32, 4))]
    return per_tile + once


def quant_variants() -> list[dict]:
    return [dict(quant_split=s, quant_warps=w) for s, w in ((False, 4), (True, 2), (True, 4))]


def label(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def bench_shape(shape: tuple) -> dict:
    batch, heads, seq, dim = shape
    q, k = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    elems = q.numel()
    gbytes = (2 * 2 * elems + 3 * 2 * elems + 3 * elems) / 1e9  # stats read k, v; quantize reads 3, writes 3 codes
    row = {"shape": list(shape), "gbytes": gbytes, "copy_same_bytes_ms": copy_ms(gbytes)}
    row["copy_tb_s"] = gbytes / row["copy_same_bytes_ms"]
    want = a8.prepare_8bit(q, k, v, None, "int8", v_transposed=True)

    def measure(cfg: dict) -> dict:
        got = a8.prepare_8bit(q, k, v, None, "int8", v_transposed=True, config=cfg)
        entry = {"max_abs_k_mean_diff": float((got.k_mean - want.k_mean).abs().max()),
                 "k8_codes_differ": float((got.k8.float() != want.k8.float()).float().mean())}
        entry["ms"] = do_bench_ms(lambda: a8.prepare_8bit(q, k, v, None, "int8", v_transposed=True, config=cfg))
        entry["tb_s"] = gbytes / entry["ms"]  # GB per ms = TB/s
        logger.info("%s %s", label(cfg), entry)
        return entry

    def per_kernel_us(cfg: dict) -> dict:
        return kernel_us(lambda: a8.prepare_8bit(q, k, v, None, "int8", v_transposed=True, config=cfg), calls=20)

    row["default"] = {"config": dict(a8.PREPARE_CONFIG), **measure({}), "kernel_us": per_kernel_us({})}
    row["stats_sweep"] = {label(c): measure(c) for c in stats_variants()}
    best_stats = min(stats_variants(), key=lambda c: row["stats_sweep"][label(c)]["ms"])
    row["quant_sweep"] = {label({**best_stats, **c}): measure({**best_stats, **c}) for c in quant_variants()}
    best = min(row["quant_sweep"].items(), key=lambda kv: kv[1]["ms"])
    best_cfg = {**best_stats, **min(quant_variants(), key=lambda c: row["quant_sweep"][label({**best_stats, **c})]["ms"])}
    row["best"] = {"config": best_cfg, **best[1], "x_default": row["default"]["ms"] / best[1]["ms"],
                   "kernel_us": per_kernel_us(best_cfg)}
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "prepare_8bit.json")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = {"what": __doc__.splitlines()[0], "device": torch.cuda.get_device_name(), "shapes": {}}
    for name in args.shapes.split(","):
        results["shapes"][name] = bench_shape(SHAPES[name])
        torch.cuda.empty_cache()
        args.out.write_text(json.dumps(stamp(results), indent=1))
    for name, row in results["shapes"].items():
        print(f"\n{name}: {row['gbytes']:.3f} GB per call; copy of the same bytes {row['copy_same_bytes_ms']:.3f} ms "
              f"({row['copy_tb_s']:.2f} TB/s)")
        print(f"{'config':90} {'ms':>7} {'TB/s':>6}")
        for key, e in [("default", row["default"]), *row["stats_sweep"].items(), *row["quant_sweep"].items()]:
            print(f"{key:90} {e['ms']:7.3f} {e['tb_s']:6.2f}")
        print(f"best: {label(row['best']['config'])} {row['best']['ms']:.3f} ms = {row['best']['x_default']:.2f}x the default")
        for which in ("default", "best"):
            print(f"  {which} per kernel (us): " + ", ".join(f"{k} {t:.1f}" for k, t in row[which]["kernel_us"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
