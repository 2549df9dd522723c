"""A random-weight SDXL checkpoint that a real host loads and runs: the real key names and shapes
(lib_merge/data/sdxl_shapes.json), fp16, values like ../shared/webui-offline's SD1.5 ones (weights
N(0, 0.02), norm scales 1, biases near 0), and CLIP-G's ``text_projection``, which real SDXL files
have and the shapes table lacks (without it Forge would leave that layer uninitialised).

    python tests/make_sdxl_checkpoint.py OUT.safetensors --seed N

Streamed tensor by tensor through the project's writer: memory stays flat for the 6.9 GB file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lib_merge.io.readers import TensorSpec
from lib_merge.io.writer import SafetensorsWriter
from lib_merge.synthetic import layout

TEXT_PROJECTION = "conditioner.embedders.1.model.text_projection"


def sdxl_specs() -> dict[str, TensorSpec]:
    specs = {key: TensorSpec(torch.float16, spec.shape) for key, spec in layout("sdxl").items()}
    specs[TEXT_PROJECTION] = TensorSpec(torch.float16, (1280, 1280))
    return specs


def value(key: str, spec: TensorSpec, generator: torch.Generator) -> torch.Tensor:
    if key.endswith(".weight") and len(spec.shape) == 1:
        return torch.ones(spec.shape, dtype=spec.dtype)
    scale = 0.002 if key.endswith(".bias") else 0.02
    return (scale * torch.randn(spec.shape, generator=generator)).to(spec.dtype)


def write(path: Path, seed: int) -> Path:
    specs = sdxl_specs()
    generator = torch.Generator().manual_seed(seed)
    writer = SafetensorsWriter(path, list(specs.items()), {"format": "pt"}, overwrite=True)
    try:
        for key, spec in specs.items():
            writer.add(key, value(key, spec, generator))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    print(write(arguments.out, arguments.seed))
