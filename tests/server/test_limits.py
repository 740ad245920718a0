"""Server limits and login: timeouts, max_connections, tokens, frame size."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

import pytest

import pymq
from pymq import AuthenticationError, ConfigError, ServerError, protocol
from pymq._core import encode_frame
from pymq.protocol import FLAG_MORE, FLAG_REPLY, PREAMBLE, encode_json
from pymq.server import ServerLimits
from tests.server.helpers import RawClient, error_of, server_in_thread

TOKEN = "s3cret-token-7f1c9a"
WRONG_TOKEN = "wrong-token-2b8e4d"


def assert_round_trip(client: pymq.RemoteBroker, name: str) -> None:
    q = client.queue(name)
    offset = q.put(b"ping")
    message = q.get(timeout=10.0)
    assert (message.offset, message.body) == (offset, b"ping")
    message.ack()


# Timeouts -----------------------------------------------------------------------


@pytest.fixture
def impatient(servers):
    """A server that drops stalled frames and handshakes after 0.5 s."""
    return servers(limits={"frame_timeout": 0.5, "handshake_timeout": 0.5}).start()


def test_stalled_frame_times_out(impatient):
    raw = RawClient(impatient.port)
    try:
        raw.handshake()
        frame = encode_frame(protocol.PING, 0, 3, 0, b"")
        raw.send(frame[:8])
        frames = raw.read_until_closed()
    finally:
        raw.close()
    assert len(frames) == 1
    code, text = error_of(frames[0])
    assert code == 1
    assert "frame_timeout (0.5 s)" in text
    with pymq.connect(impatient.url) as client:
        assert_round_trip(client, "after-stall")


def test_missing_hello_times_out(impatient):
    raw = RawClient(impatient.port)
    try:
        raw.send(PREAMBLE)
        frames = raw.read_until_closed()
    finally:
        raw.close()
    assert len(frames) == 1
    assert frames[0][0] == protocol.HELLO
    code, text = error_of(frames[0])
    assert code == 1
    assert "handshake_timeout (0.5 s)" in text


def test_silent_connection_times_out(impatient):
    raw = RawClient(impatient.port)
    try:
        frames = raw.read_until_closed()
    finally:
        raw.close()
    assert len(frames) == 1
    assert error_of(frames[0])[0] == 1


def test_idle_client_stays_connected(impatient):
    with pymq.connect(impatient.url) as client:
        assert_round_trip(client, "idle")
        # Twice both timeouts pass with no frame; idle_timeout is 0 (never).
        time.sleep(1.0)
        assert_round_trip(client, "idle")


# max_connections ------------------------------------------------------------------


def test_max_connections_refuses_third(servers):
    server = servers(limits={"max_connections": 2}).start()
    first = pymq.connect(server.url)
    second = pymq.connect(server.url)
    try:
        with pytest.raises(ServerError) as refused:
            pymq.connect(server.url, reconnect_attempts=0)
        assert refused.value.code == 16
        assert refused.value.retriable is True
        assert str(refused.value) == (
            "the server holds max_connections (2) connections; try again once "
            "others close, or start it with a higher --max-connections"
        )

        assert_round_trip(first, "first")
        assert_round_trip(second, "second")
    finally:
        first.close()
        second.close()


def test_max_connections_frees_slot_on_close(servers):
    server = servers(limits={"max_connections": 1}).start()
    first = pymq.connect(server.url)
    with pytest.raises(ServerError):
        pymq.connect(server.url, reconnect_attempts=0)
    first.close()

    # The slot is freed once the server handles the close, so retry (bounded).
    deadline = time.monotonic() + 10.0
    while True:
        try:
            later = pymq.connect(server.url, reconnect_attempts=0)
            break
        except ServerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with later:
        assert_round_trip(later, "later")


# Tokens ------------------------------------------------------------------------------


@pytest.fixture
def guarded(servers):
    """A server that requires TOKEN, logging at DEBUG."""
    return servers(token=TOKEN, log_level="DEBUG").start()


def test_connect_without_token_raises(guarded):
    with pytest.raises(AuthenticationError):
        pymq.connect(guarded.url, reconnect_attempts=0)


def test_connect_with_wrong_token_raises(guarded):
    with pytest.raises(AuthenticationError) as refused:
        pymq.connect(guarded.url, token=WRONG_TOKEN, reconnect_attempts=0)
    assert refused.value.code == 5


def test_connect_with_token_from_environment(guarded, monkeypatch):
    monkeypatch.setenv("PYMQ_TOKEN", TOKEN)
    with pymq.connect(guarded.url) as client:
        assert_round_trip(client, "from-environment")


def test_hello_with_token_of_wrong_type(guarded):
    raw = RawClient(guarded.port)
    try:
        hello = encode_json({"versions": [1, 1], "token": 12345})
        raw.send(PREAMBLE + encode_frame(protocol.HELLO, 0, 1, 0, hello))
        frames = raw.read_until_closed()
    finally:
        raw.close()
    assert len(frames) == 1
    assert error_of(frames[0])[0] == 5


def test_token_works_and_is_not_logged(guarded):
    for _ in range(3):
        with pytest.raises(AuthenticationError):
            pymq.connect(guarded.url, token=WRONG_TOKEN, reconnect_attempts=0)
    with pymq.connect(guarded.url, token=TOKEN) as client:
        assert_round_trip(client, "with-token")
    assert guarded.stop() == 0

    log = guarded.log()
    assert "refused a connection from 127.0.0.1" in log
    assert TOKEN not in log
    assert WRONG_TOKEN not in log


@pytest.fixture
def lockout(servers):
    """A server that requires TOKEN and allows 3 failed logins per 2 s."""
    return servers(
        token=TOKEN,
        limits={"max_failed_logins": 3, "login_window": 2.0},
        log_level="DEBUG",
    ).start()


def test_failed_logins_lock_out_host(lockout):
    for _ in range(3):
        with pytest.raises(AuthenticationError) as wrong:
            pymq.connect(lockout.url, token=WRONG_TOKEN, reconnect_attempts=0)
        assert str(wrong.value) == "authentication failed: wrong token"

    # The right token is rejected too while the host is locked out.
    with pytest.raises(AuthenticationError) as locked:
        pymq.connect(lockout.url, token=TOKEN, reconnect_attempts=0)
    assert locked.value.code == 5
    text = str(locked.value)
    assert text.startswith(
        "authentication failed: 127.0.0.1 is locked out after 3 failed logins "
        "within login_window (2 s), the limit is max_failed_logins (3), so the "
        "token was not checked; try again in "
    )

    # Once the oldest failure is 2 s old, the right token works again.
    deadline = time.monotonic() + 15.0
    while True:
        try:
            client = pymq.connect(lockout.url, token=TOKEN, reconnect_attempts=0)
            break
        except AuthenticationError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with client:
        assert_round_trip(client, "after-lockout")
    assert lockout.stop() == 0
    log = lockout.log()
    assert "rejecting logins from 127.0.0.1 for 2 s: 3 failed logins" in log
    assert TOKEN not in log


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_failed_logins", 0),
        ("max_failed_logins", 2.5),
        ("max_failed_logins", True),
        ("login_window", 0),
        ("login_window", float("nan")),
        ("login_window", "60"),
    ],
)
def test_login_limits_reject_bad_values(field, value):
    with pytest.raises(ConfigError) as raised:
        ServerLimits(**{field: value})
    assert field in str(raised.value)


# Replies larger than one frame ----------------------------------------------------


def test_deliveries_split_across_frames(tmp_path):
    bodies = [bytes([index]) * 10_240 for index in range(50)]
    limits = ServerLimits(max_frame_bytes=64 << 10)
    with (
        pymq.open(tmp_path / "data", max_message_bytes=16 << 10) as broker,
        server_in_thread(broker, limits) as server,
        pymq.connect(f"pymq://127.0.0.1:{server.port}") as client,
    ):
        q = client.queue("large", visibility_timeout=3600)
        # One batch of 50 is over max_frame_bytes: the client splits it.
        assert q.put_many(bodies) == range(50)
        messages = q.get_many(50, timeout=10.0)
        assert [m.offset for m in messages] == list(range(50))
        assert [m.body for m in messages] == bodies
        q.ack_many(messages)
        assert q.stats().acked == 50


def test_deliver_frames_carry_more_flag(tmp_path):
    body = b"x" * 10_240
    limits = ServerLimits(max_frame_bytes=64 << 10)
    with (
        pymq.open(tmp_path / "data", max_message_bytes=16 << 10) as broker,
        server_in_thread(broker, limits) as server,
    ):
        broker.queue("large").put_many([body] * 50)
        raw = RawClient(server.port)
        try:
            raw.handshake()
            handle = raw.open_queue("large")
            raw.send(
                encode_frame(protocol.FETCH, 0, 7, handle, struct.pack("<Ii", 50, 0))
            )
            frames = [raw.next_frame()]
            while frames[-1][1] & FLAG_MORE:
                frames.append(raw.next_frame())
        finally:
            raw.close()

    # 12 header bytes and an 8-byte head per frame, then 36 + 10,240 bytes
    # per delivery: six fit in 64 KiB.
    counts = [struct.unpack_from("<I", frame[4])[0] for frame in frames]
    assert counts == [6, 6, 6, 6, 6, 6, 6, 6, 2]
    assert [frame[1] for frame in frames] == [FLAG_REPLY | FLAG_MORE] * 8 + [FLAG_REPLY]
    assert {frame[2] for frame in frames} == {7}
    assert all(len(frame[4]) + 12 <= 64 << 10 for frame in frames)


def test_lockout_message_of_cli_names_no_token(servers, tmp_path):
    server = servers(
        token=TOKEN, limits={"max_failed_logins": 1, "login_window": 3600.0}
    ).start()
    with pytest.raises(AuthenticationError):
        pymq.connect(server.url, token=WRONG_TOKEN, reconnect_attempts=0)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {key: value for key, value in os.environ.items() if key != "PYMQ_TOKEN"}
    command = [sys.executable, "-m", "pymq", "stats", "--url", server.url]
    command += ["--token-file", str(token_file)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=env,
        timeout=60.0,
    )
    assert result.returncode == 4
    assert result.stderr.startswith(
        f"pymq: {server.url}: authentication failed: 127.0.0.1 is locked out "
        f"after 1 failed logins within login_window (3600 s), the limit is "
        f"max_failed_logins (1), so the token was not checked; try again in "
    )
    assert "check --token-file" not in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_max_handles_error_names_streams(servers, name):
    server = servers(limits={"max_handles": 2}).start()
    with pymq.connect(server.url) as client:
        client.queue(f"{name}-q")
        client.stream(f"{name}-s")
        with pytest.raises(ConfigError) as raised:
            client.queue(f"{name}-r")
    assert str(raised.value) == (
        "this connection holds max_handles (2) open queues, streams and groups, "
        "which the server releases only when the connection closes; reconnect, "
        "or raise --max-handles"
    )


def test_missing_token_says_the_server_needs_one(lockout, monkeypatch):
    monkeypatch.delenv("PYMQ_TOKEN", raising=False)
    with pytest.raises(AuthenticationError) as missing:
        pymq.connect(lockout.url, reconnect_attempts=0)
    assert str(missing.value) == (
        "authentication failed: missing token; this server requires one "
        "(pass token=, or set PYMQ_TOKEN)"
    )
