"""A LoRA file read as a checkpoint of changes: for each key of the base checkpoint it patches, the
float64 change it makes there (up @ down * scale, a LoHa's, a LoKr's ...), in that key's shape.

So baking is an ordinary merge: the engine's per-key loop, prefetch, writer, hashing and recipe run
``add_delta`` over the checkpoint and these readers, keys no LoRA patches are copied from the
checkpoint as they are, and a change is computed only when its key is read (memory holds one).
Everything that can be told from the headers (the file's family, each module's layer and shapes)
is checked when the reader opens, before a byte is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from .. import arch
from ..channels import NORMAL_CHANNELS, UNET_INPUT_KEY, VARIANTS
from ..errors import IncompatibleModelsError, InputError
from ..io.formats import open_checkpoint
from ..io.readers import CheckpointReader, TensorSpec, _shown
from . import family as families
from .formats import KIND_NAMES, Module, change_shape, dora, read_modules, scale, weight_change
from .names import LayerIndex, Target


@dataclass(frozen=True)
class _Patch:
    """One module's change to one key: its weight change (or, ``bias``, its diff_b), in ``shape``;
    for a part of a fused layer (a q of a q/k/v, Flux's MLP in linear1) the (start, stop) ``rows`` of
    the key it lands in, and ``swap_halves`` where its halves trade places there (Flux's norm_out)."""

    module: Module
    shape: tuple[int, ...]
    bias: bool = False
    rows: tuple[int, int] | None = None
    swap_halves: bool = False


class LoraReader(CheckpointReader):
    """The changes a LoRA file makes to ``base`` (the checkpoint it is baked into), under the
    checkpoint's key names, as float64 tensors; ``spec`` gives each key the checkpoint's dtype, so
    the output keeps it. ``unmatched`` lists the modules that match no key of the checkpoint."""

    def __init__(self, path: str | Path, base: CheckpointReader):
        lora = open_checkpoint(path)
        try:
            self._open(lora, base)
        except BaseException:
            lora.close()
            raise

    def _open(self, lora: CheckpointReader, base: CheckpointReader) -> None:
        self.path, self._lora, self._base = lora.path, lora, base
        found = read_modules(lora)
        shapes = {module.name: change_shape(lora, module) for module in found.modules}
        base_family = arch.family_of(base.keys())
        self.families, sign = families.lora_families(
            found.modules, lambda m: shapes[m.name][1] if len(shapes[m.name]) > 1 else None, lora.metadata
        )
        self.family_name = families.describe(self.families) if sign else "a family its keys do not tell"
        self.family_text = f"{self.family_name} ({sign})" if sign else self.family_name
        if sign and base_family != arch.UNKNOWN and base_family not in self.families:
            raise IncompatibleModelsError(
                f"{lora.path.name} is a LoRA for {self.family_text}, but {base.path.name} is {_a(base_family)} "
                "checkpoint: a LoRA is baked only into the architecture it was trained for"
            )
        self.base_family = base_family
        self.ignored, self.embeddings = found.ignored, found.embeddings
        self.unmatched: list[str] = []
        self._patches: dict[str, list[_Patch]] = {}
        self._scales: dict[str, float] = {}
        bare = base_family in arch.TRANSFORMERS and not any(k.startswith("model.diffusion_model.") for k in base)
        index = LayerIndex(base.keys(), bare_transformer=bare)
        for module in found.modules:
            target = index.find(module.name)
            if target is None:
                self.unmatched.append(module.name)
                continue
            self._scales[module.name] = scale(module, self._number(module), lambda part, m=module: self._shape(m, part))
            self._add(module, target.weight_key, target, shapes[module.name], bias=False)
            if "diff_b" in module.parts:
                bias_shape = self._shape(module, "diff_b")
                if target.bias_key in base:
                    self._add(module, target.bias_key, target, bias_shape, bias=True)
                else:
                    self.unmatched.append(module.parts["diff_b"])
        if not self._patches:
            raise IncompatibleModelsError(
                f"{lora.path.name}: none of its {len(found.modules)} LoRA modules matches a layer of "
                f"{base.path.name} ({base_family}), e.g. {_shown(found.modules[0].name)}: a LoRA for another "
                "architecture, or with key names this bake does not know"
            )
        self.dora_keys = {key for key, patches in self._patches.items() if any(p.module.has_dora for p in patches)}
        self._specs = {key: TensorSpec(base.spec(key).dtype, self._presented(key)) for key in self._patches}
        signs = _sign_keys(base, list(self._specs))
        for key in signs:  # see _sign_keys: zero changes
            self._specs[key] = base.spec(key)
        # A change has no sampling of its own: it reports the checkpoint's, so the preflight sees them agree.
        field = arch.PREDICTION_FIELD
        self.metadata = {field: base.metadata[field]} if field in base.metadata else {}
        self.lora_metadata = dict(lora.metadata)
        self.kinds = _count(module.kind for module in found.modules if module.name not in self.unmatched)
        self.format_note = (
            f"a LoRA for {self.family_text}, {_kinds_text(self.kinds)}: read as float64 changes to the "
            f"{len(self._patches)} checkpoint keys it patches"
            + (f" (and {len(signs)} that tell the checkpoint's family, as no change)" if signs else "")
        )

    def _shape(self, module: Module, part: str) -> tuple[int, ...]:
        return tuple(self._lora.spec(module.parts[part]).shape)

    def _number(self, module: Module):
        def number(part: str) -> float:
            key = module.parts[part]
            if self._lora.spec(key).numel != 1:
                raise InputError(
                    f"{self.path}: key {_shown(key)} has shape {list(self._lora.spec(key).shape)}; "
                    f"{part} must be a single number"
                )
            return float(self._lora[key].reshape(-1)[0].item())

        return number

    def _add(self, module: Module, key: str, target: Target, shape: tuple[int, ...], *, bias: bool) -> None:
        """Record the module's change to ``key`` after checking it fits the checkpoint's tensor there."""
        spec = self._base.spec(key)
        if not spec.dtype.is_floating_point:
            raise IncompatibleModelsError(
                f"{self.path.name}: module {_shown(module.name)} patches {key}, which is {spec.dtype} in "
                f"{self._base.path.name}, not a float weight"
            )
        expected = spec.shape
        rows = target.rows(self._base.spec(target.weight_key).shape)
        if target.third is not None and spec.shape[0] % 3:
            raise IncompatibleModelsError(
                f"{self._base.path.name}: key {key} of shape {list(spec.shape)} is no q, k, v"
            )
        if (rows is not None and not 0 <= rows[0] < rows[1] <= spec.shape[0]) or (
            target.swap_halves and spec.shape[0] % 2
        ):
            raise IncompatibleModelsError(
                f"{self.path.name}: module {_shown(module.name)} is part of {key}, but {self._base.path.name} has "
                f"{list(spec.shape)} there, which has no such part: they are different architectures"
            )
        if rows is not None:
            expected = (rows[1] - rows[0], *spec.shape[1:])
        whole = rows is None and not target.swap_halves
        if prod(shape) != prod(expected) and not (whole and prod(shape) == prod(_four_channels(key, spec))):
            raise IncompatibleModelsError(
                f"{self.path.name} (a LoRA for {self.family_name}): module {_shown(module.name)} changes {key} by "
                f"{list(shape)}, but {self._base.path.name} ({self.base_family}) has {list(expected)} there: "
                "they are different architectures"
            )
        shape_there = expected if prod(shape) == prod(expected) else _four_channels(key, spec)
        if not bias and module.has_dora:
            self._check_dora(module, key, shape_there, variant=shape_there != expected)
        patches = self._patches.setdefault(key, [])
        for other in patches:
            if _overlap(other.rows, rows, spec.shape[0]):
                raise InputError(
                    f"{self.path}: modules {_shown(other.module.name)} and {_shown(module.name)} both patch {key}"
                    + (f" (rows {rows[0]}:{rows[1]})" if rows else "")
                )
        patches.append(_Patch(module, tuple(shape_there), bias, rows, target.swap_halves))

    def _check_dora(self, module: Module, key: str, target: tuple[int, ...], *, variant: bool) -> None:
        magnitude = self._shape(module, "dora_scale")
        columns = [1] * len(target)
        if len(target) > 1:
            columns[1] = target[1]
        try:
            fits = torch.broadcast_shapes(magnitude, tuple(columns)) == tuple(columns)
        except RuntimeError:
            fits = False
        if not fits or variant or len(target) < 2:
            raise IncompatibleModelsError(
                f"{self.path.name}: module {_shown(module.name)} has dora_scale of shape {list(magnitude)}, which "
                f"does not fit {key} ({list(target)})"
            )

    def _presented(self, key: str) -> tuple[int, ...]:
        """The change's shape at ``key``: the checkpoint's, or an inpainting (or pix2pix) UNet input's
        first 4 channels, whose extra channels the engine keeps from the checkpoint as merges do."""
        patches = self._patches[key]
        spec = self._base.spec(key)
        if any(p.rows is not None for p in patches):
            return tuple(spec.shape)
        return patches[0].shape

    def __getitem__(self, key: str) -> torch.Tensor:
        spec = self._specs[key]
        patches = self._patches.get(key, [])
        if len(patches) == 1 and patches[0].rows is None:
            return self._change(key, patches[0])
        total = torch.zeros(spec.shape, dtype=torch.float64)
        for patch in patches:
            start, stop = patch.rows or (0, spec.shape[0])
            total[start:stop] += self._change(key, patch)
        return total

    @staticmethod
    def add_changes(key: str, target: torch.Tensor, changes: list[tuple[LoraReader, float]]) -> None:
        """Add each LoRA's ``alpha`` x change at ``key`` into ``target`` (the key's shape as presented,
        in the work dtype: float64, float32 on MPS) in place. Plain LoRA modules go in together by
        ``plain_factors`` (no change-sized tensor is made, the rows are passed over once); other
        modules by their change, as ``__getitem__`` gives it."""
        for reader, alpha in changes:
            for patch in reader._patches.get(key, []) if alpha else []:
                if not _plain(patch):
                    start, stop = patch.rows or (0, reader._specs[key].shape[0])
                    target[start:stop].add_(reader._change(key, patch).to(target.device), alpha=alpha)
        LoraReader.add_factors(target, LoraReader.plain_factors(key, changes, target.device, target.dtype))

    @staticmethod
    def plain_factors(
        key: str, changes: list[tuple[LoraReader, float]], device: torch.device, dtype: torch.dtype
    ) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """The plain LoRA modules at ``key`` as one product per range of rows: ``(start, stop)`` ->
        (``up``, ``down``), their factors side by side (each ``up`` scaled by its ``alpha`` x scale),
        so that ``up @ down`` is those rows' whole change. Made once per key: a bake cut into row
        pieces multiplies windows of them (``add_factors``)."""
        factors: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for reader, alpha in changes:
            for patch in reader._patches.get(key, []) if alpha else []:
                if _plain(patch):
                    module = patch.module
                    up = reader._lora[module.parts["up"]].flatten(1).to(device, dtype)
                    down = reader._lora[module.parts["down"]].to(device, dtype).flatten(1)
                    rows = patch.rows or (0, reader._specs[key].shape[0])
                    factors.setdefault(rows, []).append((up * (alpha * reader._scales[module.name]), down))
        return {
            rows: (torch.cat([up for up, _ in pairs], dim=1), torch.cat([down for _, down in pairs]))
            for rows, pairs in factors.items()
        }

    @staticmethod
    def add_factors(
        target: torch.Tensor,
        factors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]],
        window: tuple[int, int] | None = None,
    ) -> None:
        """Add ``up @ down`` of ``plain_factors`` into ``target`` in place, by one matrix
        product per range of rows; with ``window``, ``target`` holds only those (start, stop) rows."""
        first = window[0] if window else 0
        for (start, stop), (up, down) in factors.items():
            if window:
                start, stop, up = _in_window(start, stop, up, window)
            if start < stop:
                target[start - first : stop - first].view(stop - start, down.shape[1]).addmm_(up, down)

    @staticmethod
    def splits_by_rows(key: str, changes: list[tuple[LoraReader, float]]) -> bool:
        """Whether ``add_changes`` at ``key`` costs no more cut into windows of rows: every module
        there is a plain LoRA (any other's change would be computed whole for each window)."""
        return all(_plain(patch) for reader, _ in changes for patch in reader._patches.get(key, []))

    def _change(self, key: str, patch: _Patch) -> torch.Tensor:
        module = patch.module

        def get(part: str) -> torch.Tensor:
            return self._lora[module.parts[part]].to(torch.float64)

        if patch.bias:  # the webui adds diff_b unscaled
            return _swapped(get("diff_b").reshape(patch.shape), patch.swap_halves)
        change = _swapped(
            weight_change(module, get).reshape(patch.shape) * self._scales[module.name], patch.swap_halves
        )
        if module.has_dora:
            weight = self._base[key]
            if patch.rows is not None:
                weight = weight[patch.rows[0] : patch.rows[1]]
            change = dora(change, weight.to(torch.float64), get("dora_scale"))
        return change

    def patches_of(self, key: str) -> list[str]:
        """The modules that patch ``key`` (empty for a key read as a zero change)."""
        return [patch.module.name for patch in self._patches.get(key, [])]

    def prefetch(self, key: str) -> None:
        for patch in self._patches.get(key, []):
            for stored in patch.module.parts.values():
                self._lora.prefetch(stored)

    @property
    def nbytes(self) -> int:
        return self._lora.nbytes

    def close(self) -> None:
        self._lora.close()  # the base checkpoint is the plan's to close


def _in_window(start: int, stop: int, up: torch.Tensor, window: tuple[int, int]):
    """The part of rows ``start:stop`` (and of their ``up``) inside ``window``."""
    inside = max(start, window[0]), min(stop, window[1])
    return *inside, up[inside[0] - start : inside[1] - start]


def _plain(patch: _Patch) -> bool:
    """A plain LoRA module's weight change (up @ down, scaled), in place, halves as they are."""
    module = patch.module
    plain = module.kind == "lora" and "mid" not in module.parts and not module.has_dora
    return plain and not patch.bias and not patch.swap_halves


def _overlap(a: tuple[int, int] | None, b: tuple[int, int] | None, height: int) -> bool:
    """Whether two patches' rows (None: all ``height`` of them) meet."""
    a, b = a or (0, height), b or (0, height)
    return a[0] < b[1] and b[0] < a[1]


def _swapped(change: torch.Tensor, swap: bool) -> torch.Tensor:
    """The change with its halves of rows traded, where ``swap``: diffusers' scale, shift -> BFL's shift, scale."""
    if not swap:
        return change
    first, second = change.chunk(2)
    return torch.cat([second, first])


def _four_channels(key: str, spec: TensorSpec) -> tuple[int, ...]:
    """An inpainting or pix2pix UNet input's shape with the normal 4 input channels; else ()."""
    if key == UNET_INPUT_KEY and len(spec.shape) == 4 and spec.shape[1] in VARIANTS:
        return (spec.shape[0], NORMAL_CHANNELS, *spec.shape[2:])
    return ()


# Keys whose names tell a checkpoint's family (arch.family_of): one of each kind the checkpoint has.
_SIGNS = (
    "double_blocks.",
    "single_transformer_blocks.",
    "guidance_in.",
    "guidance_embedder.",
    "conditioner.embedders.1.model.",
    "conditioner.embedders.0.model.",
    "cond_stage_model.model.",
    "cond_stage_model.transformer.text_model.",
    ".x_block.attn2.",
)
_JOINT_BLOCK = re.compile(r"^(?:model\.diffusion_model\.)?joint_blocks\.(\d+)\.")


def _sign_keys(base: CheckpointReader, patched: list[str]) -> list[str]:
    """Keys of ``base`` that make the patched keys tell the checkpoint's family, read as zero changes.

    The preflight names each input's family from its keys and refuses inputs of two families; the
    keys a LoRA patches alone may tell another (a Flux dev LoRA that leaves guidance_in alone reads
    as Flux schnell) or none. A zero change leaves the checkpoint's value as it is (add_delta).
    """
    family = arch.family_of(base.keys())
    if family == arch.UNKNOWN or arch.family_of(patched) == family:
        return []
    smallest: dict[object, str] = {}
    taken = set(patched)
    for key in base.keys():
        spec = base.spec(key)
        if key in taken or not spec.dtype.is_floating_point:
            continue
        groups = [sign for sign in _SIGNS if sign in key]
        if match := _JOINT_BLOCK.match(key):
            groups.append(("joint", match[1]))
        for group in groups:
            if group not in smallest or spec.numel < base.spec(smallest[group]).numel:
                smallest[group] = key
    chosen = list(dict.fromkeys(smallest.values()))
    return chosen if arch.family_of([*patched, *chosen]) == family else []


def _count(kinds) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _kinds_text(kinds: dict[str, int]) -> str:
    total = sum(kinds.values())
    detail = ", ".join(f"{KIND_NAMES[kind]} {count}" for kind, count in kinds.items())
    return f"{total} module{'s' if total != 1 else ''} ({detail})"


def _a(family: str) -> str:
    return f"an {family}" if family.startswith(("SD", "unknown")) else f"a {family}"
