"""Does the dense INT8 attention op run as fast inside compiled code as eagerly? ``ditbake::attention_8bit_dense``
at Wan2.1-1.3B's 1 x 12 x 32,760 x 128 (q, k contiguous, v a [B, S, H, D] view, as the forward passes them):
eager, under torch.compile, and in an AOTInductor package (how the aoti engines ship it), each with the
device time per kernel from torch.profiler.

    python3 benchmarks/bench_attention_8bit_compiled.py     # GPU, writes $OUT/attention_8bit_compiled.json

Why: the forward race's profile put the kernel at 9.4 ms per layer inside the aoti engine against
8.3-8.8 ms in the kernel benchmark; this separates the engine's compilation from the forward's context.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from bench_attention import do_bench_ms, kernel_us  # benchmarks/ is the script's directory
from ditbake.plugins import attention_8bit_dense as dense  # registers ditbake::attention_8bit_dense
from ditbake.plugins.native_loading import promote_libstdcxx
from provenance import stamp

logger = logging.getLogger("bench_attention_8bit_compiled")
SHAPE = (1, 12, 32760, 128)


class Layer(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.ops.ditbake.attention_8bit_dense(q, k, v, None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "attention_8bit_compiled.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    promote_libstdcxx()  # before loading a package, as the runtime does
    dense.install_allocator()  # as bench_attention_8bit_dense does
    batch, heads, seq, dim = SHAPE
    q, k = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    layer = Layer()
    results = {"what": __doc__.splitlines()[0], "device": torch.cuda.get_device_name(), "shape": list(SHAPE), "rows": {}}
    with torch.no_grad():
        want = layer(q, k, v)
        compiled = torch.compile(layer, fullgraph=True)
        with tempfile.TemporaryDirectory() as tmp:
            ep = torch.export.export(layer, (q, k, v))
            package = torch._inductor.aoti_load_package(
                torch._inductor.aoti_compile_and_package(ep, package_path=str(Path(tmp) / "dense.pt2")))
            for name, fn in (("eager", layer), ("torch.compile", compiled), ("aoti package", package)):
                out = fn(q, k, v)
                row = {"bitwise_equal_to_eager": bool(torch.equal(out, want)),
                       "ms": do_bench_ms(lambda fn=fn: fn(q, k, v), rep=200),
                       "kernel_us": {name[:80]: us for name, us in kernel_us(lambda fn=fn: fn(q, k, v), calls=10).items()}}
                results["rows"][name] = row
                logger.info("%s %s", name, row)
    args.out.write_text(json.dumps(stamp(results), indent=1))
    print(f"{'':14} {'ms':>7}  bit-equal  kernels (us per call)")
    for name, row in results["rows"].items():
        kernels = ", ".join(f"{k.split('(')[0][:40]} {t:.0f}" for k, t in sorted(row["kernel_us"].items(), key=lambda kv: -kv[1])[:4])
        print(f"{name:14} {row['ms']:7.3f}  {str(row['bitwise_equal_to_eager']):9}  {kernels}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
