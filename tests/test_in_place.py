"""Merging into a loaded model's tensors (the "Try" path): the same tensors as the file, in place.

The model here is a plain torch module whose parameters carry the full SD1.5 key table's names
(shapes scaled down), held in float16 as the webui holds a UNet; no webui is involved.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SD15, load, make
from image_host import sd15_module

from lib_merge import CancelledError, IncompatibleModelsError, InputCache, MergeError, MergeRequest, merge, merge_into
from lib_merge.recipe import recipe_dict, recipe_hash, request_from_recipe
from lib_merge.steps import SKIP_ON_MERGE

DROPPED = "model.diffusion_model.out.2.bias"  # a key the loaded model lacks, reported as missing


def weighted(name="try", multiplier=0.35, **options):
    return MergeRequest("a.safetensors", "b.safetensors", multiplier=multiplier, custom_name=name, **options)


def test_the_merge_lands_in_the_module_in_place_as_loading_the_file_would(host, models):
    module = sd15_module(without={DROPPED})
    storage = {k: p.data_ptr() for k, p in module.state_dict().items()}
    result = merge_into(weighted(), host, module.state_dict())

    saved = load(merge(weighted(), host).path)
    state = module.state_dict()
    assert result.missing == [DROPPED]
    assert {k: p.data_ptr() for k, p in state.items()} == storage  # the same tensors, written in place
    for key, tensor in state.items():
        assert torch.equal(tensor, saved[key].to(tensor.dtype)), key
    assert result.name == "try" and result.recipe["merge"]["method"] == "weighted_sum"


def test_what_was_tried_is_what_save_writes_byte_for_byte(host, models, tmp_path):
    """Try into tensors of the output's dtypes, then save the recipe the try returned: the file holds
    exactly the tried tensors, and it is byte-identical to merging the request straight to a file."""
    request = weighted(save_as_half=True)
    tried = {key: torch.empty(spec.shape, dtype=torch.float16) for key, spec in SD15.items()}
    result = merge_into(request, host, tried)
    assert result.missing == []

    saved = merge(request_from_recipe(result.recipe, output_path=str(tmp_path / "saved.safetensors")), host)
    direct = merge(request, host)
    assert saved.path.read_bytes() == direct.path.read_bytes()
    written = load(saved.path)
    assert written.keys() == tried.keys()
    assert all(torch.equal(written[key], tried[key]) for key in tried)


def test_a_try_writes_no_file_even_where_the_output_name_is_taken(host, models):
    make(models / "try.safetensors", seed=9)  # a file already bears the output's name
    before = sorted((p.name, p.stat().st_mtime_ns) for p in models.iterdir())
    merge_into(weighted(), host, sd15_module().state_dict())
    assert sorted((p.name, p.stat().st_mtime_ns) for p in models.iterdir()) == before


def test_a_model_of_another_shape_is_refused_naming_the_key(host, models):
    module = sd15_module()
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state = {**module.state_dict(), key: torch.zeros(1, 2)}
    with pytest.raises(IncompatibleModelsError, match=key.replace(".", r"\.")):
        merge_into(weighted(), host, state)


def test_a_cancelled_try_stops_between_tensors(host, models):
    calls = []
    with pytest.raises(CancelledError):
        merge_into(weighted(), host, sd15_module().state_dict(), should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert len(calls) == 4


def test_the_recipe_hash_follows_every_choice_of_the_merge(host, models):
    first = merge_into(weighted(), host, sd15_module().state_dict())
    again = merge_into(weighted(), host, sd15_module().state_dict())
    other = merge_into(
        MergeRequest("a.safetensors", "b.safetensors", multiplier=0.4, custom_name="try"),
        host,
        sd15_module().state_dict(),
    )
    assert first.recipe_hash == again.recipe_hash == recipe_hash(first.recipe)
    assert len(first.recipe_hash) == 10 and other.recipe_hash != first.recipe_hash
    # The inputs are named by sha256 in the recipe, so a changed file changes the hash too.
    assert all(ref["sha256"] for ref in first.recipe["merge"]["models"])
    assert first.recipe == recipe_dict(weighted(), request_from_recipe(first.recipe).root())


def test_a_sweep_reads_each_input_tensor_once_and_gets_the_same_tensors(host, models):
    """Three merges over one InputCache: the files are read during the first only, every result
    equals the uncached merge's, and the kept tensors are the files' values, unchanged."""
    requests = [weighted(multiplier=alpha) for alpha in (0.2, 0.5, 1.3)]
    before = {p.name: p.read_bytes() for p in models.iterdir()}
    with InputCache("cpu", ram_budget=1 << 30) as inputs:
        for index, request in enumerate(requests):
            cached, plain = sd15_module(), sd15_module()
            merge_into(request, host, cached.state_dict(), inputs=inputs)
            merge_into(request, host, plain.state_dict())
            expected = plain.state_dict()  # once: state_dict() walks the whole module
            assert all(torch.equal(t, expected[k]) for k, t in cached.state_dict().items())
            if index == 0:
                first_reads = inputs.reads
        # All of A (every output key starts from it) and the keys B takes part in, once each.
        merged = [key for key in SD15 if "model" in key and key != SKIP_ON_MERGE]
        assert first_reads == len(SD15) + len(merged) and inputs.reads == first_reads
        expected = sum(spec.nbytes for spec in SD15.values()) + sum(SD15[key].nbytes for key in merged)
        assert inputs.kept_bytes == expected
    assert {p.name: p.read_bytes() for p in models.iterdir()} == before


def test_what_does_not_fit_the_budget_is_streamed_again(host, models):
    biggest = max(spec.nbytes for spec in SD15.values())
    with InputCache("cpu", ram_budget=biggest) as inputs:
        for alpha in (0.2, 0.5):
            merge_into(weighted(multiplier=alpha), host, sd15_module().state_dict(), inputs=inputs)
        assert inputs.kept_bytes <= biggest
        assert 2 * len(SD15) < inputs.reads < 4 * len(SD15)  # some kept, the rest read at both merges


def test_a_replaced_input_file_is_read_afresh(host, models):
    with InputCache("cpu", ram_budget=1 << 30) as inputs:
        merge_into(weighted(), host, sd15_module().state_dict(), inputs=inputs)
        make(models / "b.safetensors", seed=7)
        module = sd15_module()
        merge_into(weighted(), host, module.state_dict(), inputs=inputs)
    expected = sd15_module()
    merge_into(weighted(), host, expected.state_dict())
    wanted = expected.state_dict()  # once: state_dict() walks the whole module
    assert all(torch.equal(t, wanted[k]) for k, t in module.state_dict().items())


def test_a_try_hashes_its_inputs_while_it_merges_not_before(host, models):
    """The first Try of a file used to wait for its sha256 (seconds per GB) before merging a byte.

    The host's hashing waits until the merge has reported progress: hashed first, it would time out.
    """
    import threading

    merging = threading.Event()
    hash_file = host.sha256

    def sha256_once_merging(checkpoint):
        assert merging.wait(timeout=30), "the inputs were hashed before the merge started"
        return hash_file(checkpoint)

    host.sha256 = sha256_once_merging
    module = sd15_module()
    result = merge_into(weighted(), host, module.state_dict(), progress=lambda _update: merging.set())
    saved = merge(weighted("saved"), host)  # hashes before writing (the recipe is in the file's header)
    refs = result.recipe["merge"]["models"]
    assert [ref["sha256"] for ref in refs] == [saved.recipe["merge_lab_recipe"]["merge"]["models"][i]["sha256"]
                                                for i in range(2)]  # fmt: skip
    assert all(len(ref["sha256"]) == 64 for ref in refs)


def test_a_recipe_that_names_hashes_is_checked_before_anything_is_merged(host, models):
    module = sd15_module()
    before = {k: t.clone() for k, t in module.state_dict().items()}
    recipe = recipe_dict(weighted())
    recipe["merge"]["models"][1] = {"model": "b.safetensors", "sha256": "0" * 64}
    with pytest.raises(MergeError, match="different file"):
        merge_into(request_from_recipe(recipe), host, module.state_dict())
    assert all(torch.equal(before[k], t) for k, t in module.state_dict().items())  # nothing written in
