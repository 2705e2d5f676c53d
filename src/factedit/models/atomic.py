"""Output folders written whole or not at all.

`check_destination` is called before any work (a model load, an edit): it refuses an existing
file, a non-empty folder (unless `force`) and a place this process cannot write, each with a
sentence naming the path and the fix. `atomic_folder` then yields a temporary sibling folder;
only when everything was written is it renamed into place, so a full disk, an exception or a
kill -9 leaves the destination as it was (absent, or the old folder with `force`) and, at
worst, a hidden `.NAME.PID.partial` sibling that the next write to the same place removes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DestinationError(ValueError):
    """An output path cannot be written as asked; the message names it and the fix."""


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def check_destination(path: str | Path, *, force: bool = False, what: str = "destination"
                      ) -> Path:
    """`path` as a Path, after checking it can receive a new folder; DestinationError if not.

    what: how the caller names the path in messages ("--save", "--out")."""
    dest = Path(path).expanduser()
    if dest.is_file() or (dest.exists() and not dest.is_dir()):
        raise DestinationError(f"{what} {dest} is an existing file: give a folder path "
                               f"(it is written as a folder)")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise DestinationError(f"{what} {dest} is a folder that holds files already: choose a "
                               f"new or empty folder, or pass --force to replace it")
    base = _nearest_existing(dest.parent)
    if not base.is_dir():
        raise DestinationError(f"{what} {dest}: {base} is a file, not a folder: choose "
                               f"another path")
    probe = base / f".{dest.name or 'out'}.{os.getpid()}.probe"
    try:  # os.access says yes to root on a read-only file system: try it for real
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise DestinationError(f"{what} {dest}: cannot write in {base} ({err.strerror}): "
                               f"choose a writable place") from None
    return dest


def _partial(dest: Path, tag: str = "partial") -> Path:
    return dest.with_name(f".{dest.name}.{os.getpid()}.{tag}")


def _remove_stale_partials(dest: Path) -> None:
    """Temporary siblings left by killed writers (their process is gone)."""
    for tmp in dest.parent.glob(f".{dest.name}.*.partial"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)  # raises if no such process
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


@contextmanager
def atomic_folder(path: str | Path, *, force: bool = False, what: str = "destination"
                  ) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; rename it to `path` when the block succeeds.

    On any exception (or a kill) the destination is unchanged. With `force`, an existing
    folder at `path` is replaced, after the new one is complete."""
    dest = check_destination(path, force=force, what=what)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(dest)
    tmp = _partial(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists():
            old = _partial(dest, "old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
