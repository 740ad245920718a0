"""Consumer groups of a stream: fan-out, competing consumers, start points."""

from __future__ import annotations

from pathlib import Path

import pytest

import pymq
from pymq import ConfigError, InvalidNameError


@pytest.fixture
def broker(tmp_path: Path):
    with pymq.open(tmp_path / "data") as opened:
        yield opened


def drain(group, limit: int = 1000) -> list:
    """Deliver and ack every available message, and return their bodies."""
    bodies = []
    for _ in range(limit):
        msg = group.get(timeout=0)
        if msg is None:
            break
        bodies.append(msg.body)
        msg.ack()
    return bodies


def test_group_each_sees_every_message(broker):
    s = broker.stream("events")
    billing = s.group("billing")
    audit = s.group("audit")
    s.put_many([b"a", b"b", b"c"])
    assert drain(billing) == [b"a", b"b", b"c"]
    assert drain(audit) == [b"a", b"b", b"c"]


def test_group_ack_leaves_other_group_untouched(broker):
    s = broker.stream("events")
    billing = s.group("billing")
    audit = s.group("audit")
    s.put(b"a")
    billing.get(timeout=0).ack()
    assert billing.stats().acked == 1
    assert audit.stats().depth == 1
    assert audit.get(timeout=0).attempt == 1


def test_group_consumers_compete_for_messages(broker):
    s = broker.stream("events")
    s.put_many([b"%d" % i for i in range(6)])
    first = s.group("billing")
    second = broker.stream("events").group("billing")
    assert second is first
    taken_a = first.get_many(3, timeout=0)
    taken_b = second.get_many(3, timeout=0)
    offsets_a = {m.offset for m in taken_a}
    offsets_b = {m.offset for m in taken_b}
    assert offsets_a == {0, 1, 2}
    assert offsets_b == {3, 4, 5}
    assert first.get(timeout=0) is None


def test_group_start_earliest_sees_old_messages(broker):
    s = broker.stream("events")
    s.put_many([b"old1", b"old2"])
    assert drain(s.group("billing", start="earliest")) == [b"old1", b"old2"]


def test_group_start_latest_skips_old_messages(broker):
    s = broker.stream("events")
    s.put_many([b"old1", b"old2"])
    g = s.group("billing", start="latest")
    assert g.get(timeout=0) is None
    s.put(b"new")
    assert drain(g) == [b"new"]


def test_group_start_offset_begins_there(broker):
    s = broker.stream("events")
    s.put_many([b"m0", b"m1", b"m2", b"m3"])
    g = s.group("billing", start=2)
    assert drain(g) == [b"m2", b"m3"]


@pytest.mark.parametrize("start", ["newest", -1, 1.5, True])
def test_group_invalid_start_raises(broker, start):
    s = broker.stream("events")
    with pytest.raises(ConfigError, match="start is"):
        s.group("billing", start=start)


def test_group_invalid_name_creates_nothing(broker):
    s = broker.stream("events")
    with pytest.raises(InvalidNameError, match="group name"):
        s.group("bad name")
    assert not (broker.path / "streams" / "events" / "groups").exists()


@pytest.mark.parametrize("name", ["", ".events", "a/b", "x" * 129])
def test_stream_invalid_name_creates_nothing(broker, name):
    with pytest.raises(InvalidNameError, match="stream name"):
        broker.stream(name)
    assert not (broker.path / "streams").exists()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"max_deliveries": -1}, ConfigError),
        ({"visibility_timeout": "1"}, TypeError),
        ({"max_in_flight": 1 << 40}, ConfigError),
    ],
)
def test_group_invalid_option_raises(broker, options, error):
    s = broker.stream("events")
    with pytest.raises(error, match=next(iter(options))):
        s.group("billing", **options)
    assert not (broker.path / "streams" / "events" / "groups" / "billing").exists()


def test_group_start_ignored_on_reopen(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        s = broker.stream("events")
        g = s.group("billing")
        s.put_many([b"a", b"b", b"c"])
        g.get(timeout=0).ack()
    with pymq.open(data) as broker:
        g = broker.stream("events").group("billing", start="latest")
        assert drain(g) == [b"b", b"c"]


def test_group_dlq_name_includes_stream(broker):
    g = broker.stream("events").group("billing")
    assert g.dlq_name == "events.billing.dlq"
    assert g.dlq.name == "events.billing.dlq"


def test_group_reject_moves_to_group_dlq(broker):
    s = broker.stream("events")
    g = s.group("billing")
    other = s.group("audit")
    s.put(b"bad", headers={"id": "9"})
    g.get(timeout=0).reject("invalid amount")
    dead = g.dlq.get(timeout=0)
    assert dead.body == b"bad"
    assert dead.headers["id"] == "9"
    assert dead.headers["x-source"] == "events"
    assert dead.headers["x-group"] == "billing"
    assert dead.headers["x-offset"] == "0"
    assert dead.headers["x-reason"] == "invalid amount"
    assert other.get(timeout=0).body == b"bad"


def test_group_max_deliveries_moves_to_dlq(broker):
    s = broker.stream("events")
    g = s.group("billing", max_deliveries=2)
    s.put_many([b"poison", b"fine"])
    g.get(timeout=0).nack()
    g.get(timeout=0).nack()
    assert g.stats().dead_lettered == 1
    assert drain(g) == [b"fine"]
    dead = g.dlq.get(timeout=0)
    assert dead.body == b"poison"
    assert dead.headers["x-attempts"] == "2"


def test_group_options_stored_per_group(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        s = broker.stream("events")
        s.group("billing", max_deliveries=2, visibility_timeout=4.5)
        s.group("audit")
    with pymq.open(data) as broker:
        s = broker.stream("events")
        billing = s.group("billing")
        audit = s.group("audit")
        assert billing.max_deliveries == 2
        assert billing.visibility_timeout == 4.5
        assert audit.max_deliveries == 5


def test_group_option_change_while_open_is_stored(tmp_path):
    data = tmp_path / "data"
    with pymq.open(data) as broker:
        s = broker.stream("events")
        s.group("billing", max_deliveries=2)
        s.group("billing", max_deliveries=9)
    with pymq.open(data) as broker:
        assert broker.stream("events").group("billing").max_deliveries == 9


def test_stream_name_of_queue_raises_config_error(broker):
    broker.queue("jobs")
    with pytest.raises(ConfigError, match="jobs is a queue, not a stream"):
        broker.stream("jobs")


def test_stream_segments_kept_after_group_acks(tmp_path):
    data = tmp_path / "data"
    log = data / "streams" / "events" / "log"
    with pymq.open(data, segment_bytes=4096) as broker:
        s = broker.stream("events")
        g = s.group("billing")
        s.put_many([b"x" * 200] * 100)
        before = sorted(log.glob("*.log"))
        g.ack_many(g.get_many(100, timeout=0))
        assert sorted(log.glob("*.log")) == before
        late = s.group("late", start="earliest")
        assert late.get(timeout=0).offset == 0


def test_group_close_then_reopen(broker):
    events = broker.stream("events")
    billing = events.group("billing")
    events.put_many([b"one", b"two"])
    held = billing.get(timeout=0)
    assert held is not None
    billing.close()
    with pytest.raises(pymq.ClosedError):
        billing.get(timeout=0)
    reopened = events.group("billing")
    assert reopened is not billing
    first = reopened.get(timeout=0)
    assert first is not None
    assert (first.body, first.attempt) == (b"one", 2)
    second = reopened.get(timeout=0)
    assert second is not None
    assert (second.body, second.attempt) == (b"two", 1)


def test_group_context_manager_closes_group(broker):
    events = broker.stream("events")
    with events.group("billing") as billing:
        events.put(b"one")
    with pytest.raises(pymq.ClosedError):
        billing.get(timeout=0)
    assert events.group("billing").get(timeout=0).body == b"one"


def test_group_ending_in_dlq_of_older_version_opens(broker):
    events = broker.stream("events")
    events.put(b"x")
    events.group("old").close()
    # An older version took group names ending in ".dlq".
    groups = broker.path / "streams" / "events" / "groups"
    (groups / "old").rename(groups / "old.dlq")
    with pytest.raises(InvalidNameError, match=r"ends in '\.dlq'"):
        events.group("new.dlq")
    group = events.group("old.dlq")
    message = group.get(timeout=0)
    assert message is not None
    assert message.body == b"x"
    message.ack()
    assert broker.groups("events") == ["old.dlq"]
