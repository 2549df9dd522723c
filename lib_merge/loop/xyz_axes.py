"""Merge Lab axes for the webui's own X/Y/Z plot (its built-in ``scripts/xyz_grid.py``).

Users already know that tool and combine its axes freely (CFG, sampler, prompt S/R ...); giving it
"Merge Lab: alpha", "Merge Lab: recipe" and "Merge Lab: block preset" lets a merge parameter be one
of them, instead of a second grid tool. Host-free: this module never imports the webui or gradio.
It receives the loaded xyz_grid module (``find_xyz_module``) and a ``XyzSession`` from the adapter,
and appends ``xyz.AxisOption`` entries to ``xyz.axis_options``, as extensions conventionally do.

The webui runs an axis like this (scripts/xyz_grid.py, v1.10.1): each value is converted with the
option's ``type``, ``confirm(p, values)`` runs once before any image (raising refuses the run), then
for each cell ``apply(p, value, values)`` runs right before ``process_images(p)``, with the webui's
queue lock held. An exception in ``apply`` ends the whole grid, so ``confirm`` checks every value
first. Cells of the costliest axis form the outer loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from ..blocks import presets
from ..errors import MergeError, RequestError, shown
from ..names import relative_name
from ..recipe import load_recipe, request_from_recipe
from ..request import MergeRequest
from .sweep import BLOCKS, parse_axis, plan_sweep, value_text

LABELS = ("Merge Lab: alpha", "Merge Lab: recipe", "Merge Lab: block preset")
ALPHA, RECIPE, BLOCK_PRESET = LABELS
# ``Script.__module__`` of the built-in plot: the webui loads a script file as a module named after
# the file (modules/script_loading.py); ``xy_grid.py`` is its name before webui 1.1.
XYZ_MODULE_NAMES = ("xyz_grid.py", "xy_grid.py")
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
# The plot loops over the costliest axis outermost. A merge rewrites every weight of the loaded
# model (reading two or more checkpoints), more than the built-in "Checkpoint name" switch (1.0),
# "FP8 mode" (0.9) or "VAE" (0.7); above them, a grid merges once per Merge Lab value, not per cell.
MERGE_COST = 1.1
# The plot's float ranges come from numpy (0.30000000000000004); rounded like sweep ranges, so the
# merged alpha, its recipe hash and the label all read 0.3.
_DECIMALS = 10


class XyzSession(Protocol):
    """What the axes need from the webui adapter (``hosts/webui.py`` implements it over the loaded model)."""

    def base(self) -> MergeRequest:
        """The merge last tried or set up in the Merge Lab tab, which the alpha and preset axes vary.

        Raises RequestError telling the user to Try a merge in the Merge Lab tab first when there is none.
        """
        ...

    def try_request(self, request: MergeRequest) -> None:
        """Merge ``request`` into the loaded model in place (no file), skipping the work when the same
        recipe is already loaded. Called from ``apply`` inside a generation, with the webui's queue
        lock already held: it must not take that lock again. Raises MergeError."""
        ...

    def family(self) -> str:
        """The architecture family of the base request's models (``lib_merge.arch.SD1``, ``SDXL`` ...),
        which decides the block layout a preset or block list fills."""
        ...

    def recipe_dir(self) -> Path | None:
        """The folder of saved recipe files whose names the recipe axis offers and resolves (only
        there); None: no such folder, and the recipe axis refuses every value."""
        ...


def find_xyz_module(scripts_data: Iterable[Any]) -> Any | None:
    """The loaded built-in X/Y/Z plot module among the webui's ``modules.scripts.scripts_data``, or None.

    Matched by the script class's module name, the convention other extensions follow, since the
    webui loads script files outside the import system (``import scripts.xyz_grid`` would load a copy).
    """
    for data in scripts_data:
        if data.script_class.__module__ in XYZ_MODULE_NAMES and hasattr(data, "module"):
            return data.module
    return None


def add_axes(xyz: Any, session: XyzSession) -> int:
    """Append the three Merge Lab axes to ``xyz.axis_options``; returns how many were appended.

    Idempotent: the webui runs UI callbacks again on a UI reload. An option already carrying one of
    ``LABELS`` is replaced in place (so the newest session serves it), never duplicated. Call it
    before the plot builds its UI (``script_callbacks.on_before_ui``): its ``ui()`` copies the list.
    """
    axes = MergeLabAxes(session)
    options = [
        xyz.AxisOption(ALPHA, float, axes.apply_alpha, confirm=axes.confirm_alpha, cost=MERGE_COST),
        xyz.AxisOption(
            RECIPE,
            str,
            axes.apply_recipe,
            format_value=format_recipe,
            confirm=axes.confirm_recipe,
            cost=MERGE_COST,
            choices=axes.recipe_choices if session.recipe_dir() is not None else None,
        ),
        xyz.AxisOption(
            BLOCK_PRESET,
            str,
            axes.apply_preset,
            confirm=axes.confirm_preset,
            cost=MERGE_COST,
            choices=preset_choices,
        ),
    ]
    added = 0
    for option in options:
        index = next((i for i, old in enumerate(xyz.axis_options) if old.label == option.label), None)
        if index is None:
            xyz.axis_options.append(option)
            added += 1
        else:
            xyz.axis_options[index] = option
    return added


def format_recipe(p, opt, value) -> str:
    """A recipe cell's label, like the built-in axes' ``label: value``, with the file's stem as the value."""
    return f"{opt.label}: {Path(str(value).strip()).stem}"


def preset_choices() -> list[str]:
    """The block presets' names. Every preset fits every family (see data/block_presets.json); the base's
    family is checked when the values are confirmed."""
    return list(presets())


class MergeLabAxes:
    """The axes' ``apply`` / ``confirm`` / ``choices`` callbacks over one session.

    Every error is a MergeError whose message starts with the axis label and names the value.
    """

    def __init__(self, session: XyzSession):
        self.session = session

    # -- alpha: the root method's alpha (the built-in fields' multiplier) --------------------------

    def alpha_request(self, base: MergeRequest, value) -> MergeRequest:
        """``base`` with its root node's alpha set to ``value``."""
        number = round(float(value), _DECIMALS) + 0.0  # + 0.0: no -0
        return self._swept(ALPHA, base, "alpha", value_text(number))

    def confirm_alpha(self, p, values) -> None:
        base = self._base(ALPHA)
        for value in values:
            self.alpha_request(base, value)

    def apply_alpha(self, p, value, values) -> None:
        self._try(ALPHA, value, self.alpha_request(self._base(ALPHA), value))

    # -- block preset: the root method's per-block alpha --------------------------------------------

    def preset_request(self, base: MergeRequest, value) -> MergeRequest:
        """``base`` with its root node's per-block alpha set to ``value`` (a preset name, or any block text)."""
        return self._swept(BLOCK_PRESET, base, BLOCKS + "alpha", str(value).strip())

    def confirm_preset(self, p, values) -> None:
        base = self._base(BLOCK_PRESET)
        for value in values:
            self.preset_request(base, value)

    def apply_preset(self, p, value, values) -> None:
        self._try(BLOCK_PRESET, value, self.preset_request(self._base(BLOCK_PRESET), value))

    # -- recipe: a whole merge from a recipe file ---------------------------------------------------

    def recipe_choices(self) -> list[str]:
        """The recipe files' names in ``session.recipe_dir()``, sorted like the plot's checkpoint list."""
        folder = self.session.recipe_dir()
        if folder is None or not Path(folder).is_dir():
            return []
        files = [path.name for path in Path(folder).iterdir() if _is_recipe_file(path)]
        return sorted(files, key=str.casefold)

    def recipe_path(self, value) -> Path:
        """The file a value names: a name in the recipe folder, its suffix optional; never a path
        outside it (the plot's values come from whoever reaches the page)."""
        text = str(value).strip()
        if not text:
            raise RequestError(f"{RECIPE}: an empty value names no recipe file")
        folder = self.session.recipe_dir()
        if folder is None:
            raise RequestError(f"{RECIPE}: {shown(text)}: this host has no recipe folder to read recipes from")
        relative = relative_name(text, f"{RECIPE}: {shown(text)}")
        candidates = [Path(folder) / relative, *(Path(folder) / f"{relative}{suffix}" for suffix in RECIPE_SUFFIXES)]
        for path in candidates:
            if path.is_file():
                if not _is_recipe_file(path):
                    raise RequestError(f"{RECIPE}: {text!r}: not a recipe file (expected {', '.join(RECIPE_SUFFIXES)})")
                return path
        raise RequestError(f"{RECIPE}: {shown(text)}: no such recipe file (looked in {folder})")

    def recipe_request(self, value) -> MergeRequest:
        path = self.recipe_path(value)
        try:
            return request_from_recipe(load_recipe(path))
        except RequestError as err:
            raise RequestError(f"{RECIPE}: {str(value).strip()!r}: {err}") from None

    def confirm_recipe(self, p, values) -> None:
        for value in values:
            self.recipe_request(value)

    def apply_recipe(self, p, value, values) -> None:
        self._try(RECIPE, value, self.recipe_request(value))

    # -- shared -------------------------------------------------------------------------------------

    def _base(self, label: str) -> MergeRequest:
        try:
            return self.session.base()
        except MergeError as err:
            raise type(err)(f"{label}: {err}") from None

    def _swept(self, label: str, base: MergeRequest, param: str, text: str) -> MergeRequest:
        """``base`` with one value of ``param`` set through sweep's axis parsing and planning, so the
        plot accepts exactly what the Merge Lab sweep accepts."""
        try:
            family = self.session.family() if param.startswith(BLOCKS) else None
            options = {"family": family} if family is not None else {}
            axis = parse_axis(param, text, base.root().method, **options)
            if len(axis.values) != 1:
                raise RequestError(f"one value per cell, got {len(axis.values)} (separate values with commas)")
            return plan_sweep(base, axis)[0].request
        except MergeError as err:
            reason = str(err).removeprefix(f"sweep.{param}: ").removeprefix(f"item 1 ({text!r}): ")
            raise RequestError(f"{label}: {text!r} refused: {reason}") from None

    def _try(self, label: str, value, request: MergeRequest) -> None:
        try:
            self.session.try_request(request)
        except MergeError as err:
            raise type(err)(f"{label}: {str(value).strip()!r}: {err}") from err


def _is_recipe_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in RECIPE_SUFFIXES
