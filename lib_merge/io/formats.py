"""Open any checkpoint file Merge Lab reads, by its format: the one entry point for readers."""

from __future__ import annotations

import os
from pathlib import Path

from .gguf_files import GgufReader
from .quantised import ScaledFp8Reader, is_scaled_fp8, refuse_bitsandbytes
from .readers import PICKLE_SUFFIXES, CheckpointReader, PickleReader, SafetensorsReader

GGUF_SUFFIX = ".gguf"


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """A lazy reader of ``.safetensors`` (scaled fp8 ones read as their weights), ``.gguf``
    (dequantised tensor by tensor), or a safely loaded ``.ckpt``/``.pt``, by the file's extension."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return PickleReader(path)
    if suffix == GGUF_SUFFIX:
        return GgufReader(path)
    reader = SafetensorsReader(path)
    try:
        refuse_bitsandbytes(reader)
    except Exception:
        reader.close()
        raise
    return ScaledFp8Reader(reader) if is_scaled_fp8(reader) else reader
