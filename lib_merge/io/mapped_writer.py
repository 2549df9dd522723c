"""A safetensors writer whose tensors are computed straight into the output file's pages.

Used where the inputs and the output fit in memory together but the OS or the filesystem has no
O_DIRECT (past that, ``staged_writer.py`` writes through the page cache from its buffers).

The temp file is preallocated at its final size (``fallocate``: the disk space is reserved before
any merging, so a disk that fills up later cannot break the merge) and mapped shared; the engine
writes each merged tensor into its place in the map (``slot``), so no ``write()`` copies the
bytes again. A background thread hashes each tensor once it is in place and asks the kernel to
start writing it back. Commit and cleanup are ``TempFile``'s: nothing half-written is ever
visible under the output's name. Where the file cannot be preallocated (another OS, a filesystem
without ``fallocate``), ``PreallocationUnsupported`` is raised and the streaming writer is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import queue
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import OutputError
from . import writer
from .readers import TensorSpec
from .writer import (
    WRITEBACK_BYTES,
    Release,
    TempFile,
    check_all_added,
    expected_spec,
    libc_function,
    safetensors_header,
    tensor_starts,
)

POPULATE_AHEAD_BYTES = 64 << 20  # how far ahead of the arithmetic new pages are faulted in


class PreallocationUnsupported(Exception):
    """This OS or filesystem cannot reserve the file's blocks: the caller streams instead."""


class MappedSafetensorsWriter:
    """Same calls as ``SafetensorsWriter``, plus ``slot(key)``: the output's own bytes for a key."""

    _DONE = object()

    def __init__(
        self,
        path: Path,
        specs: Sequence[tuple[str, TensorSpec]],
        metadata: dict[str, str] | None,
        *,
        overwrite: bool = False,
    ):
        header = safetensors_header(specs, metadata)
        self._specs = list(specs)
        self._starts, size = tensor_starts(self._specs, len(header))
        self._next = 0
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._file = TempFile(Path(path), overwrite, readable=True)
        try:
            preallocate(self._file, size)
            self._map = _map(self._file.fd, size)
        except BaseException:
            self._file.discard()
            raise
        self._map[: len(header)] = header
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))  # to spot tensors already in place
        self._pending: queue.Queue = queue.Queue()
        self._pending.put((0, len(header)))
        self._ahead: queue.Queue = queue.Queue()
        self._populated = len(header)  # pages up to here are asked for already
        self._threads = (
            threading.Thread(target=self._hash_and_flush, daemon=True),
            threading.Thread(target=self._populate, daemon=True),
        )
        for thread in self._threads:
            thread.start()

    def slot(self, key: str) -> torch.Tensor | None:
        """The next tensor's place in the file, to compute into (None if misaligned for its dtype)."""
        expected_key, spec = self._specs[self._next]
        start = self._starts[self._next]
        self._populate_until(start + spec.nbytes + POPULATE_AHEAD_BYTES)
        if key != expected_key or spec.numel == 0 or start % spec.dtype.itemsize:
            return None
        return torch.frombuffer(self._map, dtype=spec.dtype, count=spec.numel, offset=start).view(spec.shape)

    def add(self, key: str, tensor: torch.Tensor, release: Release | None = None) -> None:
        """Take the next tensor: already in place when it came from ``slot``, else copied there."""
        try:
            self._raise_if_failed()
            spec = expected_spec(self._specs, self._next, key, tensor)
            start = self._starts[self._next]
            if spec.nbytes and not self._is_in_place(tensor, start):
                place = torch.frombuffer(self._map, dtype=torch.uint8, count=spec.nbytes, offset=start)
                place.copy_(tensor.contiguous().reshape(-1).view(torch.uint8))
            self._next += 1
            self._pending.put((start, start + spec.nbytes))
        finally:
            if release is not None:
                release()

    def finish(self) -> str:
        check_all_added(self._specs, self._next)
        self._join()
        self._raise_if_failed()
        digest = self._file.commit()
        self._unmap()
        return digest

    def abort(self) -> None:
        self._stop.set()
        self._join()
        self._file.discard()
        self._unmap()

    def _is_in_place(self, tensor: torch.Tensor, start: int) -> bool:
        return tensor.data_ptr() == self._address + start

    def _unmap(self) -> None:
        # A tensor still viewing the map keeps it open; it is unmapped when that tensor is gone.
        with contextlib.suppress(BufferError):
            self._map.close()

    def _join(self) -> None:
        self._pending.put(self._DONE)
        self._ahead.put(self._DONE)
        for thread in self._threads:
            thread.join()

    def _populate_until(self, end: int) -> None:
        end = min(end, len(self._map))
        if end > self._populated:
            self._ahead.put((self._populated, end))
            self._populated = end

    def _populate(self) -> None:
        """Fault the next tensors' pages in ahead of the arithmetic, on this thread: making a new
        page of the file costs as much as computing its values."""
        if _MADVISE is None:
            return
        while (item := self._ahead.get()) is not self._DONE:
            if self._stop.is_set():
                continue
            start, end = item
            first = start // mmap.PAGESIZE * mmap.PAGESIZE
            if _MADVISE(self._address + first, end - first, MADV_POPULATE_WRITE) != 0:
                return  # an older kernel: the arithmetic faults the pages in itself

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _hash_and_flush(self) -> None:
        flushed = 0
        view = memoryview(self._map)
        try:
            while (item := self._pending.get()) is not self._DONE:
                if self._error is not None or self._stop.is_set():
                    continue
                start, end = item
                self._file.sha256.update(view[start:end])
                if end - flushed >= WRITEBACK_BYTES:
                    writer.start_writeback(self._file.fd, flushed, end - flushed)
                    flushed = end
        except BaseException as err:  # handed to the merging thread, which raises it
            self._error = err
        finally:
            view.release()


# fallocate(2), never glibc's posix_fallocate, which writes zeros where the filesystem cannot preallocate.
_FALLOCATE = libc_function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
# madvise(2) through ctypes: mmap.madvise would hold the interpreter while the pages are made.
_MADVISE = libc_function("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
MADV_POPULATE_WRITE = 23  # Linux 5.14 and later


def preallocate(file: TempFile, size: int) -> None:
    if _FALLOCATE is None:
        raise PreallocationUnsupported("fallocate is not available here")
    if _FALLOCATE(file.fd, 0, 0, size) != 0:
        code = ctypes.get_errno()
        if code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise PreallocationUnsupported(os.strerror(code))
        if code in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(
                f"{file.path.parent}: disk full, {size:,} bytes for {file.path.name} could not be reserved "
                f"({os.strerror(code)}); nothing was saved"
            )
        raise OutputError(f"{file.path}: cannot reserve its space ({os.strerror(code)}); nothing was saved")


def _map(fd: int, size: int) -> mmap.mmap:
    try:
        return mmap.mmap(fd, size)
    except OSError as err:  # e.g. no address space left for it: stream instead
        raise PreallocationUnsupported(f"cannot map the output ({err.strerror})") from None
