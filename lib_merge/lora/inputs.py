"""LoRA files as inputs of a merge: each is read as changes to the primary model (``add_delta``'s
second input), and the preflight says what each one leaves out."""

from __future__ import annotations

from pathlib import Path

from ..errors import RequestError
from ..hosts import Checkpoint
from .reader import LoraReader


def lora_input(lora: Checkpoint, primary) -> LoraReader:
    """The LoRA file read against the primary's source (its keys and dtypes), refused if it is the
    primary's own file."""
    base = primary.checkpoint.path
    if _same_file(lora.path, base):
        raise RequestError(f"{lora.name}: is the checkpoint itself, not a LoRA")
    return LoraReader(lora.path, primary.reader)


def lora_notes(plan) -> list[str]:
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
