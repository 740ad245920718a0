"""TLS between the server and both clients, with certificates made here.

The tests make their own authority and certificates with the openssl
command (skipped without it), start `python -m pymq serve --tls-cert ...`
on 127.0.0.1 and connect with pymqs:// URLs.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
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
from tests.server.helpers import ServerProcess
from tests.server_loop import loop_options

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl command is not installed"
)

START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


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
    return Certificates(
        ca=ca[0],
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        other_ca=other[0],
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
