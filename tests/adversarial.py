"""Shared pieces of the adversarial suite: one tiny artifact per test session (copied, never
edited in place), JSON path enumeration and the wrong values every field is tried with."""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

from tests.conftest import build_tiny_artifact

# a value of every JSON type, plus out-of-range and non-finite numbers
WRONG_VALUES = [None, True, -1, 2.5, "x", "\0" * 3, [], {}, 10**12, float("nan")]
WRONG_IDS = ["null", "true", "-1", "2.5", "str", "nul", "list", "dict", "1e12", "nan"]


@functools.cache
def tiny_artifact() -> Path:
    """A 2-step tiny-wan artifact built once per session (read-only: copy it before editing)."""
    root = Path(tempfile.mkdtemp(prefix="ditbake-adversarial-"))
    atexit.register(shutil.rmtree, root, True)
    path, _ = build_tiny_artifact(root, "tiny-wan", steps=2)
    return path


def copy_artifact(tmp_path: Path) -> Path:
    """A copy to edit; the weights are a hard link (fast): unlink weights.safetensors before writing it."""
    dst = tmp_path / "art"
    shutil.copytree(tiny_artifact(), dst, copy_function=lambda s, d: os.link(s, d) if s.endswith(".safetensors")
                    else shutil.copy2(s, d))
    return dst


def json_paths(doc, skip=(), limit_lists: int = 1, prefix=()) -> list[tuple]:
    """Every key path of a JSON document (lists: their first `limit_lists` entries), depth first."""
    out = []
    items = doc.items() if isinstance(doc, dict) else list(enumerate(doc))[:limit_lists] if isinstance(doc, list) else []
    for key, value in items:
        path = (*prefix, key)
        if path in skip:
            continue
        out.append(path)
        out.extend(json_paths(value, skip, limit_lists, path))
    return out


def set_path(doc, path: tuple, value):
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def drop_path(doc, path: tuple):
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return doc
