"""Which output paths a command may replace.

A command replaces its `--out` only when it is absent, or is an earlier output of the same kind
made by ditbake (an artifact's manifest, a calibration's calibration.json, a package tar whose
first member is a ditbake manifest, a plan, a run's report), or the user passed `--force`. Even
with `--force`, an output that is the working directory, one of its parents, or holds one of
the command's inputs (`build --model M --out M`) is refused: replacing it would delete them.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

from ditbake.runtime.errors import DitbakeError, OutputError
from ditbake.runtime.safe_io import parse_json, read_json

ARTIFACT_FORMAT = "ditbake-artifact"  # as runtime/artifact.FORMAT (imported there from here would cycle)
CALIBRATION_FORMAT = "ditbake-calibration"
PLAN_FORMAT = "ditbake-plan"
MARKER_MAX_BYTES = 64 << 20
# files a run/eval writes into its --out directory (which may hold other files: those stay)
DIRECTORY_OUTPUTS = {"run": ("clip.gif", "strip.png", "report.json"), "eval": ("eval.json", "strip.png")}
KINDS = ("artifact", "calibration", "package", "plan", *DIRECTORY_OUTPUTS)


def _json(path: Path):
    try:
        return read_json(path, "marker", OutputError, max_bytes=MARKER_MAX_BYTES)
    except DitbakeError:
        return None


def _package_manifest(path: Path):
    """The manifest of a tar whose first member is manifest.json, else None."""
    try:
        with tarfile.open(path, "r:") as tar:
            first = tar.next()
            if first is None or first.name != "manifest.json" or not first.isfile() or first.size > MARKER_MAX_BYTES:
                return None
            return parse_json(tar.extractfile(first).read(), "package manifest", OutputError)
    except (tarfile.TarError, OSError, DitbakeError, EOFError):
        return None


def is_ours(path: Path, kind: str) -> bool:
    """Whether `path` is an earlier ditbake output of this kind."""
    path = Path(path)
    if kind == "artifact":
        m = _json(path / "manifest.json") if path.is_dir() else None
        return isinstance(m, dict) and m.get("format") == ARTIFACT_FORMAT
    if kind == "calibration":
        m = _json(path / "calibration.json") if path.is_dir() else None
        if m is None and path.is_dir() and {p.name for p in path.iterdir()} == {"partial"}:
            # a calibration in progress (or interrupted): only its partial/ pieces and their run.json
            return isinstance(_json(path / "partial" / "run.json"), dict)
        # older calibrations carry no format marker, but always their tensor layout
        return isinstance(m, dict) and (m.get("format") == CALIBRATION_FORMAT or
                                        isinstance(m.get("layout"), dict) and "num_blocks" in m)
    if kind == "package":
        m = _package_manifest(path) if path.is_file() else None
        return isinstance(m, dict) and m.get("format") == ARTIFACT_FORMAT
    if kind == "plan":
        m = _json(path) if path.is_file() else None
        return isinstance(m, dict) and m.get("format") == PLAN_FORMAT
    if kind == "run":
        m = _json(path / "report.json") if path.is_dir() else None
        return isinstance(m, dict) and "steps" in m and "artifact" in m
    if kind == "eval":
        m = _json(path / "eval.json") if path.is_dir() else None
        return isinstance(m, dict) and "summary" in m and "reference" in m
    raise ValueError(kind)


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output(out: str | Path, kind: str, force: bool = False, inputs=()) -> Path:
    """Refuse (OutputError) an `--out` this command must not replace; return it as a Path."""
    out = Path(out)
    if not str(out) or "\0" in str(out):
        raise OutputError("--out is empty or holds a NUL character; name an output path")
    resolved = out.resolve()
    if kind in DIRECTORY_OUTPUTS:  # written into, never replaced as a whole: only the inputs themselves clash
        if any(given and os.path.lexists(given) and Path(given).resolve() == resolved for given in inputs):
            raise OutputError(f"--out {out} is one of the command's inputs; name another directory")
    else:
        if _contains(resolved, Path.cwd().resolve()) or resolved == Path(resolved.anchor):
            raise OutputError(f"--out {out} is the working directory or one of its parents; replacing it would "
                              "delete what it holds. Name a new path, e.g. --out ./NAME")
        for given in inputs:
            if given and os.path.lexists(given) and _contains(resolved, Path(given).resolve()):
                raise OutputError(f"--out {out} is or holds the input {given}; replacing it would delete that "
                                  "input. Name another output path")
    if kind in DIRECTORY_OUTPUTS:
        if os.path.lexists(out) and not out.is_dir():
            raise OutputError(f"--out {out} exists and is not a directory; name a directory")
        clash = [n for n in DIRECTORY_OUTPUTS[kind] if os.path.lexists(out / n)]
        if clash and not force and not is_ours(out, kind):
            raise OutputError(f"{out} holds {', '.join(clash)} that ditbake {kind} did not write; pass --force to "
                              "overwrite them, or choose another --out")
        return out
    if os.path.lexists(out) and not force and not is_ours(out, kind):
        raise OutputError(f"--out {out} exists and is not a ditbake {kind}; pass --force to replace it, or choose "
                          "another --out")
    return out
