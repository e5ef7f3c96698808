"""Head-wise arrow attention on the GPU: our Triton kernel vs SDPA (dense) and FlexAttention (sparse).

Sizes are the real ones (random bf16 data): Wan2.1-1.3B self-attention, CogVideoX-2B joint attention
at 480x720x49, Flux at 2048^2. "75% sparsity" means the visual-visual part of every head keeps 25%
of its pairs (a symmetric band whose width is solved for exactly that, edge clipping included).

    python3 benchmarks/bench_attention.py --out benchmarks/results/attention_h100.json [--sweep]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ditbake.plugins import head_attention as ha
from ditbake.plugins.head_attention import HeadScheme
from provenance import stamp  # benchmarks/ is the script's directory: commit + dirty flag in every JSON

logger = logging.getLogger("bench_attention")

MODELS = {  # name: (batch, heads, head_dim, text tokens (placed first), visual tokens)
    "wan2.1-1.3b": (1, 12, 128, 0, 32760),
    "cogvideox-2b": (1, 30, 64, 226, 13 * 30 * 45),
    "flux-2048": (1, 24, 128, 512, 128 * 128),
}
HEADLINE_MODEL = "wan2.1-1.3b"
SWEEP_CONFIGS = {  # candidates around the defaults in KERNEL_CONFIGS (first = the default)
    128: [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3), dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
          dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3), dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4),
          dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)],
    64: [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3), dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4),
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3), dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)],
}


def time_ms(fn, warmup: int, reps: int) -> float:
    """Median of CUDA-event timings after warm-up (the runtime's own timer: one definition)."""
    from ditbake.runtime.attention import median_cuda_ms

    return median_cuda_ms(fn, warmup, reps)


def do_bench_ms(fn, rep: int = 100) -> float:
    """triton.testing.do_bench's median (CUDA events, 25 ms warm-up, L2 flushed between runs)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def copy_ms(gbytes: float) -> float:
    """A device-to-device copy moving ``gbytes`` GB (half read, half written): the memory roofline of a
    kernel with the same traffic."""
    src = torch.empty(int(gbytes * 1e9) // 4, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return do_bench_ms(lambda: dst.copy_(src))


def kernel_us(fn, calls: int) -> dict:
    """Device time per call of each kernel ``fn`` launches, microseconds (torch.profiler over ``calls``)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key: getattr(e, "device_time_total", 0.0) / calls for e in prof.key_averages()
            if getattr(e, "device_time_total", 0.0) > 0}


def device_ms(fn, calls: int = 20) -> float:
    """Device time per call of all the kernels ``fn`` launches, ms, over ``calls`` calls back to back as a
    forward runs them (the profiler). do_bench's median (L2 flushed, events around each launch) read 2-5x this
    for the same launches on the H200 in session 11, and moved by 2x between repeats of one launch."""
    return sum(kernel_us(fn, calls).values()) / 1e3


def band_width_for_density(visual: int, density: float) -> int:
    """Smallest symmetric half-width w whose band keeps at least ``density`` of the visual pairs."""
    target = density * visual * visual
    lo, hi = 0, visual
    while lo < hi:
        mid = (lo + hi) // 2
        if ha._band_pairs(visual, mid, mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def relative_error(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_model(name, batch, heads, head_dim, text, visual, args) -> dict:
    seq_len = text + visual
    text_range = (0, text)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    width = band_width_for_density(visual, 0.25)
    dense = ha.schemes_to_tensor([HeadScheme.full()] * heads)
    arrow = ha.schemes_to_tensor([HeadScheme.arrow(width, width)] * heads)
    dense_dev, arrow_dev = dense.cuda(), arrow.cuda()
    flops_dense = ha.attention_flops(dense, text, visual, head_dim, batch)
    flops_arrow = ha.attention_flops(arrow, text, visual, head_dim, batch)
    res = {"batch": batch, "heads": heads, "head_dim": head_dim, "text_tokens": text, "visual_tokens": visual,
           "band_half_width": width, "density_at_75pct": flops_arrow / flops_dense,
           "gflop_dense": flops_dense / 1e9, "gflop_75pct": flops_arrow / 1e9}
    bench = lambda fn: time_ms(fn, args.warmup, args.reps)  # noqa: E731

    # SDPA dense: the library's pick, and each fast backend alone; the best is the yardstick.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = {"default": bench(lambda: F.scaled_dot_product_attention(q, k, v))}
    for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                sdpa[label] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        except RuntimeError as err:  # backend unavailable for this shape/build
            logger.info("%s: SDPA %s unavailable: %s", name, label, str(err).splitlines()[0])
    res["sdpa_ms"] = sdpa

    op = torch.ops.ditbake.head_attention
    ref_dense = F.scaled_dot_product_attention(q, k, v)
    out = op(q, k, v, dense_dev, *text_range)
    res["ours_dense_rel_err_vs_sdpa"] = relative_error(out, ref_dense)
    # Timed --repeat times, alternating, to show the run-to-run spread; the median of the runs is reported.
    runs = {"sdpa": [sdpa["default"]], "dense": [], "arrow": []}
    for _ in range(args.repeat):
        runs["sdpa"].append(bench(lambda: F.scaled_dot_product_attention(q, k, v)))
        runs["dense"].append(bench(lambda: op(q, k, v, dense_dev, *text_range)))
        runs["arrow"].append(bench(lambda: op(q, k, v, arrow_dev, *text_range)))
    res["runs_ms"] = runs
    sdpa["default"] = statistics.median(runs["sdpa"])
    res["sdpa_best_ms"] = min(sdpa.values())
    res["ours_dense_ms"] = statistics.median(runs["dense"])
    res["ours_75pct_ms"] = statistics.median(runs["arrow"])

    # A realistic layer: a third of the heads each full, arrow at 75%, cached -- still one launch.
    mixed = ha.schemes_to_tensor([[HeadScheme.full(), HeadScheme.arrow(width, width), HeadScheme.cached()][h % 3]
                                  for h in range(heads)]).cuda()
    cache = torch.randn_like(q)
    res["ours_mixed_ms"] = bench(lambda: op(q, k, v, mixed, *text_range, cache))
    res["mixed_predicted_ms"] = (res["ours_dense_ms"] * ((heads + 2) // 3) / heads
                                 + res["ours_75pct_ms"] * ((heads + 1) // 3) / heads)

    if args.sweep:
        sweep = []
        for cfg in SWEEP_CONFIGS[head_dim]:
            o = torch.empty_like(q)
            try:
                t_dense = bench(lambda: ha.launch_head_attention(q, k, v, dense_dev, *text_range, None, None, o, cfg))
                t_arrow = bench(lambda: ha.launch_head_attention(q, k, v, arrow_dev, *text_range, None, None, o, cfg))
            except Exception as err:  # a config may not fit shared memory
                logger.info("%s: config %s failed: %s", name, cfg, str(err).splitlines()[0])
                continue
            sweep.append({"config": cfg, "dense_ms": t_dense, "75pct_ms": t_arrow})
            logger.info("%s sweep %s: dense %.3f ms, 75%% %.3f ms", name, cfg, t_dense, t_arrow)
        res["sweep"] = sweep

    # FlexAttention, compiled, with the same block mask.
    try:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        block_mask = ha.flex_block_mask(arrow, batch, seq_len, text_range, device="cuda")
        flex_out = flex(q, k, v, block_mask=block_mask)
        ours_out = op(q, k, v, arrow_dev, *text_range)
        res["ours_75pct_rel_err_vs_flex"] = relative_error(ours_out, flex_out)
        res["flex_75pct_ms"] = bench(lambda: flex(q, k, v, block_mask=block_mask))
    except Exception as err:  # keep the rest of the table if flex fails on this build
        logger.warning("%s: FlexAttention failed: %s", name, str(err).splitlines()[0])
        res["flex_75pct_ms"] = None

    res["tflops_sdpa"] = flops_dense / res["sdpa_best_ms"] / 1e9
    res["tflops_ours_dense"] = flops_dense / res["ours_dense_ms"] / 1e9
    res["tflops_ours_75pct"] = flops_arrow / res["ours_75pct_ms"] / 1e9
    res["dense_vs_sdpa"] = res["sdpa_best_ms"] / res["ours_dense_ms"]
    res["efficiency_at_75pct"] = res["ours_dense_ms"] * 0.25 / res["ours_75pct_ms"]
    res["efficiency_at_75pct_vs_sdpa"] = res["sdpa_best_ms"] * 0.25 / res["ours_75pct_ms"]
    if res["flex_75pct_ms"]:
        res["tflops_flex_75pct"] = flops_arrow / res["flex_75pct_ms"] / 1e9
        res["vs_flex_at_75pct"] = res["flex_75pct_ms"] / res["ours_75pct_ms"]
    del q, k, v
    torch.cuda.empty_cache()
    return res


def print_table(results: dict) -> None:
    cols = ["model", "SDPA ms", "TF/s", "ours dense", "TF/s", "ours 75%", "TF/s", "flex 75%",
            "dense/SDPA", "eff@75", "vs flex", "mixed ms", "(pred)"]
    print(" | ".join(f"{c:>11}" for c in cols))
    for name, r in results.items():
        flex = r.get("flex_75pct_ms")
        row = [name, f"{r['sdpa_best_ms']:.3f}", f"{r['tflops_sdpa']:.0f}", f"{r['ours_dense_ms']:.3f}",
               f"{r['tflops_ours_dense']:.0f}", f"{r['ours_75pct_ms']:.3f}", f"{r['tflops_ours_75pct']:.0f}",
               f"{flex:.3f}" if flex else "n/a", f"{r['dense_vs_sdpa']:.2f}", f"{r['efficiency_at_75pct']:.2f}",
               f"{r['vs_flex_at_75pct']:.2f}" if flex else "n/a", f"{r['ours_mixed_ms']:.3f}",
               f"{r['mixed_predicted_ms']:.3f}"]
        print(" | ".join(f"{c:>11}" for c in row))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/attention_h100.json")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--sweep", action="store_true", help="also time the kernel's candidate launch configs")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=2, help="independent timing runs per measurement")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        logger.error("needs a CUDA GPU")
        return 2
    torch.manual_seed(0)
    results = {}
    for name in args.models.split(","):
        if name not in MODELS:
            logger.error("unknown model %r; choose from %s", name, ", ".join(MODELS))
            return 2
        results[name] = bench_model(name, *MODELS[name], args)
        logger.info("%s: %s", name, json.dumps({k: v for k, v in results[name].items() if k != "sweep"}))
    head = results.get(HEADLINE_MODEL) or next(iter(results.values()))
    import triton
    report = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "timing": f"median of {args.reps} CUDA-event timings after {args.warmup} warm-ups, repeated {args.repeat}x, bf16, random data",
        "arrow_attention": {
            "headline_model": HEADLINE_MODEL if HEADLINE_MODEL in results else next(iter(results)),
            "dense_vs_sdpa": head["dense_vs_sdpa"],
            "efficiency_at_75pct": head["efficiency_at_75pct"],
            "vs_flex_at_75pct": head.get("vs_flex_at_75pct"),
        },
        "models": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamp(report), indent=2))
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
