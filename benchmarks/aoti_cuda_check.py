"""Does AOTInductor work on this GPU machine, and do ditbake's aoti engines run on CUDA?

Each probe runs in a fresh subprocess (a segfault must not take the check down) and records its
exit code and the tail of its output. DESIGN.md reports `aoti_load_package` segfaulting on the
H100 image (torch 2.11 + CUDA 13) even for a two-layer MLP loaded in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

from provenance import stamp  # benchmarks/ is the script's directory: commit + dirty flag in every JSON

MLP_COMPILE = """
import torch, sys
m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
x = torch.randn(4, 64, device="cuda")
ep = torch.export.export(m, (x,))
path = torch._inductor.aoti_compile_and_package(ep, package_path=sys.argv[1])
print("compiled", path)
"""

MLP_LOAD = """
import torch, sys
if "--promote" in sys.argv:
    from ditbake.runtime.engines import promote_libstdcxx
    print("promoted", promote_libstdcxx())
m = torch._inductor.aoti_load_package(sys.argv[1])
print("loaded")
x = torch.randn(4, 64, device="cuda")
print("ran", m(x).shape)
"""

DITBAKE = """
import json, sys, torch
from pathlib import Path
sys.path.insert(0, ".")
from tests.conftest import build_tiny_artifact
from tests.runtime.test_aoti import _mixed_plan
from ditbake.runtime import load
root = Path(sys.argv[1])
kw = dict(steps=3, plan_fn=_mixed_plan)
eager, _ = build_tiny_artifact(root / "e", "tiny-wan", **kw)
from ditbake.exporter import build as builder
orig = builder.build
builder.build = lambda *a, **k: orig(*a, **{**k, "backend": "aoti", "device": "cuda"})
aoti, _ = build_tiny_artifact(root / "a", "tiny-wan", **kw)
print("built aoti cuda engines")
e, a = load(eager, device="cuda"), load(aoti, device="cuda", backend="aoti")
text = torch.randn(1, e.profile().text_len, 32)
re_, ra = e.generate(text, seed=1), a.generate(text, seed=1)
print("max abs diff", (re_.latents - ra.latents).abs().max().item())
"""


def probe(name: str, code: str, *args: str, env: dict | None = None, timeout: int = 120) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(textwrap.dedent(code))
    try:
        p = subprocess.run([sys.executable, f.name, *args], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        result = {"returncode": p.returncode, "tail": (p.stdout + p.stderr)[-1500:]}
    except subprocess.TimeoutExpired:
        result = {"returncode": "timeout"}
    print(f"{name}: {result['returncode']}")
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="aoti_cuda.json")
    args = ap.parse_args()
    import torch

    tmp = tempfile.mkdtemp()
    pkg = os.path.join(tmp, "mlp.pt2")
    report = {"torch": torch.__version__, "cuda": torch.version.cuda,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    report["mlp_compile"] = probe("mlp_compile", MLP_COMPILE, pkg)
    report["mlp_load_fresh_process"] = probe("mlp_load", MLP_LOAD, pkg)
    # the fix: libstdc++ promoted to the global symbol scope before loading (runtime/engines.py)
    report["mlp_load_promoted_libstdcxx"] = probe("mlp_load_promoted", MLP_LOAD, pkg, "--promote")
    report["ditbake_aoti_cuda"] = probe("ditbake_aoti_cuda", DITBAKE, tmp, timeout=200)
    with open(args.out, "w") as f:
        json.dump(stamp(report), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
