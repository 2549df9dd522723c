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
import itertools
import json
import os
import queue
import re
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import OutputError
from .readers import DTYPE_NAMES, TensorSpec

try:
    import fcntl  # POSIX: a temp file's lock tells a live merge from a killed one
except ImportError:  # Windows: no locking, so no cleanup of leftovers
    fcntl = None

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


def tensor_starts(specs: Sequence[tuple[str, TensorSpec]], header_size: int) -> tuple[list[int], int]:
    """Each tensor's offset in a safetensors file whose header takes ``header_size`` bytes, and the
    file's size."""
    offsets = list(itertools.accumulate((spec.nbytes for _, spec in specs), initial=header_size))
    return offsets[:-1], offsets[-1]


def expected_spec(specs: Sequence[tuple[str, TensorSpec]], index: int, key: str, tensor: torch.Tensor) -> TensorSpec:
    """The spec of tensor number ``index``, or a ValueError when ``key`` and ``tensor`` are not it."""
    expected_key, spec = specs[index]
    if key != expected_key or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        raise ValueError(f"writer expected {expected_key} {spec}, got {key} {tensor.dtype} {tuple(tensor.shape)}")
    return spec


def check_all_added(specs: Sequence[tuple[str, TensorSpec]], added: int) -> None:
    if added != len(specs):
        raise ValueError(f"writer got {added} of {len(specs)} tensors")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous tensor, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


TEMP_SUFFIX = ".merge-lab.tmp"
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX), re.DOTALL)
# Temp files this process holds: never removed by its own cleanup, even where flock is emulated
# with per-process POSIX locks (NFS), which would not keep out a second open in the same process.
_LIVE: set[tuple[int, int]] = set()


class TempFile:
    """A hidden temp file beside ``path`` that becomes ``path`` on commit and vanishes otherwise.

    It holds an exclusive ``flock`` for its whole life, so ``remove_leftovers`` can tell the temp
    file of a live merge from one left by a killed process (a lock dies with its process).
    """

    def __init__(self, path: Path, overwrite: bool, *, readable: bool = False):
        self.path = path
        self.overwrite = overwrite
        self.sha256 = hashlib.sha256()
        self.written = self.flushed = 0
        self._id: tuple[int, int] | None = None
        mode = os.O_RDWR if readable else os.O_WRONLY  # readable: to map it
        for _ in range(5):
            self.temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
            try:
                self.fd = os.open(self.temp, mode | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
            except OSError as err:
                raise OutputError(f"{path.parent}: cannot create the output there ({err.strerror})") from None
            if self._lock():
                return
            os.close(self.fd)  # a cleaner took it before it was locked (and removes it): take another name
        raise OutputError(f"{path.parent}: cannot create the output there (its temp file kept being removed)")

    def _lock(self) -> bool:
        """Lock the new file; False when a cleaner took it (it holds it, or removed it) before the lock."""
        if fcntl is None:
            return True
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:
            pass  # a filesystem without locks: cleaners cannot lock it either, so they leave it alone
        try:
            named = os.stat(self.temp, follow_symlinks=False)
        except OSError:
            return False
        held = os.fstat(self.fd)
        if (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            return False
        self._id = (held.st_dev, held.st_ino)
        _LIVE.add(self._id)
        return True

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
                raise OutputError(write_failure(self.path, err)) from None
            view = view[written:]
            self.written += written
        if self.written - self.flushed >= WRITEBACK_BYTES:
            start_writeback(self.fd, self.flushed, self.written - self.flushed)
            self.flushed = self.written

    def commit(self) -> str:
        try:
            os.fsync(self.fd)
        except OSError as err:
            raise OutputError(write_failure(self.path, err)) from None
        if not self.overwrite and self.path.exists():
            raise OutputError(f"{self.path}: already exists (appeared during the merge); choose overwrite")
        if fcntl is None:  # Windows cannot rename an open file
            self._close()
        os.replace(self.temp, self.path)  # still locked: no cleaner can take the temp file before this
        self._close()
        _fsync_folder(self.path.parent)
        return self.sha256.hexdigest()

    def discard(self) -> None:
        if fcntl is None:
            self._close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp)
        self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            _LIVE.discard(self._id)
            os.close(self.fd)
            self.fd = -1


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files of merges that were killed (``kill -9``, a crash, a power cut) in ``folder``.

    Only files named as ``TempFile`` names them whose lock can be taken: a live merge, in this
    process or another, holds its lock, so two merges into one folder never delete each other's
    file. Returns what was removed. Never raises ``OSError``; does nothing where there is no flock.
    """
    removed: list[Path] = []
    if fcntl is None:
        return removed
    try:
        entries = [entry for entry in os.scandir(folder) if _TEMP_NAME.fullmatch(entry.name)]
    except OSError:
        return removed
    for entry in entries:
        with contextlib.suppress(OSError):
            if _remove_if_abandoned(entry):
                removed.append(Path(entry.path))
    return removed


def _remove_if_abandoned(entry: os.DirEntry) -> bool:
    if not entry.is_file(follow_symlinks=False):
        return False
    named = entry.stat(follow_symlinks=False)
    if (named.st_dev, named.st_ino) in _LIVE:
        return False
    fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its merge is still running
        held, named = os.fstat(fd), os.stat(entry.path, follow_symlinks=False)
        if (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino):
            return False  # the name was reused meanwhile: not the file that was checked
        os.unlink(entry.path)
        return True
    finally:
        os.close(fd)


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
        expected_spec(self._specs, self._next, key, tensor)
        self._next += 1
        self._put(tensor_bytes(tensor.contiguous()), release)

    def finish(self) -> str:
        check_all_added(self._specs, self._next)
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
        sink = _HashingSink(self._file)
        try:
            torch.save(self._tensors, sink)
        except BaseException:
            # torch swallows the sink's error into "unexpected pos ...": raise the sink's own instead.
            if sink.error is not None:
                raise sink.error from None
            raise
        if sink.error is not None:
            raise sink.error
        self._tensors = {}
        return self._file.commit()

    def abort(self) -> None:
        self._tensors = {}
        self._file.discard()


class _HashingSink:
    """The minimal file object ``torch.save`` writes to, feeding the temp file and its hash."""

    def __init__(self, file: TempFile):
        self._file = file
        self.error: BaseException | None = None  # the first failure (disk full, Ctrl-C), for finish to raise

    def write(self, data) -> int:
        if self.error is not None:
            raise self.error
        view = memoryview(data)
        try:
            self._file.write(view)
        except BaseException as err:
            self.error = err
            raise
        return view.nbytes

    def flush(self) -> None:
        pass


# torch.save's zip layout (caffe2/serialize/inline_container.cc, on miniz): each record is a local
# header (30 bytes + name + a 4-byte padding field) with its data aligned to 64 bytes, a data
# descriptor after the data, and a central directory entry (46 bytes + name); zip64 adds fields.
_ZIP_ALIGN = 64
_ZIP32 = 0xFFFFFFFF
_CKPT_SMALL_RECORDS = ((".format_version", 1), (".storage_alignment", 2), ("byteorder", 6), ("version", 2))
_CKPT_TRAILING_RECORD = (".data/serialization_id", 40)
_ZIP_END = 22 + 56 + 20  # end of central directory, and the zip64 end record and locator


def ckpt_size(specs: Sequence[tuple[str, TensorSpec]]) -> int:
    """An upper bound of the size of ``torch.save`` of these tensors (a dict, as ``CkptWriter`` saves).

    Only the pickle's size and the record order (which varies between torch versions) are bounded,
    not simulated; the tensors' records, nearly all of the file, are laid out as torch lays them out.
    """
    cursor = central = 0

    def record(name: str, size: int, known_start: bool) -> None:
        nonlocal cursor, central
        big = size >= _ZIP32 or cursor >= _ZIP32
        header = 30 + len("archive/" + name) + 4 + (28 if big else 0)
        # A tensor's record follows the one before it in every torch version: its padding is laid out
        # exactly. Before the others (their order and presence vary by version) the worst is assumed.
        data_start = -(-(cursor + header) // _ZIP_ALIGN) * _ZIP_ALIGN if known_start else cursor + header + 63
        cursor = data_start + size + (24 if big else 16)
        central += 46 + len("archive/" + name) + (28 if big else 0)

    record("data.pkl", _ckpt_pickle_size(specs), False)
    for name, size in _CKPT_SMALL_RECORDS:
        record(name, size, False)
    for index, (_, spec) in enumerate(specs):
        record(f"data/{index}", spec.nbytes, index > 0)
    record(*_CKPT_TRAILING_RECORD, False)
    return cursor + central + _ZIP_END


def _ckpt_pickle_size(specs: Sequence[tuple[str, TensorSpec]]) -> int:
    """An upper bound of torch.save's pickle (protocol 2) of a dict of contiguous tensors.

    Per key: the name, then ``_rebuild_tensor_v2((storage persistent id), 0, size, stride, False,
    OrderedDict())``; every memo put counted at 5 bytes, every get of a later dtype's class too.
    """
    size = 512 + 2 * (len(specs) // 1000 + 1)  # protocol, dict, globals and strings named once; SETITEMS
    for index, (key, spec) in enumerate(specs):
        strides, stride = [], 1
        for n in reversed(spec.shape):
            strides.append(stride)
            stride *= max(n, 1)
        tuple_ops = 1 if not spec.shape else (6 if len(spec.shape) <= 3 else 7)
        size += 5 + len(key.encode("utf-8")) + 5  # BINUNICODE key, put
        size += 2 + 1  # get _rebuild_tensor_v2, MARK
        size += 1 + 2 + 5 + (5 + len(str(index)) + 5) + 2 + _pickled_int(spec.numel) + 1 + 5 + 1  # persistent id
        size += 2  # storage offset 0
        size += sum(_pickled_int(n) for n in spec.shape) + sum(_pickled_int(n) for n in strides) + 2 * tuple_ops
        size += 1 + (2 + 1 + 1 + 5) + (1 + 5) + (1 + 5)  # False, OrderedDict(), TUPLE, REDUCE with their puts
    return size


def _pickled_int(value: int) -> int:
    """Bytes pickle (protocol 2) takes for a non-negative int: BININT1/2, BININT or LONG1."""
    if value < 1 << 8:
        return 2
    if value < 1 << 16:
        return 3
    if value < 1 << 31:
        return 5
    return 2 + value.bit_length() // 8 + 1


def write_failure(path: Path, err: OSError) -> str:
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
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range to disk without waiting for it and without evicting it from the cache."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def write_out_and_drop(fd: int, offset: int, length: int) -> None:
    """Wait until a range is on the disk, then drop its pages from the page cache (an ``OSError``
    if writing it failed: the wait takes the error, so a later fsync would not see it). Where the
    kernel cannot wait for a range (some sandboxes), the pages are left to it."""
    if _SYNC_FILE_RANGE is None or not hasattr(os, "posix_fadvise"):
        return
    flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
    if _SYNC_FILE_RANGE(fd, offset, length, flags) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP):
            return
        raise OSError(code, os.strerror(code))
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
