"""Flux's q / k preparation at 2048² (512 text + 16,384 image tokens, 24 heads x 128): the per-head RMS norm +
rotary kernel ``ditbake::rms_rope_heads`` (plugins/rms_rope_heads.py), launch sweeps, against Inductor's
fusion of the same torch ops (what aoti engines ran before) and a copy moving the same bytes (the roofline),
for a double block (text stream first, its own norm) and a single block (one stream).

    python3 benchmarks/bench_rms_rope_heads.py            # GPU, writes $OUT/rms_rope_heads.json

Bytes: x (and the text stream) read, the head-major output written, bf16; cos / sin (fp32) once. The
per-forward estimate counts q and k of 19 double and 38 single blocks. Timing: triton.testing.do_bench
(CUDA events, median, L2 flushed) and, the figure
used, the kernels' device time from the profiler over 20 calls back to back. Outputs are compared with the composition (rms_rope_heads_ref).
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
from ditbake.plugins import rms_rope_heads as rr
from ditbake.runtime.arch_flux import rope
from provenance import stamp

logger = logging.getLogger("bench_rms_rope_heads")
TEXT, GRID, HEADS, HEAD_DIM, EPS = 512, 128, 24, 128, 1e-6
DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38
# launch options swept: (tokens per program, heads per program, warps); --quick keeps the shipped one
SWEEP = ((8, 16, 32), (1, 4, 8, 24), (2, 4, 8))
QUICK_SWEEP = ((8, 16), (4, 8, 24), (4, 8))


def _inputs(double: bool):
    """A double block's image stream [1, N, H*D] with the text stream [1, T, H*D] first, or a single block's
    one stream over the joint sequence [1, T + N, H*D]."""
    g = torch.Generator(device="cuda").manual_seed(0)
    image = GRID * GRID
    x = (torch.randn(1, image if double else TEXT + image, HEADS * HEAD_DIM, device="cuda", generator=g) * 3)
    weight = (1 + 0.3 * torch.randn(HEAD_DIM, device="cuda", generator=g)).to(torch.bfloat16)
    first = torch.randn(1, TEXT, HEADS * HEAD_DIM, device="cuda", generator=g).to(torch.bfloat16) if double else None
    first_weight = (1 + 0.3 * torch.randn(HEAD_DIM, device="cuda", generator=g)).to(torch.bfloat16) if double else None
    cos, sin = rope({"axes_dims_rope": (16, 56, 56)}, TEXT, GRID, GRID, "cuda")
    return x.to(torch.bfloat16), weight, cos, sin, first, first_weight


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few launch options, not the whole sweep")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "rms_rope_heads.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sweep = QUICK_SWEEP if args.quick else SWEEP
    results = {"what": __doc__.splitlines()[0], "device": torch.cuda.get_device_name(), "blocks": {}}
    for kind in ("double", "single"):
        x, weight, cos, sin, first, first_weight = _inputs(kind == "double")
        tokens = TEXT + GRID * GRID
        gbytes = (2 * tokens * HEADS * HEAD_DIM * 2 + 2 * tokens * HEAD_DIM * 4) / 1e9
        want = rr.rms_rope_heads_ref(x, weight, cos, sin, EPS, HEADS, first, first_weight)
        args_ = (x, weight, cos, sin, EPS, HEADS, first, first_weight)
        entry = {"gbytes": gbytes, "copy_same_bytes_ms": copy_ms(gbytes), "rows": {}}

        def row(fn) -> dict:
            got = fn()
            r = {"ms": device_ms(fn), "do_bench_ms": do_bench_ms(fn),
                 "rel_err_vs_composition": _rel_err(got, want), "differ": float((got != want).float().mean())}
            r["tb_s"] = gbytes / r["ms"]
            return r

        compiled = torch.compile(rr.rms_rope_heads_ref, dynamic=False)
        entry["rows"]["inductor (torch ops compiled)"] = row(lambda: compiled(*args_))
        logger.info("%s inductor %s", kind, entry["rows"]["inductor (torch ops compiled)"])
        for tokens_pp, heads_pp, warps in itertools.product(*sweep):
            name = f"kernel tokens={tokens_pp} heads={heads_pp} warps={warps}"
            entry["rows"][name] = row(lambda: rr.launch_rms_rope_heads(
                *args_, tokens_per_program=tokens_pp, heads_per_program=heads_pp, warps=warps))
            logger.info("%s %s %s", kind, name, entry["rows"][name])
        shipped = f"kernel tokens={rr.TOKENS_PER_PROGRAM} heads={rr.HEADS_PER_PROGRAM} warps={rr.WARPS}"
        kernels = {k: v for k, v in entry["rows"].items() if k.startswith("kernel")}
        entry["best"] = min(kernels, key=lambda k: kernels[k]["ms"])
        entry["shipped"] = shipped
        entry["shipped_x_inductor"] = entry["rows"]["inductor (torch ops compiled)"]["ms"] / kernels[shipped]["ms"]
        results["blocks"][kind] = entry
    per_forward = {}
    for label in ("inductor (torch ops compiled)", "shipped"):
        ms = {k: results["blocks"][k]["rows"][label if label != "shipped" else results["blocks"][k]["shipped"]]["ms"]
              for k in ("double", "single")}
        per_forward[label] = 2 * (DOUBLE_BLOCKS * ms["double"] + SINGLE_BLOCKS * ms["single"])
    results["ms_per_forward_q_and_k"] = per_forward
    args.out.write_text(json.dumps(stamp(results), indent=1))
    for kind, entry in results["blocks"].items():
        print(f"{kind} block: {entry['gbytes']:.3f} GB per call; copy of the same bytes "
              f"{entry['copy_same_bytes_ms'] * 1e3:.0f} us")
        print(f"  {'':48} {'us':>6} {'TB/s':>5} {'do_bench':>8} {'rel err':>8} {'differ':>7}")
        for name, e in entry["rows"].items():
            print(f"  {name:48} {e['ms'] * 1e3:6.0f} {e['tb_s']:5.2f} {e['do_bench_ms'] * 1e3:8.0f} "
                  f"{e['rel_err_vs_composition']:8.1e} "
                  f"{e['differ']:7.3f}")
        print(f"  best {entry['best']}; shipped {entry['shipped']} = {entry['shipped_x_inductor']:.2f}x Inductor")
    print("q and k per Flux forward (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in per_forward.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
