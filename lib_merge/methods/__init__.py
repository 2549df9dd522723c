"""The registry of merge methods: pure tensor functions registered by name.

The tab's choices, the CLI's ``--method`` and ``methods`` listing and the API's schema are generated
from ``METHODS``; there is no second list. A method receives float tensors that the engine owns (it
may work in place on them) and returns the exact-as-possible result, which the engine rounds once
to the output dtype.
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import RequestError, shown

FLOAT, INT, BOOL, FLOATS = "float", "int", "bool", "floats"


@dataclass(frozen=True)
class Param:
    """One keyword parameter of a method: its default, its kind and the values it accepts.

    ``floats`` is a list with one value per variadic input (a soup's weights); ``None`` means
    "the method's own default" (uniform weights). Only ``float`` parameters may be given per block.
    """

    name: str
    default: float | int | bool | None
    kind: str = FLOAT
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # density lives in (0, 1]: 0 itself is refused
    high_open: bool = False
    help: str = ""

    @property
    def arg(self) -> str:
        """The Python keyword the function takes (``lambda`` -> ``lambda_``)."""
        return self.name + "_" if keyword.iskeyword(self.name) else self.name

    @property
    def per_block(self) -> bool:
        return self.kind == FLOAT

    def range_text(self) -> str:
        if self.low is None and self.high is None:
            return "any number"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f"{left}{_num(self.low, '-inf')}, {_num(self.high, 'inf')}{right}"

    def check(self, value, where: str):
        """``value`` converted to this parameter's kind, or a RequestError naming ``where``."""
        if self.kind == FLOATS:
            if value is None:
                return None
            if isinstance(value, str):
                value = [part for part in value.replace(" ", "").split(",") if part]
            if not isinstance(value, (list, tuple)):
                raise RequestError(f"{where}: expected a list of numbers, got {shown(value)}")
            return tuple(self._number(v, f"{where}[{i}]") for i, v in enumerate(value)) or None  # empty: default
        if self.kind == BOOL:
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise RequestError(f"{where}: expected true or false, got {shown(value)}")
        number = self._number(value, where)
        if self.kind == INT:
            if number != int(number):
                raise RequestError(f"{where}: expected a whole number, got {shown(value)}")
            return int(number)
        return number

    def _number(self, value, where: str) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RequestError(f"{where}: expected a number, got {shown(value)}") from None
        except OverflowError:  # an integer past 1.8e308, e.g. JSON's 1 followed by 400 zeros
            raise RequestError(f"{where}: {shown(value)} is outside the range of a float (±1.8e308)") from None
        if isinstance(value, bool) or not math.isfinite(number):
            raise RequestError(f"{where}: expected a finite number, got {shown(value)}")
        too_low = self.low is not None and (number < self.low or (self.low_open and number == self.low))
        too_high = self.high is not None and (number > self.high or (self.high_open and number == self.high))
        if too_low or too_high:
            raise RequestError(f"{where}: {number:g} is outside {self.range_text()}")
        return number


@dataclass(frozen=True)
class Method:
    name: str
    func: Callable
    inputs: tuple[str, ...]
    params: dict[str, Param]
    label: str
    # Inputs that may lack a key; the method then receives None for them.
    optional: tuple[str, ...] = ()
    # Elementwise methods may be fed slices of a tensor; others get the whole tensor.
    elementwise: bool = True
    # The last input repeats: at least this many models fill it (0: not variadic).
    variadic: int = 0
    # Methods that draw random numbers get the key name, to seed a generator by (seed, key).
    keyed: bool = False
    # Whole-tensor methods compute in float32: float64 copies of N inputs would not fit the memory budget.
    float32: bool = False
    # Float32 methods that read their inputs as stored (any float dtype, never modified) and work
    # through them in slices themselves, so no full-size float copy of each input is made.
    stored_inputs: bool = False
    # Picks which of the given models take part (average_last keeps the newest N); None: all of them.
    choose: Callable | None = field(default=None, compare=False)
    doc: str = field(default="", compare=False)
    # Offered in the tab, the API's and the CLI's method lists; False for steps of other features
    # (add_delta, a LoRA baked in), which recipes may still name.
    listed: bool = True
    # The method is ``a + alpha * delta``: a delta input whose reader can add its change into a
    # tensor in place (a LoRA: one matrix product per module) is asked to, instead of the method
    # getting the change as a tensor of its own (for a LoRA on every layer, a pass over the model).
    adds_delta: bool = False

    @property
    def cli_name(self) -> str:
        return self.name.replace("_", "-")

    @property
    def min_inputs(self) -> int:
        return len(self.inputs) - 1 + self.variadic if self.variadic else len(self.inputs)

    @property
    def max_inputs(self) -> int | None:
        return None if self.variadic else len(self.inputs)

    def inputs_text(self) -> str:
        if not self.variadic:
            return ", ".join(self.inputs)
        fixed = [*self.inputs[:-1], f"{self.inputs[-1]}... ({self.variadic} or more)"]
        return ", ".join(fixed)

    def check_input_count(self, count: int, where: str = "models") -> None:
        if count < self.min_inputs or (self.max_inputs is not None and count > self.max_inputs):
            wanted = f"{self.min_inputs} or more" if self.variadic else str(self.min_inputs)
            raise RequestError(
                f"{where}: method {self.cli_name} takes {wanted} model(s) ({self.inputs_text()}), got {count}"
            )

    def check_params(self, given: dict, repeated: int | None = None, where: str = "params") -> dict:
        """The method's parameters with defaults filled in; unknown or invalid ones are refused.

        ``repeated`` is the number of models filling the variadic input: a ``floats`` list must
        have exactly one value per such model.
        """
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            raise RequestError(f"{where}.{unknown[0]}: method {self.cli_name} has no such parameter (it has: {known})")
        values = {
            name: param.check(given[name], f"{where}.{name}") if name in given else param.default
            for name, param in self.params.items()
        }
        for name, param in self.params.items():
            value = values[name]
            if param.kind == FLOATS and value is not None and repeated is not None and len(value) != repeated:
                raise RequestError(
                    f"{where}.{name}: expected {repeated} values (one per model in {self.inputs[-1]}), got {len(value)}"
                )
        return values


METHODS: dict[str, Method] = {}


def listed_methods() -> list[Method]:
    """The methods a user picks from, in the tab's order."""
    return [m for m in METHODS.values() if m.listed]


def method(
    name: str,
    *,
    inputs: tuple[str, ...],
    params: dict[str, float | Param],
    label: str,
    optional: tuple[str, ...] = (),
    elementwise: bool = True,
    variadic: int = 0,
    keyed: bool = False,
    float32: bool = False,
    stored_inputs: bool = False,
    choose: Callable | None = None,
    listed: bool = True,
    adds_delta: bool = False,
) -> Callable[[Callable], Callable]:
    """Register ``func`` under ``name``; registering a name twice is a programming error.

    ``params`` maps a name to its default (a float) or to a full ``Param``.
    """

    def register(func: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        specs = {key: value if isinstance(value, Param) else Param(key, value) for key, value in params.items()}
        doc = (func.__doc__ or "").strip()
        METHODS[name] = Method(
            name,
            func,
            inputs,
            specs,
            label,
            optional,
            elementwise,
            variadic,
            keyed,
            float32 or stored_inputs,
            stored_inputs,
            choose,
            doc,
            listed,
            adds_delta,
        )
        return func

    return register


def get_method(name: str) -> Method:
    """Look a method up by registry name, CLI spelling (``weighted-sum``) or label (``Weighted sum``)."""
    for m in METHODS.values():
        if name in (m.name, m.cli_name, m.label):
            return m
    known = ", ".join(m.cli_name for m in METHODS.values())
    raise RequestError(f"interp_method: unknown merge method {name!r} (known: {known})")


def _num(value: float | None, missing: str) -> str:
    return missing if value is None else f"{value:g}"


from . import basic, deltas, interpolation, soups, task_vectors  # noqa: E402,F401  (registering, in the order the tab lists them)
