"""Dense INT8 attention on the GPU: plugins/attention_8bit_dense.py (block-pointer or TMA loads, optional warp specialization)
against the plain 8-bit kernel (plugins/attention_8bit.py) and torch SDPA bf16 (cuDNN), at Wan2.1-1.3B's
1 x 12 x 32,760 x 128 and Flux's 1 x 24 x 16,896 x 128; launch-config sweep, each row with its
relative L2 error against fp32 attention (2 heads) and its difference from the plain kernel.

    python3 benchmarks/bench_attention_8bit_dense.py            # GPU, writes $OUT/attention_8bit_dense.json

Timing: the configs' profiled device time over 10 calls back to back (bench_attention.device_ms; do_bench's
median beside it), SDPA and the op by triton.testing.do_bench (CUDA events, median). Configs that fail to compile are recorded with
their error, so one call tells which Triton features lower on this GPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_attention import device_ms, do_bench_ms
from bench_attention_8bit import peaky_inputs, rel_err
from ditbake.plugins import attention_8bit as a8
from ditbake.plugins import attention_8bit_dense as dense
from provenance import stamp

logger = logging.getLogger("bench_attention_8bit_dense")

K_BLOCKS = (a8.QUANT_BLOCK_K,)  # keys per K scale: the specification's (a sweep may add others)
SHAPES = {"wan2.1-1.3b": (1, 12, 32760, 128), "flux-2048": (1, 24, 16896, 128)}


def configs() -> list[dict]:
    """The default (BLOCK_M 64, BLOCK_N 128, 4 warps, block-pointer loads) and its neighbours: stages,
    TMA descriptor loads, BLOCK_N 64, two warpgroups."""
    def c(m, n, w, s, loads="block_ptr", ws=False):
        return dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, LOADS=loads, WARP_SPECIALIZE=ws)
    # (128, 64, 8 warps): 205 registers, no spills (ptxas for sm_90a); 4 warps at BLOCK_M 128 spill 596 bytes
    return [c(64, 128, 4, 2), c(64, 128, 4, 3), c(64, 128, 4, 4), c(64, 128, 4, 2, "tma"), c(64, 64, 4, 3),
            c(64, 64, 4, 4), c(128, 128, 8, 2), c(128, 128, 8, 3), c(128, 64, 8, 2), c(128, 64, 8, 3)]


def label(cfg: dict) -> str:
    return (f"M{cfg['BLOCK_M']} N{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"
            f" {cfg['LOADS']}{' ws' if cfg['WARP_SPECIALIZE'] else ''}")


def bench_shape(name: str, shape: tuple, deadline: float) -> dict:
    batch, heads, seq, dim = shape
    flops = 4.0 * batch * heads * seq * seq * dim
    q, k, v = peaky_inputs(batch, heads, seq, dim, "cuda", torch.bfloat16)
    row = {"shape": list(shape), "gflop": flops / 1e9}
    ref = F.scaled_dot_product_attention(q[:, :2].float(), k[:, :2].float(), v[:, :2].float())
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    row["sdpa_bf16_ms"] = do_bench_ms(sdpa)
    row["sdpa_bf16_err"] = rel_err(sdpa()[:, :2], ref)
    schemes = torch.zeros(heads, 3, dtype=torch.int32, device="cuda")
    for k_block in K_BLOCKS:
        # the key-scale block is a module constant of the specification: patched for this pass only
        a8.QUANT_BLOCK_K = dense.QUANT_BLOCK_K = k_block
        part = row.setdefault(f"k_block_{k_block}", {})
        qz = a8.prepare_8bit(q, k, v, None, "int8")
        part["prepare_ms"] = do_bench_ms(lambda: a8.prepare_8bit(q, k, v, None, "int8"))
        plain = torch.empty_like(q)
        run_plain = lambda: a8.launch_attention_8bit(qz, schemes, seq, 0, 0, None, plain)  # noqa: E731
        part["plain_int8_ms"] = do_bench_ms(run_plain)
        run_plain()
        part["plain_int8_err"] = rel_err(plain[:, :2], ref)
        op_out = torch.ops.ditbake.attention_8bit_dense(q, k, v)
        part["op_ms"] = do_bench_ms(lambda: torch.ops.ditbake.attention_8bit_dense(q, k, v))
        part["op_err"] = rel_err(op_out[:, :2], ref)
        part["op_x_sdpa"] = row["sdpa_bf16_ms"] / part["op_ms"]
        part["configs"] = {}
        for cfg in configs():
            if k_block % cfg["BLOCK_N"]:
                continue
            if time.monotonic() > deadline:
                part["configs"]["(out of time)"] = {}
                break
            out = torch.full_like(q, float("nan"))
            entry = {}
            try:
                run = lambda: dense.launch_attention_8bit_dense(qz, seq, out, config=cfg)  # noqa: E731
                dense.launch_attention_8bit_dense(qz, seq, out, config=cfg, stats=entry)
                torch.cuda.synchronize()
                entry["err"] = rel_err(out[:, :2], ref)
                entry["vs_plain"] = rel_err(out, plain.float())
                entry["do_bench_ms"] = do_bench_ms(run)
                entry["ms"] = device_ms(run, 10)
                entry["tflops"] = flops / entry["ms"] / 1e9
                entry["x_sdpa"] = row["sdpa_bf16_ms"] / (entry["ms"] + part["prepare_ms"])
            except Exception as err:  # record which features do not lower here
                entry["error"] = f"{type(err).__name__}: {str(err)[:400]}"
            part["configs"][label(cfg)] = entry
            logger.info("%s k%d %s %s", name, k_block, label(cfg), entry)
    a8.QUANT_BLOCK_K = dense.QUANT_BLOCK_K = K_BLOCKS[0]
    return row  # the tensors go with this frame (empty_cache in main)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "attention_8bit_dense.json")
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dense.install_allocator()
    deadline = time.monotonic() + args.budget_s
    results = {"what": __doc__.splitlines()[0], "device": torch.cuda.get_device_name(), "shapes": {}}
    for name in args.shapes.split(","):
        results["shapes"][name] = bench_shape(name, SHAPES[name], deadline)
        torch.cuda.empty_cache()
        args.out.write_text(json.dumps(stamp(results), indent=1))
    for name, row in results["shapes"].items():
        print(f"\n{name}: SDPA bf16 {row['sdpa_bf16_ms']:.2f} ms (err {row['sdpa_bf16_err']:.2e})")
        for k_block in K_BLOCKS:
            part = row[f"k_block_{k_block}"]
            print(f"keys per K scale {k_block}: prepare {part['prepare_ms']:.2f} ms, plain int8 "
                  f"{part['plain_int8_ms']:.2f} (err {part['plain_int8_err']:.2e}); the op (prepare + dense) "
                  f"{part['op_ms']:.2f} ms = {part['op_x_sdpa']:.2f}x SDPA (err {part['op_err']:.2e})")
            print(f"{'config':24} {'ms':>7} {'TF/s':>6} {'x SDPA':>7} {'err':>9} {'vs plain':>9}")
            for key, e in part["configs"].items():
                if "ms" in e:
                    print(f"{key:24} {e['ms']:7.2f} {e['tflops']:6.0f} {e['x_sdpa']:7.2f} {e['err']:9.2e} "
                          f"{e['vs_plain']:9.2e} regs {e.get('n_regs')} spills {e.get('n_spills')} smem {e.get('shared')}")
                else:
                    print(f"{key:24} {e.get('error', '')[:150]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
