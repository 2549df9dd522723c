"""Baking LoRAs into checkpoints: exactness at ratio 0, per-block ratios, refusals, the CLI end to end."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from cli_runner import run_cli
from conftest import SD15, UNET_IN, assert_within_one_ulp, load, make, variant_specs
from make_lora import (
    SD15_KOHYA,
    SDXL_KOHYA,
    SDXL_QKV,
    UNET,
    baked,
    kohya_lora,
    loha_module,
    lora_module,
    save,
    sdxl_specs,
)
from transformer_layouts import flux_keys, tiny_specs

from lib_merge.cli import main
from lib_merge.errors import IncompatibleModelsError, InputError


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so -0.0 and 0.0 (and NaN payloads) count as different."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _changes(lora_path, table, specs) -> dict[str, torch.Tensor]:
    """Each key's float64 change, up @ down * alpha / rank, from the file (not from lib_merge)."""
    tensors = load(lora_path)
    changes = {}
    for name, key in table.items():
        up = tensors[f"{name}.lora_up.weight"].double().flatten(1)
        down = tensors[f"{name}.lora_down.weight"].double()
        alpha = tensors[f"{name}.alpha"].item() if f"{name}.alpha" in tensors else down.shape[0]
        changes[key] = torch.einsum("or,r...->o...", up, down).reshape(specs[key].shape) * alpha / down.shape[0]
    return changes


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_ratio_zero_gives_the_checkpoint_byte_for_byte(tmp_path, model):
    specs, table = (SD15, SD15_KOHYA) if model == "sd15" else (sdxl_specs(), {**SDXL_KOHYA})
    checkpoint = make(tmp_path / "model.safetensors", specs, seed=1)
    lora = kohya_lora(tmp_path / "lora.safetensors", table, specs, alpha=1.0)
    if model == "sdxl":
        generator = torch.Generator().manual_seed(1)
        parts = {}
        for name, (key, _) in SDXL_QKV.items():
            parts.update(lora_module(name, (specs[key].shape[0] // 3, specs[key].shape[1]), 2, generator))
        lora = save(tmp_path / "lora.safetensors", {**load(lora), **parts})
    original = load(checkpoint)
    output = baked(tmp_path, checkpoint, [(lora, 0.0, "")])
    assert set(output) == set(original)
    for key, tensor in original.items():
        assert output[key].dtype == tensor.dtype, key
        assert torch.equal(_bits(output[key]), _bits(tensor)), key
    # and at a ratio that is not 0, the same LoRA changes every key it patches
    changed = baked(tmp_path, checkpoint, [(lora, 0.5, "")], name="half")
    assert all(not torch.equal(changed[key], original[key]) for key in table.values())


def test_keys_no_lora_patches_keep_their_bytes_even_minus_zero(tmp_path):
    """A -0.0 where the change is 0 (a fused q/k/v of which the LoRA patches only q) stays -0.0."""
    specs = sdxl_specs()
    checkpoint = make(tmp_path / "model.safetensors", specs, seed=2)
    tensors = load(checkpoint)
    key, _ = next(iter(SDXL_QKV.values()))
    tensors[key][specs[key].shape[0] // 3 :] = -0.0
    save(checkpoint, tensors)
    name = next(iter(SDXL_QKV))
    lora = save(tmp_path / "q.safetensors", lora_module(name, (4, 4), 2, torch.Generator().manual_seed(3)))
    output = baked(tmp_path, checkpoint, [(lora, 1.0, "")])
    rows = specs[key].shape[0] // 3
    assert not torch.equal(output[key][:rows], tensors[key][:rows])
    assert torch.equal(_bits(output[key][rows:]), _bits(tensors[key][rows:]))


def test_two_loras_add_up_in_float64_and_round_once(tmp_path):
    """Both patch the same keys: checkpoint + r1 * change1 + r2 * change2, rounded once to fp16."""
    checkpoint = make(tmp_path / "model.safetensors", SD15, seed=3)
    first = kohya_lora(tmp_path / "one.safetensors", SD15_KOHYA, SD15, seed=1, alpha=1.0)
    second = kohya_lora(tmp_path / "two.safetensors", SD15_KOHYA, SD15, seed=2, alpha=4.0)
    one, two = _changes(first, SD15_KOHYA, SD15), _changes(second, SD15_KOHYA, SD15)
    original = load(checkpoint)
    output = baked(tmp_path, checkpoint, [(first, 0.6, ""), (second, -0.3, "")], dtype="fp16")
    for key in SD15_KOHYA.values():
        assert output[key].dtype == torch.float16
        assert_within_one_ulp(output[key], original[key].double() + 0.6 * one[key] - 0.3 * two[key], key)


@pytest.fixture
def torch_threads():
    """Sets torch's thread count for the test, as the engine reads it when a bake starts."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_a_bake_cut_into_rows_among_threads_gives_the_bytes_of_one_thread(tmp_path, torch_threads):
    """The engine cuts a key's rows among torch's thread count of threads: 5 cut OpenCLIP-G's fused
    q/k/v (12 rows) across its thirds, and the q, k, v LoRAs must land in their rows all the same; a
    key with a LoHa is not cut (each thread would compute its whole change)."""
    specs = sdxl_specs()
    checkpoint = make(tmp_path / "model.safetensors", specs, seed=6)
    generator = torch.Generator().manual_seed(6)
    (loha_name, loha_key), *plain = SDXL_KOHYA.items()
    tensors = load(kohya_lora(tmp_path / "plain.safetensors", dict(plain), specs, seed=6, alpha=1.0))
    tensors.update(loha_module(loha_name, specs[loha_key].shape, 2, generator))
    for name, (key, _) in SDXL_QKV.items():
        tensors.update(lora_module(name, (specs[key].shape[0] // 3, specs[key].shape[1]), 2, generator))
    lora = save(tmp_path / "lora.safetensors", tensors)
    outputs = []
    for threads in (1, 5):
        torch_threads(threads)
        outputs.append(baked(tmp_path, checkpoint, [(lora, 0.7, "")], name=f"threads{threads}"))
    original = load(checkpoint)
    for key in [loha_key, *dict(plain).values(), *(key for key, _ in SDXL_QKV.values())]:
        assert not torch.equal(outputs[0][key], original[key]), key
        assert torch.equal(_bits(outputs[1][key]), _bits(outputs[0][key])), key
    qkv = next(iter(SDXL_QKV.values()))[0]
    expected = original[qkv].double()
    for name, (_, third) in SDXL_QKV.items():
        rows = slice(third * 4, third * 4 + 4)
        up, down = tensors[f"{name}.lora_up.weight"].double(), tensors[f"{name}.lora_down.weight"].double()
        expected[rows] += 0.7 * (up @ down)  # no alpha: the scale is 1
    assert_within_one_ulp(outputs[1][qkv], expected, qkv)


def test_output_dtype_bf16_rounds_once(tmp_path):
    checkpoint = make(tmp_path / "model.safetensors", SD15, seed=4)
    lora = kohya_lora(tmp_path / "lora.safetensors", SD15_KOHYA, SD15, alpha=1.0)
    change, original = _changes(lora, SD15_KOHYA, SD15), load(checkpoint)
    output = baked(tmp_path, checkpoint, [(lora, 0.9, "")], dtype="bf16")
    weights = [key for key, tensor in original.items() if tensor.is_floating_point() and "." in key]  # not the schedule
    assert {output[key].dtype for key in weights} == {torch.bfloat16}
    for key in SD15_KOHYA.values():
        assert_within_one_ulp(output[key], original[key].double() + 0.9 * change[key], key)


def test_inpainting_checkpoint_keeps_its_extra_input_channels(tmp_path):
    """A LoRA's conv_in change has the normal 4 channels: the first 4 of the 9 change, the rest are kept."""
    specs = variant_specs(SD15, 9)
    checkpoint = make(tmp_path / "inpaint.safetensors", specs, seed=5)
    table = {"lora_unet_conv_in": UNET_IN}
    lora = kohya_lora(tmp_path / "lora.safetensors", table, {UNET_IN: variant_specs(SD15, 4)[UNET_IN]}, alpha=2.0)
    change = _changes(lora, table, {UNET_IN: variant_specs(SD15, 4)[UNET_IN]})[UNET_IN]
    original = load(checkpoint)[UNET_IN]
    output = baked(tmp_path, checkpoint, [(lora, 1.0, "")], dtype="fp32")[UNET_IN]
    assert output.shape == original.shape
    assert_within_one_ulp(output[:, :4], original[:, :4].double() + change, UNET_IN)
    assert torch.equal(output[:, 4:], original[:, 4:].float())


# ---------------------------------------------------------------- per-block ratios

# The block of each key of SD15_KOHYA / SDXL_KOHYA, written out (time_embed runs before the input blocks).
SD15_BLOCKS = {
    "input_blocks.1.": "IN01",
    "input_blocks.5.": "IN05",
    "input_blocks.2.": "IN02",
    "input_blocks.3.": "IN03",
    "middle_block.": "M00",
    "output_blocks.2.": "OUT02",
    "output_blocks.5.": "OUT05",
    "output_blocks.3.": "OUT03",
    "output_blocks.11.": "OUT11",
    "time_embed.": "IN00",
    "cond_stage_model.": "BASE",
}
SDXL_BLOCKS = {
    "input_blocks.4.": "IN04",
    "input_blocks.1.": "IN01",
    "middle_block.": "M00",
    "output_blocks.8.": "OUT08",
    "label_emb.": "IN00",
    "conditioner.": "BASE",
}


def _block(key: str, table: dict[str, str]) -> str:
    return next(block for part, block in table.items() if part in key)


@pytest.mark.parametrize(
    ("model", "blocks", "weight"),
    [
        ("sd15", "IN*=0", lambda block: 0.0 if block.startswith("IN") else 1.0),
        ("sd15", "OUT*=0.5,M00=2", lambda block: {"M00": 2.0}.get(block, 0.5 if block.startswith("OUT") else 1.0)),
        (
            "sdxl",
            ",".join(["0.25", *["0"] * 9, "1", *["0.5"] * 9]),  # BASE, IN00-IN08, M00, OUT00-OUT08
            lambda block: (
                0.25 if block == "BASE" else 0.0 if block.startswith("IN") else 1.0 if block == "M00" else 0.5
            ),
        ),
        ("sdxl", "IN*=0", lambda block: 0.0 if block.startswith("IN") else 1.0),
    ],
)
def test_block_weights_multiply_the_ratio_on_the_right_keys(tmp_path, model, blocks, weight):
    specs, table, where = (
        (SD15, SD15_KOHYA, SD15_BLOCKS) if model == "sd15" else (sdxl_specs(), SDXL_KOHYA, SDXL_BLOCKS)
    )
    checkpoint = make(tmp_path / "model.safetensors", specs, seed=6)
    lora = kohya_lora(tmp_path / "lora.safetensors", table, specs, alpha=1.0)
    change, original = _changes(lora, table, specs), load(checkpoint)
    output = baked(tmp_path, checkpoint, [(lora, 0.8, blocks)], dtype="fp32")
    for key in table.values():
        ratio = 0.8 * weight(_block(key, where))
        if ratio == 0:
            assert torch.equal(output[key], original[key].float()), key
        else:
            assert_within_one_ulp(output[key], original[key].double() + ratio * change[key], key)
    untouched_inputs = [k for k in original if "input_blocks" in k and k not in table.values()]
    assert all(torch.equal(output[k], original[k].float()) for k in untouched_inputs)


def test_bad_block_weights_are_refused_naming_the_lora(tmp_path):
    checkpoint = make(tmp_path / "model.safetensors", SD15, seed=7)
    lora = kohya_lora(tmp_path / "lora.safetensors", SD15_KOHYA, SD15)
    with pytest.raises(Exception, match=r"LoRA 1 \(.*lora.safetensors\) blocks: 'XX\*' matches no SD1 block"):
        baked(tmp_path, checkpoint, [(lora, 1.0, "XX*=0")])
    assert not (tmp_path / "baked.safetensors").exists()


# ---------------------------------------------------------------- refusals


def test_sdxl_lora_on_sd15_checkpoint_is_refused_naming_both(tmp_path):
    checkpoint = make(tmp_path / "sd15.safetensors", SD15, seed=8)
    lora = kohya_lora(tmp_path / "xl_style.safetensors", SDXL_KOHYA, sdxl_specs())
    with pytest.raises(IncompatibleModelsError) as caught:
        baked(tmp_path, checkpoint, [(lora, 1.0, "")])
    message = str(caught.value)
    assert "xl_style.safetensors is a LoRA for SDXL" in message and "sd15.safetensors is an SD1 checkpoint" in message
    assert "\n" not in message and not (tmp_path / "baked.safetensors").exists()


def test_sd15_lora_on_sdxl_checkpoint_is_refused_naming_both(tmp_path):
    checkpoint = make(tmp_path / "xl.safetensors", sdxl_specs(), seed=9)
    lora = kohya_lora(tmp_path / "sd_style.safetensors", SD15_KOHYA, SD15)
    with pytest.raises(
        IncompatibleModelsError, match=r"sd_style.safetensors is a LoRA for SD1/SD2 .*xl.safetensors is an SDXL"
    ):
        baked(tmp_path, checkpoint, [(lora, 1.0, "")])


def test_an_sdxl_unet_only_locon_is_not_taken_for_sd1(tmp_path):
    """SDXL's input_blocks.1.0 is a resnet, as SD1's: only names SDXL lacks (input_blocks.1.1) are SD1 signs."""
    specs = sdxl_specs()
    checkpoint = make(tmp_path / "xl.safetensors", specs, seed=20)
    table = {
        "lora_unet_input_blocks_1_0_in_layers_2": UNET + "input_blocks.1.0.in_layers.2.weight",
        "lora_unet_output_blocks_8_0_skip_connection": UNET + "output_blocks.8.0.skip_connection.weight",
    }
    lora = kohya_lora(tmp_path / "xl_locon.safetensors", table, specs, alpha=1.0)
    change, original = _changes(lora, table, specs), load(checkpoint)
    output = baked(tmp_path, checkpoint, [(lora, 1.0, "")], dtype="fp32")
    for key in table.values():
        assert_within_one_ulp(output[key], original[key].double() + change[key], key)


def test_a_lora_whose_shapes_do_not_fit_is_refused_naming_the_key(tmp_path):
    checkpoint = make(tmp_path / "model.safetensors", SD15, seed=10)
    key = SD15_KOHYA["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"]
    module = lora_module(
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", (4, 8), 2, torch.Generator()
    )
    lora = save(tmp_path / "wide.safetensors", module)
    with pytest.raises(
        IncompatibleModelsError, match=rf"changes {key} by \[4, 8\], but model.safetensors \(SD1\) has \[4, 4\]"
    ):
        baked(tmp_path, checkpoint, [(lora, 1.0, "")])


def test_a_lora_matching_nothing_is_refused(tmp_path):
    checkpoint = make(tmp_path / "model.safetensors", SD15, seed=11)
    lora = save(tmp_path / "other.safetensors", lora_module("lora_unet_nowhere_to_q", (4, 4), 2, torch.Generator()))
    with pytest.raises(IncompatibleModelsError, match=r"other.safetensors: none of its 1 LoRA modules matches a layer"):
        baked(tmp_path, checkpoint, [(lora, 1.0, "")])


@pytest.mark.parametrize("content", [b"not a safetensors file at all", b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1'])
def test_a_corrupt_lora_file_is_refused_in_one_line(tmp_path, content):
    checkpoint = make(tmp_path / "model.safetensors", SD15, seed=12)
    lora = tmp_path / "broken.safetensors"
    lora.write_bytes(content)
    with pytest.raises(InputError) as caught:
        baked(tmp_path, checkpoint, [(lora, 1.0, "")])
    assert "broken.safetensors" in str(caught.value) and "\n" not in str(caught.value)


def test_a_checkpoint_given_as_a_lora_is_refused(tmp_path):
    checkpoint = make(tmp_path / "model.safetensors", SD15, seed=13)
    other = make(tmp_path / "other.safetensors", SD15, seed=14)
    with pytest.raises(InputError, match=r"other.safetensors: not a LoRA file"):
        baked(tmp_path, checkpoint, [(other, 1.0, "")])


# ---------------------------------------------------------------- Flux


@pytest.mark.parametrize("full", [True, False], ids=["full checkpoint", "bare transformer"])
def test_flux_kohya_names_map_onto_bfl_keys_and_flux_dev_is_not_read_as_schnell(tmp_path, full):
    specs = tiny_specs(flux_keys(full=full))
    checkpoint = make(tmp_path / "flux.safetensors", specs, seed=15)
    prefix = UNET if full else ""
    table = {
        "lora_unet_double_blocks_0_img_attn_qkv": prefix + "double_blocks.0.img_attn.qkv.weight",
        "lora_unet_single_blocks_3_linear1": prefix + "single_blocks.3.linear1.weight",
    }
    if full:
        table["lora_te1_text_model_encoder_layers_0_mlp_fc1"] = (
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
        )
    lora = kohya_lora(tmp_path / "flux_lora.safetensors", table, specs, rank=1, alpha=1.0)
    change, original = _changes(lora, table, specs), load(checkpoint)
    output = baked(tmp_path, checkpoint, [(lora, 0.7, "")], dtype="fp32")
    for key, tensor in original.items():
        if key in table.values():
            assert_within_one_ulp(output[key], tensor.double() + 0.7 * change[key], key)
        else:
            assert torch.equal(output[key], tensor), key


# ---------------------------------------------------------------- the command line


cli = run_cli  # the command line in this process (see cli_runner.py)


def test_cli_bakes_prints_path_and_sha256_and_never_overwrites(tmp_path):
    checkpoint = make(tmp_path / "model.safetensors", SD15, seed=16)
    lora = kohya_lora(tmp_path / "style.safetensors", SD15_KOHYA, SD15, alpha=1.0)
    out = tmp_path / "baked.safetensors"
    done = cli("lora", "bake", checkpoint, f"{lora}:0.5", "-o", out)
    assert done.returncode == 0, done.stderr
    path, sha_line = done.stdout.strip().splitlines()
    assert path == str(out) and sha_line == f"sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}"
    change, original, output = _changes(lora, SD15_KOHYA, SD15), load(checkpoint), load(out)
    for key in SD15_KOHYA.values():
        assert_within_one_ulp(output[key], original[key].double() + 0.5 * change[key], key)
    with open(out, "rb") as file:
        header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    merged = json.loads(header["__metadata__"]["sd_merge_recipe"])["merge_lab_recipe"]["merge"]
    assert merged["method"] == "add_delta" and merged["params"] == {"alpha": 0.5}
    assert merged["models"][-1]["lora"].endswith("style.safetensors")  # a LoRA, which a replay reads as one
    before = out.read_bytes()
    again = cli("lora", "bake", checkpoint, lora, "-o", out)
    assert again.returncode == 1 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == before


def test_cli_refuses_a_wrong_architecture_in_one_line_and_writes_nothing(tmp_path, capsys):
    checkpoint = make(tmp_path / "model.safetensors", SD15, seed=17)
    lora = kohya_lora(tmp_path / "xl.safetensors", SDXL_KOHYA, sdxl_specs())
    out = tmp_path / "baked.safetensors"
    assert main(["lora", "bake", str(checkpoint), f"{lora}:0.8", "-o", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("merge-lab: error: xl.safetensors is a LoRA for SDXL") and "\n" not in error
    assert "model.safetensors is an SD1 checkpoint" in error
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["model.safetensors", "xl.safetensors"]


def test_cli_lists_modules_that_match_nothing(tmp_path, capsys):
    checkpoint = make(tmp_path / "model.safetensors", SD15, seed=18)
    lora = kohya_lora(tmp_path / "style.safetensors", SD15_KOHYA, SD15)
    parts = load(lora)
    for i in range(5):
        parts.update(lora_module(f"lora_unet_not_a_layer_{i}", (4, 4), 2, torch.Generator()))
    save(lora, parts)
    out = tmp_path / "baked.safetensors"
    assert main(["lora", "bake", str(checkpoint), str(lora), "-o", str(out), "--dry-run"]) == 0
    report = capsys.readouterr().out
    assert "Note: style.safetensors: 5 LoRA modules match no layer of the checkpoint, not baked:" in report
    assert "lora_unet_not_a_layer_0, lora_unet_not_a_layer_1, lora_unet_not_a_layer_2 and 2 more" in report
    assert "Ready to merge." in report and not out.exists()
    assert main(["lora", "bake", str(checkpoint), str(lora), "-o", str(out)]) == 0
    assert "note: style.safetensors: 5 LoRA modules match no layer" in capsys.readouterr().err


def test_cli_blocks_once_per_lora_in_order(tmp_path, capsys):
    checkpoint = make(tmp_path / "model.safetensors", SD15, seed=19)
    first = kohya_lora(tmp_path / "one.safetensors", SD15_KOHYA, SD15, seed=1, alpha=1.0)
    second = kohya_lora(tmp_path / "two.safetensors", SD15_KOHYA, SD15, seed=2, alpha=1.0)
    out = tmp_path / "baked.safetensors"
    args = ["lora", "bake", str(checkpoint), f"{first}:1", f"{second}:-0.5", "-o", str(out), "--dtype", "fp32"]
    assert main([*args, "--blocks", "IN*=0", "--blocks", "OUT*=0"]) == 0
    one, two = _changes(first, SD15_KOHYA, SD15), _changes(second, SD15_KOHYA, SD15)
    original, output = load(checkpoint), load(out)
    for key in SD15_KOHYA.values():
        block = _block(key, SD15_BLOCKS)
        expected = original[key].double()
        expected = expected + (0 if block.startswith("IN") else 1) * one[key]
        expected = expected - (0 if block.startswith("OUT") else 0.5) * two[key]
        assert_within_one_ulp(output[key], expected, key)
    capsys.readouterr()
    assert main([*args, "-o", str(tmp_path / "x.safetensors"), "--blocks", "a", "--blocks", "b", "--blocks", "c"]) == 1
    assert "--blocks: given 3 times for 2 LoRAs" in capsys.readouterr().err
