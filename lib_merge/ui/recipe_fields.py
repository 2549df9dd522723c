"""What the tab's method controls mean, free of gradio: controls -> recipe, recipe -> controls, block chart.

The controls are generated from the registry: one per distinct parameter name (``PARAM_NAMES``),
shown for the methods that take it. The built-in's multiplier is the ``alpha`` control.
"""

from __future__ import annotations

import html

from .. import blocks
from ..io.metadata import BUILTIN_METHODS
from ..methods import FLOATS, METHODS, get_method
from ..precision import BUILTIN
from ..recipe import OUTPUT_FIELDS, VERSION, MergeNode, ModelRef, node_from_dict

PARAM_NAMES = tuple(dict.fromkeys(name for m in METHODS.values() for name in m.params if name != "alpha"))
# The tab's own fields, after the request's, in the order its merge event receives them.
TAB_FIELDS = ("more_models", *(f"param_{name}" for name in PARAM_NAMES), "block_param", "block_text")
MODEL_FIELDS = ("primary_model_name", "secondary_model_name", "tertiary_model_name")


def pickers_text(method) -> str:
    """Which of the tab's model pickers a method uses, exactly: ``Uses A and B (C is not used).``,
    ``Uses base = A, then models = B, C and More models (at least 2).``"""
    letters = ["A", "B", "C"]
    fixed = method.inputs[:-1] if method.variadic else method.inputs
    named = [
        letter if role in ("a", "b", "c") else f"{role} = {letter}"
        for role, letter in zip(fixed, letters, strict=False)
    ]
    if not method.variadic:
        unused = letters[len(fixed) :]  # More models is hidden for these methods
        text = "Uses " + (_and(named) if len(named) > 1 else f"{named[0]} only")
        if unused:
            text += f" ({_and(unused)} {'is' if len(unused) == 1 else 'are'} not used)"
        return text + "."
    rest = _and([*letters[len(fixed) :], "More models"])
    group = f"{method.inputs[-1]} = {rest} (at least {method.variadic})"
    return f"Uses {_and(named)}, then {group}." if named else f"Uses {group}."


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def recipe_from_controls(fields: dict) -> dict | None:
    """The recipe the controls describe, or None when the built-in's own fields say it all."""
    method = get_method(fields.get("interp_method") or "")
    block_text = (fields.get("block_text") or "").strip()
    more = [m for m in fields.get("more_models") or [] if m]
    if method.name in BUILTIN_METHODS and not block_text and not more:
        return None
    models = [fields.get(name) for name in MODEL_FIELDS if fields.get(name)] + more
    params = {}
    for name, param in method.params.items():
        value = fields.get("multiplier") if name == "alpha" else fields.get(f"param_{name}")
        if value is None or (param.kind == FLOATS and not str(value).strip()):
            continue
        params[name] = value
    block_param = fields.get("block_param") or ""
    node = MergeNode(
        method.name, tuple(ModelRef(m) for m in models), params, {block_param: block_text} if block_text else {}
    )
    output = {name: fields[name] for name in OUTPUT_FIELDS if fields.get(name) is not None}
    return {"merge_lab_recipe": VERSION, "merge": node.to_dict(), "output": output}


def controls_from_recipe(recipe: dict) -> dict | None:
    """Control values for a recipe that the controls can show (one node over models), else None."""
    node = node_from_dict(recipe["merge"])
    if any(isinstance(item, MergeNode) for item in node.inputs) or len(node.blocks) > 1:
        return None
    method = get_method(node.method)
    names = [ref.name for ref in node.inputs]
    values = {"interp_method": method.label, "more_models": names[3:]}
    # A picker the recipe leaves unused is cleared (None: no pick; "" is no choice, which gradio 4 warns of).
    values.update({field: names[i] if i < len(names) else None for i, field in enumerate(MODEL_FIELDS)})
    for name, value in node.params.items():
        if name == "alpha":
            values["multiplier"] = value
        else:
            values[f"param_{name}"] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    block_param, block_text = next(iter(node.blocks.items()), ("", ""))
    values.update(block_param=block_param, block_text=block_text)
    values.update(recipe.get("output") or {})
    values["dtype"] = values.get("dtype") or BUILTIN  # a recipe without one merges as the built-in
    return values


def block_chart(text: str, family: str, default: float, param: str) -> str:
    """A small SVG bar chart of the per-block values (a picture of the list), or the parse error."""
    if not blocks.is_known_family(family):  # no model picked yet, or an unknown one: SD1's blocks
        family = blocks.SD1
    try:
        values = blocks.parse_blocks(text or "", family, param=param or "value", default=default)
    except Exception as err:  # shown in place of the chart, with the field named
        return f'<p class="merge-lab-error">{html.escape(str(err))}</p>'
    names, numbers = blocks.block_names(family), values.as_list()
    top, bottom = max(1.0, *numbers), min(0.0, *numbers)
    width, height, bar = 16 * len(names) + 20, 120, 12
    scale = (height - 40) / (top - bottom)
    zero = 10 + top * scale
    bars = []
    for i, (name, value) in enumerate(zip(names, numbers, strict=True)):
        x = 10 + 16 * i
        y, h = (zero - value * scale, value * scale) if value >= 0 else (zero, -value * scale)
        bars.append(
            f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{max(h, 0.5):.1f}" fill="#f97316">'
            f"<title>{name}: {value:g}</title></rect>"
            f'<text x="{x + bar / 2}" y="{height - 14}" font-size="6" text-anchor="end" '
            f'transform="rotate(-60 {x + bar / 2} {height - 14})">{name}</text>'
        )
    axis = f'<line x1="8" y1="{zero:.1f}" x2="{width - 8}" y2="{zero:.1f}" stroke="#888" stroke-width="0.5"/>'
    label = html.escape(f"{param or 'value'} per block ({family}); hover a bar for its value")
    return (
        f'<svg role="img" aria-label="{label}" viewBox="0 0 {width} {height}" width="100%" '
        f'xmlns="http://www.w3.org/2000/svg">{axis}{"".join(bars)}</svg>'
    )
