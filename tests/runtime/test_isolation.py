"""The runtime ships alone: it must load and run an artifact with the exporter's world absent."""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import build_tiny_artifact

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("diffusers", "onnx", "onnxscript", "modelopt", "transformers", "ditbake.exporter")


def blocked_script(body: str) -> str:
    """A Python program that runs `body` with every FORBIDDEN import refused, then checks that none
    of them was loaded anyway (through a back door such as an already imported dependency)."""
    return textwrap.dedent(f"""
        import sys
        BLOCKED = {FORBIDDEN!r}
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"blocked import of {{name}}")
        sys.meta_path.insert(0, Blocker())
    """) + textwrap.dedent(body) + textwrap.dedent("""
        leaked = [m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED)]
        assert not leaked, leaked
    """)


def test_runtime_runs_with_exporter_world_blocked(tmp_path):
    path, _ = build_tiny_artifact(tmp_path, "tiny-cogvideox", steps=2)
    script = blocked_script(f"""
        import torch
        from ditbake.runtime import load
        s = load({str(path)!r})
        p = s.profile()
        r = s.generate(torch.randn(1, p.text_len, 32), seed=0, guidance_scale=3.0)
        assert torch.isfinite(r.latents).all()
        print("OK", tuple(r.latents.shape), r.report.block_computes)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK (1, 3, 4, 8, 8) 12")


def _imports(folder: str):
    for file in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                yield file, [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                yield file, [node.module]


def test_no_forbidden_imports_in_source():
    for file, names in _imports("runtime"):
        for name in names:
            assert not any(name == b or name.startswith(b + ".") for b in FORBIDDEN), f"{file}: imports {name}"
    for file, names in _imports("plugins"):
        for name in names:
            assert not name.startswith(("ditbake.exporter", "ditbake.runtime")), f"{file}: imports {name}"
