"""Adding a change to a model: a LoRA baked in, or any stored difference."""

from __future__ import annotations

import torch

from . import Param, method


@method(
    "add_delta",
    inputs=("a", "delta"),
    params={"alpha": Param("alpha", 1.0, help="how much of the change is added; negative subtracts it")},
    label="Add delta",
    listed=False,  # a LoRA bake's step: its delta input is a LoRA read as changes, not a checkpoint
    adds_delta=True,  # a LoRA adds its change into A's copy itself (LoraReader.add_into)
)
def add_delta(a: torch.Tensor, delta: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """A + alpha * D, where D is a change to A (a LoRA's up @ down * scale, read as a delta); keys D
    lacks are A's as they are.

    Where D is 0, or alpha is, A's value is kept as it is: so a -0.0 of A stays -0.0 and a ratio of
    0 writes A's own bytes. (A LoRA module adds its change into the rows it patches itself, as the
    webui does: there a -0.0 meeting a change of exactly 0 becomes 0.0; rows it does not patch, and
    keys, keep their bytes.)
    """
    if alpha == 0:
        return a
    return torch.where(delta == 0, a, torch.add(a, delta, alpha=alpha))
