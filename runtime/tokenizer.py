"""Prompt → token ids with the pipeline's own tokenizer, through the `tokenizers` library.

The exporter (`exporter/components.py: export_tokenizer`) writes the transformers tokenizer's backend as
`tokenizer.json` (normalizer, pre-tokenizer, model, post-processor with the special tokens, added
tokens) and the few settings that live in the transformers wrapper as `tokenizer_settings.json`. This
module applies them the way transformers' fast tokenizers do for
`tokenizer(texts, padding="max_length", max_length=L, truncation=True, add_special_tokens=True)`:
truncation (longest-first, on the configured side, leaving room for the special tokens), padding to L
with the pad id on the configured side, then `encode_batch`.

    tok = Tokenizer.load("ART/components/tokenizer_2")
    batch = tok(["a cat walks", ""])          # {"input_ids": int64 [2, L], "attention_mask": int64 [2, L]}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ditbake.runtime.errors import ArtifactError, BackendError, InputError

TOKENIZER_FILE = "tokenizer.json"
SETTINGS_FILE = "tokenizer_settings.json"
SETTINGS_KEYS = ("max_length", "padding_side", "truncation_side", "pad_token", "pad_token_id",
                 "pad_token_type_id", "add_special_tokens", "split_special_tokens")


class Tokenizer:
    """A `tokenizer.json` plus the wrapper's settings (see SETTINGS_KEYS); callable on a prompt or a batch."""

    def __init__(self, tokenizer_json: str | Path, settings: dict):
        try:
            from tokenizers import Tokenizer as Backend  # noqa: PLC0415 - optional at import of the runtime
        except ImportError as exc:
            raise BackendError(f"the tokenizer needs the `tokenizers` library ({exc}); run `pip install tokenizers`") \
                from exc
        missing = [k for k in SETTINGS_KEYS if k not in settings]
        if missing:
            raise ArtifactError(f"tokenizer settings lack {missing}; re-export the tokenizer with this ditbake")
        for side in ("padding_side", "truncation_side"):
            if settings[side] not in ("left", "right"):
                raise ArtifactError(f"tokenizer setting {side}={settings[side]!r} must be 'left' or 'right'")
        try:
            self._backend = Backend.from_file(str(tokenizer_json))
        except Exception as exc:  # the Rust side raises its own Exception type
            raise ArtifactError(f"cannot read tokenizer {tokenizer_json}: {exc}; re-export the tokenizer") from exc
        self.settings = dict(settings)
        self._backend.encode_special_tokens = bool(settings["split_special_tokens"])
        self._configured_length: int | None = None

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        """Read `tokenizer.json` and `tokenizer_settings.json` from one directory."""
        directory = Path(directory)
        for name in (TOKENIZER_FILE, SETTINGS_FILE):
            if not (directory / name).is_file():
                raise ArtifactError(f"{directory / name} is missing; re-export the tokenizer into {directory}")
        settings = json.loads((directory / SETTINGS_FILE).read_text())
        return cls(directory / TOKENIZER_FILE, settings)

    @property
    def max_length(self) -> int:
        return int(self.settings["max_length"])

    def _configure(self, length: int) -> None:
        if self._configured_length == length:
            return
        s = self.settings
        self._backend.enable_truncation(max_length=length, stride=0, strategy="longest_first",
                                        direction=s["truncation_side"])
        self._backend.enable_padding(length=length, direction=s["padding_side"], pad_id=int(s["pad_token_id"]),
                                     pad_token=str(s["pad_token"]), pad_type_id=int(s["pad_token_type_id"]))
        self._configured_length = length

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask`, int64 [B, max_length] (a single string gives B = 1)."""
        batch = [texts] if isinstance(texts, str) else list(texts) if isinstance(texts, (list, tuple)) else [texts]
        bad = [type(t).__name__ for t in batch if not isinstance(t, str)]
        if bad or not batch:
            raise InputError(f"prompts must be a string or a non-empty list of strings, got {bad or 'nothing'}")
        length = self.max_length if max_length is None else int(max_length)
        if length < 1:
            raise InputError(f"max_length must be positive, got {length}")
        self._configure(length)
        encodings = self._backend.encode_batch(batch, add_special_tokens=bool(self.settings["add_special_tokens"]))
        if any(len(e.ids) != length for e in encodings):
            # tokenizers (and transformers) leave a sequence untruncated when the special tokens alone exceed it
            raise InputError(f"max_length {length} is too short for this tokenizer's special tokens; use a longer one")
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return {"input_ids": ids, "attention_mask": mask}
