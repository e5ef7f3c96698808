"""Is SageAttention 1.0.6 (pip-installable, Triton: INT8 QK per block, fp16 PV) faster than the attention a
diffusers + compile user already gets (torch SDPA: cuDNN / flash)? Issue 19 item 1 adds it to the peer
stack only if it is. Wan2.1-1.3B self-attention at 480×832×81: B=1, 12 heads, 32,760 tokens, d=128.

    python benchmarks/bench_sageattention.py --out $OUT/sageattention_h100.json

Median of CUDA-event timings after warm-up; error of each against an fp32 SDPA reference (relative L2).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics

import torch
import torch.nn.functional as F

from provenance import stamp  # benchmarks/ is the script's directory

log = logging.getLogger("bench_sageattention")


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, args.heads, args.tokens, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float()[:, :2], k.float()[:, :2], v.float()[:, :2])  # 2 heads: memory
    flops = 4 * args.heads * args.tokens ** 2 * args.head_dim
    rows = {}

    def row(name, fn):
        try:
            ms = timed(fn, args.reps)
            out = fn()
            err = float((out[:, :2].float() - ref).norm() / ref.norm())
            rows[name] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_l2_vs_fp32": err}
        except Exception as exc:  # noqa: BLE001 - one backend missing must not hide the others
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        log.info("%-28s %s", name, rows[name])

    row("torch SDPA (default)", lambda: F.scaled_dot_product_attention(q, k, v))
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        row(f"torch SDPA {backend.name}", run)
    try:
        from sageattention import sageattn
        row("SageAttention 1.0.6 sageattn", lambda: sageattn(q, k, v, tensor_layout="HND"))
    except ImportError as exc:
        rows["SageAttention 1.0.6 sageattn"] = {"error": f"not installed ({exc})"}
    out = {"what": __doc__.splitlines()[0], "shape": list(shape), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "reps": args.reps, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(stamp(out), f, indent=1)
    for name, r in rows.items():
        print(f"{name:32s} " + (f"{r['ms']:8.2f} ms {r['tflops']:7.1f} TFLOP/s  err {r['rel_l2_vs_fp32']:.2e}"
                                if "ms" in r else r["error"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
