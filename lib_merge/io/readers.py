"""Checkpoint readers that look like read-only dicts of tensors and never load a whole model.

``.safetensors``: the header is parsed and checked first, then each tensor is a zero-copy view of a
private (copy-on-write) memory map, so the file is never modified and mapped pages are page cache,
not process memory. ``.ckpt``/``.pt``: ``torch.load(weights_only=True)``, memory-mapped when the
file allows; a pickle that needs anything beyond tensors is refused before any of its code runs.
Key names are normalised the way the webui's ``get_state_dict_from_checkpoint`` does.
"""

from __future__ import annotations

import builtins
import importlib.util
import itertools
import json
import mmap
import os
import pickle
import re
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from ..errors import InputError, UnsafePickleError
from .direct_reads import SMALL_BYTES, DirectReads, open_direct
from .page_cache import in_page_cache

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

# The webui renames these prefixes when it reads a checkpoint (modules/sd_models.py).
SD1_RENAMES = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}
SD2_TURBO_RENAMES = {"conditioner.embedders.0.": "cond_stage_model."}
SD2_TURBO_MARKER = "conditioner.embedders.0.model.ln_final.weight"


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _rename(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if key.startswith(old):
            key = new + key[len(old) :]
    return key


def webui_key_names(stored: dict[str, TensorSpec]) -> dict[str, str]:
    """Map the webui's name of each key to its stored name."""
    marker = stored.get(SD2_TURBO_MARKER)
    renames = SD2_TURBO_RENAMES if marker is not None and marker.shape[:1] == (1024,) else SD1_RENAMES
    return {_rename(key, renames): key for key in stored}


class CheckpointReader:
    """A read-only mapping of key -> tensor, plus each key's spec and the file's metadata."""

    path: Path
    metadata: dict[str, str]
    format_note: str | None = None  # how the stored numbers became these tensors, where not as stored

    def __init__(self, path: Path, specs: dict[str, TensorSpec]):
        self.path = path
        self._stored_name = webui_key_names(specs)
        self._specs = {key: specs[stored] for key, stored in self._stored_name.items()}

    def keys(self) -> list[str]:
        return list(self._specs)

    def __iter__(self):
        return iter(self._specs)

    def __contains__(self, key: object) -> bool:
        return key in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, key: str) -> TensorSpec:
        return self._specs[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def prefetch(self, key: str) -> None:
        """Hint that ``key`` is read next (a no-op where the format cannot tell the kernel)."""

    def read_past_cache(self) -> bool:
        """Read big tensors past the page cache from now on (``direct_reads.py``), where this
        reader's file and filesystem allow; whether they will be."""
        inner = getattr(self, "_inner", None)  # a reader presenting another's tensors
        return inner.read_past_cache() if inner is not None else False

    def in_page_cache(self) -> bool:
        """Whether the page cache holds this file's tensors already (True where it cannot be told)."""
        inner = getattr(self, "_inner", None)
        return inner.in_page_cache() if inner is not None else True

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self._specs.values())

    def close(self) -> None:
        """Release the file; tensors already handed out stay valid."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsReader(CheckpointReader):
    """Lazy ``.safetensors``: header first, each tensor a view of a copy-on-write memory map."""

    def __init__(self, path: Path):
        path = Path(path)
        with _open_input(path) as file:
            size = os.fstat(file.fileno()).st_size
            header, data_start = _read_header(path, file, size)
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self._direct: DirectReads | None = None
        self._data_start = data_start
        self._offsets: dict[str, tuple[int, int]] = {}
        specs = {}
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise InputError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
        for key, entry in header.items():
            specs[key], self._offsets[key] = _parse_entry(path, key, entry, size - data_start)
        _check_no_overlap(path, self._offsets)
        self.metadata = dict(metadata)
        super().__init__(path, specs)

    def data_offset(self, key: str) -> int:
        """Where the key's bytes start in the file: reading in this order reads the file sequentially."""
        return self._offsets[self._stored_name[key]][0]

    def __getitem__(self, key: str) -> torch.Tensor:
        begin, end = self._offsets[self._stored_name[key]]
        spec = self._specs[key]
        if spec.numel == 0:
            return torch.empty(spec.shape, dtype=spec.dtype)
        offset = self._data_start + begin
        if self._direct is not None and end - begin >= SMALL_BYTES:
            return self._direct.take(offset, end - begin, spec.dtype, spec.shape)
        if offset % spec.dtype.itemsize:  # unaligned: copy rather than hand out a misaligned view
            data = bytearray(self._map[offset : self._data_start + end])
            return torch.frombuffer(data, dtype=spec.dtype).reshape(spec.shape)
        return torch.frombuffer(self._map, dtype=spec.dtype, count=spec.numel, offset=offset).reshape(spec.shape)

    def prefetch(self, key: str) -> None:
        begin, end = self._offsets[self._stored_name[key]]
        if self._direct is not None and end - begin >= SMALL_BYTES:
            return self._direct.request(self._data_start + begin, end - begin)
        if self._map is None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        length = self._data_start + end - start
        if length > 0:
            self._map.madvise(mmap.MADV_WILLNEED, start, length)

    def in_page_cache(self) -> bool:
        return self._map is None or in_page_cache(self.path, self._data_start, len(self._map))

    def read_past_cache(self) -> bool:
        if self._direct is None and self._map is not None:
            fd = open_direct(self.path)
            self._direct = DirectReads(self.path, fd) if fd is not None else None
        return self._direct is not None

    def close(self) -> None:
        # The map stays alive while tensors handed out still view it; it closes when they are gone.
        self._map = None
        if self._direct is not None:
            self._direct.close()
            self._direct = None


class PickleReader(CheckpointReader):
    """``.ckpt`` / ``.pt`` through ``torch.load(weights_only=True)``: tensors and plain data only."""

    def __init__(self, path: Path):
        path = Path(path)
        _open_input(path).close()
        state = _safe_torch_load(path)
        if not isinstance(state, dict):
            raise InputError(f"{path}: not a checkpoint (it holds a {type(state).__name__}, not a dict)")
        state = state.get("state_dict", state)
        if not isinstance(state, dict):
            raise InputError(f"{path}: not a checkpoint ('state_dict' is a {type(state).__name__})")
        self._tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        self.metadata = {}
        specs = {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in self._tensors.items()}
        super().__init__(path, specs)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors[self._stored_name[key]]

    def close(self) -> None:
        self._tensors = {}


def _open_input(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a checkpoint file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror})") from None


def _read_header(path: Path, file, size: int) -> tuple[dict, int]:
    # No message here quotes the file's bytes: the file may be anything (a text file, a secret).
    if size < 8:
        raise InputError(f"{path}: not a safetensors file (only {size} bytes)")
    (header_len,) = struct.unpack("<Q", file.read(8))
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise InputError(f"{path}: not a safetensors file, or truncated (its header length does not fit the file)")
    try:
        header = json.loads(file.read(header_len).decode("utf-8"), object_pairs_hook=_unique_names)
    except UnicodeDecodeError:
        raise InputError(f"{path}: corrupt safetensors header, or not a safetensors file (not UTF-8 text)") from None
    except json.JSONDecodeError as err:
        raise InputError(
            f"{path}: corrupt safetensors header, or not a safetensors file (not JSON, at header byte {err.pos})"
        ) from None
    except RecursionError:
        raise InputError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    except _BadName as err:
        raise InputError(f"{path}: corrupt safetensors header ({err.args[0]})") from None
    except ValueError:  # e.g. an integer of thousands of digits
        raise InputError(f"{path}: corrupt safetensors header (a number too long to read)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + header_len


class _BadName(ValueError):
    """A header object names something twice, or a name is not valid Unicode."""


def _unique_names(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: a name given twice would hide one entry behind another, so refuse it."""
    result = dict(pairs)
    for name, value in pairs:
        # A lone surrogate (from a \\ud800 escape) would break writing the name into the output.
        for text in (name, value) if isinstance(value, str) else (name,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise _BadName(f"a name or value near key {_shown(name)} is not valid Unicode") from None
    if len(result) != len(pairs):
        seen = set()
        for name, _ in pairs:
            if name in seen:
                raise _BadName(f"key {_shown(name)} appears twice")
            seen.add(name)
    return result


def _shown(name: str) -> str:
    """A name from a header as one short line of error text, whatever it holds."""
    text = name if name.isprintable() else ascii(name)
    return text if len(text) <= 200 else text[:200] + "..."


MAX_DIMS = 64
MAX_DIM = 1 << 48
MAX_OFFSET = 1 << 64  # safetensors' offsets are u64


def _is_count(value: object, limit: int) -> bool:
    """A plain JSON integer in [0, limit]: not a bool, a float (2.0) or a string ("3")."""
    return type(value) is int and 0 <= value <= limit


def _parse_entry(path: Path, key: str, entry, data_size: int) -> tuple[TensorSpec, tuple[int, int]]:
    where = f"{path}: corrupt safetensors header at key {_shown(key)}"
    if not isinstance(entry, dict):
        raise InputError(f"{where} (not an object with dtype, shape and data_offsets)")
    name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(name, str) or name not in DTYPES:
        raise InputError(f"{where} (missing or unknown dtype; known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(n, MAX_DIM) for n in shape):
        raise InputError(f"{where} (shape must be a list of at most {MAX_DIMS} whole numbers from 0 to 2**48)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n, MAX_OFFSET) for n in offsets):
        raise InputError(f"{where} (data_offsets must be two whole numbers from 0 to 2**64)")
    spec = TensorSpec(DTYPES[name], tuple(shape))
    # Zero-size tensors hold no bytes, but torch still lays out their other dimensions: bound them too.
    if prod(max(n, 1) for n in shape) * spec.dtype.itemsize > MAX_DIM:
        raise InputError(f"{where} (its shape is too large for any file)")
    begin, end = offsets
    if begin > end:
        raise InputError(f"{where} (data_offsets end before they begin)")
    if end > data_size:
        raise InputError(
            f"{path}: truncated: key {_shown(key)} ends at data byte {end} but the file holds only {data_size}"
        )
    if end - begin != spec.nbytes:
        raise InputError(
            f"{where} (shape {shape} of {name} needs {spec.nbytes} bytes, data_offsets give {end - begin})"
        )
    return spec, (begin, end)


def _check_no_overlap(path: Path, offsets: dict[str, tuple[int, int]]) -> None:
    """Two keys sharing bytes would alias each other's tensor: refuse, as the safetensors library does."""
    ranges = sorted((begin, end, key) for key, (begin, end) in offsets.items() if end > begin)
    for (_, end, key), (begin, _, other) in itertools.pairwise(ranges):
        if begin < end:
            raise InputError(
                f"{path}: corrupt safetensors header: keys {_shown(key)} and {_shown(other)} share data bytes"
            )


def _safe_torch_load(path: Path):
    # torch's own messages can quote the file's bytes ("Unsupported operand 114" is an "r"): never shown.
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        wanted = _refused_global(str(err))
        if wanted is None:
            raise UnsafePickleError(
                f"{path}: refused: not a checkpoint (unreadable pickle); nothing in it was run"
            ) from None
        raise UnsafePickleError(
            f"{path}: refused: this pickle needs more than tensors to load, and its code was not run "
            f"(Unsupported global: GLOBAL {wanted}). Convert it to .safetensors with a tool you trust."
        ) from None
    except Exception:  # any other failure of torch on a file that is not a checkpoint
        raise InputError(f"{path}: not a checkpoint, or corrupt or truncated (torch cannot read it)") from None


_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([A-Za-z_][\w.]{0,100}?)(?: was| whose|\.?$)")


def _refused_global(message: str) -> str | None:
    """The class a refused pickle asked for, when it names a real module's (or a builtin's) name.

    The name comes from the file: shown only when it is one Python itself knows, so no other text
    from the file (a text file that happens to start like a pickle) ever reaches the message.
    """
    found = _GLOBAL.search(message)
    if found is None:
        return None
    name = found.group(1)
    module, _, attribute = name.rpartition(".")
    if not module:
        return name if hasattr(builtins, name) else None
    if not all(part.isidentifier() for part in name.split(".")):
        return None
    try:
        known = importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        known = False
    return name if known and attribute else None
