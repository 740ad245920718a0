"""The naming rule for streams, queues and groups."""

from __future__ import annotations

import re
from typing import Final

from pymq.errors import InvalidNameError

MAX_NAME_LENGTH: Final = 128
# Each name is the name of a folder, which Linux file systems (ext4, XFS,
# Btrfs, tmpfs) limit to 255 bytes. Names are ASCII, so that is 255
# characters. A group's dead-letter queue, <stream>.<group>.dlq, can need
# more, and then the group cannot be opened.
MAX_DERIVED_NAME_LENGTH: Final = 255
# Error messages show at most this many characters of a name.
_SHOWN_CHARACTERS: Final = 140

_NAME = re.compile(r"[A-Za-z0-9_:\-][A-Za-z0-9._:\-]*")


def check_name(kind: str, name: object, *, derived: bool = False) -> str:
    """Return name if it is a valid stream, queue or group name.

    A name is 1 to 128 characters of ASCII letters, digits, ".", "_", "-"
    and ":", and does not start with ".". Raises InvalidNameError (also a
    ValueError) otherwise, before any file is touched. A derived name (a
    dead-letter queue's, built from its source's) may be up to 255
    characters long.
    """
    if not isinstance(name, str):
        raise TypeError(f"{kind} name must be a str, not {type(name).__name__}")
    longest = MAX_DERIVED_NAME_LENGTH if derived else MAX_NAME_LENGTH
    if not 1 <= len(name) <= longest:
        raise InvalidNameError(
            f"{kind} name {_shown(name)} is {len(name)} characters; it must be 1 "
            f"to {longest}"
        )
    if not _NAME.fullmatch(name):
        raise InvalidNameError(
            f"invalid {kind} name {_shown(name)}: use ASCII letters, digits, '.', "
            f"'_', '-' and ':', and do not start with '.'"
        )
    return name


def check_queue_name(name: object) -> str:
    """Return name if it is a valid queue name, a DLQ's included.

    A name that ends in ".dlq" may be a derived one, up to 255 characters,
    so that every dead-letter queue can be opened by its name.
    """
    derived = isinstance(name, str) and name.endswith(".dlq")
    return check_name("queue", name, derived=derived)


def _shown(name: str) -> str:
    """Return name's repr, cut short so that an error stays small."""
    if len(name) <= _SHOWN_CHARACTERS:
        return repr(name)
    return f"{name[:_SHOWN_CHARACTERS]!r}..."
