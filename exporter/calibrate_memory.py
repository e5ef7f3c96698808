"""How many prompts one calibration forward can batch: a documented estimate of the memory each
prompt adds, against the device's free memory.

Per prompt, with T tokens (text + visual), model width W (heads × head dim), FFN width F, model
dtype size s, blocks L and CFG branches R:

base pass (`calibrate`)
  - the previous step's Δ per branch and block, kept in fp32 for Δ-change:   R · L · T · W · 4
  - the forward's own peak inside a block (hidden, modulated input, q/k/v, attention output,
    FFN hidden and its GELU):                                                T · (6·W + 2·F) · s
  - Γ/Δ hook temporaries (input, output, Δ in fp32, one |·|):                4 · T · W · 4
  - each further observer (the precision one: |layer input| in the model dtype, widest
    input F; its E_rel works on a strided subset of ≤ 1024 tokens):          T · F · s
head search (`calibrate_heads`, all prompts in one batch: its MILP needs every prompt's error)
  - the head cache per branch and block (cached candidates):                 R · L · T · W · s
  - the forward's peak as above, plus full attention, each candidate's
    output and the chosen one (C candidates):                                (C + 1) · T · W · s
  - error temporaries (two fp32 casts and the squared difference):           3 · T · W · 4

Not per prompt: the precision observer's quantized weight copies (≈ 6 bytes per weight element;
calibrate_precision.PrecisionObserverConfig.weight_cache_bytes) are made when it starts, before the
batch size is read from the free memory, and on CUDA take at most a quarter of it by default; layers
beyond that re-quantize their weight at each call (a transient of one layer's copies).

Attention adds nothing per token pair (flash kernels; the head search's block-sparse op or its
[chunk, S] tiles). On CUDA the base pass batch is the largest that fits 90 % of the free memory
after the model is loaded; on the CPU every prompt goes in one batch. For Wan2.1-1.3B at
480×832×81 (T = 32,760, W = 1536, F = 8960, L = 30, R = 2, bf16) the base pass needs ≈ 14.7 GB
per prompt (of which the Δ cache 12.1 GB), 15.3 GB with precision statistics, so an 80 GB H100
batches 4 prompts; the head search needs ≈ 9 GB per prompt (head cache 6 GB).
"""
from __future__ import annotations

import logging
import os

import torch

from ditbake.exporter.models import compute_dtype

log = logging.getLogger(__name__)

HEADROOM = 0.9


def _dims(adapter, latent, text_len) -> tuple[int, int, int, int, int]:
    layout = adapter.token_layout(tuple(latent), text_len)
    tokens = (layout.text[1] - layout.text[0]) + (layout.visual[1] - layout.visual[0])
    c = adapter.config
    width = int(c["num_attention_heads"]) * int(c["attention_head_dim"])
    ffn = int(c.get("ffn_dim") or 4 * width)
    size = torch.empty((), dtype=compute_dtype(adapter.model)).element_size()
    return tokens, width, ffn, adapter.num_blocks, size


def base_prompt_bytes(adapter, latent, text_len, branches: int, extra_observers: int) -> int:
    t, w, f, blocks, s = _dims(adapter, latent, text_len)
    return branches * blocks * t * w * 4 + t * (6 * w + 2 * f) * s + 4 * t * w * 4 + extra_observers * t * f * s


def heads_prompt_bytes(adapter, latent, text_len, branches: int, candidates: int, caching: bool) -> int:
    t, w, f, blocks, s = _dims(adapter, latent, text_len)
    cache = branches * blocks * t * w * s if caching else 0
    return cache + t * (6 * w + 2 * f) * s + (candidates + 1) * t * w * s + 3 * t * w * 4


def free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if "expandable_segments:True" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return int(free)  # fixed segments: held-but-unused blocks are fragments a GB-sized tensor may not fit
    # expandable segments: blocks torch's caching allocator holds but no tensor uses are free to this process too
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def base_batch_size(adapter, latent, text_len, prompts: int, branches: int, extra_observers: int) -> int:
    """Prompts per base-pass forward: all on the CPU, as many as fit on CUDA (at least 1)."""
    device = next(adapter.model.parameters()).device
    free = free_bytes(device)
    if free is None:
        return prompts
    per_prompt = base_prompt_bytes(adapter, latent, text_len, branches, extra_observers)
    batch = max(1, min(prompts, int(HEADROOM * free // per_prompt)))
    log.info("base pass: %.1f GB free on %s, ≈ %.1f GB per prompt → %d prompts per batch", free / 1e9, device,
             per_prompt / 1e9, batch)
    return batch


def check_heads_fit(adapter, latent, text_len, prompts: int, branches: int, candidates: int, caching: bool) -> None:
    """Warn when the head search's estimate exceeds the free memory (it cannot split prompts)."""
    device = next(adapter.model.parameters()).device
    free = free_bytes(device)
    need = prompts * heads_prompt_bytes(adapter, latent, text_len, branches, candidates, caching)
    if free is not None and need > HEADROOM * free:
        log.warning("head search: ≈ %.1f GB for %d prompts but %.1f GB free on %s; it may run out of memory "
                    "(calibrate fewer prompts, or --heads-no-cache)", need / 1e9, prompts, free / 1e9, device)
