"""Flux and SD3 merges with per-block values on real files, the preflight's family guards, and its
note when the inputs disagree on how they are sampled (v-prediction markers, modelspec)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SD15, SDXL, assert_within_one_ulp, load, make
from transformer_layouts import UNET, flux_keys, sd3_keys, tiny_specs

from lib_merge import FolderHost, IncompatibleModelsError, MergeRequest, make_plan, merge
from lib_merge.io.readers import SafetensorsReader, TensorSpec
from lib_merge.recipe import MergeNode, ModelRef


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def folder(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    return models


@pytest.fixture
def host(folder, tmp_path) -> FolderHost:
    return FolderHost(folder, hash_cache=tmp_path / "hashes.json", device="cpu")


def weighted_sum(a: str, b: str, alpha: float, blocks: str, name: str = "out") -> MergeRequest:
    node = MergeNode("weighted_sum", (ModelRef(a), ModelRef(b)), {"alpha": alpha}, {"alpha": blocks})
    return MergeRequest(a, tree=node, custom_name=name)


def check_weighted_sum(merged, a, b, key: str, alpha: float) -> None:
    exact = a[key].double() * (1 - alpha) + b[key].double() * alpha
    assert_within_one_ulp(merged[key], exact, f"{key} at alpha {alpha}")


# -- per-block merges of transformer files ------------------------------------------------------------


@pytest.mark.parametrize("full", [True, False], ids=["full checkpoint", "bare transformer"])
def test_a_flux_merge_gives_each_block_its_value(folder, host, full):
    prefix = UNET if full else ""
    specs = tiny_specs(flux_keys(full=full))
    make(folder / "a.safetensors", specs, seed=1)
    make(folder / "b.safetensors", specs, seed=2)
    blocks = "BASE=0.1,D*=0.2,D07=0.25,S*=0.7,S37=0.9"
    result = merge(weighted_sum("a.safetensors", "b.safetensors", 0.5, blocks), host)
    merged, a, b = load(result.path), load(folder / "a.safetensors"), load(folder / "b.safetensors")
    expected = {
        f"{prefix}double_blocks.3.img_attn.qkv.weight": 0.2,
        f"{prefix}double_blocks.7.txt_mlp.2.bias": 0.25,
        f"{prefix}single_blocks.0.linear1.weight": 0.7,
        f"{prefix}single_blocks.37.modulation.lin.bias": 0.9,
        f"{prefix}img_in.weight": 0.1,  # BASE: the transformer's embedders and final layer
        f"{prefix}guidance_in.out_layer.bias": 0.1,
        f"{prefix}final_layer.linear.weight": 0.1,
    }
    if full:
        expected["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"] = 0.1
        expected["vae.decoder.conv_in.weight"] = 0.5  # VAE: the plain value
    for key, alpha in expected.items():
        check_weighted_sum(merged, a, b, key, alpha)
    assert set(merged) == set(specs)


def test_a_flux_preset_runs_from_a_to_b(folder, host):
    specs = tiny_specs(flux_keys(guidance=False))
    make(folder / "a.safetensors", specs, seed=3)
    make(folder / "b.safetensors", specs, seed=4)
    merged = load(merge(weighted_sum("a.safetensors", "b.safetensors", 0.5, "ramp_in_out"), host).path)
    a, b = load(folder / "a.safetensors"), load(folder / "b.safetensors")
    first, last = UNET + "double_blocks.0.img_mod.lin.weight", UNET + "single_blocks.37.linear2.weight"
    assert torch.equal(merged[first], a[first]) and torch.equal(merged[last], b[last])
    check_weighted_sum(merged, a, b, UNET + "single_blocks.0.linear2.weight", 0.5 + 0.5 * 0.5 / 37.5)


@pytest.mark.parametrize(("joint_blocks", "full"), [(24, True), (38, False)], ids=["SD3 medium", "SD3.5 large bare"])
def test_an_sd3_merge_gives_each_joint_block_its_value(folder, host, joint_blocks, full):
    prefix = UNET if full else ""
    specs = tiny_specs(sd3_keys(joint_blocks, full=full))
    make(folder / "a.safetensors", specs, seed=5)
    make(folder / "b.safetensors", specs, seed=6)
    last = joint_blocks - 1
    blocks = f"J*=0.3,J{last:02d}=1,BASE=0"
    merged = load(merge(weighted_sum("a.safetensors", "b.safetensors", 0.5, blocks), host).path)
    a, b = load(folder / "a.safetensors"), load(folder / "b.safetensors")
    check_weighted_sum(merged, a, b, f"{prefix}joint_blocks.5.x_block.attn.qkv.weight", 0.3)
    check_weighted_sum(merged, a, b, f"{prefix}joint_blocks.{last}.context_block.attn.qkv.bias", 1.0)
    check_weighted_sum(merged, a, b, f"{prefix}x_embedder.proj.weight", 0.0)


def test_a_list_for_another_family_is_refused_at_preflight(folder, host):
    specs = tiny_specs(flux_keys())
    make(folder / "a.safetensors", specs, seed=1)
    make(folder / "b.safetensors", specs, seed=2)
    sd1_list = ",".join(["0.5"] * 26)
    with pytest.raises(
        Exception, match=r"blocks\.alpha: expected 58 values for Flux dev \(BASE \+ 57 blocks\), got 26"
    ):
        merge(weighted_sum("a.safetensors", "b.safetensors", 0.5, sd1_list), host)
    assert not (folder / "out.safetensors").exists()


# -- family guards ----------------------------------------------------------------------------------


GUARDED_PAIRS = {
    "SD1.5 and SDXL": (SD15, SDXL, "A is SD1 (a.safetensors), B is SDXL (b.safetensors)"),
    "Flux dev and schnell": (
        tiny_specs(flux_keys()),
        tiny_specs(flux_keys(guidance=False)),
        "A is Flux dev (a.safetensors: guidance_in.* keys), B is Flux schnell (b.safetensors: no guidance_in.* keys)",
    ),
    "bare Flux schnell and dev": (
        tiny_specs(flux_keys(full=False, guidance=False)),
        tiny_specs(flux_keys(full=False)),
        "A is Flux schnell (a.safetensors: no guidance_in.* keys), B is Flux dev (b.safetensors: guidance_in.* keys)",
    ),
    "SD1.5 and a bare Flux transformer (no key in common)": (
        SD15,
        tiny_specs(flux_keys(full=False)),
        "A is SD1 (a.safetensors), B is Flux dev (b.safetensors: guidance_in.* keys)",
    ),
    "SD3 medium and SD3.5 large": (
        tiny_specs(sd3_keys(24)),
        tiny_specs(sd3_keys(38)),
        "A is SD3 medium (a.safetensors: 24 joint blocks), B is SD3.5 large (b.safetensors: 38 joint blocks)",
    ),
}


@pytest.fixture
def headers_only(monkeypatch):
    """Fail the test if a tensor is read or an input hashed: a guard must refuse from the headers."""

    def no_read(*args):
        raise AssertionError("a tensor was read before the refusal")

    def no_hash(*args):
        raise AssertionError("an input was hashed before the refusal")

    monkeypatch.setattr(SafetensorsReader, "__getitem__", no_read)
    monkeypatch.setattr(SafetensorsReader, "prefetch", no_read)
    monkeypatch.setattr(FolderHost, "sha256", no_hash)


@pytest.mark.parametrize("pair", GUARDED_PAIRS)
def test_different_families_are_refused_from_the_headers_naming_both(folder, host, headers_only, pair):
    a_specs, b_specs, names = GUARDED_PAIRS[pair]
    make(folder / "a.safetensors", a_specs, seed=1)
    make(folder / "b.safetensors", b_specs, seed=2)
    request = MergeRequest("a.safetensors", "b.safetensors", custom_name="out")
    with pytest.raises(IncompatibleModelsError, match="different architectures") as error:
        merge(request, host)
    assert names in str(error.value)
    assert not (folder / "out.safetensors").exists()
    plan = make_plan(request, host, hash_inputs=False)
    try:
        report = plan.report()
    finally:
        plan.close()
    assert f"Problem: the models are different architectures: {names}" in report
    assert report.endswith("Refused: nothing will be written.")


def test_same_family_full_and_bare_is_not_a_family_problem(folder, host):
    """A full Flux file and a bare transformer are one family: B is read in A's layout and merged
    (tests/test_layouts.py checks the values)."""
    make(folder / "a.safetensors", tiny_specs(flux_keys()), seed=1)
    make(folder / "b.safetensors", tiny_specs(flux_keys(full=False)), seed=2)
    result = merge(MergeRequest("a.safetensors", "b.safetensors"), host)
    assert set(load(result.path)) == set(flux_keys())


# -- v-prediction markers and modelspec -------------------------------------------------------------

MARKERS = {"v_pred": TensorSpec(torch.float32, (0,)), "ztsnr": TensorSpec(torch.float32, (0,))}


def preflight_notes(request: MergeRequest, host) -> list[str]:
    plan = make_plan(request, host, hash_inputs=False)
    try:
        return [line for line in plan.report().splitlines() if line.startswith("Note: ")]
    finally:
        plan.close()


def test_a_v_pred_and_an_eps_model_get_a_note_and_the_output_keeps_as_markers(folder, host):
    make(folder / "v.safetensors", {**SD15, **MARKERS}, seed=1, metadata={"modelspec.prediction_type": "v"})
    make(folder / "eps.safetensors", SD15, seed=2, metadata={"modelspec.prediction_type": "epsilon"})
    v_first = MergeRequest("v.safetensors", "eps.safetensors", custom_name="v-first")
    assert preflight_notes(v_first, host) == [
        "Note: the inputs disagree on how they are sampled (v_pred A present, B absent; ztsnr A present, "
        "B absent; modelspec.prediction_type A 'v', B 'epsilon'): the output keeps A's"
    ]
    result = merge(v_first, host)
    assert {"v_pred", "ztsnr"} <= set(load(result.path))
    assert metadata_of(result.path)["modelspec.prediction_type"] == "v"  # A's, though B came later

    eps_first = merge(MergeRequest("eps.safetensors", "v.safetensors", custom_name="eps-first"), host)
    assert not {"v_pred", "ztsnr"} & set(load(eps_first.path))
    assert metadata_of(eps_first.path)["modelspec.prediction_type"] == "epsilon"


def test_a_modelspec_field_only_b_has_is_not_copied(folder, host):
    make(folder / "a.safetensors", SD15, seed=1, metadata={"author": "a"})
    make(folder / "b.safetensors", SD15, seed=2, metadata={"modelspec.title": "B's title", "author": "b"})
    metadata = metadata_of(merge(MergeRequest("a.safetensors", "b.safetensors", custom_name="o"), host).path)
    assert "modelspec.title" not in metadata and metadata["author"] == "b"  # other fields: the built-in's order


def test_inputs_that_agree_get_no_note(folder, host):
    make(folder / "a.safetensors", {**SD15, **MARKERS}, seed=1)
    make(folder / "b.safetensors", {**SD15, **MARKERS}, seed=2)
    assert preflight_notes(MergeRequest("a.safetensors", "b.safetensors"), host) == []


def metadata_of(path) -> dict[str, str]:
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        return json.loads(file.read(size)).get("__metadata__", {})
