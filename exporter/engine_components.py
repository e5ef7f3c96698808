"""Compiled engines of a pipeline's components: text encoder(s) and VAE decoder (aoti / tensorrt).

As demoDiffusion builds one engine per component, `build --backend aoti|tensorrt` from a pipeline
directory compiles each text encoder at its tokenizer length and the VAE decoder at every shape
profile's latent shape (one engine per profile: the video decoders run a Python loop over latent
frames with a feature cache, which torch.export unrolls, so frames cannot be a dynamic dimension).
Engines take batch 1 (the runtime runs them per prompt / per sample) and, like the block engines,
take the component's weights as inputs in sorted-name order, so the weights stay once in the
artifact's safetensors. Files land under `components/engines/`, named by a hash of what the
engine computes, and are listed in the manifest's `components.engines` and hashed in `files`:

    {"key": "text_encoder" | "vae-<profile>", "component": "text_encoder" | "vae", "profile": None | name,
     "backend": "aoti", "file": "components/engines/….pt2", "sha256": …, "built_for": {...},
     "inputs": [...], "outputs": [...], "input_shape": [...], "hidden_state_index": -2 (CLIP only)}

The tensorrt backend writes checked ONNX graphs (`onnx` field), as engine_trt does for the blocks.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ditbake.exporter.engine_aoti import _compile, _content_key
from ditbake.runtime.artifact import Profile, sha256_file
from ditbake.runtime.components_engines import (CLIP_HIDDEN_STATE, ComponentModule, text_outputs,
                                                vae_input_shape)
from ditbake.runtime.errors import BackendError

log = logging.getLogger(__name__)

ENGINES_DIR = "components/engines"


def component_jobs(section: dict, out_dir: Path, profiles: list[Profile], device: str = "cpu"):
    """[(key, component, profile name, module, example args, input names, output names, extra entry fields)]."""
    from ditbake.runtime.components import TEXT_ENCODERS, VAE_DECODERS  # noqa: PLC0415

    jobs = []
    gen = torch.Generator().manual_seed(0)
    for name, entry in section["text_encoders"].items():
        weights = {k: v.to(device) for k, v in load_file(str(out_dir / entry["weights"])).items()}
        names = sorted(weights)
        length = int(entry["max_length"])
        vocab = int(entry["config"].get("vocab_size", 2))
        ids = torch.randint(0, vocab, (1, length), generator=gen).to(device)
        mask = torch.ones(1, length, dtype=torch.int64, device=device)
        mask[:, length // 2 + 1:] = 0  # a padded prompt: the mask is a real input, not a constant
        kwargs = {"hidden_state_index": CLIP_HIDDEN_STATE} if entry["kind"] == "clip" else {}
        fn = TEXT_ENCODERS[entry["kind"]].encode
        outputs = text_outputs(fn(weights, entry["config"], ids, mask, **kwargs))
        module = ComponentModule(fn, entry["config"], names, 2, outputs, kwargs)
        extra = {"input_shape": [1, length], "returns": "dict" if outputs else "tensor", **kwargs}
        jobs.append((name, "text_encoder", None, module, (ids, mask, *[weights[k] for k in names]),
                     ["input_ids", "attention_mask", *names], list(outputs or ["last_hidden_state"]), extra))
    vae = section["vae"]
    weights = {k: v.to(device) for k, v in load_file(str(out_dir / vae["weights"])).items()}
    names = sorted(weights)
    dtype = next(v.dtype for v in weights.values() if v.is_floating_point())
    module = ComponentModule(VAE_DECODERS[vae["kind"]].decode, vae["config"], names, 1, None, {})
    for prof in profiles:
        shape = vae_input_shape(section["architecture"], prof.latent_shape)
        z = torch.randn(1, *shape, generator=gen).to(device, dtype)
        jobs.append((f"vae-{prof.name}", "vae", prof.name, module, (z, *[weights[k] for k in names]),
                     ["latents", *names], ["pixels"], {"input_shape": [1, *shape]}))
    return jobs


@torch.no_grad()
def compile_components(section: dict, out_dir: Path, profiles: list[Profile], *, backend: str, device: str = "cpu",
                       progress: bool = True, verify: bool = False, atol: float = 1e-4) -> list[dict]:
    """Compile (aoti) or export to ONNX (tensorrt) every component engine into out_dir/components/engines;
    returns the manifest's `components.engines` entries. `verify` (tensorrt): run each graph with
    onnx.reference against the eager module (slow: tests and tiny models)."""
    (out_dir / ENGINES_DIR).mkdir(parents=True, exist_ok=True)
    built_for = {"device": torch.device(device).type, "torch": torch.__version__,
                 "capability": list(torch.cuda.get_device_capability()) if torch.device(device).type == "cuda" else None}
    jobs = component_jobs(section, out_dir, profiles, device)
    bar = tqdm(total=len(jobs), desc=f"components {backend}", unit="engine", disable=not progress)
    entries = []
    for key, component, profile, module, args, inputs, outputs, extra in jobs:
        config = section["vae"]["config"] if component == "vae" else section["text_encoders"][key]["config"]
        content = _content_key(key, component, config, extra, [str(a.dtype) for a in args[:2]], backend, built_for)
        bar.set_postfix_str(key)
        entry = {"key": key, "component": component, "profile": profile, "backend": backend, "inputs": inputs,
                 "outputs": outputs, **extra}
        if backend == "aoti":
            rel = f"{ENGINES_DIR}/{key}-{content}.pt2"
            try:
                _compile(module, args, out_dir / rel)
            except Exception as exc:  # torch.export / Inductor raise many types
                raise BackendError(f"cannot compile the {key} component ({type(exc).__name__}: {str(exc)[:300]}); "
                                   "build with --backend eager and report it") from exc
            entry |= {"file": rel, "sha256": sha256_file(out_dir / rel), "built_for": built_for}
        elif backend == "tensorrt":
            from ditbake.exporter.engine_trt import build_engine, export_onnx, reference_error, tensorrt_available  # noqa: PLC0415

            onnx_rel = f"{ENGINES_DIR}/{key}-{content}.onnx"
            model = export_onnx(module, args, inputs, outputs, out_dir / onnx_rel)
            entry |= {"onnx": onnx_rel, "onnx_sha256": sha256_file(out_dir / onnx_rel), "onnx_checked": True,
                      "file": None, "built_for": None}
            if verify:
                err = reference_error(model, module, args)
                entry["onnx_reference_max_abs_err"] = err
                if not err <= atol:
                    raise BackendError(f"ONNX graph of the {key} component differs from eager by {err:.3g} (> {atol:g})"
                                       " under onnx.reference; report it")
            if tensorrt_available():
                plan_rel = f"{ENGINES_DIR}/{key}-{content}.plan"
                entry["built_for"] = build_engine(out_dir / onnx_rel, out_dir / plan_rel)
                entry["file"], entry["sha256"] = plan_rel, sha256_file(out_dir / plan_rel)
        else:
            raise BackendError(f"components have no {backend!r} engines; use aoti or tensorrt")
        entries.append(entry)
        bar.update(1)
    bar.close()
    log.info("compiled %d component engines (%s)", len(entries), backend)
    return entries
