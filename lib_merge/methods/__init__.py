"""The registry of merge methods: pure tensor functions registered by name.

The tab's choices, the CLI's ``--method`` and the API's schema are generated from ``METHODS``;
there is no second list. A method receives float64 tensors that the engine owns (it may work in
place on them) and returns the exact-as-possible result, which the engine rounds once to the
output dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import RequestError


@dataclass(frozen=True)
class Method:
    name: str
    func: Callable
    inputs: tuple[str, ...]
    params: dict[str, float]
    label: str
    # Inputs that may lack a key; the method then receives None for them.
    optional: tuple[str, ...] = ()
    # Elementwise methods may be fed slices of a tensor; others get the whole tensor.
    elementwise: bool = True
    doc: str = field(default="", compare=False)

    @property
    def cli_name(self) -> str:
        return self.name.replace("_", "-")


METHODS: dict[str, Method] = {}


def method(
    name: str,
    *,
    inputs: tuple[str, ...],
    params: dict[str, float],
    label: str,
    optional: tuple[str, ...] = (),
    elementwise: bool = True,
) -> Callable[[Callable], Callable]:
    """Register ``func`` under ``name``; registering a name twice is a programming error."""

    def register(func: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        METHODS[name] = Method(
            name, func, inputs, dict(params), label, optional, elementwise, (func.__doc__ or "").strip()
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


from . import basic  # noqa: E402,F401  (registers the built-in's methods)
