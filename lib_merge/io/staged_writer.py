"""A safetensors writer that computes into a few reused staging buffers and writes them from threads.

Written through a mapped file, every 4 KiB of output is a new kernel page, zeroed or copied into,
then written back: for an SDXL LoRA bake on 2 cores that was about 11 of its 58 CPU-seconds, on
the cores the arithmetic needs. Here the engine computes each tensor into a staging buffer
(``slot``) when it fits, else hands it over to be copied there; each full buffer is hashed by one
thread and written by another, then comes back to be filled again. Memory holds ``BUFFERS``
buffers of ``BUFFER_BYTES``. The file is preallocated as the mapped writer's is (the disk space is
reserved before merging). Commit and cleanup are ``TempFile``'s: nothing half-written is ever
visible under the output's name.

Two ways to write, chosen by the engine:

- ``past_cache=True`` (the inputs and the output fit in the memory available together,
  ``memory_holds``): ``O_DIRECT``, so no kernel page is made for the output (loading it afterwards
  reads it from the disk). A cold SDXL merge took 19.6 s against 22.8 s mapped, and 15.7
  CPU-seconds against 26.1. Where the OS or the filesystem cannot write ``O_DIRECT`` (macOS,
  Windows, some tmpfs), ``DirectIOUnsupported`` is raised before anything is merged, and the caller
  maps the output instead.
- ``past_cache=False`` (they do not fit: a Flux merge on 24 GB): through the page cache, each
  buffer's writeback started as soon as it is written, and its pages dropped once they are on the
  disk, ``IN_FLIGHT`` buffers later. There the inputs come from the disk while the output is
  written. Kept in the cache, the output's pages filled memory and each new one waited on the
  kernel's reclaim: the writing thread took 55 system CPU-seconds of an 80 s Flux add difference to
  bf16 (23.8 GB written, 2 cores), against 8.5 of 37.6 s dropped. Writing 11 GB while reading 11 GB
  past the page cache took 42 s kept, 23 s ``O_DIRECT`` and 19-21 s dropped (5 system CPU-seconds).
  The merging thread never dirties a page itself, so the kernel's pacing of writers stalls the
  writing thread, not the arithmetic (mapped, it stalled the merge).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import OutputError
from .mapped_writer import preallocate
from .readers import TensorSpec
from .writer import (
    Release,
    TempFile,
    check_all_added,
    expected_spec,
    safetensors_header,
    start_writeback,
    tensor_bytes,
    tensor_starts,
    write_failure,
    write_out_and_drop,
)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

ALIGN = 4096  # O_DIRECT offsets, lengths and memory: a page, a multiple of every disk's sector
BUFFER_BYTES = 32 << 20  # tensors larger than a buffer are computed elsewhere and copied through
BUFFERS = 4  # one filling, the others being hashed and written
IN_FLIGHT = 8  # through the page cache: written buffers whose pages it may hold, at most (256 MB)
O_DIRECT = getattr(os, "O_DIRECT", None)  # Linux, FreeBSD


def memory_holds(nbytes: int) -> bool:
    """Whether ``nbytes`` fit in the memory available now (Linux's MemAvailable; False elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return nbytes <= int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return False


class DirectIOUnsupported(Exception):
    """This OS or filesystem cannot write past the page cache: the caller maps the output instead."""


class StagedSafetensorsWriter:
    """Same calls as ``MappedSafetensorsWriter``: ``slot(key)``, ``add``, ``finish``, ``abort``."""

    _DONE = object()

    def __init__(
        self,
        path: Path,
        specs: Sequence[tuple[str, TensorSpec]],
        metadata: dict[str, str] | None,
        *,
        overwrite: bool = False,
        past_cache: bool = True,
    ):
        header = safetensors_header(specs, metadata)
        self._past_cache = past_cache
        self._specs = list(specs)
        self._starts, size = tensor_starts(self._specs, len(header))
        self._size = size
        self._next = 0
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._buffers = [mmap.mmap(-1, BUFFER_BYTES) for _ in range(BUFFERS)]  # page-aligned, as O_DIRECT needs
        self._addresses = [ctypes.addressof(ctypes.c_char.from_buffer(buffer)) for buffer in self._buffers]
        self._file = TempFile(Path(path), overwrite)
        try:
            preallocate(self._file, self._size)
            if past_cache:
                _write_direct(self._file, self._buffers[0])
        except BaseException:
            self._file.discard()
            raise
        self._free: queue.Queue = queue.Queue()
        for index in range(1, BUFFERS):
            self._free.put(index)
        self._current, self._current_start, self._fill = 0, 0, 0  # the buffer being filled, its file offset
        self._in_flight: deque[tuple[int, int]] = deque()  # (offset, length) written through the page cache
        self._lock = threading.Lock()
        self._queues = (queue.Queue(), queue.Queue())
        self._threads = (
            threading.Thread(target=self._drain, args=(self._queues[0], self._write), daemon=True),
            threading.Thread(target=self._drain, args=(self._queues[1], self._hash), daemon=True),
        )
        for thread in self._threads:
            thread.start()
        self._append(memoryview(header))

    def slot(self, key: str) -> torch.Tensor | None:
        """The next tensor's place in a staging buffer, to compute into (None: computed elsewhere)."""
        expected_key, spec = self._specs[self._next]
        if key != expected_key or spec.numel == 0 or self._starts[self._next] % spec.dtype.itemsize:
            return None
        if spec.nbytes > BUFFER_BYTES - ALIGN:
            return None
        if self._fill + spec.nbytes > BUFFER_BYTES:
            self._hand_over()
        buffer = self._buffers[self._current]
        return torch.frombuffer(buffer, dtype=spec.dtype, count=spec.numel, offset=self._fill).view(spec.shape)

    def add(self, key: str, tensor: torch.Tensor, release: Release | None = None) -> None:
        """Take the next tensor: already in place when it came from ``slot``, else copied in."""
        try:
            self._raise_if_failed()
            spec = expected_spec(self._specs, self._next, key, tensor)
            if spec.nbytes and self._is_in_place(tensor):
                self._fill += spec.nbytes
            elif spec.nbytes:
                self._append(tensor_bytes(tensor.contiguous()))
            self._next += 1
        finally:
            if release is not None:
                release()

    def finish(self) -> str:
        check_all_added(self._specs, self._next)
        if self._fill:
            padded = -(-self._fill // ALIGN) * ALIGN
            self._buffers[self._current][self._fill : padded] = bytes(padded - self._fill)
            self._put(self._current, self._current_start, self._fill, padded)
        self._join()
        self._raise_if_failed()
        try:
            os.ftruncate(self._file.fd, self._size)  # the last block was written whole
        except OSError as err:
            raise OutputError(write_failure(self._file.path, err)) from None
        return self._file.commit()

    def abort(self) -> None:
        self._stop.set()
        self._join()
        self._file.discard()

    def _is_in_place(self, tensor: torch.Tensor) -> bool:
        return tensor.data_ptr() == self._addresses[self._current] + self._fill

    def _append(self, data: memoryview) -> None:
        data = data.cast("B") if data.format != "B" else data
        while data:
            if self._fill == BUFFER_BYTES:
                self._hand_over()
            count = min(len(data), BUFFER_BYTES - self._fill)
            self._buffers[self._current][self._fill : self._fill + count] = data[:count]
            self._fill += count
            data = data[count:]

    def _hand_over(self) -> None:
        """Send the current buffer's whole blocks to be hashed and written; go on in a free buffer,
        which starts with the bytes after them."""
        whole = self._fill // ALIGN * ALIGN
        index = self._free.get()
        self._raise_if_failed()
        rest = self._buffers[self._current][whole : self._fill]
        self._buffers[index][: len(rest)] = rest
        self._put(self._current, self._current_start, whole, whole)
        self._current, self._current_start, self._fill = index, self._current_start + whole, len(rest)

    def _put(self, index: int, start: int, hashed: int, written: int) -> None:
        pending = [len(self._queues)]

        def done() -> None:
            with self._lock:
                pending[0] -= 1
                last = pending[0] == 0
            if last:
                self._free.put(index)

        for q in self._queues:
            q.put((index, start, hashed, written, done))

    def _write(self, index: int, start: int, hashed: int, written: int) -> None:
        view, offset = memoryview(self._buffers[index])[:written], start
        try:
            while view:
                count = os.pwrite(self._file.fd, view, offset)
                view, offset = view[count:], offset + count
            if not self._past_cache:
                self._settle(start, written)
        except OSError as err:
            raise OutputError(write_failure(self._file.path, err)) from None
        finally:
            view.release()

    def _settle(self, start: int, written: int) -> None:
        """Start the range just written on its way to the disk (now, not at the dirty limit), and
        drop the one ``IN_FLIGHT`` buffers before it from the page cache once it is there."""
        start_writeback(self._file.fd, start, written)
        self._in_flight.append((start, written))
        if len(self._in_flight) > IN_FLIGHT:
            write_out_and_drop(self._file.fd, *self._in_flight.popleft())

    def _hash(self, index: int, start: int, hashed: int, written: int) -> None:
        with memoryview(self._buffers[index]) as view:
            self._file.sha256.update(view[:hashed])

    def _drain(self, items: queue.Queue, consume) -> None:
        while (item := items.get()) is not self._DONE:
            *args, done = item
            try:
                if self._error is None and not self._stop.is_set():
                    consume(*args)
            except BaseException as err:  # handed to the merging thread, which raises it
                self._error = err
            finally:
                done()

    def _join(self) -> None:
        for q in self._queues:
            q.put(self._DONE)
        for thread in self._threads:
            thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def _write_direct(file: TempFile, block: mmap.mmap) -> None:
    """Switch ``fd`` to O_DIRECT and write one zero block at its start (the header overwrites it),
    or raise ``DirectIOUnsupported`` when this OS or filesystem cannot."""
    if O_DIRECT is None or fcntl is None:
        raise DirectIOUnsupported("O_DIRECT is not available here")
    try:
        fcntl.fcntl(file.fd, fcntl.F_SETFL, fcntl.fcntl(file.fd, fcntl.F_GETFL) | O_DIRECT)
        with memoryview(block) as view:
            os.pwrite(file.fd, view[:ALIGN], 0)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise DirectIOUnsupported(f"cannot write past the page cache ({err.strerror})") from None
        raise OutputError(write_failure(file.path, err)) from None
