"""Merge Lab's engine: streaming, run_modelmerger-compatible checkpoint merging.

from lib_merge import FolderHost, MergeRequest, merge
result = merge(MergeRequest("a.safetensors", "b.safetensors", multiplier=0.5), host=FolderHost("models"))
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future

import torch

from .engine import InPlaceResult, MergeResult, Progress, ProgressFn, StopFn
from .errors import (
    CancelledError,
    IncompatibleModelsError,
    InputError,
    MergeError,
    OutputError,
    RequestError,
    UnsafePickleError,
)
from .hosts import Checkpoint, FolderHost, Host
from .io.formats import open_checkpoint
from .io.input_cache import InputCache
from .io.metadata import copy_config
from .methods import METHODS, get_method
from .plan import Plan, make_plan
from .request import MergeRequest

__all__ = [
    "METHODS",
    "CancelledError",
    "Checkpoint",
    "FolderHost",
    "Host",
    "InPlaceResult",
    "IncompatibleModelsError",
    "InputCache",
    "InputError",
    "MergeError",
    "MergeRequest",
    "MergeResult",
    "OutputError",
    "Plan",
    "Progress",
    "RequestError",
    "UnsafePickleError",
    "get_method",
    "make_plan",
    "merge",
    "merge_into",
    "preflight",
    "run_modelmerger",
]


def preflight(request: MergeRequest, host: Host) -> str:
    """The preflight report for a request, from the headers alone; nothing is written."""
    plan = make_plan(request, host)
    try:
        return plan.report()
    finally:
        plan.close()


def merge(
    request: MergeRequest,
    host: Host,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> MergeResult:
    """Preflight, merge, write, register: the one path the tab, the API and the CLI take; the
    result's notes start with what the preflight said of each LoRA baked in."""
    from . import engine

    started = time.perf_counter()
    device = _device(request, host)  # a device this machine lacks is refused before any file is read
    plan = make_plan(request, host)
    try:
        plan.check()
        planned = time.perf_counter()
        sha256, notes = engine.run(plan, device, progress=progress, should_stop=should_stop)
        written = time.perf_counter()
        config = copy_config(plan.config, plan.output) if plan.config else None
        name = host.register(plan.output, sha256)
    finally:
        plan.close()
    recipe = plan.metadata.get("sd_merge_recipe")
    timings = {
        "preflight_s": planned - started,
        "merge_s": written - planned,
        "total_s": time.perf_counter() - started,
    }
    notes = plan.lora_notes + notes
    return MergeResult(plan.output, sha256, json.loads(recipe) if recipe else None, timings, name, config, notes)


def merge_into(
    request: MergeRequest,
    host: Host,
    target: Mapping[str, torch.Tensor],
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    inputs: InputCache | None = None,
) -> InPlaceResult:
    """The merge copied into ``target``'s tensors in place (a loaded model's state dict): no file.

    Same plan, same per-key loop and same tensors as ``merge``; only the sink differs, so saving
    the same request afterwards writes exactly what was tried. ``inputs`` keeps the input
    tensors between calls (a sweep), so only the first merge reads the files.
    """
    from . import engine
    from .recipe import recipe_dict, recipe_hash

    started = time.perf_counter()
    device = _device(request, host)
    # The recipe names each input by its sha256, a full read of each file. Unless the recipe already
    # names hashes (checked before merging: a different file under a known name is never merged),
    # the inputs are hashed on another thread while the merge reads the same files, not before it.
    hash_first = any(ref.sha256 for ref in request.root().models())
    open_input = inputs.open if inputs is not None else open_checkpoint
    plan = make_plan(request, host, hash_inputs=hash_first, open_input=open_input)
    try:
        plan.check(ignore_output=True)
        planned = time.perf_counter()
        wants_hashes = not hash_first and request.save_metadata and request.add_merge_recipe
        hashes = _hash_meanwhile(plan, host) if wants_hashes else None
        missing, notes = engine.run_into(plan, device, target, progress=progress, should_stop=should_stop)
        tree = plan.tree.with_refs(hashes.result()) if hashes is not None else plan.tree
    finally:
        plan.close()
    recipe = recipe_dict(request, tree)
    timings = {"preflight_s": planned - started, "merge_s": time.perf_counter() - planned}
    return InPlaceResult(plan.output.stem, recipe, recipe_hash(recipe), missing, timings, plan.lora_notes + notes)


def _hash_meanwhile(plan: Plan, host: Host) -> Future:
    """The inputs' hashes as recipe refs (name -> ModelRef with sha256), computed on a thread of
    their own; the host's cache makes a file hashed once ever, not at every Try."""
    from .recipe import ModelRef

    future: Future = Future()

    def compute() -> None:
        try:
            checkpoints = [source.checkpoint for source in plan.sources.values()]
            future.set_result({c.name: ModelRef(c.name, host.sha256(c)) for c in checkpoints})
        except BaseException as err:  # handed to the merging thread, which raises it
            future.set_exception(err)

    threading.Thread(target=compute, name="merge-lab-hash", daemon=True).start()
    return future


def _device(request: MergeRequest, host: Host) -> str:
    """The request's device, or the host's when the request says auto; a GPU this machine lacks
    is a RequestError naming it, not torch's AssertionError or RuntimeError in mid-merge."""
    device = host.device() if request.device in ("", "auto") else request.device
    kind, _, index = str(device).partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise RequestError(f"device: {device} was asked for, but this machine has no usable CUDA GPU")
        if index and not index.isdigit():
            raise RequestError(f"device: unknown device {device!r} (auto, cpu, cuda, cuda:N or mps)")
        if index and int(index) >= count:
            raise RequestError(
                f"device: {device} was asked for, but this machine has {count} CUDA GPU(s): cuda:0-{count - 1}"
            )
    mps = getattr(torch.backends, "mps", None)
    if kind == "mps" and not (mps is not None and mps.is_available()):
        raise RequestError(f"device: {device} was asked for, but MPS is not available here")
    return device


def run_modelmerger(
    id_task,
    primary_model_name,
    secondary_model_name,
    tertiary_model_name,
    interp_method,
    multiplier,
    save_as_half,
    custom_name,
    checkpoint_format,
    config_source,
    bake_in_vae,
    discard_weights,
    save_metadata,
    add_merge_recipe,
    copy_metadata_fields,
    metadata_json,
    *,
    host: Host,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    overwrite: bool = False,
    device: str = "auto",
) -> MergeResult:
    """The webui's ``run_modelmerger`` with its 16 parameters, streaming; host services injected."""
    request = MergeRequest.from_webui_args(
        id_task,
        primary_model_name,
        secondary_model_name,
        tertiary_model_name,
        interp_method,
        multiplier,
        save_as_half,
        custom_name,
        checkpoint_format,
        config_source,
        bake_in_vae,
        discard_weights,
        save_metadata,
        add_merge_recipe,
        copy_metadata_fields,
        metadata_json,
        overwrite=overwrite,
        device=device,
    )
    return merge(request, host, progress=progress, should_stop=should_stop)
