"""Value records returned by the broker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueueStats:
    """Counts for one queue, or for one group of a stream.

    ``depth`` counts messages not yet settled: never delivered, in flight,
    or waiting for redelivery. ``waiting`` counts those delivered before
    that are available again, or will be after a nack's delay: nacked,
    timed out, or in flight when the broker was last closed. A message
    nacked with no delay counts there although a get can take it at once.
    ``acked`` and ``dead_lettered`` count since
    the broker opened. ``oldest_unacked_age`` is in seconds, None when
    nothing is unsettled. ``damaged`` counts records of the stream lost to
    damage (a failed CRC, or a header block that cannot be parsed), since
    the broker opened; ``skipped`` counts offsets this group passed over,
    because they had no readable record (damage, or a gap) or because
    stream retention deleted them before this group settled them.
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
