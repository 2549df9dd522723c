"""Flux LoRAs in diffusers / PEFT names baked into BFL-layout checkpoints (full and bare).

The expected change is built here from the LoRA file alone: up @ down * scale per module, put in the
rows of the BFL tensor that Forge's loader (comfyui_lora_collection's flux_to_diffusers) gives it,
with norm_out's two halves traded; the table below is written out by hand, not taken from lib_merge.
"""

from __future__ import annotations

import pytest
import torch
from cli_runner import run_cli
from conftest import assert_within_one_ulp, load, make
from make_lora import baked, lora_file, lora_module, save
from transformer_layouts import FLUX_TINY_DIMS, UNET, flux_specs, sd3_keys, tiny_specs

from lib_merge.cli import main
from lib_merge.errors import IncompatibleModelsError, InputError
from lib_merge.io.formats import open_checkpoint
from lib_merge.lora import LoraReader

H = FLUX_TINY_DIMS["hidden"]  # 4: linear1 is q, k, v (H rows each) then the MLP (4 H rows), uneven
# diffusers module -> (BFL key, no prefix; the (start, stop) rows it lands in, None for all; halves traded)
FLUX_DIFFUSERS = {
    "transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv.weight", (0, H), False),
    "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv.weight", (H, 2 * H), False),
    "transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn.qkv.weight", (2 * H, 3 * H), False),
    "transformer_blocks.0.attn.add_k_proj": ("double_blocks.0.txt_attn.qkv.weight", (H, 2 * H), False),
    "transformer_blocks.18.attn.add_v_proj": ("double_blocks.18.txt_attn.qkv.weight", (2 * H, 3 * H), False),
    "transformer_blocks.1.attn.to_out.0": ("double_blocks.1.img_attn.proj.weight", None, False),
    "transformer_blocks.1.attn.to_add_out": ("double_blocks.1.txt_attn.proj.weight", None, False),
    "transformer_blocks.1.ff.net.0.proj": ("double_blocks.1.img_mlp.0.weight", None, False),
    "transformer_blocks.1.ff_context.net.2": ("double_blocks.1.txt_mlp.2.weight", None, False),
    "transformer_blocks.2.norm1.linear": ("double_blocks.2.img_mod.lin.weight", None, False),
    "transformer_blocks.2.norm1_context.linear": ("double_blocks.2.txt_mod.lin.weight", None, False),
    "single_transformer_blocks.2.attn.to_q": ("single_blocks.2.linear1.weight", (0, H), False),
    "single_transformer_blocks.2.attn.to_k": ("single_blocks.2.linear1.weight", (H, 2 * H), False),
    "single_transformer_blocks.2.attn.to_v": ("single_blocks.2.linear1.weight", (2 * H, 3 * H), False),
    "single_transformer_blocks.2.proj_mlp": ("single_blocks.2.linear1.weight", (3 * H, 7 * H), False),
    "single_transformer_blocks.37.proj_mlp": ("single_blocks.37.linear1.weight", (3 * H, 7 * H), False),
    "single_transformer_blocks.3.proj_out": ("single_blocks.3.linear2.weight", None, False),
    "single_transformer_blocks.3.norm.linear": ("single_blocks.3.modulation.lin.weight", None, False),
    "x_embedder": ("img_in.weight", None, False),
    "context_embedder": ("txt_in.weight", None, False),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer.weight", None, False),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer.weight", None, False),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer.weight", None, False),
    "proj_out": ("final_layer.linear.weight", None, False),
    "norm_out.linear": ("final_layer.adaLN_modulation.1.weight", None, True),
}
CLIP_L_FC1 = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
# How trainers spell a module: (name, whether it is written kohya-style with lora_down / up and alpha)
SPELLINGS = {
    "peft": (lambda name: f"transformer.{name}", {"peft": True}),
    "no prefix": (lambda name: name, {"peft": True}),
    "base_model.model": (lambda name: f"base_model.model.{name}", {"peft": True}),
    "kohya-style": (lambda name: "lora_transformer_" + name.replace(".", "_"), {"alpha": 1.0}),
}


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _module_shapes(specs, prefix: str) -> dict[str, tuple[int, ...]]:
    """Each diffusers module's change shape: its rows of the BFL weight by the weight's width."""
    shapes = {}
    for name, (key, rows, _) in FLUX_DIFFUSERS.items():
        out, width = specs[prefix + key].shape
        shapes[name] = (rows[1] - rows[0] if rows else out, width)
    return shapes


def _lora(path, specs, prefix: str, spelling: str, *, text_encoder: bool = False, seed: int = 0):
    """A diffusers-named Flux LoRA in ``spelling``; the table of its module names -> diffusers names."""
    spell, options = SPELLINGS[spelling]
    shapes = {spell(name): shape for name, shape in _module_shapes(specs, prefix).items()}
    names = {spell(name): name for name in FLUX_DIFFUSERS}
    if text_encoder:
        shapes["text_encoder.text_model.encoder.layers.0.mlp.fc1"] = tuple(specs[CLIP_L_FC1].shape)
    return lora_file(path, shapes, seed=seed, **options), names


def _module_change(tensors: dict[str, torch.Tensor], stored: str) -> torch.Tensor:
    """up @ down * alpha / rank (1 without alpha) of one module, in float64."""
    up = tensors.get(f"{stored}.lora_B.weight", tensors.get(f"{stored}.lora_up.weight"))
    down = tensors.get(f"{stored}.lora_A.weight", tensors.get(f"{stored}.lora_down.weight"))
    alpha = tensors[f"{stored}.alpha"].item() if f"{stored}.alpha" in tensors else down.shape[0]
    return up.double() @ down.double() * alpha / down.shape[0]


def _expected(lora_path, names: dict[str, str], specs, prefix: str) -> dict[str, torch.Tensor]:
    """Each BFL key's float64 change, from the LoRA file: each module's in its rows, halves traded
    for norm_out."""
    tensors = load(lora_path)
    changes: dict[str, torch.Tensor] = {}
    for stored, name in names.items():
        key, rows, swap = FLUX_DIFFUSERS[name]
        change = _module_change(tensors, stored)
        if swap:
            half = change.shape[0] // 2
            change = torch.cat([change[half:], change[:half]])
        total = changes.setdefault(prefix + key, torch.zeros(specs[prefix + key].shape, dtype=torch.float64))
        start, stop = rows or (0, total.shape[0])
        total[start:stop] += change
    return changes


def _check(output, original, expected, ratio: float) -> None:
    for key, tensor in original.items():
        if key in expected:
            assert_within_one_ulp(output[key], tensor.double() + ratio * expected[key], key)
        else:
            assert torch.equal(output[key], tensor), key


@pytest.mark.parametrize(
    "full, spelling",
    [(True, spelling) for spelling in SPELLINGS] + [(False, "peft"), (False, "kohya-style")],
    ids=lambda value: {True: "full", False: "bare"}.get(value, value),
)
def test_diffusers_flux_modules_bake_into_their_rows_of_bfl_keys(tmp_path, full, spelling):
    specs = flux_specs(full=full)
    prefix = UNET if full else ""
    checkpoint = make(tmp_path / "flux.safetensors", specs, seed=1)
    lora, names = _lora(tmp_path / "lora.safetensors", specs, prefix, spelling, text_encoder=full)
    expected = _expected(lora, names, specs, prefix)
    if full:  # diffusers' CLIP-L lands in a full Flux checkpoint's text_encoders.clip_l
        expected[CLIP_L_FC1] = _module_change(load(lora), "text_encoder.text_model.encoder.layers.0.mlp.fc1")
    output = baked(tmp_path, checkpoint, [(lora, 0.7, "")], dtype="fp32")
    _check(output, load(checkpoint), expected, 0.7)


def test_the_uneven_linear1_split_puts_each_part_in_its_rows_and_leaves_the_rest(tmp_path):
    specs = flux_specs(full=False)
    checkpoint = make(tmp_path / "flux.safetensors", specs, seed=2)
    generator = torch.Generator().manual_seed(2)
    key = "single_blocks.5.linear1"
    parts = lora_module("transformer.single_transformer_blocks.5.proj_mlp", (4 * H, H), 2, generator, peft=True)
    parts |= lora_module("transformer.single_transformer_blocks.5.attn.to_k", (H, H), 1, generator, peft=True)
    parts["transformer.single_transformer_blocks.5.proj_mlp.diff_b"] = torch.randn(4 * H, generator=generator)
    lora = save(tmp_path / "lora.safetensors", parts)
    with open_checkpoint(checkpoint) as base, LoraReader(lora, base) as reader:
        assert sorted(k for k in reader.keys() if reader.patches_of(k)) == [f"{key}.bias", f"{key}.weight"]
        weight, bias = reader[f"{key}.weight"], reader[f"{key}.bias"]
    mlp = parts["transformer.single_transformer_blocks.5.proj_mlp.lora_B.weight"].double()
    mlp = mlp @ parts["transformer.single_transformer_blocks.5.proj_mlp.lora_A.weight"].double()
    k = parts["transformer.single_transformer_blocks.5.attn.to_k.lora_B.weight"].double()
    k = k @ parts["transformer.single_transformer_blocks.5.attn.to_k.lora_A.weight"].double()
    assert weight.shape == (7 * H, H) and bias.shape == (7 * H,)
    assert torch.equal(weight[:H], torch.zeros(H, H)) and torch.equal(weight[2 * H : 3 * H], torch.zeros(H, H))
    torch.testing.assert_close(weight[H : 2 * H], k, rtol=1e-12, atol=0)
    torch.testing.assert_close(weight[3 * H :], mlp, rtol=1e-12, atol=0)
    diff_b = parts["transformer.single_transformer_blocks.5.proj_mlp.diff_b"].double()
    assert torch.equal(bias[3 * H :], diff_b) and torch.equal(bias[: 3 * H], torch.zeros(3 * H, dtype=torch.float64))


def test_modules_that_match_no_layer_are_listed_in_the_notes(tmp_path, capsys):
    specs = flux_specs(full=True)
    checkpoint = make(tmp_path / "flux.safetensors", specs, seed=3)
    generator = torch.Generator().manual_seed(3)
    parts = lora_module("transformer.transformer_blocks.0.attn.to_q", (H, H), 2, generator, peft=True)
    for name in ("transformer.transformer_blocks.19.attn.to_q", "transformer.not_a_layer"):
        parts |= lora_module(name, (H, H), 2, generator, peft=True)
    lora = save(tmp_path / "lora.safetensors", parts)
    with open_checkpoint(checkpoint) as base, LoraReader(lora, base) as reader:
        assert sorted(reader.unmatched) == ["transformer.not_a_layer", "transformer.transformer_blocks.19.attn.to_q"]
    out = tmp_path / "baked.safetensors"
    assert main(["lora", "bake", str(checkpoint), str(lora), "-o", str(out), "--dry-run"]) == 0
    report = capsys.readouterr().out
    assert "Note: lora.safetensors: 2 LoRA modules match no layer of the checkpoint, not baked:" in report
    assert "transformer.transformer_blocks.19.attn.to_q" in report and "transformer.not_a_layer" in report


def test_a_part_too_wide_for_the_checkpoint_is_refused(tmp_path):
    checkpoint = make(tmp_path / "flux.safetensors", flux_specs(full=False), seed=4)
    wide = flux_specs({**FLUX_TINY_DIMS, "hidden": 6}, full=False)
    lora, _ = _lora(tmp_path / "wide.safetensors", wide, "", "peft")
    with pytest.raises(IncompatibleModelsError, match=r"wide.safetensors .*they are different architectures"):
        baked(tmp_path, checkpoint, [(lora, 1.0, "")])


def test_diffusers_names_are_not_placed_in_an_sd3_checkpoint(tmp_path):
    """SD3's diffusers LoRAs share proj_out and norm_out.linear with Flux's: none is baked half."""
    checkpoint = make(tmp_path / "sd3.safetensors", tiny_specs(sd3_keys()), seed=7)
    shapes = {
        f"transformer.{name}": (2, 3) for name in ("proj_out", "norm_out.linear", "transformer_blocks.0.attn.to_q")
    }
    lora = lora_file(tmp_path / "sd3_lora.safetensors", shapes, peft=True)
    with pytest.raises(IncompatibleModelsError, match=r"sd3_lora.safetensors: none of its 3 LoRA modules matches"):
        baked(tmp_path, checkpoint, [(lora, 1.0, "")])


def test_two_spellings_of_one_part_are_refused(tmp_path):
    checkpoint = make(tmp_path / "flux.safetensors", flux_specs(full=False), seed=5)
    generator = torch.Generator().manual_seed(5)
    parts = lora_module("transformer.transformer_blocks.0.attn.to_k", (H, H), 2, generator, peft=True)
    parts |= lora_module("lora_transformer_transformer_blocks_0_attn_to_k", (H, H), 2, generator)
    lora = save(tmp_path / "twice.safetensors", parts)
    with pytest.raises(InputError, match=r"both patch double_blocks.0.img_attn.qkv.weight \(rows 4:8\)"):
        baked(tmp_path, checkpoint, [(lora, 1.0, "")])


def test_cli_bakes_a_diffusers_flux_lora(tmp_path):
    specs = flux_specs(full=True)
    checkpoint = make(tmp_path / "flux.safetensors", specs, seed=6)
    lora, names = _lora(tmp_path / "style.safetensors", specs, UNET, "peft", seed=6)
    out = tmp_path / "baked.safetensors"
    done = run_cli("lora", "bake", checkpoint, f"{lora}:0.7", "-o", out)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == str(out)
    _check(load(out), load(checkpoint), _expected(lora, names, specs, UNET), 0.7)
