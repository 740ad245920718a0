"""CRC32C: the standard check value, both code paths, an independent library."""

from __future__ import annotations

import random

import pytest

from pymq import _core


def test_crc32c_check_value() -> None:
    assert _core.crc32c(b"123456789") == 0xE3069283


def test_crc32c_portable_check_value() -> None:
    assert _core.crc32c_portable(b"123456789") == 0xE3069283


def test_crc32c_empty_is_zero() -> None:
    assert _core.crc32c(b"") == 0


def test_crc32c_implementation_named() -> None:
    assert _core.CRC32C_IMPLEMENTATION in {"sse4.2", "armv8", "table"}


@pytest.mark.parametrize("shift", range(8))
def test_crc32c_paths_agree_on_every_alignment(shift: int) -> None:
    data = random.Random(shift).randbytes(600)
    for length in range(0, 600 - shift, 7):
        chunk = data[shift : shift + length]
        assert _core.crc32c(chunk) == _core.crc32c_portable(chunk), length


def test_crc32c_continues_across_chunks() -> None:
    data = random.Random(1).randbytes(10_000)
    whole = _core.crc32c(data)
    assert _core.crc32c(data[3000:], _core.crc32c(data[:3000])) == whole


def test_crc32c_matches_google_crc32c() -> None:
    google_crc32c = pytest.importorskip(
        "google_crc32c", reason="google-crc32c is not installed"
    )
    rng = random.Random(2)
    for length in (0, 1, 7, 8, 9, 63, 64, 65, 4096, 100_003):
        data = rng.randbytes(length)
        assert _core.crc32c(data) == google_crc32c.value(data), length


def test_crc32c_accepts_memoryview() -> None:
    data = bytearray(b"123456789")
    assert _core.crc32c(memoryview(data)) == 0xE3069283


# From 3 x 128 and 3 x 2048 bytes on, the hardware path runs three lanes side
# by side and joins them. These lengths sit on and around each step.
LANE_LENGTHS = [383, 384, 385, 767, 768, 769, 6143, 6144, 6145, 12288, 12289]


@pytest.mark.parametrize("length", LANE_LENGTHS)
def test_crc32c_lanes_match_portable(length: int) -> None:
    rng = random.Random(length)
    for shift in (0, 1, 5):
        data = rng.randbytes(length + shift)[shift:]
        assert _core.crc32c(data) == _core.crc32c_portable(data)


def test_crc32c_lanes_random_lengths() -> None:
    rng = random.Random(3)
    data = rng.randbytes(70_000)
    for _ in range(300):
        start = rng.randrange(64)
        length = rng.randrange(len(data) - start)
        chunk = data[start : start + length]
        assert _core.crc32c(chunk) == _core.crc32c_portable(chunk), (start, length)


def test_crc32c_lanes_continue_crc() -> None:
    data = random.Random(4).randbytes(20_000)
    head = _core.crc32c(data[:777])
    assert _core.crc32c(data[777:], head) == _core.crc32c_portable(data)
