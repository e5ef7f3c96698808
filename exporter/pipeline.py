"""A user's diffusers pipeline directory (model_index.json + text encoder(s), tokenizer(s), VAE,
scheduler, transformer): what it holds, how its pixel shapes map to latents, and its prompts
encoded with its own text encoder(s) through the pipeline's `encode_prompt`.

    spec = pipeline_spec("Wan2.1-T2V-1.3B-Diffusers")     # class, architecture, default text length
    pipe = load_pipeline(path)                              # DiffusionPipeline, local files only
    enc = encode_prompts(pipe, ["a cat walks"], negative_prompt="", text_len=512)
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ditbake.runtime.errors import DitbakeError, InputError, UnsupportedModelError

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"


class PipelineError(DitbakeError):
    """The pipeline directory cannot be used (missing component, unsupported pipeline class)."""

    exit_code = 8


@dataclass(frozen=True)
class PipelineSpec:
    """What ditbake knows about one diffusers pipeline class."""

    pipeline_class: str
    architecture: str
    text_encoders: tuple[str, ...]  # component names, in the order encode_prompt uses them
    tokenizers: tuple[str, ...]
    default_text_len: int  # the pipeline's default max_sequence_length (prompt tokens the transformer sees)
    default_cfg: float = 5.0  # the pipeline's default classifier-free guidance scale (1: none)


SPECS = {s.pipeline_class: s for s in (
    PipelineSpec("WanPipeline", "wan", ("text_encoder",), ("tokenizer",), 512, 5.0),
    PipelineSpec("CogVideoXPipeline", "cogvideox", ("text_encoder",), ("tokenizer",), 226, 6.0),
    # SD3: CLIP-L (77) and CLIP-G (77) side by side, then T5 (max_sequence_length 256) along the sequence
    PipelineSpec("StableDiffusion3Pipeline", "sd3", ("text_encoder", "text_encoder_2", "text_encoder_3"),
                 ("tokenizer", "tokenizer_2", "tokenizer_3"), 77 + 256, 7.0),
    # guidance-distilled: no CFG by default (true_cfg_scale 1); the distilled scale is the guidance embedding's
    PipelineSpec("FluxPipeline", "flux", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"), 512, 1.0),
)}


def default_cfg(model: str | Path, fallback: float = 5.0) -> float:
    """The pipeline's default CFG scale for a pipeline directory, else `fallback`."""
    return pipeline_spec(model).default_cfg if is_pipeline_dir(model) else fallback


def is_pipeline_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MODEL_INDEX).is_file()


def model_index(path: str | Path) -> dict:
    try:
        return json.loads((Path(path) / MODEL_INDEX).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{Path(path) / MODEL_INDEX} cannot be read ({exc}); point at a diffusers pipeline "
                            "directory saved with save_pretrained") from exc


def pipeline_spec(path: str | Path) -> PipelineSpec:
    index = model_index(path)
    name = index.get("_class_name", "")
    if name not in SPECS:
        raise UnsupportedModelError(f"pipeline class {name or '(none)'} is not supported; supported: "
                                    f"{', '.join(sorted(SPECS))}")
    spec = SPECS[name]
    for component in (*spec.text_encoders, *spec.tokenizers, "vae", "transformer"):
        entry = index.get(component)
        if not entry or entry[0] is None or not (Path(path) / component).is_dir():
            raise PipelineError(f"pipeline {path} has no {component}/; a {name} needs {component} to go from "
                                "text to frames")
    return spec


def component_config(path: str | Path, component: str) -> dict:
    file = Path(path) / component / "config.json"
    if not file.is_file():
        raise PipelineError(f"{Path(path) / component} has no config.json")
    return json.loads(file.read_text())


def vae_scale_factors(path: str | Path, architecture: str) -> tuple[int, int]:
    """(spatial, temporal) down-sampling of the pipeline's VAE, as the pipeline computes them."""
    c = component_config(path, "vae")
    if architecture == "wan":
        down = c.get("temperal_downsample", [False, True, True])
        return int(c.get("scale_factor_spatial", 2 ** len(down))), int(c.get("scale_factor_temporal", 2 ** sum(down)))
    spatial = 2 ** (len(c.get("block_out_channels", [0, 0, 0, 0])) - 1)
    if architecture == "cogvideox":
        return spatial, int(c.get("temporal_compression_ratio", 4))
    return spatial, 1


def default_pixels(path: str | Path, spec: PipelineSpec) -> str:
    """The pipeline's own default output size, as 'HxWxF'."""
    if spec.architecture == "wan":
        return "480x832x81"
    t = component_config(path, "transformer")
    spatial, _ = vae_scale_factors(path, spec.architecture)
    if spec.architecture == "cogvideox":
        return f"{int(t['sample_height']) * spatial}x{int(t['sample_width']) * spatial}x{int(t['sample_frames'])}"
    if spec.architecture == "sd3":
        side = int(t.get("sample_size", 128)) * spatial
        return f"{side}x{side}"
    return "1024x1024"


def parse_pixels(text: str) -> tuple[int, int, int]:
    """'480x832x81' → (height, width, frames); 'HxW' is an image (1 frame)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 2:
        parts.append(1)
    if len(parts) != 3 or min(parts) < 1:
        raise InputError(f"shape profile {text!r} is not HEIGHTxWIDTHxFRAMES in pixels (e.g. 480x832x81, or "
                         "1024x1024 for an image)")
    return parts[0], parts[1], parts[2]


def latent_dims(path: str | Path, architecture: str, height: int, width: int, frames: int) -> tuple[int, int, int]:
    """Pixel (H, W, frames) → latent (frames, h, w) as the pipeline's prepare_latents computes them."""
    spatial, temporal = vae_scale_factors(path, architecture)
    if architecture == "flux":  # packed 2×2: the pipeline rounds to a multiple of 2·scale
        h, w = 2 * (height // (spatial * 2)), 2 * (width // (spatial * 2))
    else:
        h, w = height // spatial, width // spatial
    f = (frames - 1) // temporal + 1 if architecture in ("wan", "cogvideox") else 1
    if min(h, w, f) < 1 or height % spatial or width % spatial:
        raise InputError(f"{height}x{width} is not a multiple of the VAE's {spatial}-pixel down-sampling")
    return f, h, w


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, with_transformer: bool = False):
    """The DiffusionPipeline in `path` (local files only). Without the transformer by default:
    calibration and build load it on their own (models.load) and need only the text side here."""
    import diffusers  # noqa: PLC0415

    spec = pipeline_spec(path)
    cls = getattr(diffusers, spec.pipeline_class)
    kwargs = {} if with_transformer else {"transformer": None}
    log.info("loading %s from %s", spec.pipeline_class, path)
    try:
        with warnings.catch_warnings():  # newer diffusers rename torch_dtype; the supported minimum knows only it
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipe = cls.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype, **kwargs)
            if dtype != torch.float32:  # the VAE decodes in fp32 (as the Wan and CogVideoX authors run it)
                pipe.vae = type(pipe.vae).from_pretrained(str(Path(path) / "vae"), local_files_only=True,
                                                          torch_dtype=torch.float32)
    except (OSError, ValueError, TypeError) as exc:
        raise PipelineError(f"cannot load {spec.pipeline_class} from {path}: {exc}") from exc
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class PromptEmbeds:
    """Per-token embeddings [N, L, D] for prompts and negatives; pooled vectors [N, P] where the
    architecture has them (SD3, Flux)."""

    embeds: torch.Tensor
    negative: torch.Tensor
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], negative_prompt: str = "", text_len: int | None = None) -> PromptEmbeds:
    """Prompts and the negative prompt through the pipeline's own encode_prompt."""
    name = type(pipe).__name__
    spec = SPECS[name]
    n = len(prompts)
    negatives = [negative_prompt] * n
    length = text_len or spec.default_text_len
    if spec.architecture in ("wan", "cogvideox"):
        embeds, negative = pipe.encode_prompt(prompts, negatives, do_classifier_free_guidance=True,
                                              max_sequence_length=length, device="cpu")
        return PromptEmbeds(embeds.float(), negative.float())
    if spec.architecture == "sd3":
        t5_len = length - 77
        if t5_len < 1:
            raise InputError(f"SD3 text length {length} must exceed CLIP's 77 tokens (77 + T5 tokens)")
        e, ne, p, npool = pipe.encode_prompt(prompts, None, None, negative_prompt=negatives,
                                             do_classifier_free_guidance=True, max_sequence_length=t5_len,
                                             device="cpu")
        return PromptEmbeds(e.float(), ne.float(), p.float(), npool.float())
    # Flux: T5 tokens + CLIP pooled; the negative is encoded the same way (used with true CFG)
    e, p, _ = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=length)
    ne, npool, _ = pipe.encode_prompt(negatives, None, device="cpu", max_sequence_length=length)
    return PromptEmbeds(e.float(), ne.float(), p.float(), npool.float())
