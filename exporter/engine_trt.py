"""The `tensorrt` backend: ONNX per engine (dynamo exporter, opset 23) → strongly typed TensorRT engines.

Same structure as the aoti backend (engine_aoti): per shape profile, one engine for the
prologue, one per distinct computed block variant, one for the epilogue; weights are engine
inputs under the positional convention of ditbake.runtime.engines, so blocks sharing a
configuration share an engine and the weights exist once. Every graph is written to
``engines/<part>-<key>.onnx`` and passes ``onnx.checker.check_model(full_check=True)``;
``verify=True`` also executes it with ``onnx.reference`` (+ onnx_reference_ops) and compares
with the eager module (tests and small models: the reference evaluator is numpy, slow at size).

When ``tensorrt`` imports, each graph is parsed into a STRONGLY_TYPED network (the ONNX types,
Q/DQ and casts decide precisions) and built with one optimization profile (the shape profile's
static shapes) into ``engines/<part>-<key>.plan``. When it does not, ``onnx_only=True`` keeps the
verified graphs in the artifact (entries without a plan; the runtime refuses them by name) and
``onnx_only=False`` stops with an error naming both fixes. UNTESTED: the TensorRT build (no
TensorRT on the project's machines); written to the TensorRT 10.x Python API documentation.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ditbake.exporter.engine_aoti import _content_key, _input_names, engine_jobs, example_extras
from ditbake.runtime import arch as runtime_arch
from ditbake.runtime.artifact import Profile, sha256_file
from ditbake.runtime.engines import engine_key
from ditbake.runtime.errors import BackendError
from ditbake.runtime.plan import Plan

log = logging.getLogger(__name__)


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def _check_variants(plan: Plan, used: list[int]) -> None:
    for vid in used:
        if plan.variants[vid].uses_cached_heads:
            raise BackendError(f"variant {vid} reuses cached heads, which the tensorrt backend does not export yet; "
                               "build with --backend eager or plan without head caching")
        if any(s.kind == "local3d" for _, schemes in plan.variants[vid].heads for s in schemes):
            raise BackendError(f"variant {vid} has local3d heads, which the tensorrt backend does not export yet; "
                               "build with --backend eager or plan arrow heads")



def export_onnx(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
                path: Path):
    """torch.onnx dynamo export with ditbake's op translations; returns the checked ModelProto."""
    import onnx  # noqa: PLC0415

    from ditbake.exporter import onnx_ops  # noqa: PLC0415

    program = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=onnx_ops.OPSET,
                                input_names=input_names, output_names=output_names,
                                custom_translation_table=onnx_ops.translation_table(), optimize=True,
                                verbose=False)
    onnx_ops.retype_fp4_inputs(program.model)
    onnx_ops.ensure_opset_imports(program.model)
    model = program.model_proto
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BackendError(f"exported ONNX graph {path.name} fails onnx.checker ({exc}); report it with the plan") from exc
    onnx.save(model, str(path))
    return model


def reference_error(model, module: torch.nn.Module, args: tuple) -> float:
    """Max |ONNX (onnx.reference) − eager module| over the outputs, in fp32."""
    from ditbake.exporter import onnx_reference_ops  # noqa: PLC0415

    expected = module(*args)
    expected = expected if isinstance(expected, (list, tuple)) else (expected,)
    got = onnx_reference_ops.run(model, list(args))
    return max(float((g - e.float()).abs().max()) for g, e in zip(got, expected))


def build_engine(onnx_path: Path, plan_path: Path) -> dict:
    """Parse an ONNX file into a strongly typed network and serialise an engine (UNTESTED)."""
    import tensorrt as trt  # noqa: PLC0415

    import ditbake.plugins.trt_attention_8bit  # noqa: F401, PLC0415 - the parser resolves attention_8bit nodes here
    import ditbake.plugins.trt_plugins  # noqa: F401, PLC0415 - the parser resolves head_attention nodes here

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {onnx_path.name}: {errors}; check the TensorRT version (>= 10.8 "
                           "for FP4) and that ditbake.plugins.trt_plugins registered its plugins")
    config = builder.create_builder_config()
    # One optimization profile per shape profile: the graphs are exported at the profile's static
    # shapes (batch 1, as the aoti engines), so min = opt = max.
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise BackendError(f"input {tensor.name} of {onnx_path.name} has a dynamic shape {shape}; "
                               "the tensorrt backend exports static shape profiles")
        if tensor.is_shape_tensor:
            continue
        profile.set_shape(tensor.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {onnx_path.name}; see the TensorRT log above")
    plan_path.write_bytes(bytes(serialized))
    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (None, None)
    return {"device": "cuda", "tensorrt": trt.__version__, "torch": torch.__version__,
            "capability": [major, minor] if major is not None else None}


@torch.no_grad()
def compile_engines(arch, config: dict, weights: dict[str, torch.Tensor], plan: Plan, profiles: list[Profile],
                    out_dir: Path, device: str = "cpu", progress: bool = True, onnx_only: bool = False,
                    verify: bool = False, atol: float = 1e-4) -> list[dict]:
    """Export (and build, when TensorRT imports) prologue, every computed block variant and epilogue
    for each profile into out_dir/engines. Returns the manifest's engine entries."""
    have_trt = tensorrt_available()
    if not have_trt and not onnx_only:
        raise BackendError("the tensorrt backend needs the `tensorrt` package to build engines; install it on a "
                           "CUDA machine, or pass --onnx-only to ship the verified ONNX graphs without engines")
    used = sorted({vid for step in plan.steps for ids in step.values() for vid in ids if plan.variants[vid].compute})
    _check_variants(plan, used)
    (out_dir / "engines").mkdir(exist_ok=True)
    dtype = next(v.dtype for v in weights.values() if v.is_floating_point() and v.element_size() > 1)
    text_dim = int(config.get("text_dim", config.get("text_embed_dim")))
    bar = tqdm(total=0, desc="export onnx", unit="engine", disable=not progress)  # each profile adds its jobs
    entries = []
    for prof in profiles:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, *prof.latent_shape, generator=gen).to(dtype)
        t = torch.full((1,), 500.0)
        text = torch.randn(1, prof.text_len, text_dim, generator=gen).to(dtype)
        extras = example_extras(arch, config, dtype)
        jobs, gnames, n_ctx = engine_jobs(arch, config, weights, plan, used, prof, x, t, text, extras)
        bar.total += len(jobs)
        for job in jobs:
            part, kind, vid, module, args = job.part, job.kind, job.vid, job.module, job.args
            key = engine_key(part, vid, prof.name, kind, job.group)
            config_json = plan.variants[vid].to_json() if vid is not None else None
            content = _content_key(part, kind, config_json, prof.to_json(), arch.NAME, config, str(dtype), "tensorrt",
                                   job.block_names)
            inputs = _input_names(part, gnames, job.block_names, n_ctx, runtime_arch.extra_inputs(arch, config))
            outputs = (["hidden", *[f"ctx{i}" for i in range(n_ctx)]] if part == "prologue"
                       else ["hidden_out" if part == "block" else "model_output"])
            onnx_rel = f"engines/{part}-{content}.onnx"
            bar.set_postfix_str(key)
            model = export_onnx(module, args, inputs, outputs, out_dir / onnx_rel)
            entry = {"key": key, "part": part, **({"block_kind": kind} if kind else {}), "variant": vid,
                     **({"blocks": job.blocks} if part == "block" else {}),
                     "profile": prof.name, "backend": "tensorrt",
                     "onnx": onnx_rel, "onnx_sha256": sha256_file(out_dir / onnx_rel), "onnx_opset": 23,
                     "onnx_checked": True, "inputs": inputs, "outputs": outputs, "file": None, "built_for": None}
            if verify:
                err = reference_error(model, module, args)
                entry["onnx_reference_max_abs_err"] = err
                if not err <= atol:
                    raise BackendError(f"ONNX graph for {key} differs from eager by {err:.3g} (> {atol:g}) under "
                                       "onnx.reference; the translation is wrong, report it with the plan")
            if have_trt:
                plan_rel = f"engines/{part}-{content}.plan"
                entry["built_for"] = build_engine(out_dir / onnx_rel, out_dir / plan_rel)
                entry["file"], entry["sha256"] = plan_rel, sha256_file(out_dir / plan_rel)
            entries.append(entry)
            bar.update(1)
    bar.close()
    if not have_trt:
        log.warning("tensorrt is not installed: wrote %d verified ONNX graphs without engines (--onnx-only)",
                    len(entries))
    return entries
