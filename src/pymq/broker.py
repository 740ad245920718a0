"""The embedded broker: a data directory of streams, queues and groups."""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from pymq._core import (
    RECORD_HEADER_BYTES,
    RESERVED_HEADERS,
    DirectoryLock,
    GroupBase,
    Message,
    StreamBase,
    check_store_options,
    make_directories,
    split_body,
)
from pymq.errors import (
    ClosedError,
    ConfigError,
    CorruptSegmentError,
    InvalidNameError,
    OffsetNotFoundError,
    PymqError,
    QueueNotFound,
)
from pymq.names import check_name, check_queue_name
from pymq.queue import Group, Queue, Stream
from pymq.storage import (
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_SEGMENT_BYTES,
    check_options,
    open_store,
)

# open is left out, so that a star import keeps the built-in open().
__all__ = ["Broker"]

logger = logging.getLogger(__name__)

# A failing dead-letter move logs at most one error per this many seconds,
# with the number of failures since the last one.
_ERROR_LOG_SECONDS: Final = 10.0
# A DLQ takes records this much larger than max_message_bytes, so that a
# message of the largest size still fits with the x- headers a move adds.
DLQ_HEADROOM_BYTES: Final = 4096
# Maximum size of the x-reason a move writes, in bytes of UTF-8. A longer
# reason is cut to this (at a character boundary) and "..." is appended.
MAX_REASON_BYTES: Final = 1000
# Characters of a dead-letter reason that the broker's log line shows.
_LOGGED_REASON_CHARS: Final = 120
# Journals hold small records; compaction runs when one rolls over.
JOURNAL_SEGMENT_BYTES: Final = 4 * 1024 * 1024
# Segments of a broker without a path, which live in memory.
MEMORY_SEGMENT_BYTES: Final = 1024 * 1024
QUEUE_GROUP: Final = ".queue"
# DLQ records searched for a move that a crash interrupted.
_RESUME_SCAN: Final = 10_000
# The end of redrive's error for a message with nowhere to go back to. The
# CLI, whose option is --to, replaces it.
REDRIVE_TO_ADVICE: Final = "pass to= a queue"
# The headers a move to the DLQ writes, and x-for-group: put rejects them.
DEAD_LETTER_HEADERS: Final = RESERVED_HEADERS
GROUP_DEFAULTS: Final[dict[str, Any]] = {
    "visibility_timeout": 30.0,
    "max_deliveries": 5,
    "max_in_flight": 10_000,
}
STREAM_DEFAULTS: Final[dict[str, Any]] = {"max_age": None, "max_bytes": None}
# Seconds between two retention passes over the streams.
RETENTION_INTERVAL: Final = 1.0
QUEUE_DEFAULTS: Final[dict[str, Any]] = {
    **GROUP_DEFAULTS,
    "max_length": None,
    "max_bytes": None,
    "overflow": "reject",
}


def _check_options(
    options: dict[str, Any], defaults: dict[str, Any] = GROUP_DEFAULTS
) -> dict[str, Any]:
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    checked = {}
    for key, value in options.items():
        if key == "overflow":
            if value not in ("reject", "block"):
                raise ConfigError(
                    f"overflow is {value!r}; it must be 'reject' or 'block'"
                )
        elif key in ("max_length", "max_bytes", "max_age") and value is None:
            pass
        elif key == "max_age":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"max_age must be a number or None, not {value!r}")
            if not 0 < value <= 1e10:
                raise ConfigError(
                    f"max_age is {value} seconds; it must be more than 0 and at "
                    f"most 1e10"
                )
            value = float(value)
        elif key in ("max_length", "max_bytes"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{key} must be an int or None, not {value!r}")
            if not 1 <= value <= 1 << 62:
                raise ConfigError(f"{key} is {value}; it must be from 1 to 2**62")
        elif key == "visibility_timeout":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"visibility_timeout must be a number, not {value!r}")
            if not 0 < value <= 1e9:
                raise ConfigError(
                    f"visibility_timeout is {value} seconds; it must be more than "
                    f"0 and at most 1e9"
                )
            value = float(value)
        else:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{key} must be an int, not {value!r}")
            low, high = (0, 65_535) if key == "max_deliveries" else (1, 1 << 31)
            if not low <= value <= high:
                raise ConfigError(f"{key} is {value}; it must be from {low} to {high}")
        checked[key] = value
    return checked


# Folders of brokers without a path that are still open.
_TEMPORARY_FOLDERS: set[str] = set()
MEMORY_FOLDER_PREFIX: Final = "pymq-memory-"
# The file in the folder of a broker without a path that contains the PID of
# its process, so that a later open can find the folders of dead processes.
MEMORY_OWNER_FILE: Final = "OWNER"
# The file that marks a folder as a data directory, written when a broker
# first opens it, so that no data directory is opened inside another.
DATA_MARKER: Final = "PYMQ"


@atexit.register
def _remove_temporary_folders() -> None:
    for path in list(_TEMPORARY_FOLDERS):
        shutil.rmtree(path, ignore_errors=True)


def _dlq_store_options(
    segment_bytes: int, max_message_bytes: int | None, fsync: str
) -> dict[str, int]:
    """Return segment_bytes and max_message_bytes for the stores of DLQs.

    A DLQ takes records DLQ_HEADROOM_BYTES larger than max_message_bytes,
    so that a message of the largest size moves with the headers that the
    move adds. Its segments grow by as much when they would be too small.
    Raises ConfigError when max_message_bytes is below 1, or when such a
    segment would be larger than the store allows.
    """
    limit = check_store_options(segment_bytes, max_message_bytes, fsync)
    if limit < 1:
        raise ConfigError(
            f"max_message_bytes is {limit}; it must be from 1 to "
            f"{segment_bytes - RECORD_HEADER_BYTES} (segment_bytes minus the "
            f"{RECORD_HEADER_BYTES}-byte record header)"
        )
    dlq_limit = limit + DLQ_HEADROOM_BYTES
    dlq_segment_bytes = segment_bytes
    if dlq_limit > segment_bytes - RECORD_HEADER_BYTES:
        # Both are multiples of 8, so the sum is a valid segment size.
        dlq_segment_bytes = segment_bytes + DLQ_HEADROOM_BYTES
    try:
        check_store_options(dlq_segment_bytes, dlq_limit, fsync)
    except ConfigError as exc:
        raise ConfigError(
            f"max_message_bytes is {limit}, too large for a dead-letter queue: "
            f"its records take {DLQ_HEADROOM_BYTES} bytes more, for the headers "
            f"of a move, and a segment of {dlq_segment_bytes} bytes for them is "
            f"rejected ({exc}). Use a smaller max_message_bytes."
        ) from None
    return {"segment_bytes": dlq_segment_bytes, "max_message_bytes": dlq_limit}


def _memory_parent() -> str | None:
    """Return /dev/shm when it is writable, else None (the temp folder)."""
    shm = "/dev/shm"
    return shm if os.access(shm, os.W_OK) else None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The process exists but belongs to another user.
        return True
    return True


def _is_memory_folder(folder: str) -> bool:
    """Return whether folder looks like one a broker without a path made.

    It must be this user's, not a link, and hold LOCK and OWNER as regular
    files, not links, so that no other folder is ever taken for one.
    """
    try:
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            return False
        for name in ("LOCK", MEMORY_OWNER_FILE):
            member = os.lstat(os.path.join(folder, name))
            if not stat.S_ISREG(member.st_mode) or member.st_uid != os.geteuid():
                return False
    except OSError:
        return False
    return True


def _remove_stale_memory_folders(parent: str) -> list[str]:
    """Delete the folders that brokers without a path left in parent when
    their process was killed, and return their paths.

    Only folders named pymq-memory-* owned by this user, holding the LOCK
    and OWNER regular files that pymq writes, are candidates. One is
    deleted only when the PID in OWNER names no running process and no
    broker holds the folder's lock.
    """
    removed: list[str] = []
    try:
        with os.scandir(parent) as scan:
            candidates = [
                entry.path
                for entry in scan
                if entry.name.startswith(MEMORY_FOLDER_PREFIX)
                and entry.is_dir(follow_symlinks=False)
            ]
    except OSError:
        return removed
    for folder in candidates:
        if not _is_memory_folder(folder):
            continue
        try:
            text = Path(folder, MEMORY_OWNER_FILE).read_text().strip()
        except OSError:
            continue
        if not text.isdigit() or not 0 < int(text) < 1 << 31:
            continue
        pid = int(text)
        if _process_exists(pid):
            continue
        try:
            lock = DirectoryLock(folder)
        except (PymqError, OSError):
            # A live broker has it locked (its PID is from another PID
            # namespace, for example), or another open is removing it.
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            lock.release()
        logger.info(
            "removed %s, left by a broker without a path in process %d, which is gone",
            folder,
            pid,
        )
        removed.append(folder)
    return removed


def _is_data_directory(folder: Path) -> bool:
    """Return whether folder is a data directory of pymq.

    That is a folder with the DATA_MARKER file, or, as versions before the
    marker left it, with a LOCK file and a streams folder.
    """
    if (folder / DATA_MARKER).is_file():
        return True
    return (folder / "LOCK").is_file() and (folder / "streams").is_dir()


def _data_directory_below(folder: Path) -> Path | None:
    """Return a data directory inside folder, or None if it contains none.

    Walks the whole tree below folder without following links. So the
    broker calls it only for a folder without DATA_MARKER: a new data
    directory, or one that a version before the marker made.
    """
    for parent, folders, files in os.walk(folder):
        if parent == str(folder):
            continue
        if DATA_MARKER in files or ("LOCK" in files and "streams" in folders):
            return Path(parent)
    return None


def _check_not_nested(path: Path) -> None:
    """Raise ConfigError if path is inside a data directory or contains one.

    Either way one broker's folders would be inside the other's: a broker
    opened in data/streams/x writes its LOCK and streams into the folder
    of the outer broker's queue x. The message names both directories.
    """
    resolved = path.resolve()
    for parent in resolved.parents:
        if _is_data_directory(parent):
            raise ConfigError(
                f"data directory {path} is inside the data directory {parent} "
                f"of another broker; give a folder outside it"
            )
    if not resolved.is_dir() or (resolved / DATA_MARKER).is_file():
        return
    inner = _data_directory_below(resolved)
    if inner is not None:
        raise ConfigError(
            f"data directory {path} contains the data directory {inner} of "
            f"another broker; give a folder that contains no data directory"
        )


def cut_reason(reason: str) -> str:
    """Return reason, or its first MAX_REASON_BYTES bytes of UTF-8 (at a
    character boundary) and "..." when it is longer."""
    encoded = reason.encode("utf-8")
    if len(encoded) <= MAX_REASON_BYTES:
        return reason
    # "ignore" drops only the character that the cut split.
    return encoded[:MAX_REASON_BYTES].decode("utf-8", "ignore") + "..."


def _check_case(folder: Path, name: str, kind: str) -> None:
    """Raise InvalidNameError if folder has an entry that differs from name
    only in case.

    Such names would share one folder on a case-insensitive file system,
    and a data directory may be copied to one, so they are rejected on all.
    """
    try:
        with os.scandir(folder) as scan:
            # Files are not queues, streams or groups. One may be a LOCK that
            # an older version left when it opened a broker inside this one.
            entries = [entry.name for entry in scan if entry.is_dir()]
    except FileNotFoundError:
        return
    if name in entries:
        return
    if os.path.lexists(folder / name):
        raise ConfigError(
            f"{kind} {name} cannot be created: {folder / name} exists and is "
            f"not a folder"
        )
    lowered = name.lower()
    for entry in entries:
        if entry.lower() == lowered:
            raise InvalidNameError(
                f"{kind} name {name!r} differs from the existing {entry!r} only "
                f"in case; names that differ only in case are rejected, because "
                f"they would share a folder on a case-insensitive file system"
            )


class _Declared:
    """Options stored beside a queue or group, in options.json."""

    def __init__(self, folder: Path, label: str) -> None:
        self.path = folder / "options.json"
        self.label = label

    def merge(
        self,
        kind: str,
        explicit: dict[str, Any],
        defaults: dict[str, Any] = GROUP_DEFAULTS,
    ) -> dict[str, Any]:
        stored: dict[str, Any] = {}
        if self.path.exists():
            stored = json.loads(self.path.read_text())
            if stored.get("kind", kind) != kind:
                raise ConfigError(
                    f"{self.label} was declared as a {stored['kind']}, not a {kind}"
                )
        options = {**defaults, **stored.get("options", {})}
        changed = {
            key: value for key, value in explicit.items() if options.get(key) != value
        }
        for key, value in changed.items():
            if self.path.exists():
                logger.info(
                    "%s: %s changed from %r to %r", self.label, key, options[key], value
                )
            options[key] = value
        if changed or not self.path.exists():
            make_directories(self.path.parent)
            _write_durably(self.path, json.dumps({"kind": kind, "options": options}))
        return options


def _write_durably(path: Path, text: str) -> None:
    """Replace path with text, synced, so a power loss keeps old or new."""
    scratch = path.with_suffix(".tmp")
    with scratch.open("w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(scratch, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class Broker:
    """Streams, queues and groups in one data directory, owned by this process.

    Thread-safe. Use pymq.open() to create one; close it, or use it as a
    context manager.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        fsync: str | None = None,
        segment_bytes: int | None = None,
        max_message_bytes: int | None = None,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        self._temporary = path is None
        if path is not None and not os.fspath(path):
            # Path("") is the working directory, which was never meant.
            raise ConfigError(
                "data directory path is empty (''); give a directory, or no "
                "path for a broker in memory"
            )
        if path is None:
            if fsync not in (None, "never"):
                raise ConfigError(
                    f"fsync is {fsync!r}, but a broker without a path keeps its "
                    f"data in memory and cannot sync it; give a path"
                )
            fsync = "never"
            if segment_bytes is None:
                segment_bytes = MEMORY_SEGMENT_BYTES
        fsync = "interval" if fsync is None else fsync
        segment_bytes = (
            DEFAULT_SEGMENT_BYTES if segment_bytes is None else segment_bytes
        )

        # Every option is checked before a file is created.
        check_options(segment_bytes, max_message_bytes, fsync, flush_interval)
        dlq_options = _dlq_store_options(segment_bytes, max_message_bytes, fsync)

        if path is None:
            parent = _memory_parent()
            _remove_stale_memory_folders(parent or tempfile.gettempdir())
            path = tempfile.mkdtemp(prefix=MEMORY_FOLDER_PREFIX, dir=parent)
            # Removed at exit too, if close() was never called. A process
            # killed by a signal leaves the folder, which the OWNER file lets
            # a later open in another process find and remove.
            _TEMPORARY_FOLDERS.add(path)
            # Written before the lock is taken: without the file, the folder
            # is no candidate for removal.
            Path(path, MEMORY_OWNER_FILE).write_text(f"{os.getpid()}\n")
        self.path = Path(path).absolute()
        _check_not_nested(self.path)
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(
                errno.ENOTDIR, f"data directory {self.path} is not a directory"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = DirectoryLock(str(self.path))
        marker = self.path / DATA_MARKER
        if not marker.exists():
            try:
                _write_durably(marker, "pymq data directory\n")
            except BaseException:
                self._lock.release()
                raise

        self._store_options: dict[str, Any] = {
            "fsync": fsync,
            "segment_bytes": segment_bytes,
            "max_message_bytes": max_message_bytes,
            "flush_interval": flush_interval,
        }
        self._dlq_store_options = {**self._store_options, **dlq_options}
        self._journal_bytes = (
            JOURNAL_SEGMENT_BYTES
            if segment_bytes >= JOURNAL_SEGMENT_BYTES
            else MEMORY_SEGMENT_BYTES
        )

        self._mutex = threading.RLock()
        self._streams: dict[str, tuple[StreamBase, threading.Condition, str]] = {}
        # Called after puts and settlements while a stream has waiters; the
        # server uses them to wake its long polls.
        self._listeners: dict[str, list[Callable[[], object]]] = {}
        self._queues: dict[str, Queue] = {}
        self._groups: dict[tuple[str, str], Group] = {}
        self._retention: dict[str, tuple[float | None, int | None]] = {}
        self._retention_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # Set by _stop_waits(): why puts may no longer wait for room.
        self._waits_stopped: str | None = None
        self._closed = False
        logger.info("opened broker in %s (fsync=%s)", self.path, fsync)

    # Declaring -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"broker {self.path} is closed")

    def _open_stream(
        self, name: str, kind: str
    ) -> tuple[StreamBase, threading.Condition]:
        entry = self._streams.get(name)
        if entry is not None:
            if entry[2] != kind:
                raise ConfigError(f"{name} is a {entry[2]}, not a {kind}")
            return entry[0], entry[1]
        folder = self.path / "streams" / name
        marker = folder / "kind"
        if marker.exists() and marker.read_text() != kind:
            raise ConfigError(f"{name} is a {marker.read_text()}, not a {kind}")
        if not marker.exists():
            make_directories(folder)
            _write_durably(marker, kind)
        options = self._store_options
        if name.endswith(".dlq"):
            options = self._dlq_store_options
        store = open_store(folder / "log", **options)
        core = StreamBase(store, name)
        ready = threading.Condition()
        listeners = self._listeners.setdefault(name, [])

        def wake() -> None:
            with ready:
                ready.notify_all()
            for listener in listeners:
                listener()

        core.wake = wake
        self._streams[name] = (core, ready, kind)
        return core, ready

    def _stop_waits(self, reason: str) -> None:
        """Make puts that wait for room in a full queue raise ClosedError now.

        Later puts that find a queue full raise it too, without waiting.
        The server calls this when it stops, so that such puts get error
        13 (SHUTTING_DOWN) before their connection closes.
        """
        with self._mutex:
            self._waits_stopped = reason
            conditions = [ready for _, ready, _ in self._streams.values()]
        for ready in conditions:
            with ready:
                ready.notify_all()

    def _listen(self, stream: str, listener: Callable[[], object]) -> None:
        """Call listener after each put or settlement on stream with waiters.

        Raise the stream's waiters count (under its condition) while the
        listener should hear of them.
        """
        with self._mutex:
            self._listeners.setdefault(stream, []).append(listener)

    def _open_journal(self, stream: str, group: str) -> Any:
        options = dict(self._store_options)
        options["segment_bytes"] = self._journal_bytes
        options["max_message_bytes"] = None
        # Journal space is reserved ahead, so that acks go on on a full disk.
        options["reserve_ahead"] = True
        return open_store(self.path / "streams" / stream / "groups" / group, **options)

    def queue(self, name: str, **options: Any) -> Queue:
        """Open the queue name, creating it if it is missing.

        Options are stored with the queue, and an explicit different value
        updates the stored one:

        - visibility_timeout: seconds, default 30.
        - max_deliveries: default 5; 0 never dead-letters.
        - max_in_flight: default 10,000.
        - max_length (messages not yet acked) and max_bytes (bytes of
          records on disk): unlimited by default.
        - overflow: "reject" (default) raises QueueFull at a limit, "block"
          waits for room.

        A name ending in ".dlq" opens a dead-letter queue, and may be up to
        255 characters long, as a DLQ's name derived from a long source name
        may be. A DLQ that does not exist yet is created only for its
        source: the queue <source> of <source>.dlq, or the group G of
        stream S for S.G.dlq. Otherwise this raises QueueNotFound, and
        InvalidNameError when the source is a DLQ, which has no DLQ.
        """
        check_queue_name(name)
        if name.endswith(".dlq"):
            with self._mutex:
                self._check_open()
                self._check_dlq_source(name)
        return self._open_queue(name, options)

    def _check_dlq_source(self, name: str) -> None:
        """Raise unless the DLQ name exists or its source does, so that a
        mistyped name does not create a DLQ that nothing fills."""
        if name in self._queues or self._kind_of(name)[0]:
            # An existing name; one that is not a queue raises on open.
            return
        source = name.removesuffix(".dlq")
        kind = self._kind_of(source)[0]
        if kind == "queue" and source.endswith(".dlq"):
            raise InvalidNameError(
                f"queue name {name!r} names a DLQ of the dead-letter queue "
                f"{source}, which has none, because a message that fails in "
                f"a DLQ stays there; use {source}"
            )
        if kind == "queue" or self._is_group_source(source):
            return
        if kind == "stream":
            raise QueueNotFound(
                f"dead-letter queue {name} cannot be created: {source} is a "
                f"stream, and a stream has no DLQ; each of its groups G has "
                f"{source}.G.dlq"
            )
        raise QueueNotFound(
            f"dead-letter queue {name} cannot be created: there is no queue "
            f"{source}, nor a group G of a stream S with S.G = {source}; "
            f"create the queue or group first"
        )

    def _is_group_source(self, source: str) -> bool:
        """Return whether source is S.G for an existing group G of stream S."""
        start = 0
        while (dot := source.find(".", start)) >= 0:
            stream, group = source[:dot], source[dot + 1 :]
            if self._kind_of(stream)[0] == "stream" and self._has_group(stream, group):
                return True
            start = dot + 1
        return False

    def _open_queue(self, name: str, options: dict[str, Any]) -> Queue:
        options = _check_options(options, QUEUE_DEFAULTS)
        if name.endswith(".dlq") and options.get("max_deliveries"):
            raise ConfigError(
                f"max_deliveries of queue {name} is {options['max_deliveries']}; "
                f"a dead-letter queue keeps a message that fails again, so it "
                f"takes no max_deliveries"
            )
        if "max_bytes" in options:
            self._check_queue_bytes(name, options["max_bytes"])
        with self._mutex:
            self._check_open()
            folder = self.path / "streams" / name / "groups" / QUEUE_GROUP
            queue = self._queues.get(name)
            if queue is not None:
                if options:
                    # Store the new values too, so a restart keeps them.
                    label = f"queue {name}"
                    _Declared(folder, label).merge("queue", options, QUEUE_DEFAULTS)
                    self._apply(queue, options)
                return queue
            if not name.endswith(".dlq"):
                # Before any file is made, so a bad DLQ name creates nothing.
                self._check_dlq_name(f"{name}.dlq")
            with self._new_stream(name, "queue") as (stream, ready):
                label = f"queue {name}"
                merged = _Declared(folder, label).merge(
                    "queue", options, QUEUE_DEFAULTS
                )
                journal = self._open_journal(name, QUEUE_GROUP)
                try:
                    queue = Queue(self, name, stream, journal, ready, **merged)
                except BaseException:
                    journal.close()
                    raise
            if not name.endswith(".dlq"):
                queue._on_dead = self._dead_letter_function(name, None, queue)
                self._resume_moves(queue, name, None)
            self._queues[name] = queue
            logger.info("opened queue %s", name)
            return queue

    @contextlib.contextmanager
    def _new_stream(
        self, name: str, kind: str
    ) -> Iterator[tuple[StreamBase, threading.Condition]]:
        """Open the stream name, and delete it again if the body raises.

        Only a stream that this call created is deleted, so a failed call
        leaves nothing on disk. The caller holds the broker's mutex.
        """
        folder = self.path / "streams" / name
        if name not in self._streams:
            _check_case(folder.parent, name, kind)
        created = name not in self._streams and not (folder / "kind").exists()
        try:
            entry = self._open_stream(name, kind)
        except BaseException:
            if created:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        try:
            yield entry
        except BaseException:
            if created:
                self._streams.pop(name, None)
                entry[0].store.close()
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def _check_queue_bytes(self, name: str, max_bytes: int | None) -> None:
        # Acked records count until their segment is deleted, and the segment
        # being written never is: below two segments a drained queue could
        # stay full.
        least = 2 * self._store_options["segment_bytes"]
        if max_bytes is not None and max_bytes < least:
            raise ConfigError(
                f"max_bytes of queue {name} is {max_bytes}; it must be at least "
                f"{least} (twice segment_bytes), because acked records count "
                f"until their segment is deleted"
            )

    def _close_queue(self, queue: Queue) -> None:
        with self._mutex:
            if self._queues.get(queue.name) is not queue:
                return
            del self._queues[queue.name]
            core, ready, _ = self._streams.pop(queue.name)
        GroupBase.close(queue)
        with ready:
            ready.notify_all()
        core.store.close()

    def _close_group(self, group: Group) -> None:
        with self._mutex:
            key = (group.stream_name, group.name)
            if self._groups.get(key) is not group:
                return
            del self._groups[key]
            ready = self._streams[group.stream_name][1]
        GroupBase.close(group)
        # Threads blocked in this group's get() raise ClosedError now.
        with ready:
            ready.notify_all()

    def _apply(self, consumer: GroupBase, options: dict[str, Any]) -> None:
        """Set changed options on an open queue or group.

        _Declared.merge, which stores them first, logs each change.
        """
        for key, value in options.items():
            if getattr(consumer, key) != value:
                setattr(consumer, key, value)

    def stream(self, name: str, **options: Any) -> Stream:
        """Open the stream name, creating it if it is missing.

        Retention options (stored with the stream): max_age (seconds) and
        max_bytes (bytes of records on disk), both unlimited by default.
        Whole segments past either are deleted about once a second. A group
        that had not read them resumes at the oldest kept message, and its
        stats() count what it passed over as skipped.
        """
        check_name("stream", name)
        if name.endswith(".dlq"):
            raise InvalidNameError(
                f"stream name {name!r} ends in '.dlq', which is kept for "
                f"dead-letter queues"
            )
        options = _check_options(options, STREAM_DEFAULTS)
        with self._mutex:
            self._check_open()
            folder = self.path / "streams" / name
            with self._new_stream(name, "stream") as (core, ready):
                merged = _Declared(folder, f"stream {name}").merge(
                    "stream", options, STREAM_DEFAULTS
                )
            if merged["max_age"] is not None or merged["max_bytes"] is not None:
                self._retention[name] = (merged["max_age"], merged["max_bytes"])
                self._start_retention()
            else:
                self._retention.pop(name, None)
            return Stream(self, name, core, ready)

    # Retention -------------------------------------------------------------

    def _start_retention(self) -> None:
        if self._retention_thread is None:
            self._retention_thread = threading.Thread(
                target=self._retention_loop, name="pymq-retention", daemon=True
            )
            self._retention_thread.start()

    def _retention_loop(self) -> None:
        while not self._stopping.wait(RETENTION_INTERVAL):
            try:
                self.apply_retention()
            except ClosedError:
                return
            except Exception as exc:
                logger.error("retention of %s failed: %s", self.path, exc)

    def apply_retention(self) -> int:
        """Delete the segments of streams past their max_age or max_bytes now.

        A background thread does this about once a second. Returns the
        number of segments deleted.
        """
        with self._mutex:
            self._check_open()
            work = [
                (name, self._streams[name][0].store, limits)
                for name, limits in self._retention.items()
                if name in self._streams
            ]
        deleted = 0
        for name, store, (max_age, max_bytes) in work:
            deleted += self._trim(name, store, max_age, max_bytes)
        return deleted

    def _trim(
        self, name: str, store: Any, max_age: float | None, max_bytes: int | None
    ) -> int:
        ranges = store.segment_ranges()
        total = sum(length for _, _, length in ranges)
        now = time.time_ns()
        keep = 0
        # The active (last) segment is never deleted.
        for base, count, length in ranges[:-1]:
            expired = False
            if max_bytes is not None and total > max_bytes:
                expired = True
            elif max_age is not None and count:
                try:
                    newest = store.read_record(base + count - 1)[1]
                except (OffsetNotFoundError, CorruptSegmentError):
                    newest = None
                expired = newest is not None and now - newest > max_age * 1e9
            if not expired:
                break
            total -= length
            keep += 1
        if not keep:
            return 0
        deleted: int = store.delete_below(ranges[keep][0])
        logger.info(
            "retention deleted %d segments of stream %s (offsets below %d)",
            deleted,
            name,
            ranges[keep][0],
        )
        return deleted

    def _open_group(
        self, stream: Stream, name: str, start: str | int, options: dict[str, Any]
    ) -> Group:
        check_name("group", name)
        options = _check_options(options)
        with self._mutex:
            self._check_open()
            key = (stream.name, name)
            folder = self.path / "streams" / stream.name / "groups" / name
            label = f"group {name} of {stream.name}"
            group = self._groups.get(key)
            if group is not None:
                if options:
                    # Store the new values too, so a restart keeps them.
                    _Declared(folder, label).merge("group", options)
                    self._apply(group, options)
                return group
            _check_case(folder.parent, name, "group")
            if name.endswith(".dlq") and not folder.is_dir():
                # A group of such a name that an older version made opens.
                raise InvalidNameError(
                    f"group name {name!r} ends in '.dlq', which is kept for "
                    f"dead-letter queues"
                )
            self._check_dlq_name(f"{stream.name}.{name}.dlq")
            core, ready = self._open_stream(stream.name, "stream")
            store = core.store
            if start == "earliest":
                offset = store.first_offset
            elif start == "latest":
                offset = store.next_offset
            elif isinstance(start, int) and not isinstance(start, bool) and start >= 0:
                offset = start
            else:
                raise ConfigError(
                    f"start is {start!r}; it must be 'earliest', 'latest' or an "
                    f"offset (an int of 0 or more)"
                )
            is_new = not folder.exists()
            if is_new and offset > store.next_offset:
                # A start past the end would move the stream's next offset
                # for every group, leaving a gap of never-written offsets.
                raise ConfigError(
                    f"start offset {offset} is past the end of stream "
                    f"{stream.name} (its next offset is {store.next_offset})"
                )
            try:
                merged = _Declared(folder, label).merge("group", options)
                journal = self._open_journal(stream.name, name)
                try:
                    group = Group(
                        self, stream.name, name, core, journal, ready, offset, **merged
                    )
                except BaseException:
                    journal.close()
                    raise
            except BaseException:
                if is_new:
                    shutil.rmtree(folder, ignore_errors=True)
                raise
            self._check_dlq_name(group.dlq_name)
            group._on_dead = self._dead_letter_function(stream.name, name, group)
            self._resume_moves(group, stream.name, name)
            self._groups[key] = group
            logger.info("opened %s", label)
            return group

    # Dead letters ----------------------------------------------------------

    def _check_dlq_name(self, dlq_name: str) -> None:
        check_name("dead-letter queue", dlq_name, derived=True)
        _check_case(self.path / "streams", dlq_name, "dead-letter queue")
        kind = self._kind_of(dlq_name)[0]
        if kind not in ("", "queue"):
            raise ConfigError(
                f"dead-letter queue {dlq_name} cannot be created: a {kind} of "
                f"that name exists"
            )

    def _resume_moves(
        self, consumer: Queue | Group, source: str, group_name: str | None
    ) -> None:
        """Finish the moves to the DLQ that a crash interrupted.

        A move is journaled before the message is put in the DLQ, and
        settled after. After a crash between the two, the DLQ's last records
        are searched for the message by its x- headers. If it is found, the
        move is settled; otherwise the message stays available.
        """
        moves = consumer._unfinished_moves()
        if not moves:
            return
        wanted = {str(offset): offset for offset in moves}
        store = self._open_queue(consumer.dlq_name, {}).stream.store
        end = store.next_offset
        # Moves run one at a time per thread, so an unfinished one is among
        # the last records of the DLQ.
        for offset in range(
            end - 1, max(store.first_offset, end - _RESUME_SCAN) - 1, -1
        ):
            try:
                _, _, flags, body = store.read_record(offset)
            except (OffsetNotFoundError, CorruptSegmentError):
                continue
            headers, _ = split_body(flags, body)
            found = wanted.get(headers.get("x-offset", ""))
            if (
                found is not None
                and headers.get("x-source") == source
                and headers.get("x-group", "") == (group_name or "")
            ):
                consumer._settle_moved(found)
                del wanted[headers["x-offset"]]
                if not wanted:
                    break
        for offset in wanted.values():
            consumer._forget_move(offset)
        logger.warning(
            "%s: %d moves to %s were not finished (the process stopped, or the "
            "move failed); %d had reached it",
            source if group_name is None else f"{source}.{group_name}",
            len(moves),
            consumer.dlq_name,
            len(moves) - len(wanted),
        )

    def _dead_letter_function(
        self, source: str, group_name: str | None, consumer: Queue | Group
    ) -> Any:
        dlq_name = consumer.dlq_name
        store = consumer.stream.store

        # When the last error was logged, and the failures not yet logged.
        last_log = [-_ERROR_LOG_SECONDS]
        unlogged = [0]

        def dead_letter(
            core: GroupBase, offset: int, attempt: int, reason: str
        ) -> None:
            try:
                move(offset, attempt, reason)
            except Exception as exc:
                # The core keeps the message where it is: a failed reject
                # raises this error, and a move after max_deliveries is
                # tried again at the message's next delivery, which may come
                # at every get. So every failure is counted, and logged at
                # most every _ERROR_LOG_SECONDS with the count.
                now = time.monotonic()
                if now - last_log[0] < _ERROR_LOG_SECONDS:
                    unlogged[0] += 1
                    raise
                last_log[0] = now
                more = ""
                if unlogged[0]:
                    more = (
                        f" ({unlogged[0]} more moves from {source} failed since "
                        f"the last of these errors was logged)"
                    )
                    unlogged[0] = 0
                logger.error(
                    "moving message %d of %s to %s failed: %s%s",
                    offset,
                    source,
                    dlq_name,
                    exc,
                    more,
                )
                raise

        def move(offset: int, attempt: int, reason: str) -> None:
            try:
                _, _, flags, body = store.read_record(offset)
            except (OffsetNotFoundError, CorruptSegmentError) as exc:
                logger.warning(
                    "message %d of %s has no readable record; not moved to %s: %s",
                    offset,
                    source,
                    dlq_name,
                    exc,
                )
                return
            headers, payload = split_body(flags, body)
            reason = cut_reason(reason)
            # x-for-group routes a redriven record to its group, which never
            # receives the header, so the DLQ message does not carry it either.
            headers.pop("x-for-group", None)
            headers.update(
                {
                    "x-source": source,
                    "x-group": group_name or "",
                    "x-offset": str(offset),
                    "x-attempts": str(attempt),
                    "x-reason": reason,
                    "x-dead-at": str(time.time_ns()),
                }
            )
            # Never wait here: a full DLQ with overflow="block" would stall
            # the get that moves the message. The move is retried instead.
            self._open_queue(dlq_name, {}).put(payload, headers=headers, timeout=0)
            # The DLQ keeps the whole reason in x-reason; the log line
            # gets its start only, so that long reasons do not flood it.
            shown = (
                reason
                if len(reason) <= _LOGGED_REASON_CHARS
                else (reason[:_LOGGED_REASON_CHARS] + "...")
            )
            logger.warning(
                "message %d of %s moved to %s after %d %s: %s",
                offset,
                source,
                dlq_name,
                attempt,
                "attempt" if attempt == 1 else "attempts",
                shown,
            )

        return dead_letter

    def redrive(
        self,
        dlq_name: str,
        to: str | None = None,
        *,
        progress: Callable[[int], object] | None = None,
    ) -> int:
        """Move every message now in a dead-letter queue back, in order, once.

        Each message goes back where it failed: to its queue, or, for a
        group's DLQ, to that group only (the stream's other groups pass over
        it). to= names a queue to move them all to instead. The x- headers
        of the dead-letter move are removed. Returns the number moved.
        progress, if given, is called with the number moved so far after
        each batch of up to 1,000 messages, and before a failure is raised.
        """
        check_name("queue", dlq_name, derived=True)
        if self._kind_of(dlq_name)[0] != "queue":
            raise QueueNotFound(f"queue {dlq_name} does not exist")
        if to is None and not dlq_name.endswith(".dlq"):
            raise ConfigError(f"{dlq_name} is not a dead-letter queue; pass to=")
        target = None
        if to is not None:
            if to == dlq_name:
                raise ConfigError(
                    f"to= names the dead-letter queue {dlq_name} itself; pass "
                    f"another queue, or no to= to move each message back to "
                    f"its source"
                )
            check_name("queue", to)
            # A mistyped to= must not create a queue that no consumer reads.
            if not self._kind_of(to)[0]:
                raise QueueNotFound(
                    f"queue {to} does not exist; redrive moves messages only "
                    f"into an existing queue"
                )
            target = self.queue(to)
        source = self._open_queue(dlq_name, {})
        moved = 0
        end = source.stream.store.next_offset
        while True:
            batch = []
            for message in source.get_many_nowait(1000):
                if message.offset < end:
                    batch.append(message)
                else:
                    # Put in the DLQ while this redrive runs: it stays there.
                    message.nack()
            if not batch:
                break
            for index, message in enumerate(batch):
                try:
                    self._put_back(message, target)
                except BaseException:
                    # This message and the rest of the batch stay in the DLQ.
                    for rest in batch[index:]:
                        rest.nack()
                    if progress is not None and index:
                        # The exact count moved, for the caller to report.
                        progress(moved)
                    raise
                # Acked one by one, so a failure later in the batch does not
                # leave a message both put back and still in the DLQ.
                message.ack()
                moved += 1
            if progress is not None:
                progress(moved)
        logger.info(
            "redrove %d messages from %s to %s", moved, dlq_name, to or "their sources"
        )
        return moved

    def _put_back(self, message: Message, target: Queue | None) -> None:
        headers = {
            key: value
            for key, value in message.headers.items()
            if key not in DEAD_LETTER_HEADERS
        }
        if target is not None:
            target.put(message.body, headers=headers or None)
            return
        source = message.headers.get("x-source", "")
        group = message.headers.get("x-group", "")
        kind = self._kind_of(source)[0]
        if kind == "queue" and not group:
            self.queue(source).put(message.body, headers=headers or None)
        elif kind == "stream" and self._has_group(source, group):
            stream, _ = self._open_stream(source, "stream")
            stream.put_for_group(message.body, headers, group)
        else:
            raise PymqError(
                f"message {message.offset} names no queue or group to go back to "
                f"(x-source {source!r}, x-group {group!r}); {REDRIVE_TO_ADVICE}"
            )

    def _has_group(self, stream: str, group: str) -> bool:
        """Return whether the stream has a group of that name on disk."""
        try:
            check_name("group", group)
        except InvalidNameError:
            return False
        return (self.path / "streams" / stream / "groups" / group).is_dir()

    # Listing ---------------------------------------------------------------

    def names(self) -> dict[str, str]:
        """Return every queue and stream in the data directory, with its kind.

        The kind is "queue" or "stream"; dead-letter queues are queues too.
        Sorted by name.
        """
        self._check_open()
        found: dict[str, str] = {}
        for marker in sorted((self.path / "streams").glob("*/kind")):
            found[marker.parent.name] = marker.read_text()
        return found

    def groups(self, stream: str) -> list[str]:
        """Return the names of the consumer groups of stream, sorted."""
        check_name("stream", stream)
        self._check_open()
        if self._kind_of(stream)[0] != "stream":
            raise QueueNotFound(f"stream {stream} does not exist")
        folder = self.path / "streams" / stream / "groups"
        if not folder.exists():
            return []
        return sorted(path.name for path in folder.iterdir() if path.is_dir())

    def _kind_of(self, name: str) -> tuple[str, str]:
        marker = self.path / "streams" / name / "kind"
        return (marker.read_text() if marker.exists() else "", name)

    # Closing ---------------------------------------------------------------

    def close(self) -> None:
        """Close every queue, group and stream, and release the directory.

        Deliveries in flight become available again when the broker is next
        opened, with their attempt counted. Calling close again does nothing.
        Every part is closed even if one fails; the first error is raised.
        """
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._stopping.set()
            consumers: list[GroupBase] = [
                *self._queues.values(),
                *self._groups.values(),
            ]
            streams = list(self._streams.values())
        # Outside _mutex: a get() moving a message to a DLQ holds its stream's
        # condition and then acquires _mutex, so the order must not invert.
        errors: list[BaseException] = []
        for consumer in consumers:
            try:
                consumer.close()
            except Exception as exc:
                logger.error("closing %r failed: %s", consumer, exc)
                errors.append(exc)
        for core, ready, _ in streams:
            # Wake threads blocked in get(), so they raise ClosedError now
            # rather than at their timeout (or never, with timeout=None).
            with ready:
                ready.notify_all()
            try:
                core.store.close()
            except Exception as exc:
                logger.error("closing stream %s failed: %s", core.name, exc)
                errors.append(exc)
        self._lock.release()
        if self._temporary:
            shutil.rmtree(self.path, ignore_errors=True)
            _TEMPORARY_FOLDERS.discard(str(self.path))
        logger.info("closed broker in %s", self.path)
        if errors:
            raise errors[0]

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Broker {str(self.path)!r}>"


def open(
    path: str | os.PathLike[str] | None = None,
    *,
    fsync: str | None = None,
    segment_bytes: int | None = None,
    max_message_bytes: int | None = None,
    flush_interval: float = DEFAULT_FLUSH_INTERVAL,
) -> Broker:
    """Open the broker in path, creating the directory if it is missing.

    fsync is "interval" (the default), "always" or "never"; see
    pymq.open_store for what each survives. segment_bytes defaults to 64 MiB.

    With no path the broker lives in a temporary folder in memory,
    /dev/shm/pymq-memory-XXXXXXXX (in the temporary folder when /dev/shm
    is not writable), which close() or the normal end of the process
    removes. Its segments default to 1 MiB, and because memory cannot be
    synced, an fsync other than "never" raises ConfigError. A process
    killed by a signal (SIGKILL, or SIGTERM unless the application handles
    it) leaves the folder behind. The next open without a path, in any
    process, removes such folders whose process is gone.

    Raises BrokerLockedError when another broker owns the directory, and
    ConfigError for a path inside another broker's data directory, or for
    a folder that contains one.
    """
    return Broker(
        path,
        fsync=fsync,
        segment_bytes=segment_bytes,
        max_message_bytes=max_message_bytes,
        flush_interval=flush_interval,
    )
