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

Beside the writer, the other rules every command's files follow:

- :class:`FolderLock`: one writer per output folder (``flock`` on ``.hsc_pyg.lock`` inside it, whose text names the
  holder: pid, host, command, start time); a second command into the same folder is refused with that name.
- :func:`reserve`: memory-mapped outputs get their whole size allocated on disk before any row is written, so that a
  full disk is a one-line error, never a SIGBUS in the middle of the mapping.
- :func:`read_json`: every JSON the project reads (vocabularies, captions, configs, grids, run records, caches) goes
  through one loader that names a file of the wrong kind (a folder, a FIFO, a device), bounds the nesting depth
  (:data:`MAX_JSON_DEPTH`) before parsing, and turns every failure into one line.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import stat
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np

from .errors import ConfigError, DataError, HSCError, OutputError, os_error_reason

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
    place. An error while writing, or a rename that fails (a folder in the way), changes none of the targets: the
    files renamed before it are put back as they were (their old versions are kept as hard links until the end).
    Returns the paths."""
    paths = [Path(p) for p in writes]
    for path in paths:
        _prepare(path)
    temps: list[Path] = []
    renamed: list[tuple[Path, Path | None]] = []  # target, its old version (None: there was none)
    failed = paths[0]
    try:
        for path, write in zip(paths, writes.values()):
            failed = path
            temps.append(_write_temp(path, write))
        for tmp, path in zip(temps, paths):
            failed = path
            old = None
            if path.is_file() and not path.is_symlink():
                old = temp_path(path)
                os.link(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:
                    with contextlib.suppress(OSError):
                        old.unlink()
                raise
            renamed.append((path, old))
        for folder in {p.parent for p in paths}:
            _fsync_folder(folder)
    except BaseException as e:
        for path, old in reversed(renamed):
            with contextlib.suppress(OSError):
                if old is not None:
                    os.replace(old, path)
                else:
                    path.unlink()
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(e, OSError):
            raise _fail(failed, e) from None
        raise
    finally:
        for _, old in renamed:
            if old is not None:
                with contextlib.suppress(OSError):
                    old.unlink()
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


# --------------------------------------------------------------------------- reading: files of the right kind, JSON
#: The deepest nesting of arrays and objects a JSON file of this project may have (the deepest written is 4: the
#: Karpathy layout); deeper files are refused before parsing (Python's parser would raise RecursionError).
MAX_JSON_DEPTH = 100
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def file_kind_problem(path: str | Path) -> str | None:
    """None when ``path`` is a regular file (or a link to one), else what it is, for a message: "does not exist",
    "is a folder, not a file", "is a FIFO (named pipe), not a file", "is a character device, not a file" ..."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({os_error_reason(e)})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    return f"is {kind}, not a file"


class JSONTooDeep(ValueError):
    """A JSON text nested deeper than :data:`MAX_JSON_DEPTH`."""


def json_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` in a JSON text (brackets inside strings do not count), found without
    recursion."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    return int(np.cumsum(np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)).max())


def parse_json(text: str) -> Any:
    """``json.loads`` of a text whose nesting is checked first: JSONTooDeep (a ValueError, like
    ``json.JSONDecodeError``) beyond :data:`MAX_JSON_DEPTH` levels."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise JSONTooDeep(f"nests {depth:,} levels deep, more than the {MAX_JSON_DEPTH} that any JSON file of "
                          "hsc_pyg needs")
    return json.loads(text)


def read_json(path: str | Path, what: str, fix: str, error: type[HSCError] = DataError) -> Any:
    """The JSON value in the file ``path``; ``error`` (one line naming ``what`` and ``path``, ending with ``fix``)
    when it is missing, not a regular file (a folder, a FIFO, a device), unreadable, not UTF-8, empty, nested deeper
    than :data:`MAX_JSON_DEPTH` or not valid JSON."""
    path = Path(path)
    problem = file_kind_problem(path)
    if problem:
        raise error(f"{what} {path} {problem}; {fix}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {what} {path} ({os_error_reason(e)}); {fix}") from None
    try:
        text = data.decode("utf-8-sig")  # editors on Windows write a byte order mark
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{what} {path} line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x}); re-save it as "
                    "UTF-8") from None
    if not text.strip():
        raise error(f"{what} {path} is empty; {fix}")
    try:
        return parse_json(text)
    except JSONTooDeep as e:
        raise error(f"{what} {path} {e}; it is damaged or hostile, so it was not read") from None
    except json.JSONDecodeError as e:
        raise error(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {fix}") from None


# --------------------------------------------------------------------------- one writer per folder
LOCK = ".hsc_pyg.lock"


class FolderLock:
    """One command writing into a folder at a time: an advisory lock (``fcntl.flock``) on ``folder/.hsc_pyg.lock``,
    whose text names the holder (pid, host, command, start time) for the message a second command gets. The lock goes
    with the process, even on ``kill -9``; :meth:`release` removes the file (and the folder, when acquiring created it
    and nothing else was written there). Use it as a context manager or call :meth:`release`."""

    def __init__(self, folder: Path, fd: int, created: bool) -> None:
        self.folder, self.path, self.fd, self.created = folder, folder / LOCK, fd, created

    @classmethod
    def acquire(cls, folder: str | Path, flag: str = "--out") -> "FolderLock":
        """Lock ``folder`` (created when missing). ConfigError when another process holds it; OutputError when the
        folder or its lock file cannot be written (``flag`` is the option that names the folder)."""
        folder = Path(folder)
        created = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot write into {folder} ({os_error_reason(e)}); choose a writable {flag}") from None
        lock = cls(folder, -1, created)
        try:
            lock._take(flag)
        except BaseException:
            lock.release()
            raise
        return lock

    def _take(self, flag: str) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutputError(f"cannot create the lock file {self.path} ({os_error_reason(e)}); choose a writable "
                                  f"{flag}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"cannot lock {self.path} ({os_error_reason(e)}); choose a {flag} on a file "
                                      "system with locks") from None
                self.created = False  # the other process's folder
                raise ConfigError(f"{self.folder} is in use by another process ({self.describe(holder)}); wait for "
                                  f"it to end or stop it, or choose another {flag}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder removed the file as we opened it: take the new one
                break
            os.close(fd)
        self.fd = fd
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        command = this_command()
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command[:300],
                           "started": started}).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, text, 0)
        except OSError as e:  # a full disk: no lock file is left behind (release removes it)
            raise OutputError(f"cannot write the lock file {self.path} ({os_error_reason(e)}); free disk space or "
                              f"choose another {flag}") from None

    @staticmethod
    def describe(text: str) -> str:
        """The holder named by a lock file's text."""
        try:
            holder = parse_json(text)
            command = f": {holder['command']}" if holder.get("command") else ""
            return f"pid {holder['pid']} on {holder['host']}{command}, started {holder['started']}"
        except (ValueError, TypeError, KeyError, AttributeError):
            return "a process that is starting"

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                self.path.unlink()  # while still held: a waiting process then retries on a fresh file
            os.close(self.fd)
            self.fd = -1
        if self.created:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when nothing else was written there
            self.created = False

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def this_command() -> str:
    """This process's command line as the kernel records it (the library reads no ``sys.argv``); "" off Linux."""
    try:
        parts = [part.decode("utf-8", "replace") for part in Path("/proc/self/cmdline").read_bytes().split(b"\0")
                 if part]
    except OSError:
        return ""
    if parts:
        parts[0] = Path(parts[0]).name
    return shlex.join(parts)


# --------------------------------------------------------------------------- fingerprints of input files
#: Sampled blocks of a file's fingerprint: this many blocks of BLOCK bytes, evenly spread (plus the file's size and
#: modification time). Hashing whole feature files (GBs) would make every query wait.
SAMPLES, BLOCK = 32, 1 << 16


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Size, modification time and a SHA-256 of :data:`SAMPLES` evenly spread blocks of ``path``."""
    path = Path(path)
    info = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        positions = sorted({int(i * max(info.st_size - BLOCK, 0) / max(SAMPLES - 1, 1)) for i in range(SAMPLES)})
        for pos in positions:
            f.seek(pos)
            digest.update(f.read(BLOCK))
    return {"path": str(path.resolve()), "size": info.st_size, "mtime_ns": info.st_mtime_ns,
            "sample_sha256": digest.hexdigest()}


# --------------------------------------------------------------------------- memory-mapped outputs
def reserve(path: str | Path) -> None:
    """Allocate the whole of the file ``path`` on disk now (``posix_fallocate``), so that a full disk is an
    OutputError here rather than a SIGBUS when a memory-mapped write reaches a page the disk cannot hold. On failure
    the file is removed."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size:
                os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            path.unlink()
        raise _fail(path, e) from None


def create_npy(path: str | Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A zero-filled ``.npy`` of ``shape`` at ``path``, its size reserved on disk (:func:`reserve`), opened as a
    writable memory map."""
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    except OSError as e:
        with contextlib.suppress(OSError):
            Path(path).unlink()
        raise _fail(Path(path), e) from None
    array.flush()
    reserve(path)
    return array
