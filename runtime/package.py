"""Ship an artifact as one tar file; unpack it safely and verify it again.

Unpacking refuses absolute paths, `..`, links and special files, extracts into a staging
directory, checks every file against the manifest's sha256 (and that nothing unindexed came
along), and only then renames the artifact into place.
"""
from __future__ import annotations

import shutil
import tarfile
from pathlib import Path, PurePosixPath

from ditbake.runtime import atomic
from ditbake.runtime.artifact import MANIFEST, read_manifest, verify_files
from ditbake.runtime.errors import ArtifactError


def pack(artifact: str | Path, out: str | Path) -> Path:
    """Write the artifact's manifest and indexed files (only those) into an uncompressed tar."""
    artifact, out = Path(artifact), Path(out)
    manifest = read_manifest(artifact)
    verify_files(artifact, manifest)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with tarfile.open(tmp, "w") as tar:
            for rel in [MANIFEST, *sorted(manifest["files"])]:
                info = tar.gettarinfo(str(artifact / rel), arcname=rel)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(artifact / rel, "rb") as f:
                    tar.addfile(info, f)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        path = PurePosixPath(m.name)
        if path.is_absolute() or ".." in path.parts or m.name.startswith(("/", "\\")):
            raise ArtifactError(f"package member {m.name!r} has an absolute or parent path; refusing to unpack")
        if not (m.isfile() or m.isdir()):
            raise ArtifactError(f"package member {m.name!r} is a link or special file; refusing to unpack")
    return members


def unpack(package: str | Path, dest: str | Path) -> Path:
    package, dest = Path(package), Path(dest)
    try:
        tar = tarfile.open(package, "r")
    except (tarfile.TarError, OSError) as exc:
        raise ArtifactError(f"{package} is not a readable tar package ({exc}); re-download it") from exc
    staging = atomic.staging_dir(dest)
    try:
        with tar:
            members = _safe_members(tar)
            tar.extractall(staging, members=members, filter="data")
        manifest = read_manifest(staging)
        verify_files(staging, manifest)
        indexed = {MANIFEST, *manifest["files"]}
        extra = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()
                       and str(p.relative_to(staging)) not in indexed)
        if extra:
            raise ArtifactError(f"package holds files its manifest does not index: {extra[:3]}; refusing it")
        atomic.replace_dir(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest
