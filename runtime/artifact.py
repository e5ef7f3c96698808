"""Artifact format v1: reading and validation (the writer is exporter/build.py).

    artifact/
      manifest.json          format, version, producer, model, profiles, sampler(s), plan file,
                             engines, and the sha256 of every other file
      plan.json
      weights.safetensors    weights stored once, whatever the number of variants
      engines/               one file per variant and backend (none for the eager backend)

Everything is JSON or safetensors: nothing is unpickled. Hashes are checked on load.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ditbake.runtime import arch as runtime_arch, weights_4bit
from ditbake.runtime.errors import ArtifactError
from ditbake.runtime.plan import Plan
from ditbake.runtime.safe_io import MAX_JSON_BYTES, check_relative_name, read_json
from ditbake.runtime.sampler import SamplerTable
from ditbake.runtime.validate import check_fits_model, check_manifest

FORMAT = "ditbake-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
PLAN = "plan.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# digests of files verified in this process, by identity and change time: a file re-read right
# after `verify_files` (an engine at load) is not hashed twice; any write changes its ctime
_verified: dict[tuple, str] = {}


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _checked_digest(file: Path) -> str:
    key = _identity(os.stat(file))
    digest = _verified.get(key)
    if digest is None:
        digest = sha256_file(file)
        if _identity(os.stat(file)) == key:
            _verified[key] = digest
    return digest


def indexed_file(path: str | Path, manifest: dict, rel, what: str = "file") -> Path:
    """The file `rel` of the artifact at `path`, for the runtime to open: a relative name listed in
    the manifest's `files`, resolving (symlinks included) inside the artifact, a regular file, and
    with its recorded sha256. Every file the runtime reads, engines included, comes through here."""
    path = Path(path)
    check_relative_name(rel, f"artifact {what}")
    meta = manifest["files"].get(rel)
    if meta is None:
        raise ArtifactError(f"artifact {what} {rel[:80]!r} is not listed (with its sha256) in the manifest; "
                            "refusing to open it, rebuild the artifact")
    root = path.resolve()
    file = (path / rel).resolve()
    if root not in file.parents:
        raise ArtifactError(f"manifest names {rel[:80]!r} outside the artifact; refusing to read it")
    if not file.is_file():
        raise ArtifactError(f"artifact file {rel} is missing from {path} or not a regular file; rebuild or "
                            "re-unpack the artifact")
    if file.stat().st_size != meta.get("bytes"):
        raise ArtifactError(f"artifact file {rel} is {file.stat().st_size} bytes but the manifest records "
                            f"{meta.get('bytes')}; it was modified or truncated, rebuild the artifact")
    digest = _checked_digest(file)
    if digest != meta.get("sha256"):
        raise ArtifactError(f"sha256 mismatch for {rel} (expected {str(meta.get('sha256'))[:12]}…, got "
                            f"{digest[:12]}…): the file was modified or corrupted; rebuild the artifact")
    return file


@dataclass(frozen=True)
class Profile:
    """A shape the artifact supports: one sample's latent shape and the text length."""

    name: str
    latent_shape: tuple[int, ...]
    text_len: int

    def to_json(self) -> dict:
        return {"name": self.name, "latent_shape": list(self.latent_shape), "text_len": self.text_len}


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict
    plan: Plan
    samplers: dict[str, SamplerTable]
    profiles: tuple[Profile, ...]
    weights: dict[str, torch.Tensor]
    # (sampler, profile) → table, for samplers whose timesteps depend on the profile (Flux's
    # resolution-dependent shift); the others use `samplers[name]` for every profile
    profile_samplers: dict[tuple[str, str], SamplerTable] = field(default_factory=dict)

    def sampler(self, name: str, profile: str) -> SamplerTable:
        return self.profile_samplers.get((name, profile), self.samplers[name])

    @property
    def architecture(self) -> str:
        return self.manifest["model"]["architecture"]

    @property
    def config(self) -> dict:
        return self.manifest["model"]["config"]

    @property
    def default_sampler(self) -> str:
        return self.manifest["default_sampler"]


def read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise ArtifactError(f"artifact {path} does not exist or is not a directory; build it with `ditbake build`")
    mpath = path / MANIFEST
    if not os.path.lexists(mpath):
        raise ArtifactError(f"{path} has no {MANIFEST}; it is not a ditbake artifact (rebuild it)")
    manifest = read_json(mpath, "artifact manifest", ArtifactError, MAX_JSON_BYTES)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath} is not a ditbake manifest (format {manifest.get('format')!r}); rebuild it")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact format version {version!r} is not supported by this runtime (reads "
                            f"version {FORMAT_VERSION}); rebuild the artifact or install a matching ditbake")
    return check_manifest(manifest, str(mpath))


def verify_files(path: Path, manifest: dict) -> None:
    """Every file the manifest indexes exists and has its recorded sha256; no path escapes."""
    for rel in manifest["files"]:
        indexed_file(path, manifest, rel)


def load_artifact(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Artifact:
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    for required in (WEIGHTS, manifest["plan_file"]):
        if required not in manifest["files"]:
            raise ArtifactError(f"manifest does not index {required}; rebuild the artifact")
    try:
        weights = load_file(str(indexed_file(path, manifest, WEIGHTS) if verify else path / WEIGHTS),
                            device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{WEIGHTS} cannot be read ({exc}); rebuild the artifact") from exc
    plan = Plan.load(indexed_file(path, manifest, manifest["plan_file"], "plan") if verify
                     else path / manifest["plan_file"])
    samplers = {name: SamplerTable.from_json(t) for name, t in manifest["samplers"].items()}
    profile_samplers = {(name, prof): SamplerTable.from_json(pt) for name, t in manifest["samplers"].items()
                        for prof, pt in ((t.get("per_profile") if isinstance(t, dict) else None) or {}).items()}
    if manifest["default_sampler"] not in samplers:
        raise ArtifactError(f"default sampler {manifest['default_sampler']!r} is not in the artifact")
    for name, table in [*samplers.items(), *((n, t) for (n, _), t in profile_samplers.items())]:
        if table.num_steps != plan.num_steps:
            raise ArtifactError(f"sampler {name} has {table.num_steps} steps but the plan has {plan.num_steps}")
    try:
        profiles = tuple(Profile(p["name"], tuple(int(x) for x in p["latent_shape"]), int(p["text_len"]))
                         for p in manifest["profiles"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"malformed shape profile in manifest: {exc!r}; rebuild the artifact") from exc
    if not profiles:
        raise ArtifactError("artifact declares no shape profile; rebuild with at least one")
    unknown = {prof for _, prof in profile_samplers} - {p.name for p in profiles}
    if unknown:
        raise ArtifactError(f"sampler tables name unknown shape profiles {sorted(unknown)}; rebuild the artifact")
    check_fits_model(manifest, plan, weights, profiles)
    listed = manifest.get(weights_4bit.MANIFEST_KEY)
    if listed is not None:  # 8-bit layers shipped as NVFP4: made 8-bit here, once
        prefix = runtime_arch.get(manifest["model"]["architecture"]).BLOCK_PREFIX
        weights = weights_4bit.materialize(weights, weights_4bit.check(listed, weights, plan.layer_precisions(prefix)))
    return Artifact(path, manifest, plan, samplers, profiles, weights, profile_samplers)
