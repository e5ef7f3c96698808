"""Validation of what an artifact declares, before anything is computed.

`check_manifest`: every manifest field has its JSON type and a sane range (a typed error, not a
traceback, for `files` as a list, a profile of -1 or 10^12 elements, a NaN sampler coefficient,
a NUL in a file name). Every engine and ONNX file is listed in `files`.

`check_plan_json`: the same for plan.json, with integers strict (a float variant id or tile is
refused, not truncated).

`check_fits_model`: plan, weights and profiles against the model config the manifest records:
architecture, block count, heads per compressible attention site (and compressed heads only on
those sites), linear layers (each present in every block, 16-bit or NVFP4), no block beyond the
last, the attention width = heads × head_dim, the manifest's per-tensor record, and a dry run on
the `meta` device of prologue → one block of each distinct tensor signature → epilogue, which runs
the architecture's own code on shapes only and so catches any missing, transposed or mis-sized
tensor (and any profile the config cannot take) that the first generate would have tripped over.
"""
from __future__ import annotations

import json
import logging
import math
import re

import torch

from ditbake.runtime import arch as runtime_arch
from ditbake.runtime.errors import ArtifactError, BackendError, DitbakeError, PlanError
from ditbake.runtime.safe_io import check_relative_name, strict_int

log = logging.getLogger(__name__)

MAX_DIM = 1 << 20  # one latent or tensor dimension
MAX_ELEMENTS = 1 << 36  # one sample's latents
MAX_COUNT = 1 << 20  # list lengths: steps, variants, blocks, profiles
_SHA = re.compile(r"[0-9a-f]{64}")
_INT32 = (1 << 31) - 1
BACKENDS = ("eager", "aoti", "tensorrt")


def _is(value, types, what: str, error=ArtifactError):
    """`value` if it has one of the JSON `types` (bool is never an int here), else a typed error."""
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = "/".join({dict: "object", list: "array", str: "string", int: "integer", float: "number",
                          bool: "boolean", type(None): "null"}[t] for t in types)
        raise error(f"{what} must be a JSON {names}, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def _name(value, what: str, error=ArtifactError) -> str:
    _is(value, (str,), what, error)
    if not value or len(value) > 255 or any(ord(c) < 32 for c in value):
        raise error(f"{what} {value[:40]!r} must be 1-255 printable characters")
    return value


def _finite(value, what: str) -> float:
    _is(value, (int, float), what)
    if not math.isfinite(value):
        raise ArtifactError(f"{what} is {value}; a baked sampler needs finite coefficients, rebuild the artifact")
    return value


def _profile(p, i: int) -> None:
    what = f"manifest profiles[{i}]"
    _is(p, (dict,), what)
    _name(p.get("name"), f"{what}.name")
    shape = _is(p.get("latent_shape"), (list,), f"{what}.latent_shape")
    if not 2 <= len(shape) <= 6:
        raise ArtifactError(f"{what}.latent_shape has {len(shape)} dimensions; latents have 3 to 5 (with channels)")
    for d in shape:
        strict_int(d, f"{what}.latent_shape entry", 1, MAX_DIM)
    if math.prod(shape) > MAX_ELEMENTS:
        raise ArtifactError(f"{what}.latent_shape {shape} has more than {MAX_ELEMENTS} elements; refusing it")
    strict_int(p.get("text_len"), f"{what}.text_len", 1, MAX_DIM)


def _sampler(name, table) -> None:
    what = f"manifest sampler {str(name)[:40]!r}"
    _name(name, "manifest sampler name")
    _is(table, (dict,), what)
    _name(table.get("name"), f"{what}.name")
    _finite(table.get("init_noise_sigma"), f"{what}.init_noise_sigma")
    steps = _is(table.get("timesteps"), (list,), f"{what}.timesteps")
    if not 1 <= len(steps) <= MAX_COUNT:
        raise ArtifactError(f"{what} has {len(steps)} timesteps; expected 1 to {MAX_COUNT}")
    for t in steps:
        _finite(t, f"{what} timestep")
    for key in ("sample_coeffs", "output_coeffs"):
        rows = _is(table.get(key), (list,), f"{what}.{key}")
        for row in rows:
            for c in _is(row, (list,), f"{what}.{key} row"):
                _finite(c, f"{what}.{key} entry")


def _engine(e, i: int, files: dict) -> None:
    what = f"manifest engines[{i}]"
    _is(e, (dict,), what)
    _is(e.get("key"), (str,), f"{what}.key")
    for field in ("file", "onnx"):
        rel = e.get(field)
        if rel is None:
            continue
        check_relative_name(rel, f"{what}.{field}")
        if rel not in files:
            raise ArtifactError(f"{what}.{field} {rel[:80]!r} is not listed (and hashed) in the manifest's files; "
                                "refusing to load it")
    if e.get("file") is None and e.get("onnx") is None:
        raise ArtifactError(f"{what} names no engine file")
    _is(e.get("built_for") or {}, (dict,), f"{what}.built_for")
    for field in ("inputs", "outputs"):
        if field in e:
            for n in _is(e[field], (list,), f"{what}.{field}"):
                _is(n, (str,), f"{what}.{field} entry")
    if e.get("part") == "block":  # the runtime routes (profile, variant, block) to it
        strict_int(e.get("variant"), f"{what}.variant", 0, 1 << 20, ArtifactError)
        _is(e.get("profile"), (str,), f"{what}.profile")
    if "blocks" in e:  # the blocks a block engine serves (engine groups)
        for b in _is(e["blocks"], (list,), f"{what}.blocks"):
            strict_int(b, f"{what}.blocks entry", 0, 1 << 16, ArtifactError)


def check_manifest(m, where: str = "manifest") -> dict:
    """Types and ranges of every manifest field (not yet the model fit: see check_fits_model)."""
    _is(m, (dict,), where)
    for key, types in (("model", (dict,)), ("files", (dict,)), ("profiles", (list,)), ("samplers", (dict,)),
                       ("default_sampler", (str,)), ("plan_file", (str,))):
        if key not in m:
            raise ArtifactError(f"{where} lacks the required key {key!r}; rebuild the artifact")
        _is(m[key], types, f"{where} {key!r}")
    model = m["model"]
    _is(model.get("architecture"), (str,), f"{where} model.architecture")
    runtime_arch.get(model["architecture"])
    _is(model.get("config"), (dict,), f"{where} model.config")
    for key in ("label", "diffusers_class"):
        _is(model.get(key, ""), (str,), f"{where} model.{key}")
    files = m["files"]
    if len(files) > MAX_COUNT:
        raise ArtifactError(f"{where} lists {len(files)} files; refusing it")
    for rel, meta in files.items():
        check_relative_name(rel, f"{where} file name")
        _is(meta, (dict,), f"{where} files[{rel[:40]!r}]")
        sha = _is(meta.get("sha256"), (str,), f"{where} files[{rel[:40]!r}].sha256")
        if not _SHA.fullmatch(sha):
            raise ArtifactError(f"{where} files[{rel[:40]!r}].sha256 is not 64 lowercase hex digits; rebuild the "
                                "artifact")
        strict_int(meta.get("bytes"), f"{where} files[{rel[:40]!r}].bytes", 0, 1 << 50)
    check_relative_name(m["plan_file"], f"{where} plan_file")
    if not 1 <= len(m["profiles"]) <= 256:
        raise ArtifactError(f"{where} declares {len(m['profiles'])} shape profiles; expected 1 to 256")
    for i, p in enumerate(m["profiles"]):
        _profile(p, i)
    if not m["samplers"]:
        raise ArtifactError(f"{where} bakes no sampler; rebuild the artifact")
    for name, table in m["samplers"].items():
        _sampler(name, table)
    if m["default_sampler"] not in m["samplers"]:
        raise ArtifactError(f"default sampler {m['default_sampler'][:40]!r} is not in the artifact")
    if m.get("backend", "eager") not in BACKENDS:
        raise BackendError(f"{where} backend {str(m.get('backend'))[:40]!r} is not one this runtime has "
                           f"{BACKENDS}; rebuild the artifact or upgrade ditbake")
    _is(m.get("dtype", ""), (str,), f"{where} dtype")
    for i, e in enumerate(_is(m.get("engines", []), (list,), f"{where} engines")):
        _engine(e, i, files)
    _is(m.get("scheduler_config"), (dict, type(None)), f"{where} scheduler_config")
    components = _is(m.get("components"), (dict, type(None)), f"{where} components")  # text encoders, tokenizers, VAE
    for i, e in enumerate(_is((components or {}).get("engines", []), (list,), f"{where} components.engines")):
        _engine(e, i, files)  # compiled text encoder / VAE decoder engines: listed and hashed like the blocks
    te = _is(m.get("text_encoder"), (dict, type(None)), f"{where} text_encoder")
    if te is not None:
        _is(te.get("weights_sha256"), (str,), f"{where} text_encoder.weights_sha256")
        _is(te.get("package", ""), (str,), f"{where} text_encoder.package")
        _is(te.get("negative_prompt", ""), (str,), f"{where} text_encoder.negative_prompt")
        strict_int(te.get("max_length"), f"{where} text_encoder.max_length", 1, MAX_DIM)
    return m


def check_plan_json(d) -> None:
    """JSON types and ranges of a plan document, before the Plan dataclass converts anything."""
    def e(value, types, what):
        return _is(value, types, f"malformed plan: {what}", PlanError)

    def n(value, what, lo=0, hi=MAX_COUNT):
        return strict_int(value, f"plan {what}", lo, hi, PlanError)

    e(d, (dict,), "document")
    e(d.get("architecture"), (str,), "architecture")
    n(d.get("num_blocks"), "num_blocks", 1)
    if "num_steps" in d:
        n(d["num_steps"], "num_steps", 1)
    e(d.get("mode", "baked"), (str,), "mode")
    e(d.get("stack_extrapolation", "none"), (str,), "stack_extrapolation")
    e(d.get("uncond_skip", "residual"), (str,), "uncond_skip")
    for layer in e(d.get("linear_layers"), (list,), "linear_layers"):
        e(layer, (str,), "linear_layers entry")
    for site, count in e(d.get("attention_sites"), (dict,), "attention_sites").items():
        n(count, f"attention_sites[{site[:40]!r}]", 1, 1 << 16)
    variants = e(d.get("variants"), (list,), "variants")
    for i, v in enumerate(variants):
        e(v, (dict,), f"variants[{i}]")
        e(v.get("compute"), (bool,), f"variants[{i}].compute")
        e(v.get("purified", False), (bool,), f"variants[{i}].purified")
        for layer, precision in e(v.get("precisions", {}), (dict,), f"variants[{i}].precisions").items():
            e(precision, (str,), f"variants[{i}].precisions[{layer[:40]!r}]")
        for site, schemes in e(v.get("heads", {}), (dict,), f"variants[{i}].heads").items():
            for s in e(schemes, (list,), f"variants[{i}].heads[{site[:40]!r}]"):
                if not isinstance(s, list) or len(s) not in (3, 4):
                    raise PlanError(f"plan variants[{i}].heads[{site[:40]!r}] entries must be [kind, left, right] "
                                    "or [kind, left, right, precision]")
                e(s[0], (str,), f"variants[{i}] head kind")
                if len(s) == 4:
                    e(s[3], (str,), f"variants[{i}] head precision")
                n(s[1], f"variants[{i}] head width", -_INT32, _INT32)  # the sign is HeadScheme's to refuse
                n(s[2], f"variants[{i}] head width", -_INT32, _INT32)
    for i, step in enumerate(e(d.get("steps"), (list,), "steps")):
        for branch, ids in e(step, (dict,), f"steps[{i}]").items():
            for vid in e(ids, (list,), f"steps[{i}][{branch[:20]!r}]"):
                n(vid, f"steps[{i}] variant id", -MAX_COUNT, MAX_COUNT)  # Plan.validate names unknown ids
    tiles = e(d.get("tiles") or {}, (dict,), "tiles")
    for site, tile in tiles.items():
        if not isinstance(tile, list) or len(tile) != 3:
            raise PlanError(f"plan tiles[{site[:40]!r}] must be [frames, height, width]")
        for t in tile:
            n(t, f"tiles[{site[:40]!r}] entry", 1, MAX_DIM)
    e(d.get("adaptive"), (dict, type(None)), "adaptive")
    e(d.get("predicted") or {}, (dict,), "predicted")


def _config_facts(arch, config: dict) -> tuple[int, int, int]:
    try:
        facts = arch.num_blocks(config), arch.heads(config), int(config["attention_head_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"the manifest's model config lacks or mistypes {exc}; rebuild the artifact") from None
    for value, what in zip(facts, ("num_blocks", "num_attention_heads", "attention_head_dim")):
        if not 1 <= value <= 1 << 16:
            raise ArtifactError(f"model config {what} = {value} is outside [1, 65536]; rebuild the artifact")
    return facts


def _check_plan_fits(arch, config: dict, plan) -> None:
    blocks, heads, _ = _config_facts(arch, config)
    if plan.architecture != arch.NAME:
        raise PlanError(f"the plan is for architecture {plan.architecture!r} but the artifact's model is "
                        f"{arch.NAME!r}; re-run `ditbake plan` on this model's calibration and rebuild")
    if plan.num_blocks != blocks:
        raise PlanError(f"the plan has {plan.num_blocks} blocks but the model config has {blocks}; rebuild the artifact")
    expected = {site: heads for site in arch.COMPRESSIBLE_ATTENTION}
    if dict(plan.attention_sites) != expected:
        raise PlanError(f"the plan's attention sites {dict(plan.attention_sites)} differ from the model's "
                        f"compressible sites {expected} (heads from the config); rebuild the artifact")
    # every layer the architecture lists; a subset is an artifact built when Flux and SD3 planned
    # only the layers every block has (the others run 16-bit, as they did then)
    if not plan.linear_layers or not set(plan.linear_layers) <= set(arch.BLOCK_LINEARS):
        raise PlanError(f"the plan's linear layers differ from {arch.NAME}'s; rebuild the artifact")
    for vid, v in enumerate(plan.variants):
        for site, schemes in v.heads:
            if site not in arch.COMPRESSIBLE_ATTENTION and any(s.kind != "full" or s.precision != "bf16"
                                                                for s in schemes):
                raise PlanError(f"variant {vid} compresses heads of {site!r}, which {arch.NAME} cannot compress "
                                f"(only {arch.COMPRESSIBLE_ATTENTION}); rebuild the artifact")


def _block_of(name: str, prefix: str) -> tuple[int, str] | None:
    if not name.startswith(prefix):
        return None
    index, _, rest = name[len(prefix):].partition(".")
    if not index.isdigit() or not rest:
        raise ArtifactError(f"weight {name[:80]!r} has no block index; rebuild the artifact")
    return int(index), rest


def _per_block(arch, config: dict, weights: dict) -> dict[int, dict[str, tuple]]:
    blocks = _config_facts(arch, config)[0]
    per_block: dict[int, dict[str, tuple]] = {b: {} for b in range(blocks)}
    for name, t in weights.items():
        found = _block_of(name, arch.BLOCK_PREFIX)
        if found is None:
            continue
        index, rest = found
        if index >= blocks:
            raise ArtifactError(f"weight {name} belongs to block {index} but the model config has {blocks} blocks; "
                                "rebuild the artifact")
        per_block[index][rest] = (tuple(t.shape), t.dtype)
    return per_block


def _planned_linears(arch, config: dict, plan, block: int) -> list[str]:
    """The plan's linear layers that block `block` has (Flux's two kinds, SD3's last block)."""
    have = set(runtime_arch.block_linears(arch, config, block))
    return [layer for layer in plan.linear_layers if layer in have]


def _check_weights(arch, config: dict, plan, weights: dict, manifest: dict) -> dict[int, dict[str, tuple]]:
    """Names every architecture needs (each linear layer in every block, 16-bit or NVFP4), nothing
    beyond the last block, the attention width, the manifest's tensor record."""
    _, heads, head_dim = _config_facts(arch, config)
    per_block = _per_block(arch, config, weights)
    for b, names in per_block.items():
        for layer in _planned_linears(arch, config, plan, b):
            if not {layer + ".weight", layer + ".nvfp4_packed", layer + ".fp8_weight", layer + ".int8_weight"} & set(names):
                raise ArtifactError(f"block {b} has no weight for linear layer {layer}; rebuild the artifact")
        for site in arch.COMPRESSIBLE_ATTENTION:
            q = (names.get(f"{site}.to_q.weight") or names.get(f"{site}.to_q.nvfp4_packed")
                 or names.get(f"{site}.to_q.fp8_weight") or names.get(f"{site}.to_q.int8_weight"))
            if q is not None and q[0][0] != heads * head_dim:
                raise ArtifactError(f"block {b} {site}.to_q gives {q[0][0]} features but the config's {heads} heads "
                                    f"× {head_dim} need {heads * head_dim}; rebuild the artifact")
    recorded = manifest.get("tensors")
    if recorded is not None:
        _is(recorded, (dict,), "manifest tensors")
        actual = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in weights.items()}
        if recorded != actual:
            diff = sorted(set(recorded) ^ set(actual)) or sorted(k for k in actual if recorded[k] != actual[k])
            raise ArtifactError(f"{diff[:3]} in weights.safetensors differ from the manifest's tensor record; the "
                                "weights were replaced, rebuild the artifact")
    return per_block


_dry_runs_passed: set[str] = set()  # shape signatures already dry-run in this process


def _representatives(arch, config: dict, plan, per_block: dict) -> list[int]:
    """One block of each distinct tensor signature (names, shapes, dtypes; NVFP4 copies aside, as
    quantization differs per block on purpose), among blocks whose linears keep their 16-bit
    weight (the plain variant runs those). Blocks of one signature run the same code on the same
    shapes, so one dry run covers them all: a block with a tensor missing, extra, resized or
    transposed has a signature of its own and is run itself."""
    kind = getattr(arch, "is_single", lambda config, b: False)
    seen, chosen = set(), []
    for b, names in per_block.items():
        if not all(layer + ".weight" in names for layer in _planned_linears(arch, config, plan, b)):
            continue
        signature = (kind(config, b), tuple(sorted((n, v) for n, v in names.items() if ".nvfp4_" not in n)))
        if signature not in seen:
            seen.add(signature)
            chosen.append(b)
    return chosen


def _dry_run(arch, config: dict, plan, weights: dict, profiles, dtype: torch.dtype, per_block: dict) -> None:
    """prologue → one block of each signature → epilogue on the meta device (shapes only, no data);
    a passed signature is remembered, since meta ops cost ~1-10 ms each."""
    from ditbake.runtime.attention import AttentionRunner  # noqa: PLC0415
    from ditbake.runtime.plan import BlockVariant  # noqa: PLC0415

    blocks = _representatives(arch, config, plan, per_block)
    if not blocks:
        log.debug("dry run skipped: every block stores some layer in NVFP4 only")
        return
    signature = json.dumps([arch.NAME, config, sorted((k, list(v.shape), str(v.dtype)) for k, v in weights.items()),
                            [p.to_json() for p in profiles], [list(t) for t in plan.tiles], str(dtype)],
                           sort_keys=True, default=str)
    if signature in _dry_runs_passed:
        return
    from ditbake.runtime.arch import extra_inputs  # noqa: PLC0415
    from ditbake.runtime.nn import is_quantized_tensor  # noqa: PLC0415

    meta = {k: torch.empty(v.shape, dtype=dtype if v.is_floating_point() and not is_quantized_tensor(k) else v.dtype,
                           device="meta") for k, v in weights.items()}
    # the prologue's extra conditioning (SD3/Flux pooled vector, Flux distilled guidance) as meta tensors
    extras = tuple(torch.empty((1, arch.pooled_dim(config)), dtype=dtype, device="meta") if name == "pooled"
                   else torch.empty((1,), device="meta") for name in extra_inputs(arch, config))
    for profile in profiles:
        try:
            text_dim = arch.text_dim(config) if hasattr(arch, "text_dim") else int(config.get("text_dim", config.get(
                "text_embed_dim", 0)))
            x = torch.empty((1, *profile.latent_shape), device="meta")
            t = torch.empty((1,), device="meta")
            text = torch.empty((1, profile.text_len, text_dim), dtype=dtype, device="meta")
            h, ctx = arch.prologue(meta, config, x.to(dtype), t, text, profile.to_json(), *extras)
            attention = AttentionRunner(tiles=dict(plan.tiles))
            for b in blocks:
                h = arch.block(meta, config, b, h, ctx, BlockVariant(), attention, "cond")
            out = arch.epilogue(meta, config, h, ctx)
        except (NotImplementedError, ImportError) as exc:  # no meta kernel, or its machinery is absent
            log.debug("dry run skipped (%s)", exc)
            return
        except DitbakeError:
            raise
        except Exception as exc:  # noqa: BLE001 - any shape or config error of the architecture's code
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"the weights or model config do not fit for profile {profile.name} "
                                f"({type(exc).__name__}: {first}); rebuild the artifact") from None
        if tuple(out.shape) != (1, *profile.latent_shape):
            raise ArtifactError(f"the model maps profile {profile.name}'s latents {list(profile.latent_shape)} to "
                                f"{list(out.shape[1:])}; the profile does not fit the model config, rebuild")
    _dry_runs_passed.add(signature)


def check_fits_model(manifest: dict, plan, weights: dict, profiles) -> None:
    arch = runtime_arch.get(manifest["model"]["architecture"])
    config = manifest["model"]["config"]
    _check_plan_fits(arch, config, plan)
    for p in profiles:
        want = len(arch.latent_shape(config, 1, 1, 1)) if _try(lambda: arch.latent_shape(config, 1, 1, 1)) else None
        if want is not None and len(p.latent_shape) != want:
            raise ArtifactError(f"profile {p.name} has a {len(p.latent_shape)}-d latent shape; {arch.NAME} latents "
                                f"are {want}-d")
    per_block = _check_weights(arch, config, plan, weights, manifest)
    stored = {t.dtype for t in weights.values() if t.is_floating_point()}
    _dry_run(arch, config, plan, weights, profiles, torch.bfloat16 if torch.bfloat16 in stored else torch.float32,
             per_block)


def _try(fn) -> bool:
    try:
        fn()
        return True
    except (KeyError, TypeError, ValueError):
        return False
