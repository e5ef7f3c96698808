"""Engines: how the runtime executes prologue, block variants and epilogue.

`EagerEngines` composes the architecture's torch functions (and the plugins' ops) directly.
`AotiEngines` calls AOTInductor packages compiled per (part, block kind, variant, profile) by the
exporter (runtime.arch.block_kind: Flux and SD3 have two kinds of blocks).
Compiled engines take weights as inputs, never as constants, so all blocks that share a
configuration share one engine and the weights exist once in memory. A block engine takes the
weights its variant reads (`variant_weight_names`: for each linear only the stored format the
variant runs it in), so blocks that store other formats besides — a per-block precision plan stores
per block what its steps use — still share it; blocks whose read weights differ (an NVFP4 layer
with the Hadamard folded in one block and not in another) get an engine group each, and the
manifest entry lists the blocks it serves. The positional calling convention below is shared by
the exporter (which compiles against it) and the runtime:

    prologue(latents, timestep, text, *extras, *global weights) -> (hidden, *ctx)
    block(hidden, *ctx, *block weights[, *cached attention]) -> hidden[, *attention outputs]
    epilogue(hidden, *ctx, *global weights) -> model output

A plan that reuses cached heads has its block engines return each compressible site's attention
output (entry outputs `attention.<site>`), which the runtime keeps per (branch, block, site) as the
eager runner does; an engine whose variant reuses heads takes them back (inputs `cached.<site>`).

`extras` are the architecture's further prologue inputs (runtime.arch.extra_inputs): the pooled
text vector [B, P] for SD3 and Flux, then the distilled guidance [B] for guidance-embedding Flux;
none for Wan and CogVideoX.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

from ditbake.plugins.native_loading import NATIVE_OPS, load_native_op
from ditbake.plugins.native_loading import promote_libstdcxx  # noqa: F401 - re-exported for callers
from ditbake.runtime import arch as runtime_arch
from ditbake.runtime.errors import ArtifactError, BackendError
from ditbake.runtime.nn import LINEAR_FORMAT_TENSORS, linear_format
from ditbake.runtime.plan import BlockVariant

log = logging.getLogger(__name__)


def block_weight_names(weights: dict, arch, index: int) -> list[str]:
    """Block `index`'s weights, by name relative to the block, sorted."""
    prefix = f"{arch.BLOCK_PREFIX}{index}."
    return sorted(k[len(prefix):] for k in weights if k.startswith(prefix))


def global_weight_names(weights: dict, arch, profile: str) -> list[str]:
    """Non-block weights plus this profile's shape constants, sorted."""
    mine = f"profile.{profile}."
    return sorted(k for k in weights if not k.startswith(arch.BLOCK_PREFIX)
                  and (not k.startswith("profile.") or k.startswith(mine)))


def profile_weights(weights: dict, arch, profile: str) -> dict:
    return {k: weights[k] for k in global_weight_names(weights, arch, profile)}


def variant_weight_names(weights: dict, arch, config: dict, index: int, variant: BlockVariant) -> list[str]:
    """Block `index`'s stored weights that `variant` reads, by name relative to the block, sorted:
    every tensor that is not a linear's, each linear's bias, and of each of its linears only the
    tensors of the format `quantizable_linear` runs it in at the variant's precision."""
    names = block_weight_names(weights, arch, index)
    stored = set(names)
    precisions = variant.precision_map
    unread = set()
    for layer in runtime_arch.block_linears(arch, config, index):
        fmt = linear_format(stored, layer, precisions.get(layer, "bf16"))
        unread.update(f"{layer}.{s}" for f, suffixes in LINEAR_FORMAT_TENSORS.items() if f != fmt
                      for s in suffixes if s not in LINEAR_FORMAT_TENSORS[fmt])  # nvfp4_8bit shares nvfp4's
    return [n for n in names if n not in unread]


def engine_key(part: str, variant: int | None, profile: str, kind: str | None = None, group: int | None = None) -> str:
    """`block-v3-p0` for the one block kind of Wan/CogVideoX (the key older artifacts hold),
    `block-single-v3-p0` for a named kind (Flux double/single, SD3 joint/joint_pre_only), and
    `block-v3-g1-p0` where the blocks running variant 3 need several engines (their read weights differ)."""
    named = kind is not None and kind != runtime_arch.DEFAULT_BLOCK_KIND
    return (f"{part}" + (f"-{kind}" if named else "") + (f"-v{variant}" if variant is not None else "")
            + (f"-g{group}" if group is not None else "") + f"-{profile}")


def engine_files(artifact_path: Path, entries: list[dict]) -> dict[str, Path]:
    """Every engine file the entries name, resolved inside the artifact, listed in its manifest and
    sha256-checked: native code is loaded only from files the manifest hashes."""
    from ditbake.runtime.artifact import indexed_file, read_manifest  # noqa: PLC0415 - artifact imports plan

    manifest = read_manifest(Path(artifact_path))
    if not isinstance(entries, list) or any(not isinstance(e, dict) for e in entries):
        raise ArtifactError("manifest engines must be a list of objects; rebuild the artifact")
    return {e["file"]: indexed_file(artifact_path, manifest, e.get("file"), "engine")
            for e in entries if e.get("file") is not None}


def load_aoti_package(path: Path, entry: dict, device: torch.device, what: str = "engine"):
    """An AOTInductor package of the artifact (block or component engine), refused with a typed error
    when it was compiled for another device type or this torch cannot load it."""
    built = (entry.get("built_for") or {}).get("device", "cpu")
    if built != device.type:
        raise BackendError(f"{what} {entry['file']} was compiled for {built}, not {device.type}; "
                           f"load with device={built!r} or rebuild the artifact on a {device.type} machine")
    promote_libstdcxx()
    _register_python_ops()
    _load_native_ops(entry, what)
    try:
        # single-threaded: the container's cross-thread event waits are illegal inside a CUDA graph
        # capture, and a session is driven by one thread
        return torch._inductor.aoti_load_package(str(path), run_single_threaded=True)
    except Exception as exc:  # the loader raises RuntimeError and others
        raise BackendError(f"cannot load {what} {entry['file']} ({type(exc).__name__}: {exc}); rebuild it "
                           f"with this torch ({torch.__version__})") from exc


def _register_python_ops() -> None:
    """Off CUDA, packages call the attention references (``ditbake::attention_8bit_reference``,
    ``ditbake::fp8t_attention`` and the like) through the dispatcher: Python ops, which exist in a
    process only once their module is imported; loading the package before fails ('Could not find
    schema'). Importing defines the ops and builds nothing."""
    for module in ("attention_8bit", "attention_8bit_dense", "attention_8bit_band", "cudnn_sdpa"):  # head_attention comes with the first
        importlib.import_module(f"ditbake.plugins.{module}")


def _load_native_ops(entry: dict, what: str) -> None:
    """Engines whose package names ditbake's C++ ops (``native_ops``: the CUTLASS INT8 GEMM, cuDNN
    SDPA), or whose attention the build gave to cuDNN (``attention_kernels``, also in artifacts built
    before ``native_ops``), call them through the dispatcher: load each before the package
    (plugins/native_loading.py), a typed error where this machine cannot."""
    ops = entry.get("native_ops", [])
    if not isinstance(ops, list) or not all(isinstance(op, str) and op in NATIVE_OPS for op in ops):
        raise ArtifactError(f"{what} {entry.get('file')}: native_ops must list names of {sorted(NATIVE_OPS)}, "
                            f"got {ops!r}; rebuild the artifact")
    kernels = entry.get("attention_kernels") or {}
    if not isinstance(kernels, dict) or not all(isinstance(sig, str) and isinstance(k, dict) and
                                                isinstance(k.get("kernel"), str) for sig, k in kernels.items()):
        raise ArtifactError(f"{what} {entry.get('file')}: attention_kernels must map group signatures to "
                            "{\"kernel\": name, \"ms\": ...}; rebuild the artifact")
    if any(k["kernel"] == "cudnn" for k in kernels.values()):
        ops = [*ops, "cudnn_sdpa"]
    for op in dict.fromkeys(ops):
        ok, why = load_native_op(op)
        if not ok:
            raise BackendError(f"{what} {entry['file']} calls ditbake's {op}, which cannot be loaded here: {why}; "
                               f"install ditbake[{NATIVE_OPS[op][1]}] on a GPU it supports or rebuild the artifact here")


class EagerEngines:
    name = "eager"

    def __init__(self, arch, config: dict, weights: dict):
        self.arch, self.config, self.weights = arch, config, weights

    def prologue(self, x, t, text, profile, extras=()):
        return self.arch.prologue(self.weights, self.config, x, t, text, profile.to_json(), *extras)

    def block(self, vid: int, variant: BlockVariant, index: int, h, ctx, attention, branch: str):
        return self.arch.block(self.weights, self.config, index, h, ctx, variant, attention, branch)

    def epilogue(self, h, ctx):
        return self.arch.epilogue(self.weights, self.config, h, ctx)


class AotiEngines:
    """AOTInductor packages listed in the manifest, loaded once; weights passed on every call."""

    name = "aoti"

    def __init__(self, arch, config: dict, weights: dict, artifact_path: Path, entries: list[dict], device):
        self.arch, self.config, self.weights = arch, config, weights
        self.device = torch.device(device)
        self.packages: dict[str, object] = {}
        self.extras = runtime_arch.extra_inputs(arch, config)
        for e in entries:  # engines compiled before the extra inputs existed take none: rebuild them
            if e.get("part") == "prologue" and tuple(e.get("inputs", [])[3:3 + len(self.extras)]) != self.extras:
                raise ArtifactError(f"engine {e.get('file')} predates the {'/'.join(self.extras)} prologue "
                                    "input(s); rebuild the artifact with this ditbake")
        self._block_args: dict[tuple[int, tuple[str, ...]], list[torch.Tensor]] = {}
        self._global_args: dict[str, list[torch.Tensor]] = {}
        self._load(Path(artifact_path), entries)  # files checked (contained, hashed) before anything else
        self._routes = self._block_routes(entries)

    def _block_routes(self, entries: list[dict]) -> dict[tuple[str, int, int], tuple]:
        """(profile, variant, block) → (engine key, the block weights it takes, head-cache sites it
        takes, head-cache sites it returns). Entries without `blocks` serve every block of their kind
        and take all its weights (artifacts built before engines took only what their variant reads)."""
        n = self.arch.num_blocks(self.config)
        routes = {}
        for e in entries:
            if e.get("part") != "block":
                continue
            kind = e.get("block_kind", runtime_arch.DEFAULT_BLOCK_KIND)
            blocks = e.get("blocks")
            if blocks is None:
                blocks = [b for b in range(n) if runtime_arch.block_kind(self.arch, self.config, b) == kind]
            names = None
            if "inputs" in e and e.get("blocks") is not None:
                names = tuple(name[len("block."):] for name in e["inputs"] if name.startswith("block."))
            cache_in = tuple(n[len("cached."):] for n in e.get("inputs", ()) if n.startswith("cached."))
            cache_out = tuple(n[len("attention."):] for n in e.get("outputs", ()) if n.startswith("attention."))
            for b in blocks:
                routes[(e["profile"], e["variant"], b)] = (e["key"], names, cache_in, cache_out)
        return routes

    def _load(self, artifact_path: Path, entries: list[dict]) -> None:
        """Load every engine the manifest lists into self.packages (backends override this)."""
        files = engine_files(artifact_path, entries)
        for e in entries:
            self.packages[e["key"]] = load_aoti_package(files[e["file"]], e, self.device)

    def _engine(self, key: str):
        try:
            return self.packages[key]
        except KeyError:
            raise ArtifactError(f"artifact has no compiled engine {key!r}; rebuild it for this plan and profile") from None

    def _globals(self, profile: str) -> list[torch.Tensor]:
        if profile not in self._global_args:
            self._global_args[profile] = [self.weights[k] for k in global_weight_names(self.weights, self.arch, profile)]
        return self._global_args[profile]

    def _block_weights(self, index: int, names: tuple[str, ...] | None) -> list[torch.Tensor]:
        if (index, names) not in self._block_args:
            prefix = f"{self.arch.BLOCK_PREFIX}{index}."
            chosen = block_weight_names(self.weights, self.arch, index) if names is None else names
            try:
                self._block_args[index, names] = [self.weights[prefix + n] for n in chosen]
            except KeyError as exc:
                raise ArtifactError(f"block {index} does not store {exc.args[0]}, which its engine takes; "
                                    "rebuild the artifact") from None
        return self._block_args[index, names]

    def prologue(self, x, t, text, profile, extras=()):
        outs = self._engine(engine_key("prologue", None, profile.name))(x, t, text, *extras,
                                                                        *self._globals(profile.name))
        h, *ctx_tensors = outs
        ctx = self.arch.unpack_ctx(ctx_tensors, tuple(x.shape), profile.text_len)
        ctx["_profile"] = profile.name
        return h, ctx

    def block(self, vid: int, variant: BlockVariant, index: int, h, ctx, attention, branch: str):
        route = self._routes.get((ctx["_profile"], vid, index))
        if route is None:
            raise ArtifactError(f"artifact has no compiled engine for variant {vid} at block {index} (profile "
                                f"{ctx['_profile']!r}); rebuild it for this plan and profile")
        key, names, cache_in, cache_out = route
        cached = []
        for site in cache_in:
            c = attention.cache.get((branch, index, site))
            if c is None:
                raise BackendError(f"attention site {(branch, index, site)} reuses cached heads before any output "
                                   "was cached; the plan must compute every head at the first step")
            cached.append(c.contiguous())  # the engine reads it with the strides it was traced at
        out = self._engine(key)(h, *self.arch.pack_ctx(ctx), *self._block_weights(index, names), *cached)
        if cache_out:
            out, *attention_outputs = out
            attention.cache.update({(branch, index, site): a for site, a in zip(cache_out, attention_outputs)})
        text_range = self.arch.text_range(self.config, ctx)
        for site, schemes in variant.heads or (("attn1", None),):
            attention.account(schemes, h.shape[0], self.arch.heads(self.config), h.shape[1],
                              int(self.config["attention_head_dim"]), text_range)
        return out[0] if isinstance(out, (list, tuple)) else out

    def epilogue(self, h, ctx):
        engine = self._engine(engine_key("epilogue", None, ctx["_profile"]))
        out = engine(h, *self.arch.pack_ctx(ctx), *self._globals(ctx["_profile"]))
        return out[0] if isinstance(out, (list, tuple)) else out
