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
    output: {dtype: bf16, custom_name: my-merge}   # dtype: keep, fp32, fp16, bf16, fp8_e4m3fn, fp8_e5m2
    greedy_soup: {...}   # optional: how the merge was found (MergeRequest.provenance), not used to merge

A LoRA is a change, not a model: it is the second input of ``add_delta``, named ``{lora: NAME}``
(a file in the host's LoRA folder), and its ratio is the node's ``alpha``:

    merge: {method: add_delta, models: [{method: ties, ...}, {lora: style.safetensors}], params: {alpha: 0.8}}
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RequestError, shown
from .methods import get_method

# Work per recipe is bounded (DESIGN 3b): recipes come from whoever reaches the tab or the API.
# Real recipes are a few KB, a few hundred values, a handful of levels; these leave room for large
# soups and greedy-soup paths while a hostile one is refused in well under a second.
MAX_RECIPE_BYTES = 1_000_000  # the text (YAML or JSON) of one recipe
MAX_RECIPE_DEPTH = 64  # nested mappings and lists in one recipe document
MAX_RECIPE_NODES = 20_000  # values in one document: scalars, keys and collections
MAX_TREE_DEPTH = 16  # method nodes nested inside each other in one merge tree
# PyYAML without libyaml reads ~10,000 values a second, holding the GIL: YAML is kept short then.
MAX_PURE_PYTHON_YAML_CHARS = 20_000

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
    "dtype",
)
# The input of add_delta that a LoRA may be (a LoRA is a change, not a model to blend).
DELTA_INPUT = "delta"
# What a recipe may say about how its merge was found (MergeRequest.provenance), each a mapping.
PROVENANCE_KEYS = ("greedy_soup",)


@dataclass(frozen=True)
class ModelRef:
    """A model input: its name (or path) and, in a recipe made from a merge, its sha256; ``lora``
    for a LoRA file (resolved in the host's LoRA folder, read as changes to the primary model)."""

    name: str
    sha256: str | None = None
    lora: bool = False

    @property
    def field(self) -> str:
        """The recipe field that names it: ``model`` or ``lora``."""
        return "lora" if self.lora else "model"


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
                raise RequestError(f"{where}.models[{index}]: empty {item.field} name")
            elif item.lora and (method.variadic or method.inputs[index] != DELTA_INPUT):
                raise RequestError(
                    f"{where}.models[{index}]: a LoRA is a change to a model, baked with add_delta: "
                    "{method: add_delta, models: [MODEL, {lora: NAME}], params: {alpha: RATIO}}"
                )

    def with_refs(self, refs: dict[str, ModelRef]) -> MergeNode:
        """The same tree with each model input's name and sha256 replaced by ``refs[its name]``'s
        (name as the host knows it, sha256), where given; a LoRA stays a LoRA."""
        inputs = tuple(
            item.with_refs(refs) if isinstance(item, MergeNode) else _renamed(item, refs.get(item.name))
            for item in self.inputs
        )
        return dataclasses.replace(self, inputs=inputs)

    def to_dict(self) -> dict:
        data: dict = {"method": get_method(self.method).name, "models": [_input_to_dict(i) for i in self.inputs]}
        if self.params:
            data["params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        if self.blocks:
            data["blocks"] = dict(self.blocks)
        return data


def _renamed(item: ModelRef, ref: ModelRef | None) -> ModelRef:
    return item if ref is None else ModelRef(ref.name, ref.sha256, item.lora)


def node_from_dict(data, where: str = "merge") -> MergeNode:
    """A tree from its dict form; a RequestError names the field at fault. The dict is bounded
    first (size, depth, no self-reference), then the tree (MAX_TREE_DEPTH levels of methods)."""
    check_document(data, where)
    return _node_from_dict(data, where, 1)


def _node_from_dict(data, where: str, depth: int) -> MergeNode:
    if depth > MAX_TREE_DEPTH:
        raise RequestError(f"{where}: the merge tree is nested deeper than {MAX_TREE_DEPTH} levels of methods")
    if not isinstance(data, dict):
        raise RequestError(f"{where}: expected a mapping with method and models, got {shown(data)}")
    unknown = _unknown(data, {"method", "models", "params", "blocks"})
    if unknown:
        raise RequestError(f"{where}.{unknown}: unknown field (a node has method, models, params, blocks)")
    if "method" not in data:
        raise RequestError(f"{where}.method: missing")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise RequestError(f"{where}.models: expected a list of models or nodes")
    for name in ("params", "blocks"):
        if not isinstance(data.get(name, {}), dict):
            raise RequestError(f"{where}.{name}: expected a mapping")
    inputs = tuple(_input_from_dict(item, f"{where}.models[{i}]", depth) for i, item in enumerate(models))
    blocks = {str(k): _block_text(v) for k, v in data.get("blocks", {}).items()}
    return MergeNode(str(data["method"]), inputs, dict(data.get("params", {})), blocks)


def _unknown(data: dict, known) -> str | None:
    """The first key of ``data`` not in ``known``, as short text (keys may be any YAML scalar)."""
    unknown = sorted(str(key)[:60] for key in data if key not in known)
    return unknown[0] if unknown else None


def _input_to_dict(item: ModelRef | MergeNode):
    if isinstance(item, MergeNode):
        return item.to_dict()
    if item.lora or item.sha256:
        return {item.field: item.name, "sha256": item.sha256} if item.sha256 else {item.field: item.name}
    return item.name


def _input_from_dict(item, where: str, depth: int) -> ModelRef | MergeNode:
    if isinstance(item, str):
        return ModelRef(item)
    for field_name in ("model", "lora"):
        if isinstance(item, dict) and field_name in item:
            unknown = _unknown(item, {field_name, "sha256"})
            if unknown:
                raise RequestError(f"{where}.{unknown}: unknown field (a {field_name} has {field_name} and sha256)")
            return ModelRef(str(item[field_name]), item.get("sha256") or None, lora=field_name == "lora")
    return _node_from_dict(item, where, depth + 1)


def _block_text(value) -> str:
    """Block values as text: a list becomes the comma list."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def recipe_dict(request, tree: MergeNode | None = None) -> dict:
    """The recipe of a request: its tree (or ``tree``, the one as merged), its output fields, and
    how it was found (its provenance's entries, e.g. ``greedy_soup``), when known."""
    output = {name: getattr(request, name) for name in OUTPUT_FIELDS}
    if not output["dtype"]:
        del output["dtype"]  # the built-in's precision: recipes (and their hashes) from before dtype stay the same
    recipe = {"merge_lab_recipe": VERSION, "merge": (tree or request.root()).to_dict(), "output": output}
    return {**recipe, **(request.provenance or {})}


def check_provenance(provenance, where: str = "provenance") -> None:
    """None, or a mapping of known provenance keys to mappings (JSON-like); else a RequestError."""
    if provenance is None:
        return
    if not isinstance(provenance, dict):
        raise RequestError(f"{where}: expected a mapping like {{'greedy_soup': {{...}}}}, got {shown(provenance)}")
    check_document(provenance, where)
    for key, value in provenance.items():
        if key not in PROVENANCE_KEYS:
            raise RequestError(f"{where}.{str(key)[:60]}: unknown (known: {', '.join(PROVENANCE_KEYS)})")
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
    check_document(data, "recipe")  # an API body arrives parsed: bounded here, not by parse_recipe
    version = data.get("merge_lab_recipe", VERSION)
    if version != VERSION:
        raise RequestError(f"recipe.merge_lab_recipe: version {shown(version)} is not supported (this is {VERSION})")
    tree = node_from_dict(data["merge"])
    tree.validate()
    output = data.get("output") or {}
    if not isinstance(output, dict):
        raise RequestError("recipe.output: expected a mapping")
    unknown = _unknown(output, OUTPUT_FIELDS)
    if unknown:
        raise RequestError(f"recipe.output.{unknown}: unknown field (known: {', '.join(OUTPUT_FIELDS)})")
    first = next(tree.models()).name
    provenance = {key: data[key] for key in PROVENANCE_KEYS if key in data}
    check_provenance(provenance, "recipe")
    return MergeRequest(first, tree=tree, provenance=provenance or None, **output, **run_options)


def load_recipe(path: Path) -> dict:
    """A recipe file, YAML (.yaml, .yml) or JSON, as a dict; errors name the file."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_RECIPE_BYTES + 1)  # bounded even for a FIFO or /dev/zero
    except OSError as err:
        raise RequestError(f"{path}: cannot read the recipe ({err.strerror})") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RequestError(f"{path}: the recipe is over {MAX_RECIPE_BYTES:,} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"{path}: the recipe is not UTF-8 text") from None
    return parse_recipe(text, str(path))


def parse_recipe(text: str, source: str = "recipe") -> dict:
    """A recipe from YAML or JSON text (JSON is YAML, but PyYAML may be missing outside the webui).

    Bounded before anything is built: size, depth and value count; YAML anchors and aliases are
    refused (they make a 1 KB text expand to gigabytes, or refer to themselves). Error messages
    give a line and column, never the text itself.
    """
    if not isinstance(text, str):
        raise RequestError(f"{source}: expected the recipe as text, got {type(text).__name__}")
    if len(text) > MAX_RECIPE_BYTES or len(text.encode("utf-8", "replace")) > MAX_RECIPE_BYTES:
        raise RequestError(f"{source}: the recipe is over {MAX_RECIPE_BYTES:,} bytes")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = _parse_yaml(text, source)
    except RecursionError:
        raise RequestError(f"{source}: nested deeper than {MAX_RECIPE_DEPTH} levels") from None
    except ValueError:  # Python refuses integers of over 4300 digits
        raise RequestError(f"{source}: a number has too many digits") from None
    check_document(data, source)
    return data


def _parse_yaml(text: str, source: str):
    try:
        import yaml
    except ImportError:
        raise RequestError(f"{source}: not JSON, and PyYAML is not installed to read YAML") from None
    # libyaml where PyYAML has it (its wheels do): the same documents, ten times faster.
    loader = getattr(yaml, "CSafeLoader", None)
    if loader is None:
        if len(text) > MAX_PURE_PYTHON_YAML_CHARS:
            raise RequestError(
                f"{source}: YAML over {MAX_PURE_PYTHON_YAML_CHARS:,} characters needs PyYAML with libyaml; send JSON"
            )
        loader = yaml.SafeLoader
    try:
        _check_yaml_events(yaml, yaml.parse(text, Loader=loader), source)
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as err:
        raise RequestError(f"{source}: not valid YAML or JSON{_where(err)}") from None
    except ValueError:  # a number of over 4300 digits, a date like 2024-13-45
        raise RequestError(f"{source}: a value could not be read (too many digits, or a bad date)") from None


def _check_yaml_events(yaml, events, source: str) -> None:
    """Refuse anchors and aliases, and documents too deep or too large, from the parser's events:
    nothing is built yet, and the scan stops at the first event over a limit."""
    depth = nodes = 0
    for event in events:
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise RequestError(f"{source}: YAML anchors and aliases (&name, *name) are not allowed; write values out")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_RECIPE_DEPTH:
                raise RequestError(f"{source}: nested deeper than {MAX_RECIPE_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        if isinstance(event, (yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            nodes += 1
            if nodes > MAX_RECIPE_NODES:
                raise RequestError(f"{source}: more than {MAX_RECIPE_NODES:,} values")


def _where(err) -> str:
    """' (line L, column C: problem)' of a YAML error, without the snippet of text PyYAML adds;
    quoted parts of the problem (a character, a tag from the text) are left out too."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return ""
    problem = re.sub(r"'[^']*'|\"[^\"]*\"", "...", str(getattr(err, "problem", None) or "a syntax error"))
    return f" (line {mark.line + 1}, column {mark.column + 1}: {problem[:200]})"


def check_document(data, where: str = "recipe") -> None:
    """A parsed recipe (or part) within MAX_RECIPE_DEPTH and MAX_RECIPE_NODES, containing no
    mapping or list inside itself; else a RequestError. For dicts built in Python or by the API."""
    count = 0
    path: set[int] = set()  # the collections we are inside, by id: one seen again contains itself

    def visit(value, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_RECIPE_NODES:
            raise RequestError(f"{where}: more than {MAX_RECIPE_NODES:,} values")
        if not isinstance(value, (dict, list, tuple)):
            return
        if id(value) in path:
            raise RequestError(f"{where}: refers to itself (a mapping or list contains itself)")
        if depth > MAX_RECIPE_DEPTH:
            raise RequestError(f"{where}: nested deeper than {MAX_RECIPE_DEPTH} levels")
        path.add(id(value))
        for item in (x for pair in value.items() for x in pair) if isinstance(value, dict) else value:
            visit(item, depth + 1)
        path.discard(id(value))

    visit(data, 1)


def check_tree_depth(node: MergeNode, where: str = "tree") -> None:
    """A tree built in Python within MAX_TREE_DEPTH levels (the engine walks trees recursively)."""
    level, depth = [node], 1
    while level:
        if depth > MAX_TREE_DEPTH:
            raise RequestError(f"{where}: the merge tree is nested deeper than {MAX_TREE_DEPTH} levels of methods")
        level = [item for parent in level for item in parent.inputs if isinstance(item, MergeNode)]
        depth += 1


@functools.cache
def _dumper():
    import yaml

    class NoAliases(yaml.SafeDumper):
        """Writes a value used twice out twice: recipes with anchors are refused when read back."""

        def ignore_aliases(self, data) -> bool:
            return True

    return NoAliases


def dump_recipe(data: dict, path: Path | None = None) -> str:
    """YAML when the path ends in .yaml/.yml (or no path and PyYAML is here), else JSON."""
    as_yaml = path is None or Path(path).suffix.lower() in (".yaml", ".yml")
    if as_yaml:
        try:
            import yaml

            return yaml.dump(data, Dumper=_dumper(), sort_keys=False, allow_unicode=True)
        except ImportError:
            if path is not None:
                raise RequestError(f"{path}: PyYAML is not installed; save the recipe as .json") from None
    return json.dumps(data, indent=2) + "\n"
