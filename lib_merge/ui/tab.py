"""The Merge Lab tab: build_tab(host) -> gr.Blocks, the same UI in the webui and standalone.

Built in small named builders; every event goes through ``actions`` with a MergeRequest, so the
tab holds no merge logic. Only gradio APIs that gradio 3.41 and 4.40 share are used (``gr.update``,
no ``.update`` class methods); what differs between them is in ``compat``. The page script hooks
are passed only inside the webui, where ``javascript/merge_lab.js`` defines them.
"""

from __future__ import annotations

import logging
import uuid

import gradio as gr

from .. import actions, arch, lora_actions, precision
from ..errors import MergeError, brief
from ..hosts import AppHost
from ..io.formats import open_checkpoint
from ..methods import get_method, listed_methods
from ..request import CONFIG_SOURCES, FORMATS
from . import compat, experiments, lora_section, method_controls
from .messages import done_html, error_html
from .recipe_fields import PARAM_NAMES, TAB_FIELDS, block_chart, pickers_text, recipe_from_controls

log = logging.getLogger("merge_lab")
NO_VAE = "None"

REQUEST_FIELDS = actions.REQUEST_FIELDS
# The order the merge event receives the fields (after the task id): the request's, then the method controls'.
ALL_FIELDS = (*REQUEST_FIELDS, *TAB_FIELDS)
# The fields that change what the preflight says (the metadata ones do not).
PREFLIGHT_INPUTS = (
    "primary_model_name", "secondary_model_name", "tertiary_model_name", "interp_method", "multiplier",
    "save_as_half", "dtype", "custom_name", "checkpoint_format", "bake_in_vae", "discard_weights", "overwrite",
    *TAB_FIELDS,
)  # fmt: skip


def build_tab(host: AppHost, *, in_webui: bool = False) -> gr.Blocks:
    """The whole tab over ``host``; ``in_webui`` adds the page-side hooks (progress bar, txt2img)."""
    with gr.Blocks(analytics_enabled=False, title="Merge Lab") as tab:
        with gr.Row(equal_height=False):
            with gr.Column(variant="compact"):
                ui = build_inputs(host)
                ui.update(build_method())
                ui.update(build_output(host))
                ui.update(method_controls.build_blocks())
                ui.update(build_metadata())
                ui.update(method_controls.build_recipe())
                ui.update(lora_section.build_lora(host))
            with gr.Column(variant="compact"):
                ui.update(build_actions(host, in_webui))
                ui.update(experiments.build_try(host))
                ui.update(experiments.build_sweep(host))
                ui.update(experiments.build_greedy(host))
        wire_events(host, ui, in_webui)
        wire_experiments(host, ui, in_webui)
        wire_lora(host, ui, in_webui)
    return tab


def build_inputs(host: AppHost) -> dict:
    with gr.Row():
        models = {
            f"{role}_model_name": gr.Dropdown(host.checkpoints(), label=label, elem_id=f"merge_lab_{role}")
            for role, label in (
                ("primary", "Primary model (A)"),
                ("secondary", "Secondary model (B)"),
                ("tertiary", "Tertiary model (C)"),
            )
        }
        refresh = gr.Button("Refresh lists", elem_id="merge_lab_refresh", scale=0)
    more_models = gr.Dropdown(
        host.checkpoints(), multiselect=True, visible=False, label="More models (D, E ...)",
        elem_id="merge_lab_more_models",
    )  # fmt: skip
    return {**models, "refresh": refresh, "more_models": more_models}


def build_method() -> dict:
    labels = [m.label for m in listed_methods()]
    method = gr.Radio(labels, value=labels[0], label="Method", elem_id="merge_lab_method")
    about = gr.Markdown(_describe(labels[0]), elem_id="merge_lab_method_about")
    multiplier = gr.Slider(
        minimum=-1.0,
        maximum=2.0,
        step=0.05,
        value=0.3,
        label="Multiplier (M): 0 gives A; below 0 or above 1 extrapolates",
        elem_id="merge_lab_multiplier",
    )
    return {"interp_method": method, "about": about, "multiplier": multiplier, **method_controls.build_params()}


def build_output(host: AppHost) -> dict:
    custom_name = gr.Textbox(label="Custom name (optional)", elem_id="merge_lab_custom_name")
    with gr.Row():
        checkpoint_format = gr.Radio(
            list(FORMATS), value="safetensors", label="Format", elem_id="merge_lab_checkpoint_format"
        )
        save_as_half = gr.Checkbox(False, label="Save as float16", elem_id="merge_lab_save_as_half")
        dtype = gr.Dropdown(
            list(precision.CHOICES), value=precision.BUILTIN, elem_id="merge_lab_dtype",
            label="Output precision (builtin: the inputs' type; keep: A's; rounded once, fp8 saturating)",
        )  # fmt: skip
        overwrite = gr.Checkbox(False, label="Overwrite an existing file", elem_id="merge_lab_overwrite")
    with gr.Row():
        config_source = gr.Radio(
            list(CONFIG_SOURCES), value=CONFIG_SOURCES[0], type="index", label="Copy config from",
            elem_id="merge_lab_config_source",
        )  # fmt: skip
        bake_in_vae = gr.Dropdown([NO_VAE, *host.vaes()], value=NO_VAE, label="Bake in VAE", elem_id="merge_lab_vae")
    discard_weights = gr.Textbox(label="Discard weights matching (regex)", elem_id="merge_lab_discard_weights")
    with gr.Row():
        devices = host.devices()
        device = gr.Dropdown(devices, value=devices[0], label="Merge on", elem_id="merge_lab_device")
        load = gr.Checkbox(
            host.can_load and host.load_by_default,
            label="Load merged model now",
            visible=host.can_load,
            elem_id="merge_lab_load",
        )
    return {
        "custom_name": custom_name,
        "checkpoint_format": checkpoint_format,
        "save_as_half": save_as_half,
        "dtype": dtype,
        "overwrite": overwrite,
        "config_source": config_source,
        "bake_in_vae": bake_in_vae,
        "discard_weights": discard_weights,
        "device": device,
        "load": load,
    }


def build_metadata() -> dict:
    with gr.Accordion("Metadata", open=False, elem_id="merge_lab_metadata") as accordion:
        with gr.Row():
            save_metadata = gr.Checkbox(True, label="Save metadata", elem_id="merge_lab_save_metadata")
            add_merge_recipe = gr.Checkbox(True, label="Add merge recipe", elem_id="merge_lab_add_recipe")
            copy_metadata_fields = gr.Checkbox(
                True, label="Copy metadata from merged models", elem_id="merge_lab_copy_metadata"
            )
        metadata_json = gr.Textbox("{}", lines=4, label="Metadata (JSON)", elem_id="merge_lab_metadata_json")
        read_metadata = gr.Button("Read metadata from the picked checkpoints", elem_id="merge_lab_read_metadata")
    return {
        "metadata": accordion,
        "save_metadata": save_metadata,
        "add_merge_recipe": add_merge_recipe,
        "copy_metadata_fields": copy_metadata_fields,
        "metadata_json": metadata_json,
        "read_metadata": read_metadata,
    }


def build_actions(host: AppHost, in_webui: bool) -> dict:
    preflight = gr.Textbox(
        "Pick the primary model (A) to see what the merge will do.",
        label="Preflight (from the files' headers; nothing written yet)",
        lines=9,
        interactive=False,
        elem_id="merge_lab_preflight",
    )
    with gr.Row():
        merge = gr.Button("Merge", variant="primary", elem_id="merge_lab_merge")
        merge_open = gr.Button("Merge & open txt2img", visible=in_webui, elem_id="merge_lab_merge_open")
        cancel = gr.Button("Cancel", variant="stop", elem_id="merge_lab_cancel")
    with gr.Group(elem_id="merge_lab_results_panel"):
        result = gr.HTML(elem_id="merge_lab_result")
    task_id = gr.Textbox(visible=False, elem_id="merge_lab_task_id")
    open_txt2img = gr.Checkbox(False, visible=False, elem_id="merge_lab_open_txt2img")
    return {
        "page": gr.State({}),  # this page's own: its jobs' owner id (see page_owner)
        "preflight": preflight,
        "merge": merge,
        "merge_open": merge_open,
        "cancel": cancel,
        "result": result,
        "task_id": task_id,
        "open_txt2img": open_txt2img,
    }


def wire_events(host: AppHost, ui: dict, in_webui: bool) -> None:
    fields = [ui[name] for name in ALL_FIELDS]
    pickers = [ui["primary_model_name"], ui["secondary_model_name"], ui["tertiary_model_name"], ui["more_models"]]

    def show_preflight(*values):
        return _preflight_text(host, dict(zip(ALL_FIELDS, values, strict=True)))

    for name in PREFLIGHT_INPUTS:
        ui[name].change(show_preflight, inputs=fields, outputs=[ui["preflight"]], queue=False)
    ui["interp_method"].change(_describe, inputs=[ui["interp_method"]], outputs=[ui["about"]], queue=False)
    method_outputs = [ui["more_models"], ui["multiplier"]]
    method_outputs += [ui[f"param_{name}"] for name in PARAM_NAMES] + [ui["block_param"]]
    ui["interp_method"].change(
        method_controls.method_updates, inputs=[ui["interp_method"], ui["loading_recipe"]],
        outputs=[*method_outputs, ui["loading_recipe"]], queue=False,
    )  # fmt: skip
    ui["checkpoint_format"].change(
        lambda fmt: gr.update(visible=fmt == "safetensors"), inputs=[ui["checkpoint_format"]],
        outputs=[ui["metadata"]], queue=False,
    )  # fmt: skip
    ui["read_metadata"].click(
        lambda *names: _guarded(lambda: actions.read_metadata(host, list(names))),
        inputs=pickers[:3], outputs=[ui["metadata_json"]],
    )  # fmt: skip
    wire_recipe_events(host, ui, fields)

    def refresh():
        host.refresh()
        return [gr.update(choices=host.checkpoints()) for _ in pickers] + [gr.update(choices=[NO_VAE, *host.vaes()])]

    ui["refresh"].click(refresh, outputs=[*pickers, ui["bake_in_vae"]])
    ui["cancel"].click(lambda page: _cancel(host, page), inputs=[ui["page"]], queue=False)

    # gradio inserts the progress tracker at its parameter's position, so it comes first. The page's
    # state comes last: the page script (javascript/merge_lab.js) rewrites the first values.
    def on_merge(progress=gr.Progress(), task_id="", open_txt2img=False, *values):  # noqa: B008 (gradio's idiom)
        *values, page = values
        fields = _request_fields(dict(zip(ALL_FIELDS, values, strict=True)))
        message = _merge(host, fields, task_id, page_owner(page), open_txt2img, progress)
        return [message] + [gr.update(choices=host.checkpoints()) for _ in pickers]

    for button, opens in ((ui["merge"], False), (ui["merge_open"], True)):
        button.click(
            on_merge,
            inputs=[ui["task_id"], ui["open_txt2img"], *fields, ui["page"]],
            outputs=[ui["result"], *pickers],
            **_page_hook("mergeLabOpenTxt2img" if opens else "mergeLabMerge", in_webui),
        )


def wire_experiments(host: AppHost, ui: dict, in_webui: bool) -> None:
    """Try, Save tried, Restore, the sweep's axes and run, Save this one; then the greedy soup's."""
    fields = [ui[name] for name in ALL_FIELDS]
    result, tried, page = ui["result"], ui["tried_recipe"], ui["page"]

    def on_try(task_id="", *values):
        *values, state = values
        fields = _request_fields(dict(zip(ALL_FIELDS, values, strict=True)))
        message, recipe = experiments.try_merge(host, fields, task_id, page_owner(state))
        return message, recipe, gr.update(interactive=recipe is not None)

    ui["try"].click(
        on_try, inputs=[ui["task_id"], *fields, page], outputs=[result, tried, ui["save_tried"]],
        **_page_hook("mergeLabTask", in_webui),
    )  # fmt: skip
    ui["save_tried"].click(
        lambda recipe, state: experiments.save_recipe_file(host, recipe, "try a merge", page_owner(state)),
        inputs=[tried, page], outputs=[result],
    )  # fmt: skip
    ui["restore"].click(lambda state: experiments.restore(host, page_owner(state)), inputs=[page], outputs=[result])
    ui["interp_method"].change(
        experiments.axis_updates, inputs=[ui["interp_method"]], outputs=[ui["x_param"], ui["y_param"]], queue=False
    )
    sweep_inputs = [ui[name] for name in (*experiments.AXIS_FIELDS, *experiments.IMAGE_FIELDS)]
    count = len(sweep_inputs)

    def on_sweep(progress=gr.Progress(), task_id="", *values):  # noqa: B008 (gradio's idiom)
        *values, state = values
        named = dict(zip((*experiments.AXIS_FIELDS, *experiments.IMAGE_FIELDS), values[:count], strict=True))
        merge_fields = _request_fields(dict(zip(ALL_FIELDS, values[count:], strict=True)))
        return experiments.run_sweep(host, merge_fields, named, named, task_id, page_owner(state), progress)

    ui["sweep"].click(
        on_sweep, inputs=[ui["task_id"], *sweep_inputs, *fields, page],
        outputs=[ui["gallery"], result, ui["cell"], ui["cell_recipes"]],
        **_page_hook("mergeLabSweep", in_webui),
    )  # fmt: skip
    ui["save_cell"].click(
        lambda label, recipes, state: experiments.save_recipe_file(
            host, (recipes or {}).get(label), "run a sweep and pick a cell", page_owner(state)
        ),
        inputs=[ui["cell"], ui["cell_recipes"], page], outputs=[result],
    )  # fmt: skip
    if in_webui:
        txt2img = [ui[name] for name in experiments.IMAGE_FIELDS]
        ui["from_txt2img"].click(None, inputs=txt2img, outputs=txt2img, **compat.page_hook("mergeLabFromTxt2img"))

    wire_greedy(host, ui, in_webui)


def wire_greedy(host: AppHost, ui: dict, in_webui: bool) -> None:
    """Greedy soup: Start, Keep soup / Add candidate (the user's picks), Save soup. Its images take
    the sweep's image fields, but the prompt: it has its own list."""
    result = ui["result"]
    image_inputs = [ui[name] for name in experiments.IMAGE_FIELDS]
    greedy_outputs = [ui["greedy_soup"], ui["greedy_candidate"], result]
    greedy_outputs += [ui[f"greedy_{name}"] for name in ("walk", "recipe", "keep", "add", "save")]

    def on_greedy_start(progress=gr.Progress(), task_id="", candidates=None, prompts="", scorer="", *values):  # noqa: B008
        *values, state = values
        image = dict(zip(experiments.IMAGE_FIELDS, values, strict=True))
        return experiments.start_greedy(host, candidates, prompts, scorer, image, task_id, page_owner(state), progress)

    ui["greedy_start"].click(
        on_greedy_start,
        inputs=[ui["task_id"], ui["greedy_candidates"], ui["greedy_prompts"], ui["greedy_scorer"], *image_inputs,
                ui["page"]],
        outputs=greedy_outputs, **_page_hook("mergeLabTask", in_webui),
    )  # fmt: skip

    def decide(add: bool):
        return lambda task_id, state, page: experiments.decide_greedy(host, state, add, task_id, page_owner(page))

    for name, add in (("greedy_keep", False), ("greedy_add", True)):
        ui[name].click(decide(add), inputs=[ui["task_id"], ui["greedy_walk"], ui["page"]], outputs=greedy_outputs,
                       **_page_hook("mergeLabTask", in_webui))  # fmt: skip
    ui["greedy_save"].click(
        lambda recipe, page: experiments.save_recipe_file(host, recipe, "find a greedy soup", page_owner(page)),
        inputs=[ui["greedy_recipe"], ui["page"]], outputs=[result],
    )  # fmt: skip


def wire_lora(host: AppHost, ui: dict, in_webui: bool) -> None:
    """Bake, Try bake, Sweep bake, Extract, Merge LoRAs: each into the shared result panel (its progress bar),
    on the device picked for merges; a LoRA written refreshes the LoRA pickers."""
    section = lora_section
    page, result, device = ui["page"], ui["result"], ui["device"]
    pickers = [ui[f"{prefix}_lora_{row}"] for prefix in ("bake", "combine") for row in range(section.ROWS)]
    # Every checkpoint picker of the tab: a baked checkpoint joins them all.
    names = ("bake_checkpoint", "extract_base", "extract_tuned", "primary_model_name", "secondary_model_name",
             "tertiary_model_name", "more_models")  # fmt: skip
    checkpoints = [ui[name] for name in names]

    def inputs(names):
        return [ui["task_id"], *(ui[name] for name in names), device, page]

    def named(names, values):
        *values, device_value, state = values
        return dict(zip(names, values, strict=True)), device_value, page_owner(state)

    def on_bake(task_id="", *values):
        fields, device_value, owner = named(section.BAKE_FIELDS, values)
        message = section.bake(host, section.bake_fields(fields, device_value), task_id, owner)
        return [message] + [gr.update(choices=host.checkpoints()) for _ in checkpoints]

    def on_try(task_id="", *values):
        fields, device_value, owner = named(section.BAKE_FIELDS, values)
        message, recipe = section.try_bake(host, section.bake_fields(fields, device_value), task_id, owner)
        return message, recipe, gr.update(interactive=recipe is not None)

    sweep_names = (*experiments.AXIS_FIELDS, *experiments.IMAGE_FIELDS)

    def on_sweep(progress=gr.Progress(), task_id="", *values):  # noqa: B008 (gradio's idiom)
        axes = dict(zip(sweep_names, values[: len(sweep_names)], strict=True))
        fields, device_value, owner = named(section.BAKE_FIELDS, values[len(sweep_names) :])
        return section.sweep_bake(host, section.bake_fields(fields, device_value), axes, axes, task_id, owner, progress)

    def writes_lora(names, to_fields, run):
        def on_click(task_id="", *values):
            fields, device_value, owner = named(names, values)
            message = section.write_lora(host, run, to_fields(fields, device_value), task_id, owner)
            return [message, *section.lora_choices(host)]

        return on_click

    hook = _page_hook("mergeLabTask", in_webui)
    ui["bake"].click(on_bake, inputs=inputs(section.BAKE_FIELDS), outputs=[result, *checkpoints], **hook)
    ui["bake_try"].click(on_try, inputs=inputs(section.BAKE_FIELDS),
                         outputs=[result, ui["tried_recipe"], ui["save_tried"]], **hook)  # fmt: skip
    # The sweep's inputs first, as the page script's mergeLabSweep reads them (the prompt from txt2img).
    ui["bake_sweep"].click(
        on_sweep, inputs=[ui["task_id"], *(ui[name] for name in sweep_names), *inputs(section.BAKE_FIELDS)[1:]],
        outputs=[ui["gallery"], result, ui["cell"], ui["cell_recipes"]], **_page_hook("mergeLabSweep", in_webui),
    )  # fmt: skip
    ui["extract"].click(
        writes_lora(section.EXTRACT_FIELDS, section.extract_fields, lora_actions.run_extract),
        inputs=inputs(section.EXTRACT_FIELDS), outputs=[result, *pickers], **hook,
    )  # fmt: skip
    ui["combine"].click(
        writes_lora(section.COMBINE_FIELDS, section.combine_fields, lora_actions.run_merge),
        inputs=inputs(section.COMBINE_FIELDS), outputs=[result, *pickers], **hook,
    )  # fmt: skip
    ui["lora_refresh"].click(lambda: section.lora_choices(host), outputs=pickers, queue=False)


def wire_recipe_events(host: AppHost, ui: dict, fields: list) -> None:
    """Block chart, presets, Save recipe and Load recipe."""

    def chart(*values):
        named = dict(zip(ALL_FIELDS, values, strict=True))
        param = named.get("block_param") or "alpha"
        default = named.get("multiplier") if param == "alpha" else named.get(f"param_{param}")
        return block_chart(named.get("block_text") or "", _family(host, named), float(default or 0), param)

    for name in ("block_text", "block_param", "primary_model_name"):
        ui[name].change(chart, inputs=fields, outputs=[ui["block_chart"]], queue=False)
    ui["block_preset"].change(lambda name: name, inputs=[ui["block_preset"]], outputs=[ui["block_text"]], queue=False)

    def save(*values):
        try:
            return method_controls.save_recipe(recipe_from_controls(dict(zip(ALL_FIELDS, values, strict=True))))
        except MergeError as err:
            return gr.update(value=None), f"Not saved: {err}"

    ui["save_recipe"].click(save, inputs=fields, outputs=[ui["recipe_file"], ui["recipe_note"]], queue=False)
    upload_dirs = compat.upload_folders(ui["load_recipe"])
    ui["load_recipe"].upload(
        lambda upload, method: method_controls.load_recipe(upload, ALL_FIELDS, method, upload_dirs),
        inputs=[ui["load_recipe"], ui["interp_method"]], outputs=[*fields, ui["recipe_note"], ui["loading_recipe"]],
    )  # fmt: skip


def _family(host: AppHost, fields: dict) -> str:
    """The primary model's family, for the block names (SD1 until a model is picked)."""
    try:
        with open_checkpoint(host.resolve(fields["primary_model_name"]).path) as reader:
            return arch.family_of(reader.keys())
    except (MergeError, KeyError, TypeError):
        return arch.SD1


def _request_fields(named: dict) -> dict:
    """The request's fields from the tab's named values; the method controls become a recipe when needed."""
    fields = {name: named[name] for name in REQUEST_FIELDS}
    recipe = recipe_from_controls(named)
    if recipe is not None:
        fields["recipe"] = recipe
    return fields


def page_owner(page: dict) -> str:
    """This page's id, made at its first use and kept in its state, so Cancel on this page stops
    only the jobs this page started. gradio 3 and 4 alike copy a ``gr.State``'s value once per page
    (session) and then hand every event of that page, queued or not, the same object, so the id
    stored in place stays (tests/test_app_browser.py checks it in a real page)."""
    return page.setdefault("owner", uuid.uuid4().hex)


def _cancel(host: AppHost, page: dict) -> None:
    host.interrupt(page_owner(page))


def _merge(host: AppHost, fields: dict, task_id: str, owner: str, open_txt2img: bool, progress) -> str:
    """The result panel's HTML; the data attributes tell the page script what to do next."""

    def show(update) -> None:
        progress((update.keys_done, update.keys_total), desc=f"merging {update.key}")

    try:
        request, load = actions.request_from_fields(fields)
        outcome = actions.run_merge(host, request, load=load, task_id=task_id or "", owner=owner, on_progress=show)
    except MergeError as err:
        return error_html(str(err))
    except Exception as err:  # the tab shows a message, never a traceback; the log keeps it
        log.exception("Merge Lab: merge failed")
        return error_html(f"internal error: {brief(err)}")
    return done_html(outcome.message(), title=outcome.title, loaded=outcome.loaded, open_txt2img=bool(open_txt2img))


def _preflight_text(host: AppHost, fields: dict) -> str:
    """The preflight report, or how many models to pick while the picks are incomplete."""
    try:
        method = get_method(fields.get("interp_method") or "")
    except MergeError as err:
        return f"Refused: {err}"
    picked = [fields.get(name) for name in ("primary_model_name", "secondary_model_name", "tertiary_model_name")]
    count = len([name for name in picked if name]) + len(fields.get("more_models") or [])
    if not picked[0] or count < method.min_inputs:
        return f"Pick {method.min_inputs} models or more ({method.inputs_text()}) to see what the merge will do."
    try:
        request, _ = actions.request_from_fields(_request_fields(fields))
    except MergeError as err:
        return f"Refused: {err}"
    return actions.preflight_report(host, request)[1]


def _guarded(compute):
    try:
        return compute()
    except MergeError as err:
        return f"{{}}  // {err}"


def _describe(label: str) -> str:
    method = get_method(label)
    summary = " ".join(method.doc.split("\n\n")[0].split())
    return f"{summary} {pickers_text(method)}"


def _page_hook(function: str, in_webui: bool) -> dict:
    """The page script to run before the event, in the webui only (the standalone page has none)."""
    return compat.page_hook(function) if in_webui else {}
