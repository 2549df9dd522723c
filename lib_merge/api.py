"""HTTP routes over the same actions as the tab: POST /merge-lab/v1/merge, GET /merge-lab/v1/models,
and the LoRA routes (POST /merge-lab/v1/lora/bake, /lora/extract, /lora/merge; GET /merge-lab/v1/loras).

Bad input is an HTTP 4xx with ``{"detail": message}``, never a 500. The body's schema is made
from MergeRequest's own fields, so the API cannot drift from the tab and the CLI.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import typing
import uuid
from collections.abc import Callable
from typing import Any, Union

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import create_model

from . import actions, arch, lora_actions
from .auth import Credentials, check_basic_auth
from .errors import CancelledError, IncompatibleModelsError, MergeError, OutputError, RequestError, brief
from .hosts import AppHost
from .io.formats import open_checkpoint
from .loop.runner import ImageSettings
from .methods import listed_methods
from .request import MergeRequest

PREFIX = "/merge-lab/v1"
STATUS = {RequestError: 422, IncompatibleModelsError: 409, OutputError: 409, CancelledError: 409}
log = logging.getLogger("merge_lab")


def _body_model():
    """The merge body: the built-in's 16 parameters by name, then dtype, overwrite, device and load."""
    hints = typing.get_type_hints(MergeRequest)
    defaults = {f.name: f.default for f in dataclasses.fields(MergeRequest)}
    fields: dict[str, Any] = {"id_task": (str, "")}
    for name in actions.WEBUI_FIELDS + actions.OUTPUT_FIELDS + actions.EXTRA_FIELDS:
        kind = Union[int, str] if name == "config_source" else hints[name]  # index or label  # noqa: UP007
        # Numbers are MergeRequest's to check: pydantic's float() of a 400-digit number raises a 500.
        kind = Any if kind is float else kind
        default = defaults[name]
        fields[name] = (kind, ... if default is dataclasses.MISSING else default)
    fields["load"] = (bool, False)
    # A recipe (as `python -m lib_merge inspect` prints it, or its JSON) instead of the model fields.
    fields["recipe"] = (Union[dict, str, None], None)  # noqa: UP007
    fields["primary_model_name"] = (str, "")
    return create_model("MergeBody", **fields)


MergeBody = _body_model()


def _sweep_body_model():
    """A merge body plus the axes ("alpha", "0.2:0.6:0.1"; y optional) and txt2img's image fields."""
    fields: dict[str, Any] = {
        "x_param": (str, "alpha"),
        "x_values": (str, ...),
        "y_param": (str, ""),
        "y_values": (str, ""),
    }
    for field in dataclasses.fields(ImageSettings):
        kind = type(field.default)
        fields[field.name] = (Any if kind is float else kind, field.default)  # checked by ImageSettings
    return create_model("SweepBody", __base__=MergeBody, **fields)


SweepBody = _sweep_body_model()
CancelBody = create_model("CancelBody", id_task=(str, ...))


def _lora_body_model(name: str, defaults: dict):
    """A LoRA route's body: its fields with their defaults, values checked by lora_actions (a
    number typed as a float would let pydantic raise a 500 on a 400-digit one)."""
    fields: dict[str, Any] = {"id_task": (str, "")}
    fields.update({field: (Any, default) for field, default in defaults.items()})
    return create_model(name, **fields)


BakeBody = _lora_body_model("BakeBody", lora_actions.BAKE_DEFAULTS)
ExtractBody = _lora_body_model("ExtractBody", lora_actions.EXTRACT_DEFAULTS)
LoraMergeBody = _lora_body_model("LoraMergeBody", lora_actions.MERGE_DEFAULTS)


def add_routes(app: FastAPI, host: AppHost, credentials: Credentials | None = None) -> None:
    """Add the routes to ``app``; with ``credentials`` (user -> password) they need HTTP basic auth.

    Every job is owned by its ``id_task`` (the client's, or one made here and returned): only a
    cancel naming it stops it, so one client cannot cancel another's merge.
    """
    dependencies = [Depends(_basic_auth(credentials))] if credentials else []
    methods = ", ".join(m.label for m in listed_methods())

    async def merge(body: MergeBody):  # type: ignore[valid-type]
        fields = _fields(body)
        owner = _owner(fields)

        def run():
            request, load = actions.request_from_fields(fields)
            return actions.run_merge(host, request, load=load, task_id=owner, owner=owner)

        # The merge holds the host's job slot for its whole run: keep the event loop free.
        return _saved(owner, await _answer(run))

    async def bake(body: BakeBody):  # type: ignore[valid-type]
        """Bake LoRAs (names in the LoRA folder, each at a ratio, optionally per block) into a
        checkpoint: a merge like /merge, whose recipe has a LoRA node per LoRA."""
        fields = _fields(body)
        owner = _owner(fields)

        def run():
            request, load = lora_actions.bake_request_from_fields(host, fields)
            return actions.run_merge(host, request, load=load, task_id=owner, owner=owner)

        return _saved(owner, await _answer(run))

    async def extract(body: ExtractBody):  # type: ignore[valid-type]
        """Extract a kohya LoRA of the given rank from two checkpoints (base, tuned) into the LoRA folder."""
        fields = _fields(body)
        owner = _owner(fields)
        return _lora_saved(
            owner, await _answer(lambda: lora_actions.run_extract(host, fields, task_id=owner, owner=owner))
        )

    async def merge_loras(body: LoraMergeBody):  # type: ignore[valid-type]
        """Merge LoRAs at ratios into one in the LoRA folder: exactly (ranks concatenated) or, with rank, by SVD."""
        fields = _fields(body)
        owner = _owner(fields)
        return _lora_saved(
            owner, await _answer(lambda: lora_actions.run_merge(host, fields, task_id=owner, owner=owner))
        )

    async def try_in_model(body: MergeBody):  # type: ignore[valid-type]
        fields = _fields(body)
        owner = _owner(fields)

        def run():
            request, _ = actions.request_from_fields(fields)
            return actions.run_try(host, request, task_id=owner, owner=owner)

        outcome = await _answer(run)
        return {
            "id_task": owner,
            "name": outcome.name,
            "recipe_hash": outcome.recipe_hash,
            "recipe": outcome.recipe,
            "seconds": round(outcome.seconds, 3),
            "timings": {name: round(value, 3) for name, value in outcome.timings.items()},
            "notes": outcome.notes,
        }

    async def sweep(body: SweepBody):  # type: ignore[valid-type]
        fields = _fields(body)
        owner = _owner(fields)
        settings = ImageSettings(**{f.name: fields.pop(f.name) for f in dataclasses.fields(ImageSettings)})
        axes = [(fields.pop(f"{axis}_param"), fields.pop(f"{axis}_values")) for axis in ("x", "y")]

        def run():
            request, _ = actions.request_from_fields(fields)
            x, y = actions.sweep_axes(host, request, axes[0], axes[1])
            return actions.run_sweep(host, request, x, y, settings, task_id=owner, owner=owner)

        outcome = await _answer(run)
        return {
            "id_task": owner,
            "grid": str(outcome.grid_path) if outcome.grid_path else None,
            "seed": outcome.seed,
            "cancelled": outcome.cancelled,
            "loaded": {"name": outcome.loaded[0], "recipe_hash": outcome.loaded[1]},
            "seconds": round(outcome.seconds, 3),
            "cells": [
                {
                    "label": c.label,
                    "name": c.name,
                    "recipe_hash": c.recipe_hash,
                    "recipe": c.recipe,
                    "infotext": c.infotext,
                }
                for c in outcome.cells
            ],
        }

    def cancel(body: CancelBody):  # type: ignore[valid-type]
        """Stop the running merge, try or sweep whose id_task this is (given in its request, or returned by it)."""
        return {"cancelled": host.interrupt(_fields(body)["id_task"])}

    sweep.__doc__ = (
        "Merge into the loaded model at each value of one parameter (and of a second one), generate an "
        "image at each with the same seed, and save the annotated grid where the webui saves grids."
    )
    try_in_model.__doc__ = (
        "Merge into the webui's loaded model without writing a file (same fields as merge); images "
        "generated next name the merge and its recipe hash in their infotext."
    )
    merge.__doc__ = (
        f"Merge checkpoints like the built-in run_modelmerger (interp_method: {methods}), "
        "or what a recipe describes (the `recipe` field; see GET /merge-lab/v1/methods). "
        "Give an unguessable id_task (a UUID) to be able to cancel it with POST /merge-lab/v1/cancel."
    )
    app.add_api_route(f"{PREFIX}/merge", merge, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/try", try_in_model, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/sweep", sweep, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/cancel", cancel, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/methods", method_listing, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/models", lambda: _models(host), methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/lora/bake", bake, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/lora/extract", extract, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/lora/merge", merge_loras, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/loras", lambda: _loras(host), methods=["GET"], dependencies=dependencies)


def _saved(owner: str, outcome: actions.MergeOutcome) -> dict:
    return {
        "id_task": owner,
        "path": str(outcome.path),
        "title": outcome.title,
        "sha256": outcome.sha256,
        "loaded": outcome.loaded,
        "seconds": round(outcome.seconds, 3),
        "notes": outcome.notes,
    }


def _lora_saved(owner: str, outcome: lora_actions.LoraOutcome) -> dict:
    return {
        "id_task": owner,
        "name": outcome.name,
        "path": str(outcome.path),
        "sha256": outcome.sha256,
        "modules": outcome.modules,
        "seconds": round(outcome.seconds, 3),
        "notes": outcome.notes,
    }


def _loras(host: AppHost) -> list[dict]:
    """The LoRA files the host lists (names relative to its LoRA folder); none where it has no folder."""
    try:
        return [{"name": name} for name in host.loras()]
    except MergeError:
        return []


async def _answer(run: Callable):
    """``run()`` on a worker thread; a MergeError is its 4xx, anything else a one-line 400 (logged
    whole): no input gets a 500 or a stack trace back."""
    try:
        return await asyncio.to_thread(run)
    except MergeError as err:
        raise HTTPException(status_code=_status(err), detail=str(err)) from None
    except Exception as err:
        log.exception("Merge Lab: API request failed")
        raise HTTPException(status_code=400, detail=f"could not be done: {brief(err)}") from None


def _owner(fields: dict) -> str:
    """The job's id: the client's ``id_task``, or an unguessable one made here."""
    return fields.get("id_task") or f"merge-lab-{uuid.uuid4().hex}"


def method_listing() -> list[dict]:
    """Every merge method with its inputs and parameters (defaults, kinds, ranges, per-block or not)."""
    return [
        {
            "name": m.name,
            "label": m.label,
            "inputs": list(m.inputs),
            "min_inputs": m.min_inputs,
            "max_inputs": m.max_inputs,
            "params": [
                {
                    "name": p.name,
                    "default": p.default,
                    "kind": p.kind,
                    "range": p.range_text(),
                    "per_block": p.per_block,
                    "help": p.help,
                }
                for p in m.params.values()
            ],
            "doc": m.doc,
        }
        for m in listed_methods()
    ]


def _models(host: AppHost) -> list[dict]:
    """Every checkpoint the host lists, with its architecture read from the file's header; an
    unreadable one is listed with its one-line reason, so one bad file never hides the others."""
    listed = []
    for name in host.checkpoints():
        entry = {"name": name, "path": "", "architecture": "unreadable"}
        try:
            checkpoint = host.resolve(name)
            entry["path"] = str(checkpoint.path)
            with open_checkpoint(checkpoint.path) as reader:
                entry["architecture"] = arch.describe_reader(reader)
        except MergeError as err:
            entry["error"] = str(err)
        except Exception as err:  # RecursionError, MemoryError ... from a crafted file: that file's problem only
            entry["error"] = f"{name}: unreadable ({brief(err)})"
        listed.append(entry)
    return listed


def _fields(body) -> dict:
    """The body's fields as a dict, with pydantic 1 (the webui's) or 2."""
    return body.model_dump() if hasattr(body, "model_dump") else body.dict()  # pydantic 2 (Forge), else 1


def _status(err: MergeError) -> int:
    return next((code for kind, code in STATUS.items() if isinstance(err, kind)), 400)


def _basic_auth(credentials: Credentials):
    def check(request: Request) -> None:
        if not check_basic_auth(request.headers.get("authorization"), credentials):
            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return check
