"""Build an artifact (format v1) from a model, a plan and the samplers to bake.

The build writes into a temporary sibling directory and renames it into place, so a crash
never leaves half an artifact where the runtime would look.
"""
from __future__ import annotations

import json
import logging
import platform
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ditbake.exporter.adapters import Adapter
from ditbake.exporter.build_quant import nvfp4_stored_8bit_layers, quantize_weights
from ditbake.exporter.sampler import bake_samplers
from ditbake.runtime import atomic, weights_4bit
from ditbake.runtime.artifact import FORMAT, FORMAT_VERSION, MANIFEST, PLAN, WEIGHTS, Profile, sha256_file
from ditbake.runtime.errors import BackendError, PlanError
from ditbake.runtime.outputs import check_output
from ditbake.runtime.plan import Plan

log = logging.getLogger(__name__)

PRODUCER_VERSION = "0.1.0"
BUILD_BACKENDS = ("eager", "aoti", "tensorrt")
WEIGHT_STORAGE = ("8bit", "nvfp4", "nvfp4-resident")  # how a layer run only in 8 bits is stored


def check_plan_fits(adapter: Adapter, plan: Plan) -> None:
    if plan.architecture != adapter.architecture:
        raise PlanError(f"plan is for {plan.architecture!r} but the model is {adapter.architecture!r}")
    if plan.num_blocks != adapter.num_blocks:
        raise PlanError(f"plan has {plan.num_blocks} blocks but the model has {adapter.num_blocks}")
    if set(plan.linear_layers) != set(adapter.linear_layers):
        raise PlanError("plan's linear layers differ from the model's; re-run `ditbake plan` on this model's calibration")
    if dict(plan.attention_sites) != adapter.attention_sites:
        raise PlanError("plan's attention sites differ from the model's; re-run `ditbake plan`")


def build(adapter: Adapter, plan: Plan, out: str | Path, *, profiles: list[Profile], samplers: list[str],
          dtype: torch.dtype = torch.bfloat16, backend: str = "eager", label: str = "",
          scheduler_config: dict | None = None, progress: bool = True, device: str = "cpu",
          text_encoder: bool = False, onnx_only: bool = False, pipeline_dir: str | Path | None = None,
          negative_prompt: str = "", force: bool = False, weight_storage: str = "8bit",
          hessians: dict[str, torch.Tensor] | None = None) -> Path:
    """`text_encoder=True` records the shipped MiniLM encoder (by the sha256 of its weights) so the
    runtime can take free-text prompts. `onnx_only` (tensorrt backend, no TensorRT here): ship the
    verified ONNX graphs without engines. `pipeline_dir`: also store that pipeline's text encoder(s),
    tokenizer(s) and VAE decoder (exporter/build_components.py), so the artifact serves text → frames.
    An existing `out` is replaced only when it is an earlier artifact or with `force`
    (runtime/outputs.py). `weight_storage="nvfp4"`: layers run only in 8 bits are stored in NVFP4
    and materialized in 8 bits at load (runtime/weights_4bit.py); "nvfp4-resident": the same NVFP4
    tensors stay resident and each call makes the 8-bit weight in the graph; `hessians` (exporter/gptq.py's
    `collect_hessians`) round NVFP4-stored layers by GPTQ instead of to nearest."""
    if backend not in BUILD_BACKENDS:
        raise BackendError(f"backend {backend!r} cannot be built yet; available: {BUILD_BACKENDS}")
    check_plan_fits(adapter, plan)
    if weight_storage not in WEIGHT_STORAGE:
        raise PlanError(f"weight storage {weight_storage!r} is not one of {WEIGHT_STORAGE}")
    if not samplers:
        raise PlanError("at least one sampler must be baked")
    out = check_output(out, "artifact", force)
    tmp = atomic.staging_dir(out)
    try:
        steps = ["weights", "samplers", "manifest"]
        bar = tqdm(steps, desc="build", disable=not progress)
        bar.set_postfix_str("weights")
        weights = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu()
                   for k, v in adapter.weights().items()}
        # layers some variant runs below bf16: NVFP4 (quantized from the original weights); the
        # 16-bit weight stays only where a variant still runs it in bf16
        absent = set(adapter.absent_linears)
        resident = weight_storage == "nvfp4-resident"
        as_nvfp4 = (nvfp4_stored_8bit_layers(plan, adapter.arch.BLOCK_PREFIX, absent)
                    if weight_storage != "8bit" else {})
        weights = quantize_weights({k: v.cpu() for k, v in adapter.weights().items()}, weights, plan,
                                   adapter.arch.BLOCK_PREFIX, absent, nvfp4_8bit=as_nvfp4, hessians=hessians,
                                   gptq_device=device, resident=resident)
        from_nvfp4 = {} if resident else as_nvfp4  # converted at load; resident ones in the graph
        for p in profiles:
            weights.update({k: v.contiguous() for k, v in adapter.profile_tensors(p.to_json()).items()})
        save_file(weights, str(tmp / WEIGHTS))
        plan.save(tmp / PLAN)
        (tmp / "engines").mkdir()
        bar.update(1)
        bar.set_postfix_str("samplers")
        tables = bake_samplers(adapter, samplers, profiles, plan.num_steps, scheduler_config)
        bar.update(1)
        engines = []
        stored, weights = weights, weights_4bit.materialize(weights, from_nvfp4)  # engines read what the loader gives
        if backend == "aoti":
            from ditbake.exporter.engine_aoti import compile_engines  # noqa: PLC0415

            engines = compile_engines(adapter.arch, adapter.config, weights, plan, profiles, tmp, device=device,
                                      progress=progress)
        elif backend == "tensorrt":
            from ditbake.exporter.engine_trt import compile_engines as compile_trt  # noqa: PLC0415

            engines = compile_trt(adapter.arch, adapter.config, weights, plan, profiles, tmp, device=device,
                                  progress=progress, onnx_only=onnx_only)
        components, component_files = None, []
        if pipeline_dir is not None:
            from ditbake.exporter.build_components import export_components  # noqa: PLC0415

            components, component_files = export_components(pipeline_dir, tmp, text_len=profiles[0].text_len,
                                                            dtype=dtype, negative_prompt=negative_prompt)
            if backend != "eager":  # one engine per text encoder and per profile's VAE decoder
                from ditbake.exporter.engine_components import compile_components  # noqa: PLC0415

                components["engines"] = compile_components(components, tmp, profiles, backend=backend, device=device,
                                                           progress=progress)
                component_files += [f for e in components["engines"] for f in (e.get("file"), e.get("onnx")) if f]
        # a tensorrt entry also ships its ONNX graph (and has no engine file when built --onnx-only)
        files = {rel: {"sha256": sha256_file(tmp / rel), "bytes": (tmp / rel).stat().st_size}
                 for rel in (WEIGHTS, PLAN, *(f for e in engines for f in (e["file"], e.get("onnx")) if f),
                             *component_files)}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "producer": {"name": "ditbake", "version": PRODUCER_VERSION, "torch": torch.__version__,
                         "python": platform.python_version()},
            "model": {"architecture": adapter.architecture, "diffusers_class": adapter.diffusers_class,
                      "config": adapter.config, "label": label,
                      "parameters": int(sum(v.numel() for k, v in adapter.weights().items()))},
            "dtype": str(dtype).removeprefix("torch."),
            "profiles": [p.to_json() for p in profiles],
            "samplers": tables,
            "default_sampler": samplers[0],
            "scheduler_config": scheduler_config,  # the pipeline's scheduler/ config the tables were baked from
            "plan_file": PLAN,
            "backend": backend,
            "engines": engines,  # empty for eager: the runtime composes the ops itself
            "files": files,
            "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                        for k, v in stored.items()},  # checked against the safetensors header on load
            **({weights_4bit.MANIFEST_KEY: from_nvfp4} if from_nvfp4 else {}),
            "text_encoder": _text_encoder_entry(adapter, profiles) if text_encoder else None,
            "components": components,  # text encoder(s), tokenizer(s), VAE decoder of a pipeline directory
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        bar.update(1)
        bar.close()
        check_output(out, "artifact", force)  # again: it may have appeared during the build
        atomic.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built %s (%s, %d variants, %d steps)", out, backend, len(plan.variants), plan.num_steps)
    return out



def _text_encoder_entry(adapter: Adapter, profiles: list[Profile]) -> dict:
    from ditbake.runtime.text_encoder import PACKAGE, TextEncoder, model_dir  # noqa: PLC0415

    text_dim = int(adapter.config.get("text_dim", adapter.config.get("text_embed_dim", 0)))
    encoder = TextEncoder.load()
    if encoder.dim != text_dim:
        raise PlanError(f"the shipped text encoder gives {encoder.dim}-d tokens but the model takes {text_dim}; "
                        "build without --text-encoder and pass prompt embeddings")
    return {"name": "all-MiniLM-L6-v2", "package": PACKAGE, "dim": encoder.dim,
            "weights_sha256": sha256_file(model_dir() / "model.safetensors"),
            "negative_prompt": "", "max_length": profiles[0].text_len}
