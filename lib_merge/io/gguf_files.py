"""GGUF checkpoints (Forge lists them beside safetensors), read through the ``gguf`` package.

A GGUF file stores each tensor in ggml's order of dimensions (the reverse of torch's) and in one of
ggml's types. Plain types (F64, F32, F16, BF16, integers) are read as stored, bit for bit. Block-
quantised types (Q8_0, Q4_K, ...) are dequantised to float32 by the package's own code, one tensor at
a time, which is what llama.cpp and the loaders built on this package compute. A type the package
cannot dequantise is refused when the file is opened, naming the type and a key that uses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .readers import DTYPES, CheckpointReader, TensorSpec, _open_input, _shown

# The ggml types stored as plain numbers: ggml names them as safetensors does.
PLAIN_TYPES = {name: DTYPES[name] for name in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8")}
# Tools that convert checkpoints to GGUF store the shape of tensors they had to reshape here
# (ComfyUI-GGUF's convert.py: more than 4 dimensions, or rows that do not fit a quantisation block).
ORIGINAL_SHAPE_FIELD = "comfy.gguf.orig_shape."


def _gguf_package(path: Path):
    try:
        import gguf
    except ImportError:
        raise InputError(f"{path}: reading GGUF files needs the gguf package (pip install gguf)") from None
    return gguf


class GgufReader(CheckpointReader):
    """A GGUF file as a checkpoint: plain tensors as stored, quantised ones dequantised to float32."""

    def __init__(self, path: Path):
        path = Path(path)
        _open_input(path).close()  # a missing file or a folder gets the same message as for safetensors
        gguf = _gguf_package(path)
        try:
            self._file = gguf.GGUFReader(path, "r")  # a read-only memory map: the file is never modified
        except Exception:  # the package's own errors may quote the file's bytes: never shown
            raise InputError(
                f"{path}: not a GGUF file, or corrupt or truncated (the gguf package cannot read it)"
            ) from None
        self._dequantize = gguf.quants.dequantize
        self._tensors = {}
        specs = {}
        quantised = {}
        for tensor in self._file.tensors:
            name = str(tensor.name)
            type_name = tensor.tensor_type.name
            shape = self._original_shape(name) or tuple(int(n) for n in reversed(tensor.shape))
            if type_name in PLAIN_TYPES:
                dtype = PLAIN_TYPES[type_name]
            elif self._can_dequantise(gguf, tensor.tensor_type):
                dtype = torch.float32
                quantised[type_name] = quantised.get(type_name, 0) + 1
            else:
                raise InputError(
                    f"{path}: key {_shown(name)} is stored as GGUF type {type_name}, which the gguf package "
                    "installed here cannot dequantise; use a file in F16, BF16, Q8_0, Q4_0..Q5_1 or a K-quant"
                )
            if int(np.prod(shape)) != int(tensor.n_elements):
                raise InputError(
                    f"{path}: corrupt GGUF file: key {_shown(name)} has {tensor.n_elements} values, not {shape}"
                )
            specs[name] = TensorSpec(dtype, shape)
            self._tensors[name] = tensor
        self.metadata = {}
        super().__init__(path, specs)
        if quantised:
            kinds = ", ".join(f"{count} {name}" for name, count in sorted(quantised.items()))
            self.format_note = f"GGUF, quantised keys dequantised to float32 by the gguf package ({kinds})"
        else:
            self.format_note = "GGUF, every key stored unquantised"

    @staticmethod
    def _can_dequantise(gguf, tensor_type) -> bool:
        """Whether the package has a dequantiser for this block type (some IQ and new types it lacks)."""
        quant = getattr(gguf.quants, tensor_type.name, None)
        return isinstance(quant, type) and "dequantize_blocks" in vars(quant)

    def _original_shape(self, name: str) -> tuple[int, ...] | None:
        field = self._file.fields.get(ORIGINAL_SHAPE_FIELD + name)
        if field is None:
            return None
        return tuple(int(field.parts[index][0]) for index in field.data)

    def data_offset(self, key: str) -> int:
        """Where the key's bytes start in the file: reading in this order reads the file sequentially."""
        return int(self._tensors[self._stored_name[key]].data_offset)

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self._tensors[self._stored_name[key]]
        spec = self._specs[key]
        type_name = tensor.tensor_type.name
        if type_name in PLAIN_TYPES:
            raw = np.array(tensor.data).view(np.uint8).reshape(-1)  # a copy off the read-only map
            return torch.from_numpy(raw).view(spec.dtype).reshape(spec.shape)
        values = self._dequantize(tensor.data, tensor.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(spec.shape)

    def close(self) -> None:
        # Tensors already handed out are copies: dropping the map's reader releases the file.
        self._tensors = {}
        self._file = None
