"""The 8-bit GEMMs alone at Wan2.1-1.3B's linear shapes (M = 32,760): bf16 cuBLAS, cuBLASLt FP8
(fast accumulation), linear_8bit's pointer-loading Triton INT8 kernel, the persistent TMA kernel
(plugins/gemm_8bit_persistent.py) per tile / pipeline config, and CUTLASS's warp-specialized INT8
kernels (plugins/gemm_w8a8_cutlass.py, when the cutlass extra is installed) per configuration. (Inside the
engines it is measured by benchmarks/forward_race.py.)

Each time: median of CUDA-event timings of 10 back-to-back calls (after warm-up) divided by 10, so
Python launch overhead does not hide in the GPU time. Writes JSON (per-config ms and TOPS).

    python benchmarks/bench_gemm_8bit.py --out $OUT/gemm_8bit.json
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_attention import time_ms  # benchmarks/ is the script's directory
from provenance import stamp

log = logging.getLogger("bench_gemm_8bit")

SHAPES = {"qkvo 1536→1536": (1536, 1536), "ffn up 1536→8960": (1536, 8960), "ffn down 8960→1536": (8960, 1536)}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, WARP_SPECIALIZE); sweeps 1-3
# (results/gemm_8bit_sweep*_h200.*) left these contenders
PERSISTENT_CONFIGS = [(128, 256, 128, 8, 4, False), (128, 256, 128, 8, 3, False), (128, 256, 128, 8, 3, True)]
REPEAT = 10


def timed(fn) -> float:
    def many():
        for _ in range(REPEAT):
            fn()
    return time_ms(many, 2, 10) / REPEAT


def safe(times: dict, name: str, fn) -> None:
    try:
        times[name] = timed(fn)
        log.info("%-44s %.1f µs", name, times[name] * 1e3)
    except Exception as exc:  # a config that does not compile (registers, shared memory): recorded
        times[name] = f"{type(exc).__name__}: {str(exc)[:160]}"
        log.info("%-44s %s", name, times[name])


gelu_bf16 = torch.compile(lambda h: F.gelu(h, approximate="tanh"), dynamic=False)


def shape_rows(tokens: int, k: int, n: int) -> dict:
    import ditbake.plugins.gemm_8bit_persistent as gp
    from ditbake.plugins.linear_8bit import gemm_8bit
    from ditbake.plugins.linear_fp8 import gemm_fp8

    dev = torch.device("cuda")
    x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
    qi = torch.randint(-127, 128, (tokens, k), device=dev, dtype=torch.int8)
    wi = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    qf, wf = (x * 8).to(torch.float8_e4m3fn), (w * 64).to(torch.float8_e4m3fn)
    sx, sw = torch.rand(tokens, device=dev) * 1e-3, torch.rand(n, device=dev) * 1e-3
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
    t: dict = {}
    safe(t, "bf16 cuBLAS", lambda: F.linear(x, w, bias))
    safe(t, "fp8 cuBLASLt fast-accum", lambda: gemm_fp8(qf, sx, wf, sw, bias, torch.bfloat16))
    pointer = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    safe(t, "int8 Triton pointer 128x256x128 w8 s3", lambda: gemm_8bit(qi, sx, wi, sw, bias, torch.bfloat16, pointer))
    ref = gemm_8bit(qi, sx, wi, sw, bias, torch.bfloat16, pointer)
    errors = {}
    for bm, bn, bk, warps, stages, ws in PERSISTENT_CONFIGS:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
                   WARP_SPECIALIZE=ws, FLATTEN=not ws)
        name = f"int8 persistent TMA {bm}x{bn}x{bk} w{warps} s{stages}{' ws' if ws else ''}"
        safe(t, name, lambda: gp.gemm_8bit_persistent(qi, sx, wi, sw, bias, torch.bfloat16, config=cfg))
        if isinstance(t[name], float):  # the same int32 sums and FP32 epilogue: bit-identical expected
            out = gp.gemm_8bit_persistent(qi, sx, wi, sw, bias, torch.bfloat16, config=cfg)
            errors[name] = float((out.float() - ref.float()).abs().max())
    best = min((v, kname) for kname, v in t.items() if kname.startswith("int8 persistent") and isinstance(v, float))
    import ditbake.plugins.gemm_w8a8_cutlass as gc

    if gc.load_native():
        for config, cname in [(0, "auto"), *enumerate(gc.CONFIGS, 1)]:
            name = f"int8 CUTLASS {cname}"
            call = (lambda c=config: torch.ops.ditbake.gemm_w8a8_cutlass(qi, sx, wi, sw, bias, c))
            safe(t, name, call)
            if isinstance(t[name], float):
                errors[name] = float((call().float() - ref.float()).abs().max())
        if n > k:  # an MLP's up projection: the GELU epilogue against GEMM + the GELU-quantize kernel
            from ditbake.plugins.int8 import quantize_rows
            from ditbake.plugins.producer_quant import gelu_quant

            for config, cname in [(0, "auto"), *enumerate(gc.GELU_CONFIGS, 1)]:
                safe(t, f"int8 CUTLASS GELU+amax {cname}",
                     lambda c=config: torch.ops.ditbake.gemm_w8a8_gelu_cutlass(qi, sx, wi, sw, bias, c))
            quantize = torch.compile(lambda h, amax: quantize_rows(h, "int8", amax), dynamic=False)
            h, amax = torch.ops.ditbake.gemm_w8a8_gelu_cutlass(qi, sx, wi, sw, bias, 0)
            safe(t, "  then one quantization pass (compiled torch ops)", lambda: quantize(h, amax))
            import ditbake.plugins.producer_quant as pq

            default = pq.AMAX_RECIPROCAL
            pq.AMAX_RECIPROCAL = False
            safe(t, "  then amax_quant (IEEE division)", lambda: pq.amax_quant(h, amax, "int8"))
            pq.AMAX_RECIPROCAL = True
            safe(t, "  then amax_quant (reciprocal)", lambda: pq.amax_quant(h, amax, "int8"))
            codes_differ = int((pq.amax_quant(h, amax, "int8")[0] != quantize_rows(h, "int8", amax)[0]).sum())
            pq.AMAX_RECIPROCAL = default  # the chain below runs what the runtime runs
            t["  reciprocal: codes differing from the specification"] = codes_differ
            safe(t, "chain now: CUTLASS GELU+amax + amax_quant",
                 lambda: pq.amax_quant(*torch.ops.ditbake.gemm_w8a8_gelu_cutlass(qi, sx, wi, sw, bias, 0), "int8"))
            safe(t, "chain before: CUTLASS GEMM + GELU-quantize kernel",
                 lambda: gelu_quant(torch.ops.ditbake.gemm_w8a8_cutlass(qi, sx, wi, sw, bias, 0), "int8"))
            safe(t, "bf16 chain: cuBLAS + compiled GELU", lambda: gelu_bf16(F.linear(x, w, bias)))
    else:
        t["int8 CUTLASS"] = f"unavailable: {gc.unavailable_reason()}"
    for stages in (3, 4):
        cfg = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=stages)
        safe(t, f"fp8 persistent TMA 128x256x128 w8 s{stages}",
             lambda: gp.gemm_8bit_persistent(qf, sx, wf, sw, bias, torch.bfloat16, config=cfg))
    flops = 2 * tokens * k * n
    return {"k": k, "n": n, "tokens": tokens, "ms": t, "tops": {kk: flops / v / 1e9 for kk, v in t.items()
                                                                if isinstance(v, float)},
            "max_abs_diff_vs_pointer_kernel": errors, "best_persistent": best[1]}


@torch.no_grad()
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=32760)
    args = p.parse_args(argv)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for name, (k, n) in SHAPES.items():
        log.info("== %s", name)
        result["shapes"][name] = shape_rows(args.tokens, k, n)
    Path(args.out).write_text(json.dumps(stamp(result), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
