"""The tab's method part, generated from the registry: parameter controls, block weights, recipes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from .. import blocks
from ..errors import MergeError, RequestError
from ..methods import BOOL, FLOATS, INT, METHODS, Param, get_method
from ..recipe import dump_recipe
from ..recipe import load_recipe as read_recipe_file
from . import compat
from .recipe_fields import PARAM_NAMES, TAB_FIELDS, block_chart, controls_from_recipe

# The first method that declares a parameter gives its control's range and default.
PARAMS: dict[str, Param] = {}
for _method in METHODS.values():
    for _name, _param in _method.params.items():
        PARAMS.setdefault(_name, _param)


def build_params() -> dict:
    """One control per parameter name in the registry; the method's choice shows its own."""
    controls = {}
    with gr.Row():
        for name in PARAM_NAMES:
            controls[f"param_{name}"] = _control(PARAMS[name])
    return controls


def _control(param: Param):
    label = f"{param.name} ({param.help})" if param.help else param.name
    elem_id = f"merge_lab_param_{param.name}"
    if param.kind == BOOL:
        return gr.Checkbox(bool(param.default), label=label, visible=False, elem_id=elem_id)
    if param.kind == FLOATS:
        return gr.Textbox("", label=f"{label}: comma list", visible=False, elem_id=elem_id)
    if param.kind == INT:
        return gr.Number(param.default, precision=0, label=label, visible=False, elem_id=elem_id)
    if param.low is not None and param.high is not None:
        return gr.Slider(param.low, param.high, value=param.default, step=0.01, label=label, visible=False,
                         elem_id=elem_id)  # fmt: skip
    return gr.Number(param.default, label=label, visible=False, elem_id=elem_id)


def build_blocks() -> dict:
    """Per-block values of one parameter: text, presets and a chart of the values."""
    with gr.Accordion("Block weights", open=False, elem_id="merge_lab_blocks"):
        with gr.Row():
            block_param = gr.Dropdown(["alpha"], value="alpha", label="Parameter", elem_id="merge_lab_block_param")
            preset = gr.Dropdown(["", *blocks.presets()], value="", label="Preset", elem_id="merge_lab_block_preset")
        block_text = gr.Textbox(
            "",
            label=(
                "Per block: BASE then one value per block (SD1 26 values BASE,IN00..OUT11, SDXL 20, "
                "Flux 58 BASE,D00..D18,S00..S37, SD3 medium 25 BASE,J00..J23, SD3.5 large 39), "
                "IN04=0.3,S*=0.7, or a preset name; empty: off"
            ),
            elem_id="merge_lab_block_text",
        )
        chart = gr.HTML(block_chart("", blocks.SD1, 0.3, "alpha"), elem_id="merge_lab_block_chart")
    return {"block_param": block_param, "block_preset": preset, "block_text": block_text, "block_chart": chart}


def build_recipe() -> dict:
    with gr.Accordion("Recipe", open=False, elem_id="merge_lab_recipe"):
        with gr.Row():
            save = gr.Button("Save recipe", elem_id="merge_lab_save_recipe")
            load = gr.UploadButton(
                "Load recipe", file_types=[".yaml", ".yml", ".json"], elem_id="merge_lab_load_recipe"
            )
        recipe_file = gr.File(label="Recipe file", interactive=False, elem_id="merge_lab_recipe_file")
        recipe_note = gr.Markdown("", elem_id="merge_lab_recipe_note")
    loading = gr.State(None)  # a loaded recipe's values, until the method change it causes has applied them
    return {"save_recipe": save, "load_recipe": load, "recipe_file": recipe_file, "recipe_note": recipe_note,
            "loading_recipe": loading}  # fmt: skip


def method_updates(label: str, loading: dict | None = None) -> list:
    """Visibility of More models, the multiplier and each parameter control for the chosen method,
    each parameter at its default, or at the value of the recipe ``loading`` when it is for this
    method; then None, which clears ``loading`` (a recipe is applied once).

    gradio fires the method's change event after a recipe load sets the method, so without the
    recipe at hand this reset would overwrite the values the load had just put in.
    """
    method = get_method(label)
    recipe = loading if loading and loading.get("interp_method") == label else {}
    per_block = [p.name for p in method.params.values() if p.per_block]
    updates = [
        gr.update(visible=bool(method.variadic)),  # more models
        gr.update(visible="alpha" in method.params, **_recipe_value(recipe, "multiplier")),
    ]
    for name in PARAM_NAMES:
        if name not in method.params:
            updates.append(gr.update(visible=False))
        elif PARAMS[name].kind == FLOATS:
            updates.append(gr.update(visible=True, **_recipe_value(recipe, f"param_{name}")))
        else:
            updates.append(gr.update(visible=True, value=recipe.get(f"param_{name}", method.params[name].default)))
    block_param = recipe.get("block_param") or (per_block[0] if per_block else "alpha")
    updates.append(gr.update(choices=per_block or ["alpha"], value=block_param))
    return [*updates, None]


def _recipe_value(recipe: dict, field: str) -> dict:
    return {"value": recipe[field]} if field in recipe else {}


def save_recipe(recipe: dict | None) -> tuple:
    """The recipe as a YAML file to download, or a message saying why there is none."""
    if recipe is None:
        return gr.update(value=None), "Nothing to save: pick a method and its models first."
    folder = Path(tempfile.mkdtemp(prefix="merge-lab-recipe-"))
    path = folder / "merge-lab-recipe.yaml"
    path.write_text(dump_recipe(recipe), encoding="utf-8")
    return gr.update(value=str(path)), f"Saved: `{path.name}` (replay: `python -m lib_merge run {path.name}`)"


def load_recipe(upload, fields: tuple[str, ...], method_now: str, upload_dirs: list[Path]) -> list:
    """Control values from an uploaded recipe, in ``fields`` order, a note, and the values for
    ``method_updates`` to apply again when the recipe changes the method (else None)."""
    try:
        values = controls_from_recipe(read_recipe_file(uploaded_path(upload, upload_dirs)))
    except (MergeError, KeyError, TypeError) as err:
        return [gr.update() for _ in fields] + [f"Could not load the recipe: {err}", None]
    if values is None:
        note = "This recipe nests methods; merge it with `python -m lib_merge run` or the API."
        return [gr.update() for _ in fields] + [note, None]
    updates = [gr.update(value=values[name]) if name in values else gr.update() for name in fields]
    return [*updates, "Recipe loaded.", values if values["interp_method"] != method_now else None]


def uploaded_path(upload, upload_dirs: list[Path]) -> Path:
    """The file of an upload. gradio 3 copies whatever path a client names as an "uploaded" file,
    so the name the client gave must lie in gradio's upload folder too: a client cannot make the
    tab read /etc/passwd or a model. (gradio 4 refuses such a name itself; the check stays.)"""
    names = compat.upload_names(upload)
    inside = [any(Path(name).resolve().is_relative_to(folder) for folder in upload_dirs) for name in names]
    if not names or not all(inside):
        raise RequestError("recipe: not a file uploaded from this page; use the Load recipe button")
    return Path(names[-1])


__all__ = ["TAB_FIELDS", "build_blocks", "build_params", "build_recipe", "load_recipe", "method_updates", "save_recipe"]
