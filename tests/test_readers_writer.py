"""Readers and writers against the safetensors library and torch, on real files."""

import ctypes
import errno
import hashlib
import json
import os
import pickle

import pytest
import safetensors.torch
import torch
from conftest import SD15, make

from lib_merge import InputError, OutputError, UnsafePickleError
from lib_merge.io import staged_writer
from lib_merge.io.formats import open_checkpoint
from lib_merge.io.mapped_writer import MappedSafetensorsWriter
from lib_merge.io.readers import TensorSpec
from lib_merge.io.staged_writer import ALIGN, DirectIOUnsupported, StagedSafetensorsWriter
from lib_merge.io.writer import CkptWriter, SafetensorsWriter


def test_writer_output_is_read_back_identically_by_the_safetensors_library(tmp_path):
    tensors = {
        "b": torch.randn(3, 4, dtype=torch.bfloat16),
        "a": torch.arange(5),
        "c": torch.randn(2).half(),
        "s": torch.tensor(1.5),
    }
    specs = [(k, TensorSpec(v.dtype, tuple(v.shape))) for k, v in tensors.items()]
    writer = SafetensorsWriter(tmp_path / "x.safetensors", specs, {"k": "v"})
    for key, tensor in tensors.items():
        writer.add(key, tensor)
    sha = writer.finish()
    assert sha == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    loaded = safetensors.torch.load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def add_to_both(tensors, streamed, placing) -> list[str]:
    """Each tensor to the streaming writer, and to ``placing`` in its slot where it offers one (the
    keys so placed) or as it is."""
    in_place = []
    for key, tensor in tensors.items():
        streamed.add(key, tensor)
        slot = placing.slot(key)
        if slot is not None:
            slot.copy_(tensor)
            in_place.append(key)
        placing.add(key, tensor if slot is None else slot)
    return in_place


def test_the_mapped_writer_writes_the_same_bytes_as_the_streaming_one(tmp_path):
    """Tensors computed into their slots, copied in (misaligned for their dtype), and empty."""
    tensors = {
        "odd": torch.randn(3).half(),  # 6 bytes: the next float32 starts misaligned
        "f32": torch.randn(5, 2),
        "empty": torch.empty(0, 4),
        "bf16": torch.randn(7, dtype=torch.bfloat16),
        "i64": torch.arange(3),
    }
    specs = [(k, TensorSpec(v.dtype, tuple(v.shape))) for k, v in tensors.items()]
    streamed = SafetensorsWriter(tmp_path / "streamed.safetensors", specs, {"k": "v"})
    mapped = MappedSafetensorsWriter(tmp_path / "mapped.safetensors", specs, {"k": "v"})
    in_place = add_to_both(tensors, streamed, mapped)
    assert in_place == ["odd", "bf16"]  # f32 and i64 land misaligned here, empty has no bytes
    assert mapped.finish() == streamed.finish()
    assert (tmp_path / "mapped.safetensors").read_bytes() == (tmp_path / "streamed.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mapped.safetensors", "streamed.safetensors"]


def staged_writer_or_skip(path, specs, metadata=None) -> StagedSafetensorsWriter:
    try:
        return StagedSafetensorsWriter(path, specs, metadata)
    except DirectIOUnsupported as err:
        pytest.skip(f"this filesystem cannot write past the page cache: {err}")


def test_the_staged_writer_writes_the_same_bytes_as_the_streaming_one(tmp_path, monkeypatch):
    """Buffers of 3 pages, so tensors cross them: computed into their slots (some after a buffer was
    handed over), copied in (misaligned for their dtype, or larger than a buffer), and empty."""
    monkeypatch.setattr(staged_writer, "BUFFER_BYTES", 3 * ALIGN)
    tensors = {
        "odd": torch.randn(3).half(),  # 6 bytes: the next float32 starts misaligned
        "f32": torch.randn(5, 2),
        "empty": torch.empty(0, 4),
        "bf16": torch.randn(7, dtype=torch.bfloat16),
        "big": torch.randn(10_000),  # 40,000 bytes: more than three buffers
        **{f"page{i}": torch.randn(2000).half() for i in range(5)},  # 4,000 bytes each: 2 to a buffer
        "i64": torch.arange(3),
    }
    specs = [(k, TensorSpec(v.dtype, tuple(v.shape))) for k, v in tensors.items()]
    streamed = SafetensorsWriter(tmp_path / "streamed.safetensors", specs, {"k": "v"})
    direct = staged_writer_or_skip(tmp_path / "direct.safetensors", specs, {"k": "v"})
    in_place = add_to_both(tensors, streamed, direct)
    assert in_place == ["odd", "bf16", *(f"page{i}" for i in range(5))]  # f32 and i64 land misaligned
    assert direct.finish() == streamed.finish()
    written = (tmp_path / "direct.safetensors").read_bytes()
    assert len(written) % ALIGN and written == (tmp_path / "streamed.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.safetensors", "streamed.safetensors"]


def fails_naming_the_file_and_leaves_nothing(writer, specs, folder) -> None:
    """Writing ``specs`` (float32, 1024 each) to x.safetensors fails with an I/O error that names
    it, and once aborted nothing is left in ``folder``."""
    with pytest.raises(OutputError, match=r"x\.safetensors: write failed \(Input/output error\); nothing was saved"):
        for key, _ in specs:
            writer.add(key, torch.ones(1024))
        writer.finish()
    writer.abort()
    assert list(folder.iterdir()) == []


def test_a_failed_direct_write_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    """Stand-in for a disk that fails once its space is reserved (an I/O error): pwrite fails past
    the first buffer."""
    monkeypatch.setattr(staged_writer, "BUFFER_BYTES", 2 * ALIGN)
    specs = [(f"t{i}", TensorSpec(torch.float32, (1024,))) for i in range(8)]
    writer = staged_writer_or_skip(tmp_path / "x.safetensors", specs)
    real_pwrite = os.pwrite

    def failing(fd, data, offset):
        if offset:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    fails_naming_the_file_and_leaves_nothing(writer, specs, tmp_path)


def test_through_the_page_cache_the_staged_writer_drops_what_is_on_the_disk(tmp_path, monkeypatch):
    """The real page cache: written where the output cannot stay in memory (a Flux merge on 24 GB),
    the bytes are the streaming writer's, and all but the last ``IN_FLIGHT`` buffers are out of the
    page cache once on the disk, so the kernel never has to reclaim them (256 KiB in 16 KiB buffers)."""
    from lib_merge.io.page_cache import in_page_cache

    monkeypatch.setattr(staged_writer, "BUFFER_BYTES", 4 * ALIGN)
    monkeypatch.setattr(staged_writer, "IN_FLIGHT", 2)
    tensors = {f"t{index}": torch.randn(4096) for index in range(16)}  # 16 KiB each: a buffer apiece
    specs = [(k, TensorSpec(v.dtype, tuple(v.shape))) for k, v in tensors.items()]
    streamed = SafetensorsWriter(tmp_path / "streamed.safetensors", specs, None)
    through = StagedSafetensorsWriter(tmp_path / "through.safetensors", specs, None, past_cache=False)
    add_to_both(tensors, streamed, through)
    assert through.finish() == streamed.finish()
    path = tmp_path / "through.safetensors"
    # All but the last 3 buffers (IN_FLIGHT, and the one finish wrote), asked before reading them.
    dropped = not in_page_cache(path, 0, path.stat().st_size - 3 * 4 * ALIGN)
    assert path.read_bytes() == (tmp_path / "streamed.safetensors").read_bytes()
    if in_page_cache(evicted(tmp_path / "streamed.safetensors"), 0, path.stat().st_size):
        pytest.skip("this filesystem keeps evicted pages, or the OS cannot tell")
    assert dropped


def waiting_fails_with(code, monkeypatch):
    """Stand-in for ``sync_file_range``: waiting for a written range fails with ``code``; the
    staged writer's buffers are of 2 pages, each dropped once the next is written."""
    from lib_merge.io import writer

    if writer._SYNC_FILE_RANGE is None:
        pytest.skip("no sync_file_range here: the output's pages are left to the kernel")
    monkeypatch.setattr(staged_writer, "BUFFER_BYTES", 2 * ALIGN)
    monkeypatch.setattr(staged_writer, "IN_FLIGHT", 1)
    real = writer._SYNC_FILE_RANGE

    def failing(fd, offset, length, flags):
        if flags & writer.SYNC_FILE_RANGE_WAIT_AFTER:
            ctypes.set_errno(code)
            return -1
        return real(fd, offset, length, flags)

    monkeypatch.setattr(writer, "_SYNC_FILE_RANGE", failing)


def test_a_failed_write_to_the_disk_through_the_page_cache_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    """A disk that fails as written pages go to it (an I/O error seen while waiting for them): the
    wait takes the error, so the writer must report it, not a later fsync."""
    waiting_fails_with(errno.EIO, monkeypatch)
    specs = [(f"t{i}", TensorSpec(torch.float32, (1024,))) for i in range(8)]
    writer = StagedSafetensorsWriter(tmp_path / "x.safetensors", specs, None, past_cache=False)
    fails_naming_the_file_and_leaves_nothing(writer, specs, tmp_path)


def test_where_the_kernel_cannot_wait_for_a_written_range_its_pages_are_left_to_it(tmp_path, monkeypatch):
    """Some sandboxes answer ENOSYS: the merge goes on and the file is whole."""
    waiting_fails_with(errno.ENOSYS, monkeypatch)
    tensors = {f"t{i}": torch.full((1024,), float(i)) for i in range(8)}
    specs = [(key, TensorSpec(torch.float32, (1024,))) for key in tensors]
    writer = StagedSafetensorsWriter(tmp_path / "x.safetensors", specs, None, past_cache=False)
    for key, tensor in tensors.items():
        writer.add(key, tensor)
    writer.finish()
    loaded = safetensors.torch.load_file(str(tmp_path / "x.safetensors"))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("kind", ["mapped", "direct"])
def test_the_writers_that_place_tensors_leave_nothing_when_aborted(tmp_path, kind):
    specs = [("a", TensorSpec(torch.float16, (4,))), ("b", TensorSpec(torch.float16, (4,)))]
    if kind == "mapped":
        writer = MappedSafetensorsWriter(tmp_path / "x.safetensors", specs, None)
    else:
        writer = staged_writer_or_skip(tmp_path / "x.safetensors", specs)
    writer.slot("a").fill_(1)
    writer.add("a", writer.slot("a"))
    with pytest.raises(ValueError, match="writer expected b"):
        writer.add("c", torch.ones(4, dtype=torch.float16))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_reader_is_lazy_and_matches_the_safetensors_library(tmp_path):
    path = make(tmp_path / "m.safetensors", metadata={"hello": "world"})
    reference = safetensors.torch.load_file(str(path))
    with open_checkpoint(path) as reader:
        assert reader.metadata == {"hello": "world"}
        assert set(reader.keys()) == set(reference)
        for key in reference:
            assert torch.equal(reader[key], reference[key])


def test_old_sd1_key_names_are_renamed_as_the_webui_does(tmp_path):
    old = "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.bias"
    torch.save({"state_dict": {old: torch.ones(2), "global_step": 5}}, tmp_path / "old.ckpt")
    with open_checkpoint(tmp_path / "old.ckpt") as reader:
        assert reader.keys() == ["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.bias"]


def test_ckpt_writer_gives_a_weights_only_loadable_file(tmp_path):
    writer = CkptWriter(tmp_path / "x.ckpt", [("w", TensorSpec(torch.float16, (2,)))])
    writer.add("w", torch.ones(2, dtype=torch.float16))
    sha = writer.finish()
    assert sha == hashlib.sha256((tmp_path / "x.ckpt").read_bytes()).hexdigest()
    assert torch.equal(torch.load(tmp_path / "x.ckpt", weights_only=True)["w"], torch.ones(2, dtype=torch.float16))


class Payload:
    """Unpickling this would create a marker file: the reader must refuse it before it runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_malicious_pickle_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.ckpt", "wb") as file:
        pickle.dump({"state_dict": {"w": Payload(marker)}}, file)
    torch.save({"state_dict": {"w": Payload(marker)}}, tmp_path / "evil_zip.ckpt")
    marker.unlink(missing_ok=True)  # torch.save does not run it, but be sure
    for name in ("evil.ckpt", "evil_zip.ckpt"):
        with pytest.raises(UnsafePickleError, match=f"{name}: refused"):
            open_checkpoint(tmp_path / name)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:5], "not a safetensors file"),
        (lambda b: b[:8] + b"\xff" + b[9:], "corrupt safetensors header"),
        (lambda b: (10**12).to_bytes(8, "little") + b[8:], "not a safetensors file, or truncated"),
    ],
)
def test_damaged_safetensors_are_refused_naming_the_file(tmp_path, damage, message):
    good = make(tmp_path / "good.safetensors", specs=dict(list(SD15.items())[:20]))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(
        InputError, match=f"bad.safetensors.*{message}|{message}.*bad.safetensors|bad.safetensors: {message}"
    ):
        open_checkpoint(bad)


def test_a_header_entry_with_a_wrong_size_names_the_key(tmp_path):
    header = json.dumps({"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 6]}}).encode()
    (tmp_path / "x.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(InputError, match="at key w"):
        open_checkpoint(tmp_path / "x.safetensors")


def test_missing_and_folder_inputs(tmp_path):
    with pytest.raises(InputError, match="nothing.safetensors: no such file"):
        open_checkpoint(tmp_path / "nothing.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        open_checkpoint(tmp_path / "dir.safetensors")


# ---------------------------------------------------------------- inputs read past the page cache

# Tensors of sizes that are not multiples of a page, so most start and end mid-page.
DIRECT_SPECS = {f"block.{index}.weight": TensorSpec(torch.float32, (37 + index, 61)) for index in range(8)}


def direct_reader(path, monkeypatch):
    """A reader of ``path`` reading every tensor past the page cache (the test's are all small)."""
    from lib_merge.io import readers

    monkeypatch.setattr(readers, "SMALL_BYTES", 1)
    reader = open_checkpoint(path)
    if not reader.read_past_cache():
        pytest.skip("this filesystem cannot read past the page cache")
    return reader


@pytest.mark.parametrize("misaligned", [False, True])
def test_tensors_read_past_the_page_cache_are_the_stored_ones_asked_ahead_or_not(tmp_path, monkeypatch, misaligned):
    """With an odd-sized tensor first, every float32 after it starts misaligned for its dtype."""
    specs = {"odd": TensorSpec(torch.float16, (3,)), **DIRECT_SPECS} if misaligned else DIRECT_SPECS
    path = make(tmp_path / "m.safetensors", specs=specs, seed=3)
    stored = safetensors.torch.load_file(str(path))
    with direct_reader(path, monkeypatch) as reader:
        keys = list(specs)
        for key in keys[::2]:
            reader.prefetch(key)  # asked ahead: read by the reader's thread
        for key in keys:
            tensor = reader[key]
            assert torch.equal(tensor, stored[key]), key
            assert tensor.data_ptr() % tensor.element_size() == 0, key  # as the memory map's: copied if not
        assert torch.equal(reader[keys[0]], stored[keys[0]])  # taken twice: read again


def test_a_buffer_is_reused_only_once_no_tensor_views_it(tmp_path, monkeypatch):
    from lib_merge.io import direct_reads

    monkeypatch.setattr(direct_reads, "GRAIN", ALIGN)  # every tensor here takes the same buffer size
    path = make(tmp_path / "m.safetensors", specs=DIRECT_SPECS, seed=4)
    stored = safetensors.torch.load_file(str(path))
    made = []
    real = direct_reads.mmap.mmap
    monkeypatch.setattr(direct_reads.mmap, "mmap", lambda fd, *a, **k: made.append(fd == -1) or real(fd, *a, **k))
    with direct_reader(path, monkeypatch) as reader:
        held = reader["block.0.weight"]
        for _ in range(3):
            for key in list(DIRECT_SPECS)[1:4]:
                assert torch.equal(reader[key], stored[key])
        # The held tensor kept its buffer; the others, dropped at once, shared a few buffers.
        assert torch.equal(held, stored["block.0.weight"])
        assert sum(made) <= 4  # anonymous maps: the buffers (and the probe)


def test_without_o_direct_the_reader_stays_on_its_memory_map(tmp_path, monkeypatch):
    from lib_merge.io import direct_reads

    monkeypatch.setattr(direct_reads, "O_DIRECT", None)
    path = make(tmp_path / "m.safetensors", specs=DIRECT_SPECS, seed=5)
    with open_checkpoint(path) as reader:
        assert reader.read_past_cache() is False
        assert torch.equal(reader["block.1.weight"], safetensors.torch.load_file(str(path))["block.1.weight"])


def evicted(path):
    """``path``'s pages dropped from the page cache (written back first), as after a reboot."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return path


def test_a_reader_tells_whether_the_page_cache_holds_its_file(tmp_path):
    """The real page cache: a file just written is in it; evicted it is not, however often asked
    (each probe brings its page in); read again it is. 48 MB, past the kernel's readahead of the
    header."""
    specs = {f"block.{index}.weight": TensorSpec(torch.float32, (1024, 1024)) for index in range(12)}
    path = make(tmp_path / "m.safetensors", specs=specs, seed=7)
    with open_checkpoint(path) as reader:
        assert reader.in_page_cache() is True
    with open_checkpoint(evicted(path)) as reader:
        if reader.in_page_cache():
            pytest.skip("this filesystem keeps evicted pages, or cannot tell (reads that may not wait)")
        assert not any(reader.in_page_cache() for _ in range(5))
        path.read_bytes()
        assert reader.in_page_cache() is True


def test_where_the_os_cannot_tell_a_file_counts_as_in_the_page_cache(tmp_path, monkeypatch):
    """Stand-ins for an OS without ``mincore`` (Windows) and one where it fails: the reader keeps
    to the page cache, as before."""
    from lib_merge.io import page_cache

    path = evicted(make(tmp_path / "m.safetensors", specs=DIRECT_SPECS, seed=8))
    libc = page_cache._libc()
    monkeypatch.setattr(page_cache, "_libc", lambda: None)
    with open_checkpoint(path) as reader:
        assert reader.in_page_cache() is True

    class FailingMincore:
        mmap, munmap = libc.mmap, libc.munmap

        @staticmethod
        def mincore(*args):
            return -1

    monkeypatch.setattr(page_cache, "_libc", FailingMincore)
    with open_checkpoint(path) as reader:
        assert reader.in_page_cache() is True


def test_a_file_hashed_from_the_disk_is_read_past_the_page_cache(tmp_path):
    """The real page cache: a file it does not hold is hashed right (two whole blocks and a tail
    not a whole page) and left out of it, so the merge after the hash reads it past it too; a file
    it holds is hashed through it, to the same digest."""
    from lib_merge.hosts import hash_file
    from lib_merge.io.page_cache import in_page_cache
    from lib_merge.io.sequential_reads import BLOCK

    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(2 * BLOCK + 12345))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    size = path.stat().st_size
    assert hash_file(path) == expected  # from the page cache
    if in_page_cache(evicted(path), 0, size):
        pytest.skip("this filesystem keeps evicted pages, or cannot tell")
    assert hash_file(path) == expected
    assert not in_page_cache(path, 0, size)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert hash_file(evicted(empty)) == hashlib.sha256(b"").hexdigest()


def test_blocks_left_unread_and_a_failed_read_past_the_page_cache(tmp_path, monkeypatch):
    """A reader that stops early frees the buffers; stand-in for a disk error: preadv fails with
    EIO, and the message names the file."""
    from lib_merge.io.sequential_reads import BLOCK, file_blocks

    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(3 * BLOCK))
    blocks = file_blocks(evicted(path))
    assert bytes(next(blocks)) == path.read_bytes()[:BLOCK]
    blocks.close()

    def broken(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", broken)
    monkeypatch.setattr("lib_merge.io.sequential_reads.in_page_cache", lambda *args: False)
    monkeypatch.setattr("lib_merge.io.sequential_reads.open_direct", lambda path: os.open(path, os.O_RDONLY))
    with pytest.raises(InputError, match=r"model\.safetensors: cannot be read \(Input/output error\)"):
        list(file_blocks(path))


def test_a_failed_read_past_the_page_cache_names_the_file(tmp_path, monkeypatch):
    """Stand-in for a disk error: preadv fails with EIO once the reader is set up."""
    path = make(tmp_path / "m.safetensors", specs=DIRECT_SPECS, seed=6)
    with direct_reader(path, monkeypatch) as reader:

        def broken(*args):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "preadv", broken)
        reader.prefetch("block.2.weight")
        for key in ("block.2.weight", "block.3.weight"):  # asked ahead, and not
            with pytest.raises(InputError, match=r"m\.safetensors: cannot be read \(Input/output error\)"):
                reader[key]
