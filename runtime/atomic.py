"""Atomic replacement of output files and directories: a reader sees the old version or the new
one, never none, and a crash at any point leaves the old or the new one plus only siblings that
the next write to the same output removes.

Directories are swapped with Linux's renameat2(RENAME_EXCHANGE), which exchanges two paths in
one step; the old tree then sits at the staging name and is removed. Where the call or the
filesystem lacks it, two renames are used (target → `.NAME.ditbake-old-PID`, staging → target):
a reader racing that window sees no artifact, and a crash inside it leaves the old artifact at
the `-old-` name, which the next write to that output (`cleanup_stale`) renames back.

Every sibling this module creates is named `.NAME.ditbake-{staging,tmp,old}-PID[-random]`, so
a later build recognises those of dead processes and removes them (and, a day after their last
change, the `.NAME.building-*` folders of earlier versions); nothing else is touched.
Outputs get the permissions the process umask allows (mkdtemp/mkstemp create 0700/0600).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from ditbake.runtime.safe_io import umask

log = logging.getLogger(__name__)

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
LEGACY_STALE_S = 24 * 3600


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2_fn = _load_renameat2()


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """rename(2) with flags; False where the libc, kernel or filesystem does not offer them."""
    if _renameat2_fn is None:
        return False
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _stem(target: Path) -> str:
    """The sibling-name stem of `target`: `.NAME`, shortened with a hash where NAME is long, so that
    the sibling names stay within a filesystem's 255-byte component limit."""
    name = target.name
    if len(name.encode()) > 150:
        name = name[:40] + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]
    return f".{name}"


def _sibling_pattern(target: Path) -> re.Pattern:
    return re.compile(re.escape(_stem(target)) + r"\.ditbake-(staging|tmp|old)-(\d+)(?:-.*)?")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree at `path` itself (a symlink is unlinked, never followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        Path(path).unlink(missing_ok=True)


def cleanup_stale(target: Path) -> None:
    """Remove the staging siblings of `target` left by dead processes; if `target` itself is missing
    and a dead process's `-old-` copy exists (a crash between the fallback's two renames), put it back."""
    target = Path(target)
    pattern = _sibling_pattern(target)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    legacy = re.compile(re.escape(f".{target.name}") + r"\.(building-|old-|partial$).*")
    for name in names:  # earlier ditbake versions' staging names carried no live PID: a day old is dead
        path = target.parent / name
        if legacy.fullmatch(name) and time.time() - os.lstat(path).st_mtime > LEGACY_STALE_S:
            log.info("removing %s, a staging folder an earlier ditbake left", path)
            remove_path(path)
    for name in sorted(names, key=lambda n: "old" not in n):  # recover an -old- copy first
        m = pattern.fullmatch(name)
        if m is None or _alive(int(m.group(2))):
            continue
        path = target.parent / name
        if m.group(1) == "old" and not os.path.lexists(target):
            log.warning("restoring %s from %s (a replacement was interrupted)", target, name)
            os.rename(path, target)
            continue
        log.info("removing %s, left by a process that no longer runs", path)
        remove_path(path)


def staging_dir(target: Path) -> Path:
    """A fresh private sibling of `target` to build into before `replace`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    cleanup_stale(target)
    return Path(tempfile.mkdtemp(prefix=f"{_stem(target)}.ditbake-staging-{os.getpid()}-", dir=target.parent))


def temp_file(target: Path) -> tuple[int, Path]:
    """A private (0600) sibling file of `target`, created exclusively (O_EXCL), never a fixed name."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    cleanup_stale(target)
    fd, name = tempfile.mkstemp(prefix=f"{_stem(target)}.ditbake-tmp-{os.getpid()}-", dir=target.parent)
    return fd, Path(name)


def apply_umask(path: Path) -> None:
    """Give a freshly written file or tree the permissions the umask allows: 0666/0777 & ~umask."""
    mask = umask()
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask, follow_symlinks=False)
            for f in files:
                if not os.path.islink(os.path.join(root, f)):
                    os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def replace(new: Path, target: Path) -> None:
    """Move the file or tree `new` (a sibling of `target`) to `target`, atomically for readers."""
    new, target = Path(new), Path(target)
    apply_umask(new)
    if not os.path.lexists(target):
        try:
            if renameat2(new, target, RENAME_NOREPLACE):
                return
        except FileExistsError:  # appeared meanwhile: swap below
            pass
        else:
            os.rename(new, target)
            return
    if new.is_file() and (os.path.islink(target) or not os.path.isdir(target)):
        os.replace(new, target)  # rename(2) over a file or link is atomic
        return
    if renameat2(new, target, RENAME_EXCHANGE):
        remove_path(new)  # now the old version
        return
    # no RENAME_EXCHANGE here: two renames; cleanup_stale restores `old` after a crash in between
    old = target.with_name(f"{_stem(target)}.ditbake-old-{os.getpid()}")
    remove_path(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    remove_path(old)


def replace_dir(new: Path, target: Path) -> None:
    replace(new, target)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file through a private temporary sibling and an atomic rename."""
    path = Path(path)
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
