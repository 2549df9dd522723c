"""Averages of many models: soups (uniform or weighted), checkpoint averaging and Model Stock."""

from __future__ import annotations

import os
import re

import torch

from ..errors import RequestError
from . import BOOL, FLOATS, INT, Param, method

WEIGHTS = Param("weights", None, FLOATS, help="one per model; empty: uniform")


@method(
    "soup",
    inputs=("models",),
    variadic=2,
    params={
        "weights": WEIGHTS,
        "normalise": Param("normalise", True, BOOL, help="divide by the sum of the weights"),
    },
    label="Model soup",
)
def soup(*models: torch.Tensor, weights: tuple[float, ...] | None, normalise: bool) -> torch.Tensor:
    """sum_i w_i M_i, divided by sum_i w_i when normalised (Wortsman et al. 2022, "Model soups").

    Without weights every w_i is 1: the uniform soup, the plain mean of the models.
    """
    weights = weights or (1.0,) * len(models)
    total = models[0].mul_(weights[0])
    for model, weight in zip(models[1:], weights[1:], strict=True):
        total.add_(model, alpha=weight)
    if not normalise:
        return total
    norm = sum(weights)
    if norm == 0:
        raise RequestError("params.weights: the weights sum to 0, so they cannot be normalised")
    return total.div_(norm)


def newest(paths: list[os.PathLike], params: dict) -> list[os.PathLike]:
    """The last ``last`` checkpoints of a run: by the step number in the name (the last number, when
    every name has a different one), else by modification time."""
    last = params["last"]
    numbered = [(_step(p), p) for p in paths]
    steps = [step for step, _ in numbered]
    if None not in steps and len(set(steps)) == len(steps):  # sd15-a / sd15-b: 15 is no step number
        ordered = [p for _, p in sorted(numbered, key=lambda item: item[0])]
    else:
        ordered = sorted(paths, key=lambda p: os.stat(p).st_mtime)
    return ordered[-last:]


def _step(path: os.PathLike) -> int | None:
    """The last number in the file name (``run-step-001200.safetensors`` -> 1200)."""
    numbers = re.findall(r"\d+", os.path.splitext(os.path.basename(path))[0])
    return int(numbers[-1]) if numbers else None


@method(
    "average_last",
    inputs=("checkpoints",),
    variadic=1,
    params={"last": Param("last", 3, INT, low=1, help="how many of the newest checkpoints to average")},
    label="Average last N",
    choose=newest,
)
def average_last(*checkpoints: torch.Tensor, last: int) -> torch.Tensor:
    """The mean of the newest ``last`` checkpoints of a training run (checkpoint averaging).

    Newest by the step number in the file name, else by modification time.
    """
    return soup(*checkpoints, weights=None, normalise=True)


@method(
    "model_stock",
    inputs=("base", "models"),
    variadic=2,
    params={},
    label="Model Stock",
    elementwise=False,
    float32=True,
)
def model_stock(base: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
    """t * mean(M_i) + (1 - t) * base per tensor, t = N cos / (1 + (N - 1) cos), with cos the mean
    pairwise cosine of the task vectors M_i - base (Jang et al. 2024, "Model Stock").
    """
    deltas = [model.sub(base).flatten() for model in models]
    cosines = []
    for i, first in enumerate(deltas):
        for second in deltas[i + 1 :]:
            norms = first.norm() * second.norm()
            cosines.append(float(first @ second / norms) if norms > 0 else 0.0)
    cos = sum(cosines) / len(cosines)
    n = len(models)
    t = n * cos / (1 + (n - 1) * cos) if 1 + (n - 1) * cos != 0 else 0.0
    mean = soup(*models, weights=None, normalise=True)
    return mean.mul_(t).add_(base, alpha=1 - t)
