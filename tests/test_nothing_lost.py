"""Bad input and interruptions: a clear message naming the culprit, no partial file, inputs untouched."""

import contextlib
import hashlib
import os
import pickle
import uuid

import pytest
import torch
from conftest import SD15, load, make

from lib_merge import (
    CancelledError,
    FolderHost,
    InputError,
    MergeRequest,
    OutputError,
    RequestError,
    UnsafePickleError,
    merge,
)
from lib_merge import engine as engine_module
from lib_merge import plan as plan_module
from lib_merge.io import mapped_writer
from lib_merge.synthetic import layout, scaled


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_missing_input_names_it(host, models):
    with pytest.raises(InputError, match="missing.safetensors: no such checkpoint"):
        merge(MergeRequest("a.safetensors", "missing.safetensors"), host)


def test_truncated_input_is_refused_before_writing(host, models):
    data = (models / "b.safetensors").read_bytes()
    (models / "cut.safetensors").write_bytes(data[: len(data) - 100])
    before = digests(models)
    with pytest.raises(InputError, match="cut.safetensors: truncated: key"):
        merge(MergeRequest("a.safetensors", "cut.safetensors"), host)
    assert digests(models) == before


def test_malicious_pickle_input_is_refused(host, models, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(models / "evil.ckpt", "wb") as file:
        pickle.dump({"state_dict": {"w": Payload()}}, file)
    with pytest.raises(UnsafePickleError, match="evil.ckpt: refused"):
        merge(MergeRequest("a.safetensors", "evil.ckpt"), host)
    assert not marker.exists()


def test_add_difference_without_c_uses_the_builtins_message(host):
    with pytest.raises(RequestError, match=r"Interpolation method \(Add difference\) requires a tertiary model"):
        merge(MergeRequest("a.safetensors", "b.safetensors", interp_method="Add difference"), host)
    with pytest.raises(RequestError, match="requires a secondary model"):
        merge(MergeRequest("a.safetensors"), host)
    with pytest.raises(RequestError, match="requires a primary model"):
        merge(MergeRequest(""), host)


def test_existing_output_is_refused_unless_overwrite(host, models):
    first = merge(MergeRequest("a.safetensors", "b.safetensors", custom_name="out"), host)
    stamp = first.path.read_bytes()
    with pytest.raises(OutputError, match="out.safetensors: already exists"):
        merge(MergeRequest("a.safetensors", "b.safetensors", multiplier=0.9, custom_name="out"), host)
    assert first.path.read_bytes() == stamp
    second = merge(
        MergeRequest("a.safetensors", "b.safetensors", multiplier=0.9, custom_name="out", overwrite=True), host
    )
    assert second.path.read_bytes() != stamp


def test_an_input_is_never_overwritten_even_with_overwrite(host, models):
    before = digests(models)
    for name in ("a", "b"):
        with pytest.raises(OutputError, match=f"{name}.safetensors: is one of the inputs"):
            merge(MergeRequest("a.safetensors", "b.safetensors", custom_name=name, overwrite=True), host)
    assert digests(models) == before


def test_inputs_are_never_modified_by_any_merge(host, models, tmp_path):
    vae = make(
        models / "vae.safetensors", specs={k[18:]: v for k, v in SD15.items() if k.startswith("first_stage_model.")}
    )
    before = {**digests(models), "vae": hashlib.sha256(vae.read_bytes()).hexdigest()}
    merge(
        MergeRequest(
            "a.safetensors", "b.safetensors", "c.safetensors", "Add difference", 1.3, True, bake_in_vae=vae.name
        ),
        host,
    )
    merge(MergeRequest("a.safetensors", "b.safetensors", multiplier=-1, checkpoint_format="ckpt"), host)
    after = {k: v for k, v in digests(models).items() if k in before}
    assert {**after, "vae": hashlib.sha256(vae.read_bytes()).hexdigest()} == before


def leftovers(folder):
    return [p.name for p in folder.iterdir() if "merge-lab" in p.name or p.name.startswith("0.")]


def test_ctrl_c_mid_merge_leaves_no_file(host, models):
    def interrupt(event):
        if event.keys_done == 50:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(MergeRequest("a.safetensors", "b.safetensors"), host, progress=interrupt)
    assert leftovers(models) == []


def test_cancel_between_tensors_leaves_no_file(host, models):
    seen = []
    with pytest.raises(CancelledError, match="nothing was written"):
        merge(
            MergeRequest("a.safetensors", "b.safetensors"),
            host,
            progress=seen.append,
            should_stop=lambda: len(seen) >= 10,
        )
    assert len(seen) == 10
    assert leftovers(models) == []


def test_not_enough_space_is_refused_before_writing(models, tmp_path, small_disk):
    bigger = scaled(layout("sd15"), max_dim=32)  # about 5 MB: more than the 1 MiB disk
    make(models / "x.safetensors", specs=bigger, seed=1)
    make(models / "y.safetensors", specs=bigger, seed=2)
    host = FolderHost(models, output_dir=small_disk, hash_cache=tmp_path / "h.json", device="cpu")
    with pytest.raises(OutputError, match="not enough free space"):
        merge(MergeRequest("x.safetensors", "y.safetensors"), host)
    assert list(small_disk.iterdir()) == []


def fill_after_the_first_key(filler):
    """A progress callback: another program takes every free byte once the merge is under way."""

    def fill(event):
        if event.keys_done == 1:
            with open(filler, "ab", buffering=0) as file, contextlib.suppress(OSError):
                while True:
                    file.write(b"\0" * 4096)

    return fill


def test_space_is_reserved_first_so_a_disk_filling_up_mid_merge_does_not_break_it(models, tmp_path, small_disk):
    host = FolderHost(models, output_dir=small_disk, hash_cache=tmp_path / "h.json", device="cpu")
    filler = small_disk / "filler"
    filler.touch()
    result = merge(MergeRequest("a.safetensors", "b.safetensors"), host, progress=fill_after_the_first_key(filler))
    assert sorted(p.name for p in small_disk.iterdir()) == sorted([filler.name, result.path.name])
    assert filler.stat().st_size > 0  # the other program did fill the disk
    assert result.sha256 == hashlib.sha256(result.path.read_bytes()).hexdigest()
    elsewhere = FolderHost(models, hash_cache=tmp_path / "h.json", device="cpu")
    reference = load(merge(MergeRequest("a.safetensors", "b.safetensors", custom_name="reference"), elsewhere).path)
    merged = load(result.path)
    assert merged.keys() == reference.keys() and all(torch.equal(merged[k], reference[k]) for k in reference)


def test_a_disk_filled_after_the_preflight_is_refused_before_merging(models, tmp_path, small_disk, monkeypatch):
    """The preflight's free-space probe is a stand-in reporting plenty, as if another program took the
    space between the preflight and the first byte; the reservation itself meets the real full disk."""
    monkeypatch.setattr(plan_module, "_free_bytes", lambda folder: 1 << 40)
    bigger = scaled(layout("sd15"), max_dim=32)  # about 5 MB: more than the 1 MiB disk
    make(models / "x.safetensors", specs=bigger, seed=1)
    make(models / "y.safetensors", specs=bigger, seed=2)
    host = FolderHost(models, output_dir=small_disk, hash_cache=tmp_path / "h.json", device="cpu")
    seen = []
    with pytest.raises(OutputError, match=r"disk full, [\d,]+ bytes for .* could not be reserved.*nothing was saved"):
        merge(MergeRequest("x.safetensors", "y.safetensors"), host, progress=seen.append)
    assert seen == []  # refused before the first tensor
    assert list(small_disk.iterdir()) == []


def test_disk_full_while_writing_gives_a_clear_message_and_no_temp_file(models, tmp_path, small_disk, monkeypatch):
    """Stand-in for a filesystem that cannot preallocate (tmpfs can): the engine streams with write(),
    and a disk filled by another program mid-merge makes those writes fail."""
    monkeypatch.setattr(mapped_writer, "_FALLOCATE", None)
    host = FolderHost(models, output_dir=small_disk, hash_cache=tmp_path / "h.json", device="cpu")
    filler = small_disk / f"filler-{uuid.uuid4().hex}"
    filler.touch()
    with pytest.raises(OutputError, match="disk full while writing"):
        merge(MergeRequest("a.safetensors", "b.safetensors"), host, progress=fill_after_the_first_key(filler))
    assert [p.name for p in small_disk.iterdir()] == [filler.name]


def test_out_of_device_memory_falls_back_to_the_cpu(host, models, monkeypatch):
    """Stand-in for a GPU (none here): the device step raises torch's OutOfMemoryError for every tensor."""

    def out_of_memory(self, job, out):
        raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(engine_module._Compute, "_on_device", out_of_memory)
    monkeypatch.setattr(host, "device", lambda: "meta")  # the host's device: a request may name only real ones
    notes = []
    result = merge(
        MergeRequest("a.safetensors", "b.safetensors", custom_name="gpu"),
        host,
        progress=lambda e: e.note and notes.append(e.note),
    )
    reference = merge(MergeRequest("a.safetensors", "b.safetensors", device="cpu", custom_name="cpu"), host)
    assert notes and "computed on the CPU" in notes[0]
    fallen_back, on_cpu = load(result.path), load(reference.path)
    assert fallen_back.keys() == on_cpu.keys()
    assert all(torch.equal(fallen_back[k], on_cpu[k]) for k in on_cpu)
