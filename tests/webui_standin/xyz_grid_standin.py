"""A stand-in for the webui's built-in X/Y/Z plot, scripts/xyz_grid.py (v1.10.1), for tests of
lib_merge.loop.xyz_axes ONLY. Written from reading that file, not copied from it.

What it mirrors: ``AxisOption(label, type, apply, format_value=format_value_add_label, confirm=None,
cost=0.0, choices=None, prepare=None)``; the module level ``axis_options`` list (here a few built-in
entries, "Checkpoint name" with its cost of 1.0); labels ``"<label>: <value>"`` with floats rounded
to 8 places; a ``Script`` subclass of ``modules.scripts.Script`` titled "X/Y/Z plot", by which
extensions find the module in ``scripts_data``; and, in ``run_cells``, the order the real ``run``
uses for one axis: values converted with the option's ``type``, ``confirm(p, values)`` once before
any image, then per cell a copy of ``p``, ``apply(pc, value, values)`` and ``process_images(pc)``.
An exception from ``apply`` ends the run, as in the real plot (there ``apply`` is outside the
per-cell ``try``). Value parsing (ranges, CSV), seeds, Y/Z axes and grid drawing are left out.
Load it as the webui does, through ``modules.scripts.load_scripts`` with the file name ``xyz_grid.py``,
so its module is named ``xyz_grid.py`` like the real one.
"""

from __future__ import annotations

from collections import namedtuple
from copy import copy

import modules.scripts as scripts

Cell = namedtuple("Cell", ["value", "label", "processed"])


def format_value_add_label(p, opt, x):
    if type(x) is float:
        x = round(x, 8)
    return f"{opt.label}: {x}"


def apply_field(field):
    def apply(p, x, xs):
        setattr(p, field, x)

    return apply


def do_nothing(p, x, xs):
    pass


def format_nothing(p, opt, x):
    return ""


def apply_checkpoint(p, x, xs):
    p.override_settings["sd_model_checkpoint"] = x


class AxisOption:
    def __init__(
        self,
        label,
        type,
        apply,
        format_value=format_value_add_label,
        confirm=None,
        cost=0.0,
        choices=None,
        prepare=None,
    ):
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.prepare = prepare
        self.choices = choices


axis_options = [
    AxisOption("Nothing", str, do_nothing, format_value=format_nothing),
    AxisOption("Seed", int, apply_field("seed")),
    AxisOption("CFG Scale", float, apply_field("cfg_scale")),
    AxisOption("Checkpoint name", str, apply_checkpoint, cost=1.0, choices=lambda: []),
]


def process_images(p):
    """The fake generation: a snapshot of the processing object's fields as the cell saw them."""
    return dict(vars(p))


def run_cells(p, axis: AxisOption, values) -> list[Cell]:
    """One axis through the real plot's order: type conversion, confirm once, then apply + generate per cell."""
    values = [axis.type(value) for value in values]
    if axis.confirm:
        axis.confirm(p, values)
    cells = []
    for value in values:
        pc = copy(p)
        axis.apply(pc, value, values)
        cells.append(Cell(value, axis.format_value(p, axis, value), process_images(pc)))
    return cells


class Script(scripts.Script):
    def title(self):
        return "X/Y/Z plot"
