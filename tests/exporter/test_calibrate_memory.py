"""calibrate_memory: free memory counts the allocator's unused blocks only with expandable segments."""
from __future__ import annotations

import torch

from ditbake.exporter import calibrate, calibrate_memory


def _fake_cuda(monkeypatch, free: int, reserved: int, allocated: int) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)


def test_fixed_segments_count_only_driver_free_memory(monkeypatch):
    # 21 GB held but unused in fixed segments is where a real-size batch ran out of memory
    _fake_cuda(monkeypatch, free=1 << 30, reserved=78 << 30, allocated=57 << 30)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")
    assert calibrate_memory.free_bytes(torch.device("cuda")) == 1 << 30


def test_expandable_segments_count_held_blocks(monkeypatch):
    _fake_cuda(monkeypatch, free=1 << 30, reserved=78 << 30, allocated=57 << 30)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert calibrate_memory.free_bytes(torch.device("cuda")) == 22 << 30


def test_cpu_has_no_free_memory_limit():
    assert calibrate_memory.free_bytes(torch.device("cpu")) is None


def test_cuda_calibration_turns_on_expandable_segments(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # records the original value, restored after the test
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert calibrate.calibration_device("cuda").type == "cuda"
    assert calibrate.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_a_user_allocator_setting_is_kept(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    calibrate.calibration_device("cuda")
    assert calibrate.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
