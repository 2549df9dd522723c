"""Streaming checkpoint writers: nothing half-written is ever visible under the output's name.

The file is written to a hidden temp file in the target folder, hashed (sha256) as it is written,
fsynced and renamed over the final name; on any error, cancel or Ctrl-C the temp file is removed.
The safetensors writer knows the whole header up front, so tensors go to disk in order from a
background thread while the next ones are computed: memory holds a few tensors, never a model.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import queue
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import OutputError
from .readers import DTYPE_NAMES, TensorSpec

Release = Callable[[], None]
# Ask the kernel to start writing back every this many bytes, so the final fsync finds little to do.
WRITEBACK_BYTES = 64 << 20


def safetensors_header(specs: Sequence[tuple[str, TensorSpec]], metadata: dict[str, str] | None) -> bytes:
    """The length-prefixed JSON header for tensors stored back to back in this order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, spec in specs:
        header[key] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    body += b" " * (-len(body) % 8)  # keeps the data 8-byte aligned
    return len(body).to_bytes(8, "little") + body


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous tensor, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class TempFile:
    """A hidden temp file beside ``path`` that becomes ``path`` on commit and vanishes otherwise."""

    def __init__(self, path: Path, overwrite: bool, *, readable: bool = False):
        self.path = path
        self.overwrite = overwrite
        self.temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.merge-lab.tmp")
        self.sha256 = hashlib.sha256()
        self.written = self.flushed = 0
        try:
            mode = os.O_RDWR if readable else os.O_WRONLY  # readable: to map it
            self.fd = os.open(self.temp, mode | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        except OSError as err:
            raise OutputError(f"{path.parent}: cannot create the output there ({err.strerror})") from None

    def write(self, data: memoryview) -> None:
        self.sha256.update(data)
        self.write_only(data)

    def write_only(self, data: memoryview) -> None:
        """Write without hashing: the safetensors writer hashes on another thread."""
        view = data.cast("B") if data.format != "B" else data
        while view:
            try:
                written = os.write(self.fd, view[: 1 << 30])
            except OSError as err:
                raise OutputError(_write_failure(self.path, err)) from None
            view = view[written:]
            self.written += written
        if self.written - self.flushed >= WRITEBACK_BYTES:
            start_writeback(self.fd, self.flushed, self.written - self.flushed)
            self.flushed = self.written

    def commit(self) -> str:
        try:
            os.fsync(self.fd)
        except OSError as err:
            raise OutputError(_write_failure(self.path, err)) from None
        os.close(self.fd)
        self.fd = -1
        if not self.overwrite and self.path.exists():
            raise OutputError(f"{self.path}: already exists (appeared during the merge); choose overwrite")
        os.replace(self.temp, self.path)
        _fsync_folder(self.path.parent)
        return self.sha256.hexdigest()

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp)


class SafetensorsWriter:
    """Writes tensors in header order; one thread writes while another hashes the same bytes."""

    _DONE = object()

    def __init__(
        self,
        path: Path,
        specs: Sequence[tuple[str, TensorSpec]],
        metadata: dict[str, str] | None,
        *,
        overwrite: bool = False,
        queue_depth: int = 4,
    ):
        self._specs = list(specs)
        self._next = 0
        self._file = TempFile(Path(path), overwrite)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._queues = (queue.Queue(maxsize=queue_depth), queue.Queue(maxsize=queue_depth))
        self._threads = (
            threading.Thread(target=self._drain, args=(self._queues[0], self._file.write_only), daemon=True),
            threading.Thread(target=self._drain, args=(self._queues[1], self._file.sha256.update), daemon=True),
        )
        for thread in self._threads:
            thread.start()
        self._put(memoryview(safetensors_header(self._specs, metadata)), None)

    def add(self, key: str, tensor: torch.Tensor, release: Release | None = None) -> None:
        """Queue the next tensor; ``release`` is called once its bytes are written and hashed."""
        self._raise_if_failed()
        expected_key, spec = self._specs[self._next]
        if key != expected_key or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"writer expected {expected_key} {spec}, got {key} {tensor.dtype} {tuple(tensor.shape)}")
        self._next += 1
        self._put(tensor_bytes(tensor.contiguous()), release)

    def finish(self) -> str:
        if self._next != len(self._specs):
            raise ValueError(f"writer got {self._next} of {len(self._specs)} tensors")
        self._join()
        self._raise_if_failed()
        return self._file.commit()

    def abort(self) -> None:
        self._stop.set()
        self._join()
        self._file.discard()

    def _put(self, data: memoryview, release: Release | None) -> None:
        pending = [len(self._queues)]

        def done() -> None:
            with self._lock:
                pending[0] -= 1
                last = pending[0] == 0
            if last and release is not None:
                release()

        for q in self._queues:
            q.put((data, done))

    def _join(self) -> None:
        for q in self._queues:
            q.put(self._DONE)
        for thread in self._threads:
            thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self, items: queue.Queue, consume: Callable[[memoryview], None]) -> None:
        while (item := items.get()) is not self._DONE:
            data, done = item
            try:
                if self._error is None and not self._stop.is_set():
                    consume(data)
            except BaseException as err:  # handed to the merging thread, which raises it
                self._error = err
            finally:
                done()


class CkptWriter:
    """``.ckpt`` output through ``torch.save``: holds the result in memory, as the built-in does."""

    def __init__(self, path: Path, specs: Sequence[tuple[str, TensorSpec]], *, overwrite: bool = False):
        self._path = Path(path)
        self._overwrite = overwrite
        self._tensors: dict[str, torch.Tensor] = {}
        self._file = TempFile(self._path, overwrite)

    def add(self, key: str, tensor: torch.Tensor, release: Release | None = None) -> None:
        self._tensors[key] = tensor.clone()  # owns its storage: never a view of an input's map
        if release is not None:
            release()

    def finish(self) -> str:
        torch.save(self._tensors, _HashingSink(self._file))
        self._tensors = {}
        return self._file.commit()

    def abort(self) -> None:
        self._tensors = {}
        self._file.discard()


class _HashingSink:
    """The minimal file object ``torch.save`` writes to, feeding the temp file and its hash."""

    def __init__(self, file: TempFile):
        self._file = file

    def write(self, data) -> int:
        view = memoryview(data)
        self._file.write(view)
        return view.nbytes

    def flush(self) -> None:
        pass


def _write_failure(path: Path, err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"{path.parent}: disk full while writing {path.name} ({err.strerror}); nothing was saved"
    return f"{path}: write failed ({err.strerror}); nothing was saved"


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); folders cannot be opened on Windows."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def libc_function(name: str, *argtypes):
    """A Linux libc function through ctypes (other threads run while it works), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    return function


_SYNC_FILE_RANGE = libc_function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range to disk without waiting for it and without evicting it from the cache."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)
