"""The names, signatures and docstrings that the pymq package exports."""

from __future__ import annotations

import inspect
from pathlib import Path

import pymq


def test_open_left_out_of_star_import() -> None:
    assert "open" not in pymq.__all__
    namespace: dict[str, object] = {}
    exec("from pymq import *", namespace)
    assert "open" not in namespace
    assert "Broker" in namespace


def test_queue_empty_documented_as_unused() -> None:
    assert pymq.QueueEmpty.__doc__ is not None
    assert pymq.QueueEmpty.__doc__.startswith(
        "Not raised by pymq: a get that finds no message returns None."
    )


def test_put_methods_defined_on_classes() -> None:
    for cls in (pymq.Queue, pymq.Stream):
        for name in ("put", "put_many"):
            method = getattr(cls, name)
            assert inspect.isfunction(method)
            assert list(inspect.signature(method).parameters) == [
                "self",
                "bodies" if name == "put_many" else "body",
                "headers",
                "timeout",
            ]
            assert method.__doc__ is not None


def test_put_called_on_class_appends(tmp_path: Path) -> None:
    with pymq.open(tmp_path / "data") as broker:
        jobs = broker.queue("jobs")
        events = broker.stream("events")
        assert pymq.Queue.put(jobs, b"one", headers={"k": "v"}) == 0
        assert pymq.Queue.put_many(jobs, [b"two", b"three"]) == range(1, 3)
        assert pymq.Stream.put(events, b"one") == 0
        assert pymq.Stream.put_many(events, [b"two"]) == range(1, 2)
        message = jobs.get(timeout=0)
        assert message is not None
        assert (message.body, message.headers) == (b"one", {"k": "v"})


def test_put_docstring_says_when_timeout_applies() -> None:
    assert pymq.Queue.put.__doc__ is not None
    assert 'QueueFull with overflow="reject" (timeout is then not used)' in " ".join(
        pymq.Queue.put.__doc__.split()
    )


def test_queue_stats_docstring_names_both_skip_reasons() -> None:
    assert pymq.QueueStats.__doc__ is not None
    text = " ".join(pymq.QueueStats.__doc__.split())
    assert (
        "``skipped`` counts offsets this group passed over, because they had no "
        "readable record (damage, or a gap) or because stream retention deleted "
        "them before this group settled them."
    ) in text
