"""Task vectors: one delta pipeline (drop -> trim -> sign consensus -> combine) with options.

A task vector is M_i - base. Task arithmetic adds them; TIES trims each to its largest values and
averages only those that agree with the elected sign; DARE drops values at random and rescales
the rest. Randomness comes from a generator seeded by (seed, key name, model index), so a recipe
replays bit for bit.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import torch

from . import BOOL, FLOATS, INT, Param, method

LAMBDA = Param("lambda", 1.0, help="scale of the combined task vector; negative subtracts it")
WEIGHTS = Param("weights", None, FLOATS, help="per task vector lambda, one per model; empty: all 1")
DENSITY = Param("density", 0.2, low=0.0, high=1.0, low_open=True, help="fraction of each task vector kept")
DROP = Param("p", 0.9, low=0.0, high=1.0, high_open=True, help="probability of dropping a delta value")
SEED = Param("seed", 0, INT, help="seed of the drop masks")


@method(
    "task_arithmetic",
    inputs=("base", "models"),
    variadic=1,
    params={"lambda": LAMBDA, "weights": WEIGHTS},
    label="Task arithmetic",
)
def task_arithmetic(
    base: torch.Tensor, *models: torch.Tensor, lambda_: float, weights: tuple[float, ...] | None
) -> torch.Tensor:
    """base + lambda * sum_i w_i (M_i - base) (Ilharco et al. 2023, "Editing models with task arithmetic").

    A negative lambda or weight negates a task vector (forgetting); analogies are add difference.
    """
    weights = weights or (1.0,) * len(models)
    total = models[0].sub_(base).mul_(weights[0])
    for model, weight in zip(models[1:], weights[1:], strict=True):
        total.add_(model.sub_(base), alpha=weight)
    return base.add_(total, alpha=lambda_)


@method(
    "ties",
    inputs=("base", "models"),
    variadic=1,
    params={"density": DENSITY, "lambda": LAMBDA, "weights": WEIGHTS},
    label="TIES",
    elementwise=False,
    float32=True,
)
def ties(
    base: torch.Tensor, *models: torch.Tensor, density: float, lambda_: float, weights: tuple[float, ...] | None
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim each w_i (M_i - base) to its top density fraction by
    magnitude (per tensor), elect each parameter's sign by the sum of the trimmed values, average the
    values that agree with it (disjoint mean), then base + lambda * that mean.
    """
    deltas = _deltas(base, models, weights)
    for delta in deltas:
        _keep_largest(delta, density)
    return base.add_(_disjoint_mean(deltas), alpha=lambda_)


@method(
    "dare",
    inputs=("base", "models"),
    variadic=1,
    params={
        "p": DROP,
        "lambda": LAMBDA,
        "weights": WEIGHTS,
        "seed": SEED,
        "sign_election": Param("sign_election", False, BOOL, help="DARE-TIES: average only values agreeing in sign"),
    },
    label="DARE",
    elementwise=False,
    keyed=True,
    float32=True,
)
def dare(
    base: torch.Tensor,
    *models: torch.Tensor,
    p: float,
    lambda_: float,
    weights: tuple[float, ...] | None,
    seed: int,
    sign_election: bool,
    key: str,
) -> torch.Tensor:
    """DARE (Yu et al. 2024, "Language models are Super Mario"): drop each value of w_i (M_i - base)
    with probability p, rescale the kept ones by 1 / (1 - p), then add the sum times lambda to base;
    with sign_election, TIES' sign election and disjoint mean instead of the sum (DARE-TIES).
    """
    deltas = _deltas(base, models, weights)
    if p > 0:
        for index, delta in enumerate(deltas):
            keep = torch.rand(delta.shape, generator=_generator(seed, key, index)) >= p
            delta.mul_(keep.to(delta.device)).div_(1 - p)
    combined = _disjoint_mean(deltas) if sign_election else _sum(deltas)
    return base.add_(combined, alpha=lambda_)


def _deltas(base: torch.Tensor, models, weights) -> list[torch.Tensor]:
    """w_i (M_i - base), computed in the models' own buffers."""
    weights = weights or (1.0,) * len(models)
    return [model.sub_(base).mul_(weight) for model, weight in zip(models, weights, strict=True)]


def _keep_largest(delta: torch.Tensor, density: float) -> None:
    """Zero all but the ceil(density * n) values of largest magnitude (ties at the cut are kept)."""
    n = delta.numel()
    keep = min(n, math.ceil(Fraction(repr(density)) * n))  # exact: 0.55 * 100 is 55, not 55.000000000000014
    if keep >= n or n == 0:
        return
    magnitude = delta.abs()
    delta.masked_fill_(magnitude < _kth_largest(magnitude, keep), 0)


_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _kth_largest(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of non-negative floats, exactly, by radix selection on their bit patterns.

    Non-negative floats sort like their bits read as integers, so 16 bits at a time a histogram
    (torch.bincount) finds the digit of the k-th largest: two linear passes for float32, several
    times faster than torch.kthvalue's selection on the CPU.
    """
    bits = magnitude.flatten().view(_INT_VIEW[magnitude.dtype])
    if bits.dtype == torch.int16:
        bits = bits.to(torch.int32)
    shift = magnitude.element_size() * 8 - 16
    found, remaining = 0, k
    while shift >= 0:
        digits = (bits >> shift) & 0xFFFF
        from_top = torch.bincount(digits, minlength=1 << 16).flip(0).cumsum(0)
        index = int(torch.searchsorted(from_top, remaining))
        remaining -= int(from_top[index - 1]) if index else 0
        digit = 0xFFFF - index
        found |= digit << shift
        bits = bits[digits == digit]
        shift -= 16
    return torch.tensor(found, dtype=_INT_VIEW[magnitude.dtype]).view(magnitude.dtype).to(magnitude.device)


def _disjoint_mean(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Per parameter: the mean of the values whose sign agrees with the sign of their sum.

    Works in the deltas' own buffers (they are consumed) plus one sign and one count tensor.
    """
    elected = deltas[0].clone()
    for delta in deltas[1:]:
        elected.add_(delta)
    elected.sign_()
    count = torch.zeros(elected.shape, dtype=torch.int32, device=elected.device)
    for delta in deltas:
        agrees = torch.mul(delta, elected) > 0
        delta.mul_(agrees)
        count.add_(agrees)
    return _sum(deltas).div_(count.clamp_min_(1))


def _sum(deltas: list[torch.Tensor]) -> torch.Tensor:
    total = deltas[0]
    for delta in deltas[1:]:
        total.add_(delta)
    return total


def _generator(seed: int, key: str, index: int) -> torch.Generator:
    """A CPU generator seeded by (seed, key, model index): the same masks on every run and device."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
