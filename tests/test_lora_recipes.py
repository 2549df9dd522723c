"""LoRAs as recipe nodes: a recipe merges models and bakes LoRAs in one pass, a baked file replays
from its own recipe, and LoRA names resolve in the LoRA folder only."""

from __future__ import annotations

import pytest
import torch
from cli_runner import run_cli
from conftest import SD15, assert_within_one_ulp, load, make
from make_lora import SD15_KOHYA, kohya_lora

from lib_merge import merge
from lib_merge.errors import InputError, RequestError
from lib_merge.hosts import FolderHost
from lib_merge.recipe import ModelRef, node_from_dict, request_from_recipe


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def folders(tmp_path):
    models, loras = tmp_path / "models", tmp_path / "Lora"
    models.mkdir()
    loras.mkdir()
    make(models / "a.safetensors", SD15, seed=1)
    make(models / "b.safetensors", SD15, seed=2)
    kohya_lora(loras / "style.safetensors", SD15_KOHYA, SD15, alpha=1.0)
    return models, loras


def _change(lora_path) -> dict[str, torch.Tensor]:
    """Each patched key's float64 change from the file itself: up @ down * alpha / rank."""
    tensors, changes = load(lora_path), {}
    for name, key in SD15_KOHYA.items():
        up = tensors[f"{name}.lora_up.weight"].double().flatten(1)
        down = tensors[f"{name}.lora_down.weight"].double()
        alpha = tensors[f"{name}.alpha"].item()
        changes[key] = torch.einsum("or,r...->o...", up, down).reshape(SD15[key].shape) * alpha / down.shape[0]
    return changes


SOUP_AND_LORA = {
    "merge_lab_recipe": 1,
    "merge": {
        "method": "add_delta",
        "models": [
            {"method": "weighted_sum", "models": ["a.safetensors", "b.safetensors"], "params": {"alpha": 0.25}},
            {"lora": "style.safetensors"},
        ],
        "params": {"alpha": 0.8},
    },
    "output": {"dtype": "fp32"},
}


def test_a_recipe_merges_models_and_bakes_a_lora_in_one_pass(folders):
    models, loras = folders
    host = FolderHost(models, lora_dir=loras, device="cpu")
    result = merge(request_from_recipe(SOUP_AND_LORA, custom_name="soup-style"), host)
    a, b, out = load(models / "a.safetensors"), load(models / "b.safetensors"), load(result.path)
    change = _change(loras / "style.safetensors")
    for key in a:
        if "model" not in key or not a[key].is_floating_point():  # the built-in's rule: these are A's
            assert torch.equal(out[key], a[key].to(out[key].dtype)), key
            continue
        expected = 0.75 * a[key].double() + 0.25 * b[key].double() + 0.8 * change.get(key, 0)
        assert_within_one_ulp(out[key], expected.float(), key)
    lora_entry = result.recipe["merge_lab_recipe"]["merge"]["models"][1]
    assert lora_entry["lora"] == "style.safetensors" and len(lora_entry["sha256"]) == 64


def test_a_baked_file_replays_from_its_own_recipe_byte_for_byte(folders, tmp_path):
    models, loras = folders
    host = FolderHost(models, lora_dir=loras, device="cpu")
    first = merge(request_from_recipe(SOUP_AND_LORA, custom_name="soup-style"), host)
    again = tmp_path / "replayed.safetensors"
    folders_given = ["--models", str(models), "--loras", str(loras)]
    done = run_cli("replay", first.path, *folders_given, "--device", "cpu", "-o", again)
    assert done.returncode == 0, done.stderr
    assert again.read_bytes() == first.path.read_bytes()
    # Without the LoRA folder the LoRA is not found among the models: refused, naming it, nothing written.
    missing = tmp_path / "missing.safetensors"
    refused = run_cli("replay", first.path, "--models", models, "-o", missing)
    assert refused.returncode == 1 and "style.safetensors: no such LoRA" in refused.stderr
    assert not missing.exists()


def test_a_changed_lora_under_the_same_name_is_refused_by_its_hash(folders, tmp_path):
    models, loras = folders
    host = FolderHost(models, lora_dir=loras, device="cpu")
    first = merge(request_from_recipe(SOUP_AND_LORA, custom_name="soup-style"), host)
    kohya_lora(loras / "style.safetensors", SD15_KOHYA, SD15, alpha=1.0, seed=9)
    with pytest.raises(InputError, match="different file"):
        merge(request_from_recipe(first.recipe["merge_lab_recipe"], output_path=str(tmp_path / "x.safetensors")), host)


@pytest.mark.parametrize(
    ("merge_node", "message"),
    [
        (
            {"method": "weighted_sum", "models": ["a.safetensors", {"lora": "style.safetensors"}]},
            "merge.models[1]: a LoRA is a change to a model, baked with add_delta",
        ),
        (
            {"method": "add_delta", "models": [{"lora": "style.safetensors"}, "a.safetensors"]},
            "merge.models[0]: a LoRA is a change to a model",
        ),
        (
            {"method": "add_delta", "models": ["a.safetensors", {"lora": "x.safetensors", "model": "y"}]},
            "merge.models[1].lora: unknown field (a model has model and sha256)",
        ),
    ],
)
def test_a_lora_anywhere_but_add_delta_s_change_is_refused_by_field(merge_node, message):
    with pytest.raises(RequestError) as err:
        node_from_dict(merge_node).validate()
    assert str(err.value).startswith(message)


def test_lora_names_resolve_inside_the_lora_folder_only(folders, tmp_path):
    models, loras = folders
    (tmp_path / "outside.safetensors").write_bytes((loras / "style.safetensors").read_bytes())
    host = FolderHost(models, lora_dir=loras, device="cpu")
    assert host.loras() == ["style.safetensors"]
    assert host.resolve_lora("style.safetensors").lora
    for name in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "a.safetensors"):
        with pytest.raises((InputError, RequestError)):
            host.resolve_lora(name)
    with pytest.raises(InputError, match="no LoRA folder"):
        FolderHost(models).resolve_lora("style.safetensors")


def test_a_name_used_as_model_and_as_lora_is_refused(folders):
    models, loras = folders
    (loras / "a.safetensors").write_bytes((loras / "style.safetensors").read_bytes())
    recipe = {"merge": {"method": "add_delta", "models": ["a.safetensors", {"lora": "a.safetensors"}]}}
    with pytest.raises(RequestError, match="named both as a model and as a LoRA"):
        merge(request_from_recipe(recipe), FolderHost(models, lora_dir=loras, device="cpu"))


def test_with_refs_keeps_a_lora_a_lora():
    node = node_from_dict({"method": "add_delta", "models": ["a", {"lora": "l"}]})
    renamed = node.with_refs({"l": ModelRef("sub/l.safetensors", "ab" * 32)})
    assert renamed.inputs[1] == ModelRef("sub/l.safetensors", "ab" * 32, lora=True)
    assert renamed.to_dict()["models"][1] == {"lora": "sub/l.safetensors", "sha256": "ab" * 32}


def test_a_bake_is_named_like_the_builtin_names_merges(folders):
    """``model + 0.8(lora)`` per LoRA baked in, so bakes at two ratios never take one name (nor one
    name in a Try's infotext); a bake over a merge keeps the generic name."""
    from lib_merge.plan import make_plan

    models, loras = folders
    host = FolderHost(models, lora_dir=loras, device="cpu")
    chain = {
        "method": "add_delta",
        "models": ["a.safetensors", {"lora": "style.safetensors"}],
        "params": {"alpha": 0.8},
    }
    twice = {"method": "add_delta", "models": [chain, {"lora": "style.safetensors"}], "params": {"alpha": -0.25}}
    for tree, name in ((chain, "a + 0.8(style)"), (twice, "a + 0.8(style) + -0.25(style)")):
        plan = make_plan(request_from_recipe({"merge": tree}), host, hash_inputs=False)
        plan.close()
        assert plan.output.name == f"{name}.safetensors"
    plan = make_plan(request_from_recipe(SOUP_AND_LORA), host, hash_inputs=False)
    plan.close()
    assert plan.output.name == "add_delta(a, b, style).safetensors"
