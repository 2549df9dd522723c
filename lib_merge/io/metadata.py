"""Output names, safetensors metadata and the ``.yaml`` config copy, exactly as the built-in does them."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError, RequestError
from ..hosts import Checkpoint, legacy_hash
from ..methods import get_method
from ..recipe import MergeNode, ModelRef, recipe_dict
from ..request import MergeRequest

RECIPE_TYPE = "merge-lab"
BUILTIN_METHODS = ("weighted_sum", "add_difference", "no_interpolation")
LONGEST_NAME = 120
# Fields (modelspec.architecture, .prediction_type, .title ...) that describe one model, not a merge.
MODELSPEC = "modelspec."


@dataclass(frozen=True)
class InputCheckpoint:
    """One merge input as the metadata needs it: file, name, full hash and its own metadata."""

    checkpoint: Checkpoint
    sha256: str | None
    metadata: dict[str, str]


def output_stem(request: MergeRequest, tree: MergeNode, checkpoints: dict[str, Checkpoint], variant: str | None) -> str:
    """``0.7(a) + 0.3(b)``, ``a + 1.0(b - c)`` or ``a`` as the built-in names them; ``soup(a, b, c)``
    for other methods; or the custom name. Then the variant suffix."""
    names = [checkpoints[ref.name].model_name for ref in tree.models()]
    if request.custom_name:
        stem = request.custom_name
    elif is_builtin(tree):
        stem = _builtin_stem(tree.method, tree.params.get("alpha", 0.0), names)
    elif (baked := _bake_stem(tree, checkpoints)) is not None:
        stem = _short(baked)
    else:
        stem = _short(f"{tree.method}({', '.join(names)})")
    return stem + (f".{variant}" if variant else "")


def is_builtin(tree: MergeNode) -> bool:
    """A merge the built-in could do: one of its methods over models, with no per-block values."""
    return (
        get_method(tree.method).name in BUILTIN_METHODS
        and not tree.blocks
        and all(isinstance(i, ModelRef) for i in tree.inputs)
    )


def _builtin_stem(method: str, m: float, names: list[str]) -> str:
    method = get_method(method).name
    if method == "weighted_sum":
        return f"{round(1 - m, 2)}({names[0]}) + {round(m, 2)}({names[1]})"
    if method == "add_difference":
        return f"{names[0]} + {round(m, 2)}({names[1]} - {names[2]})"
    return names[0]


def _bake_stem(node: MergeNode, checkpoints: dict[str, Checkpoint]) -> str | None:
    """``model + 0.8(style) + 0.5(detail)`` for LoRAs baked into one model (each ratio as given,
    per-block or not); None for any other tree."""
    base, lora = node.inputs if len(node.inputs) == 2 else (None, None)
    if get_method(node.method).name != "add_delta" or not isinstance(lora, ModelRef) or not lora.lora:
        return None
    below = checkpoints[base.name].model_name if isinstance(base, ModelRef) else _bake_stem(base, checkpoints)
    if below is None:
        return None
    return f"{below} + {round(node.params.get('alpha', 1.0), 2)}({checkpoints[lora.name].model_name})"


def _short(stem: str) -> str:
    """File names stay well under the usual 255-byte limit."""
    return stem if len(stem) <= LONGEST_NAME else stem[: LONGEST_NAME - 3].rstrip(", ") + "..."


def merge_recipe(
    request: MergeRequest,
    tree: MergeNode,
    inputs: list[InputCheckpoint],
    variant: str | None,
    user_fields: list[str] | None = None,
) -> dict:
    """The built-in's ``sd_merge_recipe`` fields, with ``type`` naming this project, and Merge Lab's
    whole recipe (tree and output fields) under ``merge_lab_recipe``, from which it replays.

    The user's metadata is stored once, as the file's own fields: the recipe keeps only their names
    (``metadata_fields``), and replay reads the values back from the file (cli.recipes.recipe_of).
    """
    hashes = [i.sha256 for i in inputs] + [None] * (3 - len(inputs))
    builtin_fields = request.tree is None
    recipe = recipe_dict(request, tree)
    recipe["output"] = {name: value for name, value in recipe["output"].items() if name != "metadata_json"}
    if user_fields is None:
        user_fields = list(user_metadata(request.metadata_json))
    return {
        "type": RECIPE_TYPE,
        "primary_model_hash": hashes[0],
        "secondary_model_hash": hashes[1],
        "tertiary_model_hash": hashes[2],
        "interp_method": request.interp_method if builtin_fields else get_method(tree.method).label,
        "multiplier": request.multiplier if builtin_fields else tree.params.get("alpha"),
        "save_as_half": request.save_as_half,
        "custom_name": request.custom_name,
        "config_source": request.config_source,
        "bake_in_vae": request.bake_in_vae,
        "discard_weights": request.discard_weights,
        "is_inpainting": variant == "inpainting",
        "is_instruct_pix2pix": variant == "instruct-pix2pix",
        "merge_lab_recipe": recipe,
        "metadata_fields": user_fields,
    }


def user_metadata(metadata_json: str) -> dict[str, str]:
    """The user's JSON object; refused when invalid (the built-in silently drops it) or too large."""
    from ..request import MAX_METADATA_JSON

    if not metadata_json:
        return {}
    if not isinstance(metadata_json, str):
        raise RequestError(f"metadata_json: expected JSON text, got {type(metadata_json).__name__}")
    if len(metadata_json) > MAX_METADATA_JSON:
        raise RequestError(f"metadata_json: over {MAX_METADATA_JSON:,} characters; keep the metadata short")
    if not metadata_json.strip():
        return {}
    try:
        parsed = json.loads(metadata_json)
    except json.JSONDecodeError as err:
        raise RequestError(f"metadata_json: not valid JSON ({err})") from None
    except RecursionError:
        raise RequestError("metadata_json: nested too deeply") from None
    except ValueError:  # Python refuses integers of over 4300 digits
        raise RequestError("metadata_json: a number has too many digits") from None
    if not isinstance(parsed, dict):
        raise RequestError("metadata_json: expected a JSON object of fields")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in parsed.items()}


def build_metadata(
    request: MergeRequest, tree: MergeNode, inputs: list[InputCheckpoint], variant: str | None
) -> dict[str, str]:
    """The output's safetensors metadata; empty when the user asked for none."""
    if not request.save_metadata:
        return {}
    metadata: dict[str, str] = {}
    if request.copy_metadata_fields:
        for item in inputs:
            metadata.update(item.metadata)
        _keep_primary_modelspec(metadata, inputs[0].metadata)
    users = user_metadata(request.metadata_json)
    metadata.update(users)
    metadata["format"] = "pt"
    if request.add_merge_recipe:
        models: dict = {}
        for item in inputs:
            models[item.sha256] = {
                "name": item.checkpoint.name,
                "legacy_hash": legacy_hash(item.checkpoint.path),
                "sd_merge_recipe": _json_field(item.metadata, "sd_merge_recipe"),
            }
            models.update(_json_field(item.metadata, "sd_merge_models") or {})
        metadata["sd_merge_recipe"] = json.dumps(merge_recipe(request, tree, inputs, variant, list(users)))
        metadata["sd_merge_models"] = json.dumps(models)
    return metadata


def _keep_primary_modelspec(metadata: dict[str, str], primary: dict[str, str]) -> None:
    """modelspec.* fields describe one model (architecture, prediction type): the output keeps A's
    weights layout and marker keys, so it keeps A's modelspec fields, not the last input's."""
    for name in [name for name in metadata if name.startswith(MODELSPEC)]:
        del metadata[name]
    metadata.update({name: value for name, value in primary.items() if name.startswith(MODELSPEC)})


def _json_field(metadata: dict[str, str], field: str):
    """A field the webui would have parsed as JSON (values starting with '{'), else the raw value."""
    value = metadata.get(field)
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def config_near(checkpoint: Checkpoint | None) -> Path | None:
    """``<stem>.yaml`` beside a checkpoint, as the webui's find_checkpoint_config_near_filename."""
    if checkpoint is None:
        return None
    config = Path(os.path.splitext(checkpoint.path)[0] + ".yaml")
    return config if config.exists() else None


def config_to_copy(config_source: int, a: Checkpoint, b: Checkpoint | None, c: Checkpoint | None) -> Path | None:
    """0: the first of A, B, C that has one; 1: B's; 2: C's; 3: none."""
    if config_source == 0:
        return config_near(a) or config_near(b) or config_near(c)
    return {1: config_near(b), 2: config_near(c)}.get(config_source)


def config_destination(output: Path) -> Path:
    return Path(os.path.splitext(output)[0] + ".yaml")


def copy_config(source: Path, output: Path) -> Path:
    """Copy the config beside the output through a temp file, so a failed copy leaves nothing."""
    destination = config_destination(output)
    temp = destination.with_name(f".{destination.name}.merge-lab.tmp")
    try:
        shutil.copyfile(source, temp)
        os.replace(temp, destination)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise OutputError(f"{destination}: the config could not be copied ({err.strerror})") from None
    return destination
