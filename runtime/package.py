"""Ship an artifact as one tar file; unpack it safely and verify it again.

`pack` writes manifest.json first, then the indexed files, through a private temporary file
created exclusively beside the output (never a fixed name: a planted symlink is not followed,
and two concurrent packages to one path cannot mix), then renames it into place.

`unpack` reads the tar as a stream and needs manifest.json first: it validates the manifest,
then checks every further member against it before writing a byte — a regular file (no links,
devices or sparse files), a name the manifest indexes, exactly its recorded size, within the
total cap and the free disk space — and writes each through a private temporary file created
exclusively (O_EXCL), hashing as it goes. The artifact lands (atomically) only when every file
has its sha256 and none is missing.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from ditbake.runtime import atomic
from ditbake.runtime.artifact import MANIFEST, check_manifest, read_manifest, verify_files
from ditbake.runtime.errors import ArtifactError, OutputError, ResourceError
from ditbake.runtime.outputs import check_output
from ditbake.runtime.safe_io import MAX_JSON_BYTES, check_relative_name, parse_json, regular_file_size

MAX_PACKAGE_BYTES = int(os.environ.get("DITBAKE_MAX_PACKAGE_BYTES", 1 << 40))  # 1 TiB: more is not a model
_CHUNK = 1 << 20


def pack(artifact: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the artifact's manifest and indexed files (only those) into an uncompressed tar."""
    artifact, out = Path(artifact), Path(out)
    manifest = read_manifest(artifact)
    verify_files(artifact, manifest)
    check_output(out, "package", force, inputs=[artifact])
    fd, tmp = atomic.temp_file(out)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
            for rel in [MANIFEST, *sorted(manifest["files"])]:
                info = tar.gettarinfo(str(artifact / rel), arcname=rel)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                with open(artifact / rel, "rb") as f:
                    tar.addfile(info, f)
        check_output(out, "package", force, inputs=[artifact])  # again: it may have appeared meanwhile
        atomic.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _check_member(m: tarfile.TarInfo) -> str:
    path = PurePosixPath(m.name)
    if path.is_absolute() or ".." in path.parts or m.name.startswith(("/", "\\")):
        raise ArtifactError(f"package member {m.name[:80]!r} has an absolute or parent path; refusing to unpack")
    if not (m.isfile() or m.isdir()):
        raise ArtifactError(f"package member {m.name[:80]!r} is a link or special file; refusing to unpack")
    if m.issparse():
        raise ArtifactError(f"package member {m.name[:80]!r} is a sparse file; ditbake never writes one, refusing it")
    return check_relative_name(m.name.rstrip("/") if m.isdir() else m.name, "package member")


def _write_member(tar: tarfile.TarFile, m: tarfile.TarInfo, dest: Path, expected: dict) -> None:
    """Stream one member into a private O_EXCL temporary file beside `dest`, hashing it, then rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = atomic.temp_file(dest)
    try:
        digest, written = hashlib.sha256(), 0
        src = tar.extractfile(m)
        with os.fdopen(fd, "wb") as out:
            while block := src.read(min(_CHUNK, m.size - written + 1)):
                written += len(block)
                if written > m.size:
                    raise ArtifactError(f"package member {m.name} holds more than its header says; refusing it")
                digest.update(block)
                out.write(block)
        if written != m.size:
            raise ArtifactError(f"package member {m.name} is truncated ({written} of {m.size} bytes); re-download it")
        if digest.hexdigest() != expected["sha256"]:
            raise ArtifactError(f"sha256 mismatch for {m.name} (expected {expected['sha256'][:12]}…, got "
                                f"{digest.hexdigest()[:12]}…): the package was modified or corrupted; re-download it")
        os.rename(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_manifest_member(tar: tarfile.TarFile) -> tuple[tarfile.TarInfo, bytes, dict]:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isfile():
        raise ArtifactError(f"package does not start with {MANIFEST}; it was not written by `ditbake package`")
    if first.size > MAX_JSON_BYTES:
        raise ArtifactError(f"package {MANIFEST} declares {first.size} bytes; refusing it")
    data = tar.extractfile(first).read(first.size + 1)
    if len(data) != first.size:
        raise ArtifactError(f"package {MANIFEST} is truncated; re-download the package")
    manifest = parse_json(data, f"package {MANIFEST}")
    check_manifest(manifest, f"package {MANIFEST}")
    return first, data, manifest


def _unpack_into(tar: tarfile.TarFile, staging: Path) -> None:
    first, data, manifest = _read_manifest_member(tar)
    files = manifest["files"]
    total = sum(meta["bytes"] for meta in files.values())
    if total > MAX_PACKAGE_BYTES:
        raise ArtifactError(f"package manifest declares {total} bytes, more than the cap {MAX_PACKAGE_BYTES} "
                            "(DITBAKE_MAX_PACKAGE_BYTES); refusing it")
    free = shutil.disk_usage(staging).free
    if total > free:
        raise ResourceError(f"unpacking needs {total / 1e9:.2f} GB but {staging.parent} has {free / 1e9:.2f} GB free; "
                            "free disk space or unpack elsewhere")
    fd = os.open(staging / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    seen = set()
    while (m := tar.next()) is not None:  # iterating the TarFile would start again at the manifest
        rel = _check_member(m)
        if m.isdir():
            continue
        if rel not in files:
            raise ArtifactError(f"package holds files its manifest does not index: [{rel[:80]!r}]; refusing it")
        if rel in seen:
            raise ArtifactError(f"package holds {rel} twice; refusing it")
        if m.size != files[rel]["bytes"]:
            raise ArtifactError(f"package member {rel} is {m.size} bytes but the manifest records "
                                f"{files[rel]['bytes']}; refusing it before writing")
        seen.add(rel)
        _write_member(tar, m, staging / rel, files[rel])
    missing = sorted(set(files) - seen)
    if missing:
        raise ArtifactError(f"package lacks {missing[:3]} that its manifest indexes; re-download it")


def unpack(package: str | Path, dest: str | Path, force: bool = False) -> Path:
    package, dest = Path(package), Path(dest)
    regular_file_size(package, "package")
    check_output(dest, "artifact", force, inputs=[package])
    try:
        tar = tarfile.open(package, "r|*")  # a stream: members are read in order, each once
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArtifactError(f"{package} is not a readable tar package ({exc}); re-download it") from exc
    staging = atomic.staging_dir(dest)
    try:
        with tar:
            _unpack_into(tar, staging)
        manifest = read_manifest(staging)
        verify_files(staging, manifest)  # the files as they now lie on disk
        check_output(dest, "artifact", force, inputs=[package])
        atomic.replace(staging, dest)
    except (tarfile.TarError, EOFError, OSError) as exc:
        atomic.remove_path(staging)
        if isinstance(exc, OSError) and not isinstance(exc, tarfile.TarError) and exc.errno is not None:
            raise
        raise ArtifactError(f"{package} is truncated or corrupted ({exc}); re-download it") from exc
    except BaseException:
        atomic.remove_path(staging)
        raise
    return dest


__all__ = ["pack", "unpack", "OutputError"]
