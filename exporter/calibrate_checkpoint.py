"""Partial results of a calibration, so that an interrupted one resumes (`ditbake calibrate --resume`).

The pass writes into OUT/partial/ (OUT: the calibration's output directory) after each completed
piece of work: one safetensors file per prompt batch of the base pass (every observer's results
sliced to the batch's prompts), and OUT/partial/heads/ one for the whole head search. Each file is written to a
temporary name and renamed, so a crash leaves a piece whole or absent. `run.json` holds the
settings the pieces were computed with (the signature); resuming with other settings is refused,
since the merged statistics would then mix two calibrations. The final `CalibrationStats.save`
replaces OUT as a whole, which removes partial/.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ditbake.runtime import atomic
from ditbake.runtime.errors import DitbakeError

log = logging.getLogger(__name__)

PARTIAL_DIR = "partial"
RUN_FILE = "run.json"


def partial_dir(out: str | Path, phase: str = "") -> Path:
    """OUT/partial (the base pass) or OUT/partial/PHASE (e.g. the head search)."""
    return Path(out) / PARTIAL_DIR / phase if phase else Path(out) / PARTIAL_DIR


class ResumeError(DitbakeError):
    """The partial results cannot be resumed with these settings."""

    exit_code = 10


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """sha256 over the tensors' values (prompt embeddings identify the run)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Checkpoint:
    """A directory of named pieces of tensors (+ optional JSON meta), valid for one signature."""

    def __init__(self, directory: str | Path, signature: dict, resume: bool):
        self.dir = Path(directory)
        self.signature = json.loads(json.dumps(signature))  # as it will read back
        run = self.dir / RUN_FILE
        if resume and run.exists():
            found = json.loads(run.read_text())
            if found != self.signature:
                diff = sorted(k for k in set(found) | set(self.signature) if found.get(k) != self.signature.get(k))
                raise ResumeError(f"{self.dir} holds partial results of a calibration with other settings "
                                  f"({', '.join(diff)}); run again with the same settings, or without --resume "
                                  "to start over")
            log.info("resuming from %s: %s", self.dir, ", ".join(sorted(self.pieces())) or "nothing completed yet")
            return
        if resume:
            log.info("--resume: no partial results in %s; starting from the beginning", self.dir)
        elif self.dir.exists():
            log.info("starting over: removing earlier partial results in %s (pass --resume to continue them)",
                     self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run, json.dumps(self.signature, indent=1))

    def pieces(self) -> list[str]:
        return [p.name.removesuffix(".safetensors") for p in self.dir.glob("*.safetensors")]

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """A completed piece (tensors, meta), or None."""
        path = self.dir / f"{name}.safetensors"
        if not path.exists():
            return None
        meta_path = self.dir / f"{name}.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        return load_file(str(path)), meta

    def save(self, name: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        """Meta first, tensors last: a piece counts as completed once its tensors file exists."""
        if meta is not None:
            atomic.write_text(self.dir / f"{name}.json", json.dumps(meta, indent=1))
        tmp = self.dir / f".{name}.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.dir / f"{name}.safetensors")
