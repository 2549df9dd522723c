"""The tab's experiment loop: Try (merge into the loaded model, no file), Save what was tried,
Restore the model, sweeps (an X/Y grid of images, one merge per cell) and greedy soups (scored by
a Python function, or by the user picking between two sets of images at each step).

Shown only where the host has a loaded model to merge into (the webui). The merge fields come
from the tab's controls, so a sweep varies exactly the merge the Merge button would write.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import gradio as gr

from .. import actions
from ..errors import MergeError, RequestError, brief
from ..loop import runner
from ..loop.greedy_soup import GreedyWalk, load_scorer
from ..loop.sweep import BLOCKS
from ..methods import BOOL, FLOAT, INT, get_method
from ..recipe import recipe_dict, request_from_recipe
from .messages import done_html, error_html

log = logging.getLogger("merge_lab")
IMAGE_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "width", "height", "sampler", "cfg_scale")
AXIS_FIELDS = ("x_param", "x_values", "y_param", "y_values")
NO_AXIS = ""


def can_try(host) -> bool:
    return hasattr(host, "try_merge")


def build_try(host) -> dict:
    """Try / Save tried / Restore: the tried recipe is kept in the page's state for Save."""
    visible = can_try(host)
    with gr.Row(visible=visible):
        try_button = gr.Button("Try (no file)", elem_id="merge_lab_try")
        save_tried = gr.Button("Save tried", interactive=False, elem_id="merge_lab_save_tried")
        restore = gr.Button("Restore model", elem_id="merge_lab_restore")
    return {"try": try_button, "save_tried": save_tried, "restore": restore, "tried_recipe": gr.State(None)}


def build_sweep(host) -> dict:
    """Axes, image settings, the Sweep button, and the grid with each cell's recipe at hand."""
    samplers = host.samplers() if hasattr(host, "samplers") else []
    defaults = runner.ImageSettings()
    with gr.Accordion("Sweep: an X/Y grid of images", open=False, visible=can_try(host), elem_id="merge_lab_sweep"):
        with gr.Row():
            x_param = gr.Dropdown(sweep_params("Weighted sum"), value="alpha", label="X: parameter",
                                  elem_id="merge_lab_x_param")  # fmt: skip
            x_values = gr.Textbox("0.2:0.6:0.1", label="X: values (0.2, 0.5 or 0.2:0.6:0.1; presets: a;b)",
                                  elem_id="merge_lab_x_values")  # fmt: skip
        with gr.Row():
            y_param = gr.Dropdown([NO_AXIS, *sweep_params("Weighted sum")], value=NO_AXIS, label="Y: parameter",
                                  elem_id="merge_lab_y_param")  # fmt: skip
            y_values = gr.Textbox("", label="Y: values", elem_id="merge_lab_y_values")
        prompt = gr.Textbox(label="Prompt (empty: txt2img's)", lines=2, elem_id="merge_lab_prompt")
        negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="merge_lab_negative_prompt")
        with gr.Row():
            seed = gr.Number(defaults.seed, precision=0, label="Seed (-1: one for the sweep)", elem_id="merge_lab_seed")
            steps = gr.Number(defaults.steps, precision=0, label="Steps", elem_id="merge_lab_steps")
            width = gr.Number(defaults.width, precision=0, label="Width", elem_id="merge_lab_width")
            height = gr.Number(defaults.height, precision=0, label="Height", elem_id="merge_lab_height")
            cfg = gr.Number(defaults.cfg_scale, label="CFG scale", elem_id="merge_lab_cfg_scale")
            sampler = gr.Dropdown(samplers, value=samplers[0] if samplers else None, label="Sampler",
                                  elem_id="merge_lab_sampler")  # fmt: skip
        with gr.Row():
            from_txt2img = gr.Button("Use txt2img's settings", elem_id="merge_lab_from_txt2img")
            sweep = gr.Button("Sweep", variant="primary", elem_id="merge_lab_sweep_run")
        gallery = gr.Gallery(label="Grid, then each cell", columns=4, elem_id="merge_lab_gallery")
        with gr.Row():
            cell = gr.Dropdown([], label="Cell", elem_id="merge_lab_cell")
            save_cell = gr.Button("Save this one", elem_id="merge_lab_save_cell")
    fields = dict(zip(AXIS_FIELDS, (x_param, x_values, y_param, y_values), strict=True))
    fields.update(zip(IMAGE_FIELDS, (prompt, negative, seed, steps, width, height, sampler, cfg), strict=True))
    return {**fields, "from_txt2img": from_txt2img, "sweep": sweep, "gallery": gallery, "cell": cell,
            "save_cell": save_cell, "cell_recipes": gr.State({})}  # fmt: skip


def sweep_params(label: str) -> list[str]:
    """What a sweep can vary for a method: its numbers, then ``blocks:<p>`` for per-block ones."""
    method = get_method(label)
    scalars = [name for name, param in method.params.items() if param.kind in (FLOAT, INT, BOOL)]
    return scalars + [BLOCKS + name for name, param in method.params.items() if param.per_block]


def axis_updates(label: str) -> list:
    """The axis choices for the picked method (X keeps its first parameter picked, Y none)."""
    choices = sweep_params(label)
    return [gr.update(choices=choices, value=choices[0] if choices else None), gr.update(choices=[NO_AXIS, *choices])]


def try_merge(host, fields: dict, task_id: str, owner: str) -> tuple[str, dict | None]:
    """The result panel's HTML and the tried recipe (None when nothing was tried)."""
    try:
        request, _ = actions.request_from_fields(fields)
        outcome = actions.run_try(host, request, task_id=task_id, owner=owner)
    except MergeError as err:
        return error_html(str(err)), None
    except Exception as err:  # the tab shows a message, never a traceback; the log keeps it
        log.exception("Merge Lab: try failed")
        return error_html(f"internal error: {brief(err)}"), None
    return done_html("\n".join([outcome.message(), *outcome.notes])), outcome.recipe


def save_recipe_file(host, recipe: dict | None, what: str, owner: str) -> str:
    """Merge ``recipe`` to its file (the same tensors as were tried) and register it."""
    if not recipe:
        return error_html(f"Nothing to save: {what} first.")
    try:
        outcome = actions.run_merge(host, request_from_recipe(recipe), load=False, owner=owner)
    except MergeError as err:
        return error_html(str(err))
    return done_html(outcome.message(), title=outcome.title)


def restore(host, owner: str) -> str:
    try:
        with host.job(owner=owner):
            title = host.restore()
    except Exception as err:  # the webui's loader failed: show why, the log keeps the traceback
        log.exception("Merge Lab: restoring the model failed")
        return error_html(f"Could not reload the model: {brief(err)}")
    return done_html(f"Reloaded {title} from its file.")


def run_sweep(host, fields: dict, axes: dict, image: dict, task_id: str, owner: str, progress) -> tuple:
    """(gallery images, result HTML, cell dropdown update, {cell label: recipe})."""
    return sweep_request(host, lambda: actions.request_from_fields(fields)[0], axes, image, task_id, owner, progress)


def sweep_request(host, make_request, axes: dict, image: dict, task_id: str, owner: str, progress) -> tuple:
    """``run_sweep`` of ``make_request()``, the merge to vary (a MergeError from it is shown)."""

    def show(cell: runner.Cell) -> None:
        progress((len(shown) + 1, total), desc=f"generated {cell.label}")
        shown.append(cell)

    shown: list = []
    try:
        request = make_request()
        x, y = actions.sweep_axes(
            host, request, (axes["x_param"], axes["x_values"]), (axes["y_param"], axes["y_values"])
        )
        total = len(x.values) * (len(y.values) if y else 1)
        settings = _image_settings(image)
        outcome = actions.run_sweep(host, request, x, y, settings, task_id=task_id, owner=owner, on_cell=show)
    except MergeError as err:
        return [], error_html(str(err)), gr.update(), {}
    except Exception as err:
        log.exception("Merge Lab: sweep failed")
        return [], error_html(f"internal error: {brief(err)}"), gr.update(), {}
    pictures = ([(outcome.grid, "grid")] if outcome.grid is not None else []) + [
        (cell.image, f"{cell.label}: {cell.name} [{cell.recipe_hash}]") for cell in outcome.cells
    ]
    recipes = {cell.label: cell.recipe for cell in outcome.cells}
    labels = list(recipes)
    return (
        pictures,
        done_html(outcome.message()),
        gr.update(choices=labels, value=labels[0] if labels else None),
        recipes,
    )


def _image_settings(image: dict) -> runner.ImageSettings:
    """The image fields as settings; gr.Number gives floats, and all but CFG are whole numbers."""
    whole = {name: int(image[name]) for name in ("seed", "steps", "width", "height")}
    return runner.ImageSettings(**{**{name: image[name] for name in IMAGE_FIELDS}, **whole,
                                 "cfg_scale": float(image["cfg_scale"])})  # fmt: skip


def build_greedy(host) -> dict:
    """Greedy soup: candidates, prompts and a scorer; the images use the sweep's seed, steps and size."""
    with gr.Accordion("Greedy soup", open=False, visible=can_try(host), elem_id="merge_lab_greedy"):
        candidates = gr.Dropdown(host.checkpoints(), multiselect=True, elem_id="merge_lab_greedy_candidates",
                                 label="Candidates (when you pick: list the best first)")  # fmt: skip
        prompts = gr.Textbox(label="Prompts, one per line (seed, steps, size, sampler, CFG: the sweep's)", lines=3,
                             elem_id="merge_lab_greedy_prompts")  # fmt: skip
        scorer = gr.Textbox(label="Scorer: package.module:function(images, prompts) -> float; empty: you pick",
                            elem_id="merge_lab_greedy_scorer")  # fmt: skip
        with gr.Row():
            start = gr.Button("Start", variant="primary", elem_id="merge_lab_greedy_start")
            keep = gr.Button("Keep soup", interactive=False, elem_id="merge_lab_greedy_keep")
            add = gr.Button("Add candidate", interactive=False, elem_id="merge_lab_greedy_add")
            save = gr.Button("Save soup", interactive=False, elem_id="merge_lab_greedy_save")
        with gr.Row():
            soup = gr.Gallery(label="Soup", columns=2, elem_id="merge_lab_greedy_soup")
            candidate = gr.Gallery(label="Soup + candidate", columns=2, elem_id="merge_lab_greedy_candidate")
    return {"greedy_candidates": candidates, "greedy_prompts": prompts, "greedy_scorer": scorer, "greedy_start": start,
            "greedy_keep": keep, "greedy_add": add, "greedy_save": save, "greedy_soup": soup,
            "greedy_candidate": candidate, "greedy_walk": gr.State(None), "greedy_recipe": gr.State(None)}  # fmt: skip


def start_greedy(
    host, candidates, prompts_text: str, scorer_text: str, image: dict, task_id: str, owner: str, progress
) -> tuple:
    """Start: with a scorer, the whole greedy soup; without, the first pair for the user to pick from.

    Returns (soup images, soup + candidate images, result HTML, walk state, soup recipe, and the
    Keep / Add / Save buttons' updates); see ``_greedy_view``.
    """

    def show(soup: tuple, images: list) -> None:
        scored.append(soup)
        progress((len(scored), 2 * len(candidates) - 1), desc=f"scoring {' + '.join(soup)}")

    scored: list = []
    try:
        _can_generate(host)
        candidates = [host.resolve(name).name for name in candidates or []]  # plain names in the record
        prompts = _prompt_lines(prompts_text)
        settings = _image_settings(image).with_fixed_seed()
        if not (scorer_text or "").strip():
            walk = GreedyWalk(candidates or [])
            state = {"walk": walk.state(), "prompts": prompts, "settings": asdict(settings)}
            return _next_pair(host, state, task_id, owner)
        _can_run_code(host)
        scorer = load_scorer(scorer_text)
        outcome = runner.run_greedy_soup(host, candidates or [], prompts, settings, scorer, scorer_name=scorer_text.strip(),
                                       task_id=task_id, owner=owner, on_step=show)  # fmt: skip
    except MergeError as err:
        return _greedy_view(message=error_html(str(err)))
    except Exception as err:  # the tab shows a message, never a traceback; the log keeps it
        log.exception("Merge Lab: greedy soup failed")
        return _greedy_view(message=error_html(f"internal error: {brief(err)}"))
    return _finished(outcome, prompts)


def decide_greedy(host, state: dict | None, add: bool, task_id: str, owner: str) -> tuple:
    """The user's pick: the next pair, or, after the last pick, the soup they built (left loaded).

    On an error the state stays as it was, so the same pick can be made again."""
    if not state:
        return _greedy_view(message=error_html("Start a greedy soup first, with an empty scorer to pick yourself."))
    try:
        walk = GreedyWalk(**state["walk"]).decide(add)
        state = {**state, "walk": walk.state()}
        if not walk.done:
            return _next_pair(host, state, task_id, owner)
        settings = runner.ImageSettings(**state["settings"])
        outcome = runner.finish_walk(host, walk, state["prompts"], settings, task_id=task_id, owner=owner)
    except MergeError as err:
        return _greedy_view(message=error_html(str(err)), state=gr.update(), pending=True)
    except Exception as err:
        log.exception("Merge Lab: greedy soup step failed")
        return _greedy_view(message=error_html(f"internal error: {brief(err)}"), state=gr.update(),
                            pending=True)  # fmt: skip
    return _finished(outcome, state["prompts"])


def _next_pair(host, state: dict, task_id: str, owner: str) -> tuple:
    walk = GreedyWalk(**state["walk"])
    soup, with_candidate = walk.pending()
    settings = runner.ImageSettings(**state["settings"])
    images = runner.greedy_pair(host, walk, state["prompts"], settings, task_id=task_id, owner=owner)
    step = len(walk.decisions) + 1
    message = (
        f"Greedy soup, step {step} of {len(walk.candidates) - 1} (seed {settings.seed}): "
        f"{' + '.join(soup)} beside + {with_candidate[-1]}. Keep the soup, or add the candidate?"
    )
    soups = [_captioned(found, state["prompts"]) for found in images]
    return _greedy_view(*soups, message=done_html(message), state=state, pending=True)


def _finished(outcome: runner.GreedyOutcome, prompts: list[str]) -> tuple:
    recipe = recipe_dict(outcome.request) if outcome.request is not None else None
    return _greedy_view(_captioned(outcome.images, prompts), [], message=done_html(outcome.message()), recipe=recipe)


def _greedy_view(soup=None, candidate=None, *, message: str, state=None, recipe=None, pending=False) -> tuple:
    """The outputs of Start, Keep soup and Add candidate, in the order ``wire_experiments`` lists them."""
    gallery = [gr.update() if soup is None else soup, gr.update() if candidate is None else candidate]
    keep, add, save = (
        gr.update(interactive=pending),
        gr.update(interactive=pending),
        gr.update(interactive=bool(recipe)),
    )
    return (*gallery, message, state, recipe, keep, add, save)


def _captioned(images: list, prompts: list[str]) -> list:
    return list(zip(images, prompts, strict=False))


def _prompt_lines(text: str) -> list[str]:
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise RequestError("greedy_soup.prompts: give at least one prompt, one per line")
    return prompts


def _can_run_code(host) -> None:
    """A scorer names code to import: only where the host allows installing code (see SECURITY.md)."""
    if not getattr(host, "can_run_code", False):
        raise RequestError(
            "scorer: naming code to run is off here (the webui allows it where it allows installing extensions: "
            "not with --listen or --share unless --enable-insecure-extension-access; the standalone app with "
            "--allow-scorer-code); leave the scorer empty to pick yourself"
        )


def _can_generate(host) -> None:
    if not hasattr(host, "generate"):
        raise RequestError("Greedy soups merge into the webui's loaded model and generate with it; here there is none")
