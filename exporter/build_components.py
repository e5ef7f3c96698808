"""The non-transformer components of a pipeline directory, stored in the artifact so the runtime
serves text → frames on its own: text encoder(s) (weights + config), their tokenizer(s)
(`tokenizer.json` + settings) and the VAE decoder (decoder weights + config + the pipeline's latent
normalization). Every file lands under `components/` and is indexed (sha256) in the manifest;
the manifest's `components` section says what each is:

    "components": {
      "pipeline": "WanPipeline",
      "negative_prompt": "", "text_len": 512,
      "text_encoders": {"text_encoder": {"kind": "t5", "class": "UMT5EncoderModel", "config": {...},
                                         "weights": "components/text_encoder.safetensors",
                                         "tokenizer": "components/tokenizer"}},
      "vae": {"kind": "wan", "class": "AutoencoderKLWan", "config": {...},
              "weights": "components/vae_decoder.safetensors"}
    }
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from ditbake.exporter import pipeline as pipelines
from ditbake.runtime.errors import UnsupportedModelError

log = logging.getLogger(__name__)

COMPONENTS_DIR = "components"
# CLIP tokenizers of SD3/Flux always run at 77 tokens; T5 ones at the profile's text length
CLIP_TOKENS = 77


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _text_lengths(spec: pipelines.PipelineSpec, text_len: int) -> dict[str, int]:
    """Tokens per tokenizer: CLIP 77, T5 the rest of the profile's text length (SD3) or all of it."""
    if spec.architecture == "sd3":
        return {"tokenizer": CLIP_TOKENS, "tokenizer_2": CLIP_TOKENS, "tokenizer_3": text_len - CLIP_TOKENS}
    if spec.architecture == "flux":
        return {"tokenizer": CLIP_TOKENS, "tokenizer_2": text_len}
    return {"tokenizer": text_len}


def export_components(model_dir: str | Path, out: Path, *, text_len: int, dtype: torch.dtype = torch.float32,
                      negative_prompt: str = "") -> tuple[dict, list[str]]:
    """Write the components of the pipeline in `model_dir` under `out/components/`.
    Returns (the manifest's `components` section, the relative paths written)."""
    from ditbake.exporter.components import component_weights, export_tokenizer  # noqa: PLC0415
    from ditbake.runtime.components import TEXT_ENCODERS, VAE_DECODERS, decoder_weights, kind_for_class  # noqa: PLC0415

    spec = pipelines.pipeline_spec(model_dir)
    pipe = pipelines.load_pipeline(model_dir, dtype=dtype)
    root = out / COMPONENTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    lengths = _text_lengths(spec, text_len)
    encoders = {}
    for enc_name, tok_name in zip(spec.text_encoders, spec.tokenizers):
        module = getattr(pipe, enc_name)
        kind = kind_for_class(type(module).__name__)
        if kind not in TEXT_ENCODERS:
            raise UnsupportedModelError(f"{enc_name} is a {type(module).__name__}, which the runtime cannot run; "
                                        f"supported text encoders: {', '.join(sorted(TEXT_ENCODERS))}")
        config, tensors = component_weights(module)
        rel = f"{COMPONENTS_DIR}/{enc_name}.safetensors"
        _save(tensors, out / rel)
        tok_dir = root / tok_name
        written = export_tokenizer(getattr(pipe, tok_name), tok_dir, lengths[tok_name])
        files += [rel] + [f"{COMPONENTS_DIR}/{tok_name}/{name}" for name in written]
        encoders[enc_name] = {"kind": kind, "class": type(module).__name__, "config": config, "weights": rel,
                              "tokenizer": f"{COMPONENTS_DIR}/{tok_name}", "max_length": lengths[tok_name]}
    vae = pipe.vae
    kind = kind_for_class(type(vae).__name__)
    if kind not in VAE_DECODERS:
        raise UnsupportedModelError(f"the VAE is a {type(vae).__name__}, which the runtime cannot decode with; "
                                    f"supported: {', '.join(sorted(VAE_DECODERS))}")
    config, tensors = component_weights(vae)
    tensors = decoder_weights(tensors)  # the encoder half is never run by text → frames
    rel = f"{COMPONENTS_DIR}/vae_decoder.safetensors"
    _save(tensors, out / rel)
    files.append(rel)
    section = {"pipeline": spec.pipeline_class, "architecture": spec.architecture, "negative_prompt": negative_prompt,
               "guidance_scale": spec.default_cfg,
               "text_len": text_len, "text_encoders": encoders,
               "vae": {"kind": kind, "class": type(vae).__name__, "config": config, "weights": rel,
                       "scale_factors": list(pipelines.vae_scale_factors(model_dir, spec.architecture))}}
    log.info("stored %s components: %s + VAE decoder (%s)", spec.pipeline_class,
             ", ".join(f"{n} ({e['class']})" for n, e in encoders.items()), type(vae).__name__)
    return section, files
