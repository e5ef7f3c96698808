"""Where a benchmark result came from: the commit, whether the tree had uncommitted changes, and
the software and machine it ran on. Every JSON a benchmark writes carries this under "provenance",
so a number that no longer reproduces can be traced to the code that produced it. A copy of the
tree on another machine (the GPU machine's) takes the commit from $DITBAKE_COMMIT and the dirty flag
from $DITBAKE_DIRTY (0/1), which the caller exports: `DITBAKE_COMMIT=$(git rev-parse HEAD)`; when set,
they win over any .git found there.

    from provenance import stamp          # benchmarks/ is on sys.path when a script there runs
    results = stamp({...})                # adds results["provenance"]
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (an unpacked tarball): the record says so


def provenance() -> dict:
    """{"commit", "dirty", "dirty_files", "torch", "threads", "machine"}. `dirty` is True when tracked
    files differ from the commit (results under benchmarks/results/ excluded: a run rewrites them);
    the number is then from the commit plus those edits, named in `dirty_files`."""
    import torch  # noqa: PLC0415

    if os.environ.get("DITBAKE_COMMIT"):
        # the caller knows: the GPU machine's copy of the tree may carry a stale .git of its own (seen
        # 2026-11-26: the session's first snapshot, so every later file looked "dirty")
        commit, changed = os.environ["DITBAKE_COMMIT"], []
        dirty = {"0": False, "1": True}.get(os.environ.get("DITBAKE_DIRTY", ""))
    else:
        commit = (_git("rev-parse", "HEAD") or "").strip() or None
        status = _git("status", "--porcelain", "--untracked-files=no")
        changed = [] if status is None else [line[3:] for line in status.splitlines()
                                             if line.strip() and not line[3:].startswith("benchmarks/results/")]
        dirty = None if status is None else bool(changed)
    return {"commit": commit, "dirty": dirty, "dirty_files": changed[:20],
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
                       + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")}


def commit_label() -> str:
    """"<commit>", "<commit>+dirty" or "unknown": the one-string form some reports record."""
    p = provenance()
    return (p["commit"] or "unknown") + ("+dirty" if p["dirty"] else "")


def stamp(results: dict) -> dict:
    """`results` with its provenance added (in place, also returned)."""
    results["provenance"] = provenance()
    return results
