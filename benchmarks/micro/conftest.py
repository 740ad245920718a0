"""Fixtures of the micro benchmarks: stores in scratch folders deleted after."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

import pymq
from benchmarks.benchmarks.common import Scratch, open_store


@pytest.fixture
def scratch() -> Iterator[Scratch]:
    """A temporary folder, deleted with its files when the test ends."""
    with Scratch() as folder:
        yield folder


@pytest.fixture
def make_store(scratch: Scratch) -> Iterator[Callable[[str], pymq.SegmentStore]]:
    """Open the test's store in scratch with an fsync policy; closed after."""
    stores: list[pymq.SegmentStore] = []

    def make(fsync: str) -> pymq.SegmentStore:
        store = open_store(scratch, fsync)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()
