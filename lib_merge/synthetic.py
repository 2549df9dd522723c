"""Checkpoints with the real key names and shapes of SD1.5, SDXL, Flux dev and SD3.5 large, and
random values.

Used by the benchmark, the demo and the tests: no model can be downloaded, and none is needed to
exercise every byte path of a merge.

Layouts (``lib_merge/data/``): ``sd15`` and ``sdxl`` are full checkpoints. ``sdxl`` is
../shared/data/sdxl_shapes.json (the keys of the model as built) with the 34 that SDXL files carry
beyond those, and that loaders which build both text encoders read (kohya's sd-scripts do): CLIP-L's
layer 11 and final_layer_norm, OpenCLIP-G's resblock 31, ln_final, text_projection and logit_scale.
``flux`` is the Flux dev
transformer alone: the ``model.diffusion_model.*`` keys of a full Flux dev checkpoint (11.9 G
parameters; ../shared/data/flux_shapes.json). ``sd35`` is the SD3.5 large transformer, derived from
the SD3 medium table (../shared/data/sd3_shapes.json) by ``sd35_large_from_sd3_medium``: see there.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from math import prod
from pathlib import Path

import torch

from .channels import UNET_INPUT_KEY
from .io.readers import DTYPES, TensorSpec
from .io.writer import SafetensorsWriter

LAYOUT_FILES = {
    "sd15": "sd15_shapes.json",
    "sdxl": "sdxl_shapes.json",
    "flux": "flux_transformer_shapes.json",
    "sd35": "sd35_large_transformer_shapes.json",
}
ARCHES = tuple(LAYOUT_FILES)
TRANSFORMER_PREFIX = "model.diffusion_model."
_POOL_ELEMENTS = 1 << 22


def layout(arch: str) -> dict[str, TensorSpec]:
    """key -> spec of a real checkpoint layout (``lib_merge/data/``, see ``LAYOUT_FILES``)."""
    text = resources.files("lib_merge").joinpath(f"data/{LAYOUT_FILES[arch]}").read_text()
    return specs_from_table(json.loads(text))


def specs_from_table(table: dict) -> dict[str, TensorSpec]:
    """A shapes table (key -> [safetensors dtype, shape]) as specs."""
    return {key: TensorSpec(DTYPES[dtype], tuple(shape)) for key, (dtype, shape) in table.items()}


# SD3 medium -> SD3.5 large. The MMDiT's width is 64 x depth: medium 24 joint blocks, 1536 wide;
# SD3.5 large 38 joint blocks, 2432 wide (38 heads of 64). Widths that are multiples of the hidden
# size (qkv 3x, MLP 4x, adaLN 6x, a pre-only or final adaLN 2x) scale with it; the rest are fixed by
# the inputs and outputs: T5's 4096 (context_embedder), pooled CLIP's 2048 (y_embedder), 256
# timestep frequencies, 16 latent channels, 2x2 patches (64 = 16 x 2 x 2 outputs) and 192 x 192 =
# 36864 positions (pos_embed_max_size 192 in both).
SD3_MEDIUM_DEPTH, SD35_LARGE_DEPTH, SD3_HEAD_DIM = 24, 38, 64
_JOINT_BLOCK = re.compile(r"^joint_blocks\.(\d+)\.(.*)$")


def sd35_large_from_sd3_medium(medium: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
    """The SD3.5 large transformer's keys and shapes, from SD3 medium's (a full checkpoint's table).

    Only the ``model.diffusion_model.`` keys are used. Joint blocks 0-36 take block 0's layout and
    block 37 the last block's (its context stream is pre-only: adaLN of 2x width and qkv, no
    projection or MLP); each multiple of 1536 up to 6x becomes the same multiple of 2432 (36864,
    the positions, is not a width). SD3.5 adds RMS q/k norms (qk_norm "rms") to every attention:
    ``attn.ln_q.weight`` and ``attn.ln_k.weight`` of the head size, 64, in both streams, the
    pre-only context stream included.
    """
    old, new = 64 * SD3_MEDIUM_DEPTH, 64 * SD35_LARGE_DEPTH

    def wider(spec: TensorSpec) -> TensorSpec:
        return TensorSpec(spec.dtype, tuple(n // old * new if n % old == 0 and n <= 6 * old else n for n in spec.shape))

    transformer = {k[len(TRANSFORMER_PREFIX) :]: s for k, s in medium.items() if k.startswith(TRANSFORMER_PREFIX)}
    first, last, outside = {}, {}, {}
    for key, spec in transformer.items():
        match = _JOINT_BLOCK.match(key)
        if match is None:
            outside[key] = wider(spec)
        elif int(match[1]) == 0:
            first[match[2]] = wider(spec)
        elif int(match[1]) == SD3_MEDIUM_DEPTH - 1:
            last[match[2]] = wider(spec)
    large: dict[str, TensorSpec] = {}
    for block in range(SD35_LARGE_DEPTH):
        parts = dict(last if block == SD35_LARGE_DEPTH - 1 else first)
        dtype = next(iter(parts.values())).dtype
        for stream in ("context_block", "x_block"):
            for name in ("ln_k", "ln_q"):
                parts[f"{stream}.attn.{name}.weight"] = TensorSpec(dtype, (SD3_HEAD_DIM,))
        large.update({f"joint_blocks.{block}.{part}": spec for part, spec in parts.items()})
    large.update(outside)
    return {TRANSFORMER_PREFIX + key: large[key] for key in sorted(large)}


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
    """(key, tensor) pairs: slices of a seeded random pool at random offsets, so big models are fast.

    The pool (standard normal float32) is converted once to each dtype it is asked for, so a slice
    is a plain copy: the same values as converting each slice, without converting 12 G values one
    by one (fp8 values are the normal ones cast to fp8, as a model quantised by a cast is).
    """
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL_ELEMENTS, generator=generator, dtype=torch.float32)
    pools = {torch.float32: pool}
    for key, spec in specs.items():
        if not spec.dtype.is_floating_point:
            yield key, torch.arange(spec.numel, dtype=spec.dtype).reshape(spec.shape)
            continue
        source = pools.get(spec.dtype)
        if source is None:
            source = pools[spec.dtype] = pool.to(spec.dtype)
        count = prod(spec.shape)
        values = torch.empty(count, dtype=spec.dtype)
        filled = 0
        while filled < count:
            start = int(torch.randint(0, _POOL_ELEMENTS, (1,), generator=generator))
            piece = min(count - filled, _POOL_ELEMENTS - start)
            values[filled : filled + piece].copy_(source[start : start + piece])
            filled += piece
        yield key, values.reshape(spec.shape)


def write_checkpoint(
    path: Path, specs: dict[str, TensorSpec], seed: int, metadata: dict[str, str] | None = None
) -> Path:
    """A .safetensors file of random values with these keys and shapes, streamed to disk: memory
    holds a few tensors (the writer's queue), never the model."""
    write_checkpoint_hashed(path, specs, seed, metadata)
    return Path(path)


def write_checkpoint_hashed(
    path: Path, specs: dict[str, TensorSpec], seed: int, metadata: dict[str, str] | None = None
) -> str:
    """``write_checkpoint``, returning the file's sha256 (computed as it was written)."""
    writer = SafetensorsWriter(Path(path), list(specs.items()), metadata, overwrite=True)
    try:
        for key, tensor in random_tensors(specs, seed):
            writer.add(key, tensor)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise
