"""Merging into a loaded model's tensors (the "Try" path): the same tensors as the file, in place.

The model here is a plain torch module whose parameters carry the full SD1.5 key table's names
(shapes scaled down), held in float16 as the webui holds a UNet; no webui is involved.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SD15, load, make

from lib_merge import CancelledError, IncompatibleModelsError, MergeRequest, merge, merge_into
from lib_merge.recipe import recipe_dict, recipe_hash, request_from_recipe

DROPPED = "model.diffusion_model.out.2.bias"  # a key the loaded model lacks, reported as missing


def sd15_module(dtype=torch.float16, without=()) -> torch.nn.Module:
    """A module tree with a parameter at every SD1.5 key (VAE in float32, as the webui keeps it)."""
    root = torch.nn.Module()
    for key, spec in SD15.items():
        if key in without:
            continue
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        kind = torch.float32 if key.startswith("first_stage_model.") else dtype
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(spec.shape, dtype=kind), requires_grad=False))
    return root


def weighted(name="try", **options):
    return MergeRequest("a.safetensors", "b.safetensors", multiplier=0.35, custom_name=name, **options)


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
