"""Which model family a checkpoint is, from its key names and the shape of a few keys."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from .channels import UNET_INPUT_KEY, variant_of
from .errors import shown

SD1, SD2, SDXL, SDXL_REFINER, UNKNOWN = "SD1", "SD2", "SDXL", "SDXL refiner", "unknown"
# Flux dev is guidance-distilled (guidance_in.*); schnell has no guidance_in but the same blocks.
FLUX, FLUX_SCHNELL = "Flux dev", "Flux schnell"
# SD3 by its joint-block count: medium 24 (SD3.5 medium adds x_block.attn2), SD3.5 large 38.
# SD3 alone is a count with no known layout.
SD3, SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE = "SD3", "SD3 medium", "SD3.5 medium", "SD3.5 large"
TRANSFORMERS = (FLUX, FLUX_SCHNELL, SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE, SD3)

# A key that only this kind of model has, checked in this order. Flux and SD3 keys come with the
# model.diffusion_model. prefix (a full checkpoint) or bare (a transformer-only file); a Flux
# transformer may also have diffusers' names (single_transformer_blocks.N, guidance_embedder).
_MARKERS = (
    (FLUX, "double_blocks."),
    (FLUX, "single_transformer_blocks."),
    (SD3, "joint_blocks."),
    (SDXL, "conditioner.embedders.1.model."),
    (SDXL_REFINER, "conditioner.embedders.0.model."),
    (SD2, "cond_stage_model.model."),
    (SD1, "cond_stage_model.transformer.text_model."),
)
_JOINT_BLOCK = re.compile(r"^(?:model\.diffusion_model\.)?joint_blocks\.(\d+)\.")
_SD3_BY_JOINT_BLOCKS = {24: SD3_MEDIUM, 38: SD35_LARGE}
# How families of one kind are told apart, for the messages that refuse to merge them.
_SIGNS = {
    FLUX: "guidance_in.* keys",
    FLUX_SCHNELL: "no guidance_in.* keys",
    SD3_MEDIUM: "24 joint blocks",
    SD35_MEDIUM: "24 joint blocks with x_block.attn2",
    SD35_LARGE: "38 joint blocks",
    SD3: "a joint-block count other than 24 or 38",
}


def family_of(keys: Iterable[str]) -> str:
    """SD1, SD2, SDXL, SDXL refiner, Flux dev, Flux schnell, SD3 medium, SD3.5 medium, SD3.5 large,
    SD3 (another joint-block count) or unknown."""
    keys = list(keys)
    for family, marker in _MARKERS:
        if any(marker in k for k in keys):
            refine = _REFINE.get(family)
            return refine(keys) if refine else family
    return UNKNOWN


def _flux_family(keys: list[str]) -> str:
    return FLUX if any("guidance_in." in key or "guidance_embedder." in key for key in keys) else FLUX_SCHNELL


def _sd3_family(keys: list[str]) -> str:
    """The SD3 model by its count of joint blocks (and SD3.5 medium's second attention)."""
    count = len({match[1] for key in keys if (match := _JOINT_BLOCK.match(key))})
    family = _SD3_BY_JOINT_BLOCKS.get(count, SD3)
    if family == SD3_MEDIUM and any(".x_block.attn2." in key for key in keys):
        return SD35_MEDIUM
    return family


_REFINE = {FLUX: _flux_family, SD3: _sd3_family}


def family_sign(family: str) -> str | None:
    """What tells ``family`` from its siblings (Flux dev from schnell, SD3 sizes), for messages; else None."""
    return _SIGNS.get(family)


# How a checkpoint says it is sampled: empty marker tensors that v-prediction (zero terminal SNR)
# SDXL checkpoints carry for the webui and Forge, and the modelspec field naming the prediction.
MARKER_KEYS = ("v_pred", "ztsnr")
PREDICTION_FIELD = "modelspec.prediction_type"


def prediction_markers(keys: Iterable[str], metadata: Mapping[str, str]) -> dict[str, str]:
    """Each marker key as 'present'/'absent' and modelspec.prediction_type as its value or 'not set'."""
    keys = set(keys)
    markers = {key: "present" if key in keys else "absent" for key in MARKER_KEYS}
    value = metadata.get(PREDICTION_FIELD)
    markers[PREDICTION_FIELD] = shown(value, 30) if value else "not set"
    return markers


def describe_reader(reader) -> str:
    """``describe`` for an open checkpoint reader (anything with ``keys()`` and ``spec(key).shape``)."""
    return describe(reader.keys(), lambda key: reader.spec(key).shape)


def describe(keys: Iterable[str], shape_of: Callable[[str], tuple[int, ...]]) -> str:
    """The family plus its variant, e.g. 'SD1 inpainting'."""
    keys = list(keys)
    family = family_of(keys)
    if UNET_INPUT_KEY in keys:
        shape = shape_of(UNET_INPUT_KEY)
        variant = variant_of(shape[1]) if len(shape) > 1 else None
        if variant:
            return f"{family} {variant}"
    return family


def key_layout(keys: Iterable[str], shown: int = 3) -> str:
    """How a file's keys are laid out, for messages: its commonest top-level prefixes and one key,
    e.g. ``model.* (780 keys), text_encoders.* (392), vae.* (244); e.g. model.diffusion_model.img_in.bias``."""
    keys = list(keys)
    if not keys:
        return "no keys"
    counts = Counter(key.split(".")[0] + (".*" if "." in key else "") for key in keys)
    groups = [f"{prefix} ({count} keys)" for prefix, count in counts.most_common(shown)]
    more = f" and {len(counts) - shown} more prefixes" if len(counts) > shown else ""
    return f"{', '.join(groups)}{more}; e.g. {sorted(keys)[0]}"
