"""Quantised inputs: GGUF files, ComfyUI's scaled fp8, bitsandbytes; real files written and merged.

The GGUF files are written by the gguf package (its writer and quantiser); the values read back are
checked against a dequantisation written here from ggml's block layouts, not the package's.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import load
from make_gguf_checkpoint import write_gguf

from lib_merge import FolderHost, InputError, MergeRequest, merge, preflight
from lib_merge.cli import main as cli_main
from lib_merge.io.formats import open_checkpoint

UNET_WEIGHT = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
UNET_BIAS = "model.diffusion_model.input_blocks.1.1.proj_in.bias"
CONV = "model.diffusion_model.input_blocks.0.0.weight"
TEXT = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
POSITIONS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def sd1_tensors(seed: int) -> dict[str, torch.Tensor]:
    """A few SD1.5 keys: matrices that fit quantisation blocks, a bias, a 3x3 conv, integer ids."""
    generator = torch.Generator().manual_seed(seed)
    return {
        UNET_WEIGHT: torch.randn(64, 64, generator=generator),
        UNET_BIAS: torch.randn(64, generator=generator),
        CONV: torch.randn(32, 4, 3, 3, generator=generator),
        TEXT: torch.randn(96, 32, generator=generator) * 0.02,
        POSITIONS: torch.arange(77).unsqueeze(0),
    }


# ggml's block layouts (ggml-common.h): bytes per block of 32 values and how they decode, in float32.
def _halves(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(quants: np.ndarray) -> np.ndarray:
    """Values 0..15: the low nibbles are a block's first 16 values, the high nibbles the next 16."""
    return np.concatenate([quants & 0x0F, quants >> 4], axis=1).astype(np.float32)


def _fifth_bits(blocks: np.ndarray, start: int) -> np.ndarray:
    bits = blocks[:, start : start + 4].copy().view("<u4")
    return (((bits >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.float32)


def dequantise_by_hand(raw: np.ndarray, kind: str) -> np.ndarray:
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}[kind]
    blocks = raw.reshape(-1, size)
    if kind == "Q8_0":
        return (_halves(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
    if kind == "Q4_0":
        return ((_nibbles(blocks[:, 2:]) - 8) * _halves(blocks, 0)).reshape(-1)
    if kind == "Q4_1":
        return (_nibbles(blocks[:, 4:]) * _halves(blocks, 0) + _halves(blocks, 2)).reshape(-1)
    if kind == "Q5_0":
        return ((_nibbles(blocks[:, 6:]) + _fifth_bits(blocks, 2) - 16) * _halves(blocks, 0)).reshape(-1)
    return ((_nibbles(blocks[:, 8:]) + _fifth_bits(blocks, 4)) * _halves(blocks, 0) + _halves(blocks, 2)).reshape(-1)


def stored_bytes(path, key: str) -> np.ndarray:
    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == key)
    return np.array(tensor.data).view(np.uint8)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_block_types_read_as_their_own_dequantisation(tmp_path, kind):
    path = tmp_path / f"a-{kind}.gguf"
    source = sd1_tensors(1)
    stored = write_gguf(path, source, kind)
    assert stored[UNET_WEIGHT] == kind and stored[TEXT] == kind
    with open_checkpoint(path) as reader:
        for key in (UNET_WEIGHT, TEXT):
            expected = dequantise_by_hand(stored_bytes(path, key), kind).reshape(source[key].shape)
            assert reader.spec(key).dtype == torch.float32 and reader.spec(key).shape == tuple(source[key].shape)
            assert torch.equal(reader[key], torch.from_numpy(expected)), key
            # A real quantisation: close to the source, not equal to it.
            assert not torch.equal(reader[key], source[key])
            assert (reader[key] - source[key]).abs().max() < source[key].abs().max() / 4
        assert kind in reader.format_note


def test_gguf_plain_types_read_bit_for_bit(tmp_path):
    path = tmp_path / "plain.gguf"
    source = sd1_tensors(2)
    bf16 = torch.randn(8, 16, dtype=torch.bfloat16)
    writer = gguf.GGUFWriter(str(path), "sd1")
    writer.add_tensor("f32", source[UNET_BIAS].numpy())
    writer.add_tensor("f16", source[CONV].half().numpy())
    writer.add_tensor("bf16", bf16.view(torch.int16).numpy().view(np.uint8), raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.add_tensor("ids", source[POSITIONS].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_checkpoint(path) as reader:
        assert torch.equal(reader["f32"], source[UNET_BIAS])
        assert torch.equal(reader["f16"], source[CONV].half()) and reader["f16"].shape == (32, 4, 3, 3)
        assert reader["bf16"].dtype == torch.bfloat16 and torch.equal(reader["bf16"], bf16)
        assert reader["ids"].dtype == torch.int64 and torch.equal(reader["ids"], source[POSITIONS])
        assert reader.format_note == "GGUF, every key stored unquantised"


def test_gguf_reshaped_tensors_get_their_original_shape_back(tmp_path):
    """Converters flatten what does not fit ggml (over 4 dimensions) and record the shape."""
    path = tmp_path / "reshaped.gguf"
    values = torch.randn(2, 3, 4, 5, 6)
    writer = gguf.GGUFWriter(str(path), "sd1")
    writer.add_tensor("five_d", values.reshape(6, 120).numpy())
    writer.add_array("comfy.gguf.orig_shape.five_d", [2, 3, 4, 5, 6])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_checkpoint(path) as reader:
        assert reader.spec("five_d").shape == (2, 3, 4, 5, 6)
        assert torch.equal(reader["five_d"], values)


def test_a_gguf_type_without_a_dequantiser_is_refused_naming_it(tmp_path):
    path = tmp_path / "q8k.gguf"
    writer = gguf.GGUFWriter(str(path), "sd1")
    writer.add_tensor(UNET_WEIGHT, np.zeros((2, 292), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError, match=rf"q8k.gguf: key {UNET_WEIGHT} is stored as GGUF type Q8_K"):
        open_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"GGUF" + b"\xff" * 64, b"not a gguf file at all, just text"])
def test_a_broken_gguf_file_is_refused_in_one_line(tmp_path, content):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(InputError) as error:
        open_checkpoint(path)
    assert str(error.value) == f"{path}: not a GGUF file, or corrupt or truncated (the gguf package cannot read it)"


def test_merging_a_gguf_file_with_a_safetensors_file(tmp_path):
    """Weighted sum of a Q8_0 GGUF A and a float32 B: A's dequantised values, merged and rounded once."""
    models = tmp_path / "models"
    models.mkdir()
    write_gguf(models / "a.gguf", sd1_tensors(1), "Q8_0")
    b = sd1_tensors(2)
    safetensors.torch.save_file(b, str(models / "b.safetensors"))
    host = FolderHost(models)
    assert "a.gguf" in host.checkpoints()
    request = MergeRequest("a.gguf", "b.safetensors", multiplier=0.25, custom_name="out")
    report = preflight(request, host)
    assert (
        "A: a.gguf" in report and "GGUF, quantised keys dequantised to float32 by the gguf package (2 Q8_0)" in report
    )
    merge(request, host=host)
    out = load(models / "out.safetensors")
    with open_checkpoint(models / "a.gguf") as a:
        for key in (UNET_WEIGHT, TEXT, CONV):
            exact = a[key].double() * 0.75 + b[key].double() * 0.25
            assert torch.equal(out[key], exact.to(out[key].dtype)), key
        assert torch.equal(out[POSITIONS], b[POSITIONS])


def scaled_fp8_file(path, marker_prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """ComfyUI's layout: fp8 weights, a float32 scale_weight (and scale_input) beside each, a marker key."""
    generator = torch.Generator().manual_seed(5)
    tensors = {
        UNET_WEIGHT: (torch.randn(64, 64, generator=generator) * 40).to(torch.float8_e4m3fn),
        UNET_WEIGHT.replace(".weight", ".scale_weight"): torch.tensor(0.0123),
        UNET_WEIGHT.replace(".weight", ".scale_input"): torch.tensor(1.0),
        TEXT: (torch.randn(96, 32, generator=generator) * 40).to(torch.float8_e4m3fn),
        TEXT.replace(".weight", ".scale_weight"): torch.tensor([0.004]),
        UNET_BIAS: torch.randn(64, generator=generator).half(),
        marker_prefix + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
    }
    safetensors.torch.save_file(tensors, str(path))
    return tensors


def test_scaled_fp8_weights_read_as_weight_times_scale(tmp_path):
    stored = scaled_fp8_file(tmp_path / "scaled.safetensors")
    with open_checkpoint(tmp_path / "scaled.safetensors") as reader:
        assert sorted(reader.keys()) == sorted([UNET_WEIGHT, TEXT, UNET_BIAS])
        for key in (UNET_WEIGHT, TEXT):
            scale = stored[key.replace(".weight", ".scale_weight")]
            expected = (stored[key].double() * scale.double()).float()
            assert reader.spec(key).dtype == torch.float32
            assert torch.equal(reader[key], expected), key
        assert torch.equal(reader[UNET_BIAS], stored[UNET_BIAS])  # not scaled: as stored
        assert reader.format_note.startswith("scaled fp8: 2 weights read as weight × scale_weight (float32)")


def test_merging_a_scaled_fp8_file_writes_a_plain_checkpoint(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    stored = scaled_fp8_file(models / "a.safetensors")
    b = {key: torch.randn(64, 64) for key in (UNET_WEIGHT,)} | {
        TEXT: torch.randn(96, 32) * 0.1,
        UNET_BIAS: torch.randn(64).half(),
    }
    safetensors.torch.save_file(b, str(models / "b.safetensors"))
    merge(MergeRequest("a.safetensors", "b.safetensors", multiplier=0.5, custom_name="out"), host=FolderHost(models))
    out = load(models / "out.safetensors")
    assert sorted(out) == sorted([UNET_WEIGHT, TEXT, UNET_BIAS])  # no scales, no marker
    scale = stored[UNET_WEIGHT.replace(".weight", ".scale_weight")].double()
    exact = (stored[UNET_WEIGHT].double() * scale).float().double() * 0.5 + b[UNET_WEIGHT].double() * 0.5
    assert torch.equal(out[UNET_WEIGHT], exact.float())


def test_a_scale_that_does_not_fit_its_weight_is_refused(tmp_path):
    path = tmp_path / "bad-scale.safetensors"
    scale_key = UNET_WEIGHT.replace(".weight", ".scale_weight")
    safetensors.torch.save_file(
        {UNET_WEIGHT: torch.zeros(64, 64).to(torch.float8_e4m3fn), scale_key: torch.ones(3)}, str(path)
    )
    with pytest.raises(InputError, match=rf"key {scale_key} has shape \[3\], which does not scale {UNET_WEIGHT}"):
        open_checkpoint(path)
    safetensors.torch.save_file({scale_key: torch.ones(())}, str(path))
    with pytest.raises(InputError, match=rf"key {scale_key} scales no weight \(the file has no {UNET_WEIGHT}\)"):
        open_checkpoint(path)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_bitsandbytes_files_are_refused_naming_the_format(tmp_path, kind):
    """Forge's bnb layout: packed uint8 weights, their absmax, and a quant_state key naming the format."""
    path = tmp_path / f"flux-{kind}.safetensors"
    state = json.dumps({"quant_type": kind, "blocksize": 64, "shape": [64, 64]}).encode()
    safetensors.torch.save_file(
        {
            "double_blocks.0.img_attn.qkv.weight": torch.zeros(2048, 1, dtype=torch.uint8),
            "double_blocks.0.img_attn.qkv.weight.absmax": torch.ones(64),
            f"double_blocks.0.img_attn.qkv.weight.quant_state.bitsandbytes__{kind}": torch.tensor(
                list(state), dtype=torch.uint8
            ),
        },
        str(path),
    )
    with pytest.raises(InputError) as error:
        open_checkpoint(path)
    assert str(error.value).startswith(f"{path}: holds bitsandbytes {kind} quantised weights (e.g. double_blocks.0.")
    assert "\n" not in str(error.value)


def test_the_cli_merges_a_gguf_file_and_refuses_a_broken_one_without_writing(tmp_path, capsys):
    write_gguf(tmp_path / "a.gguf", sd1_tensors(1), "Q4_1")
    safetensors.torch.save_file(sd1_tensors(2), str(tmp_path / "b.safetensors"))
    assert (
        cli_main(
            ["merge", str(tmp_path / "a.gguf"), str(tmp_path / "b.safetensors"), "-o", str(tmp_path / "m.safetensors")]
        )
        == 0
    )
    assert sorted(load(tmp_path / "m.safetensors")) == sorted(sd1_tensors(1))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    status = cli_main(
        ["merge", str(tmp_path / "broken.gguf"), str(tmp_path / "b.safetensors"), "-o", str(tmp_path / "n.safetensors")]
    )
    assert status != 0
    assert "broken.gguf: not a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "n.safetensors").exists()
