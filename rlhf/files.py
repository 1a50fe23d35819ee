"""Writes that are never seen half-done: one file (`atomic_write`) or a whole folder (`atomic_dir`),
and a cross-process lock for writers of one target (`dir_lock`).

Both write to a temp path, fsync what they wrote, rename it into place and fsync the parent
folder, so after they return the new content survives a power loss, and a crash before that
leaves the old content (and at most a hidden temp path)."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def dir_lock(target: Path) -> Iterator[None]:
    """Serialise writers of `target` across processes (several services may prepare at start-up)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temp dir next to `target`; on success it replaces `target` in one rename.

    The temp dir sits in the same parent so the rename never crosses file systems. A reader sees
    either the old folder or the complete new one, and a crash leaves only a hidden temp dir.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp makes it private (0700); the final folder is meant to be shared like any other.
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        _make_readable(tmp)
        _fsync_tree(tmp)
        _swap_in(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(folder: Path) -> None:
    # Some writers (safetensors among them) create 0600 files; a model folder is read by other
    # users and containers, so everything in it gets ordinary permissions.
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o644)
        elif path.is_dir() and not path.is_symlink():
            os.chmod(path, 0o755)


def fsync_dir(folder: Path) -> None:
    """Makes the names in `folder` (a rename into it, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    # Writers such as torch.save and safetensors don't fsync; the rename must not be durable
    # before the bytes it names.
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for sub in [*(p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), folder]:
        fsync_dir(sub)


def _swap_in(new: Path, target: Path) -> None:
    # rename() cannot replace a non-empty directory, so the old one is moved aside first.
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def atomic_write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` in one rename: a reader sees the old content or all of the new,
    and a crash leaves only a hidden temp file. The temp file gets `mode` before any byte is
    written (0o600 for secrets), and its content is on disk before the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it at creation
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
