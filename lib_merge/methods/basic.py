"""The three methods of the webui's built-in merger (modules/extras.py, run_modelmerger)."""

from __future__ import annotations

import torch

from . import method


@method("weighted_sum", inputs=("a", "b"), params={"alpha": 0.3}, label="Weighted sum")
def weighted_sum(a: torch.Tensor, b: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """(1 - alpha) * A + alpha * B, the built-in's formula; alpha outside [0, 1] extrapolates.

    Computed as the equal A + alpha * (B - A) in one pass (torch.lerp, exact at alpha 0 and 1).
    """
    return a.lerp_(b, alpha)


@method(
    "add_difference",
    inputs=("a", "b", "c"),
    params={"alpha": 1.0},
    label="Add difference",
    optional=("c",),
)
def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, *, alpha: float) -> torch.Tensor:
    """A + alpha * (B - C); a key of B that C lacks contributes zero, as in the built-in."""
    if c is None:
        return a
    return a.add_(b.sub_(c), alpha=alpha)


@method("no_interpolation", inputs=("a",), params={}, label="No interpolation")
def no_interpolation(a: torch.Tensor) -> torch.Tensor:
    """A unchanged: used to convert, bake in a VAE, drop keys or save as fp16."""
    return a
