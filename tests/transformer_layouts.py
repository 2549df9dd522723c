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
FLUX_VAE_KEYS = (
    "vae.decoder.conv_in.weight",
    "vae.decoder.up.0.block.0.conv1.weight",
    "vae.encoder.conv_out.bias",
    "vae.encoder.down.0.block.0.conv1.weight",
)
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


# -- Flux with shapes that fit together, for matching diffusers names to BFL's ------------------------

# Flux's sizes (flux/model.py: hidden 3072, MLP 4 x hidden, head dim 128, 64 latent channels, T5 width
# 4096, CLIP width 768, 256 timestep features), or tiny ones keeping the ratios that fuse keys.
FLUX_DIMS = {"hidden": 3072, "head": 128, "latent": 64, "t5": 4096, "clip": 768, "time": 256}
FLUX_TINY_DIMS = {"hidden": 4, "head": 2, "latent": 3, "t5": 5, "clip": 6, "time": 7}


def _flux_shape(key: str, dims: dict[str, int]) -> tuple[int, ...]:
    """The shape of a BFL Flux transformer key (bare) in a model of these sizes."""
    h, mlp = dims["hidden"], 4 * dims["hidden"]
    if key.endswith("_norm.scale"):
        return (dims["head"],)
    name = key.rsplit(".", 1)[0].split(".", 2)[-1] if "blocks." in key else key.rsplit(".", 1)[0]
    out_in = {
        "img_in": (h, dims["latent"]),
        "txt_in": (h, dims["t5"]),
        "time_in.in_layer": (h, dims["time"]),
        "guidance_in.in_layer": (h, dims["time"]),
        "vector_in.in_layer": (h, dims["clip"]),
        "final_layer.adaLN_modulation.1": (2 * h, h),
        "final_layer.linear": (dims["latent"], h),
        "img_mod.lin": (6 * h, h),
        "txt_mod.lin": (6 * h, h),
        "img_attn.qkv": (3 * h, h),
        "txt_attn.qkv": (3 * h, h),
        "img_mlp.0": (mlp, h),
        "txt_mlp.0": (mlp, h),
        "img_mlp.2": (h, mlp),
        "txt_mlp.2": (h, mlp),
        "linear1": (3 * h + mlp, h),
        "linear2": (h, h + mlp),
        "modulation.lin": (3 * h, h),
    }.get(name, (h, h))  # the rest: hidden to hidden (out_layer, attn.proj)
    return out_in if key.endswith(".weight") else out_in[:1]


def flux_specs(
    dims: dict[str, int] = FLUX_TINY_DIMS, *, full: bool = True, guidance: bool = True, dtype=torch.float32
) -> dict[str, TensorSpec]:
    """A Flux checkpoint's keys with shapes that fit together (tiny by default); a full one's text
    encoders and VAE get the small shapes of ``tiny_specs``."""
    specs = {key: TensorSpec(dtype, _flux_shape(key, dims)) for key in flux_transformer_keys(guidance=guidance)}
    if not full:
        return specs
    others = tiny_specs([*FLUX_TEXT_ENCODER_KEYS, *FLUX_VAE_KEYS], dtype)
    return {**{UNET + key: spec for key, spec in specs.items()}, **others}


def _split(tensor: torch.Tensor, names: list[str], sizes: list[int]) -> dict[str, torch.Tensor]:
    return dict(zip(names, torch.split(tensor, sizes), strict=True))


def as_diffusers(bfl: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """A bare BFL Flux transformer's tensors under diffusers' names, split the way diffusers'
    convert_flux_to_diffusers splits them (written here from the published layouts, apart from the
    package's map, so each checks the other)."""
    h = hidden
    out = {}
    for key, tensor in bfl.items():
        block, _, rest = key.partition(".")
        if block == "double_blocks":
            n, _, name = rest.partition(".")
            out |= _diffusers_double(f"transformer_blocks.{n}.", name, tensor, h)
        elif block == "single_blocks":
            n, _, name = rest.partition(".")
            out |= _diffusers_single(f"single_transformer_blocks.{n}.", name, tensor, h)
        else:
            out |= _diffusers_top(key, tensor)
    return out


def _diffusers_top(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    name, _, suffix = key.rpartition(".")
    if name == "final_layer.adaLN_modulation.1":  # BFL: shift, scale; diffusers: scale, shift
        shift, scale = tensor.chunk(2)
        return {f"norm_out.linear.{suffix}": torch.cat([scale, shift])}
    renamed = {
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.linear": "proj_out",
    }[name]
    return {f"{renamed}.{suffix}": tensor}


def _diffusers_double(prefix: str, name: str, tensor: torch.Tensor, h: int) -> dict[str, torch.Tensor]:
    norms = {
        "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
        "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
        "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
        "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    }
    if name in norms:
        return {prefix + norms[name]: tensor}
    layer, _, suffix = name.rpartition(".")
    if layer == "img_attn.qkv":
        names = ["attn.to_q", "attn.to_k", "attn.to_v"]
        return _split(tensor, [f"{prefix}{n}.{suffix}" for n in names], [h, h, h])
    if layer == "txt_attn.qkv":
        names = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
        return _split(tensor, [f"{prefix}{n}.{suffix}" for n in names], [h, h, h])
    renamed = {
        "img_mod.lin": "norm1.linear",
        "txt_mod.lin": "norm1_context.linear",
        "img_attn.proj": "attn.to_out.0",
        "txt_attn.proj": "attn.to_add_out",
        "img_mlp.0": "ff.net.0.proj",
        "img_mlp.2": "ff.net.2",
        "txt_mlp.0": "ff_context.net.0.proj",
        "txt_mlp.2": "ff_context.net.2",
    }[layer]
    return {f"{prefix}{renamed}.{suffix}": tensor}


def _diffusers_single(prefix: str, name: str, tensor: torch.Tensor, h: int) -> dict[str, torch.Tensor]:
    norms = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
    if name in norms:
        return {prefix + norms[name]: tensor}
    layer, _, suffix = name.rpartition(".")
    if layer == "linear1":
        names = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
        return _split(tensor, [f"{prefix}{n}.{suffix}" for n in names], [h, h, h, 4 * h])
    renamed = {"linear2": "proj_out", "modulation.lin": "norm.linear"}[layer]
    return {f"{prefix}{renamed}.{suffix}": tensor}
