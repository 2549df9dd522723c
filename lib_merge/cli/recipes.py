"""The recipe commands of the command line: ``methods``, ``run RECIPE`` and ``replay OUT``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import RequestError
from ..hosts import FolderHost
from ..io.formats import open_checkpoint
from ..methods import FLOATS, listed_methods
from ..recipe import load_recipe, request_from_recipe


def add_commands(commands, run_request) -> None:
    """Register the subcommands; ``run_request(request, host, args)`` merges like ``merge`` does."""
    methods = commands.add_parser("methods", help="list the merge methods with their parameters and defaults")
    methods.add_argument("--json", action="store_true", help="machine-readable output")
    methods.set_defaults(run=run_methods)

    run = commands.add_parser("run", help="merge what a recipe file (YAML or JSON) describes")
    run.add_argument("recipe", type=Path)
    _run_options(run, "the recipe file's folder")
    run.set_defaults(run=lambda args: run_recipe(args, run_request))

    replay = commands.add_parser("replay", help="rebuild a merged checkpoint from the recipe in its metadata")
    replay.add_argument("merged", type=Path, help="a checkpoint made by Merge Lab")
    _run_options(replay, "the merged file's folder")
    replay.set_defaults(run=lambda args: run_replay(args, run_request))


def _run_options(parser: argparse.ArgumentParser, default_models: str) -> None:
    parser.add_argument(
        "--models", type=Path, help=f"folder the recipe's model names are in (default: {default_models})"
    )
    parser.add_argument(
        "--loras", type=Path, help="folder the recipe's LoRA names are in (default: the --models folder)"
    )
    parser.add_argument("-o", "--output", type=Path, help="output file (default: the recipe's name in --models)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dry-run", action="store_true", help="print the preflight report, write nothing")


def run_methods(args) -> int:
    listing = [
        {
            "name": m.cli_name,
            "label": m.label,
            "inputs": m.inputs_text(),
            "params": {
                p.name: {"default": p.default, "kind": p.kind, "range": p.range_text(), "help": p.help}
                for p in m.params.values()
            },
            "doc": m.doc,
        }
        for m in listed_methods()
    ]
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for m in listed_methods():
        print(f"{m.cli_name}: {m.label}; models: {m.inputs_text()}")
        for p in m.params.values():
            default = "none (uniform)" if p.kind == FLOATS and p.default is None else p.default
            where = "" if p.kind != "float" else f", {p.range_text()}, per block"
            print(f"  {p.name} = {default} ({p.kind}{where}){': ' + p.help if p.help else ''}")
        summary = " ".join(m.doc.split("\n\n")[0].split())
        print(f"  {summary}" if summary else "")
    return 0


def run_recipe(args, run_request) -> int:
    models = args.models or args.recipe.parent
    return _run(request_from_recipe(load_recipe(args.recipe), **_options(args)), models, args, run_request)


def run_replay(args, run_request) -> int:
    if args.output is None:
        raise RequestError("-o: replay needs an output file (the merged file's own name is taken)")
    recipe = recipe_of(args.merged)
    return _run(request_from_recipe(recipe, **_options(args)), args.models or args.merged.parent, args, run_request)


# Fields build_metadata writes after the user's: a user field of that name keeps only its place.
ENGINE_FIELDS = ("format", "sd_merge_recipe", "sd_merge_models")


def recipe_of(path: Path) -> dict:
    """The Merge Lab recipe stored in a checkpoint's metadata; an error names the file when there is none.

    The user's metadata is stored once, as the file's fields; the recipe names them
    (``sd_merge_recipe.metadata_fields``), and ``metadata_json`` is rebuilt from the file here, in
    the same order, so a replay writes the same header.
    """
    with open_checkpoint(path) as reader:
        metadata = dict(reader.metadata)
    field = metadata.get("sd_merge_recipe")
    try:
        stored = json.loads(field) if field else {}
        recipe = stored.get("merge_lab_recipe")
    except (json.JSONDecodeError, AttributeError, RecursionError):
        stored, recipe = {}, None
    if not isinstance(recipe, dict):
        raise RequestError(f"{path}: has no Merge Lab recipe in its metadata (sd_merge_recipe.merge_lab_recipe)")
    names = stored.get("metadata_fields") or []
    if names and isinstance(names, list) and isinstance(recipe.get("output"), dict):
        user = {str(name): "" if name in ENGINE_FIELDS else metadata.get(str(name), "") for name in names}
        recipe["output"]["metadata_json"] = json.dumps(user, ensure_ascii=False)
    return recipe


def _options(args) -> dict:
    options = {"overwrite": args.overwrite, "device": args.device}
    if args.output is not None:
        options["output_path"] = str(args.output)
    return options


def _run(request, models: Path, args, run_request) -> int:
    output_dir = args.output.parent if args.output is not None and str(args.output.parent) else models
    host = FolderHost(models, output_dir=output_dir, lora_dir=args.loras or models, device=args.device)
    return run_request(request, host, args)
