"""The CLI's rough edges (issue 14 item 6): no abbreviations, --version, clear model-source
errors, at most one Triton warning per process, log lines routed around progress bars."""
import json
import logging
import subprocess
import sys

import pytest

from ditbake.exporter import models
from ditbake.exporter.cli import main
from ditbake.runtime.errors import UnsupportedModelError


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("ditbake ") and out.split()[1][0].isdigit()


@pytest.mark.parametrize("argv", [["--verb", "inspect", "x"],  # --verbose
                                  ["plan", "--calibration", "c", "--out", "p", "--tdc-skip", "0.3"],  # --tdc-skip-budget
                                  ["calibrate", "--model", "tiny-wan", "--out", "o", "--num-prompt", "2"]])
def test_abbreviations_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_component_dir_and_hub_id_are_named(tmp_path):
    root = tmp_path / "pipe"
    (root / "text_encoder").mkdir(parents=True)
    (root / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["UMT5EncoderModel"]}))
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    with pytest.raises(UnsupportedModelError, match=r"without `_class_name`.*text_encoder.*pipeline root"):
        models.load(root / "text_encoder")
    with pytest.raises(UnsupportedModelError, match=r"'AutoencoderKLWan'.*vae is not a diffusers transformer"):
        models.load(root / "vae")
    with pytest.raises(models.ModelLoadError, match="hub id.*--local-dir"):
        models.load("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")


def test_triton_warning_at_most_once():
    code = ("import ditbake.plugins.act_quant, ditbake.plugins.linear_8bit, ditbake.plugins.mixed_linear, "
            "ditbake.plugins.head_attention")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("find_triton_kernels") <= 1


def test_log_lines_go_around_progress_bars(monkeypatch, capsys):
    """Inside main, a log record is written through tqdm (tqdm.write), so it cannot land inside a bar."""
    from tqdm import tqdm

    written = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None, end="\n", nolock=False: written.append(s)))

    def fake(args):
        logging.getLogger("ditbake").warning("between bars")
        return 0

    monkeypatch.setattr("ditbake.exporter.cli.cmd_inspect", fake)
    # a console handler as the CLI's basicConfig installs (pytest's capture handlers are not console ones)
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.StreamHandler(sys.stderr)])
    assert main(["inspect", "whatever"]) == 0
    assert any("between bars" in w for w in written)
