"""Loading diffusers transformers: from a local diffusers directory, or from a config with
random weights (tests, speed runs at real sizes), plus the tiny configs the tests use."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ditbake.exporter.adapters import ADAPTERS
from ditbake.runtime.errors import DitbakeError, UnsupportedModelError

log = logging.getLogger(__name__)

TINY_CONFIGS: dict[str, dict] = {
    "tiny-wan": {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 2,
                 "attention_head_dim": 16, "in_channels": 4, "out_channels": 4, "text_dim": 32,
                 "freq_dim": 32, "ffn_dim": 64, "num_layers": 3, "cross_attn_norm": True,
                 "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 64},
    "tiny-cogvideox": {"_class_name": "CogVideoXTransformer3DModel", "num_attention_heads": 2,
                       "attention_head_dim": 16, "in_channels": 4, "out_channels": 4, "time_embed_dim": 16,
                       "text_embed_dim": 32, "num_layers": 3, "sample_width": 8, "sample_height": 8,
                       "sample_frames": 9, "patch_size": 2, "temporal_compression_ratio": 4,
                       "max_text_seq_length": 8},
    # pooled_projection_dim == joint_attention_dim: the runtime derives the pooled vector from the tokens
    "tiny-sd3": {"_class_name": "SD3Transformer2DModel", "sample_size": 8, "patch_size": 2, "in_channels": 4,
                 "out_channels": 4, "num_layers": 3, "attention_head_dim": 16, "num_attention_heads": 2,
                 "joint_attention_dim": 32, "caption_projection_dim": 32, "pooled_projection_dim": 32,
                 "pos_embed_max_size": 8},
    # 2 double-stream + 2 single-stream blocks; pooled_projection_dim == joint_attention_dim as for SD3
    "tiny-flux": {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 16, "num_layers": 2,
                  "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                  "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": False,
                  "axes_dims_rope": [4, 6, 6]},
    # the real layout (SD3: CLIP-L+G pooled 2048 ≠ T5 4096; FLUX.1-dev: CLIP pooled 768 ≠ T5 4096, guidance
    # embedding): the pooled vector is a separate input
    "tiny-sd3-pooled": {"_class_name": "SD3Transformer2DModel", "sample_size": 8, "patch_size": 2, "in_channels": 4,
                        "out_channels": 4, "num_layers": 3, "attention_head_dim": 16, "num_attention_heads": 2,
                        "joint_attention_dim": 32, "caption_projection_dim": 32, "pooled_projection_dim": 24,
                        "pos_embed_max_size": 8},
    "tiny-flux-pooled": {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 16, "num_layers": 2,
                         "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                         "joint_attention_dim": 32, "pooled_projection_dim": 24, "guidance_embeds": True,
                         "axes_dims_rope": [4, 6, 6]},
}


class ModelLoadError(DitbakeError):
    """The model directory or config cannot be loaded."""

    exit_code = 8


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype most of a model's parameters are in: what its inputs must be cast to. Not the first
    parameter's: diffusers keeps some modules in fp32 when loading bf16 weights (Wan's
    `scale_shift_table` comes first), and a bf16 patch embedding refuses fp32 latents."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if not counts:
        raise UnsupportedModelError(f"{type(model).__name__} has no floating-point parameters")
    return max(counts, key=counts.get)


def _model_class(class_name: str, where: str = ""):
    if class_name not in ADAPTERS:
        found = f"model class {class_name!r}" if class_name else "a config.json without `_class_name`"
        hint = (f" ({where} is not a diffusers transformer: pass the pipeline root, which holds "
                "transformer/, or its transformer/ directory)" if where else "")
        raise UnsupportedModelError(f"found {found}, which is not supported{hint}; supported: "
                                    f"{', '.join(sorted(ADAPTERS))}")
    import diffusers  # noqa: PLC0415 - exporter-only dependency, imported when a model is loaded

    return getattr(diffusers, class_name)


def from_config(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A model of the config's class with random weights drawn from `seed`."""
    config = dict(config)
    cls = _model_class(config.pop("_class_name", ""))
    torch.manual_seed(seed)
    model = cls.from_config(config)
    # diffusers zero-initialises some output layers; random weights must exercise every path.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0 and p.ndim >= 1 and "bias" not in name:
                p.normal_(0.0, 0.02)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def load(source: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """Load a transformer from a tiny-config name, a config JSON file (random weights), or a local
    diffusers directory (a pipeline dir with `transformer/`, or the transformer dir itself)."""
    source_str = str(source)
    if source_str in TINY_CONFIGS:
        return from_config(TINY_CONFIGS[source_str], seed=seed, dtype=dtype)
    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        try:
            return from_config(json.loads(path.read_text()), seed=seed, dtype=dtype)
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{path} is not valid JSON: {exc.msg}") from exc
    if path.is_dir():
        model_dir = path / "transformer" if (path / "transformer" / "config.json").exists() else path
        config_file = model_dir / "config.json"
        if not config_file.exists():
            raise ModelLoadError(f"{path} holds no config.json nor transformer/config.json; point at a diffusers "
                                 "pipeline directory (with model_index.json and transformer/) or its transformer/")
        cls = _model_class(json.loads(config_file.read_text()).get("_class_name", ""), str(model_dir))
        log.info("loading %s from %s", cls.__name__, model_dir)
        return cls.from_pretrained(model_dir, local_files_only=True, torch_dtype=dtype).eval()
    if not path.exists() and source_str.count("/") == 1 and not source_str.startswith((".", "/")):
        raise ModelLoadError(f"{source_str!r} looks like a Hugging Face hub id, but ditbake reads local directories "
                             f"only: download it first (`huggingface-cli download {source_str} --local-dir DIR`) and "
                             "pass DIR (the pipeline root)")
    raise ModelLoadError(f"model source {source_str!r} is neither a tiny config ({', '.join(TINY_CONFIGS)}), "
                         "a config .json, nor a local diffusers directory")
