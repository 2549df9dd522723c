"""A random-weight SDXL checkpoint that a real host loads and runs: the real key names and shapes
(lib_merge/data/sdxl_shapes.json), fp16, values like ../shared/webui-offline's SD1.5 ones (weights
N(0, 0.02), norm scales 1, biases near 0), and the text encoders' last layers, final norms and
CLIP-G's projection, which real SDXL files have and the shapes table (built from model configs, which
stop at the penultimate layer SDXL conditions on) lacks: a host loading a file without them leaves
those layers uninitialised, and CLIP-G's pooled output, which SDXL uses, goes through them.

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

CLIP_L = "conditioner.embedders.0.transformer.text_model."
CLIP_G = "conditioner.embedders.1.model."


def sdxl_specs() -> dict[str, TensorSpec]:
    specs = {key: TensorSpec(torch.float16, spec.shape) for key, spec in layout("sdxl").items()}
    last_layers = {
        key.replace(".layers.10.", ".layers.11.").replace(".resblocks.30.", ".resblocks.31."): spec
        for key, spec in specs.items()
        if ".layers.10." in key or ".resblocks.30." in key
    }
    specs.update(last_layers)
    for name, shape in (
        (CLIP_L + "final_layer_norm.weight", (768,)), (CLIP_L + "final_layer_norm.bias", (768,)),
        (CLIP_G + "ln_final.weight", (1280,)), (CLIP_G + "ln_final.bias", (1280,)),
        (CLIP_G + "text_projection", (1280, 1280)), (CLIP_G + "logit_scale", ()),
    ):  # fmt: skip
        specs[name] = TensorSpec(torch.float16, shape)
    specs[CLIP_L + "embeddings.position_ids"] = TensorSpec(torch.int64, (1, 77))
    return specs


def value(key: str, spec: TensorSpec, generator: torch.Generator) -> torch.Tensor:
    if spec.dtype == torch.int64:
        return torch.arange(spec.shape[-1]).expand(*spec.shape).contiguous()
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
