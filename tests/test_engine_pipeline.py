"""How the engine shares the machine while it merges: torch's threads, pages made ahead of time."""

import os

import pytest
import torch
from conftest import load

from lib_merge import CancelledError, MergeRequest, merge
from lib_merge.io import mapped_writer


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(8)  # more than the merge may use on any machine with fewer than 10 cores
    yield
    torch.set_num_threads(before)


def test_the_merge_computes_on_all_cores_but_two_and_gives_torch_its_threads_back(host, models, threads):
    seen = []
    merge(MergeRequest("a.safetensors", "b.safetensors"), host, progress=lambda _: seen.append(torch.get_num_threads()))
    cores = len(os.sched_getaffinity(0))
    assert set(seen) == {max(1, min(8, cores - 2))}
    assert torch.get_num_threads() == 8


def test_torch_gets_its_threads_back_after_a_cancel_too(host, models, threads):
    with pytest.raises(CancelledError):
        merge(MergeRequest("a.safetensors", "b.safetensors"), host, should_stop=lambda: True)
    assert torch.get_num_threads() == 8


def test_a_kernel_that_cannot_make_pages_ahead_gives_the_same_file(host, models, monkeypatch):
    """Stand-in for a kernel older than 5.14, where madvise(MADV_POPULATE_WRITE) fails (this one has it)."""
    ahead = merge(MergeRequest("a.safetensors", "b.safetensors", custom_name="ahead"), host)
    calls = []
    monkeypatch.setattr(mapped_writer, "_MADVISE", lambda *args: calls.append(args) or -1)
    faulted = merge(MergeRequest("a.safetensors", "b.safetensors", custom_name="faulted"), host)
    assert len(calls) == 1  # it gave up after the first refusal
    a, b = load(ahead.path), load(faulted.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
