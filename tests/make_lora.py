"""Small LoRA files with the key names real trainers write, for the test checkpoints of conftest.py.

Each table pairs a module name as kohya's sd-scripts, LyCORIS or diffusers/PEFT write it with the
checkpoint key it patches, written out by hand (not derived by the code under test), so the
mapping is checked against what the webui's Lora extension does with the same names.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from conftest import SDXL

from lib_merge.io.readers import TensorSpec

UNET = "model.diffusion_model."
SD1_TEXT = "cond_stage_model.transformer.text_model.encoder.layers."
CLIP_L = "conditioner.embedders.0.transformer.text_model.encoder.layers."
CLIP_G = "conditioner.embedders.1.model.transformer.resblocks."

# kohya's SD1 names: the UNet in diffusers' layout (down_blocks ...), the text encoder as lora_te_.
SD15_KOHYA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": UNET
    + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_down_blocks_1_attentions_1_proj_in": UNET + "input_blocks.5.1.proj_in.weight",
    "lora_unet_down_blocks_0_resnets_1_conv1": UNET + "input_blocks.2.0.in_layers.2.weight",
    "lora_unet_down_blocks_0_downsamplers_0_conv": UNET + "input_blocks.3.0.op.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": UNET
    + "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_mid_block_resnets_1_conv2": UNET + "middle_block.2.out_layers.3.weight",
    "lora_unet_up_blocks_0_upsamplers_0_conv": UNET + "output_blocks.2.1.conv.weight",
    "lora_unet_up_blocks_1_upsamplers_0_conv": UNET + "output_blocks.5.2.conv.weight",
    "lora_unet_up_blocks_1_resnets_0_conv_shortcut": UNET + "output_blocks.3.0.skip_connection.weight",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj": UNET
    + "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
    "lora_unet_time_embedding_linear_1": UNET + "time_embed.0.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": SD1_TEXT + "0.self_attn.q_proj.weight",
    "lora_te_text_model_encoder_layers_11_mlp_fc2": SD1_TEXT + "11.mlp.fc2.weight",
}
# kohya's SDXL names: the UNet as the checkpoint names it, lora_te1_ (CLIP-L) and lora_te2_ (OpenCLIP-G).
SDXL_KOHYA = {
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": UNET
    + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
    "lora_unet_input_blocks_1_0_in_layers_2": UNET + "input_blocks.1.0.in_layers.2.weight",
    "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2": UNET
    + "middle_block.1.transformer_blocks.9.ff.net.2.weight",
    "lora_unet_output_blocks_8_0_skip_connection": UNET + "output_blocks.8.0.skip_connection.weight",
    "lora_unet_label_emb_0_0": UNET + "label_emb.0.0.weight",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": CLIP_L + "0.self_attn.q_proj.weight",
    "lora_te2_text_model_encoder_layers_0_self_attn_out_proj": CLIP_G + "0.attn.out_proj.weight",
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": CLIP_G + "1.mlp.c_fc.weight",
}
# OpenCLIP-G's q, k, v are one tensor: each lands in a third of in_proj_weight's rows.
SDXL_QKV = {
    f"lora_te2_text_model_encoder_layers_2_self_attn_{x}_proj": (CLIP_G + "2.attn.in_proj_weight", i)
    for i, x in enumerate("qkv")
}
# diffusers / PEFT names (lora_A, lora_B), SD1 and SDXL.
SD15_PEFT = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": UNET
    + "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight",
    "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": UNET
    + "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0.weight",
    "text_encoder.text_model.encoder.layers.3.self_attn.k_proj": SD1_TEXT + "3.self_attn.k_proj.weight",
}
SDXL_PEFT = {
    "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k": UNET
    + "input_blocks.4.1.transformer_blocks.1.attn1.to_k.weight",
    "unet.up_blocks.0.upsamplers.0.conv": UNET + "output_blocks.2.2.conv.weight",
    "text_encoder.text_model.encoder.layers.1.self_attn.v_proj": CLIP_L + "1.self_attn.v_proj.weight",
}
SDXL_PEFT_QKV = {"text_encoder_2.text_model.encoder.layers.3.self_attn.v_proj": (CLIP_G + "3.attn.in_proj_weight", 2)}


def sdxl_specs(width: int = 4) -> dict[str, TensorSpec]:
    """conftest's small SDXL with OpenCLIP-G's fused q, k, v three widths tall, as in the real model."""
    specs = dict(SDXL)
    for key, spec in SDXL.items():
        if key.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
            specs[key] = TensorSpec(spec.dtype, (3 * width, *spec.shape[1:]))
    return specs


def random(shape, generator: torch.Generator, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * 0.5).to(dtype)


def lora_module(
    name: str, shape, rank: int, generator, *, alpha: float | None = None, peft: bool = False, dtype=torch.float16
):
    """kohya LoRA / LoCon (or PEFT's lora_A / lora_B) parts for a layer of weight ``shape``: a conv's
    down has the layer's kernel, its up is 1x1, as kohya writes them."""
    out, inputs, *kernel = shape
    down = random((rank, inputs, *kernel), generator, dtype)
    up = random((out, rank, *([1, 1] if kernel else [])), generator, dtype)
    if peft:
        parts = {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    else:
        parts = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    if alpha is not None:
        parts[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return parts


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def kohya_lora(
    path: Path, table: dict[str, str], specs: dict[str, TensorSpec], seed: int = 0, rank: int = 2, **kwargs
) -> Path:
    """A LoRA file with one module per ``table`` entry, shaped for ``specs``' key."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, key in table.items():
        tensors.update(lora_module(name, specs[key].shape, rank, generator, **kwargs))
    return save(path, tensors)


def baked(
    folder: Path, checkpoint: Path, loras: list[tuple[Path, float, str]], *, dtype: str = "", name: str = "baked"
) -> dict[str, torch.Tensor]:
    """Bake ``(lora, ratio, block weights)`` into ``checkpoint`` through the library, and load the result."""
    from conftest import load

    from lib_merge import FolderHost, arch
    from lib_merge.io.formats import open_checkpoint
    from lib_merge.lora import LoraRef, bake, bake_request

    with open_checkpoint(checkpoint) as reader:
        family = arch.family_of(reader.keys())
    output = folder / f"{name}.safetensors"
    refs = [LoraRef(str(path), ratio, blocks) for path, ratio, blocks in loras]
    request = bake_request(str(checkpoint), refs, family=family, dtype=dtype, output_path=str(output), device="cpu")
    bake(request, FolderHost(folder, allow_paths=True, hash_cache=folder / "hashes.json", device="cpu"))
    return load(output)


OPEN_CLIP = "cond_stage_model.model.transformer.resblocks."
# kohya's SD2 names: lora_te_ as for SD1, landing in OpenCLIP's layers (q, k, v in one in_proj).
SD2_KOHYA = {
    "lora_te_text_model_encoder_layers_0_self_attn_out_proj": OPEN_CLIP + "0.attn.out_proj.weight",
    "lora_te_text_model_encoder_layers_1_mlp_fc1": OPEN_CLIP + "1.mlp.c_fc.weight",
    "lora_te_text_model_encoder_layers_1_mlp_fc2": OPEN_CLIP + "1.mlp.c_proj.weight",
}
SD2_QKV = {
    f"lora_te_text_model_encoder_layers_0_self_attn_{x}_proj": (OPEN_CLIP + "0.attn.in_proj_weight", i)
    for i, x in enumerate("qkv")
}


def sd2_specs(width: int = 4) -> dict[str, TensorSpec]:
    """An SD2 layout, small: SD1's UNet (the same names) with two OpenCLIP text-encoder layers."""
    from conftest import SD15

    specs = {key: spec for key, spec in SD15.items() if not key.startswith("cond_stage_model.")}
    dtype = torch.float16
    for layer in range(2):
        prefix = f"{OPEN_CLIP}{layer}."
        for name, shape in (
            ("attn.in_proj_weight", (3 * width, width)),
            ("attn.in_proj_bias", (3 * width,)),
            ("attn.out_proj.weight", (width, width)),
            ("attn.out_proj.bias", (width,)),
            ("mlp.c_fc.weight", (width, width)),
            ("mlp.c_proj.weight", (width, width)),
            ("ln_1.weight", (width,)),
        ):
            specs[prefix + name] = TensorSpec(dtype, shape)
    return specs


def loha_module(name: str, shape, rank: int, generator, *, alpha: float | None = None, dtype=torch.float16):
    """LyCORIS LoHa parts for a linear layer of weight ``shape``: (w1_a @ w1_b) * (w2_a @ w2_b)."""
    out, inputs = shape
    parts = {
        f"{name}.hada_w1_a": random((out, rank), generator, dtype),
        f"{name}.hada_w1_b": random((rank, inputs), generator, dtype),
        f"{name}.hada_w2_a": random((out, rank), generator, dtype),
        f"{name}.hada_w2_b": random((rank, inputs), generator, dtype),
    }
    if alpha is not None:
        parts[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return parts


def lokr_module(name: str, shape, generator, *, dtype=torch.float16):
    """LyCORIS LoKr parts for a linear layer of weight ``shape`` (even sides): kron(w1, w2), w1 2x2."""
    out, inputs = shape
    return {
        f"{name}.lokr_w1": random((2, 2), generator, dtype),
        f"{name}.lokr_w2": random((out // 2, inputs // 2), generator, dtype),
    }


def full_module(name: str, shape, generator, *, dtype=torch.float16):
    """A stored difference (``diff``) for a layer of weight ``shape``."""
    return {f"{name}.diff": random(tuple(shape), generator, dtype)}


def tuned_checkpoint(
    path: Path, base: Path, changes: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> Path:
    """A copy of checkpoint ``base`` with ``changes`` (key -> float64 change) added to its weights,
    stored in ``dtype`` (the base's where None)."""
    from conftest import load

    tensors = load(base)
    for key, tensor in tensors.items():
        if key in changes:
            tensors[key] = (tensor.double() + changes[key]).to(dtype or tensor.dtype)
        elif dtype is not None and tensor.is_floating_point():
            tensors[key] = tensor.to(dtype)
    return save(path, tensors)


def low_rank_change(shape, rank: int, generator, size: float = 0.1) -> torch.Tensor:
    """A float64 change of ``shape`` (out, in, *kernel) and of rank ``rank``, as a matrix out x rest."""
    out, rest = shape[0], int(torch.tensor(shape[1:]).prod())
    u = torch.randn((out, rank), generator=generator, dtype=torch.float64)
    v = torch.randn((rank, rest), generator=generator, dtype=torch.float64)
    return (u @ v * size).reshape(shape)


def lora_file(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0, rank: int = 2, **kwargs) -> Path:
    """A LoRA file with one module per name, for a change of ``shapes[name]`` (lora_module's options)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        tensors.update(lora_module(name, shape, rank, generator, **kwargs))
    return save(path, tensors)
