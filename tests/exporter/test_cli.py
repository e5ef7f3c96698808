"""The `ditbake` command end to end on a tiny model, plus help and error exit codes."""
import json
import subprocess
import sys

import pytest

from ditbake.exporter.cli import main

SUBCOMMANDS = ("calibrate", "plan", "build", "run", "inspect", "package", "unpack")


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as info:
        main([sub, "--help"])
    assert info.value.code == 0
    assert sub in capsys.readouterr().out


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "ditbake.exporter.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and all(s in proc.stdout for s in SUBCOMMANDS)


@pytest.mark.parametrize("model,sampler", [("tiny-wan", "flow_euler"), ("tiny-cogvideox", "dpmpp")])
def test_calibrate_plan_build_run_inspect(tmp_path, model, sampler, capsys):
    cal, plan, art, out = (str(tmp_path / n) for n in ("cal", "plan.json", "art", "out"))
    assert main(["calibrate", "--model", model, "--out", cal, "--steps", "3", "--sampler", sampler, "--random-embeddings",
                 "--num-prompts", "1", "--frames", "2", "--height", "8", "--width", "8"]) == 0
    assert main(["plan", "--calibration", cal, "--out", plan]) == 0
    assert main(["build", "--model", model, "--plan", plan, "--calibration", cal, "--out", art,
                 "--label", "RANDOM WEIGHTS"]) == 0
    assert main(["run", art, "--out", out, "--seed", "3", "--random-embeddings"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["steps"] == 3 and report["sampler"] == sampler and report["label"] == "RANDOM WEIGHTS"
    assert (tmp_path / "out" / "clip.gif").stat().st_size > 0 and (tmp_path / "out" / "strip.png").exists()
    capsys.readouterr()
    assert main(["inspect", art]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["hashes"] == "verified" and summary["plan"]["steps"] == 3
    assert main(["package", art, "--out", str(tmp_path / "a.tar")]) == 0
    assert main(["unpack", str(tmp_path / "a.tar"), "--out", str(tmp_path / "b")]) == 0
    assert main(["inspect", str(tmp_path / "b")]) == 0


def test_errors_map_to_exit_codes(tmp_path, caplog):
    assert main(["inspect", str(tmp_path / "missing")]) == 3
    assert "ArtifactError" in caplog.text
    assert main(["plan", "--calibration", str(tmp_path), "--out", str(tmp_path / "p.json")]) == 10
    assert main(["calibrate", "--model", "no-such-model", "--out", str(tmp_path / "c")]) == 8
    assert not (tmp_path / "c").exists()
