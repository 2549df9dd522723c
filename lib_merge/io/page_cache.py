"""Whether the page cache holds a file's bytes, as ``mincore(2)`` tells of a mapping of them.

Nothing is read, so asking changes nothing. Reads that may not wait (``RWF_NOWAIT``) were tried
first: a refused one still brings its page in, and where the disk answers fast (a VM's disk the
host caches) the read succeeds within the call, so a file just evicted read as held.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from functools import cache
from pathlib import Path


def in_page_cache(path: Path, start: int, stop: int) -> bool:
    """Whether the page cache holds at least half the pages of bytes ``[start, stop)`` of the file.
    True where this OS cannot tell (no ``mincore``: Windows): the caller keeps to the page cache."""
    libc = _libc()
    if libc is None or stop <= start:
        return True
    offset = start // mmap.PAGESIZE * mmap.PAGESIZE  # a mapping starts on a page
    length = stop - offset
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    finally:
        os.close(fd)
    if address in (None, ctypes.c_void_p(-1).value):
        return True
    try:
        pages = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vector = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(address), length, vector):
            return True
        held = pages - bytes(vector).count(0)  # a page's lowest bit: held
    finally:
        libc.munmap(ctypes.c_void_p(address), length)
    return held * 2 >= pages


@cache
def _libc():
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None
