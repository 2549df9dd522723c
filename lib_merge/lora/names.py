"""Which checkpoint key each LoRA module patches: the webui's key mapping, made from key names alone.

The webui names each layer of the loaded model by its module path with "_" for "."
(``diffusion_model_input_blocks_1_1_proj_in``; the text encoder ``transformer_text_model_...`` in
SD1, ``model_transformer_resblocks_...`` in SD2, ``0_...`` and ``1_...`` for SDXL's two embedders),
turns each LoRA module's name into such a name (kohya's diffusers-style UNet names into the
checkpoint's, ``lora_te*`` into the text encoders') and patches the layer of that name. Here the
layer names are made from the checkpoint's keys instead, so no model is built.

Flux LoRAs in diffusers' names (``transformer.transformer_blocks.0.attn.to_q``, or flattened as
``lora_transformer_...``) are placed in BFL's layers as Forge's loader places them (its
comfyui_lora_collection: ``flux_to_diffusers`` and ``model_lora_keys_unet``): a renamed layer is
BFL's layer, a layer BFL fuses with others (q, k, v in ``qkv``, and the MLP in ``linear1``) patches
its rows of it, and ``norm_out.linear`` patches the final modulation with its halves traded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..flux_diffusers import Place, bfl_place

# Checkpoint key prefix -> the start of the webui's layer names for the part under it.
_PREFIXES = (
    ("model.diffusion_model.", "diffusion_model_"),
    ("cond_stage_model.", ""),
    ("text_encoders.clip_l.", "0_"),  # a full Flux checkpoint's CLIP-L, which kohya names lora_te1
)
_EMBEDDER = re.compile(r"conditioner\.embedders\.(\d+)\.")
# The q, k or v projection of an attention whose three are one tensor (nn.MultiheadAttention's in_proj).
_QKV = re.compile(r"(.*)_([qkv])_proj$")
# kohya's UNet names in diffusers' layout -> the checkpoint's (the webui's convert_diffusers_name_to_compvis).
RESNET_PARTS = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}
_DOWN = re.compile(r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")
_MID = re.compile(r"mid_block_(attentions|resnets)_(\d+)_(.+)")
_UP = re.compile(r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")
_DOWNSAMPLE = re.compile(r"down_blocks_(\d+)_downsamplers_0_conv$")
_UPSAMPLE = re.compile(r"up_blocks_(\d+)_upsamplers_0_conv$")
_LINEAR = re.compile(r"(time_embedding|add_embedding)_linear_(\d+)$")
_CLIP_LAYER = re.compile(r"text_model_encoder_layers_(\d+)_(.+)")


# The start of the names lora_layer_names gives a diffusers Flux layer that is no whole BFL layer.
_FLUX_PART = "flux_part_"


@dataclass(frozen=True)
class Target:
    """Where a module lands: a checkpoint module path, and for a q/k/v projection of a fused
    attention the third of its ``in_proj`` rows (0 q, 1 k, 2 v), else None; for a diffusers Flux
    layer that is part of a BFL layer (or its halves traded), its ``part``."""

    module: str
    third: int | None = None
    part: Place | None = None

    def rows(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """The (start, stop) rows of the weight (of ``shape``) the module's change lands in; None for all."""
        if self.third is not None:
            size = shape[0] // 3
            return self.third * size, (self.third + 1) * size
        if self.part is not None and self.part.count > 1:
            return self.part.rows(shape[0], shape[1] if len(shape) > 1 else 0)
        return None

    @property
    def swap_halves(self) -> bool:
        """The change's two halves (of rows) trade places in the checkpoint's layer."""
        return self.part is not None and self.part.swap_halves

    @property
    def weight_key(self) -> str:
        return f"{self.module}.in_proj_weight" if self.third is not None else f"{self.module}.weight"

    @property
    def bias_key(self) -> str:
        return f"{self.module}.in_proj_bias" if self.third is not None else f"{self.module}.bias"


class LayerIndex:
    """The checkpoint's layers under the webui's names; ``bare_transformer`` for a file that is a
    Flux or SD3 transformer alone (its keys have no ``model.diffusion_model.`` prefix)."""

    def __init__(self, keys: Iterable[str], *, bare_transformer: bool = False):
        self.layers: dict[str, str] = {}  # layer name -> module path
        self.fused: dict[str, str] = {}  # layer name of an attention with in_proj_weight -> module path
        for key in keys:
            if key.endswith(".in_proj_weight"):
                module = key[: -len(".in_proj_weight")]
                table = self.fused
            elif key.endswith(".weight"):
                module = key[: -len(".weight")]
                table = self.layers
            else:
                continue
            name = layer_name(module, bare_transformer)
            if name is not None:
                table[name] = module
        # diffusers' Flux names are placed in a Flux checkpoint only: SD3's diffusers names share some
        # (proj_out, norm_out.linear), and half a LoRA baked would not be the LoRA.
        self.flux = any(name.startswith("diffusion_model_double_blocks_") for name in self.layers)

    def find(self, module_name: str) -> Target | None:
        """The layer a LoRA module patches, or None when the checkpoint has no such layer."""
        if not self.flux and _rule(module_name)[1] in _FLUX_RULES:
            return None
        candidates = lora_layer_names(module_name)
        for name in candidates:
            if name in self.layers:
                return Target(self.layers[name])
        for name in candidates:
            match = _QKV.match(name)
            if match and match[1] in self.fused:
                return Target(self.fused[match[1]], "qkv".index(match[2]))
            if name.startswith(_FLUX_PART) and (place := bfl_place(name[len(_FLUX_PART) :])):
                layer = "diffusion_model_" + place.module.replace(".", "_")
                if layer in self.layers:
                    return Target(self.layers[layer], part=place)
        return None


def layer_name(module: str, bare_transformer: bool = False) -> str | None:
    """The webui's name of the layer at checkpoint module path ``module``; None outside the parts a
    LoRA patches (the VAE, a bare file's other keys)."""
    for prefix, start in _PREFIXES:
        if module.startswith(prefix):
            return start + module[len(prefix) :].replace(".", "_")
    if match := _EMBEDDER.match(module):
        return f"{match[1]}_" + module[match.end() :].replace(".", "_")
    if bare_transformer:
        return "diffusion_model_" + module.replace(".", "_")
    return None


def lora_layer_names(module_name: str) -> list[str]:
    """The layer names a LoRA module's name may mean, the likeliest first (the webui's fallbacks)."""
    prefix, rule = _rule(module_name)
    rest = module_name[len(prefix) :].replace(".", "_")
    return [name for name in rule(rest) if name]


def _rule(module_name: str) -> tuple[str, Callable[[str], list[str | None]]]:
    """(prefix, rule) of the first of _RULES whose prefix starts the name (the last has prefix "")."""
    return next((prefix, rule) for prefix, rule in _RULES if module_name.startswith(prefix))


def _unet(rest: str) -> list[str | None]:
    """kohya's diffusers-style names (SD1, SD2) converted, then the name as it is (SDXL, Flux)."""
    return [*_from_diffusers(rest), "diffusion_model_" + rest]


def _from_diffusers(rest: str) -> list[str]:
    if rest.startswith("conv_in"):
        return ["diffusion_model_input_blocks_0_0" + rest[len("conv_in") :]]
    if rest.startswith("conv_out"):
        return ["diffusion_model_out_2" + rest[len("conv_out") :]]
    if rest.startswith("conv_norm_out"):
        return ["diffusion_model_out_0" + rest[len("conv_norm_out") :]]
    if match := _LINEAR.match(rest):
        index = int(match[2]) * 2 - 2
        return [
            f"diffusion_model_time_embed_{index}"
            if match[1] == "time_embedding"
            else f"diffusion_model_label_emb_0_{index}"
        ]
    if match := _DOWN.match(rest):
        block, kind, index, part = int(match[1]), match[2], int(match[3]), match[4]
        return [f"diffusion_model_input_blocks_{1 + block * 3 + index}_{_sub(kind)}_{_part(kind, part)}"]
    if match := _MID.match(rest):
        kind, index, part = match[1], int(match[2]), match[3]
        return [f"diffusion_model_middle_block_{1 if kind == 'attentions' else index * 2}_{_part(kind, part)}"]
    if match := _UP.match(rest):
        block, kind, index, part = int(match[1]), match[2], int(match[3]), match[4]
        return [f"diffusion_model_output_blocks_{block * 3 + index}_{_sub(kind)}_{_part(kind, part)}"]
    if match := _DOWNSAMPLE.match(rest):
        return [f"diffusion_model_input_blocks_{3 + int(match[1]) * 3}_0_op"]
    if match := _UPSAMPLE.match(rest):
        # The upsampler follows the block's attention where it has one (index 2), else its resnet (1).
        block = 2 + int(match[1]) * 3
        return [f"diffusion_model_output_blocks_{block}_2_conv", f"diffusion_model_output_blocks_{block}_1_conv"]
    return []


def _sub(kind: str) -> int:
    return 1 if kind == "attentions" else 0


def _part(kind: str, part: str) -> str:
    return RESNET_PARTS.get(part, part) if kind == "resnets" else part


def _open_clip(rest: str) -> str | None:
    """A CLIP text-encoder layer under OpenCLIP's names (SD2's encoder, SDXL's second)."""
    match = _CLIP_LAYER.match(rest)
    if not match:
        return None
    part = match[2]
    if "mlp_fc1" in part:
        part = part.replace("mlp_fc1", "mlp_c_fc")
    elif "mlp_fc2" in part:
        part = part.replace("mlp_fc2", "mlp_c_proj")
    else:
        part = part.replace("self_attn", "attn")
    return f"model_transformer_resblocks_{match[1]}_{part}"


def _text_encoder(rest: str) -> list[str | None]:
    """SD1's CLIP-L, or SD2's OpenCLIP."""
    return ["transformer_" + rest, _open_clip(rest)]


def _first_text_encoder(rest: str) -> list[str | None]:
    """SDXL's (or Flux's) CLIP-L, then SD1's, which some SD1 LoRAs name this way too."""
    return ["0_transformer_" + rest, "transformer_" + rest]


def _second_text_encoder(rest: str) -> list[str | None]:
    clip = _open_clip(rest)
    return ["1_" + clip if clip else None]


def _diffusers_text_encoder(rest: str) -> list[str | None]:
    """diffusers' ``text_encoder.``: the first (or only) CLIP of whichever model it is."""
    return [*_first_text_encoder(rest), _open_clip(rest)]


def _flux_diffusers(rest: str) -> list[str | None]:
    """A diffusers Flux transformer layer: BFL's layer of another name, or, for a part of one (to_q
    in qkv) or one with halves traded (norm_out), a name of its own that ``find`` places."""
    place = bfl_place(rest)
    if place is None:
        return []
    return ["diffusion_model_" + place.module.replace(".", "_") if place.whole else _FLUX_PART + rest]


def _peft(rest: str) -> list[str | None]:
    """PEFT's own names for the transformer: ``base_model.model.`` then diffusers' (``transformer.`` or none)."""
    return _flux_diffusers(rest) or _flux_diffusers(rest.removeprefix("transformer_"))


_RULES = (
    ("lora_unet_", _unet),
    ("unet.", _unet),
    ("lora_te_", _text_encoder),
    ("lora_te1_", _first_text_encoder),
    ("lora_te2_", _second_text_encoder),
    ("text_encoder.", _diffusers_text_encoder),
    ("text_encoder_2.", _second_text_encoder),
    # diffusers / PEFT (transformer.), OneTrainer and ai-toolkit (lora_transformer_), SimpleTuner's LyCORIS
    # (lycoris_): the names Forge's loader takes for Flux, and PEFT's own and bare diffusers names.
    ("transformer.", _flux_diffusers),
    ("lora_transformer_", _flux_diffusers),
    ("lycoris_", _flux_diffusers),
    ("base_model.model.", _peft),
    ("", _flux_diffusers),
)
_FLUX_RULES = (_flux_diffusers, _peft)
