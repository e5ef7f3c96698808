"""Where calibration and evaluation prompts come from, and how they become embeddings.

`--prompts` is a .txt file (one prompt per line), `default` (the shipped prompt set), free text
(one prompt), or a safetensors file of embeddings (`embeds`, optional `negative`). Text is encoded
with the model's own text encoder(s): a pipeline directory's through diffusers, the test beds'
with the shipped MiniLM. A model that has neither (a bare transformer or config) needs an
embeddings file or an explicit `--random-embeddings`: random embeddings calibrate nothing a user
will run, so they are never the silent default."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ditbake.runtime.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "default.txt"
DEFAULT_CALIBRATION_PROMPTS = 8  # of the default set, spread over it: calibration costs a trajectory each
MINILM_DIM = 384


def default_prompts(n: int | None = None) -> list[str]:
    """The shipped prompt set (a few dozen varied video and image prompts), or `n` of them spread over it."""
    lines = [ln.strip() for ln in DEFAULT_PROMPTS.read_text().splitlines() if ln.strip()]
    if n is None or n >= len(lines):
        return lines
    return [lines[(k * len(lines)) // n] for k in range(n)]


def testbed_prompts(n: int) -> list[str]:
    """`n` training captions of the test-bed video data, spread over the set: held out by no split rule,
    so calibration never sees an evaluation caption of either bed (v1 for testbed-wan, v2 for wan16k)."""
    from ditbake.exporter.testbed import data  # noqa: PLC0415

    train = [i for i in range(data.num_captions("video"))
             if not any(data.is_held_out(i, rule) for rule in data.HELD_OUT_RULES)]
    picks = [train[(k * len(train)) // n + len(train) // (2 * n)] for k in range(min(n, len(train)))]
    return [data.caption_from_attributes("video", data.attributes_of("video", i)) for i in picks]


def is_embeddings_file(arg: str | None) -> bool:
    return bool(arg) and Path(arg).suffix == ".safetensors"


def read_prompts(arg: str | list[str] | None) -> list[str] | None:
    """Prompts from `--prompts`: None when absent or an embeddings file."""
    if arg is None or is_embeddings_file(arg if isinstance(arg, str) else None):
        return None
    if isinstance(arg, list):
        return [p for a in arg for p in (read_prompts(a) or [])] or None
    if arg == "default":
        return default_prompts()
    path = Path(arg)
    if path.suffix == ".txt":
        if not path.is_file():
            raise InputError(f"prompt file {path} does not exist; pass a .txt with one prompt per line")
        prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        if not prompts:
            raise InputError(f"prompt file {path} holds no prompt (one per line; '#' starts a comment)")
        return prompts
    if not arg.strip():
        raise InputError("--prompts is empty; pass text, a .txt file, 'default' or an embeddings .safetensors")
    return [arg]


@dataclass
class Conditioning:
    embeds: torch.Tensor  # [N, L, D]
    negative: torch.Tensor | None  # [N or 1, L, D]
    pooled: torch.Tensor | None = None  # [N, P] (SD3, Flux pipelines)
    negative_pooled: torch.Tensor | None = None
    prompts: tuple[str, ...] = ()
    origin: str = ""  # how they were made, recorded in the calibration


def conditioning(model: str, text_dim: int, text_len: int, *, prompts_arg, negative_prompt: str = "",
                 num_prompts: int | None = None, random_embeddings: bool = False, seed: int = 0,
                 pooled_dim: int | None = None) -> Conditioning:
    """Embeddings for calibrating `model` (see module doc for the rules). `pooled_dim`: the model takes a
    separate pooled vector of that size (SD3, Flux), drawn at random with random embeddings."""
    from ditbake.exporter import calibrate as cal, pipeline  # noqa: PLC0415

    if is_embeddings_file(prompts_arg):
        embeds, negative = cal.load_prompt_embeds(prompts_arg)
        pooled, negative_pooled = cal.load_pooled(prompts_arg)
        return Conditioning(embeds, negative, pooled, negative_pooled, origin=f"embeddings file {prompts_arg}")
    texts = read_prompts(prompts_arg)
    if pipeline.is_pipeline_dir(model):
        if texts is None:
            texts = default_prompts(num_prompts or DEFAULT_CALIBRATION_PROMPTS)
            log.info("no --prompts: calibrating on %d prompts of the shipped default set (%s)", len(texts),
                     DEFAULT_PROMPTS.name)
        elif num_prompts:
            texts = texts[:num_prompts]
        pipe = pipeline.load_pipeline(model)
        enc = pipeline.encode_prompts(pipe, texts, negative_prompt, text_len)
        return Conditioning(enc.embeds, enc.negative, enc.pooled, enc.negative_pooled, tuple(texts),
                            f"{type(pipe).__name__} text encoder(s)")
    if texts is None and text_dim == MINILM_DIM and not random_embeddings:
        texts = testbed_prompts(num_prompts or 2)
        log.info("no --prompts: calibrating the test bed on %d of its training captions", len(texts))
    if texts is None and not random_embeddings:
        raise InputError(f"{model} is not a pipeline directory (no model_index.json), so it has no text encoder to "
                         "calibrate on: pass --prompts EMBEDS.safetensors, point --model at the pipeline directory, "
                         "or pass --random-embeddings explicitly")
    if texts is None:
        n = num_prompts or 2
        log.warning("calibrating on %d random prompt embeddings (--random-embeddings)", n)
        pooled = cal.random_prompt_embeds(n, 1, pooled_dim, seed + 1)[:, 0] if pooled_dim else None
        return Conditioning(cal.random_prompt_embeds(n, text_len, text_dim, seed), None, pooled,
                            origin="random embeddings")
    if text_dim != MINILM_DIM:
        raise InputError(f"text prompts need a text encoder: {model} takes {text_dim}-d text and has none beside it; "
                         "point --model at the pipeline directory or pass --prompts EMBEDS.safetensors")
    from ditbake.runtime.text_encoder import TextEncoder  # noqa: PLC0415 - the test beds' MiniLM

    texts = texts[:num_prompts] if num_prompts else texts
    encoder = TextEncoder.load(max_length=text_len)
    return Conditioning(encoder.encode(texts), encoder.encode([negative_prompt] * len(texts)), prompts=tuple(texts),
                        origin="all-MiniLM-L6-v2 (test bed)")
