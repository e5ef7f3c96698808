"""One Wan2.1-1.3B transformer block at 480×832×81 frames (32,760 tokens), bf16, on one GPU:
diffusers eager vs torch.compile vs the ditbake runtime (eager composition of its ops, and the
block compiled into an AOTInductor engine), per plan variant.

Times are medians of CUDA-event timings after warm-up. Each ditbake variant's output is compared
with the diffusers block (relative L2) so a fast-but-wrong variant shows. Random weights: speed
does not depend on their values. The per-step column weighs variant times by a plan's mix
(for example 30 % of block computations skipped) — arithmetic on the measured times, not a
separate measurement.

    python benchmarks/block_race.py --out benchmarks/results/block_race_h100.json
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import tempfile
from pathlib import Path

import torch

from bench_attention import time_ms  # benchmarks/ is the script's directory
from provenance import stamp  # benchmarks/ is the script's directory: commit + dirty flag in every JSON

log = logging.getLogger("block_race")

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=1, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
LATENT = (16, 21, 60, 104)  # 81 frames at 480×832 through Wan's VAE (4× time, 8× space)
TEXT_LEN = 512


cuda_time = functools.partial(time_ms, warmup=3, reps=10)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def main(argv=None) -> int:
    import diffusers

    from ditbake.exporter.planner import baseline_variant
    from ditbake.plugins.mixed_linear import prepare_nvfp4_weight
    from ditbake.runtime import arch_wan
    from ditbake.runtime.attention import AttentionRunner
    from ditbake.runtime.engines import promote_libstdcxx
    from ditbake.runtime.plan import BlockVariant, HeadScheme

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/block_race_h100.json")
    p.add_argument("--band", type=float, default=0.25, help="arrow band width as a fraction of the tokens")
    p.add_argument("--skip", type=float, default=0.3, help="skip fraction for the per-step column")
    p.add_argument("--no-aoti", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to check the script without a GPU")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    cfg, latent, text_len = WAN_1_3B, LATENT, TEXT_LEN
    if args.smoke:
        global cuda_time
        cfg = {**WAN_1_3B, "num_attention_heads": 2, "attention_head_dim": 64, "ffn_dim": 256, "text_dim": 64}
        latent, text_len, dev, dtype = (16, 2, 8, 8), 8, torch.device("cpu"), torch.float32
        cuda_time = lambda fn: (fn(), 0.0)[1]  # noqa: E731 - no CUDA events on CPU
    torch.manual_seed(0)

    model = diffusers.WanTransformer3DModel(**cfg).to(dev, dtype).eval()
    latents = torch.randn(1, *latent, device=dev, dtype=dtype)
    text = torch.randn(1, text_len, cfg["text_dim"], device=dev, dtype=dtype)
    t = torch.tensor([500.0], device=dev)
    captured = {}
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k),
                                                     with_kwargs=True)
    model(latents, t, text, return_dict=False)
    hook.remove()
    block = model.blocks[0]
    ref = block(*captured["args"], **captured["kwargs"])
    tokens = ref.shape[1]
    log.info("block input: %d tokens × %d", tokens, ref.shape[2])

    config = {**dict(model.config), "patch_size": list(cfg["patch_size"])}
    weights = {k: v for k, v in model.state_dict().items()}
    h, ctx = arch_wan.prologue(weights, config, latents, t, text, {})
    heads = cfg["num_attention_heads"]
    band = int(args.band * tokens / 2)
    base = baseline_variant(arch_wan.BLOCK_LINEARS, {"attn1": heads})
    arrow = BlockVariant(precisions=base.precisions,
                         heads=(("attn1", tuple(HeadScheme("arrow", band, band) for _ in range(heads))),))

    def quantized(v: BlockVariant, fmt: str) -> BlockVariant:
        return BlockVariant(precisions=tuple((n, fmt) for n, _ in v.precisions), heads=v.heads)

    for name in arch_wan.BLOCK_LINEARS:  # NVFP4 weights for the quantized variants (stored once)
        q = prepare_nvfp4_weight(weights[f"blocks.0.{name}.weight"])
        weights[f"blocks.0.{name}.nvfp4_packed"] = q.packed
        weights[f"blocks.0.{name}.nvfp4_block_scales"] = q.block_scales
        weights[f"blocks.0.{name}.nvfp4_global_scale"] = q.global_scale
    variants = {"baseline": base, f"arrow{args.band:.2f}": arrow, "w4a8_int8": quantized(base, "int8"),
                "w4a8_fp8": quantized(base, "fp8"), f"arrow{args.band:.2f}+w4a8_int8": quantized(arrow, "int8")}

    rows = {}

    def record(name, fn, out=None):
        try:
            ms = cuda_time(fn)
            out = fn() if out is None else out
            rows[name] = {"ms": ms, "rel_err_vs_diffusers": rel_err(out, ref)}
        except Exception as exc:  # one failing contender must not hide the others
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        log.info("%-34s %s", name, rows[name])

    record("diffusers eager", lambda: block(*captured["args"], **captured["kwargs"]))
    compiled = torch.compile(block)
    record("diffusers torch.compile", lambda: compiled(*captured["args"], **captured["kwargs"]))
    for name, v in variants.items():
        record(f"ditbake eager {name}", lambda v=v: arch_wan.block(weights, config, 0, h, ctx, v, AttentionRunner(),
                                                                   "cond"))
    if not args.no_aoti:
        from ditbake.exporter.engine_aoti import _Block, _compile
        from ditbake.runtime.engines import block_weight_names

        names = block_weight_names(weights, arch_wan, 0)
        packed_ctx = arch_wan.pack_ctx(ctx)
        for name in ("baseline", f"arrow{args.band:.2f}+w4a8_int8"):
            try:
                names_v = [n for n in names if name != "baseline" or "nvfp4" not in n]
                module = _Block(arch_wan, config, names_v, variants[name], tuple(latents.shape), text_len,
                                len(packed_ctx))
                bw = [weights[f"blocks.0.{n}"] for n in names_v]
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "block.pt2"
                    _compile(module, (h, *packed_ctx, *bw), path)
                    promote_libstdcxx()
                    engine = torch._inductor.aoti_load_package(str(path))
                    record(f"ditbake aoti {name}", lambda: engine(h, *packed_ctx, *bw))
            except Exception as exc:
                rows[f"ditbake aoti {name}"] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
                log.info("aoti %s failed: %s", name, exc)

    eager_ms = rows["diffusers eager"].get("ms")
    for name, row in rows.items():
        if "ms" in row and eager_ms:
            row["speedup_vs_diffusers_eager"] = eager_ms / row["ms"]
            row["per_step_block_ms_at_skip"] = row["ms"] * (1 - args.skip) if name.startswith("ditbake") else row["ms"]
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)", "torch": torch.__version__, "tokens": tokens,
              "model": "Wan2.1-1.3B block (random weights)", "band_fraction": args.band, "skip_fraction": args.skip,
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(stamp(result), indent=1))
    print(f"{'contender':40s} {'ms':>8s} {'× eager':>8s} {'rel err':>9s}")
    for name, row in rows.items():
        if "ms" in row:
            print(f"{name:40s} {row['ms']:8.2f} {row.get('speedup_vs_diffusers_eager', 0):8.2f} "
                  f"{row['rel_err_vs_diffusers']:9.2e}")
        else:
            print(f"{name:40s} {row['error'][:80]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
