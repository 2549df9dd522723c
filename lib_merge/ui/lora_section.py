"""The tab's LoRA section: bake LoRAs into a checkpoint (or Try the bake in the loaded model, or
sweep its last LoRA's ratio with the Sweep section's axes), extract a LoRA from two checkpoints,
merge LoRAs into one.

The pickers list the host's checkpoints and LoRA folder; an extracted or merged LoRA is written
into that folder and the host's Lora cards are refreshed (the page script clicks their refresh),
so it can be used at once. Every event goes through ``lora_actions`` or ``actions``.
"""

from __future__ import annotations

import logging

import gradio as gr

from .. import actions, lora_actions, precision
from ..errors import MergeError, brief
from ..lora.kohya import DTYPES
from . import experiments
from .experiments import can_try
from .messages import done_html, error_html

log = logging.getLogger("merge_lab")
ROWS = 4  # LoRAs a bake (or a merge of LoRAs) takes in the tab; the API takes up to lora_actions' limit
BAKE_FIELDS = ("bake_checkpoint", *(f"bake_{part}_{row}" for row in range(ROWS) for part in ("lora", "ratio", "blocks")),
               "bake_custom_name", "bake_dtype", "bake_overwrite", "bake_load")  # fmt: skip
EXTRACT_FIELDS = ("extract_base", "extract_tuned", "extract_rank", "extract_conv_rank", "extract_clamp_quantile",
                  "extract_min_diff", "extract_text_encoder", "extract_dtype", "extract_name", "extract_overwrite")  # fmt: skip
COMBINE_FIELDS = (*(f"combine_{part}_{row}" for row in range(ROWS) for part in ("lora", "ratio")),
                  "combine_rank", "combine_dtype", "combine_name", "combine_overwrite")  # fmt: skip


def build_lora(host) -> dict:
    """The section: three tabs in an accordion, each with its own button."""
    with gr.Accordion("LoRA: bake, extract, merge", open=False, elem_id="merge_lab_lora"):
        refresh = gr.Button("Refresh LoRA list", elem_id="merge_lab_lora_refresh")
        with gr.Tabs(elem_id="merge_lab_lora_tabs"):
            with gr.Tab("Bake into a checkpoint", elem_id="merge_lab_lora_bake_tab"):
                ui = build_bake(host)
            with gr.Tab("Extract from two checkpoints", elem_id="merge_lab_lora_extract_tab"):
                ui.update(build_extract(host))
            with gr.Tab("Merge LoRAs", elem_id="merge_lab_lora_combine_tab"):
                ui.update(build_combine(host))
    return {**ui, "lora_refresh": refresh}


def _lora_rows(host, prefix: str, blocks: bool) -> dict:
    ui = {}
    for row in range(ROWS):
        with gr.Row():
            ui[f"{prefix}_lora_{row}"] = gr.Dropdown(
                ["", *_loras(host)], value="", label=f"LoRA {row + 1}", elem_id=f"merge_lab_{prefix}_lora_{row}"
            )
            ui[f"{prefix}_ratio_{row}"] = gr.Slider(
                -2.0, 2.0, value=1.0, step=0.05, label="Ratio", elem_id=f"merge_lab_{prefix}_ratio_{row}"
            )
            if blocks:
                ui[f"{prefix}_blocks_{row}"] = gr.Textbox(
                    label="Block weights (optional: a preset, a list, IN*=0)",
                    elem_id=f"merge_lab_{prefix}_blocks_{row}",
                )
    return ui


def build_bake(host) -> dict:
    checkpoint = gr.Dropdown(host.checkpoints(), label="Checkpoint", elem_id="merge_lab_bake_checkpoint")
    ui = {"bake_checkpoint": checkpoint, **_lora_rows(host, "bake", blocks=True)}
    with gr.Row():
        ui["bake_custom_name"] = gr.Textbox(label="Custom name (optional)", elem_id="merge_lab_bake_custom_name")
        ui["bake_dtype"] = gr.Dropdown(list(precision.CHOICES), value="keep", label="Output precision",
                                       elem_id="merge_lab_bake_dtype")  # fmt: skip
        ui["bake_overwrite"] = gr.Checkbox(
            False, label="Overwrite an existing file", elem_id="merge_lab_bake_overwrite"
        )
        ui["bake_load"] = gr.Checkbox(host.can_load and host.load_by_default, label="Load baked model now",
                                      visible=host.can_load, elem_id="merge_lab_bake_load")  # fmt: skip
    with gr.Row():
        ui["bake"] = gr.Button("Bake", variant="primary", elem_id="merge_lab_bake")
        ui["bake_try"] = gr.Button("Try bake (no file)", visible=can_try(host), elem_id="merge_lab_bake_try")
        ui["bake_sweep"] = gr.Button(
            "Sweep bake (the Sweep's axes; alpha: the last LoRA's ratio)",
            visible=can_try(host),
            elem_id="merge_lab_bake_sweep",
        )
    return ui


def build_extract(host) -> dict:
    ui = {}
    with gr.Row():
        for name, label in (("base", "Base checkpoint"), ("tuned", "Tuned checkpoint")):
            ui[f"extract_{name}"] = gr.Dropdown(host.checkpoints(), label=label, elem_id=f"merge_lab_extract_{name}")
    with gr.Row():
        ui["extract_rank"] = gr.Slider(1, 256, value=32, step=1, label="Rank", elem_id="merge_lab_extract_rank")
        ui["extract_conv_rank"] = gr.Slider(0, 256, value=0, step=1, label="Conv rank (0: no 3x3 convs)",
                                            elem_id="merge_lab_extract_conv_rank")  # fmt: skip
    with gr.Row():
        ui["extract_clamp_quantile"] = gr.Number(0.99, label="Clamp quantile (1: none)",
                                                 elem_id="merge_lab_extract_clamp_quantile")  # fmt: skip
        ui["extract_min_diff"] = gr.Number(0.01, label="Minimum text encoder difference",
                                           elem_id="merge_lab_extract_min_diff")  # fmt: skip
        ui["extract_text_encoder"] = gr.Checkbox(True, label="Text encoder", elem_id="merge_lab_extract_text_encoder")
    ui.update(_lora_output("extract", list(DTYPES), "fp16", "Precision"))
    ui["extract"] = gr.Button("Extract", variant="primary", elem_id="merge_lab_extract")
    return ui


def build_combine(host) -> dict:
    ui = _lora_rows(host, "combine", blocks=False)
    ui["combine_rank"] = gr.Slider(0, 256, value=0, step=1, label="Rank (0: exact, ranks concatenated)",
                                   elem_id="merge_lab_combine_rank")  # fmt: skip
    ui.update(_lora_output("combine", ["", *DTYPES], "", "Precision (empty: the inputs')"))
    ui["combine"] = gr.Button("Merge LoRAs", variant="primary", elem_id="merge_lab_combine")
    return ui


def _lora_output(prefix: str, dtypes: list[str], dtype: str, dtype_label: str) -> dict:
    with gr.Row():
        name = gr.Textbox(label="Name in the LoRA folder (optional)", elem_id=f"merge_lab_{prefix}_name")
        dtype_choice = gr.Dropdown(dtypes, value=dtype, label=dtype_label, elem_id=f"merge_lab_{prefix}_dtype")
        overwrite = gr.Checkbox(False, label="Overwrite an existing file", elem_id=f"merge_lab_{prefix}_overwrite")
    return {f"{prefix}_name": name, f"{prefix}_dtype": dtype_choice, f"{prefix}_overwrite": overwrite}


def bake_fields(named: dict, device: str) -> dict:
    """The bake's request fields from the section's values: the rows with a LoRA picked, in order."""
    loras = [
        {"name": named[f"bake_lora_{row}"], "ratio": named[f"bake_ratio_{row}"], "blocks": named[f"bake_blocks_{row}"]}
        for row in range(ROWS)
        if named[f"bake_lora_{row}"]
    ]
    fields = {"checkpoint": named["bake_checkpoint"] or "", "loras": loras, "device": device}
    fields.update({name: named[f"bake_{name}"] for name in ("custom_name", "dtype", "overwrite", "load")})
    return fields


def extract_fields(named: dict, device: str) -> dict:
    fields = {name.removeprefix("extract_"): named[name] for name in EXTRACT_FIELDS}
    fields["conv_rank"] = fields["conv_rank"] or None  # 0: no conv layers
    return {**fields, "device": device}


def combine_fields(named: dict, device: str) -> dict:
    loras = [
        {"name": named[f"combine_lora_{row}"], "ratio": named[f"combine_ratio_{row}"]}
        for row in range(ROWS)
        if named[f"combine_lora_{row}"]
    ]
    fields = {name: named[f"combine_{name}"] for name in ("name", "dtype", "overwrite")}
    return {**fields, "loras": loras, "rank": named["combine_rank"] or None, "device": device}


def bake(host, fields: dict, task_id: str, owner: str) -> str:
    try:
        request, load = lora_actions.bake_request_from_fields(host, fields)
        outcome = actions.run_merge(host, request, load=load, task_id=task_id, owner=owner)
    except MergeError as err:
        return error_html(str(err))
    except Exception as err:  # the tab shows a message, never a traceback; the log keeps it
        log.exception("Merge Lab: bake failed")
        return error_html(f"internal error: {brief(err)}")
    return done_html(outcome.message(), title=outcome.title, loaded=outcome.loaded)


def try_bake(host, fields: dict, task_id: str, owner: str) -> tuple[str, dict | None]:
    """The result panel's HTML and the tried recipe, which Save tried writes and the X/Y/Z plot varies."""
    try:
        request, _ = lora_actions.bake_request_from_fields(host, {**fields, "load": False})
        outcome = actions.run_try(host, request, task_id=task_id, owner=owner)
    except MergeError as err:
        return error_html(str(err)), None
    except Exception as err:
        log.exception("Merge Lab: try failed")
        return error_html(f"internal error: {brief(err)}"), None
    return done_html("\n".join([outcome.message(), *outcome.notes])), outcome.recipe


def sweep_bake(host, fields: dict, axes: dict, image: dict, task_id: str, owner: str, progress) -> tuple:
    """The Sweep section's axes and images over the bake: each cell a bake tried in the loaded model
    (the bake is a chain of add_delta nodes, so its alpha is the last LoRA's ratio)."""

    def request():
        return lora_actions.bake_request_from_fields(host, {**fields, "load": False})[0]

    return experiments.sweep_request(host, request, axes, image, task_id, owner, progress)


def write_lora(host, run, fields: dict, task_id: str, owner: str) -> str:
    """Extract or merge (``run``: lora_actions.run_extract or run_merge); the done panel asks the
    page script to refresh the host's Lora cards."""
    try:
        outcome = run(host, fields, task_id=task_id, owner=owner)
    except MergeError as err:
        return error_html(str(err))
    except Exception as err:
        log.exception("Merge Lab: LoRA failed")
        return error_html(f"internal error: {brief(err)}")
    return done_html(outcome.message(), lora=True)


def lora_choices(host) -> list:
    """Updates for every LoRA picker after the folder changed."""
    return [gr.update(choices=["", *_loras(host)]) for _ in range(2 * ROWS)]


def _loras(host) -> list[str]:
    try:
        return host.loras()
    except MergeError:  # a host without a LoRA folder: the pickers stay empty, the API says why
        return []
