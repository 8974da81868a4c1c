"""Writing files so that a killed writer leaves the old file, and the next writer leaves no debris.

Every writer in quantlab (a GGUF file, a model folder in the cache, a results file) writes to a
hidden partial beside its target, named after the writing process (`.NAME.partial-PID`), and renames
it into place only when it is complete. A writer killed mid-write (SIGKILL, a full disk, a closed
Colab tab) leaves the old target untouched and its partial behind; the next write of that target,
or the next use of the cache, removes the partials of processes that are gone (chapters 02 and 07).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_output", "partial_path", "remove_stale_partials"]

_MARK = ".partial-"


def partial_path(target: str | os.PathLike, pid: int | None = None) -> Path:
    """Where `target` is written before it is complete: `.NAME.partial-PID` in the same folder. Every chapter."""
    target = Path(target)
    return target.with_name(f".{target.name}{_MARK}{os.getpid() if pid is None else pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_partials(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the partials in `folder` (of the target `name` only, if given) whose writer is no longer running.

    Returns what was removed. A partial of a running process, this one included, is left alone. Every chapter.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.glob(f".{name or '*'}{_MARK}*"):
        pid = path.name.rpartition(_MARK)[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(path)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a partial path to write `target` to (a file or a folder); on success it replaces `target`.

    Stale partials of `target` are removed first. If the block raises, the partial is removed and
    `target` is as it was. Every chapter.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target.parent, target.name)
    partial = partial_path(target)
    _remove(partial)
    try:
        yield partial
        if partial.is_dir() and target.is_dir():
            _remove(target)  # os.replace cannot put a folder over a non-empty folder
        os.replace(partial, target)
    except BaseException:
        _remove(partial)
        raise
