"""LoRA file formats: the modules a file holds, and the change each makes to its layer's weight.

A module is the group of keys that patches one layer: ``lora_unet_..._to_q.lora_down.weight``,
``.lora_up.weight`` and ``.alpha`` (kohya), ``unet....to_q.lora_A.weight`` and ``.lora_B.weight``
(diffusers / PEFT). The kinds and their maths follow the webui's built-in Lora extension (v1.10.1):

- ``lora``: kohya LoRA and LoCon, diffusers / PEFT: up @ down, a conv's down flattened and the product
  given the layer's kernel; with ``lora_mid`` (a CP-decomposed conv) mid contracted with up and down.
- ``loha``: LyCORIS LoHa: (w1_a @ w1_b) * (w2_a @ w2_b), each product through ``hada_t1`` / ``hada_t2``
  (CP cores) when the file has them.
- ``lokr``: LyCORIS LoKr: kron(w1, w2), each factor whole or as _a @ _b, w2 through ``lokr_t2`` if given.
- ``full``: a stored difference, ``diff`` for the weight and ``diff_b`` for the bias.

The weight's change is scaled by alpha / rank (by ``scale`` where the file stores one; by 1 when it
has no alpha, or the kind no rank), then, where the module has ``dora_scale``, renormalised as DoRA
does. Everything is computed in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..io.readers import CheckpointReader, _shown

# Each key's last part -> the part it is in a module (kohya's, PEFT's and diffusers' spellings).
PARTS = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    **{name: name for name in ("alpha", "scale", "dora_scale", "diff", "diff_b")},
    **{f"hada_{name}": f"hada_{name}" for name in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{name}": f"lokr_{name}" for name in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
# Parts of module kinds the webui knows and this bake does not: a file with them is refused, since
# baking the rest would not give what the webui shows.
UNSUPPORTED = {
    "on_input": "IA3",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "b2.weight": "GLoRA",
    "w_norm": "norm",
    "b_norm": "norm",
    "lora_magnitude_vector": "PEFT DoRA",
}
_SUFFIXES = sorted([*PARTS, *UNSUPPORTED], key=len, reverse=True)  # longest first: lora_A.weight before weight
SCALARS = {"alpha", "scale", "dora_scale"}  # parts that only scale a module's weight parts
EMBEDDING_PREFIX = "bundle_emb."  # textual-inversion embeddings some LoRA files carry
KIND_NAMES = {"lora": "LoRA/LoCon", "loha": "LoHa", "lokr": "LoKr", "full": "full diff"}
SUPPORTED = "kohya LoRA/LoCon, diffusers/PEFT lora_A/lora_B, LyCORIS LoHa and LoKr, full diff"
_META = torch.device("meta")


@dataclass
class Module:
    """The keys of one LoRA module: ``parts`` maps a part (``down``, ``hada_w1_a`` ...) to its key."""

    name: str
    parts: dict[str, str] = field(default_factory=dict)
    kind: str = ""

    @property
    def has_dora(self) -> bool:
        return "dora_scale" in self.parts


@dataclass
class LoraFile:
    """What a LoRA file holds: its modules, the keys that are no part of one, bundled embeddings."""

    modules: list[Module]
    ignored: list[str]
    embeddings: list[str]


def split_key(key: str) -> tuple[str, str] | None:
    """``(module name, last part)`` of a LoRA key, or None for a key that is no LoRA part."""
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[: -len(suffix) - 1], suffix
    return None


def read_modules(reader: CheckpointReader) -> LoraFile:
    """The file's modules with their kinds; InputError naming the file for a file that is not a
    LoRA, a module whose parts are incomplete, or a kind this bake does not do."""
    modules: dict[str, Module] = {}
    ignored, embeddings, unsupported = [], set(), []
    for key in reader.keys():
        if key.startswith(EMBEDDING_PREFIX):
            embeddings.add(key[len(EMBEDDING_PREFIX) :].split(".")[0])
            continue
        split = split_key(key)
        if split is None:
            ignored.append(key)
            continue
        name, suffix = split
        if suffix in UNSUPPORTED:
            unsupported.append((key, UNSUPPORTED[suffix]))
            continue
        module = modules.setdefault(name, Module(name))
        part = PARTS[suffix]
        if part in module.parts:
            raise InputError(
                f"{reader.path}: keys {_shown(module.parts[part])} and {_shown(key)} are the same part of one LoRA module"
            )
        module.parts[part] = key
    found = [module for module in modules.values() if _set_kind(module)]
    if not unsupported and not any(module.parts.keys() - SCALARS for module in modules.values()):
        # No weight part anywhere: a checkpoint's norm ``.scale`` keys alone do not make a LoRA.
        stray = [key for module in modules.values() for key in module.parts.values()]
        example = f"; e.g. {_shown((ignored or stray)[0])}" if ignored or stray else ""
        raise InputError(f"{reader.path}: not a LoRA file: no key is part of a LoRA module ({SUPPORTED}){example}")
    if unsupported:
        key, kind = unsupported[0]
        raise InputError(
            f"{reader.path}: key {_shown(key)} is part of a {kind} module, which is not baked ({SUPPORTED})"
        )
    for module in modules.values():
        if not module.kind:
            raise InputError(
                f"{reader.path}: LoRA module {_shown(module.name)} is incomplete: it has only "
                f"{', '.join(sorted(module.parts))} ({_missing(module.parts)})"
            )
    return LoraFile(found, ignored, sorted(embeddings))


def _set_kind(module: Module) -> bool:
    """Set the module's kind from its parts, in the webui's order of trying them; False if none fits."""
    parts = module.parts
    if {"up", "down"} <= parts.keys():
        module.kind = "lora"
    elif {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts.keys():
        module.kind = "loha"
    elif _lokr_factor(parts, "1") and _lokr_factor(parts, "2"):
        module.kind = "lokr"
    elif "diff" in parts:
        module.kind = "full"
    return bool(module.kind)


def _lokr_factor(parts: dict, n: str) -> bool:
    return f"lokr_w{n}" in parts or {f"lokr_w{n}_a", f"lokr_w{n}_b"} <= parts.keys()


def _missing(parts: dict) -> str:
    """What an incomplete module lacks, for its error."""
    if parts.keys() & {"up", "down"}:
        return "a LoRA needs both lora_down and lora_up (or lora_A and lora_B)"
    if any(part.startswith("hada_") for part in parts):
        return "a LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b"
    if any(part.startswith("lokr_") for part in parts):
        return "a LoKr needs lokr_w1 (or lokr_w1_a and _b) and lokr_w2 (or lokr_w2_a and _b)"
    return "no weight part: lora_down/lora_up, lora_A/lora_B, hada_*, lokr_* or diff"


Get = Callable[[str], torch.Tensor]


def weight_change(module: Module, get: Get) -> torch.Tensor:
    """The module's change to its layer's weight before scaling, as the webui rebuilds it;
    ``get(part)`` gives a part as a float64 tensor (on the meta device, for the shape alone)."""
    kind = module.kind
    if kind == "lora":
        up, down = get("up"), get("down")
        if "mid" in module.parts:
            return torch.einsum("nmkl,in,mj->ijkl", get("mid"), _rows(up), _rows(down))
        return (_rows(up) @ _rows(down)).reshape(up.shape[0], down.shape[1], *down.shape[2:])
    if kind == "loha":
        return _loha(module, get)
    if kind == "lokr":
        return _lokr(module, get)
    return get("diff")


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """A factor as a matrix: its first dimension by the rest."""
    return tensor.reshape(tensor.shape[0], -1)


def _cp(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A CP (Tucker) core with its two factors: core[i, j, k, l] * wa[i, r] * wb[j, s] -> [r, s, k, l]."""
    return torch.einsum("ijkl,ir,js->rskl", core, wa, wb)


def _loha(module: Module, get: Get) -> torch.Tensor:
    w1a, w1b, w2a, w2b = (get(f"hada_{name}") for name in ("w1_a", "w1_b", "w2_a", "w2_b"))
    if "hada_t1" in module.parts:
        t1 = get("hada_t1")
        shape = [w1a.shape[1], w1b.shape[1], *t1.shape[2:]]
        first = _cp(t1, w1a, w1b)
    else:
        shape = [w1a.shape[0], w1b.shape[1], *w1b.shape[2:]]
        first = (_rows(w1a) @ _rows(w1b)).reshape(shape)
    second = _cp(get("hada_t2"), w2a, w2b) if "hada_t2" in module.parts else (_rows(w2a) @ _rows(w2b)).reshape(shape)
    return first * second


def _lokr(module: Module, get: Get) -> torch.Tensor:
    parts = module.parts
    w1 = get("lokr_w1") if "lokr_w1" in parts else get("lokr_w1_a") @ get("lokr_w1_b")
    if "lokr_w2" in parts:
        w2 = get("lokr_w2")
    elif "lokr_t2" in parts:
        w2 = _cp(get("lokr_t2"), get("lokr_w2_a"), get("lokr_w2_b"))
    else:
        w2 = get("lokr_w2_a") @ get("lokr_w2_b")
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1.contiguous(), w2.contiguous())


def rank(module: Module, shape_of: Callable[[str], tuple[int, ...]]) -> int | None:
    """The rank alpha is divided by, as the webui takes it; None for a kind without one."""
    parts = module.parts
    if module.kind == "lora":
        return shape_of("down")[0]
    if module.kind == "loha":
        return shape_of("hada_w1_b")[0]
    if module.kind == "lokr":
        for part in ("lokr_w2_b", "lokr_w1_b"):  # the webui's: w2_b's rank wins over w1_b's
            if part in parts:
                return shape_of(part)[0]
    return None


def scale(module: Module, number: Callable[[str], float], shape_of: Callable[[str], tuple[int, ...]]) -> float:
    """``scale`` where stored, else alpha / rank, else 1 (the webui's calc_scale)."""
    if "scale" in module.parts:
        return number("scale")
    dim = rank(module, shape_of)
    if "alpha" in module.parts and dim:
        return number("alpha") / dim
    return 1.0


def dora(change: torch.Tensor, weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: the changed weight renormalised to ``magnitude`` per input column (the norm taken over
    every dimension but the second, as the webui and LyCORIS do), returned as a change to ``weight``."""
    merged = weight + change
    columns = merged.shape[1]
    norm = merged.transpose(0, 1).reshape(columns, -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(columns, *[1] * (merged.dim() - 1)).transpose(0, 1)
    return merged * (magnitude / norm) - weight


def meta_part(reader: CheckpointReader, module: Module) -> Get:
    """``get`` for ``weight_change`` that gives each part's shape only (no data is read)."""
    return lambda part: torch.empty(reader.spec(module.parts[part]).shape, dtype=torch.float64, device=_META)


def change_shape(reader: CheckpointReader, module: Module) -> tuple[int, ...]:
    """The shape of the module's weight change, from the headers; InputError when its parts do not fit."""
    if module.kind == "lora" and "mid" not in module.parts:  # the usual module, without meta tensors' cost
        up, down = (tuple(reader.spec(module.parts[part]).shape) for part in ("up", "down"))
        if len(up) >= 2 and len(down) >= 2 and up[1] == down[0] and all(size == 1 for size in up[2:]):
            return (up[0], down[1], *down[2:])
    try:
        return tuple(weight_change(module, meta_part(reader, module)).shape)
    except (RuntimeError, IndexError, ValueError):
        shapes = ", ".join(f"{part} {list(reader.spec(key).shape)}" for part, key in sorted(module.parts.items()))
        raise InputError(
            f"{reader.path}: LoRA module {_shown(module.name)} ({KIND_NAMES[module.kind]}): its parts do not fit "
            f"together ({shapes})"
        ) from None
