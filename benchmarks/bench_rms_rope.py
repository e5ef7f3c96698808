"""Wan's q / k preparation at Wan2.1-1.3B's 480×832×81 (32,760 tokens, 12 heads × 128): the RMS norm across heads
+ rotary kernel ``ditbake::rms_rope`` (plugins/rms_rope.py), launch sweep, against Inductor's fusion of the same
torch ops and a copy moving the same bytes (the roofline).

    python3 benchmarks/bench_rms_rope.py            # GPU, writes $OUT/rms_rope.json

Bytes: x read and the head-major output written (bf16), cos / sin (fp32) once. Timing: the kernels' device time
from the profiler over 20 calls back to back (bench_attention.device_ms); do_bench's median beside it. The
per-forward figure counts q and k of 30 blocks.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
from pathlib import Path

import torch

from bench_attention import copy_ms, device_ms, do_bench_ms  # benchmarks/ is the script's directory
from ditbake.plugins import rms_rope as rr
from ditbake.runtime.arch_wan import rope
from provenance import stamp

logger = logging.getLogger("bench_rms_rope")
LATENT, HEADS, HEAD_DIM, EPS, BLOCKS = (16, 21, 60, 104), 12, 128, 1e-6, 30
SWEEP = ((1, 2, 4, 8), (1, 2, 4, 8))  # tokens per program, warps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "rms_rope.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    g = torch.Generator(device="cuda").manual_seed(0)
    cos, sin = rope({"attention_head_dim": HEAD_DIM, "patch_size": (1, 2, 2)}, LATENT, "cuda")
    tokens = cos.shape[1]
    x = (torch.randn(1, tokens, HEADS * HEAD_DIM, device="cuda", generator=g) * 3).to(torch.bfloat16)
    weight = (1 + 0.3 * torch.randn(HEADS * HEAD_DIM, device="cuda", generator=g)).to(torch.bfloat16)
    call = (x, weight, cos, sin, EPS, HEADS)
    want = rr.rms_rope_ref(*call)
    gbytes = (2 * x.numel() * 2 + 2 * tokens * HEAD_DIM * 4) / 1e9
    results = {"what": __doc__.splitlines()[0], "device": torch.cuda.get_device_name(), "tokens": tokens,
               "gbytes": gbytes, "copy_same_bytes_ms": copy_ms(gbytes), "rows": {}}

    def row(fn) -> dict:
        got = fn()
        r = {"ms": device_ms(fn), "do_bench_ms": do_bench_ms(fn),
             "rel_err_vs_composition": float((got.float() - want.float()).norm() / want.float().norm())}
        r["tb_s"] = gbytes / r["ms"]
        return r

    compiled = torch.compile(rr.rms_rope_ref, dynamic=False)
    results["rows"]["inductor (torch ops compiled)"] = row(lambda: compiled(*call))
    saved = rr.TOKENS_PER_PROGRAM, rr.WARPS
    try:
        for tokens_pp, warps in itertools.product(*SWEEP):
            rr.TOKENS_PER_PROGRAM, rr.WARPS = tokens_pp, warps
            name = f"kernel tokens={tokens_pp} warps={warps}"
            results["rows"][name] = row(lambda: rr.rms_rope(*call))
            logger.info("%s %s", name, results["rows"][name])
    finally:
        rr.TOKENS_PER_PROGRAM, rr.WARPS = saved
    kernels = {k: v for k, v in results["rows"].items() if k.startswith("kernel")}
    results["best"] = min(kernels, key=lambda k: kernels[k]["ms"])
    results["shipped"] = f"kernel tokens={saved[0]} warps={saved[1]}"
    results["ms_per_forward_q_and_k"] = {k: 2 * BLOCKS * kernels[results[k]]["ms"] for k in ("best", "shipped")}
    args.out.write_text(json.dumps(stamp(results), indent=1))
    print(f"{gbytes:.3f} GB per call; copy of the same bytes {results['copy_same_bytes_ms'] * 1e3:.0f} us")
    print(f"{'':36} {'us':>6} {'TB/s':>5} {'do_bench':>8} {'rel err':>8}")
    for name, e in results["rows"].items():
        print(f"{name:36} {e['ms'] * 1e3:6.0f} {e['tb_s']:5.2f} {e['do_bench_ms'] * 1e3:8.0f} {e['rel_err_vs_composition']:8.1e}")
    print(f"best {results['best']}, shipped {results['shipped']}; q and k per forward (ms): "
          + ", ".join(f"{k} {v:.1f}" for k, v in results["ms_per_forward_q_and_k"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
