"""Model-based test: random operations on a SegmentStore and on tests.model.

Segments of 64 to 256 bytes make records roll into new segments every few
steps, so delete_below, ensure_next_offset and reopen meet many segment
layouts. Every run writes only under its own tempfile.mkdtemp() folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pymq import MessageTooLargeError, OffsetNotFoundError, SegmentStore
from tests.model import StoreModel

# Bodies up to 40 bytes: over the 32-byte limit of 64-byte segments, and
# several to a segment of 256 bytes.
bodies = st.binary(max_size=40)
body_lists = st.lists(bodies, max_size=8)
timestamps = st.integers(-(2**63), 2**63 - 1).filter(lambda value: value != 0)
# Flags in the low 16 bits, which segment.pxd leaves to the caller.
flags = st.integers(0, 0xFFFF)
length_types = st.sampled_from([np.int64, np.int32, np.uint32, np.uint64])

# Maximum number of views held at once. Each keeps its segment mapped.
MAX_HELD_VIEWS = 4


class SegmentStoreMachine(RuleBasedStateMachine):
    """A state machine that applies each operation to the store and the model."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.mkdtemp(prefix="pymq-model-")
        self.path = os.path.join(self.folder, "log")
        self.store: SegmentStore | None = None
        self.model = StoreModel(segment_bytes=64)
        self.held_views: list[tuple[memoryview, bytes]] = []

    @property
    def opened(self) -> SegmentStore:
        assert self.store is not None
        return self.store

    @initialize(segment_bytes=st.sampled_from([64, 128, 256]))
    def open_store(self, segment_bytes: int) -> None:
        self.store = SegmentStore(self.path, segment_bytes=segment_bytes)
        self.model = StoreModel(segment_bytes)

    def teardown(self) -> None:
        for view, _ in self.held_views:
            view.release()
        if self.store is not None:
            self.store.close()
        shutil.rmtree(self.folder)

    def offsets(self) -> st.SearchStrategy[int]:
        """Offsets from 0 to a little past the end of the log."""
        return st.integers(0, self.model.next_offset + 3)

    def check_too_large(
        self, body_list: list[bytes], error: MessageTooLargeError
    ) -> None:
        """Check that error names the first body over the limit, and the limit."""
        limit = self.model.max_message_bytes
        first_too_large = next(len(body) for body in body_list if len(body) > limit)
        assert error.size == first_too_large
        assert error.limit == limit

    # appending --------------------------------------------------------------

    @rule(body=bodies, timestamp=timestamps, flag=flags)
    def append(self, body: bytes, timestamp: int, flag: int) -> None:
        if not self.model.fits([body]):
            with pytest.raises(MessageTooLargeError) as caught:
                self.opened.append(body, timestamp=timestamp, flags=flag)
            self.check_too_large([body], caught.value)
            return
        offset = self.opened.append(body, timestamp=timestamp, flags=flag)
        assert offset == self.model.append_many([body], timestamp, flag)

    @rule(
        body_list=body_lists,
        timestamp=timestamps,
        flag=flags,
        as_generator=st.booleans(),
    )
    def append_many(
        self, body_list: list[bytes], timestamp: int, flag: int, as_generator: bool
    ) -> None:
        # Every other body is a bytearray, so buffer types mix in one batch.
        items = [bytearray(body) if i % 2 else body for i, body in enumerate(body_list)]
        argument = (item for item in items) if as_generator else items
        if not self.model.fits(body_list):
            with pytest.raises(MessageTooLargeError) as caught:
                self.opened.append_many(argument, timestamp=timestamp, flags=flag)
            self.check_too_large(body_list, caught.value)
            return
        first = self.opened.append_many(argument, timestamp=timestamp, flags=flag)
        assert first == self.model.append_many(body_list, timestamp, flag)

    @rule(
        body_list=body_lists, timestamp=timestamps, flag=flags, length_type=length_types
    )
    def append_buffer(
        self, body_list: list[bytes], timestamp: int, flag: int, length_type: type
    ) -> None:
        buffer = b"".join(body_list)
        lengths = np.array([len(body) for body in body_list], dtype=length_type)
        if not self.model.fits(body_list):
            with pytest.raises(MessageTooLargeError) as caught:
                self.opened.append_buffer(
                    buffer, lengths, timestamp=timestamp, flags=flag
                )
            self.check_too_large(body_list, caught.value)
            return
        first = self.opened.append_buffer(
            buffer, lengths, timestamp=timestamp, flags=flag
        )
        assert first == self.model.append_many(body_list, timestamp, flag)

    # reading ----------------------------------------------------------------

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        offset = data.draw(self.offsets(), label="offset")
        expected = self.model.find(offset)
        if expected is not None:
            assert self.opened.read_record(offset) == expected.as_tuple()
            assert self.opened.read(offset) == expected.body
            return

        with pytest.raises(OffsetNotFoundError) as caught:
            self.opened.read(offset)
        error = caught.value
        assert error.offset == offset
        assert error.first_offset == self.model.first_offset
        assert error.next_offset == self.model.next_offset
        if self.model.in_log(offset):
            assert "has no record" in str(error)
        else:
            assert f"offset {offset} is not in" in str(error)

    @rule(data=st.data())
    def read_range(self, data: st.DataObject) -> None:
        start = data.draw(self.offsets(), label="start")
        stop = data.draw(self.offsets(), label="stop")
        expected = self.model.records_between(start, stop)
        records = self.opened.read_records(start, stop)
        assert records == [record.as_tuple() for record in expected]
        assert self.opened.read_range(start, stop) == [
            record.body for record in expected
        ]

    @rule(data=st.data())
    def read_views(self, data: st.DataObject) -> None:
        start = data.draw(self.offsets(), label="start")
        stop = data.draw(self.offsets(), label="stop")
        expected = [record.body for record in self.model.records_between(start, stop)]
        views = self.opened.read_views(start, stop)
        try:
            assert [bytes(view) for view in views] == expected
            assert all(view.readonly for view in views)
        finally:
            for view in views:
                view.release()

    @precondition(
        lambda self: (
            self.model.record_count() > 0 and len(self.held_views) < MAX_HELD_VIEWS
        )
    )
    @rule(data=st.data())
    def hold_view(self, data: st.DataObject) -> None:
        """Keep a view while later steps delete segments and reopen the store."""
        records = self.model.records_between(0, self.model.next_offset)
        record = data.draw(st.sampled_from(records), label="record")
        self.held_views.append((self.opened.read_view(record.offset), record.body))

    # deleting, skipping, reopening ------------------------------------------

    @rule(data=st.data())
    def delete_below(self, data: st.DataObject) -> None:
        offset = data.draw(self.offsets(), label="offset")
        assert self.opened.delete_below(offset) == self.model.delete_below(offset)

    @rule(data=st.data())
    def ensure_next_offset(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(0, self.model.next_offset + 20), label="offset")
        skipped = self.opened.ensure_next_offset(offset)
        assert skipped == self.model.ensure_next_offset(offset)

    @rule()
    def flush(self) -> None:
        self.opened.flush()
        stats = self.opened.stats()
        assert stats["synced_bytes"] == stats["written_bytes"]

    @rule()
    def reopen(self) -> None:
        self.opened.close()
        self.store = SegmentStore(self.path, segment_bytes=self.model.segment_bytes)
        self.model.reopen()

    @rule()
    def verify(self) -> None:
        assert self.opened.verify() == {
            "records": self.model.record_count(),
            "missing": 0,
            "damaged": [],
        }

    # invariants -------------------------------------------------------------

    @invariant()
    def offsets_match(self) -> None:
        assert self.opened.first_offset == self.model.first_offset
        assert self.opened.next_offset == self.model.next_offset

    @invariant()
    def stats_match(self) -> None:
        stats = self.opened.stats()
        del stats["synced_bytes"]
        assert stats == self.model.stats()
        assert self.opened.gap_offsets == self.model.gap_offsets

    @invariant()
    def files_match(self) -> None:
        names = {
            name for name in os.listdir(self.path) if name.endswith((".log", ".idx"))
        }
        assert names == self.model.file_names()

    @invariant()
    def held_views_unchanged(self) -> None:
        for view, body in self.held_views:
            assert bytes(view) == body


def test_store_matches_model() -> None:
    run_state_machine_as_test(
        SegmentStoreMachine,
        settings=settings(stateful_step_count=30, deadline=None),
    )
