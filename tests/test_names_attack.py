"""Hostile names and option values, embedded and through a server.

Every case runs twice: on pymq.open() and through pymq.connect() to a
server. A rejected name or option must raise an error whose message names
the value and the rule, and must leave the data directory's listing (every
file and folder under it) as it was. The raw-socket cases send the same
OPEN requests without the client's own checks, so that the server's
checks are tested too.

The server runs in a thread of the test process (server_in_thread), so
that its broker, like the embedded ones, can use 4 KiB segments. With the
default of 64 MiB, preallocated, the few hundred queues here took 18 GiB
of disk.

Names follow docs/broker.md: 1 to 128 characters of ASCII letters, digits,
".", "_", "-" and ":", not starting with ".". A name that differs from an
existing one only in case is rejected, because on a case-insensitive file
system the two would share one folder.

NOTE: the tests run on a case-sensitive file system only, because the
kernel of this project's machines has no casefold support to mount
another.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pymq
from pymq import ConfigError, InvalidNameError, QueueNotFound, protocol
from pymq._core import encode_frame
from pymq.names import MAX_DERIVED_NAME_LENGTH, MAX_NAME_LENGTH
from pymq.protocol import FLAG_ERROR, FLAG_REPLY, PREAMBLE, encode_json
from pymq.server import ServerLimits
from tests.server.helpers import RawClient, ServerProcess, error_of, server_in_thread

_numbers = itertools.count()
SEGMENT_BYTES = 4096

# Names that break the naming rule, keyed by a test id.
BAD_NAMES = {
    "empty": "",
    "dot": ".",
    "dot-dot": "..",
    "parent": "../x",
    "parent-deep": "../../etc/passwd",
    "absolute": "/abs",
    "slash": "a/b",
    "backslash": "a\\b",
    "hidden": ".hidden",
    "queue-group": ".queue",
    "nul": "a\x00b",
    "newline": "a\nb",
    "tab": "a\tb",
    "del": "a\x7fb",
    "escape": "\x1b[31mred",
    "space": "a b",
    "trailing-newline": "jobs\n",
    "too-long": "x" * (MAX_NAME_LENGTH + 1),
    "huge": "y" * 100_000,
    "fullwidth": "\uff4a\uff4f\uff42\uff53",  # "jobs" in fullwidth letters
    "cyrillic-o": "j\u043ebs",  # looks like "jobs"
    "combining-accent": "jobs\u0301",
    "ligature": "\ufb01le",  # "file" after NFKC normalisation
    "zero-width-space": "\u200bjobs",
    "no-break-space": "jobs\u00a0",
    "precomposed": "caf\u00e9",
    "surrogate": "jobs\ud800",
    "right-to-left": "jobs\u202etxt",
}
# Names that pass the rule although they look like parts of the layout.
LAYOUT_NAMES = [
    "streams",
    "groups",
    "kind",
    "log",
    "LOCK",
    "options.json",
    "options.tmp",
    "spare.log",
    "00000000000000000000.log",
    "queue",
    "-starts-with-dash",
    ":",
    "a..b",
]


def listing(folder: Path) -> list[str]:
    """Return every file and folder under folder, relative and sorted."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def changes(before: list[str], after: list[str]) -> dict[str, list[str]]:
    """Return the paths added to and removed from a listing; both empty if none."""
    return {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
    }


NO_CHANGES: dict[str, list[str]] = {"added": [], "removed": []}


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_numbers)}"


def shown(name: str) -> str:
    """Return how an error message shows name: its repr, cut at 140 characters."""
    return repr(name) if len(name) <= 140 else f"{name[:140]!r}..."


def assert_names_rule(error: BaseException, name: str, longest: int) -> None:
    """Check that error names the value and the rule it broke."""
    text = str(error)
    assert shown(name) in text, text[:300]
    if 1 <= len(name) <= longest:
        assert "use ASCII letters, digits, '.', '_', '-' and ':'" in text
    else:
        assert f"it must be 1 to {longest}" in text
    assert len(text) < 400, "the error message repeats the whole name"


# Both sides ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Served:
    """The module's server: its port and its broker's data directory."""

    port: int
    data: Path

    @property
    def folder(self) -> Path:
        """The folder that contains the data directory."""
        return self.data.parent

    @property
    def url(self) -> str:
        return f"pymq://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("names-server")
    with (
        pymq.open(folder / "data", segment_bytes=SEGMENT_BYTES) as broker,
        server_in_thread(broker) as running,
    ):
        yield Served(running.port, broker.path)


class Side:
    """A broker, embedded or remote, and the data directory behind it.

    listing() covers the folder that contains the data directory, so that
    a name that climbed out of it would show up too.
    """

    def __init__(self, broker: Any, data: Path) -> None:
        self.broker = broker
        self.data = data

    def listing(self) -> list[str]:
        return listing(self.data.parent)


@pytest.fixture(params=["embedded", "server"])
def side(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Side]:
    if request.param == "embedded":
        with pymq.open(tmp_path / "data", segment_bytes=SEGMENT_BYTES) as embedded:
            yield Side(embedded, embedded.path)
        return
    served: Served = request.getfixturevalue("server")
    with pymq.connect(served.url, reconnect_attempts=0) as remote:
        yield Side(remote, served.data)


@pytest.fixture
def raw(server: Served) -> Iterator[RawClient]:
    client = RawClient(server.port)
    client.handshake()
    yield client
    client.close()


def raw_open(raw: RawClient, request: dict[str, Any]) -> tuple[int, int, str]:
    """Send OPEN without the client's checks; return (flags, code, text).

    code and text are 0 and "" for a reply that is no error.
    """
    payload = json.dumps(request).encode("utf-8")
    reply = raw.request(protocol.OPEN, 77, 0, payload)
    assert reply[:3] == (protocol.OPEN, reply[1], 77), reply
    if not reply[1] & FLAG_ERROR:
        return reply[1], 0, ""
    code, text = error_of(reply)
    return reply[1], code, text


def assert_connection_open(raw: RawClient) -> None:
    reply = raw.request(protocol.PING, 78, 0, b"")
    assert reply[:3] == (protocol.PING, FLAG_REPLY, 78)


# Invalid names ---------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_bad_queue_name_rejected(side, name):
    before = side.listing()
    absolute_existed = name.startswith("/") and Path(name).exists()
    with pytest.raises(InvalidNameError) as raised:
        side.broker.queue(name)
    assert_names_rule(raised.value, name, MAX_NAME_LENGTH)
    assert changes(before, side.listing()) == NO_CHANGES
    if name.startswith("/"):
        # data / "streams" / "/abs" would be /abs itself.
        assert Path(name).exists() == absolute_existed


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_bad_stream_name_rejected(side, name):
    before = side.listing()
    with pytest.raises(InvalidNameError) as raised:
        side.broker.stream(name)
    assert_names_rule(raised.value, name, MAX_NAME_LENGTH)
    assert changes(before, side.listing()) == NO_CHANGES


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_bad_group_name_rejected(side, name):
    stream = side.broker.stream(unique("groups-of"))
    before = side.listing()
    with pytest.raises(InvalidNameError) as raised:
        stream.group(name)
    assert_names_rule(raised.value, name, MAX_NAME_LENGTH)
    assert changes(before, side.listing()) == NO_CHANGES


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_bad_name_in_groups_rejected(side, name):
    before = side.listing()
    with pytest.raises(InvalidNameError) as raised:
        side.broker.groups(name)
    assert_names_rule(raised.value, name, MAX_NAME_LENGTH)
    assert changes(before, side.listing()) == NO_CHANGES


# A DLQ name may be longer than a queue name, so 129 characters pass there.
REDRIVE_NAMES = {
    key: name for key, name in BAD_NAMES.items() if key not in ("too-long",)
} | {"over-name-max": "z" * (MAX_DERIVED_NAME_LENGTH + 1)}


@pytest.mark.parametrize("name", REDRIVE_NAMES.values(), ids=REDRIVE_NAMES.keys())
def test_bad_name_in_redrive_rejected(side, name):
    before = side.listing()
    with pytest.raises(InvalidNameError) as raised:
        side.broker.redrive(name)
    assert_names_rule(raised.value, name, MAX_DERIVED_NAME_LENGTH)
    assert changes(before, side.listing()) == NO_CHANGES


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_bad_redrive_target_rejected(side, name):
    """redrive(to=) checks the target's name before moving any message."""
    source = unique("source")
    side.broker.queue(source)
    dlq_name = source + ".dlq"
    side.broker.queue(dlq_name).put(b"waits in the DLQ")
    before = side.listing()
    with pytest.raises(InvalidNameError) as raised:
        side.broker.redrive(dlq_name, to=name)
    assert_names_rule(raised.value, name, MAX_NAME_LENGTH)
    assert changes(before, side.listing()) == NO_CHANGES
    assert side.broker.queue(dlq_name).stats().depth == 1


def test_redrive_of_longest_derived_name(side):
    """A 255-character DLQ name is valid, so it is looked up, not rejected."""
    name = "d" * MAX_DERIVED_NAME_LENGTH
    before = side.listing()
    with pytest.raises(QueueNotFound, match="does not exist"):
        side.broker.redrive(name)
    assert changes(before, side.listing()) == NO_CHANGES


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_server_rejects_bad_name_in_raw_open(server, raw, name):
    before = listing(server.folder)
    for request in [
        {"kind": "queue", "name": name},
        {"kind": "stream", "name": name},
        {"kind": "group", "stream": name, "name": "g"},
    ]:
        flags, code, text = raw_open(raw, request)
        assert flags == FLAG_REPLY | FLAG_ERROR
        assert code == 7, text
        assert shown(name) in text
    assert_connection_open(raw)
    assert changes(before, listing(server.folder)) == NO_CHANGES


def test_server_rejects_bad_group_name_before_opening_stream(server, raw):
    """An invalid group name in OPEN creates no stream on the server.

    The server opens the stream, creating it, before it checks the group
    name. pymq.connect() opens the stream first on purpose, so only a raw
    OPEN shows the difference.
    """
    stream = unique("never-created")
    before = listing(server.folder)
    _, code, text = raw_open(raw, {"kind": "group", "stream": stream, "name": ".."})
    assert code == 7, text
    assert changes(before, listing(server.folder)) == NO_CHANGES


def test_server_error_for_huge_name_fits_a_frame(server, raw):
    """The error for a name that fills a whole frame still fits in one frame.

    docs/server.md: max_frame_bytes is the largest frame in either
    direction. An error that quoted the whole name would be longer than
    the request.
    """
    max_frame_bytes = 16 << 20
    empty = encode_json({"kind": "queue", "name": ""})
    name = "n" * (max_frame_bytes - 12 - len(empty))
    payload = encode_json({"kind": "queue", "name": name})
    assert len(payload) + 12 == max_frame_bytes
    raw.send(encode_frame(protocol.OPEN, 0, 5, 0, payload))
    reply = raw.next_frame()
    assert len(reply[4]) + 12 <= max_frame_bytes
    assert error_of(reply)[0] == 7
    assert_connection_open(raw)


def test_non_str_names_raise_type_error(side):
    before = side.listing()
    for name in [5, None, b"jobs", ["jobs"]]:
        with pytest.raises(TypeError, match="name must be a str"):
            side.broker.queue(name)
        with pytest.raises(TypeError, match="name must be a str"):
            side.broker.stream(name)
    assert changes(before, side.listing()) == NO_CHANGES


def test_server_rejects_non_str_name_in_raw_open(server, raw):
    """A name of the wrong JSON type is an invalid request; the connection stays."""
    before = listing(server.folder)
    for name in [5, None, ["jobs"], {"name": "jobs"}, True]:
        flags, code, text = raw_open(raw, {"kind": "queue", "name": name})
        assert flags == FLAG_REPLY | FLAG_ERROR
        assert code == 17, text
        assert repr(name) in text
        assert_connection_open(raw)
    assert changes(before, listing(server.folder)) == NO_CHANGES


# Names that pass the rule ----------------------------------------------------


def test_case_variant_names_are_rejected(side):
    """A name that differs from an existing one only in case is rejected.

    Queues, streams, groups and DLQ names are all checked, before any file
    is made, and the existing one still works.
    """
    upper = unique("Jobs")
    side.broker.queue(upper).put(b"to the upper one")
    stream_name = unique("Events")
    side.broker.stream(stream_name).group("Billing")
    before = side.listing()
    cases = [
        lambda: side.broker.queue(upper.lower()),
        lambda: side.broker.stream(upper.upper()),
        lambda: side.broker.queue(stream_name.lower()),
        lambda: side.broker.stream(stream_name).group("billing"),
    ]
    for make in cases:
        with pytest.raises(InvalidNameError) as raised:
            make()
        assert "differs from the existing" in str(raised.value)
        assert "only in case" in str(raised.value)
    assert changes(before, side.listing()) == NO_CHANGES
    message = side.broker.queue(upper).get(timeout=10.0)
    assert message.body == b"to the upper one"
    message.ack()
    assert side.broker.groups(stream_name) == ["Billing"]


def test_case_variant_dlq_name_is_rejected(side):
    """Queue x is rejected while a queue X.DLQ exists: their DLQs would clash."""
    name = unique("mixed")
    side.broker.queue(f"{name}.DLQ")
    before = side.listing()
    with pytest.raises(InvalidNameError) as raised:
        side.broker.queue(name)
    assert f"'{name}.dlq' differs from the existing '{name}.DLQ'" in str(raised.value)
    assert changes(before, side.listing()) == NO_CHANGES


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_layout_like_name_is_its_own_queue(side, name):
    """Names like the layout's files are queues in their own folders."""
    neighbour = unique("neighbour")
    side.broker.queue(neighbour).put(b"kept")
    queue = side.broker.queue(name)
    queue.put(b"in " + name.encode())
    message = queue.get(timeout=10.0)
    assert message.body == b"in " + name.encode()
    message.ack()
    assert side.broker.names()[name] == "queue"
    assert (side.data / "streams" / name / "kind").read_text() == "queue"
    assert side.broker.queue(neighbour).stats().depth == 1


@pytest.mark.parametrize("name", ["log", "kind", "options.json", "groups", "queue"])
def test_layout_like_group_name(side, name):
    stream_name = unique("layout-groups")
    stream = side.broker.stream(stream_name)
    stream.put(b"event")
    group = stream.group(name)
    message = group.get(timeout=10.0)
    assert message.body == b"event"
    message.ack()
    assert side.broker.groups(stream_name) == [name]
    assert (side.data / "streams" / stream_name / "kind").read_text() == "stream"


def test_dlq_named_queue_used_as_source(side):
    """A queue named like a DLQ has no DLQ of its own: failures stay in it.

    Such a queue never dead-letters, so max_deliveries is rejected before
    any file is made.
    """
    source = unique("source")
    side.broker.queue(source)
    name = source + ".dlq"
    before = side.listing()
    with pytest.raises(ConfigError) as raised:
        side.broker.queue(name, max_deliveries=1, visibility_timeout=60)
    assert f"max_deliveries of queue {name} is 1" in str(raised.value)
    assert changes(before, side.listing()) == NO_CHANGES
    queue = side.broker.queue(name, visibility_timeout=60)
    queue.put(b"fails")
    message = queue.get(timeout=10.0)
    message.nack()
    again = queue.get(timeout=10.0)
    assert again.body == b"fails"
    assert again.attempt == 2
    again.ack()
    assert f"{name}.dlq" not in side.broker.names()
    assert queue.dlq_name == name


def test_dlq_of_dlq_is_the_dlq(side):
    """A DLQ keeps what fails in it, so its dlq is itself and .dlq.dlq is invalid."""
    source = unique("twice")
    dlq = side.broker.queue(source).dlq
    assert dlq.name == f"{source}.dlq"
    assert dlq.dlq_name == dlq.name
    assert dlq.dlq.name == dlq.name
    before = side.listing()
    with pytest.raises(InvalidNameError) as raised:
        side.broker.queue(f"{source}.dlq.dlq")
    assert str(raised.value) == (
        f"queue name '{source}.dlq.dlq' names a DLQ of the dead-letter queue "
        f"{source}.dlq, which has none, because a message that fails in a DLQ "
        f"stays there; use {source}.dlq"
    )
    assert changes(before, side.listing()) == NO_CHANGES
    assert f"{source}.dlq.dlq" not in side.broker.names()


def test_dlq_without_source_rejected(side):
    """queue(x.dlq) creates a DLQ only for an existing queue x or group S.G."""
    missing = unique("missing")
    before = side.listing()
    with pytest.raises(QueueNotFound) as raised:
        side.broker.queue(f"{missing}.dlq")
    assert str(raised.value) == (
        f"dead-letter queue {missing}.dlq cannot be created: there is no queue "
        f"{missing}, nor a group G of a stream S with S.G = {missing}; create "
        f"the queue or group first"
    )
    assert changes(before, side.listing()) == NO_CHANGES

    stream_name = unique("events")
    side.broker.stream(stream_name).group("billing")
    before = side.listing()
    with pytest.raises(QueueNotFound) as raised:
        side.broker.queue(f"{stream_name}.dlq")
    assert str(raised.value) == (
        f"dead-letter queue {stream_name}.dlq cannot be created: {stream_name} "
        f"is a stream, and a stream has no DLQ; each of its groups G has "
        f"{stream_name}.G.dlq"
    )
    with pytest.raises(QueueNotFound):
        side.broker.queue(f"{stream_name}.audit.dlq")
    assert changes(before, side.listing()) == NO_CHANGES

    # With the source in place, the DLQ opens, and stays openable.
    side.broker.queue(missing)
    side.broker.queue(f"{missing}.dlq").put(b"kept")
    side.broker.queue(f"{stream_name}.billing.dlq")
    names = side.broker.names()
    assert names[f"{missing}.dlq"] == "queue"
    assert names[f"{stream_name}.billing.dlq"] == "queue"


def test_group_name_ending_in_dlq_rejected(side):
    """Group names follow the stream rule: names ending in .dlq are for DLQs."""
    stream_name = unique("groups-dlq")
    stream = side.broker.stream(stream_name)
    before = side.listing()
    for name in ("a.dlq", "dlq.dlq"):
        with pytest.raises(InvalidNameError) as raised:
            stream.group(name)
        assert str(raised.value) == (
            f"group name '{name}' ends in '.dlq', which is kept for dead-letter queues"
        )
    assert changes(before, side.listing()) == NO_CHANGES
    assert side.broker.groups(stream_name) == []
    # Only the ending is kept: "dlq" alone, or inside a name, is a group name.
    stream.group("dlq")
    stream.group("a.dlq.b")
    assert side.broker.groups(stream_name) == ["a.dlq.b", "dlq"]


def test_queue_whose_dlq_name_is_a_stream(side):
    """Names ending in .dlq are kept for DLQs, and a stream x.dlq blocks queue x.

    stream() rejects such a name before any file is made. A data directory
    written by an older version may still contain such a stream: then
    queue(x) raises ConfigError, twice in a row, and leaves nothing.
    """
    name = unique("shadowed")
    before = side.listing()
    with pytest.raises(InvalidNameError) as rejected:
        side.broker.stream(f"{name}.dlq")
    assert f"'{name}.dlq'" in str(rejected.value)
    assert "kept for dead-letter queues" in str(rejected.value)
    assert changes(before, side.listing()) == NO_CHANGES

    folder = side.data / "streams" / f"{name}.dlq"
    folder.mkdir(parents=True)
    (folder / "kind").write_text("stream")
    before = side.listing()
    for _ in range(2):
        with pytest.raises(ConfigError) as raised:
            side.broker.queue(name)
        assert f"{name}.dlq" in str(raised.value)
        assert "a stream of that name exists" in str(raised.value)
    assert changes(before, side.listing()) == NO_CHANGES


def test_group_whose_dlq_name_is_too_long(side):
    """<stream>.<group>.dlq over 255 characters is rejected before files exist."""
    stream_name = unique("s").ljust(MAX_NAME_LENGTH, "s")
    stream = side.broker.stream(stream_name)
    before = side.listing()
    group_name = "g" * MAX_NAME_LENGTH
    for _ in range(2):
        with pytest.raises(InvalidNameError) as raised:
            stream.group(group_name)
        dlq_name = f"{stream_name}.{group_name}.dlq"
        assert_names_rule(raised.value, dlq_name, MAX_DERIVED_NAME_LENGTH)
    assert changes(before, side.listing()) == NO_CHANGES


def test_longest_names_make_a_working_group(side):
    """A stream and a group whose DLQ name is exactly 255 characters work."""
    stream_name = unique("l").ljust(MAX_NAME_LENGTH, "l")
    group_name = "h" * (MAX_DERIVED_NAME_LENGTH - len(stream_name) - len("..dlq"))
    dlq_name = f"{stream_name}.{group_name}.dlq"
    assert len(dlq_name) == MAX_DERIVED_NAME_LENGTH
    stream = side.broker.stream(stream_name)
    stream.put(b"event")
    group = stream.group(group_name)
    message = group.get(timeout=10.0)
    message.reject("to the longest DLQ name")
    assert side.broker.names()[dlq_name] == "queue"
    assert side.broker.redrive(dlq_name) == 1
    again = group.get(timeout=10.0)
    assert again.body == b"event"
    again.ack()


# Options ---------------------------------------------------------------------

QUEUE_OPTION_CASES = [
    ("visibility_timeout", -1),
    ("visibility_timeout", 0),
    ("visibility_timeout", math.nan),
    ("visibility_timeout", math.inf),
    ("visibility_timeout", -math.inf),
    ("visibility_timeout", 1e10),
    ("visibility_timeout", True),
    ("visibility_timeout", "30"),
    ("visibility_timeout", None),
    ("max_deliveries", -1),
    ("max_deliveries", 65_536),
    ("max_deliveries", 1 << 64),
    ("max_deliveries", 1.5),
    ("max_deliveries", True),
    ("max_deliveries", "5"),
    ("max_deliveries", math.nan),
    ("max_in_flight", 0),
    ("max_in_flight", -1),
    ("max_in_flight", (1 << 31) + 1),
    ("max_in_flight", 1 << 100),
    ("max_in_flight", 10.0),
    ("max_in_flight", False),
    ("max_length", 0),
    ("max_length", -1),
    ("max_length", (1 << 62) + 1),
    ("max_length", 1.5),
    ("max_length", True),
    ("max_length", "1"),
    ("max_length", math.inf),
    ("max_bytes", 0),
    ("max_bytes", -1),
    ("max_bytes", 1 << 63),
    ("max_bytes", 2.0**40),
    ("max_bytes", True),
    ("overflow", "drop"),
    ("overflow", ""),
    ("overflow", "REJECT"),
    ("overflow", None),
    ("overflow", True),
    ("overflow", 1),
]
STREAM_OPTION_CASES = [
    ("max_age", 0),
    ("max_age", -1),
    ("max_age", math.nan),
    ("max_age", math.inf),
    ("max_age", 1e11),
    ("max_age", True),
    ("max_age", "1"),
    ("max_bytes", 0),
    ("max_bytes", -5),
    ("max_bytes", True),
    ("max_bytes", 1.5),
    ("max_bytes", 1 << 63),
]
GROUP_OPTION_CASES = [
    case
    for case in QUEUE_OPTION_CASES
    if case[0] in ("visibility_timeout", "max_deliveries", "max_in_flight")
]
# Options that the kind does not take at all, whatever their value.
UNKNOWN_OPTION_CASES = [
    ("queue", "bogus", 1),
    ("queue", "max_age", 10),
    ("queue", "start", "earliest"),
    ("queue", "", 1),
    ("stream", "visibility_timeout", 30.0),
    ("stream", "overflow", "block"),
    ("group", "max_length", 5),
    ("group", "max_bytes", 1 << 20),
    ("group", "overflow", "reject"),
]
START_CASES = [-1, True, False, "middle", "", 1.5, None, [0], 1 << 64, 1 << 70]


def case_id(case: tuple[str, object]) -> str:
    return f"{case[0]}={case[1]!r}"[:40]


def assert_names_option(error: BaseException, option: str, value: object) -> None:
    """Check that error names the option and its value (or the value's type)."""
    text = str(error)
    assert option in text, text
    named = {repr(value), str(value), type(value).__name__}
    assert any(form in text for form in named), text


@pytest.mark.parametrize("case", QUEUE_OPTION_CASES, ids=case_id)
def test_bad_queue_option_rejected(side, case):
    option, value = case
    name = unique("options-q")
    before = side.listing()
    with pytest.raises((TypeError, ValueError)) as raised:
        side.broker.queue(name, **{option: value})
    assert_names_option(raised.value, option, value)
    assert changes(before, side.listing()) == NO_CHANGES


@pytest.mark.parametrize("case", QUEUE_OPTION_CASES, ids=case_id)
def test_bad_option_on_existing_queue_changes_nothing(side, case):
    option, value = case
    name = unique("declared-q")
    side.broker.queue(name, visibility_timeout=12.5)
    stored = side.data / "streams" / name / "groups" / ".queue" / "options.json"
    before = (side.listing(), stored.read_bytes())
    with pytest.raises((TypeError, ValueError)) as raised:
        side.broker.queue(name, **{option: value})
    assert_names_option(raised.value, option, value)
    assert (side.listing(), stored.read_bytes()) == before
    assert json.loads(stored.read_bytes())["options"]["visibility_timeout"] == 12.5


@pytest.mark.parametrize("case", STREAM_OPTION_CASES, ids=case_id)
def test_bad_stream_option_rejected(side, case):
    option, value = case
    before = side.listing()
    with pytest.raises((TypeError, ValueError)) as raised:
        side.broker.stream(unique("options-s"), **{option: value})
    assert_names_option(raised.value, option, value)
    assert changes(before, side.listing()) == NO_CHANGES


@pytest.mark.parametrize("case", GROUP_OPTION_CASES, ids=case_id)
def test_bad_group_option_rejected(side, case):
    option, value = case
    stream = side.broker.stream(unique("options-g"))
    before = side.listing()
    with pytest.raises((TypeError, ValueError)) as raised:
        stream.group("g", **{option: value})
    assert_names_option(raised.value, option, value)
    assert changes(before, side.listing()) == NO_CHANGES


@pytest.mark.parametrize(
    "case", UNKNOWN_OPTION_CASES, ids=lambda case: f"{case[0]}-{case[1] or 'empty'}"
)
def test_unknown_option_rejected(side, case):
    kind, option, value = case
    if kind == "group":
        stream = side.broker.stream(unique("unknown-options"))
    before = side.listing()
    with pytest.raises(TypeError) as raised:
        if kind == "group":
            stream.group("g", **{option: value})
        else:
            getattr(side.broker, kind)(unique(f"unknown-{kind}"), **{option: value})
    assert f"unknown options: {option}" in str(raised.value)
    assert changes(before, side.listing()) == NO_CHANGES


@pytest.mark.parametrize("start", START_CASES, ids=repr)
def test_bad_group_start_rejected(side, start):
    stream = side.broker.stream(unique("starts"))
    stream.put(b"one")
    before = side.listing()
    with pytest.raises(ConfigError) as raised:
        stream.group("g", start=start)
    text = str(raised.value)
    assert "start" in text
    assert repr(start) in text or str(start) in text
    assert changes(before, side.listing()) == NO_CHANGES


SERVER_OPTION_CASES = (
    [("queue", *case) for case in QUEUE_OPTION_CASES]
    + [("stream", *case) for case in STREAM_OPTION_CASES]
    + [case for case in UNKNOWN_OPTION_CASES if case[0] != "group" and case[1]]
)


@pytest.mark.parametrize(
    "case", SERVER_OPTION_CASES, ids=lambda case: f"{case[0]}-{case_id(case[1:])}"
)
def test_server_rejects_bad_option_in_raw_open(server, raw, case):
    kind, option, value = case
    before = listing(server.folder)
    flags, code, text = raw_open(
        raw, {"kind": kind, "name": unique(f"raw-{kind}"), "options": {option: value}}
    )
    assert flags == FLAG_REPLY | FLAG_ERROR
    assert code in (8, 17), text
    assert option in text
    assert_connection_open(raw)
    assert changes(before, listing(server.folder)) == NO_CHANGES


# Broker and server options ---------------------------------------------------

BROKER_OPTION_CASES = [
    ("segment_bytes", 0),
    ("segment_bytes", 63),
    ("segment_bytes", 65),
    ("segment_bytes", -8),
    ("segment_bytes", (1 << 31) + 8),
    ("segment_bytes", 1 << 80),
    ("segment_bytes", True),
    ("segment_bytes", 64.0),
    ("segment_bytes", "64"),
    ("segment_bytes", math.nan),
    ("max_message_bytes", -1),
    ("max_message_bytes", 1 << 40),
    ("max_message_bytes", True),
    ("max_message_bytes", 1.5),
    ("fsync", "ALWAYS"),
    ("fsync", ""),
    ("fsync", 1),
    ("fsync", True),
    ("flush_interval", 0),
    ("flush_interval", -1),
    ("flush_interval", math.nan),
    ("flush_interval", math.inf),
    ("flush_interval", 3601),
    ("flush_interval", True),
    ("flush_interval", "0.1"),
]


@pytest.mark.parametrize("case", BROKER_OPTION_CASES, ids=case_id)
def test_bad_broker_option_creates_nothing(tmp_path, case):
    option, value = case
    data = tmp_path / "data"
    with pytest.raises((TypeError, ValueError)) as raised:
        pymq.open(data, **{option: value})
    assert_names_option(raised.value, option, value)
    assert not data.exists()
    assert listing(tmp_path) == []


SERVER_LIMIT_CASES = [
    ("max_frame_bytes", 4095),
    ("max_frame_bytes", 1 << 32),
    ("max_frame_bytes", math.nan),
    ("max_frame_bytes", 4096.5),
    ("max_frame_bytes", True),
    ("max_batch", 0),
    ("max_batch", True),
    ("max_batch", 2.5),
    ("max_batch", "5"),
    ("max_connections", 0),
    ("max_connections", 1.5),
    ("max_handles", -1),
    ("max_handles", math.inf),
    ("handshake_timeout", 0),
    ("handshake_timeout", math.nan),
    ("handshake_timeout", True),
    ("frame_timeout", -1),
    ("frame_timeout", "30"),
    ("idle_timeout", -1),
    ("idle_timeout", math.nan),
]


@pytest.mark.parametrize("case", SERVER_LIMIT_CASES, ids=case_id)
def test_bad_server_limit_rejected(case):
    """ServerLimits rejects values of the wrong type as well as out of range."""
    option, value = case
    with pytest.raises((TypeError, ValueError)) as raised:
        ServerLimits(**{option: value})
    assert_names_option(raised.value, option, value)


@pytest.mark.parametrize(
    ("config", "option"),
    [({"fsync": "sometimes"}, "fsync"), ({"limits": {"max_batch": 0}}, "max_batch")],
    ids=["fsync", "max_batch"],
)
def test_server_with_bad_option_exits_and_creates_nothing(tmp_path, config, option):
    process = ServerProcess(tmp_path / "server")
    process.config.update(config)
    with pytest.raises(RuntimeError, match="exited with code 1 before it listened"):
        process.start()
    assert not process.data.exists()
    log = process.log()
    assert "ConfigError" in log
    assert option in log


# Raw sockets -----------------------------------------------------------------


def test_preamble_then_bad_name_over_raw_socket(server):
    """A client that sends everything at once still gets error 7 for the name."""
    raw = RawClient(server.port)
    try:
        hello = encode_json({"versions": [1, 1], "token": None})
        opening = encode_json({"kind": "queue", "name": "../escape"})
        raw.send(
            PREAMBLE
            + encode_frame(protocol.HELLO, 0, 1, 0, hello)
            + encode_frame(protocol.OPEN, 0, 2, 0, opening)
        )
        assert raw.next_frame()[:3] == (protocol.HELLO, FLAG_REPLY, 1)
        reply = raw.next_frame()
    finally:
        raw.close()
    assert error_of(reply)[0] == 7
    assert not (server.data / "escape").exists()
    assert not (server.data.parent / "escape").exists()
