"""Writing outputs safely: atomically, only over the tool's own outputs, one writer at a time.

Every file or folder the tool writes goes through :func:`atomic_path`: it is built under a
hidden temporary sibling (``.<name>.<random>.partial<suffix>``) and renamed into place only when
complete, so an interrupted run never leaves a result that looks finished, and a failed one
leaves no hidden partial files behind. Folders the tool owns carry a marker file
(:data:`MARKER`), and only such folders are ever replaced (``--overwrite``).
:class:`OutputLock` keeps two runs — on one machine or on many sharing a filesystem — from
writing the same output at once.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, OutputExistsError, OutputLockedError, OutputWriteError

log = logging.getLogger(__name__)

#: Marker file inside every folder output the tool writes (tile stores, slide results).
MARKER = ".wsi-anomaly"
PARTIAL_TAG = ".partial"


def temporary_sibling(path: Path) -> Path:
    """A hidden, unique temporary name next to ``path`` keeping its suffix (so writers that infer
    the format from the suffix still work)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{PARTIAL_TAG}{path.suffix}")


def working_name(path: Path, token: str | None = None) -> Path:
    """A run's own working folder for ``path``: hidden, unique to the run (``token``), so no
    other run ever builds, removes or publishes it."""
    return path.with_name(f".{path.name}.{token or uuid.uuid4().hex[:12]}{PARTIAL_TAG}")


def leftover_work(path: Path) -> list[Path]:
    """Working files and folders that runs left next to ``path`` (``.<name>.<hex>.partial*``,
    and the older fixed ``.<name>.partial``). Only the holder of ``path``'s lock may remove
    them: then no live run is writing them."""
    pattern = re.compile(
        rf"\.{re.escape(path.name)}(\.[0-9a-f]{{8,32}})?{re.escape(PARTIAL_TAG)}(\..*)?"
    )
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return []
    return sorted(p for p in siblings if pattern.fullmatch(p.name))


def describe_os_error(exc: OSError, path: Path | str) -> str:
    """One line for a filesystem error: what happened to which path, and what to do."""
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the filesystem is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENAMETOOLONG: "the file name is too long",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EISDIR: "it is a folder, not a file",
    }
    reason = reasons.get(exc.errno or -1, exc.strerror or exc.__class__.__name__)
    return f"cannot write {path}: {reason}"


@contextlib.contextmanager
def os_errors_as_user_errors(path: Path | str) -> Iterator[None]:
    """Turn filesystem failures (disk full, read-only, …) into one-line :class:`OutputWriteError`."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as exc:
        culprit = getattr(exc, "filename", None)
        if culprit is None or str(culprit).startswith(str(Path(path).parent)):
            raise OutputWriteError(describe_os_error(exc, culprit or path)) from exc
        reason = describe_os_error(exc, culprit).split(": ", 1)[-1]
        raise OutputWriteError(f"filesystem error on {culprit}: {reason}") from exc


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to (a file, or a folder the caller
    creates); on success it is renamed over ``path``, on any error it is removed.

    Replacing an existing *folder* keeps the old one until the new one is in place.
    """
    path = Path(path)
    with os_errors_as_user_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        if tmp.is_dir():
            commit_dir(tmp, path)
        else:
            with os_errors_as_user_errors(path):
                os.replace(tmp, path)
    finally:
        remove_path(tmp)


def commit_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder built at ``tmp`` into place, replacing any previous one; the old
    folder is kept under a temporary name until the new one is in place."""
    with os_errors_as_user_errors(final):
        if final.exists():
            old = temporary_sibling(final)
            os.replace(final, old)
            os.replace(tmp, final)
            remove_path(old)
        else:
            os.replace(tmp, final)


def remove_path(path: Path) -> None:
    """Remove a file or folder if it exists; never raises."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (UTF-8)."""
    with atomic_path(path) as tmp, os_errors_as_user_errors(path):
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically; numpy scalars and paths are converted."""
    write_text(path, json.dumps(data, indent=2, default=_json_default))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars and 0-d arrays
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# -- folders the tool owns ---------------------------------------------------------------------


def mark_owned(folder: Path, kind: str) -> None:
    """Record inside ``folder`` that the tool wrote it (what :func:`refuse_foreign` checks)."""
    with os_errors_as_user_errors(folder):
        (folder / MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")


def is_owned(folder: Path, kinds: tuple[str, ...] = ()) -> bool:
    """True when ``folder`` carries the tool's marker (of one of ``kinds`` when given)."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    if not kinds:
        return True
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("kind") in kinds
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(path: Path, overwrite: bool, kinds: tuple[str, ...], what: str) -> None:
    """Refuse to replace ``path`` unless it is absent, or ``overwrite`` and one of the tool's own
    outputs of ``kinds``. A file where a folder output goes is refused either way."""
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
    if path.is_symlink() or not path.is_dir() or not is_owned(path, kinds):
        raise OutputExistsError(
            f"{path} exists and is not a {what} written by wsi-anomaly; "
            "refusing to replace it (choose another --out)"
        )


def check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse a file output that exists (without ``overwrite``) or is a folder."""
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder; --out needs a file name here")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")


def check_free_space(folder: Path, need_bytes: int, what: str) -> None:
    """Fail early, before long work, when ``folder`` cannot take ``need_bytes`` more or is not
    writable — rather than after an hour of training or scoring."""
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if probe_dir.exists() and not probe_dir.is_dir():
        raise OutputWriteError(f"cannot write {what} under {folder}: {probe_dir} is a file")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise OutputWriteError(f"cannot write {what} under {folder}: {probe_dir} is not writable")
    free = shutil.disk_usage(probe_dir).free
    if free < need_bytes:
        raise OutputWriteError(
            f"not enough disk space for {what} under {folder}: {free / 2**20:.0f} MiB free, about "
            f"{need_bytes / 2**20:.0f} MiB needed"
        )


# -- locks ---------------------------------------------------------------------------------------


class OutputLock:
    """An exclusive lock on one output, held through a lock file next to it.

    The file records pid, host and start time. It is created with ``O_EXCL``, which is atomic on
    local filesystems and on NFSv3+. While held, a background thread touches it every
    ``heartbeat_s`` seconds. A lock is stale — and taken over — when its process is gone (same
    host, pid not running) or, for a holder on another host (a cluster job that was killed or
    pre-empted), when it has not been touched for ``stale_after_s``. A live lock makes the
    second run wait up to ``wait_s`` and then refuse with one line.
    """

    def __init__(
        self,
        target: str | Path,
        wait_s: float = 0.0,
        stale_after_s: float = 180.0,
        poll_s: float = 0.5,
        heartbeat_s: float = 30.0,
    ) -> None:
        target = Path(target)
        self.path = target.with_name(f".{target.name}.lock")
        self.target = target
        self.wait_s = wait_s
        self.stale_after_s = stale_after_s
        self.poll_s = poll_s
        self.heartbeat_s = heartbeat_s
        self._token = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        with os_errors_as_user_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        while True:
            if self._try_create():
                self.held = True
                self._stop.clear()
                self._beat = threading.Thread(
                    target=self._heartbeat, daemon=True, name=f"lock {self.target.name}"
                )
                self._beat.start()
                return
            holder = self._read()
            if self._is_stale(holder):
                log.warning(
                    "taking over a stale lock on %s (held by pid %s on %s, which is gone)",
                    self.target,
                    holder.get("pid"),
                    holder.get("host"),
                )
                self._break()
                continue
            if time.monotonic() >= deadline:
                raise OutputLockedError(
                    f"{self.target} is being written by another run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('started', '?')}); wait for it to "
                    f"finish, or remove {self.path} if that run is dead"
                )
            time.sleep(self.poll_s)

    def _try_create(self) -> bool:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "token": self._token,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "time": time.time(),
        }
        # The lock appears with its content already in it (a hard link to a written file is
        # atomic, and exclusive, on local filesystems and NFS): a run killed at any instant never
        # leaves an empty lock that nobody can prove dead.
        draft = self.path.with_name(f"{self.path.name}.{self._token[:12]}.new")
        try:
            draft.write_text(json.dumps(info), encoding="utf-8")
            try:
                os.link(draft, self.path)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                return self._create_exclusive(info)  # a filesystem without hard links
        except OSError as exc:
            raise OutputWriteError(describe_os_error(exc, self.path)) from exc
        finally:
            with contextlib.suppress(OSError):
                draft.unlink()
        return True

    def _create_exclusive(self, info: dict[str, Any]) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
        return True

    # -- this run's working names, and what dead runs left -----------------------------------
    def work_path(self, path: Path | None = None) -> Path:
        """This run's own working folder for ``path`` (default: the locked output)."""
        return working_name(path or self.target, self._token[:12])

    def leftovers(self, path: Path | None = None) -> list[Path]:
        """Working files that earlier runs left next to ``path`` (default: the locked output),
        never this run's own. Safe to remove only while the lock is held: every live writer of
        the output holds its lock, so whatever else is there belongs to a run that is gone."""
        if not self.held:
            raise RuntimeError("leftovers() needs the lock held")
        own = self.work_path(path)
        return [p for p in leftover_work(path or self.target) if p != own]

    def remove_leftovers(self, path: Path | None = None) -> None:
        for leftover in self.leftovers(path):
            log.info("removing the unfinished work of a run that is gone: %s", leftover)
            remove_path(leftover)
        own_draft = f"{self.path.name}.{self._token[:12]}.new"
        for draft in self.path.parent.glob(f"{glob.escape(self.path.name)}.*.new"):
            if draft.name != own_draft:
                remove_path(draft)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        if not self.path.exists():
            return False  # released meanwhile: try again
        if not holder:
            # Being written this instant, or garbage: stale only when old.
            try:
                return time.time() - self.path.stat().st_mtime > 60
            except OSError:
                return False
        if holder.get("host") == socket.gethostname():
            return not _pid_alive(int(holder.get("pid", -1)))
        try:  # another host: alive while it keeps touching the file
            return time.time() - self.path.stat().st_mtime > self.stale_after_s
        except OSError:
            return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _break(self) -> None:
        # Rename first so that two runs breaking the same stale lock cannot both win.
        grave = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.stale")
        with contextlib.suppress(OSError):
            os.replace(self.path, grave)
            grave.unlink()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self.held and self._read().get("token") == self._token:
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def validate_output_name(path: Path) -> None:
    """Refuse names the filesystem cannot hold before any work is done."""
    try:
        limit = os.pathconf(path.parent if path.parent.exists() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    # The temporary sibling adds ~20 characters to the name.
    if len(path.name.encode()) + 24 > limit:
        raise InvalidInputError(
            f"output name too long for this filesystem: {path.name[:40]}… "
            f"({len(path.name)} characters; at most {limit - 24})"
        )
