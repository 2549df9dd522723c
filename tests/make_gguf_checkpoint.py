"""Write a checkpoint's tensors as a GGUF file, big matrices block-quantised, as GGUF converters do.

    python tests/make_gguf_checkpoint.py IN.safetensors OUT.gguf [--type Q8_0] [--only model.diffusion_model.]

Every key keeps its name; ``--only PREFIX`` keeps the keys starting with it (GGUF files people load in
Forge hold the diffusion model alone, its VAE and text encoders chosen beside it). A
floating tensor whose last dimension fits whole quantisation blocks is stored in the chosen type;
the rest (biases, norms, 3x3 convolutions) in F16, integers as they are. Uses the gguf package's
writer and quantiser, the same package Merge Lab reads with; the tests check the values read back
against their own dequantisation, not the package's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np
import safetensors.torch
import torch

QUANTISED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def gguf_type_for(tensor: torch.Tensor, quant: str) -> str | None:
    """The block type to store ``tensor`` in, or None to store it unquantised."""
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant]][0]
    big = tensor.dim() >= 2 and tensor.numel() >= 1024
    return quant if tensor.is_floating_point() and big and tensor.shape[-1] % block == 0 else None


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], quant: str = "Q8_0", arch: str = "sd1") -> dict[str, str]:
    """Write ``tensors`` to ``path``; returns the GGUF type each key was stored in."""
    writer = gguf.GGUFWriter(str(path), arch)
    stored = {}
    for key, tensor in tensors.items():
        kind = gguf_type_for(tensor, quant)
        if kind is not None:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(key, gguf.quants.quantize(tensor.float().numpy(), qtype), raw_dtype=qtype)
        elif tensor.is_floating_point():
            kind = "F16"
            writer.add_tensor(key, tensor.to(torch.float16).numpy())
        else:
            kind = str(tensor.dtype).removeprefix("torch.")
            writer.add_tensor(key, tensor.numpy())
        stored[key] = kind
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--type", default="Q8_0", choices=QUANTISED_TYPES)
    parser.add_argument("--only", default="", metavar="PREFIX", help="keep only the keys starting with PREFIX")
    args = parser.parse_args(argv)
    tensors = safetensors.torch.load_file(str(args.source))
    tensors = {key: tensor for key, tensor in tensors.items() if key.startswith(args.only)}
    stored = write_gguf(args.output, tensors, args.type)
    counts = np.unique(list(stored.values()), return_counts=True)
    print(f"{args.output}: {len(stored)} keys; " + ", ".join(f"{n} {k}" for k, n in zip(*counts, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
