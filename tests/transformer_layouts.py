"""Flux and SD3 key names built from the models' own definitions (BFL's flux/model.py, SD3's MMDiT),
not from lib_merge.blocks, with tiny shapes: a full checkpoint (``model.diffusion_model.`` prefix,
text encoders, VAE) or a bare transformer. tests/test_blocks.py checks them against the real key
tables in ../shared/data when those are there."""

from __future__ import annotations

import torch

from lib_merge.io.readers import TensorSpec

UNET = "model.diffusion_model."
FLUX_DOUBLE_BLOCKS, FLUX_SINGLE_BLOCKS = 19, 38
SD3_MEDIUM_BLOCKS, SD35_LARGE_BLOCKS = 24, 38
# SD3.5 medium (MMDiT-X) has a second self-attention in the image stream of its first 13 blocks.
SD35_MEDIUM_ATTN2_BLOCKS = 13


def _linear(name: str) -> list[str]:
    return [f"{name}.bias", f"{name}.weight"]


def _flux_double_block() -> list[str]:
    """DoubleStreamBlock: per stream (img, txt) a modulation, attention with q/k norms, an MLP."""
    keys = []
    for stream in ("img", "txt"):
        keys += [f"{stream}_attn.norm.key_norm.scale", f"{stream}_attn.norm.query_norm.scale"]
        for layer in ("attn.proj", "attn.qkv", "mlp.0", "mlp.2", "mod.lin"):
            keys += _linear(f"{stream}_{layer}")
    return keys


def _flux_single_block() -> list[str]:
    """SingleStreamBlock: two linears, a modulation and the q/k norms."""
    return [
        *_linear("linear1"),
        *_linear("linear2"),
        *_linear("modulation.lin"),
        "norm.key_norm.scale",
        "norm.query_norm.scale",
    ]


def _mlp_embedder(name: str) -> list[str]:
    return [*_linear(f"{name}.in_layer"), *_linear(f"{name}.out_layer")]


# Text encoder and VAE keys of a full checkpoint: a few of each is enough for the block map.
FLUX_TEXT_ENCODER_KEYS = (
    "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
)
FLUX_VAE_KEYS = ("vae.decoder.conv_in.weight", "vae.encoder.conv_out.bias")
SD3_TEXT_ENCODER_KEYS = (
    "text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
    "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
)
SD3_VAE_KEYS = ("first_stage_model.decoder.conv_in.weight", "first_stage_model.encoder.conv_out.bias")


def flux_transformer_keys(*, guidance: bool = True) -> list[str]:
    """The transformer's keys without prefix; schnell (guidance=False) has no guidance_in."""
    keys = [*_linear("img_in"), *_linear("txt_in"), *_mlp_embedder("time_in"), *_mlp_embedder("vector_in")]
    if guidance:
        keys += _mlp_embedder("guidance_in")
    keys += [f"double_blocks.{i}.{part}" for i in range(FLUX_DOUBLE_BLOCKS) for part in _flux_double_block()]
    keys += [f"single_blocks.{i}.{part}" for i in range(FLUX_SINGLE_BLOCKS) for part in _flux_single_block()]
    keys += [*_linear("final_layer.adaLN_modulation.1"), *_linear("final_layer.linear")]
    return keys


def flux_keys(*, full: bool = True, guidance: bool = True) -> list[str]:
    """A Flux dev (or schnell) checkpoint's keys: full with text encoders and VAE, or a bare transformer."""
    transformer = flux_transformer_keys(guidance=guidance)
    if not full:
        return transformer
    return [*(UNET + key for key in transformer), *FLUX_TEXT_ENCODER_KEYS, *FLUX_VAE_KEYS]


def _sd3_joint_block(last: bool, attn2: bool) -> list[str]:
    """JointBlock: a context stream and an image (x) stream; the last block's context stream is
    pre-only (modulation and qkv, no output projection or MLP)."""
    full_stream = [*_linear("adaLN_modulation.1"), *_linear("attn.proj"), *_linear("attn.qkv")]
    full_stream += [*_linear("mlp.fc1"), *_linear("mlp.fc2")]
    context = [*_linear("adaLN_modulation.1"), *_linear("attn.qkv")] if last else full_stream
    x = full_stream + ([*_linear("attn2.proj"), *_linear("attn2.qkv")] if attn2 else [])
    return [f"context_block.{key}" for key in context] + [f"x_block.{key}" for key in x]


def sd3_transformer_keys(joint_blocks: int = SD3_MEDIUM_BLOCKS, *, attn2_blocks: int = 0) -> list[str]:
    """The MMDiT's keys without prefix."""
    keys = [*_linear("context_embedder"), "pos_embed", *_linear("x_embedder.proj")]
    keys += [*_linear("t_embedder.mlp.0"), *_linear("t_embedder.mlp.2")]
    keys += [*_linear("y_embedder.mlp.0"), *_linear("y_embedder.mlp.2")]
    for i in range(joint_blocks):
        keys += [f"joint_blocks.{i}.{key}" for key in _sd3_joint_block(i == joint_blocks - 1, i < attn2_blocks)]
    keys += [*_linear("final_layer.adaLN_modulation.1"), *_linear("final_layer.linear")]
    return keys


def sd3_keys(joint_blocks: int = SD3_MEDIUM_BLOCKS, *, attn2_blocks: int = 0, full: bool = True) -> list[str]:
    """An SD3 / SD3.5 checkpoint's keys: SD3 medium 24 joint blocks, SD3.5 large 38, SD3.5 medium
    24 with ``attn2_blocks=13``."""
    transformer = sd3_transformer_keys(joint_blocks, attn2_blocks=attn2_blocks)
    if not full:
        return transformer
    extra = ("model.model_sampling.sigmas", *SD3_TEXT_ENCODER_KEYS, *SD3_VAE_KEYS)
    return [*(UNET + key for key in transformer), *extra]


def tiny_specs(keys: list[str], dtype: torch.dtype = torch.float32) -> dict[str, TensorSpec]:
    """Every key as a small tensor (the names are the point; weights 2x3, the rest 3 values)."""
    return {key: TensorSpec(dtype, (2, 3) if key.endswith(".weight") else (3,)) for key in keys}
