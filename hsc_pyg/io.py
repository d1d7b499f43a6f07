"""The one atomic writer: every file a command writes (checkpoints, vocabularies, configs, datasets, pictures, reports,
score matrices) goes through it, so that a failure at any moment (a full disk, a kill, an error) leaves each existing
file byte for byte as it was, or replaced by the complete new one.

- :func:`atomic_write` opens a temporary file beside the target, and on success flushes, fsyncs, gives it the mode a
  plain ``open`` would (``0o666`` less the umask, not the temporary file's ``0o600``), renames it over the target and
  fsyncs the folder. Temporary names are ``.<name>.<host>.<pid>.<random>.hsc-tmp``: every write first removes the ones
  that a dead process of this host left in its folder.
- :func:`atomic_files` writes several files that belong together (a picture's PNG / GraphML / JSON, a score matrix and
  its metadata): every file is written and synced first, then all are renamed; an error while writing (a full disk)
  changes none of them.
- :func:`atomic_folder` builds a whole folder (a dataset) beside the target and swaps it in with one rename; files of
  the old folder that the new one does not write are carried over (hard links), the replaced ones are dropped.

A failing write raises :class:`~hsc_pyg.errors.OutputError` (one line: the file, the system's reason, and that the
previous file is intact).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from .errors import OutputError, os_error_reason

TEMP_SUFFIX = ".hsc-tmp"
_HOST = socket.gethostname().replace(".", "_") or "host"


def temp_path(target: Path) -> Path:
    """A fresh temporary name beside ``target`` that names this host and process."""
    return target.with_name(f".{target.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _writer_pid(name: str) -> int | None:
    """The pid in a temporary name of this host, else None."""
    parts = name[: -len(TEMP_SUFFIX)].rsplit(".", 3)
    if len(parts) != 4 or parts[1] != _HOST or not parts[2].isascii() or not parts[2].isdigit():
        return None
    return int(parts[2])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files and folders that dead writers of this host left in ``folder``; returns them."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.endswith(TEMP_SUFFIX):
            continue
        pid = _writer_pid(entry.name)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fail(path: Path, error: OSError, what: str = "file") -> OutputError:
    reason = os_error_reason(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"cannot write {path} ({reason}); the previous {what}, if any, is intact; free disk space "
                           "or choose another path")
    return OutputError(f"cannot write {path} ({reason}); choose a writable path")


def _prepare(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _fail(path, e) from None
    remove_stale_temps(path.parent)


def _write_temp(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """``write`` into a synced temporary file beside ``path``; returns its path. ``open`` creates it with a plain
    file's mode (``0o666`` less the umask, applied by the kernel): no umask is read or changed here, which would be
    process-wide state that another thread's files could see."""
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise _fail(path, e) from None
        raise
    return tmp


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` with a binary file, then replace ``path`` by what it wrote, atomically; returns ``path``."""
    path = Path(path)
    _prepare(path)
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _fail(path, e) from None
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_files(writes: dict[Path, Callable[[IO[bytes]], Any]]) -> list[Path]:
    """Write several files that belong together: all into synced temporary files first, then all renamed into
    place. An error while writing changes none of the targets. Returns the paths."""
    paths = [Path(p) for p in writes]
    for path in paths:
        _prepare(path)
    temps: list[Path] = []
    try:
        for path, write in zip(paths, writes.values()):
            temps.append(_write_temp(path, write))
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
        for folder in {p.parent for p in paths}:
            _fsync_folder(folder)
    except BaseException as e:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(e, OSError):
            raise _fail(paths[len(temps) - 1] if temps else paths[0], e) from None
        raise
    return paths


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block ends without error, the files written into it
    replace ``path`` as one unit (files of an existing ``path`` that were not written again are carried over). On any
    error the temporary folder is removed and ``path`` is left as it was."""
    path = Path(path)
    _prepare(path)
    tmp = temp_path(path)
    try:
        tmp.mkdir()
        yield tmp
        if path.is_dir():
            for entry in path.iterdir():
                if not (tmp / entry.name).exists() and not entry.name.endswith(TEMP_SUFFIX):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(entry, tmp / entry.name)
            for entry in tmp.rglob("*"):
                if entry.is_file() and not entry.is_symlink():
                    with open(entry, "rb") as f:
                        os.fsync(f.fileno())
            _fsync_folder(tmp)
            if not _exchange(tmp, path):
                # no atomic swap here: the old folder steps aside under a temporary name for the moment of the swap
                aside = temp_path(path)
                os.rename(path, aside)
                try:
                    os.rename(tmp, path)
                except OSError:
                    os.rename(aside, path)
                    raise
                tmp = aside
            shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        else:
            _fsync_folder(tmp)
            os.rename(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as e:
        if tmp.exists() and tmp != path:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _fail(path, e, what="folder") from None
        raise


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)
