"""Kernel choice per head group (issue #15 item 3): which kernels may run a group, the signature
the build records, following a recorded choice, and fp8t groups (cuDNN's per-tensor FP8 SDPA; its
reference on CPU) split by band."""
import pytest
import torch

from ditbake.plugins import cudnn_sdpa
from ditbake.runtime.attention import AttentionRunner, candidate_kernels, group_signature, head_groups
from ditbake.runtime.errors import BackendError
from ditbake.runtime.plan import HeadScheme
from tests.conftest import CudaLookingTensor


def _qkv(heads=4, seq=48, dim=16, dtype=torch.float32):
    return [torch.randn(1, heads, seq, dim, dtype=dtype) for _ in range(3)]


def test_cpu_candidates_are_the_defaults_only():
    q = _qkv()[0]
    assert candidate_kernels("full", "bf16", (HeadScheme("full"),), q, (0, 0)) == ["sdpa"]
    assert candidate_kernels("arrow", "bf16", (HeadScheme("arrow", 2, 2),), q, (0, 0)) == ["triton"]
    assert candidate_kernels("full", "int8", (HeadScheme("full", precision="int8"),), q, (0, 0)) == ["triton"]
    assert candidate_kernels("arrow", "fp8t", (HeadScheme("arrow", 2, 2, "fp8t"),), q, (0, 0)) == ["reference"]


def test_fp8t_refuses_what_cudnn_cannot_express():
    q = _qkv()[0]
    with pytest.raises(BackendError, match="cannot express"):  # text tokens inside a band
        candidate_kernels("arrow", "fp8t", (HeadScheme("arrow", 2, 2, "fp8t"),), q, (40, 48))
    with pytest.raises(BackendError, match="cannot express"):  # two bands in one call
        candidate_kernels("arrow", "fp8t", (HeadScheme("arrow", 2, 2, "fp8t"), HeadScheme("arrow", 1, 3, "fp8t")),
                          q, (0, 0))
    # dense fp8t with text tokens is plain attention: fine
    assert candidate_kernels("full", "fp8t", (HeadScheme("full", precision="fp8t"),), q, (40, 48)) == ["reference"]


def test_signature_names_what_decides_the_kernel():
    q = _qkv(heads=3, seq=40, dim=16, dtype=torch.bfloat16)[0]
    sig = group_signature("arrow", "bf16", (HeadScheme("arrow", 4, 2),) * 3, q, (0, 0))
    assert sig == "arrow/bf16/4-2/1x3x40x16/bfloat16/text0-0"
    assert group_signature("full", "fp8t", (HeadScheme("full", precision="fp8t"),), q, (32, 40)).startswith("full/fp8t/-/")


def test_fp8t_band_heads_split_by_band_other_precisions_do_not():
    schemes = (HeadScheme("arrow", 2, 2, "fp8t"), HeadScheme("arrow", 4, 4, "fp8t"), HeadScheme("arrow", 2, 2, "fp8t"),
               HeadScheme("arrow", 2, 2), HeadScheme("arrow", 4, 4), HeadScheme("full", precision="fp8t"),
               HeadScheme("full", precision="fp8t"))
    assert head_groups(schemes) == {("arrow", "fp8t", 2, 2): (0, 2), ("arrow", "fp8t", 4, 4): (1,),
                                    ("arrow", "bf16"): (3, 4), ("full", "fp8t"): (5, 6)}


def test_mixed_fp8t_layer_matches_each_group_alone():
    """A layer mixing fp8t bands, a bf16 band and dense bf16 = each group's own op on its heads
    (per-tensor scales are per group: the reference is called on exactly the group's heads)."""
    q, k, v = _qkv(heads=5, seq=40)
    schemes = (HeadScheme("arrow", 3, 3, "fp8t"), HeadScheme("full"), HeadScheme("arrow", 3, 3, "fp8t"),
               HeadScheme("arrow", 6, 1, "fp8t"), HeadScheme("full"))
    out = AttentionRunner()(("cond", 0, "attn1"), q, k, v, schemes, (0, 0))
    pair = [0, 2]
    torch.testing.assert_close(out[:, pair], cudnn_sdpa.fp8t_attention_ref(q[:, pair], k[:, pair], v[:, pair], 3, 3))
    torch.testing.assert_close(out[:, [3]], cudnn_sdpa.fp8t_attention_ref(q[:, [3]], k[:, [3]], v[:, [3]], 6, 1))
    dense = torch.nn.functional.scaled_dot_product_attention(q[:, [1, 4]], k[:, [1, 4]], v[:, [1, 4]])
    torch.testing.assert_close(out[:, [1, 4]], dense)


def test_a_recorded_kernel_that_cannot_run_here_is_a_typed_error():
    q, k, v = _qkv()
    schemes = (HeadScheme("arrow", 2, 2),) * 4
    sig = group_signature("arrow", "bf16", schemes, q, (0, 0))
    runner = AttentionRunner(kernels={sig: "cudnn"})  # built on a GPU with cuDNN, run on this CPU
    with pytest.raises(BackendError, match="rebuild the artifact"):
        runner(("cond", 0, "attn1"), q, k, v, schemes, (0, 0))


def test_measuring_on_cpu_records_nothing():
    q, k, v = _qkv()
    runner = AttentionRunner(measure=True)
    runner(("cond", 0, "attn1"), q, k, v, (HeadScheme("arrow", 2, 2, "fp8t"),) * 4, (0, 0))
    assert runner.kernels == {} and runner.timings == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measuring_on_cuda_keeps_the_fastest_and_follows_it():
    q, k, v = (t.cuda() for t in _qkv(heads=4, seq=4096, dim=128, dtype=torch.bfloat16))
    schemes = (HeadScheme("arrow", 1024, 1024),) * 4
    runner = AttentionRunner(measure=True)
    out = runner(("cond", 0, "attn1"), q, k, v, schemes, (0, 0))
    sig = group_signature("arrow", "bf16", schemes, q, (0, 0))
    timings = runner.timings[sig]
    assert set(timings) <= {"triton", "cudnn"} and "triton" in timings
    assert runner.kernels[sig] == min(timings, key=timings.get)
    again = AttentionRunner(kernels=runner.kernels)(("cond", 0, "attn1"), q, k, v, schemes, (0, 0))
    torch.testing.assert_close(again, out, atol=2e-2, rtol=2e-2)  # bf16 kernels of one band


def test_full_int8_groups_take_the_dense_kernel_where_it_runs(monkeypatch):
    from ditbake.plugins import attention_8bit_dense

    q = _qkv(dim=128, dtype=torch.bfloat16)[0].as_subclass(CudaLookingTensor)
    schemes = (HeadScheme("full", precision="int8"),)
    monkeypatch.setattr(attention_8bit_dense, "kernel_supports", lambda q: True)
    assert candidate_kernels("full", "int8", schemes, q, (0, 0)) == ["triton_dense", "triton"]
    assert candidate_kernels("full", "int8", schemes, q, (0, 0), alternatives=False) == ["triton_dense"]
    # int8 heads sharing one band, text first in whole tiles or none: the two-pass band kernels first
    band = (HeadScheme("arrow", 2, 2, "int8"),) * 2
    assert candidate_kernels("arrow", "int8", band, q, (0, 0)) == ["triton_band", "triton"]
    assert candidate_kernels("local3d", "int8", (HeadScheme("local3d", 2, 2, "int8"),), q, (0, 0)) == [
        "triton_band", "triton"]
    assert candidate_kernels("arrow", "int8", band, q, (0, 0), alternatives=False) == ["triton_band"]
    # ... not two bands in one group, text not first or not in whole tiles, other precisions
    mixed = (HeadScheme("arrow", 2, 2, "int8"), HeadScheme("arrow", 4, 4, "int8"))
    assert candidate_kernels("arrow", "int8", mixed, q, (0, 0)) == ["triton"]
    assert candidate_kernels("arrow", "int8", band, q, (20, 148)) == ["triton"]
    assert candidate_kernels("arrow", "int8", band, q, (0, 100)) == ["triton"]
    assert candidate_kernels("full", "fp8", (HeadScheme("full", precision="fp8"),), q, (0, 0)) == ["triton"]
    monkeypatch.setattr(attention_8bit_dense, "kernel_supports", lambda q: False)  # e.g. head dim 64, sm_80
    assert candidate_kernels("full", "int8", schemes, q, (0, 0)) == ["triton"]
    assert candidate_kernels("arrow", "int8", band, q, (0, 0)) == ["triton"]


def test_the_dense_kernel_computes_the_int8_specification():
    q, k, v = _qkv(heads=2, seq=40, dim=32)
    from ditbake.plugins import attention_8bit as a8

    runner = AttentionRunner()
    got = runner._run_kernel("triton_dense", "int8", q, k, v, (HeadScheme("full", precision="int8"),) * 2, (0, 0))
    table = torch.zeros(2, 3, dtype=torch.int32)
    torch.testing.assert_close(got, a8.attention_8bit_ref(q, k, v, table, (0, 0), None, None, "int8"), rtol=0, atol=0)


class _FakeClock:
    """torch.cuda's events and synchronize over a host clock that each candidate call advances by its cost:
    the timer's arithmetic without a GPU."""

    def __init__(self):
        self.now = 0.0
        clock = self

        class Event:
            def __init__(self, enable_timing=True):
                self.t = None

            def record(self):
                self.t = clock.now

            def synchronize(self):
                pass

            def elapsed_time(self, other):
                return other.t - self.t

        self.Event = Event


def test_interleaved_timer_warms_up_by_gpu_time_and_averages_back_to_back_calls(monkeypatch):
    """The build's kernel timer: candidates run in turns until warm_ms of (event-timed) work has passed — here the
    first calls are slow, as on a GPU whose clocks ramp up after compilation — then each timing spans `inner`
    calls and reports the time per call; the slow start does not reach the medians."""
    from ditbake.runtime import attention

    clock = _FakeClock()
    monkeypatch.setattr(torch.cuda, "Event", clock.Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    calls = {"a": 0, "b": 0}

    def candidate(name, cost):
        def run():
            calls[name] += 1
            clock.now += cost * (3.0 if calls[name] <= 10 else 1.0)  # a slow ramp over the first calls
        return run

    got = attention.interleaved_median_ms({"a": candidate("a", 4.0), "b": candidate("b", 6.0)}, warmup=2, reps=5,
                                          inner=3, warm_ms=100.0)
    assert got == {"a": 4.0, "b": 6.0}
    # 2 warm-up calls each (not counted), then turns of one call each until >= 100 ms: 4 slow turns of
    # 12 + 18 ms; then 5 timings of 3 calls; the ramp's last slow calls fall in the first timing, not the median
    assert calls["a"] == calls["b"] == 2 + 4 + 5 * 3
    # without the time-based warm-up and with one call per timing, the slow start is what gets measured
    calls.update(a=0, b=0)
    cold = attention.interleaved_median_ms({"a": candidate("a", 4.0), "b": candidate("b", 6.0)}, warmup=2, reps=3,
                                           inner=1, warm_ms=0.0)
    assert cold == {"a": 12.0, "b": 18.0}
