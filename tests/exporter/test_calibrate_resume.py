"""Batched calibration equals one prompt per forward; an interrupted calibration resumes to the
exact result of an uninterrupted one; partial results of other settings are refused."""
import json

import pytest
import torch

from ditbake.exporter import calibrate as cal, models
from ditbake.exporter.adapters import adapter_for
from ditbake.exporter.calibrate_checkpoint import ResumeError, partial_dir
from ditbake.exporter.calibrate_heads import calibrate_heads
from ditbake.exporter.calibrate_precision import PrecisionObserverConfig, observer_factory
from ditbake.exporter.plan_heads import HeadsConfig

LATENT = (4, 2, 4, 4)
STEPS = 2


class Interrupted(RuntimeError):
    pass


def _run(adapter, embeds, **kwargs):
    return cal.calibrate(adapter, embeds, None, latent=LATENT, sampler="unipc", num_steps=STEPS, guidance_scale=4.0,
                         seed=1, source="tiny-wan", progress=False,
                         observers=[observer_factory(PrecisionObserverConfig(formats=("nvfp4",), max_tokens=4))], **kwargs)


@pytest.fixture(scope="module")
def setup():
    adapter = adapter_for(models.load("tiny-wan", seed=2))
    embeds = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(7))
    return adapter, embeds, _run(adapter, embeds, batch_size=2)


def test_batched_equals_one_prompt_per_forward(setup):
    adapter, embeds, batched = setup
    single = _run(adapter, embeds, batch_size=1)
    assert batched.meta["prompt_batch_size"] == 2 and single.meta["prompt_batch_size"] == 1
    for name, value in single.tensors.items():
        torch.testing.assert_close(batched.tensors[name], value, rtol=1e-4, atol=1e-6, equal_nan=True, msg=name)
    assert torch.isfinite(batched.tensors["erel_nvfp4"]).all()


def test_interrupted_run_resumes_to_the_uninterrupted_result(setup, tmp_path, monkeypatch):
    adapter, embeds, full = setup
    forward = adapter.diffusers_forward
    calls = {"n": 0}

    def failing(*args, **kwargs):  # dies in the second prompt batch, after the first batch completed
        calls["n"] += 1
        if calls["n"] == 2 * STEPS + 1:
            raise Interrupted("power cut")
        return forward(*args, **kwargs)

    monkeypatch.setattr(adapter, "diffusers_forward", failing)
    with pytest.raises(Interrupted):
        _run(adapter, embeds, batch_size=2, checkpoint_dir=partial_dir(tmp_path))
    assert sorted(p.name for p in partial_dir(tmp_path).glob("*.safetensors")) == ["base-00000-00002.safetensors"]
    assert not adapter.model._forward_hooks and not adapter.block_modules()[0]._forward_hooks  # hooks removed

    calls["n"] = 0
    monkeypatch.setattr(adapter, "diffusers_forward",
                        lambda *a, **kw: (calls.__setitem__("n", calls["n"] + 1), forward(*a, **kw))[1])
    resumed = _run(adapter, embeds, batch_size=2, checkpoint_dir=partial_dir(tmp_path), resume=True)
    assert calls["n"] == 2 * STEPS  # only the unfinished batch (prompt 2) ran: 2 branches × steps
    assert resumed.tensors.keys() == full.tensors.keys()
    for name, value in full.tensors.items():
        assert torch.equal(resumed.tensors[name].nan_to_num(-1.0), value.nan_to_num(-1.0)), name

    with pytest.raises(ResumeError, match="other settings .*batch_size") as info:
        _run(adapter, embeds, batch_size=1, checkpoint_dir=partial_dir(tmp_path), resume=True)
    assert "\n" not in str(info.value)
    assert not adapter.block_modules()[0]._forward_hooks  # a refused resume leaves no hooks behind
    # without --resume the old pieces are discarded and the run starts over
    cal.calibrate(adapter, embeds[:1], None, latent=LATENT, sampler="unipc", num_steps=STEPS, guidance_scale=4.0,
                  seed=1, source="tiny-wan", progress=False, checkpoint_dir=partial_dir(tmp_path))
    assert sorted(p.name for p in partial_dir(tmp_path).glob("*.safetensors")) == ["base-00000-00001.safetensors"]


def test_finished_head_search_is_not_run_again(tmp_path, monkeypatch):
    adapter = adapter_for(models.load("tiny-wan", seed=3))
    embeds = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(4))
    kwargs = dict(latent=LATENT, sampler="flow_euler", num_steps=STEPS, guidance_scale=4.0, seed=0, progress=False,
                  config=HeadsConfig(delta=1.0, arrow_fractions=(0.1,), local3d_tile=(1, 2, 2)),
                  checkpoint_dir=partial_dir(tmp_path, "heads"))
    tensors, meta = calibrate_heads(adapter, embeds, None, **kwargs)

    def no_forward(*args, **kw):
        raise AssertionError("the finished search ran again")

    monkeypatch.setattr(adapter.arch, "block", no_forward)
    again, meta_again = calibrate_heads(adapter, embeds, None, resume=True, **kwargs)
    assert meta_again == json.loads(json.dumps(meta)) and again.keys() == tensors.keys()
    for name, value in tensors.items():
        assert torch.equal(again[name].nan_to_num(-1.0), value.nan_to_num(-1.0)), name


def test_cli_device_and_batch_size_errors_are_typed(tmp_path, caplog):
    from ditbake.exporter.cli import main

    base = ["calibrate", "--model", "tiny-wan", "--out", str(tmp_path / "cal"), "--steps", "2", "--num-prompts", "1",
            "--random-embeddings"]
    if not torch.cuda.is_available():  # the machine lacks what was asked: a BackendError, as runtime.load gives
        assert main(base + ["--device", "cuda"]) == 6
        assert "no CUDA GPU" in caplog.text
    assert main(base + ["--device", "tpu"]) == 6  # not a device this runtime drives: BackendError
    assert main(base + ["--batch-size", "0"]) == 5
    assert "--batch-size must be >= 1" in caplog.text
    assert not (tmp_path / "cal").exists()


def test_an_interrupted_calibration_is_recognised_as_ours_and_a_foreign_dir_is_not(setup, tmp_path, monkeypatch):
    """The final save replaces OUT, which then holds only partial/ (written by this tool): that is an
    earlier ditbake calibration; a file beside it makes it foreign again (refused without --force)."""
    from ditbake.runtime.outputs import is_ours

    adapter, embeds, _ = setup
    monkeypatch.setattr(adapter, "diffusers_forward", lambda *a, **kw: (_ for _ in ()).throw(Interrupted("stop")))
    out = tmp_path / "cal"
    with pytest.raises(Interrupted):
        _run(adapter, embeds, batch_size=2, checkpoint_dir=partial_dir(out))
    assert is_ours(out, "calibration")
    (out / "notes.txt").write_text("mine")
    assert not is_ours(out, "calibration")
