"""Outputs and packages under attack: an --out that is not ditbake's is refused (typed, naming
--force) and left untouched; replacement is atomic for readers and recovers from crashes; stale
staging is cleaned; unpack checks sizes before writing; files follow the umask."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading

import pytest

from ditbake.runtime import ArtifactError, load
from ditbake.runtime import atomic
from ditbake.runtime import package as package_mod
from ditbake.runtime.artifact import MANIFEST, WEIGHTS
from ditbake.runtime.errors import OutputError
from ditbake.runtime.outputs import check_output, is_ours
from ditbake.runtime.package import pack, unpack

from tests.adversarial import copy_artifact, tiny_artifact


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return pack(tiny_artifact(), tmp_path_factory.mktemp("pkg") / "tiny.tar")


def _tree(root):
    """Every path under root with its type, size and content: what must not change."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            content = open(p, "rb").read() if os.path.isfile(p) and not os.path.islink(p) else os.path.islink(p)
            out[os.path.relpath(p, root)] = (st.st_mode, content)
    return out


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("victim", ["dir_with_files", "file", "empty_dir", "symlink_to_dir", "foreign_json_dir"])
def test_unpack_refuses_foreign_out_then_force_replaces_only_it(package, tmp_path, victim):
    out = tmp_path / "out"
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    if victim == "dir_with_files":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif victim == "file":
        out.write_text("data")
    elif victim == "empty_dir":
        out.mkdir()
    elif victim == "symlink_to_dir":
        out.symlink_to(keep)
    elif victim == "foreign_json_dir":
        out.mkdir()
        (out / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match="--force"):
        unpack(package, out)
    assert _tree(tmp_path) == before
    unpack(package, out, force=True)
    load(out)
    assert (keep / "precious.txt").read_text() == "mine"  # a symlinked --out is replaced, not followed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "out"]


def test_earlier_outputs_replaced_without_force(package, tmp_path):
    out = unpack(package, tmp_path / "a")
    assert is_ours(out, "artifact")
    unpack(package, out)  # an earlier artifact: replaced
    tar = pack(out, tmp_path / "a.tar")
    assert is_ours(tar, "package")
    pack(out, tar)  # an earlier package: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.tar"]


@pytest.mark.parametrize("where", ["cwd", "parent_of_cwd", "root", "input_package", "dir_holding_input"])
def test_out_never_an_input_or_cwd(package, tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    src = work / "p.tar"
    shutil.copy(package, src)
    monkeypatch.chdir(work)
    out = {"cwd": ".", "parent_of_cwd": "..", "root": "/", "input_package": "p.tar", "dir_holding_input": str(work)}[where]
    before = _tree(tmp_path)
    with pytest.raises(OutputError):
        unpack(src, out, force=True)
    assert _tree(tmp_path) == before


def test_package_out_symlink_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch")
    out = tmp_path / "a.tar"
    out.symlink_to(victim)
    with pytest.raises(OutputError):
        pack(tiny_artifact(), out)
    pack(tiny_artifact(), out, force=True)
    assert victim.read_text() == "do not touch" and not out.is_symlink() and is_ours(out, "package")


def test_concurrent_packages_do_not_mix(tmp_path):
    a = copy_artifact(tmp_path)
    b = tmp_path / "b"
    shutil.copytree(tiny_artifact(), b)
    m = json.loads((b / MANIFEST).read_text())
    m["model"]["label"] = "B"
    (b / MANIFEST).write_text(json.dumps(m))
    out = tmp_path / "x.tar"
    errors = []

    def run(src):
        try:
            for _ in range(5):
                pack(src, out)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    label = load(unpack(out, tmp_path / "u")).artifact.manifest["model"]["label"]
    assert label in ("", "B")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "b", "u", "x.tar"]


def test_readers_never_see_the_artifact_missing(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    if not atomic.renameat2(tmp_path / "x", tmp_path / "y", atomic.RENAME_EXCHANGE):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this kernel/filesystem")
    (tmp_path / "x").rmdir()
    (tmp_path / "y").rmdir()
    target = copy_artifact(tmp_path)
    stop, missing = threading.Event(), []

    def reader():
        while not stop.is_set():
            if not (target / MANIFEST).exists():
                missing.append(1)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(30):
            staging = atomic.staging_dir(target)
            shutil.copy(tiny_artifact() / MANIFEST, staging / MANIFEST)
            atomic.replace(staging, target)
    finally:
        stop.set()
        t.join()
    assert missing == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_fallback_two_renames_and_crash_recovery(tmp_path, monkeypatch):
    target = copy_artifact(tmp_path)
    monkeypatch.setattr(atomic, "_renameat2_fn", None)  # as on a kernel or filesystem without renameat2
    staging = atomic.staging_dir(target)
    (staging / "new").write_text("1")
    atomic.replace(staging, target)
    assert (target / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    # a crash between the two renames: the old artifact sits at the -old- name, the target is missing
    old = tmp_path / f".art.ditbake-old-{_dead_pid()}"
    os.rename(target, old)
    atomic.cleanup_stale(target)
    assert (target / "new").exists() and not old.exists()


def test_stale_staging_of_dead_processes_removed(tmp_path):
    target = copy_artifact(tmp_path)
    dead = _dead_pid()
    stale = [tmp_path / f".art.ditbake-staging-{dead}-abc", tmp_path / f".art.ditbake-tmp-{dead}-x",
             tmp_path / f".art.ditbake-old-{dead}"]
    stale[0].mkdir()
    (stale[0] / "engine.pt2").write_bytes(b"half")
    stale[1].write_bytes(b"half")
    stale[2].mkdir()
    live = tmp_path / f".art.ditbake-staging-{os.getppid()}-abc"  # a live process's: kept
    live.mkdir()
    other = tmp_path / ".other.ditbake-staging-1-abc"  # another output's: not ours to judge here
    other.mkdir()
    atomic.staging_dir(target)
    names = {p.name for p in tmp_path.iterdir()}
    assert not any(p.name in names for p in stale)
    assert live.name in names and other.name in names


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_outputs_follow_umask(package, tmp_path, mask):
    old = os.umask(mask)
    try:
        out = unpack(package, tmp_path / "u")
        tar = pack(out, tmp_path / "t.tar")
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~mask
    assert os.stat(out / WEIGHTS).st_mode & 0o777 == 0o666 & ~mask
    assert os.stat(tar).st_mode & 0o777 == 0o666 & ~mask


def _rewrite(package, tmp_path, edit, name="evil.tar", mode="w"):
    out = tmp_path / name
    with tarfile.open(package) as src, tarfile.open(out, mode) as dst:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
        for info, payload in edit(members):
            dst.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out


def _weights_member(size, kind=tarfile.REGTYPE, name=WEIGHTS):
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info


@pytest.mark.parametrize("case", ["oversized", "undersized", "gz_bomb", "sparse", "deep_path", "long_name",
                                  "manifest_not_first", "duplicate", "truncated", "missing_member",
                                  "manifest_fifo", "cap"])
def test_unpack_hostile_packages(package, tmp_path, monkeypatch, case):
    written = []
    real = package_mod._write_member
    monkeypatch.setattr(package_mod, "_write_member", lambda tar, m, *a: (written.append(m.name), real(tar, m, *a)))

    def swap_weights(member):
        return lambda ms: [(m, d) if m.name != WEIGHTS else member for m, d in ms]

    if case == "oversized":
        evil = _rewrite(package, tmp_path, swap_weights((_weights_member(2 << 20), bytes(2 << 20))))
    elif case == "undersized":
        evil = _rewrite(package, tmp_path, swap_weights((_weights_member(10), bytes(10))))
    elif case == "gz_bomb":  # 64 MB of zeros, ~64 KB compressed: refused from the header, never inflated
        evil = _rewrite(package, tmp_path, swap_weights((_weights_member(64 << 20), bytes(64 << 20))),
                        "evil.tar.gz", "w:gz")
    elif case == "sparse":
        evil = _rewrite(package, tmp_path, swap_weights((_weights_member(0, tarfile.GNUTYPE_SPARSE), None)))
    elif case == "deep_path":
        evil = _rewrite(package, tmp_path, lambda ms: ms + [(_weights_member(1, name="a/" * 2000 + "x"), b"x")])
    elif case == "long_name":
        evil = _rewrite(package, tmp_path, lambda ms: ms + [(_weights_member(1, name="x" * 5000), b"x")])
    elif case == "manifest_not_first":
        evil = _rewrite(package, tmp_path, lambda ms: ms[1:] + ms[:1])
    elif case == "duplicate":
        evil = _rewrite(package, tmp_path, lambda ms: ms + ms[-1:])
    elif case == "truncated":
        evil = tmp_path / "evil.tar"
        data = package.read_bytes()
        evil.write_bytes(data[: len(data) // 2])
    elif case == "missing_member":
        evil = _rewrite(package, tmp_path, lambda ms: [(m, d) for m, d in ms if m.name != WEIGHTS])
    elif case == "manifest_fifo":
        evil = _rewrite(package, tmp_path, lambda ms: [(_weights_member(0, tarfile.FIFOTYPE, MANIFEST), None)] + ms[1:])
    elif case == "cap":
        monkeypatch.setattr(package_mod, "MAX_PACKAGE_BYTES", 1000)
        evil = package
    before = _tree(tmp_path)
    with pytest.raises(ArtifactError) as info:
        unpack(evil, tmp_path / "dest")
    assert "\n" not in str(info.value)
    assert _tree(tmp_path) == before
    if case in ("oversized", "undersized", "gz_bomb", "sparse"):
        assert WEIGHTS not in written  # refused before a byte of it was written


def test_unpack_out_of_disk_is_typed(package, tmp_path, monkeypatch):
    from ditbake.runtime.errors import ResourceError

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(ResourceError, match="free"):
        unpack(package, tmp_path / "dest")
    assert list(tmp_path.iterdir()) == []


def test_check_output_messages():
    with pytest.raises(OutputError, match="NUL"):
        check_output("a\0b", "artifact")


def test_legacy_staging_removed_once_a_day_old(tmp_path):
    """Staging folders of earlier versions (`.NAME.building-*`, no PID in the name) go once stale."""
    target = copy_artifact(tmp_path)
    old, fresh = tmp_path / ".art.building-abc", tmp_path / ".art.building-def"
    for p in (old, fresh):
        p.mkdir()
        (p / "engine.pt2").write_bytes(b"half")
    os.utime(old, (0, 0))
    atomic.staging_dir(target)
    names = {p.name for p in tmp_path.iterdir()}
    assert old.name not in names and fresh.name in names and "art" in names
