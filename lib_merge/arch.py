"""Which model family a checkpoint is, from its key names and the shape of a few keys."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from .channels import UNET_INPUT_KEY, variant_of

SD1, SD2, SDXL, SDXL_REFINER, SD3, FLUX, UNKNOWN = (
    "SD1",
    "SD2",
    "SDXL",
    "SDXL refiner",
    "SD3",
    "Flux",
    "unknown",
)

# A key that only this family has, checked in this order.
_MARKERS = (
    (FLUX, "double_blocks."),
    (SD3, "model.diffusion_model.joint_blocks."),
    (SDXL, "conditioner.embedders.1.model."),
    (SDXL_REFINER, "conditioner.embedders.0.model."),
    (SD2, "cond_stage_model.model."),
    (SD1, "cond_stage_model.transformer.text_model."),
)


def family_of(keys: Iterable[str]) -> str:
    """SD1, SD2, SDXL, SDXL refiner, SD3, Flux or unknown."""
    keys = list(keys)
    for family, marker in _MARKERS:
        if any(marker in k for k in keys):
            return family
    return UNKNOWN


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
