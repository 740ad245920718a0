"""Server URLs: the forms pymq accepts, and clear errors for the rest."""

from __future__ import annotations

import pytest

from pymq import ConfigError
from pymq.protocol import DEFAULT_PORT, parse_url


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
