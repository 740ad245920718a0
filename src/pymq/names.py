"""The naming rule for streams, queues and groups."""

from __future__ import annotations

import re
from typing import Final

from pymq.errors import InvalidNameError

MAX_NAME_LENGTH: Final = 128

_NAME = re.compile(r"[A-Za-z0-9_:\-][A-Za-z0-9._:\-]*")


def check_name(kind: str, name: object, *, derived: bool = False) -> str:
    """Return name if it is a valid stream, queue or group name.

    A name is 1 to 128 characters of ASCII letters, digits, ".", "_", "-"
    and ":", and does not start with ".". Raises InvalidNameError (also a
    ValueError) otherwise, before any file is touched. A derived name (a
    dead-letter queue's, built from its source's) may be longer.
    """
    if not isinstance(name, str):
        raise TypeError(f"{kind} name must be a str, not {type(name).__name__}")
    if not 1 <= len(name) <= (MAX_NAME_LENGTH * 2 + 8 if derived else MAX_NAME_LENGTH):
        raise InvalidNameError(
            f"{kind} name {name!r} is {len(name)} characters; it must be 1 "
            f"to {MAX_NAME_LENGTH}"
        )
    if not _NAME.fullmatch(name):
        raise InvalidNameError(
            f"invalid {kind} name {name!r}: use ASCII letters, digits, '.', "
            f"'_', '-' and ':', and do not start with '.'"
        )
    return name
