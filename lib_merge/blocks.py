"""Per-block parameters ("block weights"): which block of the model a key belongs to, and per-block values.

The block names and the comma-list order follow supermerger / sdweb-merge-block-weighted for the
UNets: ``BASE, IN00.., M00, OUT00..``; Flux has ``BASE, D00-D18`` (double blocks) ``, S00-S37``
(single blocks) and SD3 ``BASE, J00..`` (joint blocks, 24 or 38 by model size). ``BASE`` holds
every key outside the blocks and the VAE (text encoders, embedders, final layers, schedule
buffers, EMA); ``VAE`` holds the VAE's keys and is not in the list.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from importlib import resources

from .arch import FLUX, FLUX_SCHNELL, SD1, SD2, SD3, SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, SDXL, SDXL_REFINER
from .errors import RequestError, shown

BASE, MIDDLE, VAE = "BASE", "M00", "VAE"

_UNET = r"^model\.diffusion_model\."
_INPUT = re.compile(_UNET + r"input_blocks\.(\d+)\.")
_OUTPUT = re.compile(_UNET + r"output_blocks\.(\d+)\.")
_MIDDLE = re.compile(_UNET + r"middle_block\.")
_BEFORE_INPUTS = re.compile(_UNET + r"(?:time_embed|label_emb)\.")  # run before input_blocks.0
_AFTER_OUTPUTS = re.compile(_UNET + r"out\.")  # the final norm + conv, after the last output block
# Transformer keys come with the prefix (a full checkpoint) or bare (a transformer-only file);
# Flux's blocks also in diffusers' names (transformer_blocks.N, single_transformer_blocks.N).
_TRANSFORMER = r"^(?:model\.diffusion_model\.)?"
_DOUBLE = re.compile(_TRANSFORMER + r"(?:double_blocks|transformer_blocks)\.(\d+)\.")
_SINGLE = re.compile(_TRANSFORMER + r"(?:single_blocks|single_transformer_blocks)\.(\d+)\.")
_JOINT = re.compile(_TRANSFORMER + r"joint_blocks\.(\d+)\.")
# SD1/SD2/SDXL/SD3 keep the VAE under first_stage_model., a full Flux checkpoint under vae.
_VAE = re.compile(r"^(?:first_stage_model|vae)\.")


@dataclass(frozen=True)
class _Layout:
    """A family's blocks after BASE, in comma-list order, in the three parts the presets fill: the
    blocks on the way in (IN, Flux's double blocks, SD3's first half of joint blocks), the middle
    block (a UNet's M00; none in a transformer), the blocks on the way out (OUT, single, second half)."""

    way_in: tuple[str, ...]
    middle: tuple[str, ...]
    way_out: tuple[str, ...]
    block: Callable[[str], str | None]  # the block of a key, None for BASE

    @property
    def names(self) -> tuple[str, ...]:
        return (BASE, *self.way_in, *self.middle, *self.way_out)


def _numbered(prefix: str, count: int, start: int = 0) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in range(start, start + count))


def _unet_block(key: str, last_output: str) -> str | None:
    if match := _INPUT.match(key):
        return f"IN{int(match[1]):02d}"
    if match := _OUTPUT.match(key):
        return f"OUT{int(match[1]):02d}"
    if _MIDDLE.match(key):
        return MIDDLE
    if _BEFORE_INPUTS.match(key):
        return "IN00"
    if _AFTER_OUTPUTS.match(key):
        return last_output
    return None


def _unet(inputs: int, outputs: int) -> _Layout:
    """``time_embed.``/``label_emb.`` go to IN00 (they run before the input blocks), ``out.`` (the
    final norm and conv) to the last output block, as in supermerger."""
    last_output = f"OUT{outputs - 1:02d}"
    block = functools.partial(_unet_block, last_output=last_output)
    return _Layout(_numbered("IN", inputs), (MIDDLE,), _numbered("OUT", outputs), block)


def _flux_block(key: str) -> str | None:
    if match := _DOUBLE.match(key):
        return f"D{int(match[1]):02d}"
    if match := _SINGLE.match(key):
        return f"S{int(match[1]):02d}"
    return None  # img_in, txt_in, time_in, vector_in, guidance_in, final_layer: BASE


def _joint_block(key: str) -> str | None:
    match = _JOINT.match(key)
    return f"J{int(match[1]):02d}" if match else None  # embedders, pos_embed, final_layer: BASE


def _joint(count: int) -> _Layout:
    """SD3's joint blocks; for the presets the first half is the way in, the second the way out."""
    half = count // 2
    return _Layout(_numbered("J", half), (), _numbered("J", count - half, half), _joint_block)


_FLUX_LAYOUT = _Layout(_numbered("D", 19), (), _numbered("S", 38), _flux_block)
# The SDXL refiner (channel_mult 1,2,4,4 with two res blocks per level) has the SD1 numbering.
_LAYOUTS = {
    SD1: _unet(12, 12),
    SD2: _unet(12, 12),
    SDXL_REFINER: _unet(12, 12),
    SDXL: _unet(9, 9),
    FLUX: _FLUX_LAYOUT,
    FLUX_SCHNELL: _FLUX_LAYOUT,
    SD3_MEDIUM: _joint(24),
    SD35_MEDIUM: _joint(24),
    SD35_LARGE: _joint(38),
}
# SD3 with a joint-block count of no known model: every key takes BASE (see block_note).
_NO_BLOCK_MAP = (SD3,)


def _layout(family: str) -> _Layout | None:
    """The block layout of ``family``; None for one without a block map; RequestError for others."""
    if family in _NO_BLOCK_MAP:
        return None
    if family not in _LAYOUTS:
        known = ", ".join([*_LAYOUTS, *_NO_BLOCK_MAP])
        raise RequestError(f"no block layout for model family {family!r} (known: {known})")
    return _LAYOUTS[family]


def block_names(family: str) -> tuple[str, ...]:
    """The blocks of ``family`` in comma-list order: SD1/SD2/SDXL refiner 26 names, SDXL 20, Flux 58,
    SD3 medium 25, SD3.5 large 39; BASE only for an SD3 of another size.

    An unknown family raises RequestError rather than guessing a layout.
    """
    layout = _layout(family)
    return (BASE,) if layout is None else layout.names


def is_known_family(family: str) -> bool:
    """Whether ``family`` has a block list (``block_names`` would not raise)."""
    return family in _LAYOUTS or family in _NO_BLOCK_MAP


def block_note(family: str) -> str | None:
    """A note to show next to per-block values for a family without a block map, else None."""
    if family in _NO_BLOCK_MAP:
        return f"{family} with a joint-block count other than 24 or 38 has no block map: every key uses the BASE value"
    return None


def block_of(key: str, family: str = SD1) -> str:
    """The block of ``key`` in ``family`` (default SD1 numbering), from the key name alone.

    UNets: ``time_embed.`` and ``label_emb.`` go to IN00; ``out.`` goes to the family's last output
    block, OUT11 or OUT08 for SDXL, which is why the family is needed. Flux: ``double_blocks.N.``
    to DNN, ``single_blocks.N.`` to SNN; SD3: ``joint_blocks.N.`` to JNN (keys with the
    ``model.diffusion_model.`` prefix or bare). VAE keys go to VAE, every other key to BASE.
    """
    layout = _layout(family)
    if layout is None:
        return BASE
    if _VAE.match(key):
        return VAE
    return layout.block(key) or BASE


def _settable(family: str) -> tuple[str, ...]:
    """The names a value may be given for: the list's names, plus VAE where there is a block map."""
    names = block_names(family)
    return names if names == (BASE,) else (*names, VAE)


def _text(value: float) -> str:
    """The shortest text that reads back as exactly ``value`` (``1`` rather than ``1.0``)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class BlockValues:
    """Per-block values of one parameter: ``values`` for the blocks given, ``default`` for the rest.

    ``default`` is the parameter's plain value; it also serves VAE unless VAE is given. ``values``
    is a copy in block-list order (a plain dict, so requests holding it pickle and deepcopy).
    """

    family: str
    default: float
    values: Mapping[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        settable = _settable(self.family)
        unknown = [block for block in self.values if block not in settable]
        if unknown:
            raise ValueError(f"{unknown} are not {self.family} blocks {settable}")
        try:
            numbers = [float(self.default), *map(float, self.values.values())]
        except OverflowError:  # from Python only: text and requests go through finite_number
            raise ValueError("per-block values must be within the range of a float") from None
        if not all(math.isfinite(number) for number in numbers):
            raise ValueError(f"per-block values must be finite: {self.default!r}, {dict(self.values)}")
        ordered = {block: float(self.values[block]) for block in settable if block in self.values}
        object.__setattr__(self, "default", float(self.default))
        object.__setattr__(self, "values", ordered)

    def value(self, block: str) -> float:
        """The value for ``block`` (a block not given, or not of this family, gets the default)."""
        return self.values.get(block, self.default)

    def value_for(self, key: str) -> float:
        """The value for a checkpoint key."""
        return self.value(block_of(key, self.family))

    def as_list(self) -> list[float]:
        """One value per name of ``block_names(family)``, in that order (for a chart or the comma list)."""
        return [self.value(block) for block in block_names(self.family)]

    def to_text(self) -> str:
        """Canonical text that ``parse_blocks`` reads back as an equal BlockValues (for recipes).

        The comma list when exactly the list's blocks are given, else ``BLOCK=value`` pairs; "" if none.
        """
        if set(self.values) == set(block_names(self.family)):
            return ",".join(_text(value) for value in self.values.values())
        return ",".join(f"{block}={_text(value)}" for block, value in self.values.items())


def finite_number(text: str | float, where: str) -> float:
    """``text`` (or a number) as a finite float; else a RequestError at ``where`` naming it."""
    try:
        number = float(text)
    except (TypeError, ValueError):
        raise RequestError(f"{where}: {shown(text)} is not a number") from None
    except OverflowError:  # an int past 1.8e308 (text never overflows: it reads as inf)
        raise RequestError(f"{where}: {shown(text)} is outside the range of a float (±1.8e308)") from None
    if not math.isfinite(number):
        raise RequestError(f"{where}: {shown(text)} is not a finite number")
    return number


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _layout_text(family: str) -> str:
    """E.g. 'IN00-IN11, M00, OUT00-OUT11, BASE, VAE' or 'D00-D18, S00-S37, BASE, VAE', for error messages."""
    layout = _layout(family)
    if layout is None:
        return BASE
    blocks = [*layout.way_in, *layout.middle, *layout.way_out]
    runs = [list(run) for _, run in itertools.groupby(blocks, key=lambda name: name.rstrip("0123456789"))]
    spans = [run[0] if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs]
    return ", ".join([*spans, BASE, VAE])


def _with_note(message: str, family: str) -> str:
    note = block_note(family)
    return f"{message}; {note}" if note else message


def _from_list(items: list[str], family: str, where: str) -> dict[str, float]:
    names = block_names(family)
    if len(items) != len(names):
        blocks = f"BASE + {len(names) - 1} blocks" if len(names) > 1 else "BASE"
        plural = "values" if len(names) > 1 else "value"
        message = f"{where}: expected {len(names)} {plural} for {family} ({blocks}), got {len(items)}"
        if len(items) == len(names) - 1:
            message += " (the first value is BASE)"
        raise RequestError(_with_note(message, family))
    return {name: finite_number(item, where) for name, item in zip(names, items, strict=True)}


def _override(item: str, values: dict[str, float], family: str, where: str) -> None:
    """Apply one ``PATTERN=value`` item (fnmatch glob over block names, case-insensitive) to ``values``."""
    pattern, equals, number = item.partition("=")
    pattern = pattern.strip().upper()
    if not equals or not pattern:
        raise RequestError(f"{where}: {item!r} is not BLOCK=value (e.g. IN04=0.3 or OUT*=0.7)")
    value = finite_number(number.strip(), where)
    matched = [block for block in _settable(family) if fnmatchcase(block, pattern)]
    if not matched:
        message = f"{where}: {pattern!r} matches no {family} block ({_layout_text(family)})"
        raise RequestError(_with_note(message, family))
    values.update(dict.fromkeys(matched, value))


def _known_family(family: str, where: str) -> None:
    try:
        block_names(family)
    except RequestError as error:
        raise RequestError(f"{where}: {error}") from None


def parse_blocks(text: str, family: str, *, param: str, default: float) -> BlockValues:
    """Per-block values of ``param`` for ``family`` from text; errors name the field ``blocks.<param>``.

    Accepts the comma list (BASE first, one number per block of ``block_names(family)``); a preset
    name; or ``BLOCK=value`` overrides with globs (``IN04=0.3,OUT*=0.7``), applied left to right,
    optionally after a preset (``ramp_in_out,M00=0``). Blocks not given use ``default``; blank text
    gives no per-block values.
    """
    where = f"blocks.{param}"
    _known_family(family, where)
    default = finite_number(default, where)
    if not text.strip():
        return BlockValues(family, default)
    items = [item.strip() for item in text.split(",")]
    if "" in items:
        raise RequestError(f"{where}: empty item {items.index('') + 1} in {text!r}")
    if all("=" not in item for item in items) and (len(items) > 1 or _is_number(items[0])):
        return BlockValues(family, default, _from_list(items, family, where))
    values: dict[str, float] = {}
    if "=" not in items[0]:
        values.update(zip(block_names(family), _head_preset(items, family, where), strict=True))
        items = items[1:]
    for item in items:
        _override(item, values, family, where)
    return BlockValues(family, default, values)


@functools.cache
def _preset_table() -> dict[str, dict]:
    text = resources.files("lib_merge").joinpath("data/block_presets.json").read_text()
    return json.loads(text)["presets"]


def presets() -> dict[str, dict]:
    """The preset definitions by name: ``about``, ``BASE`` and a ``steps`` or ``line`` rule (a copy)."""
    return copy.deepcopy(_preset_table())


def _rule_values(spec: dict, layout: _Layout) -> list[float]:
    """The values of a preset's rule for the blocks after BASE: ``steps`` gives the way in, the
    middle and the way out one value each; ``line`` runs linearly from ``first`` at the first block
    to ``middle`` at the middle block, or half a block past the way in where there is none, to
    ``last`` at the last block."""
    way_in, way_out = len(layout.way_in), len(layout.way_out)
    if "steps" in spec:
        steps = spec["steps"]
        return [steps["IN"]] * way_in + [steps[MIDDLE]] * len(layout.middle) + [steps["OUT"]] * way_out
    first, middle, last = spec["line"]
    gap = 0 if layout.middle else 0.5  # from the middle point to the nearest block: M00 itself, else half a block
    rise, fall = way_in - gap, way_out - gap
    rising = [(first * (rise - i) + middle * i) / rise for i in range(way_in)]
    falling = [(middle * (fall - d) + last * d) / fall for d in (i + 1 - gap for i in range(way_out))]
    return [*rising, *([middle] if layout.middle else []), *falling]


def _preset(name: str, family: str) -> list[float] | None:
    spec = _preset_table().get(name.lower())
    if spec is None:
        return None
    layout = _layout(family)
    blocks = [] if layout is None else _rule_values(spec, layout)
    return [float(value) for value in (spec[BASE], *blocks)]  # from the layout: always one per block


def _head_preset(items: list[str], family: str, where: str) -> list[float]:
    """The preset named by the first of ``items`` (the rest are overrides), or a RequestError."""
    head = items[0]
    values = _preset(head, family)
    if values is not None:
        return values
    if _is_number(head):
        raise RequestError(f"{where}: give either the full list of numbers or BLOCK=value items, not both")
    what = "a preset" if len(items) > 1 else "a number or a preset"
    raise RequestError(f"{where}: {head!r} is not {what} ({', '.join(_preset_table())})")


def preset_values(name: str, family: str) -> list[float]:
    """The values of preset ``name`` (case-insensitive) in ``block_names(family)`` order."""
    values = _preset(name, family)
    if values is None:
        raise RequestError(f"unknown block preset {name!r} ({', '.join(_preset_table())})")
    return values
