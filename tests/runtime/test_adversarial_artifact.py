"""Hostile artifacts: every manifest and plan field replaced by every wrong JSON type (or removed)
loads or gives a typed one-line error, never a traceback; structural fields are always refused.
Plus non-regular, huge and deep files, names, engines outside the manifest, and artifacts whose
weights, plan or profiles do not fit the model config."""
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditbake.runtime import ArtifactError, DitbakeError, PlanError, load
from ditbake.runtime.artifact import MANIFEST, PLAN, WEIGHTS, load_artifact, sha256_file
from ditbake.runtime.engines import AotiEngines

from tests.adversarial import (WRONG_IDS, WRONG_VALUES, copy_artifact, drop_path, json_paths, set_path,
                               tiny_artifact)

DROP = object()


def _manifest():
    return json.loads((tiny_artifact() / MANIFEST).read_text())


def _plan():
    return json.loads((tiny_artifact() / PLAN).read_text())


def _rehash(art, rel):
    m = json.loads((art / MANIFEST).read_text())
    m["files"][rel] = {"sha256": sha256_file(art / rel), "bytes": (art / rel).stat().st_size}
    (art / MANIFEST).write_text(json.dumps(m))


def _loads_or_typed(art, expect_error: bool, types=DitbakeError):
    try:
        load_artifact(art)
    except types as exc:
        assert "\n" not in str(exc)
        return
    assert not expect_error, "a malformed artifact loaded without an error"


# fields whose value does not decide what is computed or read: any JSON there may load
FREE_MANIFEST = (("model", "config"), ("model", "label"), ("model", "diffusers_class"), ("model", "parameters"),
                 ("dtype",), ("producer",))
FREE_PLAN = (("predicted",),)


def _may_load(path: tuple, value, free) -> bool:
    if path in (("scheduler_config",), ("components",)) and isinstance(value, dict):  # objects read on use
        return True
    if any(path[:len(p)] == p for p in free) or value is DROP and path[-1] in ("purified", "tiles", "adaptive",
                                                                                "stack_extrapolation", "uncond_skip", "mode",
                                                                                "num_steps", "backend", "engines",
                                                                                "text_encoder", "dtype", "producer",
                                                                                "scheduler_config", "components"):
        return True
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if path[-1] == "name" or path[:1] == ("profiles",) and path[-1] == "name":
        return isinstance(value, str) and "\0" not in value
    if path[0] == "samplers" and (path[-2:-1] == ("timesteps",) or path[-1] == "init_noise_sigma" or
                                  len(path) == 5 and path[2].endswith("coeffs")):
        return numeric or value is DROP and len(path) == 5  # a shorter row: fewer terms
    if path[0] == "samplers" and len(path) == 4 and path[2].endswith("coeffs"):
        return value == []  # an empty coefficient row is a valid (zero) term
    if path[0] == "samplers" and value is DROP and (len(path) == 2 or len(path) == 5):
        return True  # a non-default sampler, or a row's last coefficient
    if path[:1] == ("variants",) and (path[2:3] in (("precisions",), ("heads",)) and value in ({}, DROP) or
                                      len(path) >= 4 and path[2] in ("precisions", "heads") and value is DROP):
        return True  # fewer precisions / head schemes: bf16 / full attention
    if path[-1] == "purified":
        return value is False or value is True  # a purified refresh of a computed block is valid
    if path[:1] == ("steps",) and path[-1] == "uncond" and value is DROP:
        return True  # uncond falls back to cond's table
    if path == ("text_encoder",):
        return value is None
    if path == ("adaptive",):
        return value in (None, {})  # a baked plan ignores it
    if path == ("tiles",):
        return value in (None, {}, [])
    return False


MANIFEST_CASES = [(p, v) for p in json_paths(_manifest(), skip={("tensors",)}) for v in [*WRONG_VALUES, DROP]]
PLAN_CASES = [(p, v) for p in json_paths(_plan()) for v in [*WRONG_VALUES, DROP]]


def _ids(cases):
    names = dict(zip(map(repr, WRONG_VALUES), WRONG_IDS)) | {repr(DROP): "drop"}
    return [".".join(map(str, p)) + "=" + names[repr(v)] for p, v in cases]


@pytest.mark.parametrize("path,value", MANIFEST_CASES, ids=_ids(MANIFEST_CASES))
def test_manifest_field_wrong_type(tmp_path, path, value):
    art = copy_artifact(tmp_path)
    m = _manifest()
    doc = drop_path(m, path) if value is DROP else set_path(m, path, value)
    if doc == m:
        pytest.skip("the wrong value is the original value")
    (art / MANIFEST).write_text(json.dumps(doc))
    _loads_or_typed(art, expect_error=not _may_load(path, value, FREE_MANIFEST))


@pytest.mark.parametrize("path,value", PLAN_CASES, ids=_ids(PLAN_CASES))
def test_plan_field_wrong_type(tmp_path, path, value):
    art = copy_artifact(tmp_path)
    p = _plan()
    doc = drop_path(p, path) if value is DROP else set_path(p, path, value)
    if doc == p:
        pytest.skip("the wrong value is the original value")
    (art / PLAN).write_text(json.dumps(doc))
    _rehash(art, PLAN)
    _loads_or_typed(art, expect_error=not _may_load(path, value, FREE_PLAN))


class _Alarm:
    """Fail instead of hanging (a FIFO read blocks forever)."""

    def __enter__(self):
        signal.signal(signal.SIGALRM, lambda *a: pytest.fail("reading the artifact hung"))
        signal.alarm(10)

    def __exit__(self, *exc):
        signal.alarm(0)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory", "dangling", "deep", "huge", "utf16", "bigint"])
def test_manifest_file_hostile(tmp_path, kind):
    art = copy_artifact(tmp_path)
    mpath = art / MANIFEST
    mpath.unlink()
    if kind == "fifo":
        os.mkfifo(mpath)
    elif kind == "dev_zero":
        mpath.symlink_to("/dev/zero")
    elif kind == "directory":
        mpath.mkdir()
    elif kind == "dangling":
        mpath.symlink_to(tmp_path / "nowhere")
    elif kind == "deep":
        mpath.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "huge":
        with open(mpath, "wb") as f:
            f.truncate(300 << 20)  # sparse: no disk used, but past the size cap
    elif kind == "utf16":
        mpath.write_bytes(json.dumps(_manifest()).encode("utf-16"))
    elif kind == "bigint":
        mpath.write_text('{"format": "ditbake-artifact", "format_version": 1' + "0" * 5000 + "}")
    with _Alarm(), pytest.raises(ArtifactError) as info:
        load(art)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["a\0b", "x" * 5000, "../../etc/passwd", "/etc/passwd", "a/" * 40 + "b",
                                  "engines\\..\\x", "./weights.safetensors", "a//b", ""])
def test_hostile_file_names_refused(tmp_path, name):
    art = copy_artifact(tmp_path)
    m = _manifest()
    m["files"][name] = m["files"][WEIGHTS]
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError):
        load(art)


@pytest.mark.parametrize("shape", [[-1, 3, 8, 8], [4, 3, 8, 10**12], [4, 3, 8], [4, 3, 8, 8, 8], [5, 3, 8, 8],
                                   [4, 3, 8, 7], [4.0, 3, 8, 8], [4, 1 << 19, 1 << 19, 8], []])
def test_profile_shapes_refused(tmp_path, shape):
    art = copy_artifact(tmp_path)
    m = _manifest()
    m["profiles"][0]["latent_shape"] = shape
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError):
        load_artifact(art)


def _aoti_manifest(art, entry, add_file=None):
    m = _manifest()
    m["backend"] = "aoti"
    m["engines"] = [entry]
    if add_file:
        (art / add_file).parent.mkdir(parents=True, exist_ok=True)
        (art / add_file).write_bytes(b"native code")
        m["files"][add_file] = {"sha256": sha256_file(art / add_file), "bytes": 11}
    (art / MANIFEST).write_text(json.dumps(m))
    return m


@pytest.mark.parametrize("case", ["absolute", "parent", "unlisted", "zero_sha", "symlink_out"])
def test_engine_files_contained_and_hashed(tmp_path, monkeypatch, case):
    """An engine is loaded only from a file inside the artifact that the manifest lists with its sha256,
    checked before loading, whether or not the whole artifact was verified first."""
    art = copy_artifact(tmp_path)
    outside = tmp_path / "evil.pt2"
    outside.write_bytes(b"native code")
    entry = {"key": "prologue-p0", "file": None, "built_for": {"device": "cpu"}}
    if case == "absolute":
        entry["file"] = str(outside)
    elif case == "parent":
        entry["file"] = "../evil.pt2"
    elif case == "unlisted":
        (art / "engines" / "x.pt2").write_bytes(b"native code")
        entry["file"] = "engines/x.pt2"
    elif case == "zero_sha":
        entry["file"] = "engines/x.pt2"
    elif case == "symlink_out":
        (art / "engines" / "x.pt2").symlink_to(outside)
        entry["file"] = "engines/x.pt2"
    m = _aoti_manifest(art, entry, add_file="engines/x.pt2" if case == "zero_sha" else None)
    if case == "zero_sha":
        m["files"]["engines/x.pt2"]["sha256"] = "0" * 64
        (art / MANIFEST).write_text(json.dumps(m))
    if case == "symlink_out":
        m["files"]["engines/x.pt2"] = {"sha256": sha256_file(outside), "bytes": 11}
        (art / MANIFEST).write_text(json.dumps(m))
    loaded = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: loaded.append(a))
    with pytest.raises(ArtifactError):
        load(art)
    # the engine loader checks on its own too (load_artifact(verify=False) skips the global check)
    with pytest.raises(ArtifactError):
        AotiEngines(None, {}, {}, art, [entry], "cpu")
    assert loaded == []


@pytest.mark.parametrize("field,value", [("blocks", "0"), ("blocks", [0.0]), ("blocks", [True]), ("blocks", [-1]),
                                         ("blocks", [1 << 20]), ("blocks", [None]), ("blocks", {"0": 1}),
                                         ("variant", None), ("variant", "0"), ("variant", -1), ("variant", 1.0),
                                         ("profile", None), ("profile", 0)])
def test_block_engine_routes_typed(tmp_path, monkeypatch, field, value):
    """What the runtime routes a block by (the engine's variant, profile and the blocks it serves) is
    type-checked at load: a typed refusal, no native code loaded."""
    art = copy_artifact(tmp_path)
    entry = {"key": "block-v0-g0-p0", "part": "block", "variant": 0, "profile": "p0", "blocks": [0],
             "file": "engines/x.pt2", "built_for": {"device": "cpu"}}
    if value is None:
        del entry[field]
    else:
        entry[field] = value
    _aoti_manifest(art, entry, add_file="engines/x.pt2")
    loaded = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: loaded.append(a))
    with pytest.raises(ArtifactError, match=field):
        load(art)
    assert loaded == []


def _edit_weights(art, edit):
    w = load_file(str(art / WEIGHTS))
    edit(w)
    (art / WEIGHTS).unlink()  # a hard link to the shared artifact's weights: never write through it
    save_file(w, str(art / WEIGHTS))
    _rehash(art, WEIGHTS)
    m = json.loads((art / MANIFEST).read_text())  # the attacker updates the tensor record too
    m["tensors"] = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in w.items()}
    (art / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("case", ["missing", "transposed", "extra_block", "resized", "dropped_everywhere",
                                  "head_width", "record_only"])
def test_weights_checked_against_config(tmp_path, case):
    art = copy_artifact(tmp_path)
    if case == "missing":
        _edit_weights(art, lambda w: w.pop("blocks.1.ffn.net.2.weight"))
    elif case == "transposed":
        _edit_weights(art, lambda w: w.update({"blocks.0.ffn.net.0.proj.weight":
                                                   w["blocks.0.ffn.net.0.proj.weight"].T.contiguous()}))
    elif case == "extra_block":
        _edit_weights(art, lambda w: w.update({"blocks.9.ffn.net.2.weight": w["blocks.0.ffn.net.2.weight"].clone()}))
    elif case == "resized":
        _edit_weights(art, lambda w: w.update({"blocks.2.attn2.to_k.bias": torch.zeros(5)}))
    elif case == "dropped_everywhere":  # uniform across blocks, but the architecture needs it
        _edit_weights(art, lambda w: [w.pop(k) for k in list(w) if k.endswith("ffn.net.0.proj.weight")])
    elif case == "head_width":  # every block's attention is one head narrower than the config says
        def narrower(w):
            for k in list(w):
                if ".attn1.to_q." in k:
                    w[k] = w[k][:-8].contiguous()
        _edit_weights(art, narrower)
    elif case == "record_only":  # weights intact, the manifest's tensor record says otherwise
        m = json.loads((art / MANIFEST).read_text())
        m["tensors"]["blocks.0.ffn.net.2.weight"]["shape"] = [1, 1]
        (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as info:
        load_artifact(art)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["heads", "architecture", "cross_attention_arrow", "float_id", "float_tile",
                                  "huge_width", "num_steps_text", "blocks"])
def test_plan_checked_against_config(tmp_path, case):
    art = copy_artifact(tmp_path)
    p = _plan()
    v0 = p["variants"][0]
    if case == "heads":  # consistent with itself (3 sites' schemes for 3 heads) but not with the model's 2
        p["attention_sites"]["attn1"] = 3
        v0["heads"] = {"attn1": [["full", 0, 0]] * 3}
    elif case == "architecture":
        p["architecture"] = "cogvideox"
    elif case == "cross_attention_arrow":
        p["attention_sites"]["attn2"] = 2
        v0["heads"] = {"attn2": [["arrow", 1, 1]] * 2}
    elif case == "float_id":
        p["steps"][0]["cond"][0] = 0.0
    elif case == "float_tile":
        p["tiles"] = {"attn1": [1, 2.0, 2]}
    elif case == "huge_width":
        v0["heads"] = {"attn1": [["arrow", 10**12, 0]] * 2}
    elif case == "num_steps_text":
        p["num_steps"] = "two"
    elif case == "blocks":
        p["num_blocks"] = 2
        for s in p["steps"]:
            for b in s:
                s[b] = s[b][:2]
    (art / PLAN).write_text(json.dumps(p))
    _rehash(art, PLAN)
    with pytest.raises(PlanError) as info:
        load_artifact(art)
    assert "\n" not in str(info.value)


def test_nan_sampler_coefficient_refused(tmp_path):
    art = copy_artifact(tmp_path)
    m = _manifest()
    m["samplers"]["unipc"]["output_coeffs"][1][0] = float("nan")
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="finite"):
        load(art)


def test_pristine_copy_loads(tmp_path):
    """The suite's base case: the unmodified artifact passes every check (so refusals above are earned)."""
    art = copy_artifact(tmp_path)
    load(art)
    assert load_artifact(art).plan.num_blocks == 3


@pytest.mark.parametrize("name", ["tiny-cogvideox", "tiny-sd3", "tiny-flux"])
def test_other_architectures_validate_and_catch_a_transposed_weight(tmp_path, name):
    """The model checks hold for every architecture: its pristine artifact loads (blocks that differ
    by design, as SD3's last or Flux's single-stream ones, are not refused), a transposed weight is."""
    from ditbake.exporter import build as builder, models
    from ditbake.exporter.adapters import adapter_for
    from ditbake.exporter.planner import plan_from_calibration
    from ditbake.exporter.sampler import SAMPLERS
    from ditbake.runtime.artifact import Profile

    adapter = adapter_for(models.load(name))
    text_len = int(adapter.config.get("max_text_seq_length", 8))
    plan = plan_from_calibration({"architecture": adapter.architecture, "num_blocks": adapter.num_blocks,
                                  "linear_layers": list(adapter.linear_layers),
                                  "attention_sites": adapter.attention_sites, "num_steps": 2, "branches": ["cond"]})
    art = builder.build(adapter, plan, tmp_path / "art", profiles=[Profile("p", adapter.latent_shape(2, 8, 8), text_len)],
                        samplers=[SAMPLERS[adapter.architecture][0]], dtype=torch.float32, progress=False)
    load_artifact(art)
    last = adapter.num_blocks - 1
    prefix = f"{adapter.arch.BLOCK_PREFIX}{last}."
    w = load_file(str(art / WEIGHTS))
    name_ = next(k for k, v in sorted(w.items()) if k.startswith(prefix) and v.ndim == 2 and v.shape[0] != v.shape[1])
    _edit_weights(art, lambda w: w.update({name_: w[name_].T.contiguous()}))
    with pytest.raises(ArtifactError, match="do not fit|features") as info:
        load_artifact(art)
    assert name_.removeprefix(prefix) in str(info.value) or "do not fit" in str(info.value)
