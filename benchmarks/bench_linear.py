"""GPU benchmark of the quantized linear kernels at Wan2.1-1.3B sizes vs torch bf16 matmul.

Times are medians of CUDA-event timings after warm-up. M=32760 uses triton.testing.do_bench
(which flushes L2 before every repetition; eager, so a multi-kernel op's Python launch overhead
is included: --graphs times those ops by graph replay as well); M=128 replays a CUDA graph of many calls that cycle
through enough weight copies to miss L2, so launch overhead (removed in compiled engines) and
cached weights both stay out of the numbers. Ceilings (bf16 and FP8 8192^3 matmul, device copy)
are measured in the same run. Ratios > 1 mean faster than bf16.

    python3 benchmarks/bench_linear.py --out benchmarks/results/linear_h100.json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from pathlib import Path

import torch

from provenance import stamp  # benchmarks/ is the script's directory: commit + dirty flag in every JSON

log = logging.getLogger("bench_linear")

SHAPES = [(1536, 1536), (1536, 8960), (8960, 1536)]  # (K, N): attention/FFN linears of Wan2.1-1.3B
M_LARGE, M_SMALL = 32760, 128
# Other DiTs at their production token counts: (M, [(K, N), ...]) for the attention and FFN linears.
# CogVideoX at 480×720×49 frames: 13×30×45 visual + 226 text tokens; Flux.1 at 1024² (4096 + 512) and
# 2048² (16,384 + 512).
OTHER_MODELS = {
    "cogvideox-2b": (17776, [(1920, 1920), (1920, 7680), (7680, 1920)]),
    "cogvideox-5b": (17776, [(3072, 3072), (3072, 12288), (12288, 3072)]),
    "flux-dev": (4608, [(3072, 3072), (3072, 12288), (12288, 3072)]),
    "flux-2048": (16896, [(3072, 3072), (3072, 12288), (12288, 3072)]),
}
L2_MISS_BYTES = 160 * 2**20  # rotate weight copies until this many bytes (> 3x the 50 MB L2)


def median_ms_do_bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def median_ms_graph(make_call, n_sets: int, calls: int = 64, repeats: int = 15) -> float:
    """Median per-call time of a CUDA graph replaying `calls` calls of make_call(i % n_sets)."""
    fns = [make_call(i) for i in range(n_sets)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:  # warm-up (compilation, cuBLAS handles) outside the capture
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % n_sets]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def tflops(m, n, k, ms) -> float:
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def measure_ceilings() -> dict:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    bf16_ms = median_ms_do_bench(lambda: a @ b)
    a8 = a.to(torch.float8_e4m3fn)
    b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major as _scaled_mm wants
    sa = torch.ones(n, 1, device="cuda")
    sb = torch.ones(1, n, device="cuda")
    fp8_ms = median_ms_do_bench(lambda: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = median_ms_do_bench(lambda: dst.copy_(src))
    return {
        "bf16_matmul_tflops": tflops(n, n, n, bf16_ms),
        "fp8_scaled_mm_tflops": tflops(n, n, n, fp8_ms),
        "copy_gbps": 2 * src.numel() * 4 / (copy_ms * 1e-3) / 1e9,
    }


def make_weights(n, k, count):
    from ditbake.plugins.nvfp4 import quantize_nvfp4

    sets = []
    for _ in range(count):
        w = torch.randn(n, k, device="cuda") * k**-0.5
        t = quantize_nvfp4(w)
        sets.append({"w_bf16": w.to(torch.bfloat16), "packed": t.packed, "block_scales": t.block_scales,
                     "global_scale": t.global_scale})
    return sets


def bench_shape(m: int, k: int, n: int, results: dict, graphs_everywhere: bool = False) -> None:
    from ditbake.plugins import linear_8bit as l8
    from ditbake.plugins import mixed_linear as ml
    from ditbake.plugins.int8 import quantize_weight_per_channel

    small = m <= 1024
    n_sets = max(1, math.ceil(L2_MISS_BYTES / (n * k * 2))) if small else 1
    sets = make_weights(n, k, min(n_sets, 48))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q8 = {fmt: [quantize_weight_per_channel(s["w_bf16"].float(), fmt) for s in sets] for fmt in ("int8", "fp8")}
    gs1 = [s["global_scale"].reshape(1) for s in sets]

    def timed(make_call):
        if small:
            return median_ms_graph(make_call, len(sets))
        if graphs_everywhere:  # large M too: no Python launch overhead in the numbers
            return median_ms_graph(make_call, 1, calls=4, repeats=10)
        return median_ms_do_bench(make_call(0))

    variants = {
        "bf16_torch": lambda i: (lambda: torch.mm(x, sets[i]["w_bf16"].t())),
        "w4a16": lambda i: (lambda: ml.mixed_linear(x, sets[i]["packed"], sets[i]["block_scales"], sets[i]["global_scale"], None, "bf16", False)),
        "w4a16_fused_kernel": lambda i: (lambda: ml.w4a16_gemm(x, sets[i]["packed"], sets[i]["block_scales"], gs1[i], None, fused=True)),
        "w4a16_fused_kernel_join": lambda i: (lambda: ml.w4a16_gemm(x, sets[i]["packed"], sets[i]["block_scales"], gs1[i], None, fused=True, gather=False)),
        "w4a16_dequant_cublas": lambda i: (lambda: ml.w4a16_gemm(x, sets[i]["packed"], sets[i]["block_scales"], gs1[i], None, fused=False)),
        "w4a8_int8_had": lambda i: (lambda: ml.mixed_linear(x, sets[i]["packed"], sets[i]["block_scales"], sets[i]["global_scale"], None, "int8", True)),
        "w4a8_fp8_had": lambda i: (lambda: ml.mixed_linear(x, sets[i]["packed"], sets[i]["block_scales"], sets[i]["global_scale"], None, "fp8", True)),
        "w4a4_emulated_had": lambda i: (lambda: ml.mixed_linear(x, sets[i]["packed"], sets[i]["block_scales"], sets[i]["global_scale"], None, "nvfp4", True)),
        "w8a8_int8": lambda i: (lambda: l8.linear_w8a8(x, *q8["int8"][i], None, "int8", False)),
        "w8a8_fp8": lambda i: (lambda: l8.linear_w8a8(x, *q8["fp8"][i], None, "fp8", False)),
        "w8a8_int8_had": lambda i: (lambda: l8.linear_w8a8(x, *q8["int8"][i], None, "int8", True)),
    }
    key = f"M{m}_K{k}_N{n}"
    row = {}
    for name, make in variants.items():
        try:
            row[name] = timed(make)
        except Exception as exc:  # keep the other numbers if one variant fails to build
            log.error("%s %s failed: %s", key, name, str(exc).splitlines()[0][:300])
            row[name] = None
    # FP8 through cuBLAS instead of the Triton GEMM (chosen by measurement).
    l8.FP8_GEMM_BACKEND = "scaled_mm"
    try:
        row["w8a8_fp8_scaled_mm"] = timed(variants["w8a8_fp8"])
        row["w4a8_fp8_had_scaled_mm"] = timed(variants["w4a8_fp8_had"])
    except Exception as exc:
        log.error("%s scaled_mm failed: %s", key, str(exc).splitlines()[0][:300])
    finally:
        l8.FP8_GEMM_BACKEND = "triton"
    # Components at the large size (what the quantization costs).
    if not small:
        from ditbake.plugins.act_quant import act_quant

        def safe(name, fn):
            try:
                row[name] = median_ms_do_bench(fn)
            except Exception as exc:
                log.error("%s %s failed: %s", key, name, str(exc).splitlines()[0][:300])
                row[name] = None

        for fmt, had in (("int8", True), ("int8", False), ("fp8", True), ("nvfp4", True)):
            name = f"act_quant_{fmt}{'_had' if had else ''}"
            safe(name, lambda: act_quant(x, fmt, had))
            out_bytes = m * k * (0.5 + 1 / 16 if fmt == "nvfp4" else 1) + 4 * m
            if row[name]:
                row[name + "_gbps"] = (m * k * 2 + out_bytes) / (row[name] * 1e-3) / 1e9
        import ditbake.plugins.act_quant as aq

        aq.ROW_IN_REGISTERS = False
        safe("act_quant_int8_had_two_pass", lambda: act_quant(x, "int8", True))
        safe("act_quant_int8_two_pass", lambda: act_quant(x, "int8", False))
        aq.ROW_IN_REGISTERS = True
        s0 = sets[0]
        safe("weight_to_int8", lambda: ml.nvfp4_weight_to_8bit(s0["packed"], s0["block_scales"], gs1[0], "int8"))
        safe("weight_dequant_bf16", lambda: ml.dequantize_weight_bf16(s0["packed"], s0["block_scales"], gs1[0]))
        safe("weight_to_int8_join", lambda: ml.nvfp4_weight_to_8bit(s0["packed"], s0["block_scales"], gs1[0], "int8", False))
        safe("weight_dequant_bf16_join", lambda: ml.dequantize_weight_bf16(s0["packed"], s0["block_scales"], gs1[0], False))
        qx, sx, _ = act_quant(x, "int8", False)
        qf, sf, _ = act_quant(x, "fp8", False)
        safe("gemm_int8_only", lambda: l8.gemm_8bit(qx, sx, *q8["int8"][0], None, torch.bfloat16))
        safe("gemm_fp8_only", lambda: l8.gemm_8bit(qf, sf, *q8["fp8"][0], None, torch.bfloat16))
        safe("gemm_fp8_scaled_mm_only", lambda: torch._scaled_mm(qf, q8["fp8"][0][0].t(), scale_a=sf.reshape(-1, 1), scale_b=q8["fp8"][0][1].reshape(1, -1), out_dtype=torch.bfloat16))
        safe("int_mm_only", lambda: torch._int_mm(qx, q8["int8"][0][0].t()))
        for cfg_name, cfg in {
            "bm128_bn128_bk128_s4": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
            "bm256_bn128_bk128_s3": dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
        }.items():
            safe(f"gemm_fp8_{cfg_name}", lambda: l8.gemm_8bit(qf, sf, *q8["fp8"][0], None, torch.bfloat16, config=cfg))
            safe(f"gemm_int8_{cfg_name}", lambda: l8.gemm_8bit(qx, sx, *q8["int8"][0], None, torch.bfloat16, config=cfg))
    row["bf16_tflops"] = tflops(m, n, k, row["bf16_torch"]) if row.get("bf16_torch") else None
    results[key] = row


def ratio(results, m, name, reduce=statistics.geometric_mean, shapes=None):
    vals = []
    for k, n in shapes or SHAPES:
        row = results.get(f"M{m}_K{k}_N{n}", {})
        if row.get(name) and row.get("bf16_torch"):
            vals.append(row["bf16_torch"] / row[name])
    return reduce(vals) if vals else None


def best_of(results, m, names):
    scored = {nm: ratio(results, m, nm) for nm in names}
    scored = {k: v for k, v in scored.items() if v is not None}
    if not scored:
        return None, None
    best = max(scored, key=scored.get)
    return scored[best], best


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/linear_h100.json")
    parser.add_argument("--quick", action="store_true", help="one shape per M")
    parser.add_argument("--graphs", action="store_true",
                        help="time M=32760 ops by CUDA-graph replay too (eager do_bench numbers include "
                             "Python launch overhead of the multi-kernel ops)")
    parser.add_argument("--other-models", default="", help=f"comma list of {sorted(OTHER_MODELS)} to time too")
    args = parser.parse_args()
    torch.manual_seed(0)
    ceilings = measure_ceilings()
    log.info("ceilings: %s", {k: round(v, 1) for k, v in ceilings.items()})
    raw: dict = {}
    for m in (M_LARGE, M_SMALL):
        for k, n in (SHAPES[1:2] if args.quick else SHAPES):
            bench_shape(m, k, n, raw, args.graphs)
            log.info("M=%d K=%d N=%d %s", m, k, n, {a: (round(b, 4) if isinstance(b, float) else b) for a, b in raw[f"M{m}_K{k}_N{n}"].items()})
    per_model = {}
    for name in filter(None, args.other_models.split(",")):
        m, shapes = OTHER_MODELS[name]
        for k, n in shapes:
            bench_shape(m, k, n, raw, args.graphs)
            log.info("%s M=%d K=%d N=%d %s", name, m, k, n, raw[f"M{m}_K{k}_N{n}"])
        per_model[name] = {"M": m, "shapes": shapes, **{
            kernel: ratio(raw, m, kernel, shapes=shapes)
            for kernel in ("w4a16", "w4a8_int8_had", "w4a8_fp8_had", "w8a8_int8", "w8a8_fp8")}}
    w4a8, w4a8_best = best_of(raw, M_LARGE, ["w4a8_int8_had", "w4a8_fp8_had", "w4a8_fp8_had_scaled_mm"])
    int8_ratio = ratio(raw, M_LARGE, "w8a8_int8")
    copy_fracs = [raw[key][f"act_quant_int8_had_gbps"] / ceilings["copy_gbps"]
                  for key in raw if key.startswith(f"M{M_LARGE}_") and raw[key].get("act_quant_int8_had_gbps")]
    summary = {
        "nvfp4_linear.w4a16_vs_bf16_M32760": ratio(raw, M_LARGE, "w4a16"),
        "nvfp4_linear.w4a16_vs_bf16_M128": ratio(raw, M_SMALL, "w4a16"),
        "nvfp4_linear.w4a8_vs_bf16_M32760": w4a8,
        "nvfp4_linear.w4a8_best_variant": w4a8_best,
        "int8_linear.vs_bf16_M32760": int8_ratio,
        "fp8_linear.vs_bf16_M32760": best_of(raw, M_LARGE, ["w8a8_fp8", "w8a8_fp8_scaled_mm"])[0],
        "act_quant.fraction_of_copy_bandwidth": statistics.mean(copy_fracs) if copy_fracs else None,
    }
    result = {
        **summary,
        "notes": "ratios = bf16 time / kernel time, geometric mean over (K,N) in "
                 f"{SHAPES}; quantization (act quant, Hadamard, weight conversion) included in "
                 "w4a8/w8a8; act_quant fraction = int8+Hadamard pass bytes/s over copy bytes/s, M=32760",
        "ceilings": ceilings,
        "other_models_vs_bf16": per_model,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "times_ms": raw,
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamp(result), indent=2))
    print(f"{'key':44s} value")
    for key, val in summary.items():
        print(f"{key:44s} {val if not isinstance(val, float) else round(val, 3)}")
    print(f"{'variant (ms)':24s}" + "".join(f"{k:>22s}" for k in raw))
    names = sorted({n for row in raw.values() for n in row if not n.endswith("gbps")})
    for name in names:
        cells = "".join(f"{(raw[k].get(name) or float('nan')):22.4f}" if isinstance(raw[k].get(name), (float, type(None))) else f"{'':>22s}" for k in raw)
        print(f"{name:24s}{cells}")


if __name__ == "__main__":
    main()
