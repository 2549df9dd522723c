"""Each LoRA format's maths and key names, against float64 computed here, independently of lib_merge.lora.

Every change is baked at a ratio into a small checkpoint with real key names and output in fp32, so
a wrong scale, transpose or layer shows as more than one unit in the last place, or as a key that
changed when it should not have (or did not when it should).
"""

from __future__ import annotations

import pytest
import torch
from conftest import SD15, assert_within_one_ulp, load, make
from make_lora import (
    SD2_KOHYA,
    SD2_QKV,
    SD15_KOHYA,
    SD15_PEFT,
    SDXL_KOHYA,
    SDXL_PEFT,
    SDXL_PEFT_QKV,
    SDXL_QKV,
    UNET,
    baked,
    lora_module,
    random,
    save,
    sd2_specs,
    sdxl_specs,
)

from lib_merge.errors import InputError

RATIO = 0.75
LINEAR = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
CONV = UNET + "input_blocks.2.0.in_layers.2.weight"  # 3x3
LINEAR_NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV_NAME = "lora_unet_down_blocks_0_resnets_1_conv1"


def _d(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float64)


def _check(checkpoint, output, expected_changes: dict[str, torch.Tensor], ratio: float = RATIO) -> None:
    """Each changed key within one fp32 ulp of checkpoint + ratio * change; every other key unchanged."""
    for key, tensor in checkpoint.items():
        if key in expected_changes:
            assert_within_one_ulp(output[key], _d(tensor) + ratio * expected_changes[key], key)
            assert not torch.equal(output[key], tensor.float()), key
        else:
            assert torch.equal(output[key], tensor.to(output[key].dtype)), key


def _sd15(tmp_path):
    path = make(tmp_path / "model.safetensors", SD15, seed=1)
    return path, load(path)


def _bake(tmp_path, checkpoint, lora, ratio=RATIO, dtype="fp32"):
    return baked(tmp_path, checkpoint, [(lora, ratio, "")], dtype=dtype)


# ---------------------------------------------------------------- kohya LoRA / LoCon


def test_kohya_lora_sd15_every_layer_kind_lands_on_its_key(tmp_path):
    """Linear, conv 1x1, conv 3x3, downsampler, upsampler, shortcut, time embedding, text encoder:
    up @ down * alpha / rank on the key the webui patches."""
    checkpoint, tensors = _sd15(tmp_path)
    generator = torch.Generator().manual_seed(3)
    parts, expected = {}, {}
    for index, (name, key) in enumerate(SD15_KOHYA.items()):
        shape = SD15[key].shape
        alpha = [1.0, 2.0, 0.5][index % 3]
        module = lora_module(name, shape, 2, generator, alpha=alpha)
        parts.update(module)
        up = _d(module[f"{name}.lora_up.weight"]).flatten(1)  # [out, rank]
        down = _d(module[f"{name}.lora_down.weight"])  # [rank, in, *kernel]
        change = torch.einsum("or,r...->o...", up, down).reshape(shape)
        expected[key] = change * alpha / 2
    lora = save(tmp_path / "lora.safetensors", parts)
    _check(tensors, _bake(tmp_path, checkpoint, lora), expected)


def test_alpha_missing_means_scale_one(tmp_path):
    checkpoint, tensors = _sd15(tmp_path)
    module = lora_module(LINEAR_NAME, SD15[LINEAR].shape, 2, torch.Generator().manual_seed(4))
    lora = save(tmp_path / "lora.safetensors", module)
    change = _d(module[f"{LINEAR_NAME}.lora_up.weight"]) @ _d(module[f"{LINEAR_NAME}.lora_down.weight"])
    _check(tensors, _bake(tmp_path, checkpoint, lora), {LINEAR: change})


def test_locon_with_cp_mid_factor(tmp_path):
    """LoCon with lora_mid (a CP-decomposed 3x3): down 1x1, mid 3x3 over the rank, up 1x1."""
    checkpoint, tensors = _sd15(tmp_path)
    g = torch.Generator().manual_seed(5)
    out, inputs, kh, kw = SD15[CONV].shape
    down, mid, up = random((2, inputs, 1, 1), g), random((2, 2, kh, kw), g), random((out, 2, 1, 1), g)
    lora = save(
        tmp_path / "lora.safetensors",
        {
            f"{CONV_NAME}.lora_down.weight": down,
            f"{CONV_NAME}.lora_mid.weight": mid,
            f"{CONV_NAME}.lora_up.weight": up,
            f"{CONV_NAME}.alpha": torch.tensor(4.0),
        },
    )
    change = torch.zeros(out, inputs, kh, kw, dtype=torch.float64)
    for k in range(kh):
        for l in range(kw):  # noqa: E741
            change[:, :, k, l] = _d(up[:, :, 0, 0]) @ _d(mid[:, :, k, l]) @ _d(down[:, :, 0, 0])
    _check(tensors, _bake(tmp_path, checkpoint, lora), {CONV: change * 4.0 / 2})


# ---------------------------------------------------------------- LyCORIS LoHa and LoKr


def test_loha_linear_and_conv_with_tucker_cores(tmp_path):
    checkpoint, tensors = _sd15(tmp_path)
    g = torch.Generator().manual_seed(6)
    out, inputs = SD15[LINEAR].shape
    w = {
        n: random(s, g)
        for n, s in (("w1_a", (out, 2)), ("w1_b", (2, inputs)), ("w2_a", (out, 2)), ("w2_b", (2, inputs)))
    }
    parts = {f"{LINEAR_NAME}.hada_{n}": t for n, t in w.items()} | {f"{LINEAR_NAME}.alpha": torch.tensor(1.0)}
    linear = (_d(w["w1_a"]) @ _d(w["w1_b"])) * (_d(w["w2_a"]) @ _d(w["w2_b"])) * 1.0 / 2
    # The conv with CP cores (LyCORIS use_tucker): w_a [rank, out], w_b [rank, in], t [rank, rank, kh, kw].
    cout, cin, kh, kw = SD15[CONV].shape
    c = {n: random(s, g) for n, s in (("w1_a", (2, cout)), ("w1_b", (2, cin)), ("w2_a", (2, cout)), ("w2_b", (2, cin)))}
    t1, t2 = random((2, 2, kh, kw), g), random((2, 2, kh, kw), g)
    parts |= {f"{CONV_NAME}.hada_{n}": t for n, t in c.items()}
    parts |= {f"{CONV_NAME}.hada_t1": t1, f"{CONV_NAME}.hada_t2": t2, f"{CONV_NAME}.alpha": torch.tensor(3.0)}

    def rebuilt(t, wa, wb):
        result = torch.zeros(cout, cin, kh, kw, dtype=torch.float64)
        for k in range(kh):
            for l in range(kw):  # noqa: E741
                result[:, :, k, l] = _d(wa).T @ _d(t[:, :, k, l]) @ _d(wb)
        return result

    conv = rebuilt(t1, c["w1_a"], c["w1_b"]) * rebuilt(t2, c["w2_a"], c["w2_b"]) * 3.0 / 2
    lora = save(tmp_path / "loha.safetensors", parts)
    _check(tensors, _bake(tmp_path, checkpoint, lora), {LINEAR: linear, CONV: conv})


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Kronecker product of two matrices, spelled out."""
    (m, n), (p, q) = a.shape, b.shape
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(m * p, n * q)


def test_lokr_whole_factors_scale_one_and_decomposed_factor_alpha_over_rank(tmp_path):
    """The webui's LoKr scale: whole w1 and w2 have no rank, so alpha is not applied; with w2 as
    w2_a @ w2_b, alpha / rank of w2_b."""
    checkpoint, tensors = _sd15(tmp_path)
    g = torch.Generator().manual_seed(7)
    out, inputs = SD15[LINEAR].shape  # 4 x 4 = (2 x 2) kron (2 x 2)
    w1, w2 = random((2, 2), g), random((out // 2, inputs // 2), g)
    parts = {f"{LINEAR_NAME}.lokr_w1": w1, f"{LINEAR_NAME}.lokr_w2": w2, f"{LINEAR_NAME}.alpha": torch.tensor(8.0)}
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    key = LINEAR.replace("to_q", "to_k")
    v1, w2a, w2b = random((2, 2), g), random((out // 2, 1), g), random((1, inputs // 2), g)
    parts |= {
        f"{name}.lokr_w1": v1,
        f"{name}.lokr_w2_a": w2a,
        f"{name}.lokr_w2_b": w2b,
        f"{name}.alpha": torch.tensor(3.0),
    }
    expected = {LINEAR: _kron(_d(w1), _d(w2)), key: _kron(_d(v1), _d(w2a) @ _d(w2b)) * 3.0 / 1}
    lora = save(tmp_path / "lokr.safetensors", parts)
    _check(tensors, _bake(tmp_path, checkpoint, lora), expected)


def test_lokr_conv_with_tucker_core(tmp_path):
    checkpoint, tensors = _sd15(tmp_path)
    g = torch.Generator().manual_seed(8)
    out, inputs, kh, kw = SD15[CONV].shape
    w1 = random((2, 2), g)
    t2, w2a, w2b = random((2, 2, kh, kw), g), random((2, out // 2), g), random((2, inputs // 2), g)
    parts = {f"{CONV_NAME}.lokr_{n}": t for n, t in (("w1", w1), ("t2", t2), ("w2_a", w2a), ("w2_b", w2b))}
    parts[f"{CONV_NAME}.alpha"] = torch.tensor(1.0)
    change = torch.zeros(out, inputs, kh, kw, dtype=torch.float64)
    for k in range(kh):
        for l in range(kw):  # noqa: E741
            change[:, :, k, l] = _kron(_d(w1), _d(w2a).T @ _d(t2[:, :, k, l]) @ _d(w2b))
    lora = save(tmp_path / "lokr.safetensors", parts)
    _check(tensors, _bake(tmp_path, checkpoint, lora), {CONV: change * 1.0 / 2})


# ---------------------------------------------------------------- full diff, DoRA


def test_full_diff_and_diff_b(tmp_path):
    """A stored difference: diff scaled by 1 (no rank), diff_b added to the bias as it is."""
    checkpoint, tensors = _sd15(tmp_path)
    g = torch.Generator().manual_seed(9)
    proj = UNET + "input_blocks.1.1.proj_in.weight"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    diff, diff_b = random(SD15[proj].shape, g), random(SD15[proj.removesuffix("weight") + "bias"].shape, g)
    lora = save(tmp_path / "full.safetensors", {f"{name}.diff": diff, f"{name}.diff_b": diff_b})
    expected = {proj: _d(diff), proj.removesuffix("weight") + "bias": _d(diff_b)}
    _check(tensors, _bake(tmp_path, checkpoint, lora), expected)


def test_dora_renormalises_each_input_column(tmp_path):
    """DoRA (dora_scale [1, in]): W' = W + s * up @ down, then each column of W' scaled to its
    magnitude; the ratio multiplies the resulting change."""
    checkpoint, tensors = _sd15(tmp_path)
    g = torch.Generator().manual_seed(10)
    module = lora_module(LINEAR_NAME, SD15[LINEAR].shape, 2, g, alpha=1.0)
    magnitude = random((1, SD15[LINEAR].shape[1]), g).abs() + 0.5
    lora = save(tmp_path / "dora.safetensors", {**module, f"{LINEAR_NAME}.dora_scale": magnitude})
    weight = _d(tensors[LINEAR])
    merged = weight + _d(module[f"{LINEAR_NAME}.lora_up.weight"]) @ _d(module[f"{LINEAR_NAME}.lora_down.weight"]) / 2
    target = merged.clone()
    for column in range(merged.shape[1]):
        target[:, column] = merged[:, column] / merged[:, column].norm() * float(magnitude[0, column])
    _check(tensors, _bake(tmp_path, checkpoint, lora), {LINEAR: target - weight})


# ---------------------------------------------------------------- SDXL and diffusers / PEFT names


def test_kohya_sdxl_names_and_the_fused_qkv_of_the_second_text_encoder(tmp_path):
    """lora_unet_ with the checkpoint's names, lora_te1_ (CLIP-L), lora_te2_ (OpenCLIP-G), whose q,
    k and v land in the thirds of in_proj_weight's rows."""
    specs = sdxl_specs()
    checkpoint = make(tmp_path / "xl.safetensors", specs, seed=2)
    tensors = load(checkpoint)
    g = torch.Generator().manual_seed(11)
    parts, expected = {}, {}
    for name, key in SDXL_KOHYA.items():
        module = lora_module(name, specs[key].shape, 2, g, alpha=2.0)
        parts.update(module)
        up, down = _d(module[f"{name}.lora_up.weight"]).flatten(1), _d(module[f"{name}.lora_down.weight"])
        expected[key] = torch.einsum("or,r...->o...", up, down).reshape(specs[key].shape) * 2.0 / 2
    for name, (key, third) in SDXL_QKV.items():
        rows = specs[key].shape[0] // 3
        module = lora_module(name, (rows, specs[key].shape[1]), 2, g, alpha=1.0)
        parts.update(module)
        change = expected.setdefault(key, torch.zeros(specs[key].shape, dtype=torch.float64))
        product = _d(module[f"{name}.lora_up.weight"]) @ _d(module[f"{name}.lora_down.weight"])
        change[third * rows : (third + 1) * rows] = product / 2
    lora = save(tmp_path / "xl_lora.safetensors", parts)
    _check(tensors, _bake(tmp_path, checkpoint, lora), expected)


def test_kohya_sd2_text_encoder_names_land_in_open_clip_layers(tmp_path):
    """SD2's lora_te_ names: mlp_fc1 is c_fc, mlp_fc2 c_proj, self_attn attn, q/k/v thirds of in_proj."""
    specs = sd2_specs()
    checkpoint = make(tmp_path / "sd2.safetensors", specs, seed=4)
    tensors = load(checkpoint)
    g = torch.Generator().manual_seed(13)
    parts, expected = {}, {}
    targets = {**{name: (key, None) for name, key in SD2_KOHYA.items()}, **SD2_QKV}
    for name, (key, third) in targets.items():
        rows = specs[key].shape[0] if third is None else specs[key].shape[0] // 3
        module = lora_module(name, (rows, specs[key].shape[1]), 2, g, alpha=1.0)
        parts.update(module)
        product = _d(module[f"{name}.lora_up.weight"]) @ _d(module[f"{name}.lora_down.weight"]) / 2
        if third is None:
            expected[key] = product
        else:
            expected.setdefault(key, torch.zeros(specs[key].shape, dtype=torch.float64))[
                third * rows : (third + 1) * rows
            ] = product
    lora = save(tmp_path / "sd2_lora.safetensors", parts)
    _check(tensors, _bake(tmp_path, checkpoint, lora), expected)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_diffusers_peft_lora_a_lora_b(tmp_path, model):
    specs = SD15 if model == "sd15" else sdxl_specs()
    table = dict(SD15_PEFT) if model == "sd15" else {**SDXL_PEFT, **dict(SDXL_PEFT_QKV)}
    checkpoint = make(tmp_path / "model.safetensors", specs, seed=3)
    tensors = load(checkpoint)
    g = torch.Generator().manual_seed(12)
    parts, expected = {}, {}
    for name, target in table.items():
        key, third = target if isinstance(target, tuple) else (target, None)
        shape = specs[key].shape if third is None else (specs[key].shape[0] // 3, specs[key].shape[1])
        module = lora_module(name, shape, 2, g, peft=True)
        parts.update(module)
        a, b = _d(module[f"{name}.lora_A.weight"]), _d(module[f"{name}.lora_B.weight"]).flatten(1)
        change = torch.einsum("or,r...->o...", b, a).reshape(shape)  # no alpha in the file: scale 1
        if third is None:
            expected[key] = change
        else:
            expected[key] = torch.zeros(specs[key].shape, dtype=torch.float64)
            expected[key][third * shape[0] : (third + 1) * shape[0]] = change
    lora = save(tmp_path / "peft.safetensors", parts)
    _check(tensors, _bake(tmp_path, checkpoint, lora), expected)


# ---------------------------------------------------------------- what is refused


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({f"{LINEAR_NAME}.lora_down.weight": torch.ones(2, 4)}, r"module .*attn1_to_q is incomplete.*lora_up"),
        ({f"{LINEAR_NAME}.hada_w1_a": torch.ones(4, 2)}, r"is incomplete.*LoHa needs"),
        (
            {f"{LINEAR_NAME}.on_input": torch.ones(1), f"{LINEAR_NAME}.weight": torch.ones(4)},
            r"IA3 module, which is not baked",
        ),
        ({"model.diffusion_model.out.2.weight": torch.ones(4)}, r"not a LoRA file: no key is part of a LoRA module"),
        (
            {"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(4), "img_in.weight": torch.ones(4, 4)},
            r"not a LoRA file: no key is part of a LoRA module",
        ),
        (
            {f"{LINEAR_NAME}.lora_down.weight": torch.ones(2, 4), f"{LINEAR_NAME}.lora_up.weight": torch.ones(4, 3)},
            r"attn1_to_q \(LoRA/LoCon\): its parts do not fit together \(down \[2, 4\], up \[4, 3\]\)",
        ),
        (
            {
                f"{LINEAR_NAME}.lora_down.weight": torch.ones(2, 4),
                f"{LINEAR_NAME}.lora_up.weight": torch.ones(4, 2),
                f"{LINEAR_NAME}.alpha": torch.ones(2),
            },
            r"alpha must be a single number",
        ),
    ],
)
def test_bad_lora_files_are_refused_in_one_line_naming_file_and_key(tmp_path, parts, message):
    checkpoint, _ = _sd15(tmp_path)
    lora = save(tmp_path / "bad.safetensors", parts)
    with pytest.raises(InputError, match=message) as caught:
        _bake(tmp_path, checkpoint, lora)
    assert "\n" not in str(caught.value) and "bad.safetensors" in str(caught.value)
    assert not (tmp_path / "baked.safetensors").exists()
