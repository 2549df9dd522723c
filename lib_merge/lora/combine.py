"""Merging LoRA files into one kohya LoRA, each at its ratio: exactly, or re-ranked by SVD.

Exactly (no rank given): for each layer, the inputs' ``lora_up`` scaled by ratio x scale (alpha / rank)
side by side and their ``lora_down`` stacked, alpha = the total rank: up @ down is then the sum of
each LoRA's change times its ratio, with nothing approximated (each scaled up rounded once to the
output dtype). Only plain LoRA / LoCon modules concatenate so; a LoHa, LoKr, full diff or Tucker
(``lora_mid``) module is refused, naming it, unless a rank is given.

Re-ranked (``rank``): for each layer the sum of the changes in float64, cut by SVD to ``rank``
(``conv_rank`` for 3x3 convs): the closest change of that rank (Eckart-Young), never clamped.
Where every module of a layer is a plain LoRA the SVD is of the concatenated factors (QR, then an
SVD of a matrix the size of the total rank, in float64); otherwise of the whole change, in float32
on the device. DoRA modules (their change depends on the checkpoint's weights) and bias changes
(``diff_b``) cannot be held by a kohya LoRA and are refused either way: bake those instead.

Modules are matched by the layer they patch (``names.lora_layer_names``), so a kohya and a diffusers
/ PEFT spelling of one layer merge; the output uses kohya's spelling. LoRAs for different
architectures are refused, naming both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import arch
from ..blocks import finite_number
from ..engine import ProgressFn, StopFn, usable_device
from ..errors import IncompatibleModelsError, InputError, RequestError
from ..hosts import default_device
from ..io.formats import open_checkpoint
from ..io.readers import CheckpointReader, _shown
from . import family as families
from .formats import KIND_NAMES, SCALARS, Module, change_shape, read_modules, scale, weight_change
from .kohya import (
    DTYPES,
    Factors,
    LoraResult,
    as_factors,
    check_options,
    check_output,
    low_rank,
    module_specs,
    network_metadata,
    output_name,
    rank_for,
    write_lora,
)
from .names import lora_layer_names

MAX_LORAS = 64


@dataclass
class _Input:
    """One LoRA file of the merge, open, with its modules read from the header."""

    path: Path
    ratio: float
    reader: CheckpointReader
    modules: list[Module]
    shapes: dict[str, tuple[int, ...]]
    families: frozenset[str]
    sign: str
    scales: dict[str, float] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)

    def part(self, module: Module, part: str) -> torch.Tensor:
        return self.reader[module.parts[part]].to(torch.float64)


@dataclass
class _Layer:
    """The modules of all inputs that patch one layer, under the output's name for it."""

    name: str
    shape: tuple[int, ...]
    members: list[tuple[_Input, Module]]

    @property
    def plain(self) -> bool:
        return all(_problem(module) is None for _, module in self.members)

    @property
    def total_rank(self) -> int:
        return sum(item.reader.spec(module.parts["down"]).shape[0] for item, module in self.members)


def merge_loras(
    loras: Sequence[tuple[str | Path, float]],
    output: str | Path,
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    dtype: str = "",
    device: str = "auto",
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> LoraResult:
    """Write one kohya LoRA holding ``loras`` ((path, ratio) pairs) summed: exactly without a
    ``rank``, else re-ranked by SVD (see the module docstring). ``dtype`` "" keeps the inputs'
    (float32 where they differ). Nothing is written when an option, input or output is refused."""
    if not loras:
        raise RequestError("loras: name at least one LoRA to merge")
    if len(loras) > MAX_LORAS:
        raise RequestError(f"loras: at most {MAX_LORAS} LoRAs in one merge, got {len(loras)}")
    check_options(rank, conv_rank, dtype or "fp32")
    if conv_rank is not None and rank is None:
        raise RequestError("--conv-rank: only with --rank (a merge without --rank keeps every rank, exactly)")
    pairs = [(Path(path), finite_number(ratio, f"LoRA {n} ({path}) ratio")) for n, (path, ratio) in enumerate(loras, 1)]
    output = Path(output)
    check_output(output, [path for path, _ in pairs], overwrite)
    compute = usable_device(default_device() if device in ("", "auto") else device)
    inputs: list[_Input] = []
    try:
        for path, ratio in pairs:
            inputs.append(_open(path, ratio))
        possible = _common_families(inputs)
        layers = _layers(inputs, _naming_family(possible))
        _check_kinds(layers, exact=rank is None)
        out_dtype = DTYPES[dtype] if dtype else _widest(inputs)
        ranks = [_rank(layer, rank, conv_rank) for layer in layers]
        specs = [
            spec
            for layer, r in zip(layers, ranks, strict=True)
            for spec in module_specs(layer.name, layer.shape, r, out_dtype)
        ]
        metadata = _metadata(inputs, possible, ranks, rank, conv_rank, output)
        factors = _factors(layers, ranks, compute)
        sha256 = write_lora(
            output, specs, metadata, factors, overwrite=overwrite, progress=progress, should_stop=should_stop
        )
        return LoraResult(output, sha256, len(layers), _notes(inputs, layers, ranks, rank))
    finally:
        for item in inputs:
            item.reader.close()


def _open(path: Path, ratio: float) -> _Input:
    """A LoRA file's modules, their change shapes and scales, and the families it may be for."""
    if not path.is_file():
        raise InputError(f"{path}: no such LoRA file")
    reader = open_checkpoint(path)
    try:
        found = read_modules(reader)
        shapes = {module.name: change_shape(reader, module) for module in found.modules}
        possible, sign = families.lora_families(
            found.modules, lambda m: shapes[m.name][1] if len(shapes[m.name]) > 1 else None, reader.metadata
        )
        item = _Input(path, ratio, reader, found.modules, shapes, possible, sign)
        for module in found.modules:
            item.scales[module.name] = scale(
                module, _number(reader, module), lambda part, m=module: _shape(reader, m, part)
            )
        item.ignored, item.embeddings = found.ignored, found.embeddings
        return item
    except BaseException:
        reader.close()
        raise


def _shape(reader: CheckpointReader, module: Module, part: str) -> tuple[int, ...]:
    return tuple(reader.spec(module.parts[part]).shape)


def _number(reader: CheckpointReader, module: Module):
    def number(part: str) -> float:
        key = module.parts[part]
        if reader.spec(key).numel != 1:
            raise InputError(
                f"{reader.path}: key {_shown(key)} has shape {list(reader.spec(key).shape)}; {part} must be a single number"
            )
        return float(reader[key].reshape(-1)[0].item())

    return number


def _common_families(inputs: list[_Input]) -> frozenset[str]:
    """The families every input may be for; IncompatibleModelsError naming two that disagree."""
    possible, first = families.ALL, None
    for item in inputs:
        if not item.sign:
            continue
        if first is not None and not possible & item.families:
            raise IncompatibleModelsError(
                f"{item.path.name} is a LoRA for {families.describe(item.families)} ({item.sign}), but "
                f"{first.path.name} is a LoRA for {families.describe(first.families)} ({first.sign}): LoRAs for "
                "different architectures are not merged"
            )
        possible &= item.families
        first = first or item
    return possible


def _naming_family(possible: frozenset[str]) -> str:
    """The family whose kohya spelling the output uses; unknown keeps the checkpoint's layer names."""
    if possible <= {arch.SD1, arch.SD2}:
        return arch.SD2 if possible == {arch.SD2} else arch.SD1
    if possible <= {arch.SDXL, arch.SDXL_REFINER}:
        return arch.SDXL
    if possible <= {arch.FLUX, arch.FLUX_SCHNELL}:
        return arch.FLUX
    return arch.UNKNOWN


def _layers(inputs: list[_Input], family: str) -> list[_Layer]:
    """The inputs' modules grouped by the layer they patch, in the order first seen."""
    layers: dict[str, _Layer] = {}
    for item in inputs:
        seen: dict[str, str] = {}
        for module in item.modules:
            candidates = lora_layer_names(module.name)
            layer = candidates[0] if candidates else module.name
            if layer in seen:
                raise InputError(
                    f"{item.path}: modules {_shown(seen[layer])} and {_shown(module.name)} patch the same layer"
                )
            seen[layer] = module.name
            shape = item.shapes[module.name]
            if layer not in layers:
                name = module.name if module.name.startswith("lora_") else output_name(module.name, family)
                layers[layer] = _Layer(name, shape, [(item, module)])
                continue
            group = layers[layer]
            common = _same_shape(group.shape, shape)
            if common is None:
                first, other = group.members[0]
                raise IncompatibleModelsError(
                    f"LoRA module {_shown(module.name)}: {item.path.name} changes its layer by {list(shape)}, but "
                    f"{first.path.name} ({_shown(other.name)}) by {list(group.shape)}: LoRAs for different models"
                )
            group.shape = common
            group.members.append((item, module))
    return list(layers.values())


def _same_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape of two changes to one layer: equal, or a linear's and a 1x1 conv's (the conv's)."""
    if a == b:
        return a
    if len(a) == 2 and b == (*a, 1, 1):
        return b
    if len(b) == 2 and a == (*b, 1, 1):
        return a
    return None


def _problem(module: Module) -> str | None:
    """Why the module's change cannot be concatenated exactly into a kohya LoRA; None if it can."""
    if module.kind != "lora":
        return f"a {KIND_NAMES[module.kind]} module"
    if "mid" in module.parts:
        return "a LoRA module with lora_mid (a Tucker core)"
    return None


def _check_kinds(layers: list[_Layer], *, exact: bool) -> None:
    """DoRA and bias changes are refused always; other kinds but plain LoRA when merging exactly."""
    for layer in layers:
        for item, module in layer.members:
            where = f"{item.path}: LoRA module {_shown(module.name)}"
            if module.has_dora:
                raise InputError(
                    f"{where} is DoRA (dora_scale): its change depends on the checkpoint's weights, which a merge "
                    "of LoRAs does not have; bake it into the checkpoint instead (lora bake)"
                )
            if "diff_b" in module.parts:
                raise InputError(f"{where} changes a bias (diff_b), which a kohya LoRA cannot hold; bake it instead")
            problem = _problem(module)
            if exact and problem:
                raise InputError(
                    f"{where} is {problem}, which cannot be concatenated exactly into a kohya LoRA; give --rank N "
                    "to re-rank the merged change by SVD"
                )


def _widest(inputs: list[_Input]) -> torch.dtype:
    """The inputs' float dtype where they share one (fp16, bf16 or fp32), else float32."""
    found = {
        item.reader.spec(key).dtype
        for item in inputs
        for module in item.modules
        for part, key in module.parts.items()
        if part not in SCALARS
    }
    return found.pop() if len(found) == 1 and next(iter(found)) in DTYPES.values() else torch.float32


def _rank(layer: _Layer, rank: int | None, conv_rank: int | None) -> int:
    """The output module's rank: the inputs' total (exact), or the rank asked for, capped at the
    layer's size and, for plain LoRAs, at their total rank (the change has no more)."""
    if rank is None:
        return layer.total_rank
    wanted = rank_for(layer.shape, rank, conv_rank)
    return min(wanted, layer.total_rank) if layer.plain else wanted


def _factors(layers: list[_Layer], ranks: list[int], device: torch.device) -> Iterator[Factors]:
    """Each output module's up and down, one layer at a time."""
    for layer, r in zip(layers, ranks, strict=True):
        if layer.plain:
            up, down = _concatenated(layer)
            if up.shape[1] > r:
                up, down = _truncated(up, down, r)
            yield Factors(layer.name, *as_factors(up, down, layer.shape))
        else:
            total = torch.zeros(layer.shape, dtype=torch.float64)
            for item, module in layer.members:
                change = weight_change(module, lambda part, i=item, m=module: i.part(m, part))
                total += change.reshape(layer.shape) * (item.ratio * item.scales[module.name])
            up, down = low_rank(total.to(device=device, dtype=torch.float32), r)
            yield Factors(layer.name, up, down)


def _concatenated(layer: _Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """up (out, R) with each input's columns times its ratio x scale, down (R, in x kernel): float64."""
    ups, downs = [], []
    for item, module in layer.members:
        up, down = item.part(module, "up"), item.part(module, "down")
        ups.append(up.reshape(up.shape[0], -1) * (item.ratio * item.scales[module.name]))
        downs.append(down.reshape(down.shape[0], -1))
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _truncated(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of up @ down without forming it: QR of both factors, then
    the SVD of the small product of their R factors (float64)."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return (q_up @ u[:, :rank]) * s[:rank], vh[:rank] @ q_down.T


def _metadata(
    inputs: list[_Input],
    possible: frozenset[str],
    ranks: list[int],
    rank: int | None,
    conv_rank: int | None,
    output: Path,
) -> dict[str, str]:
    """kohya's network fields (the largest module rank as the network's dim; each module's alpha is
    its rank), the base model version where known, and what was merged at which ratios."""
    family = next(iter(possible)) if len(possible) == 1 else arch.UNKNOWN
    metadata = network_metadata(family, max(ranks), conv_rank, output.stem)
    if "ss_base_model_version" not in metadata:  # the inputs' own word, where they agree
        for field_name in ("ss_base_model_version", "ss_v2"):
            values = {item.reader.metadata.get(field_name) for item in inputs}
            if len(values) == 1 and None not in values:
                metadata[field_name] = str(values.pop())[:100]
    metadata["merge_lab_lora_merge"] = json.dumps(
        {
            "loras": [{"name": item.path.name, "ratio": item.ratio} for item in inputs],
            "rank": rank,
            "conv_rank": conv_rank,
            "mode": "concatenated" if rank is None else "svd",
        }
    )
    return metadata


def _notes(inputs: list[_Input], layers: list[_Layer], ranks: list[int], rank: int | None) -> list[str]:
    notes = []
    for item in inputs:
        if item.ignored:
            notes.append(f"{item.path.name}: {len(item.ignored)} keys are no part of a LoRA module, left out")
        if item.embeddings:
            notes.append(f"{item.path.name}: bundled embeddings ({', '.join(item.embeddings[:3])}) are not merged")
    if rank is None:
        notes.append(f"ranks concatenated: {len(layers)} modules, of rank {min(ranks)} to {max(ranks)}")
    return notes
