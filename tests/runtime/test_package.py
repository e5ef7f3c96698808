"""Packaging: round trip, and unsafe or tampered tars refused without leaving anything behind."""
import io
import tarfile

import pytest

from ditbake.runtime import ArtifactError, load
from ditbake.runtime.artifact import WEIGHTS
from ditbake.runtime.package import pack, unpack

from tests.conftest import build_tiny_artifact


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    path, _ = build_tiny_artifact(root, "tiny-wan", steps=2)
    return pack(path, root / "tiny-wan.tar")


def test_round_trip(package, tmp_path):
    dest = unpack(package, tmp_path / "unpacked")
    load(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unpacked"]


def _rewrite(package, tmp_path, edit):
    """Copy the package's members through `edit(name, data) -> [(TarInfo, bytes|None)]`."""
    out = tmp_path / "evil.tar"
    with tarfile.open(package) as src, tarfile.open(out, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            for info, payload in edit(m, data):
                dst.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out


def _member(name, data=b"x", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, (len(data) if kind == tarfile.REGTYPE else 0), link
    return info, (data if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("extra,message", [
    (_member("/etc/evil"), "absolute or parent path"),
    (_member("../evil"), "absolute or parent path"),
    (_member("engines/x.so", kind=tarfile.SYMTYPE, link="/bin/sh"), "link or special file"),
    (_member("engines/h", kind=tarfile.LNKTYPE, link="manifest.json"), "link or special file"),
    (_member("engines/unindexed.bin"), "does not index"),
])
def test_unsafe_members_refused(package, tmp_path, extra, message):
    def edit(m, data):
        out = [(m, data)]
        if m.name == "manifest.json":
            out.append(extra)
        return out

    evil = _rewrite(package, tmp_path, edit)
    with pytest.raises(ArtifactError, match=message):
        unpack(evil, tmp_path / "dest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar"]


def test_tampered_payload_refused(package, tmp_path):
    def edit(m, data):
        if m.name == WEIGHTS:
            data = data[:-1] + bytes([data[-1] ^ 1])
        return [(m, data)]

    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        unpack(_rewrite(package, tmp_path, edit), tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_not_a_tar(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 10)
    with pytest.raises(ArtifactError, match="not a readable tar"):
        unpack(tmp_path / "junk.tar", tmp_path / "dest")
