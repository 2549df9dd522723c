"""Hostile and broken files, killed merges, .ckpt size: refused in one line, never quoting the file."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_merge import FolderHost, InputError, MergeRequest, OutputError, UnsafePickleError, merge
from lib_merge.io.formats import open_checkpoint
from lib_merge.io.readers import DTYPES, TensorSpec
from lib_merge.io.writer import CkptWriter, TempFile, ckpt_size, remove_leftovers, safetensors_header
from lib_merge.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
ENTRY = {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}
TEXT = json.dumps(ENTRY)


def safetensors_file(path: Path, header: dict | str, data: bytes = b"\0" * 16) -> Path:
    """A .safetensors file with exactly this header (a dict, or raw JSON text) and data."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode("utf-8", "surrogatepass")
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def refusal(path: Path) -> str:
    """The message opening ``path`` is refused with; always a single line."""
    with pytest.raises(InputError) as caught:
        open_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message, message
    assert str(path) in message
    return message


# 1. Header validation


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"w": ENTRY, "v": {**ENTRY, "data_offsets": [4, 12]}}, "keys w and v share data bytes"),
        ({"w": {**ENTRY, "data_offsets": [-8, 0]}}, "at key w (data_offsets must be two whole numbers"),
        (
            {"w": {**ENTRY, "data_offsets": [16, 24]}},
            "truncated: key w ends at data byte 24 but the file holds only 16",
        ),
        ({"w": {**ENTRY, "data_offsets": [8, 0]}}, "at key w (data_offsets end before they begin)"),
        ({"w": {**ENTRY, "data_offsets": [0.0, 8]}}, "at key w (data_offsets must be two whole numbers"),
        ({"w": {**ENTRY, "data_offsets": [False, 8]}}, "at key w (data_offsets must be two whole numbers"),
        ({"w": {**ENTRY, "data_offsets": ["0", 8]}}, "at key w (data_offsets must be two whole numbers"),
        ({"w": {**ENTRY, "data_offsets": [0, 8, 8]}}, "at key w (data_offsets must be two whole numbers"),
        ({"w": {**ENTRY, "shape": [2.5]}}, "at key w (shape must be a list"),
        ({"w": {**ENTRY, "shape": [4.0]}}, "at key w (shape must be a list"),
        ({"w": {**ENTRY, "shape": [True, 4]}}, "at key w (shape must be a list"),
        ({"w": {**ENTRY, "shape": ["4"]}}, "at key w (shape must be a list"),
        ({"w": {**ENTRY, "shape": [-4]}}, "at key w (shape must be a list"),
        ({"w": {**ENTRY, "shape": [2**49]}}, "at key w (shape must be a list"),
        ({"w": {**ENTRY, "shape": "4"}}, "at key w (shape must be a list"),
        ({"w": {**ENTRY, "shape": [1] * 65}}, "at key w (shape must be a list of at most 64"),
        # A zero-size tensor: no bytes, yet torch.empty would fail with a C++ stack trace.
        ({"w": {**ENTRY, "shape": [0, 2**63], "data_offsets": [0, 0]}}, "at key w (shape must be a list"),
        ({"w": {**ENTRY, "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}}, "at key w (its shape is too large"),
        ({"w": {**ENTRY, "shape": [2**24, 2**24, 2**24]}}, "at key w (its shape is too large"),
        ({"w": {**ENTRY, "shape": [5]}}, "at key w (shape [5] of F16 needs 10 bytes, data_offsets give 8)"),
        ({"w": {**ENTRY, "dtype": "F128"}}, "at key w (missing or unknown dtype"),
        ({"w": {**ENTRY, "dtype": ["F16"]}}, "at key w (missing or unknown dtype"),
        ({"w": [0, 8]}, "at key w (not an object"),
        ({"w": ENTRY, "__metadata__": {"a": 1}}, "__metadata__ must map names to strings"),
    ],
)
def test_a_bad_header_entry_is_refused_in_one_line_naming_the_key(tmp_path, header, message):
    assert message in refusal(safetensors_file(tmp_path / "x.safetensors", header))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f'{{"w": {TEXT}, "w": {TEXT}}}', "key w appears twice"),
        ('{"w": {"dtype": "F16", "dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}', "key dtype appears twice"),
        (f'{{"__metadata__": {{"a": "1", "a": "2"}}, "w": {TEXT}}}', "key a appears twice"),
        (f'{{"w": {TEXT}, "x": {"[" * 100_000 + "]" * 100_000}}}', "nested too deeply"),
        (f'{{"w": {TEXT}, "x": {"9" * 5000}}}', "a number too long to read"),
        (f'{{"\\ud800": {TEXT}}}', "is not valid Unicode"),
        ("[1, 2]", "corrupt safetensors header (not a JSON object)"),
        ('{"w": ', "(not JSON, at header byte 6)"),
    ],
)
def test_a_crafted_header_is_refused_in_one_line(tmp_path, text, message):
    assert message in refusal(safetensors_file(tmp_path / "x.safetensors", text))


def test_a_key_with_a_line_break_is_shown_escaped_on_one_line(tmp_path):
    path = safetensors_file(tmp_path / "x.safetensors", {"a\nb" + "c" * 500: {**ENTRY, "shape": [3]}})
    message = refusal(path)
    assert "at key 'a\\nb" in message and "..." in message and len(message) < len(str(path)) + 400


def test_tensors_that_only_touch_or_hold_no_bytes_are_not_overlaps(tmp_path):
    header = {
        "w": ENTRY,
        "v": {**ENTRY, "data_offsets": [8, 16]},
        "empty": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]},
    }
    path = safetensors_file(tmp_path / "x.safetensors", header, bytes(range(16)))
    with open_checkpoint(path) as reader:
        assert reader["empty"].shape == (0, 3)
        assert reader["v"].view(torch.uint8).tolist() == list(range(8, 16))


# 2. Error text never quotes a file that is not a checkpoint

SECRET = b"root:x:0:0:root:/root:/bin/bash\nhunter2-password\n"


def assert_quotes_nothing_of(message: str, content: bytes) -> None:
    """No run of 4 bytes from ``content``, its first 8 bytes as a number, or any byte value in hex."""
    assert str(int.from_bytes(content[:8], "little")) not in message
    assert "0x" not in message and "position" not in message and "load key" not in message
    text = content.decode("latin-1")
    leaks = {text[i : i + 4] for i in range(len(text) - 3)} & {message[i : i + 4] for i in range(len(message) - 3)}
    assert not {leak for leak in leaks if leak.strip()}, (message, leaks)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", ".pt", ".bin"])
def test_a_text_file_is_refused_without_quoting_it(tmp_path, suffix):
    path = tmp_path / f"passwd{suffix}"
    path.write_bytes(SECRET)
    message = refusal(path)
    assert "not a safetensors file" in message or "not a checkpoint" in message
    assert_quotes_nothing_of(message.replace(str(path), ""), SECRET)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b'{"hunter2\xff": 1}', "(not UTF-8 text)"),
        (b'{"w": {"dtype": "hunter2', "(not JSON, at header byte 16)"),
        (b'{"w": {"dtype": "hunter2", "shape": [4], "data_offsets": [0, 8]}}', "(missing or unknown dtype"),
        (b'{"w": {"dtype": "F16", "shape": ["hunter2"], "data_offsets": [0, 8]}}', "(shape must be a list"),
    ],
)
def test_a_broken_header_is_refused_without_quoting_its_bytes(tmp_path, header, message):
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    shown = refusal(path)
    assert message in shown
    assert "hunter2" not in shown and "xff" not in shown and "position" not in shown and "{" not in shown


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x80\x02\xff\xfe\xfd" * 4, "refused: not a checkpoint (unreadable pickle); nothing in it was run"),
        (b"chunter2\nsecret\n.", "refused: not a checkpoint (unreadable pickle); nothing in it was run"),
        (b"\x80\x02X\x04\x00\x00\x00ab\xff\xfe.", "not a checkpoint, or corrupt or truncated"),
        (b"PK\x03\x04" + SECRET, "not a checkpoint, or corrupt or truncated"),
    ],
)
def test_a_broken_pickle_is_refused_without_quoting_its_bytes(tmp_path, content, message):
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    shown = refusal(path)
    assert message in shown
    assert "hunter2" not in shown and "255" not in shown and "operand" not in shown
    assert_quotes_nothing_of(shown.replace(str(path), ""), content)


def test_a_truncated_ckpt_is_refused_without_torchs_text(tmp_path):
    torch.save({"w": torch.ones(100)}, tmp_path / "good.ckpt")
    data = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    message = refusal(tmp_path / "cut.ckpt")
    assert message.endswith("cut.ckpt: not a checkpoint, or corrupt or truncated (torch cannot read it)")


class System:
    def __reduce__(self):
        return (os.system, ("true",))


class Print:
    def __reduce__(self):
        return (print, ("ran",))


@pytest.mark.parametrize(("payload", "name"), [(System(), os.system.__module__ + ".system"), (Print(), "print")])
def test_a_pickle_asking_for_code_is_refused_naming_the_class(tmp_path, payload, name):
    torch.save({"state_dict": {"w": payload}}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafePickleError) as caught:
        open_checkpoint(tmp_path / "evil.ckpt")
    message = str(caught.value)
    assert "evil.ckpt: refused: this pickle needs more than tensors to load, and its code was not run " in message
    assert f"(Unsupported global: GLOBAL {name})" in message and "\n" not in message


def test_a_legacy_ckpt_of_tensors_still_loads(tmp_path):
    """The legacy (non-zip) format takes the second torch.load: the wider catch must not stop it."""
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    with open_checkpoint(tmp_path / "old.ckpt") as reader:
        assert reader.keys() == ["w"] and torch.equal(reader["w"], torch.ones(2))


# 3. Temp files of killed merges

HOLDER = """
import sys, time
from pathlib import Path
from lib_merge.io.writer import TempFile
temp = TempFile(Path(sys.argv[1]), False)
temp.write_only(memoryview(b"\\0" * (1 << 20)))
print(temp.temp, flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def temp_file_held_by_another_process(output: Path):
    """A real process writing ``output``: yields (process, its temp file's path)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(output)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        temp = Path(process.stdout.readline().strip())
        assert temp.name.startswith(f".{output.name}.") and temp.exists()
        yield process, temp
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


@pytest.fixture
def out_host(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return FolderHost(models, output_dir=out, hash_cache=tmp_path / "h.json", device="cpu")


def test_the_temp_file_of_a_killed_merge_is_removed_by_the_next_merge(out_host, tmp_path):
    out = tmp_path / "out"
    with temp_file_held_by_another_process(out / "big.safetensors") as (process, temp):
        process.kill()  # SIGKILL: no handler runs, the temp file stays
        process.wait()
        assert temp.exists() and temp.stat().st_size == 1 << 20
        result = merge(MergeRequest("a.safetensors", "b.safetensors"), out_host)
    assert sorted(p.name for p in out.iterdir()) == [result.path.name]


def test_the_temp_file_of_a_live_merge_is_left_alone(out_host, tmp_path):
    out = tmp_path / "out"
    with temp_file_held_by_another_process(out / "big.safetensors") as (process, temp):
        result = merge(MergeRequest("a.safetensors", "b.safetensors"), out_host)
        assert remove_leftovers(out) == []
        assert sorted(p.name for p in out.iterdir()) == sorted([result.path.name, temp.name])
        process.kill()
        process.wait()
        assert remove_leftovers(out) == [temp]
    assert [p.name for p in out.iterdir()] == [result.path.name]


def test_two_temp_files_of_one_process_in_one_folder_are_both_kept(tmp_path):
    first, second = TempFile(tmp_path / "x.safetensors", False), TempFile(tmp_path / "x.safetensors", False)
    try:
        assert remove_leftovers(tmp_path) == []
        assert first.temp.exists() and second.temp.exists() and first.temp != second.temp
    finally:
        first.discard()
        second.discard()
    assert list(tmp_path.iterdir()) == []


def test_only_unlocked_files_of_the_exact_temp_pattern_are_removed(tmp_path):
    abandoned = tmp_path / ".x.safetensors.0123abcd.merge-lab.tmp"
    kept = [
        tmp_path / "x.safetensors.0123abcd.merge-lab.tmp",  # not hidden
        tmp_path / ".x.safetensors.0123abcz.merge-lab.tmp",  # not 8 hex digits
        tmp_path / ".x.safetensors.0123abcd.merge-lab.tmp.bak",
        tmp_path / "notes.txt",
    ]
    for path in (abandoned, *kept):
        path.write_bytes(b"data")
    (tmp_path / ".d.0123abcd.merge-lab.tmp").mkdir()
    (tmp_path / ".l.0123abcd.merge-lab.tmp").symlink_to(tmp_path / "notes.txt")
    assert remove_leftovers(tmp_path) == [abandoned]
    assert not abandoned.exists() and all(path.exists() for path in kept)
    assert (tmp_path / ".d.0123abcd.merge-lab.tmp").is_dir()
    assert (tmp_path / ".l.0123abcd.merge-lab.tmp").is_symlink()
    assert remove_leftovers(tmp_path / "missing") == []


def test_a_temp_file_taken_by_a_cleaner_before_its_lock_is_made_again(tmp_path, monkeypatch):
    """Another process's cleanup runs between the temp file's creation and its lock: the writer sees
    that its name no longer names its file and takes a new name."""
    lock = TempFile._lock
    taken = []

    def cleaner_first(self):
        if not taken:
            taken.extend(remove_leftovers(tmp_path))
        return lock(self)

    monkeypatch.setattr(TempFile, "_lock", cleaner_first)
    temp = TempFile(tmp_path / "x.safetensors", False)
    try:
        assert len(taken) == 1 and taken[0] != temp.temp
        assert temp.temp.exists() and remove_leftovers(tmp_path) == []
    finally:
        temp.discard()


# 4. .ckpt output: its size is known before merging, and a full disk says so


def ckpt_specs(count: int, name_length: int, dtypes: list[torch.dtype]) -> list[tuple[str, TensorSpec]]:
    shapes = [(3,), (), (2, 5), (0, 7), (4, 1, 3, 2), (300,), (1, 7000), (6, 3, 3)]
    return [
        (f"{'k' * name_length}.{i}", TensorSpec(dtypes[i % len(dtypes)], shapes[i % len(shapes)])) for i in range(count)
    ]


@pytest.mark.parametrize(
    ("count", "name_length", "dtypes"),
    [
        (1, 1, [torch.float16]),
        (7, 200, [torch.float32]),
        (300, 40, [torch.bfloat16, torch.float16]),
        (1200, 60, list(DTYPES.values())),
    ],
)
def test_the_ckpt_estimate_bounds_the_real_file_closely(tmp_path, count, name_length, dtypes):
    specs = ckpt_specs(count, name_length, dtypes)
    writer = CkptWriter(tmp_path / "x.ckpt", specs)
    for key, spec in specs:
        writer.add(key, torch.zeros(spec.shape, dtype=spec.dtype))
    writer.finish()
    real = (tmp_path / "x.ckpt").stat().st_size
    assert real <= ckpt_size(specs) <= 1.1 * real + (64 << 10)


def test_the_plan_sizes_a_ckpt_output_as_torch_writes_it(host):
    request = MergeRequest("a.safetensors", "b.safetensors", checkpoint_format="ckpt")
    plan = make_plan(request, host)
    try:
        estimate = plan.output_bytes
        safetensors_layout = len(safetensors_header([(j.key, j.spec) for j in plan.jobs], None)) + sum(
            j.spec.nbytes for j in plan.jobs
        )
    finally:
        plan.close()
    real = merge(request, host).path.stat().st_size
    assert safetensors_layout < real <= estimate <= 1.1 * real + (64 << 10)


def test_a_disk_filling_up_while_a_ckpt_is_saved_gives_the_clear_message(models, tmp_path, small_disk):
    host = FolderHost(models, output_dir=small_disk, hash_cache=tmp_path / "h.json", device="cpu")
    filler = small_disk / "filler"
    filler.touch()

    def fill(event):  # another program takes all but 128 KiB once the merge is under way: torch.save
        if event.keys_done == 1:  # of the ~400 KB .ckpt then fails part way, not at its first write
            with open(filler, "ab", buffering=0) as file, contextlib.suppress(OSError):
                while True:
                    file.write(b"\0" * 4096)
            os.truncate(filler, filler.stat().st_size - (128 << 10))

    with pytest.raises(OutputError, match=r"disk full while writing .*\.ckpt \(.*\); nothing was saved$"):
        merge(MergeRequest("a.safetensors", "b.safetensors", checkpoint_format="ckpt"), host, progress=fill)
    assert [p.name for p in small_disk.iterdir()] == [filler.name]


def test_an_interrupt_inside_torch_save_is_not_turned_into_torchs_error(tmp_path, monkeypatch):
    specs = [("w", TensorSpec(torch.float16, (1000,)))]
    writer = CkptWriter(tmp_path / "x.ckpt", specs)
    writer.add("w", torch.ones(1000, dtype=torch.float16))
    calls = []

    def interrupted(self, data):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(TempFile, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        writer.finish()
    writer.abort()
    assert list(tmp_path.iterdir()) == []
