"""Baking LoRAs into a checkpoint: a merge of the checkpoint with LoRA files read as changes.

A bake is the recipe tree ``add_delta(... add_delta(add_delta(CHECKPOINT, LORA1), LORA2) ..., LORAn)``,
each node with its LoRA's ratio (per block where asked), which the engine merges like any recipe:
key by key, in float64, rounded once to the output dtype, with its preflight, writer, hashes and
recipe metadata. Keys no LoRA patches are the checkpoint's own bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..blocks import BlockValues, finite_number, parse_blocks
from ..errors import RequestError
from ..hosts import Host
from ..recipe import MAX_TREE_DEPTH, MergeNode, ModelRef
from ..request import MergeRequest

if TYPE_CHECKING:  # the preflight reads LoRAs through this package: imported when called
    from ..engine import MergeResult, ProgressFn, StopFn
    from ..plan import Plan

METHOD = "add_delta"
MAX_LORAS = MAX_TREE_DEPTH  # one tree level per LoRA


@dataclass(frozen=True)
class LoraRef:
    """One LoRA of a bake: its name (a path, for the CLI), its ratio, and per-block weights (the
    block grammar of merges: a comma list, a preset, ``IN*=0``) that multiply the ratio."""

    name: str
    ratio: float = 1.0
    blocks: str = ""


def bake_request(checkpoint: str, loras: Sequence[LoraRef], *, family: str, **options) -> MergeRequest:
    """The request that bakes ``loras`` into ``checkpoint``; ``family`` (the checkpoint's) reads the
    block weights; ``options`` are MergeRequest's output fields (output_path, dtype, overwrite ...)."""
    if not loras:
        raise RequestError("loras: name at least one LoRA to bake")
    if len(loras) > MAX_LORAS:
        raise RequestError(f"loras: at most {MAX_LORAS} LoRAs in one bake, got {len(loras)}")
    node: ModelRef | MergeNode = ModelRef(checkpoint)
    for number, lora in enumerate(loras, 1):
        where = f"LoRA {number} ({lora.name})"
        ratio = finite_number(lora.ratio, f"{where} ratio")
        blocks = {"alpha": block_alphas(lora.blocks, ratio, family, where)} if lora.blocks.strip() else {}
        node = MergeNode(METHOD, (node, ModelRef(lora.name, lora=True)), {"alpha": ratio}, blocks)
    return MergeRequest(checkpoint, tree=node, **options)


def block_alphas(text: str, ratio: float, family: str, where: str) -> str:
    """Per-block weights times ``ratio``, as the per-block text of add_delta's alpha (blocks not
    given weigh 1, so they take the ratio)."""
    try:
        weights = parse_blocks(text, family, param="alpha", default=1.0)
        return BlockValues(family, ratio, {block: ratio * weight for block, weight in weights.values.items()}).to_text()
    except RequestError as err:
        raise RequestError(f"{where} blocks: {str(err).removeprefix('blocks.alpha: ')}") from None
    except ValueError as err:  # a product past the range of a float
        raise RequestError(f"{where} blocks: {err}") from None


def plan_bake(request: MergeRequest, host: Host, *, hash_inputs: bool = True) -> Plan:
    """The bake's preflight: ``make_plan``, which reads the LoRAs as changes and notes what each
    leaves out; a LoRA for another architecture is refused here, before anything is written."""
    from ..plan import make_plan

    return make_plan(request, host, hash_inputs=hash_inputs)


def bake(
    request: MergeRequest, host: Host, *, progress: ProgressFn | None = None, should_stop: StopFn | None = None
) -> MergeResult:
    """Preflight, bake, write, register: ``lib_merge.merge`` of the bake's tree."""
    from .. import merge

    return merge(request, host, progress=progress, should_stop=should_stop)
