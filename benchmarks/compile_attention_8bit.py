"""Compile the 8-bit attention kernel for sm_90 without a GPU and report what ptxas made of it:
registers, spills, shared memory, and whether the dots became wgmma (Hopper tensor cores) and the
K/V loads 16-byte cp.async. A quick check of launch configs before spending GPU time.

    python3 benchmarks/compile_attention_8bit.py [--formats int8,fp8] [--configs 64:8:3,128:8:2]

Integer arguments are specialized as Triton does at launch for Wan's shape (pointers, strides,
seq_pad and a zero text range 16-divisible; seq_len = 32,760 not).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ditbake.plugins import attention_8bit as a8

COUNTS = {"wgmma": r"wgmma\.mma_async", "add.f32": r"add\.f32", "fma.f32": r"fma\.rn\.f32", "mma.sync": r"mma\.sync", "ex2": r"ex2\.approx",
          "cvt_e4m3x2": r"cvt\.rn\.satfinite\.e4m3x2", "i2f": r"cvt\.rn\.f32\.s32",
          "cp.async_16B": r"cp\.async\.cg\.shared\.global.*0x10", "ld.global.b8": r"ld\.global\.b8"}


def compile_kernel(qk_format: str, block_n: int, warps: int, stages: int, head_dim: int = 128) -> dict:
    fn = a8._attention_8bit_kernel
    names = list(fn.arg_names)
    qtype = "*i8" if qk_format == "int8" else "*fp8e4nv"
    sig = {"Q8": qtype, "K8": qtype, "V8": "*fp8e4nv", "QS": "*fp32", "KS": "*fp32", "VA": "*fp32", "VM": "*fp32",
           "C": "*bf16", "O": "*bf16", "SCHEMES": "*i32"}
    const = dict(HEAD_DIM=head_dim, BLOCK_M=128, BLOCK_N=block_n, BLOCK_Q=a8.QUANT_BLOCK_Q, BLOCK_K=a8.QUANT_BLOCK_K,
                 IS_INT8=qk_format == "int8", HAS_CACHE=False, stride_v8s=1)  # V stored [D, S]
    aligned = {"stride_v8h", "stride_v8d", "stride_cb", "stride_ch", "stride_cs", "stride_ob", "stride_oh",
               "stride_os", "seq_pad", "text_start", "text_end", "vis_start"}
    for n in names:
        sig.setdefault(n, "constexpr" if n in const else "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*") or n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    start = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    seconds = time.perf_counter() - start
    ptx = kernel.asm["ptx"]
    res = {"qk_format": qk_format, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages,
           "compile_s": round(seconds, 1), "shared_bytes": kernel.metadata.shared}
    res.update({name: len(re.findall(pattern, ptx)) for name, pattern in COUNTS.items()})
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        info = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", "k.ptx", "-o", "k.cubin"], cwd=tmp,
                              capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    res["registers"] = int(regs.group(1)) if regs else None
    res["spill_store_bytes"] = int(spills.group(1)) if spills else None
    res["fits_shared_228KB"] = kernel.metadata.shared <= 232448
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="int8,fp8")
    parser.add_argument("--configs", default="64:8:3,128:8:3,64:4:3,128:4:3",
                        help="BLOCK_N:num_warps:num_stages, comma-separated (BLOCK_M is 128)")
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args(argv)
    for fmt in args.formats.split(","):
        for cfg in args.configs.split(","):
            block_n, warps, stages = (int(x) for x in cfg.split(":"))
            print(json.dumps(compile_kernel(fmt, block_n, warps, stages, args.head_dim)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
