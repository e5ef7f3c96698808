"""ditbake::cudnn_band_attention: band semantics, cuDNN bound mapping, op plumbing (CPU); cuDNN numerics,
CUDA-graph capture and AOTInductor packaging (GPU, `make test-gpu`)."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ditbake.plugins import attention_cudnn as ac
from ditbake.plugins.attention_cudnn import BandInputError, CudnnUnavailableError


def band_mask(seq: int, w_left: int, w_right: int, device=None) -> torch.Tensor:
    """The band written out independently of plugins/head_attention.py: i - w_left <= j <= i + w_right."""
    i = torch.arange(seq, device=device)[:, None]
    j = torch.arange(seq, device=device)[None, :]
    return (j >= i - w_left) & (j <= i + w_right)


def cudnn_documented_mask(seq: int, left, right) -> torch.Tensor:
    """cuDNN's rule as Attention.md words it: left_bound L masks columns at or before i - L,
    right_bound R masks columns beyond i + R; None = no bound (TOP_LEFT alignment, S_q == S_kv)."""
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    keep = torch.ones(seq, seq, dtype=torch.bool)
    if left is not None:
        keep &= j > i - left
    if right is not None:
        keep &= j <= i + right
    return keep


def masked_sdpa(q, k, v, w_left, w_right, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(q.shape[2], w_left, w_right, q.device),
                                          scale=scale)


BANDS = [(0, 0), (3, 11), (17, 0), (0, 9), (40, 40), (96, 95), (500, 500)]  # incl. 0, asymmetric, full width


# ------------------------------------------------------------------------------------------ CPU

@pytest.mark.parametrize("seq", [1, 2, 97])
def test_cudnn_bounds_reproduce_the_band(seq):
    """The (L, R) given to cuDNN, read with cuDNN's documented convention, is exactly ditbake's band."""
    gen = torch.Generator().manual_seed(seq)
    widths = [(0, 0), (seq - 1, seq - 1), (seq, 0), (0, seq + 5)]
    widths += [tuple(torch.randint(0, seq + 3, (2,), generator=gen).tolist()) for _ in range(20)]
    for w_left, w_right in widths:
        left, right = ac.cudnn_bounds(w_left, w_right, seq)
        assert left is None or left >= 1  # cuDNN refuses L < 1
        assert torch.equal(cudnn_documented_mask(seq, left, right), band_mask(seq, w_left, w_right)), (w_left, w_right)


def test_full_width_is_unbounded_and_shares_one_graph_key():
    assert ac.cudnn_bounds(96, 96, 97) == (None, None)
    assert ac.cudnn_bounds(10_000, 0, 97) == (None, 0)
    assert ac.cudnn_bounds(95, 3, 97) == (96, 3)


@pytest.mark.parametrize("w_left,w_right", BANDS)
def test_cpu_op_equals_masked_attention_fp64(w_left, w_right):
    """CPU kernel (the reference) against fp64 SDPA with the band mask built here: the semantics."""
    gen = torch.Generator().manual_seed(w_left * 1000 + w_right)
    q, k, v = (torch.randn(2, 3, 96, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    out = torch.ops.ditbake.cudnn_band_attention(q, k, v, w_left, w_right, None)
    torch.testing.assert_close(out, masked_sdpa(q, k, v, w_left, w_right), rtol=1e-10, atol=1e-12)


def test_cpu_op_fp32_with_scale_and_strided_inputs():
    gen = torch.Generator().manual_seed(7)
    # [B, S, H, D] storage viewed as [B, H, S, D]: non-contiguous, as a fused qkv projection leaves it
    q, k, v = (torch.randn(1, 70, 4, 32, generator=gen).transpose(1, 2) for _ in range(3))
    out = ac.cudnn_band_attention(q, k, v, 5, 2, scale=0.3)
    ref = masked_sdpa(q.double(), k.double(), v.double(), 5, 2, scale=0.3)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)  # fp32 softmax over 70 keys


def test_fake_and_meta_shape_propagation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 12, 1000, 128, dtype=torch.bfloat16, device="cuda")
        out = torch.ops.ditbake.cudnn_band_attention(q, q, q, 10, 20, None)
        assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
        with pytest.raises(BandInputError):
            torch.ops.ditbake.cudnn_band_attention(q, torch.empty(2, 6, 1000, 128, dtype=q.dtype, device="cuda"), q,
                                                   10, 20, None)
    m = torch.empty(1, 8, 333, 64, dtype=torch.float16, device="meta")
    out = torch.ops.ditbake.cudnn_band_attention(m, m, m, 0, 0, 0.1)
    assert out.shape == m.shape and out.device.type == "meta"


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, q, k, v):
        return self.proj(torch.ops.ditbake.cudnn_band_attention(q * 2.0, k, v, 3, 7, None)) + 1.0


def test_export_keeps_one_custom_op_node():
    gen = torch.Generator().manual_seed(3)
    model = _Tiny().eval()
    args = tuple(torch.randn(1, 2, 40, 16, generator=gen) for _ in range(3))
    ep = torch.export.export(model, args)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.ditbake.cudnn_band_attention.default) == 1
    assert not any("softmax" in str(t) for t in targets)  # opaque: not decomposed into the reference
    torch.testing.assert_close(ep.module()(*args), model(*args))


def test_bad_inputs_raise_typed_errors():
    x = torch.randn(1, 2, 10, 8)
    with pytest.raises(BandInputError, match="4-D"):
        ac.cudnn_band_attention(x[0], x[0], x[0], 1, 1)
    with pytest.raises(BandInputError, match="same shape|share one shape"):
        ac.cudnn_band_attention(x, x[:, :1], x, 1, 1)
    with pytest.raises(BandInputError, match=">= 0"):
        ac.cudnn_band_attention(x, x, x, -1, 1)
    with pytest.raises(BandInputError, match="bf16, fp16"):
        ac.cudnn_band_attention(x.int(), x.int(), x.int(), 1, 1)
    with pytest.raises(BandInputError, match="dtype"):
        ac.cudnn_band_attention(x, x.double(), x, 1, 1)
    with pytest.raises(BandInputError, match="scale"):
        ac.cudnn_band_attention(x, x, x, 1, 1, scale=float("nan"))
    with pytest.raises(BandInputError, match=">= 0"):  # through the dispatcher too, not only the wrapper
        torch.ops.ditbake.cudnn_band_attention(x, x, x, 0, -3, None)
    # what the cuDNN kernel cannot run: checked before any GPU work (meta tensors stand in for CUDA)
    with pytest.raises(CudnnUnavailableError, match="bf16 or fp16"):
        ac.check_cuda_inputs(torch.empty(1, 2, 10, 64, device="meta"))
    for head_dim in (12, 264):
        with pytest.raises(CudnnUnavailableError, match="head dim"):
            ac.check_cuda_inputs(torch.empty(1, 2, 10, head_dim, dtype=torch.bfloat16, device="meta"))


def test_graph_definition_validates_with_the_installed_frontend():
    """Where the frontend is installed (no GPU needed): the graph this op defines passes the frontend's
    own validation and operation-graph build with band bounds and strided q/k/v."""
    cudnn = pytest.importorskip("cudnn")
    q = torch.empty(1, 50, 4, 64, dtype=torch.bfloat16).transpose(1, 2)
    out = torch.empty(1, 4, 50, 64, dtype=torch.bfloat16)
    for left, right in [ac.cudnn_bounds(0, 0, 50), ac.cudnn_bounds(7, 2, 50), ac.cudnn_bounds(49, 3, 50),
                        ac.cudnn_bounds(49, 49, 50)]:
        g, tensors = ac.define_graph(cudnn, None, q, q, q, out, left, right, 0.125)
        g.validate()
        g.build_operation_graph()
        assert [t.get_stride() for t in tensors[:3]] == [list(q.stride())] * 3


def test_module_imports_without_the_frontend():
    """`import cudnn` is lazy: with the frontend hidden the module imports and says why it cannot run."""
    code = ("import sys; sys.modules['cudnn'] = None\n"
            "from ditbake.plugins import attention_cudnn as ac\n"
            "print(ac.available(), '|', ac.unavailable_reason())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().startswith("False | nvidia-cudnn-frontend is not installed")


# ------------------------------------------------------------------------------------------ GPU

def _need_cudnn():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = ac.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _rel_l2(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("seq,head_dim", [(1000, 128), (333, 64), (257, 128)])  # S not a multiple of 64/128
@pytest.mark.parametrize("w_left,w_right", BANDS)
def test_gpu_cudnn_matches_fp32_reference(seq, head_dim, w_left, w_right):
    """cuDNN in bf16 vs the fp32 reference, within 2x (+ 1e-3) of the error of bf16 SDPA with the same mask.

    Both take the same bf16 inputs, accumulate in fp32 and round P and the output to bf16 (2^-9
    relative), so a correct band kernel errs like masked bf16 SDPA; a wrong bound (one key in or out
    per row) moves the output by about 1/band of the row's mass, far above that on these bands."""
    _need_cudnn()
    torch.manual_seed(seq + w_left + 7 * w_right)
    q, k, v = (torch.randn(2, 3, seq, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = ac.cudnn_band_attention_ref(q.float(), k.float(), v.float(), w_left, w_right)
    out = ac.cudnn_band_attention(q, k, v, w_left, w_right)
    sdpa_err = _rel_l2(masked_sdpa(q, k, v, w_left, w_right), ref)
    err = _rel_l2(out, ref)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert err <= 2 * sdpa_err + 1e-3, (err, sdpa_err)


@pytest.mark.gpu
def test_gpu_off_by_one_would_be_caught():
    """The tolerance above separates a band from the band one key wider on each side."""
    _need_cudnn()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 500, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = ac.cudnn_band_attention_ref(q.float(), k.float(), v.float(), 8, 8)
    sdpa_err = _rel_l2(masked_sdpa(q, k, v, 8, 8), ref)
    assert _rel_l2(ac.cudnn_band_attention(q, k, v, 9, 9), ref) > 2 * sdpa_err + 1e-3
    assert _rel_l2(ac.cudnn_band_attention(q, k, v, 8, 8), ref) <= 2 * sdpa_err + 1e-3


@pytest.mark.gpu
def test_gpu_strided_inputs_fp16_and_graph_cache():
    _need_cudnn()
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 300, 4, 64, device="cuda", dtype=torch.float16).transpose(1, 2) for _ in range(3))
    ref = ac.cudnn_band_attention_ref(q.float(), k.float(), v.float(), 20, 5, scale=0.2)
    out = ac.cudnn_band_attention(q, k, v, 20, 5, scale=0.2)
    assert _rel_l2(out, ref) <= 2 * _rel_l2(masked_sdpa(q, k, v, 20, 5, scale=0.2), ref) + 1e-3
    graphs = len(ac._GRAPHS)
    ac.cudnn_band_attention(*(torch.randn_like(t) for t in (q, k, v)), 20, 5, scale=0.2)  # fresh, same layout
    assert len(ac._GRAPHS) == graphs


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_replays_new_data():
    """Built at warm-up, the op is capturable: what the runtime's per-step CUDA graph needs."""
    _need_cudnn()
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 4, 640, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ac.cudnn_band_attention(q, k, v, 64, 64)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.ditbake.cudnn_band_attention(q, k, v, 64, 64, None)
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ac.cudnn_band_attention(q, k, v, 64, 64), rtol=0, atol=0)


AOTI_CHECK = """
import sys, torch
import ditbake.plugins.attention_cudnn  # registers ditbake::cudnn_band_attention

class Band(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.ops.ditbake.cudnn_band_attention(q, k, v, 7, 3, None) * 2

torch.manual_seed(4)
args = tuple(torch.randn(1, 2, 200, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
with torch.no_grad():
    ep = torch.export.export(Band(), args)
    loaded = torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(ep, package_path=sys.argv[1]))
    got, want = loaded(*args), Band()(*args)
torch.testing.assert_close(got, want, rtol=0, atol=0)
"""


@pytest.mark.gpu
def test_gpu_aoti_package_runs_the_op(tmp_path):
    """aoti_compile_and_package + aoti_load_package: can the Python custom op run inside a compiled
    engine through AOTInductor's proxy executor? On torch 2.11 + CUDA 13 (H100, 2026-11-26) the
    call segfaults, so the runtime must call the op between engine segments, never inside one. Run
    in a subprocess so the crash is this test's outcome, not the session's: a segfault is the known
    limitation (xfail); any other error fails, and the day it passes the op may move into the engine."""
    _need_cudnn()
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    proc = subprocess.run([sys.executable, "-c", AOTI_CHECK, str(tmp_path / "band.pt2")], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode == -11:
        pytest.xfail("the Python custom op segfaults inside an AOTInductor package (proxy executor), torch "
                     + torch.__version__)
    assert proc.returncode == 0, proc.stderr[-2000:]  # it ran and equals eager bit for bit
