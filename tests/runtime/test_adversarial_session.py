"""Hostile generation requests: non-finite, non-float or absurd inputs are refused up front, and
latents that become NaN/Inf stop the loop with a typed error naming the step and the cause."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditbake.runtime import InputError, load
from ditbake.runtime.artifact import MANIFEST, WEIGHTS, sha256_file
from ditbake.runtime.errors import NumericsError

from tests.adversarial import copy_artifact, tiny_artifact


@pytest.fixture(scope="module")
def session():
    return load(tiny_artifact())


def _embeds(session, batch=1, dtype=torch.float32):
    p = session.profile()
    return torch.randn(batch, p.text_len, int(session.config["text_dim"])).to(dtype)


@pytest.mark.parametrize("guidance", [float("inf"), float("-inf"), float("nan"), 1e30, -1e30, "5", True, None])
def test_guidance_refused(session, guidance):
    with pytest.raises(InputError, match="guidance"):
        session.generate(_embeds(session), guidance_scale=guidance)


@pytest.mark.parametrize("seed", [2**64, -1, "abc", 1.5, True, None])
def test_seed_refused(session, seed):
    with pytest.raises(InputError, match="seed"):
        session.generate(_embeds(session), seed=seed)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8])
def test_non_float_embeddings_refused(session, dtype):
    with pytest.raises(InputError, match="dtype"):
        session.generate(_embeds(session, dtype=dtype))
    with pytest.raises(InputError, match="dtype"):
        session.generate(_embeds(session), negative_embeds=_embeds(session, dtype=dtype))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e38])
def test_non_finite_or_absurd_embeddings_refused(session, value):
    e = _embeds(session)
    e[0, 1, 2] = value
    with pytest.raises(InputError):
        session.generate(e)


def test_empty_batch_and_prompt(session):
    with pytest.raises(InputError, match="empty"):
        session.generate(_embeds(session, batch=0))
    for prompt in ("", "   ", []):
        with pytest.raises(InputError, match="empty|non-empty"):
            session.generate(None, prompt=prompt)


def test_integer_latents_refused(session):
    shape = (1, *session.profile().latent_shape)
    with pytest.raises(InputError, match="dtype"):
        session.generate(_embeds(session), latents=torch.zeros(shape, dtype=torch.int64))


def test_overflowing_latents_stop_at_their_step(session):
    """Finite but huge latents overflow inside the model: the loop stops at step 0 naming it."""
    shape = (1, *session.profile().latent_shape)
    with pytest.raises(NumericsError, match="step 0 of 2") as info:
        session.generate(_embeds(session), latents=torch.full(shape, 3e38))
    assert "\n" not in str(info.value)


def test_nan_weights_stop_with_weights_cause(tmp_path):
    art = copy_artifact(tmp_path)
    w = load_file(str(art / WEIGHTS))
    w["blocks.1.ffn.net.2.bias"][3] = float("nan")
    (art / WEIGHTS).unlink()
    save_file(w, str(art / WEIGHTS))
    m = json.loads((art / MANIFEST).read_text())
    m["files"][WEIGHTS] = {"sha256": sha256_file(art / WEIGHTS), "bytes": (art / WEIGHTS).stat().st_size}
    (art / MANIFEST).write_text(json.dumps(m))
    s = load(art)
    with pytest.raises(NumericsError, match="step 0 .*model's output itself is non-finite"):
        s.generate(_embeds(s))


def test_finite_request_runs(session):
    """The base case: a sane request is not refused by these guards and gives finite latents."""
    out = session.generate(_embeds(session), guidance_scale=5.0, seed=2**63).latents
    assert torch.isfinite(out).all()
