"""Safetensors files whose stored numbers are not the weights: ComfyUI's scaled fp8, bitsandbytes.

Scaled fp8 stores each large weight in fp8 beside a ``scale_weight``: the weight a model computes
with is ``weight × scale_weight``. Merging the stored numbers would mix values on different scales,
so the reader hands out the products under the weight's name (multiplied in float64, rounded once
to float32, which holds any fp8 value times a float32 scale to within its last bit) and hides the
scales, the input scales and the ``scaled_fp8`` marker: the output is a plain checkpoint that every
loader reads as it is.

bitsandbytes nf4/fp4 files (Forge's "flux1-dev-bnb-nf4") pack two 4-bit codes per byte with their
block scales in other keys: refused with the format's name, never merged as bytes.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .readers import CheckpointReader, TensorSpec, _shown

SCALE = ".scale_weight"
INPUT_SCALE = ".scale_input"  # the activations' scale, for fp8 matrix products: no weight's value
MARKER = "scaled_fp8"
BITSANDBYTES = ("bitsandbytes__nf4", "bitsandbytes__fp4")


def refuse_bitsandbytes(reader: CheckpointReader) -> None:
    for key in reader.keys():
        for kind in BITSANDBYTES:
            if key.endswith(kind):
                raise InputError(
                    f"{reader.path}: holds bitsandbytes {kind.rpartition('__')[2]} quantised weights (e.g. {_shown(key)}), "
                    "which Merge Lab does not dequantise; merge the model's fp16, bf16 or fp8 file instead"
                )


def is_scaled_fp8(reader: CheckpointReader) -> bool:
    return any(key.endswith(SCALE) for key in reader.keys())


def _is_marker(key: str) -> bool:
    return key == MARKER or key.endswith("." + MARKER)


class ScaledFp8Reader(CheckpointReader):
    """A scaled fp8 file read as the weights it stands for: ``weight × scale_weight`` in float32."""

    def __init__(self, inner: CheckpointReader):
        self.path, self.metadata, self._inner = inner.path, inner.metadata, inner
        self._scale_of = {}
        for key in inner.keys():
            if key.endswith(SCALE):
                weight = key[: -len(SCALE)] + ".weight"
                self._check_scale(weight, key)
                self._scale_of[weight] = key
        hidden = {key for key in inner.keys() if key.endswith((SCALE, INPUT_SCALE)) or _is_marker(key)}
        self._specs = {
            key: TensorSpec(torch.float32, inner.spec(key).shape) if key in self._scale_of else inner.spec(key)
            for key in inner.keys()
            if key not in hidden
        }
        self.format_note = (
            f"scaled fp8: {len(self._scale_of)} weights read as weight × scale_weight (float32), "
            f"{len(hidden) - len(self._scale_of)} input scales and markers left out"
        )

    def _check_scale(self, weight: str, scale: str) -> None:
        inner = self._inner
        if weight not in inner:
            raise InputError(f"{self.path}: key {_shown(scale)} scales no weight (the file has no {_shown(weight)})")
        weight_spec, scale_spec = inner.spec(weight), inner.spec(scale)
        if not scale_spec.dtype.is_floating_point:
            raise InputError(f"{self.path}: key {_shown(scale)} is {scale_spec.dtype}, not a floating-point scale")
        try:
            fits = torch.broadcast_shapes(weight_spec.shape, scale_spec.shape) == weight_spec.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise InputError(
                f"{self.path}: key {_shown(scale)} has shape {list(scale_spec.shape)}, which does not scale "
                f"{_shown(weight)} of shape {list(weight_spec.shape)}"
            )

    def __getitem__(self, key: str) -> torch.Tensor:
        scale = self._scale_of.get(key)
        if scale is None:
            return self._inner[key]
        product = self._inner[key].to(torch.float64) * self._inner[scale].to(torch.float64)
        return product.to(torch.float32)

    def data_offset(self, key: str) -> int:
        return self._inner.data_offset(key) if hasattr(self._inner, "data_offset") else 0

    def prefetch(self, key: str) -> None:
        self._inner.prefetch(key)

    def close(self) -> None:
        self._inner.close()
