"""Sweeps: one merge request per value of a parameter (or per pair of values of two), for an X/Y grid.

Host-free planning only: the webui merges each point's request and draws the grid. An axis varies a
scalar parameter of the root node's method (``alpha``, ``lambda``, ``t``, ``density``; for the
built-in fields ``alpha`` is the multiplier) or, as ``blocks:<param>``, the block text (a preset
name or a block list) of a per-block parameter. Points come row-major: y outer, x inner.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..arch import SD1
from ..blocks import finite_number, parse_blocks
from ..errors import RequestError
from ..methods import BOOL, FLOAT, INT, Method, Param, get_method
from ..recipe import MergeNode
from ..request import MergeRequest

MAX_VALUES = 64
BLOCKS = "blocks:"
_SCALAR = (FLOAT, INT, BOOL)
# A range's stop is included when the last step lands on it within this much.
_TOLERANCE = 1e-9
# Range values are rounded to this many decimals, so 0.1 steps read 0.3, not 0.30000000000000004.
_DECIMALS = 10
# A value short and plain enough to go into a point's name as is (else the point's index does).
_PLAIN = re.compile(r"^[\w.+-]{1,32}$")


@dataclass(frozen=True)
class SweepAxis:
    """What one axis varies: ``param`` (a scalar parameter, or ``blocks:<param>``) and its values in order."""

    param: str
    values: tuple

    def __post_init__(self):
        values = tuple(self.values)
        object.__setattr__(self, "values", values)
        if not values:
            raise RequestError(f"sweep.{self.param}: no values to sweep")
        if len(values) > MAX_VALUES:
            raise RequestError(f"sweep.{self.param}: {len(values)} values, at most {MAX_VALUES} may be swept")

    @property
    def block_param(self) -> str | None:
        """The per-block parameter a ``blocks:<param>`` axis sets; None for a scalar axis."""
        return self.param[len(BLOCKS) :] if self.param.startswith(BLOCKS) else None

    @property
    def target(self) -> str:
        """The method parameter the axis changes (``lambda`` for both ``lambda`` and ``blocks:lambda``)."""
        return self.block_param or self.param

    @property
    def title(self) -> str:
        """How labels and names call the axis: ``alpha`` or ``lambda blocks``."""
        block = self.block_param
        return self.param if block is None else f"{block} blocks"

    def label(self, value) -> str:
        """E.g. ``alpha = 0.3`` or ``lambda blocks = ramp_in_out``."""
        return f"{self.title} = {value_text(value)}"


@dataclass(frozen=True)
class SweepPoint:
    """One cell of the grid: its values, their labels, and the request that merges it.

    ``column`` and ``row`` are the indexes of ``x`` and ``y`` in their axes (row 0 without a y axis).
    """

    x: object
    y: object | None
    label_x: str
    label_y: str
    request: MergeRequest
    column: int = 0
    row: int = 0


def value_text(value) -> str:
    """A value as labels show it: ``0.3``, ``1`` (not ``1.0``), ``true``, or block text as given."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def parse_axis(param: str, text: str, method_name: str, *, family: str = SD1) -> SweepAxis:
    """The axis the user typed: ``param`` of method ``method_name`` over the values in ``text``.

    Scalars: a comma list whose items are numbers or inclusive ranges ``start:stop:step``
    (``0.2:0.6:0.1``). ``blocks:<param>``: preset names or block texts separated by ``;`` or new
    lines, checked with ``blocks.parse_blocks`` for ``family``. ``multiplier`` is read as ``alpha``.
    Errors are RequestErrors naming ``sweep.<param>``.
    """
    method = get_method(method_name)
    param = param.strip()
    where = f"sweep.{param}"
    if param.startswith(BLOCKS):
        name = param[len(BLOCKS) :].strip()
        spec = _per_block_param(method, name, where)
        return SweepAxis(BLOCKS + name, _block_texts(text, spec, family, where))
    if param == "multiplier" and "alpha" in method.params:
        param = "alpha"
    spec = _scalar_param(method, param, where)
    return SweepAxis(param, _scalar_values(text, spec, where))


def _scalar_param(method: Method, name: str, where: str) -> Param:
    param = method.params.get(name)
    if param is None or param.kind not in _SCALAR:
        scalars = [p.name for p in method.params.values() if p.kind in _SCALAR]
        per_block = [f"{BLOCKS}{p.name}" for p in method.params.values() if p.per_block]
        known = ", ".join(scalars + per_block) or "none"
        what = "no such parameter" if param is None else "a list parameter, which cannot be swept"
        raise RequestError(f"{where}: method {method.cli_name} has {what} (it can sweep: {known})")
    return param


def _per_block_param(method: Method, name: str, where: str) -> Param:
    param = method.params.get(name)
    if param is None or not param.per_block:
        per_block = ", ".join(p.name for p in method.params.values() if p.per_block) or "none"
        raise RequestError(
            f"{where}: {name!r} is not a per-block parameter of {method.cli_name} (those are: {per_block})"
        )
    return param


def _scalar_values(text: str, param: Param, where: str) -> tuple:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise RequestError(f"{where}: no values given (e.g. 0.2, 0.4, 0.6 or 0.2:0.6:0.1)")
    numbers: list = []
    for item in items:
        if ":" in item:
            if param.kind == BOOL:
                raise RequestError(f"{where}: {item!r}: a range needs a number parameter; give true, false")
            numbers.extend(_range(item, where))
        else:
            numbers.append(item)
        if len(numbers) > MAX_VALUES:
            raise RequestError(f"{where}: more than {MAX_VALUES} values")
    return _distinct([param.check(number, where) for number in numbers], where)


def _range(item: str, where: str) -> list[float]:
    """The values of ``start:stop:step``, stop included when reached within _TOLERANCE."""
    parts = item.split(":")
    if len(parts) != 3:
        raise RequestError(f"{where}: {item!r} is not a range start:stop:step (e.g. 0.2:0.6:0.1)")
    start, stop, step = (finite_number(part.strip(), f"{where}: {item!r}") for part in parts)
    if step == 0:
        raise RequestError(f"{where}: {item!r}: the step is 0")
    if (stop - start) * step < 0:
        raise RequestError(f"{where}: {item!r}: a step of {step:g} never goes from {start:g} to {stop:g}")
    sign = 1 if step > 0 else -1
    values: list[float] = []
    while (start + len(values) * step - stop) * sign <= _TOLERANCE:
        if len(values) == MAX_VALUES:
            raise RequestError(f"{where}: {item!r} gives more than {MAX_VALUES} values")
        values.append(round(start + len(values) * step, _DECIMALS) + 0.0)  # + 0.0: no -0
    return values


def _block_texts(text: str, param: Param, family: str, where: str) -> tuple[str, ...]:
    items = [item.strip() for item in re.split(r"[;\n]", str(text)) if item.strip()]
    if not items:
        raise RequestError(f"{where}: no block texts given (preset names or block lists, separated by ;)")
    if len(items) > MAX_VALUES:
        raise RequestError(f"{where}: more than {MAX_VALUES} values")
    default = 0.0 if param.default is None else param.default
    for index, item in enumerate(items, 1):
        try:
            parse_blocks(item, family, param=param.name, default=default)
        except RequestError as err:
            reason = str(err).removeprefix(f"blocks.{param.name}: ")
            raise RequestError(f"{where}: item {index} ({item!r}): {reason}") from None
    return _distinct(items, where)


def _distinct(values: list, where: str) -> tuple:
    seen = set()
    for value in values:
        if value in seen:
            raise RequestError(f"{where}: {value_text(value)} is given twice")
        seen.add(value)
    return tuple(values)


def plan_sweep(request: MergeRequest, x: SweepAxis, y: SweepAxis | None = None) -> list[SweepPoint]:
    """One point per value of ``x`` (times each value of ``y``), row-major: y outer, x inner.

    Each point's request is ``request`` with its root node's parameter set: a scalar replaces the
    root's value and drops a per-block entry for the same parameter (a swept scalar means the whole
    merge); ``blocks:<p>`` sets the root's ``blocks[p]``. The request always carries the tree, also
    when ``request`` gave the built-in fields. Every tree is validated.
    """
    if y is not None and y.target == x.target:
        raise RequestError(f"sweep.y: {y.param} sets {y.target}, as sweep.x does ({x.param}); sweep two parameters")
    root = request.root()
    method = get_method(root.method)
    for axis in (x, y):
        if axis is not None:
            _fits(axis, method)
    points = []
    for row, y_value in enumerate(y.values if y is not None else (None,)):
        for column, x_value in enumerate(x.values):
            tree = _with_value(root, x, x_value)
            if y is not None:
                tree = _with_value(tree, y, y_value)
            tree.validate()
            label_y = y.label(y_value) if y is not None else ""
            point_request = dataclasses.replace(request, tree=tree)
            points.append(SweepPoint(x_value, y_value, x.label(x_value), label_y, point_request, column, row))
    return points


def _fits(axis: SweepAxis, method: Method) -> None:
    """The axis names a parameter the root's method has (an axis may be parsed for another method)."""
    where = f"sweep.{axis.param}"
    if axis.block_param is not None:
        _per_block_param(method, axis.block_param, where)
    else:
        _scalar_param(method, axis.param, where)


def _with_value(node: MergeNode, axis: SweepAxis, value) -> MergeNode:
    block = axis.block_param
    if block is not None:
        return dataclasses.replace(node, blocks={**node.blocks, block: value})
    blocks = {name: text for name, text in node.blocks.items() if name != axis.param}
    return dataclasses.replace(node, params={**node.params, axis.param: value}, blocks=blocks)


def point_name(point: SweepPoint) -> str:
    """A short name for file names and infotext: ``alpha 0.3, density 0.5``.

    A block text too long or odd for a name (a block list) is given by its place in the axis:
    ``lambda blocks #2``.
    """
    parts = [_name_part(point.label_x, point.column)]
    if point.label_y:
        parts.append(_name_part(point.label_y, point.row))
    return ", ".join(parts)


def _name_part(label: str, index: int) -> str:
    title, _, value = label.partition(" = ")
    return f"{title} {value}" if _PLAIN.match(value) else f"{title} #{index + 1}"
