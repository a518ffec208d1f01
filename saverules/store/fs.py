"""Every call the store makes that changes the disk, in one object (so tests can inject failures)."""
from __future__ import annotations

import os
import shutil


class FileSystem:
    """Every call the store makes that changes the disk."""

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def open_write(self, path: str):
        return open(path, "xb", buffering=1 << 20)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fsync_file(self, path: str) -> None:
        """Flush a file that someone else wrote (a trainer's checkpoint) to the device."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path)


#: The one instance every module of the store goes through.
fs = FileSystem()
