"""What the tab and the API do with LoRAs, free of gradio and FastAPI: bake, extract and merge
from named fields, each as one host job; LoRA names resolve in the host's LoRA folder only, and
extracted or merged LoRAs are written there and shown in the host's LoRA list at once."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import arch
from .errors import MergeError, RequestError, shown
from .hosts import AppHost, Checkpoint, resolve_lora
from .io.formats import open_checkpoint
from .lora.bake import MAX_LORAS, LoraRef, bake_request
from .lora.kohya import DTYPES
from .names import output_file_name
from .request import DEVICES, MergeRequest

# Work per request is bounded (DESIGN 3b): a rank past the widest layer of any model only costs time.
MAX_RANK = 1024
# The bake's fields with their defaults: the checkpoint and its LoRAs, the merge's output fields
# (passed on to bake_request), the device, and whether to load the result.
BAKE_DEFAULTS = {
    "checkpoint": "",
    "loras": [],
    "custom_name": "",
    "checkpoint_format": "safetensors",
    "dtype": "",
    "save_metadata": True,
    "add_merge_recipe": True,
    "overwrite": False,
    "device": "auto",
    "load": False,
}
BAKE_REQUEST_OPTIONS = tuple(name for name in BAKE_DEFAULTS if name not in ("checkpoint", "loras", "load"))
EXTRACT_DEFAULTS = {
    "base": "",
    "tuned": "",
    "rank": 32,
    "conv_rank": None,
    "clamp_quantile": 0.99,
    "min_diff": 0.01,
    "text_encoder": True,
    "dtype": "fp16",
    "name": "",
    "overwrite": False,
    "device": "auto",
}
MERGE_DEFAULTS = {
    "loras": [],
    "rank": None,
    "conv_rank": None,
    "dtype": "",
    "name": "",
    "overwrite": False,
    "device": "auto",
}


@dataclass(frozen=True)
class LoraOutcome:
    """A LoRA file written into the host's LoRA folder, as the tab and the API report it."""

    name: str
    path: Path
    sha256: str
    modules: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def message(self) -> str:
        lines = [f"Saved LoRA: {self.name} ({self.modules} modules)", f"{self.path}"]
        return "\n".join([*lines, f"sha256 {self.sha256}, {self.seconds:.1f} s", *self.notes])


def lora_refs(items: Any) -> list[LoraRef]:
    """The bake's LoRAs from a list of ``{"name", "ratio", "blocks"}`` (or ``"name:ratio"`` text)."""
    if not isinstance(items, (list, tuple)) or not items:
        raise RequestError("loras: a list of LoRAs, e.g. [{'name': 'style.safetensors', 'ratio': 0.8}]")
    if len(items) > MAX_LORAS:
        raise RequestError(f"loras: at most {MAX_LORAS} LoRAs in one bake, got {len(items)}")
    return [_lora_ref(item, f"loras[{index}]") for index, item in enumerate(items)]


def _lora_ref(item: Any, where: str) -> LoraRef:
    if isinstance(item, str):
        name, colon, ratio = item.rpartition(":")
        item = {"name": name, "ratio": ratio} if colon and name else {"name": item}
    if not isinstance(item, Mapping):
        raise RequestError(f"{where}: expected {{'name': ..., 'ratio': ...}}, got {shown(item)}")
    unknown = sorted(str(key)[:40] for key in item if key not in ("name", "ratio", "blocks"))
    if unknown:
        raise RequestError(f"{where}.{unknown[0]}: unknown field (a LoRA has name, ratio and blocks)")
    name, blocks = item.get("name"), item.get("blocks") or ""
    if not isinstance(name, str) or not name.strip():
        raise RequestError(f"{where}.name: pick a LoRA")
    if not isinstance(blocks, str):
        raise RequestError(f"{where}.blocks: expected block text like 'BASE=1,IN*=0', got {shown(blocks)}")
    return LoraRef(name.strip(), number(item.get("ratio", 1.0), f"{where}.ratio"), blocks)


def bake_request_from_fields(host: AppHost, fields: Mapping[str, Any]) -> tuple[MergeRequest, bool]:
    """The bake's MergeRequest (a recipe of add_delta nodes) and the ``load`` wish; unknown fields refused."""
    known = (*BAKE_DEFAULTS, "id_task")
    unknown = [name for name in fields if name not in known]
    if unknown:
        raise RequestError(f"{unknown[0]}: unknown field (expected some of {', '.join(known)})")
    checkpoint = fields.get("checkpoint")
    if not isinstance(checkpoint, str) or not checkpoint.strip():
        raise RequestError("checkpoint: pick the checkpoint to bake the LoRAs into")
    refs = lora_refs(fields.get("loras"))
    family = arch.UNKNOWN
    if any(ref.blocks.strip() for ref in refs):  # block weights are read in the checkpoint's family
        with open_checkpoint(host.resolve(checkpoint).path) as reader:
            family = arch.family_of(reader.keys())
    options = {name: fields[name] for name in BAKE_REQUEST_OPTIONS if fields.get(name) is not None}
    return bake_request(checkpoint, refs, family=family, **options), bool(fields.get("load", False))


def run_extract(host: AppHost, fields: Mapping[str, Any], *, task_id: str = "", owner: str = "") -> LoraOutcome:
    """Extract a LoRA from two of the host's checkpoints into its LoRA folder, as one host job."""
    from .lora import extract_lora

    values = _fields(fields, EXTRACT_DEFAULTS)
    base, tuned = (_checkpoint(host, values[name], name) for name in ("base", "tuned"))
    rank, conv_rank = _rank(values["rank"], "rank"), _rank(values["conv_rank"], "conv_rank")
    if rank is None:
        raise RequestError("rank: give the rank of the LoRA's linear layers")
    quantile = number(values["clamp_quantile"], "clamp_quantile")
    if not 0 < quantile <= 1:
        raise RequestError(f"clamp_quantile: a number in (0, 1] (1 clamps nothing), got {quantile!r}")
    min_diff = number(values["min_diff"], "min_diff")
    if min_diff < 0:
        raise RequestError(f"min_diff: a number of at least 0, got {min_diff!r}")
    dtype = _dtype(values["dtype"], allow_keep=False)
    output = _output(host, values["name"] or f"{Path(tuned.name).stem}-lora-r{rank}")
    started = time.perf_counter()
    with host.job(task_id, owner=owner):
        result = extract_lora(
            base.path,
            tuned.path,
            output,
            rank=rank,
            conv_rank=conv_rank,
            clamp_quantile=quantile,
            min_diff=min_diff,
            text_encoder=bool(values["text_encoder"]),
            dtype=dtype,
            device=_device(values["device"]),
            overwrite=bool(values["overwrite"]),
            hash_base=lambda path: host.sha256(base),
            progress=host.report,
            should_stop=host.should_stop,
        )
    return _outcome(host, result, started)


def run_merge(host: AppHost, fields: Mapping[str, Any], *, task_id: str = "", owner: str = "") -> LoraOutcome:
    """Merge LoRAs of the host's LoRA folder into one there (exactly, or re-ranked), as one host job."""
    from .lora import merge_loras

    values = _fields(fields, MERGE_DEFAULTS)
    refs = lora_refs(values["loras"])
    if any(ref.blocks for ref in refs):
        raise RequestError("loras: block weights apply when baking, not when merging LoRAs")
    pairs = [(resolve_lora(host, ref.name).path, ref.ratio) for ref in refs]
    rank, conv_rank = _rank(values["rank"], "rank"), _rank(values["conv_rank"], "conv_rank")
    dtype = _dtype(values["dtype"], allow_keep=True)
    output = _output(host, values["name"] or "-".join(Path(ref.name).stem for ref in refs[:3]) + "-merged")
    started = time.perf_counter()
    with host.job(task_id, owner=owner):
        result = merge_loras(
            pairs,
            output,
            rank=rank,
            conv_rank=conv_rank,
            dtype=dtype,
            device=_device(values["device"]),
            overwrite=bool(values["overwrite"]),
            progress=host.report,
            should_stop=host.should_stop,
        )
    return _outcome(host, result, started)


def _fields(fields: Mapping[str, Any], defaults: dict) -> dict:
    known = (*defaults, "id_task")
    unknown = [name for name in fields if name not in known]
    if unknown:
        raise RequestError(f"{unknown[0]}: unknown field (expected some of {', '.join(defaults)})")
    return {name: fields[name] if fields.get(name) is not None else default for name, default in defaults.items()}


def _checkpoint(host: AppHost, name: Any, field_name: str) -> Checkpoint:
    if not isinstance(name, str) or not name.strip():
        raise RequestError(f"{field_name}: pick a checkpoint")
    try:
        return host.resolve(name)
    except MergeError as err:
        raise type(err)(f"{field_name}: {err}") from None


def _rank(value: Any, field_name: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(f"{field_name}: a rank is a whole number from 1 to {MAX_RANK}, got {shown(value)}")
    try:
        rank = int(value) if not isinstance(value, float) or value.is_integer() else None
    except ValueError:
        rank = None
    if rank is None or not 1 <= rank <= MAX_RANK:
        raise RequestError(f"{field_name}: a rank is a whole number from 1 to {MAX_RANK}, got {shown(value)}")
    return rank


def number(value: Any, field_name: str) -> float:
    """A finite number from JSON or a text box; RequestError naming the field otherwise."""
    try:
        result = float(value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"{field_name}: expected a number, got {shown(value)}") from None
    if not math.isfinite(result):
        raise RequestError(f"{field_name}: expected a finite number, got {shown(value)}")
    return result


def _dtype(value: Any, *, allow_keep: bool) -> str:
    choices = ([""] if allow_keep else []) + list(DTYPES)
    if value not in choices:
        listed = ", ".join(f"'{c}'" if c == "" else c for c in choices)
        raise RequestError(f"dtype: one of {listed}, got {shown(value)}")
    return value


def _device(value: Any) -> str:
    """The same rule as a merge's device: known kinds only (torch would take "meta" and fail later)."""
    if not isinstance(value, str) or not DEVICES.fullmatch(value):
        raise RequestError(f"device: unknown device {shown(value)} (auto, cpu, cuda, cuda:N or mps)")
    return value


def _output(host: AppHost, name: Any) -> Path:
    """The output file in the host's LoRA folder, from a name typed in the tab or the API."""
    if not isinstance(name, str):
        raise RequestError(f"name: expected a file name, got {shown(name)}")
    stem = name.strip().removesuffix(".safetensors")
    return Path(host.lora_dir()) / output_file_name(f"{stem}.safetensors", "name")


def _outcome(host: AppHost, result, started: float) -> LoraOutcome:
    name = host.register_lora(result.path)
    return LoraOutcome(name, result.path, result.sha256, result.modules, time.perf_counter() - started, result.notes)
