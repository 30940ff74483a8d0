"""Writes that never leave a half-written file or directory where a good one was, and the lock that
keeps two processes out of one run or data folder.

A replaced folder goes through two hidden siblings: `.NAME.tmp-PID` (the new content being written)
and `.NAME.old-PID` (the previous content, moved aside for the instant of the swap). A process killed
in between leaves them behind; the next write of NAME puts a moved-aside folder back if NAME is
missing, and removes what dead processes left, saying so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from llmgen import ui
from llmgen.errors import LlmgenError


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an error it replaces `path`
    (a rename), else it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        raise disk_full_error(e, path) or e


def disk_full_error(e: BaseException, path: Path) -> LlmgenError | None:
    """A one-line LlmgenError when `e` says the disk is full (OSError ENOSPC, or the same reported as
    text by torch's or safetensors' writers); None for any other error."""
    text = str(e)
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in text \
        or "unexpected pos" in text  # torch's zip writer when a write comes up short
    if not full:
        return None
    path = Path(path).absolute()
    where = path.parent if path.name else path
    try:
        free = f"{shutil.disk_usage(where).free / 2 ** 20:.0f} MB free"
    except OSError:
        free = "free space unknown"
    return LlmgenError(f"no space left on the device while writing {path} ({free} in {where}); the previous "
                       f"files there are intact: free some space or write somewhere else")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: Path) -> None:
    """Undo what a killed writer of `path` left: put a moved-aside previous version back where `path` is
    missing, and remove the hidden temporary folders of processes that are no longer running."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-(\d+)")
    for p in sorted(path.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if not m or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not path.exists():
            os.replace(p, path)
            ui.info(f"restored {path} from {p.name}, left by a process that was stopped while replacing it")
        else:
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            ui.info(f"removed {p} ({size / 2 ** 20:.1f} MB), left by a process that was stopped while writing {path.name}")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` in one rename.

    On any exception (or Ctrl-C) the temporary directory is removed and `path` is untouched.
    An existing `path` is moved aside first and deleted only after the new one is in place.
    """
    path = Path(path)
    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]  # folders we create
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # innermost first; leave nothing behind that we made
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise disk_full_error(e, path) or e
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (a `.NAME.lock` file beside it) while the block runs. A second
    process gets one line naming the holder; the kernel drops the lock when its holder dies, so a lock
    left by a killed process is simply taken over. The lock file (and any parent folder made for it) is
    removed on release."""
    folder = Path(folder)
    made = [p for p in [folder.parent, *folder.parent.parents] if not p.exists()]
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.with_name(f".{folder.name}.lock")
    while True:
        fh = open(lock, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise LlmgenError(f"{folder} is in use by another llmgen process (pid {holder}); wait for it to end, "
                              f"or use another {what}") from None
        try:  # the previous holder may have removed the file between our open and our lock: use the new one
            if os.stat(lock).st_ino == os.fstat(fh.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)
        fh.close()  # closing releases the lock
        for p in made:  # innermost first, only if still empty
            with contextlib.suppress(OSError):
                p.rmdir()
