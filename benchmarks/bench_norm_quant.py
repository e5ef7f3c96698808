"""Per-token INT8 quantization kernels at Wan2.1-1.3B's size (32,760 tokens x 1,536; --width 3072 --tokens 16896 for
Flux at 2048²): the producer kernels
``ditbake::norm_quant`` (modulated layer norm + quantization) and ``ditbake::row_quant`` (quantization
alone, for attention outputs) of plugins/producer_quant.py, launch sweeps, against Inductor's fusion of
the same torch ops (what aoti engines ran before), and a copy moving the same bytes (the roofline).

    python3 benchmarks/bench_norm_quant.py            # GPU, writes $OUT/norm_quant.json (--out to rename)

Bytes: x read (bf16), codes written (1 byte) and one fp32 scale per token (TB/s of the residual rows count
these bytes too: they move 2 x more). The residual update before a norm (runtime.nn.residual_normed_input)
is timed fused (ditbake::residual_norm_quant) and as Inductor's update + the norm kernel. Timing: the kernels' profiled device
time over 20 calls back to back (bench_attention.device_ms), do_bench's median beside it. Codes are compared with the specification (norm_quant_ref).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_attention import copy_ms, device_ms, do_bench_ms  # benchmarks/ is the script's directory
from ditbake.plugins import producer_quant as pq
from ditbake.plugins.int8 import quantize_rows
from provenance import stamp

logger = logging.getLogger("bench_norm_quant")
TOKENS, WIDTH, EPS = 32760, 1536, 1e-6
# (rows, warps, steps, stages): around the shipped 1 x 4 x 16 x 3 (the manual look-ahead it replaced, and
# wider sweeps, are in norm_quant_{wan,flux}_h100.json of session 12's first call)
NORM_SWEEP = [(1, 4, 16, 3), (1, 4, 8, 3), (2, 4, 8, 3), (1, 2, 8, 3), (1, 4, 16, 4), (1, 4, 16, 1), (2, 4, 4, 2),
              (1, 8, 16, 3)]
# IEEE division was measured too (norm_quant_division_h200.json: 170-673 us vs 97-270 with the reciprocal)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "norm_quant.json")
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--width", type=int, default=WIDTH, help="1,536 Wan2.1-1.3B, 3,072 Flux")
    args = parser.parse_args(argv)
    tokens, width = args.tokens, args.width
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    x = (torch.randn(1, tokens, width, device="cuda") * 3 + 0.5).to(torch.bfloat16)
    mul = 1 + 0.2 * torch.randn(1, width, device="cuda")
    add = 0.2 * torch.randn(1, width, device="cuda")
    gbytes = (x.numel() * 3 + tokens * 4) / 1e9
    want_q, want_s = pq.norm_quant_ref(x, mul, add, EPS, "int8")

    def composition(x):
        y = (F.layer_norm(x.float(), (width,), None, None, EPS) * mul[:, None] + add[:, None]).to(x.dtype)
        q, s = quantize_rows(y.reshape(-1, width), "int8")
        return q, s.reshape(-1)

    def row(fn, want=True) -> dict:
        """Timing and, with want, the codes against the specification's (the residual rows normalize another x)."""
        q, s = fn()
        entry = {"ms": device_ms(fn), "do_bench_ms": do_bench_ms(fn)}
        if want:
            entry.update(codes_differ=float((q.float() != want_q.float()).float().mean()),
                         max_code_step=float((q.float() - want_q.float()).abs().max()),
                         scale_max_rel=float(((s - want_s).abs() / want_s).max()))
        entry["tb_s"] = gbytes / entry["ms"]
        return entry

    results = {"what": __doc__.splitlines()[0], "device": torch.cuda.get_device_name(), "gbytes": gbytes,
               "tokens": tokens, "width": width,
               "copy_same_bytes_ms": copy_ms(gbytes), "rows": {}}
    compiled = torch.compile(composition, dynamic=False)
    results["rows"]["inductor (torch ops compiled)"] = row(lambda: compiled(x))
    saved = (pq.NORM_ROWS, pq.NORM_WARPS, pq.NORM_STEPS, pq.NORM_STAGES, pq.ROW_ROWS, pq.ROW_WARPS)
    try:
        for rows, warps, steps, stages in NORM_SWEEP:
            pq.NORM_ROWS, pq.NORM_WARPS, pq.NORM_STEPS, pq.NORM_STAGES = rows, warps, steps, stages
            name = f"norm_quant rows={rows} warps={warps} steps={steps} stages={stages}"
            results["rows"][name] = row(lambda: pq.norm_quant(x, mul, add, EPS, "int8"))
            logger.info("%s %s", name, results["rows"][name])
        # the residual update before a norm (Wan: h + a * gate) fused into it, against the update compiled by
        # Inductor followed by the norm kernel (what the forward ran before)
        a = torch.randn_like(x)
        gate = 0.5 * torch.randn(1, width, device="cuda")
        update = torch.compile(lambda x, a: (x.float() + a * gate[:, None]).type_as(x), dynamic=False)
        results["rows"]["update (inductor) + norm_quant"] = row(lambda: pq.norm_quant(update(x, a), mul, add, EPS, "int8"),
                                                                 want=False)
        results["rows"]["residual_norm_quant (fused)"] = row(
            lambda: pq.residual_norm_quant(x, a, gate, mul, add, EPS, "int8")[1:], want=False)
        # row_quant on the norm's output (the same codes: its input is y already rounded to bf16)
        y = (F.layer_norm(x.float(), (width,), None, None, EPS) * mul[:, None] + add[:, None]).to(x.dtype).reshape(-1, width)
        compiled_rows = torch.compile(lambda y: quantize_rows(y, "int8"), dynamic=False)
        results["rows"]["inductor quantize_rows (no norm)"] = row(lambda: compiled_rows(y))
        for rows, warps in itertools.product((1, 2), (2, 4)):
            pq.ROW_ROWS, pq.ROW_WARPS = rows, warps
            name = f"row_quant rows={rows} warps={warps}"
            results["rows"][name] = row(lambda: pq.row_quant(y, "int8"))
            logger.info("%s %s", name, results["rows"][name])
    finally:
        pq.NORM_ROWS, pq.NORM_WARPS, pq.NORM_STEPS, pq.NORM_STAGES, pq.ROW_ROWS, pq.ROW_WARPS = saved
    for op, inductor in (("norm_quant", "inductor (torch ops compiled)"), ("row_quant", "inductor quantize_rows (no norm)")):
        kernels = {k: v for k, v in results["rows"].items() if k.startswith(op)}
        best = min(kernels, key=lambda k: kernels[k]["ms"])
        results[f"best_{op}"] = best
        results[f"best_{op}_x_inductor"] = results["rows"][inductor]["ms"] / kernels[best]["ms"]
    args.out.write_text(json.dumps(stamp(results), indent=1))
    print(f"{gbytes:.3f} GB per call; copy of the same bytes {results['copy_same_bytes_ms'] * 1e3:.0f} us")
    print(f"{'':52} {'us':>6} {'TB/s':>5} {'codes differ':>12} {'max step':>8}")
    for name, e in results["rows"].items():
        print(f"{name:52} {e['ms'] * 1e3:6.0f} {e['tb_s']:5.2f} {e.get('codes_differ', float('nan')):12.2e} "
              f"{e.get('max_code_step', float('nan')):8.0f}")
    for op in ("norm_quant", "row_quant"):
        print(f"best: {results[f'best_{op}']}, {results[f'best_{op}_x_inductor']:.2f}x Inductor's fusion")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
