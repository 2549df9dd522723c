"""Extracting a LoRA from a base and a tuned checkpoint: kohya's ``extract_lora_from_models``, streamed.

For each layer kohya's LoRA has (``kohya.layer_modules``) the tuned weight minus the base's, in
float32 on the merge device, is cut to rank r by SVD (S folded into up), both factors clamped at a
quantile of their values, and written as ``lora_down`` / ``lora_up`` / ``alpha`` = r (a scale of 1).
Memory holds one layer: read the key from each input, diff, SVD, write, drop.

The text encoder follows kohya's rule: it is extracted only when one of its weights differs from the
base's by more than ``min_diff``; otherwise the LoRA changes the UNet only, and a note says so. UNet
modules are always written, however small their change: leaving some out would mean reading the
whole UNet twice, since the file's header (every key) is written before the first tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .. import arch
from ..engine import ProgressFn, StopFn, usable_device
from ..errors import IncompatibleModelsError, RequestError
from ..hosts import default_device, hash_file
from ..io.formats import open_checkpoint
from ..io.readers import CheckpointReader
from .kohya import (
    DTYPES,
    FAMILIES,
    Factors,
    LayerModule,
    LoraResult,
    check_options,
    check_output,
    layer_modules,
    low_rank,
    module_specs,
    network_metadata,
    rank_for,
    write_lora,
)


def extract_lora(
    base: str | Path,
    tuned: str | Path,
    output: str | Path,
    *,
    rank: int,
    conv_rank: int | None = None,
    clamp_quantile: float = 0.99,
    min_diff: float = 0.01,
    text_encoder: bool = True,
    dtype: str = "fp16",
    device: str = "auto",
    overwrite: bool = False,
    hash_base: Callable[[Path], str] = hash_file,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> LoraResult:
    """Write the LoRA that takes ``base`` towards ``tuned`` (kohya's format and maths, see the module
    docstring); 3x3 convs only with a ``conv_rank``. ``hash_base`` gives the base's sha256 for the
    metadata (a host's cached hash saves reading a multi-GB file again). Nothing is written when an option, input or output is refused."""
    check_options(rank, conv_rank, dtype)
    if rank is None:
        raise RequestError("--rank: give the rank of the LoRA's linear layers")
    if not (isinstance(clamp_quantile, (int, float)) and 0 < clamp_quantile <= 1):
        raise RequestError(f"--clamp-quantile: a number in (0, 1] (1 clamps nothing), got {clamp_quantile!r}")
    if not (isinstance(min_diff, (int, float)) and math.isfinite(min_diff) and min_diff >= 0):
        raise RequestError(f"--min-diff: a number of at least 0, got {min_diff!r}")
    output, base, tuned = Path(output), Path(base), Path(tuned)
    check_output(output, [base, tuned], overwrite)
    compute = usable_device(default_device() if device in ("", "auto") else device)
    with open_checkpoint(base) as base_reader, open_checkpoint(tuned) as tuned_reader:
        family = _family(base_reader, tuned_reader)
        modules = layer_modules(
            base_reader.keys(),
            lambda key: base_reader.spec(key).shape,
            family,
            conv=conv_rank is not None,
            text_encoder=text_encoder,
        )
        _check_tuned(modules, base_reader, tuned_reader)
        notes: list[str] = []
        if any(module.text_encoder for module in modules):
            modules = _text_encoder_rule(modules, base_reader, tuned_reader, min_diff, compute, notes)
        if not modules:
            raise IncompatibleModelsError(f"{base.name}: no layer to extract (the text encoder is left out)")
        ranks = [rank_for(module.shape, rank, conv_rank) for module in modules]
        notes += _capped(modules, ranks, rank, conv_rank)
        out_dtype = DTYPES[dtype]
        specs = [
            spec
            for module, r in zip(modules, ranks, strict=True)
            for spec in module_specs(module.name, module.shape, r, out_dtype)
        ]
        metadata = network_metadata(family, rank, conv_rank, output.stem)
        metadata.update(
            {
                "ss_sd_model_name": base.name,
                "ss_sd_model_hash": legacy_hash(base),
                "ss_new_sd_model_hash": hash_base(base),
                "merge_lab_lora_extract": json.dumps(
                    {
                        "base": base.name,
                        "tuned": tuned.name,
                        "rank": rank,
                        "conv_rank": conv_rank,
                        "clamp_quantile": clamp_quantile,
                        "min_diff": min_diff,
                        "text_encoder": any(module.text_encoder for module in modules),
                    }
                ),
            }
        )
        factors = _factors(modules, ranks, base_reader, tuned_reader, clamp_quantile, compute)
        sha256 = write_lora(
            output, specs, metadata, factors, overwrite=overwrite, progress=progress, should_stop=should_stop
        )
    return LoraResult(output, sha256, len(modules), notes)


def _family(base: CheckpointReader, tuned: CheckpointReader) -> str:
    """The family both checkpoints are; IncompatibleModelsError naming them otherwise."""
    family = arch.family_of(base.keys())
    if family not in FAMILIES:
        raise IncompatibleModelsError(
            f"{base.path.name}: is {_a(family)} checkpoint; LoRAs are extracted from SD1, SD2 and SDXL checkpoints"
        )
    other = arch.family_of(tuned.keys())
    if other != family:
        raise IncompatibleModelsError(
            f"{base.path.name} is {_a(family)} checkpoint but {tuned.path.name} is {_a(other)} one: a LoRA is "
            "extracted from two checkpoints of one architecture"
        )
    return family


def _check_tuned(modules: list[LayerModule], base: CheckpointReader, tuned: CheckpointReader) -> None:
    """Every extracted key is in the tuned checkpoint too, with the base's shape."""
    for key in dict.fromkeys(module.key for module in modules):
        if key not in tuned:
            raise IncompatibleModelsError(f"{tuned.path.name}: has no key {key}, which {base.path.name} has")
        ours, theirs = base.spec(key), tuned.spec(key)
        if ours.shape != theirs.shape:
            raise IncompatibleModelsError(
                f"{key}: {base.path.name} has {list(ours.shape)} but {tuned.path.name} has {list(theirs.shape)}"
            )
        if not (ours.dtype.is_floating_point and theirs.dtype.is_floating_point):
            raise IncompatibleModelsError(f"{key}: not a float weight in {base.path.name} or {tuned.path.name}")


def _text_encoder_rule(
    modules: list[LayerModule],
    base: CheckpointReader,
    tuned: CheckpointReader,
    min_diff: float,
    device: torch.device,
    notes: list[str],
) -> list[LayerModule]:
    """kohya's rule: the text encoder's modules stay when one of its weights differs by more than
    ``min_diff`` (reading stops at the first that does); else they go, with a note."""
    largest = 0.0
    for key in dict.fromkeys(module.key for module in modules if module.text_encoder):
        difference = (_float(tuned[key], device) - _float(base[key], device)).abs().max().item()
        largest = max(largest, difference)
        if difference > min_diff:
            return modules
    notes.append(
        f"text encoder: its largest difference from the base is {largest:.3g}, not above --min-diff {min_diff:g}: "
        "left out (kohya's rule); the LoRA changes the UNet only"
    )
    return [module for module in modules if not module.text_encoder]


def _capped(modules: list[LayerModule], ranks: list[int], rank: int, conv_rank: int | None) -> list[str]:
    """A note on modules whose layer is too small for the rank asked for."""
    capped = [
        (module, r)
        for module, r in zip(modules, ranks, strict=True)
        if r < (conv_rank if conv_rank is not None and module.conv3x3 else rank)
    ]
    if not capped:
        return []
    module, r = capped[0]
    return [
        f"{len(capped)} module{'s' if len(capped) != 1 else ''} have a smaller rank than asked, the most their layer "
        f"holds (min(out, in x kernel)), e.g. {module.name}: {r}"
    ]


def _factors(
    modules: list[LayerModule],
    ranks: list[int],
    base: CheckpointReader,
    tuned: CheckpointReader,
    clamp_quantile: float,
    device: torch.device,
) -> Iterator[Factors]:
    """Each module's up and down, one at a time (the writer drops them once written)."""
    for module, r in zip(modules, ranks, strict=True):
        before, after = base[module.key], tuned[module.key]
        if module.third is not None:
            rows = slice(module.third * module.shape[0], (module.third + 1) * module.shape[0])
            before, after = before[rows], after[rows]
        change = _float(after, device) - _float(before, device)
        up, down = low_rank(change.reshape(module.shape), r, clamp_quantile)
        yield Factors(module.name, up, down)


def _float(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device=device, dtype=torch.float32)


def legacy_hash(path: Path) -> str:
    """kohya's ``model_hash`` (the webui's old short hash): sha256 of 64 KiB at 1 MiB, 8 hex digits."""
    with open(path, "rb") as file:
        file.seek(0x100000)
        return hashlib.sha256(file.read(0x10000)).hexdigest()[:8]


def _a(family: str) -> str:
    return f"an {family}" if family.startswith(("SD", "unknown")) else f"a {family}"
