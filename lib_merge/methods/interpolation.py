"""Interpolation between two models beyond the straight line."""

from __future__ import annotations

import math

import torch

from . import Param, method

# Above this |cos| the two tensors are nearly parallel: sin(theta) is tiny and slerp is a lerp.
PARALLEL = 0.9995


@method(
    "slerp",
    inputs=("a", "b"),
    params={"t": Param("t", 0.5, low=0.0, high=1.0, help="0 gives A, 1 gives B")},
    label="SLERP",
    elementwise=False,
    float32=True,
)
def slerp(a: torch.Tensor, b: torch.Tensor, *, t: float) -> torch.Tensor:
    """Spherical interpolation of each tensor, flattened (Shoemake 1985, as used for SD merges):
    theta = angle(A, B); result = sin((1-t) theta)/sin(theta) A + sin(t theta)/sin(theta) B.
    Falls back to (1-t) A + t B when A and B are nearly parallel (|cos theta| > 0.9995) or one is zero.
    """
    norms = a.norm() * b.norm()
    if norms == 0:
        return a.lerp_(b, t)
    cos = float((a.flatten() @ b.flatten()) / norms)
    if abs(cos) > PARALLEL:
        return a.lerp_(b, t)
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin = math.sin(theta)
    return a.mul_(math.sin((1 - t) * theta) / sin).add_(b, alpha=math.sin(t * theta) / sin)
