"""FP8 W8A8 linears as compiled engines see them: producer (modulated layer norm, or GELU) +
per-token activation quantization + cuBLASLt FP8 GEMM, compiled by Inductor, vs the same producer
+ bf16 linear, at Wan2.1-1.3B's shapes (M = 32,760 tokens). The quantization is written in torch
ops (plugins/linear_fp8.py) so that Inductor fuses it into the producer: the ratio includes it.

    python benchmarks/bench_linear_fp8.py --out $OUT/linear_fp8_h100.json
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_attention import time_ms  # benchmarks/ is the script's directory
from bench_linear import median_ms_graph
from forward_race import kernel_profile
from provenance import stamp  # benchmarks/ is the script's directory: commit + dirty flag in every JSON

SHAPES = {"attn1.to_q (1536→1536)": (1536, 1536, "norm"), "ffn.net.0.proj (1536→8960)": (1536, 8960, "norm"),
          "ffn.net.2 (8960→1536)": (8960, 1536, "gelu")}


def graph_ms(fn) -> float:
    """Per-call ms of ``fn`` replayed from a CUDA graph of 10 calls (no host launch gaps, as the runtime's
    step graph runs)."""
    return median_ms_graph(lambda i: fn, 1, calls=10, repeats=20)


def producer(kind: str, x, scale, shift):
    if kind == "norm":
        return (F.layer_norm(x.float(), (x.shape[-1],)) * (1 + scale) + shift).to(x.dtype)
    return F.gelu(x, approximate="tanh")


# INT8 GEMM tiles to try on this GPU (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the first
# is plugins/linear_8bit._gemm_config's large-M choice (measured best of three on the H100 in 2026-11)
INT8_CONFIGS = ((128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 3), (128, 128, 128, 4, 4),
                (128, 256, 64, 8, 4), (128, 128, 128, 8, 4), (256, 128, 64, 8, 4))


def static(fn):
    """torch.compile with static shapes: the shapes of this bench change between layers, and dynamo's
    automatic dynamic shapes then compiled later layers for symbolic sizes — user Triton kernels lost
    their size specialization and ran 16-20x slower (benchmarks/diagnose_int8_gemm.py). The
    engines are exported at fixed shapes, as here."""
    return torch.compile(fn, dynamic=False)


def producer_sweep(kind: str, x, scale, shift) -> dict:
    """The producer kernel alone (FP8 codes) per launch setting: name → median ms (eager calls,
    back to back, so launch overhead hides behind the kernels)."""
    from ditbake.plugins import producer_quant as pq

    if kind == "norm":
        settings = [dict(NORM_ROWS=r, NORM_WARPS=w) for r in (1, 2, 4) for w in (1, 2, 4, 8)]
        call = lambda: pq.norm_quant(x[None], 1 + scale, shift, 1e-5, "fp8")  # noqa: E731
    else:
        settings = [dict(GELU_TWO_PASS=True, GELU_ROWS=r, GELU_WARPS=w, _GELU_CHUNK=c)
                    for r in (1, 2, 4, 8) for w in (4, 8) for c in (512, 1024, 2048) if r * c <= 8192]
        call = lambda: pq.gelu_quant(x, "fp8")  # noqa: E731
    times = {}
    for setting in settings:
        saved = {k: getattr(pq, k) for k in setting}
        for k, v in setting.items():
            setattr(pq, k, v)
        try:
            times[" ".join(f"{k}={v}" for k, v in setting.items())] = time_ms(call, 3, 20)
        except Exception as exc:  # e.g. too many registers: recorded, the others go on
            times[str(setting)] = f"{type(exc).__name__}: {str(exc)[:100]}"
        finally:
            for k, v in saved.items():
                setattr(pq, k, v)
    return times


def int8_gemm_sweep(tokens: int, k: int, n: int) -> dict:
    """The INT8 GEMM alone (ditbake's Triton kernel) per tile config: name → median ms."""
    from ditbake.plugins.linear_8bit import gemm_8bit

    qx = torch.randint(-127, 128, (tokens, k), device="cuda", dtype=torch.int8)
    qw = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    sx, sw = torch.rand(tokens, device="cuda") * 1e-3, torch.rand(n, device="cuda") * 1e-3
    times = {}
    for bm, bn, bk, warps, stages in INT8_CONFIGS:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
        name = f"{bm}x{bn}x{bk} w{warps} s{stages}"
        try:
            times[name] = time_ms(lambda: gemm_8bit(qx, sx, qw, sw, None, torch.bfloat16, cfg), 3, 20)
        except Exception as exc:  # e.g. out of shared memory: recorded, the others go on
            times[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return times


@torch.no_grad()
def mlp_row(tokens: int, dev, dim: int = 1536, hidden: int = 8960) -> dict:
    """Wan's whole FFN as the runtime runs it with both projections INT8 (runtime.nn.gelu_tanh_mlp:
    on an sm90 GPU with the cutlass extra, the CUTLASS GEMM with the GELU + amax epilogue, amax_quant,
    the CUTLASS down projection; else the GELU-quantize kernel and the Triton GEMMs) against the bf16
    FFN, each compiled with its modulated layer norm: the per-layer ratio including every quantization."""
    from ditbake.plugins import gemm_w8a8_cutlass
    from ditbake.plugins.linear_int8 import quantize_weight_int8
    from ditbake.runtime.nn import gelu_tanh_mlp, normed_input

    x = torch.randn(1, tokens, dim, device=dev, dtype=torch.bfloat16)
    scale, shift = torch.randn(1, 1, dim, device=dev) * 0.1, torch.randn(1, 1, dim, device=dev) * 0.1
    w = {}
    for name, (n, k) in {"ffn.net.0.proj": (hidden, dim), "ffn.net.2": (dim, hidden)}.items():
        w[name + ".weight"] = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
        w[name + ".bias"] = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.1
        w[name + ".int8_weight"], w[name + ".int8_scale"] = quantize_weight_int8(w[name + ".weight"])
    int8_prec = {"ffn.net.0.proj": "int8", "ffn.net.2": "int8"}
    bf16 = static(lambda x: gelu_tanh_mlp(normed_input(x, 1 + scale, shift, 1e-6).float(), w, "ffn", {}))
    int8 = static(lambda x: gelu_tanh_mlp(normed_input(x, 1 + scale, shift, 1e-6), w, "ffn", int8_prec))
    ref = bf16(x).double()
    row = {"tokens": tokens, "dim": dim, "hidden": hidden, "cutlass": gemm_w8a8_cutlass.load_native(),
           "bf16_ms": time_ms(lambda: bf16(x), 5, 20), "int8_ms": time_ms(lambda: int8(x), 5, 20)}
    row["speedup_int8"] = row["bf16_ms"] / row["int8_ms"]
    row["rel_err_int8_vs_bf16"] = float((int8(x).double() - ref).norm() / ref.norm())
    row["kernels"] = {key: kernel_profile(lambda fn=fn: fn(x), reps=3)["top"] for key, fn in (("bf16", bf16), ("int8", int8))}
    print(f"ffn pair: bf16 {row['bf16_ms']:.3f} ms  int8 {row['int8_ms']:.3f} ms  ×{row['speedup_int8']:.2f}"
          f"  rel err {row['rel_err_int8_vs_bf16']:.1e}", flush=True)
    return row


@torch.no_grad()
def qkv_row(tokens: int, dev, dim: int = 1536) -> dict:
    """Wan's self-attention projections as the runtime runs them: one modulated layer norm feeds
    to_q, to_k and to_v (runtime.arch_wan.block), so with INT8 linears one norm_quant kernel writes the
    codes the three GEMMs read; vs the same three in bf16. Timed as compiled calls and replayed from a
    CUDA graph (the runtime's step graph): at 1536² a GEMM is ≈ 0.1 ms and host launches show."""
    from ditbake.plugins.linear_int8 import quantize_weight_int8
    from ditbake.runtime.nn import normed_input, quantizable_linear

    names = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
    x = torch.randn(1, tokens, dim, device=dev, dtype=torch.bfloat16)
    scale, shift = torch.randn(1, 1, dim, device=dev) * 0.1, torch.randn(1, 1, dim, device=dev) * 0.1
    w = {}
    for name in names:
        w[name + ".weight"] = torch.randn(dim, dim, device=dev, dtype=torch.bfloat16) / dim ** 0.5
        w[name + ".bias"] = torch.randn(dim, device=dev, dtype=torch.bfloat16) * 0.1
        w[name + ".int8_weight"], w[name + ".int8_scale"] = quantize_weight_int8(w[name + ".weight"])

    def projections(x, precision):
        inp = normed_input(x, 1 + scale, shift, 1e-6)  # a LinearInput, as in the block
        return [quantizable_linear(inp, w, n, precision) for n in names]

    bf16 = static(lambda x: projections(x, "bf16"))
    int8 = static(lambda x: projections(x, "int8"))
    row = {"tokens": tokens, "dim": dim, "linears": list(names),
           "bf16_ms": time_ms(lambda: bf16(x), 5, 20), "int8_ms": time_ms(lambda: int8(x), 5, 20),
           "bf16_graph_ms": graph_ms(lambda: bf16(x)), "int8_graph_ms": graph_ms(lambda: int8(x))}
    row["speedup_int8"] = row["bf16_ms"] / row["int8_ms"]
    row["speedup_int8_graph"] = row["bf16_graph_ms"] / row["int8_graph_ms"]
    ref = [F.linear(y.double(), w[n + ".weight"].double(), w[n + ".bias"].double())
           for y, n in zip([normed_input(x, 1 + scale, shift, 1e-6).float()] * 3, names)]
    row["rel_err_int8"] = max(float((a.double() - r).norm() / r.norm()) for a, r in zip(int8(x), ref))
    row["rel_err_bf16"] = max(float((a.double() - r).norm() / r.norm()) for a, r in zip(bf16(x), ref))
    row["kernels"] = {key: kernel_profile(lambda fn=fn: fn(x), reps=3)["top"] for key, fn in (("bf16", bf16), ("int8", int8))}
    print(f"q/k/v (one norm → 3 × {dim}²): bf16 {row['bf16_ms']:.3f} ms  int8 {row['int8_ms']:.3f} ms  "
          f"×{row['speedup_int8']:.2f}; CUDA graph: bf16 {row['bf16_graph_ms']:.3f}  int8 {row['int8_graph_ms']:.3f}"
          f"  ×{row['speedup_int8_graph']:.2f}  rel err {row['rel_err_int8']:.1e}", flush=True)
    return row


def main(argv=None) -> int:
    from ditbake.plugins.linear_fp8 import linear_fp8, quantize_weight_fp8
    from ditbake.plugins.linear_fp8 import gemm_fp8
    from ditbake.plugins.linear_int8 import linear_int8, quantize_weight_int8
    from ditbake.plugins.producer_quant import gelu_quant, norm_quant

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--sweep", action="store_true", help="also time the INT8 GEMM alone per tile config")
    p.add_argument("--sweep-producers", action="store_true", help="time the producer kernels per launch setting")
    p.add_argument("--profile", action="store_true", help="also record GPU time per kernel (torch.profiler)")
    p.add_argument("--only", help="regex over the layer names")
    args = p.parse_args(argv)
    dev, rows = torch.device("cuda"), {}
    for name, (k, n, kind) in SHAPES.items():
        if args.only and not re.search(args.only, name):
            continue
        x = torch.randn(args.tokens, k, device=dev, dtype=torch.bfloat16)
        scale, shift = torch.randn(1, k, device=dev) * 0.1, torch.randn(1, k, device=dev) * 0.1
        w, bias = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5, torch.randn(n, device=dev, dtype=torch.bfloat16)
        qw, sw = quantize_weight_fp8(w)
        bf16 = static(lambda x: F.linear(producer(kind, x, scale, shift), w, bias))
        fp8 = static(lambda x: linear_fp8(producer(kind, x, scale, shift), qw, sw, bias, fast_accum=False))
        ref = F.linear(producer(kind, x, scale, shift).double(), w.double(), bias.double())
        row = {"tokens": args.tokens, "k": k, "n": n, "producer": kind,
               "flops": 2 * args.tokens * k * n}
        row["bf16_ms"] = time_ms(lambda: bf16(x), 5, 20)
        row["fp8_ms"] = time_ms(lambda: fp8(x), 5, 20)
        row["fp8_unfused_ms"] = time_ms(lambda: linear_fp8(producer(kind, x, scale, shift), qw, sw, bias,
                                                           fast_accum=False), 5, 20)
        qi, si = quantize_weight_int8(w)
        fast = static(lambda x: linear_fp8(producer(kind, x, scale, shift), qw, sw, bias, fast_accum=True))
        int8 = static(lambda x: linear_int8(producer(kind, x, scale, shift), qi, si, bias))
        # the producer kernel writes the 8-bit codes itself (plugins/producer_quant.py), then the GEMM
        if kind == "norm":
            make = lambda x, fmt: norm_quant(x[None], 1 + scale, shift, 1e-5, fmt)  # noqa: E731
        else:
            make = lambda x, fmt: gelu_quant(x, fmt)  # noqa: E731
        fp8_kernel = static(lambda x: gemm_fp8(*make(x, "fp8"), qw, sw, bias, x.dtype, fast_accum=True))
        int8_kernel = static(lambda x: torch.ops.ditbake.gemm_w8a8(*make(x, "int8"), qi, si, bias, x.dtype))
        row["fp8_producer_kernel_ms"] = time_ms(lambda: fp8_kernel(x), 5, 20)
        row["int8_producer_kernel_ms"] = time_ms(lambda: int8_kernel(x), 5, 20)
        row["speedup_fp8_producer_kernel"] = row["bf16_ms"] / row["fp8_producer_kernel_ms"]
        row["speedup_int8_producer_kernel"] = row["bf16_ms"] / row["int8_producer_kernel_ms"]
        # replayed from a CUDA graph, as the runtime runs a step: no host launch gaps
        row["bf16_graph_ms"] = graph_ms(lambda: bf16(x))
        row["int8_producer_kernel_graph_ms"] = graph_ms(lambda: int8_kernel(x))
        row["speedup_int8_producer_kernel_graph"] = row["bf16_graph_ms"] / row["int8_producer_kernel_graph_ms"]
        row["fp8_fast_accum_ms"] = time_ms(lambda: fast(x), 5, 20)
        row["int8_ms"] = time_ms(lambda: int8(x), 5, 20)
        row["speedup"] = row["bf16_ms"] / row["fp8_ms"]
        row["speedup_fp8_fast_accum"] = row["bf16_ms"] / row["fp8_fast_accum_ms"]
        row["speedup_int8"] = row["bf16_ms"] / row["int8_ms"]
        for key, fn in (("bf16", bf16), ("fp8", fp8), ("fp8_fast_accum", fast), ("int8", int8),
                        ("fp8_producer_kernel", fp8_kernel), ("int8_producer_kernel", int8_kernel)):
            row[f"rel_err_{key}"] = float((fn(x).double() - ref).norm() / ref.norm())
        row["fp8_tflops"] = row["flops"] / row["fp8_ms"] / 1e9
        rows[name] = row
        print(f"{name:30s} bf16 {row['bf16_ms']:.3f} ms  fp8 {row['fp8_ms']:.3f} ms (unfused {row['fp8_unfused_ms']:.3f})"
              f"  ×{row['speedup']:.2f}  fast-accum ×{row['speedup_fp8_fast_accum']:.2f}  int8 ×{row['speedup_int8']:.2f}"
              f"  err bf16 {row['rel_err_bf16']:.1e} fp8 {row['rel_err_fp8']:.1e} fast {row['rel_err_fp8_fast_accum']:.1e}"
              f" int8 {row['rel_err_int8']:.1e} | producer kernels: fp8 ×{row['speedup_fp8_producer_kernel']:.2f}"
              f" int8 ×{row['speedup_int8_producer_kernel']:.2f} (CUDA graph ×{row['speedup_int8_producer_kernel_graph']:.2f})",
              flush=True)
        if args.sweep_producers:
            row["producer_launch_ms"] = producer_sweep(kind, x, scale, shift)
        if args.sweep:
            row["int8_gemm_configs_ms"] = int8_gemm_sweep(args.tokens, k, n)
        if args.profile:  # GPU time per kernel of one call of each variant: where the ratio goes
            row["kernels"] = {key: kernel_profile(lambda fn=fn: fn(x), reps=3)["top"] for key, fn in
                              (("bf16", bf16), ("fp8", fp8), ("fp8_fast_accum", fast), ("int8", int8),
                               ("fp8_producer_kernel", fp8_kernel), ("int8_producer_kernel", int8_kernel))}
    if not args.only or re.search(args.only, "qkv"):
        rows["attn1 q/k/v (one norm → three 1536² linears), INT8"] = qkv_row(args.tokens, dev)
    if not args.only or re.search(args.only, "mlp"):
        rows["ffn (norm → up → GELU → down), both INT8"] = mlp_row(args.tokens, dev)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
           "method": "median CUDA-event ms (bench_attention.time_ms); producer + linear compiled together by Inductor"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(stamp(out), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
