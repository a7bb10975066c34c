"""Atomic file writes: readers (other ranks, later runs, a crash mid-write) never see a partial file.

Every writer here builds its result under a temporary name in the destination folder, ``.<name>.tmp-<pid>-<random>``,
and renames it into place. Files and folders get the modes a plain ``open`` / ``mkdir`` would give them (the
umask's), not the 0600 / 0700 of ``mkstemp`` / ``mkdtemp``. A temporary left by a killed process (its pid is gone)
is removed by :func:`remove_stale_temporaries`, which the next writer into that folder calls.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# ".<name>.tmp-<pid>-<random>" (this module), or ".<name>.<random>.tmp" (files written before the pid was added).
_TEMP = re.compile(r"^\..+\.tmp-(?P<pid>\d+)-[^.]+$|^\..+\.[A-Za-z0-9_]{6,}\.tmp$")


def umask_mode(directory: bool = False) -> int:
    """The mode ``open`` (0666) or ``mkdir`` (0777) gives a new file or folder under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Removes the temporary files and folders a killed writer left in ``folder``; returns them.

    A temporary whose writer is still running (another run writing into the same folder) is kept.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if match is None or (match.group("pid") and _pid_alive(int(match.group("pid")))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _set_modes(root: Path) -> None:
    """Gives ``root`` (and, for a folder, everything in it) the umask's modes."""
    if root.is_dir():
        os.chmod(root, umask_mode(directory=True))
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), umask_mode(directory=True))
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), umask_mode())
    else:
        os.chmod(root, umask_mode())


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Calls ``write(tmp_path)`` on a temporary file next to ``path``, then renames it onto ``path``.

    A failure inside ``write`` leaves any existing ``path`` untouched and removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _set_modes(Path(tmp))
        os.replace(tmp, path)
    except Exception as err:
        cause = serializer_write_failure(err)
        if cause is None:
            raise
        raise OSError(errno.EIO, cause, str(path)) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def serializer_write_failure(err: BaseException) -> str | None:
    """The cause when ``err`` is a serializer's report of a failed write, else None.

    safetensors reports a full disk as ``SafetensorError("Error while serializing: I/O error: No space left on
    device (os error 28)")`` and ``torch.save`` as a ``RuntimeError`` from its zip writer, not as ``OSError``.
    """
    text = " ".join(str(err).split())
    if type(err).__name__ == "SafetensorError" and "I/O error:" in text:
        return text.split("I/O error:", 1)[1].strip()
    if isinstance(err, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return f"the file could not be written completely (full disk or file-size limit?): {text[:120]}"
    return None


def atomic_write_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Calls ``write(tmp_dir)`` on a temporary sibling folder, then swaps it in for ``path``.

    A failure inside ``write`` leaves any existing ``path`` untouched; readers never see a half-written folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    try:
        write(tmp)
        _set_modes(tmp)
        replace_all({tmp: path})
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def replace_all(moves: dict[Path, Path]) -> None:
    """Moves each finished ``source`` onto its ``target`` (file or folder), all or none.

    Existing targets are first renamed aside; if any move fails, the ones done are undone and the previous
    targets restored before the error propagates. Sources and targets share one folder (renames, no copies).
    """
    backups: dict[Path, Path] = {}
    done: list[Path] = []
    try:
        for target in moves.values():
            if target.exists() or target.is_symlink():
                backup = Path(tempfile.mktemp(prefix=temp_prefix(target), dir=target.parent))
                os.replace(target, backup)
                backups[target] = backup
        for source, target in moves.items():
            os.replace(source, target)
            done.append(target)
    except BaseException:
        for target in done:
            _remove(target)
        for target, backup in backups.items():
            os.replace(backup, target)
        raise
    for backup in backups.values():
        _remove(backup)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_writable_dir(path: str | Path, what: str) -> None:
    """Refuses a folder that cannot be written, before any work is done (creates nothing).

    The folder, or its nearest existing parent when it does not exist yet, must be a folder this process can
    create a file in (a probe file is created and removed: permission bits alone do not tell a read-only mount).

    Raises:
        ArtifactWriteError: naming ``what``, the path and the cause.
    """
    from models.errors import ArtifactWriteError

    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ArtifactWriteError(f"{what} {path} cannot be created: {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=probe)
        os.close(fd)
        os.remove(tmp)
    except OSError as err:
        cause = err.strerror or errno.errorcode.get(err.errno or 0, type(err).__name__)
        raise ArtifactWriteError(f"{what} {path} is not writable ({probe}: {cause})") from err
