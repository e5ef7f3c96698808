"""Every CLI subcommand on malformed input: a typed exit code (never 0, never 1 = traceback) and
no file outside the output path changed (the whole workspace is snapshot before and after).
Calibration metadata is enumerated field × wrong JSON type."""
import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from ditbake.exporter.calibrate import META_FILE, STATS_FILE, CalibrationStats
from ditbake.exporter.calibrate_check import META_FIELDS
from ditbake.exporter.cli import main
from ditbake.runtime.artifact import MANIFEST, PLAN
from ditbake.runtime.package import pack

from tests.adversarial import WRONG_IDS, WRONG_VALUES, copy_artifact, tiny_artifact


def _calibration_meta(arch="wan"):
    if arch == "wan":
        return {"source": "tiny-wan", "architecture": "wan", "diffusers_class": "WanTransformer3DModel",
                "num_blocks": 3, "linear_layers": ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                                   "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                                                   "ffn.net.0.proj", "ffn.net.2"],
                "attention_sites": {"attn1": 2}, "sampler": "unipc", "num_steps": 2, "guidance_scale": 5.0,
                "seed": 0, "num_prompts": 1, "branches": ["cond", "uncond"], "latent_shape": [4, 3, 8, 8],
                "text_len": 8, "weights_seed": 0}
    return _calibration_meta() | {"architecture": "cogvideox", "num_blocks": 2, "latent_shape": [3, 4, 8, 8],
                                   "linear_layers": ["attn1.to_q"], "source": "tiny-cogvideox"}


def _write_calibration(path, meta):
    blocks = meta.get("num_blocks") if isinstance(meta, dict) else None
    shape = (1, 2, 2, blocks if type(blocks) is int and 0 < blocks < 100 else 3)
    path.mkdir()
    save_file({k: torch.rand(shape) for k in ("gamma", "delta_l1", "delta_change")}, str(path / STATS_FILE))
    (path / META_FILE).write_text(json.dumps(meta))


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A workspace: an artifact, its package, a calibration, a plan, a model dir, someone's files."""
    w = tmp_path / "w"
    w.mkdir()
    art = copy_artifact(w)
    pack(art, w / "pkg.tar")
    _write_calibration(w / "cal", _calibration_meta())
    shutil.copy(art / PLAN, w / "plan.json")
    (w / "model").mkdir()
    (w / "model" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    (w / "foreign").mkdir()
    (w / "foreign" / "thesis.tex").write_text("years of work")
    (w / "foreign.txt").write_text("notes")
    monkeypatch.chdir(w)
    return w


def _tree(root, exclude):
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if exclude and (rel == exclude or rel.startswith(exclude + os.sep)):
                continue
            st = os.lstat(p)
            is_file = os.path.isfile(p) and not os.path.islink(p)
            out[rel] = (st.st_mode, open(p, "rb").read() if is_file else None)
    return out


def _run(argv):
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: usage errors exit 2
        return exc.code


def _hostile(world, argv, out=None):
    before = _tree(world, out)
    rc = _run([str(a) for a in argv])
    assert rc not in (0, 1), f"exit {rc} for {argv}"
    assert _tree(world, out) == before, "a file outside the output path changed"
    return rc


# --- setups: each makes one malformed input in the workspace and returns its path ---------------

def _fifo(w, name):
    os.mkfifo(w / name)
    return w / name


def _deep_manifest(w):
    (w / "art" / MANIFEST).write_text("{" * 0 + "[" * 100_000 + "]" * 100_000)
    return w / "art"


def _devzero_manifest(w):
    (w / "art" / MANIFEST).unlink()
    (w / "art" / MANIFEST).symlink_to("/dev/zero")
    return w / "art"


def _fifo_manifest(w):
    (w / "art" / MANIFEST).unlink()
    os.mkfifo(w / "art" / MANIFEST)
    return w / "art"


def _engine_escape(w):
    m = json.loads((w / "art" / MANIFEST).read_text())
    m["backend"], m["engines"] = "aoti", [{"key": "prologue-p0", "file": "/bin/sh", "built_for": {"device": "cpu"}}]
    (w / "art" / MANIFEST).write_text(json.dumps(m))
    return w / "art"


def _tampered(w):
    p = w / "art" / PLAN
    data = p.read_bytes()
    p.write_bytes(data.replace(b'"cond"', b'"cnd"', 1))
    return w / "art"


def _truncated_tar(w):
    data = (w / "pkg.tar").read_bytes()
    (w / "bad.tar").write_bytes(data[: len(data) // 3])
    return w / "bad.tar"


def _deep_member_tar(w):
    import tarfile, io  # noqa: E401
    with tarfile.open(w / "pkg.tar") as src, tarfile.open(w / "bad.tar", "w") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        info = tarfile.TarInfo("a/" * 2000 + "x")
        info.size = 1
        dst.addfile(info, io.BytesIO(b"x"))
    return w / "bad.tar"


def _garbage(w, name, data=b"\x00garbage\xff" * 10):
    (w / name).write_bytes(data)
    return w / name


def _plan_float_ids(w):
    p = json.loads((w / "plan.json").read_text())
    p["steps"][0]["cond"][0] = 0.0
    (w / "bad_plan.json").write_text(json.dumps(p))
    return w / "bad_plan.json"


def _cal(w, meta=None, stats=None):
    path = w / "badcal"
    _write_calibration(path, meta if meta is not None else _calibration_meta())
    if stats is not None:
        (path / STATS_FILE).write_bytes(stats)
    return path


def _cal_text(w, text):
    path = _cal(w)
    (path / META_FILE).write_text(text)
    return path


def _plant(file):
    file.write_bytes(b"GIF89a someone's gif")
    return file.parent


def _truncated_stats(w):
    data = (w / "cal" / STATS_FILE).read_bytes()
    return _cal(w, stats=data[: len(data) // 2])


CASES = {
    # calibrate
    "calibrate-out-foreign-dir": lambda w: (["calibrate", "--model", "tiny-wan", "--out", "foreign"], "foreign"),
    "calibrate-out-foreign-file": lambda w: (["calibrate", "--model", "tiny-wan", "--out", "foreign.txt"], "foreign.txt"),
    "calibrate-out-cwd": lambda w: (["calibrate", "--model", "tiny-wan", "--out", ".", "--force"], "."),
    "calibrate-out-is-model": lambda w: (["calibrate", "--model", "model", "--out", "model", "--force"], "model"),
    "calibrate-seed-2**64": lambda w: (["calibrate", "--model", "tiny-wan", "--out", "c", "--seed", 2**64], "c"),
    "calibrate-cache-negative": lambda w: (["calibrate", "--model", "tiny-wan", "--out", "c", "--precision-stats",
                                            "--precision-weight-cache-gb", "-1"], "c"),
    "calibrate-cache-nan": lambda w: (["calibrate", "--model", "tiny-wan", "--out", "c", "--precision-stats",
                                       "--precision-weight-cache-gb", "nan"], "c"),
    "calibrate-seed-abc": lambda w: (["calibrate", "--model", "tiny-wan", "--out", "c", "--seed", "abc"], "c"),
    "calibrate-guidance-nan": lambda w: (["calibrate", "--model", "tiny-wan", "--out", "c", "--guidance", "nan"], "c"),
    "calibrate-steps-0": lambda w: (["calibrate", "--model", "tiny-wan", "--out", "c", "--steps", "0"], "c"),
    "calibrate-model-missing": lambda w: (["calibrate", "--model", "nope", "--out", "c"], "c"),
    "calibrate-prompts-garbage": lambda w: (["calibrate", "--model", "tiny-wan", "--out", "c", "--prompts",
                                             _garbage(w, "p.safetensors")], "c"),
    "calibrate-prompts-fifo": lambda w: (["calibrate", "--model", "tiny-wan", "--out", "c", "--prompts",
                                          _fifo(w, "p.safetensors")], "c"),
    # plan
    "plan-calibration-garbage-json": lambda w: (["plan", "--calibration", _cal_text(w, "{not json"), "--out",
                                                 "p.json"], "p.json"),
    "plan-calibration-truncated-stats": lambda w: (["plan", "--calibration", _truncated_stats(w), "--out", "p.json"],
                                                   "p.json"),
    "plan-calibration-garbage-stats": lambda w: (["plan", "--calibration", _cal(w, stats=b"\xff" * 64), "--out",
                                                  "p.json"], "p.json"),
    "plan-calibration-deep-json": lambda w: (["plan", "--calibration", _cal_text(w, "[" * 100_000 + "]" * 100_000),
                                              "--out", "p.json"], "p.json"),
    "plan-calibration-missing": lambda w: (["plan", "--calibration", "nowhere", "--out", "p.json"], "p.json"),
    "plan-out-foreign-file": lambda w: (["plan", "--calibration", "cal", "--out", "foreign.txt"], "foreign.txt"),
    "plan-out-foreign-dir": lambda w: (["plan", "--calibration", "cal", "--out", "foreign"], "foreign"),
    # build
    "build-out-is-model": lambda w: (["build", "--model", "model", "--plan", "plan.json", "--calibration", "cal",
                                      "--out", "model", "--force"], "model"),
    "build-out-is-calibration": lambda w: (["build", "--model", "tiny-wan", "--plan", "plan.json", "--calibration",
                                            "cal", "--out", "cal", "--force"], "cal"),
    "build-out-foreign": lambda w: (["build", "--model", "tiny-wan", "--plan", "plan.json", "--calibration", "cal",
                                     "--out", "foreign"], "foreign"),
    "build-plan-float-ids": lambda w: (["build", "--model", "tiny-wan", "--plan", _plan_float_ids(w),
                                        "--calibration", "cal", "--out", "a2"], "a2"),
    "build-plan-fifo": lambda w: (["build", "--model", "tiny-wan", "--plan", _fifo(w, "fifo.json"),
                                   "--calibration", "cal", "--out", "a2"], "a2"),
    "build-other-models-calibration": lambda w: (["build", "--model", "tiny-wan", "--plan", "plan.json",
                                                  "--calibration", _cal(w, meta=_calibration_meta("cogvideox")),
                                                  "--out", "a2"], "a2"),
    "build-device-tpu": lambda w: (["build", "--model", "tiny-wan", "--plan", "plan.json", "--calibration", "cal",
                                    "--out", "a2", "--device", "tpu"], "a2"),
    # run
    "run-manifest-fifo": lambda w: (["run", _fifo_manifest(w), "--out", "o"], "o"),
    "run-seed-2**64": lambda w: (["run", "art", "--out", "o", "--seed", 2**64], "o"),
    "run-seed-abc": lambda w: (["run", "art", "--out", "o", "--seed", "abc"], "o"),
    "run-device-tpu": lambda w: (["run", "art", "--out", "o", "--device", "tpu"], "o"),
    "run-guidance-inf": lambda w: (["run", "art", "--out", "o", "--guidance", "inf"], "o"),
    "run-guidance-1e30": lambda w: (["run", "art", "--out", "o", "--guidance", "1e30"], "o"),
    "run-empty-prompt": lambda w: (["run", "art", "--out", "o", "--prompt", ""], "o"),
    "run-prompts-garbage": lambda w: (["run", "art", "--out", "o", "--prompts", _garbage(w, "p.st")], "o"),
    "run-out-is-file": lambda w: (["run", "art", "--out", "foreign.txt"], "foreign.txt"),
    "run-out-foreign-outputs": lambda w: (["run", "art", "--out", _plant(w / "foreign" / "clip.gif")], None),
    "run-out-is-artifact": lambda w: (["run", "art", "--out", "art"], None),
    # inspect
    "inspect-deep-json": lambda w: (["inspect", _deep_manifest(w)], None),
    "inspect-dev-zero": lambda w: (["inspect", _devzero_manifest(w)], None),
    "inspect-fifo": lambda w: (["inspect", _fifo_manifest(w)], None),
    "inspect-missing": lambda w: (["inspect", "nowhere"], None),
    "inspect-engine-escape": lambda w: (["inspect", _engine_escape(w)], None),
    "inspect-tampered": lambda w: (["inspect", _tampered(w)], None),
    # package
    "package-out-foreign-file": lambda w: (["package", "art", "--out", "foreign.txt"], "foreign.txt"),
    "package-out-foreign-dir": lambda w: (["package", "art", "--out", "foreign"], "foreign"),
    "package-out-is-artifact": lambda w: (["package", "art", "--out", "art", "--force"], "art"),
    "package-tampered": lambda w: (["package", _tampered(w), "--out", "x.tar"], "x.tar"),
    "package-out-cwd": lambda w: (["package", "art", "--out", ".", "--force"], "."),
    # unpack
    "unpack-truncated": lambda w: (["unpack", _truncated_tar(w), "--out", "u"], "u"),
    "unpack-deep-member": lambda w: (["unpack", _deep_member_tar(w), "--out", "u"], "u"),
    "unpack-not-a-tar": lambda w: (["unpack", _garbage(w, "junk.tar"), "--out", "u"], "u"),
    "unpack-fifo": lambda w: (["unpack", _fifo(w, "f.tar"), "--out", "u"], "u"),
    "unpack-out-cwd": lambda w: (["unpack", "pkg.tar", "--out", ".", "--force"], "."),
    "unpack-out-parent": lambda w: (["unpack", "pkg.tar", "--out", "..", "--force"], ".."),
    "unpack-out-foreign": lambda w: (["unpack", "pkg.tar", "--out", "foreign"], "foreign"),
    "unpack-out-is-package": lambda w: (["unpack", "pkg.tar", "--out", "pkg.tar", "--force"], "pkg.tar"),
    # eval
    "eval-out-foreign-file": lambda w: (["eval", "art", "--out", "foreign.txt"], "foreign.txt"),
    "eval-artifact-missing": lambda w: (["eval", "nowhere", "--out", "e"], "e"),
    "eval-seed-negative": lambda w: (["eval", "art", "--out", "e", "--seed", "-1"], "e"),
    "eval-guidance-nan": lambda w: (["eval", "art", "--out", "e", "--guidance", "nan"], "e"),
    # guidance
    "guidance-out-foreign-file": lambda w: (["guidance", "art", "--count", "1", "--random-embeddings",
                                             "--out", "foreign.txt"], "foreign.txt"),
    "guidance-out-is-the-plan-read": lambda w: (["guidance", "art", "--count", "1", "--random-embeddings",
                                                 "--out", "art/plan.json", "--force"], "art/plan.json"),
    "guidance-artifact-tampered": lambda w: (["guidance", _tampered(w), "--count", "1", "--random-embeddings",
                                              "--out", "g.json"], "g.json"),
    "guidance-count-zero": lambda w: (["guidance", "art", "--count", "0", "--out", "g.json"], "g.json"),
    "guidance-prompts-fifo": lambda w: (["guidance", "art", "--count", "1", "--prompts", _fifo(w, "p.txt"),
                                         "--out", "g.json"], "g.json"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_subcommand_hostile_input(world, case):
    argv, out = CASES[case](world)
    # "." / ".." are refused as outputs: nothing at all may change
    _hostile(world, argv, None if out in (".", "..") else out)


def test_every_subcommand_covered():
    from ditbake.exporter.cli import make_parser

    sub = next(a for a in make_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {c.split("-")[0] for c in CASES}


CAL_CASES = [(f, v) for f in META_FIELDS for v in [*WRONG_VALUES, "DROP"]]


@pytest.mark.parametrize("field,value", CAL_CASES,
                         ids=[f"{f}={dict(zip(map(repr, WRONG_VALUES), WRONG_IDS)).get(repr(v), 'drop')}"
                              for f, v in CAL_CASES])
def test_plan_on_calibration_field_wrong_type(world, field, value):
    meta = _calibration_meta()
    if value == "DROP":
        del meta[field]
    else:
        meta[field] = value
    if meta == _calibration_meta():
        pytest.skip("the wrong value is the original value")
    path = _cal(world, meta=meta)
    if _may_plan(field, value):  # a value of the right type that plan does not depend on
        assert _run(["plan", "--calibration", path, "--out", "p.json"]) in (0, 10)
        return
    rc = _hostile(world, ["plan", "--calibration", path, "--out", "p.json"], "p.json")
    assert rc == 10  # CalibrationError


ABSENT_CASES = {"not-a-list": "x", "object": {}, "short-pair": [[0]], "long-pair": [[0, "attn1.to_q", 1]],
                "block-string": [["0", "attn1.to_q"]], "block-bool": [[True, "attn1.to_q"]],
                "block-negative": [[-1, "attn1.to_q"]], "block-beyond": [[3, "attn1.to_q"]],
                "block-float": [[0.0, "attn1.to_q"]], "layer-unlisted": [[0, "attn9.to_q"]],
                "layer-number": [[0, 7]], "pair-not-list": ["attn1.to_q"]}


@pytest.mark.parametrize("case", sorted(ABSENT_CASES))
def test_plan_on_calibration_with_hostile_absent_linears(world, case):
    """`absent_linears` (optional: Flux/SD3 blocks lacking some listed layer): a typed refusal, nothing written."""
    meta = _calibration_meta() | {"absent_linears": ABSENT_CASES[case]}
    rc = _hostile(world, ["plan", "--calibration", _cal(world, meta=meta), "--out", "p.json"], "p.json")
    assert rc == 10  # CalibrationError


def test_plan_on_calibration_with_well_formed_absent_linears(world):
    meta = _calibration_meta() | {"absent_linears": [[2, "attn1.to_q"], [0, "ffn.net.2"]]}
    assert _run(["plan", "--calibration", str(_cal(world, meta=meta)), "--out", "p.json"]) == 0


def _may_plan(field, value) -> bool:
    if value == "DROP":
        return False
    if field in ("source", "sampler"):
        return isinstance(value, str) and "\0" not in value
    if field == "guidance_scale":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if field == "seed":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return False


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES, errno.EMFILE, errno.EIO])
def test_os_errors_are_typed(world, monkeypatch, err):
    from ditbake.runtime import atomic

    def fail(*a, **k):
        raise OSError(err, os.strerror(err), "somewhere")

    monkeypatch.setattr(atomic, "staging_dir", fail)
    rc = _hostile(world, ["unpack", "pkg.tar", "--out", "u"], "u")
    assert rc in (11, 12)


def test_force_replaces_only_the_out_path(world):
    """The refusals above are earned: with --force the same foreign --out is replaced, nothing else."""
    before = _tree(world, "foreign")
    assert main(["unpack", "pkg.tar", "--out", "foreign", "--force"]) == 0
    assert _tree(world, "foreign") == before
    assert not (world / "foreign" / "thesis.tex").exists() and (world / "foreign" / MANIFEST).exists()


def test_calibration_save_marks_its_format(world):
    CalibrationStats(_calibration_meta(), {k: torch.rand(1, 2, 2, 3) for k in ("gamma", "delta_l1",
                                                                              "delta_change")}).save(world / "c2")
    assert json.loads((world / "c2" / META_FILE).read_text())["format"] == "ditbake-calibration"
    assert CalibrationStats.load(world / "c2").meta["num_blocks"] == 3


@pytest.mark.parametrize("field", ["producer", "dtype", "backend", "engines", "text_encoder", "tensors",
                                   ("model", "label"), ("model", "parameters"), ("model", "diffusers_class")])
def test_inspect_without_optional_fields(world, capsys, field):
    """Optional manifest fields may be absent: inspect still summarises (exit 0), never a KeyError."""
    m = json.loads((world / "art" / MANIFEST).read_text())
    if isinstance(field, tuple):
        del m[field[0]][field[1]]
    else:
        del m[field]
    (world / "art" / MANIFEST).write_text(json.dumps(m))
    assert main(["inspect", "art"]) == 0
    assert json.loads(capsys.readouterr().out)["hashes"] == "verified"
