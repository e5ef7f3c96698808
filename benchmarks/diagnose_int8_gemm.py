"""Why the INT8 Triton GEMM (ditbake::gemm_w8a8) ran 16x slower under torch.compile at Wan's
ffn.net.2 shape (M = 32,760, K = 8,960, N = 1,536) than the same kernel called eagerly
(benchmarks/results/linear_8bit_profile_h200.json): times the op eagerly and compiled, with and
without bias, at both K, and writes Inductor's generated code for the compiled call.

    TORCH_LOGS=output_code python benchmarks/diagnose_int8_gemm.py --out $OUT/int8_gemm_diag.json 2> $OUT/code.log
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench_attention import time_ms  # benchmarks/ is the script's directory


def main(argv=None) -> int:
    import ditbake.plugins.linear_8bit  # noqa: F401 - registers ditbake::gemm_w8a8

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    rows = {}
    for k, n in ((8960, 1536), (1536, 8960)):
        qx = torch.randint(-127, 128, (32760, k), device="cuda", dtype=torch.int8)
        qw = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        sx, sw = torch.rand(32760, device="cuda") * 1e-3, torch.rand(n, device="cuda") * 1e-3
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        op = torch.ops.ditbake.gemm_w8a8
        for with_bias in (False, True):
            b = bias if with_bias else None
            eager = lambda: op(qx, sx, qw, sw, b, torch.bfloat16)  # noqa: E731
            compiled_args = torch.compile(lambda a, s: op(a, s, qw, sw, b, torch.bfloat16))
            compiled_all = torch.compile(lambda a, s, w, t: op(a, s, w, t, b, torch.bfloat16))
            key = f"K={k} N={n} bias={with_bias}"
            rows[key] = {"eager_ms": time_ms(eager, 3, 10),
                         "compiled_weight_constant_ms": time_ms(lambda: compiled_args(qx, sx), 3, 10),
                         "compiled_weight_input_ms": time_ms(lambda: compiled_all(qx, sx, qw, sw), 3, 10)}
            print(key, rows[key], flush=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
