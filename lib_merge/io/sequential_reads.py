"""A whole file's bytes in order, block by block: what hashing a checkpoint reads.

A file the page cache does not hold (a model new to the host) is read past it (``O_DIRECT``) by a
thread a block ahead, into two reused buffers. Through the page cache, every page of the model
would be made and filled on the way, and the merge after the hash would then find the file there
and read it through the cache too (``engine.run``). A cold SDXL LoRA bake from the command line,
its input's hash to make, took 28.3-30.5 s (7 system CPU-seconds) this way against 41.5-43.0 s
(18-20) through the page cache. Elsewhere the file is read plainly."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import InputError
from .direct_reads import ALIGN, open_direct
from .page_cache import in_page_cache

BLOCK = 2048 * ALIGN  # 8 MiB, in whole pages as O_DIRECT reads them


def file_blocks(path: Path) -> Iterator[memoryview]:
    """``path``'s bytes in order. Each block is valid until the next is asked for."""
    fd = None if in_page_cache(path, 0, path.stat().st_size) else open_direct(path)
    if fd is None:
        with open(path, "rb") as file:
            while block := file.read(BLOCK):
                yield memoryview(block)
        return
    buffers = [mmap.mmap(-1, BLOCK), mmap.mmap(-1, BLOCK)]  # page-aligned, as O_DIRECT needs

    def read(turn: int, offset: int) -> int:
        try:
            return os.preadv(fd, [buffers[turn]], offset)
        except OSError as err:
            raise InputError(f"{path}: cannot be read ({err.strerror})") from None

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="merge-lab-sequential-read") as reader:
            offset, turn = 0, 0
            pending = reader.submit(read, turn, offset)
            while length := pending.result():
                offset += length
                # Only the last read is short (O_DIRECT lengths are whole pages): no read after it.
                pending = reader.submit(read, 1 - turn, offset) if length == BLOCK else None
                block = memoryview(buffers[turn])[:length]
                try:
                    yield block
                finally:
                    block.release()
                if pending is None:
                    break
                turn = 1 - turn
    finally:
        os.close(fd)
        for buffer in buffers:
            buffer.close()
