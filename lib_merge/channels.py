"""Input-channel rules of the built-in merger for inpainting (9 channels) and instruct-pix2pix
(8 channels) UNets merged with a normal (4-channel) one: merge the first 4 channels, keep the rest of A."""

from __future__ import annotations

from .errors import IncompatibleModelsError

UNET_INPUT_KEY = "model.diffusion_model.input_blocks.0.0.weight"
NORMAL_CHANNELS = 4
VARIANTS = {9: "inpainting", 8: "instruct-pix2pix"}


def variant_of(in_channels: int) -> str | None:
    """'inpainting', 'instruct-pix2pix' or None for the UNet's number of input channels."""
    return VARIANTS.get(in_channels)


def channel_merge(key: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> str | None:
    """For a key whose shapes differ, the variant whose first 4 channels are merged, or an error.

    Returns None when the shapes are equal. Follows the built-in: A must be the bigger model.
    """
    if a_shape == b_shape:
        return None
    same_but_channels = len(a_shape) == len(b_shape) >= 2 and (a_shape[:1] + a_shape[2:] == b_shape[:1] + b_shape[2:])
    if not same_but_channels:
        raise IncompatibleModelsError(
            f"shape mismatch at key {key}: A has {list(a_shape)}, B has {list(b_shape)}; "
            "these models have different architectures"
        )
    a_ch, b_ch = a_shape[1], b_shape[1]
    if a_ch == NORMAL_CHANNELS and b_ch == 9:
        raise IncompatibleModelsError(
            "When merging inpainting model with a normal one, A must be the inpainting model."
        )
    if a_ch == NORMAL_CHANNELS and b_ch == 8:
        raise IncompatibleModelsError(
            "When merging instruct-pix2pix model with a normal one, A must be the instruct-pix2pix model."
        )
    if b_ch == NORMAL_CHANNELS and a_ch in VARIANTS:
        return VARIANTS[a_ch]
    raise IncompatibleModelsError(f"Bad dimensions for merged layer {key}: A={list(a_shape)}, B={list(b_shape)}")
