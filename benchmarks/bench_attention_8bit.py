"""8-bit attention (plugins/attention_8bit.py) on the GPU: SDPA bf16, head_attention bf16, and the 8-bit
kernel (launch-config sweep, both QK formats, both V layouts, prepare time, arrow bands), each with its
relative L2 error against fp32 attention.

    python3 benchmarks/bench_attention_8bit.py            # H100, writes $OUT/attention_8bit_h100.json
    python3 benchmarks/bench_attention_8bit.py --smoke    # CPU, TRITON_INTERPRET=1, tiny sizes (checks the script)

Inputs are random bf16, q/k "peaky" (a few outlier channels x10, a per-head key offset) so that the
quantization sees realistic trouble. q, k, v take 302 MB at Wan's shape and 208 MB at Flux's, well
over the 50 MB L2, so repeated calls on the same tensors do not flatter the prepare kernel. Timing:
triton.testing.do_bench (CUDA events, median). The sweep stops early, keeping what it has, when
--budget-s runs out, so that the JSON is always written.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must be set before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ditbake.plugins import attention_8bit as a8  # noqa: E402
from ditbake.plugins import head_attention as ha  # noqa: E402
from ditbake.plugins.head_attention import HeadScheme  # noqa: E402
from provenance import stamp  # benchmarks/ is the script's directory: commit + dirty flag in every JSON

logger = logging.getLogger("bench_attention_8bit")

MODELS = {  # name: (batch, heads, head_dim, text tokens (first), visual tokens)
    "wan2.1-1.3b": (1, 12, 128, 0, 32760),
    "flux-2048": (1, 24, 128, 512, 16384),
}
SMOKE_MODELS = {"wan-tiny": (1, 2, 64, 0, 200), "flux-tiny": (1, 2, 64, 32, 160)}
FORMATS = a8.QK_FORMATS


def sweep_grid(smoke: bool) -> list[dict]:
    """Stage 1 of the sweep: BLOCK_N at 8 warps, 3 stages, and one 4-warp point (stage 2 varies
    the stages of the best). 4 warps with BLOCK_M=128, D=128 spill ~2 KB of registers when compiled
    for sm_90 (benchmarks/compile_attention_8bit.py), so only one such config is timed."""
    if smoke:
        return [dict(BLOCK_M=32, BLOCK_N=n, num_warps=1, num_stages=1) for n in (32, 64)]
    return [dict(BLOCK_M=128, BLOCK_N=n, num_warps=8, num_stages=3) for n in (64, 128)] + \
        [dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)]


def stage_variants(cfg: dict, smoke: bool) -> list[dict]:
    return [] if smoke else [dict(cfg, num_stages=s) for s in (2, 4)]


class Bench:
    def __init__(self, smoke: bool, budget_s: float):
        self.smoke, self.deadline = smoke, time.monotonic() + budget_s

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def time_ms(self, fn) -> float:
        if self.smoke:  # interpreter: one wall-clock run (numbers mean nothing, the path is checked)
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def band_width_for_density(visual: int, density: float) -> int:
    """Smallest symmetric half-width whose band keeps at least ``density`` of the visual pairs."""
    lo, hi = 0, visual
    while lo < hi:
        mid = (lo + hi) // 2
        if ha._band_pairs(visual, mid, mid) >= density * visual * visual:
            hi = mid
        else:
            lo = mid + 1
    return lo


def peaky_inputs(batch, heads, seq_len, head_dim, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device=device, generator=gen) for _ in range(3))
    outliers = torch.randperm(head_dim, generator=torch.Generator().manual_seed(1))[:4].to(device)
    q[..., outliers] *= 10
    k[..., outliers] *= 10
    k += 3 * torch.randn(1, heads, 1, head_dim, device=device, generator=gen)
    return tuple(t.to(dtype) for t in (q, k, v))


def fp32_reference(q, k, v, table, text_range) -> torch.Tensor:
    """fp32 attention head by head (query chunks inside head_attention_ref keep memory bounded)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for h in range(q.shape[1]):
        out[:, h:h + 1] = ha.head_attention_ref(q[:, h:h + 1].float(), k[:, h:h + 1].float(), v[:, h:h + 1].float(),
                                                table[h:h + 1], text_range, query_chunk=2048)
    return out


def rel_err(out, ref) -> float:
    num = den = 0.0
    for h in range(ref.shape[1]):  # per head: no full-size fp32 temporaries
        num += (out[:, h].float() - ref[:, h]).pow(2).sum().item()
        den += ref[:, h].pow(2).sum().item()
    return (num / den) ** 0.5


def sdpa_backend(q, k, v) -> str:
    try:
        from torch.nn.attention import SDPBackend
        return SDPBackend(torch._fused_sdp_choice(q, k, v)).name
    except Exception as err:  # private API: report rather than fail
        return f"unknown ({type(err).__name__})"


def run_8bit(q, k, v, table, text_range, fmt, out, config=None, v_transposed=None):
    return a8.attention_8bit_triton(q, k, v, table, *text_range, None, None, fmt, out, config=config,
                                    v_transposed=v_transposed)


def bench_model(name, batch, heads, head_dim, text, visual, bench: Bench, phase: str = "essentials",
                res: dict | None = None) -> dict:
    """Phase "essentials": SDPA, head_attention, prepare, 8-bit with the default config, bands.
    Phase "sweep" (adds rows to ``res``): launch configs and V layouts, while the budget lasts."""
    device = "cpu" if bench.smoke else "cuda"
    seq_len, text_range = text + visual, (0, text)
    # The interpreter has no bf16 dot (numpy multiplies the raw bits): fp32 in smoke mode.
    q, k, v = peaky_inputs(batch, heads, seq_len, head_dim, device, torch.float32 if bench.smoke else torch.bfloat16)
    dense = ha.schemes_to_tensor([HeadScheme.full()] * heads)
    flops_dense = ha.attention_flops(dense, text, visual, head_dim, batch)
    if res is None:
        res = {"shape": [batch, heads, seq_len, head_dim], "text_tokens": text, "gflop_dense": flops_dense / 1e9,
               "rows": []}
    ref_dense = fp32_reference(q, k, v, dense, text_range)
    dense_dev = dense.to(device)
    out = torch.empty_like(q)

    def row(label, ms, flops, err, **extra):
        entry = {"label": label, "ms": ms, "tflops": flops / ms / 1e9, "rel_err_vs_fp32": err, **extra}
        res["rows"].append(entry)
        logger.info("%s | %-40s %8.3f ms %6.0f TF/s err %.3e %s", name, label, ms, entry["tflops"], err,
                    extra or "")
        return entry

    if phase == "essentials":
        # SDPA bf16 (the yardstick) and ditbake's bf16 Triton kernel.
        res["sdpa_backend"] = sdpa_backend(q, k, v)
        sdpa_out = F.scaled_dot_product_attention(q, k, v)
        sdpa = row(f"sdpa bf16 ({res['sdpa_backend']})", bench.time_ms(lambda: F.scaled_dot_product_attention(q, k, v)),
                   flops_dense, rel_err(sdpa_out, ref_dense))
        ha_cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=1, num_stages=1) if bench.smoke else None
        ha.launch_head_attention(q, k, v, dense_dev, *text_range, None, None, out, ha_cfg)
        row("head_attention bf16 dense", bench.time_ms(
            lambda: ha.launch_head_attention(q, k, v, dense_dev, *text_range, None, None, out, ha_cfg)),
            flops_dense, rel_err(out, ref_dense))

        # The prepare kernels alone, per format.
        for fmt in FORMATS:
            ms = bench.time_ms(lambda: a8.prepare_8bit(q, k, v, None, fmt))
            res[f"prepare_ms_{fmt}"] = ms
            logger.info("%s | prepare %s: %.3f ms", name, fmt, ms)

        # Essentials first (default launch config), so that a spent budget only shortens the sweep.
        default_cfg = dict(BLOCK_M=32, BLOCK_N=64, num_warps=1, num_stages=1) if bench.smoke \
            else dict(a8.KERNEL_CONFIGS[head_dim])
        totals = {}
        for fmt in FORMATS:
            run_8bit(q, k, v, dense_dev, text_range, fmt, out, default_cfg)
            err = rel_err(out, ref_dense)
            ms = bench.time_ms(lambda: run_8bit(q, k, v, dense_dev, text_range, fmt, out, default_cfg))
            totals[fmt] = row(f"8bit {fmt} dense total (prepare+attn) {cfg_label(default_cfg)}", ms, flops_dense, err,
                              config=default_cfg, qk_format=fmt, speedup_vs_sdpa=sdpa["ms"] / ms,
                              prepare_share=res[f"prepare_ms_{fmt}"] / ms)
        for density in (0.25, 0.5):
            width = band_width_for_density(visual, density)
            arrow = ha.schemes_to_tensor([HeadScheme.arrow(width, width)] * heads)
            flops = ha.attention_flops(arrow, text, visual, head_dim, batch)
            ref = fp32_reference(q, k, v, arrow, text_range)
            arrow_dev = arrow.to(device)
            ha.launch_head_attention(q, k, v, arrow_dev, *text_range, None, None, out, ha_cfg)
            bf16 = row(f"head_attention bf16 band {density:.0%}", bench.time_ms(
                lambda: ha.launch_head_attention(q, k, v, arrow_dev, *text_range, None, None, out, ha_cfg)),
                flops, rel_err(out, ref), band_half_width=width, density=flops / flops_dense)
            for fmt in FORMATS:
                run_8bit(q, k, v, arrow_dev, text_range, fmt, out, default_cfg)
                err = rel_err(out, ref)
                ms = bench.time_ms(lambda: run_8bit(q, k, v, arrow_dev, text_range, fmt, out, default_cfg))
                row(f"8bit {fmt} band {density:.0%} total {cfg_label(default_cfg)}", ms, flops, err, qk_format=fmt,
                    band_half_width=width, density=flops / flops_dense, speedup_vs_sdpa=sdpa["ms"] / ms,
                    speedup_vs_bf16_band=bf16["ms"] / ms,
                    efficiency_vs_dense=totals[fmt]["ms"] * flops / flops_dense / ms)
            del ref
    else:
        sdpa = res["rows"][0]  # the SDPA row, from the essentials phase
        # Sweep the attention kernel alone on prepared buffers (dense), then the V layout of the best.
        for fmt in FORMATS:
            qz = a8.prepare_8bit(q, k, v, None, fmt)
            tried = []

            def try_config(cfg, qz=qz, fmt=fmt, tried=tried):
                if bench.out_of_time():
                    logger.warning("%s: time budget spent, skipping %s %s", name, fmt, cfg)
                    return
                try:
                    a8.launch_attention_8bit(qz, dense_dev, seq_len, *text_range, None, out, cfg)
                    err = rel_err(out, ref_dense)
                    ms = bench.time_ms(
                        lambda: a8.launch_attention_8bit(qz, dense_dev, seq_len, *text_range, None, out, cfg))
                except Exception as exc:  # a config may not fit shared memory / registers
                    logger.warning("%s: %s config %s failed: %s", name, fmt, cfg, str(exc).splitlines()[0][:200])
                    return
                tried.append(row(f"8bit {fmt} dense attn-only {cfg_label(cfg)}", ms, flops_dense, err, config=cfg,
                                 qk_format=fmt))

            for cfg in sweep_grid(bench.smoke):
                try_config(cfg)
            if tried:
                for cfg in stage_variants(min(tried, key=lambda r: r["ms"])["config"], bench.smoke):
                    try_config(cfg)
            del qz
            if not tried:
                continue
            cfg = min(tried, key=lambda r: r["ms"])["config"]
            res[f"best_config_{fmt}"] = cfg
            for v_t in (True, False):  # whole call with the best config, V stored [D, S] or [S, D]
                if bench.out_of_time():
                    break
                try:
                    run_8bit(q, k, v, dense_dev, text_range, fmt, out, cfg, v_t)
                    err = rel_err(out, ref_dense)
                    ms = bench.time_ms(lambda: run_8bit(q, k, v, dense_dev, text_range, fmt, out, cfg, v_t))
                    row(f"8bit {fmt} dense total v_transposed={v_t} {cfg_label(cfg)}", ms, flops_dense, err,
                        config=cfg, qk_format=fmt, v_transposed=v_t, speedup_vs_sdpa=sdpa["ms"] / ms)
                except Exception as exc:
                    logger.warning("%s: %s v_transposed=%s failed: %s", name, fmt, v_t, str(exc).splitlines()[0][:200])
    return res


def cfg_label(cfg: dict) -> str:
    return f"M{cfg['BLOCK_M']} N{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"


def print_table(results: dict) -> None:
    print(f"{'model':<14} | {'variant':<60} | {'ms':>8} | {'TF/s':>6} | {'rel err':>9}")
    for name, res in results.items():
        for r in res["rows"]:
            print(f"{name:<14} | {r['label']:<60} | {r['ms']:8.3f} | {r['tflops']:6.0f} | {r['rel_err_vs_fp32']:9.3e}")
        for fmt in FORMATS:
            if f"prepare_ms_{fmt}" in res:
                print(f"{name:<14} | {'prepare ' + fmt:<60} | {res[f'prepare_ms_{fmt}']:8.3f} |")


def default_out(smoke: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "attention_8bit_h100.json"
    return Path(tempfile.gettempdir()) / "attention_8bit_smoke.json" if smoke \
        else Path("benchmarks/results/attention_8bit_h100.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="start no sweep config after this many seconds (the essentials always run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    models = SMOKE_MODELS if args.smoke else MODELS
    names = args.models.split(",") if args.models else list(models)
    for n in names:
        if n not in models:
            logger.error("unknown model %r; choose from %s", n, ", ".join(models))
            return 2
    if not args.smoke and not torch.cuda.is_available():
        logger.error("needs a CUDA GPU (or --smoke)")
        return 2
    bench = Bench(args.smoke, float("inf") if args.smoke else args.budget_s)
    results = {}
    # Essentials of every model first; the sweep (many compiles) gets what is left of the budget.
    with contextlib.ExitStack() as stack:
        if args.smoke:
            from ditbake.plugins.triton_interpreter_fixes import exact_interpreter
            stack.enter_context(exact_interpreter())
        for n in names:
            results[n] = bench_model(n, *models[n], bench, "essentials")
            if not args.smoke:
                torch.cuda.empty_cache()
        for n in names:
            if bench.out_of_time():
                logger.warning("time budget spent: no sweep for %s", n)
                continue
            bench_model(n, *models[n], bench, "sweep", results[n])
            if not args.smoke:
                torch.cuda.empty_cache()
    import triton
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu (smoke)",
        "torch": torch.__version__, "triton": triton.__version__,
        "timing": "triton.testing.do_bench median (warmup 25 ms, rep 100 ms); peaky random bf16 inputs",
        "error": "relative L2 vs fp32 attention with the same masks",
        "kernel_defaults": {str(d): c for d, c in a8.KERNEL_CONFIGS.items()}, "v_transposed_default": a8.V_TRANSPOSED,
        "models": results,
    }
    out = args.out or default_out(args.smoke)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamp(report), indent=2))
    print_table(results)
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
