"""Which parts a checkpoint holds and under which key prefix: the layouts people mix.

A full Flux checkpoint (BFL / ComfyUI) holds its transformer under ``model.diffusion_model.``, its
text encoders under ``text_encoders.clip_l.transformer.`` and ``text_encoders.t5xxl.transformer.``
and its VAE under ``vae.``; a transformer-only file has the same transformer keys with no prefix; a
text encoder or VAE file holds one part, bare. A part is recognised by keys only its kind has (its
signature), wherever in the key name the signature starts: what comes before is the part's prefix,
and every key under that prefix belongs to the part (to the longest such prefix).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str  # for the preflight's lines
    needle: str  # a quick test before the signature's regex
    signature: re.Pattern  # matched where a segment of the key name starts


def _kind(name: str, needle: str, signature: str) -> Kind:
    return Kind(name, needle, re.compile(signature))


FLUX = _kind("Flux transformer", "double_blocks.", r"double_blocks\.\d+\.")
FLUX_DIFFUSERS = _kind("diffusers Flux transformer", "single_transformer_blocks.", r"single_transformer_blocks\.\d+\.")
MMDIT = _kind("SD3 MMDiT", "joint_blocks.", r"joint_blocks\.\d+\.")
UNET = _kind("UNet", "output_blocks.", r"output_blocks\.\d+\.")
CLIP = _kind("CLIP text encoder", "text_model.encoder.layers.", r"text_model\.encoder\.layers\.\d+\.")
T5 = _kind("T5 encoder", "encoder.block.", r"encoder\.block\.\d+\.layer\.")
# The original (LDM) VAE names; diffusers' VAE (down_blocks, up_blocks) is another layout, not matched.
VAE = _kind("VAE", "coder.", r"(?:encoder\.down|decoder\.up)\.\d+\.")
KINDS = (FLUX, FLUX_DIFFUSERS, MMDIT, UNET, CLIP, T5, VAE)


@dataclass(frozen=True)
class Part:
    kind: Kind
    prefix: str  # "" for bare keys

    @property
    def where(self) -> str:
        return f"at {self.prefix}" if self.prefix else "without prefix"

    def __str__(self) -> str:
        return f"{self.kind.name} {self.where}"


@dataclass(frozen=True)
class Layout:
    """The parts of one file (the diffusion model first, in the order of KINDS) and which part owns each key."""

    parts: tuple[Part, ...]
    part_of: dict[str, Part]  # key -> its part; keys outside every part are absent

    @property
    def alone(self) -> bool:
        """One part with bare keys: a transformer-only, text-encoder-only or VAE-only file."""
        return len(self.parts) == 1 and not self.parts[0].prefix

    def keys_of(self, part: Part) -> list[str]:
        return [key for key, owner in self.part_of.items() if owner == part]

    def describe(self) -> str:
        if not self.parts:
            return "no part recognised"
        if self.alone:
            return f"{self.parts[0].kind.name} alone (keys without prefix)"
        if len(self.parts) == 1:
            return str(self.parts[0])
        return "full checkpoint: " + ", ".join(map(str, self.parts))


def _segment_starts(key: str) -> Iterable[int]:
    yield 0
    for index, char in enumerate(key):
        if char == ".":
            yield index + 1


def _parts_in(key: str) -> Iterable[Part]:
    for kind in KINDS:
        if kind.needle in key:
            for start in _segment_starts(key):
                if kind.signature.match(key, start):
                    yield Part(kind, key[:start])
                    break


def detect(keys: Iterable[str]) -> Layout:
    """The parts of a file with these keys. Two kinds found under one prefix make one part, of the
    kind listed first in KINDS (no file people merge mixes them)."""
    keys = list(keys)
    by_prefix: dict[str, Part] = {}
    for key in keys:
        for part in _parts_in(key):
            known = by_prefix.get(part.prefix)
            if known is None or KINDS.index(part.kind) < KINDS.index(known.kind):
                by_prefix[part.prefix] = part
    longest_first = sorted(by_prefix, key=len, reverse=True)
    part_of = {}
    for key in keys:
        prefix = next((p for p in longest_first if key.startswith(p)), None)
        if prefix is not None:
            part_of[key] = by_prefix[prefix]
    ordered = sorted(dict.fromkeys(part_of.values()), key=lambda part: KINDS.index(part.kind))
    return Layout(tuple(ordered), part_of)
