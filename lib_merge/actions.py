"""What the tab and the API do, free of gradio and FastAPI: requests from named fields, merges as host jobs."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import arch, merge
from .errors import MergeError, RequestError, brief
from .hosts import AppHost
from .io.formats import open_checkpoint
from .loop import runner
from .loop.sweep import parse_axis
from .plan import make_plan
from .recipe import parse_recipe, request_from_recipe
from .request import MergeRequest

# The built-in run_modelmerger's parameters after id_task, then Merge Lab's own options.
WEBUI_FIELDS = tuple(f.name for f in dataclasses.fields(MergeRequest))[:15]
# Merge Lab's own output fields: like the built-in's, a recipe carries them, and its own win.
OUTPUT_FIELDS = ("dtype",)
# How to run the merge: these apply to a recipe too.
EXTRA_FIELDS = ("overwrite", "device")
# Every field a merge takes, in the order the tab passes them; ``load`` is not the request's own.
REQUEST_FIELDS = (*WEBUI_FIELDS, *OUTPUT_FIELDS, *EXTRA_FIELDS, "load")
# A recipe (a mapping, or its YAML / JSON text) replaces the model, method and output fields.
FIELDS = ("id_task", *REQUEST_FIELDS, "recipe")

log = logging.getLogger("merge_lab")


@dataclass(frozen=True)
class MergeOutcome:
    """A finished merge as the tab and the API report it."""

    title: str
    path: Path
    sha256: str
    loaded: bool
    seconds: float
    notes: list[str] = field(default_factory=list)

    def message(self) -> str:
        loaded = " and loaded" if self.loaded else ""
        lines = [f"Saved{loaded}: {self.title}", f"{self.path}", f"sha256 {self.sha256}, {self.seconds:.1f} s"]
        return "\n".join(lines + self.notes)


def request_from_fields(fields: Mapping[str, Any]) -> tuple[MergeRequest, bool]:
    """A request and the ``load`` wish from named fields; an unknown field is refused by name."""
    unknown = [name for name in fields if name not in FIELDS]
    if unknown:
        raise RequestError(f"{unknown[0]}: unknown field (expected some of {', '.join(FIELDS)})")
    if fields.get("recipe"):
        return _request_from_recipe(fields), bool(fields.get("load", False))
    if not fields.get("primary_model_name"):
        raise RequestError("primary_model_name: pick the primary model (A)")
    names = (*WEBUI_FIELDS, *OUTPUT_FIELDS, *EXTRA_FIELDS)
    values = {name: fields[name] for name in names if fields.get(name) is not None}
    try:
        request = MergeRequest(**values)
    except TypeError as err:
        raise RequestError(f"request: {err}") from None
    return request, bool(fields.get("load", False))


def _request_from_recipe(fields: Mapping[str, Any]) -> MergeRequest:
    recipe = fields["recipe"]
    if isinstance(recipe, str):
        recipe = parse_recipe(recipe, "recipe")
    options = {name: fields[name] for name in EXTRA_FIELDS if fields.get(name) is not None}
    return request_from_recipe(recipe, **options)


def preflight_report(host: AppHost, request: MergeRequest) -> tuple[bool, str]:
    """Whether the merge can run, and the preflight report (or the reason it cannot even be planned).

    Headers only: the inputs are not hashed here (seconds per GB), the merge does that.
    """
    try:
        plan = make_plan(request, host, hash_inputs=False)
    except MergeError as err:
        return False, f"Refused: {err}"
    except Exception as err:  # shown in the tab as it is typed: one line, never a traceback; the log keeps it
        log.exception("Merge Lab: preflight failed")
        return False, f"Refused: could not be planned ({brief(err)})"
    try:
        return plan.ok, plan.report()
    finally:
        plan.close()


def run_merge(
    host: AppHost,
    request: MergeRequest,
    *,
    load: bool,
    task_id: str = "",
    owner: str = "",
    on_progress: Callable | None = None,
) -> MergeOutcome:
    """Merge as one host job (progress, cancel by ``owner``, one job at a time), then load the result if asked."""
    started = time.perf_counter()

    def progress(update) -> None:
        host.report(update)
        if on_progress is not None:
            on_progress(update)

    with host.job(task_id, owner=owner):
        result = merge(request, host, progress=progress, should_stop=host.should_stop)
        title, loaded, notes = result.name, False, list(result.notes)
        if load and host.can_load:
            try:
                title, loaded = host.load(title), True
            except Exception as err:  # the merge is saved: say why it is not loaded, keep the log's traceback
                log.exception("Merge Lab: loading %s failed", title)
                notes.append(f"Saved, but not loaded: {brief(err)}")
    return MergeOutcome(title, result.path, result.sha256, loaded, time.perf_counter() - started, notes)


@dataclass
class TryOutcome:
    """A merge tried in the loaded model: what to call it, how to find its recipe again."""

    name: str
    recipe_hash: str
    recipe: dict
    seconds: float
    notes: list[str] = field(default_factory=list)
    # Where the time went: preflight_s (headers, input hashes), merge_s (read, compute, copy in).
    timings: dict[str, float] = field(default_factory=dict)

    def message(self) -> str:
        return (
            f"Trying: {self.name} [{self.recipe_hash}] in the loaded model, no file written "
            f"({self.seconds:.1f} s). Generate in txt2img; Merge saves it."
        )


def run_try(host: AppHost, request: MergeRequest, *, task_id: str = "", owner: str = "") -> TryOutcome:
    """Merge into the host's loaded model as one host job; a host without one refuses."""
    if not hasattr(host, "try_merge"):
        raise RequestError("Try merges into the webui's loaded model; here there is none (save the merge instead)")
    started = time.perf_counter()
    with host.job(task_id, owner=owner):
        result = host.try_merge(request, progress=host.report, should_stop=host.should_stop)
    notes = [f"{len(result.missing)} merged keys are not in the loaded model"] if result.missing else []
    seconds = time.perf_counter() - started
    return TryOutcome(result.name, result.recipe_hash, result.recipe, seconds, notes, dict(result.timings))


def sweep_axes(host: AppHost, request: MergeRequest, x: tuple[str, str], y: tuple[str, str] | None):
    """The sweep's axes from (parameter, values text) pairs, checked against the request's method
    and its primary model's family (block presets differ between SD1 and SDXL)."""
    method, family = request.root().method, family_of(host, request)
    axes = [parse_axis(param, text, method, family=family) for param, text in (x, y) if param]
    if not axes:
        raise RequestError("sweep.x: pick the parameter to sweep")
    return axes[0], axes[1] if len(axes) > 1 else None


def family_of(host: AppHost, request: MergeRequest) -> str:
    """The architecture family of the request's primary model, from its header (block layouts differ)."""
    with open_checkpoint(host.resolve(next(request.root().models()).name).path) as reader:
        return arch.family_of(reader.keys())


def run_sweep(host, request: MergeRequest, x, y, settings, *, task_id: str = "", owner: str = "", on_cell=None):
    """A sweep in the host's loaded model (lib_merge.loop.runner.run_sweep); a host without one refuses."""
    if not hasattr(host, "generate"):
        raise RequestError("Sweeps merge into the webui's loaded model and generate with it; here there is none")
    return runner.run_sweep(host, request, x, y, settings, task_id=task_id, owner=owner, on_cell=on_cell)


def read_metadata(host: AppHost, names: list[str]) -> str:
    """The picked checkpoints' metadata merged into one JSON object, later picks winning (the built-in's)."""
    metadata: dict[str, str] = {}
    for name in names:
        path = host.resolve(name).path if name else None
        if path is None or path.suffix.lower() != ".safetensors":
            continue  # a pickle has no metadata, and reading one means loading it whole
        reader = open_checkpoint(path)
        try:
            metadata.update(reader.metadata)
        finally:
            reader.close()
    return json.dumps(metadata, indent=4, ensure_ascii=False)
