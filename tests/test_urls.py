"""Server URLs: the forms pymq accepts, and clear errors for the rest."""

from __future__ import annotations

import pytest

import pymq
from pymq import ConfigError
from pymq.protocol import DEFAULT_PORT, MAX_UNIX_PATH_BYTES, parse_url


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("pymq://127.0.0.1:7421", "127.0.0.1", 7421),
        ("pymq://127.0.0.1:7421/", "127.0.0.1", 7421),
        ("pymq://localhost", "localhost", DEFAULT_PORT),
        ("pymqs://[::1]:7422", "::1", 7422),
    ],
)
def test_url_host_and_port(url: str, host: str, port: int) -> None:
    address = parse_url(url)
    assert address.host == host
    assert address.port == port


def test_url_unix_socket_path() -> None:
    assert parse_url("pymq+unix:///run/pymq.sock").path == "/run/pymq.sock"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("pymq://127.0.0.1:notaport", "has port 'notaport'; it must be a number"),
        ("pymq://127.0.0.1:70000", "has port 70000; it must be from 0 to 65535"),
        ("pymq://127.0.0.1:7420/jobs", "has a path, which pymq does not use"),
        ("pymq://127.0.0.1:7420?tls=1", "has a query, which pymq does not use"),
        ("pymq://127.0.0.1:7420#x", "has a fragment, which pymq does not use"),
        ("pymq+unix://host/run/s", "has a host, which pymq does not use"),
        ("pymq+unix://", "names no socket path"),
        ("http://127.0.0.1:7420", "has scheme 'http'"),
        ("pymq://:7420", "names no host"),
    ],
)
def test_url_errors_name_the_part(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_url(url)
    assert expected in str(raised.value)


def test_url_error_hides_password() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_url("pymq://admin:hunter2@127.0.0.1:7420")
    text = str(raised.value)
    assert "has a user" in text
    assert "hunter2" not in text
    assert "***@127.0.0.1:7420" in text


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("pymq://[::1", "Invalid IPv6 URL"),
        ("pymq://[::1:7420", "Invalid IPv6 URL"),
        ("pymqs://[fe80::1", "Invalid IPv6 URL"),
    ],
)
def test_url_unparsable_raises_config_error(url: str, reason: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_url(url)
    assert str(raised.value) == (
        f"URL {url!r} is invalid: {reason}; write pymq://HOST:PORT, "
        f"pymqs://HOST:PORT or pymq+unix:///PATH"
    )


def test_connect_unparsable_url_raises_config_error() -> None:
    with pytest.raises(ConfigError) as raised:
        pymq.connect("pymq://[::1")
    assert str(raised.value).startswith("URL 'pymq://[::1' is invalid: ")


def test_url_unix_path_at_length_limit() -> None:
    path = "/" + "u" * (MAX_UNIX_PATH_BYTES - 1)
    assert parse_url(f"pymq+unix://{path}").path == path


@pytest.mark.parametrize(
    ("path", "size"),
    [
        ("/" + "u" * MAX_UNIX_PATH_BYTES, 108),
        # Two bytes per character in UTF-8: 1 + 2 * 60 bytes.
        ("/" + "é" * 60, 121),
    ],
)
def test_url_unix_path_too_long(path: str, size: int) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_url(f"pymq+unix://{path}")
    assert str(raised.value) == (
        f"Unix socket path {path} is {size} bytes; the limit is 107 bytes on "
        f"Linux, so choose a shorter path"
    )
