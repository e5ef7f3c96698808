"""Exporting a pipeline's non-transformer components: weights + config of a text encoder or VAE, and
its tokenizer as `tokenizer.json` + settings (read back by `ditbake.runtime.tokenizer.Tokenizer`)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ditbake.runtime.errors import InputError
from ditbake.runtime.tokenizer import SETTINGS_FILE, TOKENIZER_FILE

log = logging.getLogger(__name__)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def component_weights(module: torch.nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, weights) of a transformers text encoder or diffusers VAE, as the runtime reads them.

    config is `config.to_dict()` (transformers) or the diffusers config, JSON-safe, with `_class_name`
    set to the module's class. weights is the state dict under the module's own names, detached and
    contiguous; a tensor that aliases an earlier one (T5's `encoder.embed_tokens` ties `shared`) is kept
    once, under its first name, since safetensors refuses shared storage.
    """
    config = module.config
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    raw = {k: v for k, v in raw.items() if not k.startswith("_") or k == "_class_name"}
    raw["_class_name"] = type(module).__name__
    weights: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple, tuple]] = set()
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size(),
               tuple(tensor.shape), tuple(tensor.stride()))
        if key in seen:
            log.debug("%s aliases an earlier tensor; stored once", name)
            continue
        seen.add(key)
        weights[name] = tensor.detach().contiguous()
    return _jsonable(raw), weights


def _backend(hf_tokenizer):
    """The tokenizers-library object behind a transformers tokenizer (slow ones converted)."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend
    from transformers.convert_slow_tokenizer import convert_slow_tokenizer  # noqa: PLC0415
    return convert_slow_tokenizer(hf_tokenizer)


def export_tokenizer(hf_tokenizer, out_dir: str | Path, max_length: int) -> list[str]:
    """Write `tokenizer.json` and `tokenizer_settings.json` into out_dir; returns the file names written.

    The settings are those transformers keeps outside the backend and applies on
    `tokenizer(..., padding="max_length", max_length=max_length, truncation=True)`.
    """
    if hf_tokenizer.pad_token_id is None:
        raise InputError(f"tokenizer {type(hf_tokenizer).__name__} has no pad token, so prompts cannot be padded "
                         "to a fixed length; set tokenizer.pad_token before exporting")
    if int(max_length) < 1:
        raise InputError(f"tokenizer max_length must be positive, got {max_length}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _backend(hf_tokenizer).save(str(out / TOKENIZER_FILE))
    settings = {
        "max_length": int(max_length),
        "padding_side": hf_tokenizer.padding_side,
        "truncation_side": hf_tokenizer.truncation_side,
        "pad_token": str(hf_tokenizer.pad_token),
        "pad_token_id": int(hf_tokenizer.pad_token_id),
        "pad_token_type_id": int(getattr(hf_tokenizer, "pad_token_type_id", 0)),
        "add_special_tokens": True,
        "split_special_tokens": bool(getattr(hf_tokenizer, "split_special_tokens", False)),
        "class_name": type(hf_tokenizer).__name__,
        "model_max_length": int(min(getattr(hf_tokenizer, "model_max_length", max_length), 2**31 - 1)),
    }
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
    return [TOKENIZER_FILE, SETTINGS_FILE]
