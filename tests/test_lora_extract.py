"""Extracting a LoRA from two checkpoints: bake(extract(A, B)) gives B back, names, ranks, metadata,
clamping, the text-encoder rule, refusals, the CLI end to end."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from conftest import SD15, load, make
from make_lora import (
    SD2_KOHYA,
    SD2_QKV,
    SD15_KOHYA,
    SDXL_KOHYA,
    SDXL_QKV,
    UNET,
    baked,
    low_rank_change,
    sd2_specs,
    sdxl_specs,
    tuned_checkpoint,
)
from transformer_layouts import flux_keys, tiny_specs

from lib_merge.cli import main
from lib_merge.errors import IncompatibleModelsError, OutputError, RequestError
from lib_merge.io.formats import open_checkpoint
from lib_merge.io.readers import TensorSpec
from lib_merge.lora import LoraReader, extract_lora
from lib_merge.lora.kohya import QUANTILE_LIMIT, quantile


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# Layers the tuned checkpoints change (a linear, a 1x1 conv, a 3x3 conv taller than wide, a text
# encoder's linear), and two layers made non-square so that "full rank" is not always 4.
ATTN_Q = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
CROSS_K = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
PROJ_IN = UNET + "input_blocks.5.1.proj_in.weight"
CONV = UNET + "input_blocks.4.0.in_layers.2.weight"
TEXT_Q = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
SPECS = {
    **SD15,
    CROSS_K: TensorSpec(torch.float16, (4, 6)),
    CONV: TensorSpec(torch.float16, (6, 4, 3, 3)),
}
CHANGED = (ATTN_Q, CROSS_K, PROJ_IN, CONV, TEXT_Q)


def _pair(tmp_path, specs=SPECS, keys=CHANGED, rank=2, size=0.1, dtype=None, seed=1):
    """Base A (fp16) and tuned B = A + a known rank-``rank`` change on ``keys``."""
    base = make(tmp_path / "base.safetensors", specs, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    changes = {key: low_rank_change(specs[key].shape, rank, generator, size) for key in keys}
    tuned = tuned_checkpoint(tmp_path / "tuned.safetensors", base, changes, dtype)
    return base, tuned, changes


def _extract(tmp_path, base, tuned, name="lora", **options):
    options = {"device": "cpu", "dtype": "fp32", **options}
    return extract_lora(base, tuned, tmp_path / f"{name}.safetensors", **options)


def _header(path):
    with open(path, "rb") as file:
        return json.loads(file.read(int.from_bytes(file.read(8), "little")))


# ---------------------------------------------------------------- bake(extract(A, B)) == B


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_full_rank_extract_baked_into_the_base_gives_the_tuned_checkpoint(tmp_path, model):
    """At full rank, unclamped, fp32: B - A is held whole, so baking it into A gives B.

    Tolerance: the SVD runs in float32, whose backward error is about n x 2**-24 x ||B - A||_2 (n <= 36
    here), and the bake rounds once to fp32. 1e-5 x ||B - A||_2 (+ one fp32 ulp) leaves room for that
    and is still ~50 times finer than the changes' fp16 ulps, so a wrong factor, scale, layer or
    transposition cannot pass."""
    if model == "sd15":
        specs, keys = SPECS, CHANGED
    else:
        specs = sdxl_specs()
        qkv = next(iter(SDXL_QKV.values()))[0]
        keys = (*[key for key in SDXL_KOHYA.values() if "label_emb" not in key], qkv)
    base, tuned, changes = _pair(tmp_path, specs, keys, dtype=torch.float32)
    result = _extract(tmp_path, base, tuned, rank=64, conv_rank=64, clamp_quantile=1.0, min_diff=0.0)
    assert result.modules > len(keys)
    output = baked(tmp_path, base, [(result.path, 1.0, "")], dtype="fp32")
    original, expected = load(base), load(tuned)
    for key, tensor in expected.items():
        if not tensor.is_floating_point() or "." not in key:
            continue
        if key in changes:
            change = changes[key].reshape(changes[key].shape[0], -1)
            bound = 1e-5 * torch.linalg.matrix_norm(change, 2) + torch.finfo(torch.float32).eps * tensor.abs()
            error = (output[key].double() - tensor.double()).abs()
            assert (error <= bound).all(), f"{key}: {error.max().item():.3g} off"
            assert not torch.equal(output[key], original[key].float()), key
        else:  # no change: an all-zero LoRA module, or no module, leaves A's value (= B's) exactly
            assert torch.equal(output[key], tensor.float()), key


def test_a_low_rank_change_is_recovered_at_its_own_rank(tmp_path):
    """B - A has rank 2: a rank-2 LoRA holds it whole (same tolerance as above)."""
    base, tuned, changes = _pair(tmp_path, dtype=torch.float32)
    result = _extract(tmp_path, base, tuned, rank=2, conv_rank=2, clamp_quantile=1.0, min_diff=0.0)
    with open_checkpoint(base) as reader:
        lora = LoraReader(result.path, reader)
        for key, change in changes.items():
            matrix = change.reshape(change.shape[0], -1)
            error = (lora[key] - change).abs().max()
            assert error <= 1e-5 * torch.linalg.matrix_norm(matrix, 2), key
        # and a rank-1 LoRA cannot: its error is the second singular value (Eckart-Young)
    small = _extract(tmp_path, base, tuned, name="rank1", rank=1, clamp_quantile=1.0, min_diff=0.0)
    with open_checkpoint(base) as reader:
        lora = LoraReader(small.path, reader)
        matrix = changes[ATTN_Q]
        second = torch.linalg.svdvals(matrix)[1]
        assert torch.linalg.matrix_norm(lora[ATTN_Q] - matrix, 2) == pytest.approx(second.item(), rel=1e-4)


# ---------------------------------------------------------------- names


def _kohya_modules(table):
    """The hand-written names kohya's LoRA has (not time_embedding or label_emb: kohya has no module there)."""
    return {name: key for name, key in table.items() if "time_embedding" not in name and "label_emb" not in name}


@pytest.mark.parametrize("model", ["sd15", "sd2", "sdxl"])
def test_extracted_names_are_kohyas_and_map_back_to_their_keys(tmp_path, model):
    specs, table, qkv = {
        "sd15": (SD15, SD15_KOHYA, {}),
        "sd2": (sd2_specs(), SD2_KOHYA, SD2_QKV),
        "sdxl": (sdxl_specs(), SDXL_KOHYA, SDXL_QKV),
    }[model]
    base = make(tmp_path / "base.safetensors", specs, seed=2)
    tuned = make(tmp_path / "tuned.safetensors", specs, seed=3)
    result = _extract(tmp_path, base, tuned, rank=1, conv_rank=1, min_diff=0.0)
    names = {key.rsplit(".", 2)[0] for key in load(result.path) if key.endswith(".lora_down.weight")}
    expected = _kohya_modules(table)
    assert set(expected) <= names, sorted(set(expected) - names)
    assert set(qkv) <= names
    prefix = {"sd15": "lora_te_", "sd2": "lora_te_", "sdxl": ("lora_te1_", "lora_te2_")}[model]
    assert any(name.startswith(prefix) for name in names)
    with open_checkpoint(base) as reader:
        lora = LoraReader(result.path, reader)
        assert lora.unmatched == []
        for name, key in expected.items():
            assert lora.patches_of(key) == [name], key
        for name, (key, _) in qkv.items():
            assert name in lora.patches_of(key)
        patched = {name for key in lora.keys() for name in lora.patches_of(key)}
        assert patched == names  # every module lands on a layer, one module per layer


def test_3x3_convs_only_with_a_conv_rank(tmp_path):
    base, tuned, _ = _pair(tmp_path)
    plain = _extract(tmp_path, base, tuned, name="plain", rank=2, min_diff=0.0)
    names = {key for key in load(plain.path) if key.endswith(".lora_down.weight")}
    assert not any(part in key for key in names for part in ("resnets", "samplers"))
    assert "lora_unet_down_blocks_1_attentions_1_proj_in.lora_down.weight" in names  # 1x1 convs at the rank
    with_conv = _extract(tmp_path, base, tuned, name="conv", rank=2, conv_rank=3, min_diff=0.0)
    conv_names = {key for key in load(with_conv.path) if key.endswith(".lora_down.weight")}
    assert names < conv_names
    assert "lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight" in conv_names
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in conv_names
    # resnets' linear and 1x1 parts (time_emb_proj, conv_shortcut) come with them, at the rank
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight" in conv_names


# ---------------------------------------------------------------- ranks, alpha, metadata


def test_ranks_alpha_dtype_and_metadata(tmp_path):
    base, tuned, _ = _pair(tmp_path)
    result = _extract(tmp_path, base, tuned, rank=2, conv_rank=3, min_diff=0.0, dtype="bf16")
    tensors = load(result.path)
    for name, down_shape, up_shape in (
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (2, 4), (4, 2)),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", (2, 6), (4, 2)),
        ("lora_unet_down_blocks_1_attentions_1_proj_in", (2, 4, 1, 1), (4, 2, 1, 1)),
        ("lora_unet_down_blocks_1_resnets_0_conv1", (3, 4, 3, 3), (6, 3, 1, 1)),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (2, 4), (4, 2)),
    ):
        down, up, alpha = (tensors[f"{name}.{part}"] for part in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert tuple(down.shape) == down_shape and tuple(up.shape) == up_shape, name
        assert down.dtype == up.dtype == torch.bfloat16
        assert alpha.dtype == torch.float32 and alpha.item() == down_shape[0]  # alpha = rank: a scale of 1
    metadata = _header(result.path)["__metadata__"]
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("2", "2.0")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "3.0"}
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == ("sd_v1", "False")
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    data = base.read_bytes()
    assert metadata["ss_sd_model_name"] == "base.safetensors"
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert metadata["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert "sshs_model_hash" not in metadata  # the webui reads that as the LoRA's own hash
    assert result.sha256 == hashlib.sha256(result.path.read_bytes()).hexdigest()


def test_a_rank_above_a_layers_size_is_capped_with_a_note(tmp_path):
    base, tuned, _ = _pair(tmp_path)
    result = _extract(tmp_path, base, tuned, rank=5, conv_rank=40, min_diff=0.0)
    tensors = load(result.path)
    assert (
        tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape[0] == 4
    )
    assert tensors["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"].shape[0] == 6  # min(out 6, 4 x 3 x 3)
    assert any("smaller rank than asked" in note for note in result.notes)


# ---------------------------------------------------------------- clamping


def test_clamp_quantile_clamps_both_factors_at_kohyas_quantile(tmp_path):
    base, tuned, _ = _pair(tmp_path)
    whole = load(_extract(tmp_path, base, tuned, name="whole", rank=4, clamp_quantile=1.0, min_diff=0.0).path)
    clamped = load(_extract(tmp_path, base, tuned, name="clamped", rank=4, clamp_quantile=0.8, min_diff=0.0).path)
    differs = 0
    for key in whole:
        if not key.endswith(".lora_up.weight"):
            continue
        name = key[: -len(".lora_up.weight")]
        up, down = whole[key], whole[f"{name}.lora_down.weight"]
        hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.8)
        assert torch.equal(clamped[key], up.clamp(-hi, hi)), name
        assert torch.equal(clamped[f"{name}.lora_down.weight"], down.clamp(-hi, hi)), name
        differs += not torch.equal(clamped[key], up)
    assert differs > 0


def test_quantile_past_torchs_limit_matches_torchs_own(monkeypatch):
    with pytest.raises(RuntimeError):
        torch.quantile(torch.zeros(QUANTILE_LIMIT + 1), 0.99)  # why quantile() exists
    values = torch.randn(10_001, generator=torch.Generator().manual_seed(0))
    assert torch.equal(quantile(values, 0.3), torch.quantile(values, 0.3))  # kohya's own value where it can
    monkeypatch.setattr("lib_merge.lora.kohya.QUANTILE_LIMIT", 1000)  # the kthvalue path, on the same values
    for q in (0.99, 0.3, 0.5, 1.0):
        expected = np.quantile(values.numpy().astype(np.float64), q)
        assert quantile(values, q).item() == pytest.approx(expected, rel=1e-6, abs=1e-7), q
        assert quantile(values, q).item() == pytest.approx(torch.quantile(values, q).item(), rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------- the text encoder


def test_a_text_encoder_within_min_diff_is_left_out_and_the_unet_kept(tmp_path):
    """kohya's rule: the text encoder only when one of its weights differs by more than min_diff;
    UNet modules always, however small their change."""
    base, tuned, changes = _pair(tmp_path, keys=(ATTN_Q, TEXT_Q), size=0.001, dtype=torch.float32)
    largest = changes[TEXT_Q].abs().max().item()
    assert 0 < largest < 0.01
    left_out = _extract(tmp_path, base, tuned, name="unet_only", rank=2, min_diff=0.01)
    names = [key for key in load(left_out.path) if key.endswith(".lora_down.weight")]
    assert names and not any(name.startswith("lora_te") for name in names)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in names
    assert any("text encoder" in note and "left out" in note for note in left_out.notes)
    assert json.loads(_header(left_out.path)["__metadata__"]["merge_lab_lora_extract"])["text_encoder"] is False
    kept = _extract(tmp_path, base, tuned, name="both", rank=2, min_diff=largest / 2)
    te = [key for key in load(kept.path) if key.startswith("lora_te_") and key.endswith(".lora_down.weight")]
    assert len(te) == 6 * 12  # q, k, v, out, fc1, fc2 of each of the 12 layers
    assert kept.notes == []


def test_no_text_encoder_leaves_it_out_however_much_it_differs(tmp_path):
    base, tuned, _ = _pair(tmp_path, size=1.0)
    result = _extract(tmp_path, base, tuned, rank=2, min_diff=0.0, text_encoder=False)
    names = [key for key in load(result.path) if key.endswith(".lora_down.weight")]
    assert names and not any(name.startswith("lora_te") for name in names)


# ---------------------------------------------------------------- refusals


def _files(folder):
    return sorted(path.name for path in folder.iterdir() if path.is_file())


def test_checkpoints_of_two_architectures_are_refused_naming_both(tmp_path):
    base = make(tmp_path / "sd15.safetensors", SD15, seed=1)
    tuned = make(tmp_path / "xl.safetensors", sdxl_specs(), seed=2)
    with pytest.raises(
        IncompatibleModelsError, match=r"sd15.safetensors is an SD1 checkpoint but xl.safetensors is an SDXL"
    ):
        _extract(tmp_path, base, tuned, rank=2)
    flux = make(tmp_path / "flux.safetensors", tiny_specs(flux_keys(full=True)), seed=3)
    with pytest.raises(
        IncompatibleModelsError, match=r"flux.safetensors: is a Flux dev checkpoint; LoRAs are extracted"
    ):
        _extract(tmp_path, flux, flux, rank=2)
    assert _files(tmp_path) == ["flux.safetensors", "sd15.safetensors", "xl.safetensors"]


def test_a_shape_mismatch_is_refused_naming_the_key(tmp_path):
    base = make(tmp_path / "base.safetensors", SD15, seed=1)
    tuned = make(tmp_path / "tuned.safetensors", SPECS, seed=2)
    with pytest.raises(IncompatibleModelsError, match=rf"{CROSS_K}: base.safetensors has \[4, 4\] but tuned"):
        _extract(tmp_path, base, tuned, rank=2)
    assert not (tmp_path / "lora.safetensors").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 0}, "--rank: a rank is a whole number of at least 1"),
        ({"rank": 2, "conv_rank": -1}, "--conv-rank: a rank is a whole number"),
        ({"rank": 2, "clamp_quantile": 0}, r"--clamp-quantile: a number in \(0, 1\]"),
        ({"rank": 2, "clamp_quantile": 1.5}, r"--clamp-quantile: a number in \(0, 1\]"),
        ({"rank": 2, "min_diff": -1}, "--min-diff: a number of at least 0"),
        ({"rank": 2, "dtype": "fp8"}, "--dtype: one of fp16, bf16, fp32"),
    ],
)
def test_bad_options_are_refused_naming_the_option(tmp_path, options, message):
    base, tuned, _ = _pair(tmp_path)
    with pytest.raises(RequestError, match=message):
        _extract(tmp_path, base, tuned, **options)
    assert _files(tmp_path) == ["base.safetensors", "tuned.safetensors"]


def test_an_existing_output_is_kept_and_an_input_never_overwritten(tmp_path):
    base, tuned, _ = _pair(tmp_path)
    existing = tmp_path / "lora.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        _extract(tmp_path, base, tuned, rank=2)
    assert existing.read_bytes() == b"keep me"
    before = tuned.read_bytes()
    with pytest.raises(OutputError, match="is one of the inputs"):
        extract_lora(base, tuned, tuned, rank=2, overwrite=True, device="cpu")
    assert tuned.read_bytes() == before
    _extract(tmp_path, base, tuned, rank=2, overwrite=True)
    assert existing.read_bytes() != b"keep me"


# ---------------------------------------------------------------- the command line


cli = run_cli  # the command line in this process (see cli_runner.py)


def test_cli_extracts_prints_path_and_sha256_and_refuses_in_one_line(tmp_path, capsys):
    base, tuned, _ = _pair(tmp_path)
    inputs = {path: path.read_bytes() for path in (base, tuned)}
    out = tmp_path / "diff.safetensors"
    done = cli("lora", "extract", base, tuned, "--rank", "2", "--conv-rank", "2", "--min-diff", "0", "-o", out)
    assert done.returncode == 0, done.stderr
    path, sha_line = done.stdout.strip().splitlines()
    assert path == str(out) and sha_line == f"sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}"
    tensors = load(out)
    assert tensors["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"].dtype == torch.float16  # the default
    before = out.read_bytes()
    for args, message in (
        ((), "already exists"),
        (("--overwrite", "-o", str(tuned)), "is one of the inputs"),
        (("--rank", "two"), "--rank: a rank is a whole number of at least 1, got 'two'"),
        (("--clamp-quantile", "2"), "--clamp-quantile: a number in (0, 1]"),
        (("--min-diff", "x"), "--min-diff: must be a number, got 'x'"),
    ):
        code = main(["lora", "extract", str(base), str(tuned), "--rank", "2", "-o", str(out), "--device", "cpu", *args])
        error = capsys.readouterr().err.strip()
        assert code == 1 and message in error and len(error.splitlines()) == 1, error
    assert out.read_bytes() == before
    assert all(path.read_bytes() == data for path, data in inputs.items())
    assert _files(tmp_path) == ["base.safetensors", "diff.safetensors", "tuned.safetensors"]


def test_cli_refuses_two_architectures_in_one_line_and_writes_nothing(tmp_path, capsys):
    base = make(tmp_path / "sd15.safetensors", SD15, seed=1)
    tuned = make(tmp_path / "xl.safetensors", sdxl_specs(), seed=2)
    out = tmp_path / "lora.safetensors"
    assert main(["lora", "extract", str(base), str(tuned), "--rank", "4", "-o", str(out), "--device", "cpu"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("merge-lab: error: sd15.safetensors is an SD1 checkpoint but xl.safetensors is an SDXL")
    assert "\n" not in error and not out.exists()
    assert main(["lora", "extract", str(base), str(tmp_path / "nope.safetensors"), "--rank", "4", "-o", str(out)]) == 1
    assert "nope.safetensors: no such checkpoint" in capsys.readouterr().err
