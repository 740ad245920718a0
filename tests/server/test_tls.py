"""TLS between the server and both clients, with certificates made here.

The tests make their own authority and certificates with the openssl
command (skipped without it), start `python -m pymq serve --tls-cert ...`
on 127.0.0.1 and connect with pymqs:// URLs, or with raw sockets for the
handshakes that fail.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import pymq
import pymq.aio
from pymq.errors import ConfigError, ConnectionLostError, PymqError
from pymq.protocol import PREAMBLE
from tests.server.helpers import ServerProcess
from tests.server_loop import loop_options

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl command is not installed"
)

START_TIMEOUT = 30.0
# Bound on the wait for a line in the server's log, or for it to close a socket.
LOG_TIMEOUT = 10.0


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    # A client certificate signed by other_ca, not by ca.
    other_client_cert: Path
    other_client_key: Path


def openssl(*args: str | Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)], check=True, capture_output=True, timeout=60
    )


def make_authority(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        key,
        "-out",
        cert,
    )
    return cert, key


def sign(folder: Path, name: str, ca: tuple[Path, Path], extension: str) -> None:
    key, request = folder / f"{name}.key", folder / f"{name}.csr"
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        key,
        "-out",
        request,
    )
    (folder / f"{name}.ext").write_text(extension)
    openssl(
        "x509",
        "-req",
        "-in",
        request,
        "-CA",
        ca[0],
        "-CAkey",
        ca[1],
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        folder / f"{name}.pem",
        "-extfile",
        folder / f"{name}.ext",
    )


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    folder = tmp_path_factory.mktemp("certificates")
    ca = make_authority(folder, "ca")
    other = make_authority(folder, "other-ca")
    sign(folder, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    sign(folder, "client", ca, "extendedKeyUsage=clientAuth\n")
    sign(folder, "other-client", other, "extendedKeyUsage=clientAuth\n")
    return Certificates(
        ca=ca[0],
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        other_ca=other[0],
        other_client_cert=folder / "other-client.pem",
        other_client_key=folder / "other-client.key",
    )


@dataclass
class TlsServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def start(folder: Path, certificates: Certificates, *extra: str) -> TlsServer:
    port_file, log = folder / "port", folder / "server.log"
    command = [
        sys.executable,
        "-m",
        "pymq",
        "serve",
        "--data",
        str(folder / "data"),
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--tls-cert",
        str(certificates.server_cert),
        "--tls-key",
        str(certificates.server_key),
        *loop_options(),
        *extra,
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(command, stderr=output)
    deadline = time.monotonic() + START_TIMEOUT
    while not port_file.exists():
        if process.poll() is not None:
            pytest.fail(f"the server exited: {log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the server wrote no port file in time")
        time.sleep(0.05)
    return TlsServer(f"pymqs://127.0.0.1:{port_file.read_text().strip()}", process, log)


def stop(server: TlsServer) -> int:
    server.process.send_signal(signal.SIGTERM)
    return server.process.wait(timeout=START_TIMEOUT)


@pytest.fixture
def tls_server(tmp_path: Path, certificates: Certificates) -> Iterator[TlsServer]:
    server = start(tmp_path, certificates)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            stop(server)


@pytest.fixture
def mutual_server(tmp_path: Path, certificates: Certificates) -> Iterator[TlsServer]:
    server = start(tmp_path, certificates, "--tls-client-ca", str(certificates.ca))
    try:
        yield server
    finally:
        if server.process.poll() is None:
            stop(server)


def test_tls_put_get_ack(tls_server: TlsServer, certificates: Certificates) -> None:
    with pymq.connect(tls_server.url, ca_file=str(certificates.ca)) as broker:
        queue = broker.queue("jobs")
        assert queue.put_many([b"a", b"b"]) == range(0, 2)
        assert queue.put(b"c", headers={"kind": "tls"}) == 2
        messages = queue.get_many(10, timeout=5.0)
        assert [message.body for message in messages] == [b"a", b"b", b"c"]
        assert messages[2].headers == {"kind": "tls"}
        queue.ack_many(messages)
        assert queue.stats().acked == 3
    assert "(TLS)" in tls_server.log.read_text()
    assert stop(tls_server) == 0


def test_tls_threads_share_connection(
    tls_server: TlsServer, certificates: Certificates
) -> None:
    received: list[bytes] = []
    lock = threading.Lock()
    with pymq.connect(tls_server.url, ca_file=str(certificates.ca)) as broker:

        def work(thread: int) -> None:
            queue = broker.queue(f"jobs-{thread}")
            for number in range(200):
                queue.put(f"{thread}-{number}".encode())
                message = queue.get(timeout=10.0)
                assert message is not None
                message.ack()
                with lock:
                    received.append(message.body)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    expected = {f"{t}-{n}".encode() for t in range(4) for n in range(200)}
    assert len(received) == 800
    assert set(received) == expected


def test_tls_connection_does_not_poll(
    tls_server: TlsServer, certificates: Certificates
) -> None:
    # A poll of the descriptor would take TLS records from under the session.
    with pymq.connect(
        tls_server.url, ca_file=str(certificates.ca), busy_poll=0.001
    ) as broker:
        reader = broker._connection._reader
        assert reader is not None
        assert reader.poll_window == 0.0
        queue = broker.queue("polled")
        assert queue.put(b"over tls") == 0
        message = queue.get(timeout=5.0)
        assert message is not None
        assert message.body == b"over tls"
        message.ack()


def test_tls_asyncio_client(tls_server: TlsServer, certificates: Certificates) -> None:
    async def main() -> list[bytes]:
        broker = await pymq.aio.connect(tls_server.url, ca_file=str(certificates.ca))
        async with broker:
            queue = await broker.queue("async-jobs")
            await queue.put_many([b"x", b"y"])
            messages = await queue.get_many(10, timeout=5.0)
            await queue.ack_many(messages)
            return [message.body for message in messages]

    assert asyncio.run(main()) == [b"x", b"y"]


def test_tls_unknown_authority_rejected(
    tls_server: TlsServer, certificates: Certificates
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        pymq.connect(tls_server.url, ca_file=str(certificates.other_ca))
    with pymq.connect(tls_server.url, ca_file=str(certificates.ca)) as broker:
        assert broker.queue("after").put(b"still served") == 0


def test_plain_client_to_tls_server_fails(
    tls_server: TlsServer, certificates: Certificates
) -> None:
    plain = tls_server.url.replace("pymqs://", "pymq://")
    expected = (
        f"{plain} closed the connection during the handshake; a TLS server does "
        f"this to a plain client, so if it serves TLS, use pymqs://"
    )
    with pytest.raises(ConnectionLostError) as raised:
        pymq.connect(plain, connect_timeout=5.0, reconnect_attempts=0)
    assert str(raised.value) == expected

    async def connect_plain() -> None:
        await pymq.aio.connect(plain, connect_timeout=5.0, reconnect_attempts=0)

    with pytest.raises(ConnectionLostError) as raised:
        asyncio.run(connect_plain())
    assert str(raised.value) == expected
    with pymq.connect(tls_server.url, ca_file=str(certificates.ca)) as broker:
        assert broker.queue("after").put(b"still served") == 0


def test_tls_client_to_plain_server_fails(
    tmp_path: Path, certificates: Certificates
) -> None:
    server = ServerProcess(tmp_path / "plain").start()
    try:
        url = f"pymqs://127.0.0.1:{server.port}"
        prefix = f"the TLS handshake with {url} failed: [SSL: WRONG_VERSION_NUMBER] "
        advice = "; the server does not speak TLS there, so use pymq:// for it"
        with pytest.raises(ConnectionLostError) as raised:
            pymq.connect(url, ca_file=str(certificates.ca), reconnect_attempts=0)
        assert str(raised.value).startswith(prefix)
        assert str(raised.value).endswith(advice)

        async def connect_tls() -> None:
            await pymq.aio.connect(
                url, ca_file=str(certificates.ca), reconnect_attempts=0
            )

        with pytest.raises(ConnectionLostError) as raised:
            asyncio.run(connect_tls())
        assert str(raised.value).startswith(prefix)
        assert str(raised.value).endswith(advice)
    finally:
        assert server.stop() == 0, server.log()


def test_client_certificate_required(
    mutual_server: TlsServer, certificates: Certificates
) -> None:
    with pytest.raises((ssl.SSLError, PymqError, OSError)):
        broker = pymq.connect(mutual_server.url, ca_file=str(certificates.ca))
        # TLS 1.3 reports a missing client certificate after the handshake.
        broker.queue("jobs").put(b"no certificate")
    with pymq.connect(
        mutual_server.url,
        ca_file=str(certificates.ca),
        cert_file=str(certificates.client_cert),
        key_file=str(certificates.client_key),
    ) as broker:
        assert broker.queue("jobs").put(b"with certificate") == 0


def test_client_certificate_missing_message(
    mutual_server: TlsServer, certificates: Certificates
) -> None:
    with pytest.raises((ssl.SSLError, PymqError)) as raised:
        broker = pymq.connect(
            mutual_server.url, ca_file=str(certificates.ca), reconnect_attempts=0
        )
        broker.queue("jobs").put(b"no certificate")
    # TLS 1.3 reports the missing certificate after the handshake: as an
    # alert, or by closing the connection.
    assert "certificate" in str(raised.value).lower()


def test_tls_authority_file_missing_or_empty(
    tmp_path: Path, certificates: Certificates
) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError) as raised:
        pymq.connect("pymqs://127.0.0.1:1", ca_file=str(missing))
    assert str(raised.value) == (
        f"cannot load the TLS authority file {missing}: [Errno {errno.ENOENT}] "
        f"{os.strerror(errno.ENOENT)}"
    )
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(ConfigError) as raised:
        pymq.connect("pymqs://127.0.0.1:1", ca_file=str(empty))
    assert str(raised.value).startswith(
        f"cannot load the TLS authority file {empty}: [X509: "
        f"NO_CERTIFICATE_OR_CRL_FOUND]"
    )
    with pytest.raises(ConfigError) as raised:
        pymq.connect(
            "pymqs://127.0.0.1:1", ca_file=str(certificates.ca), cert_file=str(missing)
        )
    assert str(raised.value) == (
        f"cannot load the TLS client certificate {missing} (key in the same "
        f"file): [Errno {errno.ENOENT}] {os.strerror(errno.ENOENT)}"
    )


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "PYMQ_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "pymq", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_cli_tls_authority_file_errors_exit_2(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pem"
    result = run_cli("stats", "--url", tls_server.url, "--tls-ca", str(missing))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"pymq: cannot load the TLS authority file {missing}: [Errno "
        f"{errno.ENOENT}] {os.strerror(errno.ENOENT)}\n"
    )
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    result = run_cli("stats", "--url", tls_server.url, "--tls-ca", str(empty))
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"pymq: cannot load the TLS authority file {empty}: [X509: "
        f"NO_CERTIFICATE_OR_CRL_FOUND]"
    )


def test_cli_tls_failures_say_tls(
    tls_server: TlsServer, certificates: Certificates, tmp_path: Path
) -> None:
    plain = tls_server.url.replace("pymqs://", "pymq://")
    result = run_cli("stats", "--url", plain)
    assert result.returncode == 3
    assert result.stderr == (
        f"pymq: could not connect to {plain}: ConnectionLostError: {plain} closed "
        f"the connection during the handshake; a TLS server does this to a plain "
        f"client, so if it serves TLS, use pymqs://\n"
    )

    server = ServerProcess(tmp_path / "plain").start()
    try:
        url = f"pymqs://127.0.0.1:{server.port}"
        result = run_cli("stats", "--url", url, "--tls-ca", str(certificates.ca))
    finally:
        assert server.stop() == 0, server.log()
    assert result.returncode == 3
    assert result.stderr.startswith(
        f"pymq: could not connect to {url}: ConnectionLostError: the TLS "
        f"handshake with {url} failed: [SSL: WRONG_VERSION_NUMBER] "
    )
    assert result.stderr.endswith(
        "; the server does not speak TLS there, so use pymq:// for it\n"
    )


def test_cli_missing_client_certificate_says_certificate(
    mutual_server: TlsServer, certificates: Certificates
) -> None:
    result = run_cli(
        "stats", "--url", mutual_server.url, "--tls-ca", str(certificates.ca)
    )
    assert result.returncode == 3
    assert result.stderr.startswith(f"pymq: could not connect to {mutual_server.url}: ")
    assert "certificate" in result.stderr


def test_tls_options_need_pymqs_url(certificates: Certificates) -> None:
    with pytest.raises(ConfigError, match="pymqs://"):
        pymq.connect("pymq://127.0.0.1:1", ca_file=str(certificates.ca))


def test_cli_over_tls(tls_server: TlsServer, certificates: Certificates) -> None:
    put = subprocess.run(
        [
            sys.executable,
            "-m",
            "pymq",
            "put",
            "jobs",
            "hello",
            "--url",
            tls_server.url,
            "--tls-ca",
            str(certificates.ca),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert put.returncode == 0, put.stderr
    got = subprocess.run(
        [
            sys.executable,
            "-m",
            "pymq",
            "get",
            "jobs",
            "--json",
            "--url",
            tls_server.url,
            "--tls-ca",
            str(certificates.ca),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 0, got.stderr
    assert '"body": "hello"' in got.stdout


def test_cli_unknown_authority_hints_tls_ca(tls_server: TlsServer) -> None:
    result = run_cli("stats", "--url", tls_server.url)
    assert result.returncode == 3
    assert result.stderr.startswith(
        f"pymq: could not connect to {tls_server.url}: SSLCertVerificationError: "
    )
    assert result.stderr.endswith(
        "; if the server's certificate is signed by your own authority, pass it "
        "with --tls-ca\n"
    )


def test_cli_tls_key_without_cert_names_options(
    tls_server: TlsServer, certificates: Certificates
) -> None:
    result = run_cli(
        "stats",
        "--url",
        tls_server.url,
        "--tls-ca",
        str(certificates.ca),
        "--tls-key",
        str(certificates.ca),
    )
    assert result.returncode == 2
    assert result.stderr == (
        "pymq: --tls-key is given without --tls-cert; give --tls-cert too, or "
        "only --tls-cert when its file contains the key\n"
    )


# Failed handshakes in the server's log ---------------------------------------


def wait_for_log(server: TlsServer, text: str) -> str:
    """Return the server's log once it contains text; fail after LOG_TIMEOUT."""
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        log = server.log.read_text(errors="replace")
        if text in log:
            return log
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} is not in the server's log:\n{log}")
        time.sleep(0.05)


def handshake_warning(peer: str, reason: str) -> str:
    return f" WARNING pymq.server: TLS handshake with {peer} failed: {reason}"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def address_of(sock: socket.socket) -> str:
    """Return the client side's address as the server's log writes it."""
    host, port = sock.getsockname()
    return f"{host}:{port}"


def send_plain(url: str, data: bytes) -> str:
    """Send data without TLS and wait until the server closes the connection.

    With no data, the client ends its side of the connection at once.
    Returns the client's address.
    """
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=5.0) as sock:
        peer = address_of(sock)
        sock.settimeout(LOG_TIMEOUT)
        if data:
            sock.sendall(data)
        else:
            sock.shutdown(socket.SHUT_WR)
        # For a failed handshake the server sends at most an alert, then closes.
        while sock.recv(4096):
            pass
    return peer


def connect_tls(
    url: str,
    context: ssl.SSLContext,
    host_name: str = "127.0.0.1",
) -> str:
    """Try a TLS handshake as a client, and return the client's address.

    The handshake may fail on either side, so the error is not checked here.
    """
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=5.0) as sock:
        peer = address_of(sock)
        sock.settimeout(LOG_TIMEOUT)
        try:
            with context.wrap_socket(sock, server_hostname=host_name) as tls:
                # With TLS 1.3 the server checks a client certificate after
                # the client's handshake ends: the read gets its alert.
                tls.sendall(PREAMBLE)
                tls.recv(4096)
        except (ssl.SSLError, OSError):
            pass
    return peer


def test_plain_and_untrusted_handshakes_logged(
    tls_server: TlsServer, certificates: Certificates
) -> None:
    trusting = ssl.create_default_context(cafile=str(certificates.ca))
    untrusting = ssl.create_default_context(cafile=str(certificates.other_ca))
    cases = [
        (
            send_plain(tls_server.url, PREAMBLE + b"\x00" * 32),
            "WRONG_VERSION_NUMBER (the client does not speak TLS, or uses "
            "pymq:// in place of pymqs://)",
        ),
        (
            send_plain(tls_server.url, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"),
            "HTTP_REQUEST (the client sent an HTTP request)",
        ),
        (
            connect_tls(tls_server.url, untrusting),
            "TLSV1_ALERT_UNKNOWN_CA (the client does not trust the authority "
            "that signed the server's certificate)",
        ),
        (
            connect_tls(tls_server.url, trusting, host_name="wrong.localhost"),
            "SSLV3_ALERT_BAD_CERTIFICATE (the client rejected the server's "
            "certificate, for example for a host name it does not cover)",
        ),
        (
            send_plain(tls_server.url, b""),
            "the client closed the connection during the handshake",
        ),
    ]
    for peer, reason in cases:
        log = wait_for_log(tls_server, handshake_warning(peer, reason))
        assert log.count(f"TLS handshake with {peer} failed") == 1, log
    with pymq.connect(tls_server.url, ca_file=str(certificates.ca)) as broker:
        assert broker.queue("after").put(b"still served") == 0
    assert stop(tls_server) == 0
    log = tls_server.log.read_text()
    assert log.count(" WARNING pymq.server: TLS handshake with ") == len(cases), log
    assert "ERROR" not in log, log


def test_handshake_timeout_logged(tmp_path: Path, certificates: Certificates) -> None:
    server = start(tmp_path, certificates, "--handshake-timeout", "0.5")
    try:
        with socket.create_connection(
            ("127.0.0.1", port_of(server.url)), timeout=5.0
        ) as sock:
            peer = address_of(sock)
            sock.settimeout(LOG_TIMEOUT)
            started = time.monotonic()
            assert sock.recv(4096) == b""
            waited = time.monotonic() - started
        assert waited >= 0.4
        wait_for_log(
            server,
            handshake_warning(
                peer, "handshake timed out after 0.5 s (handshake_timeout)"
            ),
        )
        with pymq.connect(server.url, ca_file=str(certificates.ca)) as broker:
            assert broker.queue("after").put(b"still served") == 0
    finally:
        assert stop(server) == 0


def test_client_certificate_failures_logged(
    mutual_server: TlsServer, certificates: Certificates
) -> None:
    without = ssl.create_default_context(cafile=str(certificates.ca))
    other = ssl.create_default_context(cafile=str(certificates.ca))
    other.load_cert_chain(certificates.other_client_cert, certificates.other_client_key)
    peer = connect_tls(mutual_server.url, without)
    wait_for_log(
        mutual_server,
        handshake_warning(
            peer,
            "PEER_DID_NOT_RETURN_A_CERTIFICATE (the client sent no certificate, "
            "and the server requires one (--tls-client-ca))",
        ),
    )
    peer = connect_tls(mutual_server.url, other)
    wait_for_log(
        mutual_server,
        handshake_warning(
            peer,
            "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate "
            "(the client's certificate failed the check against the server's "
            "--tls-client-ca authority)",
        ),
    )
    with pymq.connect(
        mutual_server.url,
        ca_file=str(certificates.ca),
        cert_file=str(certificates.client_cert),
        key_file=str(certificates.client_key),
    ) as broker:
        assert broker.queue("jobs").put(b"with certificate") == 0


def test_handshake_warnings_rate_limited(tls_server: TlsServer) -> None:
    attempts = 40
    peers = [send_plain(tls_server.url, PREAMBLE) for _ in range(attempts)]
    # Stopping logs the count of the failures not yet logged one by one.
    assert stop(tls_server) == 0
    log = tls_server.log.read_text()
    logged = [peer for peer in peers if f"TLS handshake with {peer} failed" in log]
    counts = [
        int(count)
        for count in re.findall(
            r" WARNING pymq\.server: ([0-9]+) more TLS handshakes failed within "
            r"1 s and were not logged one by one \(at most 5 a second are\); "
            r"the last: 127\.0\.0\.1:[0-9]+: WRONG_VERSION_NUMBER ",
            log,
        )
    ]
    assert counts, log
    assert len(logged) < attempts
    assert len(logged) + sum(counts) == attempts, log
    # The first failures of a burst are the ones logged one by one.
    assert logged[:5] == peers[:5]


def closed_by_server(sock: socket.socket) -> bool:
    """Return whether the server closes sock within LOG_TIMEOUT.

    A server that closes a socket with unread bytes in it sends a reset.
    """
    sock.settimeout(LOG_TIMEOUT)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_stop_during_handshakes(tls_server: TlsServer) -> None:
    port = port_of(tls_server.url)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5.0) as silent,
        socket.create_connection(("127.0.0.1", port), timeout=5.0) as partial,
    ):
        # The first bytes of a TLS record, so that the handshake has begun.
        partial.sendall(b"\x16\x03\x01")
        wait_for_log(tls_server, "serving ")
        assert stop(tls_server) == 0
        assert closed_by_server(silent)
        assert closed_by_server(partial)
    log = tls_server.log.read_text()
    # Handshakes that the stop cut short are no failures of the client.
    assert "TLS handshake with" not in log
    assert "ERROR" not in log
    assert "Task was destroyed" not in log


def test_handshakes_count_against_max_connections(
    tmp_path: Path, certificates: Certificates
) -> None:
    # A long handshake_timeout: the third socket must be closed at once.
    server = start(
        tmp_path, certificates, "--max-connections", "2", "--handshake-timeout", "30"
    )
    port = port_of(server.url)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5.0) as first,
            socket.create_connection(("127.0.0.1", port), timeout=5.0) as second,
        ):
            wait_for_log(server, "serving ")
            with socket.create_connection(("127.0.0.1", port), timeout=5.0) as third:
                peer = address_of(third)
                assert closed_by_server(third)
            wait_for_log(
                server,
                handshake_warning(
                    peer,
                    "refused before it began: the server holds max_connections "
                    "(2) connections and handshakes; try again once others "
                    "close, or start it with a higher --max-connections",
                ),
            )
            # The two silent sockets still wait in their handshakes.
            first.settimeout(0.2)
            second.settimeout(0.2)
            with pytest.raises(TimeoutError):
                first.recv(1)
            with pytest.raises(TimeoutError):
                second.recv(1)
        # With both closed, their handshakes end and a client gets in.
        deadline = time.monotonic() + LOG_TIMEOUT
        while True:
            try:
                with pymq.connect(server.url, ca_file=str(certificates.ca)) as broker:
                    assert broker.queue("after").put(b"served") == 0
                break
            except (ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        assert stop(server) == 0


def test_full_tls_server_names_its_limit(
    tmp_path: Path, certificates: Certificates
) -> None:
    # The server closes a socket past max_connections before its handshake.
    # The client sees a FIN or a reset, by timing, and raises one error for
    # both. Ten attempts of each client usually meet both.
    server = start(
        tmp_path, certificates, "--max-connections", "1", "--handshake-timeout", "30"
    )
    expected = (
        f"{server.url} closed the connection during the TLS handshake; a pymq "
        "server does this when it holds max_connections connections and "
        "handshakes, so try again once others close"
    )
    try:
        with socket.create_connection(("127.0.0.1", port_of(server.url)), 5.0):
            wait_for_log(server, "serving ")
            for _ in range(10):
                with pytest.raises(ConnectionLostError) as raised:
                    pymq.connect(server.url, ca_file=str(certificates.ca))
                assert str(raised.value) == expected

            async def connect_async() -> None:
                await pymq.aio.connect(server.url, ca_file=str(certificates.ca))

            for _ in range(10):
                with pytest.raises(ConnectionLostError) as raised:
                    asyncio.run(connect_async())
                assert str(raised.value) == expected
    finally:
        assert stop(server) == 0


def test_tls_port_in_use_exits_2(tmp_path: Path, certificates: Certificates) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "serve",
            "--data",
            str(tmp_path / "data"),
            "--port",
            str(port),
            "--tls-cert",
            str(certificates.server_cert),
            "--tls-key",
            str(certificates.server_key),
            *loop_options(),
        )
    assert result.returncode == 2
    assert (
        f"could not serve {tmp_path / 'data'} on 127.0.0.1:{port}: OSError: "
        f"[Errno {errno.EADDRINUSE}] error while attempting to bind on address "
        f"('127.0.0.1', {port}): address already in use\n"
    ) in result.stderr
    assert not (tmp_path / "data").exists()
