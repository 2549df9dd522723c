"""Merging LoRAs into one: concatenation is the sum of the changes exactly, SVD re-ranking at full rank
reproduces it, refusals (architectures, kinds that do not concatenate, DoRA), the CLI end to end."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from cli_runner import run_cli
from conftest import SD15, load, make
from make_lora import (
    SD15_KOHYA,
    SD15_PEFT,
    SDXL_KOHYA,
    baked,
    full_module,
    kohya_lora,
    loha_module,
    lokr_module,
    lora_module,
    save,
    sdxl_specs,
)

from lib_merge.cli import main
from lib_merge.errors import IncompatibleModelsError, InputError, OutputError, RequestError
from lib_merge.io.formats import open_checkpoint
from lib_merge.lora import LoraReader, merge_loras


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


ATTN_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
ATTN_Q_KEY = SD15_KOHYA[ATTN_Q]


def _changes(checkpoint, lora) -> dict[str, torch.Tensor]:
    """Each checkpoint key's float64 change from ``lora``, as the bake reads it (LoraReader)."""
    with open_checkpoint(checkpoint) as base:
        reader = LoraReader(lora, base)
        return {key: reader[key] for key in reader.keys() if reader.patches_of(key)}


def _sum(checkpoint, loras) -> dict[str, torch.Tensor]:
    """sum of ratio x change over ``loras`` ((path, ratio) pairs), per key, in float64."""
    total: dict[str, torch.Tensor] = {}
    for path, ratio in loras:
        for key, change in _changes(checkpoint, path).items():
            total[key] = total.get(key, 0) + ratio * change
    return total


@pytest.fixture
def checkpoint(tmp_path):
    return make(tmp_path / "model.safetensors", SD15, seed=1)


# ---------------------------------------------------------------- exact concatenation


def test_concatenation_is_the_sum_of_the_changes_exactly(tmp_path, checkpoint):
    """Ratios x scales that are powers of two: each scaled lora_up is exact in fp32, and every
    product of two fp16 values (22 bits) and their sums over <= 5 ranks fit float64's 53 bits, so the
    merged LoRA's change equals the sum of the changes bit for bit (and so do the bakes)."""
    one = kohya_lora(tmp_path / "one.safetensors", SD15_KOHYA, SD15, seed=1, rank=2, alpha=1.0)  # scale 1/2
    two = kohya_lora(tmp_path / "two.safetensors", SD15_KOHYA, SD15, seed=2, rank=3, alpha=3.0)  # scale 1
    loras = [(one, 0.5), (two, -0.25)]
    result = merge_loras(loras, tmp_path / "merged.safetensors", dtype="fp32", device="cpu")
    merged, expected = _changes(checkpoint, result.path), _sum(checkpoint, loras)
    assert set(merged) == set(expected) == set(SD15_KOHYA.values())
    for key, change in expected.items():
        assert torch.equal(merged[key], change), key
    tensors = load(result.path)
    assert tensors[f"{ATTN_Q}.lora_down.weight"].shape == (5, 4)  # ranks 2 + 3 side by side
    assert tensors[f"{ATTN_Q}.alpha"].item() == 5.0
    by_merge = baked(tmp_path, checkpoint, [(result.path, 1.0, "")], dtype="fp32", name="by_merge")
    by_two = baked(tmp_path, checkpoint, [(one, 0.5, ""), (two, -0.25, "")], dtype="fp32", name="by_two")
    assert all(torch.equal(by_merge[key], by_two[key]) for key in by_two)


def test_concatenation_at_any_ratio_is_off_by_one_rounding_of_each_scaled_up(tmp_path, checkpoint):
    one = kohya_lora(tmp_path / "one.safetensors", SD15_KOHYA, SD15, seed=3, rank=2, alpha=1.0)
    two = kohya_lora(tmp_path / "two.safetensors", SD15_KOHYA, SD15, seed=4, rank=3, alpha=4.0)
    loras = [(one, 0.6), (two, -0.3)]
    result = merge_loras(loras, tmp_path / "merged.safetensors", dtype="fp32", device="cpu")
    merged, expected = _changes(checkpoint, result.path), _sum(checkpoint, loras)
    parts = load(one), load(two)
    for name, key in SD15_KOHYA.items():
        # |error| <= 2**-24 x sum_i |ratio_i x scale_i| |up_i| @ |down_i| (each scaled up rounded once to fp32)
        bound = 0
        for tensors, (_, ratio), scale in zip(parts, loras, (0.5, 4 / 3), strict=True):
            up = tensors[f"{name}.lora_up.weight"].double().abs().flatten(1)
            down = tensors[f"{name}.lora_down.weight"].double().abs().flatten(1)
            bound = bound + abs(ratio * scale) * (up @ down).reshape(expected[key].shape)
        error = (merged[key] - expected[key]).abs()
        assert (error <= 2**-24 * bound * 1.01 + 1e-15).all(), key
        assert not torch.equal(merged[key], torch.zeros_like(merged[key]))


def test_one_layer_spelled_two_ways_merges_into_one_kohya_module(tmp_path, checkpoint):
    """A kohya and a PEFT LoRA of the same layer: one module, in kohya's spelling."""
    kohya_name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    peft_name = next(name for name in SD15_PEFT if name.endswith("attn1.to_k"))
    generator = torch.Generator().manual_seed(5)
    kohya = save(tmp_path / "kohya.safetensors", lora_module(kohya_name, (4, 4), 2, generator, alpha=2.0))
    peft = kohya_lora(tmp_path / "peft.safetensors", SD15_PEFT, SD15, seed=6, peft=True)
    loras = [(kohya, 1.0), (peft, 0.5)]
    result = merge_loras(loras, tmp_path / "merged.safetensors", dtype="fp32", device="cpu")
    names = {key.rsplit(".", 2)[0] for key in load(result.path) if key.endswith(".lora_down.weight")}
    assert kohya_name in names and peft_name not in names
    assert not any(name.startswith(("unet.", "text_encoder.")) for name in names)
    assert "lora_te_text_model_encoder_layers_3_self_attn_k_proj" in names  # SD1: lora_te_, not lora_te1_
    assert result.modules == len(SD15_PEFT)
    merged, expected = _changes(checkpoint, result.path), _sum(checkpoint, loras)
    for key, change in expected.items():
        torch.testing.assert_close(merged[key], change, rtol=2**-22, atol=1e-12)


# ---------------------------------------------------------------- re-ranked by SVD


def _svd_tolerance(change: torch.Tensor, dense: bool) -> float:
    """float64 QR + SVD of the factors, then fp32 factors: ~2**-24 x ||change||; a float32 SVD of
    the whole change (LoHa & co.): ~n x 2**-24 x ||change|| (n <= 36). 1e-6 and 1e-5 leave room."""
    return (1e-5 if dense else 1e-6) * torch.linalg.matrix_norm(change.reshape(change.shape[0], -1), 2).item()


def test_svd_at_full_rank_reproduces_the_sum(tmp_path, checkpoint):
    one = kohya_lora(tmp_path / "one.safetensors", SD15_KOHYA, SD15, seed=7, rank=2, alpha=1.0)
    two = kohya_lora(tmp_path / "two.safetensors", SD15_KOHYA, SD15, seed=8, rank=3, alpha=4.0)
    loras = [(one, 0.7), (two, 0.4)]
    result = merge_loras(loras, tmp_path / "svd.safetensors", rank=4, dtype="fp32", device="cpu")
    assert load(result.path)[f"{ATTN_Q}.lora_down.weight"].shape == (4, 4)  # 5 ranks in, a 4 x 4 layer
    merged, expected = _changes(checkpoint, result.path), _sum(checkpoint, loras)
    for key, change in expected.items():
        assert (merged[key] - change).abs().max().item() <= _svd_tolerance(change, dense=False), key


def test_svd_to_a_lower_rank_is_the_closest_change_of_that_rank(tmp_path, checkpoint):
    one = kohya_lora(tmp_path / "one.safetensors", SD15_KOHYA, SD15, seed=9, rank=2, alpha=1.0)
    two = kohya_lora(tmp_path / "two.safetensors", SD15_KOHYA, SD15, seed=10, rank=2, alpha=2.0)
    loras = [(one, 1.0), (two, -1.0)]
    result = merge_loras(loras, tmp_path / "rank1.safetensors", rank=1, dtype="fp32", device="cpu")
    merged, expected = _changes(checkpoint, result.path), _sum(checkpoint, loras)
    for key, change in expected.items():
        matrix = change.reshape(change.shape[0], -1)
        tail = torch.linalg.svdvals(matrix)[1:].square().sum().sqrt().item()  # Eckart-Young
        error = torch.linalg.matrix_norm(merged[key].reshape(matrix.shape) - matrix).item()
        assert error == pytest.approx(tail, rel=1e-5), key
    # plain LoRAs are never given more rank than they hold: 2 + 2 > a rank of 3 asked, 4 held
    wide = merge_loras(loras, tmp_path / "rank9.safetensors", rank=9, dtype="fp32", device="cpu")
    assert load(wide.path)[f"{ATTN_Q}.lora_down.weight"].shape[0] == 4


@pytest.mark.parametrize("kind", ["loha", "lokr", "full"])
def test_kinds_that_do_not_concatenate_are_refused_without_rank_and_re_ranked_with_it(tmp_path, checkpoint, kind):
    generator = torch.Generator().manual_seed(11)
    make_module = {
        "loha": lambda: loha_module(ATTN_Q, (4, 4), 2, generator, alpha=1.0),
        "lokr": lambda: lokr_module(ATTN_Q, (4, 4), generator),
        "full": lambda: full_module(ATTN_Q, (4, 4), generator),
    }[kind]
    other = save(tmp_path / f"{kind}.safetensors", make_module())
    plain = kohya_lora(tmp_path / "plain.safetensors", SD15_KOHYA, SD15, seed=12, rank=2, alpha=1.0)
    loras = [(plain, 0.8), (other, 0.5)]
    with pytest.raises(InputError) as caught:
        merge_loras(loras, tmp_path / "merged.safetensors", device="cpu")
    message = str(caught.value)
    assert f"{kind}.safetensors: LoRA module {ATTN_Q}" in message and "give --rank N" in message
    assert "\n" not in message and not (tmp_path / "merged.safetensors").exists()
    result = merge_loras(loras, tmp_path / "merged.safetensors", rank=4, dtype="fp32", device="cpu")
    merged, expected = _changes(checkpoint, result.path), _sum(checkpoint, loras)
    for key, change in expected.items():
        dense = key == ATTN_Q_KEY
        assert (merged[key] - change).abs().max().item() <= _svd_tolerance(change, dense), key


def test_dora_is_refused_even_with_a_rank(tmp_path):
    generator = torch.Generator().manual_seed(13)
    parts = lora_module(ATTN_Q, (4, 4), 2, generator, alpha=1.0)
    parts[f"{ATTN_Q}.dora_scale"] = torch.ones((1, 4), dtype=torch.float16)
    dora = save(tmp_path / "dora.safetensors", parts)
    for rank in (None, 4):
        with pytest.raises(InputError, match=rf"dora.safetensors: LoRA module {ATTN_Q} is DoRA"):
            merge_loras([(dora, 1.0)], tmp_path / "merged.safetensors", rank=rank, device="cpu")
    assert not (tmp_path / "merged.safetensors").exists()


# ---------------------------------------------------------------- refusals


def test_loras_for_different_architectures_are_refused_naming_both(tmp_path):
    sd = kohya_lora(tmp_path / "sd_style.safetensors", SD15_KOHYA, SD15)
    xl = kohya_lora(tmp_path / "xl_style.safetensors", SDXL_KOHYA, sdxl_specs())
    with pytest.raises(IncompatibleModelsError) as caught:
        merge_loras([(sd, 1.0), (xl, 1.0)], tmp_path / "merged.safetensors", device="cpu")
    message = str(caught.value)
    assert (
        "xl_style.safetensors is a LoRA for SDXL" in message and "sd_style.safetensors is a LoRA for SD1/SD2" in message
    )
    assert "\n" not in message and not (tmp_path / "merged.safetensors").exists()


def test_metadata_says_what_was_merged_and_for_which_model(tmp_path):
    one = kohya_lora(tmp_path / "one.safetensors", SD15_KOHYA, SD15, seed=1, rank=2)
    two = kohya_lora(tmp_path / "two.safetensors", SD15_KOHYA, SD15, seed=2, rank=3)
    result = merge_loras([(one, 0.5), (two, 1.0)], tmp_path / "merged.safetensors", device="cpu")
    with open(result.path, "rb") as file:
        metadata = json.loads(file.read(int.from_bytes(file.read(8), "little")))["__metadata__"]
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "5"
    recipe = json.loads(metadata["merge_lab_lora_merge"])
    assert recipe["loras"] == [{"name": "one.safetensors", "ratio": 0.5}, {"name": "two.safetensors", "ratio": 1.0}]
    assert recipe["mode"] == "concatenated"
    assert load(result.path)[f"{ATTN_Q}.lora_up.weight"].dtype == torch.float16  # the inputs' dtype


def test_bad_requests_are_refused_and_nothing_is_written(tmp_path):
    one = kohya_lora(tmp_path / "one.safetensors", SD15_KOHYA, SD15, seed=1)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(RequestError, match="--conv-rank: only with --rank"):
        merge_loras([(one, 1.0)], out, conv_rank=4)
    with pytest.raises(RequestError, match="--rank: a rank is a whole number"):
        merge_loras([(one, 1.0)], out, rank=0)
    with pytest.raises(RequestError, match=r"LoRA 1 \(.*one.safetensors\) ratio: .* not a finite number"):
        merge_loras([(one, float("nan"))], out)
    before = one.read_bytes()
    with pytest.raises(OutputError, match="is one of the inputs"):
        merge_loras([(one, 1.0)], one, overwrite=True)
    assert one.read_bytes() == before
    with pytest.raises(InputError, match=r"model.safetensors: not a LoRA file"):
        merge_loras([(one, 1.0), (make(tmp_path / "model.safetensors", SD15), 1.0)], out)
    assert not out.exists()


# ---------------------------------------------------------------- the command line


def test_cli_merges_and_refuses_in_one_line(tmp_path, capsys, checkpoint):
    one = kohya_lora(tmp_path / "one.safetensors", SD15_KOHYA, SD15, seed=1, rank=2, alpha=2.0)
    two = kohya_lora(tmp_path / "two.safetensors", SD15_KOHYA, SD15, seed=2, rank=2, alpha=2.0)
    out = tmp_path / "merged.safetensors"
    done = run_cli("lora", "merge", f"{one}:0.5", f"{two}:-2", "-o", out, "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    path, sha_line = done.stdout.strip().splitlines()
    assert path == str(out) and sha_line == f"sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}"
    merged, expected = _changes(checkpoint, out), _sum(checkpoint, [(one, 0.5), (two, -2.0)])
    assert all(torch.equal(merged[key], change) for key, change in expected.items())
    before = out.read_bytes()
    loha = save(tmp_path / "loha.safetensors", loha_module(ATTN_Q, (4, 4), 2, torch.Generator().manual_seed(3)))
    for args, message in (
        ([str(one), "-o", str(out)], "already exists"),
        ([str(one), "-o", str(one), "--overwrite"], "is one of the inputs"),
        ([f"{one}:x", "-o", str(tmp_path / "x.safetensors")], "the ratio after ':' must be a number"),
        ([str(one), "--rank", "-3", "-o", str(tmp_path / "x.safetensors")], "--rank: a rank is a whole number"),
        ([str(tmp_path / "none.safetensors"), "-o", str(tmp_path / "x.safetensors")], "no such LoRA file"),
        ([str(one), str(loha), "-o", str(tmp_path / "x.safetensors")], f"{ATTN_Q} is a LoHa module"),
    ):
        assert main(["lora", "merge", *args, "--device", "cpu"]) == 1, args
        error = capsys.readouterr().err.strip()
        assert error.startswith("merge-lab: error: ") and message in error and "\n" not in error, error
    assert out.read_bytes() == before
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["lora", "merge", str(one), str(loha), "--rank", "2", "-o", str(tmp_path / "x.safetensors")]) == 0
    assert (tmp_path / "x.safetensors").exists()
