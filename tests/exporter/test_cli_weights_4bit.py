"""`ditbake calibrate --gptq-hessians` → `plan` → `build --weight-storage nvfp4 --gptq` → `run`, and its refusals."""
import json

import pytest
from safetensors.torch import load_file

from ditbake.exporter.cli import main
from ditbake.exporter.gptq import HESSIANS_FILE
from ditbake.runtime import weights_4bit
from ditbake.runtime.artifact import MANIFEST, WEIGHTS

CALIBRATE = ["--model", "tiny-wan", "--steps", "3", "--random-embeddings", "--num-prompts", "2", "--frames", "2",
             "--height", "8", "--width", "8"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    cal, plan = root / "cal", root / "plan.json"
    assert main(["calibrate", *CALIBRATE, "--out", str(cal), "--precision-stats", "--gptq-hessians"]) == 0
    assert main(["plan", "--calibration", str(cal), "--out", str(plan), "--nvfp4-fraction", "0"]) == 0
    return cal, plan


def test_calibration_writes_one_square_statistic_per_block_linear(calibrated):
    cal, _ = calibrated
    hessians = load_file(str(cal / HESSIANS_FILE))
    meta = json.loads((cal / "calibration.json").read_text())
    assert set(hessians) == {f"blocks.{b}.{name}" for b in range(meta["num_blocks"]) for name in meta["linear_layers"]}
    for h in hessians.values():
        assert h.shape[0] == h.shape[1] and (h - h.T).abs().max() <= 1e-5 * h.abs().max()
        assert (h.diagonal() >= 0).all()


def test_build_stores_gptq_nvfp4_and_the_artifact_runs(calibrated, tmp_path, capsys):
    cal, plan = calibrated
    art, rtn = tmp_path / "art", tmp_path / "rtn"
    assert main(["build", "--model", "tiny-wan", "--plan", str(plan), "--calibration", str(cal), "--out", str(art),
                 "--weight-storage", "nvfp4", "--gptq"]) == 0
    assert main(["build", "--model", "tiny-wan", "--plan", str(plan), "--calibration", str(cal), "--out", str(rtn),
                 "--weight-storage", "nvfp4"]) == 0
    listed = json.loads((art / MANIFEST).read_text())[weights_4bit.MANIFEST_KEY]
    assert listed and set(listed.values()) == {"int8"}
    gptq_w, rtn_w = load_file(str(art / WEIGHTS)), load_file(str(rtn / WEIGHTS))
    assert any(not (gptq_w[f"{layer}.nvfp4_packed"] == rtn_w[f"{layer}.nvfp4_packed"]).all() for layer in listed)
    assert main(["run", str(art), "--out", str(tmp_path / "out"), "--seed", "3", "--random-embeddings"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(art)]) == 0
    assert json.loads(capsys.readouterr().out)["layers_stored_nvfp4_loaded_8bit"] == len(listed)


def test_gptq_without_statistics_is_refused_and_writes_nothing(tmp_path, calibrated):
    _, plan = calibrated
    cal = tmp_path / "cal"
    assert main(["calibrate", *CALIBRATE, "--out", str(cal)]) == 0
    assert main(["build", "--model", "tiny-wan", "--plan", str(plan), "--calibration", str(cal),
                 "--out", str(tmp_path / "art"), "--gptq"]) == 10
    assert not (tmp_path / "art").exists()


def test_statistics_cannot_resume(tmp_path):
    assert main(["calibrate", *CALIBRATE, "--out", str(tmp_path / "cal"), "--gptq-hessians", "--resume"]) == 5
    assert main(["calibrate", *CALIBRATE, "--out", str(tmp_path / "cal"), "--gptq-hessians",
                 "--gptq-max-tokens", "0"]) == 5
    assert not (tmp_path / "cal").exists()
