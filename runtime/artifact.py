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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ditbake.runtime.errors import ArtifactError
from ditbake.runtime.plan import Plan
from ditbake.runtime.sampler import SamplerTable

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
    if not mpath.exists():
        raise ArtifactError(f"{path} has no {MANIFEST}; it is not a ditbake artifact (rebuild it)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mpath} is not valid JSON; the artifact is corrupted, rebuild it") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath} is not a ditbake manifest (format {manifest.get('format')!r}); rebuild it")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact format version {version!r} is not supported by this runtime (reads "
                            f"version {FORMAT_VERSION}); rebuild the artifact or install a matching ditbake")
    for key in ("model", "files", "profiles", "samplers", "default_sampler", "plan_file"):
        if key not in manifest:
            raise ArtifactError(f"{mpath} lacks the required key {key!r}; rebuild the artifact")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    """Every file the manifest indexes exists and has its recorded sha256; no path escapes."""
    root = path.resolve()
    for rel, meta in manifest["files"].items():
        file = (path / rel).resolve()
        if root not in file.parents:
            raise ArtifactError(f"manifest names {rel!r} outside the artifact; refusing to read it")
        if not file.is_file():
            raise ArtifactError(f"artifact file {rel} is missing from {path}; rebuild or re-unpack the artifact")
        digest = sha256_file(file)
        if digest != meta.get("sha256"):
            raise ArtifactError(f"sha256 mismatch for {rel} (expected {str(meta.get('sha256'))[:12]}…, got "
                                f"{digest[:12]}…): the file was modified or corrupted; rebuild the artifact")


def load_artifact(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Artifact:
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    for required in (WEIGHTS, manifest["plan_file"]):
        if required not in manifest["files"]:
            raise ArtifactError(f"manifest does not index {required}; rebuild the artifact")
    try:
        weights = load_file(str(path / WEIGHTS), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{WEIGHTS} cannot be read ({exc}); rebuild the artifact") from exc
    plan = Plan.load(path / manifest["plan_file"])
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
    return Artifact(path, manifest, plan, samplers, profiles, weights, profile_samplers)
