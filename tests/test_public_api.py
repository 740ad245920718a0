"""The names, signatures and docstrings that the pymq package exports."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

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


# The public names of each class: a new public name must be added here, and
# documented, on purpose.
CONSUMER_NAMES = {
    "ack",
    "ack_many",
    "close",
    "closed",
    "dlq",
    "dlq_name",
    "extend",
    "get",
    "get_batch",
    "get_batch_nowait",
    "get_many",
    "get_many_nowait",
    "get_nowait",
    "max_deliveries",
    "max_in_flight",
    "nack",
    "reject",
    "stats",
    "stream",
    "visibility_timeout",
}
PUBLIC_NAMES: dict[type, set[str]] = {
    pymq.Queue: CONSUMER_NAMES
    | {"max_bytes", "max_length", "overflow", "put", "put_many"},
    pymq.Group: CONSUMER_NAMES,
    pymq.Stream: {"group", "put", "put_many", "store"},
    pymq.Broker: {
        "apply_retention",
        "close",
        "groups",
        "names",
        "queue",
        "redrive",
        "stream",
    },
}
# Internal parts of the compiled core, which lose messages when misused.
INTERNAL_NAMES = [
    "counts",
    "clock",
    "deletes_acked",
    "forget_move",
    "group_name",
    "next_due",
    "on_dead",
    "settle_moved",
    "unfinished_moves",
]


def public_names(value: object) -> set[str]:
    return {name for name in dir(value) if not name.startswith("_")}


@pytest.mark.parametrize("cls", list(PUBLIC_NAMES), ids=lambda cls: cls.__name__)
def test_class_public_names_exact(cls: type) -> None:
    assert public_names(cls) == PUBLIC_NAMES[cls]


def test_instances_add_only_their_names(tmp_path: Path) -> None:
    with pymq.open(tmp_path / "data") as broker:
        jobs = broker.queue("jobs")
        billing = broker.stream("events").group("billing")
        assert public_names(jobs) == PUBLIC_NAMES[pymq.Queue] | {"name"}
        assert public_names(billing) == CONSUMER_NAMES | {"name", "stream_name"}


@pytest.mark.parametrize("name", INTERNAL_NAMES)
def test_core_internals_not_public(tmp_path: Path, name: str) -> None:
    with pymq.open(tmp_path / "data") as broker:
        jobs = broker.queue("jobs")
        billing = broker.stream("events").group("billing")
        for consumer in (jobs, billing):
            assert not hasattr(consumer, name)


def test_settle_moved_not_reachable(tmp_path: Path) -> None:
    with pymq.open(tmp_path / "data") as broker:
        jobs = broker.queue("jobs")
        jobs.put(b"x")
        message = jobs.get(timeout=0)
        assert message is not None
        with pytest.raises(AttributeError):
            jobs.settle_moved(message.offset)  # type: ignore[attr-defined]
        message.ack()
        stats = jobs.stats()
        assert (stats.acked, stats.dead_lettered) == (1, 0)


def test_public_methods_documented() -> None:
    for cls, names in PUBLIC_NAMES.items():
        for name in names:
            attribute = getattr(cls, name)
            if callable(attribute):
                assert attribute.__doc__, f"{cls.__name__}.{name}"
