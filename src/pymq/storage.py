"""Opening segment stores, and the background thread that flushes them."""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
import weakref
from typing import Final

from pymq._core import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_SEGMENT_BYTES,
    SegmentStore,
    check_store_options,
)
from pymq.errors import ClosedError, ConfigError

__all__ = [
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_SEGMENT_BYTES",
    "Flusher",
    "SegmentStore",
    "check_options",
    "open_store",
]

logger = logging.getLogger(__name__)

DEFAULT_FLUSH_INTERVAL: Final = 0.1

# A store whose flush keeps failing (a full disk, say) logs at most one
# error per this many seconds.
_ERROR_LOG_SECONDS: Final = 10.0


class Flusher:
    """One daemon thread that calls background_flush() on each store.

    Stores are held by weak reference: one that is garbage collected or
    closed drops out. Errors are logged and the flush is tried again at the
    next interval.
    """

    def __init__(self) -> None:
        self._wakeup = threading.Condition()
        self._due: list[tuple[float, int, weakref.ref[SegmentStore], float]] = []
        self._sequence = 0
        self._thread: threading.Thread | None = None
        self._last_error: dict[int, float] = {}

    def add(self, store: SegmentStore, interval: float) -> None:
        """Flush store every interval seconds until it is closed."""
        with self._wakeup:
            self._sequence += 1
            entry = (time.monotonic() + interval, self._sequence, weakref.ref(store))
            heapq.heappush(self._due, (*entry, interval))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="pymq-flusher", daemon=True
                )
                self._thread.start()
            self._wakeup.notify()

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._due:
                    self._wakeup.wait()
                due, sequence, ref, interval = self._due[0]
                delay = due - time.monotonic()
                if delay > 0:
                    self._wakeup.wait(delay)
                    continue
                heapq.heappop(self._due)
            store = ref()
            if store is None or store.closed:
                self._last_error.pop(sequence, None)
                continue
            self._flush(store, sequence)
            del store
            with self._wakeup:
                next_due = max(due + interval, time.monotonic())
                heapq.heappush(self._due, (next_due, sequence, ref, interval))

    def _flush(self, store: SegmentStore, sequence: int) -> None:
        try:
            store.background_flush()
        except ClosedError:
            pass
        except Exception as exc:
            now = time.monotonic()
            if now - self._last_error.get(sequence, -_ERROR_LOG_SECONDS) >= (
                _ERROR_LOG_SECONDS
            ):
                self._last_error[sequence] = now
                logger.error("background flush of %s failed: %s", store.path, exc)
        else:
            self._last_error.pop(sequence, None)


_flusher = Flusher()


def _reset_after_fork() -> None:
    global _flusher
    _flusher = Flusher()


os.register_at_fork(after_in_child=_reset_after_fork)


def open_store(
    path: str | os.PathLike[str],
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    max_message_bytes: int | None = None,
    fsync: str = "interval",
    flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    reserve_ahead: bool = False,
) -> SegmentStore:
    """Open the segment store in path, creating the folder if it is missing.

    Parameters
    ----------
    segment_bytes
        Size of each preallocated segment file (default 64 MiB).
    max_message_bytes
        Largest body accepted (default 1 MiB, or the segment size minus the
        32-byte record header when that is smaller).
    fsync
        ``"always"``: append returns once the record is on stable storage.
        ``"interval"``: records are synced every ``flush_interval`` seconds.
        ``"never"``: the operating system writes records back when it
        chooses. Under every policy a record survives a crash of the process
        as soon as append returns.
    flush_interval
        Seconds between background flushes. Under ``"never"`` they sync
        only sealed segments, so that reopening stays fast.
    reserve_ahead
        Keep the next segment created (the spare) from the moment the store
        opens and again right after each rollover, and preallocate every
        index at its full size, so that appends need no new disk space
        until the spare is used. A segment dropped by ``delete_below`` while
        the spare is missing becomes the spare. The broker sets it for the
        journals of its groups.

    Damage found while opening or reading is logged at WARNING on the
    ``pymq.storage`` logger. Raises BrokerLockedError when another open
    store owns the folder.
    """
    check_options(segment_bytes, max_message_bytes, fsync, flush_interval)
    store = SegmentStore(
        path,
        segment_bytes=segment_bytes,
        max_message_bytes=max_message_bytes,
        fsync=fsync,
        on_damage=_log_damage,
        reserve_ahead=reserve_ahead,
    )
    _flusher.add(store, float(flush_interval))
    return store


def check_options(
    segment_bytes: int,
    max_message_bytes: int | None,
    fsync: str,
    flush_interval: float,
) -> None:
    """Raise ConfigError or TypeError for invalid options of open_store."""
    check_store_options(segment_bytes, max_message_bytes, fsync)
    if isinstance(flush_interval, bool) or not isinstance(flush_interval, (int, float)):
        raise TypeError(
            f"flush_interval must be a number, not {type(flush_interval).__name__}"
        )
    if not 0.001 <= flush_interval <= 3600:
        raise ConfigError(
            f"flush_interval is {flush_interval} seconds; it must be from 0.001 to 3600"
        )


def _log_damage(message: str) -> None:
    logger.warning("%s", message)
