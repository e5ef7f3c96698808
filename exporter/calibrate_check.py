"""Validation of a calibration: its metadata's JSON types and ranges, its tensors' shapes, and
(before a build) that it was taken on the model being built.

META_FIELDS lists every metadata field with its JSON types (the adversarial tests enumerate it).
"""
from __future__ import annotations

import math

import torch

from ditbake.exporter.calibrate import CalibrationError
from ditbake.runtime.arch import ARCHITECTURES
from ditbake.runtime.safe_io import strict_int

_INT, _STR, _LIST, _DICT, _NUM = (int,), (str,), (list,), (dict,), (int, float)
META_FIELDS = {
    "source": _STR, "architecture": _STR, "num_blocks": _INT, "linear_layers": _LIST, "attention_sites": _DICT,
    "sampler": _STR, "num_steps": _INT, "guidance_scale": _NUM, "seed": _INT, "num_prompts": _INT,
    "branches": _LIST, "latent_shape": _LIST, "text_len": _INT,
}
OPTIONAL_FIELDS = {"weights_seed": _INT, "dtype": _STR, "heads": _DICT, "diffusers_class": _STR, "layout": _DICT,
                   "absent_linears": _LIST}
# tensors every calibration holds, laid out [prompt, branch, step, block]
CORE_TENSORS = ("gamma", "delta_l1", "delta_change")
MAX = 1 << 20


def _typed(meta: dict, key: str, types, where) -> None:
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise CalibrationError(f"{where}: {key!r} must be {'/'.join(t.__name__ for t in types)}, got "
                               f"{type(value).__name__} {str(value)[:40]!r}; re-run `ditbake calibrate`")


def check_meta(meta, where) -> None:
    if not isinstance(meta, dict):
        raise CalibrationError(f"{where} is not a JSON object; re-run `ditbake calibrate`")
    for key, types in META_FIELDS.items():
        if key not in meta:
            raise CalibrationError(f"{where} lacks {key!r}; re-run `ditbake calibrate`")
        _typed(meta, key, types, where)
    for key, types in OPTIONAL_FIELDS.items():
        if key in meta:
            _typed(meta, key, types, where)

    def n(key, lo=1, hi=MAX):
        strict_int(meta[key], f"{where}: {key}", lo, hi, CalibrationError)

    for key in ("num_blocks", "num_steps", "num_prompts", "text_len"):
        n(key)
    if not math.isfinite(meta["guidance_scale"]):
        raise CalibrationError(f"{where}: guidance_scale is {meta['guidance_scale']}; re-run `ditbake calibrate`")
    for key in ("source", "architecture", "sampler"):
        if any(ord(c) < 32 for c in meta[key]) or len(meta[key]) > 4096:
            raise CalibrationError(f"{where}: {key} holds control characters or is too long; re-run `ditbake calibrate`")
    n("seed", 0, 2**63 - 1)
    if "weights_seed" in meta:
        n("weights_seed", 0, 2**63 - 1)
    if meta["architecture"] not in ARCHITECTURES:
        raise CalibrationError(f"{where}: architecture {meta['architecture'][:40]!r} is not one ditbake knows "
                               f"({sorted(ARCHITECTURES)}); re-run `ditbake calibrate`")
    if not meta["linear_layers"] or not meta["attention_sites"]:
        raise CalibrationError(f"{where}: linear_layers and attention_sites must not be empty; re-run "
                               "`ditbake calibrate`")
    if not 2 <= len(meta["latent_shape"]) <= 6:
        raise CalibrationError(f"{where}: latent_shape {meta['latent_shape'][:8]} must have 2 to 6 dimensions")
    for d in meta["latent_shape"]:
        strict_int(d, f"{where}: latent_shape entry", 1, MAX, CalibrationError)
    if math.prod(meta["latent_shape"]) > 1 << 36:
        raise CalibrationError(f"{where}: latent_shape {meta['latent_shape']} is absurdly large")
    if not meta["branches"] or any(b not in ("cond", "uncond") for b in meta["branches"]):
        raise CalibrationError(f"{where}: branches must be ['cond'] or ['cond', 'uncond']")
    if any(not isinstance(x, str) for x in meta["linear_layers"]):
        raise CalibrationError(f"{where}: linear_layers must be strings")
    for site, heads in meta["attention_sites"].items():
        strict_int(heads, f"{where}: attention_sites[{site[:40]!r}]", 1, 1 << 16, CalibrationError)
    for pair in meta.get("absent_linears", ()):
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], str)
                and pair[1] in meta["linear_layers"]):
            raise CalibrationError(f"{where}: absent_linears entry {str(pair)[:60]} is not [block, listed layer]; "
                                   "re-run `ditbake calibrate`")
        strict_int(pair[0], f"{where}: absent_linears block", 0, meta["num_blocks"] - 1, CalibrationError)


def absent_linears(meta: dict) -> set[tuple[int, str]]:
    """(block, layer) pairs of the listed linears a block does not have (none in older calibrations:
    they listed only layers every block has)."""
    return {(int(b), name) for b, name in meta.get("absent_linears", ())}


def check_tensors(meta: dict, tensors: dict[str, torch.Tensor], where) -> None:
    shape = (meta["num_prompts"], len(meta["branches"]), meta["num_steps"], meta["num_blocks"])
    for name in CORE_TENSORS:
        t = tensors.get(name)
        if t is None:
            raise CalibrationError(f"{where} lacks the {name!r} tensor; re-run `ditbake calibrate`")
        if tuple(t.shape) != shape or not t.is_floating_point():
            raise CalibrationError(f"{where}: {name} is {t.dtype} {list(t.shape)}, the metadata says float "
                                   f"{list(shape)}; re-run `ditbake calibrate`")


def check_fits_model(meta: dict, adapter) -> None:
    """The calibration was taken on this model (architecture, blocks, layers, heads, latent rank
    and channels): building from another model's calibration is refused before any work."""
    facts = [("architecture", meta["architecture"], adapter.architecture),
             ("num_blocks", meta["num_blocks"], adapter.num_blocks),
             ("linear_layers", sorted(meta["linear_layers"]), sorted(adapter.linear_layers)),
             ("absent linears", sorted(absent_linears(meta)), sorted(adapter.absent_linears)),
             ("attention_sites", meta["attention_sites"], dict(adapter.attention_sites))]
    small, large = adapter.latent_shape(1, 1, 1), adapter.latent_shape(2, 3, 5)
    facts.append(("latent rank", len(meta["latent_shape"]), len(small)))
    if len(meta["latent_shape"]) == len(small):  # the dimensions that do not vary with the shape: channels
        fixed = [i for i, (a, b) in enumerate(zip(small, large)) if a == b]
        facts.append(("latent channels", [meta["latent_shape"][i] for i in fixed], [small[i] for i in fixed]))
    for what, theirs, ours in facts:
        if theirs != ours:
            raise CalibrationError(f"the calibration was taken on another model: its {what} is {theirs}, the model's "
                                   f"is {ours}; run `ditbake calibrate` on this model")
