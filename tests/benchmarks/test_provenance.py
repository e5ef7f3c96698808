"""benchmarks/provenance.py: the commit a result came from."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import provenance  # noqa: E402


def test_a_checkout_reports_its_own_commit(monkeypatch):
    monkeypatch.delenv("DITBAKE_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=provenance.ROOT, capture_output=True, text=True)
    if head.returncode != 0:  # an unpacked tarball: nothing to compare with
        return
    assert provenance.provenance()["commit"] == head.stdout.strip()


def test_the_callers_commit_wins_over_a_stale_git(monkeypatch):
    monkeypatch.setenv("DITBAKE_COMMIT", "0123abc")
    monkeypatch.setenv("DITBAKE_DIRTY", "0")
    p = provenance.provenance()
    assert (p["commit"], p["dirty"], p["dirty_files"]) == ("0123abc", False, [])
