"""Checkpoints with the real key names and shapes of SD1.5 and SDXL and random values.

Used by the benchmark, the demo and the tests: no model can be downloaded, and none is needed to
exercise every byte path of a merge.
"""

from __future__ import annotations

import json
from importlib import resources
from math import prod
from pathlib import Path

import torch

from .channels import UNET_INPUT_KEY
from .io.readers import DTYPES, TensorSpec
from .io.writer import SafetensorsWriter

ARCHES = ("sd15", "sdxl")
_POOL_ELEMENTS = 1 << 22


def layout(arch: str) -> dict[str, TensorSpec]:
    """key -> spec of a real checkpoint layout (``lib_merge/data/<arch>_shapes.json``)."""
    text = resources.files("lib_merge").joinpath(f"data/{arch}_shapes.json").read_text()
    return {key: TensorSpec(DTYPES[dtype], tuple(shape)) for key, (dtype, shape) in json.loads(text).items()}


def scaled(specs: dict[str, TensorSpec], max_dim: int = 8) -> dict[str, TensorSpec]:
    """The same keys with every dimension capped, except the UNet's input channels (4/8/9 matter)."""
    small = {}
    for key, spec in specs.items():
        shape = tuple(min(n, max_dim) for n in spec.shape)
        if key == UNET_INPUT_KEY:
            shape = (shape[0], spec.shape[1], *shape[2:])
        small[key] = TensorSpec(spec.dtype, shape)
    return small


def with_dtype(specs: dict[str, TensorSpec], dtype: torch.dtype) -> dict[str, TensorSpec]:
    """Floating keys converted to ``dtype``; integer keys (position ids) kept."""
    return {k: TensorSpec(dtype, s.shape) if s.dtype.is_floating_point else s for k, s in specs.items()}


def random_tensors(specs: dict[str, TensorSpec], seed: int):
    """(key, tensor) pairs: slices of a seeded random pool at random offsets, so big models are fast."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL_ELEMENTS, generator=generator, dtype=torch.float32)
    for key, spec in specs.items():
        if not spec.dtype.is_floating_point:
            yield key, torch.arange(spec.numel, dtype=spec.dtype).reshape(spec.shape)
            continue
        count = prod(spec.shape)
        values = torch.empty(count, dtype=spec.dtype)
        filled = 0
        while filled < count:
            start = int(torch.randint(0, _POOL_ELEMENTS, (1,), generator=generator))
            piece = min(count - filled, _POOL_ELEMENTS - start)
            values[filled : filled + piece].copy_(pool[start : start + piece])
            filled += piece
        yield key, values.reshape(spec.shape)


def write_checkpoint(
    path: Path, specs: dict[str, TensorSpec], seed: int, metadata: dict[str, str] | None = None
) -> Path:
    """A .safetensors file of random values with these keys and shapes."""
    writer = SafetensorsWriter(Path(path), list(specs.items()), metadata, overwrite=True)
    try:
        for key, tensor in random_tensors(specs, seed):
            writer.add(key, tensor)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return Path(path)
