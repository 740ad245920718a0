"""A small tmpfs to fill, for the disk-full tests.

Mounting needs root: without it, or without a working mount command, the
test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of size (as mount's size= takes it) at mount_point."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs"]
    try:
        result = subprocess.run(
            [*command, str(mount_point)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        pytest.skip("the mount command is not installed")
    if result.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def free_bytes(directory: Path) -> int:
    """Return the bytes an unprivileged writer may still allocate."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def fill_until_free(directory: Path, free: int, name: str = "filler") -> Path:
    """Create a filler file that leaves about free bytes free, return its path."""
    filler = directory / name
    fd = os.open(filler, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.posix_fallocate(fd, 0, free_bytes(directory) - free)
    finally:
        os.close(fd)
    return filler


class Fillers:
    """Filler files that keep a filesystem full, and free it at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files: list[Path] = []

    def take_all(self) -> None:
        """Allocate every free byte, in a new filler file."""
        free = free_bytes(self.directory)
        if free == 0:
            return
        path = self.directory / f"filler{len(self.files)}"
        self.files.append(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.posix_fallocate(fd, 0, free)
        finally:
            os.close(fd)

    def free(self) -> None:
        """Delete every filler file."""
        for path in self.files:
            path.unlink()
        self.files.clear()
