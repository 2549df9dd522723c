"""Which model families a LoRA file is for, from its module names, a few shapes and its metadata.

A LoRA patches layers by name, and SD1, SD2 and SDXL share many names (SDXL's ``input_blocks.4.1``
is SD1's too): the file's own signs tell them apart, so a LoRA for another family is refused with
both named instead of being half applied. Each sign narrows the set of possible families; a file
with no sign is for any family, and its keys and shapes decide.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from ..arch import FLUX, FLUX_SCHNELL, SD1, SD2, SDXL, SDXL_REFINER
from .formats import Module

ALL = frozenset({SD1, SD2, SDXL, SDXL_REFINER, FLUX, FLUX_SCHNELL})
_FLUX = frozenset({FLUX, FLUX_SCHNELL})
_SD12 = frozenset({SD1, SD2})
# Cross-attention context width (attn2's to_k / to_v inputs) and CLIP width of each UNet family.
_CONTEXT = {768: frozenset({SD1}), 1024: frozenset({SD2}), 2048: frozenset({SDXL}), 1280: frozenset({SDXL_REFINER})}
_TEXT_WIDTH = {768: frozenset({SD1}), 1024: frozenset({SD2})}

# (regex on a module name, the families it allows, the sign as the refusal names it)
_NAME_SIGNS = (
    (
        re.compile(r"(?:^lora_unet_|\.)(?:double_blocks|single_blocks|single_transformer_blocks)[._]\d"),
        _FLUX,
        "Flux blocks",
    ),
    (re.compile(r"^lora_te2_|^text_encoder_2\."), frozenset({SDXL}), "a second text encoder (lora_te2_)"),
    (
        re.compile(
            r"^(?:lora_unet_|unet\.)(?:input|output|middle|down|up|mid)_blocks?[._].*[._]transformer_blocks[._][1-9]"
        ),
        frozenset({SDXL, SDXL_REFINER}),
        "attention blocks deeper than 1",
    ),
    (re.compile(r"label_emb|add_embedding"), frozenset({SDXL, SDXL_REFINER}), "size embedding (label_emb) keys"),
    (re.compile(r"^(?:lora_unet_|unet\.)down_blocks[._]0[._]attentions"), _SD12, "attention in the first down block"),
    (
        re.compile(r"^lora_unet_(?:input_blocks_(?:[12]_1|9|10|11)|output_blocks_(?:9|10|11))_"),
        _SD12,
        "blocks SDXL does not have",
    ),
)
# Metadata of kohya's trainer and of modelspec: (field, value prefix, families)
_METADATA_SIGNS = (
    ("ss_base_model_version", "sdxl", frozenset({SDXL})),
    ("ss_base_model_version", "sd_v1", frozenset({SD1})),
    ("ss_base_model_version", "sd_v2", frozenset({SD2})),
    ("ss_base_model_version", "flux", _FLUX),
    ("modelspec.architecture", "stable-diffusion-xl-v1-base", frozenset({SDXL})),
    ("modelspec.architecture", "stable-diffusion-xl-v1-refiner", frozenset({SDXL_REFINER})),
    ("modelspec.architecture", "stable-diffusion-v1", frozenset({SD1})),
    ("modelspec.architecture", "stable-diffusion-v2", frozenset({SD2})),
    ("modelspec.architecture", "flux-1", _FLUX),
)
_CROSS_ATTENTION = re.compile(r"attn2[._]to_[kv]$")
_TEXT_QUERY = re.compile(r"^lora_te_text_model_encoder_layers_\d+_self_attn_q_proj$")


def lora_families(
    modules: Iterable[Module], in_width: Callable[[Module], int | None], metadata: dict[str, str]
) -> tuple[frozenset[str], str]:
    """The families the file may be for, and the sign that says so ("" when nothing narrows it).

    ``in_width(module)`` is the input width of the module's weight change (None if unknown).
    """
    possible, signs = ALL, []
    for module in modules:
        for pattern, families, sign in _NAME_SIGNS:
            if sign not in signs and pattern.search(module.name):
                possible, signs = _narrow(possible, families, signs, sign)
        width = in_width(module) if _CROSS_ATTENTION.search(module.name) else None
        if width in _CONTEXT:
            possible, signs = _narrow(possible, _CONTEXT[width], signs, f"cross-attention {width} wide")
        width = in_width(module) if _TEXT_QUERY.match(module.name) else None
        if width in _TEXT_WIDTH:
            possible, signs = _narrow(possible, _TEXT_WIDTH[width], signs, f"a text encoder {width} wide")
    if len(possible) > 1:  # the trainer's word, where the structure leaves a choice
        for name, prefix, families in _METADATA_SIGNS:
            value = metadata.get(name, "")
            if isinstance(value, str) and value.startswith(prefix) and possible & families:
                possible, signs = possible & families, [*signs, f"{name} {value[:40]}"]
                break
    return possible, ", ".join(signs)


def _narrow(possible: frozenset, families: frozenset, signs: list[str], sign: str) -> tuple[frozenset, list[str]]:
    """``possible`` narrowed by one sign; a sign that contradicts the others is left out, since a
    file with signs of two families is told apart by its shapes against the checkpoint."""
    if sign in signs or not possible & families:
        return possible, signs
    return possible & families, [*signs, sign]


def describe(families: frozenset[str]) -> str:
    """E.g. 'SDXL', 'SD1/SD2', 'Flux'."""
    if families == _FLUX:
        return "Flux"
    order = [SD1, SD2, SDXL, SDXL_REFINER, FLUX, FLUX_SCHNELL]
    return "/".join(name for name in order if name in families)
