"""Recipes end to end on real files: trees of methods, per-block values, replay, and bad input."""

import hashlib
import json

import pytest
import torch
from conftest import SD15, UNET_IN, assert_within_one_ulp, load, make, variant_specs
from test_cli import cli

from lib_merge import InputError, MergeRequest, RequestError, merge
from lib_merge.blocks import block_of
from lib_merge.recipe import MergeNode, ModelRef, dump_recipe, parse_recipe, recipe_dict, request_from_recipe

IN04_KEY = "model.diffusion_model.input_blocks.4.0.in_layers.2.weight"
OUT09_KEY = "model.diffusion_model.output_blocks.9.1.proj_in.weight"
TEXT_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
VAE_KEY = "first_stage_model.decoder.conv_in.weight"


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def tree(method, *names, params=None, blocks=None):
    inputs = tuple(n if isinstance(n, MergeNode) else ModelRef(n) for n in names)
    return MergeNode(method, inputs, params or {}, blocks or {})


def request(node, name="out", **options):
    return MergeRequest(next(node.models()).name, tree=node, custom_name=name, **options)


def inputs(models, *names):
    return [{k: v.double() for k, v in load(models / f"{n}.safetensors").items()} for n in names]


def test_a_soup_of_three_files_is_their_mean(host, models):
    result = merge(request(tree("soup", "a.safetensors", "b.safetensors", "c.safetensors")), host)
    a, b, c = inputs(models, "a", "b", "c")
    merged = load(result.path)
    for key in (TEXT_KEY, IN04_KEY, VAE_KEY):
        assert_within_one_ulp(merged[key], (a[key] + b[key] + c[key]) / 3, key)
    assert result.path.name == "out.safetensors"


def test_a_nested_tree_is_evaluated_key_by_key_without_intermediate_files(host, models):
    inner = tree("soup", "b.safetensors", "c.safetensors", params={"weights": [3, 1]})
    node = tree("weighted_sum", "a.safetensors", inner, params={"alpha": 0.25})
    before = sorted(p.name for p in models.iterdir())
    result = merge(request(node), host)
    a, b, c = inputs(models, "a", "b", "c")
    for key in (TEXT_KEY, OUT09_KEY):
        inner_value = (3 * b[key] + c[key]) / 4
        assert_within_one_ulp(load(result.path)[key], a[key] * 0.75 + inner_value * 0.25, key)
    assert sorted(p.name for p in models.iterdir()) == sorted([*before, "out.safetensors"])


def test_per_block_values_reach_each_key(host, models):
    node = tree(
        "weighted_sum", "a.safetensors", "b.safetensors", params={"alpha": 0.5}, blocks={"alpha": "IN04=0,OUT*=1"}
    )
    merged = load(merge(request(node), host).path)
    a, b = inputs(models, "a", "b")
    assert block_of(IN04_KEY) == "IN04" and block_of(OUT09_KEY) == "OUT09"
    assert torch.equal(merged[IN04_KEY].double(), a[IN04_KEY])
    assert torch.equal(merged[OUT09_KEY].double(), b[OUT09_KEY])
    assert_within_one_ulp(merged[TEXT_KEY], (a[TEXT_KEY] + b[TEXT_KEY]) / 2, TEXT_KEY)  # BASE: the plain value


def test_ties_on_files_matches_a_float64_reference(host, models):
    node = tree("ties", "a.safetensors", "b.safetensors", "c.safetensors", params={"density": 0.5, "lambda": 0.8})
    merged = load(merge(request(node, save_as_half=False), host).path)
    base, b, c = inputs(models, "a", "b", "c")
    key = OUT09_KEY
    deltas = [m[key] - base[key] for m in (b, c)]
    trimmed = []
    for d in deltas:
        k = -(-d.numel() // 2)
        cut = d.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(d.abs() >= cut, d, torch.zeros_like(d)))
    sign = torch.sign(trimmed[0] + trimmed[1])
    agree = [(t != 0) & (torch.sign(t) == sign) for t in trimmed]
    mean = sum(torch.where(g, t, 0.0) for g, t in zip(agree, trimmed, strict=True)) / sum(
        g.double() for g in agree
    ).clamp(min=1)
    torch.testing.assert_close(merged[key].double(), base[key] + 0.8 * mean, atol=2e-3, rtol=2e-3)


def test_dare_replays_bit_for_bit_and_its_seed_matters(host, models):
    def dare(seed, name):
        node = tree("dare", "a.safetensors", "b.safetensors", "c.safetensors", params={"p": 0.5, "seed": seed})
        return load(merge(request(node, name), host).path)

    first, again, other = dare(7, "first"), dare(7, "again"), dare(8, "other seed")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[IN04_KEY], other[IN04_KEY])


@pytest.mark.parametrize(
    ("method", "params"),
    [("task_arithmetic", {"lambda": 0.5}), ("ties", {"lambda": 0.5, "density": 1.0})],  # TIES reads stored inputs
)
def test_an_inpainting_base_keeps_its_extra_channels_under_any_method(host, models, method, params):
    make(models / "inpaint.safetensors", variant_specs(SD15, 9), seed=5)
    node = tree(method, "inpaint.safetensors", "b.safetensors", params=params)
    result = merge(request(node), host)
    merged, base, b = load(result.path)[UNET_IN], *(t[UNET_IN] for t in inputs(models, "inpaint", "b"))
    assert merged.shape[1] == 9 and result.path.name == "out.inpainting.safetensors"
    assert torch.equal(merged[:, 4:].double(), base[:, 4:])
    assert_within_one_ulp(merged[:, :4], base[:, :4] + 0.5 * (b - base[:, :4]), UNET_IN)


def test_average_last_takes_the_newest_steps(host, models):
    for step, seed in ((900, 11), (1200, 12), (10000, 13)):
        make(models / f"run-step-{step}.safetensors", seed=seed)
    node = tree("average_last", *(f"run-step-{s}.safetensors" for s in (10000, 900, 1200)), params={"last": 2})
    result = merge(request(node), host)
    newest = inputs(models, "run-step-1200", "run-step-10000")
    assert_within_one_ulp(load(result.path)[TEXT_KEY], (newest[0][TEXT_KEY] + newest[1][TEXT_KEY]) / 2, TEXT_KEY)
    used = [m["model"] for m in result.recipe["merge_lab_recipe"]["merge"]["models"]]
    assert used == ["run-step-1200.safetensors", "run-step-10000.safetensors"]


def test_the_recipe_round_trips_through_yaml_and_json(host, models):
    node = tree(
        "ties",
        "a.safetensors",
        "b.safetensors",
        tree("slerp", "b.safetensors", "c.safetensors", params={"t": 0.3}),
        params={"density": 0.4, "weights": [1, -0.5]},
        blocks={"lambda": "ramp_in_out"},
    )
    original = request(node, save_as_half=True)
    for text in (dump_recipe(recipe_dict(original)), json.dumps(recipe_dict(original))):
        again = request_from_recipe(parse_recipe(text))
        assert again.root().to_dict() == original.root().to_dict()
        assert again.save_as_half and again.custom_name == "out"


def test_run_and_replay_rebuild_a_byte_identical_file(host, models, tmp_path):
    node = tree(
        "dare",
        "a.safetensors",
        "b.safetensors",
        "c.safetensors",
        params={"p": 0.3, "seed": 3},
        blocks={"lambda": "ramp_out_in"},
    )
    result = merge(request(node, "made"), host)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(dump_recipe(recipe_dict(request(node, "made"))))
    ran = cli("run", recipe_file, "--models", models, "-o", tmp_path / "ran.safetensors")
    replayed = cli("replay", result.path, "-o", tmp_path / "replayed.safetensors")
    assert ran.returncode == 0 and replayed.returncode == 0, ran.stderr + replayed.stderr
    original = result.path.read_bytes()
    assert (tmp_path / "ran.safetensors").read_bytes() == original
    assert (tmp_path / "replayed.safetensors").read_bytes() == original
    assert f"sha256 {hashlib.sha256(original).hexdigest()}" in replayed.stdout


def test_replay_refuses_an_input_whose_hash_changed(host, models, tmp_path):
    result = merge(request(tree("soup", "a.safetensors", "b.safetensors"), "made"), host)
    make(models / "b.safetensors", seed=99)  # same name, other weights
    done = cli("replay", result.path, "-o", tmp_path / "again.safetensors")
    assert done.returncode == 1
    assert "b.safetensors" in done.stderr and "sha256" in done.stderr and "different file" in done.stderr
    assert not (tmp_path / "again.safetensors").exists()


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"merge": {"method": "frobnicate", "models": ["a.safetensors"]}}, r"merge\.method: unknown merge method"),
        ({"merge": {"method": "soup", "models": ["a.safetensors"]}}, r"merge\.models: method soup takes 2 or more"),
        ({"merge": {"method": "ties", "models": ["a", "b"], "params": {"density": 0}}}, r"merge\.params\.density: 0"),
        ({"merge": {"method": "ties", "models": ["a", "b"], "params": {"density": 1.5}}}, r"merge\.params\.density"),
        (
            {"merge": {"method": "soup", "models": ["a", "b"], "params": {"weights": [1]}}},
            r"params\.weights: expected 2",
        ),
        (
            {"merge": {"method": "soup", "models": ["a", "b"], "params": {"alpha": 1}}},
            r"params\.alpha: method soup has no",
        ),
        ({"merge": {"method": "soup", "models": ["a", "b"], "blocks": {"normalise": "flat"}}}, r"blocks\.normalise"),
        ({"merge": {"method": "soup", "models": ["a", {"method": "ties"}]}}, r"merge\.models\[1\]\.models"),
        ({"merge": {"method": "soup", "models": ["a", "b"]}, "output": {"colour": 1}}, r"output\.colour: unknown"),
        ({"merge_lab_recipe": 9, "merge": {"method": "soup", "models": ["a", "b"]}}, r"version 9"),
    ],
)
def test_a_bad_recipe_is_refused_naming_the_field(recipe, message):
    with pytest.raises(RequestError, match=message):
        request_from_recipe(recipe)


def test_a_block_list_of_the_wrong_length_and_a_missing_model_are_refused(host, models):
    short = tree("weighted_sum", "a.safetensors", "b.safetensors", blocks={"alpha": ",".join(["0.5"] * 24)})
    with pytest.raises(RequestError, match=r"blocks\.alpha: expected 26 values"):
        merge(request(short), host)
    with pytest.raises(InputError, match="nowhere.safetensors"):
        merge(request(tree("soup", "a.safetensors", "nowhere.safetensors")), host)
    assert not (models / "out.safetensors").exists()


def test_the_cli_merges_task_vectors_with_base_set_and_blocks(models, tmp_path):
    out = tmp_path / "ta.safetensors"
    done = cli(
        "merge", models / "b.safetensors", models / "c.safetensors", "--base", models / "a.safetensors",
        "--method", "task-arithmetic", "--set", "lambda=0.5", "--set", "weights=1,-1",
        "--blocks", "lambda=BASE=0", "-o", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    a, b, c = inputs(models, "a", "b", "c")
    merged = load(out)
    assert torch.equal(merged[TEXT_KEY].double(), a[TEXT_KEY])  # BASE block: lambda 0
    assert_within_one_ulp(merged[IN04_KEY], a[IN04_KEY] + 0.5 * (b[IN04_KEY] - c[IN04_KEY]), IN04_KEY)
    bad = cli("merge", models / "b.safetensors", "--base", models / "a.safetensors", "--method", "ties",
              "--set", "density=2", "-o", tmp_path / "x.safetensors")  # fmt: skip
    assert bad.returncode == 1 and "params.density: 2 is outside (0, 1]" in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_methods_lists_the_registry(tmp_path):
    from lib_merge.methods import METHODS

    listed = json.loads(cli("methods", "--json").stdout)
    assert [m["name"] for m in listed] == [m.cli_name for m in METHODS.values() if m.name != "add_delta"]  # a bake's
    ties = next(m for m in listed if m["name"] == "ties")
    assert ties["params"]["density"]["default"] == 0.2 and ties["params"]["density"]["range"] == "(0, 1]"
