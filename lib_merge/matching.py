"""Each input read in the primary's layout, so the keys people mix meet: a full Flux checkpoint with a
bare or diffusers-named transformer, a text encoder or VAE file with a full checkpoint's part.

Each part of a secondary input (see ``layouts``) is paired with the primary's part of the same kind
whose keys and shapes agree most with it, and its keys are presented under the primary's prefix
(diffusers Flux names as BFL's, see ``flux_diffusers``). Keys of unpaired parts, and keys outside
every part, keep their own names: they meet the primary's only where the names are the same, and
the preflight lists the rest as keys only in one input. The output is always in the primary's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import layouts
from .errors import IncompatibleModelsError, InputError
from .flux_diffusers import bfl_sources
from .io.matched import Joined, MatchedReader, joined_spec
from .io.readers import CheckpointReader, _shown
from .layouts import Layout, Part

DIFFUSERS_NOTE = (
    "diffusers names as BFL's: q, k, v joined into qkv, and with the MLP into linear1; final modulation halves swapped"
)


@dataclass
class Matching:
    """What matching did: each input's reader as the merge reads it, the preflight's lines, problems."""

    readers: dict[str, CheckpointReader]
    primary: Layout
    lines: list[str] = field(default_factory=list)
    problems: list[IncompatibleModelsError] = field(default_factory=list)


@dataclass(frozen=True)
class _Pair:
    primary: Part
    secondary: Part
    sources: dict[str, Joined]  # presented key (in the primary's names) -> stored keys


def match_inputs(readers: dict[str, CheckpointReader]) -> Matching:
    """Every input after the first (role "A") presented in A's layout; a reader already in it is kept."""
    a = readers["A"]
    primary = layouts.detect(a.keys())
    matching = Matching({"A": a}, primary)
    details = {}
    for role, reader in readers.items():
        if role != "A":
            matching.readers[role], details[role] = _match(primary, a, role, reader, matching.problems)
    if any(details.values()):
        matching.lines.append(f"A layout: {primary.describe()}")
        matching.lines += [f"{role} layout: {detail}" for role, detail in details.items() if detail]
    return matching


def _match(
    primary: Layout, a: CheckpointReader, role: str, reader: CheckpointReader, problems: list
) -> tuple[CheckpointReader, str]:
    """(the reader to merge, the preflight's line about it, or "" where it is in A's layout already)."""
    secondary = layouts.detect(reader.keys())
    pairs = _pairs(primary, a, secondary, reader)
    refusal = _diffusers_primary(primary, secondary, pairs, role, reader)
    if refusal:
        problems.append(refusal)
    sources = _presented(reader, pairs)
    detail = "" if secondary.parts == primary.parts else _describe_match(role, primary, secondary, pairs)
    if all(source.renamed and source.keys == (key,) for key, source in sources.items()):
        return reader, detail  # its keys are A's names already
    return MatchedReader(reader, sources), detail


def _offer(primary: Part, secondary: Part, keys: list[str]) -> dict[str, Joined] | None:
    """The secondary part's keys as the primary part would name them; None for parts of other kinds."""
    relative = {key[len(secondary.prefix) :]: key for key in keys}
    if secondary.kind == primary.kind:
        return {primary.prefix + rel: Joined((key,)) for rel, key in relative.items()}
    if (primary.kind, secondary.kind) == (layouts.FLUX, layouts.FLUX_DIFFUSERS):
        return {
            primary.prefix + bfl: Joined(tuple(secondary.prefix + k for k in source.keys), source.swap_halves)
            for bfl, source in bfl_sources(relative).items()
        }
    return None


def _agreement(offer: dict[str, Joined], a: CheckpointReader, reader: CheckpointReader) -> int:
    """How many offered keys the primary has, with the same shape (a CLIP-L is told from a CLIP-G)."""
    return sum(
        1 for key, source in offer.items() if key in a and a.spec(key).shape == joined_spec(reader, key, source).shape
    )


def _pairs(primary: Layout, a: CheckpointReader, secondary: Layout, reader: CheckpointReader) -> list[_Pair]:
    """Parts paired by kind, the pairs whose keys and shapes agree most first (an SD3 checkpoint's
    CLIP-L and CLIP-G share key names); a part no key of which agrees stays unpaired."""
    candidates = []
    for i, part in enumerate(primary.parts):
        for j, other in enumerate(secondary.parts):
            offer = _offer(part, other, secondary.keys_of(other))
            score = _agreement(offer, a, reader) if offer else 0
            if score:  # on a tie, a part under the same name as A's first
                candidates.append((-score, part != other, i, j, _Pair(part, other, offer)))
    pairs, used = [], set()
    for *_, pair in sorted(candidates, key=lambda c: c[:4]):
        if pair.primary not in used and pair.secondary not in used:
            pairs.append(pair)
            used |= {pair.primary, pair.secondary}
    return sorted(pairs, key=lambda pair: primary.parts.index(pair.primary))


def _presented(reader: CheckpointReader, pairs: list[_Pair]) -> dict[str, Joined]:
    """Presented key -> stored keys: the paired parts under A's names, every other key under its own."""
    sources = {key: source for pair in pairs for key, source in pair.sources.items()}
    consumed = {stored for source in sources.values() for stored in source.keys}
    for key in reader.keys():
        if key in consumed:
            continue
        if key in sources:
            raise InputError(
                f"{reader.path}: key {_shown(key)} is also what {_shown(sources[key].keys[0])} is read as "
                "in the primary's layout"
            )
        sources[key] = Joined((key,))
    return sources


def _diffusers_primary(primary: Layout, secondary: Layout, pairs, role: str, reader) -> IncompatibleModelsError | None:
    """A diffusers-named primary with a BFL-named secondary transformer: refused, saying which to put first."""
    paired = {pair.secondary for pair in pairs}
    primary_kinds = {part.kind for part in primary.parts}
    bfl = [p for p in secondary.parts if p.kind == layouts.FLUX and p not in paired]
    if layouts.FLUX_DIFFUSERS not in primary_kinds or layouts.FLUX in primary_kinds or not bfl:
        return None
    return IncompatibleModelsError(
        f"A is a diffusers-named Flux transformer and {role} ({reader.path.name}) has BFL names "
        f"({bfl[0]}): Merge Lab reads diffusers names as BFL names, not the other way round; "
        f"put {reader.path.name} first (as the primary model), and the output will have BFL names"
    )


def _describe_match(role: str, primary: Layout, secondary: Layout, pairs: list[_Pair]) -> str:
    """E.g. ``diffusers Flux transformer alone (keys without prefix). Matched: diffusers Flux transformer
    without prefix read as A's Flux transformer at model.diffusion_model. (...); not in B, kept from A: VAE at vae.``"""
    matched = []
    for pair in pairs:
        if pair.secondary == pair.primary:
            matched.append(f"{pair.primary} as in A")
            continue
        how = f" ({DIFFUSERS_NOTE})" if pair.secondary.kind != pair.primary.kind else ""
        matched.append(f"{pair.secondary} read as A's {pair.primary}{how}")
    paired_a = {pair.primary for pair in pairs}
    paired_b = {pair.secondary for pair in pairs}
    missing = [str(part) for part in primary.parts if part not in paired_a]
    extra = [str(part) for part in secondary.parts if part not in paired_b]
    if missing:
        matched.append(f"not in {role}, kept from A: {', '.join(missing)}")
    if extra:
        matched.append(f"not in A, dropped: {', '.join(extra)}")
    return f"{secondary.describe()}. Matched: {'; '.join(matched) or 'no part'}"
