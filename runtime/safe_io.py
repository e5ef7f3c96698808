"""Bounded reads of files an attacker may have written: regular files only, a size cap, a
nesting-depth cap for JSON, and names that a filesystem and a tar can hold.

A FIFO, a device or a symlink to /dev/zero is refused from its stat before it is opened (and
the open is non-blocking, re-checked with fstat, so a swap in between cannot hang the reader);
a 100k-deep JSON document is refused by a linear scan before the recursive parser sees it.
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path, PurePosixPath

from ditbake.runtime.errors import ArtifactError, DitbakeError

MAX_JSON_BYTES = 256 << 20  # the largest manifest/plan/calibration JSON we accept (real ones are < 10 MB)
MAX_JSON_DEPTH = 64  # our own documents nest at most ~6 deep
MAX_NAME = 255  # one path component (ext4, xfs, tar's ustar/pax all hold this)
MAX_PATH = 1024  # a whole relative name inside an artifact
MAX_PARTS = 32  # directory levels of a relative name (ours have 2)

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKETS = re.compile(r"[\[\]{}]")


def regular_file_size(path: Path, what: str, error: type[DitbakeError] = ArtifactError) -> int:
    """The size of `path` if it is a regular file (after following symlinks); a typed error otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is not a regular file (a FIFO, device, socket or directory); refusing to read it")
    return st.st_size


def read_bytes(path: str | Path, what: str, max_bytes: int, error: type[DitbakeError] = ArtifactError) -> bytes:
    path = Path(path)
    size = regular_file_size(path, what, error)
    if size > max_bytes:
        raise error(f"{what} {path} is {size} bytes, more than the {max_bytes} this reader accepts; it is not one "
                    "ditbake wrote")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{what} {path} cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{what} {path} is not a regular file; refusing to read it")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{what} {path} grew past {max_bytes} bytes while being read; refusing it")
    return data


def json_depth(text: str) -> int:
    """Deepest bracket nesting outside strings, by a linear scan (no recursion)."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_json(data: bytes, what: str, error: type[DitbakeError] = ArtifactError,
               max_depth: int = MAX_JSON_DEPTH):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} is not UTF-8 text; it is corrupted or not a ditbake file") from None
    depth = json_depth(text)
    if depth > max_depth:
        raise error(f"{what} nests {depth} levels deep (ditbake files nest at most {max_depth}); refusing it")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno}); it is corrupted, rewrite it") from None
    except (RecursionError, ValueError) as exc:  # ValueError: an integer of more than 4300 digits
        raise error(f"{what} cannot be parsed ({type(exc).__name__}); it is corrupted, rewrite it") from None


def read_json(path: str | Path, what: str, error: type[DitbakeError] = ArtifactError,
              max_bytes: int = MAX_JSON_BYTES):
    """JSON from a regular file of at most `max_bytes`, nested at most MAX_JSON_DEPTH deep."""
    return parse_json(read_bytes(path, what, max_bytes, error), f"{what} {path}", error)


def check_relative_name(rel, what: str, error: type[DitbakeError] = ArtifactError) -> str:
    """A file name inside an artifact: a non-empty relative POSIX path of bounded length, no `..`,
    no NUL or control characters, no backslash (a Windows separator)."""
    if not isinstance(rel, str) or not rel:
        raise error(f"{what} must be a non-empty string, got {type(rel).__name__}")
    if len(rel) > MAX_PATH or any(ord(c) < 32 or c == "\\" for c in rel):
        raise error(f"{what} {rel[:40]!r}… is longer than {MAX_PATH} characters or holds control characters or "
                    "backslashes; refusing it")
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or {".", ""} & set(rel.split("/")):
        raise error(f"{what} {rel!r} is absolute or points outside the artifact; refusing it")
    if len(path.parts) > MAX_PARTS or any(len(p.encode()) > MAX_NAME for p in path.parts):
        raise error(f"{what} {rel[:40]!r}… has more than {MAX_PARTS} levels or a component longer than {MAX_NAME} "
                    "bytes; refusing it")
    return rel


def strict_int(value, what: str, lo: int, hi: int, error: type[DitbakeError] = ArtifactError) -> int:
    """A JSON integer in [lo, hi]: floats (even 2.0), bools and strings are refused, never truncated."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{what} must be an integer, got {type(value).__name__} {str(value)[:40]!r}")
    if not lo <= value <= hi:
        raise error(f"{what} = {str(value)[:40]} is outside [{lo}, {hi}]")
    return value


def umask() -> int:
    """The process umask: from /proc on Linux, else by setting it and putting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
