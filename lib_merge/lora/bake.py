"""Baking LoRAs into a checkpoint: a merge of the checkpoint with LoRA files read as changes.

A bake is the recipe tree ``add_delta(... add_delta(add_delta(CHECKPOINT, LORA1), LORA2) ..., LORAn)``,
each node with its LoRA's ratio (per block where asked), which the engine merges like any recipe:
key by key, in float64, rounded once to the output dtype, with its preflight, writer, hashes and
recipe metadata. Keys no LoRA patches are the checkpoint's own bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..blocks import BlockValues, finite_number, parse_blocks
from ..engine import MergeResult, ProgressFn, StopFn
from ..errors import RequestError
from ..hosts import Host
from ..io.formats import open_checkpoint
from ..io.readers import CheckpointReader
from ..plan import Plan, make_plan
from ..recipe import MAX_TREE_DEPTH, MergeNode, ModelRef
from ..request import MergeRequest
from .reader import LoraReader

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
        node = MergeNode(METHOD, (node, ModelRef(lora.name)), {"alpha": ratio}, blocks)
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


class _Opener:
    """Opens a bake's inputs for ``make_plan``, which opens them in role order: the checkpoint (A)
    first, then each LoRA, read as changes to that checkpoint."""

    def __init__(self):
        self.base: CheckpointReader | None = None

    def __call__(self, path: str | Path) -> CheckpointReader:
        if self.base is None:
            self.base = open_checkpoint(path)
            return self.base
        return LoraReader(path, self.base)


def plan_bake(request: MergeRequest, host: Host, *, hash_inputs: bool = True) -> Plan:
    """The bake's preflight (``make_plan`` with the LoRAs read as changes), with notes on what each
    LoRA leaves out; a LoRA for another architecture is refused here, before anything is written."""
    refs = list(request.root().models())
    checkpoint = host.resolve(refs[0].name).path
    for ref in refs[1:]:
        if _same_file(host.resolve(ref.name).path, checkpoint):
            raise RequestError(f"{ref.name}: is the checkpoint itself, not a LoRA")
    plan = make_plan(request, host, hash_inputs=hash_inputs, open_input=_Opener())
    plan.notes += lora_notes(plan)
    return plan


def bake(
    request: MergeRequest, host: Host, *, progress: ProgressFn | None = None, should_stop: StopFn | None = None
) -> MergeResult:
    """Preflight, bake, write, register: ``lib_merge.merge`` with the bake's preflight; the
    result's notes start with what the preflight said of each LoRA."""
    from .. import merge

    plans: list[Plan] = []

    def plan_with(request: MergeRequest, host: Host) -> Plan:
        plans.append(plan_bake(request, host))
        return plans[-1]

    result = merge(request, host, progress=progress, should_stop=should_stop, plan_with=plan_with)
    result.notes[:0] = plans[0].notes
    return result


def lora_notes(plan: Plan) -> list[str]:
    """For each LoRA: its modules that match no layer of the checkpoint, its keys that are no part
    of a module, its bundled embeddings, and DoRA modules stacked on an earlier LoRA's keys."""
    notes, earlier = [], set()
    for source in plan.sources.values():
        reader = source.as_stored or source.reader
        if not isinstance(reader, LoraReader):
            continue
        name = source.checkpoint.name
        if reader.unmatched:
            notes.append(
                f"{name}: {_count(reader.unmatched, 'LoRA module')} match no layer of the checkpoint, not baked: {_some(reader.unmatched)}"
            )
        if reader.ignored:
            notes.append(
                f"{name}: {_count(reader.ignored, 'key')} are no part of a LoRA module, ignored: {_some(reader.ignored)}"
            )
        if reader.embeddings:
            notes.append(
                f"{name}: bundles {_count(reader.embeddings, 'embedding')} ({_some(reader.embeddings)}), which are "
                "not weights of the checkpoint and are not baked"
            )
        stacked = sorted(reader.dora_keys & earlier)
        if stacked:
            notes.append(
                f"{name}: its DoRA change to {_some(stacked)} is computed against the checkpoint's weights; the webui "
                "computes it against the weights the LoRAs before it left"
            )
        earlier |= {key for key in reader.keys() if reader.patches_of(key)}
    return notes


def _same_file(a: Path, b: Path) -> bool:
    try:
        return Path(a).samefile(b)
    except OSError:
        return False


def _count(items: list, what: str) -> str:
    return f"{len(items)} {what}{'s' if len(items) != 1 else ''}"


def _some(items: list[str], shown: int = 3) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
