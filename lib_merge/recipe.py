"""Recipes: a merge as a tree of methods over models, and its YAML / JSON form.

A ``MergeNode`` applies one registered method to its inputs, which are models (``ModelRef``: a
name, and the sha256 the recipe was made with) or other nodes; parameters may be given per block.
The engine evaluates the tree key by key, with no intermediate files. A recipe file is a
serialised ``MergeRequest``: the tree plus the request's output fields, under the same names.

    merge_lab_recipe: 1
    merge:
      method: ties
      models: [base.safetensors, {model: a.safetensors, sha256: 3f0c...}, b.safetensors]
      params: {density: 0.2, lambda: 1.0}
      blocks: {lambda: "BASE=0,IN*=0.5"}
    output: {save_as_half: true, custom_name: my-merge}
    greedy_soup: {...}   # optional: how the merge was found (MergeRequest.provenance), not used to merge
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RequestError
from .methods import get_method

VERSION = 1
# The request fields a recipe carries (the rest say where and how to run it, not what to make).
OUTPUT_FIELDS = (
    "save_as_half",
    "custom_name",
    "checkpoint_format",
    "config_source",
    "bake_in_vae",
    "discard_weights",
    "save_metadata",
    "add_merge_recipe",
    "copy_metadata_fields",
    "metadata_json",
)
# What a recipe may say about how its merge was found (MergeRequest.provenance), each a mapping.
PROVENANCE_KEYS = ("greedy_soup",)


@dataclass(frozen=True)
class ModelRef:
    """A model input: its name (or path) and, in a recipe made from a merge, its sha256."""

    name: str
    sha256: str | None = None


@dataclass(frozen=True)
class MergeNode:
    """One method applied to its inputs (models or nodes), with its parameters and per-block ones."""

    method: str
    inputs: tuple[ModelRef | MergeNode, ...]
    params: dict = field(default_factory=dict)
    blocks: dict = field(default_factory=dict)  # parameter -> block text (see blocks.parse_blocks)

    def models(self) -> Iterator[ModelRef]:
        """Every model input, depth first, in order (a model used twice appears twice)."""
        for item in self.inputs:
            if isinstance(item, MergeNode):
                yield from item.models()
            else:
                yield item

    def validate(self, where: str = "merge") -> None:
        """Method known, input count right, parameters and block parameters valid; else RequestError."""
        try:
            method = get_method(self.method)
        except RequestError as err:
            raise RequestError(f"{where}.method: {err}".replace("interp_method: ", "")) from None
        method.check_input_count(len(self.inputs), f"{where}.models")
        repeated = len(self.inputs) - len(method.inputs) + 1 if method.variadic else None
        method.check_params(self.params, repeated, f"{where}.params")
        for name in self.blocks:
            param = method.params.get(name)
            if param is None or not param.per_block:
                per_block = ", ".join(p.name for p in method.params.values() if p.per_block) or "none"
                raise RequestError(
                    f"{where}.blocks.{name}: not a per-block parameter of {method.cli_name} (those are: {per_block})"
                )
        for index, item in enumerate(self.inputs):
            if isinstance(item, MergeNode):
                item.validate(f"{where}.models[{index}]")
            elif not item.name:
                raise RequestError(f"{where}.models[{index}]: empty model name")

    def with_refs(self, refs: dict[str, ModelRef]) -> MergeNode:
        """The same tree with each model input replaced by ``refs[its name]`` (name as the host
        knows it, sha256), where given."""
        inputs = tuple(
            item.with_refs(refs) if isinstance(item, MergeNode) else refs.get(item.name, item) for item in self.inputs
        )
        return dataclasses.replace(self, inputs=inputs)

    def to_dict(self) -> dict:
        data: dict = {"method": get_method(self.method).name, "models": [_input_to_dict(i) for i in self.inputs]}
        if self.params:
            data["params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        if self.blocks:
            data["blocks"] = dict(self.blocks)
        return data


def node_from_dict(data, where: str = "merge") -> MergeNode:
    """A tree from its dict form; a RequestError names the field at fault."""
    if not isinstance(data, dict):
        raise RequestError(f"{where}: expected a mapping with method and models, got {data!r}")
    unknown = sorted(set(data) - {"method", "models", "params", "blocks"})
    if unknown:
        raise RequestError(f"{where}.{unknown[0]}: unknown field (a node has method, models, params, blocks)")
    if "method" not in data:
        raise RequestError(f"{where}.method: missing")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise RequestError(f"{where}.models: expected a list of models or nodes")
    for name in ("params", "blocks"):
        if not isinstance(data.get(name, {}), dict):
            raise RequestError(f"{where}.{name}: expected a mapping")
    inputs = tuple(_input_from_dict(item, f"{where}.models[{i}]") for i, item in enumerate(models))
    blocks = {str(k): _block_text(v) for k, v in data.get("blocks", {}).items()}
    return MergeNode(str(data["method"]), inputs, dict(data.get("params", {})), blocks)


def _input_to_dict(item: ModelRef | MergeNode):
    if isinstance(item, MergeNode):
        return item.to_dict()
    return {"model": item.name, "sha256": item.sha256} if item.sha256 else item.name


def _input_from_dict(item, where: str) -> ModelRef | MergeNode:
    if isinstance(item, str):
        return ModelRef(item)
    if isinstance(item, dict) and "model" in item:
        unknown = sorted(set(item) - {"model", "sha256"})
        if unknown:
            raise RequestError(f"{where}.{unknown[0]}: unknown field (a model has model and sha256)")
        return ModelRef(str(item["model"]), item.get("sha256") or None)
    return node_from_dict(item, where)


def _block_text(value) -> str:
    """Block values as text: a list becomes the comma list."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def recipe_dict(request, tree: MergeNode | None = None) -> dict:
    """The recipe of a request: its tree (or ``tree``, the one as merged), its output fields, and
    how it was found (its provenance's entries, e.g. ``greedy_soup``), when known."""
    output = {name: getattr(request, name) for name in OUTPUT_FIELDS}
    recipe = {"merge_lab_recipe": VERSION, "merge": (tree or request.root()).to_dict(), "output": output}
    return {**recipe, **(request.provenance or {})}


def check_provenance(provenance, where: str = "provenance") -> None:
    """None, or a mapping of known provenance keys to mappings (JSON-like); else a RequestError."""
    if provenance is None:
        return
    if not isinstance(provenance, dict):
        raise RequestError(f"{where}: expected a mapping like {{'greedy_soup': {{...}}}}, got {provenance!r}")
    for key, value in provenance.items():
        if key not in PROVENANCE_KEYS:
            raise RequestError(f"{where}.{key}: unknown (known: {', '.join(PROVENANCE_KEYS)})")
        if not isinstance(value, dict):
            raise RequestError(f"{where}.{key}: expected a mapping, got {type(value).__name__}")


def recipe_hash(recipe: dict) -> str:
    """A short, stable name for a recipe: sha256 of its canonical JSON, 10 hex digits like the
    webui's short checkpoint hashes, so an image's infotext leads back to the recipe."""
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def request_from_recipe(data, **run_options):
    """A MergeRequest from a recipe's dict form; ``run_options`` (overwrite, device, output_path) added."""
    from .request import MergeRequest

    if not isinstance(data, dict) or "merge" not in data:
        raise RequestError("recipe: expected a mapping with a 'merge' node (and optionally 'output')")
    version = data.get("merge_lab_recipe", VERSION)
    if version != VERSION:
        raise RequestError(f"recipe.merge_lab_recipe: version {version!r} is not supported (this is {VERSION})")
    tree = node_from_dict(data["merge"])
    tree.validate()
    output = data.get("output") or {}
    if not isinstance(output, dict):
        raise RequestError("recipe.output: expected a mapping")
    unknown = sorted(set(output) - set(OUTPUT_FIELDS))
    if unknown:
        raise RequestError(f"recipe.output.{unknown[0]}: unknown field (known: {', '.join(OUTPUT_FIELDS)})")
    first = next(tree.models()).name
    provenance = {key: data[key] for key in PROVENANCE_KEYS if key in data}
    check_provenance(provenance, "recipe")
    return MergeRequest(first, tree=tree, provenance=provenance or None, **output, **run_options)


def load_recipe(path: Path) -> dict:
    """A recipe file, YAML (.yaml, .yml) or JSON, as a dict; errors name the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise RequestError(f"{path}: cannot read the recipe ({err.strerror})") from None
    return parse_recipe(text, str(path))


def parse_recipe(text: str, source: str = "recipe") -> dict:
    """A recipe from YAML or JSON text (JSON is YAML, but PyYAML may be missing outside the webui)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        import yaml
    except ImportError:
        raise RequestError(f"{source}: not JSON, and PyYAML is not installed to read YAML") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RequestError(f"{source}: not valid YAML or JSON ({err})") from None


def dump_recipe(data: dict, path: Path | None = None) -> str:
    """YAML when the path ends in .yaml/.yml (or no path and PyYAML is here), else JSON."""
    as_yaml = path is None or Path(path).suffix.lower() in (".yaml", ".yml")
    if as_yaml:
        try:
            import yaml

            return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        except ImportError:
            if path is not None:
                raise RequestError(f"{path}: PyYAML is not installed; save the recipe as .json") from None
    return json.dumps(data, indent=2) + "\n"
