"""Several GPUs: one GPU vs CFG-parallel vs Ulysses 2-way, Wan2.1-1.3B architecture at 480×832×81.

Random bf16 weights (speed does not depend on their values), 32,760 visual tokens, text 512,
CFG 5 (two forwards per step), an uncompressed plan (every block computed, full attention, bf16
linears), the eager backend: the same plan and backend in every mode, so the ratios measure the
parallelism alone. Each mode runs in its own processes (single: one process on GPU 0; cfg and
ulysses: torchrun, one process per GPU, NCCL); after `--warmup` steps, one whole generate is
timed with CUDA events at step boundaries on rank 0 (the collectives keep the ranks in step).
Reported: median step time, total, their ratios to one GPU, and each mode's final latents vs
one GPU's (relative L2; bf16, so Ulysses' different reduction order shows at the 1e-3 level).

The artifact is assembled in memory (runtime types, random weights drawn on the GPU from a fixed
seed, the same on every rank; a plain flow-match Euler table): nothing is built or written, no
diffusers needed on the GPU image, and each process starts in seconds. NVLink multicast stays
off (NCCL_NVLS_ENABLE=0 etc. set for every process started here).

    python3 benchmarks/multi_gpu.py --out "$OUT/multi_gpu_h100.json"         # 2 GPUs, ~4 min
    python3 benchmarks/multi_gpu.py --gpus 4 --modes single,cfg+ulysses,ulysses --out ...   # 4 GPUs
    python3 benchmarks/multi_gpu.py --tiny --out /tmp/multi_gpu_tiny.json    # CPU, gloo: checks the script
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from block_race import LATENT, TEXT_LEN, WAN_1_3B as ONE_BLOCK  # benchmarks/ is the script's directory
from provenance import stamp  # benchmarks/ is the script's directory: commit + dirty flag in every JSON

log = logging.getLogger("multi_gpu")

WAN_1_3B = dict(ONE_BLOCK, num_layers=30)
TINY = dict(WAN_1_3B, num_attention_heads=4, attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=32,
            num_layers=2)
TINY_LATENT, TINY_TEXT = (16, 3, 8, 8), 8


def wan_weight_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every weight the runtime's Wan architecture reads, with diffusers' names and shapes."""
    d, f, t = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["text_dim"]
    patch = tuple(cfg["patch_size"])
    lin = lambda name, o, i: {name + ".weight": (o, i), name + ".bias": (o,)}  # noqa: E731
    shapes = {"patch_embedding.weight": (d, cfg["in_channels"], *patch), "patch_embedding.bias": (d,),
              **lin("condition_embedder.time_embedder.linear_1", d, cfg["freq_dim"]),
              **lin("condition_embedder.time_embedder.linear_2", d, d),
              **lin("condition_embedder.time_proj", 6 * d, d),
              **lin("condition_embedder.text_embedder.linear_1", d, t),
              **lin("condition_embedder.text_embedder.linear_2", d, d),
              "scale_shift_table": (1, 2, d),
              **lin("proj_out", cfg["out_channels"] * patch[0] * patch[1] * patch[2], d)}
    for b in range(cfg["num_layers"]):
        p = f"blocks.{b}."
        shapes[p + "scale_shift_table"] = (1, 6, d)
        for attn in ("attn1", "attn2"):
            for name in ("to_q", "to_k", "to_v", "to_out.0"):
                shapes.update(lin(f"{p}{attn}.{name}", d, d))
            shapes[f"{p}{attn}.norm_q.weight"] = shapes[f"{p}{attn}.norm_k.weight"] = (d,)
        shapes[p + "norm2.weight"] = shapes[p + "norm2.bias"] = (d,)
        shapes.update(lin(p + "ffn.net.0.proj", f, d))
        shapes.update(lin(p + "ffn.net.2", d, f))
    return shapes


def in_memory_artifact(cfg: dict, latent, text_len: int, steps: int, device, dtype):
    """An uncompressed eager artifact with random weights, assembled from the runtime's own types."""
    from ditbake.runtime.artifact import Artifact, Profile
    from ditbake.runtime.plan import BlockVariant, HeadScheme, Plan
    from ditbake.runtime.sampler import SamplerTable

    gen = torch.Generator(device=device).manual_seed(0)  # the same weights on every rank
    weights = {}
    for name, shape in wan_weight_shapes(cfg).items():
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight")):
            weights[name] = torch.ones(shape, device=device, dtype=dtype)
        else:
            weights[name] = (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype)
    layers = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
              "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
    heads = cfg["num_attention_heads"]
    variant = BlockVariant(precisions=tuple(sorted((layer, "bf16") for layer in layers)),
                           heads=(("attn1", tuple(HeadScheme() for _ in range(heads))),))
    blocks = cfg["num_layers"]
    plan = Plan("wan", blocks, layers, (("attn1", heads),), (variant,),
                tuple({"cond": (0,) * blocks, "uncond": (0,) * blocks} for _ in range(steps)))
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()  # flow-match Euler: x ← x + (σ_{i+1} − σ_i)·v
    table = SamplerTable("flow_euler", tuple(s * 1000 for s in sigmas[:-1]), 1.0, ((1.0,),) * steps,
                         tuple((sigmas[i + 1] - sigmas[i],) for i in range(steps)))
    manifest = {"model": {"architecture": "wan", "config": cfg, "label": "Wan2.1-1.3B (random weights)"},
                "backend": "eager", "default_sampler": "flow_euler"}
    return Artifact(Path("<in memory>"), manifest, plan, {"flow_euler": table}, (Profile("bench", latent, text_len),),
                    weights)


class StepTimer:
    """CUDA events at step boundaries, read once at the end; wall clock on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def wrap(self, steps):
        for i in steps:
            self.mark()
            yield i
        self.mark()

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


@torch.no_grad()
def worker(args) -> None:
    """One process of one mode: load, warm up, time a whole generate; rank 0 writes its row."""
    from safetensors.torch import save_file

    from ditbake.runtime import distributed
    from ditbake.runtime.session import Session

    t0 = time.perf_counter()
    cfg, latent, text_len = (TINY, TINY_LATENT, TINY_TEXT) if args.tiny else (WAN_1_3B, LATENT, TEXT_LEN)
    device = torch.device("cpu" if args.tiny else "cuda", 0)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        torch.set_num_threads(1)
    parallel = None if args.worker == "single" else args.worker
    if parallel:
        device = distributed.init_process_group(torch.device(device.type))
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    artifact = in_memory_artifact(cfg, latent, text_len, args.steps, device, dtype)
    session = (distributed.ParallelSession(artifact, device, dtype, parallel=parallel) if parallel
               else Session(artifact, device, dtype))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, *latent, generator=gen)
    cond = torch.randn(1, text_len, cfg["text_dim"], generator=gen)
    uncond = torch.randn(1, text_len, cfg["text_dim"], generator=gen)
    setup_s = time.perf_counter() - t0
    session.generate(cond, uncond, latents=x, guidance_scale=args.guidance,
                     progress=lambda it: itertools.islice(it, args.warmup))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(device)
    result = session.generate(cond, uncond, latents=x, guidance_scale=args.guidance, progress=timer.wrap)
    step_ms = timer.step_ms()
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        row = {"step_ms_median": statistics.median(step_ms), "total_s": sum(step_ms) / 1e3, "steps": len(step_ms),
               "step_ms": step_ms, "setup_s": setup_s, "ranks": int(os.environ.get("WORLD_SIZE", "1")),
               "block_computes": result.report.block_computes,
               "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")}
        if device.type == "cuda":
            row["peak_memory_bytes_rank0"] = torch.cuda.max_memory_allocated()
        work = Path(args.work)
        (work / f"{args.worker}.json").write_text(json.dumps(row))
        save_file({"latents": result.latents.float().cpu().contiguous()}, str(work / f"{args.worker}.safetensors"))
    if parallel:
        distributed.shutdown()


def launch(args, mode: str, work: Path) -> dict:
    from ditbake.runtime.distributed import NCCL_ENV

    script = [str(Path(__file__).resolve()), "--worker", mode, "--work", str(work), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--guidance", str(args.guidance)] + (["--tiny"] if args.tiny else [])
    cmd = [sys.executable, *script] if mode == "single" else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}", *script]
    env = {**os.environ, **NCCL_ENV, "OMP_NUM_THREADS": "1"}
    log.info("%s: %s", mode, " ".join(cmd))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=args.timeout, check=False)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - t0
    row_file = work / f"{mode}.json"
    if rc != 0 or not row_file.exists():
        return {"error": f"exit status {rc}", "wall_s": wall}
    return json.loads(row_file.read_text()) | {"wall_s": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50, help="sampling steps timed (uncompressed plan: all alike)")
    ap.add_argument("--warmup", type=int, default=2, help="steps run before the timed generate")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--modes", default="single,cfg,ulysses")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per mode before it is abandoned")
    ap.add_argument("--tiny", action="store_true", help="tiny Wan on the CPU with gloo: checks the script here")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "multi_gpu_h100.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.worker:
        worker(args)
        return 0
    import tempfile

    from safetensors.torch import load_file

    modes = args.modes.split(",")
    cuda = not args.tiny
    result = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (tiny, gloo)",
              "gpus_visible": torch.cuda.device_count() if cuda else 0, "gpus_used": args.gpus,
              "torch": torch.__version__, "nccl": str(torch.cuda.nccl.version()) if cuda else None,
              "model": "Wan2.1-1.3B architecture, random weights" if cuda else "tiny Wan, random weights",
              "latent": list(TINY_LATENT if args.tiny else LATENT), "steps": args.steps, "warmup_steps": args.warmup,
              "guidance": args.guidance, "plan": "uncompressed (every block computed, full attention, bf16 linears)",
              "backend": "eager", "dtype": "float32" if args.tiny else "bfloat16",
              "nvlink_multicast": "off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1)", "rows": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for mode in modes:
            result["rows"][mode] = launch(args, mode, work)
            out.write_text(json.dumps(stamp(result), indent=1))  # what ran survives a later timeout
        base = result["rows"].get("single", {})
        ref = load_file(str(work / "single.safetensors"))["latents"] if (work / "single.safetensors").exists() else None
        for mode, row in result["rows"].items():
            if mode == "single" or "error" in row or "error" in base or not base:
                continue
            row["speedup_median"] = base["step_ms_median"] / row["step_ms_median"]
            row["speedup_total"] = base["total_s"] / row["total_s"]
            if ref is not None:
                got = load_file(str(work / f"{mode}.safetensors"))["latents"]
                row["latents_rel_l2_vs_single"] = float((got - ref).norm() / ref.norm())
    goals = {"cfg": 1.85, "ulysses": 1.7}
    result["goals"] = {m: {"speedup_total_at_least": g, "met": result["rows"].get(m, {}).get("speedup_total", 0) >= g}
                       for m, g in goals.items() if m in result["rows"]}
    out.write_text(json.dumps(stamp(result), indent=1))
    for mode, row in result["rows"].items():
        if "error" in row:
            print(f"{mode:10s} ERROR {row['error']}")
        else:
            print(f"{mode:10s} {row['step_ms_median']:9.1f} ms/step  {row['total_s']:7.2f} s total  "
                  f"×{row.get('speedup_total', 1.0):.2f}  rel.err {row.get('latents_rel_l2_vs_single', 0.0):.2e}")
    return 0 if all("error" not in r for r in result["rows"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
