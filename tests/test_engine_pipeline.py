"""How the engine shares the machine while it merges: torch's threads, pages made ahead of time."""

import os

import pytest
import torch
from conftest import load

from lib_merge import CancelledError, MergeRequest, merge
from lib_merge.io import mapped_writer, staged_writer
from lib_merge.recipe import MergeNode, ModelRef


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(8)  # more than the merge may use on any machine with fewer than 10 cores
    yield
    torch.set_num_threads(before)


def threads_per_merged_key(request, host):
    seen = set()

    def note(event):
        if "diffusion_model" in event.key:
            seen.add(torch.get_num_threads())

    merge(request, host, progress=note)
    return seen


def test_an_elementwise_merge_computes_on_all_cores_but_two_and_gives_torch_its_threads_back(host, models, threads):
    seen = threads_per_merged_key(MergeRequest("a.safetensors", "b.safetensors"), host)
    assert seen == {max(1, min(8, len(os.sched_getaffinity(0)) - 2))}
    assert torch.get_num_threads() == 8


def test_a_whole_tensor_method_keeps_every_thread(host, models, threads):
    node = MergeNode("ties", tuple(ModelRef(f"{n}.safetensors") for n in "abc"), {"density": 0.5})
    assert threads_per_merged_key(MergeRequest("a.safetensors", tree=node), host) == {8}
    assert torch.get_num_threads() == 8


def test_torch_gets_its_threads_back_after_a_cancel_too(host, models, threads):
    with pytest.raises(CancelledError):
        merge(MergeRequest("a.safetensors", "b.safetensors"), host, should_stop=lambda: True)
    assert torch.get_num_threads() == 8


def test_a_kernel_that_cannot_make_pages_ahead_gives_the_same_file(host, models, monkeypatch):
    """Stand-ins: an OS without O_DIRECT, so the output is mapped, and a kernel older than 5.14,
    where madvise(MADV_POPULATE_WRITE) fails (this one has both)."""
    monkeypatch.setattr(staged_writer, "O_DIRECT", None)
    ahead = merge(MergeRequest("a.safetensors", "b.safetensors", custom_name="ahead"), host)
    calls = []
    monkeypatch.setattr(mapped_writer, "_MADVISE", lambda *args: calls.append(args) or -1)
    faulted = merge(MergeRequest("a.safetensors", "b.safetensors", custom_name="faulted"), host)
    assert len(calls) == 1  # it gave up after the first refusal
    a, b = load(ahead.path), load(faulted.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def keys_asked_for_before_the_first_is_done(request, host, monkeypatch) -> tuple[list[str], dict[str, int]]:
    """The keys whose pages the merge asked A's file for before it finished its first key, and all
    the keys it wrote with their sizes there, in order."""
    from lib_merge.io.readers import SafetensorsReader

    asked, done = [], []
    original = SafetensorsReader.prefetch

    def prefetch(self, key):
        if self.path.name == "a.safetensors" and not done:
            asked.append(key)
        return original(self, key)

    monkeypatch.setattr(SafetensorsReader, "prefetch", prefetch)
    output = load(merge(request, host, progress=lambda event: done.append(event.key)).path)
    return asked, {key: output[key].nbytes for key in done}


@pytest.mark.parametrize("budget", ["none", "some", "all"])
def test_the_inputs_are_asked_for_a_byte_budget_ahead(host, models, monkeypatch, budget):
    """While the first key is merged, the keys after it are asked for in order until their output
    bytes reach PREFETCH_BYTES: the next key only with no budget, all of them with a big one."""
    from lib_merge import engine

    fractions = {"none": 0, "some": 1 / 3, "all": 1}
    monkeypatch.setattr(engine, "PREFETCH_BYTES", 0)
    asked, sizes = keys_asked_for_before_the_first_is_done(
        MergeRequest("a.safetensors", "b.safetensors"), host, monkeypatch
    )
    keys = list(sizes)
    assert asked == keys[1:2]
    limit = int(sum(sizes[key] for key in keys[1:]) * fractions[budget])
    monkeypatch.setattr(engine, "PREFETCH_BYTES", limit)
    asked, _ = keys_asked_for_before_the_first_is_done(
        MergeRequest("a.safetensors", "b.safetensors", custom_name=budget), host, monkeypatch
    )
    assert asked == keys[1 : len(asked) + 1]  # in the order they are merged, from the next one on
    assert sum(sizes[key] for key in asked) >= limit  # the budget is filled ...
    assert sum(sizes[key] for key in asked[:-1]) < max(limit, 1)  # ... and not passed by more than a key
    if budget == "all":
        assert asked == keys[1:]
