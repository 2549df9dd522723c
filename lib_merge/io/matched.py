"""A checkpoint read under another file's key names: what lets a bare transformer, a diffusers-named
Flux transformer or a lone text encoder be merged with a full checkpoint.

Each presented key is made from keys of the file as stored: one key renamed (handed out as stored,
no copy), or several joined along the first dimension (diffusers' separate q, k and v as BFL's one
``qkv``), or one whose two halves trade places (diffusers' ``norm_out.linear`` is scale then shift,
BFL's ``final_layer.adaLN_modulation.1`` shift then scale). A joined tensor is made when its key is
read, one key at a time, so memory stays flat as in any read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from .readers import CheckpointReader, TensorSpec, _shown


@dataclass(frozen=True)
class Joined:
    """A presented tensor: the stored ``keys`` joined along dim 0, then its halves swapped if asked."""

    keys: tuple[str, ...]
    swap_halves: bool = False

    @property
    def renamed(self) -> bool:
        return len(self.keys) == 1 and not self.swap_halves


class MatchedReader(CheckpointReader):
    """``inner`` presented under other key names: ``sources`` maps each presented key to its Joined."""

    def __init__(self, inner: CheckpointReader, sources: dict[str, Joined]):
        self.path, self.metadata, self.format_note = inner.path, inner.metadata, inner.format_note
        self._inner, self._sources = inner, sources
        self._specs = {key: joined_spec(inner, key, source) for key, source in sources.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        source = self._sources[key]
        if source.renamed:
            return self._inner[source.keys[0]]
        parts = [self._inner[stored] for stored in source.keys]
        if source.swap_halves:
            whole = parts[0] if len(parts) == 1 else torch.cat(parts)
            half = whole.shape[0] // 2
            parts = [whole[half:], whole[:half]]
        return torch.cat(parts)

    def data_offset(self, key: str) -> int:
        inner = self._inner
        return inner.data_offset(self._sources[key].keys[0]) if hasattr(inner, "data_offset") else 0

    def prefetch(self, key: str) -> None:
        for stored in self._sources[key].keys:
            self._inner.prefetch(stored)

    def close(self) -> None:
        self._inner.close()


def joined_spec(inner: CheckpointReader, key: str, source: Joined) -> TensorSpec:
    """The spec of presented ``key``; InputError when its stored keys cannot be joined."""
    specs = [inner.spec(stored) for stored in source.keys]
    first = specs[0]
    if source.renamed:
        return first
    for stored, spec in zip(source.keys, specs, strict=True):
        if not spec.shape or spec.dtype != first.dtype or spec.shape[1:] != first.shape[1:]:
            raise InputError(
                f"{inner.path}: keys {', '.join(_shown(k) for k in source.keys)} cannot be joined into "
                f"{_shown(key)}: {_shown(stored)} is {_describe(spec)}, {_shown(source.keys[0])} {_describe(first)}"
            )
    rows = sum(spec.shape[0] for spec in specs)
    if source.swap_halves and rows % 2:
        raise InputError(
            f"{inner.path}: key {_shown(source.keys[0])} has shape {list(first.shape)}: its halves "
            f"cannot be swapped to make {_shown(key)} (needs an even first dimension)"
        )
    return TensorSpec(first.dtype, (rows, *first.shape[1:]))


def _describe(spec: TensorSpec) -> str:
    return f"{str(spec.dtype).removeprefix('torch.')} {list(spec.shape)}"
