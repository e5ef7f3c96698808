"""runtime/devices.py: one device check for every entry point, one error type (BackendError)."""
import pytest
import torch

from ditbake.exporter import calibrate, evaluate
from ditbake.exporter.outputs import check_args
from ditbake.runtime.devices import resolve_device
from ditbake.runtime.errors import BackendError


@pytest.mark.parametrize("name", ["cpu", torch.device("cpu")])
def test_cpu_resolves(name):
    assert resolve_device(name) == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "nonsense", "", "cuda:-1", "cpu:x", "meta", "mps:0", "cuda:0:1", 3.5, None])
def test_hostile_names_are_backend_errors(name):
    with pytest.raises(BackendError, match="cpu"):
        resolve_device(name)


def test_no_gpu_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for check in (resolve_device, calibrate.calibration_device,
                  lambda name: evaluate.evaluate("/nonexistent", None, device=name, progress=False)):
        with pytest.raises(BackendError, match="no CUDA GPU"):
            check("cuda:0")


def test_gpu_index_beyond_the_visible_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(BackendError, match="only 2 CUDA device"):
        resolve_device("cuda:2")


def test_every_entry_point_agrees_on_the_error():
    # the same bad name gives the same type from the CLI check, calibration, eval and the session
    from ditbake.runtime.session import load

    class Args:
        command, device = "run", "tpu"

    checks = (lambda: check_args(Args()), lambda: calibrate.calibration_device("tpu"),
              lambda: evaluate.evaluate("/nonexistent", None, device="tpu", progress=False),
              lambda: load("/nonexistent", device="tpu"))
    for check in checks:
        with pytest.raises(BackendError):
            check()
