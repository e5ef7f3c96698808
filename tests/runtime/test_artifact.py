"""Artifact v1: validated load, hash checks, atomic build, malformed files."""
import json
import shutil

import pytest
import torch

from ditbake.exporter import build as builder
from ditbake.runtime import ArtifactError, load
from ditbake.runtime.artifact import FORMAT_VERSION, MANIFEST, PLAN, WEIGHTS, load_artifact

from tests.conftest import build_tiny_artifact


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path, _ = build_tiny_artifact(tmp_path_factory.mktemp("art"), "tiny-wan", steps=3)
    return path


def _copy(artifact, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def test_manifest_indexes_every_file_with_sha256(artifact):
    art = load_artifact(artifact)
    m = art.manifest
    assert m["format_version"] == FORMAT_VERSION and m["producer"]["name"] == "ditbake"
    assert set(m["files"]) == {WEIGHTS, PLAN}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert m["model"]["architecture"] == "wan" and m["model"]["config"]["num_layers"] == 3
    assert art.profiles[0].latent_shape == (4, 3, 8, 8)
    assert set(art.samplers) == {"unipc", "flow_euler"} and art.default_sampler == "unipc"


def test_weights_stored_once(artifact, tmp_path):
    """Weights appear once in safetensors, whatever the number of plan variants."""
    art = load_artifact(artifact)
    model_keys = {k for k in art.weights if not k.startswith("profile.")}
    from ditbake.exporter import models
    assert model_keys == set(models.load("tiny-wan").state_dict())


def _expect(path, message):
    with pytest.raises(ArtifactError, match=message) as info:
        load(path)
    assert "\n" not in str(info.value)


def test_hash_mismatch(artifact, tmp_path):
    dst = _copy(artifact, tmp_path)
    data = bytearray((dst / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF  # flip bits inside the tensor payload
    (dst / WEIGHTS).write_bytes(bytes(data))
    _expect(dst, "sha256 mismatch for weights.safetensors")


def test_missing_file(artifact, tmp_path):
    dst = _copy(artifact, tmp_path)
    (dst / PLAN).unlink()
    _expect(dst, "plan.json is missing")


def test_unknown_format_version(artifact, tmp_path):
    dst = _copy(artifact, tmp_path)
    m = json.loads((dst / MANIFEST).read_text())
    m["format_version"] = 99
    (dst / MANIFEST).write_text(json.dumps(m))
    _expect(dst, "format version 99 is not supported")


def test_corrupted_manifest_and_missing_dir(artifact, tmp_path):
    dst = _copy(artifact, tmp_path)
    (dst / MANIFEST).write_text('{"format": "ditbake-artifact", ')
    _expect(dst, "not valid JSON")
    _expect(tmp_path / "nowhere", "does not exist")
    (dst / MANIFEST).unlink()
    _expect(dst, "has no manifest.json")


def test_manifest_path_escape_refused(artifact, tmp_path):
    dst = _copy(artifact, tmp_path)
    m = json.loads((dst / MANIFEST).read_text())
    m["files"]["../outside"] = {"sha256": "0" * 64}
    (dst / MANIFEST).write_text(json.dumps(m))
    _expect(dst, "outside the artifact")


def test_tampered_plan_with_rehash_still_validated(artifact, tmp_path):
    """Even with a matching hash, a plan that does not validate is refused."""
    from ditbake.runtime.artifact import sha256_file
    from ditbake.runtime.errors import PlanError
    dst = _copy(artifact, tmp_path)
    plan = json.loads((dst / PLAN).read_text())
    plan["version"] = 7
    (dst / PLAN).write_text(json.dumps(plan))
    m = json.loads((dst / MANIFEST).read_text())
    m["files"][PLAN]["sha256"] = sha256_file(dst / PLAN)
    (dst / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(PlanError, match="version 7"):
        load(dst)


def test_failed_build_leaves_nothing_and_keeps_previous(artifact, tmp_path, monkeypatch):
    target = _copy(artifact, tmp_path)
    before = (target / MANIFEST).read_text()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(builder, "bake_samplers", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_artifact(tmp_path, "tiny-wan", steps=3)  # builds into tmp_path/tiny-wan
    assert not (tmp_path / "tiny-wan").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    # and a failed rebuild over an existing artifact leaves the old one intact
    monkeypatch.setattr(builder, "bake_samplers", boom)
    with pytest.raises(RuntimeError):
        from ditbake.exporter.adapters import adapter_for
        from ditbake.exporter import models
        from ditbake.runtime.artifact import Profile
        a = adapter_for(models.load("tiny-wan"))
        builder.build(a, load_artifact(target).plan, target, profiles=[Profile("p0", (4, 3, 8, 8), 8)],
                      samplers=["unipc"], progress=False)
    assert (target / MANIFEST).read_text() == before
    load(target)


def test_rebuild_replaces_atomically(tmp_path):
    path, _ = build_tiny_artifact(tmp_path, "tiny-wan", steps=2)
    first = load_artifact(path).manifest["files"][PLAN]["sha256"]
    path2, _ = build_tiny_artifact(tmp_path, "tiny-wan", steps=3)
    assert path2 == path
    assert load_artifact(path).plan.num_steps == 3
    assert load_artifact(path).manifest["files"][PLAN]["sha256"] != first
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-wan"]
