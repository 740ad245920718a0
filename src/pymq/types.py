"""Value records returned by the broker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueueStats:
    """Counts for one queue, or for one group of a stream.

    ``depth`` counts messages not yet settled: never delivered, in flight,
    or waiting for redelivery. ``acked`` and ``dead_lettered`` count since
    the broker opened. ``oldest_unacked_age`` is in seconds, None when
    nothing is unsettled. ``damaged`` counts records of the stream lost to
    damage (a failed CRC, or a header block that cannot be parsed), since
    the broker opened; ``skipped`` counts offsets this group passed over
    because they had no readable record.
    """

    name: str
    depth: int
    in_flight: int
    waiting: int
    acked: int
    dead_lettered: int
    oldest_unacked_age: float | None
    damaged: int
    skipped: int
