"""The Flux transformer in diffusers' names (``FluxTransformer2DModel``) and in BFL's (``flux/model.py``,
the names ComfyUI and Forge save): which diffusers keys make each BFL key.

Written from the two published layouts. Most keys are renamed; BFL fuses what diffusers keeps apart:
a double block's ``img_attn.qkv`` is diffusers' ``attn.to_q``, ``to_k``, ``to_v`` one after another
along the output dimension (``txt_attn.qkv`` the ``add_*_proj``), a single block's ``linear1`` is
``to_q``, ``to_k``, ``to_v`` then ``proj_mlp``; and the final layer's modulation is shift then scale
in BFL, scale then shift in diffusers (``norm_out.linear``), so its halves trade places.

``bfl_place`` answers the same question for one diffusers layer (a LoRA module's), from the same table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

from .io.matched import Joined

_LINEAR = ("weight", "bias")

# BFL name -> diffusers name, for the linears outside the blocks (weight and bias each).
_TOP_LINEARS = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",  # Flux dev only
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_SWAPPED_LINEARS = {"final_layer.adaLN_modulation.1": "norm_out.linear"}

# Inside double_blocks.N (diffusers: transformer_blocks.N).
_DOUBLE_LINEARS = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_JOINED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}

# Inside single_blocks.N (diffusers: single_transformer_blocks.N).
_SINGLE_LINEARS = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
_SINGLE_JOINED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}

_DOUBLE = re.compile(r"transformer_blocks\.(\d+)\.")
_SINGLE = re.compile(r"single_transformer_blocks\.(\d+)\.")


def _block_table(bfl: str, diffusers: str, linears: dict, joined: dict, norms: dict) -> dict[str, Joined]:
    table = {}
    for suffix in _LINEAR:
        for name, source in linears.items():
            table[f"{bfl}{name}.{suffix}"] = Joined((f"{diffusers}{source}.{suffix}",))
        for name, sources in joined.items():
            table[f"{bfl}{name}.{suffix}"] = Joined(tuple(f"{diffusers}{source}.{suffix}" for source in sources))
    for name, source in norms.items():
        table[f"{bfl}{name}"] = Joined((f"{diffusers}{source}",))
    return table


def _top_table() -> dict[str, Joined]:
    table = {}
    for suffix in _LINEAR:
        for name, source in _TOP_LINEARS.items():
            table[f"{name}.{suffix}"] = Joined((f"{source}.{suffix}",))
        for name, source in _SWAPPED_LINEARS.items():
            table[f"{name}.{suffix}"] = Joined((f"{source}.{suffix}",), swap_halves=True)
    return table


def bfl_table(double_blocks: Iterable[int], single_blocks: Iterable[int]) -> dict[str, Joined]:
    """Every BFL key of a Flux transformer with these block numbers -> the diffusers keys making it."""
    table = _top_table()
    for n in double_blocks:
        table |= _block_table(
            f"double_blocks.{n}.", f"transformer_blocks.{n}.", _DOUBLE_LINEARS, _DOUBLE_JOINED, _DOUBLE_NORMS
        )
    for n in single_blocks:
        table |= _block_table(
            f"single_blocks.{n}.", f"single_transformer_blocks.{n}.", _SINGLE_LINEARS, _SINGLE_JOINED, _SINGLE_NORMS
        )
    return table


def bfl_sources(diffusers_keys: Iterable[str]) -> dict[str, Joined]:
    """The BFL keys that these diffusers-named keys make (part-relative, no prefix): each with all of
    its sources present; a key missing a source (a q without its k) is not made."""
    keys = set(diffusers_keys)
    double = {int(m[1]) for key in keys if (m := _DOUBLE.match(key))}
    single = {int(m[1]) for key in keys if (m := _SINGLE.match(key))}
    table = bfl_table(sorted(double), sorted(single))
    return {bfl: source for bfl, source in table.items() if all(key in keys for key in source.keys)}


@dataclass(frozen=True)
class Place:
    """Where a diffusers layer's weight lies in BFL's: in the (bare) module ``module``, as the
    ``index``-th of the ``count`` layers fused there along the output dimension, with its halves
    traded (``swap_halves``) for the final modulation."""

    module: str
    index: int = 0
    count: int = 1
    swap_halves: bool = False

    @property
    def whole(self) -> bool:
        """The layer is BFL's module under another name: a change to one is a change to the other."""
        return self.count == 1 and not self.swap_halves

    def rows(self, height: int, width: int) -> tuple[int, int]:
        """Its rows of the BFL weight (``height`` x ``width``): fused layers are as tall as the model
        is wide (its hidden size), the last takes the rest (a single block's MLP, 4 x hidden)."""
        if self.count == 1:
            return 0, height
        start = self.index * width
        return start, height if self.index == self.count - 1 else start + width


_FLAT_BLOCK = re.compile(r"(single_transformer_blocks|transformer_blocks)_(\d+)_(.+)")


@cache
def _places() -> dict[str, Place]:
    """Each diffusers layer outside the blocks and in block 0 of each kind, "." spelt "_", -> its Place."""
    places = {}
    for bfl, joined in bfl_table([0], [0]).items():
        if bfl.endswith(".weight"):
            for index, key in enumerate(joined.keys):
                flat = key[: -len(".weight")].replace(".", "_")
                places[flat] = Place(bfl[: -len(".weight")], index, len(joined.keys), joined.swap_halves)
    return places


def bfl_place(layer: str) -> Place | None:
    """The Place of a diffusers Flux layer given as a module path (``transformer_blocks.0.attn.to_q``,
    no ``transformer.`` prefix) or with "_" for "." as kohya-style names write it; None for no layer."""
    flat = layer.replace(".", "_")
    match = _FLAT_BLOCK.fullmatch(flat)
    if match is None:
        return _places().get(flat)
    kind, number, rest = match[1], match[2], match[3]
    place = _places().get(f"{kind}_0_{rest}")
    if place is None:
        return None
    block = "double_blocks." if kind == "transformer_blocks" else "single_blocks."
    return Place(block + number + place.module[len(block) + 1 :], place.index, place.count, place.swap_halves)
